"""Prompt formats and the response-only labelling of a conversation.

Each format is a Jinja chat template (ChatML, Alpaca, plain `Human:/Assistant:`) or the tokenizer's own
(`chat_template`). A conversation is rendered through the template and cut into segments: the text the
model is shown (system, user turns, the assistant header) and the assistant responses it learns, each ending
with the format's end marker so the model learns to stop. Segments are tokenized separately, so the prompt
is tokenized exactly as it will be at inference time (a prompt ending in the assistant header, alone).
Labels are -100 on every prompt token. `attach_format` stores the template in the tokenizer, so a saved
checkpoint carries its format and evaluation (lm-eval's `apply_chat_template`) uses the same one.
"""

from __future__ import annotations

from dataclasses import dataclass

from forgetting.harness.errors import UserError

IGNORE_INDEX = -100

CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA = (
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\n\n' }}"
    "{%- else -%}{{ '" + ALPACA_PREAMBLE + "\n\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Response:\n' }}{%- endif -%}"
)

PLAIN = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'Human: ' + message['content'] + '\n\n' }}"
    "{%- else -%}{{ 'Assistant: ' + message['content'] + eos_token + '\n\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

TEMPLATES = {"chatml": CHATML, "alpaca": ALPACA, "plain": PLAIN}
FORMAT_NAMES = ("chatml", "alpaca", "plain", "chat_template")


@dataclass
class Example:
    """One tokenized training sequence; labels are -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def template_for(format_name: str, tokenizer) -> str:
    """The Jinja chat template for `format_name` (the tokenizer's own for 'chat_template')."""
    if format_name not in FORMAT_NAMES:
        raise UserError(f"data.format: unknown format {format_name!r}; valid: {', '.join(FORMAT_NAMES)}")
    if format_name == "chat_template":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "data.format: chat_template chosen but the tokenizer has none; pick chatml, alpaca or plain"
            )
        return tokenizer.chat_template
    return TEMPLATES[format_name]


def attach_format(tokenizer, format_name: str) -> None:
    """Store the format's template in the tokenizer so saved checkpoints and lm-eval use the same format."""
    tokenizer.chat_template = template_for(format_name, tokenizer)
    tokenizer.init_kwargs["forgetting_format"] = format_name


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def split_segments(tokenizer, template: str, messages: list[dict]) -> list[tuple[str, bool]]:
    """Cut the rendered conversation into (text, is_response) segments, responses ending at their end marker.

    The prompt before assistant turn k is the template rendered for messages[:k] with the generation prompt;
    the response is what rendering messages[:k+1] adds to it, without trailing white space.
    """
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, template, messages[:k], add_generation_prompt=True)
        full = render(tokenizer, template, messages[: k + 1], add_generation_prompt=False)
        if not full.startswith(prompt) or len(prompt) < cursor:
            raise UserError(
                "data.format: the chat template does not render conversations as growing prefixes "
                "(the prompt for a turn is not the start of the rendered turn); use chatml, alpaca or plain"
            )
        end = len(full.rstrip())
        if end <= len(prompt):
            raise UserError("data: an assistant response renders as empty text")
        segments.append((prompt[cursor:], False))
        segments.append((full[len(prompt) : end], True))
        cursor = end
    return [(text, is_response) for text, is_response in segments if text]


def _bos_prefix(tokenizer) -> list[int]:
    """The BOS id if the tokenizer adds one by itself and the template does not write it."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def tokenize_conversation(tokenizer, template: str, messages: list[dict]) -> Example:
    """Token ids and response-only labels for one conversation (not truncated)."""
    input_ids: list[int] = []
    labels: list[int] = []
    segments = split_segments(tokenizer, template, messages)
    bos = _bos_prefix(tokenizer)
    if bos and not (segments and tokenizer.bos_token and segments[0][0].startswith(tokenizer.bos_token)):
        input_ids += bos
        labels += [IGNORE_INDEX]
    for text, is_response in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if is_response else [IGNORE_INDEX] * len(ids)
    return Example(input_ids=input_ids, labels=labels)


def truncate(example: Example, max_len: int) -> Example | None:
    """Cut to `max_len` tokens; None when no response token survives (the caller drops and counts it)."""
    if len(example) <= max_len:
        return example
    cut = Example(example.input_ids[:max_len], example.labels[:max_len])
    # labels are predicted from the previous position, so position 0's label never counts
    return cut if any(label != IGNORE_INDEX for label in cut.labels[1:]) else None
