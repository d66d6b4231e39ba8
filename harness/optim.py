"""The optimiser and its schedule: AdamW parameter groups and the LR multiplier per step.

Kept apart from the loop so that mitigations that change the groups (low_lr) build on the same defaults
without importing the loop.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, warmup_ratio: float, schedule: str, min_ratio: float) -> float:
    """LR multiplier at `step` (0-based): linear warmup, then cosine/linear decay to min_ratio, or constant.

    Warmup step k of W uses (k+1)/(W+1): it rises linearly from 0 but never spends a step at 0 (an update of
    zero size that would still move AdamW's moment estimates).
    """
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def default_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms, biases and other vectors are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(groups: list[dict], t, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per step where torch supports it for this device (CPU, CUDA)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(
        groups, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, fused=fused or None, foreach=None if fused else True
    )
