"""The words match the behaviour: what ``--help``, the environment and the shipped config
example say is what the parsers and the config loader do (helper-173's audit)."""

from __future__ import annotations

import argparse

import pytest

from demos.cli import build_parser, main, resolve_args
from edge_sdk.errors import ConfigError
from edge_sdk.tasks.base import HINT_BOUNDS


def coordinator_args(*flags: str, env: dict[str, str] | None = None) -> argparse.Namespace:
    argv = ["coordinator", "--state-dir", "s", *flags]
    return resolve_args(build_parser(argv), argv, env or {})


# ---------------------------------------------------------------------- ranges the help names


@pytest.mark.parametrize(("flag", "value", "words"), [
    ("--full-sync-every", "-3", "must be 0 (off) or a number of versions"),
    ("--epochs", "0", "must be at least 1"),
    ("--epochs", "101", "must be at most 100"),
    ("--epochs", "inf", "finite"),
    ("--lr", "0", "must be above 0"),
    ("--lr", "-0.1", "must be above 0"),
    ("--lr", "11", "must be at most 10"),
])
def test_coordinator_refuses_what_devices_would_clamp_or_ignore(flag: str, value: str, words: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``--epochs`` / ``--lr`` are hints every device clamps into HINT_BOUNDS: ``--lr 0`` (or -1)
    was accepted and made every device train with lr 0, learning nothing, without an error;
    ``--full-sync-every -3`` passed the parser and failed later, at the core's start (exit 1, retried)."""
    with pytest.raises(SystemExit) as exit_:
        main(["coordinator", "--state-dir", "s", flag, value])
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        coordinator_args(env={"EDGECI_" + flag[2:].upper().replace("-", "_"): value})


def test_coordinator_hint_bounds_are_the_devices() -> None:
    """The bounds in the help are the ones devices clamp to (one table, edge_sdk.tasks.base.HINT_BOUNDS)."""
    lo, hi = HINT_BOUNDS["epochs"]
    assert coordinator_args("--epochs", f"{lo:g}", "--lr", f"{HINT_BOUNDS['lr'][1]:g}").epochs == lo
    assert coordinator_args("--epochs", f"{hi:g}").epochs == hi
    sub = next(a for a in build_parser(["coordinator"])._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in sub.choices["coordinator"]._actions}
    assert f"{lo:g}-{hi:g}" in helps["epochs"] and f"at most {HINT_BOUNDS['lr'][1]:g}" in helps["lr"]
