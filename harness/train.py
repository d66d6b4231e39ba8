"""The SFT loop as a recipe: setup -> resume -> train_loop -> finish, each step a small function.

    setup(job, accelerator) -> Run      tokenizer + data -> model -> mitigations' wrap_model, mix_data, prepare
                                        -> optimizer (+ a mitigation's param_groups) + LR schedule + step plan
    resume(run)                         newest complete checkpoint; metrics.jsonl cut back to its step, or
                                        started with the held-out loss at step 0
    train_loop(run, on_step, eval_points)   with the model patched (packed attention, last layer where logits
                                        are taken), undone however the loop ends and while it is evaluated:
        for step in range(start, total):
            numbers = train_step(run, step)   micro-batches -> summed response loss / step's target tokens
                                              (+ penalties) -> backward -> penalty_grad -> clip -> AdamW -> LR
            log(step, numbers)                `StepLog`: metrics.jsonl, the trackers, progress bar, on_step
            evaluate_at(run, step + 1, ...)   a forgetting curve's point, if `eval_points` asks for this step
            maybe_checkpoint(run, step)
    finish(run) -> TrainResult          mitigations' reports, held-out loss after, final checkpoint + summary

Evaluations during training (`eval_points`, forgetting curves) run on the main process on the model in memory,
in eval mode under no_grad with the speed patches off, compiled code run eagerly and the random generators put
back afterwards, so the training is bitwise the same with and without them; the other processes of a DDP run go
on to the next step's collective and wait there. A sharded (FSDP) model is refused: every process would have to
take part in each forward.

Runs on `accelerate`: `torchrun` / `accelerate launch` / `srun` give DDP with the same global batch (each
process takes a share of every step; the loss is normalised by the step's global token count, so the
gradient equals the one-process gradient), or with `train.distributed: fsdp` the model sharded across the
processes by FSDP2 (`harness.sharding`), the same global batch and normalisation. Mitigations plug in
through the hooks in `mitigations/registry.py`, every hook called through its dispatchers (`hook_results`,
`chain`).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from forgetting.harness import checkpoint as ckpt
from forgetting.harness import last_layer, packing
from forgetting.harness.batching import collate, micro_batches, plan_steps, rank_share, target_tokens
from forgetting.harness.configlib import to_dict
from forgetting.harness.data import DataStats, load_conversations, tokenize_all
from forgetting.harness.errors import Preempted, RunError, UserError
from forgetting.harness.formats import Example, attach_format
from forgetting.harness.io import atomic_write_text, atomic_write_yaml, claim_run_dir
from forgetting.harness.job import TrainJob, comparable, upgrade_job
from forgetting.harness.loss import mean_response_loss, summed_response_loss
from forgetting.harness.models import empty_model, load_model, load_tokenizer
from forgetting.harness.optim import default_param_groups, lr_factor, make_optimizer
from forgetting.harness.plan import check_fits
from forgetting.harness.precision import resolve_precision
from forgetting.harness.processes import accelerator_present, adopt_slurm_tasks
from forgetting.harness.sharding import compute_dtype, full, is_sharded, shard_model
from forgetting.harness.tracking import Place, Trackers, check_installed
from forgetting.mitigations import build_mitigations, chain, hook_results


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
    refuse_other_engines()
    adopt_slurm_tasks()  # srun's processes: the variables torchrun would have set
    precision, why = resolve_precision(job.train.precision)
    # cpu=True when no accelerator is present: that is what makes accelerate use gloo under torchrun
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=not accelerator_present())
    if accelerator.is_main_process:
        print(f"precision: {precision} ({why})", flush=True)
    return accelerator


def refuse_other_engines() -> None:
    """`accelerate launch` with a DeepSpeed or accelerate-FSDP config would wrap the model its own way: refuse."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        raise UserError(
            "DeepSpeed is not supported: launch without a DeepSpeed config and set train.distributed=fsdp "
            "(PyTorch FSDP2 shards parameters, gradients and optimizer state as ZeRO-3 does)"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise UserError(
            "accelerate's FSDP config is not used: launch without it and set train.distributed=fsdp (the "
            "harness shards the model itself, so that every mitigation sees the shards)"
        )


def compile_model(model: torch.nn.Module, device: torch.device) -> None:
    """torch.compile the model in place (its state_dict keys and checkpoints stay as they are).

    Shapes vary with each micro-batch's width; torch marks the varying sizes dynamic after the first
    recompile, so a run compiles about twice. On a CPU inductor builds C++ kernels: a compiler must exist.
    """
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise UserError(
            "train.compile: torch.compile on a CPU needs a C++ compiler (g++ or clang++) on PATH; "
            "install one or set train.compile=false"
        )
    model.compile()


def use_packing(t, model, device: torch.device) -> bool:
    """Whether micro-batches are packed: `train.packing`, with auto = packed on a CPU without compile.

    On GPUs the per-sequence attention calls cost kernel launches that padding does not, so auto pads there.
    """
    if t.packing == "packed" and not packing.supports_packing(model):
        raise UserError(
            f"train.packing=packed needs SDPA attention; this model uses "
            f"{packing.transformers_model(model).config._attn_implementation!r} "
            f"(set model.attn_implementation=sdpa or train.packing=padded)"
        )
    if t.packing == "auto":
        return device.type == "cpu" and not t.compile and packing.supports_packing(model)
    return t.packing == "packed"


def loss_step(model, batch: dict[str, torch.Tensor], scale: float, penalties: list) -> torch.Tensor:
    """One micro-batch's contribution to the step loss: summed response CE x scale, plus any penalties."""
    loss = summed_response_loss(model, batch) * scale
    return loss + sum(penalties) if penalties else loss


def accumulate_gradients(
    model,
    accelerator,
    examples: list[Example],
    micro_batch_tokens: int,
    pad_id: int,
    scale: float,
    penalties,
    packed: bool = False,
    filler: Example | None = None,
) -> tuple[torch.Tensor, int, int]:
    """Forward and backward every micro-batch of `examples` (this process's share of one optimizer step).

    Micro-batches are packed rows (`harness.packing`, the model's attention switched to packed) or padded
    ones. Under DDP gradients are synchronised only on the last micro-batch; a sharded model reduce-scatters
    after each (its full gradients never exist), and every process runs as many micro-batches as the busiest
    one (the extra ones are `filler` with loss x 0: forwards of a sharded model are collectives). The last
    micro-batch carries the mitigations' penalty terms (`penalties()` is called once per step). Returns (the
    step's response loss on this process, padded tokens, real tokens).
    """
    lengths = [len(e) for e in examples]
    groups = micro_batches(list(range(len(examples))), lengths, micro_batch_tokens, packed=packed)
    sharded = is_sharded(model)
    batches = [[examples[j] for j in group] for group in groups]
    extra = _missing_micro_batches(len(batches), accelerator) if sharded else 0
    weights = [scale] * len(batches) + [0.0] * extra
    batches += [[filler or examples[0]]] * extra
    step_loss = torch.zeros((), device=accelerator.device)
    padded = real = 0
    for i, (rows, weight) in enumerate(zip(batches, weights)):
        last = i == len(batches) - 1
        batch = packing.pack(rows) if packed else collate(rows, pad_id)
        if weight:
            padded += batch["input_ids"].numel()
            real += sum(len(e) for e in rows)
        batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with nullcontext() if last or sharded else accelerator.no_sync(model), accelerator.autocast():
            terms = penalties() if last else []
            loss = loss_step(model, batch, weight, terms)
            loss.backward() if sharded else accelerator.backward(loss)
        step_loss += (loss - sum(terms)).detach() if terms else loss.detach()
    return step_loss, padded, real


def _missing_micro_batches(count: int, accelerator) -> int:
    """How many micro-batches fewer than the busiest process this one has."""
    most = torch.tensor([count], device=accelerator.device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most.item()) - count


def finished_run(job: TrainJob, output_dir: Path) -> bool:
    """Claim `output_dir` for `job` (read-only: refuses another run's directory); True when it holds the
    finished run."""
    existing = claim_run_dir(
        output_dir, ckpt.CONFIG_NAME, to_dict(job), lambda config: comparable(upgrade_job(config)), write=False
    )
    return existing and (output_dir / "final" / "trainer_state.json").is_file()


class EvalPoints(Protocol):
    """Evaluations during training (a forgetting curve): `steps(total)` names the optimizer steps to evaluate after
    (0: before the first), `__call__` evaluates the model there; both on the main process only."""

    def steps(self, total: int) -> Iterable[int]: ...

    def __call__(self, step: int, model, tokenizer, heldout_loss: float | None) -> None: ...


def train(
    job: TrainJob,
    accelerator=None,
    on_step=None,
    eval_points: EvalPoints | None = None,
    trackers: Trackers | None = None,
) -> TrainResult:
    """Fine-tune `job.model` on `job.data` with `job.mitigations`; resume from `job.output_dir` if possible.

    `on_step(done, total, loss)` is called on the main process after each optimizer step (progress display).
    `eval_points(step, model, tokenizer, heldout_loss)` is called on the main process after each step that
    `eval_points.steps(total)` names, and before the first (step 0) when it is named and the run starts from
    scratch, with the unwrapped model in eval mode and the held-out loss there (None without a held-out split);
    the training is bitwise the same as without it (module docstring). A finished run calls neither.

    `trackers` (an experiment's unit: its runs, started here and finished by the caller): where the config, the
    metrics.jsonl records and the held-out losses are logged too; without them a job with `train.log_with` opens
    its own runs, named after its output directory, and finishes them however training ends.

    Without an `accelerator` the job makes its own, and leaves none of its settings behind: accelerate keeps
    process-wide state (the mixed precision) that would otherwise refuse the next job's or leak into it
    (an experiment trains its units one after another in one process). The process group, if any, is kept.
    """
    if accelerator is not None:
        return _train(job, accelerator, on_step, eval_points, trackers)
    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        return _train(job, make_accelerator(job), on_step, eval_points, trackers)
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)


def _train(job: TrainJob, accelerator, on_step, eval_points: EvalPoints | None, trackers) -> TrainResult:
    check_installed(job.train.log_with)
    if finished_run(job, Path(job.output_dir)):
        return _finished_result(Path(job.output_dir), accelerator.is_main_process)
    own = trackers is None  # else the caller's (an experiment's unit), which it finishes
    if own:
        trackers = job_trackers(job) if accelerator.is_main_process else Trackers()
    # finished however training ends (as failed on an error): a run left open shows as running for ever
    with trackers if own else nullcontext():
        run = setup(job, accelerator)
        run.trackers = trackers
        trackers.start()
        resume(run)
        train_loop(run, on_step, eval_points)
        return finish(run)


def job_trackers(job: TrainJob) -> Trackers:
    """A plain job's runs: named after its output directory, TensorBoard's in <output_dir>/tensorboard."""
    out = Path(job.output_dir)
    place = Place(name=out.resolve().name, group=None, root=out, tensorboard_dir=out / "tensorboard")
    return Trackers(job.train.log_with, job.train.tracker_project, place, to_dict(job))


@dataclass
class Run:
    """What `setup` builds for one run and the loop reads; the running token counts are the loop's."""

    job: TrainJob
    accelerator: Any
    tokenizer: Any
    examples: list[Example]  # the SFT data after the mitigations' mix_data
    data_stats: DataStats
    heldout: list[Example] | None
    model: Any  # as accelerate prepared it (DDP-wrapped under torchrun)
    mitigations: list
    ctx: TrainContext
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps: list[list[int]]  # the example indices of every optimizer step
    checkpoints: list[tuple[int, Path]]  # (step, directory) of the complete checkpoints, oldest first
    trainable: list[torch.nn.Parameter]  # what the gradient clipping sees
    lengths: list[int]  # of each example, in tokens
    packed: bool = False  # micro-batches packed (decided when the loop starts)
    padded_tokens: int = 0  # this process's micro-batch tokens so far, padding included
    real_tokens: int = 0
    last: StepNumbers | None = None  # the latest step's numbers
    heldout_at_start: float | None = None  # the held-out loss before the first step (a run from scratch)
    eval_steps: frozenset[int] = frozenset()  # the steps evaluated after (eval_points; main process)
    trackers: Trackers = field(default_factory=Trackers)  # the experiment trackers' runs (main process)

    @property
    def start(self) -> int:
        return self.ctx.start_step

    @property
    def output_dir(self) -> Path:
        return self.ctx.output_dir

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass(frozen=True)
class StepNumbers:
    """What one optimizer step measured; the loss is the global one, the padding this process's so far."""

    loss: float
    lr: float  # the learning rate the step was taken with
    grad_norm: float  # before clipping
    tokens: int
    target_tokens: int
    seconds: float
    padding_fraction: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


# ---- setup: data, model and mitigations, optimizer and the step plan


def setup(job: TrainJob, accelerator) -> Run:
    """Everything the loop needs, in an order that keeps runs reproducible (the seed is set first)."""
    set_seed(job.train.seed)
    tokenizer = load_tokenizer(job.model)
    attach_format(tokenizer, job.data.format)
    examples, data_stats, heldout = load_data(job, tokenizer, accelerator)
    sharded = sharding_on(job, accelerator)
    model = base_model(job, tokenizer, empty=sharded and not accelerator.is_main_process)
    mitigations = build_mitigations(job.mitigations)
    checkpoints = ckpt.checkpoint_dirs(Path(job.output_dir))  # resume from the newest complete one, if any
    ctx = TrainContext(
        job,
        tokenizer,
        accelerator,
        tuple(examples),
        Path(job.output_dir),
        start_step=checkpoints[-1][0] if checkpoints else 0,
    )
    model = chain(mitigations, "wrap_model", model, ctx)
    if sharded:
        shard_model(model, accelerator.device, compute_dtype(accelerator))
    else:
        model.to(accelerator.device)
    if job.train.compile:
        compile_model(model, accelerator.device)
    examples = list(chain(mitigations, "mix_data", examples, model, ctx))
    hook_results(mitigations, "prepare", model, ctx)
    model, optimizer, scheduler, steps = optimization(job, accelerator, model, mitigations, ctx, len(examples))
    return Run(
        job,
        accelerator,
        tokenizer,
        examples,
        data_stats,
        heldout,
        model,
        mitigations,
        ctx,
        optimizer,
        scheduler,
        steps,
        checkpoints,
        trainable=[p for p in model.parameters() if p.requires_grad],
        lengths=[len(e) for e in examples],
    )


def base_model(job: TrainJob, tokenizer, empty: bool):
    """The model to fine-tune, the same whatever the seed; `empty`: its architecture on the meta device, for a
    process whose shards the main process fills (harness.sharding)."""
    if empty:
        model = empty_model(job.model, vocab_size=len(tokenizer))
    else:
        model = load_model(job.model, for_training=True, vocab_size=len(tokenizer))
    model.config.use_cache = False
    if job.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def sharding_on(job: TrainJob, accelerator) -> bool:
    """Whether the model is sharded: `train.distributed=fsdp` in a process group (torchrun, accelerate launch)."""
    if job.train.distributed != "fsdp":
        return False
    if not torch.distributed.is_initialized():
        if accelerator.is_main_process:
            print("train.distributed=fsdp: one process without a launcher; nothing to shard, training unsharded")
        return False
    return True


def load_data(job: TrainJob, tokenizer, accelerator) -> tuple[list[Example], DataStats, list[Example] | None]:
    """Records -> conversations -> tokens with response-only labels, for the SFT data and the held-out split
    (None without one). The main process writes the run's config beside them and says what the data is."""
    examples, data_stats = tokenize_all(load_conversations(job.data), tokenizer, job.data)
    heldout_config = job.data.heldout()
    heldout = tokenize_all(load_conversations(heldout_config), tokenizer, heldout_config)[0] if heldout_config else None
    if job.train.memory_check:  # before anything is written or loaded: a run that cannot fit stops here
        check_fits(job, accelerator.num_processes, accelerator.device, examples=examples)
    accelerator.wait_for_everyone()  # every process has checked output_dir before it is written
    output_dir = Path(job.output_dir)
    if accelerator.is_main_process and not (output_dir / ckpt.CONFIG_NAME).is_file():
        atomic_write_yaml(output_dir / ckpt.CONFIG_NAME, to_dict(job))
    if accelerator.is_main_process:
        print(
            f"data: {data_stats.examples} examples ({data_stats.truncated} truncated, "
            f"{data_stats.dropped_truncated} dropped: response cut away by max_seq_len={job.data.max_seq_len}); "
            f"{data_stats.target_tokens} of {data_stats.tokens} tokens are response tokens",
            flush=True,
        )
    return examples, data_stats, heldout


def optimization(job: TrainJob, accelerator, model, mitigations: list, ctx: TrainContext, n_examples: int):
    """AdamW over a mitigation's parameter groups (or the default ones), the step plan and the LR schedule;
    returns (model, optimizer) as accelerate prepared them, the scheduler and the steps."""
    t = job.train
    if accelerator.num_processes > t.batch_size:
        raise UserError(f"train.batch_size={t.batch_size} is smaller than the {accelerator.num_processes} processes")
    groups = next(iter(hook_results(mitigations, "param_groups", model, ctx)), None)  # at most one (registry)
    optimizer = make_optimizer(groups or default_param_groups(model, t.weight_decay), t, accelerator.device)
    steps = plan_steps(n_examples, t.batch_size, t.epochs, t.max_steps, t.seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, len(steps), t.warmup_ratio, t.schedule, t.min_lr_ratio)
    )
    if not is_sharded(model):  # DDP wrapping; a sharded model is already distributed
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(scheduler)
    model.train()
    return model, optimizer, scheduler, steps


# ---- resume


def resume(run: Run) -> None:
    """Load the newest complete checkpoint, if any, and cut metrics.jsonl back to the step resumed at; a run
    from step 0 starts it with the held-out loss before training."""
    if run.checkpoints:
        path = run.checkpoints[-1][1]
        ckpt.load_state(run.accelerator, run.model, run.optimizer, run.scheduler, path / "state")
        if run.is_main:
            print(f"resuming from {path} (step {run.start} of {len(run.steps)})", flush=True)
    loss = None
    if run.heldout is not None and run.start == 0 and (run.is_main or is_sharded(run.model)):
        loss = heldout_loss(run.accelerator, run.model, run.heldout, run.tokenizer, run.job.train)
    run.heldout_at_start = loss
    if not run.is_main:
        return
    lines = run.metrics_path.read_text().splitlines() if run.metrics_path.exists() else []
    keep = [line for line in lines if _logged_step(line) <= run.start]
    if loss is not None:
        keep = [json.dumps({"step": 0, "heldout_loss": loss})]
    atomic_write_text(run.metrics_path, "".join(line + "\n" for line in keep))
    for line in keep:  # the runs get what metrics.jsonl holds (a resumed run: its earlier steps too)
        record = json.loads(line)
        run.trackers.log(_tracked(record), record["step"])


# ---- the loop


def train_loop(run: Run, on_step=None, eval_points: EvalPoints | None = None) -> None:
    """Every optimizer step from `run.start` on, with the model patched for speed only while they run (the
    patches are undone however the loop ends, and while an evaluation runs); `eval_points` evaluates after the
    steps it names, before that step's checkpoint (a run killed while evaluating redoes the point)."""
    t = run.job.train
    model = run.accelerator.unwrap_model(run.model)
    run.packed = use_packing(t, model, run.accelerator.device)
    if eval_points is not None and is_sharded(run.model):
        raise UserError("eval.every: a sharded model (train.distributed=fsdp) cannot be evaluated in place yet")
    if eval_points is not None and run.is_main:
        run.eval_steps = frozenset(eval_points.steps(len(run.steps)))
    if run.is_main:
        print(
            f"micro-batches: {'packed, no padding' if run.packed else 'padded'} (train.packing={t.packing}), "
            f"up to {t.micro_batch_tokens} tokens each",
            flush=True,
        )
    with SpeedPatches(model, run.packed) as patches, closing(StepLog(run, on_step)) as log, StopRequests() as stop:
        if run.start == 0:
            evaluate_at(run, 0, eval_points, patches)
        for step in range(run.start, len(run.steps)):
            numbers = train_step(run, step)
            log(step, numbers)
            evaluate_at(run, step + 1, eval_points, patches)
            maybe_checkpoint(run, step)
            if stop.requested(run.accelerator) and step + 1 < len(run.steps):
                stop_with_checkpoint(run, step, stop.signal_name)


class SpeedPatches:
    """The model's patches for training speed while the loop runs: packed attention (when micro-batches are
    packed) and, exact, the last layer's MLP and output projection only where a logit is taken
    (harness.last_layer). `off()` lifts them for a block: an evaluation sees the model as it is saved."""

    def __init__(self, model, packed: bool):
        self.model, self.packed, self.undo = model, packed, []

    def __enter__(self) -> SpeedPatches:
        self.undo = ([packing.enable(self.model)] if self.packed else []) + [last_layer.enable(self.model)]
        return self

    def __exit__(self, *exc) -> None:
        while self.undo:
            self.undo.pop()()

    @contextmanager
    def off(self) -> Iterator[None]:
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()


def evaluate_at(run: Run, done: int, eval_points: EvalPoints | None, patches: SpeedPatches) -> None:
    """`eval_points` at step `done` (0: before the first) when it asks for it, on the main process: the unwrapped
    model in eval mode under no_grad, unpatched, compiled code run eagerly (no recompiling for new shapes), and
    the random generators as they were (lm-eval seeds them), so the training goes on exactly as without it."""
    if done not in run.eval_steps:
        return
    model = run.accelerator.unwrap_model(run.model)
    with patches.off(), random_state_kept(), torch.compiler.set_stance("force_eager"), torch.no_grad():
        loss = run.heldout_at_start if done == 0 else None
        if done and run.heldout is not None:
            loss = heldout_loss(run.accelerator, run.model, run.heldout, run.tokenizer, run.job.train)
        model.eval()
        try:
            eval_points(done, model, run.tokenizer, loss)
        finally:
            model.train()


@contextmanager
def random_state_kept() -> Iterator[None]:
    """Python's, NumPy's and torch's global random generators (CPU and every CUDA device) as they were before the
    block, whatever it seeded or drew."""
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def train_step(run: Run, step: int) -> StepNumbers:
    """One optimizer step: this process's micro-batches (+ penalties), penalty_grad, clip, AdamW, LR schedule.
    Returns the step's numbers, also kept as `run.last`."""
    started = time.perf_counter()
    accelerator, t, model = run.accelerator, run.job.train, run.model
    step_examples = [run.examples[i] for i in run.steps[step]]
    scale = accelerator.num_processes / max(1, target_tokens(step_examples))  # DDP averages over processes
    share = rank_share(run.steps[step], run.lengths, accelerator.process_index, accelerator.num_processes)
    step_loss, padded, real = accumulate_gradients(
        model,
        accelerator,
        [run.examples[j] for j in share],
        t.micro_batch_tokens,
        run.tokenizer.pad_token_id,
        scale,
        lambda: hook_results(run.mitigations, "penalty", model, run.ctx),
        packed=run.packed,
        filler=step_examples[0],
    )
    _check_packed_attention(run)
    run.padded_tokens += padded
    run.real_tokens += real
    hook_results(run.mitigations, "penalty_grad", model, run.ctx)
    if is_sharded(model):  # the norm over all shards (a DTensor), as one process's norm would be
        grad_norm = full(torch.nn.utils.clip_grad_norm_(run.trainable, t.grad_clip or math.inf))
    else:
        grad_norm = accelerator.clip_grad_norm_(run.trainable, t.grad_clip or math.inf)
    step_loss = accelerator.reduce(step_loss, reduction="sum") / accelerator.num_processes
    loss, norm = torch.stack([step_loss, grad_norm.to(step_loss)]).tolist()  # the step's one host sync
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise RunError(
            f"non-finite loss ({loss}) or gradient norm ({norm}) at step {step + 1}; not applied; "
            f"the last good checkpoint is kept in {run.output_dir}; lower train.lr or check the data"
        )
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    run.last = StepNumbers(
        loss=loss,
        lr=lr,
        grad_norm=norm,
        tokens=sum(len(e) for e in step_examples),
        target_tokens=target_tokens(step_examples),
        seconds=seconds,
        padding_fraction=1 - run.real_tokens / max(1, run.padded_tokens),
    )
    return run.last


def _check_packed_attention(run: Run) -> None:
    """Packed rows are only safe when the attention went through the packed kernel (harness.packing)."""
    if run.packed and packing.CALLS["packed"] == 0:
        raise RunError(
            "train.packing: the model's attention did not go through transformers' attention "
            "interface, so packed sequences could see each other; set train.packing=padded"
        )


class StepLog:
    """Where a finished step's numbers go: metrics.jsonl and the trackers every `train.log_every` steps and at
    the last, the progress bar and `on_step` at every step (main process)."""

    def __init__(self, run: Run, on_step=None):
        self.run, self.on_step = run, on_step
        self.progress = _progress_bar(run.job, run.is_main, run.start, len(run.steps))

    def __call__(self, step: int, numbers: StepNumbers) -> None:
        done, total = step + 1, len(self.run.steps)
        if self.run.is_main and (done % self.run.job.train.log_every == 0 or done == total):
            self.write(done, numbers)
        self.progress.update(1)
        self.progress.set_postfix(
            loss=f"{numbers.loss:.4f}", lr=f"{numbers.lr:.2e}", tok_s=f"{numbers.tokens_per_s:.0f}"
        )
        if self.on_step is not None and self.run.is_main:
            self.on_step(done, total, numbers.loss)

    def write(self, done: int, numbers: StepNumbers) -> None:
        record = {
            "step": done,
            "loss": numbers.loss,
            "lr": numbers.lr,
            "grad_norm": numbers.grad_norm,
            "tokens": numbers.tokens,
            "target_tokens": numbers.target_tokens,
            "tokens_per_s": numbers.tokens_per_s,
            "padding_fraction": numbers.padding_fraction,
            "seconds": numbers.seconds,
        }
        with open(self.run.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.run.trackers.log(_tracked(record), done)

    def close(self) -> None:
        self.progress.close()


class StopRequests:
    """While the loop runs, SIGTERM, SIGUSR1 and SIGUSR2 (what Slurm sends before preemption or the time limit:
    SIGTERM, or the signal of `--signal`, USR2 under submitit) ask it to stop after the current step instead of
    dying mid-step; the previous handlers come back afterwards."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")

    def __init__(self):
        self.signal_name: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for name in self.SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame) -> None:
        self.signal_name = signal.Signals(number).name

    def requested(self, accelerator) -> bool:
        """Whether any process was asked to stop (all processes stop at the same step)."""
        asked = torch.tensor([1.0 if self.signal_name else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            asked = accelerator.reduce(asked, reduction="sum")
        return bool(asked.item())

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def stop_with_checkpoint(run: Run, step: int, signal_name: str | None) -> None:
    """Save a resumable checkpoint after `step` (unless one was just saved) and raise Preempted."""
    done = step + 1
    if not (run.job.train.save_every and done % run.job.train.save_every == 0):
        save_resumable(run, done)
    raise Preempted(
        f"stopped on {signal_name or 'a signal in another process'} after step {done} of {len(run.steps)}; "
        f"checkpoint saved in {run.output_dir}; run the same command again to resume"
    )


def maybe_checkpoint(run: Run, step: int) -> None:
    """Every `train.save_every` steps except the last (the final checkpoint follows): model and resume state."""
    t, done = run.job.train, step + 1
    if t.save_every and done % t.save_every == 0 and done != len(run.steps):
        save_resumable(run, done)


def save_resumable(run: Run, done: int) -> None:
    """`checkpoint-<done>`: the model (unless sharded) and the resume state; older ones pruned."""
    ckpt.save_checkpoint(
        run.accelerator,
        run.model,
        run.tokenizer,
        run.job,
        run.output_dir,
        f"checkpoint-{done:06d}",
        state=(run.optimizer, run.scheduler),
        extra={"step": done},
    )
    if run.is_main:
        ckpt.prune_checkpoints(run.output_dir, max(1, run.job.train.keep_checkpoints))


# ---- finish


def finish(run: Run) -> TrainResult:
    """The mitigations' reports, the held-out loss after training, and the final checkpoint with the summary."""
    accelerator, model = run.accelerator, run.model
    padded, real = accelerator.reduce(
        torch.tensor([run.padded_tokens, run.real_tokens], device=accelerator.device), reduction="sum"
    ).tolist()
    reporting = [m.name for m in run.mitigations if hasattr(m, "report")]
    reports = dict(zip(reporting, hook_results(run.mitigations, "report", model, run.ctx), strict=True))
    result = TrainResult(
        final_dir=run.output_dir / "final",
        steps=len(run.steps),
        data=run.data_stats,
        last_loss=run.last.loss if run.last else None,
        tokens_per_second=run.last.tokens_per_s if run.last else None,
        padding_fraction=1 - real / max(1, padded),
        heldout_loss=_heldout_losses(run),
        mitigation_reports=reports,
    )
    summary = {k: v for k, v in asdict(result).items() if k != "final_dir"}
    ckpt.save_checkpoint(
        accelerator,
        model,
        run.tokenizer,
        run.job,
        run.output_dir,
        "final",
        state=None,
        extra=summary,
        extras=lambda staging: hook_results(run.mitigations, "export", staging, run.ctx),
    )
    if run.is_main:
        ckpt.prune_checkpoints(run.output_dir, run.job.train.keep_checkpoints)
    return result


def _heldout_losses(run: Run) -> dict | None:
    """The held-out loss before (metrics.jsonl's first line) and after training; on the main process only (a
    sharded model's forward takes every process)."""
    if run.heldout is None or not (run.is_main or is_sharded(run.model)):
        return None
    after = heldout_loss(run.accelerator, run.model, run.heldout, run.tokenizer, run.job.train)
    if not run.is_main:
        return None
    before = json.loads(run.metrics_path.read_text().splitlines()[0])["heldout_loss"]
    run.trackers.log({"eval/heldout_loss": after}, len(run.steps))
    return {"before": before, "after": after, "examples": len(run.heldout), "split": run.job.data.eval_split}


def _tracked(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as the trackers get it: `train/<key>`, and the held-out loss as `eval/heldout_loss`."""
    return {f"eval/{k}" if k == "heldout_loss" else f"train/{k}": v for k, v in record.items() if k != "step"}


def _finished_result(output_dir: Path, is_main: bool) -> TrainResult:
    """The result of the finished run in `output_dir`, read back from its final checkpoint."""
    if is_main:
        print(f"{output_dir} already holds the finished run; nothing to train", flush=True)
    summary = json.loads((output_dir / "final" / "trainer_state.json").read_text())
    summary["data"] = DataStats(**summary["data"])
    summary["final_dir"] = output_dir / "final"
    return TrainResult(**summary)


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a crash mid-append counts as never written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def heldout_loss(accelerator, model, examples: list[Example], tokenizer, t) -> float:
    """Mean response loss on held-out examples (unwrapped model, eval mode): the main process, or every process
    of a sharded model."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    with accelerator.autocast():
        value = mean_response_loss(unwrapped, examples, tokenizer.pad_token_id, t.micro_batch_tokens)
    unwrapped.train()
    return value


def _progress_bar(job: TrainJob, is_main: bool, start: int, total: int):
    return tqdm(
        total=total,
        initial=start,
        disable=not (is_main and job.train.progress),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
