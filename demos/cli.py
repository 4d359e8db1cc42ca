"""The ``edgeci`` command line: one entry point, one subcommand per job.

    edgeci run            the main job: embedded broker + coordinator + 20 devices, with a plot
    edgeci coordinator    the regional coordinator daemon (durable state dir)
    edgeci device         a headless device that labels its partition over time
    edgeci pretrain       make the deployed model file from the task's public split
    edgeci emulate        virtual-clock fleet emulation of one or several strategies
    edgeci status         a coordinator's status, readable (or --json); exit 2 if none is alive
    edgeci versions       a coordinator's versions with the release gate's verdicts (reads its state dir)
    edgeci new-epoch      start a new version numbering for a stopped coordinator's state dir
    edgeci backup         a verified copy of a coordinator's state dir (running or stopped)
    edgeci restore        put a backup in place of a stopped coordinator's state dir, in a new epoch
    edgeci rollback       make an earlier version the release again on a running coordinator
    edgeci pin / unpin    release a version and hold it (no promotions) / let the gate promote again
    edgeci pki            provisioning: CA, identity certificates and bundles, the broker's ACL
    edgeci label          labelling app (webcam / video / synthetic): boxes and gestures
    edgeci scc-stream     streaming experiment: semantic cache + compensation vs baselines

Every subcommand takes --log-level debug|info|warning|error (-v: debug) and
--log-format text|json, before or after its name (also EDGECI_LOG_LEVEL, EDGECI_LOG_FORMAT).

Environment (each subcommand's --help names the EDGECI_* variables that set its options):
    EDGECI_HOME       devices' data, caches and generated datasets (default: ~/.edgeci)
    EDGECI_DEVICE     torch device for training: cpu, cuda[:N], mps (default: auto, the first available)
    EDGECI_PASSWORD   the broker password with --username (instead of --password-file)
    EDGECI_CONFIG     edgeci coordinator's TOML config file (as --config)
    EDGECI_MNIST_DIR  MNIST/EMNIST IDX files for the procdigits task (default: generated digits)
    EDGECI_DATA       torchvision dataset files for emulator scenarios (never downloaded)
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import select
import signal
import sys
import textwrap
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_sdk.errors import EdgeciError
from edge_sdk.runtime import iso_utc_ms

# subcommand -> (module, one-line help). Modules are imported lazily: `edgeci --help`
# must not pay for torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("demos.run", "main job, a trial (the embedded broker is anonymous, 127.0.0.1 only: not for production): embedded broker, one SPIN coordinator with the release gate, a fleet of devices; prints the release's accuracy before → after and writes a plot"),
    "coordinator": ("coordinator.cli", "run a regional coordinator daemon (resumes from --state-dir)"),
    "device": ("devices.headless", "run one headless device that labels its share of the dataset over time"),
    "pretrain": ("demos.pretrain", "write the pretrained deployed model to a file"),
    "emulate": ("demos.emulate", "emulate a fleet on a virtual clock: compare strategies from a scenario TOML"),
    "scc-stream": ("demos.scc_stream", "streaming non-IID experiment: no cache vs cached features vs SCC (HFedMS), with LASP"),
    "status": ("coordinator.cli_status", "show a region's coordinator status (readable, or --json); exit 2 when none is alive"),
    "versions": ("coordinator.cli_control", "a coordinator's versions with the release gate's verdicts (reads --state-dir)"),
    "new-epoch": ("coordinator.cli_control", "start a new version numbering for a stopped coordinator's state dir (devices ahead of it, a restored backup)"),
    "backup": ("coordinator.cli_control", "copy a coordinator's state dir and check the copy loads (safe while it runs)"),
    "restore": ("coordinator.cli_control", "put a backup in place of a stopped coordinator's state dir, in a new epoch"),
    "rollback": ("coordinator.cli_control", "make an earlier version the release again on a running coordinator (signed command)"),
    "pin": ("coordinator.cli_control", "release a version and hold it: no promotions until unpin (signed command)"),
    "unpin": ("coordinator.cli_control", "let the gate promote candidates again (signed command)"),
    "pki": ("coordinator.pki", "certificates and provisioning bundles: a small CA, per-device/coordinator/operator certificates, the mosquitto ACL"),
    "label": ("demos.label", "labelling app: box objects (and draw gestures) in a webcam, video or synthetic feed; the deployed detector learns them"),
}
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_DESTS = ("log_level", "log_format")
NOISY_LOGGERS = ("matplotlib", "PIL", "amqtt", "transitions", "passlib", "urllib3", "asyncio", "onnxscript")


# ---------------------------------------------------------------------- version


def edgeci_version() -> str:
    """The installed distribution's version, else the packages' ``__version__``, else pyproject's."""
    from importlib import metadata

    try:
        return metadata.version("edgeci")
    except metadata.PackageNotFoundError:
        pass
    for package in ("demos", "edge_sdk"):
        declared = getattr(importlib.import_module(package), "__version__", None)
        if isinstance(declared, str):
            return declared
    try:
        data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
        return str(data["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


# ---------------------------------------------------------------------- logging


class IsoFormatter(logging.Formatter):
    """``2026-12-02T11:20:03.123Z INFO edgeci.coordinator: message``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_utc_ms(record.created)


_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": iso_utc_ms(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text") -> None:
    """One stderr handler on the root logger; called again (SIGHUP) it changes level / format.
    Like ``logging.basicConfig``, it adds no handler where the host already configured one
    (``main()`` called inside an app or a test run): there only the level is set."""
    if level not in LOG_LEVELS:
        raise EdgeciError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_edgeci", False)), None)
    if handler is None and not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler._edgeci = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if handler is not None:
        handler.setFormatter(JsonFormatter() if fmt == "json" else IsoFormatter())
    numeric = getattr(logging, level.upper())
    root.setLevel(numeric)
    logging.getLogger("edgeci").setLevel(logging.NOTSET)
    for name in NOISY_LOGGERS:  # third-party debug output drowns ours
        logging.getLogger(name).setLevel(max(numeric, logging.INFO))


def _add_log_flags(p: argparse.ArgumentParser, *, top: bool, level: str | None = None) -> None:
    """On the top-level parser with defaults; on subparsers with SUPPRESS so that a value given
    before the subcommand is not overwritten by the subparser's default (``level``: that
    command's default level, said in its help)."""
    d: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    g = p.add_argument_group("logging")
    g.add_argument("--log-level", choices=LOG_LEVELS, **({"default": None} if top else d),
                   help="debug, info, warning or error (default: " + (f"{level})" if level else "the command's)"))
    g.add_argument("--log-format", choices=("text", "json"), **({"default": "text"} if top else d),
                   help="text lines with ISO-8601 UTC times, or one JSON object per line (default: text)")
    g.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="debug",
                   **({} if top else d), help="shorthand for --log-level debug")


# ---------------------------------------------------------------------- parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` once: not when the help already names its default, nor for
    None / False defaults that mean "not set"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default  # by identity: `0 in (None, False)` is true, and 0 is a real default
        if "default" in text.lower() or default is None or default is False or default is argparse.SUPPRESS or not action.option_strings \
                or (isinstance(default, str) and not default):  # "" means "not set" too: its help says what then
            return text
        return super()._get_help_string(action)


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (for its arguments)."""
    parser = argparse.ArgumentParser(
        prog="edgeci",
        description="Continuous integration of user-labelled, on-device data into a deployed model (SPIN).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("\n\n", 1)[-1],
    )
    parser.add_argument("--version", action="version", version=f"edgeci {edgeci_version()}")
    _add_log_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        if name == chosen:
            loaded = importlib.import_module(module)
            loaded.add_arguments(p)
            from coordinator.config import parsers_of

            for q in parsers_of(p):  # e.g. `edgeci pki issue ... -v`: the flags after any action name too
                _add_log_flags(q, top=False, level=getattr(loaded, "DEFAULT_LOG_LEVEL", "warning"))
            p.epilog = "\n\n".join(part for part in (p.epilog, textwrap.fill(environment_help(p, loaded), 88, break_on_hyphens=False)) if part)
            if name == "emulate":  # its real-MQTT fleet mode (--broker) connects like a device
                from edge_sdk.mqtt import TOFU_DEVICES, add_broker_arguments

                add_broker_arguments(p, trust=TOFU_DEVICES, bundle_help=(
                    "with --broker: the folder of per-device bundles (PKI/bundles), one per device id of the scenario "
                    "(`edgeci pki issue --role device ID`); a single device's bundle only for a fleet of that one device"))
    return parser


def layered_dests(module: Any) -> tuple[str, ...] | None:
    """The dests :func:`resolve_args` fills from ``EDGECI_*`` for ``module``'s command (None: every option)."""
    layers = getattr(module, "CONFIG_LAYERS", "")
    return None if layers == "env+file" else (*LOG_DESTS, *getattr(module, "ENV_OPTIONS", ())) if layers else LOG_DESTS


def environment_help(sub: argparse.ArgumentParser, module: Any) -> str:
    """The subcommand's epilog: the ``EDGECI_*`` variables :func:`resolve_args` reads for it
    (made from the same option lists, so it cannot name one that is not read)."""
    from coordinator.config import options_of

    if getattr(module, "CONFIG_LAYERS", "") == "env+file":
        return ("Environment and config file: every option can also be set as EDGECI_<OPTION> (--state-dir is "
                "EDGECI_STATE_DIR; --param and --inversion take comma-separated NAME=VALUE items) or as a key of the "
                "--config TOML file (also EDGECI_CONFIG; key state_dir or state-dir); a flag wins over the environment, "
                "which wins over the file. See deploy/edgeci-coordinator.toml.example.")
    names = [o.env for o in options_of(sub, layered_dests(module))]
    return f"Environment: {', '.join(dict.fromkeys(names))} set the options of the same names when no flag does."


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand's name: the first word that is not an option or an option's value."""
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--log-level", "--log-format"):
            skip = True
            continue
        if not a.startswith("-"):
            return a
    return None


def resolve_args(parser: argparse.ArgumentParser, argv: Sequence[str], env: Mapping[str, str]) -> argparse.Namespace:
    """Parse, then fill unset options from ``EDGECI_*`` and (coordinator) the ``--config`` file."""
    from coordinator.config import Layered, resolve

    args, extras = parser.parse_known_args(list(argv))
    command = getattr(args, "command", None)
    if extras:  # `edgeci run --devcies 3`: the usage of `edgeci run`; `edgeci --bogus run`: of `edgeci`
        words = list(argv)
        before = command is None or command not in words or any(
            x in words[: words.index(command)] for x in extras)
        (parser if before or command is None else _subparser(parser, command)).error(f"unrecognized arguments: {' '.join(extras)}")
    if not command:
        return args
    module = importlib.import_module(args._module)
    layers = getattr(module, "CONFIG_LAYERS", "")
    sub = _subparser(parser, command)

    default_level = getattr(module, "DEFAULT_LOG_LEVEL", "warning")

    # env+file: every option; env: the module's ENV_OPTIONS; else only the logging flags
    only = layered_dests(module)

    def layer(environ: Mapping[str, str]) -> Layered:
        layered = resolve(parser, argv, environ, options_parser=sub, use_file=layers == "env+file", only=only)
        if layered.args.log_level is None:
            layered.args.log_level = default_level
        return layered

    layered = layer(env)
    out = layered.args
    out._layered = layered
    out._resolve_again = lambda: layer(os.environ)  # SIGHUP: the file again, same flags
    out._apply_logging = lambda level, fmt: setup_logging(level or default_level, fmt or "text")
    return out


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found = action.choices.get(command)
            if isinstance(found, argparse.ArgumentParser):
                return found
    raise KeyError(command)


SIGPIPE_EXIT = 128 + signal.SIGPIPE
"""141: the status a shell reports for ``cat``, ``git log`` … when the reader of their output
has gone (``| head``): they die of SIGPIPE, quietly, and ``set -o pipefail`` sees the failure."""


def main(argv: Sequence[str] | None = None) -> int:
    """``edgeci``; a closed stdout (``edgeci status --json | head``) ends it quietly with 141."""
    try:
        try:
            return _main(argv)
        finally:  # (also after --help's SystemExit) the last buffered output fails here, not at exit
            sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # a socket's broken pipe (the broker's), not the reader's: not ours to hide
        # The interpreter flushes stdout once more at exit: let that write go nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_EXIT


def _stdout_closed() -> bool:
    """Whether nothing reads our stdout any more (a pipe whose reader exited)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll(), or no real stdout (a test's StringIO)
        return False


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args = resolve_args(parser, argv, os.environ)
    except EdgeciError as exc:  # (a command's env or config file: named like its other errors)
        chosen = _chosen(argv)
        print(f"edgeci {chosen}: error: {exc}" if chosen else f"edgeci: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))  # (ConfigFileUnreadable: 1, retried by the systemd unit)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    setup_logging(args.log_level, args.log_format)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except EdgeciError as exc:
        print(f"edgeci {args.command}: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1))  # (StartRefused: 3, which the systemd unit does not restart)
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (a command may say what it kept), 128 + SIGINT
        print(f"edgeci {args.command}: interrupted" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
