"""Run one optimizer step of a job under torchrun and write, as JSON, the bytes each process holds in parameters,
gradients and optimizer state (local shards of a sharded model) to output_dir/bytes-<rank>.json:
`torchrun ... tests/shard_bytes.py KEY=VALUE...`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from forgetting.harness.batching import collate
from forgetting.harness.job import load_job
from forgetting.harness.loss import summed_response_loss
from forgetting.harness.sharding import local
from forgetting.harness.train import make_accelerator, setup, train_step


def held_bytes(run) -> dict:
    params = list(run.model.parameters())
    state = [t for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    return {
        "parameters": sum(local(p).numel() * local(p).element_size() for p in params),
        "gradients": sum(local(p.grad).numel() * local(p.grad).element_size() for p in params if p.grad is not None),
        "optimizer": sum(local(t).numel() * local(t).element_size() for t in state),
    }


def main(overrides: list[str]) -> None:
    job = load_job(None, overrides)
    accelerator = make_accelerator(job)
    run = setup(job, accelerator)
    train_step(run, 0)  # creates AdamW's state; the step clears the gradients, so one more backward makes them
    batch = {k: v.to(accelerator.device) for k, v in collate(run.examples[:2], run.tokenizer.pad_token_id).items()}
    summed_response_loss(run.model, batch).backward()
    path = Path(job.output_dir) / f"bytes-{accelerator.process_index}.json"
    path.write_text(json.dumps({"rank": accelerator.process_index, **held_bytes(run)}))


if __name__ == "__main__":
    main(sys.argv[1:])
