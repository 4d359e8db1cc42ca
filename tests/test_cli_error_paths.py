"""The operator's error paths (helper-152's audit): a flag's bad value is a usage error
(exit 2) in every command."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from demos.cli import main

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = str(ROOT / "demos" / "scenarios" / "digits-headline.toml")


def exit_code(argv: Sequence[str]) -> int:
    """``edgeci ARGV``'s exit status, whether argparse exits or main() returns it."""
    try:
        return main(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.parametrize(("argv", "needle"), [
    (["emulate", HEADLINE, "--seeds", "x"], "argument --seeds: 'x' is not a seed or a range like 0-4"),
    (["emulate", HEADLINE, "--seeds", "0,0-2"], "argument --seeds: seed 0 given more than once"),
    (["emulate", HEADLINE, "--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["emulate", HEADLINE, "--time-scale", "0", "--broker", "mqtt://127.0.0.1:1"], "argument --time-scale: must be above 0, got 0"),
    (["emulate", HEADLINE, "--transport", "codec", "--broker", "mqtt://127.0.0.1:1"], "--transport is the emulator's"),
    (["scc-stream", "--seeds", "3-1"], "argument --seeds: empty range '3-1'"),
    (["scc-stream", "--threads", "-1"], "argument --threads: must be at least 1, got -1"),
])
def test_a_bad_flag_of_emulate_or_scc_stream_is_a_usage_error(argv: list[str], needle: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """They exited 1, the status of a runtime failure, where every other command's bad flag
    value exits 2; --seeds and --threads were checked only after the scenario was loaded."""
    out = tmp_path / "out"
    assert exit_code([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"edgeci {argv[0]}: error: " in err and needle in err and "Traceback" not in err, err
    assert not out.exists()
