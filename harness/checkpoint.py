"""Checkpoints: an HF-format model (or PEFT adapter) with its tokenizer and resolved config, plus resumable state.

Layout of `output_dir`:
    forgetting_config.yaml        the resolved job config (a rerun with a different one is refused)
    metrics.jsonl                 one line per logged step
    checkpoint-000040/            intermediate: model + tokenizer + config + state/ (optimizer, scheduler, RNG)
    final/                        the finished model + tokenizer + config + trainer_state.json (the run's summary)
                                  + README.md, its model card (harness/card.py), and one in each model inside it
A sharded (FSDP) run's intermediate checkpoints hold only state/: the model and optimizer shards as each
process has them (torch.distributed.checkpoint, one file per process, no gather), the scheduler and every
process's RNG; its final/ is consolidated (the shards gathered on the main process, written as HF safetensors).
Every directory is staged under `.tmp-<name>` and renamed when complete, so a crash never leaves a
half-written checkpoint standing as a real one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from forgetting.harness.card import write_cards
from forgetting.harness.configlib import to_dict
from forgetting.harness.io import atomic_write_json, atomic_write_yaml
from forgetting.harness.sharding import full_state_dict, is_sharded

CONFIG_NAME = "forgetting_config.yaml"
FINAL = "final"
STEP_DIR = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete intermediate checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def export_model(accelerator, model, tokenizer, job, target: Path) -> None:
    """Write model (or adapter) + tokenizer + config in HF format into `target` (main process writes), in
    `train.save_dtype`; a sharded model is gathered on the main process first (every process calls this)."""
    if is_sharded(model):
        state_dict, unwrapped = full_state_dict(model), model
    else:
        state_dict, unwrapped = accelerator.get_state_dict(model), accelerator.unwrap_model(model)
    if not accelerator.is_main_process:
        return
    dtype = getattr(torch, job.train.save_dtype)
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    unwrapped.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
    config_file = target / "config.json"  # a PEFT adapter directory has none
    config = json.loads(config_file.read_text()) if config_file.is_file() else None
    if config is not None and config.get("dtype") != job.train.save_dtype:  # save_pretrained wrote the fp32 of training
        atomic_write_json(config_file, dict(config, dtype=job.train.save_dtype))
    tokenizer.save_pretrained(target)
    atomic_write_yaml(target / CONFIG_NAME, to_dict(job))


def save_state(accelerator, model, optimizer, scheduler, target: Path) -> None:
    """Resume state into `target`: accelerate's (model, optimizer, scheduler, RNG) or, for a sharded model,
    the shards through torch.distributed.checkpoint plus the scheduler and each process's RNG."""
    if not is_sharded(model):
        accelerator.save_state(str(target))
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(target / "shards"))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    local = {"scheduler": scheduler.state_dict(), "rng": rng}
    torch.save(local, target / f"process_{accelerator.process_index}.pt")


def load_state(accelerator, model, optimizer, scheduler, source: Path) -> None:
    """Restore what `save_state` wrote (the same number of processes for a sharded one's RNG)."""
    if not is_sharded(model):
        accelerator.load_state(str(source))
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(source / "shards"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    local = torch.load(source / f"process_{accelerator.process_index}.pt", weights_only=False)
    scheduler.load_state_dict(local["scheduler"])
    random.setstate(local["rng"]["python"])
    np.random.set_state(local["rng"]["numpy"])
    torch.set_rng_state(local["rng"]["torch"])
    if "cuda" in local["rng"]:
        torch.cuda.set_rng_state(local["rng"]["cuda"])


def save_checkpoint(
    accelerator,
    model,
    tokenizer,
    job,
    output_dir: Path,
    name: str,
    state: tuple | None,
    extra: dict,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Stage and publish `output_dir/name`; every process calls this (each saves its RNG state).

    `state`: (optimizer, scheduler) to save resume state with; `extras(staging)` writes more into the
    directory before it is published (e.g. merged models written from the saved files).
    """
    target = output_dir / name
    staging = output_dir / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if state is None or not is_sharded(model):  # a sharded run resumes from its shards; only final/ is gathered
        export_model(accelerator, model, tokenizer, job, staging)
    if state is not None:
        save_state(accelerator, model, *state, staging / "state")
    accelerator.wait_for_everyone()
    if extras is not None:
        extras(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(staging / "trainer_state.json", extra)
        if name == FINAL:  # the finished model (and the ones `extras` exported inside it) get their model cards
            write_cards(staging, output_dir=output_dir)
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
