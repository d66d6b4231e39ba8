"""Tokens/s of one SFT optimizer step on the embedded SmolLM2-135M: this harness vs HF Trainer vs TRL SFTTrainer.

All three train the same 16 built-in-task conversations per step (response-only loss, no gradient
checkpointing, fused AdamW, grad clipping): each baseline at its fair best on this CPU, not TRL's
checkpointing default. Each runs in fp32 and with bf16 autocast (fp32 master weights), and is compared with
ours at the same precision. A round is forward + backward + clip + optimizer step. The ratio table is printed at
the end and saved to .benchmarks/step_throughput.json; BENCHMARKS.md records the numbers.

    tox -e bench        (or: pytest benchmarks -s)
"""

from __future__ import annotations

import copy

import pytest
import torch

from harness import builtin_task
from harness.batching import target_tokens
from benchmarks.conftest import BATCH

ROUNDS = 5


@pytest.fixture
def setup(embedded_batch):
    return embedded_batch


PRECISIONS = ["fp32", "bf16"]


def autocast(precision):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def record(results, name, benchmark, tokens, padded):
    seconds = benchmark.stats.stats.median
    results[name] = {"tokens_per_s": tokens / seconds, "seconds_per_step": seconds, "tokens": tokens,
                     "padding_fraction": 1 - tokens / padded}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ours(benchmark, setup, results, precision):
    from accelerate import Accelerator

    from harness.config import TrainConfig
    from harness.train import accumulate_gradients, make_optimizer

    tokenizer, examples, base = setup
    model = copy.deepcopy(base).train()
    optimizer = make_optimizer([{"params": list(model.parameters())}], TrainConfig(lr=1e-5), torch.device("cpu"))
    accelerator = Accelerator(cpu=True)
    scale = 1 / target_tokens(examples)
    padded = {}

    def step():
        with autocast(precision):
            _, padded["n"], _ = accumulate_gradients(model, accelerator, examples, 4096, tokenizer.pad_token_id,
                                                     scale, lambda: [])
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record(results, f"ours {precision}", benchmark, sum(len(e) for e in examples), padded["n"])


def _trainer_step(trainer, batch, num_items, precision):
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which we bypass
    with autocast(precision):  # what accelerate's prepared model does for Trainer(bf16=True)
        trainer.training_step(trainer.model, batch, num_items)
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_hf_trainer(benchmark, setup, results, tmp_path, precision):
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer, examples, base = setup
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, learning_rate=1e-5,
                             bf16=False, fp16=False, gradient_checkpointing=False, report_to=[], use_cpu=True,
                             max_grad_norm=1.0, save_strategy="no", dataloader_num_workers=0)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=copy.deepcopy(base), args=args, train_dataset=dataset, data_collator=collator)
    trainer.create_optimizer()
    batch = next(iter(trainer.get_train_dataloader()))
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    benchmark.pedantic(_trainer_step, args=(trainer, batch, num_items, precision), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record(results, f"HF Trainer {precision}", benchmark, int(batch["attention_mask"].sum()), batch["input_ids"].numel())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_trl_sft_trainer(benchmark, setup, results, tmp_path, precision):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer, _, base = setup
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["response"]}]}
            for r in builtin_task.records("train")[:BATCH]]
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, learning_rate=1e-5,
                     bf16=False, fp16=False, gradient_checkpointing=False, report_to=[], use_cpu=True,
                     completion_only_loss=True, max_length=256, packing=False, max_grad_norm=1.0,
                     save_strategy="no", dataloader_num_workers=0)
    trainer = SFTTrainer(model=copy.deepcopy(base), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    trainer.create_optimizer()
    batch = next(iter(trainer.get_train_dataloader()))
    mask = batch.get("completion_mask", batch.get("assistant_masks"))
    num_items = int(mask.sum()) if mask is not None else None
    benchmark.pedantic(_trainer_step, args=(trainer, batch, num_items, precision), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record(results, f"TRL SFTTrainer {precision}", benchmark, int(batch["attention_mask"].sum()), batch["input_ids"].numel())
