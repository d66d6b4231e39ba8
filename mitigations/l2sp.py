"""l2sp: an L2 pull toward the starting weights, (strength / 2) * sum_i (theta_i - theta0_i)^2 (EWC with F = 1).

On a sharded model each process holds the anchor of its own shards and adds the penalty of those: the sum
over processes is the whole penalty, and each shard's gradient is exact (`harness.sharding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forgetting.harness.configlib import knob
from forgetting.harness.sharding import local, local_sum
from forgetting.mitigations.registry import register_mitigation


@dataclass
class L2SPConfig:
    strength: float = knob(0.01, "lambda: weight of the squared distance to the starting weights")

    def __post_init__(self):
        if not self.strength >= 0:
            raise ValueError(f"strength: must be >= 0, got {self.strength}")


@register_mitigation("l2sp", L2SPConfig)
class L2SP:
    def __init__(self, config: L2SPConfig):
        self.config = config
        self.anchor: list[torch.Tensor] = []

    def prepare(self, model, ctx) -> None:
        self.anchor = [local(p).detach().clone() for p in model.parameters() if p.requires_grad]

    def penalty(self, model, ctx) -> torch.Tensor:
        params = [local(p) for p in model.parameters() if p.requires_grad]
        squared = torch.stack([(p - a).pow(2).sum() for p, a in zip(params, self.anchor)]).sum()
        return 0.5 * self.config.strength * squared

    def report(self, model, ctx) -> dict:
        with torch.no_grad():
            value = local_sum(self.penalty(model, ctx), model)
        return {"strength": self.config.strength, "final_penalty": float(value)}
