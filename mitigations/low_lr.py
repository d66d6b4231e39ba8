"""low_lr: the seed recipe's learning rate (1e-5..2e-5) on every parameter group, whatever train.lr says.

Warmup (3-5%), cosine decay and 1-3 epochs are the training defaults already; this preset pins the LR so a
strategy list can contrast it with an aggressive baseline (e.g. train.lr=1e-4) in one experiment.
"""

from __future__ import annotations

from dataclasses import dataclass

from forgetting.harness.configlib import knob
from forgetting.harness.optim import default_param_groups
from forgetting.mitigations.registry import register_mitigation


@dataclass
class LowLRConfig:
    lr: float = knob(1e-5, "learning rate for every parameter group (seed recipe: 1e-5..2e-5)")

    def __post_init__(self):
        if not 0 < self.lr <= 1e-3:
            raise ValueError(f"lr: must be in (0, 1e-3], got {self.lr}")


@register_mitigation("low_lr", LowLRConfig)
class LowLR:
    def __init__(self, config: LowLRConfig):
        self.config = config

    def param_groups(self, model, ctx) -> list[dict]:
        return [dict(group, lr=self.config.lr) for group in default_param_groups(model, ctx.job.train.weight_decay)]

    def report(self, model, ctx) -> dict:
        return {"lr": self.config.lr}
