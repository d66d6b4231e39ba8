"""The tidy tables every report is computed from: one row per score, one row per scored example.

    scores   model, unit, strategy, family, seed, variant, alpha, task, metric, value, stderr, n, higher_is_better
    examples model, unit, strategy, seed, variant, task, metric, doc, item, instruction, value, weight

`model` is "base" for the base model and "tuned" for a unit's model. lm-eval's per-sample values become
numbers: booleans 0/1; instruction-level lists one row per instruction (`item` = "doc:k", `instruction` =
its IFEval id); bits_per_byte's (loglikelihood, bytes) pairs the document's bits per byte with
`weight` = bytes, so a weighted mean over examples reproduces lm-eval's corpus-level score exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from forgetting.evals.runner import metric_entries
from forgetting.harness.experiment import load_saved_experiment, units
from forgetting.harness.records import Records

# Lower-is-better metrics, for results that do not say (lm-eval's `higher_is_better` is used when present)
LOWER_IS_BETTER = {"bits_per_byte", "byte_perplexity", "word_perplexity", "perplexity", "leak_rate", "empty_rate"}

SCORE_COLUMNS = [
    "model",
    "unit",
    "strategy",
    "family",
    "seed",
    "variant",
    "alpha",
    "task",
    "metric",
    "value",
    "stderr",
    "n",
    "higher_is_better",
]
EXAMPLE_COLUMNS = [
    "model",
    "unit",
    "strategy",
    "seed",
    "variant",
    "task",
    "metric",
    "doc",
    "item",
    "instruction",
    "value",
    "weight",
]


def score_rows(results: dict, labels: dict) -> list[dict]:
    """One row per (task, metric) of an lm-eval results dict, with the unit's labels."""
    rows = []
    for task, metrics in sorted(results.get("results", {}).items()):
        better = results.get("higher_is_better", {}).get(task, {})
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for metric, value, stderr in metric_entries(metrics):
            rows.append(
                labels
                | {
                    "task": task,
                    "metric": metric,
                    "value": value,
                    "stderr": math.nan if stderr is None else stderr,
                    "n": n,
                    "higher_is_better": bool(better.get(metric, metric not in LOWER_IS_BETTER)),
                }
            )
    return rows


def _sample_values(metric: str, value, doc_id: int, doc: dict):
    """(item, instruction, value, weight) tuples of one sample's metric; none for derived metrics."""
    if isinstance(value, (bool, int, float)):
        yield str(doc_id), None, float(value), 1.0
    elif isinstance(value, list) and value and all(isinstance(v, bool) for v in value):
        ids = doc.get("instruction_id_list") or [None] * len(value)
        for k, (v, instruction) in enumerate(zip(value, ids)):
            yield f"{doc_id}:{k}", instruction, float(v), 1.0
    elif metric == "bits_per_byte" and isinstance(value, list) and len(value) == 2:
        loglikelihood, n_bytes = value
        yield str(doc_id), None, -loglikelihood / n_bytes / math.log(2), float(n_bytes)


def example_rows(results: dict, labels: dict) -> list[dict]:
    rows = []
    for task, samples in sorted(results.get("samples", {}).items()):
        for sample in samples:
            for metric in sample.get("metrics", []):
                for item, instruction, value, weight in _sample_values(
                    metric, sample.get(metric), sample["doc_id"], sample.get("doc", {})
                ):
                    rows.append(
                        labels
                        | {
                            "task": task,
                            "metric": metric,
                            "doc": int(sample["doc_id"]),
                            "item": item,
                            "instruction": instruction,
                            "value": value,
                            "weight": weight,
                        }
                    )
    return rows


def _labels(model: str, unit=None, variant: str = "final", status: str = "done") -> dict:
    alpha = float(variant.split("_")[-1]) if variant.startswith("wise_ft_") else (1.0 if unit else math.nan)
    if unit is None:
        return {
            "model": model,
            "unit": "base",
            "strategy": "base",
            "family": "base",
            "seed": -1,
            "variant": "base",
            "alpha": 0.0,
        }
    return {
        "model": model,
        "unit": unit.id,
        "strategy": unit.strategy,
        "family": unit.family,
        "seed": unit.seed,
        "variant": variant,
        "alpha": alpha,
    }


def build_tables(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(scores, examples, units) of a run directory, from its saved results and the units' records."""
    exp = load_saved_experiment(run_dir / "experiment.yaml")
    records = Records(run_dir)
    scores, examples, unit_rows = [], [], []
    sources = [(run_dir / "base" / "eval.json", _labels("base"))]
    for unit in units(exp):
        record = records.read(unit.id) or {"status": "not run"}
        unit_rows.append(
            {
                "unit": unit.id,
                "strategy": unit.strategy,
                "family": unit.family,
                "seed": unit.seed,
                **{k: v for k, v in unit.axes.items()},
                "status": record.get("status"),
                "steps": record.get("steps"),
                "train_seconds": record.get("train_seconds"),
                "eval_seconds": record.get("eval_seconds"),
                "error": record.get("error"),
            }
        )
        if record.get("status") != "done":
            continue
        for variant in record.get("variants", ["final"]):
            name = "eval.json" if variant == "final" else f"eval_{variant}.json"
            sources.append((run_dir / "units" / unit.id / name, _labels("tuned", unit, variant)))
    for path, labels in sources:
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        scores += score_rows(results, labels)
        examples += example_rows(results, {k: labels[k] for k in ("model", "unit", "strategy", "seed", "variant")})
    return (
        pd.DataFrame(scores, columns=SCORE_COLUMNS),
        pd.DataFrame(examples, columns=EXAMPLE_COLUMNS),
        pd.DataFrame(unit_rows),
    )
