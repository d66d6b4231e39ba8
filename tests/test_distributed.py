"""Two CPU processes (torchrun, gloo) train to the same weights as one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = [
    "model.name_or_path=tiny-random",
    "data.limit=64",
    "train.batch_size=8",
    "train.lr=1e-3",
    "train.max_steps=3",
    "train.progress=false",
    "train.micro_batch_tokens=300",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out, processes: int):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={free_port()}",
        "-m",
        "forgetting",
        "train",
        *ARGS,
        f"output_dir={out}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    launch(tmp_path / "one", 1)
    two = launch(tmp_path / "two", 2)
    assert two.stdout.count("trained 3 steps") == 1  # only the main process reports
    one_weights = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    two_weights = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for name, tensor in one_weights.items():
        torch.testing.assert_close(two_weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    def read(run: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert len(read("two")) == 3
    assert read("two") == pytest.approx(read("one"), rel=1e-6)
