"""lora: train low-rank adapters (peft) on a frozen base; the checkpoint is a PEFT adapter, optionally merged too.

With `merge_on_export` the merged model final/merged is computed from files, one tensor at a time
(`harness.merging`), so that no process ever holds two whole models: each weight of the base's safetensors
files, plus (alpha / r) * B @ A where the saved adapter adapts it (alpha / sqrt(r) under rsLoRA; transposed
for fan_in_fan_out layers), or the adapter's own copy of a `modules_to_save` module. The base's files are its
source's (a local directory, the converted GGUF cache, the hub cache); where there are none that hold the model
as loaded (`tiny-random`, a GGUF inside a hub repo) `wrap_model` writes them once into `output_dir/lora_base`,
before wrapping (the one moment the base has its saved names), and `export` deletes them again. The merged
weights are in the dtype of the saved adapter (`train.save_dtype`), computed in fp32. Only what this
mitigation's config produces is merged (linear LoRA layers, modules_to_save); other adapters are refused.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from forgetting.harness.configlib import knob
from forgetting.harness.errors import UserError
from forgetting.harness.merging import Base, WeightFiles, base_for, write_weights
from forgetting.mitigations.registry import register_mitigation

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_DIR = "lora_base"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT's saved names: base_model.model.<module>.lora_A.weight
# adapter settings this merge does not implement (each changes what the adapter's tensors mean)
UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "use_qalora",
    "use_bdlora",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "megatron_config",
    "loftq_config",
    "eva_config",
    "corda_config",
    "velora_config",
    "monteclora_config",
    "arrow_config",
    "kasa_config",
    "ensure_weight_tying",
)


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


@dataclass
class _Plan:
    """What the merged model is made of: base tensors, adapted ones (base + scaling * B @ A), saved modules."""

    names: list[str]  # the merged model's tensors, in the base files' order, then any the base lacks
    deltas: dict[str, tuple[str, str]]  # weight name -> the adapter's (lora_A, lora_B) names
    saved: dict[str, str]  # weight name -> the adapter's name for it (modules_to_save)
    untie: bool  # a tied parameter changed: its names are written apart and the config no longer ties them
    scaling: float
    transpose: bool  # fan_in_fan_out: the layer's weight is stored (in, out)
    dtype: torch.dtype

    def tensor(self, name: str, base: WeightFiles, adapter: WeightFiles, tied: dict) -> torch.Tensor:
        if name in self.saved:
            return adapter.get(self.saved[name]).to(self.dtype)
        weight = base.get(base.find(name, tied))
        if not weight.is_floating_point():
            return weight
        if name in self.deltas:
            a_name, b_name = self.deltas[name]
            delta = adapter.get(b_name).float() @ adapter.get(a_name).float()
            weight = weight.float() + self.scaling * (delta.T if self.transpose else delta)
        return weight.to(self.dtype)


@register_mitigation("lora", LoraMitigationConfig)
class Lora:
    def __init__(self, config: LoraMitigationConfig):
        self.config = config
        self.base: Base | None = None

    def wrap_model(self, model, ctx):
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [m for m in self.config.target_modules if m not in names]
        if missing:
            raise UserError(f"mitigations: lora target_modules {missing} are not in the model")
        if self.config.merge_on_export:  # the base under its saved names, before PEFT renames its modules
            self.base = base_for(model, ctx.job.model, ctx.output_dir / BASE_DIR, ctx.accelerator.is_main_process)
        peft_config = LoraConfig(
            r=self.config.r,
            lora_alpha=self.config.alpha,
            lora_dropout=self.config.dropout,
            target_modules=list(self.config.target_modules),
            modules_to_save=list(self.config.modules_to_save) or None,
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # peft asks transformers 5.24 for the old name, which warns on every run
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            return get_peft_model(model, peft_config)

    def export(self, directory: Path, ctx) -> None:
        """Write directory/merged from the base's weight files and the adapter saved in `directory` (main process)."""
        if not self.config.merge_on_export or not ctx.accelerator.is_main_process:
            return
        scaling, transpose = _merge_settings(directory / ADAPTER_CONFIG)
        with WeightFiles([directory / ADAPTER_WEIGHTS]) as adapter, WeightFiles(self.base.weight_files()) as base:
            plan = _plan(adapter, base, self.base.tied, scaling, transpose)
            tensors = ((name, plan.tensor(name, base, adapter, self.base.tied)) for name in plan.names)
            add_files = partial(_add_files, self.base.directory(), plan, ctx.tokenizer)
            write_weights(directory / "merged", tensors, add_files)
        self.base.discard()

    def report(self, model, ctx) -> dict:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {
            "r": self.config.r,
            "alpha": self.config.alpha,
            "trainable_params": trainable,
            "trainable_fraction": trainable / total,
        }


def _merge_settings(path: Path) -> tuple[float, bool]:
    """(scaling, fan_in_fan_out) of a saved adapter config; a one-line UserError for adapters not merged here."""
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: merge_on_export merges LoRA adapters, not {config.get('peft_type')}")
    refused = [key for key in UNSUPPORTED if config.get(key)]
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']}")
    if config.get("init_lora_weights", True) not in (True, False, "gaussian"):  # these change the base itself
        refused.append(f"init_lora_weights={config['init_lora_weights']}")
    if refused:
        raise UserError(f"{path}: merge_on_export merges plain LoRA on linear layers, not with {refused[0]}")
    scale = math.sqrt(config["r"]) if config.get("use_rslora") else config["r"]
    return config["lora_alpha"] / scale, bool(config.get("fan_in_fan_out"))


def _adapter_tensors(adapter: WeightFiles) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """The adapted weights (name -> (lora_A, lora_B) names) and the saved modules' weights (name -> name)."""
    pairs: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}
    for key in adapter.keys():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else ""
        module, _, part = name.rpartition(".lora_")
        if module and part in ("A.weight", "B.weight"):
            pairs.setdefault(f"{module}.weight", {})[part[0]] = key
        elif name and "lora_" not in name:
            saved[name] = key
        else:
            raise UserError(
                f"{ADAPTER_WEIGHTS}: tensor {key!r} is neither a linear LoRA layer's (lora_A, lora_B) nor a "
                f"modules_to_save module's; merge_on_export merges only those"
            )
    incomplete = [name for name, found in pairs.items() if len(found) != 2]
    if incomplete:
        raise UserError(f"{ADAPTER_WEIGHTS}: {incomplete[0]} has only one of lora_A and lora_B")
    return {name: (found["A"], found["B"]) for name, found in pairs.items()}, saved


def _plan(adapter: WeightFiles, base: WeightFiles, tied: dict, scaling: float, transpose: bool) -> _Plan:
    deltas, saved = _adapter_tensors(adapter)
    if not deltas:
        raise UserError(f"{ADAPTER_WEIGHTS}: holds no LoRA layers")
    changed = set(deltas) | set(saved)
    # a changed tied parameter (LoRA on the LM head of tied embeddings) differs from its twin now: write both
    twins = {twin for name in changed for twin in tied.get(name, ())}
    names = base.keys() + sorted((changed | twins) - set(base.keys()))
    dtype = adapter.get(next(iter(deltas.values()))[0]).dtype
    return _Plan(names, deltas, saved, bool(changed & set(tied)), scaling, transpose, dtype)


def _add_files(base_dir: Path, plan: _Plan, tokenizer, merged: Path) -> None:
    """The base's config (in the merged dtype, untied where a tied parameter changed) and the run's tokenizer."""
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("torch_dtype", None)  # older configs' name for dtype
    config["dtype"] = str(plan.dtype).removeprefix("torch.")
    if plan.untie:
        config["tie_word_embeddings"] = False
    (merged / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", merged / "generation_config.json")
    tokenizer.save_pretrained(merged)
