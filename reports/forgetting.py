"""The forgetting report's tables: per benchmark and strategy, what the fine-tune cost and what it taught.

`benchmark_table` has one row per (strategy, variant, task) on the task's primary metric: base score,
after score (mean over seeds, with the spread across seeds), delta and relative delta with a paired
bootstrap CI and an unpaired CI from lm-eval's stderrs, example-level forgetting / new learning, and the
benchmark's `loss` (`benchmark_loss`). `strategy_table` condenses it per strategy: forgetting (the mean loss
over the non-target benchmarks), target-task gain in the target metric's good direction, Pareto membership
and a ranking. The formulas are stated in README "### Reports" and in the report text (`LOSS_TEXT`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from forgetting.harness.experiment import primary_metric
from forgetting.reports.stats import (
    align,
    example_transitions,
    paired_bootstrap,
    pareto_front,
    stderr_ci,
)


def primary_metrics(scores: pd.DataFrame, exp) -> dict[str, str]:
    """task -> the metric compared, for every task the base model was scored on."""
    base = scores[scores["model"] == "base"]
    return {
        task: primary_metric(task, list(group["metric"]), exp.primary_metrics)
        for task, group in base.groupby("task", sort=True)
    }


# Metrics where drifting either way from the base is the loss: answer length (longer is not better).
TWO_SIDED = {"response_words"}

LOSS_TEXT = (
    "A benchmark's loss, with b its base score and a its score after (> 0: worse than the base): "
    "for a share of examples (every example scored 0 or 1), the share of good outcomes lost, "
    "(g_b − g_a) / g_b with g = score when higher is better and g = 1 − score for a failure rate such as "
    "leak or empty rate (so a rate from 0 counts), or g_b − g_a when g_b = 0; for answer length in words, "
    "|ln((a + 1) / (b + 1))|, so longer and shorter both count; for other metrics (bits per byte, "
    "perplexity), the relative change in the bad direction, (b − a) / |b| when higher is better and "
    "(a − b) / |b| when lower is better, left out when b = 0."
)


def gain(delta: float, higher_is_better: bool) -> float:
    """A change in the metric's good direction (> 0: better)."""
    return delta if higher_is_better else -delta


def benchmark_loss(metric: str, higher_is_better: bool, proportion: bool, base: float, after: float) -> float:
    """What the fine-tune cost on one benchmark (> 0: worse than the base); the formulas of LOSS_TEXT."""
    if metric in TWO_SIDED:
        # a log ratio, so twice and half as long cost the same; +1 word keeps all-empty answers finite
        return abs(math.log((after + 1) / (base + 1)))
    if proportion:
        # Relative to the share of good outcomes, not to the score: a failure rate and its complement (leak
        # rate, clean rate) cost the same, and a rate from 0 has a finite loss. From g_b = 0 nothing can be
        # lost, and the absolute change (a gain or 0) stands in.
        good_base, good_after = (base, after) if higher_is_better else (1 - base, 1 - after)
        return (good_base - good_after) / (good_base if good_base > 0 else 1.0)
    if base == 0:
        return math.nan  # an unbounded metric has no relative change from 0
    return -gain(after - base, higher_is_better) / abs(base)


def _nanmean(values: list[float]) -> float:
    """Mean of the finite values (an unbounded metric whose base score is 0 has no loss)."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def benchmark_table(scores: pd.DataFrame, examples: pd.DataFrame, exp, iters: int = 2000) -> pd.DataFrame:
    """One row per (strategy, variant, benchmark): base and after scores, the delta with its intervals, the
    benchmark's loss term, and (with per-example scores) the paired bootstrap CI and example transitions."""
    rows = []
    base_scores = scores[scores["model"] == "base"].set_index(["task", "metric"])
    tuned = scores[scores["model"] == "tuned"]
    for task, metric in primary_metrics(scores, exp).items():
        base_row = base_scores.loc[(task, metric)]
        base_examples = _examples_of(examples, "base", task, metric)
        # a share of examples: known from the base's per-example scores (none saved: treated as unbounded)
        proportion = bool(len(base_examples)) and bool(np.isin(base_examples["value"], (0.0, 1.0)).all())
        runs = tuned[(tuned["task"] == task) & (tuned["metric"] == metric)]
        for (strategy, variant), group in runs.groupby(["strategy", "variant"], sort=False):
            group = group.sort_values("seed")
            row = _benchmark_row(strategy, variant, group, base_row, task, metric, proportion, exp)
            seed_examples = [_examples_of(examples, unit, task, metric, variant) for unit in group["unit"]]
            if len(base_examples) and all(len(s) for s in seed_examples):
                table = align(base_examples, seed_examples)
                boot = paired_bootstrap(table, iters=iters)
                row |= {k: boot[k] for k in ("ci_low", "ci_high", "rel_ci_low", "rel_ci_high", "items")}
                row |= example_transitions(table, row["higher_is_better"])
            rows.append(row)
    return pd.DataFrame(rows)


def _examples_of(examples: pd.DataFrame, unit: str, task: str, metric: str, variant: str | None = None):
    """One unit's per-example scores on one benchmark (of one variant, when given)."""
    chosen = (examples["unit"] == unit) & (examples["task"] == task) & (examples["metric"] == metric)
    if variant is not None:
        chosen &= examples["variant"] == variant
    return examples[chosen]


def _benchmark_row(strategy, variant, group: pd.DataFrame, base_row, task, metric, proportion, exp) -> dict:
    """The scores part of a benchmark_table row: `group` holds one strategy variant's seeds on the benchmark."""
    base = float(base_row["value"])
    hib = bool(base_row["higher_is_better"])
    after = float(group["value"].mean())
    delta = after - base
    se_low, se_high = stderr_ci(delta, float(base_row["stderr"]), list(group["stderr"].astype(float)))
    return {
        "strategy": strategy,
        "variant": variant,
        "alpha": float(group["alpha"].iloc[0]),
        "task": task,
        "metric": metric,
        "higher_is_better": hib,
        "proportion": proportion,
        "target": task in exp.target_tasks,
        "base": base,
        "after": after,
        "seeds": len(group),
        "seed_std": float(group["value"].std(ddof=1)) if len(group) > 1 else math.nan,
        "delta": delta,
        "rel_delta": delta / abs(base) if base != 0 else math.nan,
        "se_ci_low": se_low,
        "se_ci_high": se_high,
        # per seed, then averaged: the ranking's forgetting is the mean of this column (non-target rows)
        "loss": float(np.mean([benchmark_loss(metric, hib, proportion, base, v) for v in group["value"]])),
    }


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
        for _, seed_scores in tuned[(tuned["strategy"] == strategy) & (tuned["variant"] == variant)].groupby("seed"):
            values = seed_scores.set_index(["task", "metric"])["value"]
            per_seed.append(
                _nanmean(
                    [
                        benchmark_loss(
                            r.metric,
                            r.higher_is_better,
                            r.proportion,
                            base[(r.task, r.metric)],
                            values[(r.task, r.metric)],
                        )
                        for r in kept.itertuples()
                    ]
                )
            )
        target = group[group["target"]]
        rows.append(
            {
                "strategy": strategy,
                "variant": variant,
                "alpha": float(group["alpha"].iloc[0]),
                "forgetting": float(np.mean(per_seed)),  # = the mean of the benchmarks' `loss` column
                "forgetting_seed_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan,
                "target_gain": gain(float(target["delta"].iloc[0]), bool(target["higher_is_better"].iloc[0]))
                if len(target)
                else math.nan,
                "target_after": float(target["after"].iloc[0]) if len(target) else math.nan,
                "seeds": int(group["seeds"].max()),
            }
        )
    table = pd.DataFrame(rows)
    table["pareto"] = pareto_front(table.assign(_gain=table["target_gain"].fillna(0.0)), "forgetting", "_gain")
    finals = table[table["variant"] == "final"].sort_values(["forgetting", "target_gain"], ascending=[True, False])
    table["rank"] = pd.Series(range(1, len(finals) + 1), index=finals.index)
    return table
