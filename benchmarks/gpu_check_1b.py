"""The GPU check's 1b mode: full fine-tuning of a 1B-class Llama on one GPU, this harness's loop against HF Trainer.

Goal: the harness's own loop at MFU >= 40% and >= 1.3x HF Trainer's tokens/s on the same data (torchtitan reports
33-39% MFU for Llama-3 8B on H100). No numbers exist until a GPU runs this; BENCHMARKS.md records them.

What runs, in one process on one GPU, each system after the other (a fresh model each time):
  model     random init from a LlamaConfig shaped like Llama-3.2-1B (hidden 2048, 16 layers, 32 heads, 8 KV heads,
            intermediate 8192, vocab 128256, tied embeddings; 1.24B parameters), saved once with save_pretrained
            (bf16) into a temp dir with a word-level tokenizer built here (no download); both systems load it in
            fp32 (master weights) and train with bf16 autocast, fused AdamW, clipping at 1.0.
  data      1536 synthetic prompt/response pairs in a JSONL (lognormal lengths: prompt median 120 tokens, response
            median 220, at most 1024 in all; ChatML: 460 tokens on average, median 399, p90 836, 63% response),
            tokenized once by the harness (response-only labels); 64 sequences (~29k tokens) per optimizer step, so
            the 24 steps (4 warm-up, 20 timed) are one epoch for both systems.
  harness   `harness.train.train` with model.name_or_path=<that dir>, train.precision=bf16, and
              harness_padded        train.packing=padded (length-sorted micro-batches, SDPA with a padding mask)
              harness_packed        train.packing=packed (harness.packing: one row per micro-batch, one SDPA call
                                    per sequence)
              harness_packed_flex   the proposed GPU packing (not shipped): packed rows through flex_attention with
                                    transformers' block-diagonal BlockMask, by swapping what harness.packing
                                    registers for its attention name, in this process only
            micro-batches of at most 4096 padded tokens (train.micro_batch_tokens).
  Trainer   `Trainer.train()` on the same tokenized examples, 8 sequences per micro-batch x 8 accumulation steps,
            bf16=True, optim=adamw_torch_fused, torch_compile off, gradient checkpointing as the harness, and
              trainer_padded        DataCollatorForSeq2Seq + train_sampling_strategy=group_by_length, SDPA
              trainer_flat_sdpa     DataCollatorWithFlattening (padding-free), SDPA with a dense block-diagonal mask
              trainer_flat_flex     DataCollatorWithFlattening, flex_attention with the block-diagonal BlockMask
Measured per variant: real tokens/s (padding not counted) over the timed steps (the clock read after a CUDA sync at
each step's end), MFU = 6 N tokens/s / the GPU's dense bf16 peak (a table of GPU names below, or --peak-tflops;
also against the bf16 matmul peak measured in the same run), peak GPU memory (torch.cuda.max_memory_allocated) and
the ratios harness/Trainer. Writes OUTPUT/gpu_check_1b.json; about 4-6 minutes on an H100 (estimated, not run).
The harness projects only response positions to the vocabulary (`logits_to_keep`), so it executes fewer FLOPs
than 6 N per token: its MFU by the 6 N convention counts work it skips (see benchmarks/flops.py).

Packed attention on a GPU. transformers builds a block-diagonal causal mask itself when a packed row comes with
position ids that restart at each sequence, no attention mask and no cache: masking_utils.py,
`_preprocess_mask_arguments` calls `find_packed_sequence_indices(position_ids)` (sequence ids from the position
steps) and `create_causal_mask` ANDs `packed_sequence_mask_function` into the causal mask function (5.17 and 5.24
alike; 5.24 also remaps the positions). The mask is then built by the attention's mask function: `sdpa_mask`
materialises a dense (1, 1, T, T) boolean mask (correct, but SDPA then computes all T^2 scores and cannot use the
flash kernel), `flex_attention_mask` a BlockMask (blocks of 128 x 128 outside every sequence are skipped). So the
packed GPU paths here are flex_attention, registered under its own name with q, k and v cast to the autocast dtype
first (with fp32 master weights rotary embeddings return fp32 q and k: flex_attention of torch 2.11 may refuse the
mixed dtypes or run in fp32), and `use_cache=False` (with a cache the packed detection is skipped and the
sequences silently see each other). Before timing, each packed attention used is checked: a packed row's logits
must equal those of its sequences run one by one, else the run stops. flex_attention has no backward on a CPU.

Needs: a CUDA GPU (except --tiny), transformers >= 5.20 (the harness's boolean logits_to_keep; the GPU machine's
image has 5.17) and the `datasets` package (the harness reads data with it). On the device machine carry wheels,
prepared here once (versions as in .venv):
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
and run there (carry .whl):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    bash benchmarks/gpu_check.sh 1b "$OUT"
A missing piece stops the run before anything is measured, with one line on stderr and exit status 1; a variant
that fails (out of memory, say) is recorded in the JSON with its error, the others still run, and the exit
status is 1. `--tiny` (or GPU_CHECK_TINY=1): a 2-layer hidden-64 model, 32 short sequences, 4 steps, on the CPU
when there is no GPU (flex variants need a GPU): checks this script in ~30 s; its MFU means nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HARNESS_MIN_TRANSFORMERS = "5.20"  # pyproject.toml: boolean logits_to_keep
FLEX = "gpu_check_flex"  # flex_attention with q, k, v in the autocast dtype (registered by `register_flex`)
# dense bf16 tensor-core peak (no sparsity) by GPU name, most specific first
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
PARTS = {  # name -> (system, layout, attention); run in this order, each Trainer variant beside its harness pair
    "trainer_padded": ("trainer", "padded", "sdpa"),
    "harness_padded": ("harness", "padded", "sdpa"),
    "trainer_flat_sdpa": ("trainer", "flat", "sdpa"),
    "harness_packed": ("harness", "packed", "sdpa"),  # forgetting_packed: SDPA per sequence
    "trainer_flat_flex": ("trainer", "flat", FLEX),  # compiles flex_attention in its warm-up steps
    "harness_packed_flex": ("harness", "packed", FLEX),
}
SHIPPED = ("harness_padded", "harness_packed")  # the harness as it is (harness_packed_flex is a proposal)


@dataclass(frozen=True)
class Size:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    words: int  # the tokenizer's word vocabulary
    prompt_median: float  # tokens
    response_median: float
    max_seq_len: int
    batch: int  # sequences per optimizer step
    warmup: int  # steps left out of the timing
    steps: int  # timed steps
    micro_batch_tokens: int  # the harness's padded tokens per forward/backward
    trainer_micro_batch: int  # the Trainer's sequences per forward/backward


FULL = Size(16, 2048, 32, 8, 8192, 128256, 32000, 120, 220, 1024, 64, 4, 20, 4096, 8)
TINY = Size(2, 64, 4, 2, 128, 512, 400, 12, 20, 96, 8, 1, 3, 128, 2)


class Missing(Exception):
    """Something the run needs is not there: reported as one line, exit status 1."""


# ---- what the run needs


def preflight(variants: list[str], device: str) -> None:
    """Stop before any work when a package, version or the GPU a variant needs is missing."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(HARNESS_MIN_TRANSFORMERS):
        raise Missing(
            f"transformers {transformers.__version__} is older than the harness needs (>= {HARNESS_MIN_TRANSFORMERS}, "
            "boolean logits_to_keep); carry a newer wheel (benchmarks/gpu_check_1b.py's docstring says how)"
        )
    try:
        import accelerate  # noqa: F401
        import datasets  # noqa: F401
        import tokenizers  # noqa: F401

        import forgetting.harness.train  # noqa: F401
    except Exception as err:  # ImportError, or a package too old for another (datasets needs pyarrow >= 24)
        what = getattr(err, "name", None) or type(err).__name__
        raise Missing(f"cannot import what the run needs ({what}): {str(err).splitlines()[0]}; carry wheels") from None
    if any(PARTS[v][2] == FLEX for v in variants):
        if device != "cuda":
            raise Missing(
                f"variants {[v for v in variants if PARTS[v][2] == FLEX]} need a CUDA GPU (flex_attention "
                "has no backward on a CPU)"
            )
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except ImportError as err:
            raise Missing(f"torch {torch.__version__} has no flex_attention: {err}") from None


def peak_bf16(device_name: str, override_tflops: float | None) -> tuple[float, str]:
    """(dense bf16 FLOP/s, where it came from) for `device_name`."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    for key, flops in PEAK_BF16:
        if key.lower() in device_name.lower():
            return flops, f"table: {key} dense bf16"
    raise Missing(f"no dense bf16 peak known for {device_name!r}; pass --peak-tflops (the datasheet's dense bf16)")


# ---- model, tokenizer and data, made here


def build_tokenizer(words: int):
    """A word-level tokenizer: every `w<i>` is one token, ChatML's markers are special tokens (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = SPECIALS + ["system", "user", "assistant"] + [f"w{i}" for i in range(words)]
    model = Tokenizer(models.WordLevel(vocab={name: i for i, name in enumerate(names)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def write_records(path: Path, size: Size, count: int, seed: int = 0) -> None:
    """`count` prompt/response pairs of random words with lognormal lengths that fit `size.max_seq_len` in ChatML."""
    rng = random.Random(seed)
    overhead = 8  # ChatML: <|im_start|> user ... <|im_end|> <|im_start|> assistant ... <|im_end|>, and a spare

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(size.words)}" for _ in range(n))

    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            prompt = min(max(4, round(rng.lognormvariate(math.log(size.prompt_median), 0.9))), size.max_seq_len // 2)
            response = round(rng.lognormvariate(math.log(size.response_median), 0.8))
            response = min(max(4, response), size.max_seq_len - prompt - overhead)
            handle.write(json.dumps({"prompt": words(prompt), "response": words(response)}) + "\n")


def save_model(directory: Path, size: Size, tokenizer, device: str) -> int:
    """A randomly initialised Llama of `size` saved (bf16) with the tokenizer into `directory`; its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=max(2048, 2 * size.max_seq_len),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())  # the tied embedding once
    model.to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    release_memory()
    return parameters


def load_examples(data_config, tokenizer_dir: Path):
    """The examples exactly as the harness tokenizes them (response-only labels), for the Trainer's dataset."""
    from forgetting.harness.config import ModelConfig
    from forgetting.harness.data import load_conversations, tokenize_all
    from forgetting.harness.formats import attach_format
    from forgetting.harness.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tokenizer_dir)))
    attach_format(tokenizer, data_config.format)
    examples, _ = tokenize_all(load_conversations(data_config), tokenizer, data_config)
    return tokenizer, examples


def data_summary(examples) -> dict:
    from forgetting.harness.batching import target_tokens

    lengths = sorted(len(e) for e in examples)
    return {
        "sequences": len(lengths),
        "tokens": sum(lengths),
        "mean_length": sum(lengths) / len(lengths),
        "p50_length": lengths[len(lengths) // 2],
        "p90_length": lengths[int(0.9 * (len(lengths) - 1))],
        "max_length": lengths[-1],
        "response_token_fraction": target_tokens(examples) / sum(lengths),
    }


# ---- packed attention


def flex_attention_autocast(module, query, key, value, attention_mask, **kwargs):
    """transformers' flex_attention_forward with q, k and v in one dtype: the autocast dtype when autocast is on.

    With fp32 master weights the rotary embedding returns fp32 q and k beside a bf16 v; SDPA's autocast rule casts
    them all to bf16, flex_attention (torch 2.11) may refuse the mix or run in fp32.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    device_type = query.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else value.dtype
    query, key, value = (t.to(dtype) for t in (query, key, value))
    return ALL_ATTENTION_FUNCTIONS["flex_attention"](module, query, key, value, attention_mask, **kwargs)


def register_flex(name: str = FLEX, attention=flex_attention_autocast) -> None:
    """Register `attention` under `name` with flex_attention's mask function (a BlockMask; packed rows get the
    block-diagonal one from transformers' packed-sequence detection)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["flex_attention"])


@contextmanager
def harness_packing_through_flex():
    """The proposed GPU packing, in this process only: `harness.packing` registers flex attention (counting packed
    calls as its own attention does) under its attention name instead of one SDPA call per sequence."""
    from forgetting.harness import packing

    def flex_packed(module, query, key, value, attention_mask, segments=None, **kwargs):
        if segments is not None:
            packing.CALLS["packed"] += 1
        return flex_attention_autocast(module, query, key, value, attention_mask, **kwargs)

    original = packing.register
    packing.register = lambda: register_flex(packing.IMPLEMENTATION, flex_packed)
    try:
        yield
    finally:
        packing.register = original
        original()  # the harness's own attention registered again


PROBE_LENGTHS = (37, 150, 20)  # a packed row's sequences, not multiples of flex_attention's 128-token blocks


def probe_model(device: str):
    """A 2-layer Llama (head dim 64, grouped KV heads) for checking packed attention, in fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device).eval()


def packed_row(device: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(input_ids, position_ids restarting per sequence, boundaries) of one packed row of PROBE_LENGTHS."""
    ids = torch.randint(0, 256, (1, sum(PROBE_LENGTHS)), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.cat([torch.arange(n) for n in PROBE_LENGTHS])[None].to(device)
    bounds = [0]
    for n in PROBE_LENGTHS:
        bounds.append(bounds[-1] + n)
    return ids, positions, tuple(bounds)


@torch.no_grad()
def one_by_one(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits of a packed row's sequences run separately through SDPA, concatenated."""
    model.set_attn_implementation("sdpa")
    return torch.cat([model(input_ids=part, use_cache=False).logits[0] for part in ids.split(PROBE_LENGTHS, 1)])


def check_packed_attention(attention: str, device: str, tolerance: float = 1e-2) -> float:
    """Max |logit difference| between a packed row (positions restarting per sequence, no attention mask, no
    cache) run through `attention` and its sequences run one by one through SDPA; `Missing` when they differ (the
    sequences would see each other)."""
    model = probe_model(device)
    ids, positions, _ = packed_row(device)
    alone = one_by_one(model, ids)
    model.set_attn_implementation(attention)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
    difference = (packed.float() - alone.float()).abs().max().item()
    if not difference <= tolerance:
        raise Missing(
            f"packed rows through {attention!r} are not block-diagonal here (max logit difference {difference:.3g} "
            "against the sequences one by one): transformers' packed-sequence detection did not apply"
        )
    return difference


# ---- timing


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device: str) -> None:
    release_memory()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def timed_rate(times: list[float], tokens: list[int], warmup: int, graphs: int) -> dict:
    """Tokens/s over the steps after `warmup`: times[i] is when step i + 1 ended, tokens[i] its real tokens;
    `graphs`: the graphs torch.compile built during the variant (flex_attention's; recompiles in the timed steps
    show as slow steps in step_seconds)."""
    seconds = times[-1] - times[warmup - 1] if warmup else times[-1] - times[0]
    counted = tokens[warmup:] if warmup else tokens[1:]
    steps = len(counted)
    return {
        "steps_timed": steps,
        "tokens_per_s": sum(counted) / seconds,
        "seconds_per_step": seconds / steps,
        "tokens_per_step": sum(counted) / steps,
        "step_seconds": [round(b - a, 4) for a, b in zip(times, times[1:])],  # from step 2 on
        "compiled_graphs": graphs,
    }


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (0 where the counter is not there)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except (ImportError, KeyError, AttributeError):
        return 0


def allow_recompiles(limit: int = 64) -> None:
    """flex_attention recompiles as packed rows change length (then marks it dynamic); past dynamo's recompile
    limit (8) it would fall back to eager flex_attention, which materialises every score: raise the limit."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


# ---- the two systems


@dataclass
class Bench:
    size: Size
    device: str
    workdir: Path
    model_dir: Path
    data_path: Path
    examples: list
    tokenizer: object
    gradient_checkpointing: bool

    @property
    def total_steps(self) -> int:
        return self.size.warmup + self.size.steps


def run_harness(bench: Bench, name: str) -> dict:
    """The harness's own loop, `train.packing` as the variant says; tokens from its metrics.jsonl."""
    from forgetting.harness.config import DataConfig, ModelConfig, TrainConfig
    from forgetting.harness.job import TrainJob
    from forgetting.harness.train import train

    _, layout, attention = PARTS[name]
    s = bench.size
    job = TrainJob(
        model=ModelConfig(name_or_path=str(bench.model_dir)),
        data=DataConfig(path=str(bench.data_path), format="chatml", max_seq_len=s.max_seq_len, eval_split=None),
        train=TrainConfig(
            lr=2e-5,
            max_steps=bench.total_steps,
            batch_size=s.batch,
            micro_batch_tokens=s.micro_batch_tokens,
            precision="bf16",
            packing=layout,
            gradient_checkpointing=bench.gradient_checkpointing,
            save_dtype="bfloat16",
            progress=False,
        ),
        output_dir=str(bench.workdir / f"run-{name}"),
    )
    times: list[float] = []

    def on_step(done, total, loss):
        synchronize(bench.device)
        times.append(time.perf_counter())

    reset_peak(bench.device)
    graphs, started = compiled_graphs(), time.perf_counter()
    with harness_packing_through_flex() if attention == FLEX else _nothing():
        result = train(job, on_step=on_step)
    wall = time.perf_counter() - started
    peak = peak_memory_gib(bench.device)
    lines = [json.loads(line) for line in (Path(job.output_dir) / "metrics.jsonl").read_text().splitlines()]
    tokens = [line["tokens"] for line in lines if "tokens" in line]
    shutil.rmtree(job.output_dir, ignore_errors=True)
    if len(tokens) != len(times):
        raise RuntimeError(f"{len(tokens)} metrics lines for {len(times)} steps")
    return {
        **timed_rate(times, tokens, s.warmup, compiled_graphs() - graphs),
        "peak_memory_gib": peak,
        "wall_s": wall,
        "last_loss": result.last_loss,
        "padding_fraction": result.padding_fraction,
    }


@contextmanager
def _nothing():
    yield


def run_trainer(bench: Bench, name: str) -> dict:
    """`Trainer.train()` on the harness's tokenized examples; real tokens counted as micro-batches enter the model."""
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    _, layout, attention = PARTS[name]
    s = bench.size
    AcceleratorState._reset_state(reset_partial_state=False)  # as harness.train does: no settings carried over
    reset_peak(bench.device)
    graphs, started = compiled_graphs(), time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(bench.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if attention != "sdpa":
        model.set_attn_implementation(attention)
    model.config.use_cache = False  # with a cache, packed rows are not detected (and training needs none)
    counted = {"tokens": torch.zeros((), dtype=torch.long)}

    def count_tokens(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        real = mask.sum() if mask is not None else kwargs["input_ids"].numel()
        counted["tokens"] = counted["tokens"].to(kwargs["input_ids"].device) + real

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    times: list[float] = []
    totals: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            synchronize(bench.device)
            times.append(time.perf_counter())
            totals.append(int(counted["tokens"]))

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    sampling = {}
    if layout == "padded":  # group_by_length became train_sampling_strategy (both in 5.17 and 5.24)
        sampling = (
            {"train_sampling_strategy": "group_by_length"}
            if "train_sampling_strategy" in fields
            else {"group_by_length": True}
        )
    checkpointing = {}  # as the harness: non-reentrant (named only when on: 5.24 renames the argument)
    if bench.gradient_checkpointing:
        checkpointing = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    args = TrainingArguments(
        output_dir=str(bench.workdir / f"trainer-{name}"),
        per_device_train_batch_size=s.trainer_micro_batch,
        gradient_accumulation_steps=s.batch // s.trainer_micro_batch,
        max_steps=bench.total_steps,
        learning_rate=2e-5,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        max_grad_norm=1.0,
        bf16=True,
        optim="adamw_torch_fused",
        torch_compile=False,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=bench.device == "cpu",
        seed=0,
        **sampling,
        **checkpointing,
    )
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in bench.examples])
    if layout == "flat":
        collator = DataCollatorWithFlattening()  # input_ids, labels (first of each sequence -100), position_ids
    else:
        collator = DataCollatorForSeq2Seq(bench.tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[Clock()])
    output = trainer.train()
    wall = time.perf_counter() - started
    peak = peak_memory_gib(bench.device)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    del trainer, model
    AcceleratorState._reset_state(reset_partial_state=False)
    if len(times) != bench.total_steps:
        raise RuntimeError(f"the Trainer ran {len(times)} steps, {bench.total_steps} asked")
    tokens = [b - a for a, b in zip([0] + totals[:-1], totals)]
    return {
        **timed_rate(times, tokens, s.warmup, compiled_graphs() - graphs),
        "peak_memory_gib": peak,
        "wall_s": wall,
        "mean_loss": output.training_loss,
    }


# ---- the run


def default_variants(device: str) -> list[str]:
    return [v for v in PARTS if device == "cuda" or PARTS[v][2] != FLEX]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.environ.get("OUT") or "gpu_check_1b", help="folder for the JSON")
    parser.add_argument(
        "--tiny",
        action="store_true",
        default=os.environ.get("GPU_CHECK_TINY") == "1",
        help="a 2-layer hidden-64 model and a few steps (CPU allowed): checks this script",
    )
    parser.add_argument("--variants", default=None, help="comma-separated, of: " + ", ".join(PARTS))
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per variant")
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps before the timing starts")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per optimizer step (both systems)")
    parser.add_argument("--micro-batch-tokens", type=int, default=None, help="the harness's padded tokens per pass")
    parser.add_argument("--trainer-micro-batch", type=int, default=None, help="the Trainer's sequences per pass")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on for both systems")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: table)")
    parser.add_argument("--check-flex", action="store_true", help="also check the flex path's mask (forward, CPU too)")
    parser.add_argument("--workdir", default=None, help="where the model and runs go (default: a temp dir)")
    return parser.parse_args(argv)


def sized(args) -> Size:
    size = TINY if args.tiny else FULL
    changes = {
        "steps": args.steps,
        "warmup": args.warmup_steps,
        "batch": args.batch_size,
        "micro_batch_tokens": args.micro_batch_tokens,
        "trainer_micro_batch": args.trainer_micro_batch,
    }
    return dataclasses.replace(size, **{k: v for k, v in changes.items() if v is not None})


def fail(message: str, status: int = 1) -> int:
    print(f"gpu_check 1b: {message}", file=sys.stderr, flush=True)
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    size = sized(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        return fail("no CUDA GPU is visible (torch.cuda.is_available() is False); use --tiny to check on a CPU")
    variants = [v for v in (args.variants.split(",") if args.variants else default_variants(device)) if v]
    unknown = [v for v in variants if v not in PARTS]
    if unknown or not variants:
        return fail(f"unknown variants {unknown}; valid: {', '.join(PARTS)}", 2)
    if size.steps < 1 or size.warmup < 0 or size.batch % size.trainer_micro_batch:
        return fail("need --steps >= 1, --warmup-steps >= 0, and --batch-size a multiple of --trainer-micro-batch", 2)
    output = Path(args.output)
    if (output / "gpu_check_1b.json").exists():
        return fail(f"{output}/gpu_check_1b.json exists; choose another --output", 2)
    import transformers

    try:
        preflight(variants, device)
        device_name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
        if device == "cuda":
            peak, peak_source = peak_bf16(device_name, args.peak_tflops)
        else:
            peak, peak_source = None, "measured bf16 matmul (CPU: no datasheet peak)"
        checks = {}
        packed_attentions = {PARTS[v][2] for v in variants if PARTS[v][1] != "padded"} - {"sdpa"}
        if any(PARTS[v][1] == "flat" and PARTS[v][2] == "sdpa" for v in variants):
            packed_attentions.add("sdpa")
        if args.check_flex:
            packed_attentions.add(FLEX)
        if packed_attentions & {FLEX}:
            register_flex()
            allow_recompiles()
        for attention in sorted(packed_attentions):
            checks[attention] = check_packed_attention(attention, device)
            print(f"packed rows through {attention}: block-diagonal (max logit difference {checks[attention]:.2g})")
    except Missing as err:
        return fail(str(err))
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_1b-", dir=args.workdir))
    try:
        report, failed = run_all(args, size, device, device_name, peak, peak_source, variants, workdir, checks)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["wall_s"] = time.perf_counter() - started
    report["transformers"] = transformers.__version__
    (output / "gpu_check_1b.json").write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"wrote {output / 'gpu_check_1b.json'} ({report['wall_s']:.0f} s)", flush=True)
    if failed:
        return fail("; ".join(f"{name} failed: {error}" for name, error in failed.items()))
    return 0


def run_all(args, size, device, device_name, peak, peak_source, variants, workdir, checks):
    from benchmarks.flops import matmul_peak_flops
    from forgetting.harness.config import DataConfig

    sizes = (4096, 8192) if device == "cuda" else (256, 512)
    measured = matmul_peak_flops("bf16", sizes=sizes, device=device)
    peak = peak or measured  # a CPU (tiny mode): MFU against the matmul measured here
    model_dir, data_path = workdir / "model", workdir / "records.jsonl"
    write_records(data_path, size, size.batch * (size.warmup + size.steps))
    tokenizer = build_tokenizer(size.words)
    created = time.perf_counter()
    parameters = save_model(model_dir, size, tokenizer, device)
    print(f"model: {parameters / 1e6:.1f}M parameters saved in {time.perf_counter() - created:.0f} s", flush=True)
    data_config = DataConfig(path=str(data_path), format="chatml", max_seq_len=size.max_seq_len, eval_split=None)
    harness_tokenizer, examples = load_examples(data_config, model_dir)
    bench = Bench(size, device, workdir, model_dir, data_path, examples, harness_tokenizer, args.gradient_checkpointing)
    report = {
        "mode": "1b",
        "tiny": args.tiny,
        "device": device_name,
        "torch": torch.__version__,
        "model": {
            **{k: getattr(size, k) for k in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab")},
            "parameters": parameters,
        },
        "settings": {
            **{k: getattr(size, k) for k in ("batch", "warmup", "steps", "micro_batch_tokens", "trainer_micro_batch")},
            "max_seq_len": size.max_seq_len,
            "precision": "bf16 autocast, fp32 master weights",
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        "data": data_summary(examples),
        "peak_flops": peak,
        "peak_source": peak_source,
        "matmul_peak_flops": measured,
        "packed_attention_checks": checks,
        "variants": {},
    }
    failed = {}
    for name in variants:
        system = PARTS[name][0]
        print(f"--- {name}", flush=True)
        try:
            row = run_harness(bench, name) if system == "harness" else run_trainer(bench, name)
        except Exception as err:  # recorded; the other variants still run
            traceback.print_exc()
            error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            report["variants"][name] = {"error": error}
            failed[name] = error
            release_memory()
            continue
        row["attention"] = PARTS[name][2] if name != "harness_packed" else "forgetting_packed (SDPA per sequence)"
        flops = 6 * parameters * row["tokens_per_s"]
        row["mfu"] = flops / peak
        row["mfu_vs_measured_matmul"] = flops / measured
        report["variants"][name] = row
        print(
            f"{name}: {row['tokens_per_s']:.0f} tokens/s, {row['seconds_per_step']:.3f} s/step, MFU "
            f"{row['mfu']:.1%}, peak memory {row['peak_memory_gib'] or 0:.1f} GiB",
            flush=True,
        )
        release_memory()
    report["ratios"], report["goal"] = ratios(report["variants"])
    return report, failed


def ratios(rows: dict) -> tuple[dict, dict]:
    """Harness / Trainer tokens/s: best against best, like against like; and the goal, for the shipped harness."""
    rate = {name: row["tokens_per_s"] for name, row in rows.items() if "tokens_per_s" in row}

    def best(names):
        present = [n for n in names if n in rate]
        return max(present, key=rate.get) if present else None

    trainer = best([n for n in PARTS if PARTS[n][0] == "trainer"])
    pairs = {
        "best_shipped": (best(SHIPPED), trainer),
        "best_with_proposed": (best([n for n in PARTS if PARTS[n][0] == "harness"]), trainer),
        "padded": ("harness_padded", "trainer_padded"),
        "packed": (best(["harness_packed", "harness_packed_flex"]), best(["trainer_flat_sdpa", "trainer_flat_flex"])),
    }
    out = {}
    for key, (ours, theirs) in pairs.items():
        if ours in rate and theirs in rate:
            out[key] = {"harness": ours, "trainer": theirs, "ratio": rate[ours] / rate[theirs]}
    shipped = out.get("best_shipped")
    goal = {"mfu_at_least": 0.40, "ratio_at_least": 1.3}
    if shipped:
        mfu = rows[shipped["harness"]].get("mfu")
        goal.update(
            harness=shipped["harness"],
            mfu=mfu,
            ratio=shipped["ratio"],
            met=bool(mfu is not None and mfu >= 0.40 and shipped["ratio"] >= 1.3),
        )
    return out, goal


def print_table(report: dict) -> None:
    print(
        f"\n{report['device']}, torch {report['torch']}, transformers {report['transformers']}; "
        f"peak {report['peak_flops'] / 1e12:.0f} TFLOP/s ({report['peak_source']}), "
        f"measured bf16 matmul {report['matmul_peak_flops'] / 1e12:.1f} TFLOP/s; "
        f"{report['model']['parameters'] / 1e6:.1f}M parameters"
    )
    print(f"{'variant':<22}{'tokens/s':>11}{'MFU':>8}{'s/step':>9}{'tokens/step':>13}{'peak GiB':>10}  attention")
    for name, row in report["variants"].items():
        if "error" in row:
            print(f"{name:<22}  failed: {row['error']}")
            continue
        print(
            f"{name:<22}{row['tokens_per_s']:>11.0f}{row['mfu']:>8.1%}{row['seconds_per_step']:>9.3f}"
            f"{row['tokens_per_step']:>13.0f}{row['peak_memory_gib'] or 0:>10.1f}  {row['attention']}"
        )
    for key, pair in report["ratios"].items():
        print(f"harness/Trainer ({key}): {pair['ratio']:.2f}x  ({pair['harness']} / {pair['trainer']})")
    goal = report["goal"]
    if "met" in goal:
        print(
            f"goal (MFU >= 40% and >= 1.3x Trainer, shipped harness): {'met' if goal['met'] else 'not met'} "
            f"({goal['harness']}: MFU {goal['mfu']:.1%}, {goal['ratio']:.2f}x)"
        )


if __name__ == "__main__":
    sys.exit(main())
