"""Regional coordinators over real mosquitto: three coordinator *processes* with Spyker
peering on one broker (SIGKILL the token holder, restart it on its state dir), device
failover to another region, and two brokers joined by a mosquitto bridge.

The token is observed on the wire: every coordinator broadcasts a beat on
``edgeci/v1/peer/all/beat`` every ``--beacon`` seconds saying whether it holds the token
and the largest token position it knows. A token *lineage* is (epoch, created_at,
origin); it keeps its lineage while it walks the ring, and a regenerated token starts a
new one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess, bridge_conf
from edge_sdk.client import EdgeClient
from edge_sdk.modelio import save_model
from edge_sdk.mqtt import MqttTransport
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode, parse_status_json
from edge_sdk.wire.messages import Ack, ModelMsg, PeerMsg, Pull, Update

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
BEACON = 0.5
TOKEN_TIMEOUT = 3.0
PEER_FLAGS = [
    "--peering", "spyker", "--beacon", str(BEACON), "--token-timeout", str(TOKEN_TIMEOUT), "--stagger", "1.0",
    "--sync-timeout", "3", "--h-inter", "10", "--h-intra", "20", "--lr", "0.05",
]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def init_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deployed model file, so that coordinator processes skip pretraining."""
    spec = get_task("digits").spec
    path = tmp_path_factory.mktemp("init") / "deployed.npz"
    save_model(path, spec, np.random.default_rng(0).normal(0, 0.1, spec.size).astype(np.float32), {"version": 0})
    return path


class Coordinator:
    """``python -m demos.cli coordinator ...`` as a child process (SIGKILL-able)."""

    def __init__(self, url: str, name: str, state_dir: Path, ring: Sequence[str], init: Path) -> None:
        self.name = name
        self.cmd = [
            sys.executable, "-m", "demos.cli", "coordinator", "--broker", url, "--region", f"r{name}", "--id", name,
            "--state-dir", str(state_dir), "--model", "digits", "--init", str(init), "--peers", ",".join(ring), *PEER_FLAGS,
        ]
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._pump: threading.Thread | None = None
        self.start()

    def start(self) -> None:
        self.lines = []  # a restart waits for the new process's "ready", not the killed one's
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        proc = self.proc

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.append(line)

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()

    def _reap(self) -> None:
        assert self.proc is not None
        if self._pump is not None:
            self._pump.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def wait_ready(self, timeout: float = 120) -> None:
        wait_until(lambda: any(" ready: region " in line for line in self.lines) or self.poll() is not None, timeout, f"{self.name} ready")
        assert self.poll() is None, "".join(self.lines[-30:])

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reap()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reap()


@dataclass
class Beat:
    seen: float
    hold: bool
    pos: tuple[Any, ...] | None
    age: float


@dataclass
class PeerWatch:
    """Reads every coordinator's beats, model broadcasts and retained status on one broker."""

    url: str
    regions: Sequence[str]
    name: str = "watch"
    beats: dict[str, Beat] = field(default_factory=dict)
    models: dict[str, int] = field(default_factory=dict)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        subs = [topics.peer_filter("all"), *(topics.status_topic(r) for r in self.regions)]
        self.t = MqttTransport(self.url, client_id=self.name, subscriptions=subs, on_message=self._on, clean_session=True)
        self.t.start()

    def _on(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/status"):
            data = parse_status_json(payload)
            with self._lock:
                self.status[data["coordinator"]] = data
            return
        msg = decode(payload)
        assert isinstance(msg, PeerMsg)
        with self._lock:
            if msg.kind == "beat":
                pos = msg.body.get("pos")
                self.beats[msg.sender] = Beat(time.monotonic(), bool(msg.body["hold"]), tuple(pos) if pos else None, float(msg.body["age"]))
            elif msg.kind == "model":
                self.models[msg.sender] = self.models.get(msg.sender, 0) + 1

    def alive(self, window: float = 3 * BEACON) -> dict[str, Beat]:
        now = time.monotonic()
        with self._lock:
            return {c: b for c, b in self.beats.items() if now - b.seen < window}

    def lineages(self) -> set[tuple[Any, ...]]:
        """Token lineages that live coordinators say they hold."""
        return {b.pos[:3] for b in self.alive().values() if b.hold and b.pos is not None}

    def holder(self) -> str | None:
        held = [(b.pos, c) for c, b in self.alive().items() if b.hold and b.pos is not None]
        return max(held)[1] if held else None

    def extra(self, coordinator: str) -> dict[str, Any]:
        with self._lock:
            return dict(self.status.get(coordinator, {}).get("extra", {}).get("peering", {}))

    def version(self, coordinator: str) -> int:
        with self._lock:
            return int(self.status.get(coordinator, {}).get("version", -1))

    def exactly_one_token(self, seconds: float) -> bool:
        """Over ``seconds``: never two lineages held by live coordinators, and one held most
        of the time (a token on its way to the next holder is held by nobody for the
        moment it takes the recipient to accept and beat)."""
        end = time.monotonic() + seconds
        samples = held = 0
        while time.monotonic() < end:
            n = len(self.lineages())
            if n > 1:
                return False
            samples += 1
            held += n
            time.sleep(0.1)
        return held >= 0.8 * samples

    def close(self) -> None:
        self.t.stop()


class RawDevice:
    """A lightweight device on raw MQTT: pull, 'train' (nudge the weights), push, repeat."""

    def __init__(self, url: str, region: str, device: str, period: float) -> None:
        self.region, self.device, self.period = region, device, period
        self.acked = 0
        self._model: ModelMsg | None = None
        self._got = threading.Event()
        self._stop = threading.Event()
        subs = [topics.device_topic(region, device, "model"), topics.device_topic(region, device, "ack")]
        self.t = MqttTransport(url, client_id=f"raw-{device}", subscriptions=subs, on_message=self._on, clean_session=True)
        self.t.start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on(self, topic: str, payload: bytes) -> None:
        msg = decode(payload)
        if isinstance(msg, ModelMsg):
            self._model = msg
            self._got.set()
        elif isinstance(msg, Ack) and msg.status == "accepted":
            self.acked += 1

    def _run(self) -> None:
        spec = get_task("digits").spec
        seq = 0
        rng = np.random.default_rng(abs(hash(self.device)) % 2**32)
        while not self._stop.is_set():
            self._got.clear()
            self.t.publish(topics.device_topic(self.region, self.device, "pull"), encode(Pull(device=self.device, seq=seq, model_id=spec.model_id)))
            seq += 1
            if not self._got.wait(1.0):
                continue  # coordinator down: try again
            m = self._model
            assert m is not None
            weights = (m.weights + rng.normal(0, 0.01, m.weights.shape)).astype(np.float32)
            upd = Update(device=self.device, seq=seq, model_id=spec.model_id, base_version=m.version, n_samples=8, weights=weights)
            self.t.publish(topics.device_topic(self.region, self.device, "update"), encode(upd))
            seq += 1
            self._stop.wait(self.period)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.t.stop()


def test_three_coordinator_processes_keep_one_token_through_a_sigkill(mosquitto: MosquittoProcess, tmp_path: Path, init_model: Path) -> None:
    ring = ["a", "b", "c"]
    url = mosquitto.url
    with ExitStack() as stack:
        coords = {c: Coordinator(url, c, tmp_path / c, ring, init_model) for c in ring}
        for c in coords.values():
            stack.callback(c.stop)
        watch = PeerWatch(url, [f"r{c}" for c in ring])
        stack.callback(watch.close)
        for c in coords.values():
            c.wait_ready()
        # Uneven load: without peering the ages would drift apart at 10 : 3 : 1.
        for c, period in zip(ring, (0.1, 0.35, 1.0)):
            dev = RawDevice(url, f"r{c}", f"raw-{c}", period)
            stack.callback(dev.close)
        # Real SDK devices that fail over to the next region (see the SIGKILL below).
        task = get_task("digits")
        pool = task.data().pool
        clients: dict[str, EdgeClient] = {}
        events: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for i, c in enumerate(ring):
            nxt = ring[(i + 1) % len(ring)]
            client = EdgeClient(
                broker=url, device_id=f"sdk-{c}", region=f"r{c}", regions=[f"r{c}", f"r{nxt}"], failover_after=2,
                task=task, data_dir=tmp_path / f"sdk-{c}", min_samples=2, train=TrainConfig(epochs=1, lr=0.05, seed=i),
                request_timeout_s=1.0, seed=i, inference="torch",
            )
            log = events.setdefault(c, [])
            client.on("*", lambda kind, data, log=log, client=client: log.append((kind, {**data, "region": client.region})))
            client.start()
            stack.callback(client.stop)
            clients[c] = client

        feeding = threading.Event()

        def feed() -> None:
            k = 0
            while not feeding.is_set():
                for i, client in enumerate(clients.values()):
                    j = (3 * k + i) % len(pool)
                    client.add_sample(pool.x[j], int(pool.y[j]))
                k += 1
                feeding.wait(0.4)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        stack.callback(lambda: (feeding.set(), feeder.join(5)))

        # 1. One token, syncs happen, versions grow, ages stay close.
        wait_until(lambda: len(watch.alive()) == 3 and watch.holder() is not None, 30, "three live coordinators and a token")
        wait_until(lambda: all(watch.extra(c).get("merges", 0) >= 3 for c in ring), 40, "merges at every coordinator")
        assert watch.exactly_one_token(3.0), watch.beats
        v0 = {c: watch.version(c) for c in ring}
        wait_until(lambda: all(watch.version(c) > v0[c] for c in ring), 30, "every coordinator's version to grow")
        ages = {c: b.age for c, b in watch.alive().items()}
        assert max(ages.values()) - min(ages.values()) <= max(20.0, 0.25 * max(ages.values())), ages
        assert all(m >= 1 for m in watch.models.values()) and set(watch.models) == set(ring)

        # 2. SIGKILL the token holder: the others keep serving, one token lives. The holder
        #    keeps the token for a second or two between syncs, so the kill nearly always
        #    takes the token with it and the survivors regenerate it (epoch + 1); if the
        #    token had just moved on, the survivors simply keep it.
        wait_until(lambda: (h := watch.holder()) is not None and time.monotonic() - watch.beats[h].seen < 0.3, 10, "a fresh holder beat")
        victim = watch.holder()
        assert victim is not None
        before = watch.beats[victim].pos
        assert before is not None
        coords[victim].kill()
        survivors = [c for c in ring if c != victim]
        wait_until(lambda: victim not in watch.alive(), 5, f"{victim}'s beats to stop")
        wait_until(lambda: len(watch.lineages()) == 1, TOKEN_TIMEOUT + 10, "one token among the survivors")
        [lineage] = watch.lineages()
        regenerated = lineage[0] > before[0]
        assert regenerated or lineage == before[:3], (before, lineage)
        assert watch.exactly_one_token(3.0), watch.beats
        print(f"killed holder {victim} at {before}; token now {lineage} ({'regenerated' if regenerated else 'had moved on'})")
        v1 = {c: watch.version(c) for c in survivors}
        wait_until(lambda: all(watch.version(c) > v1[c] for c in survivors), 15, "survivors to keep committing")
        # the victim's SDK device moved to the next region and is served there
        fallback = f"r{ring[(ring.index(victim) + 1) % 3]}"
        wait_until(lambda: any(k == "failover" for k, _ in events[victim]), 30, "failover of the victim's device")
        wait_until(lambda: any(k == "update_acked" and d["region"] == fallback for k, d in events[victim]), 40,
                   "an acked update from the fallback region")

        # 3. Restart the victim on its state dir: it rejoins with its ages, one token lives.
        coords[victim].start()
        coords[victim].wait_ready()
        wait_until(lambda: victim in watch.alive(), 20, f"{victim}'s beats")
        merges_before = watch.extra(victim).get("merges", 0)
        wait_until(lambda: watch.extra(victim).get("merges", 0) > merges_before, 30, f"{victim} to merge a peer model after restart")
        assert watch.exactly_one_token(3.0), watch.beats
        assert len(watch.alive()) == 3
        ages = {c: b.age for c, b in watch.alive().items()}
        assert max(ages.values()) - min(ages.values()) <= max(25.0, 0.3 * max(ages.values())), ages
        assert all(c.poll() is None for c in coords.values())


def test_bridged_brokers_carry_peer_traffic(tmp_path: Path, init_model: Path) -> None:
    """Two mosquitto processes, the spoke bridged to the hub with bridge.conf.example's settings."""
    ring = ["hub", "spoke"]
    with ExitStack() as stack:
        hub = MosquittoProcess().start()
        stack.callback(hub.stop)
        spoke = MosquittoProcess(extra_conf=bridge_conf("spoke", hub.host, hub.port)).start()
        stack.callback(spoke.stop)
        coords = {
            "hub": Coordinator(hub.url, "hub", tmp_path / "hub", ring, init_model),
            "spoke": Coordinator(spoke.url, "spoke", tmp_path / "spoke", ring, init_model),
        }
        for c in coords.values():
            stack.callback(c.stop)
        watch_hub = PeerWatch(hub.url, ["rhub", "rspoke"], name="watch-hub")
        watch_spoke = PeerWatch(spoke.url, ["rhub", "rspoke"], name="watch-spoke")
        stack.callback(watch_hub.close)
        stack.callback(watch_spoke.close)
        for c in coords.values():
            c.wait_ready()
        for c, url, period in (("hub", hub.url, 0.1), ("spoke", spoke.url, 0.5)):
            dev = RawDevice(url, f"r{c}", f"raw-{c}", period)
            stack.callback(dev.close)
        # Each broker sees both coordinators' beats: peer traffic crosses the bridge both ways.
        wait_until(lambda: set(watch_hub.alive()) == set(ring) and set(watch_spoke.alive()) == set(ring), 30, "beats across the bridge")
        wait_until(lambda: watch_hub.extra("hub").get("merges", 0) >= 3 and watch_spoke.extra("spoke").get("merges", 0) >= 3, 40,
                   "merges on both sides of the bridge")
        # Status (retained, regional) stays on its own broker: device trees are not bridged.
        assert watch_hub.version("spoke") == -1 and watch_spoke.version("hub") == -1
        assert watch_hub.exactly_one_token(2.0) and watch_spoke.exactly_one_token(2.0)
        assert watch_hub.lineages() == watch_spoke.lineages()
