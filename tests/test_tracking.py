"""Experiment tracking (`train.log_with`) against the real libraries, offline: W&B in offline mode, MLflow on a
sqlite store, trackio's local store, TensorBoard event files; each read back and compared with what the run wrote
(metrics.jsonl, the held-out losses, the resolved config, the report's table and files)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sqlite3
import struct
import sys
import tempfile
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from forgetting.harness import train as train_module
from forgetting.harness.cli import main
from forgetting.harness.configlib import from_dict, to_dict
from forgetting.harness.errors import UserError
from forgetting.harness.experiment import Experiment, load_experiment, units, upgrade_experiment
from forgetting.harness.job import TrainJob, load_job, upgrade_job
from forgetting.harness.tracking import Place, Trackers, flat, log_report, mlflow_parent
from forgetting.harness.train import train
from tests.helpers import tiny_job, write

# Read once, when each library is imported (trackio keeps its directory in module constants; MLflow decides on
# telemetry, which would look up a host name): set before any test here imports them.
TRACKIO_DIR = Path(tempfile.mkdtemp(prefix="forgetting-trackio-"))
os.environ.update(TRACKIO_DIR=str(TRACKIO_DIR), MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
ALL = "train.log_with=[wandb,mlflow,trackio,tensorboard]"


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory):
    """An empty MLflow sqlite store, made once: building the schema takes seconds, a copy milliseconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    yield path
    import mlflow
    import trackio  # every test here imported it by now; check it wrote where the tests read

    # a run left active would be ended at exit, into ./mlflow.db of wherever the process then is
    assert mlflow.active_run() is None

    assert Path(trackio.utils.TRACKIO_DIR) == TRACKIO_DIR
    shutil.rmtree(TRACKIO_DIR, ignore_errors=True)
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()  # stops the wandb-core process of the offline runs


def go_offline(d: Path, monkeypatch, mlflow_template: Path) -> str:
    """Every tracker writing under `d`, no network; returns a project name of its own (trackio's store is
    shared by the module)."""
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": d / "wandb",
        "WANDB_CACHE_DIR": d / "wandb_cache",
        "WANDB_DATA_DIR": d / "wandb_data",
        "WANDB_CONFIG_DIR": d / "wandb_config",
        "WANDB_ARTIFACT_DIR": d / "wandb_artifacts",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}",
    }.items():
        monkeypatch.setenv(name, str(value))
    for name in ("WANDB_API_KEY", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    d.mkdir(parents=True)
    shutil.copy(mlflow_template, d / "mlflow.db")
    monkeypatch.chdir(d)  # MLflow's default artifact store for a sqlite database: ./mlruns
    return f"t-{uuid.uuid4().hex[:8]}"


# ---- reading each tracker back


def wandb_records(run_dir: Path):
    """The protobuf records of an offline W&B run (`run-<id>.wandb`: LevelDB log format, 32 KiB blocks of
    records with a 7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last))."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's trailer
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (2, 3):
            pending += chunk
            continue
        if kind not in (1, 4):
            break
        record = pb.Record()
        record.ParseFromString(pending + chunk)
        pending = b""
        yield record


def wandb_run(run_dir: Path) -> dict:
    """An offline W&B run: name, group, job type, config, history rows and artifacts."""
    out = {"config": {}, "history": [], "artifacts": [], "exit_code": None}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out |= {"name": r.display_name, "group": r.run_group, "job_type": r.job_type}
        if kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            out["config"] |= {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
        elif kind == "history":
            out["history"].append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
        elif kind == "artifact":
            out["artifacts"] += [(record.artifact.type, e.path) for e in record.artifact.manifest.contents]
    out["config"].pop("_wandb", None)
    return out


def wandb_runs(root: Path) -> dict[str, dict]:
    runs = [wandb_run(Path(d)) for d in sorted(glob.glob(str(root / "wandb" / "offline-run-*")))]
    return {r["name"]: r for r in runs}


def trackio_runs(project: str) -> dict[str, dict]:
    """trackio's local store read with sqlite3: each run's config and metric rows (step, metrics)."""
    db = sqlite3.connect(f"file:{TRACKIO_DIR / (project + '.db')}?mode=ro", uri=True)
    runs = {
        name: {"config": json.loads(c), "rows": []} for name, c in db.execute("SELECT run_name, config FROM configs")
    }
    for name, step, metrics in db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY id"):
        runs[name]["rows"].append((step, json.loads(metrics)))
    query = "SELECT a.name, v.manifest FROM artifacts a JOIN artifact_versions v ON v.artifact_id = a.id"
    artifacts = [(name, [e["path"] for e in json.loads(manifest)]) for name, manifest in db.execute(query)]
    return runs | {"artifacts": artifacts}


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def same_series(logged: list[tuple[int, float]], expected: list[tuple[int, float]], rel: float = 1e-9) -> bool:
    """The same steps and, within `rel`, the same values (TensorBoard keeps float32)."""
    return [s for s, _ in logged] == [s for s, _ in expected] and [v for _, v in logged] == pytest.approx(
        [v for _, v in expected], rel=rel
    )


def metrics(output_dir: Path) -> tuple[list[dict], dict]:
    """metrics.jsonl's step records and the held-out losses before and after (trainer_state.json)."""
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    heldout = json.loads((output_dir / "final" / "trainer_state.json").read_text())["heldout_loss"]
    return [line for line in lines if "loss" in line], heldout


# ---- one job


@pytest.fixture(scope="module")
def tracked_job(tmp_path_factory, mlflow_template):
    """A 3-step tiny job logged to all four trackers, run once; (job, output dir, project)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        tmp_path = tmp_path_factory.mktemp("job")
        yield train_tracked(tmp_path, go_offline(tmp_path / "trackers", monkeypatch, mlflow_template))


def train_tracked(tmp_path: Path, offline: str) -> tuple:
    job = tiny_job(
        tmp_path, ALL, f"train.tracker_project={offline}", "train.max_steps=3", "data.eval_split=heldout",
        "data.eval_limit=4",
    )  # fmt: skip
    train(job)
    return job, tmp_path / "run", offline


def test_a_job_logs_config_steps_and_heldout_loss_to_wandb(tracked_job):
    job, out, _ = tracked_job
    records, heldout = metrics(out)
    (run,) = wandb_runs(out).values()
    assert (run["name"], run["group"], run["job_type"]) == ("run", "", "train")
    assert run["config"] == json.loads(json.dumps(to_dict(job)))
    rows = {row["_step"]: row for row in run["history"]}
    for record in records:
        assert {k: rows[record["step"]][f"train/{k}"] for k in record if k != "step"} == pytest.approx(
            {k: v for k, v in record.items() if k != "step"}
        )
    assert rows[0]["eval/heldout_loss"] == pytest.approx(heldout["before"])
    assert rows[3]["eval/heldout_loss"] == pytest.approx(heldout["after"])


def test_a_job_logs_config_steps_and_heldout_loss_to_mlflow(tracked_job):
    from mlflow.tracking import MlflowClient

    job, out, project = tracked_job
    records, heldout = metrics(out)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(project).experiment_id])
    assert run.info.run_name == "run" and "mlflow.parentRunId" not in run.data.tags
    assert run.data.params == {k: str(v) for k, v in flat(to_dict(job)).items()}
    for key in ("loss", "lr", "grad_norm", "tokens", "padding_fraction"):
        history = client.get_metric_history(run.info.run_id, f"train/{key}")
        assert same_series([(m.step, m.value) for m in history], [(r["step"], r[key]) for r in records])
    history = client.get_metric_history(run.info.run_id, "eval/heldout_loss")
    assert same_series(sorted((m.step, m.value) for m in history), [(0, heldout["before"]), (3, heldout["after"])])


def test_a_job_logs_config_steps_and_heldout_loss_to_trackio(tracked_job):
    job, out, project = tracked_job
    records, heldout = metrics(out)
    runs = trackio_runs(project)
    config = runs["run"]["config"]
    assert {k: v for k, v in config.items() if not k.startswith("_")} == flat(to_dict(job))
    logged = [(step, m) for step, m in runs["run"]["rows"] if "train/loss" in m]
    assert [s for s, _ in logged] == [r["step"] for r in records]
    for (_, m), record in zip(logged, records):
        assert {k: m[f"train/{k}"] for k in record if k != "step"} == pytest.approx(
            {k: v for k, v in record.items() if k != "step"}
        )
    losses = [(s, m["eval/heldout_loss"]) for s, m in runs["run"]["rows"] if "eval/heldout_loss" in m]
    assert same_series(losses, [(0, heldout["before"]), (3, heldout["after"])])


def test_a_job_logs_config_steps_and_heldout_loss_to_tensorboard(tracked_job):
    job, out, _ = tracked_job
    records, heldout = metrics(out)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "seconds"):
        logged = tensorboard_scalars(out / "tensorboard", f"train/{key}")
        assert same_series(logged, [(r["step"], r[key]) for r in records], rel=1e-6)  # float32
    logged = tensorboard_scalars(out / "tensorboard", "eval/heldout_loss")
    assert same_series(logged, [(0, heldout["before"]), (3, heldout["after"])], rel=1e-6)
    (hparams,) = (out / "tensorboard").glob("*/hparams.yml")
    assert yaml.safe_load(hparams.read_text()) == flat(to_dict(job))


# ---- an experiment


@pytest.fixture(scope="module")
def tracked_experiment(tmp_path_factory, mlflow_template):
    """A tiny 2-strategy experiment with all four trackers, run once; (run directory, project)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        tmp_path = tmp_path_factory.mktemp("experiment")
        yield run_experiment(tmp_path, go_offline(tmp_path / "trackers", monkeypatch, mlflow_template))


def run_experiment(tmp_path: Path, offline: str) -> tuple[Path, str]:
    config = {
        "name": "tiny",
        "model": {"name_or_path": "tiny-random"},
        "data": {"path": "builtin", "max_seq_len": 96, "limit": 16, "eval_split": "heldout", "eval_limit": 4},
        "train": {
            "max_steps": 2,
            "batch_size": 4,
            "lr": 1.0e-3,
            "progress": False,
            "log_with": ["wandb", "mlflow", "trackio", "tensorboard"],
            "tracker_project": offline,
        },
        "eval": {"tasks": ["forgetting_knowledge", "forgetting_target"], "limit": 3, "batch_size": 8},
        "strategies": [{"name": "naive"}, {"name": "lora", "mitigations": [{"name": "lora", "r": 4}]}],
        "output_dir": str(tmp_path / "run"),
    }
    assert main(["run", str(write(tmp_path, "exp.yaml", config))]) == 0
    return tmp_path / "run", offline


def report_files(run_dir: Path) -> set[str]:
    return {"results.csv", "forgetting.md", "report.html", *(p.name for p in (run_dir / "reports").glob("*.png"))}


def forgetting_table(run_dir: Path) -> pd.DataFrame:
    return pd.DataFrame(json.loads((run_dir / "reports" / "summary.json").read_text())["strategies"])


def test_an_experiment_groups_its_units_and_logs_the_report_to_wandb(tracked_experiment):
    run_dir, _ = tracked_experiment
    runs = wandb_runs(run_dir)
    units = sorted(p.name for p in (run_dir / "units").iterdir())
    assert sorted(runs) == sorted([*units, "report"])
    assert {(r["group"], r["job_type"]) for name, r in runs.items() if name != "report"} == {("tiny", "train")}
    report = runs["report"]
    assert (report["group"], report["job_type"]) == ("tiny", "report")
    assert {Path(p).name for kind, p in report["artifacts"] if kind == "report"} == report_files(run_dir)
    assert len(report_files(run_dir)) > 3  # the plots are there
    (table_file,) = (run_dir / "wandb").glob("offline-run-*/files/media/table/forgetting_table_*.table.json")
    table = json.loads(table_file.read_text())
    pd.testing.assert_frame_equal(
        pd.DataFrame(table["data"], columns=table["columns"]), forgetting_table(run_dir), check_dtype=False
    )
    row = forgetting_table(run_dir).set_index("strategy").loc["lora"]
    (summary_row,) = [h for h in report["history"] if "results/lora/forgetting" in h]
    assert summary_row["results/lora/forgetting"] == pytest.approx(row["forgetting"])


def test_an_experiment_logs_its_units_as_children_of_the_mlflow_report_run(tracked_experiment, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir, project = tracked_experiment
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(project).experiment_id
    parent = json.loads((run_dir / "tracking.json").read_text())["mlflow_parent"]
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == sorted(p.name for p in (run_dir / "units").iterdir())
    report = client.get_run(parent)
    assert (report.info.run_name, report.data.tags["group"], report.info.status) == ("report", "tiny", "FINISHED")
    assert {Path(a.path).name for a in client.list_artifacts(parent, "report")} == report_files(run_dir)
    table = client.load_table(experiment_id, "forgetting_table.json", run_ids=[parent])
    pd.testing.assert_frame_equal(
        table, forgetting_table(run_dir).fillna(float("nan")), check_dtype=False, check_like=True
    )
    assert report.data.metrics["results/lora/forgetting"] == pytest.approx(
        forgetting_table(run_dir).set_index("strategy").loc["lora", "forgetting"]
    )


def test_an_experiment_groups_its_trackio_runs_and_logs_the_report(tracked_experiment):
    run_dir, project = tracked_experiment
    runs = trackio_runs(project)
    artifacts = runs.pop("artifacts")
    assert sorted(runs) == sorted([*(p.name for p in (run_dir / "units").iterdir()), "report"])
    assert {r["config"]["_Group"] for r in runs.values()} == {"tiny"}
    assert [(name, {Path(p).name for p in paths}) for name, paths in artifacts] == [("report", report_files(run_dir))]
    (table,) = [m["forgetting_table"] for _, m in runs["report"]["rows"] if "forgetting_table" in m]
    logged = pd.DataFrame(table["_value"]) if "_value" in table else pd.DataFrame(table)
    pd.testing.assert_frame_equal(logged, forgetting_table(run_dir), check_dtype=False, check_like=True)


def test_an_experiment_writes_tensorboard_runs_per_unit_and_the_table_as_text(tracked_experiment):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tracked_experiment
    units = sorted(p.name for p in (run_dir / "units").iterdir())
    assert sorted(p.name for p in (run_dir / "tensorboard").iterdir()) == sorted([*units, "report"])
    for unit in units:
        records, _ = metrics(run_dir / "units" / unit / "train")
        logged = tensorboard_scalars(run_dir / "tensorboard" / unit, "train/loss")
        assert same_series(logged, [(r["step"], r["loss"]) for r in records], rel=1e-6)
    events = EventAccumulator(str(run_dir / "tensorboard" / "report"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    text = events.Tensors("forgetting_table/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "".join(line[4:] + "\n" for line in text.splitlines()) == forgetting_table(run_dir).to_csv(index=False)
    plots = {p.stem for p in (run_dir / "reports").glob("*.png")}
    assert {tag.removeprefix("plots/") for tag in events.Tags()["images"]} == plots


# ---- steps, errors, older configs


def test_stage_offsets_continue_the_units_steps(tmp_path):
    trackers = Trackers(["tensorboard"], "p", Place("unit", "exp", tmp_path, tmp_path / "tb" / "unit"), {"a": 1})
    trackers.start()
    trackers.log({"train/loss": 1.0}, 2)
    trackers.offset = 2  # the second stage: its step 1 is the unit's step 3
    trackers.log({"train/loss": 0.5}, 1)
    trackers.finish()
    assert tensorboard_scalars(tmp_path / "tb" / "unit", "train/loss") == [(2, 1.0), (3, 0.5)]


def test_a_tracker_that_is_not_installed_is_a_one_line_error_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what find_spec and `import wandb` see when it is missing
    code = main(
        ["train", "model.name_or_path=tiny-random", "train.log_with=[tensorboard,wandb]", f"output_dir={tmp_path}/run"]
    )
    err = capsys.readouterr().err.strip()
    assert (code, err) == (2, "error: train.log_with: wandb is not installed (pip install 'sft-forgetting[wandb]')")
    assert not (tmp_path / "run").exists()
    config = {
        "model": {"name_or_path": "tiny-random"},
        "train": {"log_with": ["wandb"]},
        "output_dir": str(tmp_path / "exp"),
    }
    assert main(["run", str(write(tmp_path, "exp.yaml", config))]) == 2
    assert "train.log_with: wandb is not installed" in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()


def test_an_unknown_tracker_is_refused_with_the_valid_ones(tmp_path):
    with pytest.raises(
        UserError, match=r"train\.log_with: 'wandbb' is not a tracker; choose from wandb, mlflow, trackio, tensorboard$"
    ):
        load_job(None, ["train.log_with=[wandbb]"])


def test_configs_saved_with_train_tensorboard_still_load_and_resume(tmp_path, capsys):
    with pytest.raises(UserError, match=r"^train\.tensorboard: replaced; write log_with: \[tensorboard\] \("):
        load_job(None, ["train.tensorboard=true"])  # written today: refused with the new spelling
    old_job = {"train": {"max_steps": 2, "tensorboard": True}, "output_dir": "x"}
    assert from_dict(TrainJob, upgrade_job(old_job)).train.log_with == ["tensorboard"]
    assert from_dict(TrainJob, upgrade_job({"train": {"tensorboard": False}})).train.log_with == []
    old_experiment = {"train": {"tensorboard": True}, "stages": []}
    assert from_dict(Experiment, upgrade_experiment(old_experiment)).train.log_with == ["tensorboard"]
    job = tiny_job(tmp_path)
    train(job)
    saved = tmp_path / "run" / "forgetting_config.yaml"
    config = yaml.safe_load(saved.read_text())
    del config["train"]["log_with"], config["train"]["tracker_project"]
    saved.write_text(yaml.safe_dump(config | {"train": config["train"] | {"tensorboard": True}}))
    capsys.readouterr()
    train(job)  # the same run: trackers do not change results
    assert "already holds the finished run" in capsys.readouterr().out


def test_a_continual_unit_is_one_run_whose_steps_go_on_over_its_stages(tmp_path, mlflow_template, monkeypatch):
    go_offline(tmp_path / "trackers", monkeypatch, mlflow_template)
    stages = [
        {"name": "records", "data": {"path": "builtin"}, "target_task": "forgetting_target"},
        {"name": "units", "data": {"path": "builtin:units"}, "target_task": "forgetting_target_units"},
    ]
    config = {
        "name": "seq",
        "model": {"name_or_path": "tiny-random"},
        "data": {"path": "builtin", "max_seq_len": 96, "limit": 8},
        "train": {"max_steps": 2, "batch_size": 4, "progress": False, "log_with": ["wandb", "tensorboard"]},
        "eval": {"tasks": ["forgetting_target", "forgetting_target_units"], "limit": 2, "batch_size": 8},
        "stages": stages,
        "output_dir": str(tmp_path / "run"),
    }
    path = write(tmp_path, "seq.yaml", config)
    assert main(["run", str(path)]) == 0
    (unit,) = units(load_experiment(str(path)))
    first, second = (metrics(Path(job.output_dir))[0] for job in unit.stage_jobs)
    expected = [(r["step"], r["loss"]) for r in first] + [(r["step"] + 2, r["loss"]) for r in second]
    run_dir = tmp_path / "run"
    assert same_series(tensorboard_scalars(run_dir / "tensorboard" / unit.id, "train/loss"), expected, rel=1e-6)
    runs = wandb_runs(run_dir)
    assert sorted(runs) == [unit.id, "report"]
    logged = [(row["_step"], row["train/loss"]) for row in runs[unit.id]["history"] if "train/loss" in row]
    assert same_series(logged, expected)
    assert sorted(runs[unit.id]["config"]["stages"]) == ["records", "units"]


def test_an_interrupted_job_finishes_its_runs_and_the_resumed_run_has_every_step(
    tmp_path, mlflow_template, monkeypatch
):
    calls, real_loss_step = [], train_module.loss_step

    def crash_on_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss_step(*args, **kwargs)

    project = go_offline(tmp_path / "trackers", monkeypatch, mlflow_template)
    job = tiny_job(
        tmp_path,
        "train.log_with=[wandb,mlflow]",
        f"train.tracker_project={project}",
        "train.max_steps=3",
        "train.save_every=2",
    )
    monkeypatch.setattr(train_module, "loss_step", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        train(job)
    monkeypatch.setattr(train_module, "loss_step", real_loss_step)
    train(job)
    records, _ = metrics(tmp_path / "run")
    first, second = [wandb_run(Path(d)) for d in sorted(glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*")))]
    assert first["exit_code"] != 0 and second["exit_code"] == 0  # the interrupted run was finished, as failed
    assert [row["_step"] for row in first["history"] if "train/loss" in row] == [1, 2]
    logged = [(row["_step"], row["train/loss"]) for row in second["history"] if "train/loss" in row]
    assert same_series(logged, [(r["step"], r["loss"]) for r in records])
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(project).experiment_id], order_by=["start_time"])
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    history = client.get_metric_history(runs[1].info.run_id, "train/loss")
    assert same_series([(m.step, m.value) for m in history], [(r["step"], r["loss"]) for r in records])


def test_a_second_report_replaces_the_mlflow_table(tmp_path, mlflow_template, monkeypatch):
    from mlflow.tracking import MlflowClient

    project = go_offline(tmp_path / "trackers", monkeypatch, mlflow_template)
    parent = mlflow_parent(tmp_path, project, "exp")
    csv = write(tmp_path, "results.csv", "a,b\n1,2\n")
    place = Place("report", "exp", tmp_path, tmp_path / "tensorboard" / "report", mlflow_parent=parent)
    for rows in ([{"strategy": "naive", "forgetting": 0.5}], [{"strategy": "naive", "forgetting": 0.25}]):
        with Trackers(["mlflow"], project, place, {"name": "exp"}) as trackers:
            log_report(trackers, pd.DataFrame(rows), [csv])
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(project).experiment_id
    table = client.load_table(experiment_id, "forgetting_table.json", run_ids=[parent])
    pd.testing.assert_frame_equal(table, pd.DataFrame([{"strategy": "naive", "forgetting": 0.25}]))
    assert client.get_run(parent).data.metrics["results/naive/forgetting"] == 0.25
