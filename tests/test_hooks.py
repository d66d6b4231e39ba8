"""The hook protocol (mitigations.registry): one dispatcher for every hook, and what registration refuses."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from forgetting.harness.errors import UserError
from forgetting.harness.job import load_job
from forgetting.harness.train import train
from forgetting.mitigations import REGISTRY, build_mitigations, chain, register_mitigation, validate_specs
from tests.helpers import tiny_job


@dataclass
class ToyConfig:
    pass


@pytest.fixture
def registering():
    """Register test mitigations with `register(name, impl)`; every one is removed from REGISTRY afterwards."""
    names = []

    def register(name: str, impl: type) -> type:
        names.append(name)
        return register_mitigation(name, ToyConfig)(impl)

    yield register
    for name in names:
        REGISTRY.pop(name, None)


def test_a_misspelled_hook_is_refused_at_registration(registering):
    class Misspelled:
        def __init__(self, config):
            pass

        def penalties(self, model, ctx):  # never called: the hook is `penalty`
            return []

    with pytest.raises(
        TypeError,
        match=r"^mitigation 'misspelled' \(Misspelled\): public method 'penalties' is "
        r"not a hook; did you mean 'penalty'\? hooks: wrap_model, .*report",
    ):
        registering("misspelled", Misspelled)
    assert "misspelled" not in REGISTRY


def test_private_helpers_and_attributes_are_allowed(registering):
    class Helpers:
        calls: list = []  # not callable

        def __init__(self, config):
            pass

        def _value(self, model):
            return 0.0

        def report(self, model, ctx):
            return {}

    registering("helpers", Helpers)
    assert REGISTRY["helpers"][1] is Helpers


class Groups:
    def __init__(self, config):
        pass

    def param_groups(self, model, ctx):
        return [{"params": list(model.parameters())}]


def test_two_mitigations_with_param_groups_are_refused(registering):
    registering("groups", Groups)
    specs = [{"name": "low_lr"}, {"name": "l2sp"}, {"name": "groups"}]
    message = r"^mitigations: 'low_lr' and 'groups' both set the optimizer's parameter groups"
    with pytest.raises(UserError, match=message):
        validate_specs(specs)
    with pytest.raises(UserError, match=message):
        build_mitigations(specs)
    with pytest.raises(UserError, match=message):
        load_job(None, ["mitigations=[{name: low_lr}, {name: groups}]"])
    assert [m.name for m in build_mitigations(specs[1:])] == ["l2sp", "groups"]


class Tagger:
    """Tags the model it wraps and appends one copy of the first example: its outputs show what it received."""

    seen: list = []

    def __init__(self, config):
        pass

    def wrap_model(self, model, ctx):
        Tagger.seen.append((self.name, "wrap_model", getattr(model, "tags", ())))
        model.tags = getattr(model, "tags", ()) + (self.name,)
        return model

    def mix_data(self, examples, model, ctx):
        Tagger.seen.append((self.name, "mix_data", len(examples), model.tags))
        return list(examples) + [examples[0]]


@pytest.fixture
def taggers(registering):
    registering("first", type("First", (Tagger,), {}))
    registering("second", type("Second", (Tagger,), {}))
    Tagger.seen = []
    return Tagger


def test_chain_passes_each_output_to_the_next_in_order(taggers):
    first, second = build_mitigations([{"name": "second"}, {"name": "first"}])

    class Model:
        pass

    model = chain([first, second], "wrap_model", Model(), None)
    assert model.tags == ("second", "first")
    assert chain([first, second], "mix_data", ["a", "b"], model, None) == ["a", "b", "a", "a"]
    assert chain([], "wrap_model", model, None) is model


def test_the_loop_chains_wrap_model_and_mix_data_in_config_order(tmp_path, taggers):
    job = tiny_job(
        tmp_path,
        "data.limit=8",
        "train.batch_size=4",
        "train.max_steps=1",
        "train.lr=2e-5",
        "mitigations=[{name: second}, {name: first}]",
        "train.memory_check=false",  # the memory check wraps a model of its own (meta device) through the hooks too
    )
    train(job)
    assert taggers.seen == [
        ("second", "wrap_model", ()),
        ("first", "wrap_model", ("second",)),
        ("second", "mix_data", 8, ("second", "first")),
        ("first", "mix_data", 9, ("second", "first")),
    ]
