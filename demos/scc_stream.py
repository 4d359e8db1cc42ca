"""SCC on streaming non-IID data: no cache vs cached features vs SCC (HFedMS setting).

Setting
-------
Every device sees each of its samples exactly once, as part of a stream that drifts over
the classes. Each seed draws an order of the classes; class c is "in season" around
t_c = (rank(c) + ½) / C of the run, and every pool sample of class c arrives at round
⌊(t_c + ε)·R⌋ (ε ~ N(0, σ²), clipped to the run). The pool is split over the devices by a
Dirichlet(α) label skew (``devices.partition``), so devices hold different label mixes
and together follow the same seasonal drift. A device trains on its batch of the round
and then forgets the raw samples; only a cache of features may remember them.

Every round is one synchronous FedAvg round through the real
:class:`~coordinator.core.CoordinatorCore` (SPIN strategy, K = all devices, the round
closes at a timeout), with LASP ``full_sync_every = T``: versions T, 2T, … are full syncs,
the others are calibration rounds in which devices receive, train and send only the
classifier. Messages are really encoded and decoded, so the byte counts are real.

Methods (same streams, same seeds):

* ``fedavg`` — full model every round (no LASP), no cache: the paper's FedAvg baseline.
* ``lasp``   — LASP; calibration rounds train the classifier on the current batch only.
* ``cache``  — LASP; calibration rounds add the cached features *without* compensation.
* ``scc``    — LASP + SCC: cached features compensated by Δ_c after each extractor change.
* ``oracle`` — LASP; cached features re-extracted exactly after each extractor change
  (needs the raw samples a streaming device does not keep: an upper bound for SCC).

Metrics: test accuracy of the global model after every round, and the accuracy on the
test samples of the *early classes* (the first ``--early-classes`` of the season order).
"learned" is the first round by which 95 % of the early-class samples have arrived;
forgetting = early-class accuracy at that round − early-class accuracy at the end.

Why not the fleet emulator: ``devices.simulator`` runs ``Task.local_update`` over all of a
device's samples so far (SPIN keeps every sample), builds its coordinator without
``full_sync_every``, and has no hook for per-device training logic such as SCC; this
runner keeps the real coordinator core and wire codec and replaces only the device side.

``--client``: the devices are :class:`~edge_sdk.client.EdgeClient` objects with SCC on
(``SccConfig(keep_raw=0, compensate=...)``, methods ``cache`` and ``scc``), never connected:
each round's batch goes in with ``add_sample`` and the job runs through
``EdgeClient.run_training_job`` (what the client's trainer thread runs: compensation, numpy
head calibration on current + cached features, age-out into the cache). Its accuracy curves
match the standalone devices' exactly (checked on seed 0). ``--quick`` is ``--client`` on a
smaller fleet and run, 3 seeds.

    edgeci scc-stream --seeds 0-4          (or: python -m demos.scc_stream --seeds 0-4)
    edgeci scc-stream --quick
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.core import CoordinatorConfig, CoordinatorCore, Snapshot
from coordinator.strategies import make_strategy
from devices.partition import dirichlet, iid
from edge_sdk.client import EdgeClient
from edge_sdk.core.events import MessageReceived, Publish, TimerFired, TrainingJob
from edge_sdk.errors import ConfigError
from edge_sdk.scc import SccConfig, SemanticCache
from edge_sdk.spec import FULL, Vector
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import Split, TrainConfig
from edge_sdk.trainer import ClassifierTask, configure_threads
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import ModelMsg, Pull, Update

__all__ = [
    "METHODS",
    "MethodRun",
    "StreamSettings",
    "Streams",
    "add_arguments",
    "format_paired",
    "format_table",
    "make_streams",
    "paired",
    "run",
    "run_method",
    "summarise",
]

METHODS: dict[str, str] = {
    "fedavg": "FedAvg, full model every round, no cache",
    "lasp": "LASP, no cache",
    "cache": "LASP + cached features, no compensation",
    "scc": "LASP + SCC (compensated cache)",
    "oracle": "LASP + exactly re-extracted cache (upper bound)",
}
CACHE_METHODS = ("cache", "scc", "oracle")
CLIENT_METHODS = ("cache", "scc")
"""What ``--client`` runs through :class:`~edge_sdk.client.EdgeClient` (``SccConfig(compensate=...)``)."""
QUICK = {"devices": 4, "rounds": 19, "seeds": "0-2", "methods": "cache,scc"}
"""``--quick``: the client path on a smaller fleet and run (what tests/test_scc_client.py runs)."""
REGION = "scc"
ROUND_S = 10.0
"""Virtual seconds per round; the coordinator closes a round 1 s after it starts."""
LEARNED_FRACTION = 0.95


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamSettings:
    """One experiment's knobs (the CLI flags)."""

    task: str = "digits"
    devices: int = 5
    rounds: int = 29
    full_sync_every: int = 5
    alpha: float = 1.0
    """Dirichlet label skew over devices; 0 means an IID split."""
    drift_noise: float = 0.05
    """σ of a sample's arrival time around its class's season, as a fraction of the run."""
    early_classes: int = 3
    capacity: int = 50
    epochs: int = 2
    batch_size: int = 8
    lr: float = 0.05
    calib_epochs: int = 2
    calib_batch_size: int = 16
    calib_lr: float = 0.05
    fallback: str = "global"
    """SCC for cached classes absent from the current batch: the drift over all current
    samples (``global``, eq. 12) or no shift (``none``)."""

    def __post_init__(self) -> None:
        if self.devices < 1 or self.rounds < 1 or self.full_sync_every < 1:
            raise ConfigError("devices, rounds and full_sync_every must be >= 1")
        if self.alpha < 0 or self.drift_noise < 0 or self.capacity < 1:
            raise ConfigError("alpha and drift_noise must be >= 0, capacity >= 1")
        if self.early_classes < 1:
            raise ConfigError("early_classes must be >= 1")
        if self.fallback not in ("global", "none"):
            raise ConfigError("fallback must be 'global' or 'none'")


@dataclass(frozen=True, slots=True, kw_only=True)
class Streams:
    """Which pool samples each device sees in each round, and the early-class facts."""

    batches: list[list[npt.NDArray[np.int64]]]
    """``batches[device][round]``: pool indices arriving at that device in that round."""
    class_order: tuple[int, ...]
    early: tuple[int, ...]
    learned_round: int


@dataclass(slots=True)
class MethodRun:
    method: str
    seed: int
    rows: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- streams


def make_streams(
    labels: npt.NDArray[np.int64], n_classes: int, s: StreamSettings, seed: int
) -> Streams:
    """Seasonal class drift over ``s.rounds`` rounds, split over devices (module docstring)."""
    rng = np.random.default_rng([seed, 0x5CC])
    if s.early_classes >= n_classes:
        raise ConfigError(f"early_classes must be < {n_classes}")
    order = rng.permutation(n_classes)
    season = np.empty(n_classes)
    season[order] = (np.arange(n_classes) + 0.5) / n_classes
    t = season[labels] + rng.normal(0.0, s.drift_noise, labels.shape[0])
    arrival = np.clip(np.floor(t * s.rounds), 0, s.rounds - 1).astype(np.int64)
    parts = (
        iid(labels, s.devices, seed=seed)
        if s.alpha == 0
        else dirichlet(labels, s.devices, alpha=s.alpha, seed=seed)
    )
    batches = [[part[arrival[part] == r] for r in range(s.rounds)] for part in parts]
    early = tuple(int(c) for c in order[: s.early_classes])
    early_arrivals = np.sort(arrival[np.isin(labels, early)])
    learned = int(early_arrivals[math.ceil(LEARNED_FRACTION * early_arrivals.shape[0]) - 1])
    return Streams(
        batches=batches,
        class_order=tuple(int(c) for c in order),
        early=early,
        learned_round=learned,
    )


# --------------------------------------------------------------------------- one run


@dataclass(slots=True)
class _Device:
    device_id: str
    weights: Vector | None = None
    version: int = -1
    seq: int = 0
    scc: SemanticCache | None = None


def _only(actions: Sequence[object], suffix: str) -> bytes:
    (payload,) = [a.payload for a in actions if isinstance(a, Publish) and a.topic.endswith(suffix)]
    return payload


def run_method(
    task: ClassifierTask,
    s: StreamSettings,
    method: str,
    seed: int,
    streams: Streams,
    *,
    initial: Vector,
    via_client: bool = False,
) -> MethodRun:
    """One method on one seed's streams: ``s.rounds`` synchronous rounds, evaluated after each.

    ``via_client``: each device is an :class:`~edge_sdk.client.EdgeClient` (in memory, not
    connected): its batch goes in with ``add_sample``, and the job runs through
    ``EdgeClient.run_training_job`` — the trainer thread's code, with the client's SCC
    (``SccConfig(keep_raw=0)``: the batch ages out into the cache after training)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if via_client and method not in CLIENT_METHODS:
        raise ConfigError(f"--client runs {', '.join(CLIENT_METHODS)}, not {method!r}")
    data = task.data()
    pool, test = data.pool, data.test
    spec = task.spec
    early_test = np.isin(test.y, streams.early)
    early_split = Split(x=test.x[early_test], y=test.y[early_test])
    lasp = method != "fedavg"
    config = CoordinatorConfig(
        region=REGION,
        coordinator_id="coordinator",
        spec=spec,
        full_sync_every=s.full_sync_every if lasp else 0,
    )
    strategy = make_strategy("spin", k=s.devices, timeout_s=1.0)
    coordinator = CoordinatorCore(
        config, strategy, Snapshot(version=0, weights=initial), rng=random.Random(seed)
    )
    coordinator.start(0.0)
    devices = [_Device(device_id=f"d{i:03d}") for i in range(s.devices)]
    clients: list[EdgeClient] = []
    if via_client:
        scc_config = SccConfig(
            capacity=s.capacity,
            keep_raw=0,
            compensate=method == "scc",
            fallback="none" if s.fallback == "none" else "global",
        )
        clients = [
            EdgeClient(
                broker="mqtt://127.0.0.1:1",  # never started: no connection is made
                device_id=dev.device_id,
                task=task,
                durable=False,
                seed=seed,
                scc=scc_config,
            )
            for dev in devices
        ]
    elif method in CACHE_METHODS:
        for dev in devices:
            dev.scc = SemanticCache(
                task, capacity=s.capacity, fallback="none" if s.fallback == "none" else "global"
            )
    full_cfg = TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr)
    head_cfg = TrainConfig(
        epochs=s.calib_epochs, batch_size=s.calib_batch_size, lr=s.calib_lr, group="classifier"
    )
    result = MethodRun(method=method, seed=seed)
    fallback_shifts = class_shifts = 0

    def evaluate(round_: int, full: bool) -> None:
        w = coordinator.weights
        status = coordinator.status().extra
        result.rows.append(
            {
                "round": float(round_),
                "version": float(coordinator.version),
                "full_sync": float(full),
                "accuracy": task.evaluate(w)["accuracy"],
                "early_accuracy": task.evaluate(w, early_split)["accuracy"],
                "bytes": float(status["bytes_in"] + status["bytes_out"]),
            }
        )

    evaluate(-1, True)
    for r in range(s.rounds):
        now = r * ROUND_S
        full_round = coordinator.next_version_is_full()
        # Devices train (and send) the group this round's version changes. The cores send
        # the whole model after a full sync (the device needs the new extractor), and
        # DeviceCore would then train and upload the whole model although only the
        # classifier is kept; here the first calibration round calibrates, as in HFedMS.
        train_group = FULL if full_round else "classifier"
        for i, dev in enumerate(devices):
            idx = streams.batches[i][r]
            if idx.shape[0] == 0:
                continue  # nothing labelled this round: the device does not take part
            x, y = pool.x[idx], pool.y[idx]
            pull = Pull(
                device=dev.device_id,
                seq=dev.seq,
                model_id=spec.model_id,
                have_version=dev.version,
                n_samples=int(idx.shape[0]),
            )
            dev.seq += 1
            acts = coordinator.handle(
                MessageReceived(
                    now=now,
                    topic=topics.device_topic(REGION, dev.device_id, "pull"),
                    payload=encode(pull),
                )
            )
            msg = decode(_only(acts, "/model"))
            assert isinstance(msg, ModelMsg)
            if msg.group == FULL:
                received = np.array(msg.weights, copy=True)
            else:
                assert dev.weights is not None
                received = np.array(dev.weights, copy=True)
                received[spec.group_slice(msg.group)] = msg.weights
            scc = dev.scc
            seed_k = (seed * 1_000_003 + i * 10_007 + r) % (2**31)
            if clients:
                client = clients[i]
                for xi, yi in zip(x, y):
                    client.add_sample(xi, int(yi))
                job = TrainingJob(
                    job_id=r,
                    base_version=msg.version,
                    weights=received,
                    n_samples=int(idx.shape[0]),
                    group=train_group,
                )
                cfg = _with_seed(full_cfg if train_group == FULL else head_cfg, seed_k)
                trained, _ = client.run_training_job(job, cfg)
            elif scc is not None and dev.weights is not None and not scc.is_current(received):
                # A new extractor arrived: hold the old one until the batch compensates.
                scc.hold_extractor(dev.weights)
                if method == "scc":
                    comp = scc.compensate(None, received, x, y)
                    fallback_shifts += len(comp.fallback_classes)
                    class_shifts += len(comp.deltas) - len(comp.fallback_classes)
                elif method == "cache":
                    scc.skip_compensation(received)
                else:  # oracle: the raw samples behind the cached rows, re-extracted
                    scc.reextract(received, pool.x[np.array(scc.cache.ids)])
            dev.weights, dev.version = received, msg.version
            if clients:
                pass  # trained above, by the client
            elif train_group == FULL:
                trained = task.local_update(received, x, y, _with_seed(full_cfg, seed_k))
            elif scc is None:
                trained = task.local_update(received, x, y, _with_seed(head_cfg, seed_k))
            else:
                trained = scc.calibrate(received, x, y, _with_seed(head_cfg, seed_k))
            if scc is not None:
                scc.observe(received, x, y, ids=idx)  # the batch is forgotten now
            sl = spec.group_slice(train_group)
            update = Update(
                device=dev.device_id,
                seq=dev.seq,
                model_id=spec.model_id,
                base_version=msg.version,
                n_samples=int(idx.shape[0]),
                weights=np.ascontiguousarray(trained.weights[sl]),
                group=train_group,
                loss=float(trained.loss),
            )
            dev.seq += 1
            coordinator.handle(
                MessageReceived(
                    now=now,
                    topic=topics.device_topic(REGION, dev.device_id, "update"),
                    payload=encode(update),
                )
            )
        coordinator.handle(TimerFired(now=now + 1.0))  # the round closes: aggregate
        evaluate(r, full_round)
    for client in clients:
        client.stop()
    result.summary = _summary(result.rows, streams, s)
    result.summary.update(
        {"fallback_class_shifts": fallback_shifts, "per_class_shifts": class_shifts}
    )
    return result


def _with_seed(config: TrainConfig, seed: int) -> TrainConfig:
    return TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=seed,
        group=config.group,
    )


def _summary(rows: list[dict[str, float]], streams: Streams, s: StreamSettings) -> dict[str, Any]:
    by_round = {int(row["round"]): row for row in rows}
    learned = by_round[streams.learned_round]["early_accuracy"]
    final = rows[-1]
    tail = [row["accuracy"] for row in rows[-s.full_sync_every :]]
    return {
        "initial_accuracy": rows[0]["accuracy"],
        "final_accuracy": final["accuracy"],
        "last_T_mean_accuracy": float(np.mean(tail)),
        "early_accuracy_learned": learned,
        "early_accuracy_final": final["early_accuracy"],
        "forgetting": learned - final["early_accuracy"],
        "bytes": final["bytes"],
        "learned_round": streams.learned_round,
        "early_classes": list(streams.early),
    }


# --------------------------------------------------------------------------- reporting

COLUMNS = (
    ("final_accuracy", "final acc"),
    ("early_accuracy_learned", "early acc (learned)"),
    ("early_accuracy_final", "early acc (final)"),
    ("forgetting", "forgetting"),
)


def summarise(runs: Sequence[MethodRun]) -> dict[str, dict[str, Any]]:
    """Mean and std over seeds of every summary number, per method."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        stats: dict[str, Any] = {"seeds": [r.seed for r in mine], "label": METHODS[method]}
        for key in (
            "final_accuracy",
            "last_T_mean_accuracy",
            "early_accuracy_learned",
            "early_accuracy_final",
            "forgetting",
            "bytes",
        ):
            values = np.array([r.summary[key] for r in mine], dtype=np.float64)
            stats[key] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            }
        out[method] = stats
    return out


def format_table(stats: dict[str, dict[str, Any]]) -> str:
    """Markdown: accuracy and forgetting as mean ± std (percentage points) per method."""
    head = "| method | " + " | ".join(title for _, title in COLUMNS) + " | MB moved |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for method, st in stats.items():
        cells = [f"{100 * st[k]['mean']:.1f} ± {100 * st[k]['std']:.1f}" for k, _ in COLUMNS]
        cells.append(f"{st['bytes']['mean'] / 1e6:.2f}")
        lines.append(f"| {method} ({st['label']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(runs: Sequence[MethodRun], method: str, baseline: str, key: str) -> dict[str, float]:
    """``method`` − ``baseline`` on ``key``, paired by seed: mean, std, and on how many seeds
    the difference is > 0 (``wins``) and < 0 (``losses``)."""
    a = {r.seed: r.summary[key] for r in runs if r.method == method}
    b = {r.seed: r.summary[key] for r in runs if r.method == baseline}
    diff = np.array([a[k] - b[k] for k in sorted(a.keys() & b.keys())], dtype=np.float64)
    if diff.size == 0:
        return {"mean": math.nan, "std": math.nan, "wins": 0.0, "losses": 0.0, "n": 0.0}
    return {
        "mean": float(diff.mean()),
        "std": float(diff.std(ddof=1)) if diff.size > 1 else 0.0,
        "wins": float((diff > 0).sum()),
        "losses": float((diff < 0).sum()),
        "n": float(diff.size),
    }


def format_paired(runs: Sequence[MethodRun], method: str = "scc") -> str:
    """Markdown: ``method`` minus every other method, paired by seed (percentage points)."""
    others = [m for m in dict.fromkeys(r.method for r in runs) if m != method]
    if not others or method not in {r.method for r in runs}:
        return ""
    lines = [
        f"| {method} minus | final acc (pp) | {method} higher | forgetting (pp) | {method} forgets less |",
        "|---|---|---|---|---|",
    ]
    for other in others:
        acc = paired(runs, method, other, "final_accuracy")
        fgt = paired(runs, method, other, "forgetting")
        lines.append(
            f"| {other} | {100 * acc['mean']:+.1f} ± {100 * acc['std']:.1f} | {acc['wins']:.0f}/{acc['n']:.0f} "
            f"| {100 * fgt['mean']:+.1f} ± {100 * fgt['std']:.1f} | {fgt['losses']:.0f}/{fgt['n']:.0f} |"
        )
    return "\n".join(lines)


def plot(runs: Sequence[MethodRun], learned_rounds: Sequence[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        rounds = np.array([row["round"] for row in mine[0].rows]) + 1
        for ax, key in zip(axes, ("accuracy", "early_accuracy")):
            values = 100 * np.array([[row[key] for row in r.rows] for r in mine])
            mean, std = values.mean(axis=0), values.std(axis=0)
            (line,) = ax.plot(rounds, mean, label=f"{method}: {METHODS[method]}", linewidth=1.8)
            ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    for ax, name in zip(axes, ("all test classes", "early classes (first in the stream)")):
        for r in sorted(set(learned_rounds)):
            ax.axvline(r + 1, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("round (0 = deployed model)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[1].text(
        0.01,
        0.02,
        "dotted: early classes learned",
        transform=axes[1].transAxes,
        fontsize=8,
        color="grey",
    )
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = StreamSettings()
    p.add_argument(
        "--task",
        default=d.task,
        help="a classification task with extractor/classifier groups (digits, gestures)",
    )
    p.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, from: {', '.join(METHODS)}"
    )
    p.add_argument("--seeds", default="0-4", help="seeds, e.g. 0,1,2 or 0-4")
    p.add_argument("--devices", type=int, default=d.devices)
    p.add_argument(
        "--rounds",
        type=int,
        default=d.rounds,
        help="rounds R; end on a calibration round (R mod T = T-1) to see SCC's effect",
    )
    p.add_argument(
        "--full-sync-every", type=int, default=d.full_sync_every, help="LASP T (paper: 5)"
    )
    p.add_argument(
        "--alpha", type=float, default=d.alpha, help="Dirichlet label skew over devices (0 = IID)"
    )
    p.add_argument(
        "--drift-noise",
        type=float,
        default=d.drift_noise,
        help="spread of a class's season (fraction of the run)",
    )
    p.add_argument(
        "--early-classes",
        type=int,
        default=d.early_classes,
        help="how many first-seen classes forgetting is measured on",
    )
    p.add_argument(
        "--capacity",
        type=int,
        default=d.capacity,
        help="feature cache capacity Q per device (paper: 200)",
    )
    p.add_argument(
        "--epochs", type=int, default=d.epochs, help="local epochs over the batch in full rounds"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--calib-epochs",
        type=int,
        default=d.calib_epochs,
        help="classifier epochs in calibration rounds",
    )
    p.add_argument("--calib-batch-size", type=int, default=d.calib_batch_size)
    p.add_argument("--calib-lr", type=float, default=d.calib_lr)
    p.add_argument(
        "--scc-fallback",
        choices=["global", "none"],
        default=d.fallback,
        help="SCC shift for cached classes absent from the batch: overall drift, or none",
    )
    p.add_argument("--out", type=Path, default=Path("runs/scc_stream"), help="output directory")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--client",
        action="store_true",
        help=f"devices are EdgeClients with SCC (methods {', '.join(CLIENT_METHODS)})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="--client with " + ", ".join(f"--{k} {v}" for k, v in QUICK.items()),
    )


def _seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or int(m.group(2) or m.group(1)) < int(m.group(1)):
            raise ConfigError(f"--seeds: {part!r} is not a seed or a range like 0-4")
        seeds.extend(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    if not seeds:
        raise ConfigError("--seeds: no seeds given")
    return seeds


def settings_from(args: argparse.Namespace) -> StreamSettings:
    return StreamSettings(
        task=args.task,
        devices=args.devices,
        rounds=args.rounds,
        full_sync_every=args.full_sync_every,
        alpha=args.alpha,
        drift_noise=args.drift_noise,
        early_classes=args.early_classes,
        capacity=args.capacity,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        calib_epochs=args.calib_epochs,
        calib_batch_size=args.calib_batch_size,
        calib_lr=args.calib_lr,
        fallback=args.scc_fallback,
    )


def experiment(
    s: StreamSettings,
    methods: Sequence[str],
    seeds: Sequence[int],
    *,
    progress: Callable[[MethodRun], None] | None = None,
    via_client: bool = False,
) -> tuple[list[MethodRun], list[int]]:
    """Every method on every seed (streams shared by the methods of a seed)."""
    task = get_task(s.task, device="cpu")
    if not isinstance(task, ClassifierTask):
        raise ConfigError(f"task {s.task!r} is not a classification task with a feature extractor")
    data = task.data()
    runs: list[MethodRun] = []
    learned: list[int] = []
    for seed in seeds:
        streams = make_streams(data.pool.y, data.n_classes, s, seed)
        learned.append(streams.learned_round)
        initial = task.pretrained(seed=seed)
        for method in methods:
            run_ = run_method(task, s, method, seed, streams, initial=initial, via_client=via_client)
            runs.append(run_)
            if progress is not None:
                progress(run_)
    return runs, learned


def run(args: argparse.Namespace) -> int:
    configure_threads(args.threads)
    if args.quick:
        args.client = True
        for key, value in QUICK.items():
            setattr(args, key, value)
    s = settings_from(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; use {', '.join(METHODS)}")
    seeds = _seeds(args.seeds)

    def progress(r: MethodRun) -> None:
        sm = r.summary
        print(
            f"seed {r.seed} {r.method:>6}: final {100 * sm['final_accuracy']:.1f} %  "
            f"early {100 * sm['early_accuracy_learned']:.1f} → {100 * sm['early_accuracy_final']:.1f} %",
            file=sys.stderr,
            flush=True,
        )

    runs, learned = experiment(s, methods, seeds, progress=progress, via_client=args.client)
    stats = summarise(runs)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    title = (
        f"{s.task}{' via EdgeClient' if args.client else ''}: {s.devices} devices, {s.rounds} rounds, LASP T={s.full_sync_every}, "
        f"{'IID split' if s.alpha == 0 else f'Dirichlet α={s.alpha}'}, cache Q={s.capacity}; "
        f"mean ± std over {len(seeds)} seeds"
    )
    table = format_table(stats)
    diffs = format_paired(runs)
    if diffs:
        table += "\n\nPaired by seed (same streams, same deployed model):\n\n" + diffs
    note = (
        f"{title}.\n\nAccuracy in %; forgetting = early-class accuracy when learned − at the end "
        f"(percentage points; early classes = the first {s.early_classes} of each seed's season order).\n\n"
    )
    (out / "scc_stream.md").write_text(note + table + "\n")
    plot(runs, learned, out / "scc_stream.png", title)
    (out / "summary.json").write_text(
        json.dumps(
            {
                "settings": asdict(s),
                "seeds": seeds,
                "stats": stats,
                "paired_scc": {
                    m: {k: paired(runs, "scc", m, k) for k in ("final_accuracy", "forgetting")}
                    for m in methods
                    if m != "scc" and "scc" in methods
                },
                "runs": [
                    {"method": r.method, "seed": r.seed, "summary": r.summary, "rows": r.rows}
                    for r in runs
                ],
            },
            indent=1,
        )
    )
    print(note + table)
    print(f"\nwrote {out / 'scc_stream.md'}, {out / 'scc_stream.png'}, {out / 'summary.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scc_stream",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
