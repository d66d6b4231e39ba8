"""Benchmark fixtures: the embedded model loaded once, and a table of results printed and saved at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="session")
def embedded_batch():
    """(tokenizer with the chat-template format, the first 16 built-in examples, the embedded model)."""
    from benchmarks.systems import embedded_setup

    return embedded_setup()


@pytest.fixture(scope="session")
def results():
    yield RESULTS
    steps = RESULTS.get("steps")
    if not steps:
        return
    lines = [
        "",
        "| system | tokens/s | s/step | padding | MFU (6N) | executed-FLOP util. | ours / this |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in sorted(steps.items(), key=lambda item: item[0].split()[-1]):
        ours = steps.get(f"ours {name.split()[-1]}", {}).get("tokens_per_s")
        ratio = f"{ours / row['tokens_per_s']:.2f}" if ours else ""
        lines.append(
            f"| {name} | {row['tokens_per_s']:.0f} | {row['seconds_per_step']:.2f} | "
            f"{row['padding_fraction']:.1%} | {row.get('mfu', 0):.0%} | "
            f"{row.get('executed_flop_utilisation', 0):.0%} | {ratio} |"
        )
    peaks = RESULTS.get("peak", {})
    lines.append("matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    print("\n".join(lines))
    out = Path(os.environ.get("BENCH_RESULTS", ".benchmarks/step_throughput.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=2))
