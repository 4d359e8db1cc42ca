"""Prometheus metrics and health probes for the coordinator daemon.

The actor thread owns the core; it publishes a *snapshot* (the core's :class:`Status`, a
fresh object per call that nobody mutates afterwards) with :meth:`CoordinatorMetrics.publish`.
The HTTP thread only reads the latest snapshot reference, so a scrape never touches the core.
Latencies are observed by the daemon around the work it does (``prometheus_client``
histograms are thread-safe).

``/metrics``  Prometheus text format
``/healthz``  200 while the process and its actor thread are alive, else 503
``/readyz``   200 when connected to the broker and storage is ok, else 503 (JSON says why)

The server faces whoever reaches its port: each connection has ``timeout_s`` in all to send its
request (a silent or byte-a-second client cannot hold a thread), the request line and headers
``MAX_REQUEST_BYTES`` together, at most ``max_connections`` are served at once (more are closed
on accept, without a thread), and a client that hangs up costs one debug line, not a traceback.
Each of these is counted in ``edgeci_metrics_http_problems_total{kind}``.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from edge_sdk.errors import ConfigError
from edge_sdk.wire.messages import Status

log = logging.getLogger("edgeci.metrics")

STALENESS_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21, 34)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
Probe = Callable[[], tuple[bool, Mapping[str, Any]]]
HTTP_PROBLEMS = ("timeout", "too_large", "refused", "disconnect", "bad_request", "error")
"""Kinds of ``edgeci_metrics_http_problems_total``: no complete request within the timeout; a
request line + headers over ``MAX_REQUEST_BYTES``; a connection over ``max_connections``,
closed on accept; the client hung up (reset, broken pipe); a malformed request or a method
other than GET and HEAD; anything else that failed while serving."""
MAX_REQUEST_BYTES = 32 * 1024
"""Request line plus headers: a scrape or probe sends a few hundred bytes."""


class CoordinatorMetrics:
    """The daemon's metrics: latency histograms plus a collector over the latest snapshot."""

    def __init__(self, problems: Callable[[], Mapping[str, int]] | None = None,
                 connected: Callable[[], bool] | None = None, state_dir: Path | None = None) -> None:
        self.problems = problems
        """Counts of what the process survived, by kind (read at each scrape; any thread)."""
        self.connected = connected
        """Whether the broker connection is up now (``edgeci_broker_connected``; any thread)."""
        self.state_dir = state_dir
        """The state dir, whose file system's free and total bytes each scrape reads (a statvfs)."""
        self.registry = CollectorRegistry(auto_describe=True)
        # process_start_time_seconds (restarts, crash loops), resident memory, open descriptors
        # (Linux /proc; exports nothing where there is none)
        ProcessCollector(registry=self.registry)
        self.aggregation_seconds = Histogram(
            "edgeci_aggregation_seconds", "Time to handle an event that produced a new version (strategy combine included)",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "edgeci_commit_seconds", "Time to make a new version durable in the registry",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.http_problems = Counter(
            "edgeci_metrics_http_problems", "Clients of this metrics / probes server that misbehaved or failed, by kind",
            ["kind"], registry=self.registry,
        )
        for kind in HTTP_PROBLEMS:
            self.http_problems.labels(kind)  # exported at 0 from the start
        self._snapshot: Status | None = None
        self._baseline: Status | None = None
        self.registry.register(_SnapshotCollector(self))

    def publish(self, status: Status) -> None:
        """Actor thread: the latest view (a reference swap: atomic for the readers)."""
        self._snapshot = status

    def count_from(self, status: Status) -> None:
        """Export the core's counters from ``status`` on (the daemon: the core it restored at
        start). The status JSON keeps the state dir's totals, restored from the last commit:
        exported as they are, a restart that lost a buffer's worth of counts made every counter
        go *down* a little, which Prometheus reads as a reset and then adds the whole total to
        ``increase()``. Counted from the process's start instead, a restart is an ordinary reset
        to 0. Within a process an exported counter never goes down either (a core rebuilt from
        disk after a storage failure restarts from its last commit): it holds until the core's
        count passes it again."""
        self._baseline = status

    @property
    def baseline(self) -> Status | None:
        return self._baseline

    @property
    def snapshot(self) -> Status | None:
        return self._snapshot

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _SnapshotCollector:
    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self._metrics = metrics
        self._exported: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()  # scrapes may come from several HTTP threads

    def _labelled(self, family: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` (label -> the core's count) plus every label of ``family`` exported before that
        the snapshot no longer has, at 0: :meth:`_count` keeps those at what they reached. A core
        rebuilt from disk (a storage failure, a core error) counts from its last commit, and from
        nothing what no commit keeps (the staleness histogram): a label left out made its series
        end, and a bucket left out took the histogram's count, sum and higher buckets down."""
        out = {str(label): n for label, n in values.items()}
        with self._lock:
            held = [label for fam, label in self._exported if fam == family and label not in out]
        for label in held:
            out[label] = 0
        return out

    def _count(self, family: str, label: str, value: float, base: float) -> float:
        """A core counter as exported: from the baseline on, never going down (see
        :meth:`CoordinatorMetrics.count_from`)."""
        key = (family, label)
        v = max(0.0, float(value) - float(base))
        with self._lock:
            v = max(v, self._exported.get(key, 0.0))
            self._exported[key] = v
        return v

    def describe(self) -> list[Metric]:
        return []  # families depend on the snapshot; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        problems = self._metrics.problems
        if problems is not None:
            fam = CounterMetricFamily(
                "edgeci_problems", "What the coordinator process survived, by kind: publishes the transport refused, "
                "storage failures, events the core raised on (rebuilt from disk), QoS 1 messages dropped after too many went unacknowledged, malformed packets "
                "from the broker, messages the broker delivered on topics we did not subscribe to (unsubscribed), errors caught in the actor", labels=["kind"])
            for kind, n in sorted(problems().items()):
                fam.add_metric([kind], n)
            yield fam
        if self._metrics.connected is not None:
            yield GaugeMetricFamily("edgeci_broker_connected", "1 while the coordinator is connected to its broker",
                                    value=1 if self._metrics.connected() else 0)
        yield from _disk(self._metrics.state_dir)
        s = self._metrics.snapshot
        if s is None:
            return
        x = s.extra
        b = self._metrics.baseline
        bx: Mapping[str, Any] = b.extra if b is not None else {}
        c = self._count
        info = GaugeMetricFamily("edgeci_coordinator_info", "The coordinator's identity (value 1)",
                                 labels=["region", "coordinator", "strategy", "model_id"])
        info.add_metric([s.region, s.coordinator, s.strategy, str(x.get("model_id", ""))], 1)
        yield info
        yield GaugeMetricFamily("edgeci_version", "Current model version (the training line)", value=s.version)
        if isinstance(x.get("release"), int):
            yield GaugeMetricFamily("edgeci_release_version", "The release: the version devices predict with", value=x["release"])
            yield GaugeMetricFamily("edgeci_release_pinned", "1 while an operator's pin holds the release (no promotions)",
                                    value=1 if x.get("pinned") else 0)
        updates = CounterMetricFamily("edgeci_updates", "Device updates by outcome", labels=["outcome"])
        updates.add_metric(["accepted"], c("updates", "accepted", s.updates_accepted, b.updates_accepted if b else 0))
        updates.add_metric(["duplicate"], c("updates", "duplicate", s.updates_duplicate, b.updates_duplicate if b else 0))
        updates.add_metric(["rejected"], c("updates", "rejected", s.updates_rejected, b.updates_rejected if b else 0))
        yield updates
        reasons = CounterMetricFamily("edgeci_rejections", "Rejected messages (updates and others) by reason",
                                      labels=["reason"])
        base_reasons = dict(bx.get("rejected_by_reason", {}))
        for reason, n in sorted(self._labelled("rejections", dict(x.get("rejected_by_reason", {}))).items()):
            reasons.add_metric([reason], c("rejections", reason, n, base_reasons.get(reason, 0)))
        yield reasons
        refused = CounterMetricFamily("edgeci_control_refused", "Verified operator commands that could not run, by reason "
                                      "(unverified ones are rejected messages)", labels=["reason"])
        base_refused = dict(bx.get("control_refused_by_reason", {}))
        for reason, n in sorted(self._labelled("control_refused", dict(x.get("control_refused_by_reason", {}))).items()):
            refused.add_metric([reason], c("control_refused", reason, n, base_refused.get(reason, 0)))
        yield refused
        yield CounterMetricFamily("edgeci_messages_rejected", "Rejected messages other than updates",
                                  value=c("messages_rejected", "", x.get("messages_rejected", 0), bx.get("messages_rejected", 0)))
        pulls = CounterMetricFamily("edgeci_pulls", "Pulls by result", labels=["result"])
        for result in ("served", "deferred", "serving", "unchanged"):
            if f"pulls_{result}" in x:
                pulls.add_metric([result], c("pulls", result, x[f"pulls_{result}"], bx.get(f"pulls_{result}", 0)))
        yield pulls
        traffic = CounterMetricFamily("edgeci_bytes", "Payload bytes", labels=["direction"])
        traffic.add_metric(["in"], c("bytes", "in", x.get("bytes_in", 0), bx.get("bytes_in", 0)))
        traffic.add_metric(["out"], c("bytes", "out", x.get("bytes_out", 0), bx.get("bytes_out", 0)))
        yield traffic
        yield CounterMetricFamily("edgeci_aggregations", "Aggregations (new versions from updates)",
                                  value=c("aggregations", "", x.get("aggregations", 0), bx.get("aggregations", 0)))
        yield CounterMetricFamily("edgeci_duplicate_devices", "Device ids found in use by two devices at once (a cloned "
                                  "image: updates under one seq with two nonces), each said once at ERROR",
                                  value=c("duplicate_devices", "", x.get("duplicate_devices", 0), bx.get("duplicate_devices", 0)))
        yield GaugeMetricFamily("edgeci_buffered_updates", "Accepted updates waiting for aggregation", value=s.buffered)
        yield GaugeMetricFamily("edgeci_devices_seen", "Devices that pulled or pushed since the state dir began",
                                value=s.devices_seen)
        yield GaugeMetricFamily("edgeci_devices_online", "Devices whose presence says online (MQTT last will)",
                                value=x.get("devices_online", 0))
        yield GaugeMetricFamily("edgeci_storage_ok", "1 while storage accepts writes", value=1 if x.get("storage_ok", True) else 0)
        if isinstance(x.get("last_aggregation_at"), (int, float)) and x["last_aggregation_at"] > 0:
            yield GaugeMetricFamily("edgeci_last_aggregation_timestamp_seconds", "Unix time of the last aggregation "
                                    "(a new version from device updates; checkpointed, so it survives restarts)",
                                    value=float(x["last_aggregation_at"]))
        # Deferred updates: acknowledged "retry later", neither accepted nor rejected. Labels are
        # fixed here (never read from the wire); a reason is exported once the status carries it.
        deferred = {"converting": (x.get("conversion") or {}).get("deferred"), "storage": x.get("deferred_storage")}
        bdeferred = {"converting": (bx.get("conversion") or {}).get("deferred", 0), "storage": bx.get("deferred_storage", 0)}
        if any(isinstance(v, int) for v in deferred.values()):
            fam = CounterMetricFamily("edgeci_updates_deferred", "Device updates answered 'retry later', by reason: storage "
                                      "(the state dir refused writes), converting (the device's queue behind a stale-update "
                                      "conversion was full)", labels=["reason"])
            for reason, count in deferred.items():
                if isinstance(count, int):
                    fam.add_metric([reason], c("updates_deferred", reason, count, bdeferred[reason] or 0))
            yield fam
        heard = x.get("peers_heard")
        if isinstance(heard, dict) and heard:  # keys: the configured peers (Peering.expected_peers), never a sender's claim
            known = GaugeMetricFamily("edgeci_peer_heard", "1 once a message from this configured peer was accepted "
                                      "since this process started", labels=["peer"])
            last = GaugeMetricFamily("edgeci_peer_last_heard_timestamp_seconds", "Unix time of the last accepted message "
                                     "from this configured peer (absent until one since this start)", labels=["peer"])
            for peer, at in sorted(heard.items()):
                known.add_metric([str(peer)], 0 if at is None else 1)
                if isinstance(at, (int, float)):
                    last.add_metric([str(peer)], float(at))
            yield known
            yield last
        base_hist = dict(bx.get("staleness_histogram", {}))
        hist = self._labelled("staleness", dict(x.get("staleness_histogram", {})))
        yield _staleness({k: c("staleness", k, n, base_hist.get(k, 0)) for k, n in hist.items()})
        conv = x.get("conversion")
        if isinstance(conv, dict):  # a converting staleness policy (gradient-inversion, dc-asgd)
            outcomes = CounterMetricFamily("edgeci_conversions", "Stale-update conversions by outcome", labels=["outcome"])
            bconv: Mapping[str, Any] = bx.get("conversion") or {}
            for outcome in ("requested", "applied", "late", "failed", "no_base", "switched_off"):
                outcomes.add_metric([outcome], c("conversions", outcome, conv.get(outcome, 0), bconv.get(outcome, 0)))
            yield outcomes
            yield GaugeMetricFamily("edgeci_conversion_alpha", "Weight of converted estimates (1 before the switch back, "
                                    "falling to 0 after it)", value=float(conv.get("alpha", 1.0)))
            yield GaugeMetricFamily("edgeci_conversions_parked", "Updates waiting for their conversion",
                                    value=conv.get("parked", 0))
        gate = x.get("gate")
        if isinstance(gate, dict):  # the release gate: what it decided, and how far the release trails
            bgate_all: Mapping[str, Any] = bx.get("gate") or {}
            decisions = CounterMetricFamily("edgeci_gate_decisions", "Release-gate verdicts on candidates: promoted (released), "
                                            "held (not shown within the margin; training went on), rejected (worse by more "
                                            "than the rollback margin; its updates rolled back)", labels=["decision"])
            for decision in ("promoted", "held", "rejected"):
                decisions.add_metric([decision], c("gate_decisions", decision, gate.get(decision, 0), bgate_all.get(decision, 0)))
            yield decisions
            yield CounterMetricFamily("edgeci_gate_rolled_back_updates", "Device updates undone with a rejected candidate",
                                      value=c("gate_rolled_back_updates", "", gate.get("rolled_back_updates", 0),
                                              bgate_all.get("rolled_back_updates", 0)))
            yield GaugeMetricFamily("edgeci_gate_pending", "Candidates waiting for the gate's verdict",
                                    value=len(gate.get("pending") or ()))
            if isinstance(x.get("release"), int):
                yield GaugeMetricFamily("edgeci_release_behind", "Versions between the training line and the release "
                                        "(grows while the gate holds or rejects candidates)",
                                        value=max(0, s.version - int(x["release"])))
        canary = gate.get("canary") if isinstance(gate, dict) else None
        if isinstance(canary, dict):  # federated (canary) evaluation for the release gate
            reports = CounterMetricFamily("edgeci_canary_reports", "Canary reports by outcome (rejected: by reason)",
                                          labels=["outcome"])
            bgate: Mapping[str, Any] = bx.get("gate") or {}
            bcanary: Mapping[str, Any] = bgate.get("canary") or {}
            reports.add_metric(["accepted"], c("canary_reports", "accepted", canary.get("reports", 0), bcanary.get("reports", 0)))
            base_rej = dict(bcanary.get("rejected_by_reason", {}))
            rejected = {f"rejected:{reason}": n for reason, n in dict(canary.get("rejected_by_reason", {})).items()}
            for label, n in sorted(self._labelled("canary_reports", rejected).items()):
                if label.startswith("rejected:"):  # ("accepted" is exported above, always)
                    reports.add_metric([label], c("canary_reports", label, n, base_rej.get(label[9:], 0)))
            yield reports
            yield CounterMetricFamily("edgeci_canary_rounds", "Canary rounds opened",
                                      value=c("canary_rounds", "", canary.get("rounds", 0), bcanary.get("rounds", 0)))


def _disk(state_dir: Path | None) -> Iterator[Metric]:
    """Free and total bytes of the state dir's file system (nothing when it cannot be read: the
    storage failures say so)."""
    if state_dir is None:
        return
    try:
        st = os.statvfs(state_dir)
    except OSError:
        return
    yield GaugeMetricFamily("edgeci_state_dir_free_bytes", "Bytes available to the coordinator on the state dir's "
                            "file system", value=st.f_bavail * st.f_frsize)
    yield GaugeMetricFamily("edgeci_state_dir_size_bytes", "Size of the state dir's file system", value=st.f_blocks * st.f_frsize)


def _staleness(hist: Mapping[str, float]) -> HistogramMetricFamily:
    counts = {int(k): int(v) for k, v in hist.items()}
    buckets: list[tuple[str, float]] = []
    for bound in STALENESS_BUCKETS:
        buckets.append((str(float(bound)), float(sum(n for k, n in counts.items() if k <= bound))))
    buckets.append(("+Inf", float(sum(counts.values()))))
    fam = HistogramMetricFamily("edgeci_staleness", "Staleness (versions behind) of accepted updates")
    fam.add_metric([], buckets, sum_value=float(sum(k * n for k, n in counts.items())))
    return fam


class _RequestReader(io.RawIOBase):
    """A connection's incoming bytes within one deadline and one size budget: the whole
    request, not each read, must arrive in time (a client sending a byte a second never trips
    a per-read timeout), and its line and headers cannot grow without bound."""

    def __init__(self, sock: socket.socket, deadline: float, budget: int, problem: Callable[[str], None]) -> None:
        self._sock, self._deadline, self._budget, self._problem = sock, deadline, budget, problem

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if self._budget <= 0:
            raise _RequestTooLarge(f"request line and headers over {MAX_REQUEST_BYTES} bytes")
        try:
            if left <= 0:
                raise TimeoutError("no complete request in time")
            self._sock.settimeout(left)
            n = self._sock.recv_into(memoryview(buffer)[: self._budget])
        except TimeoutError:
            self._problem("timeout")  # BaseHTTPRequestHandler closes the connection on it
            raise
        self._budget -= n
        return n


class _RequestTooLarge(http.client.LineTooLong):
    """Raised by the reader past the budget; BaseHTTPRequestHandler answers a LineTooLong in the
    headers with 431 itself, and ``handle_one_request`` below does for the request line."""


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on one small threaded HTTP server (GET and HEAD only)."""

    def __init__(self, metrics: CoordinatorMetrics, host: str, port: int, *, health: Probe, ready: Probe,
                 timeout_s: float = 10.0, max_connections: int = 32) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"metrics port must be 0..65535, got {port}")
        if not timeout_s > 0 or max_connections < 1:
            raise ConfigError(f"metrics server needs timeout_s > 0 and max_connections >= 1, got {timeout_s}, {max_connections}")
        self.metrics, self.health, self.ready = metrics, health, ready
        self.timeout_s = timeout_s
        server = self
        problem = self._problem

        class Handler(BaseHTTPRequestHandler):
            timeout = timeout_s  # also bounds each write of the answer

            def setup(self) -> None:
                super().setup()
                self.rfile.close()  # an open makefile would keep the socket's descriptor alive after close
                self.rfile = io.BufferedReader(_RequestReader(self.connection, time.monotonic() + timeout_s,
                                                              MAX_REQUEST_BYTES, problem))

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except _RequestTooLarge:  # in the request line (in the headers the base class answers 431)
                    self.close_connection = True
                    self.requestline, self.request_version, self.command = "", "", ""
                    self.send_error(431)

            def do_GET(self) -> None:
                self.connection.settimeout(timeout_s)  # the answer gets its own time, not what is left of the request's
                server._serve(self)

            def do_HEAD(self) -> None:  # load balancers and `curl -I` probe with HEAD: the status line, no body
                self.connection.settimeout(timeout_s)
                server._serve(self, body=False)

            def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
                problem("too_large" if code in (414, 431) else "bad_request")
                super().send_error(code, message, explain)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s %s", self.address_string(), format % args)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # the default 5 dropped the SYN of a burst's 6th client (it retried after 1 s)
            slots = threading.BoundedSemaphore(max_connections)

            def process_request(self, request: Any, client_address: Any) -> None:
                if not self.slots.acquire(blocking=False):
                    problem("refused")  # closed on accept: no thread, no read
                    self.shutdown_request(request)
                    return
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    self.slots.release()
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    self.slots.release()

            def handle_error(self, request: Any, client_address: Any) -> None:
                exc = sys.exc_info()[1]
                if isinstance(exc, ConnectionError):  # reset, broken pipe: the client left
                    problem("disconnect")
                    log.debug("metrics client %s went away: %s", client_address, exc)
                else:
                    problem("error")
                    log.warning("metrics: serving %s failed: %s: %s", client_address, type(exc).__name__, exc)

        try:
            self._httpd = Server((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)

    def _problem(self, kind: str) -> None:
        self.metrics.http_problems.labels(kind).inc()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0]
        return f"http://{host!s}:{self.port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics on %s/metrics, probes %s/healthz and %s/readyz", self.url, self.url, self.url)
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def _serve(self, req: BaseHTTPRequestHandler, *, body: bool = True) -> None:
        path = req.path.split("?", 1)[0]
        if path == "/metrics":
            data, status, ctype = self.metrics.exposition(), 200, CONTENT_TYPE_LATEST
        elif path in ("/healthz", "/readyz"):
            try:
                ok, detail = (self.health if path == "/healthz" else self.ready)()
            except Exception as exc:  # a probe must answer, never hang or kill the server thread
                ok, detail = False, {"error": f"{type(exc).__name__}: {exc}"}
            data = json.dumps({"ok": ok, **detail}, sort_keys=True).encode()
            status, ctype = (200 if ok else 503), "application/json"
        else:
            data, status, ctype = b"not found: try /metrics, /healthz or /readyz\n", 404, "text/plain"
        req.send_response(status)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if body:
            req.wfile.write(data)


# ---------------------------------------------------------------------- liveness on the status topic


def stamp_status(payload: bytes, *, alive: bool, now: float, heartbeat_s: float, reason: str = "", instance: str = "") -> bytes:
    """Add ``alive``, ``published_at`` and ``heartbeat_s`` (and the process's ``instance``) to a
    status JSON object (a byte splice: the status is published often and is already valid JSON)."""
    head: dict[str, object] = {"alive": alive, "heartbeat_s": heartbeat_s, "published_at": round(now, 3)}
    if instance:
        head["instance"] = instance
    if reason:
        head["reason"] = reason
    prefix = json.dumps(head, sort_keys=True)[:-1].encode()
    body = payload.strip()
    if body[:1] != b"{":
        raise ValueError("status payload is not a JSON object")
    return prefix + (b"}" if body == b"{}" else b", " + body[1:])


WILL_REASON = "connection lost (last will)"
"""The ``reason`` of the coordinator's last will: the broker lost the connection (a crash, a network
cut, or the daemon's own close for a redelivery, after which it reconnects and says ``alive`` again)."""


def status_will(region: str, coordinator: str, instance: str = "") -> bytes:
    """The coordinator's MQTT last will on its status topic: ``alive: false``."""
    return json.dumps({
        "v": 1, "type": "status", "region": region, "coordinator": coordinator, "alive": False,
        "reason": WILL_REASON, **({"instance": instance} if instance else {}),
    }, sort_keys=True).encode()
