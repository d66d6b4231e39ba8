"""Are the built-in tasks beside record extraction learnable? Base vs a short SFT of the embedded SmolLM2-135M.

For each of `builtin:units`, `builtin:dates` and `builtin:sentiment`: exact match and format validity of the
embedded model on the first 50 documents of the task's held-out lm-eval task (`forgetting_target_<name>`), then
a 40-step fine-tune on the task's train split with configs/demo.yaml's settings otherwise (LR 5e-5, 16
sequences per step, warmup 5%, cosine, precision auto), and the same evaluation of the result (weights dtype
auto, batch size 32, uncached). Prints a table with the CPU's bf16 flags and saves
.benchmarks/builtin_tasks.json (`BENCH_RESULTS_DIR` to change the folder). 13 minutes on 2 CPU cores with native
bf16 (shared with other work; BENCHMARKS.md).

    pytest benchmarks/test_builtin_task_learning.py -s
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

TASKS = ["units", "dates", "sentiment"]
DOCS, STEPS = 50, 40
ROWS: dict[str, dict] = {}


def evaluate_on(name: str, source: str) -> dict:
    """Exact match and format validity of the model at `source` on the task's first DOCS held-out documents."""
    from forgetting.evals.runner import EvalSettings, evaluate, load_for_eval
    from forgetting.harness.config import ModelConfig

    model, tokenizer = load_for_eval(source, model_config=ModelConfig(name_or_path=source, dtype="auto"))
    task = f"forgetting_target_{name}"
    started = time.perf_counter()
    results = evaluate(model, tokenizer, EvalSettings(tasks=[task], limit=DOCS, batch_size=32), cache_dir=None)
    scores = results["results"][task]
    return {
        "exact_match": scores["exact_match,none"],
        "format_valid": scores["format_valid,none"],
        "dtype": str(model.dtype),
        "seconds": time.perf_counter() - started,
        "first_answers": [sample["filtered_resps"][0] for sample in results["samples"][task][:3]],
    }


@pytest.fixture(scope="module")
def table():
    yield ROWS
    from forgetting.harness.precision import _x86_cpu_flags, cpu_bf16

    flags = sorted((_x86_cpu_flags() or set()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    out = Path(os.environ.get("BENCH_RESULTS_DIR", ".benchmarks")) / "builtin_tasks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_flags": flags, "bf16": cpu_bf16().reason, "tasks": ROWS}, indent=2))
    print(f"\nCPU flags: {', '.join(flags)} ({cpu_bf16().reason}); {DOCS} held-out documents, {STEPS} steps")
    print("| task | base exact / format | after exact / format | held-out loss | train s | eval s (base, after) |")
    print("|---|---|---|---|---|---|")
    for name, row in ROWS.items():
        base, after, loss = row["base"], row["after"], row["heldout_loss"]
        print(
            f"| builtin:{name} | {base['exact_match']:.2f} / {base['format_valid']:.2f} | "
            f"{after['exact_match']:.2f} / {after['format_valid']:.2f} | {loss['before']:.3f} -> {loss['after']:.3f} | "
            f"{row['train_seconds']:.0f} | {base['seconds']:.0f}, {after['seconds']:.0f} |"
        )


@pytest.mark.parametrize("name", TASKS)
def test_base_and_after_a_short_sft(table, name, tmp_path):
    from forgetting.harness.config import EMBEDDED_MODEL
    from forgetting.harness.job import load_job
    from forgetting.harness.precision import resolve_precision
    from forgetting.harness.train import train

    base = evaluate_on(name, EMBEDDED_MODEL)
    overrides = [f"data.path=builtin:{name}", f"train.max_steps={STEPS}", "train.save_every=0"]
    job = load_job("configs/demo.yaml", [*overrides, "train.progress=false", f"output_dir={tmp_path / 'run'}"])
    started = time.perf_counter()
    result = train(job)
    train_seconds = time.perf_counter() - started
    after = evaluate_on(name, str(result.final_dir))
    table[name] = {
        "base": base,
        "after": after,
        "heldout_loss": result.heldout_loss,
        "train_seconds": train_seconds,
        "steps": result.steps,
        "precision": resolve_precision(job.train.precision)[0],
        "tokens_per_second": result.tokens_per_second,
    }
    assert after["format_valid"] >= base["format_valid"]
