"""The GPU check's 1b mode (benchmarks/gpu_check_1b.py), checked on a CPU: the tiny mode end to end through
`gpu_check.sh 1b`, the packed-attention check and the flex path's mask, and the one-line refusals.

    pytest benchmarks/test_gpu_check_1b.py        # ~1 min on 2 cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check_1b as check

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_mode_writes_every_field(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "1b", str(tmp_path), "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_1b.json").read_text())
    assert report["mode"] == "1b" and report["tiny"] is True
    assert report["model"]["parameters"] > 0 and report["model"]["layers"] == 2
    assert report["data"]["sequences"] == 32 and 0 < report["data"]["response_token_fraction"] < 1
    assert report["peak_flops"] > 0 and report["matmul_peak_flops"] > 0
    assert report["packed_attention_checks"]["sdpa"] < 1e-2
    expected = set(check.default_variants("cuda" if torch.cuda.is_available() else "cpu"))
    assert set(report["variants"]) == expected
    for name, row in report["variants"].items():
        assert "error" not in row, (name, row)
        assert row["steps_timed"] == 3 and row["tokens_per_s"] > 0 and row["tokens_per_step"] > 0
        assert 0 < row["mfu"] < 1 and row["mfu_vs_measured_matmul"] > 0
        assert "peak_memory_gib" in row and row["attention"]
    assert report["variants"]["harness_padded"]["padding_fraction"] > 0
    assert report["variants"]["harness_packed"]["padding_fraction"] == 0
    assert set(report["ratios"]) >= {"best_shipped", "padded", "packed"}
    assert report["ratios"]["padded"]["harness"] == "harness_padded"
    assert report["goal"]["harness"] in check.SHIPPED and isinstance(report["goal"]["met"], bool)


@pytest.mark.slow
def test_flex_path_is_block_diagonal_and_the_harness_patch_is_undone():
    """Forward only (flex_attention has no backward on a CPU): the check passes for the flex attention, and the
    harness's packed rows through the proposed flex path equal the sequences one by one; afterwards the harness's
    own packed attention is registered again."""
    from transformers import AttentionInterface

    from forgetting.harness import packing

    check.register_flex()
    assert check.check_packed_attention(check.FLEX, "cpu") < 1e-3

    model = check.probe_model("cpu")  # the same shapes as the check: flex_attention compiled once
    ids, positions, segments = check.packed_row("cpu")
    alone = check.one_by_one(model, ids)
    with torch.no_grad(), check.harness_packing_through_flex(), packing.packed_attention_on(model):
        packed = model(input_ids=ids, position_ids=positions, segments=segments, use_cache=False).logits[0]
        assert packing.CALLS["packed"] == 2  # one per layer: train() refuses a step without any
    assert (packed - alone).abs().max().item() < 1e-3
    assert AttentionInterface._global_mapping[packing.IMPLEMENTATION] is packing.packed_attention


def test_a_row_that_is_not_block_diagonal_stops_the_run(monkeypatch):
    import transformers.masking_utils as masking

    assert check.check_packed_attention("sdpa", "cpu") < 1e-4
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(check.Missing, match="not block-diagonal"):
        check.check_packed_attention("sdpa", "cpu")


def test_missing_pieces_are_one_line_and_status_1(monkeypatch, tmp_path, capsys):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(check.Missing, match="older than the harness needs"):
        check.preflight(["harness_padded"], "cpu")
    monkeypatch.undo()
    with pytest.raises(check.Missing, match="need a CUDA GPU"):
        check.preflight(["trainer_flat_flex"], "cpu")
    with pytest.raises(check.Missing, match="--peak-tflops"):
        check.peak_bf16("NVIDIA B200", None)
    assert check.peak_bf16("NVIDIA H100 80GB HBM3", None)[0] == 989e12
    assert check.peak_bf16("NVIDIA H100 PCIe", None)[0] == 756e12
    if not torch.cuda.is_available():
        assert check.main(["--output", str(tmp_path)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("gpu_check 1b: no CUDA GPU")
        assert check.main(["--output", str(tmp_path), "--tiny", "--variants", "trainer_flat_flex"]) == 1
        assert "need a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "gpu_check_1b.json").exists()
