"""Checkpoints: an HF-format model (or PEFT adapter) with its tokenizer and resolved config, plus resumable state.

Layout of `output_dir`:
    forgetting_config.yaml        the resolved job config (a rerun with a different one is refused)
    metrics.jsonl                 one line per logged step
    checkpoint-000040/            intermediate: model + tokenizer + config + state/ (optimizer, scheduler, RNG)
    final/                        the finished model + tokenizer + config + trainer_state.json (the run's summary)
Every directory is staged under `.tmp-<name>` and renamed when complete, so a crash never leaves a
half-written checkpoint standing as a real one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from harness.configlib import to_dict
from harness.io import atomic_write_json, atomic_write_yaml

CONFIG_NAME = "forgetting_config.yaml"
STEP_DIR = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete intermediate checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def export_model(accelerator, model, tokenizer, job, target: Path) -> None:
    """Write model (or adapter) + tokenizer + config in HF format into `target` (main process writes)."""
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(target)
        atomic_write_yaml(target / CONFIG_NAME, to_dict(job))


def save_checkpoint(
    accelerator,
    model,
    tokenizer,
    job,
    output_dir: Path,
    name: str,
    with_state: bool,
    extra: dict,
    extra_models: dict | None = None,
) -> Path:
    """Stage and publish `output_dir/name`; every process calls this (each saves its RNG state)."""
    target = output_dir / name
    staging = output_dir / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    export_model(accelerator, model, tokenizer, job, staging)
    if with_state:
        accelerator.save_state(str(staging / "state"))
    if accelerator.is_main_process:
        for sub, extra_model in (extra_models or {}).items():  # e.g. a merged LoRA model in final/merged
            extra_model.save_pretrained(staging / sub, safe_serialization=True)
            tokenizer.save_pretrained(staging / sub)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(staging / "trainer_state.json", extra)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    accelerator.wait_for_everyone()
    return target


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` intermediate checkpoints."""
    dirs = checkpoint_dirs(output_dir)
    for _, path in dirs[: max(0, len(dirs) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
