"""Hub datasets as users name them: `data.name` picks a dataset's config (subset), as
`datasets.load_dataset(path, name)` does, and `data.streaming` reads only the records used. Tested offline on a
local dataset folder laid out as a hub repository: one folder of JSONL shards per config, the configs declared
in README.md's YAML header (what `datasets` reads for a hub name too)."""

from __future__ import annotations

import json

import datasets
import pytest

from forgetting.harness import data
from forgetting.harness.config import DataConfig
from forgetting.harness.data import load_conversations
from forgetting.harness.errors import UserError

CONFIGS = ("main", "socratic")  # openai/gsm8k's two configs


def pairs(config: str, count: int) -> list[dict]:
    return [{"question": f"{config} question {i}?", "answer": f"{config} answer {i}"} for i in range(count)]


def write_dataset(folder, rows_per_config: int = 5, corrupt_second_shard: bool = False):
    """A hub-style dataset folder: <config>/train-0000N.jsonl shards and README.md's `configs:` header."""
    header = ["---", "configs:"]
    for config in CONFIGS:
        (folder / config).mkdir(parents=True)
        shard = "".join(json.dumps(row) + "\n" for row in pairs(config, rows_per_config))
        (folder / config / "train-00000.jsonl").write_text(shard)
        # a second shard that no reader can parse: whoever opens it fails, so a run that passes never read it
        (folder / config / "train-00001.jsonl").write_text("{not json\n" if corrupt_second_shard else shard)
        header += [f"- config_name: {config}", "  data_files:", "  - split: train", f"    path: {config}/train-*"]
    (folder / "README.md").write_text("\n".join([*header, "---", ""]))
    return folder


@pytest.fixture(autouse=True)
def own_datasets_cache(tmp_path, monkeypatch):
    """`datasets` prepares non-streamed splits under its cache: keep it in the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def config(folder, **keys) -> DataConfig:
    return DataConfig(path=str(folder), prompt_field="question", response_field="answer", **keys)


@pytest.mark.parametrize("streaming", [False, True])
def test_data_name_picks_the_config(tmp_path, streaming):
    folder = write_dataset(tmp_path / "gsm8k_like")
    conversations = load_conversations(config(folder, name="socratic", streaming=streaming))
    assert len(conversations) == 10  # both shards
    assert conversations[0][-2:] == [
        {"role": "user", "content": "socratic question 0?"},
        {"role": "assistant", "content": "socratic answer 0"},
    ]
    heldout = config(folder, name="main", eval_split="train", eval_limit=2).heldout()
    assert heldout.name == "main" and load_conversations(heldout)[1][-1]["content"] == "main answer 1"


def test_streaming_with_limit_reads_only_the_records_used(tmp_path, monkeypatch):
    folder = write_dataset(tmp_path / "big", rows_per_config=5, corrupt_second_shard=True)
    taken = []
    load = datasets.load_dataset

    def counting(*args, **kwargs):  # counts the records the harness pulls from the dataset
        for row in load(*args, **kwargs):
            taken.append(row)
            yield row

    monkeypatch.setattr(data.datasets, "load_dataset", counting)
    conversations = load_conversations(config(folder, name="main", streaming=True, limit=3))
    assert [c[-1]["content"] for c in conversations] == ["main answer 0", "main answer 1", "main answer 2"]
    assert len(taken) == 3
    assert not (tmp_path / "hf_cache").exists() or not list((tmp_path / "hf_cache").rglob("*.arrow"))
    # the corrupt second shard is read when the split is prepared whole: streaming never opened it
    monkeypatch.setattr(data.datasets, "load_dataset", load)
    with pytest.raises(UserError, match=r"^data.path: cannot load .*big.* \(config 'main', split 'train'\)"):
        load_conversations(config(folder, name="main", limit=3))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_bad_or_missing_config_name_is_a_one_line_error_naming_the_field(tmp_path, streaming):
    folder = write_dataset(tmp_path / "gsm8k_like")
    with pytest.raises(UserError, match=r"^data.name: 'nope' is not a config of .*; expected one of main, socratic$"):
        load_conversations(config(folder, name="nope", streaming=streaming))
    with pytest.raises(UserError, match=r"^data.name: .* has several configs; set one of main, socratic$") as err:
        load_conversations(config(folder, streaming=streaming))
    assert "\n" not in str(err.value)


def test_a_config_name_for_a_file_or_builtin_task_is_refused(tmp_path):
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pairs("main", 1)[0]) + "\n")
    for path in (str(tmp_path / "pairs.jsonl"), "builtin"):
        with pytest.raises(UserError, match=r"^data.name: .* has no configs"):
            load_conversations(config(path, name="main"))


def test_an_experiments_data_hashes_tell_a_datasets_configs_apart(tmp_path):
    """A sweep over data.name trains on two datasets: each is hashed, and resuming compares each with its own.
    (Streamed: the files are read as they are now; a prepared split is `datasets`' cached copy.)"""
    from types import SimpleNamespace

    from forgetting.harness.pipeline import check_same_data, data_hashes

    folder = write_dataset(tmp_path / "gsm8k_like")
    unit_list = [
        SimpleNamespace(id=name, stage_jobs=(), job=SimpleNamespace(data=config(folder, name=name, streaming=True)))
        for name in CONFIGS
    ]
    hashes = data_hashes(unit_list)
    assert [(d["name"], d["units"]) for d in hashes["datasets"]] == [("main", ["main"]), ("socratic", ["socratic"])]
    assert hashes["datasets"][0]["blake2"] != hashes["datasets"][1]["blake2"]
    check_same_data(hashes, data_hashes(unit_list))  # the same data: no complaint
    (folder / "main" / "train-00001.jsonl").write_text(json.dumps(pairs("main", 1)[0] | {"answer": "new"}) + "\n")
    with pytest.raises(UserError, match="the data changed since this run started"):
        check_same_data(hashes, data_hashes(unit_list))
