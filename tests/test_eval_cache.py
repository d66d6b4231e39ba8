"""The evaluation cache shared by many processes (atomic entries, unreadable ones a miss) and the weights
fingerprint of saved models computed from their safetensors files."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from forgetting.evals.runner import (
    EvalSettings,
    evaluate,
    load_for_eval,
    model_fingerprint,
    read_cache_entry,
)
from forgetting.harness.config import ModelConfig
from forgetting.harness.errors import RunError
from forgetting.harness.formats import attach_format
from forgetting.harness.models import (
    files_fingerprint,
    safetensors_header,
    source_directory,
    tiny_model,
    weights_fingerprint,
)

SETTINGS = EvalSettings(tasks=["forgetting_knowledge"], limit=2, batch_size=2)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A tiny random model and the embedded tokenizer with the chatml format."""
    tok = copy.deepcopy(tokenizer)
    attach_format(tok, "chatml")
    return tiny_model(len(tok), seed=1).eval(), tok


def save(model, tok, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    tok.save_pretrained(directory)
    return directory


def adapter_of(model, directory: Path, base_dir: Path, **config) -> Path:
    """A LoRA adapter of `model` with fixed non-trivial weights, saved in `directory` naming `base_dir`."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.fill_(0.01)
    peft_model.save_pretrained(directory)
    config_file = directory / "adapter_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), base_model_name_or_path=str(base_dir))))
    return directory


def test_files_fingerprint_is_per_tensor_and_sees_every_byte(tiny, tmp_path):
    model, tok = tiny
    single = save(model, tok, tmp_path / "single")
    again = save(copy.deepcopy(model), tok, tmp_path / "again")
    sharded = save(model, tok, tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    fingerprint = files_fingerprint(single)
    assert files_fingerprint(again) == fingerprint and files_fingerprint(sharded) == fingerprint

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.norm.weight[3] = torch.nextafter(changed.model.norm.weight[3], torch.tensor(2.0))  # one ulp
    assert files_fingerprint(save(changed, tok, tmp_path / "changed")) != fingerprint
    assert files_fingerprint(save(copy.deepcopy(model).to(torch.bfloat16), tok, tmp_path / "bf16")) != fingerprint

    flipped = save(model, tok, tmp_path / "flipped")  # the last byte of the file: the end of its last tensor
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (flipped / "model.safetensors").write_bytes(bytes(data))
    assert files_fingerprint(flipped) != fingerprint

    config = json.loads((again / "config.json").read_text())
    (again / "config.json").write_text(json.dumps(dict(config, transformers_version="0.0.1", dtype="bfloat16")))
    assert files_fingerprint(again) == fingerprint  # labels only
    (again / "config.json").write_text(json.dumps(dict(config, rms_norm_eps=1e-3)))
    assert files_fingerprint(again) != fingerprint  # the same tensors compute something else


def test_files_fingerprint_of_an_adapter_includes_its_config_and_the_base(tiny, tmp_path):
    model, tok = tiny
    base = save(model, tok, tmp_path / "base")
    other_base = save(tiny_model(len(tok), seed=2), tok, tmp_path / "other_base")
    adapter = adapter_of(model, tmp_path / "adapter", base, lora_alpha=16)
    fingerprint = files_fingerprint(base, adapter)
    assert fingerprint != files_fingerprint(base)
    assert files_fingerprint(base, adapter_of(model, tmp_path / "same", other_base, lora_alpha=16)) == fingerprint
    assert files_fingerprint(base, adapter_of(model, tmp_path / "alpha", base, lora_alpha=64)) != fingerprint
    assert files_fingerprint(other_base, adapter) != fingerprint
    loaded, _ = load_for_eval(str(base), adapter=str(adapter))
    alone, _ = load_for_eval(str(adapter))  # evaluated on the base its adapter_config.json names
    assert model_fingerprint(loaded) == model_fingerprint(alone) == fingerprint


def test_a_damaged_safetensors_file_is_refused(tiny, tmp_path):
    model, tok = tiny
    directory = save(model, tok, tmp_path / "model")
    weights = directory / "model.safetensors"
    start, header = safetensors_header(weights)
    assert start > 8 and "model.norm.weight" in header and "__metadata__" not in header
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(RunError, match="truncated"):
        files_fingerprint(directory)
    weights.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(RunError, match="not a safetensors file"):
        files_fingerprint(directory)
    (directory / "model.safetensors").unlink()
    with pytest.raises(RunError, match="holds no safetensors weights"):
        files_fingerprint(directory)


def test_a_saved_model_is_keyed_by_its_files_and_the_evaluation_dtype(tiny, tmp_path):
    model, tok = tiny
    directory = save(model, tok, tmp_path / "model")
    cache = tmp_path / "cache"
    loaded, loaded_tok = load_for_eval(str(directory))
    assert model_fingerprint(loaded) == files_fingerprint(directory) != weights_fingerprint(loaded)
    first = evaluate(loaded, loaded_tok, SETTINGS, cache_dir=cache)
    assert first["forgetting"]["evaluated"] == ["forgetting_knowledge"]
    assert first["forgetting"]["weights_fingerprint"] == files_fingerprint(directory)
    again = evaluate(loaded, loaded_tok, SETTINGS, cache_dir=cache)  # the same model object, evaluated before
    reloaded, reloaded_tok = load_for_eval(str(directory))
    third = evaluate(reloaded, reloaded_tok, SETTINGS, cache_dir=cache)
    assert again["forgetting"]["cache_hits"] == third["forgetting"]["cache_hits"] == ["forgetting_knowledge"]
    assert third["results"] == first["results"]

    bf16, bf16_tok = load_for_eval(
        str(directory), model_config=ModelConfig(name_or_path=str(directory), dtype="bfloat16")
    )
    assert model_fingerprint(bf16) == files_fingerprint(directory)  # the same files, evaluated in another dtype
    assert evaluate(bf16, bf16_tok, SETTINGS, cache_dir=cache)["forgetting"]["cache_hits"] == []

    with torch.no_grad():
        reloaded.model.norm.weight[0] += 1e-3  # changed after loading: the files no longer describe it
    assert model_fingerprint(reloaded) == weights_fingerprint(reloaded) != files_fingerprint(directory)
    assert evaluate(reloaded, reloaded_tok, SETTINGS, cache_dir=cache)["forgetting"]["cache_hits"] == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # a write cut short
        lambda text: "",
        lambda text: b"\xff\xfe not UTF-8",
        lambda text: "[1, 2]",
        lambda text: json.dumps({"results": {"another_task": {}}}),
        lambda text: json.dumps(dict(json.loads(text), extra={"forgetting_knowledge": 1})),
    ],
    ids=["truncated", "empty", "garbage", "a list", "another task", "an unknown slice"],
)
def test_a_damaged_cache_entry_is_a_miss_and_is_replaced(tiny, tmp_path, damage):
    model, tok = tiny
    first = evaluate(model, tok, SETTINGS, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.json")
    text = entry.read_text()
    damaged = damage(text)
    entry.write_bytes(damaged if isinstance(damaged, bytes) else damaged.encode())
    second = evaluate(model, tok, SETTINGS, cache_dir=tmp_path)
    assert second["forgetting"]["evaluated"] == ["forgetting_knowledge"] and second["results"] == first["results"]
    assert json.loads(entry.read_text()) == json.loads(text)  # replaced by a whole entry
    assert evaluate(model, tok, SETTINGS, cache_dir=tmp_path)["forgetting"]["cache_hits"] == ["forgetting_knowledge"]


WRITER = """
import sys
from forgetting.harness.io import atomic_write_json
path, tag = sys.argv[1], sys.argv[2]
entry = {"results": {"task": {"tag": tag, "padding": "x" * 400_000}}, "samples": {"task": list(range(50_000))}}
for _ in range(int(sys.argv[3])):
    atomic_write_json(path, entry)
"""


def test_concurrent_writers_of_one_key_leave_one_whole_entry_and_no_temp_files(tmp_path):
    path = tmp_path / "cache" / "key.json"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, "40"], cwd=Path(__file__).parent.parent)
        for tag in ("a", "b")
    ]
    seen = set()
    while any(writer.poll() is None for writer in writers):  # read while they write: a whole entry or none
        entry = read_cache_entry(path, "task")
        assert entry is None or (len(entry["samples"]["task"]) == 50_000 and len(entry["results"]["task"]) == 2)
        seen.add(entry["results"]["task"]["tag"] if entry else None)
        time.sleep(0.005)
    assert [writer.returncode for writer in writers] == [0, 0]
    final = read_cache_entry(path, "task")
    assert final is not None and final["results"]["task"]["tag"] in {"a", "b"}
    assert seen & {"a", "b"}  # the reads overlapped the writes
    assert [p.name for p in path.parent.iterdir()] == ["key.json"]  # no staged files left


def test_the_files_a_model_is_loaded_from(tiny, tmp_path):
    model, tok = tiny
    directory = save(model, tok, tmp_path / "model")
    assert source_directory(ModelConfig(name_or_path=str(directory))) == directory
    embedded = source_directory(ModelConfig())  # the converted GGUF
    assert embedded is not None and (embedded / "model.safetensors").is_file()
    assert source_directory(ModelConfig(name_or_path="tiny-random")) is None  # built in memory
    assert source_directory(ModelConfig(name_or_path="no-such-org/no-such-model")) is None  # not in the hub cache
    in_memory, _ = load_for_eval("tiny-random")
    assert model_fingerprint(in_memory) == weights_fingerprint(in_memory)
