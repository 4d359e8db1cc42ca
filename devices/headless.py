"""``edgeci device`` — one headless device whose emulated user labels its share of the
task's pool at Poisson times, through the real SDK (store, core, MQTT, trainer).

The share is a Dirichlet(α) split of a classifier's pool, an IID one of frames with boxes
(a frame has no one label to skew by: :func:`fleet_partition`); local training uses the
task's own defaults unless ``--epochs`` / ``--lr`` say otherwise (:func:`fleet_train_config`).
``edgeci run`` partitions and trains its devices with the same two functions."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.config import bounded, task_arg, topic_id
from devices.live import LabellingLoop, LabellingUser, device_index, labelling_stream
from devices.partition import Partition, partition
from edge_sdk.client import EdgeClient, check_device_bundle
from edge_sdk.errors import ConfigError
from edge_sdk.mqtt import (
    ANY_REGION,
    KEEPALIVE_HELP,
    KEEPALIVE_MAX_S,
    KEEPALIVE_MIN_S,
    KEEPALIVE_RULE,
    KEEPALIVE_S,
    TOFU_DEVICES,
    add_broker_arguments,
    auth_from_args,
    read_bundle,
)
from edge_sdk.runtime import iso_utc_ms
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.tasks.registry import default_train_config, sample_kind_of

log = logging.getLogger("edgeci.device")

DEFAULT_LOG_LEVEL = "info"
"""What ``edgeci device`` logs unless ``--log-level`` says otherwise: its progress lines."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Every number is checked here, so a nonsense value is one line naming its flag (exit 2),
    # not a traceback from deep inside the partition, the labelling loop or the SDK.
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="MQTT broker URL: mqtts://HOST[:8883] with --bundle in production")
    add_broker_arguments(p, trust=TOFU_DEVICES)
    p.add_argument("--keepalive", type=bounded(int, KEEPALIVE_MIN_S, at_most=KEEPALIVE_MAX_S, rule=KEEPALIVE_RULE), default=KEEPALIVE_S, metavar="S",
                   help=KEEPALIVE_HELP)
    p.add_argument("--region", type=topic_id, default=None, help="region of the coordinator to use (default: the --bundle's region when it "
                   "was issued for one, else 'default')")
    p.add_argument("--device-id", type=topic_id, required=True, help="this device's id (1-64 of A-Z a-z 0-9 _ . -)")
    p.add_argument("--dataset", "--model", dest="model", metavar="TASK", default="digits", type=task_arg,
                   help="task whose pool is labelled: a built-in task, or an app's own as package.module:Name (on PYTHONPATH) "
                        "or an edgeci.tasks entry point")
    p.add_argument("--data-dir", type=Path, help="SDK data dir (default: $EDGECI_HOME/devices/DEVICE_ID, EDGECI_HOME defaulting to ~/.edgeci)")
    p.add_argument("--fleet-size", type=bounded(int, 1), default=20, help="the pool is split into this many partitions")
    p.add_argument("--partition", type=bounded(int, 0), help="partition index, 0 to fleet size - 1 (default: from the device id)")
    p.add_argument("--alpha", type=bounded(float, 0, strict=True, finite=True), default=1.0,
                   help="Dirichlet α of a classifier's partition (detection's frames with boxes are split IID: α is unused)")
    p.add_argument("--rate", type=bounded(float, 0, strict=True, finite=True), default=0.5, help="labels per second (Poisson)")
    p.add_argument("--min-samples", type=bounded(int, 1), help="D_min before the first pull (default: the task's, edge_sdk/tasks/registry.py)")
    p.add_argument("--epochs", type=bounded(int, 1), help="local epochs per round, unless the coordinator's hints say otherwise "
                   "(default: the task's — digits, gestures 2; detection 5; edge_sdk/tasks/registry.py)")
    p.add_argument("--lr", type=bounded(float, 0, strict=True, finite=True),
                   help="local learning rate, unless the coordinator's hints say otherwise (default: the task's — digits, "
                        "gestures 0.05 (SGD); detection 0.001 (AdamW))")
    p.add_argument("--duration", type=bounded(float, 0), default=0.0, help="stop after this many seconds (0: run until the partition is labelled, then keep serving)")
    p.add_argument("--seed", type=bounded(int, 0), default=0, help="seed of the partition, the labelling times and local training")
    p.add_argument("--refresh", type=bounded(float, 0, rule="must be above 0 (or 0: off)", finite=True), default=3600.0, metavar="SECONDS",
                   help="an idle device (no pull for this long, ±10%%) asks for the current release, so it keeps "
                        "serving the newest one after its labelling ends (default: 3600; 0: off)")
    p.add_argument("--release-spread", type=_spread, default=300.0, metavar="SECONDS",
                   help="an idle device also hears of each new release (its coordinator's retained recall) and fetches "
                        "it at a random time within this long, at most once per this long (default: 300; 0: at once; "
                        "off: only --refresh and its own pulls bring releases)")


def _spread(text: str) -> float | None:
    """``--release-spread``: seconds (0: at once) or ``off``."""
    return None if text.strip().lower() == "off" else float(bounded(float, 0, finite=True, rule="must be at least 0 (or off)")(text))


def check_partition(args: argparse.Namespace) -> None:
    """The options' cross-checks that need no data: ``--partition`` names one of ``--fleet-size``'s."""
    if args.partition is not None and args.partition >= args.fleet_size:
        raise ConfigError(f"--partition {args.partition} is not a partition of --fleet-size {args.fleet_size}: "
                          f"they are numbered 0 to {args.fleet_size - 1}")


def fleet_partition(task: Any, labels: npt.NDArray[Any], n_devices: int, *, alpha: float, seed: int) -> Partition:
    """A fleet's shares of the pool (``labels``, its ``y``): Dirichlet(``alpha``) by class label, or
    IID for a task whose samples are frames with boxes — the one split they have (a frame shows
    several classes; the emulator's scenarios refuse the others for them too)."""
    if sample_kind_of(task) == "frame":
        return partition(labels, n_devices, "iid", seed=seed)
    return partition(labels, n_devices, "dirichlet", alpha=alpha, seed=seed)


def fleet_train_config(task: Any, *, epochs: int | None, lr: float | None, seed: int) -> TrainConfig:
    """Local training as ``EdgeClient`` does it by default — the task's own configuration
    (:func:`~edge_sdk.tasks.registry.default_train_config`: digits and gestures 2 epochs of SGD at
    0.05, detection 5 of AdamW at 1e-3) — with ``epochs`` / ``lr`` where the user gave them."""
    own = default_train_config(task)
    return dataclasses.replace(own, epochs=own.epochs if epochs is None else epochs, lr=own.lr if lr is None else lr, seed=seed)


def below_d_min(shares: list[int], d_min: int, fewer: str = "--fleet-size") -> str | None:
    """A note when some devices' shares of the pool (their sample counts) are below D_min: such
    a device labels its whole share and never pulls, so it never trains (helper-94: detection's
    D_min is 64, and `edgeci run`'s 20 devices got about 10 frames each)."""
    short = [n for n in shares if n < d_min]
    if not short:
        return None
    who = "this device's share" if len(shares) == 1 else f"{len(short)} of {len(shares)} devices' shares"
    return (f"{who} of the pool ({min(short)}{'' if len(short) == 1 else f'-{max(short)}'} samples) "
            f"{'is' if len(short) == 1 else 'are'} below D_min {d_min}: such a device labels them all and never "
            f"trains; use fewer devices ({fewer}) or a smaller --min-samples")


def device_partition(args: argparse.Namespace, labels: npt.NDArray[Any], task: Any = None) -> tuple[int, npt.NDArray[np.int64]]:
    """This device's partition index and its samples' indices into the pool (``labels``, its ``y``,
    split by :func:`fleet_partition` for ``task``, default ``args.model``); a partition without
    samples is an error (its device would label nothing, silently)."""
    pool_size = len(labels)
    if args.fleet_size > pool_size:
        raise ConfigError(f"--fleet-size {args.fleet_size}: the {args.model} pool has {pool_size} samples, so at most "
                          f"{pool_size} devices (each partition needs a sample)")
    index = args.partition if args.partition is not None else device_index(args.device_id, args.fleet_size)
    idx = fleet_partition(args.model if task is None else task, labels, args.fleet_size, alpha=args.alpha, seed=args.seed)[index]
    if not len(idx):
        raise ConfigError(f"partition {index} of --fleet-size {args.fleet_size} has no samples: Dirichlet α={args.alpha:g} "
                          f"(--alpha) with --seed {args.seed} gave it none of the {args.model} pool's {pool_size}; a larger "
                          f"--alpha, another --seed or a smaller --fleet-size gives it some")
    return index, idx


def _plain(value: object) -> object:
    """``value`` as strict JSON can hold it: numpy scalars as numbers, NaN and ±inf as null."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    item = getattr(value, "item", None)  # a numpy scalar
    if callable(item) and not isinstance(value, str | bytes):
        value = item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


REFUSAL_HINTS = {
    "bad_signature": " — the coordinator signs with a key this device does not trust: its key changed (a state dir lost "
                     "with the key in it, under trust on first use?). Give the device a bundle whose trusted/ has the "
                     "coordinator's key (`--bundle`): provisioned keys replace the pinned one",
    "epoch_older": " — the coordinator numbers its versions in an older epoch than this device has seen: its operator "
                   "runs `edgeci new-epoch --state-dir DIR --above EPOCH` (EPOCH: `edgeci status`)",
    "unsigned": " — models must be signed by the coordinator",
    "extractor_mismatch": " — a LASP head built on a newer full sync than the model this device holds (a replayed or "
                          "misrouted reply): refused; the answer to its pull brings the whole model",
}


def run(args: argparse.Namespace) -> int:
    check_partition(args)
    manifest = read_bundle(args.bundle) if args.bundle is not None else {}
    if args.region is None:  # the bundle's one region: `--bundle PKI/bundles/headset-7` alone is enough
        allowed = manifest.get("regions")
        if isinstance(allowed, list) and len(allowed) > 1 and ANY_REGION not in allowed:
            raise ConfigError(f"bundle {args.bundle} is for regions {', '.join(map(str, allowed))}: pick one with --region")
        args.region = allowed[0] if isinstance(allowed, list) and len(allowed) == 1 and allowed[0] != ANY_REGION else "default"
    if args.bundle is not None:  # (before the data dir is made; EdgeClient checks it again)
        check_device_bundle(Path(args.bundle).expanduser(), manifest, args.device_id, [args.region])
    task = get_task(args.model)
    data = task.data()
    index, idx = device_partition(args, data.pool.y, task)
    data_dir = args.data_dir  # None: the SDK's $EDGECI_HOME/devices/<id>
    client = EdgeClient(
        broker=args.broker,
        device_id=args.device_id,
        region=args.region,
        task=task,
        data_dir=data_dir,
        min_samples=args.min_samples,
        train=fleet_train_config(task, epochs=args.epochs, lr=args.lr, seed=args.seed),
        seed=args.seed,
        auth=auth_from_args(args),
        bundle=args.bundle,
        refresh_s=args.refresh or None,
        release_spread_s=args.release_spread,
        keepalive_s=args.keepalive,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())

    json_lines = getattr(args, "log_format", "text") == "json"
    threshold = logging.getLevelName(str(getattr(args, "log_level", None) or DEFAULT_LOG_LEVEL).upper())

    def say(event: str, text: str, data: Mapping[str, object] | None = None, level: str = "info") -> None:
        """A line for whoever runs the device, on stdout: ``[id] text``, or with ``--log-format json``
        one JSON object (the log's keys ts, level, logger, msg, and device, event, data). Below
        ``--log-level`` (``--log-level warning``: only the warnings and errors) nothing is printed."""
        if logging.getLevelName(level.upper()) < threshold:
            return
        if not json_lines:
            print(f"[{args.device_id}] {text}", flush=True)
            return
        line = {"ts": iso_utc_ms(time.time()), "level": level, "logger": log.name,
                "msg": text, "device": args.device_id, "event": event, **({"data": _plain(data)} if data is not None else {})}
        print(json.dumps(line, default=str, ensure_ascii=False, allow_nan=False), flush=True)

    def show(kind: str, data: dict[str, object]) -> None:
        say(kind, f"{kind}: {data}", data, "warning" if kind in ("training_failed", "update_rejected") else "info")

    for kind in ("model", "trained", "update_acked", "update_rejected", "deferred", "training_failed", "failover", "epoch"):
        client.on(kind, show)

    def unanswered(kind: str, data: dict[str, object]) -> None:  # say so once, not silence for ever
        attempt = data.get("attempt")
        if isinstance(attempt, int) and attempt in (1, 10, 100):
            say(kind, f"no answer to its {data.get('what')} from a coordinator of region {args.region!r} "
                      f"yet (attempt {attempt}); is one running there, and does it drop this device's pulls (its log, "
                      f"rate_limited)? `edgeci status --broker {args.broker} --region {args.region}`", data, "warning")

    client.on("retry", unanswered)

    older_seen: set[object] = set()

    def older(kind: str, data: dict[str, object]) -> None:  # once per version served
        if data.get("version") not in older_seen:
            older_seen.add(data.get("version"))
            say(kind, f"the coordinator of region {args.region!r} serves version {data.get('version')}, older "
                      f"than version {data.get('held')} this device holds: its state dir was probably restored from a backup. "
                      f"This device waits for a newer one; its operator gets the fleet going again with `edgeci new-epoch` "
                      f"(see its --help)", data, "warning")

    client.on("model_older", older)
    rejected: dict[object, int] = {}

    def refused(kind: str, data: dict[str, object]) -> None:  # the 1st, 10th, 100th… of each reason: not silence
        reason = data.get("reason")
        rejected[reason] = n = rejected.get(reason, 0) + 1
        if n in (1, 10, 100, 1000):
            say(kind, f"refused a message ({n}× so far): {reason}: {str(data.get('detail'))[:300]}"
                      f"{REFUSAL_HINTS.get(str(reason), '')}", data, "warning")

    client.on("message_rejected", refused)
    already = client.store.stats().added
    stream, add = labelling_stream(task, data.pool, idx[already:], client)
    user = LabellingUser(name=args.device_id, stream=stream, add=add, rate=args.rate)
    client.start()
    say("started", f"device {args.device_id}: partition {index}/{args.fleet_size} ({len(idx)} samples, {already} already "
                   f"labelled), D_min {client.core.config.min_samples}, {args.rate:g} labels/s, broker {args.broker}")
    short = below_d_min([len(idx)], client.core.config.min_samples)
    if short is not None:
        say("note", short, level="warning")
    loop = LabellingLoop([user], seed=args.seed + index).start()
    t0 = time.monotonic()
    reported = 0
    while not done.wait(1.0):
        errors = loop.errors  # samples the store refused (a full disk?): the 1st, 10th, 100th… said, not silence
        for n in range(reported + 1, len(errors) + 1):
            if n in (1, 10, 100, 1000) or n % 10000 == 0:
                exc = errors[n - 1]
                say("labelling_failed", f"a sample was not stored ({n}× so far): {type(exc).__name__}: {str(exc)[:300]}",
                    {"failures": n, "error": type(exc).__name__}, "error")
        reported = len(errors)
        if args.duration and time.monotonic() - t0 >= args.duration:
            break
    loop.stop()
    stored = client.store.stats().added  # (stop() closes the store)
    client.stop()
    # (a SIGINT / SIGTERM ended it without a word: what it did and where its data is, from the client's counters)
    say("stopped", *stopped_line(loop.labelled, client.core.state.updates_acked, client.version, client.data_dir, stored,
                                 duplicate_id=client.duplicate_id))
    return 0


def stopped_line(labelled: int, acked: int, version: int | None, data_dir: Path | None, stored: int, *,
                 duplicate_id: bool) -> tuple[str, dict[str, Any]]:
    """The last line: what the run did and where its data is (text, and the JSON line's fields). A
    device that found its id used by another (a cloned image) says so again here: its ERROR came
    once, maybe hours before."""
    model = "no model yet" if version is None else f"model v{version}"
    clone = "; ANOTHER DEVICE USES THIS ID (see the duplicate_id error above)" if duplicate_id else ""
    text = (f"stopped: {labelled} samples labelled, {acked} update(s) acknowledged this run, {model}; "
            f"data in {data_dir} ({stored} samples stored){clone}")
    return text, {"labelled": labelled, "stored": stored, "updates_accepted": acked, "version": version,
                  "data_dir": str(data_dir), "duplicate_id": duplicate_id}
