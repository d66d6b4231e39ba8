"""Files on disk: atomic writes, the cache directory, and claiming a run directory.

Files go to a temporary sibling, are flushed and fsynced, then renamed over the target: a result either
stands complete or not at all.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

from forgetting.harness.configlib import first_difference
from forgetting.harness.errors import UserError


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_yaml(path: str | Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_root(cache_dir: str | None = None) -> Path:
    """The directory holding converted models and cached results: `cache_dir`, $FORGETTING_CACHE or
    ~/.cache/forgetting."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("FORGETTING_CACHE", Path.home() / ".cache" / "forgetting")).expanduser()


def claim_run_dir(
    run_dir: Path,
    config_name: str,
    config: dict,
    comparable: Callable[[dict], dict],
    write: bool = True,
    what: str = "run",
) -> bool:
    """Claim `run_dir` for the run that `config` describes; True when it already holds this same run.

    A directory holding a run with another config (compared as `comparable` resolves both) or files that are
    not a run of this tool is refused with a one-line UserError naming the first difference. A new run's
    config is saved as `run_dir/config_name` when `write` (the main process)."""
    saved = run_dir / config_name
    if saved.is_file():
        old, new = comparable(yaml.safe_load(saved.read_text())), comparable(config)
        if old != new:
            raise UserError(
                f"{run_dir}: holds a different {what} ({first_difference(old, new)}); rerun with the "
                f"same config to resume, or choose another output_dir"
            )
        return True
    if run_dir.exists() and any(not p.name.startswith(".") for p in run_dir.iterdir()):
        raise UserError(f"{run_dir}: exists and is not a run directory of this tool; choose another output_dir")
    if write:
        atomic_write_yaml(saved, config)
    return False
