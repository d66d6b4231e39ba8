"""replay: mix general data into the SFT stream at a fixed ratio, by examples or by tokens, seeded.

Sources: `self` (self-synthesized rehearsal: the base model's own answers to general prompts, the offline
default), a .txt / .jsonl file of plain text, a conversation file in any layout `data.path` accepts (with
`kind: conversations`), or a `datasets` name (streamed). Plain text is trained with full-sequence loss,
conversations with response-only loss. `ratio` is the replay share of the mixed stream.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Literal

from harness.configlib import knob
from mitigations import register_mitigation


@dataclass
class ReplayConfig:
    ratio: float = knob(0.2, "share of the mixed training stream that is replay data, in [0, 1)")
    by: Literal["examples", "tokens"] = knob("examples", "measure the ratio in examples or in tokens")
    source: str = knob("self", "self (self-synthesized rehearsal), a .txt/.jsonl file, or a datasets name")
    kind: Literal["text", "conversations"] = knob("text", "for file sources: plain text or SFT conversations")
    split: str = knob("train", "datasets split (hub sources)")
    text_field: str = knob("text", "field holding the text (jsonl and hub sources)")
    pool_size: int = knob(64, "distinct replay examples to draw from (self: prompts to answer)")
    max_new_tokens: int = knob(128, "self: answer length when synthesizing")
    max_seq_len: int = knob(512, "tokens per replay example")
    seed: int = knob(0, "seed for which replay examples fill the quota")

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio: must be in [0, 1), got {self.ratio}")
        if self.pool_size < 1 or self.max_new_tokens < 1 or self.max_seq_len < 8:
            raise ValueError("pool_size and max_new_tokens must be >= 1, max_seq_len >= 8")


def replay_pool(config: ReplayConfig, model, ctx) -> list:
    """The distinct replay examples (tokenized) for `config.source`."""
    from mitigations import rehearsal

    tokenizer = ctx.tokenizer
    if config.source == "self":
        cache = ctx.output_dir / "replay_self.jsonl"
        return rehearsal.self_rehearsal(model, tokenizer, ctx.job.data.format, config.pool_size,
                                        config.max_new_tokens, config.max_seq_len, cache)
    if config.kind == "conversations":
        from harness.data import load_conversations, tokenize_all

        data = replace(ctx.job.data, path=config.source, split=config.split, limit=config.pool_size,
                       max_seq_len=config.max_seq_len, eval_split=None)
        return tokenize_all(load_conversations(data), tokenizer, data)[0]
    texts = rehearsal.read_texts(config.source, config.split, config.text_field, config.pool_size)
    return [rehearsal.text_example(tokenizer, t, config.max_seq_len) for t in texts]


def _cycle(pool: list, rng: random.Random):
    while True:  # seeded shuffles of the pool, one after another
        yield from (pool[i] for i in rng.sample(range(len(pool)), len(pool)))


def fill_quota(pool: list, sft: list, ratio: float, by: str, rng: random.Random) -> list:
    """Replay examples, cycling through seeded shuffles of the pool, until they are nearest to `ratio` of the mix."""
    if ratio == 0 or not pool:
        return []
    measure = (lambda e: 1) if by == "examples" else len
    quota = ratio / (1 - ratio) * sum(measure(e) for e in sft)
    chosen, total = [], 0
    for example in _cycle(pool, rng):
        if abs(total + measure(example) - quota) >= abs(total - quota):
            return chosen
        chosen.append(example)
        total += measure(example)


@register_mitigation("replay", ReplayConfig)
class Replay:
    def __init__(self, config: ReplayConfig):
        self.config = config
        self.stats: dict = {}

    def mix_data(self, examples, model, ctx):
        pool = replay_pool(self.config, model, ctx)
        extra = fill_quota(pool, examples, self.config.ratio, self.config.by, random.Random(self.config.seed))
        measure = (lambda e: 1) if self.config.by == "examples" else len
        replayed, total = sum(map(measure, extra)), sum(map(measure, extra)) + sum(map(measure, examples))
        self.stats = {"ratio": self.config.ratio, "by": self.config.by, "source": self.config.source,
                      "pool": len(pool), "replay_examples": len(extra), "realised_ratio": replayed / max(1, total)}
        return list(examples) + extra

    def report(self, model, ctx) -> dict:
        return self.stats
