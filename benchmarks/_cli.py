"""Argument types shared by the benchmarks: every number is checked when the command line is
parsed, so a value out of range is one argparse line naming its flag (exit 2), not a
traceback from deep inside a measurement or a table of ``nan``.

The numbers use :func:`coordinator.config.bounded`, the daemons' and CLIs' type; this adds
what the benchmarks need beside it: finite floats, comma-separated lists, a git revision
(and the baseline worktree checked out from it).
Light on purpose (no numpy, no torch): the scripts that import torch parse their flags
before importing it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, TypeVar

from coordinator.config import bounded

T = TypeVar("T")

positive_int = bounded(int, 1)
"""An int ≥ 1: counts of repetitions, devices, rounds, samples."""
non_negative_int = bounded(int, 0)
"""An int ≥ 0 (seeds)."""


positive_float = bounded(float, 0, strict=True, finite=True)
"""A finite float > 0: durations, rates, sizes."""
non_negative_float = bounded(float, 0, finite=True)
"""A finite float ≥ 0 (a warm-up that may be skipped)."""


def usage_error(message: str) -> NoReturn:
    """A flag's value that only the data can refute (a pool smaller than ``--samples``): a
    ``prog: error: …`` line and exit status 2 like argparse's own refusals (without its usage
    line), after the data is loaded."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "benchmark"
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def one_of(*names: str) -> Callable[[str], str]:
    """A name from ``names`` (for the items of :func:`comma_list`; a single flag has ``choices``)."""

    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(names)}, got {text!r}")
        return text

    return parse


def comma_list(item: Callable[[str], T]) -> Callable[[str], list[T]]:
    """A non-empty comma-separated list, each item parsed (and range-checked) by ``item``."""

    def parse(text: str) -> list[T]:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list without empty items, got {text!r}")
        return [item(part) for part in parts]  # (each item's error names its text)

    return parse


def git_commit(root: Path) -> Callable[[str], str]:
    """A revision that names a commit of the repository at ``root`` (its full hash)."""

    def parse(text: str) -> str:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "--quiet", f"{text}^{{commit}}"],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a commit of the repository at {root}")
        return out.stdout.strip()

    return parse


def existing_dir(text: str) -> Path:
    """A directory that exists (a place to put temporary state under)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing directory")
    return path


@contextmanager
def baseline_tree(root: Path, commit: str) -> Iterator[Path]:
    """``commit`` of the repository at ``root`` checked out (``git worktree add``) in a
    temporary folder named ``baseline``, removed afterwards. A failure is one line with git's
    own message (SystemExit), not a CalledProcessError that hides it."""
    with tempfile.TemporaryDirectory(prefix="edgeci-baseline-") as tmp:
        tree = Path(tmp) / "baseline"
        out = subprocess.run(["git", "-C", str(root), "worktree", "add", "-f", "--detach", str(tree), commit],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"git worktree add of the baseline {commit} failed: {out.stderr.strip()}")
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], capture_output=True,
                           check=False)
