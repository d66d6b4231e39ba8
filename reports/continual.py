"""Continual (multi-stage) SFT: the accuracy matrix, ACC / BWT / FWT, general-suite forgetting after each stage
and forgetting curves within one fine-tune, with paired bootstrap CIs over documents and the spread over seeds.

Pure functions of per-document tables; how the stages were trained is not their business. The input is the
layout of reports/tidy.py's `examples` plus a position column, one row per scored item:

    strategy, seed, stage, task, metric, doc, value[, weight]        (`step` instead of `stage` for curves)

`stage` 0 is the base model (before any stage), stage i (1..T) the model after stage i. `tasks`, an argument,
lists the T stage target tasks in stage order: task j is learned at stage j. `doc` is lm-eval's `doc_id`,
`value` the sample's metric value and `weight` (default 1) its weight in the task's score: bytes for bits per
byte; an IFEval prompt gives one row per instruction under one doc, so a prompt is resampled as a whole. A
task's score is the weighted mean over its rows (lm-eval's aggregate). tidy.example_rows makes these rows from
an eval.json with any labels, and `with_base` copies the base model's rows (evaluated once) into stage 0:

    stage_rows = [*example_rows(eval_json, {"strategy": "naive", "seed": 0, "stage": 1}), ...]
    examples = with_base(pd.DataFrame(stage_rows), pd.DataFrame(example_rows(base_json, {})))

Every (strategy, seed) needs every task at every stage 0..T on the same documents (paired statistics compare
a document with itself), else a one-line UserError names the first missing cell.

Outputs, one row per ... (`per_seed` maps seed -> value; `seed_std` is NaN with one seed):
    continual_metrics -> cells      strategy, stage, task, metric, learned_at, value, ci_low, ci_high,
                                    seed_std, per_seed, seeds, docs            (R[i][j]: i = stage, j = task)
                      -> transfer   strategy, metric (ACC/BWT/FWT), value, ci_low, ci_high, seed_std,
                                    per_seed, seeds, tasks
    score_changes     -> changes    strategy, stage|step, task, metric, value, ci_low, ci_high, base, delta,
                                    delta_ci_low, delta_ci_high, seed_std, per_seed, seeds, docs

Bootstrap: each replicate resamples every task's doc ids once (tasks independently) and uses the same
resampled docs for every stage (or step) and seed, so differences between stages are paired; seeds are
averaged inside each replicate (reports/stats.py's conventions: multinomial counts, percentile interval,
a fresh `np.random.default_rng(seed)` per strategy, so strategies see the same resamples of the same docs).
The formulas and citations are in DEFINITIONS, the text for the report. Figures are matplotlib Figures
(no pyplot); the report writer turns them into PNGs.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib import rcParams
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from forgetting.harness.errors import UserError
from forgetting.reports.render import interval, number
from forgetting.reports.stats import percentile_interval, resample_counts

DEFINITIONS = (
    "R[i][j] is the score on stage task j after stage i (i = 0: the base model before any stage; task j is "
    "learned at stage j; j = 1..T), the weighted mean over the task's documents, averaged over seeds. "
    "Average accuracy ACC = (1/T) Σ_j R[T][j]: every task's score after the last stage. "
    "Backward transfer BWT = (1/(T−1)) Σ_{j=1..T−1} (R[T][j] − R[j][j]): how much the later stages changed "
    "the earlier tasks from just after each was learned (< 0: forgetting). "
    "Forward transfer FWT = (1/(T−1)) Σ_{j=2..T} (R[j−1][j] − b_j): how much the earlier stages changed a task "
    "before it was learned, with b_j = R[0][j], the pretrained base model's score (Lopez-Paz & Ranzato 2017 "
    "define b_j as a randomly initialised model's score; here the starting point is the pretrained base). "
    "ACC, BWT and FWT are from Lopez-Paz & Ranzato, 'Gradient Episodic Memory for Continual Learning', "
    "NeurIPS 2017 (arXiv:1706.08840). With a single stage (T = 1) BWT and FWT are undefined and shown as NaN.\n\n"
    "General-suite forgetting after stage i, per general metric: score after stage i − base score, as measured "
    "(for a lower-is-better metric such as bits per byte a positive change is a loss). Within a fine-tune the "
    "same is computed per evaluated checkpoint step (step 0: the base model). Target loss against general loss "
    "across checkpoints shows the relation Kalajdzievski 2024 reports ('Scaling Laws for Forgetting When "
    "Fine-Tuning Large Language Models', arXiv:2401.05605): with LoRA, forgetting rises linearly as the "
    "fine-tuning loss falls.\n\n"
    "Intervals are 95% percentile bootstrap intervals (Efron & Tibshirani 1993) over documents: each replicate "
    "resamples every task's documents once and scores the same resampled documents at every stage, so "
    "differences between stages are paired; seeds are averaged inside each replicate. The spread over seeds is "
    "the sample standard deviation (ddof = 1) of the per-seed values, which are listed too."
)


def _short(task: str) -> str:
    return task.removeprefix("forgetting_")


# ---------------------------------------------------------------- metrics of a matrix (pure numpy)


def _matrix_array(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim < 2 or R.shape[-2] != R.shape[-1] + 1 or R.shape[-1] < 1:
        raise ValueError(f"R must have shape (..., T+1, T): row 0 the base model, row i after stage i; got {R.shape}")
    return R


def _scalar(values: np.ndarray):
    """A float for one matrix, an array for a stack of them (seeds, bootstrap replicates)."""
    return float(values) if np.ndim(values) == 0 else values


def average_accuracy(R):
    """ACC = (1/T) Σ_j R[T][j] of R shaped (..., T+1, T) (row 0: base; column j-1: task j)."""
    R = _matrix_array(R)
    return _scalar(R[..., -1, :].mean(-1))


def backward_transfer(R):
    """BWT = (1/(T-1)) Σ_{j=1..T-1} (R[T][j] - R[j][j]); NaN for T = 1 (no earlier task to look back on)."""
    R = _matrix_array(R)
    T = R.shape[-1]
    if T < 2:
        return _scalar(np.full(R.shape[:-2], math.nan))
    j = np.arange(1, T)  # the stage that learned task j is row j; task j is column j - 1
    return _scalar((R[..., T, j - 1] - R[..., j, j - 1]).mean(-1))


def forward_transfer(R):
    """FWT = (1/(T-1)) Σ_{j=2..T} (R[j-1][j] - R[0][j]); NaN for T = 1 (no task learned after another)."""
    R = _matrix_array(R)
    T = R.shape[-1]
    if T < 2:
        return _scalar(np.full(R.shape[:-2], math.nan))
    j = np.arange(2, T + 1)
    return _scalar((R[..., j - 1, j - 1] - R[..., 0, j - 1]).mean(-1))


TRANSFER = {"ACC": average_accuracy, "BWT": backward_transfer, "FWT": forward_transfer}


# ---------------------------------------------------------------- per-document tables -> arrays


def with_base(examples: pd.DataFrame, base: pd.DataFrame, by: str = "stage") -> pd.DataFrame:
    """`examples` plus the base model's per-document rows as `by` 0 of every (strategy, seed) in `examples`
    (the base is evaluated once; its own strategy, seed and position labels, if any, are replaced)."""
    _require(examples, by)
    if (examples[by] == 0).any():
        raise UserError(f"continual: the table already has {by} 0 rows; add the base model once")
    runs = examples[["strategy", "seed"]].drop_duplicates()
    base = base.drop(columns=[c for c in ("strategy", "seed", by) if c in base.columns])
    return pd.concat([examples, runs.merge(base, how="cross").assign(**{by: 0})], ignore_index=True)


def _require(examples: pd.DataFrame, by: str, *more: str) -> None:
    missing = [c for c in ("strategy", "seed", by, "task", "doc", "value", *more) if c not in examples.columns]
    if missing:
        raise UserError(f"continual: the per-document table lacks column(s) {', '.join(missing)}")


def _doc_sums(rows: pd.DataFrame, by: str, seeds: list, positions: list, where: str):
    """Per-document Σ w·v and Σ w, each seeds x positions x docs, and the doc ids; every cell must hold
    the same documents (else the comparison would not be paired)."""
    weight = rows["weight"].astype(float) if "weight" in rows else pd.Series(1.0, index=rows.index)
    rows = rows.assign(_wv=weight * rows["value"].astype(float), _w=weight)
    docs = sorted(rows["doc"].unique())
    if not docs:
        raise UserError(f"continual: {where}: no scores at any {by}")
    present = rows.groupby(["seed", by])["doc"].nunique()
    for seed in seeds:
        for position in positions:
            n = int(present.get((seed, position), 0))
            if n < len(docs):
                found = f"{n} of the {len(docs)} documents" if n else "no scores"
                raise UserError(f"continual: {where}, seed {seed}, {by} {position}: {found} (need all at every {by})")
    grid = pd.MultiIndex.from_product([seeds, positions, docs], names=["seed", by, "doc"])
    sums = rows.groupby(["seed", by, "doc"])[["_wv", "_w"]].sum().reindex(grid)
    shape = (len(seeds), len(positions), len(docs))
    return sums["_wv"].to_numpy().reshape(shape), sums["_w"].to_numpy().reshape(shape), docs


def _replicates(wv: np.ndarray, w: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Scores of every bootstrap replicate, iters x seeds x positions (counts: iters x docs)."""
    return np.einsum("spd,bd->bsp", wv, counts) / np.einsum("spd,bd->bsp", w, counts)


def _one_metric(rows: pd.DataFrame, task: str, metrics: dict | None, where: str) -> tuple[pd.DataFrame, str]:
    """The task's rows on its compared metric: metrics[task], or the only metric the table has for it."""
    if "metric" not in rows:
        return rows, (metrics or {}).get(task, "")
    names = sorted(rows["metric"].dropna().unique())
    wanted = (metrics or {}).get(task)
    if wanted is None and len(names) > 1:
        raise UserError(f"continual: {where} has several metrics ({', '.join(names)}); pass metrics={{task: name}}")
    wanted = wanted if wanted is not None else (names[0] if names else "")
    if names and wanted not in names:
        raise UserError(f"continual: {where} has no metric {wanted!r} (it has {', '.join(names)})")
    return rows[rows["metric"] == wanted] if names else rows, wanted


def _spread(per_seed: np.ndarray) -> float:
    return float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan


# ---------------------------------------------------------------- the accuracy matrix, ACC, BWT, FWT


def _check_stages(examples: pd.DataFrame, tasks: list[str]) -> None:
    if not tasks:
        raise UserError("continual: no stage tasks given")
    if len(set(tasks)) != len(tasks):
        raise UserError(f"continual: a task appears twice in the stage tasks {tasks}; each stage needs its own task")
    extra = sorted(set(examples["stage"]) - set(range(len(tasks) + 1)))
    if extra:
        raise UserError(f"continual: stage {extra[0]} in the table, but {len(tasks)} stage tasks give stages 0..T")


def _strategy_matrix(frame: pd.DataFrame, strategy, tasks, metrics, iters: int, seed: int):
    """One strategy's R per seed (seeds x T+1 x T), its bootstrap replicates (iters x seeds x T+1 x T),
    the seeds, the metric and doc count per task."""
    seeds, positions = sorted(frame["seed"].unique()), list(range(len(tasks) + 1))
    rng = np.random.default_rng(seed)
    points, reps, names, n_docs = [], [], [], []
    for task in tasks:
        where = f"strategy {strategy}, task {task}"
        rows, metric = _one_metric(frame[frame["task"] == task], task, metrics, where)
        wv, w, docs = _doc_sums(rows, "stage", seeds, positions, where)
        points.append(wv.sum(-1) / w.sum(-1))
        reps.append(_replicates(wv, w, resample_counts(len(docs), iters, rng)))
        names.append(metric)
        n_docs.append(len(docs))
    return np.stack(points, -1), np.stack(reps, -1), seeds, names, n_docs


def continual_metrics(
    examples: pd.DataFrame,
    tasks: list[str],
    metrics: dict[str, str] | None = None,
    iters: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cells, transfer): the accuracy matrix cell by cell and ACC / BWT / FWT, per strategy, each with the mean
    over seeds, a paired bootstrap CI, the std over seeds and the per-seed values (layouts: module docstring).
    `metrics` names the compared metric of a task the table scores with several (else its only one)."""
    _require(examples, "stage")
    _check_stages(examples, tasks)
    chosen = examples[examples["task"].isin(tasks)]
    cells, transfer = [], []
    for strategy in dict.fromkeys(examples["strategy"]):
        frame = chosen[chosen["strategy"] == strategy]
        R, reps, seeds, names, n_docs = _strategy_matrix(frame, strategy, tasks, metrics, iters, seed)
        low, high = percentile_interval(reps.mean(1), level)
        for (i, j), value in np.ndenumerate(R.mean(0)):
            cells.append(
                {"strategy": strategy, "stage": i, "task": tasks[j], "metric": names[j], "learned_at": j + 1}
                | _summary(value, low[i, j], high[i, j], R[:, i, j], seeds)
                | {"docs": n_docs[j]}
            )
        for name, fn in TRANSFER.items():
            per_seed, boot = fn(R), fn(reps.mean(1))
            low_m, high_m = percentile_interval(boot, level) if np.isfinite(boot).all() else (math.nan, math.nan)
            transfer.append(
                {"strategy": strategy, "metric": name}
                | _summary(per_seed.mean(), low_m, high_m, per_seed, seeds)
                | {"tasks": len(tasks)}
            )
    return pd.DataFrame(cells), pd.DataFrame(transfer)


def _summary(value, low, high, per_seed: np.ndarray, seeds: list) -> dict:
    return {
        "value": float(value),
        "ci_low": float(low),
        "ci_high": float(high),
        "seed_std": _spread(per_seed),
        "per_seed": {int(s): float(v) for s, v in zip(seeds, per_seed)},
        "seeds": len(seeds),
    }


def matrix(cells: pd.DataFrame, strategy: str, seed: int | None = None) -> pd.DataFrame:
    """R of one strategy as a (stage x task) frame, tasks in stage order: the mean over seeds, or one seed's."""
    rows = cells[cells["strategy"] == strategy]
    if rows.empty:
        raise UserError(f"continual: no cells for strategy {strategy}")
    values = rows["value"] if seed is None else rows["per_seed"].map(lambda d: d.get(seed, math.nan))
    tasks = list(dict.fromkeys(rows.sort_values("learned_at")["task"]))
    return rows.assign(_v=values).pivot(index="stage", columns="task", values="_v")[tasks].sort_index()


# ---------------------------------------------------------------- general-suite forgetting and curves


def score_changes(
    examples: pd.DataFrame, by: str = "stage", iters: int = 2000, seed: int = 0, level: float = 0.95
) -> pd.DataFrame:
    """Per (strategy, position, task, metric): the score (mean over seeds) and its change from position 0 (the
    base model), each with a paired bootstrap CI, and the change's std over seeds and per-seed values.
    by="stage": general-suite forgetting after each stage; by="step": curves within one fine-tune."""
    _require(examples, by, "metric")
    out = []
    for strategy in dict.fromkeys(examples["strategy"]):
        frame = examples[examples["strategy"] == strategy]
        seeds, positions = sorted(frame["seed"].unique()), sorted(frame[by].unique())
        if positions[0] != 0:
            raise UserError(f"continual: strategy {strategy} has no {by} 0 (the base model); add it with with_base")
        rng, counts_of = np.random.default_rng(seed), {}
        for (task, metric), rows in frame.groupby(["task", "metric"], sort=True):
            where = f"strategy {strategy}, task {task}, metric {metric}"
            wv, w, docs = _doc_sums(rows, by, seeds, positions, where)
            if (task, len(docs)) not in counts_of:  # a task's metrics share its documents: resample them once
                counts_of[(task, len(docs))] = resample_counts(len(docs), iters, rng)
            point, reps = wv.sum(-1) / w.sum(-1), _replicates(wv, w, counts_of[(task, len(docs))]).mean(1)
            low, high = percentile_interval(reps, level)
            d_low, d_high = percentile_interval(reps - reps[:, :1], level)
            for k, position in enumerate(positions):
                change = point[:, k] - point[:, 0]
                out.append(
                    {"strategy": strategy, by: position, "task": task, "metric": metric}
                    | _summary(point[:, k].mean(), low[k], high[k], change, seeds)
                    | {"base": float(point[:, 0].mean()), "delta": float(change.mean())}
                    | {"delta_ci_low": float(d_low[k]), "delta_ci_high": float(d_high[k]), "docs": len(docs)}
                )
    return pd.DataFrame(out)


def general_forgetting(examples: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """General-suite forgetting after each stage: score_changes(examples, by="stage"); `per_seed` and
    `seed_std` are of the change (after stage i - base)."""
    return score_changes(examples, by="stage", **kwargs)


def forgetting_curves(examples: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """Scores at each evaluated checkpoint step of a fine-tune (step 0: the base): score_changes(by="step")."""
    return score_changes(examples, by="step", **kwargs)


# ---------------------------------------------------------------- report tables (display strings)


def matrix_table(cells: pd.DataFrame, strategy: str, digits: int = 3) -> pd.DataFrame:
    """R of one strategy for the report: a row per stage, a column per task, 'value [CI]' (mean over seeds)."""
    rows = cells[cells["strategy"] == strategy]
    grid = matrix(cells, strategy)
    tasks = list(grid.columns)
    learned = {i: t for t, i in zip(rows["task"], rows["learned_at"])}
    table = {"after stage": [f"{i} ({_short(learned[i])})" if i else "0 (base)" for i in grid.index]}
    for task in tasks:
        col = rows[rows["task"] == task].set_index("stage").loc[grid.index]
        table[_short(task)] = [
            f"{number(v, digits)} {interval(lo, hi)}" for v, lo, hi in zip(col["value"], col["ci_low"], col["ci_high"])
        ]
    return pd.DataFrame(table)


def _per_seed_text(per_seed: dict) -> str:
    return ", ".join(f"{s}: {number(v)}" for s, v in per_seed.items())


def transfer_table(transfer: pd.DataFrame) -> pd.DataFrame:
    """ACC / BWT / FWT per strategy for the report: value [paired CI], std over seeds, per-seed values."""
    return pd.DataFrame(
        {
            "strategy": transfer["strategy"],
            "metric": transfer["metric"],
            "value [95% CI]": [
                f"{number(v)} {interval(lo, hi)}"
                for v, lo, hi in zip(transfer["value"], transfer["ci_low"], transfer["ci_high"])
            ],
            "seed std": transfer["seed_std"].map(number),
            "per seed": transfer["per_seed"].map(_per_seed_text),
        }
    )


def general_table(changes: pd.DataFrame, by: str = "stage") -> pd.DataFrame:
    """General-suite forgetting for the report: per strategy, benchmark and stage after 0, the base score, the
    score after (mean over seeds ± std of the change) and the change with its paired CI."""
    rows = changes[changes[by] != 0]
    return pd.DataFrame(
        {
            "strategy": rows["strategy"],
            "benchmark": rows["task"].map(_short) + " (" + rows["metric"] + ")",
            by: rows[by],
            "base": rows["base"].map(number),
            "after": [
                number(v) + (f" ± {s:.3f}" if math.isfinite(s) else "") for v, s in zip(rows["value"], rows["seed_std"])
            ],
            "change [95% CI]": [
                f"{d:+.3f} {interval(lo, hi)}"
                for d, lo, hi in zip(rows["delta"], rows["delta_ci_low"], rows["delta_ci_high"])
            ],
        }
    )


# ---------------------------------------------------------------- figures


def _grid(n: int, width: float, height: float):
    """A figure with n panels, at most three a row (the unused places of the last row removed)."""
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig, list(axes[:n])


def _colours(strategies) -> dict:
    """One colour per strategy, the same in every panel (a panel without the first strategy keeps the rest's)."""
    cycle = rcParams["axes.prop_cycle"].by_key()["color"]
    return {s: cycle[k % len(cycle)] for k, s in enumerate(dict.fromkeys(strategies))}


def matrix_heatmap(cells: pd.DataFrame) -> Figure:
    """R as an annotated heatmap, one panel per strategy (rows: stages, base on top; columns: tasks) and one
    shared colour bar; mean over seeds."""
    strategies = list(dict.fromkeys(cells["strategy"]))
    grids = [matrix(cells, s) for s in strategies]
    T = grids[0].shape[1]
    low, high = float(np.nanmin(cells["value"])), float(np.nanmax(cells["value"]))
    fig, axes = _grid(len(strategies), 1.1 * T + 2.2, 0.55 * (T + 1) + 1.4)
    for ax, strategy, grid in zip(axes, strategies, grids):
        image = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=low, vmax=high, aspect="auto")
        for (i, j), value in np.ndenumerate(grid.to_numpy()):
            dark = value < (low + high) / 2  # viridis is dark at the low end: white text there
            ax.text(j, i, number(value, 2), ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(T), [f"{j + 1}: {_short(t)}" for j, t in enumerate(grid.columns)], fontsize=8)
        ax.set_yticks(range(T + 1), ["base"] + [f"after {i}" for i in range(1, T + 1)], fontsize=8)
        ax.set_title(strategy, fontsize=10)
    fig.colorbar(image, ax=axes, label="score (mean over seeds)")
    fig.suptitle("Accuracy matrix R[i][j]: after stage i (rows), on task j (columns)")
    return fig


def _line_panels(table: pd.DataFrame, x: str, y: str, xlabel: str) -> Figure:
    """One panel per (task, metric), one line per strategy with its CI band (where the interval columns
    exist and are finite), the stage that learned the task (`learned_at`, if given) shaded."""
    band = ("ci_low", "ci_high") if y == "value" else (f"{y}_ci_low", f"{y}_ci_high")
    keys = list(dict.fromkeys(zip(table["task"], table["metric"])))
    colours = _colours(table["strategy"])
    fig, axes = _grid(len(keys), 4.2, 3.2)
    for ax, (task, metric) in zip(axes, keys):
        panel = table[(table["task"] == task) & (table["metric"] == metric)]
        for strategy, line in panel.groupby("strategy", sort=False):
            if line[x].duplicated().any():
                raise UserError(f"continual: {strategy}, {task} has several rows per {x}; give one (seeds averaged)")
            line = line.sort_values(x)
            ax.plot(line[x], line[y], marker="o", markersize=3, color=colours[strategy], label=strategy)
            if all(c in line for c in band) and np.isfinite(line[list(band)].to_numpy(dtype=float)).all():
                ax.fill_between(line[x], line[band[0]], line[band[1]], color=colours[strategy], alpha=0.2, linewidth=0)
        if "learned_at" in panel:
            learned = int(panel["learned_at"].iloc[0])
            ax.axvspan(learned - 0.5, learned + 0.5, color="gray", alpha=0.12, linewidth=0)
        ax.set_title(f"{_short(task)} ({metric})", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
    axes[0].set_ylabel("score" if y == "value" else f"{y} vs base")
    fig.legend(
        handles=[Line2D([], [], color=c, marker="o", markersize=3, label=s) for s, c in colours.items()],
        loc="outside lower center",
        ncols=min(len(colours), 6),
        fontsize=8,
    )
    return fig


def stage_lines(cells: pd.DataFrame, y: str = "value") -> Figure:
    """Each task's score across stages (0 = base), one line per strategy with its 95% CI band; takes
    continual_metrics' cells (the stage that learned the task is shaded) or general_forgetting's rows."""
    fig = _line_panels(cells, "stage", y, "after stage (0 = base)")
    for ax in fig.axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def curves_plot(curves: pd.DataFrame, y: str = "value") -> Figure:
    """Forgetting curves within a fine-tune: one panel per (task, metric), strategies overlaid, x = training step,
    y = score (mean over seeds) with its 95% CI band. Input: forgetting_curves' rows, or any frame with
    strategy, step, task, metric, value[, ci_low, ci_high], one row per (strategy, step, task, metric)."""
    return _line_panels(curves, "step", y, "training step")


def loss_scatter(
    points: pd.DataFrame,
    x: str = "target_loss",
    y: str = "general_loss",
    xlabel: str = "target held-out loss (nats/token)",
    ylabel: str = "general loss",
) -> Figure:
    """Target loss against general loss across checkpoints, one colour per strategy, each run's checkpoints
    joined in step order; the legend gives each strategy's Pearson r. Input: strategy, seed, step, x, y."""
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    colours = _colours(points["strategy"])
    for strategy, group in points.groupby("strategy", sort=False):
        colour = colours[strategy]
        for _, run in group.groupby("seed"):
            run = run.sort_values("step")
            ax.plot(run[x], run[y], color=colour, linewidth=0.8, alpha=0.5)
        r = _pearson(group[x].to_numpy(dtype=float), group[y].to_numpy(dtype=float))
        label = strategy + (f" (r = {r:.2f})" if math.isfinite(r) else "")
        ax.scatter(group[x], group[y], color=colour, s=18, zorder=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("Target loss vs general loss across checkpoints")
    ax.legend(fontsize=8)
    return fig


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r, NaN for fewer than three points or a constant coordinate (no relation to speak of)."""
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])
