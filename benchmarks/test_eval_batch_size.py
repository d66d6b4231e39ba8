"""The evaluation suite's time against lm-eval's batch size (embedded SmolLM2-135M, bf16 weights, CPU).

Evaluates the same spread subsample of every task of the offline suite (a quarter of the demo experiment's:
30 knowledge items, 8 IFEval prompts, 8 target records, 4 format-health requests, the 24 prose paragraphs) at
several batch sizes, uncached, and records the seconds and the headline metrics, which must not depend on the
batch size beyond bf16 rounding. Results are printed and saved to .benchmarks/eval_batch_size.json.

    pytest benchmarks/test_eval_batch_size.py -s
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

BATCH_SIZES = [1, 8, 32, 64]
SUBSAMPLE = {"forgetting_knowledge": 30, "forgetting_ifeval": 8, "forgetting_target": 8, "forgetting_format_health": 4}
ROWS: dict[int, dict] = {}


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from forgetting.evals.runner import load_for_eval
    from forgetting.harness.config import EMBEDDED_MODEL, ModelConfig

    yield load_for_eval(EMBEDDED_MODEL, model_config=ModelConfig(dtype="bfloat16"))
    out = Path(os.environ.get("BENCH_RESULTS_DIR", ".benchmarks")) / "eval_batch_size.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ROWS, indent=2))
    print("\n| batch size | seconds | vs batch 1 |\n|---|---|---|")
    for size, row in ROWS.items():
        print(f"| {size} | {row['seconds']:.1f} | {ROWS[BATCH_SIZES[0]]['seconds'] / row['seconds']:.2f}x |")


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_suite_time(model_and_tokenizer, batch_size):
    from forgetting.evals.runner import EvalSettings, evaluate, headline

    model, tokenizer = model_and_tokenizer
    started = time.perf_counter()
    results = evaluate(model, tokenizer, EvalSettings(batch_size=batch_size, subsample=SUBSAMPLE), cache_dir=None)
    seconds = time.perf_counter() - started
    metrics = {f"{task}/{metric}": value for task, metric, value, _ in headline(results)}
    ROWS[batch_size] = {"seconds": seconds, "metrics": metrics}
    first = ROWS[BATCH_SIZES[0]]["metrics"]
    for key in ("forgetting_knowledge/acc", "forgetting_target/exact_match"):
        assert metrics[key] == pytest.approx(first[key], abs=0.05), key
