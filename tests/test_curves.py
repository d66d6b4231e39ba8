"""Forgetting curves within a fine-tune (`eval.every`) on tiny models: a point per configured step in both forms,
the last point equal to the final evaluation when their documents are the same, training bitwise the same with
and without curves, a resumed unit that keeps its points, the report's section and tidy rows, one-line errors
for bad values at config load, and two DDP processes giving the one process's curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext

import pandas as pd
import pytest

from forgetting.evals.curve import Curve, read_curve
from forgetting.evals.runner import EvalSettings, document_indices
from forgetting.harness import train as train_module
from forgetting.harness.cli import main
from forgetting.harness.errors import UserError
from forgetting.harness.experiment import load_experiment
from forgetting.harness.train import train
from tests.helpers import tiny_job, write
from tests.test_distributed import free_port
from tests.test_experiment import TASKS, experiment

CHEAP = {"tasks": ["forgetting_knowledge", "forgetting_target"], "limit": 3, "subsample": {}, "batch_size": 8}


def curve_experiment(tmp_path, every, strategies=None, **eval_changes) -> dict:
    """The tiny experiment with a curve: 3 steps, the given strategies (naive and LoRA by default)."""
    strategies = strategies or [{"name": "naive"}, {"name": "lora", "mitigations": [{"name": "lora", "r": 4}]}]
    config = experiment(tmp_path, strategies=strategies)
    config["train"] |= {"max_steps": 3, "save_every": 0}
    config["eval"] |= {"every": every} | eval_changes
    return config


def test_curve_steps_in_both_forms():
    assert EvalSettings(every=10).curve_steps(40) == [0, 10, 20, 30, 40]
    assert EvalSettings(every=15).curve_steps(40) == [0, 15, 30, 40]  # the last step always
    assert EvalSettings(every=50).curve_steps(40) == [0, 40]
    assert EvalSettings(every=[12, 5]).curve_steps(40) == [0, 5, 12, 40]
    assert EvalSettings(every=[40]).curve_steps(40) == [0, 40]
    assert EvalSettings().curve_steps(40) == []
    assert EvalSettings(every=[5, 41]).curve_steps(40) == [0, 5, 40]  # an epoch-based run: its count came late
    curve = EvalSettings(subsample={"a": 5, "b": 3}, curve_subsample={"a": 2}, every=2).for_curve()
    assert curve.subsample == {"a": 2, "b": 3} and curve.every is None and curve.curve_subsample == {}


BAD = [
    ({"every": 0}, "eval: every: expected steps >= 1"),
    ({"every": [2, 0]}, "eval: every: expected steps >= 1"),
    ({"every": [1, 1]}, "eval: every: expected a number N or a non-empty list of distinct steps"),
    ({"every": []}, "eval: every: expected a number N or a non-empty list of distinct steps"),
    ({"every": "often"}, "eval.every: expected an integer or a list"),
    ({"every": [1, 4]}, "eval.every: step 4 is beyond train.max_steps=3 of unit naive__seed0"),
    ({"every": 1, "curve_subsample": {"forgetting_knowledge": 0}}, "eval: curve_subsample.forgetting_knowledge"),
    ({"every": 1, "curve_subsample": {"forgetting_nope": 2}}, "eval.curve_subsample: 'forgetting_nope' is not one"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_bad_curve_settings_fail_in_one_line_before_anything_is_written(tmp_path, capsys, change, message):
    config = curve_experiment(tmp_path, None, strategies=[{"name": "naive"}])
    config["eval"] |= change
    assert main(["run", str(write(tmp_path, "exp.yaml", config))]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_sharded_training_with_a_curve_is_refused_in_one_line(tmp_path, capsys):
    config = curve_experiment(tmp_path, 1, strategies=[{"name": "naive", "overrides": {"train.distributed": "fsdp"}}])
    assert main(["run", str(write(tmp_path, "exp.yaml", config))]) == 2
    err = capsys.readouterr().err
    message = "eval.every: not with train.distributed=fsdp (unit naive__seed0): a sharded model cannot be evaluated"
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_stages_listed_steps_are_checked_and_quick_keeps_the_curve_short(tmp_path):
    config = curve_experiment(tmp_path, [3], strategies=[{"name": "naive"}])
    config["stages"] = [{"name": "a", "target_task": "forgetting_target", "train": {"max_steps": 2}}]
    with pytest.raises(UserError, match="eval.every: step 3 is beyond train.max_steps=2 of unit naive__seed0"):
        load_experiment(str(write(tmp_path, "stages.yaml", config)))
    del config["stages"]
    quick = load_experiment(str(write(tmp_path, "exp.yaml", config)), quick=True)  # [3] would be past step 2
    assert quick.eval.every == 2 and quick.train.max_steps == 2


@pytest.fixture(scope="module")
def curved(tmp_path_factory):
    """The tiny experiment with curves run once: naive and LoRA, 3 steps, every 2 (points 0, 2, 3)."""
    tmp_path = tmp_path_factory.mktemp("curves")
    assert main(["run", str(write(tmp_path, "exp.yaml", curve_experiment(tmp_path, 2)))]) == 0
    return tmp_path / "run"


def test_each_unit_has_a_point_per_step_and_the_last_equals_the_final_evaluation(curved):
    for unit in ("naive__seed0", "lora__seed0"):
        points = read_curve(curved / "units" / unit / "curve.jsonl")
        assert [p["step"] for p in points] == [0, 2, 3] and {p["steps"] for p in points} == {3}
        assert all(isinstance(p["heldout_loss"], float) for p in points)
        final = json.loads((curved / "units" / unit / "eval.json").read_text())
        last = points[-1]["results"]
        assert last["results"] == final["results"]  # every task, every metric and stderr: the same documents
        for task, samples in final["samples"].items():
            values = [{m: s[m] for m in s["metrics"]} | {"doc_id": s["doc_id"]} for s in samples]
            assert [{m: s[m] for m in s["metrics"]} | {"doc_id": s["doc_id"]} for s in last["samples"][task]] == values
        record = json.loads((curved / "manifest.json").read_text())["units"][unit]
        assert record["curve_steps"] == [0, 2, 3] and record["curve_seconds"] > 0
    # the held-out loss falls as the model learns the task, and the last point's is the run's final one
    naive = read_curve(curved / "units" / "naive__seed0" / "curve.jsonl")
    heldout = json.loads((curved / "manifest.json").read_text())["units"]["naive__seed0"]["heldout_loss"]
    assert naive[0]["heldout_loss"] == pytest.approx(heldout["before"], rel=1e-9)
    assert naive[-1]["heldout_loss"] == pytest.approx(heldout["after"], rel=1e-9)


def test_the_report_shows_the_curves_with_tidy_rows(curved):
    report = (curved / "reports" / "forgetting.md").read_text()
    assert "## Forgetting over training" in report and "curves.png" in report and "curve_loss.png" in report
    assert "score(s) − score(0)" in report
    for name in ("reports/curves.png", "reports/curve_loss.png", "curves.csv"):
        assert (curved / name).is_file(), name
    rows = pd.read_csv(curved / "curves.csv")
    assert set(rows["unit"]) == {"naive__seed0", "lora__seed0"} and sorted(set(rows["step"])) == [0, 2, 3]
    assert set(TASKS) | {"heldout"} == set(rows["task"])
    last = rows[(rows["unit"] == "naive__seed0") & (rows["step"] == 3) & (rows["task"] == "forgetting_knowledge")]
    final = pd.read_csv(curved / "results.csv")
    final = final[(final["unit"] == "naive__seed0") & (final["task"] == "forgetting_knowledge")]
    assert last.set_index("metric")["value"].to_dict() == final.set_index("metric")["value"].to_dict()
    summary = json.loads((curved / "reports" / "summary.json").read_text())["curves"]
    zero = [r for r in summary if r["step"] == 0]
    assert zero and all(r["delta"] == 0 for r in zero)  # the change from the start, paired: 0 at step 0


def test_a_curve_subsample_evaluates_its_own_documents(tmp_path):
    """Documents spread over the task as `subsample` spreads them; the other tasks keep the final evaluation's."""
    config = curve_experiment(
        tmp_path, [1], strategies=[{"name": "naive"}], curve_subsample={"forgetting_knowledge": 4}, **CHEAP
    )
    config["train"]["max_steps"] = 2
    assert main(["run", str(write(tmp_path, "exp.yaml", config))]) == 0
    points = read_curve(tmp_path / "run" / "units" / "naive__seed0" / "curve.jsonl")
    assert [p["step"] for p in points] == [0, 1, 2]
    samples = points[-1]["results"]["samples"]
    assert [s["doc_id"] for s in samples["forgetting_knowledge"]] == document_indices(309, 4, None)
    assert [s["doc_id"] for s in samples["forgetting_target"]] == [0, 1, 2]


class Recorded(Curve):
    """A curve that records the steps it evaluates and can stop the training at one (a crash there)."""

    def __init__(self, *args, crash_at: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluated, self.crash_at = [], crash_at

    def __call__(self, step, model, tokenizer, heldout_loss):
        if step == self.crash_at:
            raise KeyboardInterrupt  # as a kill would: mid-run, no final checkpoint
        assert not model.training
        self.evaluated.append(step)
        super().__call__(step, model, tokenizer, heldout_loss)


def _job(tmp_path, name: str, *more: str):
    # LoRA's dropout draws from torch's generator at every step: training differs if the evaluation moves it
    lora = 'mitigations=[{"name": "lora", "r": 4, "dropout": 0.2}]'
    return tiny_job(
        tmp_path, "train.max_steps=4", "data.eval_split=heldout", "data.eval_limit=4", lora, *more, name=name
    )


def test_training_is_bitwise_the_same_with_and_without_a_curve(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    def weights(name: str) -> dict:
        return load_file(str(tmp_path / name / "final" / "adapter_model.safetensors"))

    settings = EvalSettings(every=1, **CHEAP)
    train(_job(tmp_path, "plain"))
    curve = Recorded(settings, tmp_path / "curve.jsonl")
    train(_job(tmp_path, "curved"), eval_points=curve)
    assert curve.evaluated == [0, 1, 2, 3, 4]
    plain, curved = weights("plain"), weights("curved")
    assert all(plain[name].equal(curved[name]) for name in plain)

    def logged(name: str) -> list[dict]:  # metrics.jsonl without the timings
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "tokens_per_s")} for line in lines]

    assert logged("plain") == logged("curved")
    # the check can fail: with the random generators left as lm-eval seeds them, the dropout masks differ
    monkeypatch.setattr(train_module, "random_state_kept", nullcontext)
    train(_job(tmp_path, "unkept"), eval_points=Curve(settings, tmp_path / "unkept.jsonl"))
    assert not all(plain[name].equal(tensor) for name, tensor in weights("unkept").items())


def test_a_resumed_unit_keeps_its_points_and_does_not_redo_them(tmp_path):
    settings = EvalSettings(every=1, **CHEAP)
    path = tmp_path / "curve.jsonl"
    with pytest.raises(KeyboardInterrupt):
        train(_job(tmp_path, "run", "train.save_every=1"), eval_points=Recorded(settings, path, crash_at=3))
    assert [p["step"] for p in read_curve(path)] == [0, 1, 2]  # step 3 trained, not evaluated, not saved
    written = path.read_text()
    with open(path, "a") as handle:
        handle.write('{"step": 3, "results": {"resu')  # a line cut short by a crash
    resumed = Recorded(settings, path)
    train(_job(tmp_path, "run", "train.save_every=1"), eval_points=resumed)
    assert resumed.evaluated == [3, 4]  # resumed at the step-2 checkpoint: step 3 trained again, then evaluated
    points = read_curve(path)
    assert [p["step"] for p in points] == [0, 1, 2, 3, 4] and path.read_text().startswith(written)
    uninterrupted = Curve(settings, tmp_path / "whole.jsonl")
    train(_job(tmp_path, "whole"), eval_points=uninterrupted)
    assert [p["results"]["results"] for p in read_curve(tmp_path / "whole.jsonl")] == [
        p["results"]["results"] for p in points
    ]


@pytest.mark.slow
def test_two_ddp_processes_give_the_one_process_curve(tmp_path):
    """`forgetting run` under torchrun: the main process evaluates each point while the other waits at the next
    step's collective; one curve file, the single process's points."""
    config = curve_experiment(tmp_path, 1, strategies=[{"name": "naive"}], **CHEAP)
    config["train"]["max_steps"] = 2
    path = write(tmp_path, "exp.yaml", config | {"output_dir": str(tmp_path / "two")})
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    two = subprocess.run(
        [*launch, "-m", "forgetting", "run", str(path)], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("curve: step 2/2") == 1
    assert main(["run", str(path), f"output_dir={tmp_path / 'one'}"]) == 0
    one, both = (read_curve(tmp_path / run / "units" / "naive__seed0" / "curve.jsonl") for run in ("one", "two"))
    assert [p["step"] for p in both] == [p["step"] for p in one] == [0, 1, 2]
    for a, b in zip(one, both):
        for task, metrics in a["results"]["results"].items():
            for key, value in metrics.items():
                if isinstance(value, float):
                    assert b["results"]["results"][task][key] == pytest.approx(value, abs=1e-6), (task, key)
        assert b["heldout_loss"] == pytest.approx(a["heldout_loss"], rel=1e-5)
