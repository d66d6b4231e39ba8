"""The Python API: what the `forgetting` commands do, as functions (re-exported by the `forgetting` package).

    import forgetting
    result = forgetting.train("configs/train.yaml", ["train.max_steps=40"])
    scores = forgetting.evaluate(result.final_dir)
    run_dir = forgetting.run_experiment("configs/experiment.yaml")
    verdict = forgetting.gate(result.final_dir, baseline="runs/base_eval.json")   # verdict.passed, .checks

Each takes what the command line takes (a YAML path plus `key=value` overrides; a dict works too) and returns
what the command prints from, instead of printing it. Bad input raises `forgetting.harness.errors.UserError`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from forgetting.evals.runner import EvalSettings, load_for_eval
from forgetting.evals.runner import evaluate as evaluate_model
from forgetting.harness.configlib import apply_overrides, from_dict, load_config, read_yaml
from forgetting.harness.errors import UserError
from forgetting.harness.experiment import Experiment, load_experiment
from forgetting.harness.io import cache_root
from forgetting.harness.job import TrainJob
from forgetting.harness.launchers import LAUNCHERS, Launch
from forgetting.harness.train import TrainResult
from forgetting.harness.train import train as train_job
from forgetting.reports.gate import Check, Thresholds, run_gate


@dataclasses.dataclass
class GateResult:
    """The gate's verdict: every compared metric's check, and the candidate's evaluation results."""

    checks: list[Check]
    results: dict

    @property
    def passed(self) -> bool:
        return all(check.status == "pass" for check in self.checks)


def _resolve(cls: type, config: str | Path | dict | Any, overrides: Sequence[str]):
    """`config` as a validated `cls`: a YAML path or a dict (plus overrides), or an instance as it is."""
    if isinstance(config, cls):
        if overrides:
            raise UserError("overrides: apply them to a YAML path or a dict, not to a built config")
        return config
    if isinstance(config, dict):
        return from_dict(cls, apply_overrides(config, list(overrides)))
    if isinstance(config, (str, Path)):
        return load_config(cls, str(config), list(overrides))
    raise UserError(f"config: expected a YAML path, a dict or a {cls.__name__}, got {type(config).__name__}")


def train(config: str | Path | dict | TrainJob, overrides: Sequence[str] = ()) -> TrainResult:
    """Fine-tune as `forgetting train CONFIG key=value ...` does; the model is saved in `result.final_dir`."""
    return train_job(_resolve(TrainJob, config, overrides))


def evaluate(
    model: str | Path,
    *,
    adapter: str | Path | None = None,
    settings: EvalSettings | dict | None = None,
    cache: bool = True,
) -> dict:
    """Scores of a saved model (a directory, a hub id, a GGUF or `embedded`), as `forgetting eval` computes them:
    lm-eval's result layout plus the harness's `forgetting` metadata. `settings`: EvalSettings fields (the offline
    suite by default); results are cached per task under the harness cache unless `cache` is False."""
    settings = _resolve(EvalSettings, settings if settings is not None else {}, ())
    loaded, tokenizer = load_for_eval(str(model), str(adapter) if adapter is not None else None)
    results = evaluate_model(loaded, tokenizer, settings, cache_dir=cache_root() / "eval" if cache else None)
    results["forgetting"]["model"] = {"source": str(model), "adapter": str(adapter) if adapter is not None else None}
    return results


def run_experiment(
    config: str | Path | dict,
    overrides: Sequence[str] = (),
    *,
    launcher: str = "local",
    quick: bool = False,
) -> Path | None:
    """Run (or resume) an experiment as `forgetting run` does: every unit trained and evaluated, the report
    written. Returns the run directory (None when other processes still hold units of it and will report)."""
    if launcher not in LAUNCHERS:
        raise UserError(f"launcher: expected one of {sorted(LAUNCHERS)}, got {launcher!r}")
    if isinstance(config, dict):
        if launcher != "local" or quick:
            raise UserError("config: a dict runs with the local launcher only; give a YAML path for the others")
        return LAUNCHERS["local"](_resolve(Experiment, config, overrides), Launch(config="<dict>"))[0]
    experiment = load_experiment(str(config), list(overrides), quick=quick)
    run_dir, _ = LAUNCHERS[launcher](experiment, Launch(str(config), tuple(overrides), quick))
    return run_dir


def gate(
    candidate: str | Path,
    baseline: str | Path,
    thresholds: str | Path | dict | Thresholds | None = None,
    *,
    adapter: str | Path | None = None,
    settings: dict | None = None,
    cache: bool = True,
) -> GateResult:
    """Evaluate `candidate` with the baseline's settings and compare, as `forgetting gate` does. `baseline`: a
    results JSON (from `evaluate`/`forgetting eval`) or a model to evaluate; `thresholds`: a YAML path or Thresholds
    fields (default: max_drop 0.02 on each task's primary metric, paired test); `settings`: tasks/limit/batch_size
    overrides of the baseline's evaluation settings."""
    if isinstance(thresholds, (str, Path)):
        thresholds = read_yaml(str(thresholds))
    rules = _resolve(Thresholds, thresholds if thresholds is not None else {}, ())
    checks, results = run_gate(
        str(candidate),
        str(adapter) if adapter is not None else None,
        str(baseline),
        rules,
        dict(settings or {}),
        cache_root() / "eval" if cache else None,
    )
    return GateResult(checks, results)
