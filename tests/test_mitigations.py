"""Every mitigation on the tiny model: what trains, what stays, the formulas, composition, bad configs."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from forgetting.harness.batching import collate
from forgetting.harness.errors import UserError
from forgetting.harness.formats import IGNORE_INDEX, Example, template_for, tokenize_conversation
from forgetting.harness.train import train
from forgetting.mitigations.ewc import EWC, EWCConfig, estimate_fisher
from forgetting.mitigations.general_data import GeneralData
from forgetting.mitigations.l2sp import L2SP, L2SPConfig
from forgetting.mitigations.replay import fill_quota
from tests.helpers import conversation, examples_for, memorise, reference_fisher, tiny_job, write_general_text


def job(tmp_path, *overrides, name="run"):
    """A tiny-random job over 32 examples, without warmup."""
    return tiny_job(tmp_path, "data.limit=32", "train.warmup_ratio=0", *overrides, name=name)


def final_weights(result) -> dict:
    return load_file(str(result.final_dir / "model.safetensors"))


CASES = {  # name -> (mitigations override, check(result, start_state, tmp_path))
    "low_lr": ("[{name: low_lr, lr: 1e-5}]", "low_lr"),
    "lora": ("[{name: lora, r: 4, target_modules: [q_proj, v_proj]}]", "lora"),
    "replay": ("[{name: replay, ratio: 0.25, data: {source: REPLAY_TXT, size: 4}}]", "replay"),
    "ewc": ("[{name: ewc, strength: 10.0, data: {source: sft, size: 4}}]", "ewc"),
    "l2sp": ("[{name: l2sp, strength: 0.1}]", "l2sp"),
    "freeze": ("[{name: freeze, layers: [1, 1]}]", "freeze"),
    "kl_to_base": ("[{name: kl_to_base, strength: 1.0, data: {source: REPLAY_TXT}, batch_size: 2}]", "kl_to_base"),
    "wise_ft": ("[{name: wise_ft, alphas: [0.0, 0.5, 1.0]}]", "wise_ft"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_mitigation_trains_and_reports(tmp_path, make_tiny, case):
    spec, name = CASES[case]
    spec = spec.replace("REPLAY_TXT", str(write_general_text(tmp_path)))
    result = train(job(tmp_path, f"mitigations={spec}"))
    assert name in result.mitigation_reports and result.last_loss is not None
    start = make_tiny().state_dict()
    if case == "lora":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM  # noqa: F401

        adapter = load_file(str(result.final_dir / "adapter_model.safetensors"))
        assert adapter and all("lora_" in k for k in adapter)
        assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
        assert not (result.final_dir / "model.safetensors").exists()  # the base is not duplicated
        base = make_tiny()
        loaded = PeftModel.from_pretrained(base, result.final_dir)
        merged = loaded.merge_and_unload().state_dict()
        assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
        assert not torch.equal(
            merged["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"]
        )
        assert result.mitigation_reports["lora"]["trainable_fraction"] < 0.05
        return
    after = final_weights(result)
    changed = {n for n, t in after.items() if not torch.equal(t, start[n])}
    if case == "freeze":
        assert changed and not any(".layers.1." in n for n in changed)
    else:
        assert changed == set(after)
    if case == "wise_ft":
        at = lambda a: load_file(str(result.final_dir / f"wise_ft_{a}" / "model.safetensors"))  # noqa: E731
        zero, half, one = at("0"), at("0.5"), at("1")
        for n in after:
            assert torch.equal(zero[n], start[n]) and torch.equal(one[n], after[n])
            torch.testing.assert_close(half[n], (start[n] + after[n]) / 2)
    if case == "kl_to_base":
        assert result.mitigation_reports["kl_to_base"]["last_kl"] > 0
    if case == "replay":
        report = result.mitigation_reports["replay"]
        assert report["realised_ratio"] == pytest.approx(0.25, abs=0.02) and report["pool"] == 4
    if case == "ewc":
        report = result.mitigation_reports["ewc"]
        assert report["estimator"] == "empirical" and report["samples"] == 4 and report["final_penalty"] > 0
        saved = load_file(str(tmp_path / "run" / "ewc_fisher.safetensors"))
        assert any(k.startswith("fisher.") for k in saved) and any(k.startswith("anchor.") for k in saved)


def test_lora_merge_on_export_saves_a_merged_model(tmp_path):
    result = train(job(tmp_path, "mitigations=[{name: lora, r: 4, target_modules: [q_proj], merge_on_export: true}]"))
    merged = load_file(str(result.final_dir / "merged" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in merged and not any("lora_" in k for k in merged)


def test_fisher_is_the_mean_of_per_example_squared_gradients(tokenizer, make_tiny):
    model = make_tiny()
    examples = examples_for(tokenizer)
    fisher = estimate_fisher(model, examples, tokenizer.pad_token_id, "empirical")
    expected = reference_fisher(model, examples)
    for f, e in zip(fisher, expected):
        assert (f - e).norm() <= 1e-5 * e.norm()
    # not the square of the minibatch mean gradient (the common bug): that one is much smaller
    model.zero_grad()
    batch = collate(examples, tokenizer.pad_token_id)
    from forgetting.harness.loss import summed_response_loss

    per_example_means = [
        summed_response_loss(model, collate([e], tokenizer.pad_token_id))
        / sum(label != IGNORE_INDEX for label in e.labels[1:])
        for e in examples
    ]
    torch.stack(per_example_means).mean().backward()
    squared_mean = sum(float((p.grad**2).sum()) for p in model.parameters())
    assert squared_mean < 0.8 * sum(float(f.sum()) for f in fisher)
    assert batch["input_ids"].shape[0] == len(examples)


def test_sampled_fisher_differs_from_empirical_where_the_model_disagrees_with_the_labels(tokenizer, make_tiny):
    """The empirical Fisher measures gradients at the data's labels, the sampled one at the model's own beliefs.

    A model trained to answer A, probed with data that answers B: the empirical Fisher is large (big gradients
    toward B); the sampled Fisher follows the model's confident A and stays small. Where data and model agree
    (probed with A) both are small.
    """
    template = template_for("chatml", tokenizer)
    prompts = ["Name a fruit.", "Say hi."]
    taught = [
        tokenize_conversation(tokenizer, template, conversation(p, a)) for p, a in zip(prompts, ["Apple.", "Hi!"])
    ]
    other = [tokenize_conversation(tokenizer, template, conversation(p, a)) for p, a in zip(prompts, ["Pear.", "Bye!"])]
    model = memorise(make_tiny(), taught, tokenizer.pad_token_id)
    trace = lambda f: sum(float(x.sum()) for x in f)  # noqa: E731
    empirical_other = trace(estimate_fisher(model, other, tokenizer.pad_token_id, "empirical"))
    sampled_other = trace(estimate_fisher(model, other, tokenizer.pad_token_id, "sampled", seed=0))
    empirical_taught = trace(estimate_fisher(model, taught, tokenizer.pad_token_id, "empirical"))
    assert sampled_other < 0.05 * empirical_other
    assert empirical_taught < 0.05 * empirical_other
    again = trace(estimate_fisher(model, other, tokenizer.pad_token_id, "sampled", seed=0))
    assert again == pytest.approx(sampled_other)  # seeded


def test_ewc_penalty_is_zero_at_the_anchor_and_matches_the_formula(tokenizer, make_tiny, tmp_path):
    from types import SimpleNamespace

    from accelerate import Accelerator

    model = make_tiny()
    ctx = SimpleNamespace(
        examples=tuple(examples_for(tokenizer)),
        tokenizer=tokenizer,
        output_dir=tmp_path,
        accelerator=Accelerator(cpu=True),
        job=None,
    )
    ewc = EWC(EWCConfig(strength=3.0, data=GeneralData(source="sft", size=6)))
    ewc.prepare(model, ctx)
    assert ewc._value(model).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    params = [p for p in model.parameters()]
    by_hand = 0.5 * 3.0 * sum(float((f * (p - a) ** 2).sum()) for f, p, a in zip(ewc.fisher, params, ewc.anchor))
    assert ewc._value(model).item() == pytest.approx(by_hand, rel=1e-5) and by_hand > 0
    # the gradient added in training is the exact gradient of that value
    expected = torch.autograd.grad(ewc._value(model), params)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    ewc.penalty_grad(model, ctx)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e + 0.5, rtol=1e-5, atol=1e-7)

    # l2sp is ewc with F = 1
    l2sp = L2SP(L2SPConfig(strength=3.0))
    l2sp.anchor = ewc.anchor
    ewc.fisher = [torch.ones_like(f) for f in ewc.fisher]
    assert l2sp.penalty(model, ctx).item() == pytest.approx(ewc._value(model).item(), rel=1e-6)

    # the saved Fisher and anchor are reused as they are
    reused = EWC(EWCConfig(strength=3.0, fisher_path=str(tmp_path / "ewc_fisher.safetensors")))
    reused.prepare(make_tiny(seed=5), SimpleNamespace(**{**ctx.__dict__, "output_dir": tmp_path / "second"}))
    assert all(torch.equal(a, b) for a, b in zip(reused.anchor, [a.clone() for a in ewc.anchor]))


def test_online_ewc_decays_the_previous_fisher_and_adds_the_new_one(tokenizer, make_tiny, tmp_path):
    from types import SimpleNamespace

    from accelerate import Accelerator

    model = make_tiny()
    ctx = SimpleNamespace(
        examples=tuple(examples_for(tokenizer)),
        tokenizer=tokenizer,
        output_dir=tmp_path / "a",
        accelerator=Accelerator(cpu=True),
        job=None,
    )
    first = EWC(EWCConfig(data=GeneralData(source="sft", size=6)))
    first.prepare(model, ctx)
    online = EWC(
        EWCConfig(
            data=GeneralData(source="sft", size=6),
            fisher_path=str(tmp_path / "a" / "ewc_fisher.safetensors"),
            online_decay=0.5,
        )
    )
    online.prepare(model, SimpleNamespace(**{**ctx.__dict__, "output_dir": tmp_path / "b"}))
    for old, new in zip(first.fisher, online.fisher):
        torch.testing.assert_close(new, 1.5 * old)


def test_kl_to_base_matches_the_definition():
    from forgetting.mitigations.kl_to_base import kl_base_current

    base, current = torch.randn(5, 11), torch.randn(5, 11)
    p, q = torch.softmax(base, -1), torch.softmax(current, -1)
    by_hand = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(kl_base_current(base, current), by_hand)
    assert kl_base_current(base, base).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_to_base_frozen_base_runs_its_own_forward_not_the_live_model_s(tokenizer, make_tiny, tmp_path):
    """TRL's SFTTrainer sets `model.forward` on the instance, calling the original model's forward; a deep copy
    keeps that call, so a base copied as it is would follow the live model (KL 0 however far training goes)."""
    from types import MethodType, SimpleNamespace

    from forgetting.mitigations.kl_to_base import KLToBase, KLToBaseConfig

    model = make_tiny()
    original = model.forward
    model.forward = MethodType(lambda self, *args, **kwargs: original(*args, **kwargs), model)
    config = KLToBaseConfig(strength=1.0, data=GeneralData(source=str(write_general_text(tmp_path))), batch_size=2)
    kl = KLToBase(config)
    kl.prepare(model, SimpleNamespace(tokenizer=tokenizer, output_dir=tmp_path, start_step=0))
    assert "forward" in model.__dict__ and "forward" not in kl.base.__dict__  # the live model keeps its own
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.tensor([kl.pool[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(kl.base(input_ids=ids).logits, make_tiny()(input_ids=ids).logits)
    assert kl.penalty(model, SimpleNamespace(tokenizer=tokenizer)).item() > 1e-4


def test_replay_quota_is_met_and_deterministic():
    pool = [Example([1] * n, [1] * n) for n in (5, 10, 20, 40)]
    sft = [Example([2] * 10, [2] * 10) for _ in range(90)]
    by_examples = fill_quota(pool, sft, 0.1, "examples", random.Random(0))
    assert len(by_examples) == 10
    assert by_examples == fill_quota(pool, sft, 0.1, "examples", random.Random(0))
    by_tokens = fill_quota(pool, sft, 0.25, "tokens", random.Random(1))
    replayed = sum(len(e) for e in by_tokens)
    assert abs(replayed / (replayed + 900) - 0.25) < 0.02
    assert fill_quota(pool, sft, 0.0, "tokens", random.Random(0)) == []


def test_plain_text_replay_gets_full_sequence_labels(byte_tokenizer, tmp_path):
    from forgetting.mitigations.general_data import read_texts, text_example

    (tmp_path / "general.txt").write_text("The sun is a star.\n\nWater is wet.\n")
    texts = read_texts(str(tmp_path / "general.txt"), "train", "text", 10)
    example = text_example(byte_tokenizer, texts[0], 64)
    assert texts == ["The sun is a star.", "Water is wet."]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed JSON"):
        read_texts(str(tmp_path / "bad.jsonl"), "train", "text", 10)
    (tmp_path / "list.json").write_text('[{"text": "a"}, {"body": "b"}]')
    with pytest.raises(UserError, match=r"list\.json: record 2: general data text field 'text' missing"):
        read_texts(str(tmp_path / "list.json"), "train", "text", 10)
    assert example.labels == example.input_ids and example.input_ids[-1] == byte_tokenizer.eos_token_id


def test_self_rehearsal_answers_come_from_the_model(tokenizer, make_tiny, tmp_path):
    from forgetting.mitigations.rehearsal import general_prompts, self_rehearsal, synthesize

    # a tiny model taught to answer every general prompt with a sentence: its answers must be that sentence
    template = template_for("chatml", tokenizer)
    prompts = general_prompts(3)
    lessons = [tokenize_conversation(tokenizer, template, conversation(p, "I like learning.")) for p in prompts]
    model = memorise(make_tiny(), lessons, tokenizer.pad_token_id, steps=60)
    answers = synthesize(model, tokenizer, prompts, max_new_tokens=8)
    assert answers == [("I like learning.", True)] * 3  # (answer, the model stopped by itself)
    cache = tmp_path / "self.jsonl"
    examples, counts = self_rehearsal(model, tokenizer, "chatml", 3, 8, 128, cache)
    assert len(examples) == 3 and all(e.num_target_tokens > 0 for e in examples) and cache.is_file()
    assert counts == {"answers_finished": 3, "answers_cut": 0}
    assert [e.input_ids for e in self_rehearsal(None, tokenizer, "chatml", 3, 8, 128, cache)[0]] == [
        e.input_ids for e in examples
    ]  # a resumed run reads the cache instead of generating again
    with pytest.raises(UserError, match="only empty answers"):
        self_rehearsal(make_tiny(), tokenizer, "chatml", 2, 4, 128, None)  # an untrained model echoes newlines


@pytest.mark.parametrize(
    "spec",
    [
        "[{name: lora, r: 4, target_modules: [q_proj, v_proj]}, {name: ewc, data: {source: sft, size: 2}, strength: "
        "5.0}]",
        "[{name: replay, ratio: 0.2, data: {source: REPLAY_TXT, size: 2}}, {name: ewc, data: {source: sft, size: 2}}]",
        "[{name: low_lr}, {name: ewc, data: {source: sft, size: 2}, estimator: sampled}]",
    ],
)
def test_mitigations_compose(tmp_path, spec):
    spec = spec.replace("REPLAY_TXT", str(write_general_text(tmp_path)))
    result = train(job(tmp_path, f"mitigations={spec}"))
    assert result.mitigation_reports["ewc"]["final_penalty"] >= 0
    if "lora" in spec:  # the Fisher is of the adapted layers' base weights (the penalty is on delta W)
        saved = load_file(str(tmp_path / "run" / "ewc_fisher.safetensors"))
        assert saved and all(k.endswith(("q_proj.base_layer.weight", "v_proj.base_layer.weight")) for k in saved)
        assert result.mitigation_reports["ewc"]["lora_layers"] == 4


@pytest.mark.parametrize(
    "spec,pattern",
    [
        ("[{name: ewc, strength: -1}]", r"mitigations\[0\]: strength: must be >= 0"),
        ("[{name: replay, ratio: 1.0}]", r"mitigations\[0\]: ratio: must be in \[0, 1\)"),
        ("[{name: replay, ratio: -0.1}]", r"ratio: must be in \[0, 1\)"),
        ("[{name: ewc, estimator: exact}]", r"mitigations\[0\]\.estimator: expected one of empirical, sampled"),
        ("[{name: lora, rank: 4}]", r"mitigations\[0\]\.rank: unknown key; valid keys: r, alpha"),
        (
            "[{name: dropout_magic}]",
            r"unknown mitigation 'dropout_magic'; valid: ewc, freeze, kl_to_base, l2sp, lora, low_lr, replay, wise_ft",
        ),
    ],
)
def test_bad_mitigation_configs(tmp_path, spec, pattern):
    with pytest.raises(UserError, match=pattern):
        job(tmp_path, f"mitigations={spec}")


def test_lora_on_missing_modules_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match=r"lora target_modules \['query'\] are not in the model"):
        train(job(tmp_path, "mitigations=[{name: lora, target_modules: [query]}]"))


def test_ewc_training_stays_closer_to_the_anchor_in_fisher_distance(tmp_path, make_tiny):
    start = make_tiny().state_dict()
    free = final_weights(train(job(tmp_path, "train.max_steps=6", name="free")))
    pulled = train(
        job(
            tmp_path,
            "train.max_steps=6",
            "mitigations=[{name: ewc, strength: 100.0, data: {source: sft, size: 4}, normalize: mean}]",
            name="ewc",
        )
    )
    fisher = {
        k[len("fisher.") :]: v
        for k, v in load_file(str(tmp_path / "ewc" / "ewc_fisher.safetensors")).items()
        if k.startswith("fisher.")
    }
    distance = lambda w: sum(float((fisher[n] * (w[n] - start[n]) ** 2).sum()) for n in fisher if n in w)  # noqa: E731
    assert distance(final_weights(pulled)) < 0.5 * distance(free)
