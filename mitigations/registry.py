"""The mitigation protocol and the registry from name to (config dataclass, implementation).

A mitigation is any object with some of these optional hooks; the SFT loop calls the ones it has, in the
order the config lists the mitigations, through `hook_results` (each hook's results in order) or, for the two
chained hooks, `chain` (each mitigation receives the previous one's output).

    wrap_model(model, ctx) -> model         chained: replace/wrap the model to train (LoRA, freezing)
    param_groups(model, ctx) -> [dict]      optimizer parameter groups (per-group lr, weight decay); at most
                                            one mitigation of a config may have it
    mix_data(examples, model, ctx) -> [Ex]  chained: the training examples with extra ones mixed in (replay)
    prepare(model, ctx) -> None             before the first step: snapshot anchors, estimate Fisher
    penalty(model, ctx) -> Tensor           added to the loss once per optimizer step (L2-SP, KL)
    penalty_grad(model, ctx) -> None        adds a penalty's exact gradient to the trainable parameters' .grad in
                                            one fused pass, for penalties whose value is costly to form every
                                            step (EWC); called after backward, before clipping
    export(directory, ctx) -> None          after training: extra models written from the saved files into
                                            directory/<name> (merged LoRA, WiSE-FT points); called on every
                                            process once the final model is in directory, the main one writes
    report(model, ctx) -> dict              after training: numbers recorded beside the run's results

Three hooks may change state: `prepare` (the mitigation's own: anchors, Fisher, pools), `penalty_grad` (adds
to the parameters' .grad) and `wrap_model` (returns a new or wrapped model, whose parameters it may freeze);
`export` writes files, into `directory` only. The others only return values; the loop decides what to do with
them. `prepare` and `wrap_model` may write the mitigation's own files under ctx.output_dir (a base model to
merge with, a Fisher estimate).

`ctx` is a read-only `harness.train.TrainContext`. Register an implementation with

    @register_mitigation("name", NameConfig)
    class Name: def __init__(self, config: NameConfig): ...

and configure it as `mitigations: [{name: name, <NameConfig fields>}]`. Registration refuses a public method
that is not a hook (a misspelled hook would otherwise never be called): name helpers with a leading underscore.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Protocol, runtime_checkable

from forgetting.harness.configlib import from_dict, to_dict, upgrade_keys
from forgetting.harness.errors import HarnessError, UserError

HOOKS = ("wrap_model", "param_groups", "mix_data", "prepare", "penalty", "penalty_grad", "export", "report")
CHAINED = ("wrap_model", "mix_data")  # hooks whose first argument is the previous mitigation's output


@runtime_checkable
class Mitigation(Protocol):
    """Marker protocol: a mitigation has a `name` and any subset of the hooks in `HOOKS`."""

    name: str


REGISTRY: dict[str, tuple[type, type]] = {}


def register_mitigation(name: str, config_cls: type) -> Callable[[type], type]:
    """Class decorator: make `name` build `impl(config_cls(**fields))`; refuse public methods that are not hooks."""

    def decorate(impl: type) -> type:
        if name in REGISTRY:
            raise ValueError(f"mitigation {name!r} is already registered")
        _check_hooks(name, impl)
        REGISTRY[name] = (config_cls, impl)
        impl.name = name
        return impl

    return decorate


def _check_hooks(name: str, impl: type) -> None:
    """Raise a one-line TypeError for the first public callable of `impl` that is not in `HOOKS`."""
    for attribute in dir(impl):
        if attribute.startswith("_") or attribute in HOOKS or not callable(getattr(impl, attribute, None)):
            continue
        close = difflib.get_close_matches(attribute, HOOKS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TypeError(
            f"mitigation {name!r} ({impl.__name__}): public method {attribute!r} is not a hook; {hint}"
            f"hooks: {', '.join(HOOKS)} (name a helper with a leading underscore)"
        )


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
    """Raise a one-line UserError for the first unknown name or bad field; check duplicates and that at most
    one mitigation sets the optimizer's parameter groups."""
    names = [_config_of(spec, i)[0] for i, spec in enumerate(specs)]
    for name in set(names):
        if names.count(name) > 1:
            raise UserError(f"mitigations: {name!r} is listed {names.count(name)} times")
    _one_param_groups(names)


def _one_param_groups(names: list[str]) -> None:
    """Two `param_groups` hooks cannot both be honoured (the optimizer takes one list of groups)."""
    setting = [name for name in names if hasattr(REGISTRY[name][1], "param_groups")]
    if len(setting) > 1:
        raise UserError(
            f"mitigations: {setting[0]!r} and {setting[1]!r} both set the optimizer's parameter "
            f"groups (param_groups); use one of them"
        )


def upgrade_specs(specs: Any) -> Any:
    """Mitigation specs saved by an older version, respelled as today's configs read them (see
    `configlib.upgrade_keys`) and resolved in full, so that a spec that left a knob at its default equals one that
    spells it; specs that name no registered mitigation or do not resolve are left for validation to judge."""
    if not isinstance(specs, list):
        return specs
    return [_resolved(spec) if isinstance(spec, dict) and spec.get("name") in REGISTRY else spec for spec in specs]


def _resolved(spec: dict) -> dict:
    config_cls = REGISTRY[spec["name"]][0]
    fields = upgrade_keys(config_cls, {k: v for k, v in spec.items() if k != "name"})
    try:
        return {"name": spec["name"], **to_dict(from_dict(config_cls, fields))}
    except (HarnessError, ValueError, TypeError):
        return {"name": spec["name"], **fields}


def upgrade_axis(axis: str) -> str:
    """A sweep axis `NAME.KNOB` saved by an older version, with the knob's new dotted place if it moved."""
    name, _, knob_name = axis.partition(".")
    moved = getattr(REGISTRY[name][0], "moved_keys", {}) if name in REGISTRY else {}
    return f"{name}.{moved[knob_name]}" if knob_name in moved else axis


def build_mitigations(specs: list[dict]) -> list[Any]:
    """Instantiate the configured mitigations, in config order."""
    configs = [_config_of(spec, i) for i, spec in enumerate(specs)]
    _one_param_groups([name for name, _ in configs])
    return [REGISTRY[name][1](config) for name, config in configs]


def hook_results(mitigations: list[Any], hook: str, *args: Any) -> list[Any]:
    """Call `hook(*args)` on each mitigation that has it; return the results in order."""
    assert hook in HOOKS and hook not in CHAINED, hook
    return [getattr(m, hook)(*args) for m in mitigations if hasattr(m, hook)]


def chain(mitigations: list[Any], hook: str, value: Any, *args: Any) -> Any:
    """Pass `value` through `hook(value, *args)` of each mitigation that has it, in order; return the last output."""
    assert hook in CHAINED, hook
    for mitigation in mitigations:
        if hasattr(mitigation, hook):
            value = getattr(mitigation, hook)(value, *args)
    return value
