"""Padding-free packed micro-batches: the layout, exact equality with one-example-at-a-time loss and gradients,
equal training to padded micro-batches, the guard against models that would let sequences see each other."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from forgetting.harness import packing
from forgetting.harness.batching import collate, micro_batches
from forgetting.harness.errors import RunError, UserError
from forgetting.harness.formats import IGNORE_INDEX, Example
from forgetting.harness.train import train
from tests.helpers import loss_and_grads, tiny_job


def test_pack_layout_restarts_positions_and_masks_each_first_label():
    a = Example(input_ids=[5, 6, 7], labels=[IGNORE_INDEX, 6, 7])
    b = Example(input_ids=[8, 9], labels=[8, 9])  # a label at position 0 must not be learned from a's last token
    batch = packing.pack([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert batch["segments"] == (0, 3, 5)


def test_packed_micro_batches_fill_the_token_budget_without_padding():
    lengths = [5, 3, 9, 2, 4]
    groups = micro_batches(list(range(5)), lengths, max_tokens=10, packed=True)
    assert sorted(i for group in groups for i in group) == [0, 1, 2, 3, 4]
    assert all(sum(lengths[i] for i in group) <= 10 for group in groups)
    assert micro_batches([0], [50], max_tokens=10, packed=True) == [[0]]  # too long: alone, not dropped


def test_packed_row_equals_each_example_alone(make_tiny, builtin_examples):
    """The reference is independent of both layouts: every example run on its own, unpadded, summed."""
    items, tokenizer = builtin_examples(6)
    assert len({len(e) for e in items}) > 1  # different lengths, so padding would matter
    model = make_tiny()
    reference_loss, reference_grads = loss_and_grads(model, *(collate([e], tokenizer.pad_token_id) for e in items))
    restore = packing.enable(model)
    try:
        loss, grads = loss_and_grads(model, packing.pack(items))
    finally:
        restore()
    assert packing.CALLS["packed"] > 0
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert model.config._attn_implementation == "sdpa"  # restored


def job(tmp_path, *overrides, name="run"):
    return tiny_job(tmp_path, "train.max_steps=3", "train.micro_batch_tokens=256", *overrides, name=name)


def test_packed_training_equals_padded_training(tmp_path, capsys):
    import json

    packed = train(job(tmp_path, "train.packing=packed", name="packed"))
    assert "micro-batches: packed" in capsys.readouterr().out
    padded = train(job(tmp_path, "train.packing=padded", name="padded"))
    lines = {
        name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("packed", "padded")
    }
    assert [x["loss"] for x in lines["packed"]] == pytest.approx([x["loss"] for x in lines["padded"]], rel=1e-5)
    assert lines["packed"][-1]["padding_fraction"] == 0 < lines["padded"][-1]["padding_fraction"]
    got, expected = (load_file(str(r.final_dir / "model.safetensors")) for r in (packed, padded))
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    config = json.loads((packed.final_dir / "config.json").read_text())
    assert packing.IMPLEMENTATION not in json.dumps(config)  # checkpoints load with plain SDPA anywhere


def test_a_model_whose_attention_bypasses_the_interface_is_refused(tmp_path, monkeypatch):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def register_plain_sdpa():  # stands in for a model that never calls the packed implementation
        AttentionInterface.register(
            packing.IMPLEMENTATION, lambda *a, segments=None, **k: sdpa_attention_forward(*a, **k)
        )

    monkeypatch.setattr(packing, "register", register_plain_sdpa)
    with pytest.raises(RunError, match="could see each other"):
        train(job(tmp_path, "train.packing=packed"))


def test_packing_needs_sdpa_and_excludes_compile(tmp_path):
    with pytest.raises(UserError, match="needs SDPA attention"):
        train(job(tmp_path, "train.packing=packed", "model.attn_implementation=eager"))
    with pytest.raises(UserError, match="cannot be combined with train.compile"):
        job(tmp_path, "train.packing=packed", "train.compile=true")


def test_packed_attention_runs_in_fp32_on_a_cpu_under_bf16_autocast():
    """The CPU's bf16 flash-attention backward is ~2x slower than fp32's, so packed attention upcasts there."""
    import torch.nn.functional as F

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 1, True, True
    q, k, v = (torch.randn(1, 2, 7, 8).to(torch.bfloat16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = packing.packed_attention(module, q, k, v, None, segments=(0, 3, 7), scaling=8**-0.5, dropout=0.0)
    expected = torch.cat(
        [
            F.scaled_dot_product_attention(
                q[:, :, a:b].float(), k[:, :, a:b].float(), v[:, :, a:b].float(), is_causal=True
            ).transpose(1, 2)
            for a, b in ((0, 3), (3, 7))
        ],
        dim=1,
    )
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected.to(torch.bfloat16))
