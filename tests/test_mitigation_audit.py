"""Findings of the mitigation audit, one test each: cut rehearsal answers, online EWC normalisation, the replay
ratio as a share of the loss, EWC on LoRA's effective update, kl_to_base on resume, rehearsal vs eval topics."""

from __future__ import annotations

import copy
import random
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from forgetting.harness.formats import IGNORE_INDEX, Example, template_for, tokenize_conversation
from forgetting.mitigations.ewc import EWC, EWCConfig
from forgetting.mitigations.general_data import GeneralData
from tests.helpers import conversation, examples_for, memorise, reference_fisher, write_general_text
from tests.test_mitigations import job


def ctx_for(tokenizer, examples, output_dir):
    from accelerate import Accelerator

    return SimpleNamespace(
        examples=tuple(examples),
        tokenizer=tokenizer,
        output_dir=output_dir,
        accelerator=Accelerator(cpu=True),
        job=None,
    )


# ---- 1. self-rehearsal answers cut at max_new_tokens are not trained to stop there


def test_cut_rehearsal_answers_get_no_loss_on_the_end_marker(tokenizer, make_tiny, tmp_path):
    from forgetting.mitigations.rehearsal import general_prompts, self_rehearsal

    template = template_for("chatml", tokenizer)
    prompts = general_prompts(3)
    answer = "I like learning about new things."
    lessons = [tokenize_conversation(tokenizer, template, conversation(p, answer)) for p in prompts]
    model = memorise(make_tiny(), lessons, tokenizer.pad_token_id, steps=80)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]

    finished, counts = self_rehearsal(model, tokenizer, "chatml", 3, 32, 128, tmp_path / "finished.jsonl")
    assert counts == {"answers_finished": 3, "answers_cut": 0}
    for e in finished:  # the model stopped by itself: it learns to stop there
        assert e.input_ids[-1] == end and e.labels[-1] == end

    cut, counts = self_rehearsal(model, tokenizer, "chatml", 3, 3, 128, tmp_path / "cut.jsonl")
    assert counts == {"answers_finished": 0, "answers_cut": 3}
    for e in cut:  # cut at 3 tokens: those 3 are targets, the end marker after them is not
        assert e.input_ids[-1] == end and e.labels[-1] == IGNORE_INDEX
        assert [t for t in e.labels if t != IGNORE_INDEX] == answer_ids[:3]
    # the flag survives the run's cache (a resumed run reads it back)
    again, counts = self_rehearsal(None, tokenizer, "chatml", 3, 3, 128, tmp_path / "cut.jsonl")
    assert counts["answers_cut"] == 3 and [e.labels for e in again] == [e.labels for e in cut]


def test_plain_text_cut_by_max_seq_len_gets_no_end_marker(byte_tokenizer):
    from forgetting.mitigations.general_data import text_example

    text = "The sun is a star and the moon is not a star at all, whatever people say."
    ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = text_example(byte_tokenizer, text, 8)
    assert cut.input_ids == ids[:8] and cut.labels == ids[:8]
    whole = text_example(byte_tokenizer, text, len(ids) + 1)
    assert whole.input_ids == ids + [byte_tokenizer.eos_token_id]


# ---- 2. online EWC with normalisation: raw Fisher saved, normalised after combining


def test_online_ewc_normalises_the_mixture_of_raw_fishers(tokenizer, make_tiny, tmp_path):
    first_data, second_data = examples_for(tokenizer)[:3], examples_for(tokenizer)[3:]
    first = EWC(EWCConfig(data=GeneralData(source="sft", size=3), normalize="mean"))
    first.prepare(make_tiny(), ctx_for(tokenizer, first_data, tmp_path / "a"))
    saved = tmp_path / "a" / "ewc_fisher.safetensors"
    second_model = make_tiny(seed=1)
    online = EWC(
        EWCConfig(data=GeneralData(source="sft", size=3), normalize="mean", fisher_path=str(saved), online_decay=0.5)
    )
    online.prepare(second_model, ctx_for(tokenizer, second_data, tmp_path / "b"))

    old_raw = reference_fisher(make_tiny(), first_data)
    new_raw = reference_fisher(second_model, second_data)
    stored = load_file(str(saved))
    for name, old in zip(online.names, old_raw):  # the file holds the raw Fisher, not the normalised one
        torch.testing.assert_close(stored[f"fisher.{name}"], old, rtol=1e-4, atol=1e-12)
    mixed = [0.5 * o + n for o, n in zip(old_raw, new_raw)]
    mean = torch.cat([m.flatten() for m in mixed]).mean()
    for got, want in zip(online.fisher, mixed):
        torch.testing.assert_close(got, want / mean, rtol=1e-4, atol=1e-8)


# ---- 3. the replay ratio is the share of the loss's tokens


def conversations_of(tokenizer, lengths, word):
    template = template_for("chatml", tokenizer)
    return [
        tokenize_conversation(tokenizer, template, conversation(f"Say {word} {n} times.", " ".join([word] * n)))
        for n in lengths
    ]


def loss_tokens(e: Example) -> int:  # what the loss counts: labelled positions after the first
    return sum(label != IGNORE_INDEX for label in e.labels[1:])


def test_replay_by_target_tokens_meets_the_ratio_of_loss_tokens(byte_tokenizer):
    from forgetting.mitigations.replay import ReplayConfig, fill_quota

    assert ReplayConfig().by == "target_tokens"
    pool = conversations_of(byte_tokenizer, [3, 9, 27, 40, 5], "blue")
    sft = conversations_of(byte_tokenizer, [2, 4, 30] * 10, "red")
    for ratio in (0.1, 0.3, 0.5):
        extra = fill_quota(pool, sft, ratio, "target_tokens", random.Random(0))
        replayed, total = sum(map(loss_tokens, extra)), sum(map(loss_tokens, extra + sft))
        assert abs(replayed / total - ratio) <= max(map(loss_tokens, pool)) / total


def test_replay_report_records_the_realised_share_by_every_measure(byte_tokenizer, tmp_path):
    from forgetting.mitigations.replay import Replay, ReplayConfig

    sft = conversations_of(byte_tokenizer, [2, 4, 30] * 10, "red")
    source = write_general_text(tmp_path)
    replay = Replay(ReplayConfig(ratio=0.3, data=GeneralData(source=str(source), size=4)))
    mixed = replay.mix_data(sft, None, SimpleNamespace(tokenizer=byte_tokenizer, output_dir=tmp_path))
    extra = mixed[len(sft) :]
    share = replay.report(None, None)["share"]
    for measure, of in (("examples", lambda e: 1), ("tokens", len), ("target_tokens", loss_tokens)):
        assert share[measure] == pytest.approx(sum(map(of, extra)) / sum(map(of, mixed)))
    assert share["target_tokens"] == pytest.approx(0.3, abs=0.05)


# ---- 4. EWC with LoRA penalises the effective update scale * B @ A


def lora_model(make_tiny):
    from forgetting.mitigations.lora import Lora, LoraMitigationConfig

    config = LoraMitigationConfig(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    return Lora(config).wrap_model(make_tiny(), None)


def test_ewc_with_lora_penalises_the_effective_weight_update(tokenizer, make_tiny, tmp_path):
    data = examples_for(tokenizer)[:3]
    model = lora_model(make_tiny)
    ewc = EWC(EWCConfig(strength=2.0, data=GeneralData(source="sft", size=3)))
    ewc.prepare(model, ctx_for(tokenizer, data, tmp_path))

    # the Fisher is the base model's, on the wrapped layers' weights (independent: the unwrapped base model)
    base = make_tiny()
    wrapped = [n for n, _ in base.named_parameters() if re.search(r"\.(q_proj|v_proj)\.weight$", n)]
    for n, p in base.named_parameters():
        p.requires_grad_(n in wrapped)
    expected = dict(zip(wrapped, reference_fisher(base, data)))
    saved = {
        k[len("fisher.") :]: v
        for k, v in load_file(str(tmp_path / "ewc_fisher.safetensors")).items()
        if k.startswith("fisher.")
    }
    assert len(saved) == len(wrapped)
    for name, fisher in saved.items():
        base_name = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        torch.testing.assert_close(fisher, expected[base_name], rtol=1e-4, atol=1e-12)
    assert ewc._value(model).item() == 0.0  # B starts at zero

    # move the adapters; the penalty is (strength / 2) sum F (delta W)^2 with delta W from peft's own merge
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn_like(p))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    start = make_tiny().state_dict()
    by_hand = sum(float((expected[n] * (merged[n] - start[n]) ** 2).sum()) for n in wrapped)
    assert ewc._value(model).item() == pytest.approx(by_hand, rel=1e-4) and by_hand > 0

    # its exact gradient reaches both lora_A and lora_B
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    want = torch.autograd.grad(ewc._value(model), lora)
    for p in lora:
        p.grad = torch.full_like(p, 0.5)
    ewc.penalty_grad(model, None)
    for (n, p), w in zip([(n, p) for n, p in model.named_parameters() if "lora_" in n], want):
        torch.testing.assert_close(p.grad, w + 0.5, rtol=1e-4, atol=1e-7)
        assert w.abs().sum() > 0, n


# ---- 5. kl_to_base picks the same general batches after a resume


def test_kl_to_base_batches_after_a_resume_equal_the_uninterrupted_run(tmp_path, monkeypatch):
    import forgetting.harness.train as train_module
    import forgetting.mitigations.kl_to_base as kl_module
    from forgetting.harness.train import train

    spec = f"mitigations=[{{name: kl_to_base, data: {{source: {write_general_text(tmp_path)}}}, batch_size: 3}}]"
    args = ("train.max_steps=4", "train.save_every=2", spec)
    seen: list = []
    real_collate = kl_module.collate

    def recording(examples, pad_id):
        seen.append([e.input_ids for e in examples])
        return real_collate(examples, pad_id)

    monkeypatch.setattr(kl_module, "collate", recording)
    straight_result = train(job(tmp_path, *args, name="straight"))
    straight, seen[:] = list(seen), []

    real_loss_step, calls = train_module.loss_step, {"n": 0}

    def crash_on_third_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_loss_step(*a, **k)

    monkeypatch.setattr(train_module, "loss_step", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        train(job(tmp_path, *args, name="resumed"))
    monkeypatch.setattr(train_module, "loss_step", real_loss_step)
    seen[:] = []
    resumed = train(job(tmp_path, *args, name="resumed"))
    assert seen == straight[2:]  # steps 3 and 4
    after, want = (
        load_file(str(resumed.final_dir / "model.safetensors")),
        load_file(str(straight_result.final_dir / "model.safetensors")),
    )
    assert all(torch.equal(after[n], want[n]) for n in want)


# ---- 6. self-rehearsal subjects are not the eval suite's topics


def _stem(word: str) -> str:
    """Crude singular: enough to match 'volcanoes'/'volcano', 'libraries'/'library', 'maps'/'map'."""
    for suffix, repl in (("ies", "y"), ("oes", "o"), ("ches", "ch"), ("shes", "sh"), ("xes", "x"), ("s", "")):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            return word[: -len(suffix)] + repl
    return word


def _words(text: str) -> set[str]:
    return {_stem(w) for w in re.findall(r"[a-z]+", text.lower())}


def eval_topic_words() -> set[str]:
    """Every word of the eval suite's own prompt data (knowledge, IFEval / format-health topics, prose, target)."""
    from forgetting.evals import ifeval_prompts, knowledge, prose
    from forgetting.harness import builtin_task

    texts = list(ifeval_prompts.TOPICS) + list(prose.PARAGRAPHS)
    texts += [" ".join([i["question"]] + i["choices"]) for i in knowledge.items()]
    texts += [r["prompt"] for r in builtin_task.records("heldout")]
    return set().union(*map(_words, texts))


def test_no_rehearsal_subject_word_is_an_eval_topic_word():
    from forgetting.mitigations.rehearsal import SUBJECTS, general_prompts

    function_words = {"the", "a", "an", "of", "and", "how", "to", "in", "on", "for"}
    eval_words = eval_topic_words()
    clashes = {s: sorted(_words(s) & eval_words - function_words) for s in SUBJECTS}
    assert not {s: w for s, w in clashes.items() if w}
    assert len(general_prompts(126)) == len(set(general_prompts(126))) == 126
