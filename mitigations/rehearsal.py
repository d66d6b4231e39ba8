"""General data for replay and for Fisher estimation: self-synthesized rehearsal, text files, JSONL, hub datasets.

Self-synthesized rehearsal needs no external data: before training, the base model answers a fixed set of
general prompts (greedy decoding); those (prompt, answer) pairs, in the training format with response-only
labels, stand in for the pretraining/instruction data the model has not got at hand. The prompts are
disjoint from the evaluation suite's. Plain text gets full-sequence labels; conversations response-only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.errors import UserError
from harness.formats import Example, template_for, tokenize_conversation, truncate
from harness.io import atomic_write_text

TEMPLATES = ["Explain {} in simple terms.", "Give me three facts about {}.", "Write a short poem about {}.",
             "What are the main benefits of {}?", "Summarise what you know about {}.",
             "How would you teach a child about {}?"]
SUBJECTS = ["photosynthesis", "volcanoes", "the water cycle", "regular exercise", "saving money", "the human heart",
            "electricity", "the Roman Empire", "recycling", "gravity", "healthy eating", "the solar system",
            "how computers work", "climate", "the printing press", "vaccines", "earthquakes", "democracy",
            "the internet", "sleep", "glaciers", "chess", "rainforests", "the alphabet", "money",
            "the immune system", "magnets", "weather forecasts", "the Olympic games", "clouds", "fractions",
            "the piano", "bridges", "dinosaurs", "the ocean tides", "public libraries", "the compass", "honesty",
            "maps", "the seasons", "wind power", "writing a letter"]


def general_prompts(count: int) -> list[str]:
    """`count` distinct general prompts (templates x subjects, interleaved), the same on every call."""
    prompts = [t.format(s) for i, s in enumerate(SUBJECTS) for t in TEMPLATES[i % 2::2]]
    if count > len(prompts):
        raise UserError(f"mitigations: at most {len(prompts)} general prompts are available, {count} asked")
    return prompts[:count]


@torch.no_grad()
def synthesize(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy answers of `model` to `prompts` in the tokenizer's chat template (left-padded batches)."""
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return [a.strip() for a in answers]


def _shared_cache(model, tokenizer, prompts: list[str], max_new_tokens: int) -> Path:
    """Where the answers of these weights (adapters excluded: they start as a no-op) to these prompts are kept."""
    import hashlib

    from evals.runner import weights_fingerprint
    from harness.models import cache_root

    key = json.dumps([weights_fingerprint(model, exclude="lora_"), prompts, max_new_tokens, tokenizer.chat_template])
    return cache_root() / "rehearsal" / f"{hashlib.blake2b(key.encode(), digest_size=16).hexdigest()}.jsonl"


def self_rehearsal(model, tokenizer, format_name: str, count: int, max_new_tokens: int, max_seq_len: int,
                   cache_file: Path | None) -> list[Example]:
    """Examples from the model's own answers to general prompts.

    The answers are kept in `cache_file` (JSONL, the run's own copy, read back on resume) and in a shared
    cache keyed by the weights, prompts and template, so the strategies and seeds of an experiment that
    start from the same model synthesize them once.
    """
    if cache_file is not None and cache_file.is_file():
        pairs = [json.loads(line) for line in cache_file.read_text().splitlines()]
    else:
        prompts = general_prompts(count)
        shared = _shared_cache(model, tokenizer, prompts, max_new_tokens)
        if shared.is_file():
            pairs = [json.loads(line) for line in shared.read_text().splitlines()]
        else:
            pairs = [{"prompt": p, "response": a}
                     for p, a in zip(prompts, synthesize(model, tokenizer, prompts, max_new_tokens)) if a]
            atomic_write_text(shared, "".join(json.dumps(p) + "\n" for p in pairs))
        if cache_file is not None:
            atomic_write_text(cache_file, "".join(json.dumps(p) + "\n" for p in pairs))
    if not pairs:
        raise UserError("mitigations: self-synthesized rehearsal got only empty answers from the model; "
                        "use another source (a text file or dataset)")
    template = template_for(format_name, tokenizer)
    conversations = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}]
                     for p in pairs]
    examples = [truncate(tokenize_conversation(tokenizer, template, c), max_seq_len) for c in conversations]
    return [e for e in examples if e is not None]


def text_example(tokenizer, text: str, max_seq_len: int) -> Example:
    """Plain text as a full-sequence language-modelling example (every token is a target), ending in EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_seq_len - 1] + [tokenizer.eos_token_id]
    return Example(input_ids=ids, labels=list(ids))


def read_texts(source: str, split: str, field: str, limit: int) -> list[str]:
    """Texts from a .txt file (blank-line separated), a JSONL/JSON file's `field`, or a datasets name (streamed)."""
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise UserError(f"mitigations: replay source {path} not found")
        texts = [t.strip() for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    elif path.suffix in (".jsonl", ".json"):
        from harness.data import read_json, read_jsonl

        if not path.is_file():
            raise UserError(f"mitigations: replay source {path} not found")
        texts = []
        for row, where in (read_jsonl if path.suffix == ".jsonl" else read_json)(path):
            if not isinstance(row.get(field), str):
                raise UserError(f"{where}: replay text field {field!r} missing or not a string")
            texts.append(row[field])
    else:
        import datasets

        try:
            stream = datasets.load_dataset(source, split=split, streaming=True)
            texts = [row[field] for row in stream.take(limit)]
        except Exception as err:  # offline, missing, wrong field
            raise UserError(f"mitigations: cannot stream replay source {source!r}: {str(err).splitlines()[0]}") from None
    if not texts:
        raise UserError(f"mitigations: replay source {source} has no text")
    return texts[:limit]
