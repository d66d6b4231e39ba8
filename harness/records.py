"""Per-unit status records that many processes share: one writer per unit, claimed with a file lock.

An experiment's run directory may be worked on by several `forgetting run` processes at once (two shells, a
Slurm array, Ray workers), on a shared filesystem. Each unit (and the base evaluation) has

    <run_dir>/<unit>/status.json     its record: state (running, done, failed), where it runs, step, last loss,
                                     its evaluations; written atomically (stage + rename)
    <run_dir>/<unit>/.lock           held (filelock: an OS lock, released when the process dies) by the one
                                     process working on the unit

where <unit> is `base` or `units/<id>`. A process claims a unit without waiting: if another holds it, it goes on
to the next. A record that says `running` while nobody holds its lock is a unit whose process died
(`interrupted`); the next claim resumes it. `manifest.json`, the run's summary, is rebuilt from the records
(`summary`) when the report is written; a run directory written before per-unit records existed keeps its
finished units in manifest.json, which is read where a unit has no record.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from forgetting.harness.io import atomic_write_json

STATUS = "status.json"


def unit_dir(run_dir: Path, key: str) -> Path:
    return run_dir / key if key == "base" else run_dir / "units" / key


def where() -> dict:
    """This process's host, pid and, under Slurm or Ray, its job: what `forgetting status` shows."""
    place = {"host": socket.gethostname(), "pid": os.getpid()}
    for name, variable in (("slurm_job", "SLURM_JOB_ID"), ("slurm_array_task", "SLURM_ARRAY_TASK_ID")):
        if os.environ.get(variable):
            place[name] = os.environ[variable]
    return place


def _read_json(path: Path) -> dict | None:
    """A JSON object from `path`; None when absent or not readable as one (a record cut short counts as none)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class Records:
    """The unit records of one run directory."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        manifest = _read_json(run_dir / "manifest.json") or {}
        # a manifest written before unit records existed holds the finished units; a newer one is a summary
        self.legacy = {} if manifest.get("from_records") else manifest.get("units", {})
        self.legacy_evaluations = [] if manifest.get("from_records") else manifest.get("evaluations", [])
        self.held: dict[str, FileLock] = {}

    def read(self, key: str) -> dict | None:
        record = _read_json(unit_dir(self.run_dir, key) / STATUS)
        return record if record is not None else self.legacy.get(key)

    def done(self, key: str) -> bool:
        return (self.read(key) or {}).get("status") == "done"

    def claim(self, key: str) -> bool:
        """Take the unit for this process (no waiting); False when another process holds it."""
        directory = unit_dir(self.run_dir, key)
        directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(directory / ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        self.held[key] = lock
        previous = self.read(key) or {}
        self.write(key, status="running", started=_now(), **where(), evaluations=previous.get("evaluations", []))
        return True

    def release(self, key: str) -> None:
        lock = self.held.pop(key, None)
        if lock is not None:
            lock.release()

    def write(self, key: str, **fields) -> None:
        """Replace the unit's record (its claim must be held)."""
        assert key in self.held, f"{key}: written without its claim"
        atomic_write_json(unit_dir(self.run_dir, key) / STATUS, fields)

    def update(self, key: str, **fields) -> None:
        """Add or change fields of the unit's record (its claim must be held)."""
        self.write(key, **{**(self.read(key) or {}), **fields})

    def running_elsewhere(self, key: str) -> bool:
        """Whether another process holds the unit now."""
        if key in self.held:
            return False
        lock = FileLock(unit_dir(self.run_dir, key) / ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
        return False

    def summary(self, keys: list[str]) -> dict:
        """manifest.json's content: every unit's record, and the evaluations in unit order."""
        units = {key: record for key in keys if (record := self.read(key)) is not None}
        evaluations = self.legacy_evaluations + [
            e for key in keys for e in (units.get(key) or {}).get("evaluations", [])
        ]
        return {"units": units, "evaluations": evaluations, "from_records": True}

    def count_evaluation(self, key: str, model: str, results: dict) -> None:
        """One entry in the unit's record per model evaluation: which tasks ran, which came from the cache."""
        meta = results["forgetting"]
        entry = {"model": model, "evaluated": meta["evaluated"], "cached": meta["cache_hits"]}
        self.update(key, evaluations=(self.read(key) or {}).get("evaluations", []) + [entry])


class Progress:
    """Writes a unit's step and loss into its record, at most every `every` seconds (and at the last step)."""

    def __init__(self, records: Records, key: str, every: float = 5.0):
        self.records, self.key, self.every = records, key, every
        self.last = 0.0

    def __call__(self, done: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if now - self.last >= self.every or done == total:
            self.last = now
            self.records.update(self.key, step=done, steps=total, loss=loss, updated=_now())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
