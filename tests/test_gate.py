"""The regression gate: decisions on fixed per-document scores, the paired test (exact p-values, the allowance in
the null, Holm across metrics, simulated error rates), JUnit XML, settings checks, exit codes, and end to end
on tiny models and on the embedded model made to forget."""

from __future__ import annotations

import itertools
import json
import math
from xml.etree import ElementTree

import numpy as np
import pytest

from forgetting.harness.cli import main
from forgetting.harness.configlib import from_dict
from forgetting.harness.errors import RunError
from forgetting.reports.gate import Thresholds, compare, holm, junit_xml, markdown, sign_flip_pvalue

PRIMARY = {"forgetting_knowledge": "acc", "forgetting_prose": "bits_per_byte", "forgetting_target": "exact_match"}


def results(knowledge: list[int], target: list[int], prose: list[tuple[float, int]]) -> dict:
    def task(metric, values):
        mean = float(np.mean(values))
        return {f"{metric},none": mean, f"{metric}_stderr,none": float(np.std(values, ddof=1) / math.sqrt(len(values)))}

    bpb = -sum(ll for ll, _ in prose) / sum(n for _, n in prose) / math.log(2)
    return {
        "results": {
            "forgetting_knowledge": task("acc", knowledge),
            "forgetting_target": task("exact_match", target),
            "forgetting_prose": {"bits_per_byte,none": bpb},
        },
        "higher_is_better": {
            "forgetting_knowledge": {"acc": True},
            "forgetting_target": {"exact_match": True},
            "forgetting_prose": {"bits_per_byte": False},
        },
        "samples": {
            "forgetting_knowledge": [
                {"doc_id": i, "doc": {}, "metrics": ["acc"], "acc": float(v)} for i, v in enumerate(knowledge)
            ],
            "forgetting_target": [
                {"doc_id": i, "doc": {}, "metrics": ["exact_match"], "exact_match": float(v)}
                for i, v in enumerate(target)
            ],
            "forgetting_prose": [
                {"doc_id": i, "doc": {}, "metrics": ["bits_per_byte"], "bits_per_byte": [ll, n]}
                for i, (ll, n) in enumerate(prose)
            ],
        },
    }


BASE = results([1] * 90 + [0] * 10, [0] * 20, [(-100.0, 50)] * 10)


def decide(candidate: dict, **thresholds) -> dict:
    checks = compare(BASE, candidate, from_dict(Thresholds, thresholds), PRIMARY)
    return {c.task: c for c in checks}


def test_identical_candidate_passes_every_metric():
    checks = decide(BASE)
    assert [c.status for c in checks.values()] == ["pass"] * 3
    assert all(c.delta == 0 for c in checks.values())


def test_a_significant_drop_fails_only_its_own_metric():
    forgot = results([1] * 70 + [0] * 30, [1] * 20, [(-100.0, 50)] * 10)  # 20 of 90 correct answers lost
    checks = decide(forgot)
    assert checks["forgetting_knowledge"].status == "regression"
    assert checks["forgetting_knowledge"].p_value < 0.001
    assert checks["forgetting_prose"].status == "pass" and checks["forgetting_target"].status == "pass"


def test_a_drop_beyond_the_threshold_but_not_significant_passes_unless_plain_threshold():
    # 3 of 100 flipped: 0.03 > 0.02 but a paired test cannot tell it from chance
    candidate = results([1] * 87 + [0] * 13, [0] * 20, [(-100.0, 50)] * 10)
    paired = decide(candidate)["forgetting_knowledge"]
    assert paired.status == "pass" and "not significant" in paired.reason and paired.p_value > 0.05
    plain = decide(candidate, test="threshold")["forgetting_knowledge"]
    assert plain.status == "regression"


def test_relative_thresholds_lower_is_better_metrics_and_minimum_gain():
    worse_prose = results([1] * 90 + [0] * 10, [1] * 5 + [0] * 15, [(-110.0, 50)] * 10)  # bpb up by 10%
    checks = decide(
        worse_prose, metrics={"forgetting_prose": {"max_drop": "5%"}, "forgetting_target": {"min_gain": 0.5}}
    )
    assert checks["forgetting_prose"].status == "regression"  # higher bits per byte is worse
    assert checks["forgetting_target"].status == "insufficient gain"  # 0.25 < 0.5
    relaxed = decide(worse_prose, metrics={"forgetting_prose": {"max_drop": "15%"}})
    assert relaxed["forgetting_prose"].status == "pass"


def test_junit_xml_and_markdown_describe_each_check():
    forgot = results([1] * 70 + [0] * 30, [1] * 20, [(-100.0, 50)] * 10)
    checks = list(decide(forgot).values())
    root = ElementTree.fromstring(junit_xml(checks, "gate", 1.5))
    suite = root.find("testsuite")
    assert root.tag == "testsuites" and suite.get("tests") == "3" and suite.get("failures") == "1"
    cases = {c.get("classname") + "." + c.get("name"): c for c in suite.findall("testcase")}
    assert set(cases) == {
        "forgetting.gate.forgetting_knowledge.acc",
        "forgetting.gate.forgetting_prose.bits_per_byte",
        "forgetting.gate.forgetting_target.exact_match",
    }
    failure = cases["forgetting.gate.forgetting_knowledge.acc"].find("failure")
    assert failure is not None and failure.get("type") == "regression"
    assert cases["forgetting.gate.forgetting_prose.bits_per_byte"].find("failure") is None
    assert "test exact" in failure.text and "Holm p" in failure.text  # which test decided, with its numbers
    text = markdown(checks, "gate")
    assert "FAIL" in text and "| forgetting_knowledge | acc | 0.9000 | 0.7000 | -0.2000 |" in text
    assert "| exact | ❌ regression |" in text and "Holm p: adjusted across the 3 tested metrics" in text


# --- per-document scores for every metric lm-eval keeps them for; the rest judged by threshold alone, saying so


def with_wiki(res: dict, perplexities: list[float] | None, words: int = 10, samples: bool = True) -> dict:
    """`res` plus a loglikelihood_rolling task whose documents have these word perplexities (lm-eval's layout)."""
    res = json.loads(json.dumps(res))
    pairs = [(-words * math.log(p), words) for p in perplexities]
    res["results"]["forgetting_wiki"] = {
        "word_perplexity,none": math.exp(-sum(ll for ll, _ in pairs) / sum(n for _, n in pairs))
    }
    res["higher_is_better"]["forgetting_wiki"] = {"word_perplexity": False}
    if samples:
        res["samples"]["forgetting_wiki"] = [
            {"doc_id": i, "doc": {}, "metrics": ["word_perplexity"], "word_perplexity": list(pair)}
            for i, pair in enumerate(pairs)
        ]
    return res


def decide_wiki(base: dict, candidate: dict, **thresholds) -> dict:
    checks = compare(
        base, candidate, from_dict(Thresholds, thresholds), PRIMARY | {"forgetting_wiki": "word_perplexity"}
    )
    return {c.task: c for c in checks}


def test_a_word_perplexity_rise_is_tested_per_document_on_the_log_scale():
    base, worse = with_wiki(BASE, [10.0] * 20), with_wiki(BASE, [40.0] * 20)
    check = decide_wiki(base, worse, metrics={"forgetting_wiki": {"max_drop": "10%"}})["forgetting_wiki"]
    assert (check.baseline, check.candidate) == (pytest.approx(10.0), pytest.approx(40.0))
    assert check.status == "regression" and check.method == "exact" and check.p_value == pytest.approx(2.0**-20)
    # every document exactly 10% worse: at the allowance, not beyond it; 11% worse beyond it
    at_allowance = decide_wiki(base, with_wiki(BASE, [11.0] * 20), metrics={"forgetting_wiki": {"max_drop": "10%"}})
    assert at_allowance["forgetting_wiki"].status == "pass" and at_allowance["forgetting_wiki"].p_value == 1.0
    beyond = decide_wiki(base, with_wiki(BASE, [11.1] * 20), metrics={"forgetting_wiki": {"max_drop": "10%"}})
    assert beyond["forgetting_wiki"].status == "regression"


def test_a_metric_without_per_document_scores_is_judged_by_its_threshold_and_says_so():
    base, worse = with_wiki(BASE, [10.0] * 20, samples=False), with_wiki(BASE, [40.0] * 20, samples=False)
    check = decide_wiki(base, worse, metrics={"forgetting_wiki": {"max_drop": "10%"}})["forgetting_wiki"]
    assert check.status == "regression" and check.p_value is None
    assert "threshold only: no per-document scores" in check.reason
    assert "threshold only: no per-document scores" in markdown([check], "gate")
    within = decide_wiki(
        base, with_wiki(BASE, [10.5] * 20, samples=False), metrics={"forgetting_wiki": {"max_drop": "10%"}}
    )["forgetting_wiki"]
    assert within.status == "pass" and "threshold only: no per-document scores" in within.reason


# --- the statistics: exact p-values, the allowance in the null, Holm across metrics


def brute_force_pvalue(diffs, weights, allowance):
    terms = np.asarray(weights) * (np.asarray(diffs) - allowance)
    sums = [float(np.dot(signs, terms)) for signs in itertools.product([-1.0, 1.0], repeat=len(terms))]
    return sum(s >= terms.sum() - 1e-9 for s in sums) / len(sums)


@pytest.mark.parametrize(
    "diffs,weights,allowance",
    [
        ([1.0, 1.0, 1.0, 0.0, -1.0, 1.0], [1.0] * 6, 0.0),
        ([1.0, 1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 1.0, 1.0, 0.0, -1.0, 1.0], [1.0] * 12, 0.05),  # ties, shifted
        ([0.3, -0.1, 0.25, 0.4, 0.05, -0.2, 0.31, 0.12, 0.0, 0.22], [3, 1, 2, 5, 1, 1, 2, 4, 1, 2], 0.1),  # weighted
    ],
)
def test_exact_pvalue_equals_brute_force_enumeration(diffs, weights, allowance):
    p, method = sign_flip_pvalue(np.array(diffs), np.array(weights, float), allowance)
    assert method == "exact"
    assert p == pytest.approx(brute_force_pvalue(diffs, weights, allowance), abs=1e-12)
    approx, method = sign_flip_pvalue(np.array(diffs), np.array(weights, float), allowance, max_exact=1)
    assert method == "Monte Carlo" and approx == pytest.approx(p, abs=0.01)


def test_many_distinct_differences_fall_back_to_monte_carlo():
    diffs = np.random.default_rng(0).normal(0.1, 1.0, 40)  # 2^40 sign patterns
    p, method = sign_flip_pvalue(diffs, np.ones(40))
    assert method == "Monte Carlo" and 0 < p < 1


def test_holm_matches_a_hand_computation():
    # sorted 0.005, 0.01, 0.03, 0.04 against 0.05/4, 0.05/3, 0.05/2, 0.05/1: the first two are rejected, then stop
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([]) == [] and holm([0.7]) == [0.7] and holm([0.5, 0.6]) == [1.0, 1.0]


def test_two_drops_significant_alone_are_not_regressions_after_holm():
    base = results([1] * 90 + [0] * 10, [1] * 20, [(-100.0, 50)] * 10)
    rules = {"forgetting_knowledge": {"max_drop": "0"}, "forgetting_target": {"max_drop": "0"}}
    five_lost = results([1] * 85 + [0] * 15, [1] * 15 + [0] * 5, [(-100.0, 50)] * 10)  # exact p = 2^-5 each
    checks = {c.task: c for c in compare(base, five_lost, from_dict(Thresholds, {"metrics": rules}), PRIMARY)}
    for task in ("forgetting_knowledge", "forgetting_target"):
        assert checks[task].p_value == pytest.approx(1 / 32) and checks[task].p_holm == pytest.approx(3 / 32)
        assert checks[task].status == "pass" and "not significant" in checks[task].reason
    seven_lost = results([1] * 83 + [0] * 17, [1] * 13 + [0] * 7, [(-100.0, 50)] * 10)  # 3 * 2^-7 < 0.05
    checks = compare(base, seven_lost, from_dict(Thresholds, {"metrics": rules}), PRIMARY)
    assert [c.status for c in checks if c.task != "forgetting_prose"] == ["regression", "regression"]


def simulated_gate(rng, metrics: int, docs: int, lose: float, gain: float, max_drop: str) -> bool:
    """One gate over `metrics` tasks of per-document 0/1 scores; True when it fails."""

    def task(values):
        return {"acc,none": float(np.mean(values))}

    base, cand = {}, {}
    for t in range(metrics):
        before = rng.random(docs) < 0.7
        change = rng.random(docs)
        after = np.where(before & (change < lose / 0.7), False, np.where(~before & (change < gain / 0.3), True, before))
        for res, values in ((base, before), (cand, after)):
            res.setdefault("results", {})[f"t{t}"] = task(values)
            res.setdefault("higher_is_better", {})[f"t{t}"] = {"acc": True}
            res.setdefault("samples", {})[f"t{t}"] = [
                {"doc_id": i, "metrics": ["acc"], "acc": bool(v)} for i, v in enumerate(values)
            ]
    thresholds = from_dict(Thresholds, {"default": {"max_drop": max_drop}})
    return any(c.status != "pass" for c in compare(base, cand, thresholds, {f"t{t}": "acc" for t in range(metrics)}))


def test_with_no_true_change_the_familywise_failure_rate_stays_within_alpha():
    # the hardest null: no allowance, each document as likely to be lost as gained; 15 metrics per gate
    rng = np.random.default_rng(1)
    failures = sum(simulated_gate(rng, metrics=15, docs=100, lose=0.05, gain=0.05, max_drop="0") for _ in range(300))
    assert failures / 300 <= 0.05


def test_a_true_drop_exactly_at_the_allowance_fails_at_most_about_alpha():
    # 15% of documents lost, 10% gained: the expected drop is exactly the allowed 0.05
    rng = np.random.default_rng(2)
    failures = sum(simulated_gate(rng, metrics=1, docs=200, lose=0.15, gain=0.10, max_drop="0.05") for _ in range(400))
    assert failures / 400 <= 0.06


@pytest.fixture(scope="module")
def tiny_baseline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gate")
    path = folder / "base.json"
    assert (
        main(
            [
                "eval",
                "tiny-random",
                "--tasks",
                "forgetting_knowledge,forgetting_target",
                "--limit",
                "8",
                "--output",
                str(path),
            ]
        )
        == 0
    )
    return path


def test_gate_passes_an_identical_candidate_and_writes_every_output(tiny_baseline, tmp_path, capsys):
    outputs = {"--junit": tmp_path / "gate.xml", "--markdown": tmp_path / "gate.md", "--output": tmp_path / "next.json"}
    args = ["gate", "tiny-random", "--baseline", str(tiny_baseline)] + [
        a for k, v in outputs.items() for a in (k, str(v))
    ]
    assert main(args) == 0
    assert "2 of 2 checks passed" in capsys.readouterr().out
    suite = ElementTree.parse(outputs["--junit"]).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "0"
    assert json.loads(outputs["--output"].read_text())["forgetting"]["settings"]["limit"] == 8
    assert main(args) == 2  # outputs exist: never overwritten silently
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--limit", "4"], "settings differ from the baseline's: limit = 4 here, 8 in the baseline"),
        (["--tasks", "forgetting_knowledge"], "settings differ from the baseline's: tasks"),
        (["--max-drop", "forgetting_knowledge"], "expected TASK[/METRIC]=VALUE"),
        (["--max-drop", "forgetting_knowledge=lots"], "expected a number like 0.02 or a percentage"),
        (["--min-gain", "forgetting_target=x"], "is not a number"),
        (["--alpha", "2"], "alpha: must be in (0, 1)"),
        (["--batch-size", "4"], "--batch-size: the baseline results file decides the settings"),
    ],
)
def test_gate_usage_errors_exit_2_with_one_line(tiny_baseline, capsys, extra, message):
    assert main(["gate", "tiny-random", "--baseline", str(tiny_baseline), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_gate_thresholds_file_and_baseline_file_errors(tiny_baseline, tmp_path, capsys):
    bad = tmp_path / "thresholds.yaml"
    bad.write_text("defaults: {max_drop: 0.01}\n")
    assert main(["gate", "tiny-random", "--baseline", str(tiny_baseline), "--thresholds", str(bad)]) == 2
    assert "did you mean 'default'" in capsys.readouterr().err
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"results": {}}))
    assert main(["gate", "tiny-random", "--baseline", str(foreign)]) == 2
    assert "no 'forgetting.settings'" in capsys.readouterr().err
    assert main(["gate", "tiny-random", "--baseline", str(tmp_path / "missing.json")]) == 2


@pytest.mark.slow
def test_gate_fails_the_embedded_model_after_an_aggressive_fine_tune(tmp_path, capsys):
    """Base SmolLM2 as the baseline; the candidate trained at LR 1e-3 on the narrow task forgets knowledge."""
    base = tmp_path / "base.json"
    assert (
        main(
            [
                "eval",
                "embedded:smollm2-135m-instruct",
                "--tasks",
                "forgetting_knowledge,forgetting_target",
                "--limit",
                "48",
                "--output",
                str(base),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "configs/demo.yaml",
                "train.lr=1e-3",
                "train.max_steps=12",
                "train.precision=fp32",
                "train.save_every=0",
                "data.eval_split=null",
                "train.progress=false",
                f"output_dir={tmp_path / 'tuned'}",
            ]
        )
        == 0
    )
    capsys.readouterr()
    junit = tmp_path / "gate.xml"
    code = main(
        [
            "gate",
            str(tmp_path / "tuned" / "final"),
            "--baseline",
            str(base),
            "--max-drop",
            "forgetting_knowledge=0.02",
            "--min-gain",
            "forgetting_target=0.5",
            "--junit",
            str(junit),
        ]
    )
    out = capsys.readouterr().out
    assert code == 1, out
    assert "failed: forgetting_knowledge/acc" in out
    cases = {c.get("classname"): c for c in ElementTree.parse(junit).getroot().iter("testcase")}
    assert cases["forgetting.gate.forgetting_knowledge"].find("failure") is not None
    assert cases["forgetting.gate.forgetting_target"].find("failure") is None  # it learned the task


def test_gate_with_a_model_as_baseline_evaluates_both_the_same_way(tmp_path, capsys):
    assert (
        main(
            [
                "gate",
                "tiny-random",
                "--baseline",
                "tiny-random",
                "--tasks",
                "forgetting_knowledge",
                "--limit",
                "4",
                "--output",
                str(tmp_path / "next.json"),
            ]
        )
        == 0
    )
    assert "1 of 1 checks passed" in capsys.readouterr().out
    saved = json.loads((tmp_path / "next.json").read_text())["forgetting"]["settings"]
    assert saved["tasks"] == ["forgetting_knowledge"] and saved["limit"] == 4


@pytest.mark.parametrize(
    "error",
    [
        RunError("model 'cand': weights do not match the config"),
        OSError(28, "No space left on device", "next.json"),
        RuntimeError("CUDA error: device-side assert triggered\nsecond line"),
    ],
)
def test_a_runtime_failure_exits_3_never_1(monkeypatch, tmp_path, capsys, error):
    from forgetting.reports import gate

    def crash(*args, **kwargs):
        raise error

    monkeypatch.setattr(gate, "run_gate", crash)
    assert main(["gate", "cand", "--baseline", str(tmp_path / "base.json")]) == 3
    err = capsys.readouterr().err
    assert "no verdict" in err and len(err.strip().splitlines()) == 1
    assert main(["gate", "cand", "--baseline", str(tmp_path / "base.json"), "--debug"]) == 3  # with the traceback
    assert "Traceback" in capsys.readouterr().err


def test_gate_help_lists_every_exit_code(capsys):
    with pytest.raises(SystemExit):
        main(["gate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for code in ("0: pass", "1: regression", "2: usage", "3: runtime failure"):
        assert code in text


def test_exact_pvalue_over_thousands_of_tied_documents_is_the_binomial_tail():
    """0/1 scores over 3000 documents: one magnitude, 3000 ties; the exact p is a sign test's binomial tail."""
    from fractions import Fraction
    from math import comb

    from forgetting.reports.gate import sign_flip_pvalue

    diffs = np.zeros(3000)
    diffs[:1600], diffs[1600:] = 1.0, -1.0
    p, method = sign_flip_pvalue(diffs, np.ones(3000))
    tail = Fraction(sum(comb(3000, k) for k in range(1600, 3001)), 2**3000)
    assert method == "exact" and p == pytest.approx(float(tail), rel=1e-9)
