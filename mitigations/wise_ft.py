"""wise_ft: after training, interpolate base + alpha * (tuned - base) for each alpha (Wortsman et al., WiSE-FT).

Each interpolated model is saved as `final/wise_ft_<alpha>` and is its own point on the gain-vs-forgetting
curve, for free: no extra training. Full-parameter models only (for LoRA, scale the adapter instead).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from harness.configlib import knob
from harness.errors import UserError
from mitigations.registry import register_mitigation


@dataclass
class WiseFTConfig:
    alphas: list[float] = knob([0.25, 0.5, 0.75], "interpolation weights of the tuned model (0: base, 1: tuned)")

    def __post_init__(self):
        if not self.alphas or not all(0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"alphas: expected numbers in [0, 1], got {self.alphas}")


def interpolate(base: dict, tuned: dict, alpha: float) -> dict:
    """base + alpha * (tuned - base) for every floating tensor (others taken from tuned)."""
    return {k: torch.lerp(base[k], v, alpha) if v.is_floating_point() else v for k, v in tuned.items()}


@register_mitigation("wise_ft", WiseFTConfig)
class WiseFT:
    def __init__(self, config: WiseFTConfig):
        self.config = config
        self.base: dict = {}

    def prepare(self, model, ctx) -> None:
        if hasattr(model, "peft_config"):
            raise UserError("mitigations: wise_ft works on full-parameter models; with lora, scale the adapter instead")
        self.base = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def export(self, model, ctx) -> dict:
        tuned = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        models = {}
        for alpha in self.config.alphas:
            point = copy.deepcopy(model).to("cpu")
            point.load_state_dict(interpolate(self.base, tuned, alpha))
            models[f"wise_ft_{alpha:g}"] = point
        return models

    def report(self, model, ctx) -> dict:
        return {"alphas": list(self.config.alphas), "dirs": [f"final/wise_ft_{a:g}" for a in self.config.alphas]}
