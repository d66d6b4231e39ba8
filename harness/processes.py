"""The process group's environment under `srun`: Slurm's task variables as torch.distributed's.

`torchrun` and `accelerate launch` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each
process they start; `srun --ntasks N python -m forgetting train ...` starts the N processes itself and sets only
SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS and the node list. `adopt_slurm_tasks` fills in the torch
names from those, so the same command runs under all three launchers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import PartialState


def adopt_slurm_tasks(environ: dict | None = None) -> bool:
    """Set torch.distributed's variables from srun's, inside a multi-task srun step that no other launcher set up;
    returns whether it did. MASTER_ADDR is the step's first node, MASTER_PORT a port derived from the job id."""
    env = os.environ if environ is None else environ
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if tasks < 2 or "RANK" in env or "SLURM_PROCID" not in env:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(tasks)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", first_node(env))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    return True


def first_node(env) -> str:
    """The first host of the step's node list (`scontrol show hostnames` expands its ranges); one node: local."""
    if int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")) or 1) == 1:
        return "127.0.0.1"
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    if shutil.which("scontrol") is None:
        raise RuntimeError("srun across nodes: scontrol is needed to read the node list; set MASTER_ADDR")
    names = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
    return names.stdout.split()[0]


def accelerator_present() -> bool:
    """Whether a GPU (or another accelerator torch drives) is here; without one, processes talk over gloo."""
    return (
        torch.cuda.is_available()
        or torch.backends.mps.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
    )


def launched_processes(environ: dict | None = None) -> int:
    """How many processes torchrun, accelerate launch or a multi-task srun step started for this command."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    return int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) if "SLURM_PROCID" in env else 1


class Team:
    """The processes of one launch. `main` (rank 0) alone evaluates and writes the run directory; `agree` hands
    its decisions to the others. One process: a team of one, no process group."""

    # the others wait in `agree` while the main process evaluates a unit: allow a long suite on a large model
    WAIT = timedelta(hours=24)

    def __init__(self):
        self.size = launched_processes()
        if self.size > 1:
            adopt_slurm_tasks()
            state = PartialState(cpu=not accelerator_present(), timeout=self.WAIT)
            self.main = state.is_main_process
        else:
            self.main = True

    def agree(self, decide, *args):
        """`decide(*args)`'s value on the main process, handed to every process (they do not call it)."""
        value = [decide(*args) if self.main else None]
        if self.size > 1:
            dist.broadcast_object_list(value, src=0)
        return value[0]
