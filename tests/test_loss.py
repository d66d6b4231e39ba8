"""The loss: response-only cross-entropy, normalised per optimizer step, equal to an independent computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from forgetting.harness.batching import collate, target_tokens
from forgetting.harness.formats import FORMAT_NAMES, IGNORE_INDEX, template_for, tokenize_conversation
from forgetting.harness.loss import summed_response_loss
from forgetting.harness.train import accumulate_gradients
from tests.helpers import conversation

CONVERSATIONS = [
    conversation("What is the capital of France?", "Paris."),
    conversation("Name a colour.", "Blue.", "Another one?", "Green, or maybe red.", system="Be brief."),
    conversation("Count to five.", "1 2 3 4 5"),
    conversation("Say nothing much.", "Ok."),
]


def reference_loss(model, examples) -> torch.Tensor:
    """Mean next-token CE over response tokens, from full logits and an explicit per-token loop."""
    total, count = 0.0, 0
    for example in examples:
        ids = torch.tensor([example.input_ids])
        logits = model(input_ids=ids).logits[0]
        for t in range(1, len(example)):
            if example.labels[t] != IGNORE_INDEX:
                total = total + F.cross_entropy(logits[t - 1].float(), torch.tensor(example.input_ids[t]))
                count += 1
    return total / count


def assert_same_gradients(actual: dict, expected: dict) -> None:
    """Per tensor, the difference is float noise: its norm under 1e-5 of the gradient's norm."""
    assert actual.keys() == expected.keys()
    for name, grad in actual.items():
        error = (grad - expected[name]).norm() / expected[name].norm().clamp_min(1e-12)
        assert error < 1e-5, f"{name}: relative error {error:.2e}"


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_loss_and_gradients_match_hand_computed_response_only_ce(tokenizer, make_tiny, fmt):
    examples = [tokenize_conversation(tokenizer, template_for(fmt, tokenizer), c) for c in CONVERSATIONS]
    model = make_tiny()
    expected = reference_loss(model, examples)
    expected.backward()
    expected_grads = grads(model)
    model.zero_grad()

    batch = collate(examples, tokenizer.pad_token_id)
    loss = summed_response_loss(model, batch) / target_tokens(examples)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert_same_gradients(grads(model), expected_grads)


def test_prompt_positions_never_reach_the_lm_head(tokenizer, make_tiny):
    """Only positions that predict a response token are projected to the vocabulary; the rest get no gradient."""
    example = tokenize_conversation(tokenizer, template_for("chatml", tokenizer), CONVERSATIONS[0])
    model = make_tiny()
    batch = collate([example], tokenizer.pad_token_id)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    loss = summed_response_loss(model, batch)
    handle.remove()
    assert seen == [target_tokens([example])] and seen[0] < len(example) / 2
    # the same sum from full logits, where prompt positions are masked out by hand
    logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    targets = batch["labels"][0, 1:]
    by_hand = F.cross_entropy(logits, targets.clamp_min(0), reduction="none")[targets != IGNORE_INDEX].sum()
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("micro_batch_tokens", [16, 64, 200, 100_000])
def test_gradient_accumulation_equals_one_big_batch(tokenizer, make_tiny, micro_batch_tokens):
    examples = [tokenize_conversation(tokenizer, template_for("chat_template", tokenizer), c) for c in CONVERSATIONS]
    reference_model, model = make_tiny(), make_tiny()
    expected = reference_loss(reference_model, examples)
    expected.backward()

    accelerator = Accelerator(cpu=True)
    step_loss, padded, real = accumulate_gradients(
        model,
        accelerator,
        examples,
        micro_batch_tokens,
        tokenizer.pad_token_id,
        1 / target_tokens(examples),
        lambda: [],
    )
    assert real == sum(len(e) for e in examples) and padded >= real
    torch.testing.assert_close(step_loss, expected.detach(), rtol=1e-5, atol=1e-6)
    assert_same_gradients(grads(model), grads(reference_model))
