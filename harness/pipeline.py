"""`forgetting run`: base evaluation once, then train + evaluate every unit, then the tidy table and reports.

Layout of the run directory (`experiment.output_dir`):
    experiment.yaml        the resolved experiment (a rerun with a different one is refused)
    environment.json       python, packages, device, git commit; one entry per (re)start
    data_hashes.json       BLAKE2 of every distinct SFT dataset (the parsed conversations) and held-out split
    manifest.json          every unit's record (status, timings, evaluations), rebuilt from the records when the
                           report is written
    base/eval.json         lm-eval results (with samples) of the base model
    base/status.json, units/<id>/status.json    each unit's record, written by the one process that holds it
                           (harness/records.py: several `forgetting run` processes may share the directory)
    units/<id>/train/      the unit's training output_dir: metrics.jsonl, checkpoints, final/ (model or adapter)
    units/<id>/eval.json   lm-eval results of the unit's final model (eval_<variant>.json for WiSE-FT points)
    units/<id>/curve.jsonl with eval.every: the unit evaluated during its training, one line per step (evals/curve.py)
    units/<id>/log.txt     everything the unit printed
    results.{csv,parquet,json}, examples.parquet, reports/   written by `reports.writer.write_reports`
    tracking.json, tensorboard/, wandb/   with `train.log_with` (harness/tracking.py): the MLflow parent run's id,
                           TensorBoard's runs (one per unit, and the report's), W&B's files
    units/<id>/train/final/README.md (and one in each model inside final/)   the model card (harness/card.py),
                           written at the end of training, refreshed with the report's rows (reports/cards.py)
A rerun resumes: finished units are skipped, an interrupted unit continues from its last checkpoint,
evaluations already done are read back from the result cache. A unit another process is working on is left to
it; the process that finishes the last unit writes the report.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd
import torch
from filelock import FileLock

from forgetting.evals.curve import Curve, read_curve
from forgetting.evals.runner import evaluate, leaf_tasks, load_for_eval, task_manager
from forgetting.harness.configlib import to_dict
from forgetting.harness.data import load_conversations
from forgetting.harness.errors import Preempted, RunError, UserError
from forgetting.harness.experiment import (
    REPLAY_BUFFER,
    Experiment,
    Unit,
    continuation,
    load_saved_experiment,
    stage_dir,
    units,
    upgrade_experiment,
)
from forgetting.harness.io import atomic_write_json, atomic_write_text, cache_root, claim_run_dir
from forgetting.harness.job import comparable
from forgetting.harness.precision import resolve_eval_dtype, resolve_precision
from forgetting.harness.processes import Team
from forgetting.harness.progress import ExperimentProgress, Plan
from forgetting.harness.records import Progress as RecordProgress
from forgetting.harness.records import Records
from forgetting.harness.tracking import Place, Trackers, check_installed, log_report, mlflow_parent
from forgetting.harness.train import train
from forgetting.mitigations.wise_ft import WiseFTConfig
from forgetting.reports.cards import write_unit_cards
from forgetting.reports.writer import write_reports

EXPERIMENT_FILE = "experiment.yaml"
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "peft", "lm_eval", "pandas", "numpy")


def open_run_dir(exp: Experiment, run_dir: Path) -> bool:
    """Create the run directory or check it holds this same experiment; True when resuming."""
    return claim_run_dir(
        run_dir,
        EXPERIMENT_FILE,
        to_dict(exp),
        lambda config: comparable(upgrade_experiment(config, rename_axes=True), Experiment),
        what="experiment",
    )


def environment(exp: Experiment | None = None) -> dict:
    """What produced the results: interpreter, package versions, device, precisions chosen, git commit."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            versions[name] = None
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()})"
    )
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
        "threads": torch.get_num_threads(),
        "packages": versions,
        "git_commit": commit,
        "argv": sys.argv,
        **({"precision": precisions(exp)} if exp is not None else {}),
    }


def precisions(exp: Experiment) -> dict:
    """The training precision and evaluation dtype `auto` resolves to here, and why (hardware bf16 support)."""
    train, train_why = resolve_precision(exp.train.precision)
    evaluation, eval_why = resolve_eval_dtype(exp.eval_dtype)
    return {"train": train, "train_reason": train_why, "eval_dtype": evaluation, "eval_reason": eval_why}


def _append_environment(run_dir: Path, exp: Experiment) -> dict:
    path = run_dir / "environment.json"
    history = json.loads(path.read_text()) if path.is_file() else []
    record = environment(exp)
    atomic_write_json(path, history + [record])
    return record


def check_same_data(saved: dict, now: dict) -> None:
    """Refuse to resume on data that changed since the run started (the units would not be comparable)."""

    def by_source(hashes: dict) -> dict:
        return {(d["path"], d["split"], d["limit"], d.get("name")): d["blake2"] for d in hashes["datasets"]}

    old = by_source(saved)
    for source, digest in by_source(now).items():
        if source in old and old[source] != digest:
            raise UserError(
                f"{source[0]} (split {source[1]}): the data changed since this run started; restore it "
                f"or start a new run (another output_dir)"
            )


def data_hashes(unit_list: list[Unit]) -> dict:
    """BLAKE2 of each distinct dataset the units train or are held out on; loading them validates the files."""
    out = {}
    for unit, job in ((u, job) for u in unit_list for job in u.stage_jobs or (u.job,)):
        for role, config in (("train", job.data), ("heldout", job.data.heldout())):
            if config is None:
                continue
            named = {"name": config.name} if config.name else {}  # a dataset's config; absent: keys as before it
            key = json.dumps(
                {"path": config.path, "split": config.split, "limit": config.limit, "schema": config.schema} | named,
                sort_keys=True,
            )
            if key in out:
                out[key]["units"].append(unit.id)
                continue
            conversations = load_conversations(config)
            digest = hashlib.blake2b(json.dumps(conversations, sort_keys=True).encode(), digest_size=16).hexdigest()
            out[key] = {
                "role": role,
                "path": config.path,
                **named,
                "split": config.split,
                "limit": config.limit,
                "records": len(conversations),
                "blake2": digest,
                "units": [unit.id],
            }
    return {"datasets": list(out.values())}


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()

    def isatty(self):
        return False


@contextmanager
def tee_output(path: Path):
    """Copy everything printed (stdout and stderr) into `path` while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


def evaluate_model(
    exp: Experiment, source: Path | str, records: Records, key: str, label: str, adapter: bool = False
) -> dict:
    """lm-eval results of a base model, a checkpoint directory or a LoRA adapter directory (cached), counted in
    unit `key`'s record."""
    base = replace(exp.model, dtype=exp.eval_dtype)
    if adapter:
        model, tokenizer = load_for_eval(base.name_or_path, adapter=str(source), model_config=base)
    else:  # the base, or a full checkpoint with the base's loading options (dtype, attention)
        config = (
            base
            if str(source) == base.name_or_path
            else replace(base, name_or_path=str(source), gguf_file=None, revision=None)
        )
        model, tokenizer = load_for_eval(str(source), model_config=config)
    results = evaluate(model, tokenizer, exp.eval, cache_dir=cache_root() / "eval")
    records.count_evaluation(key, label, results)
    return results


def _wise_ft_points(final_dir: Path) -> list[Path]:
    return sorted(p for p in final_dir.glob("wise_ft_*") if (p / "config.json").is_file())


def run_unit(
    exp: Experiment,
    unit: Unit,
    run_dir: Path,
    records: Records,
    progress: ExperimentProgress | None = None,
    label: str = "",
) -> dict:
    """Train (or resume) one unit (and its curve, with eval.every), evaluate its final model and any WiSE-FT points."""
    unit_dir = run_dir / "units" / unit.id
    started = time.perf_counter()
    if progress is not None:
        progress.training(unit.id, label)
    on_step = _step_reporter(records, unit.id, progress, 0, None)
    with unit_trackers(exp, unit, run_dir) as trackers:
        result = train(unit.job, on_step=on_step, eval_points=unit_curve(exp, unit_dir), trackers=trackers)
    trained = time.perf_counter()
    final = result.final_dir
    is_adapter = (final / "adapter_config.json").is_file() and not (final / "config.json").is_file()
    variants = {"final": (final, is_adapter)} | {p.name: (p, False) for p in _wise_ft_points(final)}
    for variant, (source, adapter) in variants.items():
        target = unit_dir / ("eval.json" if variant == "final" else f"eval_{variant}.json")
        if not target.is_file():
            if progress is not None:
                progress.evaluating(unit.id, label, variant)
            results = evaluate_model(exp, source, records, unit.id, f"{unit.id}/{variant}", adapter=adapter)
            atomic_write_json(target, results)
        if progress is not None:
            progress.evaluated(unit.id)
    if not exp.keep_models:
        for path in [final, *_wise_ft_points(final)]:
            for weights in path.glob("*.safetensors"):
                weights.unlink()
    return {
        "status": "done",
        "strategy": unit.strategy,
        "seed": unit.seed,
        "steps": result.steps,
        "train_seconds": round(trained - started, 1),
        "eval_seconds": round(time.perf_counter() - trained, 1),
        "variants": sorted(variants),
        "heldout_loss": result.heldout_loss,
        "mitigation_reports": result.mitigation_reports,
        **curve_record(unit_dir / CURVE_FILE),
    }


CURVE_FILE = "curve.jsonl"


def unit_curve(exp: Experiment, unit_dir: Path) -> Curve | None:
    """The unit's forgetting curve with `eval.every` (its points in units/<id>/curve.jsonl), else None."""
    if exp.eval.every is None:
        return None
    return Curve(exp.eval, unit_dir / CURVE_FILE, cache_dir=cache_root() / "eval")


def curve_record(path: Path) -> dict:
    """What the unit's record says of its curve: the steps evaluated and the seconds their evaluations took
    (inside train_seconds)."""
    points = read_curve(path)
    if not points:
        return {}
    return {"curve_steps": [p["step"] for p in points], "curve_seconds": round(sum(p["seconds"] for p in points), 1)}


def run_sequence(
    exp: Experiment,
    unit: Unit,
    run_dir: Path,
    records: Records,
    progress: ExperimentProgress | None = None,
    label: str = "",
) -> dict:
    """Train a unit's stages in order, each from the previous stage's weights, and evaluate the model after each
    (every stage's target task and the suite); a stage with its evaluation written is done (resume skips it)."""
    with unit_trackers(exp, unit, run_dir) as trackers:  # one run per tracker for the whole sequence
        return _run_stages(exp, unit, run_dir, records, progress, label, trackers)


def _run_stages(
    exp: Experiment,
    unit: Unit,
    run_dir: Path,
    records: Records,
    progress: ExperimentProgress | None,
    label: str,
    trackers: Trackers,
) -> dict:
    unit_dir = run_dir / "units" / unit.id
    started, trained, steps, heldout = time.perf_counter(), 0.0, 0, {}
    total = sum(job.train.max_steps or 0 for job in unit.stage_jobs) or None  # None: epoch-based, learned later
    for k, (stage, job) in enumerate(zip(exp.stage_list, unit.stage_jobs)):
        where, name = stage_dir(unit_dir, k, stage), f"{label} stage {k + 1}/{len(unit.stage_jobs)} ({stage.name})"
        records.update(unit.id, stage=k + 1, stages=len(unit.stage_jobs), stage_name=stage.name)
        offset = trackers.offset = sum(j.train.max_steps or 0 for j in unit.stage_jobs[:k])  # the unit's steps so far
        if (where / "eval.json").is_file():
            continue
        write_replay_buffer(job, unit.stage_jobs[:k], where / REPLAY_BUFFER)
        if progress is not None:
            progress.training(unit.id, name)
        before = time.perf_counter()
        curve = unit_curve(exp, where)  # this stage's points, joined into the unit's curve below
        on_step = _step_reporter(records, unit.id, progress, offset, total)
        result = train(job, on_step=on_step, eval_points=curve, trackers=trackers)
        trained += time.perf_counter() - before
        if curve is not None:
            join_stage_curves(unit_dir, exp, unit)
        steps, heldout[stage.name] = steps + result.steps, result.heldout_loss
        if progress is not None:
            progress.evaluating(unit.id, name, "its model")
        model_dir = continuation(job.output_dir, job.mitigations)
        results = evaluate_model(exp, model_dir, records, unit.id, f"{unit.id}/{stage.name}")
        atomic_write_json(where / "eval.json", results)
        if progress is not None:
            progress.evaluated(unit.id)
    last = stage_dir(unit_dir, len(exp.stage_list) - 1, exp.stage_list[-1]) / "eval.json"
    atomic_write_json(unit_dir / "eval.json", json.loads(last.read_text()))  # the final model: the last stage's
    return {
        "status": "done",
        "strategy": unit.strategy,
        "seed": unit.seed,
        "steps": steps,
        "train_seconds": round(trained, 1),
        "eval_seconds": round(time.perf_counter() - started - trained, 1),
        "variants": ["final"],
        "heldout_loss": heldout,
        "stages": [s.name for s in exp.stage_list],
        **curve_record(unit_dir / CURVE_FILE),
    }


def join_stage_curves(unit_dir: Path, exp: Experiment, unit: Unit) -> None:
    """The unit's curve.jsonl over its whole sequence: each stage's points with the steps counted from the
    sequence's start and the stage's number; a later stage's step 0 (its start: the previous stage's last
    point, the same weights) left out."""
    points, offset = [], 0
    total = sum(job.train.max_steps or 0 for job in unit.stage_jobs) or None
    for k, (stage, job) in enumerate(zip(exp.stage_list, unit.stage_jobs)):
        stage_points = read_curve(stage_dir(unit_dir, k, stage) / CURVE_FILE)
        joined = {"stage": k + 1, "steps": total}
        points += [p | joined | {"step": offset + p["step"]} for p in stage_points if k == 0 or p["step"] > 0]
        offset += job.train.max_steps or max((p["step"] for p in stage_points), default=0)
    atomic_write_text(unit_dir / CURVE_FILE, "".join(json.dumps(p, default=str) + "\n" for p in points))


def unit_trackers(exp: Experiment, unit: Unit, run_dir: Path) -> Trackers:
    """The unit's runs in its trackers (`train.log_with`), in the experiment's group; not started yet."""
    t = unit.job.train
    parent = mlflow_parent(run_dir, t.tracker_project, exp.name) if "mlflow" in t.log_with else None
    place = Place(unit.id, exp.name, run_dir, run_dir / "tensorboard" / unit.id, mlflow_parent=parent)
    jobs = {stage.name: to_dict(job) for stage, job in zip(exp.stage_list, unit.stage_jobs)}
    config = {"stages": jobs} if jobs else to_dict(unit.job)
    return Trackers(t.log_with, t.tracker_project, place, config | {"unit": unit.id, "strategy": unit.strategy})


def _step_reporter(records: Records, key: str, progress, offset: int, unit_total: int | None):
    """on_step for a unit or one stage of it: the unit's step counts (the stage's plus `offset`; of `unit_total`,
    else of the stage's total plus `offset`) in its record and progress."""
    in_record = RecordProgress(records, key)

    def on_step(done: int, total: int, loss: float) -> None:
        of = unit_total if unit_total is not None else offset + total
        in_record(offset + done, of, loss)
        if progress is not None:
            progress.step(key, offset + done, of, loss)

    return on_step


def write_replay_buffer(job, earlier: tuple, path: Path) -> None:
    """Experience replay over stages: `size` examples drawn (seeded) from each earlier stage's SFT data, as the
    conversations file the stage's replay mitigation reads (`data.source: stages`)."""
    spec = next((m for m in job.mitigations if m.get("name") == "replay"), None)
    if spec is None or not earlier or Path(spec["data"]["source"]) != path:
        return
    per_stage = spec["data"]["size"] // len(earlier)
    rng = random.Random(spec.get("seed", 0))
    rows = []
    for index, stage_job in enumerate(earlier):
        conversations = load_conversations(stage_job.data)
        chosen = sorted(rng.sample(range(len(conversations)), min(per_stage, len(conversations))))
        rows += [{"messages": conversations[i], "stage": index + 1} for i in chosen]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def run_experiment(exp: Experiment, only: list[str] | None = None, report: bool = True) -> Path | None:
    """The whole experiment, resumable, shareable by several processes (each unit is worked on by the one that
    claims it); `only`: just these units (`base`: the base evaluation), as a scheduler's job runs them. Returns the
    run directory when this process wrote the report, None when other units are not finished yet (the process
    that finishes the last one writes it).

    Started by torchrun or a multi-task srun step (a unit's training spread over its processes), the processes
    form one team: rank 0 sets up, claims each unit, evaluates and writes; the others train each unit it claims
    alongside it, and neither evaluate nor write."""
    run_dir = Path(exp.output_dir)
    unit_list = units(exp)
    unknown = sorted(set(only or []) - {"base", *(u.id for u in unit_list)})
    if unknown:
        valid = ", ".join(["base", *(u.id for u in unit_list)])
        raise UserError(f"--unit {unknown[0]}: not a unit of {exp.name}; valid: {valid}")
    team = Team()
    problem = team.agree(_set_up, exp, run_dir, unit_list)
    if problem is not None:  # the main process's one-line error, raised by every process
        raise UserError(problem)
    records = Records(run_dir)
    progress = ExperimentProgress(work_plan(unit_list))
    work = {"base": ("[base]", None)} | {
        u.id: (f"[{i}/{len(unit_list)}] {u.id}", u) for i, u in enumerate(unit_list, 1)
    }
    for key, (label, unit) in work.items():
        if (only is None or key in only) and team.agree(_take, key, label, unit, records, progress):
            if team.main:
                _work_on(exp, key, label, unit, records, progress)
            elif unit is not None:
                _train_along(unit)
    if not (team.main and report):  # `report=False`: a launcher's unit; the launcher writes the report
        return None
    return finish_run(run_dir, records, list(work))


def prepare_run(exp: Experiment) -> Path:
    """What a launcher does before it queues any job: check the inputs, open (or resume) the run directory."""
    problem = _set_up(exp, Path(exp.output_dir), units(exp))
    if problem is not None:
        raise UserError(problem)
    return Path(exp.output_dir)


def _set_up(exp: Experiment, run_dir: Path, unit_list: list[Unit]) -> str | None:
    """Check the inputs, open (or resume) the run directory, record the environment; a UserError's message."""
    try:
        hashes = _preflight(exp, unit_list)
        run_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(run_dir / ".setup.lock"):  # processes starting together: one at a time through the setup
            resuming = open_run_dir(exp, run_dir)
            if resuming and (run_dir / "data_hashes.json").is_file():
                check_same_data(json.loads((run_dir / "data_hashes.json").read_text()), hashes)
            atomic_write_json(run_dir / "data_hashes.json", hashes)
            chosen = _append_environment(run_dir, exp)["precision"]
    except UserError as err:
        return str(err)
    print(
        f"{'resuming' if resuming else 'starting'} {exp.name}: {len(unit_list)} units "
        f"({len(exp.strategy_list)} strategies x {len(exp.seeds)} seeds) in {run_dir}",
        flush=True,
    )
    print(
        f"training precision {chosen['train']} ({chosen['train_reason']}); evaluation dtype "
        f"{chosen['eval_dtype']} ({chosen['eval_reason']})",
        flush=True,
    )
    return None


def _take(key: str, label: str, unit: Unit | None, records: Records, progress) -> bool:
    """Claim unit `key` (None: the base evaluation) unless it is done or another process holds it."""
    if records.done(key):
        if unit is not None:
            print(f"{label}: done earlier", flush=True)
        progress.unit_done(key)
        return False
    if not records.claim(key):
        print(f"{label}: running in another process ({describe_place(records.read(key))})", flush=True)
        progress.unit_done(key)
        return False
    return True


def _work_on(exp: Experiment, key: str, label: str, unit: Unit | None, records: Records, progress) -> None:
    """Run claimed unit `key` (None: the base evaluation) and write its record."""
    run_dir = records.run_dir
    try:
        if unit is None:
            record = _evaluate_base(exp, run_dir, records, progress)
        else:
            try:
                with tee_output(run_dir / "units" / unit.id / "log.txt"):
                    run = run_sequence if unit.stage_jobs else run_unit
                    record = run(exp, unit, run_dir, records, progress, label)
            except RunError as err:  # e.g. a non-finite loss: this unit failed, the others go on
                print(f"{label} failed: {err}", file=sys.stderr, flush=True)
                record = {"status": "failed", "strategy": unit.strategy, "seed": unit.seed, "error": str(err)}
            except Preempted as err:  # saved and stopped on a scheduler's signal: resumed by the next claim
                records.update(key, status="preempted", error=str(err))
                raise
            progress.unit_done(unit.id)
        records.update(key, **record)
    finally:  # a crash leaves the record `running` with no holder: the next claim resumes the unit
        records.release(key)


def _train_along(unit: Unit) -> None:
    """A process other than the main one: train its part of the unit; the main process records the outcome."""
    try:
        train(unit.job)
    except RunError:  # every process stops on it (a non-finite loss is seen by all); the main one records it
        pass


def _evaluate_base(exp: Experiment, run_dir: Path, records: Records, progress) -> dict:
    started = time.perf_counter()
    with tee_output(run_dir / "base" / "log.txt"):
        progress.evaluating("base", "[base]", f"the base model {exp.model.name_or_path}")
        results = evaluate_model(exp, exp.model.name_or_path, records, "base", "base")
        atomic_write_json(run_dir / "base" / "eval.json", results)
        progress.evaluated("base")
    return {"status": "done", "eval_seconds": round(time.perf_counter() - started, 1)}


def describe_place(record: dict | None) -> str:
    """Where a unit's record says it runs: host, process, Slurm job."""
    record = record or {}
    job = f", Slurm job {record['slurm_job']}" if record.get("slurm_job") else ""
    return f"{record.get('host', '?')} pid {record.get('pid', '?')}{job}"


def finish_run(run_dir: Path, records: Records, keys: list[str]) -> Path | None:
    """Write manifest.json and the report when every unit is done or failed; else say who still works on what."""
    open_units = [k for k in keys if (records.read(k) or {}).get("status") not in ("done", "failed")]
    if open_units:
        busy = [k for k in open_units if records.running_elsewhere(k)]
        print(
            f"{len(open_units)} unit(s) not finished ({len(busy)} running in other processes: "
            f"{', '.join(busy[:3]) or 'none'}); the process that finishes the last one writes the report "
            f"(or run `forgetting run` again / `forgetting status {run_dir}`)",
            flush=True,
        )
        return None
    written = report_run(run_dir, keys)
    report_to_trackers(run_dir)
    return written


def report_to_trackers(run_dir: Path) -> None:
    """The experiment's report run in the trackers its experiment.yaml names (`train.log_with`), in the units'
    group (MLflow: their parent run): the strategies' headline numbers, the forgetting table, results.csv, the
    markdown and HTML reports and the plots."""
    exp = load_saved_experiment(run_dir / EXPERIMENT_FILE)
    t = exp.train
    if not t.log_with:
        return
    parent = mlflow_parent(run_dir, t.tracker_project, exp.name) if "mlflow" in t.log_with else None
    place = Place("report", exp.name, run_dir, run_dir / "tensorboard" / "report", mlflow_parent=parent)
    reports = run_dir / "reports"
    table = pd.DataFrame(json.loads((reports / "summary.json").read_text())["strategies"])
    files = [
        run_dir / "results.csv",
        reports / "forgetting.md",
        reports / "report.html",
        *sorted(reports.glob("*.png")),
    ]
    with Trackers(t.log_with, t.tracker_project, place, to_dict(exp)) as trackers:
        log_report(trackers, table, files)


def status_table(run_dir: Path) -> str:
    """`forgetting status`: one line per unit, from the records alone (and whether their locks are held)."""
    keys = ["base"] + [u.id for u in units(load_saved_experiment(run_dir / EXPERIMENT_FILE))]
    records = Records(run_dir)
    lines = [f"{'unit':<32} {'state':<12} {'step':>11} {'loss':>9}  where"]
    for key in keys:
        record = records.read(key) or {}
        state = record.get("status", "pending")
        if state == "running" and not records.running_elsewhere(key):
            state = "interrupted"  # its process died; the next `forgetting run` resumes it
        step = f"{record['step']}/{record['steps']}" if "step" in record else ""
        loss = f"{record['loss']:.4f}" if isinstance(record.get("loss"), float) else ""
        place = describe_place(record) if state in ("running", "interrupted") else record.get("error", "")[:60]
        lines.append(f"{key:<32} {state:<12} {step:>11} {loss:>9}  {place}")
    states = [line.split()[1] for line in lines[1:]]
    counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
    return "\n".join([*lines, f"{len(keys)} units: {counts}"])


def report_run(run_dir: Path, keys: list[str] | None = None) -> Path:
    """manifest.json rebuilt from the unit records, then every report and the units' model cards (one process at a
    time)."""
    if not (run_dir / EXPERIMENT_FILE).is_file():
        return write_reports(run_dir)  # which says, in one line, that this is not a run directory
    if keys is None:
        keys = ["base"] + [u.id for u in units(load_saved_experiment(run_dir / EXPERIMENT_FILE))]
    with FileLock(run_dir / ".report.lock"):
        atomic_write_json(run_dir / "manifest.json", Records(run_dir).summary(keys))
        write_reports(run_dir)
        write_unit_cards(run_dir)  # each model's card gets its rows of the report (reports/cards.py)
        return run_dir


def work_plan(unit_list: list[Unit]) -> Plan:
    """The steps and evaluations of every unit, for the progress estimate (epoch-based units learn theirs later)."""
    evaluations = {"base": 1}
    for unit in unit_list:
        points = [m.get("alphas", WiseFTConfig().alphas) for m in unit.job.mitigations if m.get("name") == "wise_ft"]
        evaluations[unit.id] = 1 + sum(len(alphas) for alphas in points)
    for unit in unit_list:
        if unit.stage_jobs:  # an evaluation after each stage
            evaluations[unit.id] = len(unit.stage_jobs)
    steps = {u.id: sum(job.train.max_steps or 0 for job in u.stage_jobs or (u.job,)) or None for u in unit_list}
    return Plan(steps=steps, evaluations=evaluations)


def _preflight(exp: Experiment, unit_list: list[Unit]) -> dict:
    """Checks that need more than the config file, done before anything is written or trained; the data hashes."""
    leaves = leaf_tasks(task_manager(exp.eval), exp.eval.tasks)
    for task in exp.eval.subsample:
        if task not in leaves:
            raise UserError(f"eval.subsample: {task!r} is not one of the evaluated tasks ({', '.join(leaves)})")
    for task in exp.eval.curve_subsample:
        if task not in leaves:
            raise UserError(f"eval.curve_subsample: {task!r} is not one of the evaluated tasks ({', '.join(leaves)})")
    for stage in exp.stage_list:
        if stage.target_task not in leaves:
            raise UserError(
                f"stages ({stage.name}): target_task {stage.target_task!r} is not one of the evaluated tasks "
                f"({', '.join(leaves)}); add it to eval.tasks"
            )
    if exp.target_task is not None and exp.target_task not in leaves and not exp.stage_list:
        raise UserError(
            f"target_task: {exp.target_task!r} is not one of the evaluated tasks ({', '.join(leaves)}); "
            f"add it to eval.tasks or set target_task: null"
        )
    jobs = [job for unit in unit_list for job in unit.stage_jobs or (unit.job,)]
    check_installed(sorted({name for job in jobs for name in job.train.log_with}))  # before anything is written
    return data_hashes(unit_list)  # loads (and so validates) every dataset
