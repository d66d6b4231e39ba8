"""Models merged from files tensor by tensor (harness.merging): WiSE-FT points and merged LoRA equal the in-memory
formulas, shards reload, dtypes follow the saved weights, the base is found or written once, and the writer holds
at most one shard.

The mitigations' `export(directory, ctx)` is called here on a final directory each test writes itself (a perturbed
tiny model stands in for training: the merge does not care how the weights moved)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from huggingface_hub.errors import LocalEntryNotFoundError
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import forgetting.harness.merging as merging
from forgetting.harness.config import ModelConfig
from forgetting.harness.errors import UserError
from forgetting.harness.merging import WeightFiles, base_weight_files, weight_files, write_weights
from forgetting.harness.models import tiny_model
from forgetting.harness.sharding import shard_model
from forgetting.mitigations.lora import Lora, LoraMitigationConfig
from forgetting.mitigations.wise_ft import WiseFT, WiseFTConfig


def ctx_for(tmp_path: Path, tokenizer, source: str = "tiny-random", is_main: bool = True):
    return SimpleNamespace(
        job=SimpleNamespace(model=ModelConfig(name_or_path=source)),
        tokenizer=tokenizer,
        accelerator=SimpleNamespace(is_main_process=is_main),
        output_dir=tmp_path / "run",
    )


def perturb(model, seed: int = 1) -> None:
    """Stand-in for training: move every trainable parameter (LoRA's B too, which starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def save_final(model, tokenizer, directory: Path, dtype: torch.dtype = torch.float32) -> Path:
    model.to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for path in weight_files(directory) for k, v in load_file(str(path)).items()}


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- WiSE-FT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wise_ft_points_are_the_lerp_of_base_and_tuned(tmp_path, byte_tokenizer, dtype):
    model = tiny_model(len(byte_tokenizer))
    base = state(model)
    ctx = ctx_for(tmp_path, byte_tokenizer)
    wise = WiseFT(WiseFTConfig(alphas=[0.0, 0.3, 1.0]))
    wise.prepare(model, ctx)
    assert (ctx.output_dir / "wise_ft_base" / "config.json").is_file()  # tiny-random has no files: written
    perturb(model)
    final = save_final(model, byte_tokenizer, tmp_path / "final", dtype)
    tuned = state(model)  # in memory, in the saved dtype
    wise.export(final, ctx)
    for alpha in (0.0, 0.3, 1.0):
        point = read_all(final / f"wise_ft_{alpha:g}")
        assert sorted(point) == sorted(read_all(final)) and "lm_head.weight" not in point  # tied: saved once
        for name, value in point.items():
            expected = torch.lerp(base[name].float(), tuned[name].float(), alpha).to(dtype)
            assert value.dtype == dtype and torch.equal(value, expected), name
        loaded = AutoModelForCausalLM.from_pretrained(final / f"wise_ft_{alpha:g}")  # config + weights suffice
        assert loaded.dtype == dtype and (final / f"wise_ft_{alpha:g}" / "tokenizer.json").is_file()
    assert not (ctx.output_dir / "wise_ft_base").exists()  # the base it wrote is gone after the export


def test_wise_ft_reads_a_local_sharded_base_in_place(tmp_path, byte_tokenizer):
    source = tmp_path / "source"
    tiny_model(len(byte_tokenizer)).save_pretrained(source, max_shard_size="60KB")
    assert (source / merging.INDEX_NAME).is_file() and len(weight_files(source)) > 1
    files = sorted(source.iterdir())
    model = AutoModelForCausalLM.from_pretrained(source)
    base = state(model)
    ctx = ctx_for(tmp_path, byte_tokenizer, source=str(source))
    wise = WiseFT(WiseFTConfig(alphas=[0.5]))
    wise.prepare(model, ctx)
    assert wise.base.files == weight_files(source) and not (ctx.output_dir / "wise_ft_base").exists()
    perturb(model)
    final = save_final(model, byte_tokenizer, tmp_path / "final")
    tuned = read_all(final)
    wise.export(final, ctx)
    for name, value in read_all(final / "wise_ft_0.5").items():
        assert torch.equal(value, torch.lerp(base[name], tuned[name], 0.5)), name
    assert sorted(source.iterdir()) == files  # the source is read, never written or deleted


def test_a_base_that_is_not_the_loaded_model_is_written_instead(tmp_path, byte_tokenizer):
    source = tmp_path / "source"
    tiny_model(len(byte_tokenizer)).save_pretrained(source)
    resized = tiny_model(len(byte_tokenizer) + 8)  # e.g. a resized vocabulary: the source's shapes differ
    wise = WiseFT(WiseFTConfig(alphas=[0.5]))
    wise.prepare(resized, ctx_for(tmp_path, byte_tokenizer, source=str(source)))
    assert wise.base.files is None and wise.base.written == tmp_path / "run" / "wise_ft_base"
    assert read_all(wise.base.written)["model.embed_tokens.weight"].shape[0] == len(byte_tokenizer) + 8


def test_a_resumed_run_keeps_the_base_it_wrote(tmp_path, byte_tokenizer):
    ctx = ctx_for(tmp_path, byte_tokenizer)
    model = tiny_model(len(byte_tokenizer))
    first = state(model)
    WiseFT(WiseFTConfig()).prepare(model, ctx)
    written = ctx.output_dir / "wise_ft_base"
    stamps = {p.name: p.stat().st_mtime_ns for p in written.iterdir()}
    perturb(model)  # a second start must not take these weights for the base
    WiseFT(WiseFTConfig()).prepare(model, ctx)
    assert {p.name: p.stat().st_mtime_ns for p in written.iterdir()} == stamps
    assert all(torch.equal(v, first[k]) for k, v in read_all(written).items())
    assert not list(ctx.output_dir.glob(".tmp-*"))


def test_other_processes_write_nothing(tmp_path, byte_tokenizer):
    model = tiny_model(len(byte_tokenizer))
    ctx = ctx_for(tmp_path, byte_tokenizer, is_main=False)
    wise = WiseFT(WiseFTConfig(alphas=[0.5]))
    wise.prepare(model, ctx)
    final = save_final(model, byte_tokenizer, tmp_path / "final")
    wise.export(final, ctx)
    assert not ctx.output_dir.exists() and not (final / "wise_ft_0.5").exists()


def test_wise_ft_refuses_a_lora_model(tmp_path, byte_tokenizer):
    wrapped = Lora(LoraMitigationConfig(r=4, target_modules=["q_proj"])).wrap_model(tiny_model(64), None)
    with pytest.raises(UserError, match="wise_ft works on full-parameter models"):
        WiseFT(WiseFTConfig()).prepare(wrapped, ctx_for(tmp_path, byte_tokenizer))


def test_base_weight_files_by_source(tmp_path, monkeypatch):
    assert base_weight_files(ModelConfig(name_or_path="tiny-random")) is None  # built in memory
    snapshot = tmp_path / "snapshot"
    tiny_model(64).save_pretrained(snapshot)
    calls = []

    def cached(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(merging, "snapshot_download", cached)
    assert base_weight_files(ModelConfig(name_or_path="org/model", revision="v1")) == [snapshot / "model.safetensors"]
    assert calls[0][0] == "org/model" and calls[0][1]["revision"] == "v1"
    assert "*.json" in calls[0][1]["allow_patterns"]

    def not_cached(repo_id, **kwargs):
        raise LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(merging, "snapshot_download", not_cached)
    assert base_weight_files(ModelConfig(name_or_path="org/model")) is None
    only_config = tmp_path / "bin_only"
    only_config.mkdir()
    shutil.copy(snapshot / "config.json", only_config / "config.json")
    assert base_weight_files(ModelConfig(name_or_path=str(only_config))) is None


# ---- LoRA


def trained_lora(tmp_path: Path, tokenizer, model=None, source: str = "tiny-random", dtype=torch.float32, **knobs):
    """A Lora mitigation with merge_on_export, its (perturbed) adapter saved as tmp_path/final, and its ctx."""
    ctx = ctx_for(tmp_path, tokenizer, source=source)
    config = {"r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "merge_on_export": True, **knobs}
    lora = Lora(LoraMitigationConfig(**config))
    wrapped = lora.wrap_model(model if model is not None else tiny_model(len(tokenizer)), ctx)
    perturb(wrapped)
    return lora, ctx, save_final(wrapped, tokenizer, tmp_path / "final", dtype)


def peft_merged(final: Path, base) -> dict[str, torch.Tensor]:
    """PEFT's own merge of the adapter in `final` onto `base`."""
    return state(PeftModel.from_pretrained(base, final).merge_and_unload())


@pytest.mark.parametrize("case", ["plain", "lm_head_saved", "rslora"])
def test_lora_merge_equals_peft_merge_and_unload(tmp_path, byte_tokenizer, case):
    saved = ["lm_head"] if case == "lm_head_saved" else []
    lora, ctx, final = trained_lora(tmp_path, byte_tokenizer, modules_to_save=saved)
    if case == "rslora":  # not a knob of the mitigation; both merges read it from the saved config
        config = json.loads((final / "adapter_config.json").read_text())
        (final / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    lora.export(final, ctx)
    expected = peft_merged(final, tiny_model(len(byte_tokenizer)))
    ours = read_all(final / "merged")
    assert not any("lora_" in k for k in ours) and ("lm_head.weight" in ours) == (case == "lm_head_saved")
    # a trained copy of the tied LM head is no longer the embedding: the merged config unties them
    config = json.loads((final / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] == (case != "lm_head_saved")
    reloaded = state(AutoModelForCausalLM.from_pretrained(final / "merged"))
    assert sorted(reloaded) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(reloaded[name], value, atol=1e-6, rtol=0, msg=name)
    start = state(tiny_model(len(byte_tokenizer)))
    assert not torch.equal(
        reloaded["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(reloaded["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    assert not (ctx.output_dir / "lora_base").exists()


def test_lora_merge_of_a_fan_in_fan_out_layer(tmp_path, byte_tokenizer):
    source = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=len(byte_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(source)
    base = AutoModelForCausalLM.from_pretrained(source)
    lora, ctx, final = trained_lora(tmp_path, byte_tokenizer, base, source=str(source), target_modules=["c_attn"])
    assert json.loads((final / "adapter_config.json").read_text())["fan_in_fan_out"]  # GPT-2's Conv1D: (in, out)
    lora.export(final, ctx)
    expected = peft_merged(final, AutoModelForCausalLM.from_pretrained(source))
    reloaded = state(AutoModelForCausalLM.from_pretrained(final / "merged"))
    for name, value in expected.items():
        torch.testing.assert_close(reloaded[name], value, atol=1e-6, rtol=0, msg=name)
    assert lora.base.files == [source / "model.safetensors"]  # the source's files, not a copy


def test_lora_merge_in_the_saved_dtype(tmp_path, byte_tokenizer):
    lora, ctx, final = trained_lora(tmp_path, byte_tokenizer, dtype=torch.bfloat16)
    lora.export(final, ctx)
    merged = read_all(final / "merged")
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
    assert json.loads((final / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    reference = peft_merged(final, tiny_model(len(byte_tokenizer)).to(torch.bfloat16))
    for name, value in merged.items():  # PEFT merges in bf16; ours in fp32, rounded once
        torch.testing.assert_close(value.float(), reference[name].float(), atol=2e-2, rtol=1e-2, msg=name)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_dora": True}, "not with use_dora"),
        ({"peft_type": "IA3"}, "not IA3"),
        ({"bias": "all"}, "not with bias=all"),
        ({"tensor": "lora_embedding_A"}, "neither a linear LoRA layer's"),
    ],
)
def test_lora_merge_refuses_other_adapters(tmp_path, byte_tokenizer, change, message):
    lora, ctx, final = trained_lora(tmp_path, byte_tokenizer)
    if "tensor" in change:
        path = final / "adapter_model.safetensors"
        tensors = load_file(str(path))
        tensors[f"base_model.model.model.embed_tokens.{change['tensor']}"] = torch.zeros(4, 8)
        save_file(tensors, str(path))
    else:
        config = json.loads((final / "adapter_config.json").read_text())
        (final / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message):
        lora.export(final, ctx)
    assert not (final / "merged").exists()


# ---- the writer: shards, index, memory


def test_sharded_output_reloads_and_equals_the_unsharded_one(tmp_path, byte_tokenizer, monkeypatch):
    source = tmp_path / "source"
    tiny_model(len(byte_tokenizer)).save_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    ctx = ctx_for(tmp_path, byte_tokenizer, source=str(source))
    wise = WiseFT(WiseFTConfig(alphas=[0.5]))
    wise.prepare(model, ctx)
    perturb(model)
    whole = save_final(model, byte_tokenizer, tmp_path / "whole")
    sharded = Path(shutil.copytree(whole, tmp_path / "sharded"))
    wise.export(whole, ctx)
    monkeypatch.setattr(merging, "MAX_SHARD_BYTES", 40_000)
    wise.export(sharded, ctx)
    point = sharded / "wise_ft_0.5"
    assert (point / merging.INDEX_NAME).is_file() and not (point / merging.WEIGHTS_NAME).exists()
    shards = [load_file(str(path)) for path in weight_files(point)]
    assert len(shards) > 3
    assert all(
        len(shard) == 1 or sum(t.numel() * t.element_size() for t in shard.values()) <= 40_000 for shard in shards
    )
    one, other = (
        AutoModelForCausalLM.from_pretrained(whole / "wise_ft_0.5"),
        AutoModelForCausalLM.from_pretrained(point),
    )
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in one.state_dict().items())


def test_the_writer_holds_at_most_one_shard(tmp_path):
    held = []  # at each tensor asked for: how many earlier ones are still alive (the writer's pending shard)

    def tensors():
        refs = []
        for i in range(20):
            held.append(sum(ref() is not None for ref in refs))
            tensor = torch.full((250,), float(i))  # 1000 bytes
            refs.append(weakref.ref(tensor))
            yield f"t{i:02d}", tensor
            del tensor

    write_weights(tmp_path / "out", tensors(), max_shard_bytes=3000)
    assert max(held) == 3  # three fit in a shard; written shards are let go
    files = weight_files(tmp_path / "out")
    assert len(files) == 7 and all(len(load_file(str(p))) <= 3 for p in files)
    back = read_all(tmp_path / "out")
    assert sorted(back) == [f"t{i:02d}" for i in range(20)] and all(v[0] == int(k[1:]) for k, v in back.items())


@pytest.mark.parametrize("mitigation", ["wise_ft", "lora"])
def test_an_export_holds_one_shard_and_the_tensors_it_combines(tmp_path, byte_tokenizer, monkeypatch, mitigation):
    model = tiny_model(64, num_hidden_layers=4)  # ~0.6 MB of weights; shards of 40 kB
    if mitigation == "lora":
        exporter, ctx, final = trained_lora(tmp_path, byte_tokenizer, model)
    else:
        ctx = ctx_for(tmp_path, byte_tokenizer)
        exporter = WiseFT(WiseFTConfig(alphas=[0.5]))
        exporter.prepare(model, ctx)
        final = save_final(model, byte_tokenizer, tmp_path / "final")
    limit, largest = 40_000, 64 * 128 * 4
    total = sum(path.stat().st_size for path in exporter.base.weight_files())
    monkeypatch.setattr(merging, "MAX_SHARD_BYTES", limit)
    alive: list[weakref.ref] = []
    peaks = []
    read = WeightFiles.get

    def tracked(self, name):  # every tensor read from a file, and how many bytes of them are alive at each read
        peaks.append(sum(t.numel() * t.element_size() for ref in alive if (t := ref()) is not None))
        tensor = read(self, name)
        alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(WeightFiles, "get", tracked)
    exporter.export(final, ctx)
    # one shard of outputs (which may be the tensors read, passed through) + the few tensors being combined
    assert max(peaks) <= limit + 3 * largest < total / 2


# ---- a sharded model's base: gathered one tensor at a time by every process, written by the main one


def sharded_worker(output_dir: str) -> None:
    """Under torchrun: shard the tiny model over the processes (FSDP2, gloo) and let wise_ft write its base."""
    dist.init_process_group("gloo")
    model = shard_model(tiny_model(400), torch.device("cpu"), None)
    ctx = SimpleNamespace(
        job=SimpleNamespace(model=ModelConfig(name_or_path="tiny-random")),
        accelerator=SimpleNamespace(is_main_process=dist.get_rank() == 0),
        output_dir=Path(output_dir),
    )
    WiseFT(WiseFTConfig()).prepare(model, ctx)
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_base_of_a_sharded_model_is_gathered_tensor_by_tensor(tmp_path):
    root = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    command += [__file__, str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    # its own session: on a timeout the workers are killed with torchrun, not left behind
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output = process.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, output[-3000:]
    written = read_all(tmp_path / "run" / "wise_ft_base")
    expected = state(tiny_model(400))
    assert sorted(written) == sorted(set(expected) - {"lm_head.weight"})  # the tied head once, as saved
    assert all(torch.equal(value, expected[name]) for name, value in written.items())


if __name__ == "__main__":
    sharded_worker(sys.argv[1])
