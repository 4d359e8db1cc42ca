"""edge_sdk.fastinit: the replaced ``__init__`` builds the same objects and raises the same errors."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import InitVar, dataclass, field
from typing import Any, ClassVar

import pytest

from edge_sdk.core.events import MessageReceived, Notify, Publish, ScheduleTimer
from edge_sdk.errors import LocalProtocolError
from edge_sdk.fastinit import fast_init
from edge_sdk.wire.messages import Ack, Pull, Update


def _pair() -> tuple[type, type]:
    def make() -> type:
        @dataclass(frozen=True, slots=True)
        class Thing:
            KIND: ClassVar[str] = "thing"
            a: int
            b: str = "b"
            c: list[int] = field(default_factory=list)
            d: float = field(default=1.5, kw_only=True)
            e: dict[str, Any] = field(default_factory=dict, kw_only=True)

            def __post_init__(self) -> None:
                if self.a < 0:
                    raise ValueError(f"a must be >= 0, got {self.a}")

        return Thing

    return make(), fast_init(make())


def test_same_signature_values_defaults_and_errors() -> None:
    plain, fast = _pair()
    assert fast.__init__ is not plain.__init__ and fast.__init__.__qualname__ == plain.__init__.__qualname__
    assert str(inspect.signature(fast)) == str(inspect.signature(plain))
    for args, kwargs in [((1,), {}), ((2, "x", [3]), {"d": 2.0, "e": {"k": 1}}), ((3,), {"c": [1], "b": "y"})]:
        p, f = plain(*args, **kwargs), fast(*args, **kwargs)
        assert dataclasses.astuple(p) == dataclasses.astuple(f) and repr(p) == repr(f)
    assert fast(1).c is not fast(1).c and fast(1).e is not fast(1).e  # a fresh default per object
    for args, kwargs in [((-1,), {}), ((), {}), ((1, "b", [], 2.0), {}), ((1,), {"z": 1})]:
        errors = []
        for cls in (plain, fast):
            with pytest.raises((TypeError, ValueError)) as info:
                cls(*args, **kwargs)
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast(1).a = 2  # type: ignore[misc]


def test_other_shapes_are_left_alone() -> None:
    @dataclass(slots=True)
    class Mutable:
        a: int

    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(frozen=True, slots=True)
    class WithInitVar:
        a: int
        scale: InitVar[int] = 1

        def __post_init__(self, scale: int) -> None:
            object.__setattr__(self, "a", self.a * scale)

    @dataclass(frozen=True, slots=True)
    class NotInit:
        a: int
        b: int = field(default=0, init=False)

    for cls in (Mutable, NoSlots, WithInitVar, NotInit):
        before = cls.__init__
        assert fast_init(cls) is cls and cls.__init__ is before
    assert WithInitVar(2, 3).a == 6


def test_the_hot_classes_use_it_and_still_validate() -> None:
    for cls in (MessageReceived, Publish, ScheduleTimer, Notify, Pull, Update, Ack):
        assert cls.__init__.__qualname__ == f"{cls.__name__}.__init__"
        assert cls.__init__.__code__.co_filename == "<string>"
    with pytest.raises(LocalProtocolError):
        MessageReceived(now=float("nan"), topic="t", payload=b"")
    with pytest.raises(LocalProtocolError):
        Publish(topic="t", payload=b"", qos=3)
    assert Notify(kind="k").data == {} and Notify(kind="k").data is not Notify(kind="k").data
