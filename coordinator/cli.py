"""``edgeci coordinator`` — run a regional coordinator until SIGTERM / Ctrl-C.

Several regions, each with its own coordinator, exchange models with ``--peering``::

    edgeci coordinator --region eu --id eu --state-dir st/eu --peering spyker --peers eu,us,ap
    edgeci coordinator --region us --id us --state-dir st/us --peering spyker --peers eu,us,ap
    ...

``--peers`` is the ring order (every coordinator lists the same ring). With a peering and
no ``--strategy``, the strategy of the same name is used (spyker, nebula, hierfavg).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from coordinator.peering import PEERINGS
from coordinator.strategies import strategy_names
from edge_sdk.errors import ConfigError

log = logging.getLogger("edgeci.coordinator")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="MQTT broker URL")
    p.add_argument("--region", default="default", help="region id; devices of this region talk to this coordinator")
    p.add_argument("--state-dir", type=Path, required=True, help="durable state: versions, pending updates (resumed on restart)")
    p.add_argument("--model", default="digits", help="task / model served")
    p.add_argument("--id", dest="coordinator_id", default="", help="coordinator id (default: coord-REGION)")
    p.add_argument("--strategy", default=None, choices=strategy_names(), help="aggregation strategy (default: spin, or the peering's own)")
    p.add_argument("--k", type=int, default=10, help="aggregate when K updates are buffered (SPIN, FedBuff)")
    p.add_argument("--timeout", type=float, default=30.0, help="SPIN timeout π in seconds")
    p.add_argument("--combine", choices=["models", "deltas"], default="models", help="SPIN: average the buffered models (the paper's rule, default) or apply each update's delta from its own base version (faster on digits, unstable with stale detection updates)")
    p.add_argument("--full-sync-every", type=int, default=0, metavar="T", help="LASP: full model every T versions, classifier-only versions (and device traffic) in between; 0 = off")
    p.add_argument("--init", type=Path, help="deployed model file (.npz from `edgeci pretrain`) for an empty state dir")
    p.add_argument("--encoding", choices=["f4", "f2", "i1"], default="f4", help="tensor encoding of models sent to devices")
    p.add_argument("--epochs", type=float, help="training hint sent to devices: local epochs")
    p.add_argument("--lr", type=float, help="training hint sent to devices: learning rate")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("peering between regional coordinators")
    g.add_argument("--peering", default="none", choices=PEERINGS, help="model exchange with other coordinators")
    g.add_argument("--peers", default="", help="comma-separated coordinator ids in ring order, this one included")
    g.add_argument("--eta", type=float, help="spyker: server rate η_i for client updates (0.6)")
    g.add_argument("--decay-beta", type=float, help="spyker: client learning-rate decay β (0.05)")
    g.add_argument("--h-inter", type=float, help="spyker: age-spread trigger (default n_clients / 5n)")
    g.add_argument("--h-intra", type=float, help="spyker: own-age trigger since the last sync (350)")
    g.add_argument("--phi", type=float, help="spyker: sigmoid activation φ (1.5)")
    g.add_argument("--eta-a", type=float, help="spyker: server aggregation rate η_a (0.6)")
    g.add_argument("--n-clients", type=int, help="spyker: total clients for the default h_inter")
    g.add_argument("--beacon", type=float, help="spyker: seconds between beats (1.0)")
    g.add_argument("--token-timeout", type=float, help="spyker: regenerate the token after this silence (5.0)")
    g.add_argument("--stagger", type=float, help="spyker: extra wait per ring rank when regenerating (1.0)")
    g.add_argument("--sync-timeout", type=float, help="spyker / hierfavg: stop waiting for peers' models after this long")
    g.add_argument("--rotation", type=float, help="nebula: rotation interval t_c in seconds (60)")
    g.add_argument("--planets", type=int, help="nebula: planet models per coordinator (4)")
    g.add_argument("--cloud", help="hierfavg: the coordinator that averages the edges (default: first of --peers)")
    g.add_argument("--kappa2", type=int, help="hierfavg: edge rounds per cloud round (2)")


def _given(args: argparse.Namespace, pairs: tuple[tuple[str, str], ...]) -> dict[str, object]:
    """``{param: value}`` for the flags the user gave (unset flags keep the defaults)."""
    return {param: getattr(args, attr) for param, attr in pairs if getattr(args, attr, None) is not None}


def options_from(args: argparse.Namespace) -> CoordinatorOptions:
    peering = args.peering
    strategy = args.strategy or (peering if peering in ("spyker", "nebula", "hierfavg") else "spin")
    params: dict[str, object] = {}
    if strategy in ("spin", "spin-notimeout", "fedbuff", "port"):
        params["k"] = args.k
    if strategy == "spin":
        params["timeout_s"] = args.timeout
        params["combine"] = args.combine
    elif strategy == "spyker":
        params.update(_given(args, (("eta", "eta"), ("decay_beta", "decay_beta"), ("lr_init", "lr"))))
    elif strategy == "nebula":
        params.update(_given(args, (("planets", "planets"), ("t_c", "rotation"))))
    peers = tuple(c.strip() for c in args.peers.split(",") if c.strip())
    if peering == "none" and peers:
        raise ConfigError("--peers needs --peering spyker|nebula|hierfavg")
    peer_params: dict[str, object] = {}
    if peering == "spyker":
        peer_params = _given(args, (
            ("h_inter", "h_inter"), ("h_intra", "h_intra"), ("phi", "phi"), ("eta_a", "eta_a"), ("n_clients", "n_clients"),
            ("beacon_s", "beacon"), ("token_timeout_s", "token_timeout"), ("stagger_s", "stagger"), ("sync_timeout_s", "sync_timeout"),
        ))
    elif peering == "nebula":
        peer_params = _given(args, (("t_c", "rotation"),))
    elif peering == "hierfavg":
        peer_params = _given(args, (("cloud", "cloud"), ("kappa2", "kappa2"), ("sync_timeout_s", "sync_timeout")))
    hints = {k: float(v) for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None}
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
    )


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger("edgeci").setLevel(logging.INFO)
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    daemon = CoordinatorDaemon(options_from(args))
    done = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    daemon.start()
    print(f"coordinator {daemon.coordinator_id} ready: region {args.region}, version {daemon.core.version}, "
          f"peering {daemon.options.peering}", flush=True)
    done.wait()
    daemon.stop()
    log.info("stopped cleanly at version %d", daemon.core.version)
    return 0
