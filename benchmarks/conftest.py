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
BATCH = 16  # built-in-task conversations per optimizer step in every benchmark


@pytest.fixture(scope="session")
def embedded_batch():
    """(tokenizer with the chat-template format, the first BATCH built-in examples, the embedded model)."""
    from harness.config import DataConfig, ModelConfig
    from harness.data import load_conversations, tokenize_all
    from harness.formats import attach_format
    from harness.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    attach_format(tokenizer, "chat_template")
    config = DataConfig(limit=BATCH, max_seq_len=256)
    examples, _ = tokenize_all(load_conversations(config), tokenizer, config)
    return tokenizer, examples, load_model(ModelConfig())


@pytest.fixture(scope="session")
def results():
    yield RESULTS
    if not RESULTS:
        return
    lines = ["", "| system | tokens/s | s/step | padding | ours / this |", "|---|---|---|---|---|"]
    for name, row in sorted(RESULTS.items(), key=lambda item: item[0].split()[-1]):
        ours = RESULTS.get(f"ours {name.split()[-1]}", {}).get("tokens_per_s")
        ratio = f"{ours / row['tokens_per_s']:.2f}" if ours else ""
        lines.append(f"| {name} | {row.get('tokens_per_s', 0):.0f} | {row.get('seconds_per_step', 0):.2f} | "
                     f"{row.get('padding_fraction', 0):.1%} | {ratio} |")
    print("\n".join(lines))
    out = Path(os.environ.get("BENCH_RESULTS", ".benchmarks/step_throughput.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=2))
