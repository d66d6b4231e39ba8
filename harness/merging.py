"""Models merged tensor by tensor from safetensors files: never two whole models in memory.

With sharded training no process holds the whole model, and at 8B a second whole model does not fit beside the
first. So the models a mitigation derives after training (WiSE-FT points, a merged LoRA) are computed from the
saved files instead: `WeightFiles` reads one tensor at a time from memory-mapped safetensors files, and
`write_weights` takes the results one at a time and writes them in shards of at most `MAX_SHARD_BYTES`, so
that at no point more than one output shard plus the tensors being combined are in memory. The output is an
HF model directory (sharded with an index, as save_pretrained writes it), staged beside its target and renamed
when complete.

The base model's weights come from its source's safetensors files where there are some that hold the model
as loaded (`base_files_for`); otherwise (`tiny-random` is built in memory, a GGUF inside a hub repo is
de-quantised in memory, a repo may ship only .bin files, a vocabulary may have been resized) `base_for` writes
them once, tensor by tensor, into a directory of the run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import save_file

from forgetting.harness.config import ModelConfig
from forgetting.harness.errors import RunError
from forgetting.harness.io import atomic_write_json
from forgetting.harness.models import TINY_MODEL, resolve_source
from forgetting.harness.sharding import full_tensors, is_sharded

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# the bound on what the writer holds; save_pretrained's own default (50GB) would hold a whole 8B model
MAX_SHARD_BYTES = 5 * 10**9

Tied = dict[str, tuple[str, ...]]  # parameter name -> every name of the same (tied) parameter, in module order


def has_weights(directory: Path) -> bool:
    return (Path(directory) / INDEX_NAME).is_file() or (Path(directory) / WEIGHTS_NAME).is_file()


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of an HF model directory: model.safetensors, or the shards its index names."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    raise RunError(f"{directory}: holds no model weights ({WEIGHTS_NAME} or {INDEX_NAME})")


def base_weight_files(model_config: ModelConfig) -> list[Path] | None:
    """The safetensors files of the base model's source (a local directory, the converted GGUF cache, the hub
    cache), or None where the source has none."""
    if model_config.name_or_path == TINY_MODEL:
        return None  # built in memory
    source, kwargs = resolve_source(model_config)
    if "gguf_file" in kwargs:
        return None  # a GGUF inside a hub repo: transformers de-quantises it in memory
    directory: Path | None = Path(source).expanduser()
    if not directory.is_dir():
        directory = _hub_snapshot(source, kwargs.get("revision"))
    return weight_files(directory) if directory is not None and has_weights(directory) else None


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The hub cache's snapshot of the weights and configs (offline: what loading the model cached), or None."""
    try:
        # model*.safetensors, not *.safetensors: some repos also ship consolidated.safetensors, a second copy
        patterns = ["model*.safetensors", "*.json"]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (OSError, ValueError):  # not cached offline, no such repo: the caller writes the base itself
        return None


class WeightFiles:
    """The tensors of a set of safetensors files by name, each read only when asked for (the files are mapped,
    not loaded). A context manager: the files stay open until it exits."""

    def __init__(self, files: Iterable[Path]):
        self._stack = ExitStack()
        self._handles: dict = {}
        for path in files:
            handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            self._handles.update(dict.fromkeys(handle.keys(), handle))

    def __enter__(self) -> WeightFiles:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def __contains__(self, name: str) -> bool:
        return name in self._handles

    def keys(self) -> list[str]:
        return list(self._handles)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[name].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[name].get_slice(name).get_shape())

    def find(self, name: str, tied: Tied) -> str:
        """`name`, or the name of the same tied parameter under which the files hold it (save_pretrained keeps one
        name of a tied pair: model.embed_tokens.weight for lm_head.weight)."""
        for candidate in (name, *tied.get(name, ())):
            if candidate in self._handles:
                return candidate
        raise RunError(f"the base model's weight files hold no tensor {name!r}")


def write_weights(
    target: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    add_files: Callable[[Path], None] | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write `tensors`, taken one at a time, as the weights of an HF model directory `target`: shards of at most
    `max_shard_bytes` (MAX_SHARD_BYTES; a bigger tensor is a shard alone), with an index when there are several.
    `add_files(directory)` adds the rest (config, tokenizer). Staged beside `target`, renamed when complete."""
    target = Path(target)
    staging = target.parent / f".tmp-{target.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shards = _write_shards(staging, tensors, max_shard_bytes or MAX_SHARD_BYTES)
        _name_shards(staging, shards)
        if add_files is not None:
            add_files(staging)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_shards(staging: Path, tensors: Iterable[tuple[str, torch.Tensor]], limit: int) -> list[dict[str, int]]:
    """Fill a shard until the next tensor would overflow it, write it and let its tensors go; returns each
    shard's {name: bytes}, the shards saved as staging/.part-<i>."""
    shards: list[dict[str, int]] = []
    pending: dict[str, torch.Tensor] = {}
    held = 0
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if pending and held + size > limit:
            shards.append(_flush(staging, len(shards), pending))
            pending, held = {}, 0
        pending[name] = tensor.contiguous()
        held += size
    if pending or not shards:
        shards.append(_flush(staging, len(shards), pending))
    return shards


def _flush(staging: Path, number: int, pending: dict[str, torch.Tensor]) -> dict[str, int]:
    path = staging / f".part-{number}"
    save_file(pending, str(path), metadata={"format": "pt"})
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())  # durable before the directory is published
    return {name: tensor.numel() * tensor.element_size() for name, tensor in pending.items()}


def _name_shards(staging: Path, shards: list[dict[str, int]]) -> None:
    """Give the parts save_pretrained's names: model.safetensors, or model-0000i-of-0000n.safetensors + index."""
    if len(shards) == 1:
        os.rename(staging / ".part-0", staging / WEIGHTS_NAME)
        return
    weight_map = {}
    for number, shard in enumerate(shards):
        name = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(staging / f".part-{number}", staging / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(sum(shard.values()) for shard in shards)
    atomic_write_json(staging / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def merge_files(
    target: Path,
    primary: list[Path],
    combine: Callable[[str, WeightFiles, WeightFiles], torch.Tensor],
    secondary: list[Path] | None = None,
    add_files: Callable[[Path], None] | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write `target` with one tensor `combine(name, primary, secondary)` for each tensor name of the `primary`
    files (`secondary`: a second set of files to read from, e.g. the base), one at a time (`write_weights`)."""
    with WeightFiles(primary) as first, WeightFiles(secondary or []) as second:
        merged = ((name, combine(name, first, second)) for name in first.keys())
        write_weights(target, merged, add_files, max_shard_bytes)


def tied_names(model: torch.nn.Module) -> Tied:
    """Every name of each parameter that has several (tied embeddings), in module order."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {name: tuple(names) for names in groups.values() if len(names) > 1 for name in names}


def base_files_for(model: torch.nn.Module, model_config: ModelConfig) -> list[Path] | None:
    """The source's weight files (`base_weight_files`) if they hold every tensor of `model`, the unwrapped base,
    as loaded (under its name or a tied one's, in its shape); else None."""
    files = base_weight_files(model_config)
    if files is None:
        return None
    tied = tied_names(model)
    with WeightFiles(files) as base:
        for name, tensor in model.state_dict().items():
            found = [n for n in (name, *tied.get(name, ())) if n in base]
            if not found or base.shape(found[0]) != tuple(tensor.shape):
                return None  # renamed on load, resized, or not this model: write the base instead
    return files


def write_base(model: torch.nn.Module, target: Path, is_main: bool) -> None:
    """Write `model`'s weights and config into `target` unless an earlier start of this run did (a published
    directory is complete). Tensor by tensor, gathered one at a time when the model is sharded: then every
    process must call this (the gathering is collective); the main process writes."""
    if Path(target).is_dir():
        return
    sharded = is_sharded(model)
    if not (is_main or sharded):
        return
    tied = tied_names(model)
    # one name per tied parameter, as save_pretrained saves it (safetensors refuses tensors sharing memory)
    named = [(n, t) for n, t in model.state_dict().items() if tied.get(n, (n,))[0] == n]
    tensors = full_tensors(named)
    if not is_main:
        for _ in tensors:  # take part in each gathering
            pass
        return
    write_weights(target, tensors, add_files=model.config.save_pretrained)


@dataclass
class Base:
    """Where a run's base weights are: the source's files, or a copy the run wrote (`discard` deletes it)."""

    files: list[Path] | None
    written: Path | None
    tied: Tied

    def weight_files(self) -> list[Path]:
        return self.files if self.files is not None else weight_files(self.written)

    def directory(self) -> Path:
        """The directory holding the base's config.json."""
        return self.files[0].parent if self.files is not None else self.written

    def discard(self) -> None:
        if self.written is not None:
            shutil.rmtree(self.written, ignore_errors=True)


def base_for(model: torch.nn.Module, model_config: ModelConfig, target: Path, is_main: bool) -> Base:
    """The base weights of `model` (the unwrapped base, before training): its source's files where they hold it,
    else written once into `target` (`write_base`). Every process calls this; each decides alike from the files."""
    tied = tied_names(model)
    files = base_files_for(model, model_config)
    if files is not None:
        return Base(files, None, tied)
    write_base(model, target, is_main)
    return Base(None, Path(target), tied)
