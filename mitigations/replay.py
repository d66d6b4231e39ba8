"""replay: mix general data into the SFT stream at a fixed ratio, by loss tokens, tokens or examples, seeded.

Sources: `self` (self-synthesized rehearsal: the base model's own answers to general prompts, the offline
default), a .txt / .jsonl file of plain text, a conversation file in any layout `data.path` accepts (with
`kind: conversations`), or a `datasets` name (streamed). Plain text is trained with full-sequence loss,
conversations with response-only loss. `ratio` is the replay share of the mixed stream; by default of its
target tokens, the tokens the loss is taken on (each weighs the same in a step's loss), so it is the replay
share of the loss. Counted in examples or all tokens it can be far off that: plain text is all targets,
a conversation's prompt is none. The report records the realised share by all three measures.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Literal

from harness.batching import target_tokens
from harness.configlib import knob
from harness.data import load_conversations, tokenize_all
from mitigations.registry import register_mitigation
from mitigations.rehearsal import read_texts, self_rehearsal, text_example


@dataclass
class ReplayConfig:
    ratio: float = knob(0.2, "share of the mixed training stream that is replay data, in [0, 1)")
    by: Literal["target_tokens", "tokens", "examples"] = knob(
        "target_tokens", "what the ratio counts: target_tokens (the share of the loss), tokens or examples")
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


MEASURES = {"examples": lambda e: 1, "tokens": len, "target_tokens": lambda e: target_tokens([e])}


def replay_pool(config: ReplayConfig, model, ctx) -> tuple[list, dict]:
    """The distinct replay examples (tokenized) for `config.source`, and counts for the report.

    Self rehearsal counts answers that finished and that were cut at max_new_tokens; plain text counts texts
    cut at max_seq_len.
    """
    tokenizer = ctx.tokenizer
    if config.source == "self":
        cache = ctx.output_dir / "replay_self.jsonl"
        return self_rehearsal(model, tokenizer, ctx.job.data.format, config.pool_size,
                                        config.max_new_tokens, config.max_seq_len, cache)
    if config.kind == "conversations":
        data = replace(ctx.job.data, path=config.source, split=config.split, limit=config.pool_size,
                       max_seq_len=config.max_seq_len, eval_split=None)
        return tokenize_all(load_conversations(data), tokenizer, data)[0], {}
    texts = read_texts(config.source, config.split, config.text_field, config.pool_size)
    examples = [text_example(tokenizer, t, config.max_seq_len) for t in texts]
    return examples, {"texts_cut": sum(e.input_ids[-1] != tokenizer.eos_token_id for e in examples)}


def _cycle(pool: list, rng: random.Random):
    while True:  # seeded shuffles of the pool, one after another
        yield from (pool[i] for i in rng.sample(range(len(pool)), len(pool)))


def fill_quota(pool: list, sft: list, ratio: float, by: str, rng: random.Random) -> list:
    """Replay examples, cycling through seeded shuffles of the pool, until they are nearest to `ratio` of the mix."""
    measure = MEASURES[by]
    if ratio == 0 or not any(map(measure, pool)):
        return []
    quota = ratio / (1 - ratio) * sum(measure(e) for e in sft)
    chosen, total = [], 0
    for example in _cycle(pool, rng):
        if abs(total + measure(example) - quota) >= abs(total - quota):
            return chosen
        chosen.append(example)
        total += measure(example)


def shares(extra: list, mixed: list) -> dict:
    """The replay share of the mixed stream by each measure."""
    return {name: sum(map(m, extra)) / max(1, sum(map(m, mixed))) for name, m in MEASURES.items()}


@register_mitigation("replay", ReplayConfig)
class Replay:
    def __init__(self, config: ReplayConfig):
        self.config = config
        self.stats: dict = {}

    def mix_data(self, examples, model, ctx):
        pool, counts = replay_pool(self.config, model, ctx)
        extra = fill_quota(pool, examples, self.config.ratio, self.config.by, random.Random(self.config.seed))
        mixed = list(examples) + extra
        share = shares(extra, mixed)
        self.stats = {"ratio": self.config.ratio, "by": self.config.by, "source": self.config.source,
                      "pool": len(pool), **counts, "replay_examples": len(extra),
                      "realised_ratio": share[self.config.by], "share": share}
        return mixed

    def report(self, model, ctx) -> dict:
        return self.stats
