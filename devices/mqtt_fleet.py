"""Real-MQTT fleet mode: hundreds of devices in one process, each a real MQTT client.

Every device is a full :class:`~edge_sdk.client.EdgeClient` — its own broker connection and
client id, its own durable sample store, the real DeviceCore, a real local trainer — so a
coordinator under test sees exactly what a deployed fleet would send. Labelling follows
the scenario's Poisson rate, sped up by ``time_scale`` (wall seconds = scenario seconds /
time_scale). The fleet records every model version its devices receive, so accuracy over
time can be measured without asking the coordinator.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from devices.live import LabellingLoop, LabellingUser, labelling_stream
from edge_sdk.client import EdgeClient
from edge_sdk.errors import ConfigError
from edge_sdk.mqtt import BrokerAuth
from edge_sdk.spec import Vector
from edge_sdk.tasks.base import Task, TrainConfig

log = logging.getLogger("edgeci.fleet")


@dataclass
class FleetStats:
    """What the fleet observed, in wall seconds since start."""

    versions: list[tuple[float, int]] = field(default_factory=list)
    acked: int = 0
    rejected: int = 0
    trained: int = 0
    latest: tuple[int, Vector] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class MqttFleet:
    """``with MqttFleet(...) as fleet: fleet.run(seconds)`` — see the module docstring."""

    def __init__(
        self,
        *,
        broker: str,
        region: str,
        task: Task,
        partitions: Sequence[npt.NDArray[np.int64]],
        rate: float = 0.0,
        label_times: Sequence[npt.NDArray[np.float64]] | None = None,
        device_ids: Sequence[str] | None = None,
        request_timeout_s: float = 10.0,
        min_samples: int,
        train: TrainConfig,
        time_scale: float = 1.0,
        seed: int = 0,
        prefix: str = "fleet",
        connect_timeout: float = 30.0,
        auth: BrokerAuth | None = None,
        bundles: Path | None = None,
    ) -> None:
        """``auth``: one set of credentials for every device; ``bundles``: a folder of
        per-device provisioning bundles named by device id (``PKI/bundles``, from
        ``edgeci pki issue --role device ID``), so that each device is its own identity."""
        self.task = task
        self.stats = FleetStats()
        pool = task.data().pool
        self.clients: list[EdgeClient] = []
        users = []
        self._t0 = time.monotonic()
        for i, idx in enumerate(partitions):
            name = device_ids[i] if device_ids is not None else f"{prefix}-{i:04d}"
            client = EdgeClient(
                broker=broker, device_id=name, region=region, task=task, durable=False,
                min_samples=min_samples, train=TrainConfig(epochs=train.epochs, batch_size=train.batch_size, lr=train.lr, seed=seed + i),
                seed=seed + i, inference="torch", request_timeout_s=request_timeout_s,
                auth=auth, bundle=bundles / name if bundles is not None else None,
                refresh_s=None, release_spread_s=None,  # as the in-process emulator's devices: the scenario's pulls only
            )
            client.on("*", self._on_event)
            self.clients.append(client)
            times = None if label_times is None else label_times[i]
            stream, add = labelling_stream(task, pool, idx, client)  # (frames with boxes through add_frame)
            users.append(LabellingUser(name=name, stream=stream, add=add, rate=rate, times=times))
        self._connect_timeout = connect_timeout
        self.loop = LabellingLoop(users, seed=seed, time_scale=time_scale)

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        s = self.stats
        with s.lock:
            if kind == "model":
                s.versions.append((time.monotonic() - self._t0, int(data["version"])))
            elif kind == "update_acked":
                s.acked += 1
            elif kind == "update_rejected":
                s.rejected += 1
            elif kind == "trained":
                s.trained += 1

    def start(self) -> MqttFleet:
        for c in self.clients:
            c.start(self._connect_timeout)
        self._t0 = time.monotonic()
        self.loop.start()
        return self

    def max_version(self) -> int:
        with self.stats.lock:
            return max((v for _, v in self.stats.versions), default=-1)

    def latest_weights(self) -> tuple[int, Vector] | None:
        """The newest model any device of the fleet holds."""
        best: tuple[int, Vector] | None = None
        for c in self.clients:
            v, w = c.version, c.weights
            if v is not None and w is not None and (best is None or v > best[0]):
                best = (v, w)
        return best

    def stop(self) -> None:
        self.loop.stop()
        for c in self.clients:
            try:
                c.stop()
            except Exception:
                log.exception("stopping %s", c.core.config.device_id)

    def __enter__(self) -> MqttFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _fleet_credentials(args: Any, device_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """``--bundle PKI/bundles`` (a folder of per-device bundles: each device its own
    certificate and trusted keys) or ``--cert``/``--username`` for all devices. One device's
    bundle (a folder with ``bundle.json``) is that device's identity: it runs only a fleet of
    exactly that device. Shared by many, the secure broker would give them one client id
    (each connection replacing the last), its ACL one device's topics, and the devices would
    not get the bundle's trusted keys: a ConfigError saying what to pass instead."""
    from edge_sdk.mqtt import auth_from_args, read_bundle

    bundle = getattr(args, "bundle", None)
    if bundle is None:
        return {"auth": auth_from_args(args)}
    bundle = Path(bundle).expanduser()
    flags = auth_from_args(argparse.Namespace(**{**vars(args), "bundle": None}))  # explicit flags override the bundles'
    if not (bundle / "bundle.json").exists():
        if not bundle.is_dir():
            raise ConfigError(f"--bundle {bundle}: no such folder (a folder of per-device bundles, e.g. PKI/bundles)")
        return {"bundles": bundle, "auth": flags}
    identity = read_bundle(bundle).get("identity")
    ids = list(device_ids) if device_ids is not None else []
    if ids == [identity] and bundle.name == identity:
        return {"bundles": bundle.parent, "auth": flags}
    raise ConfigError(
        f"--bundle {bundle} is one device's bundle ({identity!r}) and this fleet has {len(ids)} device(s)"
        f"{' (' + ', '.join(ids[:3]) + (', ...' if len(ids) > 3 else '') + ')' if ids else ''}: each device needs its own "
        "identity. Issue one per device id (`edgeci pki issue --role device ID`) and pass the folder that holds them "
        "(--bundle PKI/bundles)"
    )


def fleet_request_timeout(settings: Any, time_scale: float) -> float:
    """A device's request timeout in wall seconds: the scenario's, sped up, at least 1 s."""
    return float(max(settings.request_timeout_s / time_scale, 1.0))


def run_fleet(scenario: Any, *, broker: str, time_scale: float, args: Any) -> int:
    """``edgeci emulate SCENARIO.toml --broker URL``: play the scenario's fleet in real time
    (sped up by ``time_scale``) against a running coordinator, one MQTT client per device.

    The fleet is :func:`devices.scenario.materialise`'s — the same profiles' partitions,
    streaming orders and label times as the virtual-clock emulator. Accuracy is measured on
    the newest model any device holds; a CSV, a PNG and one summary line are written.
    """
    import csv
    import json

    from tqdm import tqdm

    from devices.report import output_dir, parse_seeds, plot_timeline, replacing, write_text_atomic
    from devices.scenario import materialise
    from edge_sdk.tasks import get_task

    settings = scenario.settings
    given = getattr(args, "seeds", "")
    seed = parse_seeds(given)[0] if given else settings.seeds[0]
    region = getattr(args, "region", None) or "default"
    task = get_task(settings.task)
    pool = task.data().pool
    plans = materialise(settings, seed, pool.y)
    out = getattr(args, "out", None) or Path("runs/emulate") / f"{scenario.name}-mqtt"
    output_dir(out)
    wall_s = settings.duration_s / time_scale
    eval_s = max(settings.eval_every_s / time_scale, 0.5)
    fleet = MqttFleet(
        broker=broker, region=region, task=task,
        partitions=[p.samples[: len(p.label_times)] for p in plans],
        label_times=[p.label_times for p in plans],
        device_ids=[p.device_id for p in plans],
        min_samples=settings.min_samples,
        train=TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr, seed=seed),
        request_timeout_s=fleet_request_timeout(settings, time_scale),
        time_scale=time_scale, seed=seed, **_fleet_credentials(args, [p.device_id for p in plans]),
    )
    points: list[tuple[float, int, float]] = []  # (wall s, version, accuracy), this thread only
    print(f"{len(plans)} devices connecting to {broker} (region {region}); {settings.duration_s:.0f} virtual s at {time_scale:g}× = {wall_s:.0f} wall s", flush=True)
    no_answer = f"no model from a coordinator of region {region!r} on {broker}"
    hint = f"is `edgeci coordinator --region {region}` running there? (--region picks the coordinator's region)"
    warn_at: float | None = max(10.0, 2 * fleet_request_timeout(settings, time_scale))
    with fleet, tqdm(total=int(wall_s), unit="s", disable=getattr(args, "no_progress", False)) as bar:
        t0 = time.monotonic()
        next_eval = 0.0
        while (elapsed := time.monotonic() - t0) < wall_s:
            if not points and warn_at is not None and elapsed >= warn_at:
                tqdm.write(f"warning: {no_answer} after {elapsed:.0f} s; {hint}", file=sys.stderr)
                warn_at = None
            if elapsed >= next_eval:
                latest = fleet.latest_weights()
                if latest is not None:
                    points.append((time.monotonic() - t0, latest[0], float(task.evaluate(latest[1])["accuracy"])))
                next_eval += eval_s
                if points:
                    _, v, acc = points[-1]
                    bar.set_postfix_str(f"version {v} | accuracy {100 * acc:.1f}% | labelled {fleet.loop.labelled}")
            bar.n = int(elapsed)
            bar.refresh()
            time.sleep(min(0.5, max(0.0, wall_s - elapsed)))
    with replacing(out / "timeline.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["wall_s", "virtual_s", "version", "accuracy"])
        for t, v, acc in points:
            w.writerow([f"{t:.3f}", f"{t * time_scale:.1f}", v, f"{acc:.4f}"])
    plot_timeline(points, out / "accuracy.png", f"{scenario.name}: {len(plans)} MQTT devices, {time_scale:g}× real time")
    summary = {"devices": len(plans), "acked": fleet.stats.acked, "rejected": fleet.stats.rejected,
               "trained": fleet.stats.trained, "labelled": fleet.loop.labelled, "points": points}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    first = points[0] if points else (0.0, -1, float("nan"))
    last = points[-1] if points else first
    print(
        f"{len(plans)} MQTT devices: accuracy {100 * first[2]:.1f}% (v{first[1]}) → {100 * last[2]:.1f}% (v{last[1]}) | "
        f"updates acked {fleet.stats.acked}, rejected {fleet.stats.rejected} | labelled {fleet.loop.labelled} | {out}"
    )
    if not points:  # nothing to measure: say so, and fail
        print(f"error: {no_answer} in {wall_s:.0f} s; {hint}", file=sys.stderr)
        return 1
    return 0
