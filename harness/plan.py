"""A memory plan before the run: per-process bytes of a training job under ddp and fsdp, and whether it fits.

`estimate(job, processes)` reads no weights: it builds the model on the meta device from its config, applies the
mitigations' own `wrap_model` (LoRA, freezing) for the exact trainable set, and adds up, per process:

    weights, gradients, AdamW state   parameters x bytes of the training dtype (fp32 master weights): all weights,
                                      the trainable ones' gradients (those present at the peak: in a step's first
                                      micro-batch only the LM head's, the first backward computes) and two AdamW
                                      moments; fsdp holds 1/N of each (FSDP2 shards dim 0 of every parameter,
                                      padded to a multiple of N)
    ddp gradient buckets              DDP's flat all-reduce buffers, one more gradient (under a launcher:
                                      accelerate wraps even one torchrun process in DDP)
    autocast weight copies            bf16/fp16 autocast keeps a compute-dtype copy of every matmul weight for the
                                      micro-batch (ddp; fsdp gathers in the compute dtype instead)
    fsdp gathered weights             the root group (embeddings, final norm, LM head: FSDP2 keeps it unsharded
                                      from forward to backward) and the largest decoder layer twice (in use and
                                      prefetched), in the compute dtype; then the unsharded gradient of the
                                      largest unit (compute dtype and fp32) before its reduce-scatter
    activations                       what autograd keeps for backward over the micro-batch that sets the peak,
                                      per token of a Llama-style decoder layer (`_layer_bytes`, counted tensor by
                                      tensor); with gradient checkpointing each layer's input and one layer
                                      recomputed
    logits                            fp32 log-probabilities only at positions that predict a response token (no
                                      other position reaches the LM head, harness/loss.py) and their two
                                      gradients at the start of backward
    mitigations                       each one's own state (`_mitigation_row`); LoRA's the inputs its adapters keep

These are live tensors. A process's resident memory runs higher: the runtime, tokenizer and data (~0.1-0.2 GiB),
and on a CPU what glibc's malloc keeps of freed activations (BENCHMARKS.md, "Memory plan vs measured peaks").
The largest micro-batch comes from the run's own step plan when the tokenized data is given (the CLI loads it);
without it, or when a mitigation mixes in data, it is bounded by max(train.micro_batch_tokens, data.max_seq_len)
tokens, every position a response position. `check_fits` refuses a job whose configured mode does not fit,
naming what would make it fit. Architectures other than Llama-style decoders (gated MLP, RMSNorm, SDPA) are
estimated with the same per-token formula: an approximation there.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from forgetting.harness.batching import micro_batches, plan_steps, rank_share, target_tokens
from forgetting.harness.configlib import from_dict
from forgetting.harness.errors import HarnessError, RunError, UserError
from forgetting.harness.formats import Example
from forgetting.harness.job import TrainJob
from forgetting.harness.models import empty_model, pick_dtype
from forgetting.harness.precision import compute_device_type, resolve_precision
from forgetting.harness.sharding import decoder_layers
from forgetting.mitigations import REGISTRY, build_mitigations

MODES = ("ddp", "fsdp")
NO_STATE = {  # mitigations that keep nothing beyond the rows above
    "wise_ft": "none (interpolates from the saved files)",
    "replay": "none (examples only)",
    "freeze": "none (fewer trainable parameters above)",
    "low_lr": "none",
}
GIB = 1 << 30


@dataclass(frozen=True)
class Arch:
    """The dimensions the activations depend on."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass(frozen=True)
class ModelInfo:
    """Parameter counts of the model as training wraps it; shapes kept for FSDP's per-parameter sharding."""

    params: tuple[tuple[tuple[int, ...], bool], ...]  # (shape, trainable) of every distinct parameter
    matmul: int  # weights that go through a matmul (nn.Linear), copied by autocast
    layers: tuple[tuple[int, int], ...]  # (parameters, trainable) of each decoder layer
    graph_layers: int  # decoder layers whose activations backward needs (not behind a frozen prefix)
    ewc_plain: tuple[tuple[int, ...], ...]  # shapes of the trainable parameters that are not LoRA factors
    lora_base: int  # parameters of the base weights of LoRA-adapted layers
    lora_inputs: tuple[tuple[int, int, bool], ...]  # (in_features, rank, dropout) per LoRA layer
    head_grad: int  # parameters of the LM head's weight if trainable (its gradient is the first backward makes)
    arch: Arch

    @property
    def total(self) -> int:
        return sum(math.prod(shape) for shape, _ in self.params)

    @property
    def trainable(self) -> int:
        return sum(math.prod(shape) for shape, grad in self.params if grad)

    def sharded(self, processes: int, trainable_only: bool = False) -> int:
        """Parameters one of `processes` FSDP2 ranks holds: dim 0 of each split into equal, padded parts."""
        return sum(_shard(shape, processes) for shape, grad in self.params if grad or not trainable_only)


def _shard(shape: tuple[int, ...], processes: int) -> int:
    if not shape:
        return 1
    return math.ceil(shape[0] / processes) * math.prod(shape[1:])


@dataclass(frozen=True)
class Row:
    name: str
    ddp: int
    fsdp: int


@dataclass(frozen=True)
class Plan:
    job: TrainJob
    processes: int
    model: ModelInfo
    rows: tuple[Row, ...]
    precision: str
    precision_why: str
    packed: bool
    tokens: int  # of the largest micro-batch
    targets: int  # its response positions
    from_data: bool  # the micro-batch came from the data's step plan (else the bound)

    def total(self, mode: str) -> int:
        return sum(getattr(row, mode) for row in self.rows)


# ---- the model on the meta device


def meta_model(job: TrainJob) -> torch.nn.Module:
    """The job's model built on the meta device from its config (no weights), wrapped by the mitigations."""
    return _wrapped(job, empty_model(job.model))


def _wrapped(job: TrainJob, model: torch.nn.Module) -> torch.nn.Module:
    """`model` through each mitigation's wrap_model, in config order, with a stand-in context (nothing written:
    lora's merge_on_export, which saves the base at wrap time and changes no training memory, is off here)."""
    specs = [dict(spec, merge_on_export=False) if spec.get("name") == "lora" else spec for spec in job.mitigations]
    # the random generators as they were: wrapping draws (LoRA's initialisation), and the run that checks its
    # memory before loading must initialise its own adapters from the seeded state, as without the check
    with tempfile.TemporaryDirectory(prefix="forgetting-plan-") as scratch, torch.random.fork_rng(devices=[]):
        accelerator = SimpleNamespace(
            is_main_process=False, device=torch.device("meta"), num_processes=1, process_index=0
        )
        ctx = SimpleNamespace(
            job=job, tokenizer=None, accelerator=accelerator, examples=(), output_dir=Path(scratch), start_step=0
        )
        for mitigation in build_mitigations(specs):
            if not hasattr(mitigation, "wrap_model"):
                continue
            try:
                model = mitigation.wrap_model(model, ctx)
            except HarnessError:
                raise
            except Exception as err:  # a plugin's wrap_model that needs real weights
                raise RunError(
                    f"memory plan: mitigation {mitigation.name!r}: wrap_model does not run on a meta-device model "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                ) from None
    return model


def model_info(model: torch.nn.Module) -> ModelInfo:
    """Counts of `model` (a meta model from `meta_model`, or any real one)."""
    params = {id(p): p for p in model.parameters()}
    try:
        layers = decoder_layers(model)
    except UserError:  # no repeated blocks found: fsdp would refuse; everything is one root unit
        layers = []
    per_layer = tuple(_counts(layer) for layer in layers)
    lora = [m for m in model.modules() if _is_lora(m)]
    factors = {id(f) for m in lora for f in _lora_factors(m)}
    matmul = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return ModelInfo(
        params=tuple((tuple(p.shape), p.requires_grad) for p in params.values()),
        matmul=sum(matmul.values()),
        layers=per_layer,
        graph_layers=_graph_layers(model, per_layer),
        ewc_plain=tuple(tuple(p.shape) for p in params.values() if p.requires_grad and id(p) not in factors),
        lora_base=sum(m.base_layer.weight.numel() for m in lora),
        lora_inputs=tuple(_lora_input(m) for m in lora),
        head_grad=_head_grad(model),
        arch=_arch(model, len(per_layer)),
    )


def _head_grad(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight.numel() if head is not None and head.weight.requires_grad else 0


def _counts(module: torch.nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _is_lora(module: torch.nn.Module) -> bool:
    """A peft LoRA linear layer (what mitigations/ewc.py `penalised` finds, by the attributes it uses)."""
    return all(hasattr(module, a) for a in ("lora_A", "lora_B", "base_layer", "active_adapters")) and isinstance(
        module.base_layer, torch.nn.Linear
    )


def _lora_factors(layer) -> list[torch.nn.Parameter]:
    return [f for a in layer.active_adapters for f in (layer.lora_A[a].weight, layer.lora_B[a].weight)]


def _lora_input(layer) -> tuple[int, int, bool]:
    rank = sum(layer.r[a] for a in layer.active_adapters)
    dropout = any(isinstance(layer.lora_dropout[a], torch.nn.Dropout) for a in layer.active_adapters)
    return layer.base_layer.in_features, rank, dropout


def _graph_layers(model: torch.nn.Module, per_layer: tuple[tuple[int, int], ...]) -> int:
    """Decoder layers backward goes through: none of the leading ones that, with frozen embeddings, train nothing."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or embeddings.weight.requires_grad:
        return len(per_layer)
    frozen_prefix = next((i for i, (_, trainable) in enumerate(per_layer) if trainable), len(per_layer))
    return len(per_layer) - frozen_prefix


def _arch(model: torch.nn.Module, layers: int) -> Arch:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = config.hidden_size
    heads = getattr(config, "num_attention_heads", 1)
    head = model.get_output_embeddings()
    return Arch(
        hidden=hidden,
        intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads,
        vocab=head.weight.shape[0] if head is not None else config.vocab_size,
    )


# ---- micro-batches and activations


def largest_micro_batches(job: TrainJob, processes: int, examples, packed: bool) -> set[tuple[int, int, bool]] | None:
    """(tokens, response positions, first of its step) of every distinct micro-batch the run forms on any process,
    from its step plan (`harness.batching`); None without examples or when a mitigation mixes in data (unknown
    here). A step's first micro-batch runs before any gradient exists (they are freed after every step)."""
    mixing = any(hasattr(REGISTRY[spec["name"]][1], "mix_data") for spec in job.mitigations)
    if examples is None or mixing or not examples:
        return None
    t = job.train
    lengths = [len(e) for e in examples]
    targets = [target_tokens([e]) for e in examples]
    sizes = set()
    for step in plan_steps(len(examples), t.batch_size, t.epochs, t.max_steps, t.seed):
        for rank in range(processes):
            share = rank_share(step, lengths, rank, processes)
            for k, group in enumerate(micro_batches(share, lengths, t.micro_batch_tokens, packed)):
                width = sum(lengths[i] for i in group) if packed else len(group) * max(lengths[i] for i in group)
                sizes.add((width, sum(targets[i] for i in group), k == 0))
    return sizes or None


@dataclass(frozen=True)
class Compute:
    """How the step computes: bytes of the weights, of autocast's compute dtype, of attention's tensors."""

    weight: int  # bytes per parameter (fp32 master weights unless model.dtype says otherwise)
    compute: int  # bytes of the compute dtype: 2 under bf16/fp16 autocast, else the weights'
    attention: int  # bytes of attention's saved tensors (fp32 in the CPU's packed attention, harness/packing.py)
    autocast: bool
    packed: bool
    checkpointing: bool
    last_layer: bool  # the last layer's MLP runs only at response positions (harness/last_layer.py)


def _layer_bytes(arch: Arch, c: Compute) -> tuple[int, int]:
    """(bytes per token autograd keeps for one decoder layer, of which the MLP's).

    Counted tensor by tensor with saved-tensor hooks on a SmolLM2-shaped layer (fp32/bf16, packed/padded): two
    RMSNorms keep 4 fp32 vectors of `hidden`; the linear layers' inputs 2-3 more (autocast casts the input of
    q, k, v and gate, up separately: 3 more); attention q, k, v and its output; the gated MLP 4 of
    `intermediate` (gate, up, SiLU, product); per-head log-sum-exp and the two norms' scales.
    """
    h, q, kv = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    linear_inputs = (3 if c.packed else 2) + (3 if c.autocast else 0)
    mlp = 4 * arch.intermediate * c.compute + (2 if c.autocast else 1) * h * c.compute
    rest = 4 * h * 4 + (linear_inputs - (2 if c.autocast else 1)) * h * c.compute
    rest += (2 * q + 2 * kv) * c.attention + 4 * arch.heads + 8
    return mlp + rest, mlp


def activation_bytes(info: ModelInfo, c: Compute, tokens: int, targets: int) -> int:
    """What backward needs of one micro-batch of `tokens` tokens with `targets` response positions (no logits, no
    LoRA adapters: `lora_activation_bytes`)."""
    arch = info.arch
    layer, mlp = _layer_bytes(arch, c)
    # the final norm, token and position ids, rotary cos and sin, and the LM head's input at the response positions
    ends = tokens * (2 * arch.hidden * 4 + 4 + 16 + 2 * arch.head_dim * 4) + targets * arch.hidden * c.compute
    if c.checkpointing:  # each layer's input kept, one layer recomputed at a time in backward
        return ends + tokens * (info.graph_layers * arch.hidden * c.weight + (layer if info.graph_layers else 0))
    kept = tokens * info.graph_layers * layer + ends
    if c.last_layer and info.graph_layers:
        kept -= (tokens - targets) * mlp
    return kept


def lora_activation_bytes(info: ModelInfo, c: Compute, tokens: int) -> int:
    """What LoRA adapters keep for backward per micro-batch, per adapted layer and token (counted with saved-tensor
    hooks): lora_A's input, which is a new tensor where dropout makes one or autocast casts it (the base layer's
    cast is its own), and lora_A's rank-r output."""
    per_token = sum(
        inputs * (c.compute if c.autocast else 4 if dropout else 0) + rank * c.compute
        for inputs, rank, dropout in info.lora_inputs
    )
    share = info.graph_layers / max(1, len(info.layers))  # adapters behind a frozen prefix keep nothing
    if c.checkpointing:  # one layer's adapters at a time
        share = min(share, 1 / max(1, len(info.layers)))
    return int(tokens * per_token * share)


def logits_bytes(arch: Arch, targets: int, copies: int = 3) -> int:
    """fp32 log-probabilities at the response positions and their gradients (`copies` tensors of V each)."""
    return targets * arch.vocab * 4 * copies


# ---- the estimate


def compute_settings(job: TrainJob, device_type: str) -> tuple[Compute, str, str]:
    """(Compute, precision, why) of the job on `device_type` (`train.precision` resolved as training does)."""
    t = job.train
    precision, why = resolve_precision(t.precision, device_type)
    weight = torch.finfo(pick_dtype(job.model, for_training=True)).bits // 8
    autocast = precision in ("bf16", "fp16")
    sdpa = job.model.attn_implementation in (None, "sdpa")
    packed = t.packing == "packed" or (t.packing == "auto" and device_type == "cpu" and not t.compile and sdpa)
    compute = 2 if autocast else weight
    return (
        Compute(
            weight=weight,
            compute=compute,
            attention=4 if packed and device_type == "cpu" else compute,
            autocast=autocast,
            packed=packed,
            checkpointing=t.gradient_checkpointing,
            last_layer=not (t.gradient_checkpointing or t.compile),
        ),
        precision,
        why,
    )


def estimate(
    job: TrainJob,
    processes: int,
    examples: list[Example] | None = None,
    device_type: str | None = None,
    info: ModelInfo | None = None,
    launcher: bool | None = None,
) -> Plan:
    """Per-process bytes of `job` with `processes` processes under ddp and fsdp (rows of a `Plan`).

    `launcher`: whether a distributed launcher (torchrun, accelerate launch) starts the job, which wraps the model
    in DDP even for one process; default: more than one process, or LOCAL_RANK set (this process was launched).
    The micro-batch that sets the peak is the one with the most activations, logits and gradients present: in a
    step's first micro-batch only the LM head's gradient exists when backward starts (it is computed first).
    """
    if processes < 1:
        raise UserError(f"--processes: must be at least 1, got {processes}")
    device_type = device_type or compute_device_type()
    info = info or model_info(meta_model(job))
    c, precision, why = compute_settings(job, device_type)
    sizes = largest_micro_batches(job, processes, examples, c.packed)
    bound = max(job.train.micro_batch_tokens, job.data.max_seq_len)

    def peak(size: tuple[int, int, bool]) -> int:
        tokens, targets, first = size
        grads = info.head_grad if first else info.trainable
        return activation_bytes(info, c, tokens, targets) + logits_bytes(info.arch, targets) + grads * c.weight

    tokens, targets, first = max(sizes or {(bound, bound, False)}, key=peak)
    wrapped = launcher if launcher is not None else processes > 1 or "LOCAL_RANK" in os.environ
    rows = _static_rows(info, c, processes, first, wrapped) + [
        Row(f"activations ({tokens} tokens)", *[activation_bytes(info, c, tokens, targets)] * 2),
        Row(f"logits ({targets} positions x {info.arch.vocab}, fp32 x3)", *[logits_bytes(info.arch, targets)] * 2),
    ]
    rows += [_mitigation_row(spec, info, c, processes, tokens) for spec in job.mitigations]
    return Plan(job, processes, info, tuple(rows), precision, why, c.packed, tokens, targets, sizes is not None)


def _static_rows(info: ModelInfo, c: Compute, n: int, first: bool, wrapped: bool) -> list[Row]:
    """Weights, gradients (those present at the peak: `first`, a step's first micro-batch, has only the head's;
    fsdp's are in its unsharded row then), AdamW state, and what ddp (`wrapped` in DDP) or fsdp adds."""
    w, cd = c.weight, c.compute
    total, trainable = info.total, info.trainable
    layer, layer_grad = max(info.layers, default=(0, 0), key=lambda x: x[0])
    root = total - sum(p for p, _ in info.layers)
    root_grad = trainable - sum(g for _, g in info.layers)
    dtype = {2: "bf16/fp16", 4: "fp32"}.get(w, f"{w} bytes")
    unsharded_grad = max(layer_grad, root_grad) * (4 + (cd if cd < 4 else 0))
    return [
        Row(f"weights ({dtype})", total * w, info.sharded(n) * w),
        Row(f"gradients ({dtype}, head only: 1st micro-batch)", info.head_grad * w, 0)
        if first
        else Row(f"gradients ({dtype})", trainable * w, info.sharded(n, True) * w),
        Row(f"AdamW state (2 x {dtype})", 2 * trainable * w, 2 * info.sharded(n, True) * w),
        Row("ddp gradient buckets", trainable * w if wrapped else 0, 0),
        Row("autocast weight copies (ddp)", info.matmul * cd if c.autocast else 0, 0),
        Row("fsdp gathered root + 2 layers", 0, (root + 2 * layer) * cd),
        Row("fsdp unsharded gradient", 0, unsharded_grad),
    ]


def _mitigation_row(spec: dict, info: ModelInfo, c: Compute, n: int, tokens: int) -> Row:
    """A mitigation's own memory: per-parameter state (sharded by fsdp) and any extra forward it keeps."""
    name, w = spec["name"], c.weight
    plain = sum(math.prod(s) for s in info.ewc_plain)
    plain_shard = sum(_shard(s, n) for s in info.ewc_plain)
    if name == "ewc":  # anchor theta*, Fisher F, and F * theta* (formed once): three per plain parameter
        lora_fisher = info.lora_base * w  # a LoRA layer's Fisher is of its base weight; its anchor is W itself
        return Row("ewc: anchor, Fisher, F x anchor", (3 * plain) * w + lora_fisher, 3 * plain_shard * w + lora_fisher)
    if name == "l2sp":  # the anchor, and the penalty's (theta - theta0) kept for backward in the last micro-batch
        return Row("l2sp: anchor + penalty graph", 2 * info.trainable * w, 2 * info.sharded(n, True) * w)
    if name == "kl_to_base":
        return _kl_row(spec, info, c, n)
    if name == "lora":  # the adapters' weights, gradients and AdamW state are in the rows above
        return Row("lora: adapter activations", *[lora_activation_bytes(info, c, tokens)] * 2)
    return Row(f"{name}: {NO_STATE.get(name, 'no state of its own')}", 0, 0)


def _kl_row(spec: dict, info: ModelInfo, c: Compute, n: int) -> Row:
    """kl_to_base: the frozen base (weights only), and per step the current model's forward on `batch_size`
    general examples (padded) with its activations and both models' log-probabilities at their responses."""
    kl = from_dict(REGISTRY["kl_to_base"][0], {k: v for k, v in spec.items() if k != "name"})
    tokens = kl.batch_size * kl.data.max_seq_len
    per_example = min(kl.data.max_seq_len, kl.data.max_new_tokens + 1) if kl.data.source == "self" else None
    targets = kl.batch_size * per_example if per_example else tokens
    padded = replace(c, packed=False, attention=c.compute)
    forward = activation_bytes(info, padded, tokens, targets) + logits_bytes(info.arch, targets, copies=4)
    return Row(
        "kl_to_base: frozen base + its batch", info.total * c.weight + forward, info.sharded(n) * c.weight + forward
    )


# ---- what is available, the table, the check


def available_memory(device, processes: int) -> tuple[int | None, str]:
    """(bytes one process may use, where from): a CUDA device's free memory; on the CPU MemAvailable shared by
    the processes on this node (LOCAL_WORLD_SIZE under torchrun, else `processes`); None elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device}"
    if device.type != "cpu":
        return None, f"unknown on {device.type}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        kib = int(fields["MemAvailable"].split()[0])
    except (OSError, KeyError, ValueError):
        return None, "unknown (no MemAvailable in /proc/meminfo)"
    return kib * 1024 // local, f"MemAvailable / {local}" if local > 1 else "MemAvailable"


def size(n: int) -> str:
    """Bytes for people: GiB from 1 GiB on, else MiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.1f} MiB"


def render(plan: Plan, available: int | None, where: str) -> str:
    """The plan as a table: a row per item, ddp and fsdp columns, the totals, what is available, what fits."""
    job, info, mode = plan.job, plan.model, plan.job.train.distributed
    layer = max((p for p, _ in info.layers), default=0)
    source = "the data's step plan" if plan.from_data else "bound: every position a response position"
    lines = [
        f"memory plan: {job.model.name_or_path}, {plan.processes} process(es), precision {plan.precision} "
        f"({plan.precision_why})",
        f"parameters {info.total:,} (trainable {info.trainable:,}); largest decoder layer {layer:,}; "
        f"embeddings, final norm and head {info.total - sum(p for p, _ in info.layers):,}",
        f"largest micro-batch: {plan.tokens} tokens, {plan.targets} response positions "
        f"({'packed' if plan.packed else 'padded'}; {source})",
        "",
        f"{'per process':<44}{'ddp':>14}{'fsdp':>14}",
    ]
    lines += [f"{row.name:<44}{_cell(row.ddp):>14}{_cell(row.fsdp):>14}" for row in plan.rows]
    lines.append(f"{'total':<44}{size(plan.total('ddp')):>14}{size(plan.total('fsdp')):>14}")
    shown = size(available) if available is not None else "unknown"
    lines.append(f"{f'available per process ({where})':<44}{shown:>14}{shown:>14}")
    verdicts = [_verdict(plan.total(m), available) + ("*" if m == mode else " ") for m in MODES]
    lines.append(f"{'fits':<44}{verdicts[0]:>14}{verdicts[1]:>14}")
    lines.append(f"* configured: train.distributed={mode}")
    return "\n".join(lines)


def _cell(n: int) -> str:
    return size(n) if n else "-"


def _verdict(total: int, available: int | None) -> str:
    return "unknown" if available is None else "yes" if total <= available else "no"


def check_fits(
    job: TrainJob,
    processes: int,
    device,
    available_bytes: int | None = None,
    examples: list[Example] | None = None,
) -> None:
    """Raise a one-line UserError when the configured mode's estimate exceeds the memory one process has.

    `available_bytes` defaults to `available_memory(device, processes)` (nothing is checked where that is unknown);
    `examples`, the tokenized SFT data, sizes the micro-batches from the step plan (else their bound).
    """
    device = torch.device(device)
    where = "given"
    if available_bytes is None:
        available_bytes, where = available_memory(device, processes)
        if available_bytes is None:
            return
    info = model_info(meta_model(job))
    launched = processes > 1 or "LOCAL_RANK" in os.environ
    mode = job.train.distributed if launched else "ddp"  # fsdp without a launcher trains unsharded
    needed = estimate(job, processes, examples, device.type, info).total(mode)
    if needed <= available_bytes:
        return
    remedy = _remedies(job, processes, device.type, examples, info, available_bytes)
    raise UserError(
        f"memory: train.distributed={job.train.distributed} with {processes} process(es) needs ~{size(needed)} per "
        f"process but {size(available_bytes)} is available ({where}); {remedy} (`forgetting plan` shows the table)"
    )


def _candidates(job: TrainJob, processes: int, device_type: str, longest: int) -> list[tuple[str, TrainJob, int]]:
    """(what to set, the job with it, processes): ways to need less memory, those that keep the results first;
    micro-batches halved down to the `longest` example (one example is a micro-batch whatever the knob says)."""
    t, found = job.train, []
    fsdp = replace(job, train=replace(t, distributed="fsdp", compile=False))
    if t.distributed == "ddp" and processes > 1:
        found.append(("train.distributed=fsdp" + (" (and train.compile=false)" if t.compile else ""), fsdp, processes))
    if device_type == "cuda":  # each process has its own GPU: more of them hold less each (a CPU node shares RAM)
        for more in (2 * processes, 4 * processes, 8 * processes):
            found.append((f"train.distributed=fsdp with {more} processes", fsdp, more))
    tokens = t.micro_batch_tokens // 2
    while tokens >= max(64, longest):
        found.append(
            (f"train.micro_batch_tokens={tokens}", replace(job, train=replace(t, micro_batch_tokens=tokens)), processes)
        )
        tokens //= 2
    if not t.gradient_checkpointing:
        found.append(
            (
                "train.gradient_checkpointing=true",
                replace(job, train=replace(t, gradient_checkpointing=True)),
                processes,
            )
        )
    if not any(spec.get("name") == "lora" for spec in job.mitigations):
        found.append(
            (
                "a lora mitigation (mitigations=[{name: lora}])",
                replace(job, mitigations=[*job.mitigations, {"name": "lora"}]),
                processes,
            )
        )
    return found


def _remedies(job, processes, device_type, examples, info, available: int) -> str:
    """What would make the job fit: the first candidate of each kind that does alone, in `_candidates`' order;
    if none does alone, every kind at once (its last, strongest candidate), or that even that does not suffice."""
    fitting, seen, last = [], set(), {}
    longest = max((len(e) for e in examples), default=0) if examples else job.data.max_seq_len
    for label, changed, n in _candidates(job, processes, device_type, longest):
        kind = label.split("=")[0]
        last[kind] = (label, changed, n)
        if kind in seen:
            continue
        total = _total(changed, n, examples, device_type, info if changed.mitigations == job.mitigations else None)
        if total <= available:
            fitting.append(f"{label} (~{size(total)})")
            seen.add(kind)
    if fitting:
        return "it would fit with " + ", or ".join(fitting)
    if not last:
        return "no knob here makes it smaller"
    knobs = {}
    for _, changed, _ in last.values():
        knobs |= {k: v for k, v in vars(changed.train).items() if getattr(job.train, k) != v}
    mitigations = max((changed.mitigations for _, changed, _ in last.values()), key=len)
    combined = replace(job, train=replace(job.train, **knobs), mitigations=mitigations)
    processes = max(n for _, _, n in last.values())
    total = _total(combined, processes, examples, device_type, None)
    labels = " and ".join(label for label, _, _ in last.values())
    verdict = "it would fit only with all of" if total <= available else "it does not fit even with all of"
    return f"{verdict} {labels} (~{size(total)})"


def _total(job: TrainJob, processes: int, examples, device_type: str, info: ModelInfo | None) -> int:
    return estimate(job, processes, examples, device_type, info).total(job.train.distributed)
