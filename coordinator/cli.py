"""``edgeci coordinator`` — run a regional coordinator until SIGTERM / Ctrl-C.

Several regions, each with its own coordinator, exchange models with ``--peering``::

    edgeci coordinator --region eu --id eu --state-dir st/eu --peering spyker --peers eu,us,ap
    edgeci coordinator --region us --id us --state-dir st/us --peering spyker --peers eu,us,ap
    ...

``--peers`` is the ring order (every coordinator lists the same ring). With a peering and
no ``--strategy``, the strategy of the same name is used (spyker, nebula, hierfavg).

Every flag can also come from the environment (``--state-dir`` is ``EDGECI_STATE_DIR``) or
a TOML file (``--config``, key ``state_dir``; a ``[strategy]`` table holds the strategy's
``name`` and parameters); flags win over the environment, which wins over the file
(``deploy/edgeci-coordinator.toml.example``).

Signals: SIGTERM / SIGINT stop cleanly; SIGHUP re-reads the config file and applies what
can change live (log level and format; SPIN's parameters: k, timeout, combine and the robust-aggregation
settings combiner, clip_multiplier, sample_weight_cap, max_staleness, device_share; no other strategy's) and logs, per key,
what needs a restart; an invalid value anywhere in the file keeps the whole running config. ``--metrics-port`` serves ``/metrics``, ``/healthz`` and ``/readyz``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from coordinator.canary import CanaryConfig, check_canary_task
from coordinator.config import (
    ENV_PREFIX,
    Layered,
    bounded,
    merge_strategy_params,
    param_value,
)
from coordinator.daemon import START_TIMEOUT_S, CoordinatorDaemon, CoordinatorOptions, canary_config
from coordinator.inversion import inversion_config
from coordinator.methods import make_method, resolve_names, split_params
from coordinator.metrics import MetricsServer
from coordinator.peering import PEERINGS
from coordinator.registry import StateDirLocked, read_epoch, read_release_record
from coordinator.strategies import CONFIGS, Strategy, strategy_names
from coordinator.strategies.robust import COMBINERS
from coordinator.strategies.spin import SpinNoTimeoutStrategy, SpinStrategy
from coordinator.strategies.staleness import CONVERSIONS, policy_names
from coordinator.validation import load_validation
from edge_sdk.errors import BadOption, BrokerRefused, ConfigError, EdgeciError, StartRefused
from edge_sdk.modelio import load_model
from edge_sdk.mqtt import (
    KEEPALIVE_HELP,
    KEEPALIVE_MAX_S,
    KEEPALIVE_MIN_S,
    KEEPALIVE_RULE,
    KEEPALIVE_S,
    TOFU_PEERS,
    BrokerAuth,
    add_broker_arguments,
    auth_from_args,
    parse_broker_url,
    read_bundle,
    regions_outside,
)
from edge_sdk.runtime import iso_utc_ms
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import HINT_BOUNDS
from edge_sdk.wire import topics
from edge_sdk.wire.messages import MAX_CANARY_SAMPLES, MAX_RELEASE_SPREAD_S
from edge_sdk.wire.topics import check_id

if TYPE_CHECKING:
    from edge_sdk.wire.messages import Recall

log = logging.getLogger("edgeci.coordinator")

CONFIG_LAYERS = "env+file"
"""``edgeci`` resolves this command's flags from flags > EDGECI_* > --config file > defaults."""
DEFAULT_LOG_LEVEL = "info"

LIVE_STRATEGY_PARAMS: dict[type[Strategy], frozenset[str]] = {
    SpinStrategy: frozenset({"k", "timeout_s", "combine", "server_lr"}),
    SpinNoTimeoutStrategy: frozenset({"k", "combine", "server_lr"}),
}
"""Strategies whose config dataclass is read afresh on every decision, so that replacing it
on the actor thread changes behaviour at once. A strategy may instead offer
``reconfigure(**params) -> None`` (raising ConfigError for what it cannot change)."""

STRATEGY_FLAG_PARAMS = {"k": "k", "timeout": "timeout_s", "combine": "combine", "eta": "eta", "decay_beta": "decay_beta",
                        "planets": "planets", "rotation": "t_c",
                        **{p: p for p in ("combiner", "clip_multiplier", "max_staleness", "sample_weight_cap")}}
"""Flag (dest) -> the strategy parameter it sets."""
_FLAG_ONLY_FOR = {"timeout": ("spin",)}
"""Flags narrower than their parameter: spin-notimeout's config keeps π's field but never waits."""


def strategy_flag_users() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Flag (dest) -> (strategy parameter, the strategies whose config has it): read from the
    registered configs (``coordinator.strategies.CONFIGS``), so a new strategy with, say, a
    ``k`` field takes ``--k`` without an entry here."""
    having = {name: {f.name for f in dataclasses.fields(cfg)} for name, cfg in CONFIGS.items()}
    return {dest: (param, _FLAG_ONLY_FOR.get(dest) or tuple(n for n, names in having.items() if param in names))
            for dest, param in STRATEGY_FLAG_PARAMS.items()}
PEERING_FLAG_USERS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{dest: (param, ("spyker",)) for dest, param in (
        ("h_inter", "h_inter"), ("h_intra", "h_intra"), ("phi", "phi"), ("eta_a", "eta_a"), ("n_clients", "n_clients"),
        ("beacon", "beacon_s"), ("token_timeout", "token_timeout_s"), ("stagger", "stagger_s"))},
    "sync_timeout": ("sync_timeout_s", ("spyker", "hierfavg")),
    "rotation": ("t_c", ("nebula",)),
    "cloud": ("cloud", ("hierfavg",)),
    "kappa2": ("kappa2", ("hierfavg",)),
}
"""Flag (dest) -> (peering parameter, the peerings that take it). A flag given for a strategy
and peering that use it nowhere is an error (:func:`_check_applies`), not silently dropped."""
STRATEGY_FLAGS: dict[str, str] = {
    **{param: dest for dest, (param, _) in PEERING_FLAG_USERS.items()},
    **{param: dest for dest, param in STRATEGY_FLAG_PARAMS.items()},
    "lr_init": "lr",  # spyker's η_init: --lr (for spyker only: for any other strategy --lr is only a device hint)
}
"""Parameter -> the flag (dest) that sets it, every strategy's and peering's: the file's
``[strategy]`` table loses to a flag or variable given for it (``--eta`` with ``[strategy]
eta`` ran the file's value; a peering parameter's flag lost to the table the same way)."""


CANARY_MAX_COHORT = next(f.default for f in dataclasses.fields(CanaryConfig) if f.name == "max_cohort")
"""The most devices a canary round asks (so the most --canary-min-reports can be)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (keys are the flags' names; a [strategy] table for the strategy's name and parameters); also EDGECI_CONFIG")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="MQTT broker URL: mqtts://HOST[:8883] (TLS) in production, mqtt:// for trials on this machine")
    p.add_argument("--keepalive", type=bounded(int, KEEPALIVE_MIN_S, at_most=KEEPALIVE_MAX_S, rule=KEEPALIVE_RULE), default=KEEPALIVE_S, metavar="S",
                   help=KEEPALIVE_HELP)
    add_broker_arguments(p, trust=TOFU_PEERS)
    p.add_argument("--region", default="default", help="region id; devices of this region talk to this coordinator")
    p.add_argument("--state-dir", type=Path, help="durable state: versions, pending updates (resumed on restart); required")
    p.add_argument("--model", default="digits", help="task / model served: a built-in task, or an app's own as "
                   "package.module:Name (on PYTHONPATH) or an edgeci.tasks entry point (see edge_sdk/tasks/__init__.py)")
    p.add_argument("--id", dest="coordinator_id", default="", help="coordinator id (default: coord-REGION)")
    p.add_argument("--strategy", default=None, choices=strategy_names(), help="aggregation strategy (default: spin, or the peering's own)")
    users = {dest: ", ".join(names) for dest, (_, names) in strategy_flag_users().items()}  # (from the strategies' configs)
    p.add_argument("--k", type=int, default=10, help=f"aggregate when K updates are buffered ({users['k']})")
    p.add_argument("--timeout", type=float, default=30.0, help="SPIN timeout π in seconds")
    p.add_argument("--param", action="append", default=None, metavar="NAME=VALUE", help="a strategy or peering parameter by its config name (repeatable; e.g. --param k=10 --param phi=2); "
                   "EDGECI_PARAM takes comma-separated items (\"k=10,phi=2\"), the file a list (param = [\"k=10\", \"phi=2\"]); "
                   "merged per name (flag > environment > file). The named flags are aliases (the stronger layer wins; "
                   "both in one layer is an error). FedBuff, PORT and NebulaFL forget an invited device that has not reported "
                   "after forget_after_s = 600 s on a daemon (forget_after_s=none waits for ever, as the papers)")
    p.add_argument("--combine", choices=["models", "deltas"], default="models", help=f"{users['combine']}: average the buffered models (the paper's rule) or apply each update's delta from its own base version (faster on digits, unstable with stale detection updates)")
    r = p.add_argument_group(f"robust aggregation ({users['combiner']})")
    r.add_argument("--combiner", choices=list(COMBINERS), help="combine the buffer by weighted mean (default), coordinate-wise median, trimmed mean, krum or multi-krum")
    r.add_argument("--clip-multiplier", type=float, help="clip each update's change to this × the median recent change norm (default 3; 0 disables)")
    r.add_argument("--max-staleness", type=int, help=f"drop updates staler than this many versions (default: keep all; "
                   f"{users['max_staleness']})")
    r.add_argument("--sample-weight-cap", type=float, help="clamp an update's sample-count weight to this × the median recent claim (default 4; 0 disables)")
    p.add_argument("--full-sync-every", type=bounded(int, 0, rule="must be 0 (off) or a number of versions"), default=0, metavar="T", help="LASP: full model every T versions, classifier-only versions (and device traffic) in between; 0 = off")
    p.add_argument("--init", type=Path, help="deployed model file (.npz from `edgeci pretrain`) for an empty state dir")
    p.add_argument("--encoding", choices=["f4", "f2", "i1"], default="f4", help="tensor encoding of models sent to devices")
    p.add_argument("--epochs", type=bounded(float, HINT_BOUNDS["epochs"][0], at_most=HINT_BOUNDS["epochs"][1], finite=True),
                   help=f"training hint sent to devices: local epochs, {HINT_BOUNDS['epochs'][0]:g}-{HINT_BOUNDS['epochs'][1]:g} "
                   "(devices train whole epochs; default: none sent, each device uses its own setting)")
    p.add_argument("--lr", type=bounded(float, HINT_BOUNDS["lr"][0], strict=True, at_most=HINT_BOUNDS["lr"][1], finite=True),
                   help=f"training hint sent to devices: learning rate, above {HINT_BOUNDS['lr'][0]:g} and at most "
                   f"{HINT_BOUNDS['lr'][1]:g} (default: none sent; each device uses its own setting; spyker: also its "
                   "initial rate η_init)")
    p.add_argument("--seed", type=bounded(int, 0), default=0, help="seed of the coordinator's random choices (and of the pretrained model)")
    st = p.add_argument_group(f"stale updates (the staleness policy is a strategy parameter: --param staleness=NAME, NAME one of "
                              f"{', '.join(policy_names())}; with --param a=… (damping), max_staleness=N, convert_beyond=N)")
    st.add_argument("--conversion-deadline", type=bounded(float, 0, strict=True, finite=True), default=60.0, metavar="S",
                    help="with --param staleness=gradient-inversion (or dc-asgd) and --param convert_beyond=N: updates "
                    "staler than N versions are converted before aggregation; gradient inversion runs on a worker thread "
                    "(needs the [train] extra) and a conversion not back within S seconds falls back to the damped update")
    st.add_argument("--inversion", action="append", default=None, metavar="NAME=VALUE",
                    help="gradient-inversion setting by name (repeatable): iterations, time_budget_s, max_samples, "
                    "samples_fraction, inversion_lr, epochs, lr, momentum, seed; EDGECI_INVERSION takes comma-separated items, "
                    "the file a list")
    gate = p.add_argument_group("release gate (what devices predict with)")
    gate.add_argument("--validation", type=Path, help="validation set (.npz with x and y; for detection x (uint8 frames), boxes "
                      "(every frame's class_id, x1, y1, x2, y2 rows, frame after frame) and box_counts (each frame's number "
                      "of boxes), as coordinator.validation.save_validation writes it; read without pickle): every new version is a candidate, "
                      "released only if its accuracy there is not worse than the release's by more than --gate-margin; "
                      "one worse by more than --rollback-margin is rejected and the training line rolled back, one in between is held "
                      "(not released, training goes on). Default: no gate, every version is released")
    gate.add_argument("--gate-margin", type=float, default=0.02, help="accuracy a candidate may lose against the release and still be promoted, in [0, 1)")
    gate.add_argument("--rollback-margin", type=float, default=0.10, help="in [0, 1): a candidate worse than the release by more than this is "
                      "rejected and the training line rolled back; between the two margins it is held (not released, training goes on). "
                      "Left at its default (0.10) it is raised to --gate-margin when that is larger (the start log says so); set below it, refused")
    gate.add_argument("--gate-z", type=float, default=1.0, help="classifiers: the margins are applied to a one-sided bound on the paired "
                      "accuracy difference on the same validation samples, d ∓ z·se (1.0 ≈ 84 %% confidence; 0 = the point estimate; at most 10)")
    gate.add_argument("--canary", type=float, default=0.0, metavar="FRACTION",
                      help="federated evaluation: ask this share of recently seen devices (at least --canary-min-reports) to score "
                      "each candidate against the release on their next new labels before training on them (test-then-train) and "
                      "report only paired counts; the gate pools them with --validation's, or decides on them alone. 0 = off")
    gate.add_argument("--canary-samples", type=int, default=20, help=f"new labels each canary device scores per candidate, 1-{MAX_CANARY_SAMPLES}")
    gate.add_argument("--canary-max-per-device", type=int, default=0,
                      help=f"most labels one device's canary report may count: 0 (= --canary-samples) or --canary-samples to "
                      f"{MAX_CANARY_SAMPLES}; bounds any one device's weight")
    gate.add_argument("--canary-min-reports", type=int, default=3,
                      help=f"device reports needed before canary evidence decides, 3-{CANARY_MAX_COHORT} (>= 3: the most "
                      "favourable and the most unfavourable report are dropped before pooling, so one lying device cannot decide "
                      f"or block; at most the {CANARY_MAX_COHORT} devices a round asks)")
    gate.add_argument("--canary-deadline", type=float, default=600.0,
                      help="seconds a canary round lasts, above 0 and at most 86400 (a day); then the reports in decide (too few: "
                      "the candidate is held)")
    gate.add_argument("--operator-keys", type=Path, help="folder of operator NAME.pub keys: each may sign rollback/pin "
                      "commands in its NAME only (besides this coordinator's own signing key, in its id); default: the "
                      "bundle's operators/")
    o = p.add_argument_group("operations")
    o.add_argument("--take-over", action="store_true",
                   help="start although (a) the region's status shows another coordinator, with another signing key, "
                   "live (two would split the devices: for one that crashed before its last will arrived), or (b) on a new "
                   "state dir, the region's devices follow another state dir signed with this key (its retained recall says "
                   "so): they drop that numbering for this one's version 0, or (c) the state dir was last started for another "
                   "region (its region file). Without it such a start is refused: a mistyped --state-dir or --region would "
                   "take the fleet over. Use it when the other coordinator or state dir is lost, or to move a state dir to a "
                   "region on purpose")
    o.add_argument("--accept-unpulled-updates", action="store_true",
                   help="INSECURE: take an update from a device this coordinator served no training model since its last "
                   "accepted update. By default such an update is refused (not_selected), whatever the strategy: with SPIN "
                   "one stolen device certificate filled every buffer alone, a thousand updates in seconds; an update costs "
                   "a served pull now, and pulls are rate-limited per device. After a restart each device's first update "
                   "trained before it is still taken. Only for clients that push without pulling")
    o.add_argument("--signing-key", type=Path, help="the Ed25519 key (PEM) that signs every model, recall and peer message; "
                   "default: the bundle's signing.key, else STATE_DIR/signing.key (created 0600 on first start). Keep it "
                   "apart from the state dir: devices that pinned it on first use refuse any other key, so a state dir "
                   "lost with its key in it loses them")
    o.add_argument("--metrics-port", type=int, default=0, help="serve /metrics, /healthz and /readyz on this port (1-65535); 0 = off")
    o.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics server binds. Its endpoints have no "
                   "authentication: bind beyond 127.0.0.1 only on a network you trust (or behind a proxy that checks)")
    o.add_argument("--status-interval", type=float, default=30.0, help="republish the retained status at least every this many seconds (liveness for `edgeci status`)")
    o.add_argument("--release-spread", type=bounded(int, 0, at_most=MAX_RELEASE_SPREAD_S), default=0, metavar="SECONDS",
                   help="idle devices fetch each new release at a random time within at least this many seconds (sent with "
                   "the region's recall; a device takes the larger of this and its own, the SDK's default 300 s). The "
                   "broker sends about devices × model size / SECONDS per second while a release goes out: raise it for "
                   f"big fleets and big models (0 = the devices' own; at most {MAX_RELEASE_SPREAD_S}, a week)")
    g = p.add_argument_group("peering between regional coordinators")
    g.add_argument("--peering", default="none", choices=PEERINGS, help="model exchange with other coordinators")
    g.add_argument("--peers", default="", help="comma-separated coordinator ids in ring order, this one included")
    g.add_argument("--eta", type=float, help="spyker: server rate η_i for client updates (default 0.6)")
    g.add_argument("--decay-beta", type=float, help="spyker: client learning-rate decay β (default 0.05)")
    g.add_argument("--h-inter", type=float, help="spyker: age-spread trigger (default n_clients / 5n)")
    g.add_argument("--h-intra", type=float, help="spyker: own-age trigger since the last sync (default 350)")
    g.add_argument("--phi", type=float, help="spyker: sigmoid activation φ (default 1.5)")
    g.add_argument("--eta-a", type=float, help="spyker: server aggregation rate η_a (default 0.6)")
    g.add_argument("--n-clients", type=int, help="spyker: total clients for the default h_inter (default: the clients the "
                   "ring reports)")
    g.add_argument("--beacon", type=float, help="spyker: seconds between beats (default 1.0)")
    g.add_argument("--token-timeout", type=float, help="spyker: regenerate the token after this silence (default 5.0)")
    g.add_argument("--stagger", type=float, help="spyker: extra wait per ring rank when regenerating (default 1.0)")
    g.add_argument("--sync-timeout", type=float, help="spyker / hierfavg: stop waiting for peers' models after this long "
                   "(default: 10 s for spyker, 60 s for hierfavg)")
    g.add_argument("--rotation", type=float, help="nebula: rotation interval t_c in seconds (default 60)")
    g.add_argument("--planets", type=int, help="nebula: planet models per coordinator (default 4)")
    g.add_argument("--cloud", help="hierfavg: the coordinator that averages the edges (default: first of --peers)")
    g.add_argument("--kappa2", type=int, help="hierfavg: edge rounds per cloud round (default 2)")


def parse_params(items: Iterable[str], flag: str = "--param") -> dict[str, object]:
    """``--param NAME=VALUE`` items: VALUE read as a TOML value (10, 1.5, true, "x"),
    ``none`` as None, anything else as a string; the config dataclasses validate."""
    out: dict[str, object] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name.isidentifier():
            raise ConfigError(f"{flag} expects NAME=VALUE, got {item!r}")
        out[name] = param_value(raw)
    return out


def _given(args: argparse.Namespace, pairs: tuple[tuple[str, str], ...]) -> dict[str, object]:
    """``{param: value}`` for the flags the user gave (unset flags keep the defaults)."""
    return {param: getattr(args, attr) for param, attr in pairs if getattr(args, attr, None) is not None}


_DEFAULTS: dict[str, Any] = {}


def _explicit(args: argparse.Namespace, layered: Layered | None, dest: str) -> bool:
    """Set by a flag, the environment or the file (not the default)."""
    if layered is not None and dest in layered.sources:
        return layered.sources[dest] != "default"
    if not _DEFAULTS:  # a namespace without sources (tests, drivers): anything but the default counts
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        _DEFAULTS.update(vars(parser.parse_args([])))
    return getattr(args, dest, None) not in (None, _DEFAULTS.get(dest))


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_applies(args: argparse.Namespace, layered: Layered | None, strategy: str, peering: str,
                   strategy_users: Mapping[str, tuple[str, tuple[str, ...]]]) -> None:
    """A strategy or peering flag given for a method that does not use it is an error, not dropped."""
    for dest in dict.fromkeys([*strategy_users, *PEERING_FLAG_USERS]):
        if not _explicit(args, layered, dest):
            continue
        by_strategy = strategy_users.get(dest, ("", ()))[1]
        by_peering = PEERING_FLAG_USERS.get(dest, ("", ()))[1]
        if strategy in by_strategy or peering in by_peering:
            continue
        users = [f"strategy {' / '.join(by_strategy)}"] if by_strategy else []
        users += [f"peering {' / '.join(by_peering)}"] if by_peering else []
        raise ConfigError(f"{_flag(dest)} is for {' or '.join(users)}; strategy {strategy!r} with peering {peering!r} "
                          f"does not use it (drop it, or choose a method that does)")


_RANK = {"default": 0, "file": 1, "env": 2, "flag": 3}


def _written(dest: str, source: str, value: object) -> str:
    """How the user wrote a flag's setting: ``--k 7``, ``EDGECI_K=7``, ``k = 7 in the config file``."""
    if source == "env":
        return f"{ENV_PREFIX}{dest.upper()}={value}"
    return f"{dest} = {value!r} in the config file" if source == "file" else f"{_flag(dest)} {value}"


def _written_item(param: str, source: str, value: object) -> str:
    """How the user wrote a ``--param`` item: ``--param k=3``, ``EDGECI_PARAM k=3``, ``param k=3 in the config file``."""
    item = f"{param}={value!r}"
    if source == "env":
        return f"{ENV_PREFIX}PARAM {item}"
    return f"param {item} in the config file" if source == "file" else f"--param {item}"


def _settle_twice(args: argparse.Namespace, layered: Layered | None, by_name: Mapping[str, object],
                  strategy_users: Mapping[str, tuple[str, tuple[str, ...]]]) -> dict[str, object]:
    """A parameter set both by its own flag (``--k``) and by name (``--param k=…``, or the
    file's ``param`` list beside its ``[strategy]`` table): the stronger layer wins (flag >
    environment > file, as for every option); within one layer it is refused, naming both
    as the user wrote them, instead of one silently winning. Returns the by-name parameters
    that stand."""
    out = dict(by_name)
    items = layered.item_sources.get("param", {}) if layered is not None else {}
    for dest, (param, _) in (*strategy_users.items(), *PEERING_FLAG_USERS.items()):
        if param not in out or not _explicit(args, layered, dest):
            continue
        own = layered.sources.get(dest, "flag") if layered is not None else "flag"
        named = items.get(param, "flag")
        if _RANK[own] > _RANK[named]:
            del out[param]  # e.g. EDGECI_K beats the file's param k=…
        elif _RANK[own] == _RANK[named]:
            raise ConfigError(f"{param} is given twice: {_written(dest, own, getattr(args, dest))} and "
                              f"{_written_item(param, named, by_name[param])}; keep one")
    if layered is not None:
        both = sorted(p for p in set(out) & set(layered.strategy_params) if items.get(p) == "file")
        if both:
            raise ConfigError(f"the config file sets {', '.join(both)} both in param and in [strategy]: keep one")
    return out


def _check_finite(args: argparse.Namespace) -> None:
    """inf / nan in a float flag (``--timeout inf`` made the status JSON carry Infinity)."""
    for dest, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_flag(dest)} must be a finite number, got {value}")


def options_from(args: argparse.Namespace, layered: Layered | None = None) -> CoordinatorOptions:
    if getattr(args, "state_dir", None) is None:
        raise ConfigError("--state-dir is required (or EDGECI_STATE_DIR, or state_dir in the --config file)")
    strategy, peering = resolve_names(args.strategy, args.peering)  # e.g. --strategy spyker brings its peering
    _check_finite(args)
    strategy_users = strategy_flag_users()  # read from the registered configs, once
    _check_applies(args, layered, strategy, peering, strategy_users)
    params: dict[str, object] = {}
    if strategy in ("spin", "spin-notimeout", "fedbuff", "port"):
        params["k"] = args.k
    if strategy == "spin":
        params["timeout_s"] = args.timeout
        params["combine"] = args.combine
    for dest, (param, users) in strategy_users.items():
        if strategy not in users or getattr(args, dest, None) is None or (dest in ("k", "timeout") and param in params):
            continue
        if dest in ("k", "timeout", "combine") and not _explicit(args, layered, dest):
            continue  # their defaults go to spin and friends above; another strategy (spin-notimeout's combine) only a given one
        params[param] = getattr(args, dest)
    if strategy == "spyker":
        params.update(_given(args, (("lr_init", "lr"),)))
    if layered is not None and layered.strategy_params:
        flag_of = STRATEGY_FLAGS if strategy == "spyker" else {k: v for k, v in STRATEGY_FLAGS.items() if k != "lr_init"}
        params = merge_strategy_params(params, layered.strategy_params, flag_of, layered)
    by_name = _settle_twice(args, layered, parse_params(getattr(args, "param", None) or ()), strategy_users)
    params.update(by_name)
    # [strategy] / --param: by name. With a peering a name neither side knows is refused here, naming
    # both sides' parameters (left to the strategy, its error listed only the strategy's).
    params, generic_peer_params = split_params(strategy, peering, params, strict=peering != "none")
    peers = tuple(c.strip() for c in args.peers.split(",") if c.strip())
    if peering == "none" and peers:
        raise ConfigError(f"--peers needs --peering {'|'.join(p for p in PEERINGS if p != 'none')}")
    peer_params: dict[str, object] = {param: getattr(args, dest) for dest, (param, users) in PEERING_FLAG_USERS.items()
                                      if peering in users and getattr(args, dest, None) is not None}
    peer_params.update(generic_peer_params)
    hints = {k: float(v) for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None}
    interval = float(getattr(args, "status_interval", 30.0))
    if not interval > 0:
        raise ConfigError("--status-interval must be > 0")
    return CoordinatorOptions(
        broker=args.broker,
        region=args.region,
        state_dir=args.state_dir,
        model=args.model,
        coordinator_id=args.coordinator_id,
        strategy=strategy,
        strategy_params=params,
        init=args.init,
        encoding=args.encoding,
        hints=hints,
        seed=args.seed,
        peering=peering,
        peers=peers,
        peering_params=peer_params,
        full_sync_every=args.full_sync_every,
        validation=getattr(args, "validation", None),
        gate_margin=getattr(args, "gate_margin", 0.02),
        rollback_margin=getattr(args, "rollback_margin", 0.10),
        gate_z=float(getattr(args, "gate_z", 1.0)),
        canary=float(getattr(args, "canary", 0.0)),
        canary_samples=int(getattr(args, "canary_samples", 20)),
        canary_max_per_device=int(getattr(args, "canary_max_per_device", 0)),
        canary_min_reports=int(getattr(args, "canary_min_reports", 3)),
        canary_deadline_s=float(getattr(args, "canary_deadline", 600.0)),
        operator_keys_dir=getattr(args, "operator_keys", None),
        conversion_deadline_s=float(getattr(args, "conversion_deadline", 60.0)),
        inversion_params=parse_params(getattr(args, "inversion", None) or (), "--inversion"),
        status_interval_s=interval,
        release_spread_s=int(getattr(args, "release_spread", 0)),
        keepalive_s=int(getattr(args, "keepalive", KEEPALIVE_S)),
        require_pull=not getattr(args, "accept_unpulled_updates", False),
        auth=auth_from_args(args),
        bundle=args.bundle,
        signing_key=getattr(args, "signing_key", None),
    )


# ---------------------------------------------------------------------- before start


def check_state_dir(path: Path) -> None:
    """``--state-dir`` is a directory this process can write, or can be created as one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--state-dir {path}: not a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--state-dir {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--state-dir {path}: not writable: {existing} (a read-only filesystem, or another user's)")


def holds_versions(state_dir: Path) -> bool:
    versions = Path(state_dir) / "versions"
    return versions.is_dir() and any(versions.iterdir())


def check_init(path: Path, task_spec: Any) -> None:
    """``--init`` is an edgeci model file of the served model (a .npz is a zip archive)."""
    check_init_file(path)
    load_model(path, expect=task_spec)


def check_init_file(path: Path) -> None:
    """``--init`` can be read and starts like a model file (a zip archive): what needs no task."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ConfigError(f"--init {path}: cannot read it: {exc.strerror or exc}") from exc
    if head != b"PK\x03\x04":
        raise ConfigError(f"--init {path}: not an edgeci model file (a .npz written by `edgeci pretrain`)")


def _check_gate(options: CoordinatorOptions, layered: Layered) -> None:
    """The release gate's margins and z, named by their flags (the gate's own errors name fields)."""
    for flag, value, low, high in (("--gate-margin", options.gate_margin, 0.0, 1.0),
                                   ("--rollback-margin", options.rollback_margin, 0.0, 1.0)):
        if not (math.isfinite(value) and low <= value < high):
            raise ConfigError(f"{flag} must be in [0, 1), got {value}")
    if not (math.isfinite(options.gate_z) and 0 <= options.gate_z <= 10):
        raise ConfigError(f"--gate-z must be in [0, 10], got {options.gate_z}")
    if layered.sources.get("rollback_margin") not in (None, "default") and options.rollback_margin < options.gate_margin:
        raise ConfigError(f"--rollback-margin {options.rollback_margin} is below --gate-margin {options.gate_margin}: "
                          "a candidate worse by more than the rollback margin is rejected, so it must be >= the gate margin")


def _check_metrics(host: str, port: int) -> None:
    if port:
        try:  # the server binds the same way (HTTPServer, SO_REUSEADDR); closed again at once
            HTTPServer((host, port), BaseHTTPRequestHandler).server_close()
        except OSError as exc:
            raise ConfigError(f"--metrics-host {host} --metrics-port {port}: cannot serve metrics there: "
                              f"{exc.strerror or exc}") from exc


def check_method(options: CoordinatorOptions) -> None:
    """The strategy and peering with their parameters, built once and thrown away (names, types, ranges)."""
    own_id = options.own_id
    twice = sorted(p for p, n in Counter(options.peers or ()).items() if n > 1)
    if twice:
        raise ConfigError(f"--peers names {', '.join(twice)} more than once: list each coordinator of the ring once, "
                          "in the same order on every coordinator")
    if options.peering not in (None, "none") and len(set(options.peers or ()) | {own_id}) < 2:
        # (a ring of one started without a word, then logged every beat of the real ring as "not in this ring")
        raise ConfigError(f"--peering {options.peering} needs the other coordinators: --peers {own_id},OTHER[,…] (the whole "
                          "ring, this one included, the same on every coordinator)")
    make_method(options.strategy, peering=options.peering, coordinator_id=own_id, ring=options.peers or (own_id,),
                strategy_params=options.strategy_params, peering_params=options.peering_params,
                full_sync_every=options.full_sync_every)


@contextlib.contextmanager
def bad_options() -> Iterator[None]:
    """A ConfigError inside is :class:`BadOption` (exit 2, not restarted by the systemd unit):
    for checks of the values themselves, which no retry can change. A check that reads a file,
    a port or the broker stays a ConfigError (exit 1: restarted, as the file may appear)."""
    try:
        yield
    except (BadOption, StartRefused):
        raise
    except ConfigError as exc:
        raise BadOption(str(exc)) from exc


def check_before_start(options: CoordinatorOptions, layered: Layered) -> None:
    """Everything about the options that can be checked without writing anything: the state dir,
    broker URL, ids, metrics address, strategy and peering, gate, --validation and --init.
    The daemon writes the state dir (lock, signing key, pretrained v0) only after this."""
    args = layered.args
    check_state_dir(options.state_dir)
    with bad_options():
        parse_broker_url(options.broker)
        check_id(options.region, "--region")
        check_id(options.own_id, "--id (coordinator id)")
        port = int(getattr(args, "metrics_port", 0) or 0)
        if not 0 <= port <= 65535:
            raise ConfigError(f"--metrics-port must be 0 (off) or a port 1-65535, got {port}")
        task = get_task(options.model)
        check_method(options)
        if options.inversion_params:
            inversion_config(**dict(options.inversion_params))
        _check_gate(options, layered)
        canary_config(options)  # (--canary 2 was refused only once connected, with exit 1: restarted for good)
        check_canary_task(task, options.canary)
    check_coordinator_bundle(options)
    if options.operator_keys_dir is not None and not Path(options.operator_keys_dir).is_dir():
        # (a mistyped folder started a coordinator that obeyed no operator, without a word)
        raise ConfigError(f"--operator-keys {options.operator_keys_dir}: no such folder (of operator NAME.pub keys)")
    _check_metrics(str(getattr(args, "metrics_host", "127.0.0.1")), port)
    if options.validation is not None:
        load_validation(options.validation, task)
    if options.init is not None and not holds_versions(options.state_dir):
        check_init(options.init, task.spec)
    _warn_dropped_settings(options, init_in_file=layered.sources.get("init") == "file")
    _warn_idle_settings(options)
    if options.signing_key is not None and not Path(options.signing_key).is_file():  # a typo must not mint a new key
        raise ConfigError(f"--signing-key {options.signing_key}: no such file (copy a state dir's signing.key there, or "
                          "use a coordinator bundle's); leave the option out to use STATE_DIR/signing.key")


def check_coordinator_bundle(options: CoordinatorOptions) -> None:
    """ConfigError unless ``--bundle`` is this coordinator's: a coordinator's role, issued for
    ``--id`` and for ``--region`` (helper-96: any bundle was taken without a word — a device's made
    the broker name the coordinator after that device, another region's left every topic refused
    by the ACL, another identity's messages were refused by the ring, whose trusted/ keys go by identity)."""
    if options.bundle is None:
        return
    path = options.bundle
    manifest = read_bundle(path)
    who, role, allowed = manifest.get("identity"), manifest.get("role"), manifest.get("regions")
    if role != "coordinator":
        raise ConfigError(f"bundle {path} is a {role}'s ({who!r}), not a coordinator's: connected as {who!r} this "
                          f"coordinator would take that {role}'s place on the broker; issue one with "
                          f"`edgeci pki issue --role coordinator {options.own_id} --region {options.region}`")
    if who != options.own_id:
        raise ConfigError(f"bundle {path} was issued for coordinator {who!r}, not {options.own_id!r}: the broker names "
                          f"this connection {who!r} and the other coordinators trust its key as {who!r}; start it with "
                          f"--id {who}")
    if regions_outside(manifest, [options.region]):
        raise ConfigError(f"bundle {path} is for region(s) {', '.join(map(str, allowed or ())) or '(none)'}, not "
                          f"{options.region!r}: the broker's ACL would refuse every topic there; check --region, or issue "
                          f"the bundle for it (`edgeci pki issue --role coordinator {who} --region {options.region} --force`)")


def _warn_idle_settings(options: CoordinatorOptions) -> None:
    """Staleness settings that do nothing with the policy chosen (accepted silently before)."""
    from coordinator.strategies.staleness import CONVERSIONS

    params = options.strategy_params
    policy = str(params.get("staleness", "none"))
    if "convert_beyond" in params and policy not in CONVERSIONS:
        log.warning("convert_beyond = %s has no effect with staleness %r: only %s convert stale updates", params["convert_beyond"],
                    policy, " and ".join(CONVERSIONS))
    if options.inversion_params and policy != "gradient-inversion":
        log.warning("--inversion %s has no effect with staleness %r: it sets the gradient-inversion conversion",
                    ",".join(f"{k}={v}" for k, v in options.inversion_params.items()), policy)


GATE_VERDICTS = frozenset({"passed", "promote", "hold", "reject"})


def _warn_dropped_settings(options: CoordinatorOptions, *, init_in_file: bool = False) -> None:
    """A restart that silently drops what the state dir ran with: the release gate (its verdicts
    are in release.json; without --validation or --canary every version is released), or an
    --init that cannot apply (it sets version 0 of a new state dir; a config file's ``init``,
    there for the first start, is said at INFO: helper-98 got the WARNING on every restart)."""
    if not holds_versions(options.state_dir):
        return
    if options.init is not None:
        say = log.info if init_in_file else log.warning
        say("--init %s is ignored: state dir %s already holds versions (it serves its own); --init sets version 0 of a new "
            "state dir", options.init, options.state_dir)
    if options.validation is None and options.canary <= 0:
        history = read_release_record(options.state_dir).get("history") or []
        verdicts = sum(1 for e in history if isinstance(e, dict) and e.get("action") in GATE_VERDICTS)
        if verdicts:
            log.warning("state dir %s ran with the release gate (%d verdicts in release.json); started without --validation "
                        "or --canary, every new version is released untested. Give --validation again to keep the gate",
                        options.state_dir, verdicts)


def _entries(state_dir: Path) -> set[str] | None:
    """The state dir's entries now (None: it does not exist)."""
    try:
        return set(os.listdir(state_dir))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _undo_failed_init(state_dir: Path, before: set[str] | None, missing_from: Path | None) -> None:
    """A start that failed on an empty (or missing) state dir leaves it as it was: remove what
    this run created there (lock, spec.json, signing.key, pending/, an empty versions/), never
    anything once a version exists or anything that was there before."""
    if before or holds_versions(state_dir):
        return
    now = _entries(state_dir)
    if now is None:
        return
    for name in sorted(now - set(before or ())):
        path = Path(state_dir) / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            log.warning("could not remove %s after the failed start: %s", path, exc)
    if before is None and missing_from is not None:  # the directories this run created, innermost first
        d = Path(state_dir).absolute()
        while True:
            try:
                d.rmdir()
            except OSError:
                break
            if d == missing_from:
                break
            d = d.parent


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (None: it exists)."""
    path = Path(path).absolute()
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def _signing_kid(options: CoordinatorOptions) -> str | None:
    """The id of the key the daemon will sign with (kept apart, or the state dir's own), None
    while it is yet to be made (a new state dir's)."""
    from coordinator.daemon import kept_signing_key
    from edge_sdk.signing import load_signer

    path = kept_signing_key(options) or Path(options.state_dir) / "signing.key"
    return load_signer(path).kid if path.exists() else None


TAKEOVER_WATCH_S = 3.0
"""How long the start-up probe stays connected to see whether a live client with its client id
takes it back (see :func:`_probe`): a coordinator reconnects 1 s after a first lost connection;
its back-off doubles after each connection that lasted under 10 s, so starts retried within
seconds of each other outgrow this (the reason an unsafe start exits 3: no automatic retry)."""


class _Probe(NamedTuple):
    retained: dict[str, bytes] | None
    """What :func:`_retained` returns."""
    taken_over: bool
    """The broker handed the probe's connection to another client with its id meanwhile."""
    live: dict[str, bytes] | None = None
    """The newest message that arrived after the retained one, by topic (see ``_probe``'s ``live``)."""


def _retained(options: CoordinatorOptions, wanted: Sequence[str], wait_s: float = 1.0, *,
              required: bool = False) -> dict[str, bytes] | None:
    """The region's retained messages on ``wanted`` topics, read by one short-lived probe
    connection (under this coordinator's credentials, client id ``<id>-preflight``). None when
    the broker cannot be asked (the daemon's own start then says why) — or, ``required``, the
    TransportError now when the broker cannot be reached at all (network, TLS, certificate,
    no answer within the start's own timeout). A broker that answers and refuses the probe
    (BrokerRefused) is None even then: it may accept only the coordinator's own client id
    (mosquitto's dynamic security, cloud IoT policies), which the daemon's start then tries."""
    return _probe(options, wanted, wait_s, required=required).retained


def _probe_auth(options: CoordinatorOptions) -> BrokerAuth | None:
    """What the start-up probe connects with: the coordinator's credentials (``--bundle``'s)."""
    return options.auth or (BrokerAuth.from_bundle(options.bundle) if options.bundle is not None else None)


def _has_identity(auth: BrokerAuth | None) -> bool:
    """Connecting as an identity (a certificate, a user name): a broker may bind the client id
    to it (edgeci's secure configs); an anonymous connection's id is whatever it says."""
    return auth is not None and (auth.cert_file is not None or auth.username is not None)


def _probe(options: CoordinatorOptions, wanted: Sequence[str], wait_s: float = 1.0, *, required: bool = False,
           watch: Callable[[dict[str, bytes]], bool] | None = None,
           live: Callable[[dict[str, bytes]], tuple[str, float] | None] | None = None) -> _Probe:
    """:func:`_retained`, and whether the probe's connection was taken over. A broker that
    sets the client id from the identity (``use_username_as_clientid``: edgeci's secure
    mosquitto configs) gives the probe the coordinator's own id: it disconnects a live
    coordinator of this identity — whose last will then reads "not alive" — and that
    coordinator, reconnecting a second later, takes the id back from the probe. Where
    ``watch(retained)`` says so (the retained status does not show a live coordinator), the
    probe stays up to :data:`TAKEOVER_WATCH_S` to see that; the live one is back at once. Where
    ``live(retained)`` names a topic and seconds, the probe waits that long for a message on it
    after the retained one (``_Probe.live``)."""
    from edge_sdk.mqtt import MqttTransport

    got: dict[str, bytes] = {}
    later: dict[str, bytes] = {}
    arrived, lost, newer = threading.Event(), threading.Event(), threading.Event()

    exact = [t for t in wanted if "+" not in t and "#" not in t]  # a filter's matches: collected, not awaited

    def on(t: str, payload: bytes) -> None:
        if t in got:
            if payload != got[t]:  # (not the retained one again: overlapping subscriptions deliver it twice)
                later[t] = payload
                newer.set()
            return
        got[t] = payload
        if all(w in got for w in exact):
            arrived.set()

    def connection(up: bool) -> None:
        if not up:
            lost.set()

    cid = f"{options.own_id[:54]}-preflight"  # not the coordinator's own id
    auth = _probe_auth(options)
    try:
        probe = MqttTransport(options.broker, client_id=cid, subscriptions=list(wanted), on_message=on, clean_session=True,
                              auth=auth, on_connection=connection)
        probe.start(START_TIMEOUT_S)
    except BrokerRefused as exc:
        (log.warning if required else log.debug)(
            "the start-up checks are skipped: the broker refused their probe connection (client id %s): %s", cid, exc)
        return _Probe(None, False)
    except EdgeciError as exc:
        if required:
            raise
        log.debug("could not read the region's retained messages before starting: %s", exc)
        return _Probe(None, False)
    try:
        arrived.wait(wait_s)  # a retained message follows the subscription's answer at once
        pending = live(dict(got)) if live is not None else None
        if pending is not None:
            topic, until = pending[0], time.monotonic() + pending[1]
            while topic not in later and (left := until - time.monotonic()) > 0:
                newer.wait(left)
                newer.clear()
        for topic in probe.refused_subscriptions:
            log.warning("a start-up check is skipped: the broker does not let this coordinator read %s (an ACL from "
                        "before this release: regenerate it with `edgeci pki broker-conf` and reload mosquitto)", topic)
        # Only an identity (a certificate, a user name) can be a client id the broker assigns;
        # a drop before the watch, or on an anonymous connection, is no takeover (helper-95).
        taken_over = False
        if _has_identity(auth) and not lost.is_set() and watch is not None and watch(dict(got)):
            taken_over = lost.wait(TAKEOVER_WATCH_S)  # (read before stop(): our own disconnect reports one too)
    finally:
        probe.stop()
    return _Probe(got, taken_over, dict(later))


def _signed_recall(payload: bytes | None, topic: str) -> tuple[str, Recall] | None:
    """``payload`` as a recall with a valid signature for ``topic``: (its key's id, the recall), else None."""
    from edge_sdk.signing import verify
    from edge_sdk.wire.codec import decode_frame
    from edge_sdk.wire.messages import Recall

    if payload is None:
        return None
    try:
        frame = decode_frame(payload)
    except EdgeciError:
        return None
    sig, msg = frame.signature, frame.message
    if not isinstance(msg, Recall) or sig is None:
        return None
    return (sig.kid, msg) if verify(sig.public_raw, sig.signature, sig.signed_for(topics.signing_scope(topic))) else None


def _followed_recall(payload: bytes | None, kid: str, topic: str) -> Recall | None:
    """``payload`` as a recall signed by key ``kid`` (verified), else None."""
    signed = _signed_recall(payload, topic)
    return signed[1] if signed is not None and signed[0] == kid else None


def region_followers(options: CoordinatorOptions, kid: str, wait_s: float = 1.0) -> Recall | None:
    """The region's retained recall if it is signed by key ``kid`` (verified): the numbering the
    devices follow. None when there is none, it is another key's, or the broker cannot be asked."""
    topic = topics.recall_topic(options.region)
    got = _retained(options, [topic], wait_s)
    return _followed_recall((got or {}).get(topic), kid, topic)


def live_other_coordinator(status_payload: bytes | None, kid: str | None, now: float, epoch: int | None = None) -> str | None:
    """What the region's retained status says of another coordinator that is live now (alive,
    and fresh by its own heartbeat): one that signs with another key than ``kid`` (None: this
    one's key is yet to be made), or with this key but numbers in another epoch than this
    state dir's (``epoch``; None: a new state dir, which :func:`check_take_over` judges by the
    recall) — another state dir sharing a kept key. A description for the refusal, else None.
    The same key and epoch is this state dir's own earlier process (restarted after a crash,
    before its last will)."""
    from coordinator.cli_status import liveness
    from edge_sdk.wire.codec import parse_status_json

    if status_payload is None:
        return None
    try:
        status = parse_status_json(status_payload)
    except EdgeciError:
        return None
    extra = status.get("extra")
    theirs = extra.get("signing_key") if isinstance(extra, dict) else None
    their_epoch = extra.get("epoch") if isinstance(extra, dict) else None
    alive, why = liveness(status, now)
    if alive is not True:
        return None
    if kid is not None and theirs == kid:
        if epoch is None or not isinstance(their_epoch, int) or their_epoch == epoch:
            return None  # this state dir's own process (or a new state dir: the recall decides)
        return (f"coordinator {str(status.get('coordinator', '?'))[:100]!r} with this signing key on another state dir "
                f"(epoch {their_epoch}, this one's {epoch}; version {status.get('version')}; {why})")
    return (f"coordinator {str(status.get('coordinator', '?'))[:100]!r} (key {str(theirs or 'none')[:40]}, version "
            f"{status.get('version')}; {why})")


def _published_at(payload: bytes | None) -> float | None:
    """A status's ``published_at`` (its coordinator's clock), if it is one that says."""
    from edge_sdk.wire.codec import parse_status_json

    try:
        stamp = parse_status_json(payload).get("published_at") if payload is not None else None
    except EdgeciError:
        return None
    return float(stamp) if isinstance(stamp, int | float) and not isinstance(stamp, bool) else None


def _live_elsewhere(retained: Mapping[str, bytes], own_id: str, own_status_topic: str, now: float) -> str | None:
    """The region (and its status) where a coordinator with id ``own_id`` is live now, among the
    retained statuses of other regions in ``retained``; None if none is."""
    from coordinator.cli_status import liveness
    from edge_sdk.wire.codec import parse_status_json

    for topic, payload in retained.items():
        if topic == own_status_topic or not topic.endswith("/status"):
            continue
        try:
            status = parse_status_json(payload)
        except EdgeciError:
            continue
        if status.get("coordinator") != own_id:
            continue
        alive, why = liveness(status, now)
        if alive is True:
            return f"region {str(status.get('region', '?'))[:64]!r} (version {status.get('version')}; {why})"
    return None


REGION_FILE = "region"
"""The region a state dir serves (written at each start by the CLI; a state dir from before it has none)."""


def recorded_region(state_dir: Path) -> str | None:
    try:
        text = (Path(state_dir) / REGION_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def record_region(state_dir: Path, region: str) -> None:
    """Write the region file atomically (best effort: a failure is logged, the start goes on)."""
    path = Path(state_dir) / REGION_FILE
    try:
        if recorded_region(state_dir) == region:
            return
        tmp = path.with_name(REGION_FILE + ".tmp")
        tmp.write_text(region + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not record the region in %s (%s): a later start cannot check --region against it", path, exc)


def check_take_over(options: CoordinatorOptions, take_over: bool) -> None:
    """Before a start, three checks, each refused unless ``--take-over``: the state dir serves
    another region (its ``region`` file: a mistyped ``--region`` would hand one region's
    versions and key to another's devices); and two on the region's retained messages:

    * another coordinator, with another signing key, is live on the region (its status): two
      coordinators on one region answer the same devices with different keys and versions,
      and with the same client id the broker keeps dropping one for the other;
    * on a state dir that holds no versions yet, the region's devices follow another state dir
      signed with this key (its recall names an epoch): starting would move the fleet to this
      one's version 0 within a second.

    A broker that cannot be reached raises its TransportError here, before the state dir is
    written; one that refuses the probe skips the two broker checks (see :func:`_retained`)."""
    recorded = recorded_region(options.state_dir)
    if recorded is not None and recorded != options.region:
        if not take_over:
            raise StartRefused(f"state dir {options.state_dir} serves region {recorded!r}, not {options.region!r}: its versions, "
                              f"epoch and signing key are {recorded!r}'s, and region {options.region!r}'s devices would take "
                              f"them. Check --region / --state-dir; to move this state dir to region {options.region!r} on "
                              f"purpose, start with --take-over")
        log.warning("moving state dir %s from region %r to region %r (--take-over)", options.state_dir, recorded, options.region)
    fresh = not holds_versions(options.state_dir)
    kid = _signing_kid(options)
    recall_topic, status_topic = topics.recall_topic(options.region), topics.status_topic(options.region)
    try:
        epoch = None if fresh else read_epoch(options.state_dir)
    except OSError:
        epoch = None  # (the daemon's start reports the storage error)
    # The broker is asked before anything is written: a start that cannot reach it (a typo in
    # --broker, a wrong port, an untrusted certificate) says so now, not after an empty state
    # dir's pretraining (minutes for detection), with the error the daemon's start would give.
    # (A refusal of the probe's client id is not this start's: the daemon's own connect decides.)
    # Without an identity (a plain broker) nothing stops a second coordinator taking a live one's client id
    # from another region (helper-96: `--region ap --id coord-us` and the real coord-us knocked each other
    # off every few seconds): every region's status is read too. (With one, the id is the identity's.)
    every_status = [] if _has_identity(_probe_auth(options)) else [f"{topics.ROOT}/+/status"]
    def stale_other(got: dict[str, bytes]) -> tuple[str, float] | None:
        """Another coordinator's retained status, alive by its word but old by this host's clock: it is
        gone, or its clock is behind this one's. It publishes once a heartbeat: wait that long (+ 5 s)."""
        from coordinator.cli_status import heartbeat_wait
        from edge_sdk.wire.codec import parse_status_json

        payload = got.get(status_topic)
        published = _published_at(payload)
        if payload is None or published is None or live_other_coordinator(payload, kid, time.time(), epoch) is not None \
                or live_other_coordinator(payload, kid, published, epoch) is None:
            return None  # none, live by this clock (refused below), or not one to refuse (this state dir's own)
        return status_topic, heartbeat_wait(parse_status_json(payload))

    probe = _probe(options, [*every_status, recall_topic, status_topic], required=True,
                   watch=lambda got: live_other_coordinator(got.get(status_topic), kid, time.time(), epoch) is None,
                   live=stale_other)
    got = probe.retained or {}
    same_id = _live_elsewhere(got, options.own_id, status_topic, time.time())
    if same_id is not None:
        msg = (f"coordinator id {options.own_id!r} is live in {same_id}: a second client with that id would knock it off the "
               "broker and take its messages. Check --id / --region (each region's coordinator has its own id, "
               f"coord-<region> by default)")
        if not take_over:
            raise StartRefused(msg)
        log.warning("starting anyway (--take-over): %s", msg)
    other = live_other_coordinator(got.get(status_topic), kid, time.time(), epoch)
    arrived = (probe.live or {}).get(status_topic)
    retained_at = _published_at(got.get(status_topic))
    if other is None and arrived is not None and (stamp := _published_at(arrived)) is not None \
            and (retained_at is None or stamp > retained_at):
        # It just arrived: live, whatever time it carries (judged on its own clock, as `edgeci status` does).
        other = live_other_coordinator(arrived, kid, stamp, epoch)
    if other is None and probe.taken_over:
        msg = (f"the broker closed the start-up probe's connection within {TAKEOVER_WATCH_S:.0f} s: on a broker that "
               f"sets client ids from identities (edgeci's secure configs) that is a live coordinator of identity "
               f"{options.own_id!r} (on another host, or another state dir) taking its client id back — the probe displaced "
               "it for a moment, so its status read 'not alive'. Find and stop that one; if the broker or the network "
               "dropped the probe instead, start again")
        if not take_over:
            raise StartRefused(msg)
        log.warning("starting anyway (--take-over): %s", msg)
    if other is not None:
        if take_over:
            log.warning("taking over region %r although its status shows %s live", options.region, other)
        else:
            raise StartRefused(f"region {options.region!r} already has a live {other}; a second coordinator would split its "
                              f"devices. Stop that one, or check --region / --state-dir; if it is gone (crashed, its last "
                              f"will not yet published), start again with --take-over")
    signed = _signed_recall(got.get(recall_topic), recall_topic)
    if signed is not None and signed[0] != kid:
        # helper-98: a mistyped --state-dir (a new key) or another --signing-key started "ready", and the
        # region's devices, which trust the key of the recall they follow, refused every model of it.
        what = (f"this state dir's key {kid}" if kid is not None else f"the new key {options.state_dir} would make")
        msg = (f"the devices of region {options.region!r} follow a coordinator that signs with key {signed[0]} (the "
               f"region's recall: epoch {signed[1].epoch}, release {signed[1].release}), not {what}: they would refuse "
               "every model of this one. Check --state-dir and --signing-key / --bundle; to move the region to this key "
               "on purpose (devices must trust it: a bundle's trusted/, or trust on first use reset), start with --take-over")
        if not take_over:
            raise StartRefused(msg)
        log.warning("taking over region %r with another key (--take-over): %s", options.region, msg)
        return
    recall = signed[1] if fresh and signed is not None else None
    if recall is None or recall.epoch == 0:
        return
    if take_over:
        log.warning("taking over region %r: its devices follow epoch %d (release %d) of another state dir with this key; they "
                    "move to this new state dir's version 0", options.region, recall.epoch, recall.release)
        return
    raise StartRefused(f"the devices of region {options.region!r} follow another state dir signed with this key (its last "
                      f"recall: epoch {recall.epoch}, release {recall.release} then); starting on the new state dir {options.state_dir} would move them to its "
                      "version 0 at once. Check --state-dir; if that state dir is lost, start again with --take-over")


def start_daemon(options: CoordinatorOptions, layered: Layered) -> CoordinatorDaemon:
    """Check the options, then build the daemon; a failure while initialising an empty state
    dir removes what it wrote there, so that a retry with other options starts afresh."""
    check_before_start(options, layered)
    check_take_over(options, bool(getattr(layered.args, "take_over", False)))
    state_dir = Path(options.state_dir)
    before, missing_from = _entries(state_dir), _first_missing(state_dir)
    try:
        daemon = CoordinatorDaemon(options)
    except StateDirLocked:
        raise  # another coordinator's state dir: never touch it
    except OSError as exc:  # a full or failing disk at start: said, not a traceback
        _undo_failed_init(state_dir, before, missing_from)
        where = f" ({exc.filename})" if exc.filename else ""
        raise ConfigError(f"cannot start on state dir {state_dir}: {exc.strerror or exc}{where}; "
                          "free space or fix the disk, then start again") from exc
    except BaseException:
        _undo_failed_init(state_dir, before, missing_from)
        raise
    record_region(state_dir, options.region)
    return daemon


# ---------------------------------------------------------------------- SIGHUP


_SECRET_FIELDS = frozenset({"auth"})
"""CoordinatorOptions fields whose values never appear in a log line."""


def reconfigure_strategy(strategy: Strategy, changes: Mapping[str, Any]) -> None:
    """Apply strategy parameter ``changes`` live, or raise ConfigError naming what cannot be.
    Call on the actor thread (the strategy belongs to the core)."""
    config = getattr(strategy, "config", None)
    was = getattr(config, "staleness", None)
    if "staleness" in changes and changes["staleness"] != was and (was in CONVERSIONS or changes["staleness"] in CONVERSIONS):
        # the core's conversions (worker, versions kept) are set up at the start: only the strategy would change
        raise ConfigError(f"strategy {strategy.name!r} cannot change staleness from {was!r} to {changes['staleness']!r} "
                          "while running (a converting policy is set up at the start)")
    hook = getattr(strategy, "reconfigure", None)
    if callable(hook):
        hook(**changes)
        return
    live = LIVE_STRATEGY_PARAMS.get(type(strategy), frozenset())
    fixed = sorted(set(changes) - live)
    if fixed:
        raise ConfigError(f"strategy {strategy.name!r} cannot change {', '.join(fixed)} while running")
    config = getattr(strategy, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise ConfigError(f"strategy {strategy.name!r} has no config to change")
    try:
        new = dataclasses.replace(config, **changes)  # type: ignore[type-var]  # validates in __post_init__
    except TypeError as exc:
        raise ConfigError(f"strategy {strategy.name!r}: {exc}") from exc
    strategy.config = new  # type: ignore[attr-defined]


def _on_actor(daemon: CoordinatorDaemon, fn: Callable[[], None], timeout: float = 10.0) -> None:
    """Run ``fn`` on the daemon's actor thread and wait for it; re-raise its error here. Not
    begun within ``timeout``: it never runs (the ConfigError says so; a call left queued once
    applied the change after the log said it could not); begun: waited for to its end."""
    done = threading.Event()
    errors: list[BaseException] = []
    decided = threading.Lock()  # one of the actor (runs it) and the timeout (cancels it) takes it, once
    state = ["queued"]

    def call() -> None:
        with decided:
            if state[0] != "queued":
                return  # the signal's thread gave up on it: never applied
            state[0] = "running"
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    daemon.actor.call(call)
    if not done.wait(timeout):
        with decided:
            cancelled = state[0] == "queued"
            if cancelled:
                state[0] = "cancelled"
        if cancelled:
            raise ConfigError(f"the coordinator did not apply the change within {timeout:.0f} s (busy); try again")
        done.wait()  # begun just now: it ends soon (a strategy's reconfigure and a re-plan)
    if errors:
        raise errors[0]


def reload(daemon: CoordinatorDaemon, layered: Layered,
           resolve_again: Callable[[], Layered], apply_logging: Callable[[str | None, str | None], None],
           *, metrics: tuple[str, int] | None = None) -> Layered:
    """SIGHUP: re-read the config file; apply what can change live, log what cannot. Never raises.
    An invalid value anywhere (a strategy parameter too) keeps the whole running config.
    ``metrics`` is the running metrics server's (host, port) (default: the previous file's)."""
    try:
        fresh = resolve_again()
        new = options_from(fresh.args, fresh)
        check_method(new)  # e.g. [strategy] k = 0: invalid, not "needs a restart"
    except (EdgeciError, OSError, ValueError) as exc:
        log.error("SIGHUP: config not reloaded, keeping the running one: %s", exc)
        return layered
    old_args = layered.args
    for key in ("log_level", "log_format"):
        before, after = getattr(old_args, key, None), getattr(fresh.args, key, None)
        if after != before:
            apply_logging(fresh.args.log_level, fresh.args.log_format)
            log.warning("SIGHUP: %s changed from %s to %s", key, before, after)
    for k, v in sorted(fresh.strategy_params.items()):  # the file's [strategy] value that a flag/env/--param beats
        if k in new.strategy_params and new.strategy_params[k] != v:
            dest = STRATEGY_FLAGS.get(k)
            by = f"{_flag(dest)} ({fresh.sources.get(dest)})" if dest is not None and fresh.given(dest) else "--param"
            log.warning("SIGHUP: [strategy] %s = %r in the config file does not apply: %s sets it to %r "
                        "(restart without it to use the file)", k, v, by, new.strategy_params[k])
    current = daemon.options
    changes = {k: v for k, v in new.strategy_params.items() if current.strategy_params.get(k) != v}
    removed = sorted(set(current.strategy_params) - set(new.strategy_params))
    for k in removed:
        log.warning("SIGHUP: cannot reload strategy parameter %s (removed) without a restart", k)
    if changes:
        changed = dataclasses.replace(current, strategy_params={**current.strategy_params, **changes})

        def apply() -> None:
            # On the actor, both: the core that runs now (a rebuild after a storage or core failure
            # replaces it, and its strategy), and the options the next rebuild builds from.
            reconfigure_strategy(daemon.core.strategy, changes)
            daemon.options = changed
            daemon.core.refresh_policy()  # the core judges stale updates by the new bound / convert_beyond too
            daemon.actor.run_actions(daemon.core.start(daemon.clock.now()))  # re-plan, re-arm, new status

        try:
            _on_actor(daemon, apply)
        except (EdgeciError, ValueError) as exc:
            for k in sorted(changes):
                log.warning("SIGHUP: cannot reload strategy parameter %s without a restart (%s)", k, exc)
        else:
            current = changed
            for k, v in sorted(changes.items()):
                log.warning("SIGHUP: strategy parameter %s is now %r", k, v)
    if new.release_spread_s != current.release_spread_s:  # sent with the next release's announcement
        respread = dataclasses.replace(current, release_spread_s=new.release_spread_s)

        def apply_spread() -> None:  # the running core and the options a rebuild builds from
            daemon.core.config = dataclasses.replace(daemon.core.config, release_spread_s=respread.release_spread_s)
            daemon.options = respread

        try:
            _on_actor(daemon, apply_spread)
        except (EdgeciError, ValueError) as exc:
            log.warning("SIGHUP: cannot reload release_spread without a restart (%s)", exc)
        else:
            log.warning("SIGHUP: release_spread is now %d s (from %d s; sent with the next release's announcement)",
                        respread.release_spread_s, current.release_spread_s)
            current = respread
    for f in dataclasses.fields(CoordinatorOptions):
        if f.name == "strategy_params":
            continue
        if getattr(new, f.name) != getattr(current, f.name):
            if f.name in _SECRET_FIELDS:  # never log credentials
                log.warning("SIGHUP: cannot reload %s without a restart", f.name)
            else:
                log.warning("SIGHUP: cannot reload %s without a restart (running %r, file says %r)",
                            f.name, getattr(current, f.name), getattr(new, f.name))
    running = metrics or (getattr(old_args, "metrics_host", None), getattr(old_args, "metrics_port", None))
    for key, value in zip(("metrics_host", "metrics_port"), running, strict=True):
        if getattr(fresh.args, key, None) != value:  # against the running server, not the previous file
            log.warning("SIGHUP: cannot reload %s without a restart (running %r, file says %r)",
                        key, value, getattr(fresh.args, key, None))
    log.info("SIGHUP: config reloaded%s", f" from {fresh.config_path}" if fresh.config_path else " (no config file)")
    return fresh


# ---------------------------------------------------------------------- run


def _shutdown(daemon: CoordinatorDaemon) -> None:
    """SIGTERM is served before queued work: stop without draining the inbox (what is not
    acknowledged yet is retried by the devices), where the daemon offers it."""
    stop: Callable[..., None] = daemon.stop
    if "drain" in inspect.signature(stop).parameters:
        stop(drain=False)
    else:
        stop()


def _probes(daemon: CoordinatorDaemon) -> tuple[Callable[[], tuple[bool, dict[str, Any]]], Callable[[], tuple[bool, dict[str, Any]]]]:
    def health() -> tuple[bool, dict[str, Any]]:
        alive = daemon.actor.alive
        return alive, {"actor_alive": alive, "coordinator": daemon.coordinator_id}

    def ready() -> tuple[bool, dict[str, Any]]:
        snap = daemon.metrics.snapshot
        # (None before the first snapshot: not known yet, not failing; "not started" says why)
        storage_ok = bool(snap.extra.get("storage_ok", True)) if snap is not None else None
        connected = daemon.transport.connected
        why = [w for w, bad in (("not connected to the broker", not connected), ("storage is failing", storage_ok is False),
                                ("actor thread is dead", not daemon.actor.alive), ("not started", snap is None)) if bad]
        detail: dict[str, Any] = {"broker_connected": connected, "storage_ok": storage_ok, "why": why}
        if snap is not None:
            detail["storage_detail"] = snap.extra.get("storage_detail", "")
            detail["version"] = snap.version
        return not why, detail

    return health, ready


def run(args: argparse.Namespace) -> int:
    layered: Layered = getattr(args, "_layered", None) or Layered(args=args)
    resolve_again: Callable[[], Layered] | None = getattr(args, "_resolve_again", None)
    apply_logging: Callable[[str | None, str | None], None] = getattr(args, "_apply_logging", lambda level, fmt: None)
    # Signals arrive as bytes on a pipe (set_wakeup_fd): no lock is taken inside a handler,
    # and SIGHUP is handled on this thread, where it can never kill the process.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    previous_fd = signal.set_wakeup_fd(wake_w)
    starting = threading.Event()
    starting.set()

    def on_signal(signum: int, frame: object) -> None:
        # Until the daemon is up (pretraining a first model can take minutes) SIGTERM / SIGINT
        # stop the start at once: start_daemon removes what it wrote to a new state dir. After
        # that the wakeup fd carries them to _serve's loop, which shuts down cleanly.
        if starting.is_set() and signum != signal.SIGHUP:
            raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        return _serve(args, layered, resolve_again, apply_logging, wake_r, started=starting.clear)
    except SystemExit as exc:
        if starting.is_set():
            log.info("signal %s during the start: stopped before the coordinator was up (a new state dir is left as it was)",
                     signal.Signals(int(exc.code or 0) - 128).name if isinstance(exc.code, int) and exc.code > 128 else exc.code)
        raise
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)


def _serve(args: argparse.Namespace, layered: Layered, resolve_again: Callable[[], Layered] | None,
           apply_logging: Callable[[str | None, str | None], None], wake_fd: int, *,
           started: Callable[[], None] = lambda: None) -> int:
    with bad_options():
        options = options_from(args, layered)
    if layered.config_path is not None:
        log.info("config file %s", layered.config_path)
    from_env = sorted(k for k, v in layered.sources.items() if v == "env")
    if from_env:
        log.info("from the environment: %s", ", ".join(from_env))
    for name in layered.unknown_env:
        log.warning("ignoring the environment variable %s: edgeci coordinator has no such option", name)
    for line in layered.overridden:
        log.warning("config file value overridden: %s", line)
    daemon = start_daemon(options, layered)
    started()  # from here a signal is read by the loop below (the daemon is stopped cleanly)
    server: MetricsServer | None = None
    try:
        if args.metrics_port:
            health, ready = _probes(daemon)
            server = MetricsServer(daemon.metrics, args.metrics_host, args.metrics_port, health=health, ready=ready).start()
        daemon.start()
        ready_line = (f"coordinator {daemon.coordinator_id} ready: region {options.region}, version {daemon.core.version}, "
                      f"peering {daemon.options.peering}")
        if getattr(args, "log_format", "text") == "json":  # on stdout as before, as a JSON line like the log's
            print(json.dumps({"ts": iso_utc_ms(time.time()), "level": "info", "logger": log.name, "msg": ready_line}), flush=True)
        else:
            print(ready_line, flush=True)
        stop = False
        while not stop:
            for signum in os.read(wake_fd, 64):
                if signum == signal.SIGHUP:
                    if resolve_again is None:
                        log.warning("SIGHUP: nothing to reload (no config resolver)")
                    else:
                        layered = reload(daemon, layered, resolve_again, apply_logging,
                                         metrics=(args.metrics_host, args.metrics_port))
                elif signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("signal %s: shutting down", signal.Signals(signum).name)
                    stop = True
                    break
    finally:
        _shutdown(daemon)
        if server is not None:
            server.stop()
    log.info("stopped cleanly at version %d", daemon.core.version)
    return 0
