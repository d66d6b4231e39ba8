"""The package as users get it: one `forgetting` namespace (no generic top-level names such as `harness` or
`evals`), a wheel that installs into a fresh virtual environment and runs, and the Python API (`forgetting.train`,
`evaluate`, `run_experiment`, `gate`) giving what the commands give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

import forgetting
from forgetting.harness.cli import main
from forgetting.harness.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["forgetting_knowledge", "forgetting_target"]

IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys
import forgetting
names = [m.name for m in pkgutil.walk_packages(forgetting.__path__, "forgetting.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"file": forgetting.__file__, "modules": names, "api": [callable(getattr(forgetting, n))
      for n in ("train", "evaluate", "run_experiment", "gate")]}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(folder), str(ROOT)]
    built = subprocess.run(command, capture_output=True, text=True, cwd=folder, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = folder.glob("sft_forgetting-*.whl")
    return path


def test_the_wheel_installs_only_the_forgetting_namespace_with_its_task_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"forgetting", wheel.name.split("-py3")[0] + ".dist-info"}
    for part in ("harness/cli.py", "harness/api.py", "mitigations/ewc.py", "evals/runner.py", "reports/gate.py"):
        assert f"forgetting/{part}" in names
    assert "forgetting/evals/tasks/forgetting_knowledge.yaml" in names
    assert "forgetting/evals/hub_tasks/forgetting_standard.yaml" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/entry_points.txt").decode()
    assert "forgetting = forgetting.harness.cli:entry" in entry_points


def test_the_wheel_in_a_fresh_venv_imports_every_module_and_runs_the_command(wheel, tmp_path):
    """A fresh venv with only the wheel installed (its dependencies reached through a .pth to this environment's
    site-packages, so nothing is downloaded); run from a folder outside the checkout, so nothing comes from it."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    purelib = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # only now: with this environment's site-packages visible, pip would find the package there and skip it
    (purelib / "dependencies.pth").write_text(
        "\n".join(dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])) + "\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    imported = subprocess.run(
        [python, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    found = json.loads(imported.stdout.splitlines()[-1])
    assert Path(found["file"]).is_relative_to(purelib)  # the wheel's copy, not a checkout's
    assert "forgetting.harness.train" in found["modules"] and "forgetting.reports.writer" in found["modules"]
    assert found["api"] == [True] * 4
    for generic in ("harness", "evals", "reports", "mitigations"):
        assert not (purelib / generic).exists()
    helped = subprocess.run([env_dir / "bin" / "forgetting", "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: forgetting"), helped.stderr[-2000:]
    as_module = subprocess.run([python, "-m", "forgetting", "--help"], capture_output=True, text=True, env=env)
    assert as_module.returncode == 0 and as_module.stdout == helped.stdout


def test_importing_a_low_layer_does_not_load_the_api_or_torch():
    code = (
        "import sys, forgetting.harness.errors; print('torch' in sys.modules, 'forgetting.harness.api' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.split() == ["False", "False"], result.stderr[-2000:]


def test_the_api_trains_evaluates_and_gates_like_the_commands(tmp_path):
    job = {
        "model": {"name_or_path": "tiny-random"},
        "data": {"path": "builtin", "max_seq_len": 96, "limit": 16},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1.0e-3, "progress": False},
        "output_dir": str(tmp_path / "train"),
    }
    result = forgetting.train(job, ["train.lr=2e-3"])
    assert result.steps == 2 and (result.final_dir / "model.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "train" / "forgetting_config.yaml").read_text())["train"]["lr"] == 2e-3

    settings = {"tasks": TASKS, "limit": 4, "batch_size": 4}
    scores = forgetting.evaluate(result.final_dir, settings=settings, cache=False)
    command = ["eval", str(result.final_dir), "--tasks", ",".join(TASKS), "--limit", "4", "--batch-size", "4"]
    assert main([*command, "--no-cache", "--output", str(tmp_path / "eval.json")]) == 0
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert scores["results"] == saved["results"]

    same = forgetting.gate(result.final_dir, tmp_path / "eval.json", cache=False)
    assert same.passed and {check.task for check in same.checks} == set(TASKS)
    assert same.results["results"] == saved["results"]
    other = forgetting.gate("tiny-random", tmp_path / "eval.json", {"test": "threshold", "default": {"max_drop": 0}})
    assert [c.status != "pass" for c in other.checks] == [c.candidate < c.baseline for c in other.checks]
    assert other.passed == all(c.candidate >= c.baseline for c in other.checks)


def test_run_experiment_from_a_dict_writes_the_run_and_bad_configs_raise_one_line(tmp_path):
    experiment = {
        "name": "api",
        "model": {"name_or_path": "tiny-random"},
        "data": {"path": "builtin", "max_seq_len": 96, "limit": 16},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1.0e-3, "progress": False},
        "eval": {"tasks": TASKS, "limit": 3, "batch_size": 8},
        "strategies": [{"name": "naive"}, {"name": "lora", "mitigations": [{"name": "lora", "r": 4}]}],
        "seeds": [0],
        "output_dir": str(tmp_path / "run"),
    }
    run_dir = forgetting.run_experiment(experiment)
    assert run_dir == tmp_path / "run"
    assert set(pd.read_csv(run_dir / "results.csv")["strategy"]) == {"base", "naive", "lora"}
    assert (run_dir / "reports" / "forgetting.md").is_file()
    with pytest.raises(UserError, match="unknown mitigation 'magic'") as err:
        forgetting.run_experiment(dict(experiment, strategies=[{"name": "x", "mitigations": [{"name": "magic"}]}]))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="a dict runs with the local launcher only"):
        forgetting.run_experiment(experiment, launcher="ray")
    with pytest.raises(UserError, match="expected a YAML path, a dict or a TrainJob, got int"):
        forgetting.train(3)
