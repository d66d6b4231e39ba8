"""Shared fixtures: the embedded tokenizer (converted once per cache), a byte tokenizer that needs no model files,
tiny random models, offline mode. Plain helper functions are in tests/helpers.py (`conversation` is also
importable from here, where older test files import it)."""

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

from forgetting.harness.config import DataConfig, ModelConfig  # noqa: E402
from forgetting.harness.data import load_conversations, tokenize_all  # noqa: E402
from forgetting.harness.formats import attach_format  # noqa: E402
from forgetting.harness.models import load_tokenizer, tiny_model  # noqa: E402
from tests.helpers import byte_tokenizer as build_byte_tokenizer  # noqa: E402
from tests.helpers import conversation  # noqa: E402, F401


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer (the first use converts the embedded model once per cache)."""
    return load_tokenizer(ModelConfig())


@pytest.fixture
def fresh_tokenizer(tokenizer):
    """A copy that a test may change (formats attach templates)."""
    import copy

    return copy.deepcopy(tokenizer)


@pytest.fixture
def builtin_examples(fresh_tokenizer):
    """`make(limit)`: the first `limit` built-in task records tokenized in the embedded tokenizer's own chat
    template (up to 128 tokens), and that tokenizer."""

    def make(limit: int):
        attach_format(fresh_tokenizer, "chat_template")
        config = DataConfig(path="builtin", limit=limit, max_seq_len=128)
        return tokenize_all(load_conversations(config), fresh_tokenizer, config)[0], fresh_tokenizer

    return make


@pytest.fixture
def byte_tokenizer():
    """A new small byte-level BPE tokenizer with ChatML special tokens and a chat template (built in memory, see
    tests/helpers.py; a test may change it)."""
    return build_byte_tokenizer()


@pytest.fixture
def make_tiny(tokenizer):
    def make(seed: int = 0):
        return tiny_model(len(tokenizer), seed=seed)

    return make


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
