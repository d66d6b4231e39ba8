"""The memory plan (harness/plan.py, `forgetting plan`): exact parameter counts from a meta-device model, the
per-process rows under ddp and fsdp, the activation formula against the tensors autograd really keeps, the fit
check and the command line. Expectations are computed here from real (tiny) models, not with the plan's helpers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from forgetting.harness import last_layer, packing
from forgetting.harness.batching import micro_batches
from forgetting.harness.cli import main
from forgetting.harness.errors import UserError
from forgetting.harness.loss import summed_response_loss
from forgetting.harness.plan import (
    Plan,
    activation_bytes,
    check_fits,
    compute_settings,
    estimate,
    meta_model,
    model_info,
)
from forgetting.mitigations import build_mitigations
from forgetting.mitigations.lora import ALL_LINEAR
from tests.helpers import tiny_job, write
from tests.test_cli import run_cli


def rows(plan: Plan) -> dict[str, tuple[int, int]]:
    """The plan's rows by the name before any ' (' or ':' detail."""
    return {row.name.split(" (")[0].split(":")[0]: (row.ddp, row.fsdp) for row in plan.rows}


def wrapped(model, spec: dict, tmp_path: Path):
    """`model` through the real mitigation's wrap_model, as training applies it."""
    ctx = SimpleNamespace(output_dir=tmp_path, accelerator=SimpleNamespace(is_main_process=True))
    (mitigation,) = build_mitigations([spec])
    return mitigation.wrap_model(model, ctx)


def test_parameter_counts_equal_the_real_tiny_model_without_loading_it(tmp_path, make_tiny):
    model = meta_model(tiny_job(tmp_path))
    real = make_tiny()
    assert all(p.device.type == "meta" for p in model.parameters())
    info = model_info(model)
    assert info.total == sum(p.numel() for p in real.parameters())  # the tied head counted once
    assert info.trainable == info.total
    assert len(info.layers) == len(real.model.layers)
    assert max(p for p, _ in info.layers) == sum(p.numel() for p in real.model.layers[0].parameters())


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        {"name": "lora"},
        {"name": "freeze", "layers": [0, 0], "embeddings": True},
        {"name": "freeze", "patterns": ["mlp"]},
    ],
    ids=["lora-qv", "lora-all", "freeze-layer-embeddings", "freeze-mlp"],
)
def test_trainable_counts_equal_the_really_wrapped_model(tmp_path, make_tiny, spec):
    info = model_info(meta_model(tiny_job(tmp_path, f"mitigations={json.dumps([spec])}")))
    real = wrapped(make_tiny(), spec, tmp_path)
    assert info.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert info.total == sum(p.numel() for p in real.parameters())
    assert 0 < info.trainable < info.total


def test_fsdp_shards_weights_gradients_and_adamw_and_adds_the_gathered_units(tmp_path, make_tiny):
    real = make_tiny()
    n = sum(p.numel() for p in real.parameters())
    layer = sum(p.numel() for p in real.model.layers[0].parameters())
    root = n - sum(p.numel() for block in real.model.layers for p in block.parameters())  # embeddings, norm
    plan = estimate(tiny_job(tmp_path), 2, device_type="cpu")  # fp32: the suite pins emulated bf16
    r = rows(plan)
    assert r["weights"] == (4 * n, 4 * n // 2)  # every dimension 0 of the tiny model is even
    assert r["gradients"] == (4 * n, 4 * n // 2)
    assert r["AdamW state"] == (8 * n, 8 * n // 2)
    assert r["ddp gradient buckets"] == (4 * n, 0)
    assert r["autocast weight copies"] == (0, 0)  # fp32: nothing to cast
    assert r["fsdp gathered root + 2 layers"] == (0, 4 * (root + 2 * layer))
    assert r["fsdp unsharded gradient"] == (0, 4 * max(root, layer))
    for same in ("activations", "logits"):
        assert r[same][0] == r[same][1] > 0
    assert plan.total("ddp") == sum(ddp for ddp, _ in r.values())
    assert plan.total("fsdp") == sum(fsdp for _, fsdp in r.values())
    one = rows(estimate(tiny_job(tmp_path), 1, device_type="cpu"))
    assert one["ddp gradient buckets"] == (0, 0)  # one process: no DDP wrapper
    launched = rows(estimate(tiny_job(tmp_path), 1, device_type="cpu", launcher=True))
    assert launched["ddp gradient buckets"] == (4 * n, 0)  # under torchrun accelerate wraps even one process


def test_a_steps_only_micro_batch_runs_with_only_the_heads_gradient(tmp_path, make_tiny, builtin_examples):
    """Gradients are freed after every step and backward computes the LM head's first: a step's first
    micro-batch peaks with that one alone (here every step is one micro-batch of 8 short examples)."""
    examples, _ = builtin_examples(32)
    real = make_tiny()
    plan = estimate(tiny_job(tmp_path), 1, examples, device_type="cpu")
    assert plan.from_data and plan.tokens <= 8 * max(len(e) for e in examples)
    assert rows(plan)["gradients"] == (real.lm_head.weight.numel() * 4, 0)  # the tied embedding, fp32
    several = estimate(tiny_job(tmp_path, "train.micro_batch_tokens=300"), 1, examples, device_type="cpu")
    assert rows(several)["gradients"][0] == 4 * sum(p.numel() for p in real.parameters())


def test_fsdp_pads_each_parameter_to_a_multiple_of_the_processes(tmp_path, make_tiny):
    shapes = [p.shape for p in make_tiny().parameters()]
    expected = sum(math.ceil(s[0] / 3) * math.prod(s[1:]) for s in shapes)  # hidden 64 = 3 x 21 + 1
    assert rows(estimate(tiny_job(tmp_path), 3, device_type="cpu"))["weights"][1] == 4 * expected


def test_mitigation_rows(tmp_path, make_tiny):
    n = sum(p.numel() for p in make_tiny().parameters())
    specs = "[{name: ewc}, {name: l2sp}, {name: kl_to_base}, {name: wise_ft}, {name: replay}, {name: low_lr}]"
    r = rows(estimate(tiny_job(tmp_path, f"mitigations={specs}"), 2, device_type="cpu"))
    assert r["ewc"] == (3 * n * 4, 3 * n * 4 // 2)  # anchor, Fisher and F x anchor, fp32, sharded by fsdp
    assert r["l2sp"] == (2 * n * 4, 2 * n * 4 // 2)  # anchor + the penalty's kept difference
    kl_ddp, kl_fsdp = r["kl_to_base"]
    assert kl_ddp - kl_fsdp == n * 4 // 2  # the frozen copy is sharded, its batch's forward is not
    assert kl_ddp > n * 4
    assert r["wise_ft"] == r["replay"] == r["low_lr"] == (0, 0)


def test_ewc_with_lora_keeps_the_fisher_of_the_adapted_base_weights(tmp_path, make_tiny):
    real = make_tiny()
    adapted = sum(
        m.weight.numel() for name, m in real.named_modules() if name.rsplit(".", 1)[-1] in ALL_LINEAR
    )  # its anchor is the frozen base weight itself, no copy; no plain trainable parameter is left
    job = tiny_job(tmp_path, "mitigations=[{name: lora}, {name: ewc}]")
    assert rows(estimate(job, 1, device_type="cpu"))["ewc"][0] == adapted * 4


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activations_match_the_tensors_autograd_keeps(tmp_path, make_tiny, builtin_examples, precision):
    """The per-token formula against a count of every distinct tensor saved for backward in a training forward
    (packed attention, the last layer only where logits are taken; bf16: autocast, its weight copies included)."""
    examples, _ = builtin_examples(16)
    job = tiny_job(tmp_path, "train.micro_batch_tokens=600", f"train.precision={precision}")
    model = make_tiny()
    lengths = [len(e) for e in examples]
    group = micro_batches(list(range(len(examples))), lengths, 600, packed=True)[0]
    batch = packing.pack([examples[i] for i in group])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with packing.packed_attention_on(model), last_layer.only_where_logits(model), autocast:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            summed_response_loss(model, batch)
    tokens = batch["input_ids"].shape[1]
    targets = int((batch["labels"][:, 1:] != -100).sum())
    compute, _, _ = compute_settings(job, "cpu")
    info = model_info(meta_model(job))
    copies = info.matmul * 2 if precision == "bf16" else 0  # autocast's bf16 copy of every matmul weight
    expected = activation_bytes(info, compute, tokens, targets) + targets * info.arch.vocab * 4 + copies
    assert sum(saved.values()) == pytest.approx(expected, rel=0.03)  # + the log-probs, the one logits copy kept


def test_check_fits_refuses_in_one_line_naming_the_knob_and_passes_when_it_fits(tmp_path):
    job = tiny_job(tmp_path)
    plan = estimate(job, 2, device_type="cpu")
    between = (plan.total("fsdp") + plan.total("ddp")) // 2
    assert plan.total("fsdp") < between < plan.total("ddp")
    with pytest.raises(UserError) as refused:
        check_fits(job, 2, "cpu", available_bytes=between)
    message = str(refused.value)
    assert "\n" not in message and "train.distributed=ddp" in message
    assert message.split("it would fit with ")[1].startswith("train.distributed=fsdp")
    with pytest.raises(UserError, match="train.micro_batch_tokens|train.gradient_checkpointing|lora"):
        check_fits(job, 1, "cpu", available_bytes=plan.total("ddp") // 4)
    check_fits(job, 2, "cpu", available_bytes=10 * plan.total("ddp"))
    check_fits(job, 1, "cpu")  # this machine's MemAvailable holds a tiny model
    check_fits(job, 1, "meta", available_bytes=None)  # unknown memory: nothing to check


def test_plan_command_prints_the_table(tmp_path):
    config = write(tmp_path, "job.yaml", {"data": {"limit": 16}, "train": {"max_steps": 2, "batch_size": 8}})
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [
        sys.executable,
        "-m",
        "forgetting",
        "plan",
        str(config),
        "--processes",
        "2",
        "model.name_or_path=tiny-random",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:3] == ["per", "process", "ddp"] for line in lines)
    for label in ("weights", "gradients", "AdamW state", "activations", "logits", "total", "available", "fits"):
        assert any(line.startswith(label) for line in lines), label


@pytest.mark.parametrize(
    ("extra", "expected"),
    [(["train.lr=fast"], "train.lr: expected a number, got 'fast'"), (["--processes", "0"], "--processes")],
)
def test_plan_command_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, expected):
    config = write(tmp_path, "job.yaml", {"data": {"limit": 16}})
    assert main(["plan", str(config), "model.name_or_path=tiny-random", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err


@pytest.mark.slow
def test_a_run_that_cannot_fit_is_refused_before_any_work(tmp_path, tokenizer):
    """A 70B-shaped model (config and tokenizer only: no weights exist, none are read) on this machine: training
    stops with one line naming a knob, writes nothing, and `train.memory_check=false` lets it go past the check."""
    from transformers import LlamaConfig

    model_dir = tmp_path / "llama-70b-shaped"
    LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    output = tmp_path / "run"
    args = ["train", f"model.name_or_path={model_dir}", "data.limit=8", f"output_dir={output}"]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("error: memory: ") and "needs ~" in message[0], message
    assert "train.distributed=fsdp" in message[0] or "lora" in message[0]
    assert not output.exists()
    unchecked = run_cli(*args, "train.memory_check=false")  # past the check: loading finds no weights
    assert unchecked.returncode != 0 and "memory:" not in unchecked.stderr


def test_the_memory_check_leaves_the_random_state_as_it_was(tmp_path):
    """The check wraps a meta model through the mitigations (LoRA draws its initialisation): a run with it must
    train what a run without it trains."""
    from safetensors.torch import load_file

    from forgetting.harness.train import train
    from tests.helpers import tiny_job

    finals = []
    for check in ("true", "false"):
        job = tiny_job(tmp_path, "mitigations=[{name: lora, r: 4}]", f"train.memory_check={check}", name=check)
        finals.append(load_file(str(train(job).final_dir / "adapter_model.safetensors")))
    assert all(torch.equal(finals[0][name], finals[1][name]) for name in finals[1])
