"""What a forgetting curve (`eval.every`) costs a unit's training: the embedded SmolLM2-135M trained with and without
one, everything else equal.

configs/demo.yaml's recipe (16 sequences per step, precision auto) for 40 steps, once without a curve and once
with `eval.every: 10` (points at steps 0, 10, 20, 30 and 40) on a small subsample of the suite (40 knowledge
questions, 16 target records, 8 prose paragraphs; batch size 16; uncached), each point also computing the held-out
loss (64 records). Timed: the whole `train()` call, the steps alone (metrics.jsonl's seconds) and every
evaluation in it (harness.train.evaluate_at, wrapped); the overhead is the curved run's time minus the plain run's,
to be compared with the evaluations' own time. The final weights must be identical. Prints a table with the CPU
flags and saves .benchmarks/curve_cost.json (`BENCH_RESULTS_DIR` to change the folder). 5.5 minutes on 2 CPU
cores with native bf16 (BENCHMARKS.md).

    pytest benchmarks/test_curve_cost.py -s
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

STEPS, EVERY = 40, 10
SUBSAMPLE = {"forgetting_knowledge": 40, "forgetting_target": 16, "forgetting_prose": 8}


def timed_train(tmp_path: Path, name: str, curve) -> dict:
    """Train the demo recipe into tmp_path/name (with `curve` as its eval points); its times and final weights."""
    from safetensors.torch import load_file

    from forgetting.harness import train as train_module
    from forgetting.harness.job import load_job

    overrides = [f"train.max_steps={STEPS}", "train.save_every=0", "train.progress=false"]
    job = load_job("configs/demo.yaml", [*overrides, f"output_dir={tmp_path / name}"])
    spent, original = [], train_module.evaluate_at

    def evaluate_at(run, done, points, patches):
        started = time.perf_counter()
        original(run, done, points, patches)
        if done in run.eval_steps:
            spent.append(time.perf_counter() - started)

    train_module.evaluate_at = evaluate_at
    try:
        started = time.perf_counter()
        result = train_module.train(job, eval_points=curve)
        seconds = time.perf_counter() - started
    finally:
        train_module.evaluate_at = original
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    steps = sum(record.get("seconds", 0.0) for record in map(json.loads, lines))
    return {
        "train_seconds": seconds,
        "step_seconds": steps,
        "evaluation_seconds": spent,
        "heldout_loss": result.heldout_loss,
        "weights": load_file(str(result.final_dir / "model.safetensors")),
    }


def test_a_curve_costs_its_evaluations_and_nothing_more(tmp_path):
    from forgetting.evals.curve import Curve, read_curve
    from forgetting.evals.runner import EvalSettings
    from forgetting.harness.precision import _x86_cpu_flags, cpu_bf16, resolve_precision

    settings = EvalSettings(tasks=list(SUBSAMPLE), subsample=SUBSAMPLE, every=EVERY, batch_size=16)
    # the curved run first: a second run finds the model's files in the page cache, so this order can only
    # overstate the overhead
    curved = timed_train(tmp_path, "curved", Curve(settings, tmp_path / "curve.jsonl"))
    plain = timed_train(tmp_path, "plain", None)
    points = read_curve(tmp_path / "curve.jsonl")
    assert [p["step"] for p in points] == [0, 10, 20, 30, 40]
    assert all(plain["weights"][k].equal(v) for k, v in curved["weights"].items())  # bitwise the same training
    evaluations = sum(curved["evaluation_seconds"])
    row = {
        "cpu_flags": sorted((_x86_cpu_flags() or set()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
        "bf16": cpu_bf16().reason,
        "precision": resolve_precision("auto")[0],
        "threads": os.cpu_count(),
        "plain": {k: v for k, v in plain.items() if k != "weights"},
        "curved": {k: v for k, v in curved.items() if k != "weights"},
        "points": [{k: p[k] for k in ("step", "seconds", "heldout_loss")} | scores(p) for p in points],
        "overhead_seconds": curved["train_seconds"] - plain["train_seconds"],
        "overhead_beyond_evaluations_seconds": curved["train_seconds"] - plain["train_seconds"] - evaluations,
    }
    out = Path(os.environ.get("BENCH_RESULTS_DIR", ".benchmarks")) / "curve_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    print(f"\nCPU flags: {', '.join(row['cpu_flags'])} ({row['bf16']}); training precision {row['precision']}")
    print("| run | train() s | steps s | evaluations s (points) | overhead vs plain s | beyond the evaluations s |")
    print("|---|---|---|---|---|---|")
    print(f"| plain | {plain['train_seconds']:.1f} | {plain['step_seconds']:.1f} | - | - | - |")
    print(
        f"| every {EVERY} | {curved['train_seconds']:.1f} | {curved['step_seconds']:.1f} | {evaluations:.1f} "
        f"({len(points)}) | {row['overhead_seconds']:.1f} | {row['overhead_beyond_evaluations_seconds']:.1f} |"
    )
    for point in row["points"]:
        print(json.dumps(point))


def scores(point: dict) -> dict:
    """The point's primary scores, for the record."""
    results = point["results"]["results"]
    return {
        "knowledge_acc": results["forgetting_knowledge"]["acc,none"],
        "target_exact_match": results["forgetting_target"]["exact_match,none"],
        "prose_bits_per_byte": results["forgetting_prose"]["bits_per_byte,none"],
    }
