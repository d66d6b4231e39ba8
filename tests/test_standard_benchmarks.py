"""Standard benchmarks for users with hub access (configs/standard.yaml, evals/hub_tasks/forgetting_standard.yaml):
every probe is one of lm-eval's own tasks by its own name, and an upstream task runs end to end through the
harness's `evaluate` with its data served offline from a `datasets` cache the test writes: the same task
definition (prompts, metrics), the same hub name, the same code path a hub user's second, cached run takes."""

from __future__ import annotations

import copy
from dataclasses import replace

import datasets
import yaml

from forgetting.evals import runner
from forgetting.evals.runner import evaluate
from forgetting.harness.experiment import load_experiment
from forgetting.harness.formats import attach_format
from forgetting.harness.models import tiny_model

STANDARD = runner.HUB_TASKS_DIR / "forgetting_standard.yaml"
# the probes issue 19 asks for, as lm-eval names them
PROBES = {"mmlu", "arc_challenge", "arc_easy", "hellaswag", "winogrande", "gsm8k", "ifeval", "truthfulqa_mc2"}
SPLITS = {"train": 30, "validation": 4, "test": 6}  # ARC-Easy's splits; 30 train documents for its 25 shots


def standard_members() -> list[dict]:
    return yaml.safe_load(STANDARD.read_text())["task"]


def test_every_standard_probe_resolves_in_lm_evals_index():
    settings = load_experiment("configs/standard.yaml").eval
    assert settings.tasks == ["forgetting_standard"]
    manager = runner.task_manager(settings)  # lm-eval's own tasks indexed, with the hub group beside them
    assert "forgetting_standard" in manager.all_groups
    names = [member["task"] for member in standard_members()]
    assert set(names) == PROBES
    assert [name for name in names if name not in manager.all_tasks] == []
    # each one is lm-eval's own definition, not a local copy
    assert all("lm_eval" in manager.task_index[name].yaml_path.parts for name in names)
    assert all(isinstance(member["num_fewshot"], int) for member in standard_members())


def arc_documents(split: str, count: int) -> list[dict]:
    """Documents in ARC's schema; each question names its split so that a prompt shows where its shots came from."""
    return [
        {
            "id": f"{split}-{i}",
            "question": f"{split} question {i}: which colour is the sky?",
            "choices": {"text": ["blue", "green", "red", "black"], "label": ["A", "B", "C", "D"]},
            "answerKey": "ABCD"[i % 4],
        }
        for i in range(count)
    ]


def write_cached_arc_easy(tmp_path) -> None:
    """allenai/ai2_arc's ARC-Easy config as `datasets` caches it after a download (<cache>/allenai___ai2_arc/
    ARC-Easy/<version>/<hash>/), prepared from a local folder laid out as the hub repository is (parquet files
    per config, the configs in README.md's YAML header). Offline, `load_dataset("allenai/ai2_arc", "ARC-Easy")`
    reads that cache."""
    folder = tmp_path / "ai2_arc"  # the repository's name: the cache's file names start with it
    (folder / "ARC-Easy").mkdir(parents=True)
    header = ["---", "configs:", "- config_name: ARC-Easy", "  data_files:"]
    for split, count in SPLITS.items():
        datasets.Dataset.from_list(arc_documents(split, count)).to_parquet(folder / "ARC-Easy" / f"{split}.parquet")
        header += [f"  - split: {split}", f"    path: ARC-Easy/{split}.parquet"]
    (folder / "README.md").write_text("\n".join([*header, "---", ""]))
    cache = tmp_path / "hf_datasets"
    datasets.load_dataset_builder(str(folder), "ARC-Easy", cache_dir=str(cache)).download_and_prepare()
    (cache / "ai2_arc").rename(cache / "allenai___ai2_arc")  # a hub download's folder carries the namespace


def test_an_upstream_task_of_the_group_runs_end_to_end_from_a_local_cache(tokenizer, tmp_path, monkeypatch):
    write_cached_arc_easy(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    # the standard group as shipped, cut to its ARC-Easy member (the others' data is not served here)
    group = yaml.safe_load(STANDARD.read_text())
    group["task"] = [member for member in group["task"] if member["task"] == "arc_easy"]
    (tmp_path / "hub_tasks").mkdir()
    (tmp_path / "hub_tasks" / STANDARD.name).write_text(yaml.safe_dump(group))
    monkeypatch.setattr(runner, "HUB_TASKS_DIR", tmp_path / "hub_tasks")
    tok = copy.deepcopy(tokenizer)
    attach_format(tok, "chatml")
    model = tiny_model(len(tok), seed=1).eval()
    settings = replace(load_experiment("configs/standard.yaml").eval, limit=4, batch_size=4)

    results = evaluate(model, tok, settings)

    assert results["forgetting"]["evaluated"] == ["arc_easy"]
    scores = results["results"]["arc_easy"]
    assert 0 <= scores["acc,none"] <= 1 and 0 <= scores["acc_norm,none"] <= 1  # ARC's own metrics
    config = results["configs"]["arc_easy"]
    assert (config["dataset_path"], config["dataset_name"]) == ("allenai/ai2_arc", "ARC-Easy")  # the hub name
    assert config["doc_to_text"] == "Question: {{question}}\nAnswer:" and config["num_fewshot"] == 25
    samples = results["samples"]["arc_easy"]
    assert [s["doc"]["id"] for s in samples] == [f"test-{i}" for i in range(4)]  # documents from the local cache
    context = samples[0]["arguments"][0][0]  # the first answer choice's (context, continuation)
    assert context.count("train question") == 25  # 25 shots from the train split, each a chat turn
    assert context.count("<|im_start|>user\nQuestion: ") == 26 and context.endswith("<|im_start|>assistant\n")
