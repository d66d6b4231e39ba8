"""Tokens/s and MFU of one SFT optimizer step on the embedded SmolLM2-135M: ours vs HF Trainer vs TRL SFTTrainer.

All three train the same 16 built-in-task conversations per step (response-only loss, no gradient
checkpointing, fused AdamW, grad clipping; see `benchmarks/systems.py`), in fp32 and with bf16 autocast (fp32
master weights); each is compared with ours at the same precision. In fp32 ours and HF Trainer also run with
torch.compile (the one-time compilation is the warm-up round, not timed). The machine's matmul peak is measured in
the same run, so MFU (6 N tokens/s over the peak) is a ratio of two measurements on the same cores. The table
is printed at the end and saved to .benchmarks/step_throughput.json; BENCHMARKS.md records the numbers.

    tox -e bench        (or: pytest benchmarks -s)
"""

from __future__ import annotations

import pytest

from benchmarks.flops import matmul_peak_flops, step_flops
from benchmarks.systems import LABELS, SYSTEMS, make_step

ROUNDS = 5
PRECISIONS = ["fp32", "bf16"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_matmul_peak(results, precision):
    """The reference for MFU: the best of square matmuls (1024..4096) on this machine, at this precision."""
    results.setdefault("peak", {})[precision] = matmul_peak_flops(precision)


CASES = [(system, precision, False) for precision in PRECISIONS for system in SYSTEMS] + [
    ("ours", "fp32", True), ("hf_trainer", "fp32", True)]  # torch.compile, each system's own model compiled


@pytest.mark.parametrize(("system", "precision", "compiled"), CASES)
def test_step(benchmark, embedded_batch, results, system, precision, compiled):
    if system == "trl":
        pytest.importorskip("trl")
    step = make_step(system, embedded_batch, precision, compile=compiled)
    benchmark.pedantic(step.run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    flops = step_flops(embedded_batch[2], step)
    row = {"tokens_per_s": step.tokens / seconds, "seconds_per_step": seconds, "tokens": step.tokens,
           "padding_fraction": 1 - step.tokens / step.padded, "model_flops_6n": flops["model_flops_6n"],
           "executed_flops": flops["executed_flops"]}
    peak = results.get("peak", {}).get(precision)  # the warm-up round above absorbed any compilation
    if peak:
        row["mfu"] = flops["model_flops_6n"] / seconds / peak
        row["executed_flop_utilisation"] = flops["executed_flops"] / seconds / peak
    results.setdefault("steps", {})[f"{LABELS[system]} {precision}{'+compile' if compiled else ''}"] = row
