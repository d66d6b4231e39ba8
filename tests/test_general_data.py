"""One config for general data (`data:` of ewc, replay and kl_to_base): the same mapping draws the same examples
in each, the mitigations' own defaults survive a partial mapping, and old spellings are refused by name."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import forgetting.mitigations.ewc as ewc_module
import forgetting.mitigations.kl_to_base as kl_module
import forgetting.mitigations.replay as replay_module
from forgetting.harness.config import DataConfig
from forgetting.harness.configlib import describe, from_dict
from forgetting.harness.errors import UserError
from forgetting.harness.formats import template_for, tokenize_conversation
from forgetting.harness.job import load_job
from forgetting.mitigations.ewc import EWC, EWCConfig
from forgetting.mitigations.general_data import GeneralData
from forgetting.mitigations.kl_to_base import KLToBase, KLToBaseConfig
from forgetting.mitigations.rehearsal import general_prompts
from forgetting.mitigations.replay import Replay, ReplayConfig
from tests.helpers import conversation, examples_for, memorise


def write_sources(tmp_path) -> dict:
    text = tmp_path / "general.txt"
    text.write_text("The sun is a star.\n\nWater boils at one hundred degrees.\n\nCats are mammals.\n")
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "".join(json.dumps({"prompt": f"Name a colour ({i}).", "response": "Blue."}) + "\n" for i in range(4))
    )
    return {
        "text": {"source": str(text), "size": 2},
        "conversations": {"source": str(chats), "kind": "conversations", "size": 3},
        "self": {"source": "self", "size": 2, "max_new_tokens": 8},
    }


def answering_model(tokenizer, make_tiny, count: int):
    """A tiny model that answers the first `count` general prompts (an untrained one answers nothing)."""
    template = template_for("chatml", tokenizer)
    lessons = [
        tokenize_conversation(tokenizer, template, conversation(p, "I like learning.")) for p in general_prompts(count)
    ]
    return memorise(make_tiny(), lessons, tokenizer.pad_token_id, steps=60)


def context(tokenizer, output_dir):
    from accelerate import Accelerator

    return SimpleNamespace(
        examples=tuple(examples_for(tokenizer)),
        tokenizer=tokenizer,
        output_dir=output_dir,
        accelerator=Accelerator(cpu=True),
        job=SimpleNamespace(data=DataConfig(format="chatml")),
        start_step=0,
    )


def drawn_by_each(model, ctx, data: dict, monkeypatch) -> dict:
    """name -> the (input_ids, labels) of the general examples each mitigation drew for the same `data`."""
    drawn = {}
    for name, module in (("ewc", ewc_module), ("replay", replay_module), ("kl_to_base", kl_module)):
        real = module.general_examples

        def recording(*args, name=name, real=real):
            examples, counts = real(*args)
            drawn[name] = [(e.input_ids, e.labels) for e in examples]
            return examples, counts

        monkeypatch.setattr(module, "general_examples", recording)
    spec = {"data": data}
    EWC(from_dict(EWCConfig, spec)).prepare(model, ctx)
    Replay(from_dict(ReplayConfig, spec)).mix_data(list(ctx.examples), model, ctx)
    KLToBase(from_dict(KLToBaseConfig, spec)).prepare(model, ctx)
    return drawn


@pytest.mark.parametrize("case", ["text", "conversations", "self"])
def test_the_three_mitigations_draw_the_same_examples_from_the_same_config(
    case, tokenizer, make_tiny, tmp_path, monkeypatch
):
    monkeypatch.setenv("FORGETTING_CACHE", str(tmp_path / "cache"))
    data = write_sources(tmp_path)[case]
    model = answering_model(tokenizer, make_tiny, 2) if case == "self" else make_tiny()
    drawn = drawn_by_each(model, context(tokenizer, tmp_path / "run"), data, monkeypatch)
    assert sorted(drawn) == ["ewc", "kl_to_base", "replay"]
    assert drawn["ewc"] == drawn["replay"] == drawn["kl_to_base"] and len(drawn["ewc"]) == data["size"]


def test_replay_and_kl_to_base_in_one_run_keep_their_own_self_answers(tokenizer, make_tiny, tmp_path, monkeypatch):
    """Each keeps its answers in its own run file (read back on resume): a 3-answer replay pool written first
    must not become the pool of a kl_to_base that asked for 2."""
    monkeypatch.setenv("FORGETTING_CACHE", str(tmp_path / "cache"))
    model, ctx = answering_model(tokenizer, make_tiny, 3), context(tokenizer, tmp_path / "run")
    replay = Replay(from_dict(ReplayConfig, {"data": {"size": 3, "max_new_tokens": 8}}))
    replay.mix_data(list(ctx.examples), model, ctx)
    kl = KLToBase(from_dict(KLToBaseConfig, {"data": {"size": 2, "max_new_tokens": 8}}))
    kl.prepare(model, ctx)
    assert replay.report(model, ctx)["pool"] == 3 and len(kl.pool) == 2
    files = sorted(p.name for p in ctx.output_dir.glob("*_self.jsonl"))
    assert files == ["kl_to_base_self.jsonl", "replay_self.jsonl"]


def test_each_mitigation_keeps_its_own_defaults_under_a_partial_mapping():
    assert EWCConfig().data == ReplayConfig().data == GeneralData()  # the defaults before the one config:
    assert KLToBaseConfig().data == GeneralData(size=32)  # 64 (32 for kl_to_base) prompts, 128 new tokens, 512
    assert GeneralData().max_new_tokens == 128 and GeneralData().max_seq_len == 512
    kl = from_dict(KLToBaseConfig, {"data": {"source": "general.txt"}})
    assert kl.data == GeneralData(source="general.txt", size=32)
    reference = {key: default for key, default, _ in describe(KLToBaseConfig)}
    assert reference["data.size"] == "32" and reference["data.source"] == "'self'"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("{name: ewc, data: self}", "mitigations[0].data: expected a mapping, got 'self'; write data: {source: self}"),
        ("{name: ewc, samples: 16}", "mitigations[0].samples: moved to data.size; write data: {size: 16}"),
        (
            "{name: ewc, max_new_tokens: 64}",
            "mitigations[0].max_new_tokens: moved to data.max_new_tokens; write data: {max_new_tokens: 64}",
        ),
        ("{name: replay, source: x.txt}", "mitigations[0].source: moved to data.source; write data: {source: x.txt}"),
        ("{name: replay, pool_size: 8}", "mitigations[0].pool_size: moved to data.size; write data: {size: 8}"),
        (
            "{name: replay, kind: conversations}",
            "mitigations[0].kind: moved to data.kind; write data: {kind: conversations}",
        ),
        ("{name: kl_to_base, pool_size: 8}", "mitigations[0].pool_size: moved to data.size; write data: {size: 8}"),
        ("{name: kl_to_base, source: self}", "mitigations[0].source: moved to data.source; write data: {source: self}"),
        (
            "{name: replay, data: {source: sft}}",
            "mitigations[0]: data.source: sft is for ewc only; replay needs general data (self, a file or a datasets "
            "name)",
        ),
        ("{name: kl_to_base, data: {size: 0}}", "mitigations[0].data: size: must be at least 1, got 0"),
        (
            "{name: ewc, data: {kind: conversations}}",
            "mitigations[0].data: kind: conversations reads a file or datasets source, not 'self'",
        ),
        ("{name: replay, data: {pool_size: 8}}", "mitigations[0].data.pool_size: unknown key; did you mean 'size'?"),
    ],
)
def test_old_spellings_and_bad_general_data_are_one_line_errors(spec, message):
    with pytest.raises(UserError) as err:
        load_job(None, [f"mitigations=[{spec}]"])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_an_override_reaches_the_nested_knobs():
    job = load_job(None, ["mitigations=[{name: replay, data: {source: general.txt, size: 8}}, {name: kl_to_base}]"])
    replay, kl = (
        from_dict(cls, {k: v for k, v in spec.items() if k != "name"})
        for cls, spec in zip((ReplayConfig, KLToBaseConfig), job.mitigations)
    )
    assert replay.data == GeneralData(source="general.txt", size=8) and kl.data == GeneralData(size=32)
