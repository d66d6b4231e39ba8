"""The regression gate: does a candidate checkpoint score worse than a baseline by more than allowed?

    forgetting gate CANDIDATE --baseline BASELINE [--thresholds FILE | --max-drop T=0.02 ...] [--min-gain T=0.5]

BASELINE is a saved results JSON (`forgetting eval`, a run's base/eval.json, a previous gate's --output) or a
model; the candidate is evaluated on the baseline's tasks with the baseline's settings. Per metric, a
*regression* is a drop (in the metric's bad direction) larger than its threshold that is also significant
on a one-sided paired test over the same documents (sign-flip randomisation of per-document differences,
exact for any metric lm-eval scores per document); `test: threshold` drops the significance requirement.
A target metric with `min_gain` fails when it gains less. Exit 0: pass, 1: regression, 2: usage error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from xml.etree import ElementTree

import numpy as np
import pandas as pd

from harness.configlib import knob
from harness.errors import UserError


@dataclass
class Rule:
    max_drop: str | None = knob(None, "allowed drop: absolute (0.02) or relative to the baseline ('5%')")
    min_gain: float | None = knob(None, "required absolute gain (a target metric), e.g. 0.5")


@dataclass
class Thresholds:
    default: dict = knob({"max_drop": "0.02"}, "rule for every compared metric without its own")
    metrics: dict[str, dict] = knob({}, "task or task/metric -> rule, e.g. {forgetting_knowledge: {max_drop: 3%}}")
    test: Literal["paired", "threshold"] = knob("paired", "paired: a drop must also be significant; threshold: the drop alone")
    alpha: float = knob(0.05, "significance level of the one-sided paired test")
    compare: Literal["primary", "all"] = knob("primary", "metrics compared: each task's primary metric, or every metric")

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha: must be in (0, 1), got {self.alpha}")
        for key, rule in {"default": self.default, **self.metrics}.items():
            if not isinstance(rule, dict) or set(rule) - {"max_drop", "min_gain"}:
                raise ValueError(f"metrics.{key}: expected a mapping with max_drop and/or min_gain, got {rule!r}")
            if rule.get("max_drop") is not None:
                parse_drop(rule["max_drop"], f"metrics.{key}.max_drop")
            if rule.get("min_gain") is not None and not isinstance(rule["min_gain"], (int, float)):
                raise ValueError(f"metrics.{key}.min_gain: expected a number, got {rule['min_gain']!r}")


def parse_drop(value, where: str) -> tuple[float, bool]:
    """(amount, relative) from 0.02 or '5%'."""
    text = str(value).strip()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)", text)
    if not match:
        raise ValueError(f"{where}: expected a number like 0.02 or a percentage like 5%, got {value!r}")
    amount = float(match.group(1))
    return (amount / 100, True) if match.group(2) else (amount, False)


def cli_thresholds(max_drop: list[str], min_gain: list[str], test: str | None, alpha: float | None) -> dict:
    """Thresholds fields from repeated --max-drop/--min-gain KEY=VALUE flags."""
    metrics: dict[str, dict] = {}
    for flag, items in (("max_drop", max_drop), ("min_gain", min_gain)):
        for item in items:
            if "=" not in item:
                raise UserError(f"--{flag.replace('_', '-')} {item!r}: expected TASK[/METRIC]=VALUE, e.g. forgetting_knowledge=0.02")
            key, value = item.split("=", 1)
            if flag == "min_gain":
                try:
                    value = float(value)
                except ValueError:
                    raise UserError(f"--min-gain {item!r}: {value!r} is not a number") from None
            metrics.setdefault(key, {})[flag] = value
    out: dict = {"metrics": metrics}
    if test:
        out["test"] = test
    if alpha is not None:
        out["alpha"] = alpha
    return out


def sign_flip_pvalue(diffs: np.ndarray, weights: np.ndarray, permutations: int = 20000, seed: int = 0) -> float:
    """One-sided p-value that the weighted mean of paired differences is this negative by chance."""
    observed = (weights * diffs).sum() / weights.sum()
    if not np.any(diffs):
        return 1.0
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(permutations, len(diffs)))
    null = (signs * (weights * diffs)).sum(1) / weights.sum()
    return float((1 + np.sum(null <= observed + 1e-12)) / (1 + permutations))


@dataclass
class Check:
    task: str
    metric: str
    baseline: float
    candidate: float
    higher_is_better: bool
    rule: dict
    p_value: float | None = None
    status: str = "pass"  # pass | regression | insufficient gain
    reason: str = ""
    details: dict = field(default_factory=dict)

    @property
    def delta(self) -> float:
        return self.candidate - self.baseline


def _rule_for(thresholds: Thresholds, task: str, metric: str) -> dict | None:
    for key in (f"{task}/{metric}", task):
        if key in thresholds.metrics:
            return thresholds.metrics[key]
    return thresholds.default


def _paired_p_value(base: pd.DataFrame, candidate: pd.DataFrame, task: str, metric: str, higher: bool) -> float | None:
    """One-sided p-value of the candidate being worse, over per-document scores; None without them."""
    if base.empty or candidate.empty:
        return None

    def per_document(examples: pd.DataFrame) -> pd.DataFrame:
        rows = examples[(examples["task"] == task) & (examples["metric"] == metric)]
        return rows.assign(wv=rows["weight"] * rows["value"]).groupby("doc")[["wv", "weight"]].sum()

    b, c = per_document(base), per_document(candidate)
    if not len(b) or not b.index.equals(c.index):
        return None
    diffs = (c["wv"] / c["weight"] - b["wv"] / b["weight"]).to_numpy()
    return sign_flip_pvalue(diffs if higher else -diffs, b["weight"].to_numpy())


def _judge_gain(check: Check, bad: float) -> None:
    gain, required = -bad, check.rule["min_gain"]
    if gain < required:
        check.status, check.reason = "insufficient gain", f"gain {gain:+.4f} < required {required}"
    else:
        check.reason = f"gain {gain:+.4f} >= required {required}"


def _judge_drop(check: Check, bad: float, thresholds: Thresholds) -> None:
    amount, relative = parse_drop(check.rule["max_drop"], "max_drop")
    allowed = amount * abs(check.baseline) if relative else amount
    p = check.p_value
    if bad <= allowed:
        check.reason = f"drop {max(bad, 0):.4f} <= allowed {allowed:.4f}"
    elif thresholds.test == "threshold":
        check.status, check.reason = "regression", f"drop {bad:.4f} > allowed {allowed:.4f}"
    elif p is not None and p < thresholds.alpha:
        check.status, check.reason = "regression", f"drop {bad:.4f} > allowed {allowed:.4f}, p = {p:.4f} < {thresholds.alpha}"
    else:
        check.reason = f"drop {bad:.4f} > allowed {allowed:.4f} but not significant (p = " + (
            f"{p:.4f})" if p is not None else "n/a: no per-document scores)")


def compare(baseline: dict, candidate: dict, thresholds: Thresholds, primary: dict[str, str]) -> list[Check]:
    """One Check per compared metric of the baseline's results."""
    from reports.tidy import example_rows, score_rows

    base_scores = pd.DataFrame(score_rows(baseline, {}))
    cand_scores = pd.DataFrame(score_rows(candidate, {})).set_index(["task", "metric"])
    base_examples, cand_examples = pd.DataFrame(example_rows(baseline, {})), pd.DataFrame(example_rows(candidate, {}))
    checks = []
    for row in base_scores.itertuples():
        explicit = f"{row.task}/{row.metric}" in thresholds.metrics
        if thresholds.compare == "primary" and primary.get(row.task) != row.metric and not explicit:
            continue
        if (row.task, row.metric) not in cand_scores.index:
            raise UserError(f"candidate results lack {row.task}/{row.metric}")
        check = Check(row.task, row.metric, row.value, float(cand_scores.loc[(row.task, row.metric), "value"]),
                      bool(row.higher_is_better), _rule_for(thresholds, row.task, row.metric))
        bad = -check.delta if check.higher_is_better else check.delta  # > 0: worse
        if check.rule.get("min_gain") is not None:
            _judge_gain(check, bad)
        if check.rule.get("max_drop") is not None and check.status == "pass":
            check.p_value = _paired_p_value(base_examples, cand_examples, row.task, row.metric, check.higher_is_better)
            _judge_drop(check, bad, thresholds)
        checks.append(check)
    return checks


def markdown(checks: list[Check], title: str) -> str:
    verdict = "PASS" if all(c.status == "pass" for c in checks) else "FAIL"
    lines = [f"### {title}: {verdict}", "", "| task | metric | baseline | candidate | delta | p | result | why |",
             "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        p = "–" if c.p_value is None else f"{c.p_value:.4f}"
        mark = "✅ pass" if c.status == "pass" else f"❌ {c.status}"
        lines.append(f"| {c.task} | {c.metric} | {c.baseline:.4f} | {c.candidate:.4f} | {c.delta:+.4f} | {p} | {mark} | {c.reason} |")
    return "\n".join(lines) + "\n"


def junit_xml(checks: list[Check], name: str, seconds: float) -> str:
    """JUnit XML: one test case per compared metric; regressions are failures."""
    failures = sum(c.status != "pass" for c in checks)
    suite = ElementTree.Element("testsuite", name=name, tests=str(len(checks)), failures=str(failures), errors="0",
                                skipped="0", time=f"{seconds:.1f}")
    for c in checks:
        case = ElementTree.SubElement(suite, "testcase", classname=f"forgetting.gate.{c.task}", name=c.metric,
                                      time="0")
        if c.status != "pass":
            failure = ElementTree.SubElement(case, "failure", message=f"{c.status}: {c.reason}", type=c.status)
            failure.text = (f"baseline {c.baseline:.6f}, candidate {c.candidate:.6f}, delta {c.delta:+.6f}, "
                            f"p {c.p_value if c.p_value is not None else 'n/a'}")
        else:
            ElementTree.SubElement(case, "system-out").text = c.reason
    suites = ElementTree.Element("testsuites", name="forgetting gate", tests=str(len(checks)), failures=str(failures))
    suites.append(suite)
    ElementTree.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(suites, encoding="unicode") + "\n"


def check_same_settings(baseline: dict, candidate_settings: dict) -> None:
    """Refuse (exit 2) when the candidate would be evaluated differently from the baseline."""
    old = baseline.get("forgetting", {}).get("settings")
    if old is None:
        raise UserError("--baseline: the results file has no 'forgetting.settings' (not written by this tool); "
                        "pass the baseline model instead")
    ignored = {"batch_size", "include_path"}
    for key in sorted(set(old) | set(candidate_settings)):
        if key in ignored:
            continue
        if old.get(key) != candidate_settings.get(key):
            raise UserError(f"settings differ from the baseline's: {key} = {candidate_settings.get(key)!r} here, "
                            f"{old.get(key)!r} in the baseline; evaluate both the same way")


def check_same_documents(baseline: dict, candidate: dict) -> None:
    for task, samples in baseline.get("samples", {}).items():
        before = {s["doc_id"]: s.get("doc_hash") for s in samples}
        after = {s["doc_id"]: s.get("doc_hash") for s in candidate.get("samples", {}).get(task, [])}
        if before != after:
            raise UserError(f"{task}: the candidate was scored on other documents than the baseline "
                            f"(the task's data changed); re-evaluate the baseline")



def load_baseline(source: str, settings_overrides: dict, cache_dir) -> tuple[dict, dict]:
    """(baseline results, the settings to evaluate the candidate with) from a results file or a model."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from evals.runner import EvalSettings, evaluate, load_for_eval
    from harness.configlib import from_dict

    path = Path(source)
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"--baseline: {path} not found")
        try:
            baseline = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"--baseline: {path} is not a results JSON ({err})") from None
        if not isinstance(baseline, dict) or "results" not in baseline:
            raise UserError(f"--baseline: {path} has no 'results' (not an lm-eval/forgetting results file)")
        settings = dict(baseline.get("forgetting", {}).get("settings") or {})
        check_same_settings(baseline, settings | settings_overrides)
        return baseline, settings
    settings = asdict(from_dict(EvalSettings, settings_overrides))
    model, tokenizer = load_for_eval(source)
    return evaluate(model, tokenizer, from_dict(EvalSettings, settings), cache_dir=cache_dir), settings


def run_gate(candidate: str, adapter: str | None, baseline_source: str, thresholds: Thresholds,
             settings_overrides: dict, cache_dir) -> tuple[list[Check], dict]:
    """Evaluate the candidate like the baseline and compare; returns (checks, candidate results)."""
    from evals.runner import EvalSettings, evaluate, load_for_eval
    from harness.configlib import from_dict
    from harness.experiment import primary_metric

    baseline, settings = load_baseline(baseline_source, settings_overrides, cache_dir)
    model, tokenizer = load_for_eval(candidate, adapter)
    results = evaluate(model, tokenizer, from_dict(EvalSettings, settings), cache_dir=cache_dir)
    results["forgetting"]["model"] = {"source": candidate, "adapter": adapter}
    check_same_documents(baseline, results)
    primary = {task: primary_metric(task, [k.split(",")[0] for k in metrics if "," in k and "_stderr" not in k])
               for task, metrics in baseline["results"].items()}
    return compare(baseline, results, thresholds, primary), results
