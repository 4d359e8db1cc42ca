"""Check parameters against a config dataclass's fields before the dataclass is built.

Strategy and peering parameters arrive by name from ``--param``, a TOML ``[strategy]`` table or
SIGHUP. The dataclasses validate ranges in ``__post_init__`` but not types, so ``k = "ten"``
failed there with Python's own comparison error and ``k = 2.5`` ran. :func:`check_params`
is the one place that checks each value against its field's annotation (int, float, bool,
str, ``X | None``, ``Literal[...]``, ``tuple[X, ...]``) and each name against the fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NoReturn, Union

from edge_sdk.errors import ConfigError

__all__ = ["check_params", "owned"]

_NO = object()
"""The value does not fit the type (``None`` is a value)."""

MAX_MAGNITUDE = 10**9
MIN_MAGNITUDE = 1e-9
"""Numbers a parameter may hold: |x| <= 1e9, and a float 0 or at least 1e-9 in size. Past
these, sizes overflowed or allocated without end (``population = 10**20``, ``planets =
2**63 - 1``, ``t_c = 1e-320``, ``alpha = 1e308``) out of ``handle``; each config still checks
its own range."""


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``known`` to a misspelled ``word``, else ``""``."""
    close = difflib.get_close_matches(word, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_params(owner: str, config: type, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` converted to the field types of ``config`` (an int for a float field becomes a
    float; a list for a tuple field a tuple); a ConfigError names ``owner`` (e.g. ``strategy
    'spin'``), the key, the expected type and the value, or lists the known keys."""
    fields = {f.name: f for f in dataclasses.fields(config) if f.init}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ConfigError(f"{owner}: unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
                          f"{did_you_mean(unknown[0], fields) if len(unknown) == 1 else ''}; "
                          f"known parameters: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(config)
    out: dict[str, Any] = {}
    for key, value in params.items():
        hint = hints.get(key, Any)
        converted = _fit(value, hint)
        if converted is _NO and _out_of_range(value):
            raise ConfigError(f"{owner}: parameter {key} = {value!r} is out of range: parameters hold numbers up to 1e9 "
                              f"in size, and a non-zero float at least 1e-9")
        if converted is _NO:
            raise ConfigError(f"{owner}: parameter {key} expects {_describe(hint)}, got {value!r}")
        out[key] = converted
    return out


def _fit(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint``, or ``_NO``."""
    origin = typing.get_origin(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return value
    if hint is type(None) or hint is None:
        return None if value is None else _NO
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in typing.get_args(hint):
            return None  # an optional field: none is None (before a str arm could take it as the word)
        for arm in typing.get_args(hint):
            got = _fit(value, arm)
            if got is not _NO:
                return got
        return _NO
    if value is None and (hint is str or (origin is Literal and "none" in typing.get_args(hint))):
        return "none"  # `--param staleness=none` parses as None (no TOML null exists): here it is the word
    if origin is Literal:
        return value if any(value == c and type(value) is type(c) for c in typing.get_args(hint)) else _NO
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return _NO
        args = typing.get_args(hint)
        arms = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(arms) != len(value):
            return _NO
        items = [_fit(v, a) for v, a in zip(value, arms, strict=True)]
        return _NO if any(i is _NO for i in items) else tuple(items)
    if hint is bool:
        return value if isinstance(value, bool) else _NO
    if isinstance(value, bool):
        return _NO  # True is an int to Python, not to an operator
    if hint is int:
        return int(value) if isinstance(value, numbers.Integral) and not _out_of_range(value) else _NO
    if hint is float:
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)) or _out_of_range(value):
            return _NO
        return float(value)
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _NO
    return value  # an annotation this checker does not know: the dataclass decides


def _out_of_range(value: Any) -> bool:
    """A finite number outside the magnitudes any parameter may hold."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    if isinstance(value, numbers.Integral):
        return abs(int(value)) > MAX_MAGNITUDE
    x = float(value)
    return math.isfinite(x) and x != 0.0 and not MIN_MAGNITUDE <= abs(x) <= MAX_MAGNITUDE


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        none = len(arms) < len(typing.get_args(hint))
        return " or ".join(_describe(a) for a in arms) + (" or none" if none else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        hint, f"a {getattr(hint, '__name__', hint)}")


def owned(exc: ConfigError, kind: str, name: str) -> NoReturn:
    """Raise ``exc`` with "kind 'name': " in front of its message, or as it is when it names
    its owner already (a config's range check does not know which strategy holds it)."""
    text = str(exc)
    if text.startswith((f"{kind} {name!r}", f"{name}:")):
        raise exc
    raise type(exc)(f"{kind} {name!r}: {text}") from exc
