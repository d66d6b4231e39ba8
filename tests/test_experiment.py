"""`forgetting run` on tiny models: units from strategies x sweeps x seeds, the run directory, resume, refusal,
a failing unit that does not stop the others, and bad experiment configs rejected before any training."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from forgetting.harness.cli import main
from forgetting.harness.errors import UserError
from forgetting.harness.experiment import load_experiment, units
from tests.helpers import write

TASKS = ["forgetting_knowledge", "forgetting_target", "forgetting_prose", "forgetting_ifeval"]


def experiment(tmp_path, **changes) -> dict:
    replay = tmp_path / "replay.txt"
    replay.write_text("\n\n".join(f"General text number {i} about rivers, hills and markets." for i in range(12)))
    config = {
        "name": "tiny",
        "model": {"name_or_path": "tiny-random"},
        "data": {"path": "builtin", "max_seq_len": 96, "limit": 24, "eval_split": "heldout", "eval_limit": 4},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1.0e-3, "progress": False, "save_every": 1},
        "eval": {
            "tasks": TASKS,
            "limit": 3,
            "batch_size": 8,
            "subsample": {"forgetting_knowledge": 6, "forgetting_ifeval": 2},
        },
        "strategies": [
            {"name": "naive"},
            {"name": "lora", "mitigations": [{"name": "lora", "r": 4}]},
            {"name": "wise", "mitigations": [{"name": "wise_ft", "alphas": [0.5]}]},
            {
                "name": "replay",
                "mitigations": [{"name": "replay", "data": {"source": str(replay), "size": 6}}],
                "sweep": {"replay.ratio": [0.25, 0.5]},
            },
        ],
        "seeds": [0],
        "output_dir": str(tmp_path / "run"),
    }
    config.update(changes)
    return config


def test_units_expand_sweeps_and_seeds_with_each_jobs_settings(tmp_path):
    config = experiment(
        tmp_path,
        seeds=[0, 3],
        strategies=[
            {"name": "low", "overrides": {"train.lr": 1.0e-5}},
            {
                "name": "mix",
                "mitigations": [{"name": "replay", "data": {"source": "self"}}],
                "sweep": {"replay.ratio": [0.1, 0.3], "data.format": ["chatml", "alpaca"]},
            },
            {"name": "size", "sweep": {"data.limit": [8, 16]}},
        ],
    )
    found = units(load_experiment(str(write(tmp_path, "exp.yaml", config))))
    assert [u.id for u in found[:2]] == ["low__seed0", "low__seed3"]
    assert found[0].job.train.lr == 1e-5 and found[1].job.train.seed == 3
    mix = [u for u in found if u.family == "mix"]
    assert len(mix) == 8 and mix[0].strategy == "mix[ratio=0.1,format=chatml]"
    assert {(u.job.mitigations[0]["ratio"], u.job.data.format) for u in mix} == {
        (r, f) for r in (0.1, 0.3) for f in ("chatml", "alpaca")
    }
    assert [u.job.data.limit for u in found if u.family == "size"] == [8, 8, 16, 16]
    assert all(u.job.output_dir == f"{config['output_dir']}/units/{u.id}/train" for u in found)


def test_a_sweep_axis_reaches_a_nested_general_data_knob(tmp_path):
    config = experiment(
        tmp_path,
        strategies=[
            {
                "name": "kl",
                "mitigations": [{"name": "kl_to_base", "data": {"source": "general.txt"}}],
                "sweep": {"kl_to_base.data.size": [4, 8]},
            },
            {"name": "ewc", "mitigations": [{"name": "ewc"}], "sweep": {"ewc.data.max_new_tokens": [16]}},
        ],
    )
    found = units(load_experiment(str(write(tmp_path, "exp.yaml", config))))
    assert [u.strategy for u in found] == ["kl[size=4]", "kl[size=8]", "ewc[max_new_tokens=16]"]
    assert [u.job.mitigations[0]["data"] for u in found] == [
        {"source": "general.txt", "size": 4},
        {"source": "general.txt", "size": 8},
        {"max_new_tokens": 16},
    ]


BAD_EXPERIMENTS = [
    ({"strategies": [{"name": "a"}, {"name": "a"}]}, "the name 'a' is used 2 times"),
    ({"strategies": [{"name": "a", "mitigation": []}]}, "did you mean 'mitigations'"),
    ({"strategies": [{"name": "a", "mitigations": [{"name": "lorra"}]}]}, "unknown mitigation 'lorra'"),
    ({"strategies": [{"name": "a", "sweep": {"replay.ratio": [0.1]}}]}, "axis 'replay.ratio'"),
    (
        {"strategies": [{"name": "a", "mitigations": [{"name": "replay"}], "sweep": {"replay.pool_size": [8]}}]},
        "strategies[0].sweep.replay.pool_size: moved to replay.data.size; rename the axis",
    ),
    ({"strategies": [{"name": "a", "overrides": {"train.lrr": 1}}]}, "(a).train.lrr: unknown key; did you mean 'lr'?"),
    ({"strategies": [{"name": "a", "overrides": {"train.lr": "fast"}}]}, "train.lr: expected a number"),
    ({"strategies": [{"name": "a b"}]}, "name: expected letters"),
    ({"strategies": []}, "at least one strategy"),
    ({"seeds": [1, 1]}, "seeds: expected distinct"),
    ({"eval": {"tasks": ["no_such_task"]}}, "unknown task 'no_such_task'"),
    ({"eval": {"tasks": ["forgetting_knowledge"]}}, "target_task: 'forgetting_target' is not one of"),
    ({"eval": {"tasks": TASKS, "subsample": {"forgetting_prose_x": 3}}}, "eval.subsample: 'forgetting_prose_x'"),
    ({"data": {"path": "missing.jsonl"}}, "missing.jsonl"),
    ({"strategie": []}, "did you mean 'strategies'"),
]


@pytest.mark.parametrize("change,message", BAD_EXPERIMENTS, ids=[m for _, m in BAD_EXPERIMENTS])
def test_bad_experiments_fail_before_anything_is_written(tmp_path, capsys, change, message):
    path = write(tmp_path, "exp.yaml", experiment(tmp_path, **change))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny experiment run once (5 units, one of them with WiSE-FT points)."""
    tmp_path = tmp_path_factory.mktemp("exp")
    path = write(tmp_path, "exp.yaml", experiment(tmp_path))
    assert main(["run", str(path)]) == 0
    return tmp_path, path


def test_run_directory_holds_everything_the_reports_need(finished):
    tmp_path, _ = finished
    run = tmp_path / "run"
    for name in (
        "experiment.yaml",
        "environment.json",
        "data_hashes.json",
        "manifest.json",
        "base/eval.json",
        "results.csv",
        "results.parquet",
        "results.json",
        "examples.parquet",
        "reports/report.html",
        "reports/forgetting.md",
        "reports/instruction_following.md",
        "reports/summary.json",
        "reports/deltas.png",
        "reports/pareto.png",
        "reports/loss.png",
    ):
        assert (run / name).is_file(), name
    manifest = json.loads((run / "manifest.json").read_text())
    unit_ids = ["naive__seed0", "lora__seed0", "wise__seed0", "replay__ratio-0.25__seed0", "replay__ratio-0.5__seed0"]
    assert all(manifest["units"][u]["status"] == "done" for u in unit_ids)
    evaluated = [e["model"] for e in manifest["evaluations"]]  # base once, every unit, one WiSE-FT point
    assert sorted(evaluated) == sorted(["base", *(f"{u}/final" for u in unit_ids), "wise__seed0/wise_ft_0.5"])
    for unit in unit_ids:
        assert (run / "units" / unit / "eval.json").is_file() and (run / "units" / unit / "log.txt").is_file()
        assert (run / "units" / unit / "train" / "final").is_dir()
    assert (run / "units" / "lora__seed0" / "train" / "final" / "adapter_config.json").is_file()
    table = pd.read_csv(run / "results.csv")
    assert set(table["task"]) == set(TASKS)
    assert set(table[table["model"] == "tuned"]["variant"]) == {"final", "wise_ft_0.5"}
    datasets = json.loads((run / "data_hashes.json").read_text())["datasets"]
    assert {d["role"] for d in datasets} == {"train", "heldout"} and all(len(d["blake2"]) == 32 for d in datasets)
    env = json.loads((run / "environment.json").read_text())[0]
    assert env["packages"]["torch"] and env["packages"]["lm_eval"]
    assert env["precision"] == {
        "train": "fp32",
        "train_reason": "auto: FORGETTING_CPU_BF16=emulated",
        "eval_dtype": "float32",
        "eval_reason": "auto: FORGETTING_CPU_BF16=emulated",
    }
    # the evaluated documents: knowledge spread over the task, the others the first `limit`
    base = json.loads((run / "base" / "eval.json").read_text())
    assert [s["doc_id"] for s in base["samples"]["forgetting_knowledge"]] == [(i * 309) // 6 for i in range(6)]
    assert [s["doc_id"] for s in base["samples"]["forgetting_target"]] == [0, 1, 2]


def test_a_rerun_resumes_without_training_again(finished, capsys):
    tmp_path, path = finished
    run = tmp_path / "run"
    stamp = (run / "units" / "naive__seed0" / "train" / "final" / "model.safetensors").stat().st_mtime_ns
    results = (run / "results.csv").read_text()
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier") == 5 and "resuming" in out
    assert len(json.loads((run / "manifest.json").read_text())["evaluations"]) == 7  # nothing evaluated again
    assert (run / "units" / "naive__seed0" / "train" / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (run / "results.csv").read_text() == results
    assert main(["report", str(run)]) == 0 and (run / "results.csv").read_text() == results


def test_an_interrupted_unit_continues_from_its_checkpoint(finished, capsys):
    """Unit state as after a crash at step 1 of 2: checkpoint-000001 stands, final/ does not, the unit's record says
    running (with no process holding it)."""
    import shutil

    tmp_path, _ = finished
    config = experiment(tmp_path, output_dir=str(tmp_path / "run2"), strategies=[{"name": "naive"}])
    path2 = write(tmp_path, "exp2.yaml", config)
    assert main(["run", str(path2)]) == 0
    unit = tmp_path / "run2" / "units" / "naive__seed0"
    weights = (unit / "train" / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(unit / "train" / "final")
    (unit / "eval.json").unlink()
    (unit / "status.json").write_text(json.dumps({"status": "running"}))  # its process died mid-unit
    capsys.readouterr()
    assert main(["run", str(path2)]) == 0
    assert "resuming from" in (unit / "log.txt").read_text()
    assert (unit / "train" / "final" / "model.safetensors").read_bytes() == weights


def test_a_different_experiment_in_the_same_directory_is_refused(finished, capsys):
    tmp_path, path = finished
    assert main(["run", str(path), "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "holds a different experiment (train.lr: 0.001 in the run, 0.5 now)" in err


def test_an_experiment_saved_before_a_knob_existed_resumes(finished, capsys):
    import yaml

    tmp_path, path = finished
    saved = tmp_path / "run" / "experiment.yaml"
    original = saved.read_text()
    config = yaml.safe_load(original)
    del config["train"]["packing"], config["eval"]["seed"]  # as if saved before these knobs existed
    saved.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    try:
        assert main(["run", str(path)]) == 0, capsys.readouterr().err
    finally:
        saved.write_text(original)


def test_a_failing_unit_is_marked_and_the_others_go_on(tmp_path, capsys):
    config = experiment(
        tmp_path, strategies=[{"name": "explode", "overrides": {"train.lr": 1.0e30}}, {"name": "naive"}]
    )
    assert main(["run", str(write(tmp_path, "exp.yaml", config))]) == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["units"]["explode__seed0"]["status"] == "failed"
    assert "non-finite" in manifest["units"]["explode__seed0"]["error"]
    assert manifest["units"]["naive__seed0"]["status"] == "done"
    report = (tmp_path / "run" / "reports" / "forgetting.md").read_text()
    assert "failed" in report and "non-finite" in report
    assert "explode" not in pd.read_csv(tmp_path / "run" / "results.csv")["strategy"].tolist()


def test_quick_preset_shrinks_any_experiment(tmp_path):
    exp = load_experiment(str(write(tmp_path, "exp.yaml", experiment(tmp_path, seeds=[5, 6]))), quick=True)
    assert exp.train.max_steps == 2 and exp.eval.limit == 8 and exp.eval.subsample == {} and exp.seeds == [5]
    assert exp.output_dir.endswith("run-quick")
    with pytest.raises(UserError, match="seeds"):
        load_experiment(str(write(tmp_path, "exp.yaml", experiment(tmp_path, seeds=[]))))


def test_units_with_different_precisions_run_in_one_process(tmp_path, capsys):
    config = experiment(
        tmp_path,
        strategies=[{"name": "fp32"}, {"name": "bf16", "overrides": {"train.precision": "bf16"}}],
        eval={"tasks": ["forgetting_knowledge", "forgetting_target"], "limit": 2},
    )
    assert main(["run", str(write(tmp_path, "exp.yaml", config))]) == 0
    out = capsys.readouterr().out  # one progress line per unit and phase, with the time left
    for line in (
        "[base]: evaluating the base model tiny-random",
        "[1/2] fp32__seed0: training",
        "[2/2] bf16__seed0: training step 2/2",
        "[2/2] bf16__seed0: evaluating final",
    ):
        assert line in out, out
    assert any(line.endswith(" left]") for line in out.splitlines())  # an estimate once a step and an eval were timed
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert {u: r["status"] for u, r in manifest["units"].items()} == {
        "base": "done",
        "fp32__seed0": "done",
        "bf16__seed0": "done",
    }


def test_malformed_data_fails_before_the_run_directory_is_written(tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp\n')
    config = experiment(tmp_path, data={"path": str(broken)})
    assert main(["run", str(write(tmp_path, "exp.yaml", config))]) == 2
    assert f"{broken}:2: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resuming_on_changed_data_is_refused(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(8)))
    config = experiment(
        tmp_path,
        data={"path": str(data), "max_seq_len": 64},
        strategies=[{"name": "naive"}],
        eval={"tasks": ["forgetting_knowledge", "forgetting_target"], "limit": 2},
    )
    path = write(tmp_path, "exp.yaml", config)
    assert main(["run", str(path)]) == 0
    data.write_text(data.read_text().replace("a7", "changed"))
    manifest = (tmp_path / "run" / "manifest.json").read_text()
    assert main(["run", str(path)]) == 2
    assert "the data changed since this run started" in capsys.readouterr().err
    assert (tmp_path / "run" / "manifest.json").read_text() == manifest


# the spelling of general data before it was one `data` mapping, and the same experiment spelled today
OLD_STRATEGIES = [
    {"name": "replay", "mitigations": [{"name": "replay", "ratio": 0.3, "pool_size": 8}]},  # source: its default
    {"name": "ewc", "mitigations": [{"name": "ewc", "data": "sft", "samples": 4}], "sweep": {"ewc.samples": [2, 4]}},
]
NEW_STRATEGIES = [
    {"name": "replay", "mitigations": [{"name": "replay", "ratio": 0.3, "data": {"source": "self", "size": 8}}]},
    {
        "name": "ewc",
        "mitigations": [{"name": "ewc", "data": {"source": "sft", "size": 4}}],
        "sweep": {"ewc.data.size": [2, 4]},
    },
]


def test_a_run_directory_saved_with_older_mitigation_keys_resumes_and_reports_as_today(tmp_path):
    from forgetting.harness.configlib import to_dict
    from forgetting.harness.experiment import load_saved_experiment
    from forgetting.harness.io import atomic_write_yaml
    from forgetting.harness.pipeline import open_run_dir
    from forgetting.mitigations import upgrade_specs

    write(tmp_path, "new.yaml", {"strategies": NEW_STRATEGIES, "output_dir": str(tmp_path / "run")})
    exp = load_experiment(str(tmp_path / "new.yaml"))
    saved = dict(to_dict(exp), strategies=OLD_STRATEGIES)
    atomic_write_yaml(tmp_path / "run" / "experiment.yaml", saved)
    with pytest.raises(UserError, match="moved to"):  # a config a user writes is not silently respelled
        load_experiment(str(tmp_path / "run" / "experiment.yaml"))
    assert open_run_dir(exp, tmp_path / "run") is True  # the same experiment: it resumes
    old, new = units(load_saved_experiment(tmp_path / "run" / "experiment.yaml")), units(exp)

    # the same jobs; the units keep the ids the older version gave them (named after the saved sweep axis)
    def resolved(unit):  # the job with its mitigations' configs in full (a saved spec spells every knob)
        return dict(to_dict(unit.job), output_dir=None, mitigations=upgrade_specs(unit.job.mitigations))

    assert [resolved(u) for u in old] == [resolved(u) for u in new]
    assert [u.id for u in old] == [u.id.replace("size-", "samples-") for u in new]
    assert "samples-2" in old[1].id
    changed = load_experiment(str(tmp_path / "new.yaml"), ["seeds=[1]"])
    with pytest.raises(UserError, match="holds a different experiment"):
        open_run_dir(changed, tmp_path / "run")
