"""``edgeci scc-stream`` — SCC on a drifting stream: no cache vs cached features vs SCC.

The same as ``edgeci emulate demos/scenarios/scc-stream.toml``: EdgeClient devices with SCC
and the real coordinator core (LASP) on the emulation engine (:mod:`devices.scc_fleet`).

    edgeci scc-stream --quick          (4 devices, 19 rounds, seeds 0-2)
    edgeci scc-stream --seeds 0-19
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from coordinator.config import bounded
from devices.report import seeds_arg

SCENARIO = Path(__file__).resolve().parent / "scenarios" / "scc-stream.toml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", type=Path, default=SCENARIO, help="a scenario TOML with a [stream] table")
    p.add_argument("--seeds", type=seeds_arg, default="", help="seeds, e.g. 0-19; empty = the scenario's")
    p.add_argument("--quick", action="store_true", help="the scenario's [quick] variant")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/emulate/<scenario name>)")
    p.add_argument("--threads", type=bounded(int, 1), default=1, help="torch threads")
    p.add_argument("--no-progress", action="store_true", help="no per-run lines")


def run(args: argparse.Namespace) -> int:
    """``edgeci emulate SCENARIO`` with these options, parsed by emulate's own parser: every
    option this command does not take keeps emulate's default (a hand-built namespace went
    stale when emulate gained ``--transport``)."""
    from demos import emulate
    from devices.scenario import ScenarioError, read_toml

    if "stream" not in read_toml(args.scenario):  # (attacks.toml ran the whole attacks emulation instead)
        raise ScenarioError(f"{args.scenario} has no [stream] table: scc-stream runs the SCC stream experiment "
                            "(demos/scenarios/scc-stream.toml); other scenarios run with edgeci emulate")
    argv = [str(args.scenario), f"--seeds={args.seeds}", f"--threads={args.threads}"]
    argv += [f"--out={args.out}"] if args.out is not None else []
    argv += [flag for flag, on in (("--quick", args.quick), ("--no-progress", args.no_progress)) if on]
    parser = argparse.ArgumentParser(prog="edgeci emulate")
    emulate.add_arguments(parser)
    return emulate.run(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scc_stream", description=(__doc__ or "").split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
