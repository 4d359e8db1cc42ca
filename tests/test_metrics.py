"""The metrics / probes HTTP server against clients that misbehave: silent, slow, oversized,
too many at once, or gone before the answer (review H4, F7/F8)."""

from __future__ import annotations

import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.metrics import CoordinatorMetrics, MetricsServer
from tests.helpers import wait_until


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    s = MetricsServer(CoordinatorMetrics(), "127.0.0.1", 0, health=lambda: (True, {}), ready=lambda: (True, {}),
                      timeout_s=1.0, max_connections=8).start()
    try:
        yield s
    finally:
        s.stop()


def get(s: MetricsServer, path: str = "/metrics") -> tuple[int, bytes]:
    with urllib.request.urlopen(s.url + path, timeout=5) as r:
        return r.status, r.read()


def problems(s: MetricsServer) -> dict[str, float]:
    code, body = get(s)
    assert code == 200
    return {sample.labels["kind"]: sample.value for fam in text_string_to_metric_families(body.decode())
            for sample in fam.samples if sample.name == "edgeci_metrics_http_problems_total"}


def connect(s: MetricsServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", s.port), timeout=5)


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed ``sock`` (reading whatever it answered); fails after ``seconds``."""
    t0 = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {seconds} s")
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def test_a_silent_connection_is_closed_after_the_timeout_and_counted(server: MetricsServer) -> None:
    with connect(server) as sock:
        assert 0.5 < closed_within(sock, 5.0) < 3.0
    wait_until(lambda: problems(server)["timeout"] == 1, 5, "the timeout counted")


def test_a_slow_request_gets_one_deadline_not_a_timeout_per_byte(server: MetricsServer) -> None:
    """One byte every 0.2 s never trips a 1 s per-read timeout; the whole request has 1 s."""
    with connect(server) as sock:
        sock.settimeout(0.2)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5.0:
            try:
                sock.sendall(b"G")
                if not sock.recv(1):
                    break
            except TimeoutError:
                continue  # still open
            except OSError:
                break  # reset
        assert time.monotonic() - t0 < 3.0


def test_an_oversized_header_block_is_refused_and_counted(server: MetricsServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 500) for i in range(90)) + b"\r\n")
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
    assert answer.startswith(b"HTTP/1.0 431") or answer == b""
    assert problems(server)["too_large"] == 1


def test_idle_connections_are_capped_and_the_server_keeps_answering(server: MetricsServer) -> None:
    t0 = time.monotonic()
    t0 = time.monotonic()
    idle = [connect(server) for _ in range(6)]  # below the cap of 8: scrapes are served meanwhile
    try:
        assert get(server, "/healthz")[0] == 200
        assert time.monotonic() - t0 < 0.9  # no SYN dropped by a full listen backlog (its retry comes after 1 s)
        idle += [connect(server) for _ in range(2)]
        with connect(server) as extra:  # the ninth: closed at once, no thread
            assert closed_within(extra, 0.5) < 0.5
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: _served(server), 5, "scrapes served again")
    assert problems(server)["refused"] >= 1


def _served(s: MetricsServer) -> bool:
    try:
        return get(s, "/healthz")[0] == 200
    except OSError:
        return False


def test_a_client_that_resets_prints_no_traceback(server: MetricsServer, capsys: pytest.CaptureFixture[str]) -> None:
    sock = connect(server)
    sock.sendall(b"GET /met")  # the server waits in recv for the rest of the line
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    time.sleep(0.1)
    sock.close()  # RST
    wait_until(lambda: problems(server)["disconnect"] == 1, 5, "the reset counted")
    assert "Traceback" not in capsys.readouterr().err


def test_only_get_and_head_are_served(server: MetricsServer, capsys: pytest.CaptureFixture[str]) -> None:
    for path in ("/healthz", "/metrics"):  # HEAD (load balancers, curl -I): the status and headers, no body
        with urllib.request.urlopen(urllib.request.Request(server.url + path, method="HEAD"), timeout=5) as head:
            assert head.status == 200 and int(head.headers["Content-Length"]) > 0 and head.read() == b""
    req = urllib.request.Request(server.url + "/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    err.value.close()
    assert err.value.code in (405, 501)
    assert problems(server)["bad_request"] == 1
    assert capsys.readouterr().err == ""


def test_core_counters_count_from_the_process_start_and_never_go_down() -> None:
    """Operator trial, finding 6: edgeci_updates_total{outcome="accepted"} was 505 before a
    restart and 501 after it (restored from the last commit), which Prometheus reads as a reset
    and adds 501 to increase(). Counted from the process's start, a restart is a reset to 0; a
    core rebuilt from disk mid-run does not take an exported counter down."""
    from edge_sdk.wire.messages import Status

    def status(accepted: int, bytes_in: int, hist: dict[str, int]) -> Status:
        return Status(region="r1", coordinator="c1", version=7, updates_accepted=accepted, updates_rejected=0, updates_duplicate=0,
                      devices_seen=3, buffered=0, extra={"bytes_in": bytes_in, "staleness_histogram": hist})

    def values(m: CoordinatorMetrics) -> dict[str, float]:
        out = {}
        for fam in text_string_to_metric_families(m.exposition().decode()):
            for s in fam.samples:
                if s.name in ("edgeci_updates_total", "edgeci_bytes_total", "edgeci_staleness_count") and \
                        s.labels.get("outcome", s.labels.get("direction", "accepted")) in ("accepted", "in"):
                    out[s.name] = s.value
        return out

    m = CoordinatorMetrics()
    m.count_from(status(501, 10_000, {"0": 400, "1": 101}))  # what the restarted core restored
    m.publish(status(501, 10_000, {"0": 400, "1": 101}))
    assert values(m) == {"edgeci_updates_total": 0.0, "edgeci_bytes_total": 0.0, "edgeci_staleness_count": 0.0}
    m.publish(status(505, 10_400, {"0": 402, "1": 103}))
    assert values(m) == {"edgeci_updates_total": 4.0, "edgeci_bytes_total": 400.0, "edgeci_staleness_count": 4.0}
    m.publish(status(503, 10_200, {"0": 401, "1": 102}))  # a rebuild from disk: the core's counts went back
    assert values(m) == {"edgeci_updates_total": 4.0, "edgeci_bytes_total": 400.0, "edgeci_staleness_count": 4.0}
    m.publish(status(507, 10_600, {"0": 403, "1": 104}))
    assert values(m) == {"edgeci_updates_total": 6.0, "edgeci_bytes_total": 600.0, "edgeci_staleness_count": 6.0}
    plain = CoordinatorMetrics()  # without a baseline (a library user publishing one status): the totals
    plain.publish(status(3, 300, {"0": 3}))
    assert values(plain)["edgeci_updates_total"] == 3.0
    # the release beside the training line (operator trial: /metrics had only the training line)
    released = status(3, 300, {"0": 3})
    plain.publish(Status(**{**{f: getattr(released, f) for f in ("region", "coordinator", "version", "updates_accepted",
                                                                 "updates_rejected", "updates_duplicate", "devices_seen",
                                                                 "buffered")}, "extra": {"release": 5, "pinned": True}}))
    text = plain.exposition().decode()
    assert "edgeci_release_version 5.0" in text and "edgeci_release_pinned 1.0" in text and "edgeci_version 7.0" in text


def test_a_core_rebuilt_from_disk_takes_no_histogram_bucket_or_reason_down(tmp_path: Path) -> None:
    """helper-141: the test above hands the rebuilt core a staleness histogram it does not get. A
    rebuild (CoordinatorDaemon._rebuild_core: ``registry.load()``, a new core) restores the counters
    of the last commit (and, until the commit carried it, no histogram at all), and the collector
    exported only the buckets and reasons the new core had: a bucket counted after the last commit
    took edgeci_staleness_count down (8 → 7 here; 6 → 3 with no histogram restored), and a rejection
    reason counted after the last commit left the exposition."""
    import random

    import numpy as np

    from coordinator.core import (
        CommitVersion,
        CoordinatorConfig,
        CoordinatorCore,
        MessageReceived,
        PersistUpdate,
    )
    from coordinator.registry import Registry
    from coordinator.strategies import make_strategy
    from edge_sdk.wire import topics
    from edge_sdk.wire.codec import encode
    from edge_sdk.wire.messages import Update
    from tests.helpers import SIGNER, SPEC

    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")

    def core() -> CoordinatorCore:  # built as the daemon builds one, at its start and at each rebuild
        snapshot = registry.load()
        assert snapshot is not None
        return CoordinatorCore(CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER),
                               make_strategy("spin", k=2, timeout_s=None, clip_multiplier=0.0), snapshot, rng=random.Random(0))

    def update(c: CoordinatorCore, seq: int, base: int, *, value: float = 1.0) -> None:
        msg = Update(device="d1", seq=seq, model_id="toy", base_version=base, n_samples=1,
                     weights=np.full(SPEC.size, value, np.float32))
        for a in c.handle(MessageReceived(now=float(seq), topic=topics.device_topic("r1", "d1", "update"), payload=encode(msg))):
            if isinstance(a, PersistUpdate):
                registry.persist_update(a.update)
            elif isinstance(a, CommitVersion):
                registry.commit(a)

    def exported(m: CoordinatorMetrics) -> dict[tuple[str, str | None], float]:
        return {(s.name, s.labels.get("reason")): s.value for fam in text_string_to_metric_families(m.exposition().decode())
                for s in fam.samples if s.name in ("edgeci_staleness_count", "edgeci_staleness_sum", "edgeci_rejections_total")}

    c = core()
    m = CoordinatorMetrics()
    m.count_from(c.status())
    for seq in range(5):  # staleness 0, 0, 1, 1 (versions 1 and 2 commit them), then 2 (pending: d1 trains from version 0)
        update(c, seq, 0)
    update(c, 5, 0, value=float("nan"))  # rejected (non_finite) after the last commit: no commit keeps its count
    m.publish(c.status())
    before = exported(m)
    assert before[("edgeci_staleness_count", None)] == 5.0 and before[("edgeci_staleness_sum", None)] == 4.0
    assert before[("edgeci_rejections_total", "non_finite")] == 1.0
    c = core()  # rebuilt from disk: the histogram as of version 2, and the pending update's bucket 2 counted again
    # (helper-169: restored into the buffer, it is counted; before, {"0": 2, "1": 2})
    assert c.status().extra["staleness_histogram"] == {"0": 2, "1": 2, "2": 1}
    assert "non_finite" not in c.status().extra["rejected_by_reason"]  # (a rejection after the last commit is not kept)
    for seq in range(6, 9):  # staleness 0: bucket 0 goes on from 2, bucket 1 holds 2, bucket 2 holds its exported 1
        update(c, seq, c.version)
    m.publish(c.status())
    after = exported(m)
    assert after[("edgeci_staleness_count", None)] == 8.0 and after[("edgeci_staleness_sum", None)] == 4.0
    assert after[("edgeci_rejections_total", "non_finite")] == 1.0


def test_operator_refusals_are_their_own_family_not_rejected_messages() -> None:
    """A mistyped `edgeci rollback 9999` was counted in edgeci_rejections_total and
    edgeci_messages_rejected_total, as if a device misbehaved (helper-85)."""
    from edge_sdk.wire.messages import Status

    m = CoordinatorMetrics()
    m.publish(Status(region="r1", coordinator="c1", version=7, updates_accepted=0, updates_rejected=0, updates_duplicate=0,
                     devices_seen=0, buffered=0, extra={"control_refused_by_reason": {"unknown_version": 2, "gate_rejected": 1}}))
    samples = {(s.name, s.labels.get("reason")): s.value
               for fam in text_string_to_metric_families(m.exposition().decode()) for s in fam.samples}
    assert samples[("edgeci_control_refused_total", "unknown_version")] == 2.0
    assert samples[("edgeci_control_refused_total", "gate_rejected")] == 1.0
    assert not any(name == "edgeci_rejections_total" for name, _ in samples)


def test_the_release_gate_is_in_the_metrics() -> None:
    """An operator could alert on a stuck gate only by polling `edgeci status --json`: /metrics
    had the release but not the verdicts, the pending candidates or how far the release trailed."""
    from edge_sdk.wire.messages import Status

    def status(version: int, release: int, promoted: int, held: int, rejected: int, pending: list[int]) -> Status:
        return Status(region="r1", coordinator="c1", version=version, updates_accepted=0, updates_rejected=0,
                      updates_duplicate=0, devices_seen=0, buffered=0,
                      extra={"release": release, "gate": {"promoted": promoted, "held": held, "rejected": rejected,
                                                          "rolled_back_updates": 5 * rejected, "pending": pending}})

    def samples(m: CoordinatorMetrics) -> dict[tuple[str, str | None], float]:
        return {(s.name, s.labels.get("decision")): s.value
                for fam in text_string_to_metric_families(m.exposition().decode()) for s in fam.samples}

    m = CoordinatorMetrics()
    m.count_from(status(10, 8, promoted=6, held=3, rejected=1, pending=[]))  # restored at start: counted from here
    m.publish(status(14, 9, promoted=7, held=5, rejected=2, pending=[13, 14]))
    got = samples(m)
    assert got[("edgeci_gate_decisions_total", "promoted")] == 1.0
    assert got[("edgeci_gate_decisions_total", "held")] == 2.0
    assert got[("edgeci_gate_decisions_total", "rejected")] == 1.0
    assert got[("edgeci_gate_rolled_back_updates_total", None)] == 5.0
    assert got[("edgeci_gate_pending", None)] == 2.0
    assert got[("edgeci_release_behind", None)] == 5.0
    ungated = CoordinatorMetrics()  # no gate: no gate families
    ungated.publish(Status(region="r1", coordinator="c1", version=3, updates_accepted=0, updates_rejected=0, updates_duplicate=0,
                           devices_seen=0, buffered=0, extra={"gate": None}))
    assert not any(name.startswith("edgeci_gate") for name, _ in samples(ungated))
