"""Tokens/s and MFU of one SFT optimizer step on the embedded SmolLM2-135M: ours vs HF Trainer vs TRL SFTTrainer.

All systems train the same 16 built-in-task conversations per step (response-only loss, no gradient
checkpointing, fused AdamW, grad clipping; see `benchmarks/systems.py`), in fp32 and with bf16 autocast (fp32
master weights), eager and with each system's model compiled (torch.compile; TRL only eager). Step times on this
VM drift by 10-20% within minutes, so the systems of one group are timed in interleaved rounds (each round runs
every system once, in rotating order) and each system's median over the rounds is compared: drift hits all of
them alike. The first round is a warm-up (it absorbs compilation). The machine's matmul peak is measured in the
same run, so MFU (6 N tokens/s over the peak) is a ratio of two measurements on the same cores. The table is
printed at the end and saved to .benchmarks/step_throughput.json; BENCHMARKS.md records the numbers.

    tox -e bench        (or: pytest benchmarks -s)
"""

from __future__ import annotations

import statistics
import time

import pytest

from benchmarks.flops import matmul_peak_flops, step_flops
from benchmarks.systems import LABELS, SYSTEMS, make_step

ROUNDS = 5
PRECISIONS = ["fp32", "bf16"]
GROUPS = [(precision, False, SYSTEMS) for precision in PRECISIONS] + [
    (precision, True, ("ours", "hf_trainer")) for precision in PRECISIONS
]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_matmul_peak(results, precision):
    """The reference for MFU: the best of square matmuls (1024..4096) on this machine, at this precision."""
    results.setdefault("peak", {})[precision] = matmul_peak_flops(precision)


@pytest.mark.parametrize(
    ("precision", "compiled", "systems"), GROUPS, ids=[f"{p}{'+compile' if c else ''}" for p, c, _ in GROUPS]
)
def test_steps_interleaved(benchmark, embedded_batch, results, precision, compiled, systems):
    if "trl" in systems:
        pytest.importorskip("trl")
    steps = {system: make_step(system, embedded_batch, precision, compile=compiled) for system in systems}
    times: dict[str, list[float]] = {system: [] for system in systems}
    rotation = [0]

    def one_round():
        order = list(systems)
        k = rotation[0] % len(order)
        rotation[0] += 1
        for system in order[k:] + order[:k]:
            started = time.perf_counter()
            steps[system].run()
            times[system].append(time.perf_counter() - started)

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    peak = results.get("peak", {}).get(precision)
    for system, step in steps.items():
        seconds = statistics.median(times[system][1:] or times[system])  # warm-up dropped (kept if the only one)
        flops = step_flops(embedded_batch[2], step)
        row = {
            "tokens_per_s": step.tokens / seconds,
            "seconds_per_step": seconds,
            "tokens": step.tokens,
            "padding_fraction": 1 - step.tokens / step.padded,
            "model_flops_6n": flops["model_flops_6n"],
            "executed_flops": flops["executed_flops"],
            "round_times": times[system][1:] or times[system],
        }
        if peak:
            row["mfu"] = flops["model_flops_6n"] / seconds / peak
            row["executed_flop_utilisation"] = flops["executed_flops"] / seconds / peak
        results.setdefault("steps", {})[f"{LABELS[system]} {precision}{'+compile' if compiled else ''}"] = row
