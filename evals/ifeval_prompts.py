"""IFEval-format prompts for the offline `forgetting_ifeval` task, worded by lm-eval's own checkers.

Each prompt is a short writing request about a topic plus one or two verifiable instructions. The
instruction text is produced by the checker's own `build_description(**kwargs)`, so prompt, kwargs and the
scoring code (lm-eval's `ifeval` checkers) always agree. Records follow IFEval's layout: `key`, `prompt`,
`instruction_id_list`, `kwargs`.
"""

from __future__ import annotations

import random

from forgetting.evals.nltk_offline import ensure_punkt_tab

TOPICS = [
    "your favourite season",
    "a walk in the park",
    "why people keep pets",
    "the ocean",
    "a rainy day",
    "learning to cook",
    "a visit to a museum",
    "the benefits of reading",
    "a city at night",
    "trees",
    "a birthday party",
    "riding a bicycle",
    "the moon",
    "a small village",
    "breakfast",
    "friendship",
    "a train journey",
    "mountains",
    "the first day of school",
    "music",
    "a garden in spring",
    "coffee",
    "the importance of sleep",
    "a thunderstorm",
    "libraries",
    "the desert",
    "a family dinner",
    "snow",
    "the history of bread",
    "bees",
]
TASKS = [
    "Write a short paragraph about {}.",
    "Describe {} in a few sentences.",
    "Tell me about {}.",
    "Write a short note to a friend about {}.",
]

# (instruction id, kwargs options); each kwargs dict is passed to the checker's build_description
INSTRUCTIONS = [
    ("punctuation:no_comma", [{}]),
    ("change_case:english_lowercase", [{}]),
    ("change_case:english_capital", [{}]),
    (
        "length_constraints:number_words",
        [{"relation": "less than", "num_words": n} for n in (40, 60, 80)]
        + [{"relation": "at least", "num_words": n} for n in (20, 40)],
    ),
    (
        "length_constraints:number_sentences",
        [{"relation": "less than", "num_sentences": n} for n in (3, 4, 5)]
        + [{"relation": "at least", "num_sentences": n} for n in (2, 3)],
    ),
    ("keywords:existence", [{"keywords": k} for k in (["happy"], ["light", "time"], ["friend"], ["small", "green"])]),
    ("keywords:forbidden_words", [{"forbidden_words": k} for k in (["very", "really"], ["good"], ["the"])]),
    ("detectable_format:title", [{}]),
    ("detectable_format:number_bullet_lists", [{"num_bullets": n} for n in (2, 3, 4)]),
    ("detectable_format:json_format", [{}]),
    ("detectable_content:postscript", [{"postscript_marker": m} for m in ("P.S.", "P.P.S")]),
    ("startend:end_checker", [{"end_phrase": p} for p in ("Is there anything else I can help with?", "Thank you.")]),
    ("startend:quotation", [{}]),
    ("detectable_format:number_highlighted_sections", [{"num_highlights": n} for n in (1, 2)]),
    (
        "keywords:letter_frequency",
        [{"letter": c, "let_frequency": n, "let_relation": "at least"} for c, n in (("a", 5), ("e", 8), ("o", 4))],
    ),
    ("detectable_content:number_placeholders", [{"num_placeholders": n} for n in (1, 2)]),
]
SIZE = 200


def _describe(instruction_id: str, kwargs: dict) -> str:
    ensure_punkt_tab()
    # deferred on purpose: importing lm-eval's IFEval checkers downloads NLTK's punkt_tab unless it is present,
    # and this machine builds it offline first (ensure_punkt_tab)
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    checker = INSTRUCTION_DICT[instruction_id](instruction_id)
    return checker.build_description(**kwargs)


def prompts(size: int = SIZE) -> list[dict]:
    """IFEval records: 70% with one instruction, 30% with two compatible ones; the same on every call."""
    rng = random.Random("forgetting-ifeval-v1")
    records = []
    for key in range(size):
        count = 2 if rng.random() < 0.3 else 1
        chosen = rng.sample(range(len(INSTRUCTIONS)), count)
        ids = [INSTRUCTIONS[i][0] for i in chosen]
        if "change_case:english_lowercase" in ids and "change_case:english_capital" in ids:
            ids, chosen = ids[:1], chosen[:1]
        kwargs = [dict(rng.choice(INSTRUCTIONS[i][1])) for i in chosen]
        task = rng.choice(TASKS).format(rng.choice(TOPICS))
        text = " ".join([task] + [_describe(i, k) for i, k in zip(ids, kwargs)])
        records.append({"key": key, "prompt": text, "instruction_id_list": ids, "kwargs": kwargs})
    return records
