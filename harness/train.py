"""The SFT loop: one readable function from config to a trained, saved model.

    tokenizer + data  ->  model (+ mitigations' wrap_model)  ->  optimizer + schedule  ->  resume?
    for each optimizer step:  micro-batches -> summed response loss / step's target tokens (+ penalties)
                              -> backward -> clip -> AdamW -> LR schedule -> log / checkpoint
    -> final checkpoint + summary (+ mitigations' reports)

Runs on `accelerate`: `torchrun` / `accelerate launch` give DDP with the same global batch (each process
takes a share of every step; the loss is normalised by the step's global token count, so the gradient
equals the one-process gradient). Mitigations plug in through the hooks in `mitigations/registry.py`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from harness import checkpoint as ckpt
from harness import last_layer, packing
from harness.batching import collate, micro_batches, plan_steps, rank_share, target_tokens
from harness.configlib import to_dict
from harness.data import DataStats, load_conversations, tokenize_all
from harness.errors import RunError, UserError
from harness.formats import Example, attach_format
from harness.io import atomic_write_text, atomic_write_yaml, claim_run_dir
from harness.job import TrainJob, comparable
from harness.loss import mean_response_loss, summed_response_loss
from harness.models import load_model, load_tokenizer
from harness.optim import default_param_groups, lr_factor, make_optimizer
from harness.precision import resolve_precision
from mitigations import build_mitigations, chain, hook_results


@dataclass(frozen=True)
class TrainContext:
    """What hooks may read about the run (they return values; they do not change it)."""

    job: TrainJob
    tokenizer: Any
    accelerator: Any
    examples: tuple[Example, ...]  # the tokenized SFT data, before any mixing
    output_dir: Path
    start_step: int = 0  # the optimizer step the loop starts at: > 0 when it resumes from a checkpoint


@dataclass
class TrainResult:
    final_dir: Path
    steps: int
    data: DataStats
    last_loss: float | None
    tokens_per_second: float | None
    padding_fraction: float
    heldout_loss: dict | None  # response loss on the held-out split before and after training
    mitigation_reports: dict


def make_accelerator(job: TrainJob):
    precision, why = resolve_precision(job.train.precision)
    # cpu=True when no accelerator is present: that is what makes accelerate use gloo under torchrun
    has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=not has_accelerator)
    if accelerator.is_main_process:
        print(f"precision: {precision} ({why})", flush=True)
    return accelerator


def compile_model(model: torch.nn.Module, device: torch.device) -> None:
    """torch.compile the model in place (its state_dict keys and checkpoints stay as they are).

    Shapes vary with each micro-batch's width; torch marks the varying sizes dynamic after the first
    recompile, so a run compiles about twice. On a CPU inductor builds C++ kernels: a compiler must exist.
    """
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise UserError("train.compile: torch.compile on a CPU needs a C++ compiler (g++ or clang++) on PATH; "
                        "install one or set train.compile=false")
    model.compile()


def use_packing(t, model, device: torch.device) -> bool:
    """Whether micro-batches are packed: `train.packing`, with auto = packed on a CPU without compile.

    On GPUs the per-sequence attention calls cost kernel launches that padding does not, so auto pads there.
    """
    if t.packing == "packed" and not packing.supports_packing(model):
        raise UserError(f"train.packing=packed needs SDPA attention; this model uses "
                        f"{packing.transformers_model(model).config._attn_implementation!r} "
                        f"(set model.attn_implementation=sdpa or train.packing=padded)")
    if t.packing == "auto":
        return device.type == "cpu" and not t.compile and packing.supports_packing(model)
    return t.packing == "packed"


def loss_step(model, batch: dict[str, torch.Tensor], scale: float, penalties: list) -> torch.Tensor:
    """One micro-batch's contribution to the step loss: summed response CE x scale, plus any penalties."""
    loss = summed_response_loss(model, batch) * scale
    return loss + sum(penalties) if penalties else loss


def accumulate_gradients(model, accelerator, examples: list[Example], micro_batch_tokens: int, pad_id: int,
                         scale: float, penalties, packed: bool = False) -> tuple[torch.Tensor, int, int]:
    """Forward and backward every micro-batch of `examples` (this process's share of one optimizer step).

    Micro-batches are packed rows (`harness.packing`, the model's attention switched to packed) or padded
    ones. Gradients are synchronised across processes only on the last micro-batch, which also carries the
    mitigations' penalty terms (`penalties()` is called once per step). Returns (the step's response loss
    on this process, padded tokens, real tokens).
    """
    lengths = [len(e) for e in examples]
    groups = micro_batches(list(range(len(examples))), lengths, micro_batch_tokens, packed=packed)
    step_loss = torch.zeros((), device=accelerator.device)
    padded = real = 0
    for i, group in enumerate(groups):
        last = i == len(groups) - 1
        batch = packing.pack([examples[j] for j in group]) if packed else collate([examples[j] for j in group], pad_id)
        padded += batch["input_ids"].numel()
        real += sum(lengths[j] for j in group)
        batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
            terms = penalties() if last else []
            loss = loss_step(model, batch, scale, terms)
            accelerator.backward(loss)
        step_loss += (loss - sum(terms)).detach() if terms else loss.detach()
    return step_loss, padded, real


def finished_run(job: TrainJob, output_dir: Path) -> bool:
    """Claim `output_dir` for `job` (read-only: refuses another run's directory); True when it holds the
    finished run."""
    existing = claim_run_dir(output_dir, ckpt.CONFIG_NAME, to_dict(job), comparable, write=False)
    return existing and (output_dir / "final" / "trainer_state.json").is_file()


def train(job: TrainJob, accelerator=None, on_step=None) -> TrainResult:
    """Fine-tune `job.model` on `job.data` with `job.mitigations`; resume from `job.output_dir` if possible.

    `on_step(done, total, loss)` is called on the main process after each optimizer step (progress display).

    Without an `accelerator` the job makes its own, and leaves none of its settings behind: accelerate keeps
    process-wide state (the mixed precision) that would otherwise refuse the next job's or leak into it
    (an experiment trains its units one after another in one process). The process group, if any, is kept.
    """
    if accelerator is not None:
        return _train(job, accelerator, on_step)
    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        return _train(job, make_accelerator(job), on_step)
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)


def _train(job: TrainJob, accelerator, on_step=None) -> TrainResult:
    if job.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("train.tensorboard: the tensorboard package is not installed (pip install tensorboard)")
    output_dir = Path(job.output_dir)
    is_main = accelerator.is_main_process
    if finished_run(job, output_dir):
        if is_main:
            print(f"{output_dir} already holds the finished run; nothing to train", flush=True)
        summary = json.loads((output_dir / "final" / "trainer_state.json").read_text())
        summary["data"] = DataStats(**summary["data"])
        summary["final_dir"] = output_dir / "final"
        return TrainResult(**summary)
    set_seed(job.train.seed)

    # ---- data: records -> conversations -> tokens with response-only labels
    tokenizer = load_tokenizer(job.model)
    attach_format(tokenizer, job.data.format)
    examples, data_stats = tokenize_all(load_conversations(job.data), tokenizer, job.data)
    heldout_config = job.data.heldout()
    heldout = tokenize_all(load_conversations(heldout_config), tokenizer, heldout_config)[0] if heldout_config else None
    accelerator.wait_for_everyone()  # every process has checked output_dir before it is written
    if is_main and not (output_dir / ckpt.CONFIG_NAME).is_file():
        atomic_write_yaml(output_dir / ckpt.CONFIG_NAME, to_dict(job))
    if is_main:
        print(f"data: {data_stats.examples} examples ({data_stats.truncated} truncated, "
              f"{data_stats.dropped_truncated} dropped: response cut away by max_seq_len={job.data.max_seq_len}); "
              f"{data_stats.target_tokens} of {data_stats.tokens} tokens are response tokens", flush=True)

    # ---- model and mitigations
    model = load_model(job.model, for_training=True, vocab_size=len(tokenizer))  # the same base whatever the seed
    model.config.use_cache = False
    if job.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mitigations = build_mitigations(job.mitigations)
    resumable = ckpt.checkpoint_dirs(output_dir)  # resume from the newest complete checkpoint, if any
    start = resumable[-1][0] if resumable else 0
    ctx = TrainContext(job, tokenizer, accelerator, tuple(examples), output_dir, start_step=start)
    model = chain(mitigations, "wrap_model", model, ctx)
    model.to(accelerator.device)
    if job.train.compile:
        compile_model(model, accelerator.device)
    examples = list(chain(mitigations, "mix_data", examples, model, ctx))
    hook_results(mitigations, "prepare", model, ctx)

    # ---- optimizer, schedule, the whole step plan
    if accelerator.num_processes > job.train.batch_size:
        raise UserError(f"train.batch_size={job.train.batch_size} is smaller than the {accelerator.num_processes} processes")
    groups = next(iter(hook_results(mitigations, "param_groups", model, ctx)), None)  # at most one (registry)
    groups = groups or default_param_groups(model, job.train.weight_decay)
    optimizer = make_optimizer(groups, job.train, accelerator.device)
    steps = plan_steps(len(examples), job.train.batch_size, job.train.epochs, job.train.max_steps, job.train.seed)
    t = job.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, len(steps), t.warmup_ratio, t.schedule, t.min_lr_ratio))
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    accelerator.register_for_checkpointing(scheduler)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # ---- resume from the newest complete checkpoint
    if resumable:
        path = resumable[-1][1]
        accelerator.load_state(str(path / "state"))
        if is_main:
            print(f"resuming from {path} (step {start} of {len(steps)})", flush=True)
    metrics_path = output_dir / "metrics.jsonl"
    if is_main:
        keep = [line for line in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
                if _logged_step(line) <= start]
        if heldout is not None and start == 0:
            keep = [json.dumps({"step": 0, "heldout_loss": heldout_loss(accelerator, model, heldout, tokenizer, t)})]
        atomic_write_text(metrics_path, "".join(line + "\n" for line in keep))

    # ---- the loop
    lengths = [len(e) for e in examples]
    pad_id = tokenizer.pad_token_id
    packed = use_packing(t, accelerator.unwrap_model(model), accelerator.device)
    restore_attention = packing.enable(accelerator.unwrap_model(model)) if packed else None
    # exact: the last layer's MLP and output projection run only where a logit is taken (harness.last_layer)
    restore_last_layer = last_layer.enable(accelerator.unwrap_model(model))
    if is_main:
        print(f"micro-batches: {'packed, no padding' if packed else 'padded'} (train.packing={t.packing}), "
              f"up to {t.micro_batch_tokens} tokens each", flush=True)
    progress = _progress_bar(job, is_main, start, len(steps))
    board = _tensorboard(output_dir) if is_main and t.tensorboard else None
    padded_total = real_total = 0
    last_loss = tokens_per_second = None
    for step in range(start, len(steps)):
        started = time.perf_counter()
        step_examples = [examples[i] for i in steps[step]]
        scale = accelerator.num_processes / max(1, target_tokens(step_examples))  # DDP averages over processes
        share = rank_share(steps[step], lengths, accelerator.process_index, accelerator.num_processes)
        step_loss, padded, real = accumulate_gradients(
            model, accelerator, [examples[j] for j in share], t.micro_batch_tokens, pad_id, scale,
            lambda: hook_results(mitigations, "penalty", model, ctx), packed=packed)
        if packed and packing.CALLS["packed"] == 0:
            raise RunError("train.packing: the model's attention did not go through transformers' attention "
                           "interface, so packed sequences could see each other; set train.packing=padded")
        padded_total += padded
        real_total += real
        hook_results(mitigations, "penalty_grad", model, ctx)
        grad_norm = accelerator.clip_grad_norm_(trainable, t.grad_clip or math.inf)
        step_loss = accelerator.reduce(step_loss, reduction="sum") / accelerator.num_processes
        last_loss, norm = torch.stack([step_loss, grad_norm.to(step_loss)]).tolist()  # the step's one host sync
        if not (math.isfinite(last_loss) and math.isfinite(norm)):
            raise RunError(f"non-finite loss ({last_loss}) or gradient norm ({norm}) at step {step + 1}; not applied; "
                           f"the last good checkpoint is kept in {output_dir}; lower train.lr or check the data")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- log, show progress, checkpoint
        elapsed = time.perf_counter() - started
        tokens = sum(len(e) for e in step_examples)
        tokens_per_second = tokens / elapsed
        if is_main and ((step + 1) % t.log_every == 0 or step + 1 == len(steps)):
            record = {"step": step + 1, "loss": last_loss, "lr": lr,
                      "grad_norm": norm, "tokens": tokens,
                      "target_tokens": target_tokens(step_examples), "tokens_per_s": tokens_per_second,
                      "padding_fraction": 1 - real_total / max(1, padded_total), "seconds": elapsed}
            with open(metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            for key, value in record.items():
                if board is not None and key != "step":
                    board.add_scalar(f"train/{key}", value, step + 1)
        progress.update(1)
        progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}",
                             tok_s=f"{tokens_per_second:.0f}")
        if on_step is not None and is_main:
            on_step(step + 1, len(steps), last_loss)
        if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < len(steps):
            ckpt.save_checkpoint(accelerator, model, tokenizer, job, output_dir, f"checkpoint-{step + 1:06d}",
                                 with_state=True, extra={"step": step + 1})
            if is_main:
                ckpt.prune_checkpoints(output_dir, max(1, t.keep_checkpoints))
    progress.close()
    if board is not None:
        board.close()
    restore_last_layer()
    if restore_attention is not None:
        restore_attention()

    # ---- finish: reports, final checkpoint, summary
    padded_total, real_total = accelerator.reduce(torch.tensor([padded_total, real_total], device=accelerator.device),
                                                  reduction="sum").tolist()
    reports = {m.name: r for m, r in zip([m for m in mitigations if hasattr(m, "report")],
                                          hook_results(mitigations, "report", model, ctx))}
    heldout_losses = None
    if heldout is not None and is_main:
        before = json.loads(metrics_path.read_text().splitlines()[0])["heldout_loss"]
        heldout_losses = {"before": before, "after": heldout_loss(accelerator, model, heldout, tokenizer, t),
                          "examples": len(heldout), "split": heldout_config.split}
    result = TrainResult(final_dir=output_dir / "final", steps=len(steps), data=data_stats, last_loss=last_loss,
                         tokens_per_second=tokens_per_second, padding_fraction=1 - real_total / max(1, padded_total),
                         heldout_loss=heldout_losses, mitigation_reports=reports)
    summary = {k: v for k, v in asdict(result).items() if k != "final_dir"}
    extra_models = {}
    for part in hook_results(mitigations, "export", accelerator.unwrap_model(model), ctx):
        extra_models.update(part)
    ckpt.save_checkpoint(accelerator, model, tokenizer, job, output_dir, "final", with_state=False, extra=summary,
                         extra_models=extra_models)
    if is_main:
        ckpt.prune_checkpoints(output_dir, t.keep_checkpoints)
    return result


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a crash mid-append counts as never written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def heldout_loss(accelerator, model, examples: list[Example], tokenizer, t) -> float:
    """Mean response loss on held-out examples (main process, unwrapped model, eval mode)."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    with accelerator.autocast():
        value = mean_response_loss(unwrapped, examples, tokenizer.pad_token_id, t.micro_batch_tokens)
    unwrapped.train()
    return value


def _tensorboard(output_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(output_dir / "tensorboard"))


def _progress_bar(job: TrainJob, is_main: bool, start: int, total: int):
    return tqdm(total=total, initial=start, disable=not (is_main and job.train.progress), desc="train",
                unit="step", dynamic_ncols=True)
