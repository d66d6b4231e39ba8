"""Formats and masks: what is learned is exactly the responses (with their end markers), nothing else."""

from __future__ import annotations

import pytest

from forgetting.harness.config import DataConfig
from forgetting.harness.data import tokenize_all
from forgetting.harness.formats import (
    FORMAT_NAMES,
    IGNORE_INDEX,
    Example,
    attach_format,
    render,
    template_for,
    tokenize_conversation,
    truncate,
)
from tests.helpers import conversation

END_MARKER = {"chatml": "<|im_end|>", "alpaca": "<|im_end|>", "plain": "<|im_end|>", "chat_template": "<|im_end|>"}


@pytest.fixture
def tokenizer(byte_tokenizer):
    """Formats and masks need no real vocabulary: the byte tokenizer, so these tests need no model files."""
    return byte_tokenizer


@pytest.fixture
def fresh_tokenizer(byte_tokenizer):
    return byte_tokenizer


def learned_text(tokenizer, example: Example) -> list[str]:
    """The labelled spans, decoded, one string per contiguous run."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_single_turn_learns_response_and_end_marker_only(tokenizer, fmt):
    template = template_for(fmt, tokenizer)
    messages = conversation("What is 2+2?", "It is 4.")
    example = tokenize_conversation(tokenizer, template, messages)
    runs = learned_text(tokenizer, example)
    assert len(runs) == 1
    assert runs[0].strip() == "It is 4." + END_MARKER[fmt]
    # the prompt is tokenized exactly as at inference time: the generation prompt, alone
    prompt = render(tokenizer, template, messages[:1], add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt_ids)])
    assert all(label != IGNORE_INDEX for label in example.labels[len(prompt_ids) :])


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_multi_turn_learns_every_assistant_turn_and_no_user_turn(tokenizer, fmt):
    template = template_for(fmt, tokenizer)
    messages = conversation("Name a colour.", "Blue.", "Another one?", "Green.", system="Be brief.")
    example = tokenize_conversation(tokenizer, template, messages)
    runs = [r.strip() for r in learned_text(tokenizer, example)]
    assert runs == ["Blue." + END_MARKER[fmt], "Green." + END_MARKER[fmt]]
    assert "Another one?" in tokenizer.decode(example.input_ids)
    assert "Be brief." in tokenizer.decode(example.input_ids)


def test_formats_render_their_documented_layout(tokenizer):
    messages = conversation("Hi", "Hello")
    assert render(tokenizer, template_for("chatml", tokenizer), messages, False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert render(tokenizer, template_for("plain", tokenizer), messages, False) == (
        "Human: Hi\n\nAssistant: Hello<|im_end|>\n\n"
    )
    alpaca = render(tokenizer, template_for("alpaca", tokenizer), messages, False)
    assert alpaca.endswith("### Instruction:\nHi\n\n### Response:\nHello<|im_end|>\n\n")


def test_attached_format_travels_with_the_saved_tokenizer(fresh_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    attach_format(fresh_tokenizer, "alpaca")
    fresh_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == template_for("alpaca", fresh_tokenizer)


def test_truncation_keeps_partial_responses_and_drops_empty_ones(tokenizer):
    example = tokenize_conversation(tokenizer, template_for("chatml", tokenizer), conversation("q " * 20, "a b c d"))
    first_label = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert truncate(example, len(example)) is example
    kept = truncate(example, first_label + 2)
    assert kept is not None and len(kept) == first_label + 2 and kept.num_target_tokens == 2
    assert truncate(example, first_label) is None


def test_tokenize_all_counts_truncated_and_dropped(tokenizer):
    long_prompt = conversation("word " * 200, "short answer")
    long_answer = conversation("hi", "word " * 200)
    config = DataConfig(format="chatml", max_seq_len=64)
    examples, stats = tokenize_all([long_prompt, long_answer, conversation("hi", "ok")], tokenizer, config)
    assert stats.records == 3 and stats.examples == 2
    assert stats.dropped_truncated == 1 and stats.truncated == 1
    assert all(len(e) <= 64 for e in examples)
