"""ewc: Elastic Weight Consolidation, penalty (strength / 2) * sum_i F_i (theta_i - theta*_i)^2.

The penalty enters training through its exact gradient, strength * F * (theta - theta*), added to the
parameters' gradients in two fused passes per step (`penalty_grad`); forming the value every step would cost
about 9x more on a 135M model. The value is computed for the report.

theta* are the trainable weights before training; F is a diagonal Fisher estimated on general data, as the
mean over examples of the squared gradient of each example's (per-token mean) log-likelihood. Not the square
of a minibatch's mean gradient, which underestimates F (the common bug). Estimators:
  empirical  gradients at the data's own labels;
  sampled    labels drawn from the model's predictive distribution at every response position, given the
             data prefix (the true Fisher, one sample per position).
F and theta* are saved to `output_dir/ewc_fisher.safetensors` and can be reused (`fisher_path`); with
`online_decay` the loaded F is decayed and the new estimate added (online EWC over sequential SFT stages).
Every report records estimator, sample count and normalisation beside the strength: it means nothing without them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from harness.batching import collate
from harness.configlib import knob
from harness.errors import UserError
from harness.formats import IGNORE_INDEX
from harness.loss import next_token_targets, summed_response_loss
from mitigations import register_mitigation


@dataclass
class EWCConfig:
    strength: float = knob(1.0, "lambda: weight of the Fisher-weighted squared distance to the start")
    estimator: Literal["empirical", "sampled"] = knob("empirical", "Fisher at the data's labels, or at labels sampled from the model")
    samples: int = knob(64, "examples the Fisher is averaged over")
    data: str = knob("self", "Fisher data: self (the model's answers to general prompts), sft, or a .txt/.jsonl text file")
    normalize: Literal["none", "mean", "max"] = knob("none", "divide F by its mean or max (then strength is scale-free)")
    fisher_path: Optional[str] = knob(None, "load F and theta* from this safetensors file instead of estimating")
    online_decay: Optional[float] = knob(None, "online EWC: F = decay * F(fisher_path) + new estimate, theta* = start")
    max_new_tokens: int = knob(128, "self data: answer length when synthesizing")
    max_seq_len: int = knob(512, "tokens per Fisher example")
    seed: int = knob(0, "seed of the sampled estimator")

    def __post_init__(self):
        if not self.strength >= 0:
            raise ValueError(f"strength: must be >= 0, got {self.strength}")
        if self.samples < 1:
            raise ValueError(f"samples: must be at least 1, got {self.samples}")
        if self.online_decay is not None and (self.fisher_path is None or not 0 <= self.online_decay <= 1):
            raise ValueError("online_decay: needs fisher_path and a value in [0, 1]")


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def sample_labels(model, batch: dict, generator: torch.Generator) -> dict:
    """The batch with every target replaced by a draw from the model's predictive distribution."""
    keep, _ = next_token_targets(batch["labels"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=keep, use_cache=False).logits
    drawn = torch.multinomial(torch.softmax(logits.float(), -1).cpu(), 1, generator=generator).squeeze(-1)
    labels = batch["labels"].clone()
    following = labels[:, 1:]
    following[following != IGNORE_INDEX] = drawn.to(labels.device)
    return dict(batch, labels=labels)


def estimate_fisher(model, examples: list, pad_id: int, estimator: str, seed: int = 0) -> list[torch.Tensor]:
    """Diagonal Fisher: mean over examples of the squared gradient of each example's mean token log-likelihood."""
    params = [p for _, p in trainable(model)]
    fisher = [torch.zeros_like(p) for p in params]
    device = params[0].device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deterministic model
    for example in examples:
        batch = {k: v.to(device) for k, v in collate([example], pad_id).items()}
        if estimator == "sampled":
            batch = sample_labels(model, batch, generator)
        targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        grads = torch.autograd.grad(summed_response_loss(model, batch) / max(1, targets), params, allow_unused=True)
        for total, grad in zip(fisher, grads):
            if grad is not None:
                total.addcmul_(grad, grad)
    model.train(was_training)
    return [f / len(examples) for f in fisher]


@register_mitigation("ewc", EWCConfig)
class EWC:
    def __init__(self, config: EWCConfig):
        self.config = config
        self.names: list[str] = []
        self.anchor: list[torch.Tensor] = []
        self.fisher: list[torch.Tensor] = []
        self.weighted_anchor: list[torch.Tensor] = []  # F * theta*, formed on first use
        self.used_samples = 0

    def _examples(self, model, ctx) -> list:
        from mitigations import rehearsal

        c = self.config
        if c.data == "sft":
            return list(ctx.examples[: c.samples])
        if c.data == "self":
            return rehearsal.self_rehearsal(model, ctx.tokenizer, ctx.job.data.format, c.samples, c.max_new_tokens,
                                            c.max_seq_len, ctx.output_dir / "ewc_self.jsonl")
        texts = rehearsal.read_texts(c.data, "train", "text", c.samples)
        return [rehearsal.text_example(ctx.tokenizer, t, c.max_seq_len) for t in texts]

    def _load(self, path: str) -> tuple[dict, dict]:
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise UserError(f"mitigations: ewc fisher_path {path} not found")
        tensors = load_file(path)
        fisher = {k[len("fisher."):]: v for k, v in tensors.items() if k.startswith("fisher.")}
        anchor = {k[len("anchor."):]: v for k, v in tensors.items() if k.startswith("anchor.")}
        if sorted(fisher) != sorted(self.names):
            raise UserError(f"mitigations: ewc fisher_path {path} holds other parameters than the trainable ones")
        return fisher, anchor

    def prepare(self, model, ctx) -> None:
        from safetensors.torch import save_file

        c = self.config
        named = trainable(model)
        self.names = [n for n, _ in named]
        self.anchor = [p.detach().clone() for _, p in named]
        loaded = self._load(c.fisher_path) if c.fisher_path else None
        if loaded is not None and c.online_decay is None:
            fisher, anchor = loaded
            self.fisher = [fisher[n].to(p.device) for n, p in named]
            self.anchor = [anchor[n].to(p.device) for n, p in named]
        else:
            examples = self._examples(model, ctx)
            self.used_samples = len(examples)
            self.fisher = estimate_fisher(model, examples, ctx.tokenizer.pad_token_id, c.estimator, c.seed)
            if loaded is not None:
                self.fisher = [c.online_decay * loaded[0][n].to(f.device) + f for n, f in zip(self.names, self.fisher)]
        if c.normalize != "none":
            flat = torch.cat([f.flatten() for f in self.fisher])
            scale = flat.mean() if c.normalize == "mean" else flat.max()
            self.fisher = [f / scale.clamp_min(1e-30) for f in self.fisher]
        if ctx.accelerator.is_main_process:
            ctx.output_dir.mkdir(parents=True, exist_ok=True)
            tensors = {f"fisher.{n}": f.cpu().contiguous() for n, f in zip(self.names, self.fisher)}
            tensors |= {f"anchor.{n}": a.cpu().contiguous() for n, a in zip(self.names, self.anchor)}
            save_file(tensors, str(ctx.output_dir / "ewc_fisher.safetensors"),
                      metadata={"config": json.dumps(c.__dict__), "samples": str(self.used_samples)})

    def value(self, model) -> torch.Tensor:
        """The penalty (strength / 2) * sum F (theta - theta*)^2 (for reports and tests; not formed per step)."""
        params = [p for p in model.parameters() if p.requires_grad]
        terms = [(f * (p - a).pow(2)).sum() for p, a, f in zip(params, self.anchor, self.fisher)]
        return 0.5 * self.config.strength * torch.stack(terms).sum()

    @torch.no_grad()
    def penalty_grad(self, model, ctx) -> None:
        """grad += strength * (F * theta - F * theta*): the penalty's exact gradient, two fused passes."""
        params = [p for p in model.parameters() if p.requires_grad]
        if len(self.weighted_anchor) != len(params):
            self.weighted_anchor = torch._foreach_mul(self.anchor, self.fisher)
        live = [i for i, p in enumerate(params) if p.grad is not None]
        grads = [params[i].grad for i in live]
        torch._foreach_addcmul_(grads, [self.fisher[i] for i in live], [params[i] for i in live],
                                value=self.config.strength)
        torch._foreach_add_(grads, [self.weighted_anchor[i] for i in live], alpha=-self.config.strength)

    def report(self, model, ctx) -> dict:
        flat = torch.cat([f.flatten() for f in self.fisher])
        with torch.no_grad():
            final = float(self.value(model))
        return {"strength": self.config.strength, "estimator": self.config.estimator,
                "samples": self.used_samples, "data": self.config.data, "normalize": self.config.normalize,
                "online_decay": self.config.online_decay, "fisher_mean": float(flat.mean()),
                "fisher_max": float(flat.max()), "final_penalty": final}
