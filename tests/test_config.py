"""Config: YAML + key=value overrides into validated dataclasses, with one-line errors naming the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import pytest

from forgetting.harness.configlib import apply_overrides, describe, from_dict, knob
from forgetting.harness.errors import UserError
from forgetting.harness.job import TrainJob, load_job
from tests.helpers import write


def test_yaml_and_overrides_resolve_with_types(tmp_path):
    path = write(tmp_path, "job.yaml", "train:\n  lr: 1e-5\n  epochs: 3\ndata:\n  format: alpaca\n")
    job = load_job(str(path), ["train.batch_size=16", "data.max_seq_len=512", "model.dtype=bfloat16"])
    assert job.train.lr == 1e-5 and isinstance(job.train.epochs, float) and job.train.epochs == 3.0
    assert job.train.batch_size == 16 and job.data.max_seq_len == 512 and job.data.format == "alpaca"
    assert job.model.dtype == "bfloat16" and job.train.warmup_ratio == 0.03  # untouched default


def test_defaults_follow_the_seed_recipe():
    job = TrainJob()
    assert job.train.lr == 2e-5 and job.train.schedule == "cosine" and job.train.warmup_ratio == 0.03
    assert job.train.batch_size == 128 and 1 <= job.train.epochs <= 3


def test_every_knob_has_help():
    rows = describe(TrainJob)
    assert len(rows) > 30 and all(help_text for _, _, help_text in rows)


def test_overrides_do_not_change_the_input():
    data = {"train": {"lr": 1.0}}
    assert apply_overrides(data, ["train.lr=2"]) == {"train": {"lr": 2}} and data == {"train": {"lr": 1.0}}


@pytest.mark.parametrize(
    "text,overrides,pattern",
    [
        ("train:\n  lr: fast\n", [], r"job\.yaml: train\.lr: expected a number, got 'fast'"),
        ("train:\n  lrr: 1e-5\n", [], r"job\.yaml: train\.lrr: unknown key; did you mean 'lr'\?"),
        ("trian:\n  lr: 1e-5\n", [], r"trian: unknown key; did you mean 'train'\?"),
        ("train:\n  lr: -1\n", [], r"train\.lr: must be > 0, got -1"),
        ("train:\n  warmup_ratio: 1.5\n", [], r"train\.warmup_ratio: must be in \[0, 1\)"),
        ("train:\n  batch_size: 2.5\n", [], r"train\.batch_size: expected an integer, got 2\.5"),
        (
            "data:\n  format: markdown\n",
            [],
            r"data\.format: expected one of chatml, alpaca, plain, chat_template; got 'markdown'",
        ),
        ("- a\n- b\n", [], r"job\.yaml: expected a mapping at the top level, got list"),
        ("train: [\n", [], r"job\.yaml:2: invalid YAML"),
        ("", ["train.lr"], r"override 'train\.lr': expected key=value"),
        ("", ["train.epochs=many"], r"train\.epochs: expected a number, got 'many'"),
        (
            "mitigations:\n  - name: magic\n",
            [],
            r"mitigations\[0\]\.name: unknown mitigation 'magic'; valid: ewc, freeze, kl_to_base, l2sp, lora, "
            r"low_lr, replay, wise_ft",
        ),
        ("mitigations:\n  - name: l2sp\n    strength: -1\n", [], r"mitigations\[0\]: strength: must be >= 0, got -1"),
        ("mitigations:\n  - name: l2sp\n  - name: l2sp\n", [], r"'l2sp' is listed 2 times"),
        ("mitigations:\n  - l2sp\n", [], r"mitigations\[0\]: expected a mapping, got 'l2sp'"),
    ],
)
def test_bad_configs_give_one_line_naming_the_field(tmp_path, text, overrides, pattern):
    path = write(tmp_path, "job.yaml", text)
    with pytest.raises(UserError, match=pattern) as err:
        load_job(str(path), overrides)
    assert "\n" not in str(err.value)


def test_missing_and_non_utf8_config_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_job(str(tmp_path / "missing.yaml"))
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"output_dir: caf\xe9\n")
    with pytest.raises(UserError, match=r"latin\.yaml: not valid UTF-8"):
        load_job(str(path))


@dataclass
class Inner:
    source: str = knob("self", "where")
    size: int = knob(64, "how many")
    scalar_key: ClassVar[str] = "source"


@dataclass
class Outer:
    inner: Inner = knob(Inner(size=32), "an inner config whose default differs from Inner()")
    maybe: Optional[Inner] = knob(None, "an optional inner config")
    moved_keys: ClassVar[dict] = {"size": "inner.size"}


def test_a_nested_mapping_changes_only_its_keys_and_keeps_the_fields_default():
    assert from_dict(Outer, {}).inner == Inner(size=32)
    assert from_dict(Outer, {"inner": {"source": "a.txt"}}).inner == Inner(source="a.txt", size=32)
    assert from_dict(Outer, {"inner": {"size": 5}}).inner == Inner(size=5)
    assert from_dict(Outer, {"maybe": {"size": 5}}).maybe == Inner(size=5)  # no field default: Inner's own
    assert Outer().inner is not Outer().inner  # each instance its own copy
    rows = {key: default for key, default, _ in describe(Outer)}
    assert rows["inner.size"] == "32" and rows["inner.source"] == "'self'"


@pytest.mark.parametrize(
    "data,message",
    [
        ({"size": 8}, "x.size: moved to inner.size; write inner: {size: 8}"),
        ({"inner": "b.txt"}, "x.inner: expected a mapping, got 'b.txt'; write inner: {source: b.txt}"),
    ],
)
def test_old_spellings_are_refused_with_the_new_one(data, message):
    with pytest.raises(UserError) as err:
        from_dict(Outer, data, "x")
    assert str(err.value) == message
