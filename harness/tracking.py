"""Experiment tracking (`train.log_with`) through accelerate's tracker classes: W&B, MLflow, trackio, TensorBoard.

No tracker code of our own: each run is one of accelerate's trackers, started, fed and finished here, on the main
process only. `Accelerator.init_trackers` is not used: it drops a tracker that is not installed without a word,
keeps finished trackers on a second call, and its `end_training` also tears down torch.distributed.

A unit (or a plain `forgetting train` job) is one run in each tracker: named after the unit (a plain job: its
output directory), grouped by the experiment's name (W&B and trackio group, MLflow parent run, TensorBoard
`<run dir>/tensorboard/<unit>`), its resolved job config as the run config, every metrics.jsonl record at its
step as `train/<key>` and the held-out loss before and after training as `eval/heldout_loss`. Steps are the
unit's: a continual unit's stages go on counting where the previous one stopped (`Trackers.offset`), since W&B
drops a step lower than one it has seen. An experiment adds one report run to the group (`log_report`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker
from filelock import FileLock

from forgetting.harness.config import TRACKERS
from forgetting.harness.errors import Preempted, UserError

STATE_FILE = "tracking.json"  # in a run directory: the MLflow parent run's id, for every process and rerun


def check_installed(log_with: list[str]) -> None:
    """A one-line error for a tracker that is not installed (accelerate would leave it out silently)."""
    for name in log_with:
        if name not in TRACKERS:
            raise UserError(f"train.log_with: {name!r} is not a tracker; choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(name) is None:
            raise UserError(f"train.log_with: {name} is not installed (pip install 'sft-forgetting[{name}]')")


@dataclass(frozen=True)
class Place:
    """Where a run goes: its name, its group (the experiment; None for a plain job) and its files."""

    name: str
    group: str | None
    root: Path  # W&B files go to <root>/wandb
    tensorboard_dir: Path
    mlflow_parent: str | None = None  # the experiment's MLflow run: this run's parent


def flat(config: dict, prefix: str = "") -> dict:
    """`{a: {b: 1}}` as `{"a.b": 1}`, lists as JSON text: MLflow params, TensorBoard hparams and trackio configs
    take scalars only."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)) or value is None:
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = json.dumps(value, default=str)
    return out


def mlflow_key(key: str) -> str:
    """MLflow refuses metric names with characters outside [/\\w.\\- :] (e.g. a swept strategy's `[ratio=0.5]`)."""
    return re.sub(r"[^/\w.\- :]", "_", key)


class Trackers:
    """One run in each tracker of `log_with` (pass none on processes other than the main one), started by
    `start`; every step logged is shifted by `offset` (a continual unit's earlier stages). As a context manager,
    the runs are finished on leaving it, however it is left."""

    def __init__(self, log_with=(), project: str = "", place: Place | None = None, config: dict | None = None):
        self.log_with, self.project, self.place, self.config = tuple(log_with), project, place, config or {}
        self.runs: list = []
        self.started = False
        self.offset = 0

    def start(self, job_type: str = "train") -> None:
        """Open the runs (once) and store the config; a tracker that fails to start closes the ones before it."""
        if self.started:
            return
        self.started = True
        try:
            for name in self.log_with:
                run = _tracker(name, self.project, self.place, job_type)
                run.start()
                self.runs.append(run)
                run.store_init_configuration(self.config if name == "wandb" else flat(self.config))
                if name == "trackio":  # accelerate passes allow_val_change=True to a dict: it becomes a key
                    run.tracker.config.pop("allow_val_change", None)
        except BaseException as err:
            self.finish(err)
            raise

    def log(self, values: dict[str, float], step: int) -> None:
        for run in self.runs:
            keyed = {mlflow_key(k): v for k, v in values.items()} if run.name == "mlflow" else values
            run.log(keyed, step + self.offset)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.finish(error)

    def finish(self, error: BaseException | None = None) -> None:
        """Finish each run on its own, as failed when `error` ended it (the first error finishing raised after
        all are tried)."""
        errors = []
        for run in self.runs:
            try:
                _finish(run, error)
            except Exception as err:  # the other runs must still be closed
                errors.append(err)
        self.runs = []
        if errors:
            raise errors[0]


def _finish(run, error: BaseException | None) -> None:
    """accelerate's finish, or where the tracker records how a run ended, the failure (MLflow: KILLED for a
    stop a rerun resumes, FAILED otherwise; W&B: exit code 1)."""
    if error is not None and run.name == "wandb":
        run.tracker.finish(exit_code=1)
    elif error is not None and run.name == "mlflow":
        import mlflow

        mlflow.end_run(status="KILLED" if isinstance(error, (Preempted, KeyboardInterrupt)) else "FAILED")
    else:
        run.finish()


def _tracker(name: str, project: str, place: Place, job_type: str):
    """accelerate's tracker for `name`, not started."""
    if name == "wandb":
        import wandb  # an optional extra: imported only when asked for

        # a new Settings each time: wandb.init writes the run's group and tags into the one it is given
        settings = wandb.Settings(x_disable_stats=True, console="off", x_save_requirements=False, silent=True)
        return WandBTracker(
            project, name=place.name, group=place.group, job_type=job_type, dir=str(place.root), settings=settings
        )
    if name == "mlflow":
        tags = {"kind": job_type} | ({"group": place.group} if place.group else {})
        if job_type == "report" and place.mlflow_parent:  # the report is the experiment's run itself
            return MLflowTracker(project, run_id=place.mlflow_parent, tags=tags)
        if place.mlflow_parent:  # a tag, not a nested run: units in other processes attach to it too
            tags["mlflow.parentRunId"] = place.mlflow_parent
        return MLflowTracker(project, run_name=place.name, tags=tags)
    if name == "trackio":
        return TrackioTracker(
            project, name=place.name, group=place.group, auto_log_cpu=False, auto_log_gpu=False, embed=False
        )
    return TensorBoardTracker(place.tensorboard_dir.name, place.tensorboard_dir.parent)


def mlflow_parent(run_dir: Path, project: str, group: str) -> str:
    """The id of the experiment's MLflow run (the units' parent, the report's run): created once, kept in
    `<run_dir>/tracking.json` so units in other processes and reruns attach to the same one."""
    from mlflow.tracking import MlflowClient  # an optional extra

    run_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(run_dir / ".tracking.lock"):
        path = run_dir / STATE_FILE
        state = json.loads(path.read_text()) if path.is_file() else {}
        if "mlflow_parent" not in state:
            client = MlflowClient()
            experiment = client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(project)
            run = client.create_run(experiment_id, run_name="report", tags={"group": group, "kind": "report"})
            state["mlflow_parent"] = run.info.run_id
            path.write_text(json.dumps(state, indent=1) + "\n")
        return state["mlflow_parent"]


def headline_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Each strategy's numbers in the forgetting table, as `results/<strategy>[ <variant>]/<column>`."""
    metrics = {}
    for row in table.to_dict("records"):
        label = row["strategy"] if row.get("variant", "final") == "final" else f"{row['strategy']} {row['variant']}"
        for column, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                metrics[f"results/{label}/{column}"] = value
    return metrics


def log_report(trackers: Trackers, table: pd.DataFrame, files: list[Path]) -> None:
    """The experiment's report run: headline metrics, the forgetting table and the report's files."""
    trackers.start(job_type="report")
    trackers.log(headline_metrics(table), step=0)
    for run in trackers.runs:
        _REPORTERS[run.name](run, table, files)


def _wandb_report(run, table: pd.DataFrame, files: list[Path]) -> None:
    import wandb

    run.tracker.log({"forgetting_table": wandb.Table(dataframe=table)})
    artifact = wandb.Artifact(f"report-{run.tracker.id}", type="report")  # copies the files (save() only links)
    for path in files:
        artifact.add_file(str(path))
    run.tracker.log_artifact(artifact)


def _mlflow_report(run, table: pd.DataFrame, files: list[Path]) -> None:
    import mlflow

    run_id, name = run.tracker.info.run_id, "forgetting_table.json"
    if any(a.path == name for a in mlflow.MlflowClient().list_artifacts(run_id)):  # a rerun's report
        split = table.to_dict(orient="split")  # log_table's format; log_table itself would append the rows
        mlflow.log_dict({"columns": split["columns"], "data": split["data"]}, name, run_id=run_id)
    else:
        mlflow.log_table(table, artifact_file=name, run_id=run_id)
    for path in files:
        mlflow.log_artifact(str(path), artifact_path="report", run_id=run.tracker.info.run_id)


def _trackio_report(run, table: pd.DataFrame, files: list[Path]) -> None:
    import trackio

    run.tracker.log({"forgetting_table": trackio.Table(dataframe=table)}, step=0)
    artifact = trackio.Artifact("report", type="report")
    for path in files:
        artifact.add_file(str(path))
    run.tracker.log_artifact(artifact)


def _tensorboard_report(run, table: pd.DataFrame, files: list[Path]) -> None:
    """TensorBoard has no artifacts: the table as text (CSV, indented: markdown shows it as written) and the plots
    as images; the other files stay out."""
    import numpy as np
    from PIL import Image

    text = "".join(f"    {line}\n" for line in table.to_csv(index=False).splitlines())
    run.tracker.add_text("forgetting_table", text, global_step=0)
    for path in (p for p in files if p.suffix == ".png"):
        image = np.asarray(Image.open(path).convert("RGB"))
        run.tracker.add_image(f"plots/{path.stem}", image, global_step=0, dataformats="HWC")
    run.tracker.flush()


_REPORTERS: dict[str, Any] = {
    "wandb": _wandb_report,
    "mlflow": _mlflow_report,
    "trackio": _trackio_report,
    "tensorboard": _tensorboard_report,
}
