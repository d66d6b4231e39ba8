"""How `forgetting run --launcher NAME` carries out an experiment's plan: the base evaluation and every unit (a
training job followed by its evaluations), then the report, which needs them all.

    local   (the default) this process works through the plan itself: `harness.pipeline.run_experiment`
    ray     the base evaluation and each unit is a Ray task (the units do not depend on the base evaluation, so
            all run concurrently) that runs `python -m forgetting run EXP --unit ID` in a fresh process (under
            `torchrun --standalone` when the unit has several processes), with the cpus and gpus the
            experiment's `resources:` gives the unit's strategy; the driver then writes the report.
            `RAY_ADDRESS` set: that cluster; unset: a local one (`--ray-cpus N`: its size)
    slurm   the driver checks the inputs and opens the run directory, then submits (through submitit) one Slurm
            job per unit and for the base evaluation, with the unit's strategy's resources (its processes as
            Slurm tasks, which form one process group), and a report job that starts after all of them
            (`--dependency=afterany`); it waits for the report job and prints each unit as it ends. Stopping the
            driver leaves the jobs running: the report job writes the report. A unit's job that Slurm signals
            before its time limit or a preemption saves a checkpoint and is requeued; the requeued job resumes.

A launcher is a function `(Experiment, Launch) -> (run directory when the report was written, exit code)`,
registered by name in `LAUNCHERS`. The run directory's per-unit records (harness/records.py) make any mix of
processes safe and every launcher resumable: a done unit is skipped, an interrupted one continues from its
checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from forgetting.harness.errors import Preempted, UserError
from forgetting.harness.experiment import Experiment, units
from forgetting.harness.pipeline import finish_run, prepare_run, run_experiment
from forgetting.harness.records import Records

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
    report: bool = True  # False: leave the report to whoever launched this unit

    def unit_args(self, key: str) -> list[str]:
        """`forgetting run` arguments that run unit `key` alone (the config path made absolute); the launcher
        writes the report once all are done, so the unit's process does not."""
        quick = ["--quick"] if self.quick else []
        return ["run", os.path.abspath(self.config), *self.overrides, *quick, "--unit", key, "--no-report"]


def launch_local(exp: Experiment, launch: Launch) -> tuple[Path | None, int]:
    """Today's behaviour: this process runs the units in order (skipping those other processes hold)."""
    only = list(launch.only) if launch.only is not None else None
    return run_experiment(exp, only=only, report=launch.report), 0


def plan(exp: Experiment, only: tuple[str, ...] | None) -> dict[str, dict]:
    """The work to launch: `base` and each unit id (those of `only`) -> the cpus and gpus its task asks for."""
    work = {"base": unit_resources(exp, None)} | {u.id: unit_resources(exp, u.family) for u in units(exp)}
    unknown = sorted(set(only or ()) - set(work))
    if unknown:
        raise UserError(f"--unit {unknown[0]}: not a unit of {exp.name}; valid: {', '.join(work)}")
    return {key: asks for key, asks in work.items() if only is None or key in only}


def unit_resources(exp: Experiment, strategy: str | None) -> dict:
    """What one unit's job asks for: 1 process with 1 cpu and 0 gpus, then `resources.default`, then its
    strategy's own (None: the base evaluation, which takes the defaults and always 1 process)."""
    asks = {"processes": 1, "cpus": 1, "gpus": 0} | exp.resources.get("default", {})
    if strategy is None:
        return asks | {"processes": 1}
    return asks | exp.resources.get(strategy, {})


def harness_command(args: list[str], processes: int = 1) -> list[str]:
    """`python -m forgetting ARGS`, under `torchrun --standalone` (a free port of this node) for several processes."""
    if processes == 1:
        return [sys.executable, "-m", "forgetting", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*launcher, "-m", "forgetting", *args]


def run_in_process(args: list[str], cwd: str, processes: int = 1) -> tuple[int, str]:
    """`python -m forgetting ARGS` in fresh processes (their own memory and torch state), in the driver's directory
    (relative paths in the config); the exit code and the end of the output."""
    done = subprocess.run(harness_command(args, processes), cwd=cwd, capture_output=True, text=True)
    return done.returncode, (done.stdout + done.stderr)[-3000:]


def launch_ray(exp: Experiment, launch: Launch) -> tuple[Path | None, int]:
    """Every unit of the plan as a Ray task, then the report (when all are done or failed)."""
    # the one deferred import: ray is an optional extra (`pip install .[ray]`), needed only by this launcher
    try:
        import ray
    except ImportError:
        raise UserError("--launcher ray: ray is not installed; pip install 'sft-forgetting[ray]'") from None
    work = plan(exp, launch.only)
    for key, asks in work.items():
        if asks.get("nodes", 1) > 1:
            raise UserError(f"{key}: resources nodes={asks['nodes']}: a Ray task runs on one node (--launcher slurm)")
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
            if asks[name] * asks["processes"] > cluster.get(ray_name, 0):
                raise UserError(
                    f"{key}: asks for {asks[name] * asks['processes']:g} {name} ({asks['processes']} process(es) x "
                    f"{asks[name]:g}, experiment resources:) but the local Ray cluster has {cluster.get(ray_name, 0):g}"
                )


def _run_tasks(ray, launch: Launch, work: dict[str, dict]) -> list[str]:
    """Submit every task, report each as it ends; the keys whose task crashed (a unit that failed is not one)."""
    task = ray.remote(run_in_process)
    cwd = os.getcwd()
    pending = {}
    for key, asks in work.items():
        n = asks["processes"]
        options = {"num_cpus": asks["cpus"] * n, "num_gpus": asks["gpus"] * n, "max_retries": 0, "name": key}
        pending[task.options(**options).remote(launch.unit_args(key), cwd, n)] = key
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


# a unit's job under Slurm when its resources do not say: whole-node jobs of 4 hours
SLURM_DEFAULTS = {"nodes": 1, "time": 240}
# seconds a unit's process gets to save its checkpoint after the time-limit signal (submitit signals 90 s before)
SAVE_GRACE = 80
# seconds between two looks at the unit records while the driver waits for the report job
POLL_SECONDS = 5.0


def launch_slurm(exp: Experiment, launch: Launch) -> tuple[Path | None, int]:
    """One Slurm job per unit of the plan (and the base evaluation), then a report job after all of them."""
    # deferred import: submitit is an optional extra (`pip install .[slurm]`), needed only by this launcher
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher slurm: submitit is not installed; pip install 'sft-forgetting[slurm]'") from None
    if shutil.which("sbatch") is None:
        raise UserError("--launcher slurm: sbatch is not on PATH; run this where Slurm's commands are (a login node)")
    work = {key: slurm_options(key, asks) for key, asks in plan(exp, launch.only).items()}
    run_dir = prepare_run(exp)  # a config or data error now, not in every job
    folder, cwd = run_dir / "slurm" / "%j", os.getcwd()
    jobs = {
        key: _executor(submitit, folder, options).submit(SlurmUnit(launch.unit_args(key), cwd))
        for key, options in work.items()
    }
    keys = ["base", *(u.id for u in units(exp))]
    after = f"afterany:{':'.join(job.job_id for job in jobs.values())}"
    report_options = slurm_options("report", unit_resources(exp, None) | {"gpus": 0}) | {"dependency": after}
    report = _executor(submitit, folder, report_options).submit(write_report_when_done, run_dir, keys)
    print(
        f"submitted {len(jobs)} Slurm jobs ({', '.join(f'{k}={j.job_id}' for k, j in jobs.items())}) and the report "
        f"job {report.job_id}; watch: forgetting status {run_dir} (stopping this command leaves them running)",
        flush=True,
    )
    return _wait_for_slurm(run_dir, jobs, report)


def slurm_options(key: str, asks: dict) -> dict:
    """submitit's SlurmExecutor parameters for a job with these resources (processes as tasks over its nodes)."""
    asks = SLURM_DEFAULTS | asks
    nodes, processes = asks["nodes"], asks["processes"]
    if processes % nodes:
        raise UserError(f"{key}: resources processes={processes} do not split evenly over nodes={nodes}")
    if asks["gpus"] != int(asks["gpus"]):
        raise UserError(f"{key}: resources gpus={asks['gpus']}: Slurm allocates whole GPUs")
    options = {
        "job_name": f"forgetting:{key}",
        "nodes": nodes,
        "ntasks_per_node": processes // nodes,
        "cpus_per_task": max(1, math.ceil(asks["cpus"])),
        "time": asks["time"],
        "signal_delay_s": SAVE_GRACE + 10,
        "additional_parameters": dict(asks.get("slurm", {})),
    }
    if asks["gpus"]:
        options["gpus_per_task"] = int(asks["gpus"])
    return options | {name: asks[name] for name in ("partition", "account") if name in asks}


def _executor(submitit, folder: Path, options: dict):
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**options)
    return executor


def write_report_when_done(run_dir: Path, keys: list[str]) -> str | None:
    """The report job: the report if every unit is done or failed (else it says which are not); its path."""
    written = finish_run(run_dir, Records(run_dir), keys)
    return str(written) if written is not None else None


def _wait_for_slurm(run_dir: Path, jobs: dict, report) -> tuple[Path | None, int]:
    """Print each unit as its record says it ended, until the report job ends; its outcome and an exit code."""
    records, reported = Records(run_dir), set()
    while True:
        ended = report.done()  # looked at before the records, so the last units are printed too
        for key, job in jobs.items():
            status = (records.read(key) or {}).get("status")
            if key not in reported and status in ("done", "failed"):
                reported.add(key)
                print(f"{key}: {status} (Slurm job {job.job_id}; {len(reported)}/{len(jobs)})", flush=True)
        if ended:
            break
        time.sleep(POLL_SECONDS)
    unfinished = [key for key in jobs if key not in reported]
    for key in unfinished:
        tail = (jobs[key].stderr() or "")[-2000:].rstrip()
        print(
            f"{key}: its Slurm job {jobs[key].job_id} ended without finishing it; its log ends:\n{tail}",
            file=sys.stderr,
        )
    try:
        written = report.result()
    except Exception as err:  # submitit raises the report job's own error (or that the job died) as is
        print(f"the report job {report.job_id} failed: {str(err)[-2000:]}", file=sys.stderr)
        return None, CRASHED
    return (Path(written) if written else None), CRASHED if unfinished else 0


# this job's unit process, for the signal handlers (a module global: handlers run outside SlurmUnit's call)
_unit_process: subprocess.Popen | None = None


class SlurmUnit:
    """A unit as a submitit job: `python -m forgetting run EXP --unit ID` in a child process of each of the job's
    tasks (its Slurm variables make the tasks one process group), and checkpointable: on the time-limit or
    preemption signal the child saves a checkpoint and exits, and submitit requeues the job, which resumes."""

    def __init__(self, args: list[str], cwd: str):
        self.args, self.cwd = args, cwd

    def __call__(self) -> str:
        global _unit_process
        _unit_process = subprocess.Popen(harness_command(self.args), cwd=self.cwd)
        # Slurm's SIGTERM before a requeue or preemption: submitit only logs it; the unit must save
        signal.signal(signal.SIGTERM, _pass_on)
        while (code := _unit_process.poll()) is None:
            time.sleep(1)
        if code == Preempted.exit_code:
            raise RuntimeError("the unit saved a checkpoint and stopped on a signal; its requeued job resumes it")
        if code != 0:
            raise RuntimeError(f"`forgetting {' '.join(self.args)}` exited with {code}")
        return "done"

    def checkpoint(self):
        """submitit's hook on the time-limit/preemption signal: let the unit save, then requeue this same unit."""
        # deferred import: only a Slurm job (which has submitit) ever calls this
        from submitit.helpers import DelayedSubmission

        if _unit_process is not None:
            _pass_on(signal.SIGUSR2, None)
            _wait_for_exit(_unit_process.pid, SAVE_GRACE)
        return DelayedSubmission(SlurmUnit(self.args, self.cwd))


def _pass_on(number, frame) -> None:
    if _unit_process is not None and _unit_process.poll() is None:
        _unit_process.send_signal(number)


def _wait_for_exit(pid: int, seconds: float) -> None:
    """Until process `pid` (a child) has exited, without reaping it (Popen may be waiting on it too)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return
        time.sleep(0.5)


LAUNCHERS: dict[str, Callable[[Experiment, Launch], tuple[Path | None, int]]] = {
    "local": launch_local,
    "ray": launch_ray,
    "slurm": launch_slurm,
}
