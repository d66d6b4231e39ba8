"""Self-synthesized rehearsal: the default general data of replay, EWC and kl_to_base (mitigations/general_data.py).

It needs no external data: before training, the base model answers a fixed set of general prompts (greedy
decoding); those (prompt, answer) pairs, in the training format with response-only labels, stand in for the
pretraining/instruction data the model has not got at hand. The prompts' subjects are words no evaluation
task uses (tests/test_mitigation_audit.py checks this against the evals' own data).

An answer cut at `max_new_tokens` (the model did not stop by itself) is kept, but its end marker gets no
loss: training it would teach the model to stop mid-sentence. Keeping it (rather than dropping it) keeps the
pool as large as asked, and its tokens are still the base model's own predictions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from forgetting.harness.errors import UserError
from forgetting.harness.formats import (
    IGNORE_INDEX,
    Example,
    split_segments,
    template_for,
    tokenize_conversation,
    truncate,
)
from forgetting.harness.io import atomic_write_text, cache_root
from forgetting.harness.models import weights_fingerprint

TEMPLATES = [
    "Explain {} in simple terms.",
    "Give me three facts about {}.",
    "Write a short poem about {}.",
    "What are the main benefits of {}?",
    "Summarise what you know about {}.",
    "How would you teach a child about {}?",
]
# Subjects no eval task is about (knowledge facts, IFEval and format-health topics, prose, the target task):
# rehearsing on an eval's own topics would make its score measure rehearsal rather than retention.
SUBJECTS = [
    "photosynthesis",
    "geometry",
    "origami",
    "regular exercise",
    "saving money",
    "knitting",
    "pottery",
    "camouflage",
    "recycling",
    "gravity",
    "bacteria",
    "fossils",
    "tectonic plates",
    "coral reefs",
    "muscles",
    "vaccines",
    "earthquakes",
    "democracy",
    "the internet",
    "digestion",
    "robots",
    "chess",
    "programming",
    "the alphabet",
    "money",
    "passwords",
    "magnets",
    "public speaking",
    "probability",
    "sculpture",
    "fractions",
    "ballet",
    "mythology",
    "dinosaurs",
    "archaeology",
    "pyramids",
    "the compass",
    "honesty",
    "castles",
    "submarines",
    "satellites",
    "friction",
]


def general_prompts(count: int) -> list[str]:
    """`count` distinct general prompts (templates x subjects, interleaved), the same on every call."""
    prompts = [t.format(s) for i, s in enumerate(SUBJECTS) for t in TEMPLATES[i % 2 :: 2]]
    if count > len(prompts):
        raise UserError(f"mitigations: at most {len(prompts)} general prompts are available, {count} asked")
    return prompts[:count]


def stop_ids(tokenizer) -> list[int]:
    """Tokens that end an answer: EOS, and the chat template's end-of-turn marker where that is one token."""
    probe = "Yes."
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": probe}]
    marker = split_segments(tokenizer, tokenizer.chat_template, messages)[-1][0][len(probe) :]
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return sorted({tokenizer.eos_token_id} | set(ids if len(ids) == 1 else []))


@torch.no_grad()
def synthesize(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8
) -> list[tuple[str, bool]]:
    """Greedy (answer, finished) of `model` to `prompts` in the tokenizer's chat template (left-padded batches).

    `finished`: the model ended the answer itself (a stop token) rather than being cut at `max_new_tokens`.
    """
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    stops = stop_ids(tokenizer)
    model.eval()
    tokenizer.padding_side = "left"
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts[start : start + batch_size]
            ]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            finished = torch.isin(new, torch.tensor(stops, device=new.device)).any(-1).tolist()
            answers += zip(tokenizer.batch_decode(new, skip_special_tokens=True), finished)
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return [(a.strip(), done) for a, done in answers]


def _shared_cache(model, tokenizer, prompts: list[str], max_new_tokens: int) -> Path:
    """Where the answers of these weights (adapters excluded: they start as a no-op) to these prompts are kept."""
    key = json.dumps(
        [weights_fingerprint(model, exclude="lora_"), prompts, max_new_tokens, tokenizer.chat_template, "finished-flag"]
    )  # entries written before answers carried the flag are not reused
    return cache_root() / "rehearsal" / f"{hashlib.blake2b(key.encode(), digest_size=16).hexdigest()}.jsonl"


def without_end_marker_loss(example: Example, answer_ids: list[int]) -> Example:
    """`example` (one user turn, one cut answer) with no loss past the answer's own tokens: the end marker.

    The labelled tokens are the response segment, answer then end marker; labels are kept on its longest
    prefix that equals the answer tokenized alone (where the two merge at the seam, that token loses its
    label too: never a false stop target).
    """
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    keep = 0
    while (
        keep < len(answer_ids)
        and first + keep < len(example.labels)
        and example.labels[first + keep] == answer_ids[keep]
    ):
        keep += 1
    labels = example.labels[: first + keep] + [IGNORE_INDEX] * (len(example.labels) - first - keep)
    return Example(input_ids=example.input_ids, labels=labels)


def self_rehearsal(
    model, tokenizer, format_name: str, count: int, max_new_tokens: int, max_seq_len: int, cache_file: Path | None
) -> tuple[list[Example], dict]:
    """Examples from the model's own answers to general prompts, and {answers_finished, answers_cut}.

    The answers are kept in `cache_file` (JSONL, the run's own copy, read back on resume) and in a shared
    cache keyed by the weights, prompts and template, so the strategies and seeds of an experiment that
    start from the same model synthesize them once. A cut answer (`finished: false`) gets no loss on its
    end marker; a cache written before the flag existed has none, and its answers are trained as finished
    (as the run began) and counted as `answers_unmarked`.
    """
    if cache_file is not None and cache_file.is_file():
        pairs = [json.loads(line) for line in cache_file.read_text().splitlines()]
    else:
        prompts = general_prompts(count)
        shared = _shared_cache(model, tokenizer, prompts, max_new_tokens)
        if shared.is_file():
            pairs = [json.loads(line) for line in shared.read_text().splitlines()]
        else:
            pairs = [
                {"prompt": p, "response": a, "finished": done}
                for p, (a, done) in zip(prompts, synthesize(model, tokenizer, prompts, max_new_tokens))
                if a
            ]
            atomic_write_text(shared, "".join(json.dumps(p) + "\n" for p in pairs))
        if cache_file is not None:
            atomic_write_text(cache_file, "".join(json.dumps(p) + "\n" for p in pairs))
    if not pairs:
        raise UserError(
            "mitigations: self-synthesized rehearsal got only empty answers from the model; "
            "use another source (a text file or dataset)"
        )
    template = template_for(format_name, tokenizer)
    examples = []
    for p in pairs:
        conversation = [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}]
        example = tokenize_conversation(tokenizer, template, conversation)
        if p.get("finished") is False:
            example = without_end_marker_loss(example, tokenizer(p["response"], add_special_tokens=False)["input_ids"])
        examples.append(truncate(example, max_seq_len))
    flags = [p.get("finished") for p in pairs]
    counts = {"answers_finished": flags.count(True), "answers_cut": flags.count(False)}
    if flags.count(None):
        counts["answers_unmarked"] = flags.count(None)
    return [e for e in examples if e is not None], counts
