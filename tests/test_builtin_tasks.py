"""The built-in tasks beside record extraction (`builtin:units`, `builtin:dates`, `builtin:sentiment`): generated
the same on every call, held-out splits disjoint from train in every way their docstrings claim (checked on the
generated text), answers the format validators accept, and the lm-eval tasks' exact-match and format metrics."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from lm_eval.api.model import LM

from forgetting.harness import builtin_dates, builtin_sentiment, builtin_task, builtin_units
from forgetting.harness.config import DataConfig
from forgetting.harness.data import load_conversations
from forgetting.harness.errors import UserError

MODULES = {"units": builtin_units, "dates": builtin_dates, "sentiment": builtin_sentiment}


def _splits(module) -> tuple[list[dict], list[dict]]:
    return module.records("train"), module.records("heldout")


def _disjoint(train: list, heldout: list, what: str) -> None:
    shared = sorted(set(train) & set(heldout), key=str)
    assert not shared, f"{len(shared)} held-out {what} also in train, e.g. {shared[0]!r}"


@pytest.mark.parametrize("name", MODULES)
def test_records_are_deterministic_and_sized(name):
    module = MODULES[name]
    train, heldout = _splits(module)
    assert train == module.records("train") and heldout == module.records("heldout")
    assert (len(train), len(heldout)) == (1000, 200) and len(module.records("train", 7)) == 7
    assert module.records("heldout", 5) == heldout[:5]
    assert len({r["prompt"] for r in train}) > 500  # varied, not one prompt repeated
    with pytest.raises(UserError, match=f"builtin:{name} task has splits train, heldout"):
        module.records("test")


@pytest.mark.parametrize("name", MODULES)
def test_the_validator_accepts_every_generated_answer(name):
    train, heldout = _splits(MODULES[name])
    bad = [r["response"] for r in train + heldout if not MODULES[name].valid(r["response"])]
    assert not bad, bad[:3]


INVALID = {
    "units": ["3500.0 m", "3,500 m", "3.5e3 m", "3500m", ".5 m", "3500 metres", "3500 m.", "It is 3500 m", "035 m"],
    "dates": ["2021-3-3", "03/03/2021", "2021-13-01", "2021-03-32", "21-03-03", "2021-03-03.", "March 3, 2021"],
    "sentiment": ["Positive", "positive.", "pos", "It is positive", "positive negative", "good"],
}
VALID = {
    "units": ["3500 m", "0.35 km", "12.5 kg", "0.00597 t", "1 mL"],
    "dates": ["2021-03-03", "1900-12-31", "2099-02-30"],  # the format, not the calendar
    "sentiment": ["positive", "negative", " neutral\n"],
}


@pytest.mark.parametrize("name", MODULES)
def test_the_validator_rejects_other_formats(name):
    assert [a for a in VALID[name] if not MODULES[name].valid(a)] == []
    assert [a for a in INVALID[name] if MODULES[name].valid(a)] == []


# units: the held-out split's source numbers and question wordings are never in train; unit pairs are shared
TO_BASE = {"km": 1000, "m": 1, "cm": "0.01", "mm": "0.001", "t": 10**6, "kg": 1000, "g": 1, "mg": "0.001", "L": 1}
TO_BASE["mL"] = "0.001"


def _units_parts(record: dict) -> tuple[Decimal, tuple[str, str], str]:
    """(source number, (source unit, target unit), question wording) read back from the text; checks the answer."""
    question = record["prompt"].rsplit("\n", 1)[1]
    (number, source), *rest = re.findall(r"(\d+(?:\.\d+)?) (km|mm|cm|mg|kg|mL|m|g|t|L)\b", question)
    assert not rest, question
    value, target = record["response"].split(" ")
    assert Decimal(number) * Decimal(TO_BASE[source]) == Decimal(value) * Decimal(TO_BASE[target]), record
    wording = question.replace(f"{number} {source}", "{quantity}", 1)
    wording = re.sub(rf"(?<![\w{{]){re.escape(target)}(?![\w}}])", "{unit}", wording)
    assert wording.count("{quantity}") == wording.count("{unit}") == 1, (question, wording)
    return Decimal(number), (source, target), wording


def test_units_heldout_numbers_and_wordings_are_unseen_and_answers_exact():
    train, heldout = ([_units_parts(r) for r in split] for split in _splits(builtin_units))
    _disjoint([row[0] for row in train], [row[0] for row in heldout], "source numbers")
    _disjoint([row[2] for row in train], [row[2] for row in heldout], "question wordings")
    assert {row[1] for row in heldout} <= {row[1] for row in train}  # the conversions themselves are the skill
    assert len({row[2] for row in heldout}) >= 3 and len({row[1] for row in heldout}) >= 12  # still varied


# dates: years, ways of writing a date and the sentences around it are never in train; month names are shared
def _dates_parts(record: dict) -> tuple[int, str, str]:
    """(year, how the date is written, the sentence around it) read back from the text and the ISO answer."""
    year, month, day = (int(part) for part in record["response"].split("-"))
    text = record["prompt"].split("Sentence: ", 1)[1].replace(str(year), "{year}")
    text = re.sub(rf"\b{day}(st|nd|rd|th)\b", "{ordinal}", text)
    text = re.sub(rf"\b{day}([/.]){month}\1\{{year\}}", r"{day}\1{m}\1{year}", text)
    text = re.sub(rf"\b{builtin_dates.MONTHS[month - 1]}\b", "{month}", text)
    text = re.sub(rf"\b{day}\b", "{day}", text)
    start, end = text.index("{"), text.rindex("}") + 1
    written, sentence = text[start:end], text[:start] + "{date}" + text[end:]
    assert "{year}" in written and ("{month}" in written or "{m}" in written), (record, written)
    assert "{day}" in written or "{ordinal}" in written, (record, written)
    assert not re.search(r"\d", written + sentence), (record, written, sentence)  # every number accounted for
    return year, written, sentence


def test_dates_heldout_years_writings_and_sentences_are_unseen():
    train, heldout = ([_dates_parts(r) for r in split] for split in _splits(builtin_dates))
    for column, what in enumerate(("years", "ways of writing a date", "sentences")):
        _disjoint([row[column] for row in train], [row[column] for row in heldout], what)
    assert len({row[1] for row in heldout}) == 4 and len({row[0] for row in heldout}) >= 30  # still varied
    assert {r["response"][5:7] for r in builtin_dates.records("heldout")} == {f"{m:02}" for m in range(1, 13)}


def test_date_ordinals():
    assert [builtin_dates.ordinal(d) for d in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 30, 31)] == [
        *("1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "30th", "31st")
    ]


# sentiment: products, opinion sentences and review openings are never in train; labels are shared
def _sentiment_parts(record: dict) -> tuple[str, str, list[str]]:
    """(product, opening with {product}, opinion sentences) read back from the review text."""
    review = record["prompt"].split("Review: ", 1)[1]
    opening, *opinions = re.split(r"(?<=\.)\s+(?=[A-Z])", review)
    products = builtin_sentiment.PRODUCTS_TRAIN + builtin_sentiment.PRODUCTS_HELDOUT
    (product,) = {p for p in products if re.search(rf"\b{p}\b", review)}
    assert opinions and all(product not in o for o in opinions), review
    return product, opening.replace(product, "{product}"), opinions


def test_sentiment_heldout_products_opinions_and_openings_are_unseen():
    train, heldout = _splits(builtin_sentiment)
    parts = {split: [_sentiment_parts(r) for r in rows] for split, rows in (("train", train), ("heldout", heldout))}
    for column, what in enumerate(("products", "openings")):
        _disjoint([row[column] for row in parts["train"]], [row[column] for row in parts["heldout"]], what)
    opinions = {split: [o for row in rows for o in row[2]] for split, rows in parts.items()}
    _disjoint(opinions["train"], opinions["heldout"], "opinion sentences")
    label_of: dict[str, set] = {}  # every opinion sentence carries one label only
    for record, (_, _, sentences) in zip(train + heldout, parts["train"] + parts["heldout"]):
        for sentence in sentences:
            label_of.setdefault(sentence, set()).add(record["response"])
    conflicting = {sentence: labels for sentence, labels in label_of.items() if len(labels) > 1}
    assert not conflicting, conflicting
    for rows in (train, heldout):
        assert {r["response"] for r in rows} == set(builtin_sentiment.LABELS)


# the lm-eval tasks: exact match and format validity of hand-made predictions
def _wrong_but_valid(name: str, answer: str) -> str:
    if name == "units":
        return "1" + answer  # another number, still plain notation
    if name == "dates":
        return f"{1900 + (int(answer[:4]) - 1899) % 200}{answer[4:]}"  # another year
    labels = builtin_sentiment.LABELS
    return labels[(labels.index(answer) + 1) % len(labels)]


class HandMadeLM(LM):
    """Answers document i right (i % 3 == 0), wrong in the right format (1) or in prose (2)."""

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        out = []
        for request in requests:
            name, answer = request.task_name.removeprefix("forgetting_target_"), request.doc["response"]
            predictions = [answer, _wrong_but_valid(name, answer), f"The answer is {answer}."]
            out.append(predictions[request.doc_id % 3])
        return out


def test_lm_eval_tasks_score_exact_match_and_format_validity():
    from lm_eval import simple_evaluate

    from forgetting.evals.runner import EvalSettings, task_manager

    tasks = [f"forgetting_target_{name}" for name in MODULES]
    results = simple_evaluate(
        model=HandMadeLM(),
        tasks=tasks,
        limit=9,
        task_manager=task_manager(EvalSettings(tasks=tasks)),
        bootstrap_iters=0,
    )["results"]
    for task in tasks:
        assert results[task]["exact_match,none"] == pytest.approx(3 / 9), task
        assert results[task]["format_valid,none"] == pytest.approx(6 / 9), task


@pytest.mark.parametrize("name", MODULES)
def test_scorers_on_hand_made_predictions(name):
    from forgetting.evals.tasks import utils

    score = getattr(utils, f"score_target_{name}")
    doc = MODULES[name].records("heldout", 1)[0]
    answer = doc["response"]
    assert score(doc, [answer]) == {"exact_match": 1.0, "format_valid": 1.0}
    assert score(doc, [f" {answer}\n"]) == {"exact_match": 1.0, "format_valid": 1.0}  # surrounding space is not format
    assert score(doc, [_wrong_but_valid(name, answer)]) == {"exact_match": 0.0, "format_valid": 1.0}
    assert score(doc, [f"The answer is {answer}."]) == {"exact_match": 0.0, "format_valid": 0.0}


# data.path: builtin:<name>
def test_builtin_paths_resolve_and_builtin_is_records():
    assert load_conversations(DataConfig(path="builtin:records", limit=3)) == load_conversations(
        DataConfig(path="builtin", limit=3)
    )
    assert (
        load_conversations(DataConfig(path="builtin", limit=1))[0][0]["content"] == builtin_task.records()[0]["prompt"]
    )
    for name, module in MODULES.items():
        (conversation,) = load_conversations(DataConfig(path=f"builtin:{name}", split="heldout", limit=1))
        record = module.records("heldout", 1)[0]
        assert [m["content"] for m in conversation] == [record["prompt"], record["response"]]


@pytest.mark.parametrize("path", ["builtin:nope", "builtin:", "builtin:Units"])
def test_an_unknown_builtin_name_is_a_one_line_error_listing_the_valid_ones(path):
    with pytest.raises(UserError) as caught:
        load_conversations(DataConfig(path=path))
    message = str(caught.value)
    assert "\n" not in message and repr(path) in message
    assert "builtin:records, builtin:units, builtin:dates, builtin:sentiment" in message
