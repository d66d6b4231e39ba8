"""The evaluation part of each unit's model cards, refreshed whenever the report is written.

Every model of a finished unit (final/ and each WiSE-FT point) gets in its card (harness/card.py):
    model-index   this model's score on every evaluated (task, metric) with its lm-eval stderr and 95% interval;
                  per benchmark, its strategy's change from the base with the paired-bootstrap CI (the
                  forgetting report's Per benchmark row); the strategy's forgetting and target gain (its Ranking row)
    body          the same rows as tables, the instruction-following and format-health numbers with their
                  intervals, and the evaluation settings (lm-eval tasks, limit, subsample, dtype)
The strategy rows are the report's own (mean over the strategy's seeds), read back from reports/summary.json; the
scores are this model's (results.parquet). Written by harness.pipeline.report_run after the report, under its lock.
A continual-SFT unit's rows (the end of its sequence against the base) go into the cards of its last stage's
final/; the earlier stages keep the cards written at the end of their training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from huggingface_hub import EvalResult

from forgetting.harness.card import Evaluation, RunContext, write_cards
from forgetting.harness.experiment import load_saved_experiment, stage_dir
from forgetting.reports.instruction import HEALTH_METRICS, IFEVAL_METRICS
from forgetting.reports.render import interval, markdown_table, number, percent

TASK_TYPE = "text-generation"
Z95 = 1.959964  # a normal 95% interval from lm-eval's stderr


def write_unit_cards(run_dir: Path) -> list[Path]:
    """Rewrite the cards of every evaluated unit's models with their rows of the report just written (results.parquet,
    reports/summary.json: the report's numbers, not recomputed)."""
    run_dir = Path(run_dir)
    exp = load_saved_experiment(run_dir / "experiment.yaml")
    if not (run_dir / "reports" / "summary.json").is_file():
        return []
    scores = pd.read_parquet(run_dir / "results.parquet")
    saved = json.loads((run_dir / "reports" / "summary.json").read_text())
    benchmarks, summary = pd.DataFrame(saved["benchmarks"]), pd.DataFrame(saved["strategies"])
    settings = eval_settings(run_dir, exp)
    written = []
    base = scores[scores["model"] == "base"]
    for unit, rows in scores[scores["model"] == "tuned"].groupby("unit", sort=True):
        final = final_dir(run_dir, exp, unit)
        if not (final / "forgetting_config.yaml").is_file():
            continue
        evaluations = {
            variant: evaluation(own, base, benchmarks, summary, settings)
            for variant, own in rows.groupby("variant", sort=False)
        }
        written += write_cards(final, RunContext(run_dir, unit, exp.name), evaluations)
    return written


def final_dir(run_dir: Path, exp, unit: str) -> Path:
    """The unit's evaluated model: its final/, or for a sequence of stages the last stage's."""
    unit_dir = run_dir / "units" / unit
    if exp.stage_list:
        last = len(exp.stage_list) - 1
        return stage_dir(unit_dir, last, exp.stage_list[last]) / "train" / "final"
    return unit_dir / "train" / "final"


def eval_settings(run_dir: Path, exp) -> dict:
    """What the scores depend on: lm-eval tasks, documents (limit, subsample), dtype as resolved, chat template."""
    dtype = exp.eval_dtype
    environment = run_dir / "environment.json"
    if environment.is_file():  # `auto` as resolved on the machine that evaluated
        dtype = (json.loads(environment.read_text())[-1].get("precision") or {}).get("eval_dtype", dtype)
    e = exp.eval
    return {
        "lm_eval_tasks": list(e.tasks),
        "limit": e.limit,
        "subsample": dict(e.subsample),
        "dtype": dtype,
        "num_fewshot": e.num_fewshot,
        "apply_chat_template": e.apply_chat_template,
    }


def evaluation(own: pd.DataFrame, base: pd.DataFrame, benchmarks: pd.DataFrame, summary: pd.DataFrame, settings):
    """One model's Evaluation: `own` its score rows (one unit, one variant)."""
    strategy, variant = own["strategy"].iloc[0], own["variant"].iloc[0]
    rows = (
        benchmarks[(benchmarks["strategy"] == strategy) & (benchmarks["variant"] == variant)]
        if len(benchmarks)
        else benchmarks
    )
    ranked = summary[(summary["strategy"] == strategy) & (summary["variant"] == variant)] if len(summary) else summary
    base_values = base.set_index(["task", "metric"])
    results = [_score_result(r, base_values, settings) for r in own.itertuples()]
    results += [_delta_result(r) for r in rows.itertuples()]
    if len(ranked):
        results += _ranking_results(ranked.iloc[0])
    instruction = own["metric"].isin(IFEVAL_METRICS + HEALTH_METRICS)
    sections = [
        (f"Forgetting (strategy `{strategy}`, `{variant}`: the report's Ranking row)", _ranking_view(ranked)),
        ("Per benchmark (the strategy's row of the report)", _benchmark_view(rows)),
        ("Instruction following and format health (this model)", _score_view(own[instruction], base_values)),
        ("Other scores (this model)", _score_view(own[~instruction], base_values)),
    ]
    return Evaluation(settings, [r for r in results if r is not None], sections)


def _finite(value) -> float | None:
    """A plain float for YAML, or None for a missing value (NaN is not a number the Hub shows)."""
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _args(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def _score_result(row, base_values: pd.DataFrame, settings: dict) -> EvalResult | None:
    value, stderr = _finite(row.value), _finite(row.stderr)
    if value is None:
        return None
    base = _finite(base_values["value"].get((row.task, row.metric)))
    documents = {"subsample": settings["subsample"][row.task]} if row.task in settings["subsample"] else {}
    documents = documents or ({"limit": settings["limit"]} if settings["limit"] is not None else {})
    n = _finite(row.n)
    return EvalResult(
        task_type=TASK_TYPE,
        task_name=row.task,
        dataset_type=row.task,
        dataset_name=row.task,
        dataset_args=_args(lm_eval_task=row.task, documents=int(n) if n is not None else None, dtype=settings["dtype"])
        | documents,
        metric_type=row.metric,
        metric_name=f"{row.metric} (this model)",
        metric_value=value,
        metric_args=_args(
            stderr=stderr,
            ci95_low=value - Z95 * stderr if stderr is not None else None,
            ci95_high=value + Z95 * stderr if stderr is not None else None,
            base=base,
            higher_is_better=bool(row.higher_is_better),
        ),
    )


def _delta_result(row) -> EvalResult | None:
    delta = _finite(row.delta)
    if delta is None:
        return None
    return EvalResult(
        task_type=TASK_TYPE,
        task_name=row.task,
        dataset_type=row.task,
        dataset_name=row.task,
        metric_type=f"{row.metric}_delta",
        metric_name=f"{row.metric} after - base ({row.strategy}, mean of {row.seeds} seed(s))",
        metric_value=delta,
        metric_args=_args(
            base=_finite(row.base),
            after=_finite(row.after),
            ci_low=_finite(getattr(row, "ci_low", None)),
            ci_high=_finite(getattr(row, "ci_high", None)),
            ci="95% paired bootstrap over examples",
            stderr_ci_low=_finite(row.se_ci_low),
            stderr_ci_high=_finite(row.se_ci_high),
            loss=_finite(row.loss),
            target=bool(row.target),
        ),
    )


def _ranking_results(row: pd.Series) -> list[EvalResult]:
    """The strategy's forgetting and target gain, as a result on the suite's general benchmarks."""
    common = {"task_type": TASK_TYPE, "dataset_type": "forgetting_general", "dataset_name": "non-target benchmarks"}
    out = []
    for metric, value, args in (
        ("forgetting", row["forgetting"], _args(seed_std=_finite(row["forgetting_seed_std"]))),
        ("target_gain", row["target_gain"], _args(target_after=_finite(row["target_after"]))),
    ):
        if _finite(value) is not None:
            rank = _finite(row["rank"])
            extra = _args(rank=int(rank) if rank is not None else None, pareto=bool(row["pareto"]))
            out.append(EvalResult(**common, metric_type=metric, metric_value=float(value), metric_args=args | extra))
    return out


def _ranking_view(ranked: pd.DataFrame) -> str:
    if ranked.empty:
        return "No ranking row (the base model's scores are missing)."
    row = ranked.iloc[0]
    table = pd.DataFrame(
        {
            "forgetting": [percent(row["forgetting"])],
            "± seed std": [number(100 * std, 1) if (std := _finite(row["forgetting_seed_std"])) is not None else "–"],
            "target gain": [number(row["target_gain"])],
            "target after": [number(row["target_after"])],
            "rank": [row["rank"] if _finite(row["rank"]) is None else int(row["rank"])],
            "Pareto": ["yes" if row["pareto"] else ""],
            "seeds": [int(row["seeds"])],
        }
    )
    return markdown_table(table.astype(str))


def _benchmark_view(rows: pd.DataFrame) -> str:
    if rows.empty:
        return "No benchmark rows."

    def col(name: str) -> pd.Series:
        return rows[name] if name in rows else pd.Series(math.nan, index=rows.index)

    table = pd.DataFrame(
        {
            "task": rows["task"],
            "metric": rows["metric"],
            "base": rows["base"].map(number),
            "after": rows["after"].map(number),
            "delta [95% paired CI]": [
                f"{d:+.3f} {interval(lo, hi)}" for d, lo, hi in zip(rows["delta"], col("ci_low"), col("ci_high"))
            ],
            "loss": ["target" if t else percent(v) for t, v in zip(rows["target"], rows["loss"])],
        }
    )
    return markdown_table(table)


def _score_view(own: pd.DataFrame, base_values: pd.DataFrame) -> str:
    if own.empty:
        return "None evaluated."
    base = [
        base_values.loc[(t, m)] if (t, m) in base_values.index else None for t, m in zip(own["task"], own["metric"])
    ]
    table = pd.DataFrame(
        {
            "task": own["task"],
            "metric": own["metric"],
            "base ± stderr": [f"{number(b['value'])} ± {number(b['stderr'])}" if b is not None else "–" for b in base],
            "this model ± stderr": [f"{number(v)} ± {number(s)}" for v, s in zip(own["value"], own["stderr"])],
            "95% CI": [interval(v - Z95 * s, v + Z95 * s) for v, s in zip(own["value"], own["stderr"])],
        }
    )
    return markdown_table(table)
