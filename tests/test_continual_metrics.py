"""Continual-SFT metrics on fixed inputs: ACC / BWT / FWT against hand computation, the paired bootstrap
(reproducible, contains the point, zero width where every document scores the same at two stages), the spread
over seeds, T = 1, bad input, the report tables and the figures' panels and lines."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from forgetting.harness.errors import UserError
from forgetting.reports.continual import (
    DEFINITIONS,
    average_accuracy,
    backward_transfer,
    continual_metrics,
    curves_plot,
    forgetting_curves,
    forward_transfer,
    general_forgetting,
    general_table,
    loss_scatter,
    matrix,
    matrix_heatmap,
    matrix_table,
    stage_lines,
    transfer_table,
    with_base,
)
from forgetting.reports.render import markdown_table

TASKS = ["forgetting_a", "forgetting_b", "forgetting_c"]
# R[i][j]: row 0 the base model, row i after stage i; column j-1 task j (learned at stage j)
R_SEED0 = [
    [0.1, 0.2, 0.0],
    [0.9, 0.3, 0.1],
    [0.7, 0.8, 0.2],
    [0.6, 0.5, 0.9],
]
# ACC = (0.6 + 0.5 + 0.9) / 3 = 2/3
# BWT = ((0.6 - 0.9) + (0.5 - 0.8)) / 2 = -0.3
# FWT = ((0.3 - 0.2) + (0.2 - 0.0)) / 2 = 0.15
R_SEED1 = [*R_SEED0[:3], [0.4, 0.5, 0.7]]
# ACC = 1.6 / 3, BWT = ((0.4 - 0.9) + (0.5 - 0.8)) / 2 = -0.4, FWT = 0.15 (rows 0..2 are seed 0's)
ITERS = 300


def doc_rows(R, tasks=TASKS, strategy="naive", seed=0, docs=10) -> list[dict]:
    """0/1 per-document scores whose means are exactly R (the first round(v * docs) documents score 1)."""
    rows = []
    for stage, scores in enumerate(R):
        for task, value in zip(tasks, scores):
            ones = round(value * docs)
            rows += [
                {"strategy": strategy, "seed": seed, "stage": stage, "task": task, "metric": "exact_match"}
                | {"doc": d, "value": float(d < ones)}
                for d in range(docs)
            ]
    return rows


def test_metrics_of_a_fixed_matrix_by_hand():
    assert average_accuracy(R_SEED0) == pytest.approx(2 / 3)
    assert backward_transfer(R_SEED0) == pytest.approx(-0.3)
    assert forward_transfer(R_SEED0) == pytest.approx(0.15)
    stacked = np.stack([R_SEED0, R_SEED1])  # seeds (or bootstrap replicates) along the leading axis
    assert average_accuracy(stacked) == pytest.approx([2 / 3, 1.6 / 3])
    assert backward_transfer(stacked) == pytest.approx([-0.3, -0.4])
    assert forward_transfer(stacked) == pytest.approx([0.15, 0.15])
    with pytest.raises(ValueError, match="T\\+1, T"):
        average_accuracy(np.zeros((3, 3)))


def test_single_stage_has_acc_and_nan_transfer():
    R = [[0.2], [0.7]]
    assert average_accuracy(R) == pytest.approx(0.7)
    assert math.isnan(backward_transfer(R)) and math.isnan(forward_transfer(R))
    cells, transfer = continual_metrics(pd.DataFrame(doc_rows(R, TASKS[:1])), TASKS[:1], iters=ITERS)
    by = transfer.set_index("metric")
    assert by.loc["ACC", "value"] == pytest.approx(0.7)
    assert by.loc["ACC", "ci_low"] <= 0.7 <= by.loc["ACC", "ci_high"]
    for name in ("BWT", "FWT"):
        assert by.loc[name, ["value", "ci_low", "ci_high"]].isna().all()
    assert len(cells) == 2


def test_continual_metrics_by_hand_with_spread_over_seeds():
    examples = pd.DataFrame(doc_rows(R_SEED0, seed=0) + doc_rows(R_SEED1, seed=1))
    cells, transfer = continual_metrics(examples, TASKS, iters=ITERS)
    by = transfer.set_index("metric")
    expected = {"ACC": (2 / 3, 1.6 / 3), "BWT": (-0.3, -0.4), "FWT": (0.15, 0.15)}
    for name, (s0, s1) in expected.items():
        row = by.loc[name]
        assert row["per_seed"] == pytest.approx({0: s0, 1: s1})
        assert row["value"] == pytest.approx((s0 + s1) / 2)
        assert row["seed_std"] == pytest.approx(abs(s0 - s1) / math.sqrt(2))
        assert row["ci_low"] <= row["value"] <= row["ci_high"]
        assert row["seeds"] == 2 and row["tasks"] == 3
    assert matrix(cells, "naive").to_numpy() == pytest.approx((np.array(R_SEED0) + np.array(R_SEED1)) / 2)
    assert matrix(cells, "naive", seed=1).to_numpy() == pytest.approx(np.array(R_SEED1))
    assert list(matrix(cells, "naive").columns) == TASKS
    cell = cells.set_index(["stage", "task"]).loc[(3, "forgetting_a")]
    assert cell["seed_std"] == pytest.approx(0.1 * math.sqrt(2)) and cell["learned_at"] == 1 and cell["docs"] == 10


def test_bootstrap_is_reproducible_and_seeded():
    examples = pd.DataFrame(doc_rows(R_SEED0))
    first = continual_metrics(examples, TASKS, iters=ITERS, seed=3)[1]
    again = continual_metrics(examples, TASKS, iters=ITERS, seed=3)[1]
    other = continual_metrics(examples, TASKS, iters=ITERS, seed=4)[1]
    pd.testing.assert_frame_equal(first, again)
    assert not np.allclose(first[["ci_low", "ci_high"]], other[["ci_low", "ci_high"]])


def _paired_rows(docs: int = 40) -> pd.DataFrame:
    """T = 2: task a scores every doc the same after stages 1 and 2, task b the same at base and after stage 1,
    with scores that vary between documents (an unpaired resampler would give a wide interval)."""
    rng = np.random.default_rng(7)
    a0, a1, b0, b2 = (rng.integers(0, 2, docs).astype(float) for _ in range(4))
    scores = {(0, "a"): a0, (1, "a"): a1, (2, "a"): a1, (0, "b"): b0, (1, "b"): b0, (2, "b"): b2}
    return pd.DataFrame(
        {"strategy": "naive", "seed": 0, "stage": stage, "task": task, "doc": d, "value": v}
        for (stage, task), values in scores.items()
        for d, v in enumerate(values)
    )


def test_stages_share_the_resampled_documents():
    cells, transfer = continual_metrics(_paired_rows(), ["a", "b"], iters=ITERS)
    by = transfer.set_index("metric")
    for name in ("BWT", "FWT"):  # BWT = R[2][a] - R[1][a], FWT = R[1][b] - R[0][b]: equal doc by doc
        assert by.loc[name, ["value", "ci_low", "ci_high"]].tolist() == [0.0, 0.0, 0.0]
    assert by.loc["ACC", "ci_high"] - by.loc["ACC", "ci_low"] > 0.1
    a = cells[cells["task"] == "a"].set_index("stage")
    assert a.loc[1, ["ci_low", "ci_high"]].tolist() == a.loc[2, ["ci_low", "ci_high"]].tolist()


def test_interval_width_is_that_of_a_proportion():
    docs = 200
    R = [[0.5], [0.5]]
    transfer = continual_metrics(pd.DataFrame(doc_rows(R, TASKS[:1], docs=docs)), TASKS[:1], iters=2000)[1]
    acc = transfer.set_index("metric").loc["ACC"]
    normal_width = 2 * 1.96 * math.sqrt(0.25 / docs)
    assert acc["ci_high"] - acc["ci_low"] == pytest.approx(normal_width, rel=0.15)


def test_weighted_items_and_metric_choice():
    rows = pd.DataFrame(doc_rows([[0.0], [1.0]], TASKS[:1], docs=2))
    # a second metric, per instruction: doc 0 has two items (both right), doc 1 one (wrong) -> 2/3
    items = [(0, 1.0), (0, 1.0), (1, 0.0)]
    extra = pd.DataFrame(
        {"strategy": "naive", "seed": 0, "stage": s, "task": TASKS[0], "metric": "inst", "doc": d, "value": v}
        for s in (0, 1)
        for d, v in items
    )
    examples = pd.concat([rows, extra], ignore_index=True)
    with pytest.raises(UserError, match="several metrics"):
        continual_metrics(examples, TASKS[:1], iters=ITERS)
    cells = continual_metrics(examples, TASKS[:1], metrics={TASKS[0]: "inst"}, iters=ITERS)[0]
    assert cells["value"].tolist() == pytest.approx([2 / 3, 2 / 3]) and set(cells["metric"]) == {"inst"}
    weighted = extra.assign(weight=[3.0, 1.0, 4.0] * 2)  # bits-per-byte style weights: (3 + 1) / 8
    cells = continual_metrics(weighted, TASKS[:1], iters=ITERS)[0]
    assert cells["value"].tolist() == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t[~((t["stage"] == 2) & (t["task"] == "forgetting_b"))], "seed 0, stage 2: no scores"),
        (lambda t: t[~((t["stage"] == 1) & (t["doc"] == 3))], "stage 1: 9 of the 10 documents"),
        (lambda t: t[t["task"] != "forgetting_c"], "task forgetting_c: no scores"),
        (lambda t: pd.concat([t, t[t["stage"] == 3].assign(stage=4)]), "stage 4 in the table"),
        (lambda t: t.drop(columns="doc"), "lacks column"),
    ],
)
def test_bad_input_is_one_clear_line(change, message):
    examples = change(pd.DataFrame(doc_rows(R_SEED0)))
    with pytest.raises(UserError, match=message) as error:
        continual_metrics(examples, TASKS, iters=ITERS)
    assert "\n" not in str(error.value)


def test_bad_task_lists():
    examples = pd.DataFrame(doc_rows(R_SEED0))
    with pytest.raises(UserError, match="no stage tasks"):
        continual_metrics(examples, [])
    with pytest.raises(UserError, match="appears twice"):
        continual_metrics(examples, [TASKS[0], TASKS[0], TASKS[1]])


def _general_rows() -> pd.DataFrame:
    """Two seeds, stages 1 and 2 of a general task: after stage 1 every doc scores as the base; after stage 2
    seed 0 loses 2 of 8 docs and seed 1 loses 4 of 8 (base 6/8)."""
    base = [1, 1, 1, 1, 1, 1, 0, 0]
    after2 = {0: [0, 0, 1, 1, 1, 1, 0, 0], 1: [0, 0, 0, 0, 1, 1, 0, 0]}
    stages = [
        {"strategy": "naive", "seed": seed, "stage": stage, "task": "forgetting_knowledge", "metric": "acc"}
        | {"doc": d, "value": float(v)}
        for seed in (0, 1)
        for stage, values in ((1, base), (2, after2[seed]))
        for d, v in enumerate(values)
    ]
    base_rows = [
        {"task": "forgetting_knowledge", "metric": "acc", "doc": d, "value": float(v)} for d, v in enumerate(base)
    ]
    return with_base(pd.DataFrame(stages), pd.DataFrame(base_rows))


def test_general_forgetting_by_hand():
    changes = general_forgetting(_general_rows(), iters=ITERS).set_index("stage")
    assert changes["base"].tolist() == pytest.approx([0.75] * 3)
    assert changes.loc[1, ["delta", "delta_ci_low", "delta_ci_high"]].tolist() == [0.0, 0.0, 0.0]
    after2 = changes.loc[2]
    assert after2["value"] == pytest.approx((4 / 8 + 2 / 8) / 2)
    assert after2["delta"] == pytest.approx(-0.375)
    assert after2["per_seed"] == pytest.approx({0: -0.25, 1: -0.5})
    assert after2["seed_std"] == pytest.approx(0.25 / math.sqrt(2))
    assert after2["delta_ci_low"] <= after2["delta"] <= after2["delta_ci_high"] <= 0
    table = general_table(changes.reset_index())
    assert table["stage"].tolist() == [1, 2] and table["benchmark"].iloc[0] == "knowledge (acc)"


def test_with_base_and_missing_base():
    examples = _general_rows()
    assert len(examples[examples["stage"] == 0]) == 16  # the 8 base docs for each of the two seeds
    with pytest.raises(UserError, match="already has stage 0"):
        with_base(examples, examples[examples["stage"] == 0])
    with pytest.raises(UserError, match="no stage 0"):
        general_forgetting(examples[examples["stage"] != 0])


def test_report_tables_and_definitions():
    examples = pd.DataFrame(doc_rows(R_SEED0) + doc_rows(R_SEED1, strategy="replay"))
    cells, transfer = continual_metrics(examples, TASKS, iters=ITERS)
    table = matrix_table(cells, "naive")
    assert table.shape == (4, 4) and table["after stage"].tolist()[:2] == ["0 (base)", "1 (a)"]
    assert table["a"].iloc[1].startswith("0.900 [")
    shown = transfer_table(transfer)
    assert shown["metric"].tolist() == ["ACC", "BWT", "FWT"] * 2 and shown["per seed"].iloc[1] == "0: -0.300"
    assert "| strategy | metric |" in markdown_table(shown)
    for needle in ("ACC =", "BWT =", "FWT =", "Lopez-Paz & Ranzato", "1706.08840", "pretrained base", "T = 1"):
        assert needle in DEFINITIONS


def test_matrix_figures_have_a_panel_per_strategy_and_task():
    examples = pd.DataFrame(doc_rows(R_SEED0) + doc_rows(R_SEED1, strategy="replay"))
    cells = continual_metrics(examples, TASKS, iters=ITERS)[0]
    heat = matrix_heatmap(cells)
    assert len(heat.axes) == 3  # two strategies and the colour bar
    assert len(heat.axes[0].texts) == 12  # every cell annotated
    lines = stage_lines(cells)
    assert len(lines.axes) == 3
    for ax in lines.axes:
        assert len(ax.lines) == 2 and len(ax.collections) == 2  # a line and a CI band per strategy
    general = stage_lines(general_forgetting(_general_rows(), iters=ITERS))
    assert len(general.axes) == 1 and len(general.axes[0].lines) == 1
    heat.savefig(__import__("io").BytesIO(), format="png")  # the layout renders


def test_curve_figures():
    rows = _general_rows().rename(columns={"stage": "step"}).replace({"step": {1: 10, 2: 20}})
    rows = pd.concat([rows, rows.assign(strategy="lora"), rows.assign(metric="acc_norm")], ignore_index=True)
    curves = forgetting_curves(rows, iters=ITERS)
    assert sorted(curves["step"].unique()) == [0, 10, 20]
    fig = curves_plot(curves)
    assert len(fig.axes) == 2  # (knowledge, acc) and (knowledge, acc_norm); the empty grid places removed
    assert [len(ax.lines) for ax in fig.axes] == [2, 1]
    only_lora = curves_plot(curves.assign(strategy=curves["strategy"].where(curves["metric"] == "acc", "lora")))
    first, second = only_lora.axes  # lora is the second strategy: its colour is kept where naive is absent
    assert first.lines[1].get_color() == second.lines[0].get_color() != first.lines[0].get_color()
    assert [t.get_text() for t in only_lora.legends[0].get_texts()] == ["naive", "lora"]
    assert len(curves_plot(curves, y="delta").axes[0].collections) == 2
    with pytest.raises(UserError, match="several rows per step"):
        curves_plot(pd.concat([curves, curves]))
    points = pd.DataFrame(
        {
            "strategy": s,
            "seed": seed,
            "step": step,
            "target_loss": 2.0 - step / 10,
            "general_loss": 1 + step / 50 + seed,
        }
        for s in ("naive", "lora")
        for seed in (0, 1)
        for step in (0, 10, 20)
    )
    scatter = loss_scatter(points)
    ax = scatter.axes[0]
    assert len(ax.lines) == 4 and len(ax.collections) == 2  # a path per run, a point cloud per strategy
    assert ax.get_legend().get_texts()[0].get_text().startswith("naive (r = ")


def test_built_from_lm_eval_samples_as_the_docstring_says():
    from forgetting.reports.tidy import example_rows  # imports lm-eval's runner: only this test pays for it

    def results(scores: dict[str, list[float]]) -> dict:
        samples = {
            task: [{"doc_id": d, "doc": {}, "metrics": ["exact_match"], "exact_match": v} for d, v in enumerate(values)]
            for task, values in scores.items()
        }
        return {"results": {}, "samples": samples}

    base = results({"a": [0, 0, 0, 0], "b": [0, 0, 0, 0]})
    after = {1: results({"a": [1, 1, 1, 0], "b": [1, 0, 0, 0]}), 2: results({"a": [1, 0, 0, 0], "b": [1, 1, 1, 1]})}
    stage_rows = [
        row for i, r in after.items() for row in example_rows(r, {"strategy": "naive", "seed": 0, "stage": i})
    ]
    examples = with_base(pd.DataFrame(stage_rows), pd.DataFrame(example_rows(base, {})))
    by = continual_metrics(examples, ["a", "b"], iters=ITERS)[1].set_index("metric")["value"]
    # ACC = (0.25 + 1) / 2; BWT = 0.25 - 0.75; FWT = R[1][b] - R[0][b] = 0.25 - 0
    assert by.to_dict() == pytest.approx({"ACC": 0.625, "BWT": -0.5, "FWT": 0.25})
