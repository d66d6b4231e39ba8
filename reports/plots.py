"""Report figures (matplotlib, PNG bytes): benchmark changes with CIs, the gain-vs-forgetting Pareto plot
(WiSE-FT interpolations drawn as curves), and training loss curves."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from forgetting.reports.forgetting import TWO_SIDED


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def deltas_plot(benchmarks: pd.DataFrame) -> bytes | None:
    """Relative change of each non-target benchmark per strategy (good direction up; a two-sided metric such as
    answer length as measured, where 0 is best), 95% paired CI bars."""
    table = benchmarks[(benchmarks["variant"] == "final") & ~benchmarks["target"]]
    if table.empty:
        return None
    tasks = list(dict.fromkeys(table["task"]))
    strategies = list(dict.fromkeys(table["strategy"]))
    width = 0.8 / len(strategies)
    two_sided = set(table.loc[table["metric"].isin(TWO_SIDED), "task"])
    fig = Figure(figsize=(max(6, 1.6 * len(tasks) + 2), 4))
    ax = fig.subplots()
    for k, strategy in enumerate(strategies):
        rows = table[table["strategy"] == strategy].set_index("task").reindex(tasks)
        sign = np.where(rows["higher_is_better"].fillna(True).astype(bool) | rows.index.isin(two_sided), 1.0, -1.0)
        value = 100 * sign * rows["rel_delta"].to_numpy(dtype=float)
        low = 100 * sign * rows.get("rel_ci_low", pd.Series(math.nan, index=rows.index)).to_numpy(dtype=float)
        high = 100 * sign * rows.get("rel_ci_high", pd.Series(math.nan, index=rows.index)).to_numpy(dtype=float)
        errors = np.nan_to_num(np.abs(np.vstack([value - np.minimum(low, high), np.maximum(low, high) - value])))
        ax.bar(
            np.arange(len(tasks)) + (k - (len(strategies) - 1) / 2) * width,
            value,
            width,
            yerr=errors,
            capsize=3,
            label=strategy,
        )
    ax.axhline(0, color="black", linewidth=0.8)
    labels = [
        f"{t.removeprefix('forgetting_')}\n{m}" + ("\n(0 is best)" if m in TWO_SIDED else "")
        for t, m in dict.fromkeys(zip(table["task"], table["metric"]))
    ]
    ax.set_xticks(range(len(tasks)), labels, fontsize=8)
    ax.set_ylabel("change vs base, % (up = better)")
    ax.set_title("Benchmark change by strategy (95% paired bootstrap CI)")
    ax.legend(fontsize=8)
    return _png(fig)


def pareto_plot(summary: pd.DataFrame) -> bytes | None:
    """Target-task gain vs forgetting; the Pareto front is a dashed line; WiSE-FT alphas a dotted curve."""
    if summary.empty or summary["target_gain"].isna().all():
        return None
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    finals = summary[summary["variant"] == "final"]
    for row in finals.itertuples():
        ax.scatter(100 * row.forgetting, row.target_gain, s=60, zorder=3, label=row.strategy)
    for _, group in summary.groupby("strategy", sort=False):
        if len(group) < 2:
            continue
        curve = pd.concat(
            [
                pd.DataFrame([{"alpha": 0.0, "forgetting": 0.0, "target_gain": 0.0}]),
                group[["alpha", "forgetting", "target_gain"]],
            ]
        ).sort_values("alpha")
        ax.plot(100 * curve["forgetting"], curve["target_gain"], ":", marker=".", color="gray", zorder=2)
        for row in curve.itertuples():
            ax.annotate(
                f"α={row.alpha:g}",
                (100 * row.forgetting, row.target_gain),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, -8),
            )
    front = summary[summary["pareto"]].sort_values("forgetting")
    ax.plot(100 * front["forgetting"], front["target_gain"], "--", color="black", linewidth=1, label="Pareto front")
    ax.set_xlabel("forgetting, % (mean loss on general benchmarks)")
    ax.set_ylabel("target-task gain (absolute, good direction up)")
    ax.set_title("What each strategy bought, and what it cost")
    ax.legend(fontsize=8)
    return _png(fig)


def loss_plot(run_dir: Path, units: pd.DataFrame) -> bytes | None:
    """Training loss per optimizer step of every finished unit."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    drawn = 0
    for row in units.itertuples():
        path = run_dir / "units" / row.unit / "train" / "metrics.jsonl"
        if not path.is_file():
            continue
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        steps = [(r["step"], r["loss"]) for r in records if "loss" in r]
        if steps:
            ax.plot(*zip(*steps), label=row.unit, linewidth=1)
            drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("response loss (nats/token)")
    ax.set_yscale("log")
    ax.set_title("Training loss")
    ax.legend(fontsize=7)
    return _png(fig)
