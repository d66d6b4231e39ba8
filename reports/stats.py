"""Paired statistics on per-example scores: bootstrap CIs of deltas, example-level forgetting, Pareto fronts.

The bootstrap resamples *documents* (an IFEval prompt with three instructions moves as one), keeps each
resampled document's before and after scores together (paired), and averages the seeds of a strategy
inside every replicate, so the interval reflects which examples happened to be in the benchmark.
Aggregates are weighted means (weight 1, or bytes for bits per byte), which is how lm-eval aggregates.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def align(base: pd.DataFrame, seeds: list[pd.DataFrame]) -> pd.DataFrame:
    """One row per item: doc, weight, base value and one after-value column per seed (items in all of them)."""
    table = base.set_index("item")[["doc", "weight", "value"]].rename(columns={"value": "base"})
    for k, after in enumerate(seeds):
        table = table.join(after.set_index("item")["value"].rename(f"after_{k}"), how="inner")
    return table


def resample_counts(n_docs: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of n_docs documents is drawn in each bootstrap replicate (iters x n_docs): n_docs draws
    with replacement, as a multinomial so a weighted mean over documents is one matrix product."""
    return rng.multinomial(n_docs, np.full(n_docs, 1 / n_docs), size=iters)


def percentile_interval(replicates: np.ndarray, level: float = 0.95, axis: int = 0):
    """The percentile bootstrap interval (low, high) of replicates along `axis`."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail], axis=axis)
    return low, high


def paired_bootstrap(table: pd.DataFrame, iters: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Delta (after - base, seeds averaged) and relative delta, each with a percentile bootstrap CI."""
    after_cols = [c for c in table.columns if c.startswith("after_")]
    per_doc = (
        table.assign(wb=table["weight"] * table["base"], **{f"w{c}": table["weight"] * table[c] for c in after_cols})
        .groupby("doc")
        .sum()
    )
    weights = per_doc["weight"].to_numpy()
    base = per_doc["wb"].to_numpy()
    after = per_doc[[f"w{c}" for c in after_cols]].to_numpy()
    point_base = base.sum() / weights.sum()
    point_delta = (after.sum(0) / weights.sum()).mean() - point_base
    counts = resample_counts(len(weights), iters, np.random.default_rng(seed))
    w = counts @ weights
    b = (counts @ base) / w
    deltas = ((counts @ after) / w[:, None]).mean(1) - b
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = deltas / np.abs(b)
    low, high = percentile_interval(deltas, level)
    rel_ok = rel[np.isfinite(rel)]
    rel_low, rel_high = percentile_interval(rel_ok, level) if len(rel_ok) else (math.nan, math.nan)
    return {
        "delta": float(point_delta),
        "ci_low": float(low),
        "ci_high": float(high),
        "rel_ci_low": float(rel_low),
        "rel_ci_high": float(rel_high),
        "items": int(len(table)),
    }


def example_transitions(table: pd.DataFrame, higher_is_better: bool = True) -> dict:
    """For 0/1 scores: share of base-good items now bad (forgot) and of base-bad now good (learned).

    Good is 1 for a higher-is-better score (a correct answer) and 0 for a lower-is-better one (a failure
    rate such as leak_rate: 1 marks a leaking answer), so a rate going up is forgetting, not learning.
    """
    after_cols = [c for c in table.columns if c.startswith("after_")]
    values = table[["base", *after_cols]].to_numpy()
    if not np.isin(values, (0.0, 1.0)).all():
        return {"forgot": math.nan, "learned": math.nan}
    good = 1.0 if higher_is_better else 0.0
    was_good, was_bad = table["base"] == good, table["base"] != good
    forgot = np.mean([(table.loc[was_good, c] != good).mean() for c in after_cols]) if was_good.any() else math.nan
    learned = np.mean([(table.loc[was_bad, c] == good).mean() for c in after_cols]) if was_bad.any() else math.nan
    return {"forgot": float(forgot), "learned": float(learned)}


def stderr_ci(delta: float, base_stderr: float, after_stderrs: list[float], z: float = 1.959964) -> tuple[float, float]:
    """Unpaired normal CI of a delta from lm-eval's stderrs (after: the mean over seeds)."""
    after_se = math.sqrt(sum(s * s for s in after_stderrs)) / len(after_stderrs)
    half = z * math.sqrt(base_stderr**2 + after_se**2)
    return delta - half, delta + half


def pareto_front(points: pd.DataFrame, cost: str, gain: str) -> pd.Series:
    """True for points no other point beats (lower or equal cost and higher or equal gain, one strictly)."""
    c, g = points[cost].to_numpy(), points[gain].to_numpy()
    front = []
    for i in range(len(points)):
        dominated = ((c <= c[i]) & (g >= g[i]) & ((c < c[i]) | (g > g[i]))).any()
        front.append(bool(not dominated and np.isfinite(c[i]) and np.isfinite(g[i])))
    return pd.Series(front, index=points.index)
