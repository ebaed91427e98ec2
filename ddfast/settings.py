"""Settings are frozen dataclasses; this turns them into plain dicts (JSON, checkpoints) and back,
and applies ``path.to.field=value`` overrides given as text on the command line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def to_dict(settings) -> dict:
    """Nested plain dict of a settings dataclass (tuples become lists)."""
    return _plain(dataclasses.asdict(settings))


def from_dict(cls, values: dict):
    """Rebuild dataclass ``cls`` from ``to_dict``'s output (nested dataclasses included)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    return cls(**{name: _coerce(hints[name], value, name) for name, value in values.items()})


def override(settings, path: str, value: Any):
    """A copy of ``settings`` with the field at dotted ``path`` set to ``value`` (text is parsed by the field's type)."""
    head, _, rest = path.partition(".")
    fields = {f.name for f in dataclasses.fields(settings)}
    if head not in fields:
        raise ValueError(f"unknown setting {path!r}: {type(settings).__name__} has {sorted(fields)}")
    current = getattr(settings, head)
    if rest:
        if current is None or not dataclasses.is_dataclass(current):
            raise ValueError(f"cannot set {path!r}: {head} is {current!r}, not a group of settings")
        return dataclasses.replace(settings, **{head: override(current, rest, value)})
    hint = typing.get_type_hints(type(settings))[head]
    return dataclasses.replace(settings, **{head: _coerce(hint, value, path)})


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
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, name)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(f"{name}: cannot read {value!r} as {hint}: {'; '.join(errors)}")
    if origin is tuple:
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        return tuple(_coerce(args[0], item, name) for item in items)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return from_dict(hint, value)
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
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and converted != value:
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return converted
    if hint is Any or hint is dict or origin is dict:
        return value
    raise TypeError(f"{name}: unsupported setting type {hint}")
