"""The GPU check: train and evaluate the embedded SmolLM2-135M on CUDA in bf16; record tokens/s, MFU and memory.

Runs this harness's own `train()` and `evaluate()` (nothing benchmark-specific): full fine-tuning, the same with
gradient checkpointing, and LoRA, each for a few optimizer steps on the built-in task; then the offline suite on
the base and on the fine-tuned model. MFU = 6 N tokens/s over the bf16 matmul peak measured on the same GPU in
the same run. Writes OUTPUT/gpu_check.json and prints a table. Called by `benchmarks/gpu_check.sh`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

VARIANTS = {  # name -> overrides of the training job
    "full": {},
    "full+checkpointing": {"train.gradient_checkpointing": True},
    "full+compile": {"train.compile": True},
    "lora": {"mitigations": [{"name": "lora"}]},
}


def train_variant(name: str, overrides: dict, args, output: Path) -> dict:
    from forgetting.harness.config import DataConfig, ModelConfig, TrainConfig
    from forgetting.harness.job import TrainJob
    from forgetting.harness.train import train

    train_config = TrainConfig(
        lr=2e-5,
        max_steps=args.steps,
        batch_size=args.batch_size,
        micro_batch_tokens=args.micro_batch_tokens,
        precision=args.precision,
        gradient_checkpointing=overrides.get("train.gradient_checkpointing", False),
        compile=overrides.get("train.compile", False),
        progress=False,
    )
    job = TrainJob(
        model=ModelConfig(),
        data=DataConfig(max_seq_len=512, eval_split=None),
        train=train_config,
        mitigations=overrides.get("mitigations", []),
        output_dir=str(output / f"train-{name}"),
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(job)
    wall = time.perf_counter() - started
    lines = [json.loads(line) for line in (Path(job.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steady = [line for line in lines if "tokens_per_s" in line][args.warmup_steps :]  # compile/cuBLAS warm-up off
    tokens, seconds = sum(x["tokens"] for x in steady), sum(x["seconds"] for x in steady)
    return {
        "steps": result.steps,
        "wall_s": wall,
        "tokens_per_s": tokens / seconds,
        "seconds_per_step": seconds / len(steady),
        "tokens_per_step": tokens / len(steady),
        "padding_fraction": result.padding_fraction,
        "last_loss": result.last_loss,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "final_dir": str(result.final_dir),
    }


def profile_steps(args, output: Path) -> dict:
    """Where a full fine-tuning step's time goes: torch.profiler over a few steps, the top operators saved."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        steps = argparse.Namespace(**{**vars(args), "steps": args.profile_steps, "warmup_steps": 0})
        train_variant("profiled", {}, steps, output)
    wall = time.perf_counter() - started
    averages = prof.key_averages()
    sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    (output / "profile.txt").write_text(
        averages.table(sort_by=sort, row_limit=30)
        + "\n\n"
        + averages.table(sort_by="self_cpu_time_total", row_limit=30)
    )
    device_busy = sum(e.self_device_time_total for e in averages) / 1e6 if torch.cuda.is_available() else None
    return {
        "steps": args.profile_steps,
        "wall_s": wall,
        "gpu_busy_s": device_busy,
        "cpu_ops_s": sum(e.self_cpu_time_total for e in averages) / 1e6,
    }


def evaluate_model(source: str, args) -> dict:
    from forgetting.evals.runner import EvalSettings, evaluate, headline, load_for_eval

    model, tokenizer = load_for_eval(source)
    started = time.perf_counter()
    results = evaluate(
        model, tokenizer, EvalSettings(batch_size=args.eval_batch_size, limit=args.eval_limit), cache_dir=None
    )
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype),
        "metrics": {f"{task}/{metric}": value for task, metric, value, _ in headline(results)},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="gpu_check", help="folder for gpu_check.json and the runs")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per training variant")
    parser.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of tokens/s")
    parser.add_argument("--batch-size", type=int, default=256, help="sequences per optimizer step")
    parser.add_argument("--micro-batch-tokens", type=int, default=65536, help="padded tokens per forward/backward")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--eval-limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=0, help="also profile N steps of full FT (profile.txt)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a smoke test of this script)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(
            "gpu_check: no CUDA GPU is visible here (torch.cuda.is_available() is False); nothing measured",
            file=sys.stderr,
        )
        return 1
    if args.warmup_steps >= args.steps:
        print("gpu_check: --warmup-steps must be smaller than --steps", file=sys.stderr)
        return 2
    output = Path(args.output)
    if (output / "gpu_check.json").exists():
        print(f"gpu_check: {output}/gpu_check.json exists; choose another --output", file=sys.stderr)
        return 2
    output.mkdir(parents=True, exist_ok=True)
    from benchmarks.flops import matmul_peak_flops
    from forgetting.harness.config import ModelConfig
    from forgetting.harness.models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = (4096, 8192) if device == "cuda" else (1024,)
    report = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "precision": args.precision,
        "args": vars(args),
        "matmul_peak_flops": matmul_peak_flops(args.precision, sizes=sizes, device=device),
    }
    report["parameters"] = sum(p.numel() for p in load_model(ModelConfig()).parameters())
    report["train"] = {}
    for name in [v for v in args.variants.split(",") if v]:
        row = train_variant(name, VARIANTS[name], args, output)
        row["mfu"] = 6 * report["parameters"] * row["tokens_per_s"] / report["matmul_peak_flops"]
        report["train"][name] = row
        print(
            f"train {name}: {row['tokens_per_s']:.0f} tokens/s, {row['seconds_per_step']:.3f} s/step, "
            f"MFU {row['mfu']:.1%}, peak memory {row['peak_memory_gib'] or 0:.2f} GiB",
            flush=True,
        )
    if args.profile_steps:
        report["profile"] = profile_steps(args, output)
        print(f"profile: {report['profile']}", flush=True)
    if not args.skip_eval:
        from forgetting.harness.config import EMBEDDED_MODEL

        report["eval"] = {"base": evaluate_model(EMBEDDED_MODEL, args)}
        if "full" in report["train"]:
            report["eval"]["full"] = evaluate_model(report["train"]["full"]["final_dir"], args)
        for name, row in report["eval"].items():
            print(f"eval {name}: {row['seconds']:.1f} s on {row['device']} ({row['dtype']})", flush=True)
    (output / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"peak {args.precision} matmul: {report['matmul_peak_flops'] / 1e12:.1f} TFLOP/s on {report['device']}")
    print(
        json.dumps(
            {k: {m: v for m, v in row.items() if m != "final_dir"} for k, row in report["train"].items()}, indent=1
        )
    )
    if "eval" in report:
        print(json.dumps(report["eval"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
