"""The systems the benchmarks compare, each as one ready-to-time optimizer step on the same data.

`make_step(system, setup, precision, lora)` returns a `Step`: a callable that runs forward + backward + clip +
AdamW for one optimizer step, plus the real and padded token counts it processes. Systems: `ours` (this
harness's loop), `hf_trainer` (transformers `Trainer` + `DataCollatorForSeq2Seq`, prompt labels -100) and
`trl` (TRL `SFTTrainer` with `completion_only_loss=True`). Every baseline is configured at its fair best on
a CPU: no gradient checkpointing (TRL's default is on), fused AdamW, one micro-batch per step, the same
gradient clipping; LoRA runs use the same peft config (r=16, alpha 32, all linear layers) everywhere.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch

BATCH = 16  # built-in-task conversations per optimizer step in every benchmark
SYSTEMS = ("ours", "hf_trainer", "trl")
LABELS = {"ours": "ours", "hf_trainer": "HF Trainer", "trl": "TRL SFTTrainer"}


@dataclass
class Step:
    run: Callable[[], None]
    tokens: int  # real (non-padding) tokens per step
    padded: int  # tokens including padding, as fed to the model
    rows: int  # rows per step (padded: one per sequence; packed: one)
    kept_positions: int  # positions projected to the vocabulary (ours: response positions only)
    attention_pairs: int  # query-key pairs the attention computes: sum over attention blocks of width^2
    tail_skipped: int = 0  # positions where the last layer's MLP and output projection do not run (harness.last_layer)


def embedded_setup(batch: int = BATCH, max_seq_len: int = 256):
    """(tokenizer with the chat-template format, the first `batch` built-in examples, the embedded model)."""
    from forgetting.harness.config import DataConfig, ModelConfig
    from forgetting.harness.data import load_conversations, tokenize_all
    from forgetting.harness.formats import attach_format
    from forgetting.harness.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    attach_format(tokenizer, "chat_template")
    config = DataConfig(limit=batch, max_seq_len=max_seq_len)
    examples, _ = tokenize_all(load_conversations(config), tokenizer, config)
    return tokenizer, examples, load_model(ModelConfig())


def autocast(precision: str):
    """bf16 autocast with fp32 master weights, as every system does it for `bf16=True` on a CPU."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def lora_config():
    from peft import LoraConfig

    from forgetting.mitigations.lora import ALL_LINEAR, LoraMitigationConfig

    ours = LoraMitigationConfig()
    return LoraConfig(
        r=ours.r, lora_alpha=ours.alpha, lora_dropout=ours.dropout, target_modules=ALL_LINEAR, task_type="CAUSAL_LM"
    )


def make_step(
    system: str,
    setup,
    precision: str = "fp32",
    lora: bool = False,
    gradient_checkpointing: bool = False,
    compile: bool = False,
) -> Step:
    """One optimizer step of `system`; `compile` runs its model through torch.compile (the first call compiles)."""
    builders = {"ours": _ours, "hf_trainer": _hf_trainer, "trl": _trl}
    return builders[system](setup, precision, lora, gradient_checkpointing, compile)


def harness_step(
    model,
    tokenizer,
    examples,
    precision: str = "fp32",
    packed: bool = True,
    micro_batch_tokens: int = 1 << 20,
    penalty=None,
    penalty_grad=None,
) -> Callable[[], None]:
    """One optimizer step of this harness's loop on `model` (its trainable parameters; AdamW, clipping).

    `penalty(model, ctx)` / `penalty_grad(model, ctx)` are mitigation hooks as the training loop calls them.
    Default: one micro-batch per step, as the baselines get; packed, as train.packing=auto is on a CPU; the
    last layer skipped where no logit is taken (harness.last_layer), as in the loop.
    """
    from accelerate import Accelerator

    from forgetting.harness import last_layer, packing
    from forgetting.harness.batching import target_tokens
    from forgetting.harness.config import TrainConfig
    from forgetting.harness.optim import make_optimizer
    from forgetting.harness.train import accumulate_gradients

    if packed:
        packing.enable(model)  # the benchmark's own copy stays packed
    last_layer.enable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer([{"params": params}], TrainConfig(lr=1e-5), torch.device("cpu"))
    accelerator = Accelerator(cpu=True)
    scale = 1 / target_tokens(examples)
    penalties = (lambda: [penalty(model, None)]) if penalty else list

    def run():
        with autocast(precision):
            accumulate_gradients(
                model,
                accelerator,
                examples,
                micro_batch_tokens,
                tokenizer.pad_token_id,
                scale,
                penalties,
                packed=packed,
            )
        if penalty_grad is not None:
            penalty_grad(model, None)
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def _ours(setup, precision, lora, gradient_checkpointing, compile) -> Step:
    from forgetting.harness import packing
    from forgetting.harness.batching import collate
    from forgetting.harness.loss import next_token_targets

    tokenizer, examples, base = setup
    model = copy.deepcopy(base)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config())
    if compile:
        model.compile()
    model.train()
    packed = not compile  # what train.packing=auto chooses on a CPU
    run = harness_step(model, tokenizer, examples, precision, packed=packed)
    skip_unread = not (compile or gradient_checkpointing)  # when harness.last_layer applies, for the FLOP count
    real = sum(len(e) for e in examples)
    if packed:
        kept = int(next_token_targets(packing.pack(examples)["labels"])[0].sum())
        return Step(run, real, real, 1, kept, sum(len(e) ** 2 for e in examples), (real - kept) * skip_unread)
    batch = collate(examples, tokenizer.pad_token_id)
    kept = int(next_token_targets(batch["labels"])[0].sum())
    rows, width = batch["input_ids"].shape
    padded = batch["input_ids"].numel()
    return Step(run, real, padded, rows, kept, rows * width * width, (padded - kept) * skip_unread)


def _trainer_step(trainer, batch, num_items, precision) -> Callable[[], None]:
    def run():
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which we bypass
        with autocast(precision):  # what accelerate's prepared model does for Trainer(bf16=True)
            trainer.training_step(trainer.model, batch, num_items)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return run


def _common_args(gradient_checkpointing):
    return dict(
        output_dir=tempfile.mkdtemp(prefix="bench-"),
        per_device_train_batch_size=BATCH,
        learning_rate=1e-5,
        bf16=False,
        fp16=False,
        gradient_checkpointing=gradient_checkpointing,
        report_to=[],
        use_cpu=True,
        max_grad_norm=1.0,
        save_strategy="no",
        dataloader_num_workers=0,
        optim="adamw_torch_fused",
    )


def _hf_trainer(setup, precision, lora, gradient_checkpointing, compile) -> Step:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer, examples, base = setup
    model = copy.deepcopy(base)
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config())
    if compile:
        model.compile()  # what TrainingArguments(torch_compile=True) does through accelerate
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    args = TrainingArguments(**_common_args(gradient_checkpointing))
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.create_optimizer()
    batch = next(iter(trainer.get_train_dataloader()))
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    return _trainer_timed_step(trainer, batch, num_items, precision)


def _trl(setup, precision, lora, gradient_checkpointing, compile) -> Step:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from forgetting.harness import builtin_task

    tokenizer, _, base = setup
    rows = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "completion": [{"role": "assistant", "content": r["response"]}],
        }
        for r in builtin_task.records("train")[:BATCH]
    ]
    args = SFTConfig(**_common_args(gradient_checkpointing), completion_only_loss=True, max_length=256, packing=False)
    trainer = SFTTrainer(
        model=copy.deepcopy(base),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config() if lora else None,
    )
    if compile:
        trainer.model.compile()
    trainer.create_optimizer()
    batch = next(iter(trainer.get_train_dataloader()))
    mask = batch.get("completion_mask", batch.get("assistant_masks"))
    num_items = int(mask.sum()) if mask is not None else None
    return _trainer_timed_step(trainer, batch, num_items, precision)


def _trainer_timed_step(trainer, batch, num_items, precision) -> Step:
    """A Trainer's step on one padded batch, with the batch's token counts (every row as wide as the longest)."""
    ids = batch["input_ids"]
    return Step(
        _trainer_step(trainer, batch, num_items, precision),
        int(batch["attention_mask"].sum()),
        ids.numel(),
        ids.shape[0],
        ids.numel(),
        ids.shape[0] * ids.shape[1] ** 2,
    )
