"""replay: mix general data into the SFT stream at a fixed ratio, by loss tokens, tokens or examples, seeded.

The replay examples are `data` (mitigations/general_data.py): by default `self`, the base model's own answers
to general prompts; or a text or conversation file, or a `datasets` name. Plain text is trained with
full-sequence loss, conversations with response-only loss. `ratio` is the replay share of the mixed stream;
by default of its target tokens, the tokens the loss is taken on (each weighs the same in a step's loss), so
it is the replay share of the loss. Counted in examples or all tokens it can be far off that: plain text is
all targets, a conversation's prompt is none. The report records the realised share by all three measures.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar, Literal

from forgetting.harness.batching import target_tokens
from forgetting.harness.configlib import knob
from forgetting.mitigations.general_data import GeneralData, general_examples, refuse_sft
from forgetting.mitigations.registry import register_mitigation


@dataclass
class ReplayConfig:
    ratio: float = knob(0.2, "share of the mixed training stream that is replay data, in [0, 1)")
    by: Literal["target_tokens", "tokens", "examples"] = knob(
        "target_tokens", "what the ratio counts: target_tokens (the share of the loss), tokens or examples"
    )
    data: GeneralData = knob(GeneralData(), "the replay examples: the pool the quota is drawn from")
    seed: int = knob(0, "seed for which replay examples fill the quota")
    moved_keys: ClassVar[dict[str, str]] = {
        "source": "data.source",
        "kind": "data.kind",
        "split": "data.split",
        "text_field": "data.text_field",
        "pool_size": "data.size",
        "max_new_tokens": "data.max_new_tokens",
        "max_seq_len": "data.max_seq_len",
    }

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio: must be in [0, 1), got {self.ratio}")
        refuse_sft(self.data, "replay")


MEASURES = {"examples": lambda e: 1, "tokens": len, "target_tokens": lambda e: target_tokens([e])}


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
        pool, counts = general_examples(self.config.data, model, ctx, ctx.output_dir / "replay_self.jsonl")
        extra = fill_quota(pool, examples, self.config.ratio, self.config.by, random.Random(self.config.seed))
        mixed = list(examples) + extra
        share = shares(extra, mixed)
        self.stats = {
            "ratio": self.config.ratio,
            "by": self.config.by,
            "source": self.config.data.source,
            "pool": len(pool),
            **counts,
            "replay_examples": len(extra),
            "realised_ratio": share[self.config.by],
            "share": share,
        }
        return mixed

    def report(self, model, ctx) -> dict:
        return self.stats
