"""The instruction-following report's tables: IFEval-style accuracy before vs after, per instruction type,
and format health (template leakage, answer length relative to the base model).

Tasks are recognised by their metrics: an IFEval-style task reports `prompt_level_strict_acc`; a format
health task reports `leak_rate` and `response_words`.
"""

from __future__ import annotations

import math

import pandas as pd

IFEVAL_METRICS = ["prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc", "inst_level_loose_acc"]
HEALTH_METRICS = ["leak_rate", "response_words", "ends_cleanly", "empty_rate"]


def _tasks_with(scores: pd.DataFrame, metric: str) -> list[str]:
    return sorted(scores.loc[scores["metric"] == metric, "task"].unique())


def before_after(scores: pd.DataFrame, tasks: list[str], metrics: list[str]) -> pd.DataFrame:
    """Rows (task, metric, strategy): base, after (mean over seeds), delta; final models only."""
    rows = []
    chosen = scores[scores["task"].isin(tasks) & scores["metric"].isin(metrics)]
    base = chosen[chosen["model"] == "base"].set_index(["task", "metric"])
    tuned = chosen[(chosen["model"] == "tuned") & (chosen["variant"] == "final")]
    for (task, metric, strategy), group in tuned.groupby(["task", "metric", "strategy"], sort=False):
        before = float(base.loc[(task, metric), "value"])
        after = float(group["value"].mean())
        rows.append(
            {
                "task": task,
                "metric": metric,
                "strategy": strategy,
                "base": before,
                "base_stderr": float(base.loc[(task, metric), "stderr"]),
                "after": after,
                "after_stderr": float(group["stderr"].mean()),
                "delta": after - before,
                "ratio": after / before if before else math.nan,
            }
        )
    return pd.DataFrame(rows)


def ifeval_table(scores: pd.DataFrame) -> pd.DataFrame:
    return before_after(scores, _tasks_with(scores, "prompt_level_strict_acc"), IFEVAL_METRICS)


def instruction_types(examples: pd.DataFrame, metric: str = "inst_level_strict_acc") -> pd.DataFrame:
    """Per IFEval instruction type: n, base accuracy and each strategy's accuracy after (final, seeds pooled)."""
    chosen = examples[(examples["metric"] == metric) & examples["instruction"].notna()]
    if chosen.empty:
        return pd.DataFrame()
    base = chosen[chosen["model"] == "base"].groupby("instruction")["value"].agg(["size", "mean"])
    table = base.rename(columns={"size": "n", "mean": "base"})
    tuned = chosen[(chosen["model"] == "tuned") & (chosen["variant"] == "final")]
    for strategy, group in tuned.groupby("strategy", sort=False):
        table[strategy] = group.groupby("instruction")["value"].mean()
    return table.reset_index()


def health_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Format leakage and length calibration: base vs after; `ratio` of response_words is after/base length."""
    return before_after(scores, _tasks_with(scores, "leak_rate"), HEALTH_METRICS)
