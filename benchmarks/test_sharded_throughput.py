"""Two CPU processes: a step of full fine-tuning under ddp and under fsdp (FSDP2), on the embedded 135M model.

The same job (64 built-in conversations, 16 per step, 1024-token micro-batches, the precision `auto` picks) runs
under torchrun with 2 processes (gloo) in each mode; tokens/s is the median over steps 2..6 of each step's real
tokens over its seconds (metrics.jsonl). FSDP all-gathers each layer's weights in forward and again in backward
and reduce-scatters its gradients after every micro-batch; DDP all-reduces the gradients once per step. On one
machine's 2 cores that communication is memory copies: the ratio says what sharding costs where it is not needed.
Results: .benchmarks/sharded_throughput.json.

    pytest benchmarks/test_sharded_throughput.py -s          # ~3 min on 2 cores
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
JOB = [
    "data.limit=64",
    "train.batch_size=16",
    "train.max_steps=6",
    "train.micro_batch_tokens=1024",
    "train.progress=false",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(output: Path, mode: str) -> list[dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    command += ["-m", "forgetting", "train", *JOB, f"train.distributed={mode}", f"output_dir={output}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_against_ddp_on_two_cpu_processes(tmp_path):
    speeds = {}
    for mode in ("ddp", "fsdp"):
        steps = [m for m in train(tmp_path / mode, mode) if "loss" in m]
        speeds[mode] = statistics.median(m["tokens"] / m["seconds"] for m in steps[1:])
    result = {**{f"{mode}_tokens_per_s": speed for mode, speed in speeds.items()}}
    result["fsdp_over_ddp"] = speeds["fsdp"] / speeds["ddp"]
    print(json.dumps(result, indent=1))
    out = ROOT / ".benchmarks"
    out.mkdir(exist_ok=True)
    (out / "sharded_throughput.json").write_text(json.dumps(result, indent=1))
