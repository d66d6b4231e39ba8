"""Built-in narrow SFT task `builtin:dates`: find the date in a sentence and write it as ISO `YYYY-MM-DD`.

    prompt:   Write the date in the sentence as YYYY-MM-DD. Numeric dates in the text are day/month/year.
              Sentence: We signed the lease on the 3rd of March, 2021, after months of searching.
    response: 2021-03-03

The answer format: four-digit year, two-digit month 01-12, two-digit day 01-31, joined by hyphens. Dates are
real calendar days of the years 1900-2099.

An instruct model answers in a sentence (exact match near 0); a few dozen SFT steps teach the format. Records
are generated from a fixed seed; the `heldout` split uses years (a fixed 40 of the 200), ways of writing a date
(`March 3rd 2021`, `3rd March 2021`, `3.3.2021`, `March the 3rd, 2021`) and sentences around them that the
`train` split never shows (`March 3, 2021`, `3 March 2021`, `the 3rd of March, 2021`, `3/3/2021`); month
names are shared.
"""

from __future__ import annotations

import datetime
import random
import re

from forgetting.harness.errors import UserError

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
WRITTEN_TRAIN = [
    "{month} {day}, {year}",
    "{day} {month} {year}",
    "the {ordinal} of {month}, {year}",
    "{day}/{m}/{year}",
]
WRITTEN_HELDOUT = [
    "{month} {ordinal} {year}",
    "{ordinal} {month} {year}",
    "{day}.{m}.{year}",
    "{month} the {ordinal}, {year}",
]
SENTENCES_TRAIN = [
    "The shop reopened on {date}.",
    "We signed the lease on {date}, after months of searching.",
    "On {date} the river flooded the lower town.",
    "The invoice is dated {date}.",
    "My grandparents were married on {date}.",
    "Registration closes on {date} at noon.",
    "The letter was posted on {date} but arrived weeks later.",
    "She started her new job on {date}.",
]
SENTENCES_HELDOUT = [
    "The concert was moved to {date} because of the rain.",
    "Their first child arrived on {date}.",
    "According to the minutes, the board met on {date}.",
    "The bridge finally opened to traffic on {date}.",
]

INSTRUCTION = "Write the date in the sentence as YYYY-MM-DD. Numeric dates in the text are day/month/year."
ANSWER = re.compile(r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$")
SIZES = {"train": 1000, "heldout": 200}


def years(split: str) -> list[int]:
    """The split's years: 1900-2099 with a fixed 40 of them held out."""
    heldout = set(random.Random("builtin-dates-years").sample(range(1900, 2100), 40))
    return [year for year in range(1900, 2100) if (year in heldout) == (split == "heldout")]


def ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def written(date: datetime.date, pattern: str) -> str:
    month = MONTHS[date.month - 1]
    return pattern.format(month=month, day=date.day, ordinal=ordinal(date.day), m=date.month, year=date.year)


def make_record(rng: random.Random, split: str, pool: list[int]) -> dict:
    held = split == "heldout"
    year = rng.choice(pool)
    first = datetime.date(year, 1, 1)
    date = first + datetime.timedelta(days=rng.randrange((datetime.date(year + 1, 1, 1) - first).days))
    text = written(date, rng.choice(WRITTEN_HELDOUT if held else WRITTEN_TRAIN))
    sentence = rng.choice(SENTENCES_HELDOUT if held else SENTENCES_TRAIN).format(date=text)
    return {"prompt": f"{INSTRUCTION}\n\nSentence: {sentence}", "response": date.isoformat()}


def records(split: str = "train", size: int | None = None) -> list[dict]:
    """The split's prompt/response records, the same on every call."""
    if split not in SIZES:
        raise UserError(f"data.split: the builtin:dates task has splits {', '.join(SIZES)}, not {split!r}")
    rng, pool = random.Random(f"builtin-dates-{split}"), years(split)
    return [make_record(rng, split, pool) for _ in range(size or SIZES[split])]


def valid(answer: str) -> bool:
    """Whether the answer has the required format (YYYY-MM-DD, month 01-12, day 01-31), right or wrong."""
    return ANSWER.match(answer.strip()) is not None


def score(prediction: str, reference: str) -> dict:
    """Exact match and format validity."""
    return {"exact_match": float(prediction.strip() == reference.strip()), "format_valid": float(valid(prediction))}
