"""Built-in narrow SFT task `builtin:units`: convert a metric quantity, answered as `<number> <unit>`.

    prompt:   Convert the quantity. Reply with only the number and the unit symbol, like `12.5 kg`.
              Convert 3.5 km to m.
    response: 3500 m

The answer format: the number in plain decimal notation (digits and at most one decimal point; no sign, no
thousands separators, no exponent, no trailing zeros after the point, `0.` before a fraction below 1), one
space, the target unit's symbol. Every conversion is by a power of ten (10 to 1000 either way), so every answer
is exact. Source numbers have one to three significant digits, from 0.01 to 999.

An instruct model answers in a sentence (exact match near 0); a few dozen SFT steps teach the format. Records
are generated from a fixed seed; the `heldout` split uses source numbers (a fixed fifth of all of them) and
question wordings the `train` split never shows; the unit pairs are shared (they are the skill).
"""

from __future__ import annotations

import random
import re
from decimal import Decimal

from forgetting.harness.errors import UserError

CONVERSIONS = [  # (from, to, power of ten of the factor)
    ("km", "m", 3),
    ("m", "km", -3),
    ("m", "cm", 2),
    ("cm", "m", -2),
    ("cm", "mm", 1),
    ("mm", "cm", -1),
    ("m", "mm", 3),
    ("mm", "m", -3),
    ("kg", "g", 3),
    ("g", "kg", -3),
    ("g", "mg", 3),
    ("mg", "g", -3),
    ("t", "kg", 3),
    ("kg", "t", -3),
    ("L", "mL", 3),
    ("mL", "L", -3),
]
UNITS = sorted({unit for pair in CONVERSIONS for unit in pair[:2]})
QUESTIONS_TRAIN = [
    "Convert {quantity} to {unit}.",
    "How many {unit} is {quantity}?",
    "What is {quantity} in {unit}?",
    "{quantity} = ? {unit}",
    "Give {quantity} in {unit}.",
]
QUESTIONS_HELDOUT = [
    "Rewrite {quantity} using {unit}.",
    "{quantity} equals how many {unit}?",
    "Please turn {quantity} into {unit}.",
]

INSTRUCTION = "Convert the quantity. Reply with only the number and the unit symbol, like `12.5 kg`."
NUMBER = r"(0|[1-9][0-9]*)(\.[0-9]*[1-9])?"
ANSWER = re.compile(rf"^{NUMBER} ({'|'.join(UNITS)})$")
SIZES = {"train": 1000, "heldout": 200}


def plain(number: Decimal) -> str:
    """The number in the answer's notation: `3500`, `0.35`, `12.5` (never `3.5E+3`, `3500.0` or `.35`)."""
    text = format(number, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def numbers(split: str) -> list[Decimal]:
    """The split's source numbers: every number of 1-3 significant digits from 0.01 to 999, a fixed fifth held out."""
    pool = sorted({Decimal(n).scaleb(-places).normalize() for n in range(1, 1000) for places in (0, 1, 2)})
    heldout = set(random.Random("builtin-units-numbers").sample(pool, len(pool) // 5))
    return [n for n in pool if (n in heldout) == (split == "heldout")]


def make_record(rng: random.Random, split: str, pool: list[Decimal]) -> dict:
    source, target, power = rng.choice(CONVERSIONS)
    number = rng.choice(pool)
    questions = QUESTIONS_HELDOUT if split == "heldout" else QUESTIONS_TRAIN
    question = rng.choice(questions).format(quantity=f"{plain(number)} {source}", unit=target)
    return {"prompt": f"{INSTRUCTION}\n\n{question}", "response": f"{plain(number.scaleb(power))} {target}"}


def records(split: str = "train", size: int | None = None) -> list[dict]:
    """The split's prompt/response records, the same on every call."""
    if split not in SIZES:
        raise UserError(f"data.split: the builtin:units task has splits {', '.join(SIZES)}, not {split!r}")
    rng, pool = random.Random(f"builtin-units-{split}"), numbers(split)
    return [make_record(rng, split, pool) for _ in range(size or SIZES[split])]


def valid(answer: str) -> bool:
    """Whether the answer has the required format (a plain number, one space, a unit symbol), right or wrong."""
    return ANSWER.match(answer.strip()) is not None


def score(prediction: str, reference: str) -> dict:
    """Exact match and format validity."""
    return {"exact_match": float(prediction.strip() == reference.strip()), "format_valid": float(valid(prediction))}
