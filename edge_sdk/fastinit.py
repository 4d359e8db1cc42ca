"""A cheaper ``__init__`` for the frozen, slotted dataclasses built on every message and event.

A frozen dataclass's generated ``__init__`` sets each field with
``object.__setattr__(self, name, value)`` (a global look-up, an attribute look-up and the
generic attribute machinery per field). :func:`fast_init` replaces it, on a frozen
``slots=True`` dataclass, by one that calls each slot's member descriptor directly: the
same signature (positional and keyword-only fields, defaults, default factories), the same
order of assignments and the same ``__post_init__`` call, so the same objects and the same
errors. Any other shape of class (not frozen, no slots, ``InitVar`` or ``init=False``
fields) is returned unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["fast_init"]

C = TypeVar("C", bound=type)

_MISSING: Any = getattr(dataclasses, "_HAS_DEFAULT_FACTORY", object())
"""The default of a field with a default factory (the dataclasses sentinel: the same signature)."""


def _slot(cls: type, name: str) -> Any:
    for klass in cls.__mro__:
        if name in klass.__dict__:
            found = klass.__dict__[name]
            return found if type(found).__name__ == "member_descriptor" else None
    return None


def fast_init(cls: C) -> C:
    """Give the frozen slotted dataclass ``cls`` a descriptor-setting ``__init__`` (see the module docstring)."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__ or "__init__" not in cls.__dict__:
        return cls
    every = list(getattr(cls, "__dataclass_fields__", {}).values())
    fields = dataclasses.fields(cls)
    kinds = {getattr(f, "_field_type", None) for f in every}
    if any(k is not None and k.name not in ("_FIELD", "_FIELD_CLASSVAR") for k in kinds) or any(not f.init for f in fields):
        return cls  # InitVar or init=False fields: keep the generated one
    namespace: dict[str, Any] = {"_MISSING": _MISSING}
    positional: list[str] = []
    keyword: list[str] = []
    body: list[str] = []
    for i, f in enumerate(fields):
        setter = _slot(cls, f.name)
        if setter is None or not f.name.isidentifier() or f.name.startswith("_") or f.name == "self":
            return cls
        namespace[f"_set{i}"] = setter.__set__
        value = f.name
        if f.default is not dataclasses.MISSING:
            namespace[f"_default{i}"] = f.default
            arg = f"{f.name}=_default{i}"
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_factory{i}"] = f.default_factory
            arg = f"{f.name}=_MISSING"
            value = f"_factory{i}() if {f.name} is _MISSING else {f.name}"
        else:
            arg = f.name
        (keyword if f.kw_only else positional).append(arg)
        body.append(f"    _set{i}(self, {value})")
    if hasattr(cls, "__post_init__"):
        body.append("    self.__post_init__()")
    args = ["self", *positional, *(["*", *keyword] if keyword else [])]
    source = f"def __init__({', '.join(args)}):\n" + ("\n".join(body) or "    pass") + "\n"
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    generated = cls.__dict__["__init__"]
    init.__doc__ = generated.__doc__
    init.__annotations__ = dict(getattr(generated, "__annotations__", {}))
    type.__setattr__(cls, "__init__", init)
    return cls
