"""lora: train low-rank adapters (peft) on a frozen base; the checkpoint is a PEFT adapter, optionally merged too."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from peft import LoraConfig, get_peft_model

from harness.configlib import knob
from harness.errors import UserError
from mitigations.registry import register_mitigation

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraMitigationConfig:
    r: int = knob(16, "adapter rank")
    alpha: float = knob(32.0, "scaling numerator: updates are scaled by alpha / r")
    dropout: float = knob(0.05, "dropout on the adapter input")
    target_modules: list[str] = knob(ALL_LINEAR, "module names that get adapters (Llama-style names by default)")
    modules_to_save: list[str] = knob([], "modules trained in full and saved with the adapter (e.g. lm_head)")
    merge_on_export: bool = knob(False, "also save the merged model as final/merged")

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"r: must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules: at least one module name is needed")


@register_mitigation("lora", LoraMitigationConfig)
class Lora:
    def __init__(self, config: LoraMitigationConfig):
        self.config = config

    def wrap_model(self, model, ctx):
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [m for m in self.config.target_modules if m not in names]
        if missing:
            raise UserError(f"mitigations: lora target_modules {missing} are not in the model")
        peft_config = LoraConfig(
            r=self.config.r,
            lora_alpha=self.config.alpha,
            lora_dropout=self.config.dropout,
            target_modules=list(self.config.target_modules),
            modules_to_save=list(self.config.modules_to_save) or None,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, peft_config)

    def export(self, model, ctx) -> dict:
        if not self.config.merge_on_export:
            return {}
        return {"merged": copy.deepcopy(model).merge_and_unload()}

    def report(self, model, ctx) -> dict:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {
            "r": self.config.r,
            "alpha": self.config.alpha,
            "trainable_params": trainable,
            "trainable_fraction": trainable / total,
        }
