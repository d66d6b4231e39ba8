"""The training loop's patches to the model (packed attention, the last layer) are undone when it raises."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from forgetting.harness import last_layer
from forgetting.harness.configlib import knob
from forgetting.harness.errors import RunError
from forgetting.harness.train import train
from forgetting.mitigations import REGISTRY, register_mitigation
from tests.helpers import tiny_job


@dataclass
class BreakAtConfig:
    step: int = knob(2, "the optimizer step (1-based) whose penalty is NaN")


class BreakAt:
    """Keeps the model it is given and makes one step's loss NaN, which the loop refuses with a RunError."""

    models: list = []

    def __init__(self, config):
        self.config = config
        self.calls = 0

    def wrap_model(self, model, ctx):
        BreakAt.models.append(model)
        return model

    def penalty(self, model, ctx):
        self.calls += 1
        return torch.tensor(float("nan") if self.calls == self.config.step else 0.0)


@pytest.fixture
def break_at():
    register_mitigation("break_at", BreakAtConfig)(BreakAt)
    BreakAt.models = []
    yield BreakAt
    del REGISTRY["break_at"]


def _patches(model) -> dict:
    """What the loop's patches change: the attention implementation, forwards set on modules, model hooks."""
    layer = last_layer.last_decoder_layer(model)
    return {
        "attention": model.config._attn_implementation,
        "own forwards": [m for m in (layer.mlp, layer.self_attn.o_proj) if "forward" in vars(m)],
        "hooks": (len(model._forward_pre_hooks), len(model._forward_hooks)),
    }


def test_a_run_error_mid_loop_leaves_the_model_unpatched(tmp_path, break_at):
    job = tiny_job(
        tmp_path,
        "data.limit=8",
        "train.batch_size=4",
        "train.max_steps=3",
        "train.lr=2e-5",
        "train.packing=packed",
        "mitigations=[{name: break_at, step: 2}]",
        "train.memory_check=false",  # the memory check wraps a model of its own (meta device) through the hooks too
    )
    with pytest.raises(RunError, match="non-finite loss.*at step 2"):
        train(job)
    (model,) = break_at.models
    assert _patches(model) == {"attention": "sdpa", "own forwards": [], "hooks": (0, 0)}
