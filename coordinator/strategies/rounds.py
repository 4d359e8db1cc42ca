"""Reading a selection round back (:meth:`Strategy.round_checkpoint`): the checks every
selecting strategy makes on what a commit or a round record holds.

The state is the coordinator's own file, but a damaged one must not stop a start nor put
garbage into a round: each reader returns None for a value that is not what it should be,
and the strategy counts that part as refused (``restore_refused``) and leaves it as it was."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from coordinator.strategies.draws import Draws

__all__ = ["count", "counted", "device_list", "device_times", "moment", "round_and_draws", "rows"]


def count(value: object) -> int | None:
    """A non-negative int (not a bool)."""
    return value if type(value) is int and value >= 0 else None


def moment(value: object) -> float | None:
    """A finite time (int or float, not a bool)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def device_list(value: object) -> list[str] | None:
    """A list of device ids (strings)."""
    if isinstance(value, list) and all(isinstance(d, str) for d in value):
        return list(value)
    return None


def device_times(value: object) -> dict[str, float] | None:
    """Device id -> finite time, as ``[[device, time], ...]`` (JSON keeps a list's order: the
    strategies iterate such tables in insertion order)."""
    if not isinstance(value, list):
        return None
    out: dict[str, float] = {}
    for row in value:
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str)):
            return None
        t = moment(row[1])
        if t is None:
            return None
        out[row[0]] = t
    return out


def rows(table: Mapping[str, Any]) -> list[list[Any]]:
    """:func:`device_times`'s form of a table (insertion order kept)."""
    return [[d, v] for d, v in table.items()]


def counted(rounds: int, draws: Draws) -> dict[str, Any]:
    """The rounds counted and the draws' generator (none before the first draw), as
    :func:`round_and_draws` reads them back."""
    state = draws.checkpoint()
    return {"round": rounds, **({"draws": state} if state is not None else {})}


def round_and_draws(state: Mapping[str, Any], rounds: int, draws: Draws) -> tuple[int, int]:
    """The rounds counted (``rounds`` kept where the state's is not a count; 0 where it has none)
    with the draws' generator restored into ``draws``; and how many of the two were refused."""
    counted, refused = count(state.get("round", 0)), 0
    if counted is None:
        counted, refused = rounds, 1
    if "draws" in state and not draws.restore(state["draws"]):
        refused += 1  # (drawn from the core's generator, as before)
    return counted, refused
