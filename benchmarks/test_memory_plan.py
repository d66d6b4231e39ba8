"""The memory plan (`forgetting plan`, harness/plan.py) against the measured peaks of short CPU training runs.

Each case trains in fresh processes under torchrun (1 or 2 processes, gloo) through `benchmarks/peak_rss.py`, which
records every process's peak resident memory over its baseline after the imports; the plan's per-process total for
the same job and data is computed here, and the ratio estimate / measured (the largest process) printed and saved
to .benchmarks/memory_plan.json. Two allocator settings: glibc's default (what a user gets: malloc keeps part of
the freed activations) and MALLOC_MMAP_THRESHOLD_=131072 (large blocks go back to the system when freed, so the
peak RSS follows the live tensors). fsdp cases skip, saying why, when `train.distributed=fsdp` fails or runs
without sharding the model (a loop that does not shard yet).

    pytest benchmarks/test_memory_plan.py -s          # ~5 min on 2 cores
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from forgetting.harness.data import load_conversations, tokenize_all
from forgetting.harness.formats import attach_format
from forgetting.harness.job import load_job
from forgetting.harness.models import load_tokenizer
from forgetting.harness.plan import estimate

ROOT = Path(__file__).parent.parent
MODELS = {
    "tiny-random": ["model.name_or_path=tiny-random"],
    "embedded 135M": [],  # the default model
}
COMMON = [
    "data.limit=64",
    "train.max_steps=2",
    "train.batch_size=32",  # 2 micro-batches per process and step: a micro-batch runs with the gradients present
    "train.micro_batch_tokens=1024",
    "train.progress=false",
]
ALLOCATORS = {"glibc default": {}, "mmap threshold 128K": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
CASES = [  # the tiny model first: its fsdp case tells whether the loop shards before the 135M model runs
    (model, processes, mode, allocator)
    for model in MODELS
    for mode in ("ddp", "fsdp")
    for processes in (1, 2)
    for allocator in ALLOCATORS
]
ROWS: dict[str, dict] = {}
FSDP: dict[str, str] = {}  # the reason fsdp cases skip, once one has found it


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    out = Path(os.environ.get("BENCH_RESULTS_DIR", ".benchmarks")) / "memory_plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_flags": cpu_flags(), "cases": ROWS}, indent=2))
    print(f"\nCPU flags: {', '.join(cpu_flags()) or 'none of avx2/avx512_bf16/amx_bf16'}")
    print("| case | estimate (MiB) | measured peak growth (MiB, per process) | estimate / measured |")
    print("|---|---|---|---|")
    for name, row in ROWS.items():
        measured = ", ".join(f"{g / 2**20:.0f}" for g in row["growth"])
        print(f"| {name} | {row['estimate'] / 2**20:.0f} | {measured} | {row['ratio']:.2f} |")


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [flag for flag in ("avx2", "avx512_bf16", "amx_bf16") if flag in flags]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], processes: int, out: Path, allocator: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", **allocator)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={free_port()}",
        "-m",
        "benchmarks.peak_rss",
        str(out / "peaks"),
        "train",
        *args,
        f"output_dir={out / 'run'}",
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200, check=False)


def planned(args: list[str], processes: int, mode: str) -> int:
    """The plan's per-process total for the job, with its data (as `forgetting plan` computes it)."""
    job = load_job(None, args)
    tokenizer = load_tokenizer(job.model)
    attach_format(tokenizer, job.data.format)
    examples, _ = tokenize_all(load_conversations(job.data), tokenizer, job.data)
    return estimate(job, processes, examples, "cpu", launcher=True).total(mode)  # torchrun: DDP even for one


@pytest.mark.parametrize(("model", "processes", "mode", "allocator"), CASES)
def test_plan_against_measured_peak(model, processes, mode, allocator, tmp_path):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak-memory measurements need Linux /proc")
    if mode == "fsdp" and "reason" in FSDP:
        pytest.skip(FSDP["reason"])
    args = [*MODELS[model], *COMMON, f"train.distributed={mode}"]
    done = launch(args, processes, tmp_path, ALLOCATORS[allocator])
    if mode == "fsdp" and done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.startswith("error:")] or done.stderr.splitlines()
        FSDP["reason"] = f"train.distributed=fsdp failed: {lines[-1] if lines else done.returncode}"
        pytest.skip(FSDP["reason"])
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "peaks").glob("rank*.json"))]
    assert len(records) == processes
    if mode == "fsdp" and not all(r["sharded"] for r in records):
        FSDP["reason"] = "train.distributed=fsdp ran without sharding the model (the loop does not shard yet)"
        pytest.skip(FSDP["reason"])
    planned_bytes = planned(args, processes, mode)
    growth = [r["growth"] for r in records]
    ROWS[f"{model}, {processes} process(es), {mode}, {allocator}"] = {
        "estimate": planned_bytes,
        "growth": growth,
        "baseline": [r["baseline"] for r in records],
        "ratio": planned_bytes / max(growth),
    }
