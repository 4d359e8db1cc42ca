"""Layered configuration for the daemons: flags > ``EDGECI_*`` environment > TOML file > defaults.

One naming rule links the three: the flag ``--foo-bar`` is the environment variable
``EDGECI_FOO_BAR`` and the TOML key ``foo_bar`` (or ``foo-bar``). A repeatable flag (``--param``)
is a TOML list of strings or one comma-separated string (``EDGECI_PARAM="k=3,timeout_s=5"``), merged per NAME
across the layers (``--param k=3`` beats the file's ``k=4`` but keeps its ``timeout_s=5``). ``--config PATH`` (or
``EDGECI_CONFIG``) names the TOML file. A ``[strategy]`` table holds the strategy's ``name``
and its parameters, passed through to the strategy, whose config dataclass validates them. An unknown TOML key
is an error naming the key and the valid ones.

Pure: :func:`resolve` takes the parser, ``argv``, an environment mapping and a file reader,
so tests need neither a process nor a file.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_sdk.errors import ConfigError

ENV_PREFIX = "EDGECI_"
CONFIG_ENV = "EDGECI_CONFIG"
OTHER_ENV = frozenset({CONFIG_ENV, "EDGECI_HOME", "EDGECI_MNIST_DIR", "EDGECI_DEVICE", "EDGECI_PASSWORD",
                       "EDGECI_DATA"})
"""Variables read outside the options (edge_sdk.paths, tasks.procdigits, trainer, mqtt, devices.report)."""
STRATEGY_TABLE = "strategy"
NOT_LAYERED = frozenset({"help", "version", "config", "command"})
"""Dests that never come from the environment or the file."""

Source = Literal["flag", "env", "file", "default"]
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigFileUnreadable(ConfigError):
    """--config / EDGECI_CONFIG names a file that cannot be read (not there yet, a volume not
    mounted): exit 1, which the systemd unit retries, where a file that does not parse is 2."""

    exit_code = 1


@dataclass(frozen=True, slots=True)
class Option:
    """One layered option: its dest, the long flag's name (without ``--``) and the action."""

    dest: str
    name: str
    action: argparse.Action

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")


@dataclass(slots=True)
class Layered:
    """The resolved namespace and where each value came from."""

    args: argparse.Namespace
    sources: dict[str, Source] = field(default_factory=dict)
    strategy_params: dict[str, Any] = field(default_factory=dict)
    """The file's ``[strategy]`` table (flags for the same parameters win, see :func:`merge_strategy_params`)."""
    config_path: Path | None = None
    item_sources: dict[str, dict[str, Source]] = field(default_factory=dict)
    """For a repeatable ``NAME=VALUE`` option (``--param``): where each NAME's winning item came from."""
    unknown_env: list[str] = field(default_factory=list)
    """``EDGECI_*`` variables this command does not read but that look like a misspelling of one
    it does, as ``NAME (did you mean OTHER?)`` (a misspelled ``EDGECI_TIMOUT`` in a unit file is
    otherwise ignored without a word)."""
    overridden: list[str] = field(default_factory=list)
    """Config-file values that the environment or a flag replaced with another value, as
    ``KEY = 'file value' in FILE: EDGECI_KEY / --key wins (value)`` (a unit file's
    ``EDGECI_STATE_DIR`` silently beat the file's ``state_dir``). The ``[strategy]`` table's, as
    ``[strategy] KEY = …``, are added by :func:`merge_strategy_params` (only the command knows
    which flag sets which parameter)."""

    def given(self, dest: str) -> bool:
        """Set by a flag or the environment (stronger than the file's ``[strategy]`` table)."""
        return self.sources.get(dest) in ("flag", "env")


def options_of(parser: argparse.ArgumentParser, only: Iterable[str] | None = None) -> list[Option]:
    """The parser's options that the environment and file may set (long flags only)."""
    keep = set(only) if only is not None else None
    out: list[Option] = []
    for action in parser._actions:
        if action.dest in NOT_LAYERED or isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        if keep is not None and action.dest not in keep:
            continue
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs:
            continue
        if isinstance(action, argparse._StoreConstAction) and not isinstance(action.const, bool):
            continue  # e.g. -v/--verbose as a shorthand for --log-level debug
        out.append(Option(action.dest, longs[0][2:], action))
    return out


def given_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Dests set explicitly on the command line (parsed again with every default suppressed)."""
    saved: list[tuple[argparse.Action, Any, bool]] = []
    for p in parsers_of(parser):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction) or (not a.option_strings and a.nargs in ("?", "*")):
                continue  # an optional positional (`rollback [N]`): argparse would feed "==SUPPRESS==" to its type
            saved.append((a, a.default, a.required))
            a.default, a.required = argparse.SUPPRESS, False
    saved_defaults = [(p, dict(p._defaults)) for p in parsers_of(parser)]
    for p, _ in saved_defaults:
        p._defaults.clear()
    try:
        ns, _ = parser.parse_known_args(list(argv))
    finally:
        for a, default, required in saved:
            a.default, a.required = default, required
        for p, defaults in saved_defaults:
            p._defaults.update(defaults)
    return set(vars(ns))


def parsers_of(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every subparser below it, each once (aliases map to the same parser)."""
    out = [parser]
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in dict.fromkeys(a.choices.values()):
                out += parsers_of(sub)
    return out


def parse_toml(text: str, *, name: str = "config") -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: not valid TOML: {exc}") from exc


def convert(option: Option, value: Any, where: str) -> Any:
    """Check and convert one value from the environment (a string) or the file (TOML types)."""
    action = option.action
    if isinstance(action, argparse._StoreConstAction) and isinstance(action.const, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    typ: Callable[[Any], Any] | None = action.type if callable(action.type) else None
    if isinstance(action, argparse._AppendAction):  # repeatable NAME=VALUE flags (--param, --inversion)
        return _items(value, where)
    if isinstance(value, list) and all(isinstance(v, str) for v in value) and typ is None:
        value = ",".join(value)  # e.g. peers = ["eu", "us"] for --peers eu,us
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{where}: expected {_type_name(typ)}, got {value!r}")
    if isinstance(value, str) or (typ is not None and typ not in (float, int)):
        try:  # (a checked type, e.g. bounded(): it parses the text of a file's number too)
            out = typ(str(value)) if typ is not None else value
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected {_type_name(typ)}, got {value!r}") from exc
        except argparse.ArgumentTypeError as exc:  # bounded(): the rule it broke (it was a traceback)
            raise ConfigError(f"{where}: {exc}") from None
    elif typ is float:
        out = float(value)
    elif typ is int and isinstance(value, int):
        out = value
    else:
        raise ConfigError(f"{where}: expected {_type_name(typ)}, got {value!r}")
    if action.choices is not None and out not in action.choices:
        raise ConfigError(f"{where}: {out!r} is not one of {', '.join(map(str, action.choices))}")
    return out


_NEXT_ITEM = re.compile(r"\s*,\s*(?=[A-Za-z_][A-Za-z0-9_]*\s*=)")
"""A comma that starts the next NAME=VALUE item (a comma inside a value, ``[1, 2]``, does not)."""


def _items(value: Any, where: str) -> list[str]:
    """A repeatable flag's items: a TOML list of strings, or one string of comma-separated
    ``NAME=VALUE`` items (``EDGECI_PARAM="k=3,timeout_s=5"``)."""
    if isinstance(value, str):
        return [item for item in _NEXT_ITEM.split(value.strip()) if item]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    raise ConfigError(f"{where}: expected a list of \"NAME=VALUE\" strings (or one comma-separated string), got {value!r}")


NOT_FINITE = "must be a finite number"
"""What ``bounded(finite=True)`` says of ±inf (and config values of ±inf or NaN)."""


def bounded(kind: type[int] | type[float], minimum: float, *, strict: bool = False, below: float | None = None,
            at_most: float | None = None, finite: bool = False, rule: str = "", above_rule: str = "") -> Callable[[str], Any]:
    """An argparse ``type`` for every command: a ``kind`` (int or float) at least ``minimum``
    (above it with ``strict``: NaN never is) and, with ``below``, under it (with ``at_most``, not
    over it); with ``finite``, never ±inf (checked before the upper bound, so an infinite rate
    or duration is told it is no number rather than too big; NaN fails the minimum first).
    ``rule``, the error's words for a value out of range (default "must be above M" / "must be at
    least M" / "must be below B" / "must be at most B");
    ``above_rule``, the words for a value over the upper bound only (default ``rule``)."""
    if below is not None and at_most is not None:
        raise ValueError("bounded() takes below or at_most, not both")

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum):
            words = rule or f"must be {'above' if strict else 'at least'} {minimum:g}"
            raise argparse.ArgumentTypeError(f"{words}, got {text}")
        if finite and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{NOT_FINITE}, got {text}")
        if below is not None and not value < below:
            raise argparse.ArgumentTypeError(f"{above_rule or rule or f'must be below {below:g}'}, got {text}")
        if at_most is not None and not value <= at_most:
            raise argparse.ArgumentTypeError(f"{above_rule or rule or f'must be at most {at_most:g}'}, got {text}")
        return value

    return parse


def topic_id(text: str) -> str:
    """An argparse ``type`` for an id that is part of MQTT topics (``--region``, ``--device-id``):
    refused at parse time (exit 2, a usage error), as the coordinator's own ``--region`` is, not
    when the client first builds a topic (exit 1, a runtime failure)."""
    from edge_sdk.wire.topics import check_id

    try:
        return check_id(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def task_arg(text: str) -> str:
    """An argparse ``type`` for ``--model``: a registered task or its model id, refused at
    parse time (exit 2, before torch loads) rather than when the command first builds the
    task (exit 1, a runtime failure the systemd unit would retry). Returns the name as given."""
    from edge_sdk.tasks import task_name

    try:
        task_name(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _type_name(typ: Callable[[Any], Any] | None) -> str:
    if typ is None:
        return "a string"
    if typ is Path:
        return "a path"
    return f"{'an' if getattr(typ, '__name__', '')[:1] in 'aeiou' else 'a'} {getattr(typ, '__name__', 'value')}"


def file_values(options: Sequence[Option], data: Mapping[str, Any], *, name: str = "config",
                strategy_table: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({dest: value}, strategy params)`` from a parsed TOML document; unknown keys are errors.
    The ``[strategy]`` table's ``name`` is the strategy (``--strategy``), its other keys its parameters."""
    by_key: dict[str, Option] = {}
    for o in options:
        by_key[o.key] = o
        by_key[o.name] = o
    values: dict[str, Any] = {}
    strategy: dict[str, Any] = {}
    for key, value in data.items():
        if key == STRATEGY_TABLE and strategy_table and isinstance(value, dict):
            strategy = dict(value)
            chosen = strategy.pop("name", None)  # TOML cannot have both strategy = "x" and [strategy]
            option = by_key.get(STRATEGY_TABLE)
            if chosen is not None and option is not None:
                values[option.dest] = convert(option, chosen, f"{name}: [{STRATEGY_TABLE}] name")
            continue
        option = by_key.get(key)
        if option is None:
            valid = sorted({o.key for o in options} | ({f"[{STRATEGY_TABLE}]"} if strategy_table else set()))
            raise ConfigError(f"{name}: unknown key {key!r}; valid keys: {', '.join(valid)}")
        if option.dest in values:
            raise ConfigError(f"{name}: {key!r} is set twice (as {option.key!r} and {option.name!r})")
        values[option.dest] = convert(option, value, f"{name}: {key}")
    return values, strategy


def env_values(options: Sequence[Option], env: Mapping[str, str]) -> dict[str, Any]:
    """``{dest: value}`` from the ``EDGECI_*`` variables that name an option (others are ignored)."""
    out: dict[str, Any] = {}
    for o in options:
        if o.env in env and env[o.env] != "":
            out[o.dest] = convert(o, env[o.env], o.env)
    return out


def resolve(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    options_parser: argparse.ArgumentParser | None = None,
    only: Iterable[str] | None = None,
    use_file: bool = True,
    read_text: Callable[[Path], str] = Path.read_text,
) -> Layered:
    """Parse ``argv`` and fill every option not given as a flag from ``env``, then the file.

    ``options_parser`` is the (sub)parser whose options are layered (default: ``parser``);
    ``only`` restricts the layered dests (e.g. to the logging options)."""
    args = parser.parse_args(list(argv))
    options = options_of(options_parser or parser, only)
    given = given_dests(parser, argv)
    path: Path | None = None
    file_vals: dict[str, Any] = {}
    strategy: dict[str, Any] = {}
    if use_file:
        raw = getattr(args, "config", None) or env.get(CONFIG_ENV) or None
        if raw:
            path = Path(raw).expanduser()
            try:
                text = read_text(path)
            except OSError as exc:
                raise ConfigFileUnreadable(f"cannot read config file {path}: {exc.strerror or exc}") from exc
            file_vals, strategy = file_values(options, parse_toml(text, name=str(path)), name=str(path))
    env_vals = env_values(options, env)
    sources: dict[str, Source] = {}
    item_sources: dict[str, dict[str, Source]] = {}
    overridden: list[str] = []
    for o in options:
        if o.dest in file_vals and not isinstance(o.action, argparse._AppendAction) and (o.dest in given or o.dest in env_vals):
            value = getattr(args, o.dest) if o.dest in given else env_vals[o.dest]
            if value != file_vals[o.dest]:
                by = f"--{o.name}" if o.dest in given else o.env
                shown = [repr(str(v)) if isinstance(v, Path) else repr(v) for v in (file_vals[o.dest], value)]
                overridden.append(f"{o.key} = {shown[0]} in {path}: {by} wins ({shown[1]})")
        if isinstance(o.action, argparse._AppendAction):  # NAME=VALUE items: merged per NAME across the layers
            layers: list[tuple[Source, list[str]]] = [("file", file_vals.get(o.dest) or []), ("env", env_vals.get(o.dest) or []),
                                                      ("flag", (getattr(args, o.dest, None) or []) if o.dest in given else [])]
            merged = [item for _, items in layers for item in items]  # later items win: the stronger layer's
            setattr(args, o.dest, merged or getattr(args, o.dest, None))
            item_sources[o.dest] = {_item_name(item): source for source, items in layers for item in items}
            sources[o.dest] = next((source for source, items in reversed(layers) if items), "default")
        elif o.dest in given:
            sources[o.dest] = "flag"
        elif o.dest in env_vals:
            setattr(args, o.dest, env_vals[o.dest])
            sources[o.dest] = "env"
        elif o.dest in file_vals:
            setattr(args, o.dest, file_vals[o.dest])
            sources[o.dest] = "file"
        else:
            sources[o.dest] = "default"
    if use_file:
        args.config = path
    return Layered(args=args, sources=sources, strategy_params=strategy, config_path=path, item_sources=item_sources,
                   unknown_env=misspelled_env(options_parser or parser, env), overridden=overridden)


def misspelled_env(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> list[str]:
    """The ``EDGECI_*`` names in ``env`` that ``parser``'s options do not read (nor
    :data:`OTHER_ENV`) but that are close to one they do: ``NAME (did you mean OTHER?)``.
    A name close to none may be another command's (one environment serves them all): not listed."""
    mine = sorted({o.env for p in parsers_of(parser) for o in options_of(p)})
    out = []
    for name in sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in OTHER_ENV and k not in mine):
        close = difflib.get_close_matches(name, mine, n=1, cutoff=0.92)
        if close:
            out.append(f"{name} (did you mean {close[0]}?)")
    return out


def _item_name(item: str) -> str:
    return item.partition("=")[0].strip()


def merge_strategy_params(from_flags: Mapping[str, Any], table: Mapping[str, Any],
                          flag_of: Mapping[str, str], layered: Layered) -> dict[str, Any]:
    """Strategy parameters: the file's ``[strategy]`` table over the flags' defaults, but a
    parameter whose flag (``flag_of[param]`` is its dest) was given explicitly keeps it.

    Each table value that a flag, the environment or a ``--param`` item (``EDGECI_PARAM``)
    replaces with another value is added to ``layered.overridden`` (warned of at start, as a
    top-level key is), as ``[strategy] k = 10 in FILE: EDGECI_K wins (7)``."""
    out = dict(from_flags)
    named = _named_params(layered)
    for key, value in table.items():
        dest = flag_of.get(key)
        source = layered.sources.get(dest, "default") if dest is not None else "default"
        if source == "file":
            raise ConfigError(f"the config file sets both {dest!r} and [{STRATEGY_TABLE}] {key!r}: keep one")
        winner: tuple[str, Any] | None = None
        if dest is not None and source in ("flag", "env"):
            by = "--" + dest.replace("_", "-") if source == "flag" else ENV_PREFIX + dest.upper()
            winner = (by, out[key] if key in out else getattr(layered.args, dest, None))
        item = named.get(key)  # --param / EDGECI_PARAM: beats a weaker own flag (the same layer is refused later)
        if item is not None and _RANK[item[0]] > _RANK[source]:
            winner = ("--param" if item[0] == "flag" else f"{ENV_PREFIX}PARAM", item[1])
        if winner is not None and winner[1] != value:
            line = f"[{STRATEGY_TABLE}] {key} = {value!r} in {layered.config_path}: {winner[0]} wins ({winner[1]!r})"
            if line not in layered.overridden:  # options_from may run twice on one Layered
                layered.overridden.append(line)
        if source in ("flag", "env"):
            continue  # --k 7 (or EDGECI_K) beats [strategy] k
        out[key] = value
    return out


_RANK: dict[str, int] = {"default": 0, "file": 1, "env": 2, "flag": 3}


def _named_params(layered: Layered) -> dict[str, tuple[Source, Any]]:
    """``{NAME: (source, value)}`` for the ``--param`` items the environment or a flag gave
    (the stronger layer's; VALUE read by :func:`param_value`). The
    file's own ``param`` list beside its ``[strategy]`` table is an error, not an override."""
    sources = layered.item_sources.get("param", {})
    out: dict[str, tuple[Source, Any]] = {}
    for item in getattr(layered.args, "param", None) or ():
        name, _, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        source = sources.get(name, "flag")
        if source in ("flag", "env"):
            out[name] = (source, param_value(raw))  # later items win, as in the merged list
    return out


def param_value(raw: str) -> Any:
    """A ``--param NAME=VALUE`` item's VALUE: a TOML value (10, 1.5, true, "x"), ``none`` /
    ``null`` as None, anything else as the string itself."""
    if raw.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
