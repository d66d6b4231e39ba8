"""wise_ft: after training, interpolate base + alpha * (tuned - base) for each alpha (Wortsman et al., WiSE-FT).

Each interpolated model is saved as `final/wise_ft_<alpha>` and is its own point on the gain-vs-forgetting
curve, for free: no extra training. Full-parameter models only (for LoRA, scale the adapter instead).

The points are computed from files, one tensor at a time (`harness.merging`), so that no process ever holds
two whole models, sharded training included. `prepare` finds the base model's safetensors files at its source
(a local directory, the converted GGUF cache, the hub cache); where there are none that hold the model as
loaded (`tiny-random`, a GGUF inside a hub repo, a .bin-only repo) it writes the base once into
`output_dir/wise_ft_base` (a resumed run reuses it). `export` interpolates final/'s saved weights with the
base's, in fp32, written in the dtype of final/'s weights (`train.save_dtype`). A `wise_ft_base` the run wrote
is deleted after a successful export: it is a whole model's size, and a run that crashes before final/ is
published writes it again when it resumes (prepare runs before the checkpoint is loaded, on the base).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from forgetting.harness.configlib import knob
from forgetting.harness.errors import UserError
from forgetting.harness.merging import Base, WeightFiles, base_for, merge_files, weight_files
from forgetting.mitigations.registry import register_mitigation

BASE_DIR = "wise_ft_base"
# files save_pretrained writes beside the weights that a point shares with final/
CONFIG_FILES = ("config.json", "generation_config.json")


@dataclass
class WiseFTConfig:
    alphas: list[float] = knob([0.25, 0.5, 0.75], "interpolation weights of the tuned model (0: base, 1: tuned)")

    def __post_init__(self):
        if not self.alphas or not all(0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"alphas: expected numbers in [0, 1], got {self.alphas}")


def lerp(base: torch.Tensor, tuned: torch.Tensor, alpha: float) -> torch.Tensor:
    """base + alpha * (tuned - base) computed in fp32, in tuned's dtype; a non-floating tensor is tuned's."""
    if not tuned.is_floating_point():
        return tuned
    return torch.lerp(base.float(), tuned.float(), alpha).to(tuned.dtype)


@register_mitigation("wise_ft", WiseFTConfig)
class WiseFT:
    def __init__(self, config: WiseFTConfig):
        self.config = config
        self.base: Base | None = None

    def prepare(self, model, ctx) -> None:
        if hasattr(model, "peft_config"):
            raise UserError("mitigations: wise_ft works on full-parameter models; with lora, scale the adapter instead")
        self.base = base_for(model, ctx.job.model, ctx.output_dir / BASE_DIR, ctx.accelerator.is_main_process)

    def export(self, directory: Path, ctx) -> None:
        """Write directory/wise_ft_<alpha> for each alpha from the saved weights in `directory` (main process)."""
        if not ctx.accelerator.is_main_process:
            return
        tuned, base = weight_files(directory), self.base.weight_files()
        for alpha in self.config.alphas:
            point = partial(self._point, alpha)
            add_files = partial(_add_files, directory, ctx.tokenizer)
            merge_files(directory / f"wise_ft_{alpha:g}", tuned, point, secondary=base, add_files=add_files)
        self.base.discard()

    def _point(self, alpha: float, name: str, tuned: WeightFiles, base: WeightFiles) -> torch.Tensor:
        return lerp(base.get(base.find(name, self.base.tied)), tuned.get(name), alpha)

    def report(self, model, ctx) -> dict:
        return {"alphas": list(self.config.alphas), "dirs": [f"final/wise_ft_{a:g}" for a in self.config.alphas]}


def _add_files(final: Path, tokenizer, point: Path) -> None:
    """A point's config is final/'s (same architecture and dtype); its tokenizer the run's."""
    for name in CONFIG_FILES:
        if (final / name).is_file():
            shutil.copyfile(final / name, point / name)
    tokenizer.save_pretrained(point)
