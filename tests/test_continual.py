"""Continual SFT end to end on a tiny model: an experiment of three stages (three built-in tasks), each unit
trained stage after stage from the previous stage's weights and evaluated after each; the accuracy matrix and
ACC/BWT/FWT in the report; a run killed between stages resumes to the same results; online EWC's Fisher over
stages is the online formula; replay of earlier stages draws only from them, with the configured quotas."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from forgetting.harness.cli import main
from forgetting.harness.config import DataConfig
from forgetting.harness.configlib import to_dict
from forgetting.harness.data import load_conversations
from forgetting.harness.errors import UserError
from forgetting.harness.experiment import load_experiment, units
from tests.helpers import write
from tests.test_experiment import TASKS, experiment

STAGES = [
    {"name": "records", "data": {"path": "builtin"}, "target_task": "forgetting_target"},
    {"name": "units", "data": {"path": "builtin:units"}, "target_task": "forgetting_target_units"},
    {
        "name": "dates",
        "data": {"path": "builtin:dates"},
        "target_task": "forgetting_target_dates",
        "train": {"lr": 5e-4},
    },
]
STRATEGIES = [
    {"name": "naive"},
    {"name": "replay", "mitigations": [{"name": "replay", "ratio": 0.25, "data": {"source": "stages", "size": 3}}]},
    {"name": "ewc", "mitigations": [{"name": "ewc", "strength": 10.0, "data": {"source": "sft", "size": 4}}]},
    {"name": "lora", "mitigations": [{"name": "lora", "r": 4}]},
]


def sequence(tmp_path: Path, **changes) -> dict:
    config = experiment(tmp_path, **({"strategies": STRATEGIES, "stages": STAGES} | changes))
    config["eval"]["tasks"] = TASKS + ["forgetting_target_units", "forgetting_target_dates"]
    config["eval"]["subsample"] = {"forgetting_knowledge": 6, "forgetting_ifeval": 2}
    return config


def test_each_stage_continues_from_the_previous_stages_weights(tmp_path):
    exp = load_experiment(str(write(tmp_path, "exp.yaml", sequence(tmp_path))))
    by_name = {u.family: u for u in units(exp)}
    naive, lora, ewc = by_name["naive"], by_name["lora"], by_name["ewc"]
    assert [j.data.path for j in naive.stage_jobs] == ["builtin", "builtin:units", "builtin:dates"]
    assert [j.train.lr for j in naive.stage_jobs] == [1e-3, 1e-3, 5e-4]
    first, second = naive.stage_jobs[0].output_dir, naive.stage_jobs[1].output_dir
    assert naive.stage_jobs[1].model.name_or_path == f"{first}/final"
    assert naive.stage_jobs[2].model.name_or_path == f"{second}/final"
    assert lora.stage_jobs[1].model.name_or_path == f"{lora.stage_jobs[0].output_dir}/final/merged"
    ewc_specs = [next(m for m in j.mitigations if m["name"] == "ewc") for j in ewc.stage_jobs]
    assert "fisher_path" not in ewc_specs[0]
    assert ewc_specs[2]["fisher_path"] == f"{ewc.stage_jobs[1].output_dir}/ewc_fisher.safetensors"
    assert ewc_specs[2]["online_decay"] == 1.0
    replay = by_name["replay"].stage_jobs
    assert [m["name"] for m in replay[0].mitigations] == []  # nothing earlier to replay at the first stage
    assert [next(m for m in j.mitigations if m["name"] == "replay")["data"]["size"] for j in replay[1:]] == [3, 6]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stages": [{"name": "a", "target_task": "forgetting_target"}] * 2}, "stages: stage names must differ"),
        ({"stages": [{"name": "a b", "target_task": "x"}]}, "stages[0]: name: expected letters, digits"),
        ({"stages": [{"name": "a"}]}, "stages[0]: target_task: each stage needs the lm-eval task"),
        ({"stages": []}, "replay.data.source: stages needs `stages:`"),
    ],
)
def test_bad_stages_are_one_line_errors(tmp_path, change, message):
    config = sequence(tmp_path) | change
    with pytest.raises(UserError) as err:
        load_experiment(str(write(tmp_path, "exp.yaml", config)))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_wise_ft_in_stages_needs_one_alpha(tmp_path):
    config = sequence(tmp_path, strategies=[{"name": "w", "mitigations": [{"name": "wise_ft", "alphas": [0.3, 0.6]}]}])
    with pytest.raises(UserError, match="wise_ft in stages needs exactly one alpha"):
        load_experiment(str(write(tmp_path, "exp.yaml", config)))


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


@pytest.mark.slow
def test_a_three_stage_sequence_reports_the_matrix_and_resumes_after_a_kill_between_stages(tmp_path):
    """4 strategies x 3 stages, killed (SIGKILL) once the first unit's second stage has started; the rerun ends
    with the results of an uninterrupted run, and the report has the accuracy matrix and ACC/BWT/FWT."""
    reference = sequence(tmp_path, output_dir=str(tmp_path / "straight"))
    assert main(["run", str(write(tmp_path, "straight.yaml", reference))]) == 0
    path = write(tmp_path, "killed.yaml", sequence(tmp_path, output_dir=str(tmp_path / "killed")))
    command = [sys.executable, "-m", "forgetting", "run", str(path)]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second_stage = tmp_path / "killed" / "units" / "naive__seed0" / "stages" / "2_units" / "train"
    deadline = time.monotonic() + 600
    while not second_stage.is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its second stage"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert main(["run", str(path)]) == 0
    run, straight = tmp_path / "killed", tmp_path / "straight"
    assert (run / "results.csv").read_text().replace("killed", "straight") == (straight / "results.csv").read_text()
    report = json.loads((run / "reports" / "continual.json").read_text())
    assert report == json.loads((straight / "reports" / "continual.json").read_text())
    cells = [c for c in report["cells"] if c["strategy"] == "naive"]
    assert len(cells) == 4 * 3  # stages 0..3 x 3 tasks
    assert {t["metric"] for t in report["transfer"]} == {"ACC", "BWT", "FWT"}
    html = (run / "reports" / "report.html").read_text()
    assert "Accuracy matrix" in html and "BWT" in html and "Lopez-Paz" in html
    for unit in units(load_experiment(str(path))):
        evals = [json.loads((Path(j.output_dir).parent / "eval.json").read_text()) for j in unit.stage_jobs]
        assert len({e["forgetting"]["weights_fingerprint"] for e in evals}) == 3  # each stage changed the weights
        # the final model is the last stage's
        final = json.loads((run / "units" / unit.id / "eval.json").read_text())
        assert final["forgetting"]["weights_fingerprint"] == evals[-1]["forgetting"]["weights_fingerprint"]
        # the last stage's card carries the unit's rows of the report (the sequence's end against the base)
        last, first = (ModelCard.load(Path(j.output_dir) / "final" / "README.md") for j in unit.stage_jobs[::-2])
        own = {
            (r.task_name, r.metric_type): r.metric_value
            for r in last.data.eval_results
            if "this model" in (r.metric_name or "")
        }
        assert own[("forgetting_target_dates", "exact_match")] == pytest.approx(
            final["results"]["forgetting_target_dates"]["exact_match,none"]
        )
        assert any("after - base" in (r.metric_name or "") for r in last.data.eval_results)
        assert not first.data.eval_results  # an earlier stage keeps its training-time card


@pytest.mark.slow
def test_online_ewc_fisher_over_stages_is_the_online_formula(tmp_path):
    """Stage k's saved Fisher is decay * (stage k-1's) + the Fisher estimated at stage k's start, and its
    anchor is the weights stage k started from."""
    config = sequence(tmp_path, strategies=[dict(STRATEGIES[2])])
    config["strategies"][0]["mitigations"] = [dict(STRATEGIES[2]["mitigations"][0], online_decay=0.5)]
    config["stages"] = STAGES[:2]
    config["eval"]["tasks"] = TASKS + ["forgetting_target_units"]
    assert main(["run", str(write(tmp_path, "exp.yaml", config))]) == 0
    unit = units(load_experiment(str(tmp_path / "exp.yaml")))[0]
    first, second = (Path(j.output_dir) for j in unit.stage_jobs)
    # the Fisher stage 2 estimates at its start weights: its own job, without the earlier stage's Fisher
    alone = to_dict(unit.stage_jobs[1])
    alone["mitigations"] = [
        {k: v for k, v in alone["mitigations"][0].items() if k not in ("fisher_path", "online_decay")}
    ]
    alone["output_dir"] = str(tmp_path / "alone")
    assert main(["train", str(write(tmp_path, "alone.yaml", alone))]) == 0
    new = load_file(str(tmp_path / "alone" / "ewc_fisher.safetensors"))
    old = load_file(str(first / "ewc_fisher.safetensors"))
    saved = load_file(str(second / "ewc_fisher.safetensors"))
    fisher_names = [n for n in saved if n.startswith("fisher.")]
    assert fisher_names and sorted(saved) == sorted(new)
    for name in fisher_names:
        torch.testing.assert_close(saved[name], 0.5 * old[name] + new[name], rtol=1e-5, atol=0)
    for name in (n for n in saved if n.startswith("anchor.")):  # theta*: the weights stage 2 started from
        assert torch.equal(saved[name], new[name])


def test_the_replay_buffer_draws_only_from_earlier_stages_with_their_quotas(tmp_path):
    """Stage 3's buffer: 3 examples from each of stages 1 and 2 (the configured size per stage), each one of that
    stage's training examples, none of stage 3's; the same buffer on a rerun (seeded)."""
    from forgetting.harness.pipeline import write_replay_buffer

    exp = load_experiment(str(write(tmp_path, "exp.yaml", sequence(tmp_path))))
    unit = next(u for u in units(exp) if u.family == "replay")
    buffer = tmp_path / "buffer.jsonl"
    job = unit.stage_jobs[2]
    spec = next(m for m in job.mitigations if m["name"] == "replay")
    spec["data"]["source"] = str(buffer)
    write_replay_buffer(job, unit.stage_jobs[:2], buffer)
    rows = [json.loads(line) for line in buffer.read_text().splitlines()]
    assert [r["stage"] for r in rows] == [1, 1, 1, 2, 2, 2]
    for row in rows:
        stage_data = unit.stage_jobs[row["stage"] - 1].data
        assert row["messages"] in load_conversations(stage_data)
    third = load_conversations(DataConfig(**{**vars(job.data)}))
    assert not any(r["messages"] in third for r in rows)
    first = buffer.read_text()
    write_replay_buffer(job, unit.stage_jobs[:2], buffer)
    assert buffer.read_text() == first


@pytest.mark.slow
def test_curves_within_stages_join_into_the_units_curve_over_the_sequence(tmp_path):
    """eval.every in a sequence: each stage's curve (its own steps 0, 1, 2) and the unit's curve over the whole
    sequence (steps 0..4, each point with its stage, stage 2's step 0 left out); the last point is the final
    evaluation's score."""
    config = sequence(tmp_path, strategies=[{"name": "naive"}], stages=STAGES[:2])
    config["eval"]["tasks"] = TASKS + ["forgetting_target_units"]
    config["eval"]["every"] = 1
    assert main(["run", str(write(tmp_path, "exp.yaml", config))]) == 0
    unit = tmp_path / "run" / "units" / "naive__seed0"
    for stage in ("1_records", "2_units"):
        assert [json.loads(line)["step"] for line in (unit / "stages" / stage / "curve.jsonl").open()] == [0, 1, 2]
    joined = [json.loads(line) for line in (unit / "curve.jsonl").open()]
    assert [(p["step"], p["stage"]) for p in joined] == [(0, 1), (1, 1), (2, 1), (3, 2), (4, 2)]
    final = json.loads((unit / "eval.json").read_text())["results"]["forgetting_knowledge"]
    assert joined[-1]["results"]["results"]["forgetting_knowledge"]["acc,none"] == final["acc,none"]
    assert (tmp_path / "run" / "curves.csv").is_file()
