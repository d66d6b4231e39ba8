"""The order of training: which examples form each optimizer step, and how a step is cut into micro-batches.

The whole plan is a pure function of (dataset lengths, batch size, budget, seed), so every process knows
every step, the global number of target tokens per step needs no communication, and a resumed run sees
the same data order. Within a step, examples are sorted by length and dealt to processes, then packed
greedily into micro-batches under a padded-token budget: padding stays small without packing.
"""

from __future__ import annotations

import math

import torch

from forgetting.harness.formats import IGNORE_INDEX, Example


def plan_steps(num_examples: int, batch_size: int, epochs: float, max_steps: int | None, seed: int) -> list[list[int]]:
    """Example indices of every optimizer step: seeded per-epoch shuffles, cut into full global batches."""
    total_steps = max_steps or max(1, math.ceil(epochs * num_examples / batch_size))
    stream: list[int] = []
    epoch = 0
    while len(stream) < total_steps * batch_size:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        stream += torch.randperm(num_examples, generator=generator).tolist()
        epoch += 1
    return [stream[i * batch_size : (i + 1) * batch_size] for i in range(total_steps)]


def rank_share(indices: list[int], lengths: list[int], rank: int, world_size: int) -> list[int]:
    """This process's part of a global batch: sorted longest first, dealt round-robin (balanced tokens)."""
    ordered = sorted(indices, key=lambda i: (-lengths[i], i))
    return ordered[rank::world_size]


def micro_batches(indices: list[int], lengths: list[int], max_tokens: int, packed: bool = False) -> list[list[int]]:
    """Greedy groups of length-sorted examples whose size fits `max_tokens`.

    Size: padded, count x longest (the first, longest member); packed (one row, no padding), the sum of lengths.
    """
    groups: list[list[int]] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        if groups:
            group = groups[-1]
            size = sum(lengths[j] for j in group) + lengths[i] if packed else (len(group) + 1) * lengths[group[0]]
            if size <= max_tokens:
                group.append(i)
                continue
        groups.append([i])  # an example longer than max_tokens still gets its own micro-batch
    return groups


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding)."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def target_tokens(examples: list[Example]) -> int:
    """Tokens that carry a loss: labelled positions after the first (position 0 has no prediction)."""
    return sum(sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples)
