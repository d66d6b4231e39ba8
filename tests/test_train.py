"""The SFT loop on the tiny model: pinned losses, what changes, hooks, schedule, checkpoints and resume."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from forgetting.harness import tracking
from forgetting.harness import train as train_module
from forgetting.harness.configlib import knob
from forgetting.harness.errors import RunError, UserError
from forgetting.harness.optim import lr_factor
from forgetting.harness.train import train
from forgetting.mitigations import REGISTRY, register_mitigation
from tests.helpers import tiny_job as job


def losses(result_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (result_dir / "metrics.jsonl").read_text().splitlines()]


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_two_step_loss_is_pinned(tmp_path):
    result = train(job(tmp_path))
    assert result.steps == 2
    assert losses(tmp_path / "run") == pytest.approx([10.76771, 10.67202], abs=2e-4)


def test_loss_falls_and_every_parameter_changes(tmp_path, make_tiny):
    result = train(job(tmp_path, "train.max_steps=12", "train.warmup_ratio=0"))
    curve = losses(tmp_path / "run")
    assert curve[-1] < curve[0] - 0.5
    before, after = make_tiny().state_dict(), weights(result.final_dir)
    for name, tensor in after.items():
        assert not torch.equal(tensor, before[name]), f"{name} did not change"


def test_frozen_parameters_stay_and_trainable_ones_change(tmp_path, make_tiny):
    result = train(job(tmp_path, "mitigations=[{name: freeze, layers: [0, 0], embeddings: true}]"))
    before, after = make_tiny().state_dict(), weights(result.final_dir)
    for name, tensor in after.items():
        frozen = ".layers.0." in name or "embed_tokens" in name
        assert torch.equal(tensor, before[name]) == frozen, name
    assert result.mitigation_reports["freeze"]["trainable_fraction"] < 0.5


def test_l2sp_penalty_matches_formula_and_pulls_toward_start(tmp_path, make_tiny):
    from forgetting.mitigations.l2sp import L2SP, L2SPConfig

    model = make_tiny()
    l2sp = L2SP(L2SPConfig(strength=0.5))
    l2sp.prepare(model, None)
    assert l2sp.penalty(model, None).item() == 0.0
    with torch.no_grad():
        model.model.norm.weight.add_(0.1)
    expected = 0.5 * 0.5 * (0.1**2) * model.model.norm.weight.numel()
    assert l2sp.penalty(model, None).item() == pytest.approx(expected, rel=1e-4)

    start = make_tiny().state_dict()
    free = weights(train(job(tmp_path, name="free")).final_dir)
    pulled = weights(train(job(tmp_path, "mitigations=[{name: l2sp, strength: 1000.0}]", name="l2sp")).final_dir)
    distance = lambda w: sum((w[n] - start[n]).pow(2).sum() for n in w)  # noqa: E731
    assert distance(pulled) < distance(free)


@dataclass
class ProbeConfig:
    penalty: float = knob(0.0, "constant penalty")
    mix: bool = knob(True, "append 4 repeated examples in mix_data")


class Probe:
    calls: list[str] = []

    def __init__(self, config):
        self.config = config

    def wrap_model(self, model, ctx):
        Probe.calls.append("wrap_model")
        return model

    def mix_data(self, examples, model, ctx):
        Probe.calls.append("mix_data")
        return examples + examples[:4] if self.config.mix else examples

    def prepare(self, model, ctx):
        Probe.calls.append("prepare")

    def penalty(self, model, ctx):
        Probe.calls.append("penalty")
        return torch.tensor(self.config.penalty)

    def report(self, model, ctx):
        Probe.calls.append("report")
        return {"ok": True}


@pytest.fixture
def probe():
    register_mitigation("probe", ProbeConfig)(Probe)
    Probe.calls = []
    yield Probe
    del REGISTRY["probe"]


def test_hooks_are_called_in_order_once_per_step(tmp_path, probe):
    # train.memory_check=false: the memory check wraps a model of its own (meta device) through the hooks too
    result = train(job(tmp_path, "mitigations=[{name: probe}]", "train.memory_check=false"))
    assert probe.calls == ["wrap_model", "mix_data", "prepare", "penalty", "penalty", "report"]
    assert result.mitigation_reports == {"probe": {"ok": True}}


def test_penalty_is_not_part_of_the_logged_response_loss(tmp_path, probe):
    train(job(tmp_path, name="plain"))
    train(job(tmp_path, "mitigations=[{name: probe, penalty: 3.0, mix: false}]", name="probe"))
    assert losses(tmp_path / "probe") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)


def test_lr_schedule_warmup_then_cosine_to_min():
    factors = [lr_factor(s, 100, 0.05, "cosine", 0.1) for s in range(100)]
    assert factors[:5] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    assert factors[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[5:], factors[6:]))
    assert factors[-1] == pytest.approx(0.1, abs=0.01)
    assert lr_factor(50, 100, 0.0, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(99, 100, 0.0, "constant", 0.0) == 1.0


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = train(job(tmp_path, "train.max_steps=4", "train.save_every=2", name="straight"))
    calls = {"n": 0}
    real_loss_step = train_module.loss_step

    def crash_on_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_loss_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "loss_step", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        train(job(tmp_path, "train.max_steps=4", "train.save_every=2", name="resumed"))
    assert (tmp_path / "resumed" / "checkpoint-000002").is_dir() and not (tmp_path / "resumed" / "final").exists()
    monkeypatch.setattr(train_module, "loss_step", real_loss_step)
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "lo')  # as if killed in the middle of appending a line
    resumed = train(job(tmp_path, "train.max_steps=4", "train.save_every=2", name="resumed"))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    for name, tensor in weights(resumed.final_dir).items():
        assert torch.equal(tensor, weights(straight.final_dir)[name]), name


def test_rerun_of_a_finished_run_trains_nothing_and_other_configs_are_refused(tmp_path):
    first = train(job(tmp_path))
    again = train(job(tmp_path))
    assert again.steps == first.steps and again.last_loss == first.last_loss
    with pytest.raises(UserError, match="holds a different run"):
        train(job(tmp_path, "train.lr=5e-4"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a run directory"):
        train(job(tmp_path, name="other"))


def test_a_run_saved_before_a_knob_existed_still_resumes(tmp_path):
    """Knobs added since a run was saved take their defaults; a knob the code no longer knows is a difference."""
    import yaml

    first = train(job(tmp_path))
    saved = tmp_path / "run" / "forgetting_config.yaml"
    config = yaml.safe_load(saved.read_text())
    del (
        config["train"]["packing"],
        config["train"]["compile"],
    )  # as saved before those knobs existed (commits f7277fe, f77c37e)
    saved.write_text(yaml.safe_dump(config))
    assert train(job(tmp_path)).last_loss == first.last_loss  # finished: nothing to train
    config["train"]["retired_knob"] = 1
    saved.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="holds a different run"):
        train(job(tmp_path))


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    with pytest.raises(RunError, match=r"non-finite loss \(.*\) or gradient norm \(.*\) at step \d; not applied"):
        train(
            job(
                tmp_path,
                "train.lr=1e30",
                "train.max_steps=3",
                "train.grad_clip=null",
                "train.warmup_ratio=0",
                "train.adam_eps=1e-30",
            )
        )


def test_a_tracker_without_its_package_is_a_clear_error_before_training(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    message = r"^train\.log_with: tensorboard is not installed \(pip install 'sft-forgetting\[tensorboard\]'\)$"
    with pytest.raises(UserError, match=message):
        train(job(tmp_path, "train.log_with=[tensorboard]"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tmp_path):
    """train.compile: same losses and weights as eager (to float tolerance); checkpoints keep plain keys."""
    if not any(__import__("shutil").which(cc) for cc in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler: torch.compile cannot build CPU kernels here")
    eager = train(job(tmp_path, "train.max_steps=3", name="eager"))
    compiled = train(job(tmp_path, "train.max_steps=3", "train.compile=true", name="compiled"))
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
    expected, got = weights(eager.final_dir), weights(compiled.final_dir)
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5)


def test_compile_without_a_cpu_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UserError, match="train.compile: .*C\\+\\+ compiler"):
        train(job(tmp_path, "train.compile=true"))


def test_a_run_saved_with_older_mitigation_keys_is_claimed_as_the_same_run(tmp_path):
    from forgetting.harness.configlib import to_dict
    from forgetting.harness.io import atomic_write_yaml
    from forgetting.harness.train import finished_run

    run = job(tmp_path, "mitigations=[{name: ewc, data: {source: sft, size: 4}}]")
    saved = dict(to_dict(run), mitigations=[{"name": "ewc", "data": "sft", "samples": 4}])
    atomic_write_yaml(tmp_path / "run" / "forgetting_config.yaml", saved)
    assert finished_run(run, tmp_path / "run") is False  # the same run, not finished: it resumes
    saved["mitigations"][0]["strength"] = 2.0
    atomic_write_yaml(tmp_path / "run" / "forgetting_config.yaml", saved)
    with pytest.raises(UserError, match="holds a different run"):
        finished_run(run, tmp_path / "run")
