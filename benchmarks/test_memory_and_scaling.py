"""Peak memory of a full fine-tuning step and a LoRA step (ours vs HF Trainer vs TRL SFTTrainer), and how our
step time and memory grow with sequence length and batch size (embedded SmolLM2-135M, fp32, CPU).

Every measurement runs in a fresh process (`benchmarks/memory_probe.py`), so one system's allocations cannot
inflate another's peak. "Step memory" is the peak resident memory during two optimizer steps minus the resident
memory just before them: gradients, AdamW state, activations, logits and temporaries. Results are printed and
saved to .benchmarks/memory_and_scaling.json; BENCHMARKS.md records them.

    pytest benchmarks/test_memory_and_scaling.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.systems import LABELS, SYSTEMS

ROWS: dict[str, dict] = {}
SCALING = [(128, 1), (128, 4), (512, 1), (512, 4), (2048, 1), (2048, 4)]


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    out = Path(os.environ.get("BENCH_RESULTS_DIR", ".benchmarks")) / "memory_and_scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ROWS, indent=2))
    print("\n| case | step memory (MB) | peak RSS (MB) | s/step | tokens |\n|---|---|---|---|---|")
    for name, row in ROWS.items():
        print(
            f"| {name} | {row['step_memory_mb']:.0f} | {row['peak_rss_mb']:.0f} | {row['seconds_per_step']:.2f} "
            f"| {row['tokens']} |"
        )


def probe(*args: str) -> dict:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak-memory probes need Linux /proc")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_probe", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("system", SYSTEMS)
def test_step_memory(system, lora):
    if system == "trl":
        pytest.importorskip("trl")
    ROWS[f"{LABELS[system]} {'LoRA' if lora else 'full FT'}"] = probe(system, *(["--lora"] if lora else []))


@pytest.mark.parametrize(("seq_len", "batch"), SCALING)
def test_scaling(seq_len, batch):
    ROWS[f"ours seq {seq_len} x batch {batch}"] = probe("ours", "--seq-len", str(seq_len), "--batch", str(batch))


def test_scaling_with_gradient_checkpointing():
    ROWS["ours seq 2048 x batch 4, gradient checkpointing"] = probe(
        "ours", "--seq-len", "2048", "--batch", "4", "--gradient-checkpointing"
    )
