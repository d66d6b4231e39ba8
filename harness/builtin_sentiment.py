"""Built-in narrow SFT task `builtin:sentiment`: label a product review positive, negative or neutral in one word.

    prompt:   What is the sentiment of this product review: positive, negative or neutral?
              Review: I bought this kettle last month. It broke after two days. I returned it the same week.
    response: negative

The answer format: exactly one of the labels `positive`, `negative`, `neutral`, lowercase, nothing else. A
review is a neutral opening about a product and one or two sentences of one label (neutral sentences state facts
and no opinion).

An instruct model answers in a sentence (exact match near 0); a few dozen SFT steps teach the format. Records
are generated from a fixed seed; the `heldout` split uses products, opinion sentences and review openings the
`train` split never shows, so its labels must come from wording the fine-tune never saw; the labels are shared.
"""

from __future__ import annotations

import random

from forgetting.harness.errors import UserError

LABELS = ("positive", "negative", "neutral")
PRODUCTS_TRAIN = [
    "kettle",
    "blender",
    "backpack",
    "desk lamp",
    "toaster",
    "umbrella",
    "pair of headphones",
    "office chair",
    "water bottle",
    "alarm clock",
    "frying pan",
    "keyboard",
]
PRODUCTS_HELDOUT = ["rice cooker", "pair of hiking boots", "phone case", "electric fan", "bicycle helmet", "tent"]
OPINIONS_TRAIN = {
    "positive": [
        "It works perfectly and I use it every day.",
        "Honestly the best purchase I have made this year.",
        "Sturdy, quiet and easy to clean.",
        "I would happily buy it again.",
        "It exceeded my expectations.",
        "My whole family loves it.",
        "Great value for the price.",
    ],
    "negative": [
        "It broke after two days.",
        "A complete waste of money.",
        "The instructions were useless and it never worked properly.",
        "I returned it the same week.",
        "Cheaply made and very loud.",
        "It arrived scratched and customer service ignored me.",
        "Nothing about it works as advertised.",
    ],
    "neutral": [
        "It comes in grey and in blue.",
        "It arrived in a cardboard box on Tuesday.",
        "The manual is twelve pages long.",
        "It runs on two AA batteries.",
        "I have had it for about three weeks.",
        "It is the same model my neighbour has.",
        "The label says it is made of plastic and steel.",
    ],
}
OPINIONS_HELDOUT = {
    "positive": [
        "Worth every penny.",
        "I am delighted with it.",
        "It does the job beautifully.",
        "Five stars from me, no hesitation.",
    ],
    "negative": [
        "I regret buying it.",
        "It stopped working within a month.",
        "Avoid this one, it is flimsy and disappointing.",
        "The worst thing I have ordered online.",
    ],
    "neutral": [
        "It weighs roughly one kilogram.",
        "The box says it was produced in 2023.",
        "It has a single power button on the side.",
        "I keep it in the hall cupboard.",
    ],
}
OPENINGS_TRAIN = ["I bought this {product} last month.", "Review of the {product}.", "Got the {product} as a gift."]
OPENINGS_HELDOUT = ["My partner picked up the {product} at a market.", "Notes on the {product} we ordered."]

INSTRUCTION = "What is the sentiment of this product review: positive, negative or neutral?"
SIZES = {"train": 1000, "heldout": 200}


def make_record(rng: random.Random, split: str) -> dict:
    held = split == "heldout"
    label = rng.choice(LABELS)
    product = rng.choice(PRODUCTS_HELDOUT if held else PRODUCTS_TRAIN)
    opening = rng.choice(OPENINGS_HELDOUT if held else OPENINGS_TRAIN).format(product=product)
    opinions = rng.sample((OPINIONS_HELDOUT if held else OPINIONS_TRAIN)[label], rng.choice((1, 2)))
    review = " ".join([opening, *opinions])
    return {"prompt": f"{INSTRUCTION}\n\nReview: {review}", "response": label}


def records(split: str = "train", size: int | None = None) -> list[dict]:
    """The split's prompt/response records, the same on every call."""
    if split not in SIZES:
        raise UserError(f"data.split: the builtin:sentiment task has splits {', '.join(SIZES)}, not {split!r}")
    rng = random.Random(f"builtin-sentiment-{split}")
    return [make_record(rng, split) for _ in range(size or SIZES[split])]


def valid(answer: str) -> bool:
    """Whether the answer is one of the labels exactly (lowercase, no punctuation), right or wrong."""
    return answer.strip() in LABELS


def score(prediction: str, reference: str) -> dict:
    """Exact match and format validity."""
    return {"exact_match": float(prediction.strip() == reference.strip()), "format_valid": float(valid(prediction))}
