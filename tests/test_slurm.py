"""`forgetting run --launcher slurm` on a real one-node Slurm cluster (Debian's slurmctld, slurmd and munge,
started by `slurm_env`): the local launcher's results and weights, a unit spread over 2 Slurm tasks, and units
stopped by `scontrol requeue` (SIGTERM) or by the time-limit signal (USR2, submitit's requeue) that resume and
end with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from forgetting.harness.cli import main
from tests.helpers import write
from tests.slurm_cluster import Cluster, Unavailable
from tests.test_experiment import experiment

pytestmark = pytest.mark.slow

STRATEGIES = [
    {"name": "lora", "mitigations": [{"name": "lora", "r": 4}]},
    {"name": "low", "sweep": {"train.lr": [1.0e-3, 5.0e-4]}},
]


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install '.[slurm]')")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        env = cluster.start()
    except Unavailable as why:
        pytest.skip(f"no Slurm cluster: {why}")
    yield env
    cluster.stop()


def _start(tmp_path: Path, name: str, config: dict, env_extra: dict, *flags: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", **env_extra)
    command = [sys.executable, "-m", "forgetting", "run", str(write(tmp_path, f"{name}.yaml", config)), *flags]
    with open(tmp_path / f"{name}.log", "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=log, env=env, cwd=tmp_path)


def _finish(tmp_path: Path, name: str, process: subprocess.Popen) -> str:
    code = process.wait(timeout=900)
    log = (tmp_path / f"{name}.log").read_text()
    assert code == 0, log[-3000:]
    return log


def _fingerprint(run: Path, unit: str) -> str:
    return json.loads((run / "units" / unit / "eval.json").read_text())["forgetting"]["weights_fingerprint"]


def test_the_slurm_launcher_gives_the_local_launchers_results_and_weights(tmp_path, slurm_env):
    """6 units (2 strategies, one swept over 2 learning rates, 2 seeds) + the base evaluation as Slurm jobs and
    a report job: the same results.csv and every unit's weights as `--launcher local`."""
    runs = {}
    for name, flags in (("by_slurm", ("--launcher", "slurm")), ("by_local", ())):
        config = experiment(tmp_path, strategies=STRATEGIES, seeds=[0, 1], output_dir=str(tmp_path / name))
        runs[name] = _start(tmp_path, name, config, slurm_env, *flags)
    logs = {name: _finish(tmp_path, name, process) for name, process in runs.items()}
    assert "submitted 7 Slurm jobs" in logs["by_slurm"] and "; 7/7)" in logs["by_slurm"]
    assert "reports:" in logs["by_slurm"]
    slurm_run, local_run = tmp_path / "by_slurm", tmp_path / "by_local"
    assert (slurm_run / "results.csv").read_text().replace("by_slurm", "by_local") == (
        local_run / "results.csv"
    ).read_text()
    unit_ids = sorted(p.name for p in (local_run / "units").iterdir())
    assert len(unit_ids) == 6 and sorted(p.name for p in (slurm_run / "units").iterdir()) == unit_ids
    assert [_fingerprint(slurm_run, u) for u in unit_ids] == [_fingerprint(local_run, u) for u in unit_ids]
    records = [json.loads((slurm_run / "units" / u / "status.json").read_text()) for u in unit_ids]
    assert all(r["status"] == "done" and r["slurm_job"] for r in records)
    assert len({r["slurm_job"] for r in records}) == 6  # one job per unit


def test_a_unit_over_two_slurm_tasks_is_one_process_group(tmp_path, slurm_env):
    """`resources: {processes: 2}`: the unit's job has 2 Slurm tasks that train it together (gloo); the first
    alone evaluates (one evaluation in the record) and the results are the single process's."""
    lora = {"name": "lora", "mitigations": [{"name": "lora", "r": 4, "dropout": 0.0}]}  # dropout: per process
    config = experiment(tmp_path, strategies=[lora], output_dir=str(tmp_path / "two_tasks"))
    config["resources"] = {"lora": {"processes": 2}}
    _finish(tmp_path, "two_tasks", _start(tmp_path, "two_tasks", config, slurm_env, "--launcher", "slurm"))
    assert main(["run", str(tmp_path / "two_tasks.yaml"), f"output_dir={tmp_path / 'one'}"]) == 0
    record = json.loads((tmp_path / "two_tasks" / "units" / "lora__seed0" / "status.json").read_text())
    assert [e["model"] for e in record["evaluations"]] == ["lora__seed0/final"]
    log = (tmp_path / "two_tasks" / "units" / "lora__seed0" / "train" / "metrics.jsonl").read_text()
    assert log  # trained
    two = pd.read_csv(tmp_path / "two_tasks" / "results.csv").drop(columns=["run"], errors="ignore")
    one = pd.read_csv(tmp_path / "one" / "results.csv").drop(columns=["run"], errors="ignore")
    pd.testing.assert_frame_equal(two, one, check_exact=False, atol=1e-6)


def _wait_for_training(run: Path, unit: str, timeout: float = 300) -> str:
    """The Slurm job id of `unit` once its record says it has taken a training step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record = json.loads((run / "units" / unit / "status.json").read_text())
        except (OSError, ValueError):
            record = {}
        if record.get("status") == "running" and record.get("step", 0) >= 1:
            return record["slurm_job"]
        time.sleep(0.05)
    raise AssertionError(f"{unit} did not start training within {timeout} s")


def _start_requeued_now(jobs: list[str], driver: subprocess.Popen, env: dict) -> None:
    """Slurm holds a requeued job back for a while (reason BeginTime); let the jobs start at once instead."""
    waiting = set(jobs)
    while waiting and driver.poll() is None:
        for job in list(waiting):
            state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=env, capture_output=True, text=True)
            if state.stdout.split()[:2] == ["PENDING", "BeginTime"]:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, timeout=60)
                waiting.discard(job)
        time.sleep(0.5)


def test_preempted_units_are_requeued_and_end_with_uninterrupted_weights(tmp_path, slurm_env):
    """One unit stopped by `scontrol requeue` (Slurm sends SIGTERM, then requeues it), one by the time-limit
    signal (USR2: the unit saves, submitit requeues): both resume from their checkpoints in the requeued job
    and end with the weights of the same units run without interruption."""
    strategies = [{"name": "naive"}, {"name": "low", "overrides": {"train.lr": 5.0e-4}}]
    train = {"max_steps": 300, "batch_size": 4, "lr": 1.0e-3, "progress": False, "save_every": 0}
    config = experiment(tmp_path, strategies=strategies, train=train, output_dir=str(tmp_path / "preempted"))
    run = tmp_path / "preempted"
    driver = _start(tmp_path, "preempted", config, slurm_env, "--launcher", "slurm")
    env = dict(os.environ, **slurm_env)
    jobs = []
    for unit, command in (("naive__seed0", ["scontrol", "requeue"]), ("low__seed0", ["scancel", "--signal=USR2"])):
        jobs.append(_wait_for_training(run, unit))
        subprocess.run([*command, jobs[-1]], env=env, check=True, capture_output=True, timeout=60)
    _start_requeued_now(jobs, driver, env)
    _finish(tmp_path, "preempted", driver)
    # the uninterrupted run in a process with the jobs' environment (one thread: the same float reductions)
    config["output_dir"] = str(tmp_path / "straight")
    _finish(tmp_path, "straight", _start(tmp_path, "straight", config, {}))
    job_logs = "".join(path.read_text() for path in (run / "slurm").rglob("*_log.err"))  # submitit's, per job
    for unit, signal_name, job in (("naive__seed0", "SIGTERM", jobs[0]), ("low__seed0", "SIGUSR2", jobs[1])):
        assert f"stopped on {signal_name} after step" in job_logs and f"{unit}/train;" in job_logs, job_logs[-3000:]
        assert "resuming from" in (run / "units" / unit / "log.txt").read_text()
        record = json.loads((run / "units" / unit / "status.json").read_text())
        assert (record["status"], record["slurm_job"]) == ("done", job)  # finished by the same job, requeued
        assert _fingerprint(run, unit) == _fingerprint(tmp_path / "straight", unit)
