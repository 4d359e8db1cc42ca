"""The ``edgeci`` command line: one entry point, one subcommand per job.

    edgeci run            the main job: embedded broker + coordinator + 20 devices, with a plot
    edgeci coordinator    the regional coordinator daemon (durable state dir)
    edgeci device         a headless device that labels its partition over time
    edgeci pretrain       make the deployed model file from the task's public split
    edgeci emulate        virtual-clock fleet emulation of one or several strategies
    edgeci status         print a coordinator's retained status from the broker
    edgeci label          labelling app (webcam / video / synthetic): boxes and gestures
    edgeci scc-stream     streaming experiment: semantic cache + compensation vs baselines
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from edge_sdk.errors import EdgeciError

# subcommand -> (module, one-line help). Modules are imported lazily: `edgeci --help`
# must not pay for torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("demos.run", "main job: embedded broker, one SPIN coordinator, a fleet of devices; prints before → after accuracy and writes a plot"),
    "coordinator": ("coordinator.cli", "run a regional coordinator daemon (resumes from --state-dir)"),
    "device": ("devices.headless", "run one headless device that labels its share of the dataset over time"),
    "pretrain": ("demos.pretrain", "write the pretrained deployed model to a file"),
    "emulate": ("demos.emulate", "emulate a fleet on a virtual clock: compare strategies from a scenario TOML"),
    "scc-stream": ("demos.scc_stream", "streaming non-IID experiment: no cache vs cached features vs SCC (HFedMS), with LASP"),
    "status": ("coordinator.cli_status", "print the retained status of a region's coordinator"),
    "label": ("demos.label", "labelling app: box objects (and draw gestures) in a webcam, video or synthetic feed; the deployed detector learns them"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except EdgeciError as exc:
        print(f"edgeci {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (for its arguments)."""
    parser = argparse.ArgumentParser(
        prog="edgeci",
        description="Continuous integration of user-labelled, on-device data into a deployed model (SPIN).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("\n\n", 1)[-1],
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(_module=module)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


if __name__ == "__main__":
    sys.exit(main())
