"""The older edgeci that :mod:`tests.test_sdk_compat` runs against today's code.

``python -m tests.compat.snapshot COMMIT`` writes ``tests/compat/edgeci-<COMMIT>.tar.gz``: the
``edge_sdk`` and ``coordinator`` packages at that commit (``git archive``, so the bytes depend
only on the commit). The tests read the tarball, not git, so they run on a checkout without history."""

from __future__ import annotations

import argparse
import subprocess
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OLDEST_V3 = "52cbc97"
"""The first commit that speaks wire protocol v3 (2026-12-03, "Signatures bind the topic's scope"):
the oldest SDK today's coordinator has to serve (an older one is refused with UnsupportedProtocol)."""


def tarball(commit: str = OLDEST_V3) -> Path:
    return HERE / f"edgeci-{commit}.tar.gz"


def extract(into: Path, commit: str = OLDEST_V3) -> Path:
    """Unpack the snapshot into ``into`` (the directory to put on ``PYTHONPATH``)."""
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball(commit)) as tar:
        tar.extractall(into)  # our own git archive (3.11.2 has no extraction filter)
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("commit", nargs="?", default=OLDEST_V3, help=f"the commit to snapshot (default {OLDEST_V3})")
    args = ap.parse_args()
    out = tarball(args.commit)
    data = subprocess.run(["git", "archive", "--format=tar.gz", args.commit, "edge_sdk", "coordinator"],
                          cwd=HERE.parent.parent, check=True, capture_output=True).stdout
    out.write_bytes(data)
    print(f"{out} ({len(data):,} bytes)")


if __name__ == "__main__":
    main()
