"""SFT data: read records from files or the hub, map them to conversations, tokenize with response-only labels.

Sources: local JSONL / JSON / CSV / Parquet, a `datasets` hub name or local dataset folder (with
`data.split`, its config `data.name`, and `data.streaming` to read only the records used), or a generated
built-in task: `builtin` (= `builtin:records`, record extraction in `harness.builtin_task`), `builtin:units`,
`builtin:dates`, `builtin:sentiment` (`harness.builtin_<name>`).
Layouts: Alpaca (`instruction`, `input`, `output`), prompt/response, and chat `messages` (multi-turn; loss on
every assistant turn). Every problem is a one-line `UserError` naming the file and line (or row) and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import datasets
import pandas as pd

from forgetting.harness import builtin_dates, builtin_sentiment, builtin_task, builtin_units
from forgetting.harness.config import DataConfig
from forgetting.harness.errors import UserError
from forgetting.harness.formats import Example, template_for, tokenize_conversation, truncate

ROLES = ("system", "user", "assistant")
FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
BUILTIN = {"records": builtin_task, "units": builtin_units, "dates": builtin_dates, "sentiment": builtin_sentiment}


def _read_text_lines(path: Path) -> Iterator[tuple[int, str]]:
    data = path.read_bytes()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{path}:{number}: not valid UTF-8 (byte {err.start} of the line)") from None


def read_jsonl(path: Path) -> Iterator[tuple[dict, str]]:
    for number, line in _read_text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: malformed JSON: {err.msg} (column {err.colno})") from None
        except RecursionError:  # json's parser recurses per nesting level; thousands of levels exhaust the stack
            raise UserError(f"{path}:{number}: malformed JSON: nested too deeply") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield row, f"{path}:{number}"


def read_json(path: Path) -> Iterator[tuple[dict, str]]:
    text = "\n".join(line for _, line in _read_text_lines(path))
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
    except RecursionError:  # as in read_jsonl; the parser does not say where, so no line
        raise UserError(f"{path}: malformed JSON: nested too deeply") from None
    if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
        rows = next(iter(rows.values()))  # {"data": [...]} layout
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON list of records (or JSONL), got {type(rows).__name__}")
    for index, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{path}: record {index}: expected a JSON object, got {type(row).__name__}")
        yield row, f"{path}: record {index}"


def _read_table(path: Path, kind: str) -> Iterator[tuple[dict, str]]:
    try:
        if kind == "csv":
            list(_read_text_lines(path))  # undecodable bytes -> file:line error
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            frame = pd.read_parquet(path)
    except UserError:
        raise
    except Exception as err:  # pandas/pyarrow parse errors
        raise UserError(f"{path}: cannot read as {kind}: {str(err).splitlines()[0]}") from None
    for index, row in enumerate(frame.to_dict(orient="records")):
        where = f"{path}:{index + 2}" if kind == "csv" else f"{path}: row {index + 1}"
        yield {k: _plain(v) for k, v in row.items()}, where


def _plain(value):
    """Parquet/arrow values to plain Python (numpy arrays of structs become lists of dicts)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _read_hub(config: DataConfig) -> Iterator[tuple[dict, str]]:
    """Rows of a hub dataset or local dataset folder; streamed, only as many are read as the caller takes."""
    label = f"{config.path}:{config.name}" if config.name else config.path
    try:
        dataset = datasets.load_dataset(config.path, config.name, split=config.split, streaming=config.streaming)
    except Exception as err:  # offline, missing, no such config or split
        raise UserError(_load_error(config, err)) from None
    for index, row in enumerate(dataset):
        yield row, f"{label}[{config.split}] row {index + 1}"


def _load_error(config: DataConfig, err: Exception) -> str:
    """One line for a dataset that does not load; a config name that is not one of the dataset's names the
    field (datasets' own message for it is many lines, and one for a missing name does not say which field)."""
    try:
        names = datasets.get_dataset_config_names(config.path)
    except Exception:  # the dataset itself does not load: datasets' reason below says why
        names = []
    if config.name is not None and names and config.name not in names:
        return f"data.name: {config.name!r} is not a config of {config.path!r}; expected one of {', '.join(names)}"
    if config.name is None and len(names) > 1:
        return f"data.name: {config.path!r} has several configs; set one of {', '.join(names)}"
    which = f"config {config.name!r}, split {config.split!r}" if config.name else f"split {config.split!r}"
    return f"data.path: cannot load {config.path!r} ({which}) with datasets: {str(err).splitlines()[0]}"


def builtin_module(path: str):
    """The generator module of a `builtin` / `builtin:<name>` data.path (`builtin` is `builtin:records`), else None."""
    if path != "builtin" and not path.startswith("builtin:"):
        return None
    name = "records" if path == "builtin" else path.removeprefix("builtin:")
    if name not in BUILTIN:
        valid = ", ".join(f"builtin:{n}" for n in BUILTIN)
        raise UserError(f"data.path: unknown built-in task {path!r}; expected builtin or one of {valid}")
    return BUILTIN[name]


def read_rows(config: DataConfig) -> Iterator[tuple[dict, str]]:
    """(record, location) pairs from the configured source."""
    module = builtin_module(config.path)
    path = Path(config.path).expanduser()
    if config.name is not None and (module is not None or path.is_file()):
        raise UserError(f"data.name: {config.path} has no configs (only a datasets hub name or dataset folder has)")
    if module is not None:
        for index, row in enumerate(module.records(config.split)):
            yield row, f"{config.path}[{config.split}] record {index + 1}"
        return
    kind = FILE_TYPES.get(path.suffix.lower())
    if path.is_file():
        if kind is None:
            raise UserError(f"{path}: unknown file type {path.suffix!r}; expected one of {', '.join(FILE_TYPES)}")
        reader = {"jsonl": read_jsonl, "json": read_json}.get(kind)
        yield from reader(path) if reader else _read_table(path, kind)
    elif path.is_dir() or (kind is None and not config.path.startswith((".", "/", "~"))):
        yield from _read_hub(config)  # a local dataset folder, or a hub name
    else:
        raise UserError(f"data.path: {path} not found")


def detect_schema(row: dict, config: DataConfig, where: str) -> str:
    if config.schema != "auto":
        return config.schema
    if config.messages_field in row:
        return "messages"
    if config.instruction_field in row and config.output_field in row:
        return "alpaca"
    if config.prompt_field in row and config.response_field in row:
        return "prompt_response"
    raise UserError(
        f"{where}: cannot tell the record layout from its fields {sorted(row)}; expected "
        f"{config.messages_field!r}, {config.instruction_field!r}+{config.output_field!r} or "
        f"{config.prompt_field!r}+{config.response_field!r} (set data.schema and the *_field names)"
    )


def _text(row: dict, name: str, where: str, required: bool = True) -> str:
    if name not in row or row[name] is None:
        if required:
            raise UserError(f"{where}: missing field {name!r}")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise UserError(f"{where}: field {name!r} is empty")
    return value


def _chat_messages(row: dict, config: DataConfig, where: str) -> list[dict]:
    name = config.messages_field
    messages = row.get(name)
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field {name!r} must be a non-empty list of {{role, content}}")
    out = []
    for i, message in enumerate(messages):
        at = f"{where}: {name}[{i}]"
        if not isinstance(message, dict):
            raise UserError(f"{at}: expected {{role, content}}, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise UserError(f"{at}.role: expected one of {', '.join(ROLES)}, got {role!r}")
        if role == "system" and i != 0:
            raise UserError(f"{at}.role: a system message may only come first")
        if message.get("content") is None:  # every turn needs its text field; only an assistant's must be non-empty
            raise UserError(f"{at}: missing field 'content'")
        content = _text(message, "content", at, required=role == "assistant")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: field {name!r} has no assistant message to learn")
    return out


def to_messages(row: dict, schema: str, config: DataConfig, where: str) -> list[dict]:
    """The record as a conversation: a list of {role, content} with at least one assistant turn."""
    if schema == "messages":
        messages = _chat_messages(row, config, where)
    else:
        if schema == "alpaca":
            prompt = _text(row, config.instruction_field, where)
            extra = _text(row, config.input_field, where, required=False)
            prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
            response = _text(row, config.output_field, where)
        else:
            prompt = _text(row, config.prompt_field, where)
            response = _text(row, config.response_field, where)
        system = _text(row, config.system_field, where, required=False)
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ]
    if config.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": config.system_prompt}] + messages
    return messages


def load_conversations(config: DataConfig) -> list[list[dict]]:
    """All records of the configured source as validated conversations (first `limit` only)."""
    conversations, schema = [], None
    source = config.path
    for row, where in read_rows(config):
        schema = schema or detect_schema(row, config, where)
        conversations.append(to_messages(row, schema, config, where))
        if config.limit is not None and len(conversations) >= config.limit:
            break
    if not conversations:
        raise UserError(f"{source}: no records found")
    return conversations


@dataclass
class DataStats:
    """What tokenization did to the data; printed and saved with the run."""

    records: int = 0
    examples: int = 0
    truncated: int = 0  # cut to max_seq_len but kept (some response tokens survived)
    dropped_truncated: int = 0  # dropped: no response token survived truncation
    tokens: int = 0
    target_tokens: int = 0
    formats: dict = field(default_factory=dict)


def tokenize_all(conversations: list[list[dict]], tokenizer, config: DataConfig) -> tuple[list[Example], DataStats]:
    """Tokenize, label and truncate; drop (and count) examples whose response is cut away entirely."""
    template = template_for(config.format, tokenizer)
    examples, stats = [], DataStats(records=len(conversations), formats={"format": config.format})
    for messages in conversations:
        full = tokenize_conversation(tokenizer, template, messages)
        example = truncate(full, config.max_seq_len)
        if example is None:
            stats.dropped_truncated += 1
            continue
        stats.truncated += example is not full
        examples.append(example)
        stats.tokens += len(example)
        stats.target_tokens += example.num_target_tokens
    stats.examples = len(examples)
    if not examples:
        raise UserError(
            f"{config.path}: every example was dropped: no response token fits in data.max_seq_len={config.max_seq_len}"
        )
    return examples, stats
