"""From YAML to typed config dataclasses: dotted overrides, then a typed build that names every bad key.

`components/config.py` declares the sections and their rules; this module only knows how a
mapping read from YAML becomes an instance of a (nested) dataclass. Problems are appended to
an `errors` list, each starting with its dotted key, so the caller reports all of them at once.
"""
from __future__ import annotations

import dataclasses
import types
import typing

import yaml


def apply_override(raw: dict, item: str, errors: list[str]) -> None:
    """Set `section.key=value` (the value parsed as a YAML scalar or list) in the mapping read from the file."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        errors.append(f"override {item!r}: expected key=value, for example pretrain.max_steps=50")
        return
    node = raw
    *parents, leaf = key.strip().split(".")
    for part in parents:
        if node.get(part) is None:  # absent, or left empty in the YAML (`data:`): the override fills it
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            errors.append(f"override {item!r}: {part} is not a section")
            return
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[leaf] = value


def build(cls, raw, prefix: str, errors: list[str]):
    """An instance of the dataclass `cls` from `raw`, its fields' defaults filling what `raw` leaves out.

    Unknown keys and values of the wrong type go to `errors` (named `prefix` + key); the instance
    is built from the rest, so the caller can still check its values. None when `raw` is no mapping.
    """
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or 'experiment'}: expected a mapping, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            errors.append(f"{prefix}{key}: unknown key (known keys here: {known})")
    kwargs = {}
    for name in fields:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            built = build(hint, raw[name] if raw[name] is not None else {}, f"{prefix}{name}.", errors)
            if built is not None:
                kwargs[name] = built
            continue
        value, problem = _coerce(raw[name], hint)
        if problem:
            errors.append(f"{prefix}{name}: {problem}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _coerce(value, hint):
    """Return (value, None) when `value` fits the annotation `hint`, else (None, problem)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None, None
        for option in options:
            if option is type(None):
                continue
            coerced, problem = _coerce(value, option)
            if problem is None:
                return coerced, None
        return None, f"expected {_type_name(hint)}, got {value!r}"
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            return None, f"expected a list of {item_type.__name__}, got {value!r}"
        out = []
        for v in value:
            coerced, problem = _coerce(v, item_type)
            if problem:
                return None, f"list item {v!r}: {problem}"
            out.append(coerced)
        return out, None
    # bool is a subclass of int: refuse `max_steps: true` and `use_gpu: 1` alike.
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (None, f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        return None, f"expected an integer, got {value!r}"
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        if isinstance(value, str):  # YAML reads `3e-4` (no dot) as a string
            try:
                return float(value), None
            except ValueError:
                pass
        return None, f"expected a number, got {value!r}"
    if hint is str:
        return (value, None) if isinstance(value, str) else (None, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {hint!r}")  # a bug in components/config.py, not user input


def _type_name(hint) -> str:
    return " or ".join("null" if a is type(None) else a.__name__ for a in typing.get_args(hint))
