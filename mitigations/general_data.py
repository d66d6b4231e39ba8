"""General data: what replay mixes in, what EWC estimates its Fisher on, what kl_to_base distils on.

One config (`GeneralData`) and one loader (`general_examples`) serve all three, so the same `data:` mapping
draws the same examples in each:

    source: self         the base model's own answers to `size` general prompts (self-synthesized rehearsal,
                         mitigations/rehearsal.py), the offline default
    source: sft          the first `size` SFT examples, as tokenized for training (where a mitigation allows it)
    source: x.txt        plain text, blank-line separated; x.jsonl / x.json: each record's `text_field`
    source: NAME         a `datasets` name, streamed (`split`, `text_field`)
    source: stages       replay in an experiment's `stages` (continual SFT): `size` examples drawn (seeded) from
                         each earlier stage's SFT data (harness/pipeline.py writes the stage's buffer)

With `kind: conversations` a file or datasets source is read as SFT conversations (any layout `data.path`
accepts) and trained on its responses. Plain text gets full-sequence labels and an end-of-sequence target only
when the whole text fitted in `max_seq_len`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

import datasets

from forgetting.harness.configlib import knob
from forgetting.harness.data import load_conversations, read_json, read_jsonl, tokenize_all
from forgetting.harness.errors import UserError
from forgetting.harness.formats import Example
from forgetting.mitigations.rehearsal import self_rehearsal


@dataclass
class GeneralData:
    source: str = knob(
        "self",
        "self (the base model's answers to general prompts), sft (the first SFT examples; "
        "ewc only), a .txt/.jsonl file, a datasets name, or stages (replay in an experiment's stages: `size` "
        "examples of each earlier stage)",
    )
    kind: Literal["text", "conversations"] = knob(
        "text", "file and datasets sources: plain text (full-sequence loss) or SFT conversations (response loss)"
    )
    split: str = knob("train", "datasets split (datasets sources)")
    text_field: str = knob("text", "field holding the text (.jsonl and datasets sources)")
    size: int = knob(64, "distinct examples to draw (self: prompts the model answers)")
    max_new_tokens: int = knob(128, "self: answer length when synthesizing")
    max_seq_len: int = knob(512, "tokens per example (sft: as the SFT data was cut)")
    scalar_key: ClassVar[str] = "source"  # `data: self` was the old spelling of `data: {source: self}`

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"source: expected self, sft, a file or a datasets name, got {self.source!r}")
        if self.size < 1:
            raise ValueError(f"size: must be at least 1, got {self.size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be at least 1, got {self.max_new_tokens}")
        if self.max_seq_len < 8:
            raise ValueError(f"max_seq_len: must be at least 8, got {self.max_seq_len}")
        if self.kind == "conversations" and self.source in ("self", "sft"):
            raise ValueError(f"kind: conversations reads a file or datasets source, not {self.source!r}")


def refuse_sft(data: GeneralData, mitigation: str) -> None:
    """A ValueError for `source: sft` where the SFT data itself would be the general data (replay, kl_to_base)."""
    if data.source == "sft":
        raise ValueError(
            f"data.source: sft is for ewc only; {mitigation} needs general data (self, a file or a datasets name)"
        )


def general_examples(data: GeneralData, model, ctx, cache_file: Path) -> tuple[list[Example], dict]:
    """The tokenized examples `data` describes, and counts for the report.

    Self rehearsal counts answers that finished and that were cut at max_new_tokens (its answers are kept in
    `cache_file`, read back on resume); plain text counts texts cut at max_seq_len.
    """
    tokenizer = ctx.tokenizer
    if data.source == "stages":  # an experiment's stages replace it with the stage's buffer file
        raise UserError("data.source: stages replays earlier stages of an experiment's `stages:` (forgetting run)")
    if data.source == "sft":
        return list(ctx.examples[: data.size]), {}
    if data.source == "self":
        return self_rehearsal(
            model, tokenizer, ctx.job.data.format, data.size, data.max_new_tokens, data.max_seq_len, cache_file
        )
    if data.kind == "conversations":
        sft = replace(
            ctx.job.data,
            path=data.source,
            split=data.split,
            limit=data.size,
            max_seq_len=data.max_seq_len,
            eval_split=None,
        )
        return tokenize_all(load_conversations(sft), tokenizer, sft)[0], {}
    texts = read_texts(data.source, data.split, data.text_field, data.size)
    examples = [text_example(tokenizer, t, data.max_seq_len) for t in texts]
    return examples, {"texts_cut": sum(e.input_ids[-1] != tokenizer.eos_token_id for e in examples)}


def text_example(tokenizer, text: str, max_seq_len: int) -> Example:
    """Plain text as a full-sequence language-modelling example (every token is a target).

    It ends in EOS (a target: the text ends here) only when the whole text fits; a text cut at `max_seq_len`
    does not end there, so it gets no EOS.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ids + [tokenizer.eos_token_id] if len(ids) < max_seq_len else ids[:max_seq_len]
    return Example(input_ids=ids, labels=list(ids))


def read_texts(source: str, split: str, field: str, limit: int) -> list[str]:
    """Texts from a .txt file (blank-line separated), a JSONL/JSON file's `field`, or a datasets name (streamed)."""
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise UserError(f"mitigations: general data source {path} not found")
        texts = [t.strip() for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    elif path.suffix in (".jsonl", ".json"):
        if not path.is_file():
            raise UserError(f"mitigations: general data source {path} not found")
        texts = []
        for row, where in (read_jsonl if path.suffix == ".jsonl" else read_json)(path):
            if not isinstance(row.get(field), str):
                raise UserError(f"{where}: general data text field {field!r} missing or not a string")
            texts.append(row[field])
    else:
        try:
            stream = datasets.load_dataset(source, split=split, streaming=True)
            texts = [row[field] for row in stream.take(limit)]
        except Exception as err:  # offline, missing, wrong field
            raise UserError(
                f"mitigations: cannot stream general data source {source!r}: {str(err).splitlines()[0]}"
            ) from None
    if not texts:
        raise UserError(f"mitigations: general data source {source} has no text")
    return texts[:limit]
