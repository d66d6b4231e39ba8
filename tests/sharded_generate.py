"""Under torchrun: greedy answers of a sharded tiny model (untied head, so that they are words).

`torchrun ... tests/sharded_generate.py DIR` writes each process's answers to DIR/answers-<rank>.json; the test
compares them with the unsharded model's answers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from forgetting.harness.config import ModelConfig
from forgetting.harness.models import load_tokenizer, tiny_model
from forgetting.harness.sharding import shard_model
from forgetting.mitigations.rehearsal import general_prompts, synthesize


def answers(sharded: bool) -> list:
    tokenizer = load_tokenizer(ModelConfig())
    model = tiny_model(len(tokenizer), seed=3, tie_word_embeddings=False)
    if sharded:
        if dist.get_rank() != 0:
            with torch.device("meta"):
                model = tiny_model(len(tokenizer), seed=3, tie_word_embeddings=False)
        shard_model(model, torch.device("cpu"), None)
    return synthesize(model, tokenizer, general_prompts(5), max_new_tokens=12, batch_size=2)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    Path(sys.argv[1], f"answers-{dist.get_rank()}.json").write_text(json.dumps(answers(sharded=True)))
    dist.destroy_process_group()
