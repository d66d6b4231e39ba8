"""The report's "Forgetting over training": every finished unit's curve.jsonl (evals/curve.py, `eval.every`) as
tidy rows (curves.csv), the change of each benchmark from the start of training at every evaluated step with a
paired bootstrap CI (reports/continual.py's `forgetting_curves`), one panel per benchmark with the strategies
overlaid (`curves_plot`), and the held-out target loss against a general loss across the points (`loss_scatter`).

    curves.csv   unit, strategy, family, seed, step, steps, task, metric, value, stderr, n, higher_is_better
                 (one row per score of a point, as results.csv; the held-out target loss as task `heldout`, metric
                 `loss`, in nats per response token)
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from forgetting.evals.curve import read_curve
from forgetting.harness.experiment import Experiment, primary_metric, units
from forgetting.harness.io import atomic_write_bytes, atomic_write_text
from forgetting.harness.records import Records
from forgetting.reports import continual
from forgetting.reports.plots import _png
from forgetting.reports.render import Section
from forgetting.reports.tidy import example_rows, score_rows

CURVE_FILE = "curve.jsonl"
COLUMNS = [
    "unit",
    "strategy",
    "family",
    "seed",
    "step",
    "steps",
    "task",
    "metric",
    "value",
    "stderr",
    "n",
    "higher_is_better",
]
# general-suite metrics that are a loss on general text, the y of the scatter (the literature's "general loss")
GENERAL_LOSSES = ("bits_per_byte", "byte_perplexity", "word_perplexity")

TEXT = (
    "Each unit was evaluated during its training (eval.every: {every}) at step 0 (the model before its first "
    "step), at the configured steps and at its last step, on the model in memory (its training weights, as "
    "stored for training: fp32 master weights), in the final evaluation's settings and on its documents except "
    "where eval.curve_subsample names fewer. For each benchmark (its primary metric) and step s the change is "
    "Δ(s) = score(s) − score(0): a score is the weighted mean over the task's documents (the same documents at "
    "every step), averaged over seeds, and step 0 stands for the base model of this fine-tune. The band and the "
    "bracket are a 95% paired percentile bootstrap CI over documents: each replicate resamples a task's "
    "documents once and scores the same resampled documents at every step (seeds averaged inside each "
    "replicate), so a step is compared with step 0 document by document. As measured: for a lower-is-better "
    "metric such as bits per byte a positive change is a loss. The last point is the final model: with no "
    "curve_subsample and an evaluation dtype equal to the training weights' it equals the final evaluation "
    "exactly (tested); where eval_dtype resolves to bf16 the final evaluation ran bf16 weights."
)
SCATTER_TEXT = (
    "Held-out target loss (the training data's held-out split, mean response loss in nats per token, x) against "
    "{general} (y) at every evaluated step, one line per unit in step order; r is Pearson's correlation over "
    "a strategy's points. Kalajdzievski 2024 ('Scaling Laws for Forgetting When Fine-Tuning Large Language "
    "Models', arXiv:2401.05605) reports general loss rising linearly as the fine-tuning loss falls."
)


def curve_tables(run_dir: Path, exp: Experiment) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scores, examples) of every finished unit's curve: tidy score rows (COLUMNS) and per-document rows
    (strategy, seed, step, task, metric, doc, item, instruction, value, weight)."""
    records, scores, examples = Records(run_dir), [], []
    for unit in units(exp):
        if (records.read(unit.id) or {}).get("status") != "done":
            continue
        for point in read_curve(run_dir / "units" / unit.id / CURVE_FILE):
            labels = {"unit": unit.id, "strategy": unit.strategy, "family": unit.family, "seed": unit.seed}
            labels |= {"step": point["step"], "steps": point.get("steps")}
            scores += score_rows(point["results"], labels)
            if point.get("heldout_loss") is not None:
                held = {"task": "heldout", "metric": "loss", "value": point["heldout_loss"], "stderr": None, "n": None}
                scores.append(labels | held | {"higher_is_better": False})
            keep = {k: labels[k] for k in ("strategy", "seed", "step")}
            examples += example_rows(point["results"], keep | {"unit": unit.id})
    return pd.DataFrame(scores, columns=COLUMNS), pd.DataFrame(examples)


def primary_rows(table: pd.DataFrame, exp: Experiment) -> pd.DataFrame:
    """The rows of each task's primary metric (the experiment's choice, the suite's own, else the first)."""
    metrics = {
        task: primary_metric(task, sorted(rows["metric"].unique()), exp.primary_metrics)
        for task, rows in table.groupby("task")
    }
    return table[table["metric"] == table["task"].map(metrics)]


def paired_points(examples: pd.DataFrame, exp: Experiment) -> pd.DataFrame:
    """Each task's primary-metric rows at the steps every seed of a strategy has (step 0 among them: strategies
    without it are left out), so that every document is paired across the steps."""
    chosen, kept = primary_rows(examples, exp), []
    for _, rows in chosen.groupby("strategy", sort=False):
        steps = set.intersection(*(set(seed_rows["step"]) for _, seed_rows in rows.groupby("seed")))
        if 0 in steps:
            kept.append(rows[rows["step"].isin(steps)])
    return pd.concat(kept, ignore_index=True) if kept else chosen.iloc[:0]


def loss_points(scores: pd.DataFrame, exp: Experiment) -> tuple[pd.DataFrame, str | None]:
    """(unit, strategy, seed, step, target_loss, general_loss) per point, and the general loss's name: the first
    general task whose primary metric is a loss on text (GENERAL_LOSSES); empty without one or without the
    held-out target loss (data.eval_split)."""
    general = primary_rows(scores[~scores["task"].isin([*exp.target_tasks, "heldout"])], exp)
    general = general[general["metric"].isin(GENERAL_LOSSES)]
    held = scores[scores["task"] == "heldout"]
    if general.empty or held.empty:
        return pd.DataFrame(), None
    general = general[general["task"] == general["task"].iloc[0]]
    keys = ["unit", "strategy", "seed", "step"]
    pairs = held[[*keys, "value"]].merge(general[[*keys, "value"]], on=keys, suffixes=("_target", "_general"))
    pairs = pairs.rename(columns={"value_target": "target_loss", "value_general": "general_loss"})
    name = f"{general['task'].iloc[0].removeprefix('forgetting_')} {general['metric'].iloc[0]}"
    return pairs, name


def curve_sections(
    run_dir: Path, exp: Experiment, iters: int = 2000
) -> tuple[list[Section], dict[str, bytes], pd.DataFrame]:
    """The report's curve sections, their figures (written under reports/) and the per-step changes; curves.csv
    at the run directory's top. Nothing without `eval.every` or before any unit finished."""
    scores, examples = curve_tables(run_dir, exp) if exp.eval.every is not None else (pd.DataFrame(), None)
    if scores.empty:
        return [], {}, pd.DataFrame()
    atomic_write_text(run_dir / "curves.csv", scores.to_csv(index=False))
    points = paired_points(examples, exp)
    changes = continual.forgetting_curves(points, iters=iters) if not points.empty else pd.DataFrame()
    figures = {"curves.png": _png(continual.curves_plot(changes, y="delta"))} if not changes.empty else {}
    pairs, general = loss_points(scores, exp)
    if not pairs.empty:
        figures["curve_loss.png"] = _png(continual.loss_scatter(pairs, ylabel=general))
    for name, data in figures.items():
        atomic_write_bytes(run_dir / "reports" / name, data)
    table = continual.general_table(changes, by="step") if not changes.empty else None
    sections = [
        Section("Forgetting over training", TEXT.format(every=json.dumps(exp.eval.every)), table, "curves.png"),
        Section(
            "Target loss against general loss",
            SCATTER_TEXT.format(general=general)
            if general
            else "No point has both a held-out target loss (data.eval_split) and a general loss (bits per byte, "
            "e.g. forgetting_prose).",
            figure="curve_loss.png",
        ),
    ]
    return sections, figures, changes
