"""The command line: help on every command, one-line errors with exit codes, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from forgetting.harness.cli import main


def run_cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "forgetting", *args], capture_output=True, text=True, env=env, cwd=cwd)


@pytest.mark.parametrize("command", [[], ["train"], ["config"], ["data"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: forgetting" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,config,overrides,quick",
    [
        (["run", "exp.yaml", "--quick", "output_dir=runs/x"], "exp.yaml", ["output_dir=runs/x"], True),
        (["run", "exp.yaml", "seeds=[1]", "--quick", "output_dir=x"], "exp.yaml", ["seeds=[1]", "output_dir=x"], True),
        (["run", "--quick", "exp.yaml", "output_dir=runs/x"], "exp.yaml", ["output_dir=runs/x"], True),
        (
            ["train", "job.yaml", "--debug", "train.lr=1e-5", "output_dir=runs/low_lr"],
            "job.yaml",
            ["train.lr=1e-5", "output_dir=runs/low_lr"],
            None,
        ),
        (["train", "train.lr=1e-5", "--debug", "job.yaml"], "job.yaml", ["train.lr=1e-5"], None),
        (["data", "job.yaml", "--debug", "data.limit=3"], "job.yaml", ["data.limit=3"], None),
        (["config", "--debug", "train.lr=1e-5"], None, ["train.lr=1e-5"], None),
    ],
)
def test_overrides_are_accepted_anywhere_on_the_line(monkeypatch, argv, config, overrides, quick):
    """`forgetting run EXP.yaml --quick output_dir=x` must not fail with 'unrecognized arguments'."""
    from forgetting.harness import commands

    seen = {}
    for name in ("cmd_run", "cmd_train", "cmd_data", "cmd_config"):  # record the parsed line instead of working
        monkeypatch.setattr(commands, name, lambda args: seen.update(vars(args)) or 0)
    assert main(argv) == 0
    assert (seen["config"], seen["overrides"], seen.get("quick")) == (config, overrides, quick)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "exp.yaml", "--quick", "--bogus"],
        ["train", "job.yaml", "a=1", "-x"],
        ["report", "runs/x", "output_dir=y"],
        ["eval", "model", "a=1"],
    ],
)
def test_unknown_flags_and_overrides_for_commands_without_them_are_usage_errors(monkeypatch, argv, capsys):
    from forgetting.harness import commands

    for name in ("cmd_run", "cmd_train", "cmd_report", "cmd_eval"):
        monkeypatch.setattr(commands, name, lambda args: 0)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path):
    (tmp_path / "job.yaml").write_text("train:\n  lr: fast\n")
    result = run_cli("train", str(tmp_path / "job.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'job.yaml'}: train.lr: expected a number, got 'fast'"
    ]
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_data_exits_2_and_writes_nothing(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "respon\n')
    out = tmp_path / "out"
    result = run_cli(
        "train", "model.name_or_path=tiny-random", f"data.path={tmp_path / 'data.jsonl'}", f"output_dir={out}"
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'data.jsonl'}:2: malformed JSON")
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "config", "train.lr=fast")
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow  # several processes, each importing torch, transformers and lm-eval
def test_config_prints_resolved_yaml_and_reference():
    result = run_cli("config", "train.lr=3e-5")
    assert result.returncode == 0 and "lr: 3.0e-05" in result.stdout
    reference = run_cli("config", "--reference").stdout
    job, experiment = reference.split("### An experiment")
    assert "| `train.micro_batch_tokens` |" in job and "| `output_dir` | `'runs/train'` |" in job
    experiment, strategy = experiment.split("### A strategy")
    strategy, mitigations = strategy.split("### Mitigations")
    assert "| `seeds` |" in experiment and "| `eval.batch_size` |" in experiment
    assert "| `output_dir` | `'runs/experiment'` |" in experiment and "`train.lr`" not in experiment
    assert "| `sweep` |" in strategy
    for key in ("ewc.strength", "lora.r", "replay.ratio", "wise_ft.alphas", "freeze.layers"):
        assert f"| `{key}` |" in mitigations


def test_data_command_shows_the_mask():
    result = run_cli("data", "data.limit=3", "data.format=chatml")
    assert result.returncode == 0, result.stderr
    assert "records 3, examples 3" in result.stdout and "[<|im_end|>]" in result.stdout


@pytest.mark.slow  # several processes, each importing torch, transformers and lm-eval
def test_eval_command_writes_results_and_never_overwrites_silently(tmp_path, tokenizer):
    from forgetting.harness.models import tiny_model

    checkpoint = tmp_path / "ckpt"
    tiny_model(len(tokenizer)).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    out = tmp_path / "results.json"
    args = [
        "eval",
        str(checkpoint),
        "--tasks",
        "forgetting_knowledge",
        "--limit",
        "2",
        "--output",
        str(out),
        "--no-cache",
    ]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "forgetting_knowledge" in first.stdout and out.is_file()
    before = out.read_text()
    again = run_cli(*args)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr and out.read_text() == before
    missing = run_cli("eval", str(tmp_path / "nope"), "--output", str(tmp_path / "x.json"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_readme_config_reference_is_the_generated_one():
    from pathlib import Path

    from forgetting.harness.commands import reference

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert reference() in readme, "README's config reference is stale: paste `forgetting config --reference`"
