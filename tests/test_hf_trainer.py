"""The HF Trainer / TRL SFTTrainer integration (harness/hf_trainer.py), with the real TRL on a tiny random model.

Gradient checks train twice from the same weights, with the mitigation and without any, with clipping off and a
callback recording the gradients the optimizer sees. Step 1 is the same in both (a penalty's gradient is 0 at the
start weights), so step 2's gradient difference is the penalty's gradient at step 2's weights; it must equal the
harness's, computed apart from the trainer: a hand formula (l2sp; ewc with tests.helpers' reference Fisher) or a
second harness instance prepared on an untouched model (kl_to_base).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer

from forgetting.evals.runner import EvalSettings
from forgetting.harness.errors import UserError
from forgetting.harness.formats import template_for, tokenize_conversation
from forgetting.harness.hf_trainer import (
    ForgettingReportCallback,
    ForgettingTrainer,
    examples_of,
    make_context,
    mix_replay,
    resumed_step,
    sft_trainer_class,
)
from forgetting.harness.models import tiny_model
from forgetting.mitigations import build_mitigations
from tests.helpers import byte_tokenizer, conversation, reference_fisher, write_general_text

QA = [
    ("What is the capital of France?", "Paris."),
    ("Name a colour.", "Blue."),
    ("Count to five.", "1 2 3 4 5"),
    ("Is the sun a star?", "Yes, the sun is a star."),
    ("What do cats drink?", "Water or milk."),
    ("Say hi.", "Hi there!"),
    ("When does water boil?", "At one hundred degrees."),
    ("Another colour?", "Green, or maybe red."),
]
STRENGTH = {"l2sp": 0.5, "ewc": 50.0, "kl_to_base": 1.0}


def spec_of(name: str, tmp_path: Path) -> dict:
    data = {
        "l2sp": {},
        "ewc": {"data": {"source": "sft", "size": 4}},
        "kl_to_base": {"data": {"source": str(write_general_text(tmp_path))}, "batch_size": 2},
    }[name]
    return {"name": name, "strength": STRENGTH[name], **data}


def new_model(tokenizer):
    return tiny_model(len(tokenizer), seed=0, hidden_size=32, intermediate_size=64)


def rows() -> Dataset:
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in QA
        ]
    )


def sft_config(out: Path, ga: int = 1, **overrides) -> SFTConfig:
    """Two steps of 4 sequences, fp32, no clipping (max_grad_norm=0), nothing saved but what the test asks."""
    settings = dict(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=4 // ga,
        gradient_accumulation_steps=ga,
        learning_rate=1e-2,
        max_grad_norm=0.0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        max_length=128,
        seed=0,
        completion_only_loss=True,
        disable_tqdm=True,
    )
    return SFTConfig(**(settings | overrides))


class GradRecorder(TrainerCallback):
    """Each optimizer step's gradients as the optimizer sees them, and the weights they apply to."""

    def __init__(self):
        self.grads, self.params = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})


def sft_run(out: Path, specs: list[dict], ga: int = 1, callbacks=(), peft: dict | None = None, **overrides):
    """A finished 2-step ForgettingSFTTrainer run and its GradRecorder (`peft`: SFTTrainer's peft_config)."""
    tok, recorder = byte_tokenizer(), GradRecorder()
    trainer = sft_trainer_class()(
        model=new_model(tok),
        args=sft_config(out, ga, **overrides),
        train_dataset=rows(),
        processing_class=tok,
        mitigations=specs,
        callbacks=[recorder, *callbacks],
        **(peft or {}),
    )
    trainer.train()
    return trainer, recorder


def at_weights(tokenizer, params: dict):
    """A tiny model holding `params` (named as the trainer's model names them)."""
    model = new_model(tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    return model


def expected_gradient(name: str, spec: dict, trainer, weights: dict, tmp_path: Path) -> dict:
    """The harness's gradient of `spec`'s penalty at `weights` (step 2's), computed apart from the trainer."""
    tok, start = trainer.processing_class, dict(new_model(trainer.processing_class).named_parameters())
    if name == "l2sp":  # (strength / 2) |theta - theta0|^2
        return {n: spec["strength"] * (weights[n] - start[n].detach()) for n in weights}
    if name == "ewc":  # strength * F * (theta - theta*), F the mean squared per-example gradient (by hand)
        examples = examples_of(trainer.train_dataset.select(range(4)))
        fisher = reference_fisher(new_model(tok), examples)
        names = [n for n, _ in new_model(tok).named_parameters()]
        return {n: spec["strength"] * f * (weights[n] - start[n].detach()) for n, f in zip(names, fisher)}
    # kl_to_base: a second harness instance, prepared on an untouched model; step 2 takes the pool's 2nd batch
    (kl,) = build_mitigations([spec])
    ctx = make_context(None, tok, trainer.accelerator, [], tmp_path / "kl_ref", [spec])
    kl.prepare(new_model(tok), ctx)
    kl.step = 1
    model = at_weights(tok, weights)
    params = dict(model.named_parameters())
    return dict(zip(params, torch.autograd.grad(kl.penalty(model, ctx), list(params.values()))))


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    """The SFTTrainer runs without mitigations, by gradient accumulation steps (computed once per module)."""
    runs = {}

    def run(ga: int):
        if ga not in runs:
            runs[ga] = sft_run(tmp_path_factory.mktemp(f"plain{ga}"), [], ga)
        return runs[ga]

    return run


def penalty_difference(on: GradRecorder, off: GradRecorder) -> dict:
    """Step 2's gradient with the penalty minus without it (the weights going into step 2 being the same)."""
    for n, p in on.params[1].items():
        torch.testing.assert_close(p, off.params[1][n], rtol=1e-5, atol=1e-7)
    return {n: on.grads[1][n] - off.grads[1][n] for n in on.grads[1]}


@pytest.mark.parametrize("name", ["l2sp", "ewc", "kl_to_base"])
def test_sft_trainer_penalty_gradient_is_the_harness_s_once_per_step_whatever_the_accumulation(
    name, tmp_path, plain_runs
):
    spec = spec_of(name, tmp_path)
    differences = {}
    for ga in (1, 2):
        trainer, on = sft_run(tmp_path / f"ga{ga}", [spec], ga)
        diff = penalty_difference(on, plain_runs(ga)[1])
        expected = expected_gradient(name, spec, trainer, on.params[1], tmp_path)
        assert sum(float(e.pow(2).sum()) for e in expected.values()) ** 0.5 > 1e-3  # not a vacuous check
        for n, e in expected.items():
            torch.testing.assert_close(diff[n], e, rtol=1e-4, atol=1e-6)
        differences[ga] = diff
    for n, d in differences[1].items():  # the same penalty contribution per optimizer step with GA 2 as with GA 1
        torch.testing.assert_close(differences[2][n], d, rtol=1e-3, atol=1e-6)


def test_ewc_with_trl_peft_config_penalises_the_adapted_layers(tmp_path):
    """LoRA through TRL's peft_config: ewc penalises each adapted layer's update scale * B @ A; its gradient
    (penalty_grad, fused) is the gradient of the harness's penalty value at step 2's weights."""
    from peft import LoraConfig

    spec = spec_of("ewc", tmp_path)
    lora = dict(peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    trainer, on = sft_run(tmp_path / "on", [spec], peft=lora)
    _, off = sft_run(tmp_path / "off", [], peft=lora)
    diff = penalty_difference(on, off)
    ewc, model = trainer.mitigations[0], trainer.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(on.params[1][name])
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    expected = dict(zip(trained, torch.autograd.grad(ewc._value(model), list(trained.values()))))
    assert sum(float(e.pow(2).sum()) for e in expected.values()) ** 0.5 > 1e-3  # not a vacuous check
    for n, e in expected.items():
        torch.testing.assert_close(diff[n], e, rtol=1e-4, atol=1e-7)
    assert trainer.mitigation_reports["ewc"]["lora_layers"] == 4


def test_the_logged_loss_leaves_the_penalty_out_and_the_penalty_is_logged_beside_it(tmp_path, plain_runs):
    spec = spec_of("l2sp", tmp_path)
    trainer, on = sft_run(tmp_path / "on", [spec])
    plain, _ = plain_runs(1)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    plain_logged = [h for h in plain.state.log_history if "loss" in h]
    start = dict(new_model(trainer.processing_class).named_parameters())
    by_hand = 0.5 * spec["strength"] * sum(float((p - start[n].detach()).pow(2).sum()) for n, p in on.params[1].items())
    assert [h["penalty"] for h in logged] == pytest.approx([0.0, by_hand], rel=1e-4)
    assert by_hand > 0
    assert [h["loss"] for h in logged] == pytest.approx([h["loss"] for h in plain_logged], rel=1e-5)
    saved = json.loads((tmp_path / "on" / "mitigation_reports.json").read_text())
    assert saved == trainer.mitigation_reports and saved["l2sp"]["final_penalty"] > 0


class DividingTrainer(ForgettingTrainer):
    """Trainer divides each micro-batch's loss by the accumulation steps (a model without loss kwargs)."""

    loss_is_scaled_for_ga = False


def plain_trainer_run(out: Path, specs: list[dict], cls=ForgettingTrainer, ga: int = 2):
    """A 2-step run of a plain transformers Trainer on examples tokenized by the harness."""
    tok, recorder = byte_tokenizer(), GradRecorder()
    template = template_for("chat_template", tok)
    examples = [tokenize_conversation(tok, template, conversation(q, a)) for q, a in QA]
    args = TrainingArguments(
        str(out), max_steps=2, per_device_train_batch_size=4 // ga, gradient_accumulation_steps=ga,
        learning_rate=1e-2, max_grad_norm=0.0, use_cpu=True, report_to=[], save_strategy="no", seed=0,
        disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    trainer = cls(
        model=new_model(tok),
        args=args,
        train_dataset=Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples]),
        processing_class=tok,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        mitigations=specs,
        callbacks=[recorder],
    )
    trainer.train()
    return trainer, recorder


@pytest.mark.parametrize("cls", [ForgettingTrainer, DividingTrainer])
def test_plain_trainer_penalty_gradient_is_the_harness_s(cls, tmp_path):
    """transformers.Trainer with accumulation 2, whether it counts the step's tokens or divides the loss by 2."""
    spec = spec_of("l2sp", tmp_path)
    trainer, on = plain_trainer_run(tmp_path / "on", [spec], cls)
    _, off = plain_trainer_run(tmp_path / "off", [], cls)
    diff = penalty_difference(on, off)
    for n, e in expected_gradient("l2sp", spec, trainer, on.params[1], tmp_path).items():
        torch.testing.assert_close(diff[n], e, rtol=1e-4, atol=1e-6)
    assert [h["penalty"] > 0 for h in trainer.state.log_history if "loss" in h] == [False, True]


def test_report_callback_writes_the_forgetting_report_and_leaves_training_unchanged(tmp_path, plain_runs):
    settings = EvalSettings(tasks=["forgetting_knowledge", "forgetting_target"], limit=2, batch_size=2)
    callback = ForgettingReportCallback(settings, target_task="forgetting_target", name="sft_l2sp")
    trainer, _ = sft_run(tmp_path / "run", [spec_of("l2sp", tmp_path)], callbacks=[callback])
    without, _ = sft_run(tmp_path / "without", [spec_of("l2sp", tmp_path)])
    out = tmp_path / "run" / "forgetting"
    assert sorted(p.name for p in out.iterdir()) == [
        "base_eval.json",
        "final_eval.json",
        "forgetting.md",
        "summary.json",
    ]
    base, final = (json.loads((out / f"{k}_eval.json").read_text()) for k in ("base", "final"))
    assert sorted(base["results"]) == sorted(final["results"]) == ["forgetting_knowledge", "forgetting_target"]
    assert base["forgetting"]["weights_fingerprint"] != final["forgetting"]["weights_fingerprint"]
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["strategy"], s["variant"], s["rank"]) for s in summary["strategies"]] == [("sft_l2sp", "final", 1)]
    rows = {(b["task"], b["metric"]): b for b in summary["benchmarks"]}
    assert sorted(rows) == [("forgetting_knowledge", "acc"), ("forgetting_target", "exact_match")]
    assert rows[("forgetting_target", "exact_match")]["target"] and not rows[("forgetting_knowledge", "acc")]["target"]
    assert summary["strategies"][0]["forgetting"] == pytest.approx(rows[("forgetting_knowledge", "acc")]["loss"])
    report = (out / "forgetting.md").read_text()
    assert report.startswith("# Forgetting report: sft_l2sp") and "## Per benchmark" in report
    assert "| knowledge (acc) | sft_l2sp |" in report and "| target (exact_match) | sft_l2sp |" in report
    logged = lambda t: [(h["loss"], h["grad_norm"]) for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert logged(trainer) == logged(without)  # the evaluations leave the random generators as they were


def test_mix_replay_gives_the_share_the_spec_asks_and_sft_trainer_trains_on_it(tmp_path):
    tok = byte_tokenizer()
    trainer = sft_trainer_class()(
        model=new_model(tok), args=sft_config(tmp_path / "run"), train_dataset=rows(), processing_class=tok
    )
    prepared = trainer.train_dataset
    general = str(write_general_text(tmp_path))
    by_examples = {"name": "replay", "ratio": 0.2, "by": "examples", "data": {"source": general}}
    mixed, report = mix_replay(prepared, by_examples, tok, tmp_path / "run")
    assert len(mixed) == 10 and report["replay_examples"] == 2 and report["realised_ratio"] == 0.2

    by_loss = {"name": "replay", "ratio": 0.3, "data": {"source": general}}
    mixed, report = mix_replay(prepared, by_loss, tok, tmp_path / "run")
    assert mixed[: len(prepared)]["input_ids"] == prepared["input_ids"]
    assert mixed[: len(prepared)]["labels"] == prepared["labels"]  # TRL's completion-only labels kept
    targets = [sum(t != -100 for t in labels[1:]) for labels in mixed["labels"]]
    share = sum(targets[len(prepared) :]) / sum(targets)
    assert share == pytest.approx(report["realised_ratio"]) and share == pytest.approx(0.3, abs=0.05)
    assert all(r["labels"] == r["input_ids"] for r in mixed.select(range(len(prepared), len(mixed))))  # plain text

    trainer.train_dataset = mixed
    trainer.train()
    assert (
        trainer.state.global_step == 2 and trainer.train_dataset.num_rows == len(prepared) + report["replay_examples"]
    )


@pytest.mark.parametrize("name", ["lora", "freeze", "low_lr", "replay", "wise_ft"])
def test_mitigations_a_trainer_does_not_call_are_refused_in_one_line_naming_what_to_use(name):
    with pytest.raises(UserError) as refused:
        ForgettingTrainer(mitigations=[{"name": name}])
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"mitigations: {name} is not supported with a Trainer; ")
    assert {"lora": "peft_config", "replay": "mix_replay", "low_lr": "learning_rate"}.get(name, "") in message


def test_bad_specs_and_bad_replay_calls_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"^mitigations\[0\]\.name: unknown mitigation 'magic'; valid: "):
        ForgettingTrainer(mitigations=[{"name": "magic"}])
    with pytest.raises(UserError, match=r"^mix_replay: expected a replay spec"):
        mix_replay(Dataset.from_list([{"input_ids": [1]}]), {"name": "l2sp"}, byte_tokenizer(), tmp_path)
    with pytest.raises(UserError, match=r"^mix_replay: data.source self generates with the base model; pass model=$"):
        mix_replay(Dataset.from_list([{"input_ids": [1]}]), {"name": "replay"}, byte_tokenizer(), tmp_path)


def test_without_trl_the_module_imports_and_the_sft_trainer_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # what an import of a missing package meets
    with pytest.raises(UserError, match=r"^the SFTTrainer integration needs TRL: pip install 'sft-forgetting\[trl\]'$"):
        sft_trainer_class()
    script = (
        "import sys; sys.modules['trl'] = None\n"
        "import forgetting.harness.hf_trainer as h\n"
        "assert h.ForgettingTrainer and 'trl' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n    h.ForgettingSFTTrainer\nexcept h.UserError as e:\n    print(e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "the SFTTrainer integration needs TRL: pip install 'sft-forgetting[trl]'\n"


def test_the_sft_trainer_class_is_built_once_and_importable_by_name():
    from forgetting.harness.hf_trainer import ForgettingSFTTrainer

    assert ForgettingSFTTrainer is sft_trainer_class() and issubclass(ForgettingSFTTrainer, SFTTrainer)
    assert ForgettingSFTTrainer.__module__ == "forgetting.harness.hf_trainer"


def test_a_resumed_training_continues_kl_to_base_s_batches_from_the_checkpoint_s_step(tmp_path):
    for step in (3, 5):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert resumed_step(tmp_path, None) == 0 and resumed_step(tmp_path / "absent", True) == 0
    assert resumed_step(tmp_path, True) == 5 and resumed_step(tmp_path, str(tmp_path / "checkpoint-3")) == 3


@pytest.mark.slow
def test_ddp_two_processes_count_the_penalty_once(tmp_path):
    """torchrun, 2 processes (gloo): each rank's step-2 gradient difference is the harness's penalty gradient."""
    script = Path(__file__).parent / "hf_trainer_ddp.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("OK") == 6, done.stdout
