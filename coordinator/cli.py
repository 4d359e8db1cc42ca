"""``edgeci coordinator`` — run a regional coordinator until SIGTERM / Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from coordinator.strategies import strategy_names

log = logging.getLogger("edgeci.coordinator")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="MQTT broker URL")
    p.add_argument("--region", default="default", help="region id; devices of this region talk to this coordinator")
    p.add_argument("--state-dir", type=Path, required=True, help="durable state: versions, pending updates (resumed on restart)")
    p.add_argument("--model", default="digits", help="task / model served")
    p.add_argument("--id", dest="coordinator_id", default="", help="coordinator id (default: coord-REGION)")
    p.add_argument("--strategy", default="spin", choices=strategy_names(), help="aggregation strategy")
    p.add_argument("--k", type=int, default=10, help="aggregate when K updates are buffered (SPIN, FedBuff)")
    p.add_argument("--timeout", type=float, default=30.0, help="SPIN timeout π in seconds")
    p.add_argument("--combine", choices=["models", "deltas"], default="models", help="SPIN: average buffered models (paper) or apply their deltas")
    p.add_argument("--init", type=Path, help="deployed model file (.npz from `edgeci pretrain`) for an empty state dir")
    p.add_argument("--encoding", choices=["f4", "f2", "i1"], default="f4", help="tensor encoding of models sent to devices")
    p.add_argument("--epochs", type=float, help="training hint sent to devices: local epochs")
    p.add_argument("--lr", type=float, help="training hint sent to devices: learning rate")
    p.add_argument("--seed", type=int, default=0)


def options_from(args: argparse.Namespace) -> CoordinatorOptions:
    params: dict[str, object] = {"k": args.k}
    if args.strategy == "spin":
        params["timeout_s"] = args.timeout
        params["combine"] = args.combine
    hints = {k: float(v) for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None}
    return CoordinatorOptions(
        broker=args.broker,
        region=args.region,
        state_dir=args.state_dir,
        model=args.model,
        coordinator_id=args.coordinator_id,
        strategy=args.strategy,
        strategy_params=params,
        init=args.init,
        encoding=args.encoding,
        hints=hints,
        seed=args.seed,
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
    print(f"coordinator {daemon.coordinator_id} ready: region {args.region}, version {daemon.core.version}", flush=True)
    done.wait()
    daemon.stop()
    log.info("stopped cleanly at version %d", daemon.core.version)
    return 0
