"""End-to-end on the embedded SmolLM2-135M-Instruct: a short SFT run lowers held-out loss on the built-in task."""

from __future__ import annotations

import pytest

from forgetting.harness.job import load_job
from forgetting.harness.train import train


@pytest.mark.slow
def test_short_run_on_the_embedded_model_lowers_heldout_loss(tmp_path):
    job = load_job(
        None,
        [
            "data.max_seq_len=256",
            "data.eval_split=heldout",
            "data.eval_limit=24",
            "train.lr=5e-5",
            "train.max_steps=3",
            "train.batch_size=8",
            "train.warmup_ratio=0",
            "train.progress=false",
            "train.precision=fp32",  # never the 135M model in bf16: emulated (~75x slower) on AVX2-only CPUs
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    result = train(job)
    before, after = result.heldout_loss["before"], result.heldout_loss["after"]
    assert before > 0.3  # the base model does not know the record format
    assert after < before / 2, (before, after)
    assert (result.final_dir / "model.safetensors").is_file() and (result.final_dir / "chat_template.jinja").is_file()
