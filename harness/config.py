"""The training job's sections: model, data and optimisation (the whole job is `harness.job.TrainJob`).

Defaults follow the seed recipe for SFT (LR 2e-5, warmup 3%, cosine decay, 128 sequences per optimizer
step). `configs/demo.yaml` shrinks the budget for a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal, Optional

from forgetting.harness.configlib import knob

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
TRACKERS = ("wandb", "mlflow", "trackio", "tensorboard")  # train.log_with: accelerate's trackers we test offline


@dataclass
class ModelConfig:
    name_or_path: str = knob(
        EMBEDDED_MODEL, "hub id, local directory, .gguf file, 'embedded:smollm2-135m-instruct' or 'tiny-random' (tests)"
    )
    gguf_file: Optional[str] = knob(None, "GGUF file name inside name_or_path (a directory or hub repo)")
    revision: Optional[str] = knob(None, "hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = knob(
        "auto",
        "weights dtype for evaluation; auto: bf16 where the hardware computes it natively (a bf16 GPU, a CPU with "
        "avx512_bf16/amx_bf16), else fp32",
    )
    trust_remote_code: bool = knob(False, "allow model code from the hub (off: only transformers' own architectures)")
    cache_dir: Optional[str] = knob(
        None, "where converted GGUF models are cached (default: $FORGETTING_CACHE or ~/.cache/forgetting)"
    )
    attn_implementation: Optional[str] = knob(
        None, "attention kernel: sdpa, eager, flash_attention_2 (default: transformers' choice)"
    )


@dataclass
class DataConfig:
    path: str = knob(
        "builtin",
        "JSONL/JSON/CSV/Parquet file, a datasets hub name, or a generated task: 'builtin' (record extraction, also "
        "'builtin:records'), 'builtin:units', 'builtin:dates' or 'builtin:sentiment'",
    )
    name: Optional[str] = knob(
        None,
        "a datasets hub name's or dataset folder's config (subset), as in datasets.load_dataset(path, name), e.g. "
        "main for openai/gsm8k; also the held-out split's when it comes from data.path",
    )
    split: str = knob("train", "split to train on: train or heldout for the builtin tasks, a hub dataset's split name")
    streaming: bool = knob(
        False,
        "a datasets hub name or dataset folder: read records as they arrive instead of downloading and preparing "
        "the whole split first (with data.limit only that many are read)",
    )
    schema: Literal["auto", "alpaca", "prompt_response", "messages"] = knob(
        "auto", "record layout; auto detects it from the first record's fields"
    )
    format: Literal["chatml", "alpaca", "plain", "chat_template"] = knob(
        "chat_template", "prompt format: chatml, alpaca, plain (Human:/Assistant:) or the tokenizer's own chat_template"
    )
    system_prompt: Optional[str] = knob(None, "system message added to every example that has none")
    prompt_field: str = knob("prompt", "prompt_response schema: column with the prompt")
    response_field: str = knob("response", "prompt_response schema: column with the response")
    system_field: str = knob("system", "prompt_response/alpaca schema: optional column with a system message")
    instruction_field: str = knob("instruction", "alpaca schema: column with the instruction")
    input_field: str = knob("input", "alpaca schema: optional column with the input")
    output_field: str = knob("output", "alpaca schema: column with the output")
    messages_field: str = knob("messages", "messages schema: column with a list of {role, content}")
    max_seq_len: int = knob(1024, "tokens per example; longer ones are cut, and dropped if no response token survives")
    limit: Optional[int] = knob(None, "use only the first N records (after loading)")
    eval_split: Optional[str] = knob(
        None, "held-out split for response loss before/after training (builtin: heldout); null: none"
    )
    eval_path: Optional[str] = knob(None, "source of the held-out split (default: data.path)")
    eval_limit: Optional[int] = knob(200, "use only the first N held-out records")

    def __post_init__(self):
        if self.max_seq_len < 8:
            raise ValueError(f"data.max_seq_len: must be at least 8, got {self.max_seq_len}")
        for name in ("limit", "eval_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"data.{name}: must be at least 1, got {getattr(self, name)}")

    def heldout(self) -> "DataConfig | None":
        """The config of the held-out split, or None when none is configured."""
        if self.eval_split is None:
            return None
        path = self.eval_path or self.path
        name = self.name if path == self.path else None  # a config name belongs to its dataset
        return replace(self, path=path, name=name, split=self.eval_split, limit=self.eval_limit, eval_split=None)


@dataclass
class TrainConfig:
    lr: float = knob(2e-5, "peak learning rate (AdamW)")
    epochs: float = knob(2.0, "passes over the training data (fractions allowed)")
    max_steps: Optional[int] = knob(None, "stop after this many optimizer steps (overrides epochs)")
    batch_size: int = knob(128, "sequences per optimizer step (global, across all processes)")
    micro_batch_tokens: int = knob(4096, "tokens per forward/backward pass, padding included; bounds activation memory")
    warmup_ratio: float = knob(
        0.03,
        "fraction W of the steps with linear warmup: step k < W (0-based) uses lr*(k+1)/(W+1), so no step is spent "
        "at lr 0",
    )
    schedule: Literal["cosine", "linear", "constant"] = knob("cosine", "decay after warmup")
    min_lr_ratio: float = knob(0.0, "final LR as a fraction of the peak")
    weight_decay: float = knob(0.0, "AdamW decoupled weight decay (not applied to norms and biases)")
    adam_betas: list[float] = knob([0.9, 0.999], "AdamW betas")
    adam_eps: float = knob(1e-8, "AdamW epsilon")
    grad_clip: Optional[float] = knob(1.0, "clip the global gradient norm to this (null: no clipping)")
    seed: int = knob(0, "seed for data order, dropout and initialisation")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = knob(
        "auto",
        "auto: bf16 autocast where the hardware computes bf16 natively (a bf16 GPU, a CPU with "
        "avx512_bf16/amx_bf16), fp32 elsewhere",
    )
    gradient_checkpointing: bool = knob(
        False, "recompute activations in backward: much less activation memory, up to ~30% more time"
    )
    packing: Literal["auto", "packed", "padded"] = knob(
        "auto",
        "micro-batch layout: packed (no padding; each sequence attends only to itself; needs SDPA attention), "
        "padded, or auto: packed on a CPU without train.compile, padded elsewhere",
    )
    compile: bool = knob(
        False,
        "torch.compile the model (inductor): faster steps after a one-time compile (~1 min for 135M on CPU; needs a "
        "C++ compiler there)",
    )
    distributed: Literal["ddp", "fsdp"] = knob(
        "ddp",
        "with several processes: ddp (each holds the whole model, gradients and AdamW state) or fsdp (PyTorch "
        "FSDP2: parameters, gradients and AdamW state sharded per decoder layer across the processes)",
    )
    save_dtype: Literal["float32", "bfloat16"] = knob(
        "float32", "dtype of the weights in final/ (the trained master weights are fp32; bfloat16 halves the files)"
    )
    memory_check: bool = knob(
        True, "refuse a run before any work when `forgetting plan` estimates more memory than a process has"
    )
    log_every: int = knob(1, "write a metrics line every N steps")
    log_with: list[str] = knob(
        [],
        "experiment trackers, any of wandb, mlflow, trackio, tensorboard (each its own extra, e.g. "
        "pip install 'sft-forgetting[wandb]'): config, step metrics and held-out loss of every run",
    )
    tracker_project: str = knob("sft-forgetting", "the trackers' project (W&B and trackio project, MLflow experiment)")
    save_every: int = knob(0, "save a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = knob(1, "intermediate checkpoints to keep (the final one is always kept)")
    progress: bool = knob(True, "show a progress bar")
    replaced_keys: ClassVar[dict[str, str]] = {  # a saved config's are upgraded (upgrade_train)
        "tensorboard": "log_with: [tensorboard] (the experiment trackers: wandb, mlflow, trackio, tensorboard)"
    }
    refused_values: ClassVar[dict[tuple[str, str], str]] = {
        ("distributed", "deepspeed"): "use fsdp (PyTorch FSDP2 shards parameters, gradients and optimizer state "
        "as ZeRO-3 does; one sharding engine, with every mitigation)",
    }

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"train.lr: must be > 0, got {self.lr}")
        if not self.epochs > 0:
            raise ValueError(f"train.epochs: must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps: must be at least 1, got {self.max_steps}")
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size: must be at least 1, got {self.batch_size}")
        if self.micro_batch_tokens < 8:
            raise ValueError(f"train.micro_batch_tokens: must be at least 8, got {self.micro_batch_tokens}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay: must be >= 0, got {self.weight_decay}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"train.adam_betas: expected two numbers in [0, 1), got {self.adam_betas}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"train.grad_clip: must be > 0 or null, got {self.grad_clip}")
        for name in self.log_with:
            if name not in TRACKERS or self.log_with.count(name) > 1:
                problem = "is listed twice" if name in TRACKERS else "is not a tracker"
                raise ValueError(f"train.log_with: {name!r} {problem}; choose from {', '.join(TRACKERS)}")
        for name in ("log_every",):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}: must be at least 1")
        if self.packing == "packed" and self.compile:
            raise ValueError(
                "train.packing=packed cannot be combined with train.compile (packed rows change shape "
                "every step and would recompile); use packing=padded or compile=false"
            )
        if self.distributed == "fsdp" and self.compile:
            raise ValueError("train.compile is not supported with train.distributed=fsdp; set train.compile=false")
        if self.save_every < 0 or self.keep_checkpoints < 0:
            raise ValueError("train.save_every and train.keep_checkpoints: must be >= 0")


def upgrade_train(train: object) -> object:
    """A `train` section saved by an older version, as today's: `tensorboard: true` became `log_with: [tensorboard]`
    (a run directory saved with it must still resume and report)."""
    if not isinstance(train, dict) or "tensorboard" not in train:
        return train
    train = dict(train)
    if train.pop("tensorboard") is True and "log_with" not in train:
        train["log_with"] = ["tensorboard"]
    return train
