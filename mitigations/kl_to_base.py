"""kl_to_base: keep the model's predictions close to the base model's on general data (LwF-style distillation).

Penalty each optimizer step: strength * mean over response positions of KL(p_base || p_current), on a
cycling batch of general examples (`data`, mitigations/general_data.py: self-synthesized rehearsal by default).
The base model is a frozen copy taken before training (twice the weight memory). On a sharded model
(train.distributed=fsdp) it is the base loaded again and sharded the same way, frozen: each process holds
its shard of both, never a whole model (LoRA and freezing leave the starting model's function unchanged,
so the loaded base is the model before training).

Step k's batch is a function of k (pool items k*batch_size ...), so a resumed run sees the batches the
uninterrupted run would have: `prepare` takes the step the loop resumes from, the newest complete checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from forgetting.harness.batching import collate
from forgetting.harness.configlib import knob
from forgetting.harness.loss import next_token_targets
from forgetting.harness.models import empty_model, load_model
from forgetting.harness.sharding import compute_dtype, is_sharded, shard_model
from forgetting.mitigations.general_data import GeneralData, general_examples, refuse_sft
from forgetting.mitigations.registry import register_mitigation


@dataclass
class KLToBaseConfig:
    strength: float = knob(0.1, "beta: weight of the KL term")
    data: GeneralData = knob(GeneralData(size=32), "the general examples the KL is taken on")
    batch_size: int = knob(4, "general examples per optimizer step")
    moved_keys: ClassVar[dict[str, str]] = {
        "source": "data.source",
        "pool_size": "data.size",
        "max_new_tokens": "data.max_new_tokens",
        "max_seq_len": "data.max_seq_len",
    }

    def __post_init__(self):
        if not self.strength >= 0:
            raise ValueError(f"strength: must be >= 0, got {self.strength}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {self.batch_size}")
        refuse_sft(self.data, "kl_to_base")


def logits_at_targets(model, batch):
    keep, _ = next_token_targets(batch["labels"])
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep, use_cache=False
    ).logits.float()


def kl_base_current(base_logits: torch.Tensor, current_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_base || p_current)."""
    return F.kl_div(
        F.log_softmax(current_logits, -1), F.log_softmax(base_logits, -1), log_target=True, reduction="batchmean"
    )


def own_forwards(copied: torch.nn.Module) -> torch.nn.Module:
    """`copied` with every module's instance-level `forward` removed, so each runs its class's forward.

    A forward set on an instance can close over the module it was set on (TRL's SFTTrainer replaces the model's
    forward by one that calls the original model's), and a deep copy keeps that reference: the frozen base would
    run the live model, its KL 0 whatever the training does."""
    for module in copied.modules():
        module.__dict__.pop("forward", None)
    return copied


@register_mitigation("kl_to_base", KLToBaseConfig)
class KLToBase:
    def __init__(self, config: KLToBaseConfig):
        self.config = config
        self.base = None
        self.pool: list = []
        self.counts: dict = {}
        self.step = 0  # the optimizer step the next penalty() call belongs to
        self.last = 0.0

    def prepare(self, model, ctx) -> None:
        cache = ctx.output_dir / "kl_to_base_self.jsonl"  # its own: replay's file may hold another pool
        self.pool, self.counts = general_examples(self.config.data, model, ctx, cache)
        self.base = self._frozen_base(model, ctx)
        self.step = ctx.start_step  # the loop calls penalty() once a step, from the step it resumes at

    @staticmethod
    def _frozen_base(model, ctx):
        if not is_sharded(model):
            return own_forwards(copy.deepcopy(model)).eval().requires_grad_(False)
        load = load_model if ctx.accelerator.is_main_process else empty_model  # the main process broadcasts
        base = load(ctx.job.model, vocab_size=len(ctx.tokenizer))
        base.config.use_cache = False
        base.eval().requires_grad_(False)
        return shard_model(base, ctx.accelerator.device, compute_dtype(ctx.accelerator))

    def _batch_at(self, step: int) -> list:
        """The general examples of optimizer step `step` (0-based): the pool read cyclically, batch after batch."""
        first = step * self.config.batch_size
        return [self.pool[(first + i) % len(self.pool)] for i in range(self.config.batch_size)]

    def penalty(self, model, ctx) -> torch.Tensor:
        picked = self._batch_at(self.step)
        self.step += 1
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in collate(picked, ctx.tokenizer.pad_token_id).items()}
        with torch.no_grad():
            base_logits = logits_at_targets(self.base, batch)
        kl = kl_base_current(base_logits, logits_at_targets(model, batch))
        self.last = kl.detach()  # read in report(): no host sync per step
        return self.config.strength * kl

    def report(self, model, ctx) -> dict:
        return {
            "strength": self.config.strength,
            "source": self.config.data.source,
            "pool": len(self.pool),
            **self.counts,
            "last_kl": float(self.last),
        }
