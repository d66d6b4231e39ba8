"""Plain helpers shared by the test files: job builders, files, tokenizers, examples, and losses, gradients and
training by hand for tiny models."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from forgetting.harness.batching import collate
from forgetting.harness.formats import IGNORE_INDEX, Example, template_for, tokenize_conversation
from forgetting.harness.job import TrainJob, load_job
from forgetting.harness.loss import summed_response_loss

# the byte tokenizer's special tokens, spelled as the embedded model's tokenizer spells them
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# what the byte tokenizer learns its merges from: the formats' words and a few sentences
TOKENIZER_CORPUS = [
    "user assistant system Human: Assistant: ### Instruction: ### Response: Below is an instruction that describes "
    "a task. Write a response that appropriately completes the request.",
    "What is the capital of France? Paris is in France. Name a colour. Blue. Another one? Green, or maybe red.",
    "The sun is a star. Water boils at one hundred degrees. Cats are mammals. Count to five: 1 2 3 4 5.",
]
# a ChatML template with a default system turn, the layout of the embedded model's own template
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def conversation(*turns: str, system: str | None = None) -> list[dict]:
    """Alternating user/assistant messages from plain strings."""
    roles = ["user", "assistant"]
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


def tiny_job(tmp_path: Path, *overrides: str, name: str = "run") -> TrainJob:
    """A short training job on the tiny random model into tmp_path/name; `overrides` replace any default here."""
    base = [
        "model.name_or_path=tiny-random",
        "data.limit=64",
        "train.batch_size=8",
        "train.lr=1e-3",
        "train.max_steps=2",
        "train.progress=false",
        f"output_dir={tmp_path / name}",
    ]
    return load_job(None, base + list(overrides))


def write(directory: Path, name: str, content: str | dict) -> Path:
    """Write `content` to directory/name: text as it is, a mapping as YAML in its own key order."""
    path = directory / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def byte_tokenizer():
    """A byte-level BPE tokenizer like the embedded model's (GPT-2 pre-tokenization, ChatML special tokens, a chat
    template), with 400 tokens learned from a few sentences in memory: tests of formats and data need no model files.

    Every text round-trips through encode and decode; common words are one token, rare ones several. Ids 1 and 2 are
    BOS and EOS, as `harness.models.tiny_model` expects. Training on a fixed corpus gives the same tokenizer each time.
    """
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIALS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    model.train_from_iterator(TOKENIZER_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=BYTE_CHAT_TEMPLATE,
    )


def loss_and_grads(model, *batches) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The summed response loss over `batches` and the gradient of every trainable parameter, from zero."""
    model.zero_grad(set_to_none=True)
    total = sum(summed_response_loss(model, batch) for batch in batches)
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def write_general_text(tmp_path: Path) -> Path:
    """Four short paragraphs of general text (a replay or KL source) in tmp_path/general.txt."""
    path = tmp_path / "general.txt"
    path.write_text(
        "The sun is a star.\n\nWater boils at one hundred degrees.\n\nCats are mammals.\n\nParis is in France.\n"
    )
    return path


def examples_for(tokenizer, count: int = 6) -> list[Example]:
    """Up to six short question-answer conversations in ChatML, tokenized."""
    template = template_for("chatml", tokenizer)
    texts = [
        ("Name a fruit.", "Apple."),
        ("Say hi.", "Hi there!"),
        ("Count to three.", "1 2 3"),
        ("Colour of the sky?", "Blue."),
        ("Opposite of up?", "Down."),
        ("Two plus two?", "Four."),
    ]
    return [tokenize_conversation(tokenizer, template, conversation(q, a)) for q, a in texts[:count]]


def reference_fisher(model, examples) -> list[torch.Tensor]:
    """Independent computation: full logits, explicit masking, one autograd.grad per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for example in examples:
        ids = torch.tensor([example.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        targets = torch.tensor(example.labels[1:])
        mask = targets != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
        for t, g in zip(total, torch.autograd.grad(loss, params), strict=True):
            t += g * g
    return [t / len(examples) for t in total]


def memorise(model, examples, pad_id, steps=150):
    """Train `model` on one batch of `examples` with Adam until it has learned them by heart; return it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = collate(examples, pad_id)
    for _ in range(steps):
        optimizer.zero_grad()
        summed_response_loss(model, batch).backward()
        optimizer.step()
    return model
