"""A real one-node Slurm cluster for the tests: munge, slurmctld and slurmd from Debian's packages, on this host.

`start(directory)` installs the packages when they are missing (apt-get, as root), starts munged if it does
not answer, writes a slurm.conf in `directory` (one node with this host's CPUs in one default partition, job
state and logs in `directory`) and starts slurmctld and slurmd on it; it returns the environment a client
needs (SLURM_CONF) once `sinfo` sees the node idle. `stop()` stops the two Slurm daemons it started. A machine
where this cannot be done gets `Unavailable` with the reason, which the tests turn into a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("slurmctld", "slurmd", "srun", "sbatch", "munged")


class Unavailable(RuntimeError):
    """Slurm cannot run here; the message says why."""


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=kwargs.pop("timeout", 120), **kwargs)


def install() -> None:
    """The Slurm and munge packages, unless installed."""
    if all(shutil.which(name) for name in DAEMONS):
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise Unavailable("Slurm is not installed and apt-get (as root) is not available to install it")
    done = _run("apt-get", "install", "-y", "-qq", *PACKAGES, timeout=900)
    if done.returncode != 0:
        done = _run("sh", "-c", f"apt-get update -qq && apt-get install -y -qq {' '.join(PACKAGES)}", timeout=900)
    if done.returncode != 0:
        raise Unavailable(f"apt-get could not install {' '.join(PACKAGES)}: {done.stderr.strip()[-300:]}")


def start_munge() -> None:
    """munged as the munge user, with a key (written once if the package did not), unless it answers already."""
    if _run("sh", "-c", "munge -n | unmunge").returncode == 0:
        return
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
    for path in (key.parent, Path("/run/munge"), Path("/var/log/munge"), Path("/var/lib/munge")):
        path.mkdir(parents=True, exist_ok=True)
        shutil.chown(path, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    done = _run("runuser", "-u", "munge", "--", "munged", "--force")
    if done.returncode != 0:
        raise Unavailable(f"munged did not start: {done.stderr.strip()[-300:]}")


def write_config(directory: Path) -> Path:
    host = socket.gethostname()
    cpus = os.cpu_count() or 1
    for sub in ("state", "spool"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    config = directory / "slurm.conf"
    config.write_text(
        "\n".join(
            [
                "ClusterName=forgetting-tests",
                f"SlurmctldHost={host}",
                "SlurmUser=root",
                "AuthType=auth/munge",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                "JobRequeue=1",
                "KillWait=30",
                "MinJobAge=300",
                f"StateSaveLocation={directory / 'state'}",
                f"SlurmdSpoolDir={directory / 'spool'}",
                f"SlurmctldPidFile={directory / 'slurmctld.pid'}",
                f"SlurmdPidFile={directory / 'slurmd.pid'}",
                f"SlurmctldLogFile={directory / 'slurmctld.log'}",
                f"SlurmdLogFile={directory / 'slurmd.log'}",
                f"NodeName={host} CPUs={cpus} State=UNKNOWN",
                f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    return config


class Cluster:
    """The daemons of one test session's cluster."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.env: dict[str, str] = {}

    def start(self) -> dict[str, str]:
        install()
        start_munge()
        config = write_config(self.directory)
        self.env = {"SLURM_CONF": str(config)}
        env = dict(os.environ, **self.env)
        for daemon in ("slurmctld", "slurmd"):
            done = _run(daemon, "-f", str(config), env=env)  # each forks into the background
            if done.returncode != 0:
                self.stop()
                raise Unavailable(f"{daemon} did not start: {(done.stderr or done.stdout).strip()[-300:]}")
        self._wait_for_idle_node(env)
        return self.env

    def _wait_for_idle_node(self, env: dict) -> None:
        state = ""
        for _ in range(60):
            state = _run("sinfo", "-h", "-o", "%T", env=env).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(1)
        log = (
            (self.directory / "slurmctld.log").read_text()[-500:] if (self.directory / "slurmctld.log").exists() else ""
        )
        self.stop()
        raise Unavailable(f"the Slurm node did not become idle (sinfo: {state!r}); slurmctld log: {log}")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            pid_file = self.directory / f"{name}.pid"
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text().strip()), 15)
                except (ValueError, ProcessLookupError):
                    pass
