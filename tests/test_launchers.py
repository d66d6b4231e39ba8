"""`forgetting run --launcher`: the per-strategy `resources:` of an experiment, and the Ray launcher (a local Ray
cluster) producing the very results and weights of the local launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from forgetting.harness import cli
from forgetting.harness.cli import main
from forgetting.harness.errors import UserError
from forgetting.harness.experiment import load_experiment
from forgetting.harness.launchers import LAUNCHERS, SAVE_GRACE, SLURM_DEFAULTS, Launch, plan, slurm_options
from tests.helpers import write
from tests.test_distributed import free_port
from tests.test_experiment import experiment

STRATEGIES = [
    {"name": "lora", "mitigations": [{"name": "lora", "r": 4}]},
    {"name": "low", "sweep": {"train.lr": [1.0e-3, 5.0e-4]}},
]


def test_the_cli_offers_every_launcher():
    assert tuple(LAUNCHERS) == cli.LAUNCHERS


def test_each_unit_asks_for_its_strategys_resources(tmp_path):
    resources = {"default": {"cpus": 2}, "lora": {"gpus": 1}}
    config = experiment(tmp_path, strategies=STRATEGIES, resources=resources)
    work = plan(load_experiment(str(write(tmp_path, "exp.yaml", config))), None)
    assert work["base"] == {"processes": 1, "cpus": 2, "gpus": 0} == work["low__lr-0.001__seed0"]
    assert work["lora__seed0"] == {"processes": 1, "cpus": 2, "gpus": 1}
    assert list(plan(load_experiment(str(write(tmp_path, "exp.yaml", config))), ("lora__seed0",))) == ["lora__seed0"]


@pytest.mark.parametrize(
    "resources, message",
    [
        ({"big": {"cpus": 1}}, "resources.big: not a strategy; expected default or one of lora, low"),
        ({"lora": {"memory": 1}}, "resources.lora.memory: unknown; expected one of cpus, gpus, processes, nodes"),
        ({"lora": {"processes": 0}}, "resources.lora.processes: expected an integer >= 1, got 0"),
        ({"lora": {"time": "1h"}}, "resources.lora.time: expected minutes, an integer >= 1, got '1h'"),
        ({"default": {"partition": ""}}, "resources.default.partition: expected a partition name, got ''"),
        ({"lora": {"gpus": -1}}, "resources.lora.gpus: expected a number >= 0, got -1"),
        ({"default": 2}, "resources.default: expected a mapping like {cpus: 1, gpus: 0}, got 2"),
    ],
)
def test_bad_resources_are_one_line_errors(tmp_path, resources, message):
    path = write(tmp_path, "exp.yaml", experiment(tmp_path, strategies=STRATEGIES, resources=resources))
    with pytest.raises(UserError) as err:
        load_experiment(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_ray_cpus_needs_the_ray_launcher(tmp_path, capsys):
    path = write(tmp_path, "exp.yaml", experiment(tmp_path, strategies=STRATEGIES))
    assert main(["run", str(path), "--ray-cpus", "2"]) == 2
    assert "--ray-cpus: only with --launcher ray" in capsys.readouterr().err


def _ray_processes() -> set[int]:
    """The ids of this machine's Ray daemons and workers."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if entry.name.isdigit() and any(n in command for n in ("raylet", "gcs_server", "default_worker.py")):
            found.add(int(entry.name))
    return found


def _run(tmp_path, name: str, *flags: str) -> subprocess.Popen:
    config = experiment(
        tmp_path, strategies=STRATEGIES, seeds=[0, 1], output_dir=str(tmp_path / name), resources={"lora": {"cpus": 1}}
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)  # a local cluster, started by the launcher
    command = [sys.executable, "-m", "forgetting", "run", str(write(tmp_path, f"{name}.yaml", config)), *flags]
    with open(tmp_path / f"{name}.log", "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=log, env=env, cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts Ray's processes through /proc")
def test_the_ray_launcher_gives_the_local_launchers_results_and_weights(tmp_path):
    """6 units (2 strategies, one swept over 2 learning rates, 2 seeds) + the base evaluation as Ray tasks on a
    local 2-CPU cluster: the same results.csv and every unit's weights as `--launcher local`."""
    pytest.importorskip("ray", reason="ray is not installed (pip install '.[ray]')")
    before = _ray_processes()
    processes = [_run(tmp_path, "by_ray", "--launcher", "ray", "--ray-cpus", "2"), _run(tmp_path, "by_local")]
    codes = [p.wait(timeout=900) for p in processes]
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("by_ray", "by_local")}
    assert codes == [0, 0], "\n".join(log[-2000:] for log in logs.values())
    assert "7/7)" in logs["by_ray"] and "reports:" in logs["by_ray"]
    ray_run, local_run = tmp_path / "by_ray", tmp_path / "by_local"
    assert (ray_run / "results.csv").read_text().replace("by_ray", "by_local") == (
        local_run / "results.csv"
    ).read_text()
    unit_ids = sorted(p.name for p in (local_run / "units").iterdir())
    assert len(unit_ids) == 6 and sorted(p.name for p in (ray_run / "units").iterdir()) == unit_ids

    def fingerprint(run, unit):
        return json.loads((run / "units" / unit / "eval.json").read_text())["forgetting"]["weights_fingerprint"]

    assert [fingerprint(ray_run, u) for u in unit_ids] == [fingerprint(local_run, u) for u in unit_ids]
    manifest = json.loads((ray_run / "manifest.json").read_text())
    assert {r["status"] for r in manifest["units"].values()} == {"done"} and len(manifest["units"]) == 7
    for _ in range(20):  # ray.shutdown() has stopped them; give them a moment to exit
        if not _ray_processes() - before:
            break
        time.sleep(0.5)
    assert not _ray_processes() - before, "Ray processes left running"


@pytest.mark.slow
def test_a_crashed_task_is_reported_per_unit_and_exits_1(tmp_path, capsys, monkeypatch):
    """A unit's process that dies (here: its experiment file is gone) is named with the end of its output; the
    launcher returns exit code 1 and writes no report."""
    pytest.importorskip("ray", reason="ray is not installed (pip install '.[ray]')")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = write(tmp_path, "exp.yaml", experiment(tmp_path, strategies=STRATEGIES))
    exp = load_experiment(str(path))
    path.unlink()
    run_dir, code = LAUNCHERS["ray"](exp, Launch(str(path), only=("base",), ray_cpus=1))
    assert (run_dir, code) == (None, 1)
    err = capsys.readouterr().err
    assert "base: its process exited with 2; the end of its output:" in err and "exp.yaml" in err


@pytest.mark.slow
def test_under_torchrun_one_process_evaluates_and_writes(tmp_path):
    """`forgetting run` started by torchrun with 2 processes: both train each unit (one process group), only the
    first evaluates and writes (one environment entry, one evaluation per model in the records) and the results
    are the single process's."""
    # no adapter dropout: its masks are drawn per process, so 2 processes would draw other ones than 1
    lora = {"name": "lora", "mitigations": [{"name": "lora", "r": 4, "dropout": 0.0}]}
    config = experiment(tmp_path, strategies=[lora, {"name": "naive"}], output_dir=str(tmp_path / "two"))
    path = write(tmp_path, "exp.yaml", config)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    two = subprocess.run(
        [*launch, "-m", "forgetting", "run", str(path)], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert main(["run", str(path), f"output_dir={tmp_path / 'one'}"]) == 0
    for run in ("two", "one"):
        assert len(json.loads((tmp_path / run / "environment.json").read_text())) == 1
        manifest = json.loads((tmp_path / run / "manifest.json").read_text())
        assert [e["model"] for e in manifest["evaluations"]] == ["base", "lora__seed0/final", "naive__seed0/final"]
    assert two.stdout.count("reports:") == 1 and two.stdout.count("[base]") == 1
    by_two = pd.read_csv(tmp_path / "two" / "results.csv").drop(columns=["run"], errors="ignore")
    by_one = pd.read_csv(tmp_path / "one" / "results.csv").drop(columns=["run"], errors="ignore")
    pd.testing.assert_frame_equal(by_two, by_one, check_exact=False, atol=1e-6)


def test_slurm_jobs_ask_for_their_strategys_resources(tmp_path):
    """A unit's resources as submitit's Slurm parameters: processes as tasks per node, cpus and gpus per task,
    time, partition, account and any other sbatch option; the defaults for the rest."""
    resources = {
        "default": {"cpus": 1.5, "time": 30, "partition": "gpu", "account": "lab"},
        "lora": {"processes": 4, "nodes": 2, "gpus": 1, "slurm": {"mem": "64G", "qos": "high"}},
    }
    config = experiment(tmp_path, strategies=STRATEGIES, resources=resources)
    work = plan(load_experiment(str(write(tmp_path, "exp.yaml", config))), None)
    lora = slurm_options("lora__seed0", work["lora__seed0"])
    assert lora == {
        "job_name": "forgetting:lora__seed0",
        "nodes": 2,
        "ntasks_per_node": 2,
        "cpus_per_task": 2,
        "gpus_per_task": 1,
        "time": 30,
        "signal_delay_s": SAVE_GRACE + 10,
        "additional_parameters": {"mem": "64G", "qos": "high"},
        "partition": "gpu",
        "account": "lab",
    }
    base = slurm_options("base", work["base"])
    assert (base["nodes"], base["ntasks_per_node"], base["cpus_per_task"], base["time"]) == (1, 1, 2, 30)
    assert "gpus_per_task" not in base
    assert slurm_options("x", {"processes": 1, "cpus": 1, "gpus": 0})["time"] == SLURM_DEFAULTS["time"]


@pytest.mark.parametrize(
    "asks, message",
    [
        ({"processes": 3, "nodes": 2}, "u: resources processes=3 do not split evenly over nodes=2"),
        ({"gpus": 0.5}, "u: resources gpus=0.5: Slurm allocates whole GPUs"),
    ],
)
def test_slurm_refuses_resources_it_cannot_ask_for(asks, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        slurm_options("u", {"processes": 1, "cpus": 1, "gpus": 0} | asks)


def test_a_launchers_unit_leaves_the_report_to_the_launcher(tmp_path, capsys):
    """The launchers run each unit with --no-report: the process that finishes the last unit does not write the
    report (the launcher does, once); without it, it does."""
    path = write(tmp_path, "exp.yaml", experiment(tmp_path, strategies=[{"name": "naive"}]))
    assert Launch(str(path)).unit_args("base")[-3:] == ["--unit", "base", "--no-report"]
    assert main(["run", str(path), "--no-report"]) == 0
    run = tmp_path / "run"
    assert (run / "units" / "naive__seed0" / "eval.json").is_file() and not (run / "reports").exists()
    assert main(["run", str(path)]) == 0 and (run / "reports" / "report.html").is_file()
    assert main(["run", str(path), "--no-report", "--launcher", "ray"]) == 2
    assert "--no-report: only with --launcher local" in capsys.readouterr().err
