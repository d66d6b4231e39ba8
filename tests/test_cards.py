"""Model cards and `forgetting push`: every final model's README.md read back with huggingface_hub's ModelCard
and checked against the run's own tables; the upload plan (files, repo, revision) and the upload calls, offline."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

from forgetting.harness import hub
from forgetting.harness.card import write_cards
from forgetting.harness.cli import main
from tests.helpers import write
from tests.test_experiment import experiment

STRATEGIES = [
    {"name": "naive"},
    {"name": "lora", "mitigations": [{"name": "lora", "r": 4}]},
    {"name": "wise", "mitigations": [{"name": "wise_ft", "alphas": [0.5]}]},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny experiment of test_experiment.py with three strategies: a full fine-tune, a LoRA adapter and a
    WiSE-FT point; its reports (and so its cards) written."""
    tmp_path = tmp_path_factory.mktemp("cards")
    path = write(tmp_path, "exp.yaml", experiment(tmp_path, strategies=STRATEGIES))
    assert main(["run", str(path)]) == 0
    return tmp_path / "run"


def _card(run, unit: str, variant: str = "final") -> ModelCard:
    final = run / "units" / unit / "train" / "final"
    return ModelCard.load(final / "README.md" if variant == "final" else final / variant / "README.md")


def _results(card: ModelCard) -> dict:
    return {(r.dataset_type, r.metric_type): r for r in card.data.eval_results}


def test_a_card_holds_the_units_rows_of_the_report(run):
    card = _card(run, "naive__seed0")
    data = card.data
    assert data.base_model == "tiny-random" and data.base_model_relation == "finetune"
    assert data.datasets == ["builtin"] and data.library_name == "transformers"
    assert data.tags == ["sft", "forgetting-harness"] and data.pipeline_tag == "text-generation"
    hashes = json.loads((run / "data_hashes.json").read_text())["datasets"]
    train = next(d for d in hashes if d["role"] == "train")
    assert data["sft_data"] == {
        "path": "builtin",
        "split": "train",
        "format": "chat_template",
        "schema": "auto",
        "limit": 24,
        "records": train["records"],
        "blake2": train["blake2"],
    }
    assert data["experiment"] == {"name": "tiny", "unit": "naive__seed0", "variant": "final"}
    assert data.model_name == "tiny-naive__seed0"
    results = _results(card)
    scores = pd.read_csv(run / "results.csv")
    own = scores[(scores["unit"] == "naive__seed0") & (scores["variant"] == "final")]
    assert len(own) > 8
    for row in own.itertuples():  # every score of this model, with its stderr interval and evaluation settings
        result = results[(row.task, row.metric)]
        assert result.metric_value == pytest.approx(row.value)
        if math.isfinite(row.stderr):
            assert result.metric_args["ci95_low"] == pytest.approx(row.value - 1.959964 * row.stderr)
        documents = {"forgetting_knowledge": {"subsample": 6}, "forgetting_ifeval": {"subsample": 2}}
        settings = {"lm_eval_task": row.task, "documents": row.n, "dtype": "float32"}
        assert result.dataset_args == settings | documents.get(row.task, {"limit": 3})
    summary = json.loads((run / "reports" / "summary.json").read_text())
    benchmarks = [b for b in summary["benchmarks"] if b["strategy"] == "naive" and b["variant"] == "final"]
    for row in benchmarks:  # the strategy's Per benchmark row: delta with the paired bootstrap CI
        delta = results[(row["task"], f"{row['metric']}_delta")]
        assert delta.metric_value == pytest.approx(row["delta"])
        assert (delta.metric_args["ci_low"], delta.metric_args["ci_high"]) == pytest.approx(
            (row["ci_low"], row["ci_high"])
        )
    ranking = next(s for s in summary["strategies"] if s["strategy"] == "naive" and s["variant"] == "final")
    forgetting = results[("forgetting_general", "forgetting")]
    assert forgetting.metric_value == pytest.approx(ranking["forgetting"])
    assert forgetting.metric_args["rank"] == ranking["rank"] and forgetting.metric_args["pareto"] == ranking["pareto"]
    assert results[("forgetting_general", "target_gain")].metric_value == pytest.approx(ranking["target_gain"])


def test_the_card_body_says_how_the_model_was_made(run):
    text = _card(run, "naive__seed0").text
    for heading in ("## Data", "## Mitigations", "## Training budget", "## Evaluation", "### Instruction following"):
        assert heading in text, heading
    assert "| optimizer steps | 2 |" in text and "| batch (sequences per step) | 4 |" in text
    assert "| sequences seen | 8 |" in text and "| peak learning rate | 0.001 |" in text
    tokens = sum(json.loads(line).get("tokens", 0) for line in _metrics(run, "naive__seed0"))
    assert f"| tokens trained on | {tokens} |" in text and tokens > 0
    assert "None: naive SFT." in text
    assert 'lm_eval_tasks: `["forgetting_knowledge", "forgetting_target"' in text and 'dtype: `"float32"`' in text


def _metrics(run, unit: str) -> list[str]:
    return (run / "units" / unit / "train" / "metrics.jsonl").read_text().splitlines()


def test_adapters_and_wise_ft_points_have_their_own_cards(run):
    lora = _card(run, "lora__seed0").data
    assert lora.library_name == "peft" and lora.base_model_relation == "adapter" and "lora" in lora.tags
    point = _card(run, "wise__seed0", "wise_ft_0.5")
    assert point.data.base_model_relation == "merge" and point.data.tags[-2:] == ["wise_ft", "wise-ft"]
    assert point.data["experiment"]["variant"] == "wise_ft_0.5" and point.data.model_name.endswith("-wise_ft_0.5")
    scores = pd.read_csv(run / "results.csv")
    own = scores[(scores["unit"] == "wise__seed0") & (scores["variant"] == "wise_ft_0.5")]
    results = _results(point)
    assert all(results[(r.task, r.metric)].metric_value == pytest.approx(r.value) for r in own.itertuples())
    assert "| wise_ft | alphas=[0.5] |" in point.text


def test_dry_run_prints_the_upload_plan_and_uploads_nothing(run, capsys, monkeypatch):
    monkeypatch.setattr(hub, "HfApi", None)  # any upload attempt would fail
    unit = run / "units" / "wise__seed0"
    assert main(["push", str(unit), "--dry-run"]) == 0
    out = capsys.readouterr().out
    final = unit / "train" / "final"
    files = sorted(p.name for p in final.iterdir() if p.is_file())
    assert "README.md" in files and "model.safetensors" in files and "trainer_state.json" in files
    assert "repo:     tiny-wise__seed0 (in the namespace of your Hugging Face token), model, public" in out
    assert "revision: main" in out and f"from:     {final}" in out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == files  # final/'s own files; the WiSE-FT point inside it is a model of its own


def test_push_creates_the_repo_and_uploads_exactly_the_planned_files(run, capsys, monkeypatch):
    calls = []

    class FakeApi:  # huggingface_hub.HfApi's two calls, recorded: no network
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return type("RepoUrl", (), {"repo_id": f"me/{repo_id}"})()

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            return type("CommitInfo", (), {"commit_url": "https://huggingface.co/me/x/commit/1"})()

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    unit = run / "units" / "lora__seed0"
    assert main(["push", str(unit), "--repo", "adapters", "--private"]) == 0
    assert capsys.readouterr().out.strip().endswith("pushed: https://huggingface.co/me/x/commit/1")
    (_, name, created), (_, target, upload) = calls
    assert name == "adapters" and created == {"repo_type": "model", "private": True, "exist_ok": True}
    final = unit / "train" / "final"
    assert target == "me/adapters" and upload["folder_path"] == final and upload["revision"] == "main"
    everything = [str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()]
    sent = sorted(filter_repo_objects(everything, allow_patterns=upload["allow_patterns"]))
    assert sent == sorted(p.name for p in final.iterdir() if p.is_file())  # what upload_folder itself selects
    assert "adapter_model.safetensors" in sent and "README.md" in sent


def test_bad_push_input_is_one_line_and_exit_2(run, tmp_path, capsys):
    empty = tmp_path / "run" / "units" / "ghost"
    empty.mkdir(parents=True)
    shutil.copy(run / "experiment.yaml", tmp_path / "run" / "experiment.yaml")
    for argv, message in [
        (["push", str(run)], "not a unit directory"),
        (["push", str(empty)], "no final model"),
        (["push", str(run / "units" / "naive__seed0"), "--repo", "a--b"], "not a valid Hub repo id"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_push_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["push", "--help"])
    assert exit_info.value.code == 0 and "--dry-run" in capsys.readouterr().out


def test_a_plain_training_run_gets_a_card_without_evaluation(tmp_path):
    job = {
        "model": {"name_or_path": "embedded:smollm2-135m-instruct"},
        "data": {"path": "builtin", "limit": 8, "max_seq_len": 96},
        "train": {"max_steps": 1, "batch_size": 2, "progress": False},
        "output_dir": str(tmp_path / "out"),
    }
    final = tmp_path / "out" / "final"
    final.mkdir(parents=True)
    (final / "forgetting_config.yaml").write_text(json.dumps(job))
    (final / "trainer_state.json").write_text(json.dumps({"steps": 1, "data": {"records": 8, "examples": 8}}))
    (final / "config.json").write_text("{}")
    write_cards(final)
    card = ModelCard.load(final / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.eval_results is None
    assert "blake2" not in card.data["sft_data"] and "model-index" not in card.content
    assert "not recorded (not from an experiment)" in card.text and "| tokens trained on | not logged |" in card.text
