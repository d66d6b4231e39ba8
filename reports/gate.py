"""The regression gate: does a candidate checkpoint score worse than a baseline by more than allowed?

    forgetting gate CANDIDATE --baseline BASELINE [--thresholds FILE | --max-drop T=0.02 ...] [--min-gain T=0.5]

BASELINE is a saved results JSON (`forgetting eval`, a run's base/eval.json, a previous gate's --output) or a
model; the candidate is evaluated on the baseline's tasks with the baseline's settings.

Per compared metric with a `max_drop` rule the gate tests H0 "the drop (in the metric's bad direction) is at
most the allowed drop" over the same documents: the per-document differences, shifted by the allowance, go
through a one-sided sign-flip test, exact (every sign pattern, counted over tied magnitudes) up to 2^20
patterns and Monte Carlo (20,000 random patterns) above. Holm's step-down procedure across the tested metrics
keeps the chance of failing any metric whose true drop is within its allowance at most `alpha`. A regression
is a drop beyond the allowance whose Holm-adjusted p-value is <= alpha. A metric lm-eval keeps no
per-document scores for is judged by its threshold alone, and the outputs say so; `test: threshold` judges
every metric that way. A `min_gain` rule fails a metric that gains less.

Exit codes (harness/cli.py): 0 pass, 1 regression or insufficient gain, 2 usage or config error, 3 runtime
failure (no verdict: a model that does not load, a crashed evaluation, a full disk).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal
from xml.etree import ElementTree

import numpy as np

from forgetting.evals.runner import EvalSettings, evaluate, load_for_eval, metric_entries
from forgetting.harness.configlib import from_dict, knob
from forgetting.harness.errors import HarnessError, RunError, UserError
from forgetting.harness.experiment import primary_metric
from forgetting.reports.tidy import score_rows

MAX_EXACT = 2**20  # sign patterns (after grouping ties) enumerated exactly; Monte Carlo above
PERMUTATIONS = 20000
NO_DOCUMENTS = "threshold only: no per-document scores"
THRESHOLD_TEST = "threshold only (test: threshold)"
# lm-eval's loglikelihood_rolling metrics keep a (loglikelihood, words or bytes) pair per document and
# aggregate the corpus: bits_per_byte = -sum(ll) / sum(bytes) / ln 2, perplexities = exp(-sum(ll) / sum(n)).
# Both are weighted means (weight n) of per-document -ll/n, the perplexities through exp: those are tested
# on the log scale, where "perplexity rose by at most X" is "mean loss rose by at most log((p + X) / p)".
ROLLING = {"bits_per_byte": 1 / math.log(2), "word_perplexity": 1.0, "byte_perplexity": 1.0}
LOG_SCALE = {"word_perplexity", "byte_perplexity"}


class GateRunError(RunError):
    """The gate failed while running and reached no verdict: exit 3, so CI never reads it as a regression."""

    exit_code = 3


def runtime_failure(err: Exception) -> GateRunError:
    """A one-line GateRunError for any failure while gating (the traceback stays behind --debug)."""
    if isinstance(err, OSError):
        text = f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
    elif isinstance(err, HarnessError):
        text = str(err)
    else:
        text = f"{type(err).__name__}: {err}"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return GateRunError(f"the gate failed while running (exit 3, no verdict): {first}")


@dataclass
class Thresholds:
    default: dict = knob({"max_drop": "0.02"}, "rule for every compared metric without its own")
    metrics: dict[str, dict] = knob({}, "task or task/metric -> rule, e.g. {forgetting_knowledge: {max_drop: 3%}}")
    test: Literal["paired", "threshold"] = knob(
        "paired", "paired: a drop must also be significant; threshold: the drop alone"
    )
    alpha: float = knob(0.05, "familywise significance level across the tested metrics (Holm)")
    compare: Literal["primary", "all"] = knob(
        "primary", "metrics compared: each task's primary metric, or every metric"
    )

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
                raise UserError(
                    f"--{flag.replace('_', '-')} {item!r}: expected TASK[/METRIC]=VALUE, e.g. forgetting_knowledge=0.02"
                )
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


def sign_flip_pvalue(
    diffs: np.ndarray,
    weights: np.ndarray,
    allowance: float = 0.0,
    permutations: int = PERMUTATIONS,
    seed: int = 0,
    max_exact: int = MAX_EXACT,
) -> tuple[float, str]:
    """(p, "exact" or "Monte Carlo"): one-sided p-value of H0 "weighted mean of `diffs` <= allowance".

    `diffs` are per-document differences, > 0 worse. At H0's boundary each shifted difference is as likely
    positive as negative, so the observed weighted sum is ranked among the sums of every sign pattern.
    """
    diffs, weights = np.asarray(diffs, float), np.asarray(weights, float)
    scale = float(np.max(np.abs(weights) * (np.abs(diffs) + abs(allowance)), initial=0.0))
    terms = weights * (diffs - allowance)
    terms = terms[np.abs(terms) > 1e-12 * scale]  # zero up to rounding: the same under either sign
    observed, tol = terms.sum(), 1e-9 * scale  # tol: equal sums added up in another order
    magnitudes, counts = np.unique(np.abs(terms), return_counts=True)
    if np.prod(counts + 1.0) <= max_exact:
        # all 2^n patterns, grouped by how many of each tied magnitude are negative (binomial counts)
        sums, probs = np.zeros(1), np.ones(1)
        for magnitude, count in zip(magnitudes, counts):
            negative = np.arange(count + 1)
            pmf = np.exp(
                [
                    math.lgamma(count + 1) - math.lgamma(k + 1) - math.lgamma(count - k + 1) - count * math.log(2)
                    for k in negative
                ]
            )  # Binomial(count, 1/2), in logs: thousands of ties stay finite
            sums = np.add.outer(sums, magnitude * (count - 2 * negative)).ravel()
            probs = np.multiply.outer(probs, pmf).ravel()
        return min(1.0, float(probs[sums >= observed - tol].sum())), "exact"
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, permutations, 1000):  # in chunks: bounded memory for many documents
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(1000, permutations - start), len(terms)))
        hits += int(np.sum(signs @ terms >= observed - tol))
    return (1 + hits) / (1 + permutations), "Monte Carlo"  # counts the observed pattern: a valid p-value


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values: rejecting those <= alpha keeps the familywise error <= alpha,
    whatever the dependence between the tests."""
    adjusted, running, m = [0.0] * len(p_values), 0.0, len(p_values)
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass
class Check:
    task: str
    metric: str
    baseline: float
    candidate: float
    higher_is_better: bool
    rule: dict
    allowed: float | None = None  # the allowed drop in the metric's units
    p_value: float | None = None  # the paired test's, before Holm
    p_holm: float | None = None  # Holm-adjusted across the tested metrics
    method: str = ""  # exact | Monte Carlo | threshold only: ...
    status: str = "pass"  # pass | regression | insufficient gain
    reason: str = ""

    @property
    def delta(self) -> float:
        return self.candidate - self.baseline

    @property
    def bad(self) -> float:
        """The change in the metric's bad direction: > 0 is worse."""
        return -self.delta if self.higher_is_better else self.delta


def _rule_for(thresholds: Thresholds, task: str, metric: str) -> dict | None:
    for key in (f"{task}/{metric}", task):
        if key in thresholds.metrics:
            return thresholds.metrics[key]
    return thresholds.default


def per_document(results: dict, task: str, metric: str) -> dict[int, tuple[float, float]] | None:
    """{doc: (value, weight)} whose weighted mean is the task's score (its log for perplexities); None when
    lm-eval kept no per-document scores the score is such a mean of."""
    aggregation = next(
        (
            m.get("aggregation")
            for m in results.get("configs", {}).get(task, {}).get("metric_list", [])
            if m.get("metric") == metric
        ),
        None,
    )
    out = {}
    for sample in results.get("samples", {}).get(task, []):
        value = sample.get(metric)
        if isinstance(value, (bool, int, float)) and aggregation in (None, "mean"):
            out[int(sample["doc_id"])] = (float(value), 1.0)
        elif isinstance(value, list) and value and all(isinstance(v, bool) for v in value):  # instruction-level
            out[int(sample["doc_id"])] = (sum(value) / len(value), float(len(value)))
        elif metric in ROLLING and isinstance(value, list) and len(value) == 2:
            loglikelihood, n = value
            out[int(sample["doc_id"])] = (-loglikelihood / n * ROLLING[metric], float(n))
        else:
            return None
    return out or None


def _paired_test(baseline: dict, candidate: dict, check: Check) -> tuple[float | None, str]:
    """(p, method) of H0 "drop <= allowed" over the per-document scores; (None, why) without them."""
    base = per_document(baseline, check.task, check.metric)
    cand = per_document(candidate, check.task, check.metric)
    if base is None or cand is None:
        return None, NO_DOCUMENTS
    if base.keys() != cand.keys():
        raise UserError(f"{check.task}: the candidate was scored on other documents than the baseline")
    docs = sorted(base)
    before, after = np.array([base[d][0] for d in docs]), np.array([cand[d][0] for d in docs])
    worse = before - after if check.higher_is_better else after - before
    # the allowance on the per-document scale: log(p + X) - log(p) for a perplexity p allowed to rise by X
    to_scale = math.log if check.metric in LOG_SCALE else (lambda x: x)
    limit = check.baseline - check.allowed if check.higher_is_better else check.baseline + check.allowed
    allowance = abs(to_scale(limit) - to_scale(check.baseline))
    return sign_flip_pvalue(worse, np.array([base[d][1] for d in docs]), allowance)


def _judge(check: Check, alpha: float) -> None:
    gain, required = -check.bad, check.rule.get("min_gain")
    if required is not None and gain < required:
        check.status, check.reason = "insufficient gain", f"gain {gain:+.4f} < required {required}"
        return
    reasons = [f"gain {gain:+.4f} >= required {required}"] if required is not None else []
    if check.allowed is not None:
        beyond = check.bad > check.allowed
        drop = (
            f"drop {check.bad:.4f} > allowed {check.allowed:.4f}"
            if beyond
            else f"drop {max(check.bad, 0.0) + 0.0:.4f} <= allowed {check.allowed:.4f}"
        )  # + 0.0: not -0.0000
        if check.p_holm is None:  # judged by the threshold alone: say so
            check.status = "regression" if beyond else "pass"
            drop += f" ({check.method})"
        elif beyond and check.p_holm <= alpha:
            check.status = "regression"
            drop += f", Holm p = {check.p_holm:.4g} <= {alpha}"
        elif beyond:
            drop += f" but not significant: Holm p = {check.p_holm:.4g} > {alpha}"
        reasons.append(drop)
    check.reason = "; ".join(reasons)


def compare(baseline: dict, candidate: dict, thresholds: Thresholds, primary: dict[str, str]) -> list[Check]:
    """One Check per compared metric of the baseline's results; Holm across the metrics tested per document."""
    cand_scores = {(r["task"], r["metric"]): r["value"] for r in score_rows(candidate, {})}
    checks = []
    for row in score_rows(baseline, {}):
        task, metric = row["task"], row["metric"]
        explicit = f"{task}/{metric}" in thresholds.metrics
        if thresholds.compare == "primary" and primary.get(task) != metric and not explicit:
            continue
        if (task, metric) not in cand_scores:
            raise UserError(f"candidate results lack {task}/{metric}")
        check = Check(
            task,
            metric,
            row["value"],
            cand_scores[(task, metric)],
            row["higher_is_better"],
            _rule_for(thresholds, task, metric),
        )
        if check.rule.get("max_drop") is not None:
            amount, relative = parse_drop(check.rule["max_drop"], "max_drop")
            check.allowed = amount * abs(check.baseline) if relative else amount
            if thresholds.test == "paired":
                check.p_value, check.method = _paired_test(baseline, candidate, check)
            else:
                check.method = THRESHOLD_TEST
        checks.append(check)
    tested = [c for c in checks if c.p_value is not None]
    for check, adjusted in zip(tested, holm([c.p_value for c in tested])):
        check.p_holm = adjusted
    for check in checks:
        _judge(check, thresholds.alpha)
    return checks


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def markdown(checks: list[Check], title: str) -> str:
    verdict = "PASS" if all(c.status == "pass" for c in checks) else "FAIL"
    lines = [
        f"### {title}: {verdict}",
        "",
        "| task | metric | baseline | candidate | delta | p | Holm p | test | result | why |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        mark = "✅ pass" if c.status == "pass" else f"❌ {c.status}"
        lines.append(
            f"| {c.task} | {c.metric} | {c.baseline:.4f} | {c.candidate:.4f} | {c.delta:+.4f} | {_p(c.p_value)} "
            f"| {_p(c.p_holm)} | {c.method or '–'} | {mark} | {c.reason} |"
        )
    tested = sum(c.p_holm is not None for c in checks)
    if tested:
        lines += [
            "",
            f"p: one-sided paired sign-flip test of H0 'drop <= allowed' over the documents (exact: every "
            f"sign pattern; Monte Carlo: {PERMUTATIONS} random ones); Holm p: adjusted across the {tested} "
            f"tested metric{'s' if tested > 1 else ''}; a regression needs Holm p <= alpha, which bounds "
            f"the chance of failing any metric whose true drop is within its allowance.",
        ]
    return "\n".join(lines) + "\n"


def junit_xml(checks: list[Check], name: str, seconds: float) -> str:
    """JUnit XML: one test case per compared metric; regressions are failures."""
    failures = sum(c.status != "pass" for c in checks)
    suite = ElementTree.Element(
        "testsuite",
        name=name,
        tests=str(len(checks)),
        failures=str(failures),
        errors="0",
        skipped="0",
        time=f"{seconds:.1f}",
    )
    for c in checks:
        case = ElementTree.SubElement(suite, "testcase", classname=f"forgetting.gate.{c.task}", name=c.metric, time="0")
        numbers = (
            f"baseline {c.baseline:.6f}, candidate {c.candidate:.6f}, delta {c.delta:+.6f}, "
            f"p {_p(c.p_value)}, Holm p {_p(c.p_holm)}, test {c.method or '–'}"
        )
        if c.status != "pass":
            failure = ElementTree.SubElement(case, "failure", message=f"{c.status}: {c.reason}", type=c.status)
            failure.text = numbers
        else:
            ElementTree.SubElement(case, "system-out").text = f"{c.reason}\n{numbers}"
    suites = ElementTree.Element("testsuites", name="forgetting gate", tests=str(len(checks)), failures=str(failures))
    suites.append(suite)
    ElementTree.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(suites, encoding="unicode") + "\n"


def check_same_settings(baseline: dict, candidate_settings: dict) -> None:
    """Refuse (exit 2) when the candidate would be evaluated differently from the baseline."""
    old = baseline.get("forgetting", {}).get("settings")
    if old is None:
        raise UserError(
            "--baseline: the results file has no 'forgetting.settings' (not written by this tool); "
            "pass the baseline model instead"
        )
    ignored = {"batch_size", "include_path"}
    for key in sorted(set(old) | set(candidate_settings)):
        if key in ignored:
            continue
        if old.get(key) != candidate_settings.get(key):
            raise UserError(
                f"settings differ from the baseline's: {key} = {candidate_settings.get(key)!r} here, "
                f"{old.get(key)!r} in the baseline; evaluate both the same way"
            )


def check_same_documents(baseline: dict, candidate: dict) -> None:
    for task, samples in baseline.get("samples", {}).items():
        before = {s["doc_id"]: s.get("doc_hash") for s in samples}
        after = {s["doc_id"]: s.get("doc_hash") for s in candidate.get("samples", {}).get(task, [])}
        if before != after:
            raise UserError(
                f"{task}: the candidate was scored on other documents than the baseline "
                f"(the task's data changed); re-evaluate the baseline"
            )


def load_baseline(source: str, settings_overrides: dict, cache_dir) -> tuple[dict, dict]:
    """(baseline results, the settings to evaluate the candidate with) from a results file or a model."""
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
        if "batch_size" in settings_overrides:  # the candidate is evaluated with the baseline's settings
            raise UserError(
                "--batch-size: the baseline results file decides the settings (batching can change "
                "scores); drop the flag, or pass the baseline model to evaluate both at this size"
            )
        settings = dict(baseline.get("forgetting", {}).get("settings") or {})
        check_same_settings(baseline, settings | settings_overrides)
        return baseline, settings
    settings = asdict(from_dict(EvalSettings, settings_overrides))
    model, tokenizer = load_for_eval(source)
    return evaluate(model, tokenizer, from_dict(EvalSettings, settings), cache_dir=cache_dir), settings


def run_gate(
    candidate: str,
    adapter: str | None,
    baseline_source: str,
    thresholds: Thresholds,
    settings_overrides: dict,
    cache_dir,
) -> tuple[list[Check], dict]:
    """Evaluate the candidate like the baseline and compare; returns (checks, candidate results)."""
    baseline, settings = load_baseline(baseline_source, settings_overrides, cache_dir)
    model, tokenizer = load_for_eval(candidate, adapter)
    results = evaluate(model, tokenizer, from_dict(EvalSettings, settings), cache_dir=cache_dir)
    results["forgetting"]["model"] = {"source": candidate, "adapter": adapter}
    check_same_documents(baseline, results)
    primary = {
        task: primary_metric(task, [metric for metric, _, _ in metric_entries(metrics)])
        for task, metrics in baseline["results"].items()
    }
    return compare(baseline, results, thresholds, primary), results
