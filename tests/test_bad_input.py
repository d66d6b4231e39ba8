"""Bad input across commands, configs and data: one line on stderr naming what is wrong, exit 2 (usage) or 1
(runtime), no traceback, and nothing half-written (no output directory or file appears)."""

from __future__ import annotations

import errno
import json

import pytest
import yaml

from forgetting.harness.cli import main

TINY = ["model.name_or_path=tiny-random"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    """Inputs shared by the cases: good and broken data, configs, checkpoints, results files."""
    from forgetting.harness.models import tiny_model

    root = tmp_path_factory.mktemp("bad")
    good = root / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(8)))
    (root / "empty.jsonl").write_text("")
    (root / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin-1"))
    (root / "malformed.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp\n')
    (root / "wrongtype.jsonl").write_text('{"prompt": "a", "response": 3}\n')
    (root / "deep.jsonl").write_text('{"prompt": ' + "[" * 5000 + "]" * 5000 + ', "response": "b"}\n')
    (root / "nocontent.jsonl").write_text(
        json.dumps(
            {"messages": [{"role": "system", "content": "s"}, {"role": "user"}, {"role": "assistant", "content": "a"}]}
        )
        + "\n"
    )
    (root / "long.jsonl").write_text(json.dumps({"prompt": "word " * 400, "response": "short"}) + "\n")
    (root / "unknown.txt").write_text("text")
    (root / "bad.yaml").write_text("train:\n  lr: [1, 2\n")
    (root / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (root / "notamodel").mkdir()
    (root / "notamodel" / "readme.txt").write_text("not a model")
    checkpoint = root / "tiny"
    tiny_model(len(tokenizer)).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    from peft import LoraConfig, get_peft_model

    other = tiny_model(len(tokenizer), hidden_size=32, intermediate_size=64)  # another base's adapter
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(root / "foreign_adapter")
    (root / "results.json").write_text(json.dumps({"results": {}, "forgetting": {"settings": {"tasks": ["x"]}}}))
    (root / "notjson.json").write_text("{not json")
    (root / "thresholds_bad.yaml").write_text("metrics: {forgetting_knowledge: {max_drop: much}}\n")
    (root / "thresholds_key.yaml").write_text("alpah: 0.1\n")
    (root / "exp_dup.yaml").write_text(yaml.safe_dump({"strategies": [{"name": "a"}, {"name": "a"}]}))
    (root / "exp_task.yaml").write_text(
        yaml.safe_dump({"eval": {"tasks": ["nope"]}, "model": {"name_or_path": "tiny-random"}})
    )
    (root / "exp_data.yaml").write_text(yaml.safe_dump({"data": {"path": str(root / "missing.jsonl")}}))
    return root


def _out(files):
    return files / "out"


CASES = [  # (id, argv builder, exit code, message fragment)
    ("malformed YAML", lambda f: ["train", str(f / "bad.yaml")], 2, "bad.yaml:3: invalid YAML"),
    ("non-UTF-8 config", lambda f: ["train", str(f / "latin1.yaml")], 2, "not valid UTF-8"),
    ("missing config", lambda f: ["train", str(f / "nope.yaml")], 2, "nope.yaml: config file not found"),
    ("wrong type", lambda f: ["train", *TINY, "train.lr=fast"], 2, "train.lr: expected a number, got 'fast'"),
    ("unknown key", lambda f: ["train", *TINY, "train.lrr=1"], 2, "train.lrr: unknown key; did you mean 'lr'?"),
    ("unknown section", lambda f: ["train", *TINY, "trian.lr=1"], 2, "did you mean 'train'?"),
    ("bad literal", lambda f: ["train", *TINY, "data.format=markdown"], 2, "data.format: expected one of"),
    ("range check", lambda f: ["train", *TINY, "train.batch_size=0"], 2, "train.batch_size: must be at least 1"),
    ("override without key", lambda f: ["train", *TINY, "=3"], 2, "empty key"),
    ("unknown mitigation", lambda f: ["train", *TINY, "mitigations=[{name: magic}]"], 2, "unknown mitigation 'magic'"),
    (
        "mitigation field",
        lambda f: ["train", *TINY, "mitigations=[{name: lora, rank: 4}]"],
        2,
        "mitigations[0].rank: unknown key; valid keys: r,",
    ),
    ("missing data", lambda f: ["train", *TINY, f"data.path={f / 'nope.jsonl'}"], 2, "nope.jsonl not found"),
    ("empty dataset", lambda f: ["train", *TINY, f"data.path={f / 'empty.jsonl'}"], 2, "no records found"),
    (
        "non-UTF-8 data",
        lambda f: ["train", *TINY, f"data.path={f / 'latin1.jsonl'}"],
        2,
        "latin1.jsonl:1: not valid UTF-8",
    ),
    (
        "malformed JSONL",
        lambda f: ["train", *TINY, f"data.path={f / 'malformed.jsonl'}"],
        2,
        "malformed.jsonl:2: malformed JSON",
    ),
    (
        "field type",
        lambda f: ["train", *TINY, f"data.path={f / 'wrongtype.jsonl'}"],
        2,
        "field 'response' must be a string",
    ),
    (
        "JSONL nested thousands deep",
        lambda f: ["train", *TINY, f"data.path={f / 'deep.jsonl'}"],
        2,
        "deep.jsonl:1: malformed JSON: nested too deeply",
    ),
    (
        "turn without content",
        lambda f: ["train", *TINY, f"data.path={f / 'nocontent.jsonl'}"],
        2,
        "nocontent.jsonl:1: messages[1]: missing field 'content'",
    ),
    (
        "response truncated away",
        lambda f: ["train", *TINY, f"data.path={f / 'long.jsonl'}", "data.max_seq_len=16"],
        2,
        "every example was dropped",
    ),
    ("unknown file type", lambda f: ["train", *TINY, f"data.path={f / 'unknown.txt'}"], 2, "unknown file type '.txt'"),
    (
        "not a model",
        lambda f: ["train", f"model.name_or_path={f / 'notamodel'}", f"data.path={f / 'good.jsonl'}"],
        2,
        "notamodel",
    ),
    ("eval: missing model", lambda f: ["eval", str(f / "nope"), "--output", str(_out(f))], 2, "does not exist"),
    (
        "eval: unknown task",
        lambda f: ["eval", str(f / "tiny"), "--tasks", "nonesuch", "--output", str(_out(f))],
        2,
        "unknown task 'nonesuch'",
    ),
    (
        "eval: bad limit",
        lambda f: ["eval", str(f / "tiny"), "--limit", "0", "--output", str(_out(f))],
        2,
        "limit: must be at least 1",
    ),
    (
        "eval: adapter for another base",
        lambda f: [
            "eval",
            str(f / "tiny"),
            "--adapter",
            str(f / "foreign_adapter"),
            "--tasks",
            "forgetting_prose",
            "--output",
            str(_out(f)),
        ],
        2,
        "does not fit",
    ),
    (
        "eval: adapter dir without adapter",
        lambda f: ["eval", str(f / "tiny"), "--adapter", str(f / "notamodel"), "--output", str(_out(f))],
        2,
        "no adapter_config.json",
    ),
    ("run: duplicate strategy", lambda f: ["run", str(f / "exp_dup.yaml")], 2, "the name 'a' is used 2 times"),
    ("run: unknown task", lambda f: ["run", str(f / "exp_task.yaml")], 2, "unknown task 'nope'"),
    ("run: missing data", lambda f: ["run", str(f / "exp_data.yaml")], 2, "missing.jsonl not found"),
    ("report: not a run", lambda f: ["report", str(f / "notamodel")], 2, "not a run directory"),
    ("gate: missing baseline", lambda f: ["gate", str(f / "tiny"), "--baseline", str(f / "nope.json")], 2, "not found"),
    (
        "gate: baseline not JSON",
        lambda f: ["gate", str(f / "tiny"), "--baseline", str(f / "notjson.json")],
        2,
        "is not a results JSON",
    ),
    (
        "gate: thresholds value",
        lambda f: [
            "gate",
            str(f / "tiny"),
            "--baseline",
            str(f / "results.json"),
            "--thresholds",
            str(f / "thresholds_bad.yaml"),
        ],
        2,
        "expected a number like 0.02",
    ),
    (
        "gate: thresholds key",
        lambda f: [
            "gate",
            str(f / "tiny"),
            "--baseline",
            str(f / "results.json"),
            "--thresholds",
            str(f / "thresholds_key.yaml"),
        ],
        2,
        "did you mean 'alpha'?",
    ),
    (
        "gate: settings differ",
        lambda f: ["gate", str(f / "tiny"), "--baseline", str(f / "results.json"), "--limit", "3"],
        2,
        "settings differ",
    ),
]


@pytest.mark.parametrize("build,code,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_with_its_exit_code_and_writes_nothing(files, capsys, build, code, message):
    argv = build(files)
    if argv[0] == "train":
        argv += [f"output_dir={_out(files)}"] if not any(a.startswith("output_dir=") for a in argv) else []
    assert main(argv) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not _out(files).exists()


def test_a_full_disk_is_one_line_exit_1_and_leaves_no_partial_file(files, tmp_path, capsys, monkeypatch):
    """ENOSPC while writing results: the target never appears, not even partly."""
    from forgetting.harness import io

    real_fdopen = io.os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    out = tmp_path / "results.json"
    assert main(["eval", str(files / "tiny"), "--tasks", "forgetting_prose", "--limit", "1", "--output", str(out)]) == 1
    err = capsys.readouterr().err  # lm-eval's progress bars ran before the write failed
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
