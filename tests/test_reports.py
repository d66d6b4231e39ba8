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

from forgetting.harness.configlib import from_dict, to_dict
from forgetting.harness.experiment import Experiment, units
from forgetting.reports.stats import (
    align,
    example_transitions,
    paired_bootstrap,
    pareto_front,
    stderr_ci,
)
from forgetting.reports.writer import headline, write_reports

# per-document scores of the fixed run: base, then per unit
KNOWLEDGE = {
    "base": [1, 1, 1, 1, 0, 0, 1, 1],
    "naive__seed0": [0, 1, 0, 1, 0, 1, 0, 1],
    "naive__seed1": [1, 0, 0, 1, 0, 0, 1, 1],
    "lora__seed0": [1, 1, 1, 1, 0, 1, 1, 1],
    "lora__seed1": [1, 1, 1, 0, 0, 0, 1, 1],
}
TARGET = {
    "base": [0, 0, 0, 0],
    "naive__seed0": [1, 1, 1, 0],
    "naive__seed1": [1, 1, 1, 1],
    "lora__seed0": [1, 0, 1, 0],
    "lora__seed1": [1, 1, 0, 0],
}
INSTRUCTIONS = [
    ["punctuation:no_comma", "length_constraints:number_words"],
    ["detectable_format:title"],
    ["punctuation:no_comma"],
]
IFEVAL = {
    "base": [[True, False], [True], [False]],
    "naive__seed0": [[False, False], [False], [False]],
    "naive__seed1": [[True, False], [False], [True]],
    "lora__seed0": [[True, True], [True], [False]],
    "lora__seed1": [[True, False], [True], [False]],
}
PROSE = {
    "base": [(-100.0, 50), (-300.0, 100)],
    "naive__seed0": [(-110.0, 50), (-320.0, 100)],
    "naive__seed1": [(-104.0, 50), (-310.0, 100)],
    "lora__seed0": [(-100.0, 50), (-302.0, 100)],
    "lora__seed1": [(-101.0, 50), (-300.0, 100)],
}


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))


def lm_eval_results(name: str) -> dict:
    """An lm-eval-shaped results dict with samples, for the fixed scores of `name`."""
    results, samples = {}, {}
    acc, se = _mean_stderr(KNOWLEDGE[name])
    results["forgetting_knowledge"] = {"acc,none": acc, "acc_stderr,none": se}
    samples["forgetting_knowledge"] = [
        {"doc_id": i, "doc": {"category": "c"}, "metrics": ["acc"], "acc": float(v)}
        for i, v in enumerate(KNOWLEDGE[name])
    ]
    em, se = _mean_stderr(TARGET[name])
    results["forgetting_target"] = {"exact_match,none": em, "exact_match_stderr,none": se}
    samples["forgetting_target"] = [
        {"doc_id": i, "doc": {}, "metrics": ["exact_match"], "exact_match": float(v)}
        for i, v in enumerate(TARGET[name])
    ]
    prompt = [all(x) for x in IFEVAL[name]]
    inst = [v for x in IFEVAL[name] for v in x]
    results["forgetting_ifeval"] = {
        "prompt_level_strict_acc,none": float(np.mean(prompt)),
        "prompt_level_strict_acc_stderr,none": _mean_stderr(prompt)[1],
        "inst_level_strict_acc,none": float(np.mean(inst)),
        "inst_level_strict_acc_stderr,none": "N/A",
    }
    samples["forgetting_ifeval"] = [
        {
            "doc_id": i,
            "doc": {"instruction_id_list": INSTRUCTIONS[i]},
            "metrics": ["prompt_level_strict_acc", "inst_level_strict_acc"],
            "prompt_level_strict_acc": all(x),
            "inst_level_strict_acc": x,
        }
        for i, x in enumerate(IFEVAL[name])
    ]
    bpb = -sum(ll for ll, _ in PROSE[name]) / sum(n for _, n in PROSE[name]) / math.log(2)
    results["forgetting_prose"] = {"bits_per_byte,none": bpb, "bits_per_byte_stderr,none": "N/A"}
    samples["forgetting_prose"] = [
        {"doc_id": i, "doc": {}, "metrics": ["bits_per_byte"], "bits_per_byte": [ll, n]}
        for i, (ll, n) in enumerate(PROSE[name])
    ]
    better = {
        "forgetting_knowledge": {"acc": True},
        "forgetting_target": {"exact_match": True},
        "forgetting_ifeval": {"prompt_level_strict_acc": True, "inst_level_strict_acc": True},
        "forgetting_prose": {"bits_per_byte": False},
    }
    return {
        "results": results,
        "samples": samples,
        "higher_is_better": better,
        "n-samples": {t: {"effective": len(s)} for t, s in samples.items()},
    }


EXPERIMENT = {
    "name": "fixed",
    "model": {"name_or_path": "tiny-random"},
    "seeds": [0, 1],
    "eval": {"tasks": ["forgetting_knowledge", "forgetting_target", "forgetting_ifeval", "forgetting_prose"]},
    "strategies": [{"name": "naive"}, {"name": "lora", "mitigations": [{"name": "lora", "r": 4}]}],
}


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
    base, after = (
        np.mean(KNOWLEDGE["base"]),
        np.mean([np.mean(KNOWLEDGE["naive__seed0"]), np.mean(KNOWLEDGE["naive__seed1"])]),
    )
    assert naive["base"] == pytest.approx(base) and naive["after"] == pytest.approx(after)
    assert naive["delta"] == pytest.approx(after - base) and naive["rel_delta"] == pytest.approx((after - base) / base)
    se_b = _mean_stderr(KNOWLEDGE["base"])[1]
    se_a = math.sqrt(sum(_mean_stderr(KNOWLEDGE[u])[1] ** 2 for u in ("naive__seed0", "naive__seed1"))) / 2
    half = 1.959964 * math.sqrt(se_b**2 + se_a**2)
    assert (naive["se_ci_low"], naive["se_ci_high"]) == pytest.approx((after - base - half, after - base + half))
    assert naive["seed_std"] == pytest.approx(
        np.std([np.mean(KNOWLEDGE["naive__seed0"]), np.mean(KNOWLEDGE["naive__seed1"])], ddof=1)
    )
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

        def mean(scores, pick=pick):
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
    ref = _independent_bootstrap(
        {i: [(base[i], 1.0)] for i in range(n)},
        [{i: [(a[i], 1.0)] for i in range(n)} for a in after],
        4000,
        np.random.default_rng(2),
    )
    assert ours["delta"] == pytest.approx(np.mean([a.mean() for a in after]) - base.mean())
    assert ours["ci_low"] == pytest.approx(np.percentile(ref, 2.5), abs=0.02)
    assert ours["ci_high"] == pytest.approx(np.percentile(ref, 97.5), abs=0.02)


def test_bootstrap_of_a_constant_shift_is_exact_and_documents_move_together():
    table = pd.DataFrame(
        {
            "item": ["0:0", "0:1", "1:0", "2:0"],
            "doc": [0, 0, 1, 2],
            "weight": [1.0, 1.0, 2.0, 1.0],
            "value": [0.2, 0.4, 0.1, 0.9],
        }
    )
    shifted = paired_bootstrap(align(table, [table.assign(value=table["value"] + 0.25)]), iters=500)
    assert shifted["delta"] == pytest.approx(0.25)
    assert (shifted["ci_low"], shifted["ci_high"]) == pytest.approx((0.25, 0.25))
    transitions = example_transitions(
        align(table.assign(value=[1.0, 1.0, 0.0, 0.0]), [table.assign(value=[0.0, 1.0, 1.0, 0.0])])
    )
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
    naive = next(
        r for r in _summary(run_dir)["benchmarks"] if r["strategy"] == "naive" and r["task"] == "forgetting_knowledge"
    )
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
    probe = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
        "document.body.setAttribute('data-probe', imgs.length + ':' + "
        "imgs.filter(i => i.complete && i.naturalWidth > 0).length + ':' + document.querySelectorAll('table').length);"
        "});</script>"
    )
    copy = tmp_path / "report.html"
    copy.write_text(page.replace("</body>", probe + "</body>"))
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            copy.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    images, loaded, tables = map(int, re.search(r'data-probe="(\d+):(\d+):(\d+)"', out.stdout).groups())
    assert images >= 2 and loaded == images and tables >= 5
    assert "Uncaught" not in out.stderr


# Direction and blind spots of the forgetting measure: small tables where each number is computed by hand.


def _tables(runs: dict[str, dict[str, tuple[str, bool, list[float]]]]):
    """(scores, examples) of units given as unit -> task -> (metric, higher_is_better, per-document scores)."""
    from forgetting.reports.tidy import example_rows, score_rows

    scores, examples = [], []
    for unit, tasks in runs.items():
        strategy, seed = (unit.split("__seed")[0], int(unit.split("__seed")[1])) if unit != "base" else ("base", -1)
        labels = {
            "model": "base" if unit == "base" else "tuned",
            "unit": unit,
            "strategy": strategy,
            "seed": seed,
            "variant": "base" if unit == "base" else "final",
        }
        results = {
            "results": {t: {f"{m},none": float(np.mean(v)), f"{m}_stderr,none": 0.0} for t, (m, _, v) in tasks.items()},
            "higher_is_better": {t: {m: hib} for t, (m, hib, _) in tasks.items()},
            "samples": {
                t: [{"doc_id": i, "doc": {}, "metrics": [m], m: x} for i, x in enumerate(v)]
                for t, (m, _, v) in tasks.items()
            },
        }
        scores += score_rows(results, labels | {"family": strategy, "alpha": 0.0 if unit == "base" else 1.0})
        examples += example_rows(results, labels)
    return pd.DataFrame(scores), pd.DataFrame(examples)


def _ranked(runs, primary: dict[str, str], target: str | None = None):
    from types import SimpleNamespace

    from forgetting.reports.forgetting import benchmark_table, strategy_table

    scores, examples = _tables(runs)
    exp = SimpleNamespace(primary_metrics=primary, target_task=target, target_tasks=[target] if target else [])
    benchmarks = benchmark_table(scores, examples, exp, iters=200)
    summary = strategy_table(benchmarks, scores, exp)
    return benchmarks, {r["strategy"]: r for r in summary.to_dict("records")}


def test_forgot_and_learned_follow_a_lower_is_better_metric():
    # leak rate 0 -> 6 of 16: six clean answers now leak. That is forgetting, and nothing was there to learn
    # (before: reported as learned 37.5%).
    benchmarks, _ = _ranked(
        {
            "base": {"health": ("leak_rate", False, [0.0] * 16)},
            "naive__seed0": {"health": ("leak_rate", False, [1.0] * 6 + [0.0] * 10)},
        },
        {},
    )
    row = benchmarks.iloc[0]
    assert row["forgot"] == pytest.approx(6 / 16) and math.isnan(row["learned"])
    # both ways: base leaks on docs 0-3, after on 2-7: of 12 clean, 4 now leak; of 4 leaking, 2 are now clean
    table = pd.DataFrame({"item": [str(i) for i in range(16)], "doc": range(16), "weight": 1.0, "value": 0.0})
    base = table.assign(value=[1.0] * 4 + [0.0] * 12)
    after = table.assign(value=[0.0] * 2 + [1.0] * 6 + [0.0] * 8)
    assert example_transitions(align(base, [after]), higher_is_better=False) == {"forgot": 4 / 12, "learned": 2 / 4}
    assert example_transitions(align(base, [after])) == {"forgot": 2 / 4, "learned": 4 / 12}  # as a success rate


def test_rates_with_a_zero_base_count_in_the_ranking():
    # knowledge acc 0.5 (base) -> a: 0.45, b: 0.40; leak rate 0 -> a: 6/16, b: 0; empty rate 0.25 -> a, b: 0.5
    acc = lambda k: [1.0] * k + [0.0] * (20 - k)  # noqa: E731
    rate = lambda k: [1.0] * k + [0.0] * (16 - k)  # noqa: E731
    runs = {
        "base": {
            "knowledge": ("acc", True, acc(10)),
            "health": ("leak_rate", False, rate(0)),
            "empty": ("empty_rate", False, rate(4)),
        },
        "a__seed0": {
            "knowledge": ("acc", True, acc(9)),
            "health": ("leak_rate", False, rate(6)),
            "empty": ("empty_rate", False, rate(8)),
        },
        "b__seed0": {
            "knowledge": ("acc", True, acc(8)),
            "health": ("leak_rate", False, rate(0)),
            "empty": ("empty_rate", False, rate(8)),
        },
    }
    benchmarks, strategies = _ranked(runs, {"health": "leak_rate", "empty": "empty_rate"})
    # rates: the share of good (clean, non-empty) answers lost: leak 1 -> 10/16 clean, empty 12/16 -> 8/16 non-empty
    a = (0.05 / 0.5 + (1 - 10 / 16) / 1 + (12 / 16 - 8 / 16) / (12 / 16)) / 3
    b = (0.10 / 0.5 + 0.0 + (12 / 16 - 8 / 16) / (12 / 16)) / 3
    assert strategies["a"]["forgetting"] == pytest.approx(a) and strategies["b"]["forgetting"] == pytest.approx(b)
    assert strategies["b"]["rank"] == 1 and strategies["a"]["rank"] == 2  # before: leak rate left out, a ranked first
    losses = benchmarks.set_index(["strategy", "task"])["loss"]
    assert losses[("a", "health")] == pytest.approx(0.375) and losses[("b", "health")] == 0.0
    # a rate whose base is 1 (nothing clean to lose): the absolute change, here a gain
    _, ones = _ranked(
        {"base": {"health": ("leak_rate", False, rate(16))}, "c__seed0": {"health": ("leak_rate", False, rate(12))}}, {}
    )
    assert ones["c"]["forgetting"] == pytest.approx(-0.25)


def test_target_gain_follows_a_lower_is_better_target():
    # target error rate 0.5 -> x: 0.25, y: 0.375; equal forgetting, so the larger gain (x) ranks first
    rate = lambda k: [1.0] * k + [0.0] * (8 - k)  # noqa: E731
    runs = {
        "base": {"general": ("acc", True, rate(4)), "goal": ("error_rate", False, rate(4))},
        "y__seed0": {"general": ("acc", True, rate(4)), "goal": ("error_rate", False, rate(3))},
        "x__seed0": {"general": ("acc", True, rate(4)), "goal": ("error_rate", False, rate(2))},
    }
    _, strategies = _ranked(runs, {}, target="goal")
    assert strategies["x"]["target_gain"] == pytest.approx(0.25)
    assert strategies["y"]["target_gain"] == pytest.approx(0.125)
    assert strategies["x"]["rank"] == 1 and strategies["x"]["pareto"] and not strategies["y"]["pareto"]


def test_longer_answers_count_as_a_length_regression():
    # base answers 50 words; long: 100 (twice as long), short: 45. Both drift; twice as long drifts more.
    runs = {
        "base": {"health": ("response_words", True, [40.0, 60.0])},
        "long__seed0": {"health": ("response_words", True, [90.0, 110.0])},
        "short__seed0": {"health": ("response_words", True, [40.0, 50.0])},
    }
    _, strategies = _ranked(runs, {"health": "response_words"})
    assert strategies["long"]["forgetting"] == pytest.approx(math.log(101 / 51))
    assert strategies["short"]["forgetting"] == pytest.approx(math.log(51 / 46))
    assert strategies["short"]["rank"] == 1  # before: longer counted as a gain, so long ranked first


def test_direction_of_a_metric_lm_eval_left_unlabelled():
    from forgetting.reports.tidy import score_rows

    results = {"results": {"t": {"acc,none": 0.5, "bits_per_byte,none": 0.9, "leak_rate,none": 0.1}}}
    better = {r["metric"]: r["higher_is_better"] for r in score_rows(results, {})}
    assert better == {"acc": True, "bits_per_byte": False, "leak_rate": False}


def test_ranking_is_the_mean_of_the_per_benchmark_losses_shown(run_dir):
    # naive, per seed: knowledge 0.75 -> 0.5, 0.5; ifeval prompt-level 1/3 -> 0, 1/3;
    # prose bits per byte 400 -> 430, 414 (each / 150 / ln 2)
    seed0 = (1 / 3 + 1 + 30 / 400) / 3
    seed1 = (1 / 3 + 0 + 14 / 400) / 3
    strategies = {r["strategy"]: r for r in _summary(run_dir)["strategies"]}
    assert strategies["naive"]["forgetting"] == pytest.approx((seed0 + seed1) / 2)
    assert strategies["naive"]["forgetting_seed_std"] == pytest.approx(np.std([seed0, seed1], ddof=1))
    rows = {r["task"]: r for r in _summary(run_dir)["benchmarks"] if r["strategy"] == "naive"}
    assert rows["forgetting_prose"]["loss"] == pytest.approx((30 / 400 + 14 / 400) / 2)
    markdown = (run_dir / "reports" / "forgetting.md").read_text()
    assert f"{100 * rows['forgetting_prose']['loss']:+.1f}%" in markdown
    assert "|ln((a + 1) / (b + 1))|" in markdown and "1 − score" in markdown
