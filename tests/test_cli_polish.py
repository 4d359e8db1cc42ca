"""The ``edgeci`` command line's rough edges a newcomer met: a closed stdout, the status's
release history, ``pretrain --out`` and ``run``'s numbers, help texts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from demos.cli import main

ROOT = Path(__file__).resolve().parents[1]


def cli_into_closed_pipe(*argv: str) -> subprocess.CompletedProcess[str]:
    """``edgeci ARGV | head`` after head has exited: stdout is a pipe nobody reads."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "demos.cli", *argv], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    finally:
        os.close(write)


# ---------------------------------------------------------------------- a closed stdout


def test_closed_stdout_ends_quietly_with_141(tmp_path: Path) -> None:
    (tmp_path / "versions").mkdir()  # an empty state dir: `versions` prints a header
    out = cli_into_closed_pipe("versions", "--state-dir", str(tmp_path))
    assert (out.returncode, out.stderr) == (141, "")
    out = cli_into_closed_pipe("--help")
    assert out.returncode == 0 and out.stderr == ""


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator import cli_control

    def broker_socket_broke(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli_control, "run", broker_socket_broke)
    with pytest.raises(BrokenPipeError):
        main(["versions", "--state-dir", str(tmp_path)])
