"""Settings are frozen dataclasses; this turns them into plain dicts (JSON, checkpoints) and back,
applies ``path.to.field=value`` overrides given as text on the command line, and checks ranges.

A settings class checks its fields in ``__post_init__`` with ``check`` (``Range`` per field), which
raises ``SettingError`` naming the field; ``override``, ``from_dict`` and ``prefixed`` complete that
name to the dotted key of the enclosing settings (``evaluation.models``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import types
import typing
from typing import Any


class SettingError(ValueError):
    """A setting outside its allowed values; ``key`` is its dotted name."""

    def __init__(self, key: str, allowed: str, value):
        super().__init__(f"{key} must be {allowed}, got {value!r}")
        self.key, self.allowed, self.value = key, allowed, value


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric setting allows: finite, from ``low`` (excluded when ``open_low``) up to
    ``high`` (excluded when ``open_high``); integers only when ``integer``; None too when ``optional``."""

    low: float
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    integer: bool = False
    optional: bool = False

    def holds(self, value) -> bool:
        if value is None:
            return self.optional
        kind = numbers.Integral if self.integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.high is None:
            bound = f"{'>' if self.open_low else '>='} {self.low:g}"
        else:
            bound = f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        return f"{kind} {bound}{' or None' if self.optional else ''}"


COUNT = Range(1, integer=True)
OPTIONAL_COUNT = Range(1, integer=True, optional=True)
NON_NEGATIVE_INT = Range(0, integer=True)
POSITIVE = Range(0, open_low=True)
NON_NEGATIVE = Range(0)
MOMENTUM = Range(0, 1, open_high=True)


def check(settings, **allowed: Range) -> None:
    """Raise ``SettingError`` for the first named field of ``settings`` outside its ``Range``
    (a tuple field must be non-empty with every element inside)."""
    for name, values in allowed.items():
        value = getattr(settings, name)
        if isinstance(value, tuple):
            if not value or not all(values.holds(v) for v in value):
                raise SettingError(name, f"a non-empty list, each {values}", value)
        elif not values.holds(value):
            raise SettingError(name, str(values), value)


@contextlib.contextmanager
def prefixed(prefix: str):
    """Complete the key of a ``SettingError`` raised in the block with ``prefix`` (e.g. ``"cmi."``)."""
    try:
        yield
    except SettingError as exc:
        raise SettingError(prefix + exc.key, exc.allowed, exc.value) from None


def to_dict(settings) -> dict:
    """Nested plain dict of a settings dataclass (tuples become lists)."""
    return _plain(dataclasses.asdict(settings))


def from_dict(cls, values: dict, prefix: str = ""):
    """Rebuild dataclass ``cls`` from ``to_dict``'s output (nested dataclasses included).

    ``prefix`` is the dotted key of these settings inside enclosing ones, for messages.
    """
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or cls.__name__}: expected settings for {cls.__name__}, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown setting(s) {[prefix + name for name in unknown]} for {cls.__name__}; known: {sorted(names)}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"settings for {cls.__name__} lack {[prefix + name for name in missing]}")
    coerced = {name: _coerce(hints[name], value, prefix + name) for name, value in values.items()}
    with prefixed(prefix):
        return cls(**coerced)


def override(settings, path: str, value: Any):
    """A copy of ``settings`` with the field at dotted ``path`` set to ``value`` (text is parsed by the field's type)."""
    return override_all(settings, [(path, value)])


def override_all(settings, changes):
    """A copy of ``settings`` with each (dotted path, value) of ``changes`` set (text is parsed by the field's type).

    The result is checked once all changes are in, so a change may rely on one listed after it; a
    later change of the same path wins.
    """
    tree: dict = {}
    for path, value in changes:
        _insert(settings, tree, path, path.split("."), value)
    return _rebuild(settings, tree, "")


@dataclasses.dataclass(frozen=True)
class _Value:
    """A value to set, as given (a branch of the change tree is a dict)."""

    value: Any


def _insert(settings, tree: dict, path: str, parts: list[str], value) -> None:
    head, rest = parts[0], parts[1:]
    fields = {f.name for f in dataclasses.fields(settings)}
    if head not in fields:
        raise ValueError(f"unknown setting {path!r}: {type(settings).__name__} has {sorted(fields)}")
    current = getattr(settings, head)
    if not rest:
        if isinstance(tree.get(head), dict):
            raise ValueError(f"cannot set {path!r} together with settings inside it")
        if dataclasses.is_dataclass(current) and isinstance(value, str) and value.lower() != "none":
            raise ValueError(f"cannot set {path!r} to {value!r}: it is a group of settings; set its fields ({path}.<name>=...)")
        tree[head] = _Value(value)
        return
    if current is None or not dataclasses.is_dataclass(current):
        raise ValueError(f"cannot set {path!r}: {head} is {current!r}, not a group of settings")
    branch = tree.setdefault(head, {})
    if not isinstance(branch, dict):
        raise ValueError(f"cannot set {path!r} together with {head} itself")
    _insert(current, branch, path, rest, value)


def _rebuild(settings, tree: dict, prefix: str):
    hints = typing.get_type_hints(type(settings))
    values = {}
    for name, change in tree.items():
        if isinstance(change, dict):
            values[name] = _rebuild(getattr(settings, name), change, f"{prefix}{name}.")
        else:
            values[name] = _coerce(hints[name], change.value, prefix + name)
    with prefixed(prefix):
        return dataclasses.replace(settings, **values)


def differences(old, new, prefix: str = ""):
    """(dotted key, old value, new value) for every leaf where nested dicts ``old`` and ``new`` differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from differences(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip("."), old, new


def describe_differences(old: dict, new: dict) -> str:
    """``differences`` as text: ``key: old -> new; ...``."""
    return "; ".join(f"{k}: {v!r} -> {w!r}" for k, v, w in differences(old, new))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(hint, value, name: str):
    """``value`` (as given, or text) converted to type ``hint``; a clear error naming ``name`` if it cannot be."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if type(None) in args:
                return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(options[0], value, name)
        errors = []
        for option in options:
            try:
                return _coerce(option, value, name)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(f"{name}: cannot read {value!r} as {hint}: {'; '.join(errors)}")
    if origin is tuple:
        if not isinstance(value, (str, list, tuple)):
            raise ValueError(f"{name}: expected a comma separated list, got {value!r}")
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        return tuple(_coerce(args[0], item, name) for item in items)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return from_dict(hint, value, f"{name}.")
        raise ValueError(f"{name}: expected settings for {hint.__name__}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if hint in (int, float, str):
        try:
            converted = hint(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and converted != value:
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return converted
    if hint is Any or hint is dict or origin is dict:
        return value
    raise TypeError(f"{name}: unsupported setting type {hint}")
