"""Rules declared on dataclass fields, and the one checker that applies them.

A config field states its own constraints beside its default and docstring:

    batch_size: int = checked(16, positive)

`check_fields` walks a (nested) dataclass instance and reports every problem at
once, each as `<dotted key>: <problem>` (`pretrain.batch_size: must be positive, got 0`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

Rule = Callable[[Any], list[str]]
"""Checks one field's value: the problems it finds, each completing "<dotted key>: ..."."""
_RULES = "rules"  # the key of a field's metadata that holds its rules


def checked(default, *rules: Rule):
    """A dataclass field with `default` whose value must pass `rules` (a list default is copied per instance)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={_RULES: rules})
    return dataclasses.field(default=default, metadata={_RULES: rules})


def new_default(section: type, name: str, default):
    """The field `name` of dataclass `section` with another default: a subclass that changes it keeps its rules."""
    (base,) = [f for f in dataclasses.fields(section) if f.name == name]
    return checked(default, *rules_of(base))


def rules_of(f: dataclasses.Field) -> tuple[Rule, ...]:
    """The rules declared on a field (none for a field declared without `checked`)."""
    return f.metadata.get(_RULES, ())


def must_be(ok: Callable[[Any], bool], what: str) -> Rule:
    """The rule that `ok(value)` holds; otherwise the problem reads `<what>, got <value>`."""
    return lambda value: [] if ok(value) else [f"{what}, got {value}"]


def reported_by(problem: Callable[[Any], str | None]) -> Rule:
    """The rule of a function that says what is wrong with a value, or returns None when nothing is."""
    return lambda value: [p] if (p := problem(value)) else []


def one_of(*allowed) -> Rule:
    """The value is one of `allowed`; a single function instead returns them when the check runs
    (lists owned by modules that import torch, which defining a config should not)."""
    def rule(value):
        options = allowed[0]() if len(allowed) == 1 and callable(allowed[0]) else allowed
        return [] if value in options else [f"{value!r} is not one of {', '.join(options)}"]
    return rule


def each(rule: Rule) -> Rule:
    """`rule` applied to every item of a list."""
    return lambda items: [p for item in items for p in rule(item)]


positive = must_be(lambda v: v > 0, "must be positive")
non_negative = must_be(lambda v: v >= 0, "must not be negative")
at_least_1 = must_be(lambda v: v >= 1, "must be at least 1")
fraction = must_be(lambda v: 0 < v < 1, "must be between 0 and 1 (exclusive)")


def _text_problem(value: str) -> str | None:
    if not value.strip():
        return f"must not be empty, got {value!r}"
    if "\0" in value:
        return "must not contain a NUL character"
    return None


required_text = reported_by(_text_problem)
"""For a path, a host, a field name: an empty one would mean "the current folder" or "every interface"."""


def digits(value: int) -> int:
    """The decimal digits of `value`, even past the 4300 that Python refuses to print."""
    try:
        return len(str(abs(value)))
    except ValueError:
        return int(abs(value).bit_length() * 0.30103) + 1


_INT64 = 1 << 63  # what an integer setting may reach: torch, numpy, Ray and MLflow hold it in 64 bits


def check_fields(section, prefix: str = "") -> list[str]:
    """Every field's rules, through all nested dataclasses. A float must first be finite (YAML reads
    .nan and .inf), an integer must fit in 64 bits, and None (an optional field left unset) passes."""
    errors = []
    for f in dataclasses.fields(section):
        key, value = prefix + f.name, getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            errors.extend(check_fields(value, f"{key}."))
        elif isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{key}: must be a finite number, got {value}")
        elif isinstance(value, int) and not -_INT64 <= value < _INT64:
            errors.append(f"{key}: an integer of {digits(value)} digits does not fit in 64 bits")
        elif value is not None:
            errors.extend(f"{key}: {problem}" for rule in rules_of(f) for problem in rule(value))
    return errors
