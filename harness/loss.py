"""The per-batch loss: summed cross-entropy over response tokens, with logits computed only where needed.

Positions whose next token is a prompt/padding token never reach the LM head (transformers'
`logits_to_keep` with a boolean mask), which skips most of the vocabulary projection on prompt-heavy data.
The caller divides by the number of target tokens in the whole optimizer step, so gradient accumulation
and uneven lengths weight every response token equally (transformers #24725, TRL #2175).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forgetting.harness.batching import collate, micro_batches, target_tokens
from forgetting.harness.formats import IGNORE_INDEX


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): keep[b, t] is True where labels[b, t + 1] is a target; targets in row-major order."""
    following = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = following != IGNORE_INDEX
    return keep, following[following != IGNORE_INDEX]


def summed_response_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over target tokens of -log p(token | prefix); logits only at positions that predict a target."""
    keep, targets = next_token_targets(batch["labels"])
    if "segments" in batch:  # a packed row (harness.packing): no mask, positions restart per sequence
        inputs = {"position_ids": batch["position_ids"], "segments": batch["segments"]}
    else:
        inputs = {"attention_mask": batch["attention_mask"]}
    output = model(input_ids=batch["input_ids"], logits_to_keep=keep, use_cache=False, **inputs)
    return F.cross_entropy(output.logits.float(), targets, reduction="sum")


@torch.no_grad()
def mean_response_loss(model: torch.nn.Module, examples: list, pad_id: int, micro_batch_tokens: int = 4096) -> float:
    """Mean CE per response token over `examples` (e.g. a held-out split), in length-sorted batches."""
    device = next(model.parameters()).device
    total = torch.zeros((), device=device, dtype=torch.float64)
    lengths = [len(e) for e in examples]
    for group in micro_batches(list(range(len(examples))), lengths, micro_batch_tokens):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in group], pad_id).items()}
        total += summed_response_loss(model, batch).double()
    return (total / max(1, target_tokens(examples))).item()
