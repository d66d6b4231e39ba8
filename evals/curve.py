"""Forgetting curves within a fine-tune: the unit's model evaluated during its training, kept in curve.jsonl.

    curve = Curve(exp.eval, run_dir / "units" / unit_id / "curve.jsonl", cache_dir)
    train(job, eval_points=curve)   # harness.train calls curve(step, model, tokenizer, heldout_loss) at its steps

The steps are `EvalSettings.curve_steps`: 0 (the model before training), every `eval.every`-th step or the listed
ones, and the last. A point evaluates `EvalSettings.for_curve()` (the final evaluation's settings with
`curve_subsample` over `subsample`) on the model in memory and keeps one line per step:

    {"step": 10, "steps": 40, "heldout_loss": 0.91, "seconds": 12.3, "results": {...}}

`heldout_loss` is the training's held-out response loss (nats per token) at that step (None without a held-out
split); `results` is lm-eval's layout trimmed to what the reports read (`trimmed`). The file is rewritten whole
and atomically at each point (a few points of small subsamples), so it never ends in a partial line; `read_curve`
skips one all the same. A resumed unit keeps the points in the file and evaluates only the other steps: its
training repeats the steps since its checkpoint bit for bit, so a point already written would come out the same.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from forgetting.evals.runner import EvalSettings, evaluate, metric_entries
from forgetting.harness.io import atomic_write_text

# what each sample keeps: tidy.example_rows reads doc_id, doc (categories, IFEval instruction ids), metrics and the
# metric values; filtered_resps is the model's answer, kept for reading
SAMPLE_KEYS = ("doc_id", "doc", "metrics", "filtered_resps")


class Curve:
    """One unit's curve: which steps are still to evaluate, and the evaluation of a point (harness.train's
    `EvalPoints`)."""

    def __init__(self, settings: EvalSettings, path: Path, cache_dir: Path | None = None):
        self.settings, self.path, self.cache_dir = settings, Path(path), cache_dir
        self.points = read_curve(self.path)
        self.total: int | None = None

    def steps(self, total: int) -> list[int]:
        """The curve's steps of a run of `total` steps that the file does not hold yet."""
        self.total = total
        listed = self.settings.every if isinstance(self.settings.every, list) else []
        beyond = [step for step in listed if step > total]
        # an epoch-based run, whose step count the config could not check; not an error: under DDP the other
        # processes, which know nothing of the curve, would wait for this one at the next step forever
        if beyond:
            print(f"curve: eval.every steps {beyond} are past the run's last step ({total}); not evaluated", flush=True)
        done = {point["step"] for point in self.points}
        return [step for step in self.settings.curve_steps(total) if step not in done]

    def __call__(self, step: int, model, tokenizer, heldout_loss: float | None) -> None:
        started = time.perf_counter()
        results = evaluate(model, tokenizer, self.settings.for_curve(), cache_dir=self.cache_dir)
        seconds = time.perf_counter() - started
        point = {"step": step, "steps": self.total, "heldout_loss": heldout_loss, "seconds": round(seconds, 2)}
        self.points = sorted([*self.points, point | {"results": trimmed(results)}], key=lambda p: p["step"])
        atomic_write_text(self.path, "".join(json.dumps(p, default=str) + "\n" for p in self.points))
        print(f"curve: step {step}/{self.total}: {summary(point, results)} ({seconds:.1f} s)", flush=True)


def trimmed(results: dict) -> dict:
    """An lm-eval results dict with what the reports read: scores, sample counts, directions, each sample's
    document and per-example values, and the weights fingerprint (no configs, prompts or raw responses)."""
    samples = {
        task: [{k: s[k] for k in (*SAMPLE_KEYS, *s.get("metrics", [])) if k in s} for s in rows]
        for task, rows in results.get("samples", {}).items()
    }
    meta = results.get("forgetting", {})
    return {
        "results": results.get("results", {}),
        "n-samples": results.get("n-samples", {}),
        "higher_is_better": results.get("higher_is_better", {}),
        "samples": samples,
        "forgetting": {k: meta[k] for k in ("weights_fingerprint", "cache_hits", "evaluated") if k in meta},
    }


def summary(point: dict, results: dict) -> str:
    """One line for the log: each task's first metric and the held-out loss."""
    scores = [
        f"{task.removeprefix('forgetting_')} {entries[0][0]} {entries[0][1]:.3f}"
        for task, metrics in sorted(results.get("results", {}).items())
        if (entries := metric_entries(metrics))
    ]
    if point["heldout_loss"] is not None:
        scores.append(f"held-out loss {point['heldout_loss']:.4f}")
    return ", ".join(scores)


def read_curve(path: Path) -> list[dict]:
    """The points of a curve.jsonl in step order ([] when there is none); a line that does not parse (cut short
    by a crash while it was appended by some other writer) counts as never written."""
    if not Path(path).is_file():
        return []
    points = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            point = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(point, dict) and isinstance(point.get("step"), int) and isinstance(point.get("results"), dict):
            points[point["step"]] = point
    return [points[step] for step in sorted(points)]
