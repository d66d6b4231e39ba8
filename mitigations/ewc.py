"""ewc: Elastic Weight Consolidation, penalty (strength / 2) * sum_i F_i (theta_i - theta*_i)^2.

The penalty enters training through its exact gradient, strength * F * (theta - theta*), added to the
parameters' gradients in two fused passes per step (`penalty_grad`); forming the value every step would cost
about 9x more on a 135M model. The value is computed for the report.

theta* are the trainable weights before training; F is a diagonal Fisher estimated on general data (`data`,
mitigations/general_data.py, or `source: sft`: the first SFT examples), as the mean over examples of the
squared gradient of each example's (per-token mean) log-likelihood. Not the square of a minibatch's mean
gradient, which underestimates F (the common bug). Estimators:
  empirical  gradients at the data's own labels;
  sampled    labels drawn from the model's predictive distribution at every response position, given the
             data prefix (the true Fisher, one sample per position).
F and theta* are saved to `output_dir/ewc_fisher.safetensors` and can be reused (`fisher_path`); with
`online_decay` the loaded F is decayed and the new estimate added (online EWC over sequential SFT stages).
The file holds the raw F: `normalize` divides only the F in use, after any combining, so a normalised run's
file mixes with a new estimate in the documented proportion.

With LoRA the penalised weight of an adapted linear layer is its effective weight W + scale * B @ A: F is the
base model's Fisher of W (estimated before training, while B = 0 makes the adapted model the base model), the
penalty (strength / 2) sum F (scale * B @ A)^2, and its exact gradient reaches B and A through delta W. (The
Fisher of the factors themselves would leave A unconstrained: at B = 0 its gradient is exactly 0.)
On a sharded model (train.distributed=fsdp) F and theta* are kept as shards, as the parameters are: each
process estimates the Fisher of its own shards, adds the gradient of its own shards and saves nothing until
the file is written, gathered one tensor at a time. Per-example gradients of a sharded model come from a
backward pass that every process runs on the same example (its reduce-scatter averages identical gradients),
so the estimate costs as much as on one process. With LoRA the base weights are frozen shards: their Fisher
is estimated on the base model loaded a second time, sharded, with gradients for those weights only (at B = 0
it is the adapted model), then freed; the penalty's gradient is formed from each process's rows of W, B and
F with A gathered (r x in: small), dA summed over the processes.
Every report records estimator, sample count and normalisation beside the strength: it means nothing without them.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch
from peft.tuners.lora import Linear as LoraLinear
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from forgetting.harness.batching import collate
from forgetting.harness.configlib import knob
from forgetting.harness.errors import UserError
from forgetting.harness.formats import IGNORE_INDEX
from forgetting.harness.loss import next_token_targets, summed_response_loss
from forgetting.harness.models import empty_model, load_model
from forgetting.harness.sharding import (
    add_to_grad,
    compute_dtype,
    full,
    gather_like,
    global_stats,
    is_sharded,
    local,
    local_sum,
    shard_like,
    shard_model,
)
from forgetting.mitigations.general_data import GeneralData, general_examples
from forgetting.mitigations.registry import register_mitigation


@dataclass
class EWCConfig:
    strength: float = knob(1.0, "lambda: weight of the Fisher-weighted squared distance to the start")
    estimator: Literal["empirical", "sampled"] = knob(
        "empirical", "Fisher at the data's labels, or at labels sampled from the model"
    )
    data: GeneralData = knob(GeneralData(), "the examples the Fisher is averaged over")
    normalize: Literal["none", "mean", "max"] = knob(
        "none", "divide F by its mean or max (then strength is scale-free)"
    )
    fisher_path: Optional[str] = knob(None, "load F and theta* from this safetensors file instead of estimating")
    online_decay: Optional[float] = knob(None, "online EWC: F = decay * F(fisher_path) + new estimate, theta* = start")
    seed: int = knob(0, "seed of the sampled estimator")
    moved_keys: ClassVar[dict[str, str]] = {
        "samples": "data.size",
        "max_new_tokens": "data.max_new_tokens",
        "max_seq_len": "data.max_seq_len",
    }

    def __post_init__(self):
        if not self.strength >= 0:
            raise ValueError(f"strength: must be >= 0, got {self.strength}")
        if self.online_decay is not None and (self.fisher_path is None or not 0 <= self.online_decay <= 1):
            raise ValueError("online_decay: needs fisher_path and a value in [0, 1]")


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def lora_factors(layer) -> list[torch.nn.Parameter]:
    return [f for a in layer.active_adapters for f in (layer.lora_A[a].weight, layer.lora_B[a].weight)]


def lora_delta(layer) -> torch.Tensor:
    """scale * B @ A summed over the active adapters, in the layout of the base weight: of a sharded layer, this
    process's rows of it (its rows of B times the whole A, gathered)."""
    delta = sum(
        layer.scaling[a] * (local(layer.lora_B[a].weight) @ full(layer.lora_A[a].weight)) for a in layer.active_adapters
    )
    return delta.T if layer.fan_in_fan_out else delta


def base_name(name: str) -> str:
    """The base model's name of a penalised weight of a PEFT model (its base layer, or a module saved in full)."""
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


def penalised(model) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Module]]]:
    """What EWC penalises, in a fixed order: the trainable parameters other than LoRA factors, and the LoRA
    linear layers (their effective weight, named after the base weight)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    factors = {id(f) for _, m in layers for f in lora_factors(m)}
    plain = [(n, p) for n, p in trainable(model) if id(p) not in factors]
    if any("lora_" in n for n, _ in plain):
        raise UserError(
            "mitigations: ewc supports LoRA on linear layers only (these adapters are not: "
            f"{next(n for n, _ in plain if 'lora_' in n)})"
        )
    return plain, [(f"{n}.base_layer.weight", m) for n, m in layers]


def sample_labels(model, batch: dict, generator: torch.Generator) -> dict:
    """The batch with every target replaced by a draw from the model's predictive distribution."""
    keep, _ = next_token_targets(batch["labels"])
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep, use_cache=False
        ).logits
    drawn = torch.multinomial(torch.softmax(logits.float(), -1).cpu(), 1, generator=generator).squeeze(-1)
    labels = batch["labels"].clone()
    following = labels[:, 1:]
    following[following != IGNORE_INDEX] = drawn.to(labels.device)
    return dict(batch, labels=labels)


def estimate_fisher(
    model, examples: list, pad_id: int, estimator: str, seed: int = 0, params: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Diagonal Fisher: mean over examples of the squared gradient of each example's mean token log-likelihood.

    Of `params` (default: the trainable parameters); each must require grad.
    """
    params = params if params is not None else [p for _, p in trainable(model)]
    fisher = [torch.zeros_like(local(p)) for p in params]
    device = local(params[0]).device
    sharded = is_sharded(model)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deterministic model
    for example in examples:
        batch = {k: v.to(device) for k, v in collate([example], pad_id).items()}
        if estimator == "sampled":
            batch = sample_labels(model, batch, generator)
        targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = summed_response_loss(model, batch) / max(1, targets)
        grads = _shard_grads(loss, params) if sharded else torch.autograd.grad(loss, params, allow_unused=True)
        for total, grad in zip(fisher, grads):
            if grad is not None:
                total.addcmul_(grad, grad)
    model.train(was_training)
    return [f / len(examples) for f in fisher]


def _shard_grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """This process's shard of the gradient of `loss` (a sharded model's gradients arrive through backward)."""
    loss.backward()
    grads = [None if p.grad is None else local(p.grad) for p in params]
    for p in params:
        p.grad = None
    return grads


@register_mitigation("ewc", EWCConfig)
class EWC:
    def __init__(self, config: EWCConfig):
        self.config = config
        # aligned lists over the penalised weights, in `penalised(model)` order: plain parameters, then LoRA layers
        self.names: list[str] = []
        self.anchor: list[torch.Tensor] = []
        self.fisher: list[torch.Tensor] = []
        self.weighted_anchor: list[torch.Tensor] = []  # F * theta* of the plain parameters, formed on first use
        self.params: list[torch.nn.Parameter] = []  # what `penalised` found in prepare (the same objects after
        self.layers: list[torch.nn.Module] = []  # DDP wrapping or compiling), so no step walks the modules
        self.used_samples = 0
        self.data_counts: dict = {}  # self: answers finished / cut at max_new_tokens; text: texts cut

    def _load(self, path: str) -> tuple[dict, dict]:
        if not Path(path).is_file():
            raise UserError(f"mitigations: ewc fisher_path {path} not found")
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
        saved_normalize = json.loads(metadata.get("config", "{}")).get("normalize", "none")
        if self.config.online_decay is not None and metadata.get("fisher") != "raw" and saved_normalize != "none":
            raise UserError(
                f"mitigations: ewc fisher_path {path} holds a normalised Fisher (saved by an older "
                f"version), which cannot be combined with a new estimate; re-estimate it"
            )
        tensors = load_file(path)
        fisher = {k[len("fisher.") :]: v for k, v in tensors.items() if k.startswith("fisher.")}
        anchor = {k[len("anchor.") :]: v for k, v in tensors.items() if k.startswith("anchor.")}
        if sorted(fisher) != sorted(self.names):
            raise UserError(f"mitigations: ewc fisher_path {path} holds other parameters than the trainable ones")
        return fisher, anchor

    def prepare(self, model, ctx) -> None:
        c = self.config
        plain, layers = penalised(model)
        if is_sharded(model) and any(m.fan_in_fan_out for _, m in layers):
            raise UserError("mitigations: ewc with fan-in-fan-out LoRA layers (GPT-2 Conv1D) is not supported sharded")
        self.params, self.layers = [p for _, p in plain], [m for _, m in layers]
        self.names = [n for n, _ in plain] + [n for n, _ in layers]
        weights = [p for _, p in plain] + [m.base_layer.weight for _, m in layers]
        # theta*: a copy of each trained parameter (shard); a LoRA layer's base weight itself (frozen: stays W)
        self.anchor = [local(p).detach().clone() for _, p in plain]
        self.anchor += [local(m.base_layer.weight).detach() for _, m in layers]
        loaded = self._load(c.fisher_path) if c.fisher_path else None
        if loaded is not None and c.online_decay is None:
            fisher, anchor = loaded
            self.fisher = [shard_like(fisher[n], w) for n, w in zip(self.names, weights)]
            self.anchor = [shard_like(anchor[n], w) for n, w in zip(self.names, weights)]
        else:
            examples, self.data_counts = general_examples(c.data, model, ctx, ctx.output_dir / "ewc_self.jsonl")
            self.used_samples = len(examples)
            self.fisher = self._estimate(model, ctx, examples, weights, [m for _, m in layers])
            if loaded is not None:
                old = [shard_like(loaded[0][n], w) for n, w in zip(self.names, weights)]
                self.fisher = [c.online_decay * o + f for o, f in zip(old, self.fisher)]
        self._save(ctx, weights)  # the raw F: a later online stage combines raw with raw
        if c.normalize != "none":
            mean, largest = global_stats(self.fisher, model)
            scale = torch.tensor(mean if c.normalize == "mean" else largest).clamp_min(1e-30)
            self.fisher = [f / scale for f in self.fisher]

    def _estimate(self, model, ctx, examples: list, weights: list, layers: list) -> list[torch.Tensor]:
        """F of `weights`. A LoRA layer's base weight takes a gradient only while this runs (at B = 0 the adapted
        model is the base model); a sharded model's frozen shards take none, so there the base is loaded again."""
        c = self.config
        if layers and is_sharded(model):
            return self._base_fisher(ctx, examples)
        frozen = [m.base_layer.weight for m in layers]
        for w in frozen:
            w.requires_grad_(True)
        try:
            return estimate_fisher(model, examples, ctx.tokenizer.pad_token_id, c.estimator, c.seed, params=weights)
        finally:
            for w in frozen:
                w.requires_grad_(False)

    def _base_fisher(self, ctx, examples: list) -> list[torch.Tensor]:
        """F of the penalised weights, estimated on the base model sharded the same way (then freed)."""
        load = load_model if ctx.accelerator.is_main_process else empty_model  # the main process broadcasts
        base = load(ctx.job.model, vocab_size=len(ctx.tokenizer))
        base.config.use_cache = False
        wanted = {base_name(n) for n in self.names}
        base.requires_grad_(False)
        for name, param in base.named_parameters(remove_duplicate=False):
            if name in wanted:
                param.requires_grad_(True)
        shard_model(base, ctx.accelerator.device, compute_dtype(ctx.accelerator))
        params = dict(base.named_parameters(remove_duplicate=False))
        if wanted - set(params):
            raise UserError(f"mitigations: ewc cannot find {sorted(wanted - set(params))[0]} in the base model")
        c = self.config
        order = [params[base_name(n)] for n in self.names]
        return estimate_fisher(base, examples, ctx.tokenizer.pad_token_id, c.estimator, c.seed, params=order)

    def _save(self, ctx, weights: list[torch.Tensor]) -> None:
        """F and theta* as `output_dir/ewc_fisher.safetensors`, whole tensors (gathered one at a time)."""
        tensors = {}
        for name, weight, fisher, anchor in zip(self.names, weights, self.fisher, self.anchor):
            tensors[f"fisher.{name}"] = gather_like(fisher, weight).cpu().contiguous()
            tensors[f"anchor.{name}"] = gather_like(anchor, weight).cpu().contiguous()
        if ctx.accelerator.is_main_process:
            ctx.output_dir.mkdir(parents=True, exist_ok=True)
            metadata = {"config": json.dumps(asdict(self.config)), "samples": str(self.used_samples), "fisher": "raw"}
            save_file(tensors, str(ctx.output_dir / "ewc_fisher.safetensors"), metadata=metadata)

    @staticmethod
    def _lora_diff(layer, anchor: torch.Tensor) -> torch.Tensor:
        """Effective weight minus theta*: scale * B @ A, plus W - theta* where theta* is not W itself (loaded)."""
        weight = local(layer.base_layer.weight)
        delta = lora_delta(layer)
        return delta if anchor.data_ptr() == weight.data_ptr() else delta + (weight - anchor)

    def _value(self, model) -> torch.Tensor:
        """The penalty (strength / 2) * sum F (theta - theta*)^2 (for reports and tests; not formed per step)."""
        k = len(self.params)
        terms = [(f * (local(p) - a).pow(2)).sum() for p, a, f in zip(self.params, self.anchor, self.fisher)]
        terms += [
            (f * self._lora_diff(m, a).pow(2)).sum() for m, a, f in zip(self.layers, self.anchor[k:], self.fisher[k:])
        ]
        return 0.5 * self.config.strength * torch.stack(terms).sum()

    @torch.no_grad()
    def penalty_grad(self, model, ctx) -> None:
        """grad += the penalty's exact gradient.

        Plain parameters: strength * (F * theta - F * theta*), two fused passes. LoRA layers: with
        G = strength * F * delta W (in B @ A's layout), dB = scale * G @ A^T and dA = scale * B^T @ G (sharded:
        each process's rows of G and B, dA summed over the processes, each keeping its rows of it).
        """
        params, k, lam = self.params, len(self.params), self.config.strength
        if len(self.weighted_anchor) != k:
            self.weighted_anchor = torch._foreach_mul(self.anchor[:k], self.fisher[:k])
        live = [i for i, p in enumerate(params) if p.grad is not None]
        grads = [local(params[i].grad) for i in live]  # a shard's gradient, in place
        if live:
            torch._foreach_addcmul_(grads, [self.fisher[i] for i in live], [local(params[i]) for i in live], value=lam)
            torch._foreach_add_(grads, [self.weighted_anchor[i] for i in live], alpha=-lam)
        for layer, anchor, fisher in zip(self.layers, self.anchor[k:], self.fisher[k:]):
            g = lam * fisher * self._lora_diff(layer, anchor)
            g = g.T if layer.fan_in_fan_out else g
            for a in layer.active_adapters:
                A, B, scale = layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a]
                add_to_grad(B, scale * (g @ full(A).T))
                add_to_grad(A, shard_like(local_sum(scale * (local(B).T @ g), model), A))

    def report(self, model, ctx) -> dict:
        mean, largest = global_stats(self.fisher, model)
        with torch.no_grad():
            final = float(local_sum(self._value(model), model))
        return {
            "strength": self.config.strength,
            "estimator": self.config.estimator,
            "samples": self.used_samples,
            "data": self.config.data.source,
            "normalize": self.config.normalize,
            "online_decay": self.config.online_decay,
            **self.data_counts,
            "lora_layers": len(self.layers),
            "fisher_mean": mean,
            "fisher_max": largest,
            "final_penalty": final,
        }
