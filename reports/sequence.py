"""The continual-SFT part of a run's report: the evaluations after each stage of every finished unit, turned
into reports/continual.py's tables (the accuracy matrix, ACC / BWT / FWT, the general suite after each stage)
and figures, and written as reports/continual.md and continual.json; the sections join report.html.

Only units whose every stage is evaluated count (the statistics pair each document across all stages).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from forgetting.harness.experiment import Experiment, primary_metric, stage_dir, units
from forgetting.harness.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from forgetting.harness.records import Records
from forgetting.reports import continual
from forgetting.reports.plots import _png
from forgetting.reports.render import Section, to_markdown
from forgetting.reports.tidy import example_rows


def stage_examples(run_dir: Path, exp: Experiment) -> pd.DataFrame:
    """Per-document scores of the base model (stage 0) and of every finished unit after each of its stages."""
    records, rows = Records(run_dir), []
    for unit in units(exp):
        if (records.read(unit.id) or {}).get("status") != "done":
            continue
        for k, stage in enumerate(exp.stage_list):
            path = stage_dir(run_dir / "units" / unit.id, k, stage) / "eval.json"
            labels = {"strategy": unit.strategy, "seed": unit.seed, "stage": k + 1}
            rows += example_rows(json.loads(path.read_text()), labels)
    if not rows:
        return pd.DataFrame()
    base = pd.DataFrame(example_rows(json.loads((run_dir / "base" / "eval.json").read_text()), {}))
    return continual.with_base(pd.DataFrame(rows), base)


def _metrics(examples: pd.DataFrame, tasks: list[str], exp: Experiment) -> dict[str, str]:
    """The compared metric of each task: the experiment's choice, the suite's own, else the first."""
    chosen = {}
    for task in tasks:
        available = sorted(examples.loc[examples["task"] == task, "metric"].unique())
        chosen[task] = primary_metric(task, available, exp.primary_metrics)
    return chosen


def continual_sections(run_dir: Path, exp: Experiment, iters: int = 2000) -> tuple[list[Section], dict[str, bytes]]:
    """The report's continual sections and figures (none when no unit has finished its stages)."""
    examples = stage_examples(run_dir, exp)
    if examples.empty:
        return [], {}
    targets = exp.target_tasks
    general_tasks = [t for t in dict.fromkeys(examples["task"]) if t not in targets]
    metrics = _metrics(examples, list(dict.fromkeys(examples["task"])), exp)
    cells, transfer = continual.continual_metrics(examples, targets, metrics, iters=iters)
    general = examples[examples["task"].isin(general_tasks)]
    general = general[general["metric"] == general["task"].map(metrics)]  # each task's compared metric
    changes = continual.general_forgetting(general, iters=iters) if not general.empty else pd.DataFrame()
    figures = {"continual_matrix.png": _png(continual.matrix_heatmap(cells))}
    figures["continual_stages.png"] = _png(continual.stage_lines(cells))
    stage_names = ", ".join(f"{k + 1} = {s.name} ({s.target_task})" for k, s in enumerate(exp.stage_list))
    sections = [
        Section("Continual SFT", f"Stages: {stage_names}. {continual.DEFINITIONS}", level=2),
        Section(
            "ACC, BWT and FWT",
            "Mean over seeds [95% paired bootstrap CI]; per seed.",
            continual.transfer_table(transfer),
        ),
        Section("Accuracy matrix", "R[i][j]: after stage i (0: base) on stage task j.", figure="continual_matrix.png"),
        *[
            Section(f"Matrix: {strategy}", table=continual.matrix_table(cells, strategy), level=3)
            for strategy in dict.fromkeys(cells["strategy"])
        ],
        Section("Each task across stages", figure="continual_stages.png"),
    ]
    if not changes.empty:
        sections.append(Section("General suite after each stage", table=continual.general_table(changes)))
    out = run_dir / "reports"
    for name, data in figures.items():
        atomic_write_bytes(out / name, data)
    atomic_write_text(out / "continual.md", to_markdown(f"Continual SFT report: {exp.name}", sections, figures))
    atomic_write_json(
        out / "continual.json",
        {
            "cells": cells.to_dict(orient="records"),
            "transfer": transfer.to_dict(orient="records"),
            "general": changes.to_dict(orient="records") if not changes.empty else [],
        },
    )
    return sections, figures
