"""``edgeci run`` — the main job: one coordinator and a fleet of devices on real MQTT.

Starts the embedded broker (amqtt, in-process) unless ``--broker`` is given, a SPIN
coordinator with the release gate on, and N emulated devices whose users label their
share of the task's pool at Poisson times (Dirichlet(α) by class; frames with boxes IID) and
train with the task's own defaults (:mod:`devices.headless`, as ``edgeci device``). The coordinator keeps a validation
set carved out of the pool (no device labels it): each aggregated version is a candidate,
released to the devices only if it is not worse there than the release. A progress bar
shows the release and its held-out accuracy; the job ends with one summary line and an
accuracy-over-time PNG (release and training line).

A trial, not a deployment: the embedded broker is anonymous, unencrypted and bound to
127.0.0.1 only; devices pin the coordinator's model-signing key on first use. Production
fleets run mosquitto with ``coordinator/mosquitto/edgeci-secure.conf`` and ``edgeci pki``
bundles (docs/security.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import queue
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.broker import EmbeddedBroker
from coordinator.config import bounded, task_arg
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from devices.headless import below_d_min, fleet_partition, fleet_train_config
from devices.live import LabellingLoop, LabellingUser, labelling_stream
from devices.report import output_dir, replacing, write_text_atomic, writing_outputs
from edge_sdk.client import EdgeClient
from edge_sdk.mqtt import BrokerAuth
from edge_sdk.spec import Vector
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import Split, TaskData, TrainConfig
from edge_sdk.tasks.registry import default_min_samples, sample_kind_of

log = logging.getLogger("edgeci.run")

NO_CREDENTIALS = BrokerAuth(hint=(
    "`edgeci run` is a trial: it trusts only the system's CAs and has no client certificate; on this broker "
    "start `edgeci coordinator` and `edgeci device`, each with its bundle from `edgeci pki issue` (docs/security.md)"))
"""How run's coordinator and devices connect: as before, with no credentials; a broker that refuses
them is told of with what run is, not with --bundle/--ca/--cert, flags run does not have."""


def _positive(kind: type[int] | type[float]) -> Any:
    """A number above 0 (``--duration -5`` or ``--rate 0`` would run a job that labels nothing
    and still overwrite --out)."""
    return bounded(kind, 0, strict=True, finite=True)


def _validation_size(text: str) -> int:
    if text.strip() == "0":  # (it used to turn the gate off silently)
        raise argparse.ArgumentTypeError("0 leaves the release gate no validation set: use --no-gate to release "
                                         "every aggregated version")
    return int(_positive(int)(text))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", help="use this broker (mqtt://HOST:PORT) instead of the embedded trial broker (anonymous, "
                   "127.0.0.1 only). Either way a trial: its devices have no bundle, so each trusts the first key that "
                   "signs a model (trust on first use), which is insecure on any broker others can publish to (they "
                   "become the trusted key if they publish first); fleets pass each device a bundle from `edgeci pki "
                   "issue`, whose trusted/ holds the coordinators' keys (docs/security.md)")
    p.add_argument("--model", default="digits", type=task_arg, help="task / model: a built-in task, or an app's own as package.module:Name (on PYTHONPATH) "
                   "or an edgeci.tasks entry point (default: digits)")
    p.add_argument("--devices", type=_positive(int), default=20, help="number of devices (default: 20)")
    p.add_argument("--duration", type=_positive(float), default=60.0, help="wall seconds of labelling (default: 60)")
    p.add_argument("--rate", type=_positive(float), default=1.0, help="labels per second per device, Poisson (default: 1.0)")
    p.add_argument("--alpha", type=_positive(float), default=1.0, help="Dirichlet α of the non-IID partition (default: 1); "
                   "detection's frames with boxes are split IID (a frame has no one label): α is unused")
    p.add_argument("--min-samples", type=bounded(int, 1), help="D_min before a device's first pull (default: the task's — "
                   "digits 8, gestures 16, detection 64; edge_sdk/tasks/registry.py)")
    p.add_argument("--k", type=_positive(int), default=5, help="SPIN: aggregate when K updates are buffered (default: 5)")
    p.add_argument("--timeout", type=_positive(float), default=3.0, help="SPIN: timeout π in seconds (default: 3)")
    p.add_argument("--combine", choices=["models", "deltas"], default="models", help="SPIN: average the buffered models (paper, default) or apply each update's delta from its base version (faster on digits, unstable with stale detection updates)")
    p.add_argument("--epochs", type=bounded(int, 1), help="local epochs over all samples (default: the task's — digits, gestures 2; "
                   "detection 5; edge_sdk/tasks/registry.py)")
    p.add_argument("--lr", type=_positive(float), help="local learning rate (default: the task's — digits, gestures 0.05 (SGD); "
                   "detection 0.001 (AdamW))")
    p.add_argument("--seed", type=bounded(int, 0), default=0, help="seed of the validation split, the devices' partitions, labelling times and local training (>= 0)")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="where the plot and metrics go")
    p.add_argument("--state-dir", type=Path, help="coordinator state dir (default: a fresh temp dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--validation-size", type=_validation_size, default=200,
                   help="pool samples kept at the coordinator for the release gate, at most a quarter of the pool "
                   "(more is capped, with a note); to run without the gate use --no-gate")
    # (-1 or nan failed later as the gate's "need 0 <= margin <= rollback_margin < 1", naming no flag of this command)
    # (no finite=True: below=1 refuses inf with the flag's own rule, and NaN fails the minimum)
    p.add_argument("--gate-margin", type=bounded(float, 0, below=1), default=0.02, help="accuracy a candidate may lose against the release and still be released")
    p.add_argument("--no-gate", action="store_true", help="release every aggregated version (no validation set)")


@dataclass
class Timeline:
    """(wall seconds since labelling started, version, accuracy) points, filled by the evaluator
    thread (the version before any label at 0 s: set-up time is not on the plot's axis)."""

    t0: float
    points: list[tuple[float, int, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, version: int, accuracy: float) -> None:
        with self.lock:
            self.points.append((time.monotonic() - self.t0, version, accuracy))

    def last(self) -> tuple[float, int, float]:
        with self.lock:
            return self.points[-1]


class Evaluator:
    """Evaluates each committed version on the held-out split, off the coordinator's thread."""

    def __init__(self, task: Any, timeline: Timeline) -> None:
        self.task, self.timeline = task, timeline
        self._q: queue.Queue[tuple[int, Vector] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="evaluator", daemon=True)

    def start(self) -> Evaluator:
        self._thread.start()
        return self

    def submit(self, version: int, weights: Vector) -> None:
        self._q.put((version, np.array(weights, copy=True)))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(60)

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            latest = item
            while not self._q.empty():  # under load, skip to the newest version
                nxt = self._q.get()
                if nxt is None:
                    self._q.put(None)
                    break
                latest = nxt
            version, weights = latest
            self.timeline.add(version, float(self.task.evaluate(weights)["accuracy"]))


def plot(timeline: Timeline, path: Path, title: str, training: Timeline | None = None, metric: str = "accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [p[0] for p in timeline.points]
    acc = [100 * p[2] for p in timeline.points]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if training is not None and training.points:
        ax.step([p[0] for p in training.points], [100 * p[2] for p in training.points], where="post", color="0.6",
                lw=0.8, label="training line (candidates)")
    ax.step(t, acc, where="post", label=f"release: what devices predict with (held-out {metric})")
    ax.set_xlabel("seconds since labelling started (wall clock)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with replacing(path) as tmp:  # (a full disk left a truncated PNG)
        fig.savefig(tmp, format=path.suffix.lstrip(".") or None)
    plt.close(fig)


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetPlan:
    """Who gets which pool samples, and how devices train: decided before anything starts."""

    validation: npt.NDArray[np.int64]
    """Pool indices the coordinator keeps for the release gate (empty: no gate)."""
    parts: list[npt.NDArray[np.int64]]
    """Each device's pool indices."""
    train: TrainConfig


def plan_fleet(args: argparse.Namespace, task: Any, data: TaskData) -> FleetPlan:
    """The validation slice (``--validation-size``, none with ``--no-gate``), the devices' shares
    of the rest (:func:`devices.headless.fleet_partition`) and their training configuration
    (:func:`devices.headless.fleet_train_config`)."""
    order = np.random.default_rng(args.seed).permutation(len(data.pool.y))
    n_val = 0 if args.no_gate else validation_count(args.validation_size, len(order))
    val_idx, label_idx = order[:n_val], order[n_val:]
    parts = [label_idx[p] for p in fleet_partition(task, data.pool.y[label_idx], args.devices, alpha=args.alpha, seed=args.seed)]
    return FleetPlan(validation=val_idx.astype(np.int64), parts=parts,
                     train=fleet_train_config(task, epochs=args.epochs, lr=args.lr, seed=args.seed))


def run(args: argparse.Namespace) -> int:
    task = get_task(args.model)
    data = task.data()
    plan = plan_fleet(args, task, data)
    metric = "mAP50" if sample_kind_of(task) == "frame" else "accuracy"  # (a detector's "accuracy" is its mAP50)
    short = below_d_min([len(p) for p in plan.parts], args.min_samples or default_min_samples(task), fewer="--devices")
    if short is not None:
        print(f"note: {short}", file=sys.stderr)
    out = output_dir(args.out)
    tmp = tempfile.TemporaryDirectory(prefix="edgeci-run-")
    state_dir = args.state_dir or Path(tmp.name) / "coordinator"
    broker = None if args.broker else EmbeddedBroker().start()
    url = args.broker or broker.url  # type: ignore[union-attr]
    started = time.monotonic()
    timeline = Timeline(t0=started)  # t0 moves to the first label below
    training = Timeline(t0=started)
    evaluator = Evaluator(task, timeline).start()
    training_evaluator = Evaluator(task, training).start()
    # The coordinator's validation set: a slice of the pool that no device will label.
    n_val = len(plan.validation)
    validation = None
    if n_val:
        from coordinator.validation import save_validation

        validation = Path(tmp.name) / "validation.npz"
        save_validation(validation, Split(x=data.pool.x[plan.validation], y=data.pool.y[plan.validation]))
    clients: list[EdgeClient] = []
    coordinator = None
    loop = None
    try:
        coordinator = CoordinatorDaemon(
            CoordinatorOptions(
                broker=url,
                auth=NO_CREDENTIALS,
                region="demo",
                state_dir=state_dir,
                model=args.model,
                strategy_params={"k": args.k, "timeout_s": args.timeout, "combine": args.combine},
                seed=args.seed,
                validation=validation,
                gate_margin=args.gate_margin,
            ),
            task=task,
            on_commit=training_evaluator.submit if validation is not None else evaluator.submit,
            on_release=evaluator.submit,
        )
        v0 = coordinator.core.version
        w0 = coordinator.core.weights
        acc0 = float(task.evaluate(w0)["accuracy"])
        coordinator.start()
        users = []
        for i, idx in enumerate(plan.parts):
            client = EdgeClient(
                broker=url,
                auth=NO_CREDENTIALS,
                device_id=f"device-{i:03d}",
                region="demo",
                task=task,
                data_dir=Path(tmp.name) / f"device-{i:03d}",
                min_samples=args.min_samples,
                train=plan.train,
                seed=args.seed + i,
            ).start()
            clients.append(client)
            stream, add = labelling_stream(task, data.pool, idx, client)
            users.append(LabellingUser(name=f"device-{i:03d}", stream=stream, add=add, rate=args.rate))
        timeline.t0 = training.t0 = time.monotonic()  # no label, no commit before this: v0 at 0 s
        timeline.points.append((0.0, v0, acc0))
        training.points.append((0.0, v0, acc0))
        loop = LabellingLoop(users, seed=args.seed).start()
        _watch(args, timeline, loop, metric)
        loop.stop()
        # let in-flight training and the last timeout finish so the final version is evaluated
        time.sleep(max(2.0, args.timeout * 1.5))
    except KeyboardInterrupt:  # (Ctrl-C) say what is kept; the CLI exits 130 after the clean-up below
        kept = f"; the coordinator's state is in --state-dir {args.state_dir}" if args.state_dir else ""
        raise KeyboardInterrupt(f"no plot or metrics written to {out}{kept}") from None
    finally:
        if loop is not None:
            loop.stop()
        for c in clients:
            c.stop()
        if coordinator is not None:
            coordinator.stop()
        evaluator.close()
        training_evaluator.close()
        if broker is not None:
            broker.stop()
        tmp.cleanup()  # also when the coordinator could not start (a bad validation set): no stray temp dir
    status = coordinator.core.status()
    _, v_end, acc_end = timeline.last()
    png = plot_path(out, metric)
    gate_note = "no gate" if validation is None else f"gate on {n_val} validation samples, margin {args.gate_margin:g}"
    with writing_outputs(out):  # (a disk that filled up during the run: one line, not a traceback)
        plot(timeline, png, f"edgeci run: SPIN (K={args.k}, π={args.timeout:g} s), {args.devices} devices, {task.name}\n{gate_note}",
             training if validation is not None else None, metric)
        write_text_atomic(out / "metrics.json", json.dumps({"release": timeline.points, "training": training.points,
                                                            "status": dataclasses.asdict(status)}, indent=1))
    wall = time.monotonic() - started
    gate = status.extra.get("gate") or {}
    candidates = ("no gate: every aggregated version released" if validation is None else
                  f"candidates promoted {gate.get('promoted', 0)}, held {gate.get('held', 0)}, rejected {gate.get('rejected', 0)}")
    print(
        f"release {metric} {100 * acc0:.1f}% → {100 * acc_end:.1f}% | release v{v0} → v{v_end} (training line v{status.version}) | "
        f"{candidates} | "
        f"updates accepted {status.updates_accepted} (rejected {status.updates_rejected}, duplicates {status.updates_duplicate}) | "
        f"samples labelled {loop.labelled if loop else 0} | wall {wall:.1f} s | plot {png}"
    )
    return 0


def plot_path(out: Path, metric: str) -> Path:
    """Where the run's plot goes: named for what it plots (``accuracy.png``; a detector's
    ``map50.png``)."""
    return out / ("map50.png" if metric == "mAP50" else "accuracy.png")


def validation_count(requested: int, pool: int) -> int:
    """The validation set's size: ``requested``, capped at a quarter of the pool (the rest is
    the devices' to label), with a note on stderr when capped."""
    cap = pool // 4
    if requested > cap:
        print(f"note: --validation-size {requested} is more than a quarter of the {pool} pool samples: the gate "
              f"validates on {cap}", file=sys.stderr)
    return min(requested, cap)


def _watch(args: argparse.Namespace, timeline: Timeline, loop: LabellingLoop, metric: str = "accuracy") -> None:
    from tqdm import tqdm

    with tqdm(total=int(args.duration), unit="s", disable=args.no_progress, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s {postfix}") as bar:
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < args.duration:
            time.sleep(min(1.0, args.duration - elapsed))
            _, version, acc = timeline.last()
            bar.n = min(int(time.monotonic() - start), int(args.duration))
            bar.set_postfix_str(f"release v{version} | {metric} {100 * acc:.1f}% | labelled {loop.labelled}")
            if all(u.exhausted for u in loop.users):
                break
