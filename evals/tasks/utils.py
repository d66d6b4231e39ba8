"""Hooks for the offline suite's lm-eval tasks: datasets generated in code, and their scoring functions.

Referenced from the YAML files beside this one with `!function utils.<name>`; lm-eval imports this file by
path, so it only imports from the installed `forgetting.evals` and `forgetting.harness` packages.
"""

from __future__ import annotations

import datasets


def _test_split(rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_knowledge(**kwargs) -> datasets.DatasetDict:
    from forgetting.evals.knowledge import items

    return _test_split(items())


def load_target(**kwargs) -> datasets.DatasetDict:
    from forgetting.harness.builtin_task import records

    return _test_split(records("heldout"))


def load_target_units(**kwargs) -> datasets.DatasetDict:
    from forgetting.harness.builtin_units import records

    return _test_split(records("heldout"))


def load_target_dates(**kwargs) -> datasets.DatasetDict:
    from forgetting.harness.builtin_dates import records

    return _test_split(records("heldout"))


def load_target_sentiment(**kwargs) -> datasets.DatasetDict:
    from forgetting.harness.builtin_sentiment import records

    return _test_split(records("heldout"))


def load_prose(**kwargs) -> datasets.DatasetDict:
    from forgetting.evals.prose import PARAGRAPHS

    return _test_split([{"text": text} for text in PARAGRAPHS])


def load_ifeval(**kwargs) -> datasets.DatasetDict:
    from forgetting.evals.ifeval_prompts import prompts

    return _test_split(prompts())


def score_target(doc: dict, results: list[str]) -> dict:
    from forgetting.harness.builtin_task import score

    return score(results[0], doc["response"])


def score_target_units(doc: dict, results: list[str]) -> dict:
    from forgetting.harness.builtin_units import score

    return score(results[0], doc["response"])


def score_target_dates(doc: dict, results: list[str]) -> dict:
    from forgetting.harness.builtin_dates import score

    return score(results[0], doc["response"])


def score_target_sentiment(doc: dict, results: list[str]) -> dict:
    from forgetting.harness.builtin_sentiment import score

    return score(results[0], doc["response"])


def score_ifeval(doc: dict, results: list[str]) -> dict:
    from forgetting.evals.nltk_offline import ensure_punkt_tab

    ensure_punkt_tab()
    from lm_eval.tasks.ifeval.utils import process_results

    return process_results(doc, results)


def agg_inst_level_acc(items):
    from lm_eval.tasks.ifeval.utils import agg_inst_level_acc as aggregate

    return aggregate(items)


FOREIGN_FORMAT = "### Instruction:\n{}\n\n### Response:\n"  # Alpaca markers inside the model's own format
TEMPLATE_MARKERS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "### Instruction",
    "### Response",
    "Human:",
    "Assistant:",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
)


def load_format_health(**kwargs) -> datasets.DatasetDict:
    from forgetting.evals.ifeval_prompts import TASKS, TOPICS

    rows = [{"prompt": FOREIGN_FORMAT.format(task.format(topic))} for task in TASKS for topic in TOPICS[:10]]
    return _test_split(rows)


def score_format_health(doc: dict, results: list[str]) -> dict:
    """Template-marker leakage, response length in words, and whether the answer ends on a sentence end."""
    text = results[0]
    stripped = text.strip()
    return {
        "leak_rate": float(any(marker in text for marker in TEMPLATE_MARKERS)),
        "response_words": float(len(stripped.split())),
        "ends_cleanly": float(bool(stripped) and stripped[-1] in ".!?)\"'*`"),
        "empty_rate": float(not stripped),
    }
