"""Forgetting and instruction-following reports of a run directory, regenerated from its saved results.

    forgetting report RUN_DIR        (also the last step of `forgetting run`)

Writes, atomically, into RUN_DIR:
    results.csv / results.parquet / results.json   the tidy score table (reports/tidy.py)
    examples.parquet                                per-example scores (paired statistics)
    reports/forgetting.md, reports/instruction_following.md, reports/report.html (self-contained),
    reports/summary.json (both reports' tables), reports/*.png, reports/experiment.yaml
    curves.csv                                      with eval.every: the forgetting curves' scores (reports/curves.py)
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd

from forgetting.harness.errors import UserError
from forgetting.harness.experiment import load_saved_experiment
from forgetting.harness.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from forgetting.reports import plots
from forgetting.reports.curves import curve_sections
from forgetting.reports.forgetting import LOSS_TEXT, benchmark_table, strategy_table
from forgetting.reports.instruction import health_table, ifeval_table, instruction_types
from forgetting.reports.render import Section, interval, number, percent, to_html, to_markdown
from forgetting.reports.sequence import continual_sections
from forgetting.reports.tidy import build_tables


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _parquet(table: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    return buffer.getvalue()


def ranking_view(summary: pd.DataFrame) -> pd.DataFrame:
    """The Ranking table (strategy_table's final variants) as display strings."""
    finals = summary[summary["variant"] == "final"].sort_values("rank")
    return pd.DataFrame(
        {
            "rank": finals["rank"].astype(int),
            "strategy": finals["strategy"],
            "forgetting": [
                percent(v) + (f" ± {100 * s:.1f}" if _finite(s) else "")
                for v, s in zip(finals["forgetting"], finals["forgetting_seed_std"])
            ],
            "target gain": finals["target_gain"].map(number),
            "target after": finals["target_after"].map(number),
            "Pareto": finals["pareto"].map({True: "yes", False: ""}),
            "seeds": finals["seeds"],
        }
    )


def benchmark_view(benchmarks: pd.DataFrame) -> pd.DataFrame:
    """The Per benchmark table (benchmark_table's final variants) as display strings."""
    rows = benchmarks[benchmarks["variant"] == "final"]

    def col(name: str) -> pd.Series:
        return rows[name] if name in rows else pd.Series(float("nan"), index=rows.index)

    return pd.DataFrame(
        {
            "task": rows["task"].str.removeprefix("forgetting_") + ("" if rows.empty else " (" + rows["metric"] + ")"),
            "strategy": rows["strategy"],
            "base": rows["base"].map(number),
            "after": [
                number(a) + (f" ± {s:.3f}" if _finite(s) else "") for a, s in zip(rows["after"], rows["seed_std"])
            ],
            "delta [95% paired CI]": [
                f"{d:+.3f} {interval(lo, hi)}" for d, lo, hi in zip(rows["delta"], col("ci_low"), col("ci_high"))
            ],
            "relative [CI]": [
                percent(r) + (f" {interval(lo, hi, percent)}" if _finite(r) else "")
                for r, lo, hi in zip(rows["rel_delta"], col("rel_ci_low"), col("rel_ci_high"))
            ],
            "stderr CI": [interval(lo, hi) for lo, hi in zip(rows["se_ci_low"], rows["se_ci_high"])],
            "loss": ["target" if t else percent(v) for t, v in zip(rows["target"], col("loss"))],
            "forgot": col("forgot").map(lambda v: percent(v).lstrip("+")),
            "learned": col("learned").map(lambda v: percent(v).lstrip("+")),
        }
    )


def _before_after_view(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty:
        return table
    return pd.DataFrame(
        {
            "task": table["task"].str.removeprefix("forgetting_"),
            "metric": table["metric"],
            "strategy": table["strategy"],
            "base": [f"{number(b)} ± {number(s)}" for b, s in zip(table["base"], table["base_stderr"])],
            "after": [f"{number(a)} ± {number(s)}" for a, s in zip(table["after"], table["after_stderr"])],
            "delta": table["delta"].map(lambda v: f"{v:+.3f}"),
            "after / base": table["ratio"].map(lambda v: number(v, 2)),
        }
    )


def _wise_view(summary: pd.DataFrame) -> pd.DataFrame:
    rows = summary[summary["variant"] != "final"].sort_values(["strategy", "alpha"])
    return pd.DataFrame(
        {
            "strategy": rows["strategy"],
            "alpha": rows["alpha"].map(lambda a: f"{a:g}"),
            "forgetting": rows["forgetting"].map(percent),
            "target gain": rows["target_gain"].map(number),
            "Pareto": rows["pareto"].map({True: "yes", False: ""}),
        }
    )


def _unit_view(unit_table: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in unit_table.columns if c not in ("family",)]
    return unit_table[keep].fillna("").astype(str)


def write_reports(run_dir: Path, bootstrap_iters: int = 2000) -> Path:
    """Compute every table and figure from the run's saved results and write all report files."""
    run_dir = Path(run_dir)
    if not (run_dir / "experiment.yaml").is_file():
        raise UserError(f"{run_dir}: not a run directory (no experiment.yaml)")
    if not (run_dir / "base" / "eval.json").is_file():
        raise UserError(f"{run_dir}: the base model has not been evaluated yet; run the experiment first")
    exp = load_saved_experiment(run_dir / "experiment.yaml")
    scores, examples, unit_table = build_tables(run_dir)
    _write_tables(run_dir, scores, examples)
    benchmarks = benchmark_table(scores, examples, exp, iters=bootstrap_iters)
    summary = strategy_table(benchmarks, scores, exp)
    ifeval, types, health = ifeval_table(scores), instruction_types(examples), health_table(scores)
    curves, curve_figures, curve_changes = curve_sections(run_dir, exp, bootstrap_iters)
    figures = _write_figures(run_dir, benchmarks, summary, unit_table) | curve_figures
    forgetting = _forgetting_sections(summary, benchmarks, unit_table, curves)
    instruction = _instruction_sections(ifeval, types, health)
    out = run_dir / "reports"
    config_text = (run_dir / "experiment.yaml").read_text()
    atomic_write_text(out / "experiment.yaml", config_text)
    atomic_write_text(out / "forgetting.md", to_markdown(f"Forgetting report: {exp.name}", forgetting, figures))
    atomic_write_text(
        out / "instruction_following.md", to_markdown(f"Instruction-following report: {exp.name}", instruction, figures)
    )
    stages, stage_figures = continual_sections(run_dir, exp, bootstrap_iters) if exp.stage_list else ([], {})
    figures = figures | stage_figures
    sections = (
        [Section("Forgetting", level=2)]
        + [_demote(s) for s in forgetting]
        + [Section("Instruction following", level=2)]
        + [_demote(s) for s in instruction]
        + stages
    )
    atomic_write_text(
        out / "report.html",
        to_html(f"{exp.name}: forgetting and instruction following", sections, figures, appendix=config_text),
    )
    atomic_write_json(
        out / "summary.json",
        {
            "strategies": _records(summary),
            "benchmarks": _records(benchmarks),
            "ifeval": _records(ifeval),
            "instruction_types": _records(types),
            "format_health": _records(health),
            "units": _records(unit_table),
            "curves": _records(curve_changes),
        },
    )
    return run_dir


def _write_tables(run_dir: Path, scores: pd.DataFrame, examples: pd.DataFrame) -> None:
    """The tidy score table (CSV, Parquet, JSON) and the per-example scores, at the run directory's top."""
    atomic_write_text(run_dir / "results.csv", scores.to_csv(index=False))
    atomic_write_bytes(run_dir / "results.parquet", _parquet(scores))
    atomic_write_text(run_dir / "results.json", scores.to_json(orient="records", indent=1) + "\n")
    atomic_write_bytes(run_dir / "examples.parquet", _parquet(examples))


def _write_figures(
    run_dir: Path, benchmarks: pd.DataFrame, summary: pd.DataFrame, unit_table: pd.DataFrame
) -> dict[str, bytes]:
    """The report's PNG figures, written under reports/; returns them by file name (the HTML embeds them)."""
    figures = {
        name: data
        for name, data in {
            "deltas.png": plots.deltas_plot(benchmarks) if not benchmarks.empty else None,
            "pareto.png": plots.pareto_plot(summary),
            "loss.png": plots.loss_plot(run_dir, unit_table),
        }.items()
        if data is not None
    }
    for name, data in figures.items():
        atomic_write_bytes(run_dir / "reports" / name, data)
    return figures


def _forgetting_sections(
    summary: pd.DataFrame, benchmarks: pd.DataFrame, unit_table: pd.DataFrame, curves: list[Section] | None = None
) -> list[Section]:
    failed = unit_table[unit_table["status"] != "done"] if not unit_table.empty else unit_table
    forgetting = [
        Section(
            "Ranking",
            "Forgetting is the mean of the general (non-target) benchmarks' losses (the 'loss' column "
            "of Per benchmark), computed per seed and averaged over seeds; ± is the std over seeds. "
            + LOSS_TEXT
            + " Target gain: the target metric's change in its good direction (a − b, or b − a when lower is "
            "better), seeds averaged. Ranked by least forgetting, then by larger target gain. Pareto: no other "
            "strategy has less or equal forgetting and greater or equal target gain, one of them strictly.",
            ranking_view(summary) if not summary.empty else None,
            "pareto.png",
        ),
        Section(
            "Per benchmark",
            "Base and after scores (after: mean over seeds ± their std); delta = after − base "
            "and relative = delta / |base|, as measured (not turned by direction). The CI of the delta is a "
            "paired bootstrap over examples; 'stderr CI' is the unpaired interval from lm-eval's stderrs. "
            "'loss' is the benchmark's term of forgetting (defined under Ranking; > 0: worse; mean over seeds). "
            "'forgot' is the share of examples with a good base outcome (correct; for a failure rate such as "
            "leak rate, no failure) that are now bad, 'learned' the share of bad base outcomes now good "
            "(mean over seeds).",
            benchmark_view(benchmarks) if not benchmarks.empty else None,
            "deltas.png",
        ),
        Section("WiSE-FT interpolations", "Weights base + alpha (tuned - base).", _wise_view(summary))
        if not summary.empty and (summary["variant"] != "final").any()
        else None,
        Section("Training", "Loss per optimizer step.", None, "loss.png"),
        *(curves or []),  # forgetting over training (eval.every)
        Section(
            "Units",
            "Failed units are listed with their error and left out of every table above."
            if len(failed)
            else "Every unit finished.",
            _unit_view(unit_table),
        ),
    ]
    return [s for s in forgetting if s is not None]


def _instruction_sections(ifeval: pd.DataFrame, types: pd.DataFrame, health: pd.DataFrame) -> list[Section]:
    return [
        Section(
            "IFEval-style instruction following",
            "Prompt- and instruction-level accuracy, strict and loose "
            "(± lm-eval stderr; after: the mean over seeds of the score and of its stderr).",
            _before_after_view(ifeval),
        ),
        Section(
            "Per instruction type",
            "Instruction-level strict accuracy; base and each strategy after (seeds pooled).",
            types.round(3) if not types.empty else None,
        ),
        Section(
            "Format health",
            "Leakage of template markers into answers to foreign-format prompts (leak_rate, "
            "lower is better), answer length in words (response_words; after / base is the length ratio: 1 is "
            "calibrated, and longer and shorter both drift), answers ending cleanly, empty answers (empty_rate, "
            "lower is better). ± lm-eval stderr; after: the mean over seeds of the score and of its stderr.",
            _before_after_view(health),
        ),
    ]


def _demote(section: Section) -> Section:
    return Section(section.heading, section.text, section.table, section.figure, level=3)


def _records(table: pd.DataFrame) -> list[dict]:
    return json.loads(table.to_json(orient="records")) if not table.empty else []


def headline(run_dir: Path) -> str:
    """The console table printed at the end of `run`: the ranking, one line per strategy."""
    summary = json.loads((Path(run_dir) / "reports" / "summary.json").read_text())["strategies"]
    lines = [f"{'rank':>4}  {'strategy':<28} {'forgetting':>10} {'target gain':>11}  Pareto"]
    for row in sorted((r for r in summary if r["variant"] == "final"), key=lambda r: r["rank"]):
        lines.append(
            f"{int(row['rank']):>4}  {row['strategy']:<28} {percent(row['forgetting']):>10} "
            f"{number(row['target_gain']):>11}  {'yes' if row['pareto'] else ''}"
        )
    return "\n".join(lines)
