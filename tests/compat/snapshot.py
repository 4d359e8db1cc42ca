"""The older edgeci that :mod:`tests.test_sdk_compat` runs against today's code.

``python -m tests.compat.snapshot COMMIT`` writes ``tests/compat/edgeci-<COMMIT>.tar.gz``: the
packages :data:`SNAPSHOTS` names at that commit (``git archive``, so the bytes depend only on the
commit). The tests read the tarball, not git, so they run on a checkout without history."""

from __future__ import annotations

import argparse
import subprocess
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OLDEST_V3 = "52cbc97"
"""The first commit that speaks wire protocol v3 (2026-12-03, "Signatures bind the topic's scope"):
the oldest SDK today's coordinator has to serve (an older one is refused with UnsupportedProtocol)."""


BEFORE_SPREAD = "d29bf9e"
"""The last commit before ``Recall.spread_s`` (2026-12-07): its devices already fetch announced
releases, so a recall carrying the field they do not know must still verify and be taken."""

SNAPSHOTS: dict[str, tuple[str, ...]] = {OLDEST_V3: ("edge_sdk", "coordinator"), BEFORE_SPREAD: ("edge_sdk",)}
"""Each snapshot and what it holds (the oldest also runs as a coordinator)."""


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
    ap.add_argument("commit", choices=sorted(SNAPSHOTS), help="the snapshot to write again")
    args = ap.parse_args()
    out = tarball(args.commit)
    data = subprocess.run(["git", "archive", "--format=tar.gz", args.commit, *SNAPSHOTS[args.commit]],
                          cwd=HERE.parent.parent, check=True, capture_output=True).stdout
    out.write_bytes(data)
    print(f"{out} ({len(data):,} bytes)")


if __name__ == "__main__":
    main()
