"""The mitigation protocol and the registry from name to (config dataclass, implementation).

A mitigation is any object with some of these optional hooks; the SFT loop calls the ones it has, in the
order the config lists the mitigations. Hooks return values; the loop decides what to do with them.

    wrap_model(model, ctx) -> model         replace/wrap the model to train (LoRA, freezing)
    param_groups(model, ctx) -> [dict]      optimizer parameter groups (per-group lr, weight decay)
    mix_data(examples, model, ctx) -> [Ex]  the training examples with extra ones mixed in (replay)
    prepare(model, ctx) -> None             before the first step: snapshot anchors, estimate Fisher
    penalty(model, ctx) -> Tensor           added to the loss once per optimizer step (L2-SP, KL)
    penalty_grad(model, ctx) -> None        adds a penalty's exact gradient to the trainable parameters' .grad in
                                            one fused pass, for penalties whose value is costly to form every
                                            step (EWC); called after backward, before clipping
    export(model, ctx) -> {name: model}     after training: extra models saved as final/<name> (merged LoRA)
    report(model, ctx) -> dict              after training: numbers recorded beside the run's results

`ctx` is a read-only `harness.train.TrainContext`. Register an implementation with

    @register_mitigation("name", NameConfig)
    class Name: def __init__(self, config: NameConfig): ...

and configure it as `mitigations: [{name: name, <NameConfig fields>}]`.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from harness.configlib import from_dict
from harness.errors import UserError

HOOKS = ("wrap_model", "param_groups", "mix_data", "prepare", "penalty", "penalty_grad", "export", "report")


@runtime_checkable
class Mitigation(Protocol):
    """Marker protocol: a mitigation has a `name` and any subset of the hooks in `HOOKS`."""

    name: str


REGISTRY: dict[str, tuple[type, type]] = {}


def register_mitigation(name: str, config_cls: type) -> Callable[[type], type]:
    """Class decorator: make `name` build `impl(config_cls(**fields))`."""

    def decorate(impl: type) -> type:
        if name in REGISTRY:
            raise ValueError(f"mitigation {name!r} is already registered")
        REGISTRY[name] = (config_cls, impl)
        impl.name = name
        return impl

    return decorate


def registered() -> dict[str, tuple[type, type]]:
    """Every mitigation name -> (config dataclass, implementation)."""
    return dict(REGISTRY)


def _config_of(spec: Any, index: int) -> tuple[str, Any]:
    where = f"mitigations[{index}]"
    if not isinstance(spec, dict) or "name" not in spec:
        raise UserError(f"{where}: expected a mapping with a 'name', e.g. {{name: l2sp, strength: 0.01}}")
    name = spec["name"]
    if name not in REGISTRY:
        valid = ", ".join(sorted(REGISTRY)) or "(none registered)"
        raise UserError(f"{where}.name: unknown mitigation {name!r}; valid: {valid}")
    config_cls, _ = REGISTRY[name]
    fields = {k: v for k, v in spec.items() if k != "name"}
    return name, from_dict(config_cls, fields, where)


def validate_specs(specs: list[dict]) -> None:
    """Raise a one-line UserError for the first unknown name or bad field; check duplicates."""
    names = [_config_of(spec, i)[0] for i, spec in enumerate(specs)]
    for name in set(names):
        if names.count(name) > 1:
            raise UserError(f"mitigations: {name!r} is listed {names.count(name)} times")


def build_mitigations(specs: list[dict]) -> list[Any]:
    """Instantiate the configured mitigations, in config order."""
    built = []
    for i, spec in enumerate(specs):
        name, config = _config_of(spec, i)
        built.append(REGISTRY[name][1](config))
    return built


def hook_results(mitigations: list[Any], hook: str, *args: Any) -> list[Any]:
    """Call `hook(*args)` on each mitigation that has it; return the results in order."""
    assert hook in HOOKS, hook
    return [getattr(m, hook)(*args) for m in mitigations if hasattr(m, hook)]
