"""Shared fixtures: the embedded tokenizer (converted once per cache), tiny random models, offline mode."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `auto` precision follows the CPU's bf16 support; the suite pins it so that its numbers (and its time: the 135M
# model in emulated bf16 takes ~20x longer per step) are the same on every CPU. The bf16 branch has its own tests.
os.environ["FORGETTING_CPU_BF16"] = "emulated"

import pytest  # noqa: E402
import torch  # noqa: E402

from harness.config import ModelConfig  # noqa: E402
from harness.models import load_tokenizer, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(ModelConfig())


@pytest.fixture
def fresh_tokenizer(tokenizer):
    """A copy that a test may change (formats attach templates)."""
    import copy

    return copy.deepcopy(tokenizer)


@pytest.fixture
def make_tiny(tokenizer):
    def make(seed: int = 0):
        return tiny_model(len(tokenizer), seed=seed)

    return make


def conversation(*turns: str, system: str | None = None) -> list[dict]:
    """Alternating user/assistant messages from plain strings."""
    roles = ["user", "assistant"]
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
