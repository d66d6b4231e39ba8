"""How `forgetting run --launcher NAME` carries out an experiment's plan: the base evaluation and every unit (a
training job followed by its evaluations), then the report, which needs them all.

    local   (the default) this process works through the plan itself: `harness.pipeline.run_experiment`
    ray     the base evaluation and each unit is a Ray task (the units do not depend on the base evaluation, so
            all run concurrently) that runs `python -m harness run EXP --unit ID` in a fresh process, with the
            cpus and gpus the experiment's `resources:` gives the unit's strategy; the driver then writes the report.
            `RAY_ADDRESS` set: that cluster; unset: a local one (`--ray-cpus N`: its size)

A launcher is a function `(Experiment, Launch) -> (run directory when the report was written, exit code)`,
registered by name in `LAUNCHERS`; another engine (Slurm through submitit) is added the same way. The run
directory's per-unit records (harness/records.py) make any mix of processes safe and every launcher resumable: a
done unit is skipped, an interrupted one continues from its checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from harness.errors import UserError
from harness.experiment import Experiment, units
from harness.pipeline import finish_run, run_experiment
from harness.records import Records

# the exit code of a task whose process crashed (a unit that fails, e.g. a non-finite loss, is only in the report)
CRASHED = 1


@dataclass(frozen=True)
class Launch:
    """What the command line asked for besides the experiment: how a unit's own process rebuilds the experiment
    (the config file, its overrides, --quick), which units (`only`; None: all), and launcher options."""

    config: str
    overrides: tuple[str, ...] = ()
    quick: bool = False
    only: tuple[str, ...] | None = None
    ray_cpus: int | None = None

    def unit_args(self, key: str) -> list[str]:
        """`forgetting run` arguments that run unit `key` alone (the config path made absolute)."""
        quick = ["--quick"] if self.quick else []
        return ["run", os.path.abspath(self.config), *self.overrides, *quick, "--unit", key]


def launch_local(exp: Experiment, launch: Launch) -> tuple[Path | None, int]:
    """Today's behaviour: this process runs the units in order (skipping those other processes hold)."""
    return run_experiment(exp, only=list(launch.only) if launch.only is not None else None), 0


def plan(exp: Experiment, only: tuple[str, ...] | None) -> dict[str, dict]:
    """The work to launch: `base` and each unit id (those of `only`) -> the cpus and gpus its task asks for."""
    work = {"base": unit_resources(exp, None)} | {u.id: unit_resources(exp, u.family) for u in units(exp)}
    unknown = sorted(set(only or ()) - set(work))
    if unknown:
        raise UserError(f"--unit {unknown[0]}: not a unit of {exp.name}; valid: {', '.join(work)}")
    return {key: asks for key, asks in work.items() if only is None or key in only}


def unit_resources(exp: Experiment, strategy: str | None) -> dict:
    """cpus and gpus of one unit's task: 1 and 0, then `resources.default`, then its strategy's own (None: the
    base evaluation, which takes the defaults)."""
    return {"cpus": 1, "gpus": 0} | exp.resources.get("default", {}) | exp.resources.get(strategy, {})


def run_in_process(args: list[str], cwd: str) -> tuple[int, str]:
    """`python -m harness ARGS` in a fresh process (its own memory and torch state; room for torchrun later), in
    the driver's directory (relative paths in the config); its exit code and the end of its output."""
    done = subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True)
    return done.returncode, (done.stdout + done.stderr)[-3000:]


def launch_ray(exp: Experiment, launch: Launch) -> tuple[Path | None, int]:
    """Every unit of the plan as a Ray task, then the report (when all are done or failed)."""
    # the one deferred import: ray is an optional extra (`pip install .[ray]`), needed only by this launcher
    try:
        import ray
    except ImportError:
        raise UserError("--launcher ray: ray is not installed; pip install 'sft-forgetting[ray]'") from None
    work = plan(exp, launch.only)
    address = os.environ.get("RAY_ADDRESS")
    if address and launch.ray_cpus is not None:
        raise UserError(f"--ray-cpus: only for a local cluster; RAY_ADDRESS is set ({address})")
    local = {} if address else {"num_cpus": launch.ray_cpus, "include_dashboard": False}
    ray.init(address=address, log_to_driver=False, **local)
    try:
        if not address:  # a local cluster cannot grow: a task asking for more than it has would wait forever
            _refuse_oversized(work, ray.cluster_resources())
        crashed = _run_tasks(ray, launch, work)
    finally:
        ray.shutdown()
    run_dir = Path(exp.output_dir)
    return finish_run(run_dir, Records(run_dir), ["base", *(u.id for u in units(exp))]), CRASHED if crashed else 0


def _refuse_oversized(work: dict[str, dict], cluster: dict) -> None:
    for key, asks in work.items():
        for name, ray_name in (("cpus", "CPU"), ("gpus", "GPU")):
            if asks[name] > cluster.get(ray_name, 0):
                raise UserError(
                    f"{key}: asks for {asks[name]} {name} (experiment resources:) but the local Ray cluster has "
                    f"{cluster.get(ray_name, 0):g}"
                )


def _run_tasks(ray, launch: Launch, work: dict[str, dict]) -> list[str]:
    """Submit every task, report each as it ends; the keys whose task crashed (a unit that failed is not one)."""
    task = ray.remote(run_in_process)
    cwd = os.getcwd()
    pending = {
        task.options(num_cpus=asks["cpus"], num_gpus=asks["gpus"], max_retries=0, name=key).remote(
            launch.unit_args(key), cwd
        ): key
        for key, asks in work.items()
    }
    crashed = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(ready[0])
        try:
            code, tail = ray.get(ready[0])
        except ray.exceptions.RayError as err:  # the task itself died (its worker or node was lost)
            code, tail = None, str(err)
        if code == 0:
            print(f"{key}: finished ({len(work) - len(pending)}/{len(work)})", flush=True)
            continue
        crashed.append(key)
        why = "its Ray task crashed" if code is None else f"its process exited with {code}"
        print(f"{key}: {why}; the end of its output:\n{tail.rstrip()}", file=sys.stderr, flush=True)
    return crashed


LAUNCHERS: dict[str, Callable[[Experiment, Launch], tuple[Path | None, int]]] = {
    "local": launch_local,
    "ray": launch_ray,
}
