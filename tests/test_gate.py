"""The regression gate: decisions on fixed per-document scores, the paired test, JUnit XML, settings checks,
and end to end on tiny models and on the embedded model made to forget."""

from __future__ import annotations

import json
import math
from xml.etree import ElementTree

import numpy as np
import pytest

from evals.gate import Thresholds, compare, junit_xml, markdown, sign_flip_pvalue
from harness.cli import main
from harness.configlib import from_dict

PRIMARY = {"forgetting_knowledge": "acc", "forgetting_prose": "bits_per_byte", "forgetting_target": "exact_match"}


def results(knowledge: list[int], target: list[int], prose: list[tuple[float, int]]) -> dict:
    def task(metric, values):
        mean = float(np.mean(values))
        return {f"{metric},none": mean,
                f"{metric}_stderr,none": float(np.std(values, ddof=1) / math.sqrt(len(values)))}

    bpb = -sum(ll for ll, _ in prose) / sum(n for _, n in prose) / math.log(2)
    return {"results": {"forgetting_knowledge": task("acc", knowledge), "forgetting_target": task("exact_match", target),
                        "forgetting_prose": {"bits_per_byte,none": bpb}},
            "higher_is_better": {"forgetting_knowledge": {"acc": True}, "forgetting_target": {"exact_match": True},
                                 "forgetting_prose": {"bits_per_byte": False}},
            "samples": {"forgetting_knowledge": [{"doc_id": i, "doc": {}, "metrics": ["acc"], "acc": float(v)}
                                                 for i, v in enumerate(knowledge)],
                        "forgetting_target": [{"doc_id": i, "doc": {}, "metrics": ["exact_match"], "exact_match": float(v)}
                                              for i, v in enumerate(target)],
                        "forgetting_prose": [{"doc_id": i, "doc": {}, "metrics": ["bits_per_byte"], "bits_per_byte": [ll, n]}
                                             for i, (ll, n) in enumerate(prose)]}}


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
    checks = decide(worse_prose, metrics={"forgetting_prose": {"max_drop": "5%"},
                                          "forgetting_target": {"min_gain": 0.5}})
    assert checks["forgetting_prose"].status == "regression"  # higher bits per byte is worse
    assert checks["forgetting_target"].status == "insufficient gain"  # 0.25 < 0.5
    relaxed = decide(worse_prose, metrics={"forgetting_prose": {"max_drop": "15%"}})
    assert relaxed["forgetting_prose"].status == "pass"


def test_sign_flip_pvalue_matches_exact_enumeration():
    diffs = np.array([-1.0, -1.0, -1.0, 0.0, 1.0, -1.0])
    weights = np.ones(6)
    observed = diffs.mean()
    signs = np.array(np.meshgrid(*[[-1, 1]] * 6)).reshape(6, -1).T
    exact = np.mean((signs * diffs).mean(1) <= observed + 1e-12)
    assert sign_flip_pvalue(diffs, weights, permutations=200000) == pytest.approx(exact, abs=0.01)


def test_junit_xml_and_markdown_describe_each_check():
    forgot = results([1] * 70 + [0] * 30, [1] * 20, [(-100.0, 50)] * 10)
    checks = list(decide(forgot).values())
    root = ElementTree.fromstring(junit_xml(checks, "gate", 1.5))
    suite = root.find("testsuite")
    assert root.tag == "testsuites" and suite.get("tests") == "3" and suite.get("failures") == "1"
    cases = {c.get("classname") + "." + c.get("name"): c for c in suite.findall("testcase")}
    assert set(cases) == {"forgetting.gate.forgetting_knowledge.acc", "forgetting.gate.forgetting_prose.bits_per_byte",
                          "forgetting.gate.forgetting_target.exact_match"}
    failure = cases["forgetting.gate.forgetting_knowledge.acc"].find("failure")
    assert failure is not None and failure.get("type") == "regression"
    assert cases["forgetting.gate.forgetting_prose.bits_per_byte"].find("failure") is None
    text = markdown(checks, "gate")
    assert "FAIL" in text and "| forgetting_knowledge | acc | 0.9000 | 0.7000 | -0.2000 |" in text


@pytest.fixture(scope="module")
def tiny_baseline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gate")
    path = folder / "base.json"
    assert main(["eval", "tiny-random", "--tasks", "forgetting_knowledge,forgetting_target", "--limit", "8",
                 "--output", str(path)]) == 0
    return path


def test_gate_passes_an_identical_candidate_and_writes_every_output(tiny_baseline, tmp_path, capsys):
    outputs = {"--junit": tmp_path / "gate.xml", "--markdown": tmp_path / "gate.md", "--output": tmp_path / "next.json"}
    args = ["gate", "tiny-random", "--baseline", str(tiny_baseline)] + [a for k, v in outputs.items() for a in (k, str(v))]
    assert main(args) == 0
    assert "2 of 2 checks passed" in capsys.readouterr().out
    suite = ElementTree.parse(outputs["--junit"]).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "0"
    assert json.loads(outputs["--output"].read_text())["forgetting"]["settings"]["limit"] == 8
    assert main(args) == 2  # outputs exist: never overwritten silently
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--limit", "4"], "settings differ from the baseline's: limit = 4 here, 8 in the baseline"),
    (["--tasks", "forgetting_knowledge"], "settings differ from the baseline's: tasks"),
    (["--max-drop", "forgetting_knowledge"], "expected TASK[/METRIC]=VALUE"),
    (["--max-drop", "forgetting_knowledge=lots"], "expected a number like 0.02 or a percentage"),
    (["--min-gain", "forgetting_target=x"], "is not a number"),
    (["--alpha", "2"], "alpha: must be in (0, 1)"),
])
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
    assert main(["eval", "embedded:smollm2-135m-instruct", "--tasks", "forgetting_knowledge,forgetting_target",
                 "--limit", "48", "--output", str(base)]) == 0
    assert main(["train", "configs/demo.yaml", "train.lr=1e-3", "train.max_steps=12", "train.precision=fp32",
                 "train.save_every=0", "data.eval_split=null", "train.progress=false",
                 f"output_dir={tmp_path / 'tuned'}"]) == 0
    capsys.readouterr()
    junit = tmp_path / "gate.xml"
    code = main(["gate", str(tmp_path / "tuned" / "final"), "--baseline", str(base), "--max-drop",
                 "forgetting_knowledge=0.05", "--min-gain", "forgetting_target=0.5", "--junit", str(junit)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "failed: forgetting_knowledge/acc" in out
    cases = {c.get("classname"): c for c in ElementTree.parse(junit).getroot().iter("testcase")}
    assert cases["forgetting.gate.forgetting_knowledge"].find("failure") is not None
    assert cases["forgetting.gate.forgetting_target"].find("failure") is None  # it learned the task


def test_gate_with_a_model_as_baseline_evaluates_both_the_same_way(tmp_path, capsys):
    assert main(["gate", "tiny-random", "--baseline", "tiny-random", "--tasks", "forgetting_knowledge",
                 "--limit", "4", "--output", str(tmp_path / "next.json")]) == 0
    assert "1 of 1 checks passed" in capsys.readouterr().out
    saved = json.loads((tmp_path / "next.json").read_text())["forgetting"]["settings"]
    assert saved["tasks"] == ["forgetting_knowledge"] and saved["limit"] == 4
