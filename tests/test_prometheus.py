"""The shipped Prometheus files (deploy/prometheus/) against a real Prometheus: promtool checks the
scrape config and the alert rules and runs the rules' unit tests (tests/prometheus/alerts_test.yml),
and a Prometheus on 127.0.0.1 scrapes a real coordinator process and reads the coordinator's own
counters (helper-171).

Debian's ``prometheus`` package brings both binaries (``make setup`` installs it). Without them these
tests skip, except under CI (``CI`` set), where a missing binary is a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.broker import MosquittoProcess, free_port
from coordinator.registry import Registry
from edge_sdk.mqtt import MqttTransport
from edge_sdk.tasks import get_task
from edge_sdk.wire import topics
from edge_sdk.wire.codec import encode
from edge_sdk.wire.messages import Update
from tests.helpers import CoordinatorProcess, wait_until

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "prometheus"


def binary(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        why = f"{name} is not installed (Debian: apt-get install prometheus; `make setup` does it)"
        if os.environ.get("CI"):
            pytest.fail(why + "; CI is set, so this is a failure, not a skip")
        pytest.skip(why)
    return exe


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_shipped_scrape_config_and_alert_rules_pass_promtool_check() -> None:
    rules = promtool("check", "rules", str(DEPLOY / "edgeci-alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 14 rules found" in rules.stdout
    config = promtool("check", "config", str(DEPLOY / "prometheus.yml"))  # also loads the rule file it names
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout


def test_alert_rules_fire_when_they_should_and_not_otherwise() -> None:
    """``promtool test rules``: each alert over input series that should fire it and series that should not."""
    out = promtool("test", "rules", "alerts_test.yml", cwd=ROOT / "tests" / "prometheus")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_shipped_alert_has_a_unit_test() -> None:
    alerts = {line.split(":", 1)[1].strip() for line in (DEPLOY / "edgeci-alerts.yml").read_text().splitlines()
              if line.strip().startswith("- alert:")}
    tested = {line.split(":", 1)[1].strip() for line in (ROOT / "tests" / "prometheus" / "alerts_test.yml").read_text().splitlines()
              if line.strip().startswith("alertname:")}
    assert len(alerts) == 14 and alerts == tested, alerts ^ tested


# ---------------------------------------------------------------------- a real Prometheus, a real coordinator


class Prometheus:
    """``prometheus`` on 127.0.0.1 (a free port, its TSDB in ``root``) scraping ``targets`` each second."""

    def __init__(self, exe: str, root: Path, targets: list[str]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEPLOY / "edgeci-alerts.yml", root / "edgeci-alerts.yml")  # the shipped rules, loaded for real
        (root / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "rule_files:\n  - edgeci-alerts.yml\n"
            "scrape_configs:\n  - job_name: edgeci-coordinator\n    scrape_timeout: 1s\n"
            f"    static_configs:\n      - targets: {json.dumps(targets)}\n")
        self._root = root
        for attempt in range(3):  # a free port another process took before prometheus bound it: another port
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.log = (root / "prometheus.log").open("w")
            self.proc = subprocess.Popen(
                [exe, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT, cwd=root)
            try:
                wait_until(lambda: self._ready() or self.proc.poll() is not None, 60, "prometheus ready")
            except BaseException:
                self.stop()
                raise
            if self.proc.poll() is None:
                return
            self.stop()
            log = (root / "prometheus.log").read_text()
            if attempt == 2 or "address already in use" not in log:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{log}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant vector: labels (without __name__, job, instance) -> value."""
        out = {}
        for row in self.api("query", query=promql)["result"]:
            labels = tuple(sorted((k, v) for k, v in row["metric"].items() if k not in ("__name__", "job", "instance")))
            out[labels] = float(row["value"][1])
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture
def prometheus_bin() -> str:
    """Looked up before the coordinator starts (a skip, or under CI a failure, costs nothing)."""
    return binary("prometheus")


@pytest.fixture
def init_model(tmp_path: Path) -> Path:
    """A deployed model file, so that the coordinator skips pretraining."""
    from edge_sdk.modelio import save_model

    spec = get_task("digits").spec
    path = tmp_path / "deployed.npz"
    save_model(path, spec, np.random.default_rng(0).normal(0, 0.1, spec.size).astype(np.float32), {"version": 0})
    return path


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.mark.broker
def test_prometheus_scrapes_a_real_coordinator_and_sees_its_counters(prometheus_bin: str, mosquitto: MosquittoProcess,
                                                                     tmp_path: Path, init_model: Path) -> None:
    """Three accepted updates, a duplicate, a NaN one and garbage: what Prometheus stored is what the
    coordinator counted (its own /metrics and its status), the shipped rules load and evaluate, and
    no alert fires for a healthy coordinator."""
    region, port = "prom", free_port()
    task = get_task("digits")
    with CoordinatorProcess("--broker", mosquitto.url, "--region", region, "--state-dir", str(tmp_path / "state"),
                            "--init", str(init_model), "--k", "50", "--timeout", "1", "--metrics-port", str(port),
                            "--status-interval", "1", "--accept-unpulled-updates"):
        prom = Prometheus(prometheus_bin, tmp_path / "prometheus", [f"127.0.0.1:{port}"])
        try:
            wait_until(lambda: prom.query('up{job="edgeci-coordinator"}') == {(): 1.0}, 30, "the first scrape")
            weights = Registry(tmp_path / "state", task.spec).read_version(0)[0]
            raw = MqttTransport(mosquitto.url, client_id="prom-probe", subscriptions=[], on_message=lambda t, p: None,
                                clean_session=True)
            raw.start()
            try:
                for n, dev in enumerate(("p1", "p2", "p3", "p1")):  # the second p1 seq 1: a duplicate
                    upd = Update(device=dev, seq=1, model_id=task.spec.model_id, base_version=0, n_samples=3 + n, weights=weights)
                    raw.publish(topics.device_topic(region, dev, "update"), encode(upd))
                nan = weights.copy()
                nan[0] = np.nan
                raw.publish(topics.device_topic(region, "p4", "update"), encode(Update(
                    device="p4", seq=1, model_id=task.spec.model_id, base_version=0, n_samples=3, weights=nan)))
                raw.publish(topics.device_topic(region, "p5", "update"), b"\x93garbage")
            finally:
                raw.stop()

            def own() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
                return scrape(port)

            wait_until(lambda: own().get(("edgeci_aggregations_total", ())) == 1.0
                       and own().get(("edgeci_updates_total", (("outcome", "rejected"),))) == 2.0, 30,
                       "the coordinator to count 2 rejected and aggregate once")
            mine = own()
            counted = {
                "edgeci_updates_total": {labels: v for (name, labels), v in mine.items() if name == "edgeci_updates_total"},
                "edgeci_rejections_total": {labels: v for (name, labels), v in mine.items() if name == "edgeci_rejections_total"},
                "edgeci_aggregations_total": {(): mine[("edgeci_aggregations_total", ())]},
                "edgeci_version": {(): mine[("edgeci_version", ())]},
                "edgeci_broker_connected": {(): mine[("edgeci_broker_connected", ())]},
            }
            assert counted["edgeci_updates_total"] == {(("outcome", "accepted"),): 3.0, (("outcome", "duplicate"),): 1.0,
                                                       (("outcome", "rejected"),): 2.0}
            assert {"non_finite", "malformed"} <= {dict(labels)["reason"] for labels in counted["edgeci_rejections_total"]}
            assert counted["edgeci_version"] == {(): 1.0} and counted["edgeci_broker_connected"] == {(): 1.0}
            seen: dict[str, Any] = {}

            def stored() -> bool:
                seen.update({name: prom.query(f'{name}{{job="edgeci-coordinator"}}') for name in counted})
                return all(seen[name] == want for name, want in counted.items())
            wait_until(stored, 30, "Prometheus to hold the coordinator's counters")
            assert seen == counted
            # rates over what was scraped: three accepted updates since the first scrape
            assert prom.query('increase(edgeci_updates_total{outcome="accepted"}[5m])') \
                .get((("outcome", "accepted"),), 0.0) > 0
            # the shipped rules loaded and were evaluated without error; none fires for this healthy coordinator
            groups = prom.api("rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            assert len(rules) == 14 and all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
            # (EdgeciNoAggregationWhileUpdatesArrive is pending from the first accepted update until the
            # aggregation's scrape, a second or two: the rules are evaluated each second here)
            # EdgeciStateDirFillingUp extrapolates the state dir's free bytes over 24 h from what was scraped:
            # here seconds of samples, in which any write to the host's disk (Prometheus's own TSDB, other
            # tests and processes on a shared machine) predicts a full disk: 15 MB less free in 20 s left
            # it pending (63.8 GB free) on a loaded machine. It may be pending, not firing, and only while
            # the free bytes Prometheus stored did fall; any other alert, pending or firing, fails.
            alerts: list[dict[str, Any]] = []

            def quiet() -> bool:
                alerts[:] = prom.api("alerts")["alerts"]
                if not alerts:
                    return True
                if [a for a in alerts if (a["labels"]["alertname"], a["state"]) != ("EdgeciStateDirFillingUp", "pending")]:
                    return False
                return prom.query('delta(edgeci_state_dir_free_bytes{job="edgeci-coordinator"}[1h]) < 0') != {}

            wait_until(quiet, 15, "no alert pending or firing", detail=lambda: alerts)
        finally:
            prom.stop()


@pytest.mark.broker
def test_prometheus_sees_no_new_series_from_hostile_devices(prometheus_bin: str, mosquitto: MosquittoProcess, tmp_path: Path,
                                                           init_model: Path) -> None:
    """The cardinality check end to end: after one round of hostile messages, 50 devices under new
    ids sending the same leave the number of series Prometheus holds for the coordinator unchanged."""
    region, port = "promhostile", free_port()
    task = get_task("digits")
    with CoordinatorProcess("--broker", mosquitto.url, "--region", region, "--state-dir", str(tmp_path / "state"),
                            "--init", str(init_model), "--metrics-port", str(port), "--status-interval", "1"):
        prom = Prometheus(prometheus_bin, tmp_path / "prometheus", [f"127.0.0.1:{port}"])
        raw = MqttTransport(mosquitto.url, client_id="hostile", subscriptions=[], on_message=lambda t, p: None, clean_session=True)
        raw.start()
        try:
            weights = np.zeros(task.spec.size, np.float32)

            def attack(device: str) -> None:
                raw.publish(topics.device_topic(region, device, "update"), b"\x93garbage " + device.encode())
                raw.publish(topics.device_topic(region, device, "update"), encode(Update(
                    device=device, seq=1, model_id=f"evil-{device}", base_version=0, n_samples=1, weights=weights)))
                raw.publish(topics.device_topic(region, device, "presence"), b"\x00" + device.encode())

            def rejected() -> float:
                m = scrape(port)
                return m[("edgeci_messages_rejected_total", ())] + m[("edgeci_updates_total", (("outcome", "rejected"),))]

            def series_after_a_new_scrape() -> float:
                """The coordinator's series as of a scrape that began after this call."""
                now = time.time()
                wait_until(lambda: prom.query('timestamp(up{job="edgeci-coordinator"})').get((), 0.0) > now + 0.1, 30,
                           "a new scrape")
                return prom.query('count({job="edgeci-coordinator", __name__=~"edgeci_.*"})')[()]

            attack("warm")
            wait_until(lambda: rejected() == 3, 30, "the warm-up counted")
            before = series_after_a_new_scrape()
            for i in range(50):
                attack(f"mallory-{i:03d}-{os.urandom(4).hex()}")
            wait_until(lambda: rejected() == 3 + 150, 60, "the attack counted")
            assert series_after_a_new_scrape() == before
            held = prom.api("series", **{"match[]": '{job="edgeci-coordinator"}'})
            assert len(held) > 40  # (the query matched the coordinator's series)
            assert not [row for row in held if any("mallory" in v or "evil" in v or "warm" in v for v in row.values())]
        finally:
            raw.stop()
            prom.stop()
