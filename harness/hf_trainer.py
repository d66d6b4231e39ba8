"""The harness's mitigations and forgetting report inside Hugging Face `Trainer` and TRL's `SFTTrainer`.

For users who train with their own Trainer (TRL, LLaMA-Factory, unsloth) rather than `forgetting train`:

    ForgettingMixin            put before the Trainer class; `mitigations=[{name: ewc|l2sp|kl_to_base, ...}]`,
                               the harness's own specs and hook code: `prepare` before the first step, `penalty`
                               added to the loss on the last micro-batch of each optimizer step, `penalty_grad`
                               after that micro-batch's backward (before clipping), `report` after training
    ForgettingTrainer          ForgettingMixin + transformers.Trainer
    sft_trainer_class()        ForgettingMixin + trl.SFTTrainer (TRL is optional: imported only here)
    mix_replay                 replay's mixing on a tokenized dataset (input_ids, labels), e.g. SFTTrainer's own
    ForgettingReportCallback   the eval suite before and after training; the forgetting report in output_dir

The penalty is scaled so that Trainer's gradient-accumulation division leaves it counted once per optimizer step,
and it is not multiplied by the number of processes (DDP averages identical penalty gradients). The logged `loss`
is the training loss without the penalty; `penalty` is logged beside it (as `forgetting train` logs its loss).
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import get_last_checkpoint

from forgetting.evals.runner import EvalSettings, evaluate, save_results
from forgetting.harness.config import DataConfig, ModelConfig
from forgetting.harness.errors import UserError
from forgetting.harness.formats import Example
from forgetting.harness.io import atomic_write_json, atomic_write_text
from forgetting.harness.job import TrainJob
from forgetting.harness.train import TrainContext, random_state_kept
from forgetting.mitigations import HOOKS, build_mitigations, chain, hook_results
from forgetting.reports.forgetting import LOSS_TEXT, benchmark_table, strategy_table
from forgetting.reports.render import Section, to_markdown
from forgetting.reports.tidy import EXAMPLE_COLUMNS, SCORE_COLUMNS, example_rows, score_rows
from forgetting.reports.writer import benchmark_view, ranking_view

WIRED_HOOKS = ("prepare", "penalty", "penalty_grad", "report")  # the hooks a Trainer calls here
INSTEAD = {  # mitigations with other hooks (wrap_model, param_groups, mix_data, export): what to use instead
    "lora": "pass peft_config=LoraConfig(...) to TRL's SFTTrainer, or a peft model as model=",
    "freeze": "freeze parameters yourself before building the trainer (param.requires_grad_(False))",
    "low_lr": "set learning_rate in the trainer's arguments",
    "replay": "mix the data before training: trainer.train_dataset, report = mix_replay(trainer.train_dataset, ...)",
    "wise_ft": "it interpolates the harness's saved final model: use forgetting train / forgetting run",
}
TRL_MISSING = "the SFTTrainer integration needs TRL: pip install 'sft-forgetting[trl]'"


def refuse_unwired(mitigations: list) -> None:
    """A one-line UserError for the first mitigation with a hook a Trainer does not call here."""
    for m in mitigations:
        extra = [h for h in HOOKS if h not in WIRED_HOOKS and hasattr(m, h)]
        if extra:
            instead = INSTEAD.get(m.name, f"its hooks {', '.join(extra)} are not called by a Trainer")
            raise UserError(f"mitigations: {m.name} is not supported with a Trainer; {instead}")


def examples_of(rows) -> list[Example]:
    """Harness Examples from rows with `input_ids` and `labels` (-100: no loss; TRL's prepared dataset has
    both); a row without labels trains on every token."""
    return [Example(input_ids=list(r["input_ids"]), labels=list(r.get("labels") or r["input_ids"])) for r in rows]


def dataset_of(examples: list[Example]) -> Dataset:
    """A `datasets.Dataset` with `input_ids` and `labels` columns (SFTTrainer keeps a labels column as it is)."""
    return Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])


def make_context(model, tokenizer, accelerator, examples, output_dir, specs, start_step=0, data_format="chat_template"):
    """A harness TrainContext for hooks called from a Trainer. The job carries what the hooks read of it:
    `data.format` (the prompt format of self-rehearsal and conversation sources) and the mitigation specs."""
    name = getattr(model, "name_or_path", "") or ModelConfig().name_or_path
    job = TrainJob(
        model=ModelConfig(name_or_path=name),
        data=DataConfig(format=data_format),
        mitigations=list(specs),
        output_dir=str(output_dir),
    )
    return TrainContext(job, tokenizer, accelerator, tuple(examples), Path(output_dir), start_step)


def tokenizer_of(processing_class):
    """The tokenizer of a Trainer's processing_class (a processor holds one)."""
    return getattr(processing_class, "tokenizer", processing_class)


def mix_replay(dataset, spec: dict, tokenizer, output_dir, model=None, data_format: str = "chat_template"):
    """Replay's mixing (`mitigations/replay.py`) on a tokenized dataset with `input_ids` (and `labels`): returns
    (the dataset with replay examples appended, replay's report: realised shares, pool, counts). `spec` is a
    replay spec, `{name: replay, ratio: 0.2, data: {...}}`; `model` is needed for `data.source: self` (the base
    model answers the general prompts; answers are cached in output_dir). Mix before training, e.g. SFTTrainer's
    prepared dataset: `trainer.train_dataset, report = mix_replay(trainer.train_dataset, spec, tok, out, model)`."""
    if spec.get("name") != "replay":
        raise UserError(f"mix_replay: expected a replay spec ({{name: replay, ratio: 0.2}}), got {spec!r}")
    (replay,) = build_mitigations([spec])
    if replay.config.data.source == "self" and model is None:
        raise UserError("mix_replay: data.source self generates with the base model; pass model=")
    examples = examples_of(dataset)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    ctx = make_context(model, tokenizer, PartialState(), examples, output_dir, [spec], data_format=data_format)
    mixed = chain([replay], "mix_data", examples, model, ctx)
    return dataset_of(mixed), replay.report(model, ctx)


def resumed_step(output_dir, resume_from_checkpoint) -> int:
    """The optimizer step Trainer.train(resume_from_checkpoint=...) resumes at (0 when it starts afresh)."""
    checkpoint = resume_from_checkpoint
    if checkpoint is True:
        checkpoint = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if not checkpoint:
        return 0
    state = Path(checkpoint) / "trainer_state.json"
    return TrainerState.load_from_json(str(state)).global_step if state.is_file() else 0


class ForgettingMixin:
    """Mitigations in a Trainer: `class MyTrainer(ForgettingMixin, Trainer)`, then
    `MyTrainer(..., mitigations=[{"name": "ewc", "strength": 100.0}])`.

    `mitigations`: harness specs of ewc, l2sp or kl_to_base (validated by the registry; others are refused with
    what to use instead). `data_format`: the prompt format of their general data where it is formatted
    (`source: self`, `kind: conversations`): the tokenizer's own chat template by default. After training,
    `self.mitigation_reports` holds each one's report, also written to output_dir/mitigation_reports.json."""

    def __init__(self, *args, mitigations: list[dict] | None = None, data_format: str = "chat_template", **kwargs):
        self.mitigation_specs = list(mitigations or [])
        self.mitigations = build_mitigations(self.mitigation_specs)
        refuse_unwired(self.mitigations)
        self.data_format = data_format
        self.mitigation_ctx: TrainContext | None = None
        self.mitigation_reports: dict = {}
        self._penalties: list[torch.Tensor] = []  # each optimizer step's penalty since the last log
        self._step_penalty: torch.Tensor | None = None
        super().__init__(*args, **kwargs)
        if self.mitigations:
            self._refuse_setups()

    def _refuse_setups(self) -> None:
        """One-line errors for Trainer setups the hooks do not support."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise UserError("mitigations with a Trainer: FSDP and DeepSpeed are not supported (DDP is)")
        if self.model_init is not None:
            raise UserError("mitigations with a Trainer: pass model=, not model_init (the anchor is that model)")
        if self.args.fp16 and any(hasattr(m, "penalty_grad") for m in self.mitigations):
            raise UserError("mitigations: ewc adds its gradient after backward, unscaled: use bf16 or fp32, not fp16")
        if getattr(self.args, "packing", False) and self._sft_examples_needed():
            raise UserError("mitigations: ewc data.source sft with packing=True would see packed rows; use a file")

    def _sft_examples_needed(self) -> int:
        """How many SFT examples the mitigations read (ewc `data: {source: sft, size: N}`)."""
        datas = [getattr(m.config, "data", None) for m in self.mitigations]
        return max([d.size for d in datas if d is not None and d.source == "sft"], default=0)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.mitigations and self.mitigation_ctx is None:
            self._prepare_mitigations(resumed_step(self.args.output_dir, resume_from_checkpoint))
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.mitigations:
            self._write_reports()
        return output

    def _prepare_mitigations(self, start_step: int) -> None:
        """`prepare` on the model as passed in (anchors = its weights), random generators kept as they were."""
        model = self.accelerator.unwrap_model(self.model)
        tokenizer = tokenizer_of(self.processing_class)
        if tokenizer is None or tokenizer.pad_token_id is None:
            raise UserError("mitigations with a Trainer: pass processing_class= a tokenizer with a pad token")
        wanted = self._sft_examples_needed()
        rows = itertools.islice(self.train_dataset, wanted) if wanted else []
        examples = examples_of(rows)
        self.mitigation_ctx = make_context(
            model,
            tokenizer,
            self.accelerator,
            examples,
            self.args.output_dir,
            self.mitigation_specs,
            start_step,
            self.data_format,
        )
        Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
        with random_state_kept():  # training is the same as without the hooks' sampling
            hook_results(self.mitigations, "prepare", model, self.mitigation_ctx)

    def _write_reports(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        names = [m.name for m in self.mitigations if hasattr(m, "report")]
        self.mitigation_reports = dict(zip(names, hook_results(self.mitigations, "report", model, self.mitigation_ctx)))
        if self.args.should_save:
            atomic_write_json(Path(self.args.output_dir) / "mitigation_reports.json", self.mitigation_reports)

    def _ga_factor(self, num_items_in_batch) -> float:
        """What Trainer.training_step divides this micro-batch's loss by (1 when the loss counts the step's
        tokens already): the penalty is multiplied by it, so the step's gradient holds it once."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return 1.0 if scaled else float(self.current_gradient_accumulation_steps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        self._step_penalty = None
        if not (model.training and self.mitigation_ctx is not None and self.accelerator.sync_gradients):
            return result  # evaluation, or not the step's last micro-batch
        terms = hook_results(self.mitigations, "penalty", self.accelerator.unwrap_model(model), self.mitigation_ctx)
        if not terms:
            return result
        penalty = sum(terms)
        self._step_penalty = penalty.detach()
        loss, rest = (result[0], result[1:]) if return_outputs else (result, ())
        loss = loss + penalty * self._ga_factor(num_items_in_batch)
        return (loss, *rest) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.mitigation_ctx is None or not self.accelerator.sync_gradients:
            return loss
        hook_results(self.mitigations, "penalty_grad", self.accelerator.unwrap_model(model), self.mitigation_ctx)
        if self._step_penalty is None:
            return loss
        self._penalties.append(self._step_penalty)
        return loss - self._step_penalty.to(loss)  # the logged loss leaves the penalty out

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._penalties and "loss" in logs:
            logs = {**logs, "penalty": torch.stack(self._penalties).mean().item()}
            self._penalties = []
        super().log(logs, *args, **kwargs)


class ForgettingTrainer(ForgettingMixin, Trainer):
    """transformers.Trainer with the harness's mitigations (`mitigations=[...]`, see ForgettingMixin)."""


@functools.cache
def _with_mixin(base: type) -> type:
    name = f"Forgetting{base.__name__}"
    doc = (
        f"{base.__module__}.{base.__name__} with the harness's mitigations (`mitigations=[...]`, see ForgettingMixin)."
    )
    return type(name, (ForgettingMixin, base), {"__module__": __name__, "__qualname__": name, "__doc__": doc})


def sft_trainer_class() -> type:
    """`ForgettingSFTTrainer`: trl.SFTTrainer with ForgettingMixin (also importable under that name from here)."""
    try:
        from trl import SFTTrainer
    except ModuleNotFoundError as err:
        if err.name != "trl":
            raise
        raise UserError(TRL_MISSING) from None
    return _with_mixin(SFTTrainer)


def __getattr__(name: str):
    if name == "ForgettingSFTTrainer":  # built on first use, so that importing this module needs no TRL
        return sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ReportTargets:
    """What reports.forgetting reads of an experiment: each task's compared metric and the target tasks."""

    primary_metrics: dict
    target_tasks: list


def tidy_tables(base: dict, final: dict, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """reports.tidy's score and example tables of one fine-tune: the base model and the trained one (seed 0)."""
    base_labels = dict(model="base", unit="base", strategy="base", family="base", seed=-1, variant="base", alpha=0.0)
    tuned_labels = dict(model="tuned", unit=name, strategy=name, family=name, seed=0, variant="final", alpha=1.0)
    keys = ("model", "unit", "strategy", "seed", "variant")
    scores = score_rows(base, base_labels) + score_rows(final, tuned_labels)
    examples = example_rows(base, {k: base_labels[k] for k in keys})
    examples += example_rows(final, {k: tuned_labels[k] for k in keys})
    return pd.DataFrame(scores, columns=SCORE_COLUMNS), pd.DataFrame(examples, columns=EXAMPLE_COLUMNS)


def _records(table: pd.DataFrame) -> list[dict]:
    return json.loads(table.to_json(orient="records")) if not table.empty else []


REPORT_TEXT = {
    "Forgetting": "Forgetting is the mean of the general (non-target) benchmarks' losses (the 'loss' column of Per "
    "benchmark). " + LOSS_TEXT + " Target gain: the target metric's change in its good direction.",
    "Per benchmark": "Base and after scores; delta = after − base, its CI a paired bootstrap over examples; "
    "'stderr CI' from lm-eval's stderrs; 'forgot' / 'learned': the share of good base outcomes now bad / of bad "
    "ones now good.",
}


def write_forgetting_report(
    out: Path, base: dict, final: dict, target_task=None, name="sft", primary_metrics=None, bootstrap_iters=2000
) -> Path:
    """The forgetting report of one fine-tune from its evaluations before and after training, with the tables of
    `forgetting report` (reports.forgetting): out/forgetting.md, out/summary.json, out/base_eval.json and
    out/final_eval.json. `target_task`: the evaluated task that measures what the fine-tune teaches (or None)."""
    if target_task is not None and target_task not in base.get("results", {}):
        raise UserError(f"target_task {target_task!r} was not evaluated; evaluated: {', '.join(base['results'])}")
    scores, examples = tidy_tables(base, final, name)
    targets = ReportTargets(dict(primary_metrics or {}), [target_task] if target_task else [])
    benchmarks = benchmark_table(scores, examples, targets, iters=bootstrap_iters)
    summary = strategy_table(benchmarks, scores, targets)
    save_results(base, out / "base_eval.json", overwrite=True)
    save_results(final, out / "final_eval.json", overwrite=True)
    settings = final.get("forgetting", {}).get("settings")
    atomic_write_json(
        out / "summary.json",
        {
            "name": name,
            "target_task": target_task,
            "settings": settings,
            "strategies": _records(summary),
            "benchmarks": _records(benchmarks),
        },
    )
    sections = [
        Section("Forgetting", REPORT_TEXT["Forgetting"], ranking_view(summary) if not summary.empty else None),
        Section("Per benchmark", REPORT_TEXT["Per benchmark"], benchmark_view(benchmarks) if len(benchmarks) else None),
    ]
    atomic_write_text(out / "forgetting.md", to_markdown(f"Forgetting report: {name}", sections, {}))
    return out


class ForgettingReportCallback(TrainerCallback):
    """Evaluate the harness's suite (`settings`) on the model before the first step and after the last, and
    write the forgetting report into args.output_dir/forgetting (see write_forgetting_report). Runs on the main
    process; the random generators are put back after each evaluation, so training is the same with or without
    it. `cache_dir`: the evaluation cache (`forgetting.harness.io.cache_root() / "eval"` is the harness's)."""

    def __init__(
        self,
        settings: EvalSettings | None = None,
        target_task: str | None = None,
        name: str = "sft",
        primary_metrics: dict | None = None,
        cache_dir: Path | None = None,
        bootstrap_iters: int = 2000,
    ):
        self.settings = settings or EvalSettings()
        self.target_task, self.name, self.primary_metrics = target_task, name, primary_metrics
        self.cache_dir, self.bootstrap_iters = cache_dir, bootstrap_iters
        self.base: dict | None = None
        self.final: dict | None = None

    def _evaluate(self, model, processing_class) -> dict:
        with random_state_kept(), torch.no_grad():
            return evaluate(model, tokenizer_of(processing_class), self.settings, cache_dir=self.cache_dir)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.is_world_process_zero and self.base is None:
            self.base = self._evaluate(model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero:
            return
        self.final = self._evaluate(model, processing_class)
        out = Path(args.output_dir) / "forgetting"
        write_forgetting_report(
            out, self.base, self.final, self.target_task, self.name, self.primary_metrics, self.bootstrap_iters
        )
