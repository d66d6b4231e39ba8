"""Run by tests/test_hf_trainer.py under `torchrun --nproc_per_node 2` (DDP, gloo): each process checks that its
step-2 gradient difference (with the mitigation minus without) is the harness's penalty gradient, counted once
(not once per process), and prints one OK line per case. argv[1]: a scratch directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.test_hf_trainer import expected_gradient, penalty_difference, sft_run, spec_of  # noqa: E402

CASES = [("l2sp", 2), ("ewc", 2), ("kl_to_base", 1)]  # (mitigation, gradient accumulation steps)


def check(name: str, ga: int, scratch: Path) -> None:
    mine = scratch / f"rank{os.environ['RANK']}"  # each process's own files (the general text, kl's reference)
    mine.mkdir(parents=True, exist_ok=True)
    spec = spec_of(name, mine)
    # 2 processes x (2 // ga) sequences x ga micro-batches: the 4 sequences per step of the one-process tests
    kw = dict(per_device_train_batch_size=2 // ga, ddp_backend="gloo")
    trainer, on = sft_run(scratch / f"{name}{ga}_on", [spec], ga, **kw)
    _, off = sft_run(scratch / f"{name}{ga}_off", [], ga, **kw)
    assert trainer.accelerator.num_processes == 2
    diff = penalty_difference(on, off)
    for n, e in expected_gradient(name, spec, trainer, on.params[1], mine).items():
        torch.testing.assert_close(diff[n], e, rtol=1e-4, atol=1e-6)
    print(f"OK rank {dist.get_rank()}: {name} ga={ga}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    scratch = Path(sys.argv[1])
    for name, ga in CASES:
        check(name, ga, scratch)
