"""Padding-free micro-batches: several sequences packed into one row, each attending only to itself.

A packed micro-batch is one row of concatenated sequences with position ids restarting at every sequence and
the sequence boundaries (`segments`). The model runs with the attention implementation registered here,
`forgetting_packed`: for a packed batch it runs transformers' own SDPA attention once per sequence (causal,
no mask), so no token sees another sequence and no FLOP is spent on padding; for any other call it is exactly
SDPA. The linear layers, which are most of the work, see only real tokens. On a CPU a step is ~8% faster than
with padded micro-batches on the built-in task (BENCHMARKS.md); loss and gradients equal the padded ones (tests).
On a CPU the packed attention runs in fp32 even under bf16 autocast: the CPU's bf16 flash-attention backward
takes ~2x the time of fp32's at these sizes, and a bf16 step spent a quarter of its time there.
Micro-batches are formed by `harness.batching.micro_batches(..., packed=True)`; the training loop runs them
inside `with packed_attention_on(model):`.

A model whose attention does not go through transformers' attention interface would silently let sequences
see each other; `packed_attention` counts the calls and `train` refuses such a model after its first step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from forgetting.harness.formats import IGNORE_INDEX, Example

IMPLEMENTATION = "forgetting_packed"
CALLS = {"packed": 0}  # packed attention calls, checked by the training loop


def packed_attention(module, query, key, value, attention_mask, segments=None, **kwargs):
    """SDPA over each packed sequence separately (`segments`: boundaries); plain SDPA when not packed."""
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    CALLS["packed"] += 1
    lengths = [b - a for a, b in zip(segments[:-1], segments[1:])]
    dtype = value.dtype
    on_cpu = query.device.type == "cpu"
    if on_cpu:  # in fp32 even under bf16 autocast: the CPU's bf16 flash-attention backward is ~2x slower
        query, key, value = query.float(), key.float(), value.float()
    with torch.autocast("cpu", enabled=False) if on_cpu else nullcontext():
        # split, not slicing: the backward of one split is one cat, that of each slice a zero-filled full tensor
        outputs = [
            sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]
            for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
        ]
    return torch.cat(outputs, dim=1).to(dtype), None


def _mask(*args, **kwargs):
    """No mask for a packed row (each sequence is causal on its own); SDPA's mask for a padded batch."""
    return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)


def register() -> None:
    AttentionInterface.register(IMPLEMENTATION, packed_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _mask)


def transformers_model(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_packing(model) -> bool:
    """True when the model runs transformers' SDPA attention, which the packed implementation wraps."""
    config = getattr(transformers_model(model), "config", None)
    return getattr(config, "_attn_implementation", None) in ("sdpa", IMPLEMENTATION)


def enable(model) -> Callable[[], None]:
    """Switch the model's attention to `forgetting_packed`; returns the function that switches it back.

    The attention implementation is not saved with checkpoints, so they load with SDPA anywhere.
    """
    register()
    base = transformers_model(model)
    previous = base.config._attn_implementation
    base.set_attn_implementation(IMPLEMENTATION)
    CALLS["packed"] = 0
    return lambda: base.set_attn_implementation(previous)


@contextmanager
def packed_attention_on(model) -> Iterator[None]:
    """`enable` for a `with` block: the attention is switched back however the block ends (an error too)."""
    restore = enable(model)
    try:
        yield
    finally:
        restore()


def pack(examples: list[Example]) -> dict:
    """One row of the concatenated examples: input_ids, labels, position_ids (1, T) and the boundaries.

    Each example's first label is dropped (-100): in a packed row the position before it is the previous
    example's last token, which must not learn to predict the next example's first token.
    """
    ids, labels, positions, segments = [], [], [], [0]
    for example in examples:
        ids += example.input_ids
        labels += [IGNORE_INDEX] + list(example.labels[1:])
        positions += range(len(example))
        segments.append(segments[-1] + len(example))
    row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
    return {"input_ids": row(ids), "labels": row(labels), "position_ids": row(positions), "segments": tuple(segments)}
