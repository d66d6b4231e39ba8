"""Skipping the last layer's MLP and output projection at unread positions: exact loss and gradients (padded,
packed, LoRA), full computation for any other call, a clean undo, and no-op for layers it does not know."""

from __future__ import annotations

import pytest
import torch

from forgetting.harness import last_layer, packing
from forgetting.harness.batching import collate
from tests.helpers import loss_and_grads, tiny_job


@pytest.fixture
def examples(builtin_examples):
    items, tokenizer = builtin_examples(5)
    return items, tokenizer.pad_token_id


def _close(a, b):
    """Equal up to float summation order: the max difference is tiny next to the tensor's scale."""
    return (a - b).abs().max() <= 1e-5 * b.abs().max()


def _count_mlp_rows(layer):
    rows = []
    handle = layer.mlp.down_proj.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    return rows, handle


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_loss_and_every_gradient_equal_the_full_computation(make_tiny, examples, layout):
    items, pad_id = examples
    model = make_tiny()
    undo_packing = packing.enable(model) if layout == "packed" else (lambda: None)
    batch = packing.pack(items) if layout == "packed" else collate(items, pad_id)
    full_loss, full_grads = loss_and_grads(model, batch)
    layer = last_layer.last_decoder_layer(model)
    rows, handle = _count_mlp_rows(layer)
    undo = last_layer.enable(model)
    loss, grads = loss_and_grads(model, batch)
    undo()
    handle.remove()
    undo_packing()
    # the MLP saw only the positions that predict a response token, far fewer than all of them
    kept = int((batch["labels"][:, 1:] != -100).sum())
    assert rows == [kept] and kept < batch["input_ids"].numel() / 2
    assert torch.allclose(loss, full_loss, rtol=1e-6)
    assert grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        assert _close(grads[name], grad), name


def test_lora_model_gets_the_same_gradients(make_tiny, examples):
    from peft import LoraConfig, get_peft_model

    items, pad_id = examples
    model = get_peft_model(
        make_tiny(), LoraConfig(r=4, target_modules=["o_proj", "down_proj", "q_proj"], init_lora_weights=False)
    )
    batch = collate(items, pad_id)
    full_loss, full_grads = loss_and_grads(model, batch)
    undo = last_layer.enable(model)
    loss, grads = loss_and_grads(model, batch)
    undo()
    assert torch.allclose(loss, full_loss, rtol=1e-6)
    for name, grad in full_grads.items():
        assert _close(grads[name], grad), name


def test_calls_without_a_mask_and_the_undone_model_compute_every_position(make_tiny, examples):
    items, pad_id = examples
    model = make_tiny().eval()
    batch = collate(items, pad_id)
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        undo = last_layer.enable(model)
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=torch.ones_like(batch["input_ids"], dtype=torch.bool),
        )  # a masked call first
        during = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        undo()
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(during, reference) and torch.equal(after, reference)
    layer = last_layer.last_decoder_layer(model)
    assert "forward" not in vars(layer.mlp) and "forward" not in vars(layer.self_attn.o_proj)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_an_unknown_layer_layout_is_left_alone(make_tiny):
    model = make_tiny()
    layer = model.model.layers[-1]
    layer.mlp = torch.nn.Sequential(*layer.mlp.children())  # not a *MLP module: unknown semantics
    assert last_layer.last_decoder_layer(model) is None
    last_layer.enable(model)()
    assert "forward" not in vars(layer.mlp)


@pytest.mark.parametrize(
    "prepare", [lambda m: m.compile(), lambda m: m.gradient_checkpointing_enable()], ids=["compiled", "checkpointing"]
)
def test_a_compiled_or_checkpointing_model_is_left_alone(make_tiny, prepare):
    model = make_tiny()
    prepare(model)
    last_layer.enable(model)()
    layer = last_layer.last_decoder_layer(model)
    last_layer.enable(model)
    assert "forward" not in vars(layer.mlp) and not model._forward_pre_hooks


@pytest.mark.parametrize("overrides, used", [([], True), (["train.gradient_checkpointing=true"], False)])
def test_the_training_loop_uses_it_except_with_checkpointing(tmp_path, monkeypatch, overrides, used):
    from forgetting.harness import train as train_module

    seen = []
    real_enable = last_layer.enable

    def spy(model):
        (first_rows, first), (last_rows, last) = (_count_mlp_rows(layer) for layer in model.model.layers)
        seen.append((first_rows, last_rows))
        undo = real_enable(model)
        return lambda: (undo(), first.remove(), last.remove())

    monkeypatch.setattr(last_layer, "enable", spy)
    job = tiny_job(tmp_path, "data.limit=8", "train.batch_size=4", "train.max_steps=1", "train.lr=2e-5", *overrides)
    train_module.train(job)
    ((first_rows, last_rows),) = seen
    assert first_rows and len(first_rows) == len(last_rows)  # one micro-batch (twice with recomputation)
    if used:  # the last MLP saw only the response-predicting positions
        assert 0 < last_rows[0] < first_rows[0] / 2
    else:  # checkpointing recomputes outside the call that sets the mask: every position, every time
        assert last_rows == first_rows
