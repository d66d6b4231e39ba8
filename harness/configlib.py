"""Dataclass configs from YAML with `key=value` overrides, strict types and "did you mean" errors.

Every config in the project is a dataclass whose fields carry a `help` string in their metadata. This
module turns nested dicts (from YAML) into those dataclasses, checks each value against the field's type,
and reports problems as one-line `UserError`s naming the dotted field path, e.g.
`demo.yaml: train.lr: expected a number, got 'fast'`. Semantic checks (ranges, choices) live in each
dataclass's `__post_init__` and raise `ValueError`; they are reported with the same path prefix.

A mapping given for a nested dataclass field changes only the keys it names; the others keep that field's
default (which may differ from the nested class's own defaults). A dataclass lists keys it no longer has in
a `moved_keys` class attribute (old key -> new dotted key), and the scalar an older spelling gave where it
now takes a mapping in `scalar_key`: both are refused with the new spelling in the message, as are the keys in
`replaced_keys` (old key -> what to write instead: a key whose values changed too).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from forgetting.harness.errors import UserError


def knob(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with its help text (shown by `forgetting config` and in errors)."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    if dataclasses.is_dataclass(default):  # a nested config: each instance gets its own copy
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _spelled(dotted: str, value: Any) -> str:
    """`a.b` and 3 as the YAML `a: {b: 3}`, for messages that show a new spelling."""
    parts = dotted.split(".")
    text = f"{parts[-1]}: {value if isinstance(value, str) else json.dumps(value)}"  # JSON is YAML flow style
    for part in reversed(parts[:-1]):
        text = f"{part}: {{{text}}}"
    return text


# scalar type -> (Python types accepted, how an error names it); a bool is accepted only where a bool is asked
SCALARS = {
    bool: (bool, "true or false"),
    int: (int, "an integer"),
    float: ((int, float), "a number"),
    str: (str, "a string"),
}


def _convert(tp: Any, value: Any, path: str, default: Any = None) -> Any:
    """Check `value` against type `tp`; return it converted (ints accepted where floats are).

    `default`: the field's default, which a mapping for a nested dataclass changes key by key.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, default)
            except UserError as err:
                errors.append(err)
        raise UserError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            key, leaf = getattr(tp, "scalar_key", None), path.rsplit(".", 1)[-1]
            hint = f"; write {_spelled(f'{leaf}.{key}', value)}" if key and value is not None else ""
            raise UserError(f"{path}: expected a mapping, got {value!r}{hint}")
        return from_dict(tp, value, path, default if isinstance(default, tp) else None)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{path}: expected one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{path}: expected a list, got {value!r}")
        (item_tp,) = args or (Any,)
        return [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp not in SCALARS:
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    accepts, expected = SCALARS[tp]
    if isinstance(value, bool) is not (tp is bool) or not isinstance(value, accepts):
        raise UserError(f"{path}: expected {expected}, got {value!r}")
    return float(value) if tp is float else value


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def from_dict(cls: type, data: dict, path: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys (with a suggestion) and wrong types.

    Keys `data` leaves out take their values from `base` (an instance of `cls`) when given, else the defaults.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = list(fields)
    moved = getattr(cls, "moved_keys", {})
    kwargs = {} if base is None else {name: getattr(base, name) for name in names}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        refusal = getattr(cls, "refused_values", {}).get((key, value if isinstance(value, str) else None))
        if refusal:
            raise UserError(f"{where}: {value} is not supported; {refusal}")
        if key not in names:
            if key in moved:
                raise UserError(f"{where}: moved to {moved[key]}; write {_spelled(moved[key], value)}")
            if key in getattr(cls, "replaced_keys", {}):
                raise UserError(f"{where}: replaced; write {cls.replaced_keys[key]}")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise UserError(f"{where}: unknown key{hint}")
        default = None
        if any(map(dataclasses.is_dataclass, (hints[key], *typing.get_args(hints[key])))):  # a nested config
            default = getattr(base, key) if base is not None else _field_default(fields[key])
        kwargs[key] = _convert(hints[key], value, where, default)
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise UserError(f"{path + ': ' if path else ''}{err}") from None


def to_dict(obj: Any) -> Any:
    """The plain-dict form of a (nested) config dataclass, suitable for YAML/JSON."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value` (value read as a YAML scalar/list) into (["a","b","c"], value)."""
    if "=" not in text:
        raise UserError(f"override {text!r}: expected key=value, e.g. train.lr=1e-5")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "1e-5" as a string
    return key.split("."), _fix_yaml_floats(value)


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in {"nan", "inf", "-inf", "+inf", "infinity", "-infinity"}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of nested dict `data` with each `key=value` override applied."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        set_key(data, keys, value, f"override {text!r}")
    return data


def upgrade_keys(cls: type, data: dict) -> dict:
    """`data` for `cls` with an older spelling rewritten to today's: a scalar given where a nested config with a
    `scalar_key` is now asked becomes `{scalar_key: value}`, and keys in `cls.moved_keys` move to their dotted
    place. For configs saved by an older version (a run directory must still resume and report); a config a user
    writes is not upgraded: `from_dict` refuses the old spelling with the new one in the message."""
    data = copy.deepcopy(data)
    hints = typing.get_type_hints(cls)
    for key, value in list(data.items()):
        scalar_key = getattr(hints.get(key), "scalar_key", None)
        if scalar_key and value is not None and not isinstance(value, dict):
            data[key] = {scalar_key: value}
    for old, new in getattr(cls, "moved_keys", {}).items():
        if old in data and isinstance(data.get(new.split(".")[0], {}), dict):
            set_key(data, new.split("."), data.pop(old), old)
    return data


def set_key(data: dict, keys: list[str], value: Any, where: str) -> None:
    """data[k1][k2]...[kn] = value, creating mappings on the way (unknown keys are caught by `from_dict`)."""
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"{where}: {key} is not a mapping")
    node[keys[-1]] = value


def _fix_yaml_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and _looks_like_float(node) and any(c in node for c in "eE"):
        return float(node)
    return node


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; errors name the file (and line, for syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not valid UTF-8 (byte {err.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise UserError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return _fix_yaml_floats(data)


def load_config(cls: type, path: str | Path | None, overrides: list[str] = ()) -> Any:
    """Load dataclass `cls` from a YAML file (or defaults when `path` is None) plus overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    try:
        return from_dict(cls, data)
    except UserError as err:
        raise UserError(f"{path}: {err}" if path is not None else str(err)) from None


def describe(cls: type, prefix: str = "", base: Any = None) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every knob of `cls`, for docs and `forgetting config`.

    A nested dataclass's knobs show the defaults of the field that holds it (`base`: that field's default).
    """
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if base is not None:
            default = getattr(base, f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            default = "(required)"
        else:
            default = _field_default(f)
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], name + ".", default if isinstance(default, hints[f.name]) else None))
            continue
        rows.append((name, repr(default), f.metadata.get("help", "")))
    return rows


def first_difference(old, new, path: str = "") -> str:
    """`path: old in the run, new now` for the first place two resolved configs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return first_difference(a, b, f"{path}[{i}]")

    def short(value) -> str:
        text = repr(value)
        return text if len(text) < 60 else text[:57] + "..."

    return f"{path}: {short(old)} in the run, {short(new)} now"
