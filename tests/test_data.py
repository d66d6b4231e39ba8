"""Data loading: every file type and layout, and a one-line error naming file:line/field for bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from forgetting.harness import builtin_task
from forgetting.harness.config import DataConfig
from forgetting.harness.data import load_conversations
from forgetting.harness.errors import UserError

ALPACA = [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Greet", "input": "", "output": "Hi"}]
PAIRS = [{"question": "Capital of France?", "answer": "Paris"}]
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be short."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye!"},
        ]
    }
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_jsonl_joins_instruction_and_input(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    conversations = load_conversations(DataConfig(path=str(path)))
    assert conversations[0] == [{"role": "user", "content": "Add\n\n1 2"}, {"role": "assistant", "content": "3"}]
    assert conversations[1][0]["content"] == "Greet"


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_type_with_custom_columns(tmp_path, suffix):
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, PAIRS)
    elif suffix == ".json":
        path.write_text(json.dumps(PAIRS))
    elif suffix == ".csv":
        pd.DataFrame(PAIRS).to_csv(path, index=False)
    else:
        pd.DataFrame(PAIRS).to_parquet(path)
    config = DataConfig(path=str(path), prompt_field="question", response_field="answer", system_prompt="Sys")
    assert load_conversations(config) == [
        [
            {"role": "system", "content": "Sys"},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ]
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_multi_turn_messages(tmp_path, suffix):
    path = tmp_path / f"chat{suffix}"
    write_jsonl(path, CHATS) if suffix == ".jsonl" else pd.DataFrame(CHATS).to_parquet(path)
    (messages,) = load_conversations(DataConfig(path=str(path)))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]


def test_limit_and_builtin_splits_are_disjoint_and_deterministic():
    train = builtin_task.records("train")
    heldout = builtin_task.records("heldout")
    assert train == builtin_task.records("train") and len(train) == 1000 and len(heldout) == 200
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert len(load_conversations(DataConfig(path="builtin", limit=5))) == 5
    reference = train[0]["response"]
    assert builtin_task.score(reference, reference) == {"exact_match": 1.0, "format_valid": 1.0, "field_accuracy": 1.0}
    assert builtin_task.score("I think it is a person", reference)["format_valid"] == 0.0


def _surname_city_pattern(record: dict) -> tuple[str, str, str]:
    """Recover a record's surname, city and sentence pattern from its text and its answer alone."""
    fields = builtin_task.parse(record["response"])
    text = record["prompt"].split("Text: ", 1)[1]
    first, surname = fields["name"].split(" ", 1)
    for value, slot in (
        (fields["name"], "{name}"),
        (fields["city"], "{city}"),
        (fields["born"], "{year}"),
        (fields["job"], "{job}"),
        (first, "{name_first}"),
    ):
        text = text.replace(value, slot)
    return surname, fields["city"], text


def test_heldout_shares_no_surname_city_or_sentence_pattern_with_train():
    """What the README promises: the held-out split tests generalisation to unseen names, places and wording."""
    train = [_surname_city_pattern(r) for r in builtin_task.records("train")]
    heldout = [_surname_city_pattern(r) for r in builtin_task.records("heldout")]
    for column, what in enumerate(("surname", "city", "sentence pattern")):
        seen = {row[column] for row in train}
        shared = [row[column] for row in heldout if row[column] in seen]
        assert not shared, f"{len(shared)} held-out records use a train {what}, e.g. {shared[0]!r}"
    patterns = {row[2] for row in train + heldout}
    assert all("{name}" in p and "{year}" in p and "{city}" in p and "{job}" in p for p in patterns), patterns
    assert len({row[2] for row in heldout}) >= 4 and len({row[1] for row in heldout}) >= 8  # still varied


DEEP = "[" * 5000 + "]" * 5000  # valid JSON nested past the parser's recursion limit
BAD = {
    "malformed_json": (
        '{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n',
        r"bad\.jsonl:2: malformed JSON",
    ),
    "missing_field": (
        '{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n',
        r"bad\.jsonl:2: cannot tell|bad\.jsonl:2: missing field 'response'",
    ),
    "wrong_type": ('{"prompt": "a", "response": 5}\n', r"bad\.jsonl:1: field 'response' must be a string, got int"),
    "empty_response": ('{"prompt": "a", "response": "  "}\n', r"bad\.jsonl:1: field 'response' is empty"),
    "empty_file": ("\n\n", r"bad\.jsonl: no records found"),
    "not_object": ("[1, 2]\n", r"bad\.jsonl:1: expected a JSON object, got list"),
    "bad_role": (
        '{"messages": [{"role": "bot", "content": "x"}]}\n',
        r"bad\.jsonl:1: messages\[0\]\.role: expected one of",
    ),
    "no_assistant": (
        '{"messages": [{"role": "user", "content": "x"}]}\n',
        r"bad\.jsonl:1: field 'messages' has no assistant",
    ),
    "late_system": (
        '{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, '
        '{"role": "assistant", "content": "y"}]}\n',
        r"messages\[1\]\.role: a system message may only come first",
    ),
    "unknown_layout": ('{"text": "a"}\n', r"bad\.jsonl:1: cannot tell the record layout from its fields \['text'\]"),
    "turn_without_content": (
        '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
        '{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}\n',
        r"bad\.jsonl:2: messages\[0\]: missing field 'content'",
    ),
    "nested_too_deep": (
        '{"prompt": "a", "response": "b"}\n{"prompt": ' + DEEP + ', "response": "b"}\n',
        r"bad\.jsonl:2: malformed JSON: nested too deeply",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_jsonl_names_file_line_and_field(tmp_path, case):
    text, pattern = BAD[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(UserError, match=pattern) as err:
        load_conversations(DataConfig(path=str(path)))
    assert "\n" not in str(err.value)


def test_json_nested_too_deeply_is_a_one_line_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('[{"prompt": ' + DEEP + ', "response": "b"}]')
    with pytest.raises(UserError, match=r"deep\.json: malformed JSON: nested too deeply"):
        load_conversations(DataConfig(path=str(path)))


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe", "response": "b"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid UTF-8"):
        load_conversations(DataConfig(path=str(path)))


def test_csv_errors_name_the_row_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,response\na,b\nc,\n")
    with pytest.raises(UserError, match=r"bad\.csv:3: field 'response' is empty"):
        load_conversations(DataConfig(path=str(path)))


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_conversations(DataConfig(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match=r"unknown file type '\.txt'"):
        load_conversations(DataConfig(path=str(tmp_path / "x.txt")))
    with pytest.raises(UserError, match="builtin task has splits"):
        load_conversations(DataConfig(path="builtin", split="test"))


def test_a_local_dataset_folder_loads_through_datasets(tmp_path):
    """The `datasets` code path (used for hub names) on a local folder, offline."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ALPACA)
    conversations = load_conversations(DataConfig(path=str(folder), split="train"))
    assert conversations[0][1] == {"role": "assistant", "content": "3"}
    with pytest.raises(UserError, match=r"cannot load .*my_dataset.* \(split 'validation'\)"):
        load_conversations(DataConfig(path=str(folder), split="validation"))
