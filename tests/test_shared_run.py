"""A run directory shared by several `forgetting run` processes: each unit claimed by one (a file lock), the
report built from the units' records, `forgetting status` from the records alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from forgetting.harness.cli import main
from forgetting.harness.configlib import to_dict
from forgetting.harness.experiment import Experiment, load_experiment
from forgetting.harness.job import comparable, load_job
from forgetting.harness.records import Records
from tests.helpers import write
from tests.test_experiment import experiment


def _start(path, log):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "forgetting", "run", str(path)], stdout=out, stderr=out, env=env)


@pytest.mark.slow
def test_two_processes_on_one_directory_train_each_unit_once(tmp_path):
    """Two `forgetting run` processes started together: every unit trained exactly once, the report written, and
    the results those of one process alone."""
    strategies = [{"name": "naive"}, {"name": "lora", "mitigations": [{"name": "lora", "r": 4}]}]
    shared = experiment(tmp_path, strategies=strategies, seeds=[0, 1], output_dir=str(tmp_path / "shared"))
    alone = dict(shared, output_dir=str(tmp_path / "alone"))
    processes = [_start(write(tmp_path, "shared.yaml", shared), tmp_path / f"p{i}.log") for i in (0, 1)]
    single = _start(write(tmp_path, "alone.yaml", alone), tmp_path / "alone.log")
    codes = [p.wait(timeout=900) for p in [*processes, single]]
    logs = [(tmp_path / f"{name}.log").read_text() for name in ("p0", "p1", "alone")]
    assert codes == [0, 0, 0], "\n".join(log[-1500:] for log in logs)
    run = tmp_path / "shared"
    unit_ids = ["naive__seed0", "naive__seed1", "lora__seed0", "lora__seed1"]
    for unit in unit_ids:
        assert (run / "units" / unit / "log.txt").read_text().count("\ndata: ") == 1, unit  # one training start
        assert json.loads((run / "units" / unit / "status.json").read_text())["status"] == "done"
    assert sum(log.count("\ndata: ") for log in logs[:2]) == 4  # between the two processes, each unit once
    assert (run / "results.csv").read_text().replace("shared", "alone") == (
        tmp_path / "alone" / "results.csv"
    ).read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert sorted(manifest["units"]) == sorted(["base", *unit_ids])
    assert [e["model"] for e in manifest["evaluations"]].count("base") == 1  # the base evaluated once


def test_a_held_unit_is_left_to_its_holder_and_a_dead_holders_unit_is_taken(tmp_path):
    run = tmp_path / "run"
    first, second = Records(run), Records(run)
    assert first.claim("naive__seed0")
    record = second.read("naive__seed0")
    assert record["status"] == "running" and record["pid"] == os.getpid()
    assert second.running_elsewhere("naive__seed0")
    first.update("naive__seed0", step=3)
    first.release("naive__seed0")  # as the OS does when the holder dies: the record still says running
    assert not second.running_elsewhere("naive__seed0")
    assert second.claim("naive__seed0") and second.read("naive__seed0")["status"] == "running"
    second.release("naive__seed0")


def test_a_record_cut_short_reads_as_none(tmp_path):
    (tmp_path / "units" / "u").mkdir(parents=True)
    (tmp_path / "units" / "u" / "status.json").write_text('{"status": "do')
    assert Records(tmp_path).read("u") is None


def test_status_shows_each_units_state_place_step_and_loss(tmp_path, capsys):
    strategies = [{"name": "naive"}, {"name": "lora", "mitigations": [{"name": "lora", "r": 4}]}]
    exp = load_experiment(write(tmp_path, "exp.yaml", experiment(tmp_path, strategies=strategies)), [])
    run = tmp_path / "run"
    run.mkdir()
    (run / "experiment.yaml").write_text(yaml.safe_dump(to_dict(exp), sort_keys=False))
    worker = Records(run)
    assert worker.claim("base")
    worker.update("base", status="done")
    worker.release("base")
    assert worker.claim("naive__seed0")
    worker.update("naive__seed0", step=1, steps=2, loss=10.5)
    assert worker.claim("lora__seed0")
    worker.release("lora__seed0")  # its process died
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert lines["base"].split()[1] == "done"
    assert lines["naive__seed0"].split()[1:4] == ["running", "1/2", "10.5000"]
    assert f"pid {os.getpid()}" in lines["naive__seed0"]
    assert lines["lora__seed0"].split()[1] == "interrupted"
    assert out.splitlines()[-1] == "3 units: 1 done, 1 running, 1 interrupted"
    worker.release("naive__seed0")


def test_status_of_a_directory_that_is_no_run_is_one_line(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


@pytest.mark.slow
def test_units_run_one_at_a_time_and_the_last_writes_the_report(tmp_path, capsys):
    """`forgetting run EXP --unit ID`, the entry point a scheduler's job calls."""
    strategies = [{"name": "naive"}, {"name": "lora", "mitigations": [{"name": "lora", "r": 4}]}]
    path = write(tmp_path, "exp.yaml", experiment(tmp_path, strategies=strategies))
    assert main(["run", str(path), "--unit", "nope"]) == 2
    assert "--unit nope: not a unit of tiny; valid: base, naive__seed0, lora__seed0" in capsys.readouterr().err
    run = tmp_path / "run"
    for unit, left in (("lora__seed0", 2), ("base", 1)):
        assert main(["run", str(path), "--unit", unit]) == 0
        assert f"{left} unit(s) not finished" in capsys.readouterr().out and not (run / "results.csv").exists()
    assert main(["run", str(path), "--unit", "naive__seed0"]) == 0
    assert (run / "results.csv").is_file() and (run / "reports" / "report.html").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert {k: r["status"] for k, r in manifest["units"].items()} == dict.fromkeys(
        ["base", "naive__seed0", "lora__seed0"], "done"
    )


def test_knobs_that_do_not_change_results_do_not_block_a_resume(tmp_path):
    job = to_dict(load_job(None, []))
    assert comparable(dict(job, train=dict(job["train"], memory_check=False, progress=False))) == comparable(job)
    assert comparable(dict(job, train=dict(job["train"], lr=1e-3))) != comparable(job)
    exp = to_dict(load_experiment(write(tmp_path, "exp.yaml", experiment(tmp_path)), []))
    more = dict(exp, resources={"default": {"cpus": 2}})
    assert comparable(more, Experiment) == comparable(exp, Experiment)
