"""freeze: train only part of the model; parameters matched by name pattern or layer range stay fixed."""

from __future__ import annotations

import re
from dataclasses import dataclass

from forgetting.harness.configlib import knob
from forgetting.harness.errors import UserError
from forgetting.mitigations.registry import register_mitigation

LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class FreezeConfig:
    patterns: list[str] = knob([], "regular expressions; parameters whose name matches one are frozen")
    layers: list[int] = knob([], "[first, last] transformer layers to freeze, inclusive (empty: none)")
    embeddings: bool = knob(False, "freeze the input embeddings (and a tied LM head)")

    def __post_init__(self):
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"patterns: {pattern!r} is not a regular expression: {err}") from None
        if self.layers and (len(self.layers) != 2 or self.layers[0] > self.layers[1] or self.layers[0] < 0):
            raise ValueError(f"layers: expected [first, last] with 0 <= first <= last, got {self.layers}")


@register_mitigation("freeze", FreezeConfig)
class Freeze:
    def __init__(self, config: FreezeConfig):
        self.config = config
        self.frozen: list[str] = []

    def _matches(self, name: str, model) -> bool:
        if any(re.search(p, name) for p in self.config.patterns):
            return True
        layer = LAYER.search(name)
        if self.config.layers and layer and self.config.layers[0] <= int(layer.group(1)) <= self.config.layers[1]:
            return True
        embeddings = model.get_input_embeddings().weight
        return self.config.embeddings and dict(model.named_parameters())[name] is embeddings

    def wrap_model(self, model, ctx):
        self.frozen = [name for name, _ in model.named_parameters() if self._matches(name, model)]
        if not self.frozen:
            raise UserError("mitigations: freeze matches no parameter; check patterns/layers")
        for name, param in model.named_parameters():
            if name in self.frozen:
                param.requires_grad_(False)
        return model

    def report(self, model, ctx) -> dict:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"frozen_tensors": len(self.frozen), "trainable_fraction": trainable / total}
