"""The forgetting report's tables: per benchmark and strategy, what the fine-tune cost and what it taught.

`benchmark_table` has one row per (strategy, variant, task) on the task's primary metric: base score,
after score (mean over seeds, with the spread across seeds), delta and relative delta with a paired
bootstrap CI and an unpaired CI from lm-eval's stderrs, and example-level forgetting / new learning.
`strategy_table` condenses it per strategy: forgetting (mean relative loss over the non-target
benchmarks, in each metric's good direction), target-task gain, Pareto membership and a ranking.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from reports.stats import (
    align,
    example_transitions,
    paired_bootstrap,
    pareto_front,
    stderr_ci,
)


def primary_metrics(scores: pd.DataFrame, exp) -> dict[str, str]:
    """task -> the metric compared, for every task the base model was scored on."""
    from harness.experiment import primary_metric

    base = scores[scores["model"] == "base"]
    return {task: primary_metric(task, list(group["metric"]), exp.primary_metrics) for task, group in base.groupby("task", sort=True)}


def _signed(rel: float, higher_is_better: bool) -> float:
    return rel if higher_is_better else -rel


def _nanmean(values: list[float]) -> float:
    """Mean of the finite values (a benchmark whose base score is 0 has no relative change)."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def benchmark_table(scores: pd.DataFrame, examples: pd.DataFrame, exp, iters: int = 2000) -> pd.DataFrame:
    rows = []
    base_scores = scores[scores["model"] == "base"].set_index(["task", "metric"])
    tuned = scores[scores["model"] == "tuned"]
    for task, metric in primary_metrics(scores, exp).items():
        base_row = base_scores.loc[(task, metric)]
        base_examples = examples[(examples["unit"] == "base") & (examples["task"] == task) & (examples["metric"] == metric)]
        for (strategy, variant), group in tuned[(tuned["task"] == task) & (tuned["metric"] == metric)].groupby(
                ["strategy", "variant"], sort=False):
            group = group.sort_values("seed")
            after = float(group["value"].mean())
            delta = after - float(base_row["value"])
            rel = delta / abs(base_row["value"]) if base_row["value"] != 0 else math.nan
            se_low, se_high = stderr_ci(delta, float(base_row["stderr"]), list(group["stderr"].astype(float)))
            row = {"strategy": strategy, "variant": variant, "alpha": float(group["alpha"].iloc[0]), "task": task,
                   "metric": metric, "higher_is_better": bool(base_row["higher_is_better"]),
                   "target": task == exp.target_task, "base": float(base_row["value"]), "after": after,
                   "seeds": len(group), "seed_std": float(group["value"].std(ddof=1)) if len(group) > 1 else math.nan,
                   "delta": delta, "rel_delta": rel, "se_ci_low": se_low, "se_ci_high": se_high}
            seed_examples = [examples[(examples["unit"] == unit) & (examples["variant"] == variant)
                                      & (examples["task"] == task) & (examples["metric"] == metric)]
                             for unit in group["unit"]]
            if len(base_examples) and all(len(s) for s in seed_examples):
                table = align(base_examples, seed_examples)
                boot = paired_bootstrap(table, iters=iters)
                row |= {k: boot[k] for k in ("ci_low", "ci_high", "rel_ci_low", "rel_ci_high", "items")}
                row |= example_transitions(table)
            rows.append(row)
    return pd.DataFrame(rows)


def strategy_table(benchmarks: pd.DataFrame, scores: pd.DataFrame, exp) -> pd.DataFrame:
    """Per (strategy, variant): forgetting %, its spread over seeds, target gain, Pareto front, rank."""
    if benchmarks.empty:
        return pd.DataFrame()
    rows = []
    tuned = scores[scores["model"] == "tuned"]
    base = scores[scores["model"] == "base"].set_index(["task", "metric"])["value"]
    for (strategy, variant), group in benchmarks.groupby(["strategy", "variant"], sort=False):
        kept = group[~group["target"]]
        per_seed = []
        for seed, seed_scores in tuned[(tuned["strategy"] == strategy) & (tuned["variant"] == variant)].groupby("seed"):
            values = seed_scores.set_index(["task", "metric"])["value"]
            per_seed.append(-_nanmean([_signed((values[(r.task, r.metric)] - base[(r.task, r.metric)])
                                              / abs(base[(r.task, r.metric)]), r.higher_is_better)
                                      for r in kept.itertuples() if base[(r.task, r.metric)] != 0]))
        target = group[group["target"]]
        rows.append({"strategy": strategy, "variant": variant, "alpha": float(group["alpha"].iloc[0]),
                     "forgetting": float(np.mean(per_seed)),  # = the relative loss of the seed-mean score
                     "forgetting_seed_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan,
                     "target_gain": float(target["delta"].iloc[0]) if len(target) else math.nan,
                     "target_after": float(target["after"].iloc[0]) if len(target) else math.nan,
                     "seeds": int(group["seeds"].max())})
    table = pd.DataFrame(rows)
    gain = table["target_gain"].fillna(0.0)
    table["pareto"] = pareto_front(table.assign(_gain=gain), "forgetting", "_gain")
    finals = table[table["variant"] == "final"].sort_values(["forgetting", "target_gain"], ascending=[True, False])
    table["rank"] = pd.Series(range(1, len(finals) + 1), index=finals.index)
    return table
