"""FLOP accounting for MFU: the machine's measured matmul peak, and the FLOPs of one training step.

MFU follows the usual convention (PaLM, nanoGPT): 6 N FLOPs per real token (N = all parameters, the tied
embedding counted once as the LM head), over the measured peak. Because our loop never projects prompt positions
to the vocabulary, it executes fewer FLOPs than 6 N per token; `executed_flops` counts what the step actually
multiplies (linear layers over padded tokens less the last layer's skipped positions, the LM head over the
positions kept, attention scores), so the hardware utilisation can be read beside the MFU.
"""

from __future__ import annotations

import time

import torch


def matmul_peak_flops(precision: str = "fp32", sizes=(1024, 2048, 4096), device: str = "cpu") -> float:
    """Best FLOP/s of square matmuls on this machine (median of 3 timed runs per size after one warm-up)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        times = []
        for i in range(4):
            if device != "cpu":
                torch.cuda.synchronize()
            started = time.perf_counter()
            a @ b
            if device != "cpu":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - started)
        best = max(best, 2 * n**3 / sorted(times)[1])
    return best


def step_flops(model, step) -> dict[str, float]:
    """{'model_flops_6n': 6 N x real tokens, 'executed_flops': matmul FLOPs the step really performs (full FT)}."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    head = config.vocab_size * config.hidden_size
    body = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
    )
    # attention scores and weighted values: 2 matmuls of (T x T x d) per layer forward, x3 with backward;
    # padded rows: every query against every key of the row (the CPU kernels do not skip masked blocks);
    # packed rows: each sequence against itself
    attention = 3 * 2 * 2 * step.attention_pairs * config.hidden_size * config.num_hidden_layers
    executed = 6 * body * step.padded + 6 * head * step.kept_positions + attention
    if step.tail_skipped:  # ours: the last layer's MLP and output projection only where a logit is taken
        from forgetting.harness.last_layer import last_decoder_layer

        layer = last_decoder_layer(model)
        tail = sum(
            m.weight.numel() for m in [*layer.mlp.modules(), layer.self_attn.o_proj] if isinstance(m, torch.nn.Linear)
        )
        executed -= 6 * tail * step.tail_skipped
    return {"model_flops_6n": 6 * total * step.tokens, "executed_flops": float(executed)}
