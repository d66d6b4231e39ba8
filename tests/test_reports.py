"""Reports on fixed inputs: the numbers in every table against hand computation and an independent bootstrap,
and the HTML page rendered by headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import yaml

from harness.configlib import from_dict, to_dict
from harness.experiment import Experiment, units
from reports import headline, write_reports
from reports.stats import (
    align,
    example_transitions,
    paired_bootstrap,
    pareto_front,
    stderr_ci,
)

# per-document scores of the fixed run: base, then per unit
KNOWLEDGE = {"base": [1, 1, 1, 1, 0, 0, 1, 1], "naive__seed0": [0, 1, 0, 1, 0, 1, 0, 1],
             "naive__seed1": [1, 0, 0, 1, 0, 0, 1, 1], "lora__seed0": [1, 1, 1, 1, 0, 1, 1, 1],
             "lora__seed1": [1, 1, 1, 0, 0, 0, 1, 1]}
TARGET = {"base": [0, 0, 0, 0], "naive__seed0": [1, 1, 1, 0], "naive__seed1": [1, 1, 1, 1],
          "lora__seed0": [1, 0, 1, 0], "lora__seed1": [1, 1, 0, 0]}
INSTRUCTIONS = [["punctuation:no_comma", "length_constraints:number_words"], ["detectable_format:title"],
                ["punctuation:no_comma"]]
IFEVAL = {"base": [[True, False], [True], [False]], "naive__seed0": [[False, False], [False], [False]],
          "naive__seed1": [[True, False], [False], [True]], "lora__seed0": [[True, True], [True], [False]],
          "lora__seed1": [[True, False], [True], [False]]}
PROSE = {"base": [(-100.0, 50), (-300.0, 100)], "naive__seed0": [(-110.0, 50), (-320.0, 100)],
         "naive__seed1": [(-104.0, 50), (-310.0, 100)], "lora__seed0": [(-100.0, 50), (-302.0, 100)],
         "lora__seed1": [(-101.0, 50), (-300.0, 100)]}


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))


def lm_eval_results(name: str) -> dict:
    """An lm-eval-shaped results dict with samples, for the fixed scores of `name`."""
    results, samples = {}, {}
    acc, se = _mean_stderr(KNOWLEDGE[name])
    results["forgetting_knowledge"] = {"acc,none": acc, "acc_stderr,none": se}
    samples["forgetting_knowledge"] = [{"doc_id": i, "doc": {"category": "c"}, "metrics": ["acc"], "acc": float(v)}
                                       for i, v in enumerate(KNOWLEDGE[name])]
    em, se = _mean_stderr(TARGET[name])
    results["forgetting_target"] = {"exact_match,none": em, "exact_match_stderr,none": se}
    samples["forgetting_target"] = [{"doc_id": i, "doc": {}, "metrics": ["exact_match"], "exact_match": float(v)}
                                    for i, v in enumerate(TARGET[name])]
    prompt = [all(x) for x in IFEVAL[name]]
    inst = [v for x in IFEVAL[name] for v in x]
    results["forgetting_ifeval"] = {"prompt_level_strict_acc,none": float(np.mean(prompt)),
                                    "prompt_level_strict_acc_stderr,none": _mean_stderr(prompt)[1],
                                    "inst_level_strict_acc,none": float(np.mean(inst)),
                                    "inst_level_strict_acc_stderr,none": "N/A"}
    samples["forgetting_ifeval"] = [{"doc_id": i, "doc": {"instruction_id_list": INSTRUCTIONS[i]},
                                     "metrics": ["prompt_level_strict_acc", "inst_level_strict_acc"],
                                     "prompt_level_strict_acc": all(x), "inst_level_strict_acc": x}
                                    for i, x in enumerate(IFEVAL[name])]
    bpb = -sum(ll for ll, _ in PROSE[name]) / sum(n for _, n in PROSE[name]) / math.log(2)
    results["forgetting_prose"] = {"bits_per_byte,none": bpb, "bits_per_byte_stderr,none": "N/A"}
    samples["forgetting_prose"] = [{"doc_id": i, "doc": {}, "metrics": ["bits_per_byte"], "bits_per_byte": [ll, n]}
                                   for i, (ll, n) in enumerate(PROSE[name])]
    better = {"forgetting_knowledge": {"acc": True}, "forgetting_target": {"exact_match": True},
              "forgetting_ifeval": {"prompt_level_strict_acc": True, "inst_level_strict_acc": True},
              "forgetting_prose": {"bits_per_byte": False}}
    return {"results": results, "samples": samples, "higher_is_better": better,
            "n-samples": {t: {"effective": len(s)} for t, s in samples.items()}}


EXPERIMENT = {"name": "fixed", "model": {"name_or_path": "tiny-random"}, "seeds": [0, 1],
              "eval": {"tasks": ["forgetting_knowledge", "forgetting_target", "forgetting_ifeval", "forgetting_prose"]},
              "strategies": [{"name": "naive"}, {"name": "lora", "mitigations": [{"name": "lora", "r": 4}]}]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding the fixed results, as `forgetting run` leaves it, with reports written."""
    root = tmp_path_factory.mktemp("fixed")
    exp = from_dict(Experiment, dict(EXPERIMENT, output_dir=str(root)))
    (root / "experiment.yaml").write_text(yaml.safe_dump(to_dict(exp)))
    (root / "base").mkdir()
    (root / "base" / "eval.json").write_text(json.dumps(lm_eval_results("base")))
    manifest = {"units": {"base": {"status": "done"}}, "evaluations": []}
    for unit in units(exp):
        (root / "units" / unit.id).mkdir(parents=True)
        (root / "units" / unit.id / "eval.json").write_text(json.dumps(lm_eval_results(unit.id)))
        manifest["units"][unit.id] = {"status": "done", "variants": ["final"], "steps": 2}
    (root / "manifest.json").write_text(json.dumps(manifest))
    write_reports(root, bootstrap_iters=4000)
    return root


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "reports" / "summary.json").read_text())


def test_tidy_table_holds_every_score_as_given(run_dir):
    table = pd.read_csv(run_dir / "results.csv")
    assert set(table["unit"]) == {"base", "naive__seed0", "naive__seed1", "lora__seed0", "lora__seed1"}
    for unit, values in KNOWLEDGE.items():
        row = table[(table["unit"] == unit) & (table["metric"] == "acc")]
        assert row["value"].item() == pytest.approx(np.mean(values))
    assert pd.read_parquet(run_dir / "results.parquet").equals(pd.read_parquet(run_dir / "results.parquet"))
    assert len(json.loads((run_dir / "results.json").read_text())) == len(table)
    examples = pd.read_parquet(run_dir / "examples.parquet")
    inst = examples[(examples["unit"] == "base") & (examples["metric"] == "inst_level_strict_acc")]
    assert list(inst["instruction"]) == [i for ids in INSTRUCTIONS for i in ids]


def test_benchmark_deltas_and_stderr_intervals_match_hand_computation(run_dir):
    rows = {(r["strategy"], r["task"]): r for r in _summary(run_dir)["benchmarks"]}
    naive = rows[("naive", "forgetting_knowledge")]
    base, after = np.mean(KNOWLEDGE["base"]), np.mean([np.mean(KNOWLEDGE["naive__seed0"]), np.mean(KNOWLEDGE["naive__seed1"])])
    assert naive["base"] == pytest.approx(base) and naive["after"] == pytest.approx(after)
    assert naive["delta"] == pytest.approx(after - base) and naive["rel_delta"] == pytest.approx((after - base) / base)
    se_b = _mean_stderr(KNOWLEDGE["base"])[1]
    se_a = math.sqrt(sum(_mean_stderr(KNOWLEDGE[u])[1] ** 2 for u in ("naive__seed0", "naive__seed1"))) / 2
    half = 1.959964 * math.sqrt(se_b ** 2 + se_a ** 2)
    assert (naive["se_ci_low"], naive["se_ci_high"]) == pytest.approx((after - base - half, after - base + half))
    assert naive["seed_std"] == pytest.approx(np.std([np.mean(KNOWLEDGE["naive__seed0"]),
                                                      np.mean(KNOWLEDGE["naive__seed1"])], ddof=1))
    # base-correct docs 0,1,2,3,6,7: seed0 loses 0,2,6 (3/6), seed1 loses 1,2 (2/6); base-wrong 4,5: seed0 learns 5
    assert naive["forgot"] == pytest.approx((3 / 6 + 2 / 6) / 2)
    assert naive["learned"] == pytest.approx((1 / 2 + 0 / 2) / 2)
    prose = rows[("naive", "forgetting_prose")]
    bpb = lambda u: -sum(ll for ll, _ in PROSE[u]) / 150 / math.log(2)  # noqa: E731
    assert prose["delta"] == pytest.approx((bpb("naive__seed0") + bpb("naive__seed1")) / 2 - bpb("base"))
    target = rows[("naive", "forgetting_target")]
    assert target["target"] and target["delta"] == pytest.approx(0.875)


def _independent_bootstrap(base: dict, seeds: list[dict], iters: int, rng) -> np.ndarray:
    """Resample documents with a plain loop: mean over seeds of after minus base, weighted by item weights."""
    docs = sorted(base)
    out = []
    for _ in range(iters):
        pick = [docs[i] for i in rng.integers(0, len(docs), len(docs))]
        def mean(scores):
            return sum(v * w for d in pick for v, w in scores[d]) / sum(w for d in pick for _, w in base[d])
        out.append(np.mean([mean(s) for s in seeds]) - mean(base))
    return np.array(out)


def test_paired_bootstrap_interval_agrees_with_an_independent_resampler():
    rng = np.random.default_rng(7)
    n = 60
    base = rng.integers(0, 2, n).astype(float)
    after = [np.where(rng.random(n) < 0.2, 1 - base, base) for _ in range(2)]
    table = pd.DataFrame({"item": [str(i) for i in range(n)], "doc": range(n), "weight": 1.0, "value": base})
    seeds = [table.assign(value=a) for a in after]
    ours = paired_bootstrap(align(table, seeds), iters=20000, seed=1)
    ref = _independent_bootstrap({i: [(base[i], 1.0)] for i in range(n)},
                                 [{i: [(a[i], 1.0)] for i in range(n)} for a in after], 4000, np.random.default_rng(2))
    assert ours["delta"] == pytest.approx(np.mean([a.mean() for a in after]) - base.mean())
    assert ours["ci_low"] == pytest.approx(np.percentile(ref, 2.5), abs=0.02)
    assert ours["ci_high"] == pytest.approx(np.percentile(ref, 97.5), abs=0.02)


def test_bootstrap_of_a_constant_shift_is_exact_and_documents_move_together():
    table = pd.DataFrame({"item": ["0:0", "0:1", "1:0", "2:0"], "doc": [0, 0, 1, 2], "weight": [1.0, 1.0, 2.0, 1.0],
                          "value": [0.2, 0.4, 0.1, 0.9]})
    shifted = paired_bootstrap(align(table, [table.assign(value=table["value"] + 0.25)]), iters=500)
    assert shifted["delta"] == pytest.approx(0.25)
    assert (shifted["ci_low"], shifted["ci_high"]) == pytest.approx((0.25, 0.25))
    transitions = example_transitions(align(table.assign(value=[1.0, 1.0, 0.0, 0.0]),
                                            [table.assign(value=[0.0, 1.0, 1.0, 0.0])]))
    assert transitions == {"forgot": 0.5, "learned": 0.5}


def test_stderr_interval_and_pareto_front():
    assert stderr_ci(0.1, 0.03, [0.04]) == pytest.approx((0.1 - 1.959964 * 0.05, 0.1 + 1.959964 * 0.05))
    points = pd.DataFrame({"cost": [0.1, 0.2, 0.05, 0.3], "gain": [0.5, 0.9, 0.4, 0.8]})
    assert list(pareto_front(points, "cost", "gain")) == [True, True, True, False]


def test_ranking_and_markdown_show_the_table_numbers(run_dir):
    strategies = {r["strategy"]: r for r in _summary(run_dir)["strategies"]}
    # lora forgot less than naive on every general benchmark here, so it ranks first
    assert strategies["lora"]["rank"] == 1 and strategies["naive"]["rank"] == 2
    assert strategies["lora"]["forgetting"] < strategies["naive"]["forgetting"]
    markdown = (run_dir / "reports" / "forgetting.md").read_text()
    naive = next(r for r in _summary(run_dir)["benchmarks"] if r["strategy"] == "naive" and r["task"] == "forgetting_knowledge")
    assert f"{naive['delta']:+.3f} [{naive['ci_low']:.3f}, {naive['ci_high']:.3f}]" in markdown
    assert f"{100 * strategies['naive']['forgetting']:+.1f}%" in markdown
    lines = headline(run_dir).splitlines()
    assert lines[1].split()[:2] == ["1", "lora"]
    instruction = (run_dir / "reports" / "instruction_following.md").read_text()
    assert "punctuation:no_comma" in instruction and "prompt_level_strict_acc" in instruction
    types = {r["instruction"]: r for r in _summary(run_dir)["instruction_types"]}
    assert types["punctuation:no_comma"]["n"] == 2 and types["punctuation:no_comma"]["base"] == 0.5
    assert types["punctuation:no_comma"]["naive"] == pytest.approx(2 / 4)  # seed0: F, F; seed1: T, T (pooled)


def test_report_regenerates_identically(run_dir):
    before = (run_dir / "results.csv").read_text(), (run_dir / "reports" / "forgetting.md").read_text()
    write_reports(run_dir, bootstrap_iters=4000)
    assert ((run_dir / "results.csv").read_text(), (run_dir / "reports" / "forgetting.md").read_text()) == before


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package: chromium)")
def test_html_report_renders_in_headless_chromium(run_dir, tmp_path):
    page = (run_dir / "reports" / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained
    probe = ("<script>window.addEventListener('load', () => { const imgs = [...document.images];"
             "document.body.setAttribute('data-probe', imgs.length + ':' + "
             "imgs.filter(i => i.complete && i.naturalWidth > 0).length + ':' + document.querySelectorAll('table').length);"
             "});</script>")
    copy = tmp_path / "report.html"
    copy.write_text(page.replace("</body>", probe + "</body>"))
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    images, loaded, tables = map(int, re.search(r'data-probe="(\d+):(\d+):(\d+)"', out.stdout).groups())
    assert images >= 2 and loaded == images and tables >= 5
    assert "Uncaught" not in out.stderr
