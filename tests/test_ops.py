"""What an operator meets: config layering, logging, version, signals, metrics and probes,
presence, and ``edgeci status`` — unit tests, then a real coordinator process on a real
mosquitto."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator import cli as coordinator_cli
from coordinator.broker import MosquittoProcess, free_port
from coordinator.cli_status import liveness, read_status, render
from coordinator.config import resolve
from coordinator.core import RECENT_DEVICES, CoordinatorCore
from coordinator.metrics import stamp_status, status_will
from coordinator.registry import Registry
from coordinator.strategies import make_strategy
from edge_sdk.client import EdgeClient
from edge_sdk.errors import ConfigError, TransportError
from edge_sdk.mqtt import MqttTransport
from edge_sdk.tasks import get_task
from edge_sdk.wire import topics
from edge_sdk.wire.codec import encode
from edge_sdk.wire.messages import Update
from tests.helpers import make_coordinator, wait_until

ROOT = Path(__file__).resolve().parents[1]
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# ---------------------------------------------------------------------- config layering (unit)


def edgeci_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The real ``edgeci`` parser and its ``coordinator`` subparser."""
    from demos.cli import build_parser

    parser = build_parser(["coordinator"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["coordinator"]
    return parser, sub


def layered(argv: list[str], env: dict[str, str] | None = None, files: dict[str, str] | None = None) -> Any:
    files = files or {}

    def read(path: Path) -> str:
        if str(path) not in files:
            raise FileNotFoundError(2, "No such file or directory")
        return files[str(path)]

    parser, sub = edgeci_parser()
    return resolve(parser, ["coordinator", *argv], env or {}, options_parser=sub, read_text=read)


def test_precedence_flags_over_env_over_file_over_defaults() -> None:
    toml = 'region = "from-file"\nbroker = "mqtt://file:1883"\nmodel = "file-model"\nk = 4\ntimeout = 7\nlog_level = "debug"\n'
    files = {"c.toml": toml}
    env = {"EDGECI_REGION": "from-env", "EDGECI_BROKER": "mqtt://env:1883", "EDGECI_K": "6", "EDGECI_STATE_DIR": "/tmp/st",
           "EDGECI_LOG_LEVEL": "error"}
    got = layered(["--config", "c.toml", "--region", "from-flag"], env, files)
    a = got.args
    assert (a.region, a.broker, a.model) == ("from-flag", "mqtt://env:1883", "file-model")
    assert a.k == 6 and isinstance(a.k, int)  # converted from the environment's string
    assert a.timeout == 7.0 and isinstance(a.timeout, float)  # TOML int for a float flag
    assert a.state_dir == Path("/tmp/st") and a.seed == 0
    assert got.sources["region"] == "flag" and got.sources["broker"] == "env" and a.log_level == "error"
    assert got.sources["model"] == "file" and got.sources["seed"] == "default"
    assert got.config_path == Path("c.toml")
    # logging flags count before the subcommand too, and -v is --log-level debug
    parser, sub = edgeci_parser()
    top = resolve(parser, ["--log-level", "warning", "coordinator", "--config", "c.toml"], {}, options_parser=sub,
                  read_text=lambda p: toml)
    assert top.args.log_level == "warning" and top.sources["log_level"] == "flag" and top.args.region == "from-file"
    assert resolve(parser, ["coordinator", "-v"], {}, options_parser=sub).args.log_level == "debug"


def test_config_file_from_environment_and_dash_keys() -> None:
    files = {"/etc/edgeci.toml": 'state-dir = "/var/lib/edgeci"\nmetrics-port = 9464\npeers = ["eu", "us"]\npeering = "spyker"\n'}
    got = layered([], {"EDGECI_CONFIG": "/etc/edgeci.toml"}, files)
    assert got.args.state_dir == Path("/var/lib/edgeci") and got.args.metrics_port == 9464
    opts = coordinator_cli.options_from(got.args, got)
    assert opts.peers == ("eu", "us") and opts.peering == "spyker"


def test_unknown_key_names_it_and_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        layered(["--config", "c.toml"], files={"c.toml": 'regoin = "eu"\n'})
    text = str(err.value)
    assert "'regoin'" in text and "region" in text and "state_dir" in text and "[strategy]" in text


@pytest.mark.parametrize(
    ("toml", "env", "needle"),
    [
        ('k = "many"\n', {}, "k: expected an int"),
        ('encoding = "f8"\n', {}, "not one of f4, f2, i1"),
        ("region = [\n", {}, "not valid TOML"),
        ("", {"EDGECI_TIMEOUT": "soon"}, "EDGECI_TIMEOUT: expected a float"),
        ('k = 3\n[strategy]\nk = 4\n', {}, "sets both 'k' and [strategy] 'k'"),
    ],
)
def test_bad_values_are_config_errors(toml: str, env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        got = layered(["--config", "c.toml", "--state-dir", "s"], env, {"c.toml": toml})
        coordinator_cli.options_from(got.args, got)


def test_strategy_table_passes_params_through_and_flags_win() -> None:
    files = {"c.toml": 'state_dir = "s"\n[strategy]\nk = 3\ntimeout_s = 1.5\nserver_lr = 0.5\n'}
    got = layered(["--config", "c.toml"], {}, files)
    opts = coordinator_cli.options_from(got.args, got)
    assert dict(opts.strategy_params) == {"k": 3, "timeout_s": 1.5, "combine": "models", "server_lr": 0.5}
    got = layered(["--config", "c.toml", "--k", "8"], {}, files)
    assert coordinator_cli.options_from(got.args, got).strategy_params["k"] == 8
    named = layered(["--config", "c.toml"], {}, {"c.toml": 'state_dir = "s"\n[strategy]\nname = "spin-notimeout"\nk = 3\n'})
    opts = coordinator_cli.options_from(named.args, named)
    assert opts.strategy == "spin-notimeout" and opts.strategy_params["k"] == 3
    # the strategy's own config validates what the table passes through
    bad = layered(["--config", "c.toml"], {}, {"c.toml": 'state_dir = "s"\n[strategy]\nbogus = 1\n'})
    opts = coordinator_cli.options_from(bad.args, bad)
    with pytest.raises(ConfigError, match="bogus"):
        make_strategy(opts.strategy, **opts.strategy_params)


def test_environment_per_command() -> None:
    from demos.cli import build_parser, resolve_args

    env = {"EDGECI_TIMEOUT": "30", "EDGECI_REGION": "eu", "EDGECI_LOG_FORMAT": "json", "EDGECI_LOG_LEVEL": "debug"}
    args = resolve_args(build_parser(["status"]), ["status"], env)
    assert args.region == "eu" and args.timeout == 5.0  # EDGECI_TIMEOUT is the coordinator's π
    assert (args.log_format, args.log_level) == ("json", "debug")
    args = resolve_args(build_parser(["status"]), ["--log-level", "error", "status", "--region", "us"], env)
    assert (args.region, args.log_level) == ("us", "error")
    assert resolve_args(build_parser(["status"]), ["status"], {}).log_level == "warning"  # the command's default


def test_logging_flags_after_a_nested_action_name() -> None:
    """`edgeci pki issue ... -v` and `pki init ... --log-format json`: the flags are taken after
    the action's name too (they were only after `pki`), and before it as before."""
    from demos.cli import build_parser, resolve_args

    for argv in (["pki", "init", "--dir", "P", "--log-format", "json", "-v"],
                 ["pki", "--log-format", "json", "-v", "init", "--dir", "P"],
                 ["--log-format", "json", "pki", "init", "--dir", "P", "-v"]):
        args = resolve_args(build_parser(argv), argv, {})
        assert (args.pki_command, args.log_format, args.log_level) == ("init", "json", "debug"), argv
    args = resolve_args(build_parser(["pki"]), ["pki", "init", "--dir", "P"], {})
    assert (args.log_format, args.log_level) == ("text", "warning")  # the command's defaults


def test_shipped_example_config_is_valid() -> None:
    example = ROOT / "deploy" / "edgeci-coordinator.toml.example"
    got = layered(["--config", str(example)], files={str(example): example.read_text()})
    opts = coordinator_cli.options_from(got.args, got)
    assert opts.region == "eu-west" and opts.state_dir == Path("/var/lib/edgeci") and got.args.metrics_port == 9464
    assert make_strategy(opts.strategy, **opts.strategy_params).describe()["k"] == 10


def test_state_dir_is_required_from_some_layer() -> None:
    got = layered([])
    with pytest.raises(ConfigError, match="EDGECI_STATE_DIR"):
        coordinator_cli.options_from(got.args, got)


def test_live_strategy_reconfiguration_validates_and_refuses_what_it_cannot() -> None:
    spin = make_strategy("spin", k=10, timeout_s=30.0)
    coordinator_cli.reconfigure_strategy(spin, {"k": 2, "timeout_s": 1.0})
    assert spin.describe()["k"] == 2 and spin.describe()["timeout_s"] == 1.0
    with pytest.raises(ConfigError):
        coordinator_cli.reconfigure_strategy(spin, {"k": 0})
    assert spin.describe()["k"] == 2  # unchanged after a refused change
    # The robust-aggregation settings are SPIN parameters too (README: what SIGHUP reloads).
    robust = {"combiner": "median", "clip_multiplier": 2.0, "sample_weight_cap": 5.0, "max_staleness": 4}
    coordinator_cli.reconfigure_strategy(spin, robust)
    for config in (spin.config, spin.robust.config):  # type: ignore[attr-defined]
        assert {k: getattr(config, k) for k in robust} == robust
    fedavg = make_strategy("fedavg")
    with pytest.raises(ConfigError, match="cannot change"):
        coordinator_cli.reconfigure_strategy(fedavg, {"k": 2})


def test_help_names_each_default_once() -> None:
    _, sub = edgeci_parser()
    text = " ".join(sub.format_help().split())
    assert "(default: 10)" in text  # --k's default is shown ...
    for chunk in re.split(r"\s--?[a-z]", text):  # ... and no option mentions its default twice
        assert len(re.findall(r"\(default", chunk.lower())) <= 1, chunk
    assert "default: None" not in text


def test_log_formatters_iso_utc_and_json_with_extra_fields() -> None:
    import logging

    from demos.cli import IsoFormatter, JsonFormatter

    record = logging.LogRecord("edgeci.coordinator", logging.WARNING, __file__, 1, "version %d", (7,), None)
    record.created = 1796210403.1234  # 2026-12-02T11:20:03.123Z
    record.device = "cam-1"  # as logging's extra= sets it
    line = json.loads(JsonFormatter().format(record))
    assert line == {"ts": "2026-12-02T11:20:03.123Z", "level": "warning", "logger": "edgeci.coordinator",
                    "msg": "version 7", "device": "cam-1"}
    assert IsoFormatter().format(record) == "2026-12-02T11:20:03.123Z WARNING edgeci.coordinator: version 7"


# ---------------------------------------------------------------------- presence in the core (unit)


def presence(c: CoordinatorCore, device: str, payload: bytes, now: float) -> list[Any]:
    from edge_sdk.core.events import MessageReceived

    return c.handle(MessageReceived(now=now, topic=topics.device_topic("r1", device, "presence"), payload=payload))


def test_core_tracks_presence_without_touching_protocol_state() -> None:
    c = make_coordinator("spin", k=2, timeout_s=5.0)
    assert topics.device_filter("r1", "presence") in c.subscriptions()
    for i in range(RECENT_DEVICES + 10):
        presence(c, f"d{i}", b"online", float(i))
    presence(c, "d3", b"offline", 100.0)
    extra = c.status().extra
    assert extra["devices_online"] == RECENT_DEVICES + 9 and extra["devices_tracked"] == RECENT_DEVICES + 10
    rows = extra["devices"]
    assert len(rows) == RECENT_DEVICES and rows[0] == {"id": "d3", "online": False, "last_seen": 100.0, "version": -1}
    assert c.status().devices_seen == 0 and c.version == 0  # presence is not a protocol input
    before = dict(c.counters)
    assert presence(c, "d4", b"\x00hostile", 101.0) and c.status().extra["devices_online"] == RECENT_DEVICES + 9
    assert c.counters["messages_rejected"] == before.get("messages_rejected", 0) + 1
    assert c.counters["reject:malformed"] == before.get("reject:malformed", 0) + 1
    presence(c, "d5", b"", 102.0)  # a cleared retained message forgets the device
    assert c.status().extra["devices_tracked"] == RECENT_DEVICES + 9


# ---------------------------------------------------------------------- liveness and rendering (unit)


def test_status_stamp_liveness_and_render() -> None:
    c = make_coordinator("spin", k=2, timeout_s=5.0)
    presence(c, "cam-1", b"online", 1000.0)
    from edge_sdk.wire.codec import status_json

    payload = stamp_status(status_json(c.status()), alive=True, now=1000.0, heartbeat_s=5.0)
    status = json.loads(payload)
    assert status["alive"] is True and status["published_at"] == 1000.0 and status["region"] == "r1"
    assert liveness(status, 1001.0)[0] is True
    assert liveness(status, 1000.0 + 3 * 5 + 11)[0] is False  # stale: three beats and a margin
    text = render(status, 1003.0)
    assert "ALIVE" in text and "cam-1" in text and "3 s ago" in text and "accepted 0" in text
    assert "ALIVE: alive" not in text and "pinned" not in text
    # helper-92 read "devices seen 3" above a table of 4 rows: the count is of devices that pulled here
    assert "devices   pulled 0 (since the state dir began) · tracked 1 · online 1" in text
    pinned = {**status, "extra": {**status["extra"], "release": 4, "pinned": True}}  # operator trial: said only in --json
    assert "release   4 (pinned: no promotions until `edgeci unpin`)" in render(pinned, 1003.0)
    assert "RECOVERY" not in text
    recovered = {**status, "extra": {**status["extra"], "recovered_from": ["53: version 53 is unreadable: weights.npy: EOF"]}}
    assert "RECOVERY  at start, unreadable and skipped (1): 53: version 53 is unreadable" in render(recovered, 1003.0)  # helper-98
    will = json.loads(status_will("r1", "c1"))
    alive, why = liveness(will, 2000.0)
    assert alive is False and "last will" in why and "NOT ALIVE" in render(will, 2000.0)
    assert liveness({"type": "status", "region": "r1"}, 0.0)[0] is None


# ---------------------------------------------------------------------- processes


def run_cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "demos.cli", *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})})


def test_version_flag() -> None:
    from importlib import metadata

    out = run_cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"edgeci {metadata.version('edgeci')}"



class Proc:
    """``edgeci coordinator`` as a child process; stdout and stderr kept apart."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "demos.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env})
        self.out: list[str] = []
        self.err: list[str] = []
        self._pumps = [threading.Thread(target=self._pump, args=(s, d), daemon=True)
                       for s, d in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._pumps:
            t.start()
        wait_until(lambda: any(" ready: region " in line for line in self.out) or self.p.poll() is not None, 120, "coordinator ready")
        assert self.p.poll() is None, "".join(self.out + self.err)

    @staticmethod
    def _pump(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(20)
        for t in self._pumps:
            t.join(10)
        for stream in (self.p.stdout, self.p.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def coordinator(env: dict[str, str], *argv: str) -> Iterator[Proc]:
    proc = Proc(["coordinator", *argv], env)
    try:
        yield proc
    finally:
        proc.close()


def status_of(url: str, region: str) -> dict[str, Any]:
    """The retained status JSON (typed loosely for the assertions)."""
    return dict(read_status(url, region))


def http(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, body = http(f"http://127.0.0.1:{port}/metrics")
    assert code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


@pytest.fixture(scope="module")
def init_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deployed model file, so that the coordinators skip pretraining (seconds each)."""
    from edge_sdk.modelio import save_model

    spec = get_task("digits").spec
    path = tmp_path_factory.mktemp("init") / "deployed.npz"
    save_model(path, spec, np.random.default_rng(0).normal(0, 0.1, spec.size).astype(np.float32), {"version": 0})
    return path


@pytest.mark.broker
def test_coordinator_process_metrics_probes_presence_sighup_and_status(mosquitto: MosquittoProcess, tmp_path: Path,
                                                                       init_model: Path) -> None:
    region, port = "ops", free_port()
    config = tmp_path / "coordinator.toml"
    config.write_text('log_level = "info"\nk = 50\n[strategy]\ntimeout_s = 1.0\n')
    env = {"EDGECI_REGION": region, "EDGECI_STATE_DIR": str(tmp_path / "state"), "EDGECI_BROKER": mosquitto.url,
           "EDGECI_INIT": str(init_model)}
    task = get_task("digits")
    with coordinator(env, "--config", str(config), "--metrics-port", str(port), "--log-format", "json",
                     "--status-interval", "2", "--accept-unpulled-updates") as proc:  # (raw updates below, no pull)
        # -- probes
        code, body = http(f"http://127.0.0.1:{port}/healthz")
        assert code == 200 and json.loads(body)["actor_alive"] is True
        wait_until(lambda: http(f"http://127.0.0.1:{port}/readyz")[0] == 200, 20, "ready probe")
        assert json.loads(http(f"http://127.0.0.1:{port}/readyz")[1])["broker_connected"] is True

        # -- a device announces itself, then updates: accepted, duplicate, rejected
        device = EdgeClient(broker=mosquitto.url, device_id="cam-7", region=region, task=task, durable=False, min_samples=10_000)
        device.start()
        weights = Registry(tmp_path / "state", task.spec).read_version(0)[0]
        raw = MqttTransport(mosquitto.url, client_id="ops-probe", subscriptions=[], on_message=lambda t, p: None, clean_session=True)
        raw.start()
        try:
            for n, dev in enumerate(("p1", "p2", "p3")):
                upd = Update(device=dev, seq=1, model_id=task.spec.model_id, base_version=0, n_samples=3 + n, weights=weights.copy())
                raw.publish(topics.device_topic(region, dev, "update"), encode(upd))
            raw.publish(topics.device_topic(region, "p1", "update"), encode(Update(
                device="p1", seq=1, model_id=task.spec.model_id, base_version=0, n_samples=3, weights=weights.copy())))
            nan = weights.copy()
            nan[0] = np.nan
            raw.publish(topics.device_topic(region, "p4", "update"), encode(Update(
                device="p4", seq=1, model_id=task.spec.model_id, base_version=0, n_samples=3, weights=nan)))
            raw.publish(topics.device_topic(region, "p5", "update"), b"\x93garbage")

            def settled() -> bool:
                s = status_of(mosquitto.url, region)
                return (s["updates_accepted"], s["updates_duplicate"], s["updates_rejected"]) == (3, 1, 2) \
                    and s["version"] == 1 and s["extra"]["devices_online"] == 1
            wait_until(settled, 30, "3 accepted, 1 duplicate, 2 rejected, one aggregation, one device online")
            # the metrics follow the status snapshot, refreshed at least every second: wait until
            # both show the aggregation and the last message (a fixed 1.5 s sleep can lose that race under load)
            reads: list[tuple[dict[str, Any], dict[Any, float]]] = []

            def agree() -> bool:
                s, mm = status_of(mosquitto.url, region), scrape(port)
                reads.append((s, mm))
                return mm.get(("edgeci_bytes_total", (("direction", "in"),))) == s["extra"]["bytes_in"] \
                    and mm.get(("edgeci_version", ())) == s["version"] \
                    and mm.get(("edgeci_aggregations_total", ())) == s["extra"]["aggregations"]
            wait_until(agree, 20, "the metrics and the status snapshot to show the same version, commits and bytes in")
            status, m = reads[-1]
            x = status["extra"]
            assert m[("edgeci_updates_total", (("outcome", "accepted"),))] == status["updates_accepted"] == 3
            assert m[("edgeci_updates_total", (("outcome", "duplicate"),))] == status["updates_duplicate"] == 1
            assert m[("edgeci_updates_total", (("outcome", "rejected"),))] == status["updates_rejected"] == 2
            for reason, n in x["rejected_by_reason"].items():
                assert m[("edgeci_rejections_total", (("reason", reason),))] == n
            assert {"non_finite", "malformed"} <= set(x["rejected_by_reason"])
            assert m[("edgeci_version", ())] == status["version"] == 1
            assert m[("edgeci_aggregations_total", ())] == x["aggregations"] == 1
            assert m[("edgeci_bytes_total", (("direction", "in"),))] == x["bytes_in"] > 0
            assert m[("edgeci_devices_online", ())] == x["devices_online"] == 1
            assert m[("edgeci_staleness_count", ())] == 3 and m[("edgeci_staleness_bucket", (("le", "0.0"),))] == 3
            assert m[("edgeci_commit_seconds_count", ())] == 1 and m[("edgeci_aggregation_seconds_count", ())] == 1
            assert status["alive"] is True and abs(status["published_at"] - time.time()) < 30
            problems = {labels[0][1]: v for (name, labels), v in m.items() if name == "edgeci_problems_total"}
            assert problems == {"publish_refused": 0, "storage_failures": 0, "storage_relapses": 0, "duplicate_coordinator": 0, "core_failures": 0, "messages_dropped": 0,
                                "malformed_packets": 0, "unsubscribed": 0, "actor_errors": 0}
            assert m[("edgeci_broker_connected", ())] == 1

            # -- the readable status, alive
            out = run_cli("status", "--broker", mosquitto.url, "--region", region)
            assert out.returncode == 0, out.stdout + out.stderr
            assert "ALIVE" in out.stdout and "accepted 3" in out.stdout and "cam-7" in out.stdout
            assert json.loads(run_cli("status", "--json", env={"EDGECI_BROKER": mosquitto.url, "EDGECI_REGION": region}).stdout)["region"] == region
        finally:
            raw.stop()
            device.stop()
        wait_until(lambda: status_of(mosquitto.url, region)["extra"]["devices_online"] == 0, 20, "the device to go offline")

        # -- SIGHUP: log level and SPIN's timeout apply live; the model needs a restart (and says so)
        config.write_text('log_level = "debug"\nk = 50\nmodel = "other"\n[strategy]\ntimeout_s = 2.5\n')
        proc.p.send_signal(signal.SIGHUP)
        wait_until(lambda: any("timeout_s is now 2.5" in line for line in proc.err), 20, "the reload to be logged")
        assert proc.p.poll() is None, "SIGHUP must never kill the coordinator"
        logs = [json.loads(line) for line in proc.err if line.strip()]
        assert all(ISO.match(rec["ts"]) and {"level", "logger", "msg"} <= set(rec) for rec in logs)
        assert any(rec["msg"] == "SIGHUP: log_level changed from info to debug" for rec in logs)
        ready = [json.loads(line) for line in proc.out if "ready: region" in line]  # a JSON line too (it was plain text)
        assert ready and ready[0]["level"] == "info" and ISO.match(ready[0]["ts"])
        assert any("cannot reload model without a restart" in rec["msg"] for rec in logs)
        wait_until(lambda: status_of(mosquitto.url, region)["extra"]["strategy_params"]["timeout_s"] == 2.5, 10, "status to show the new timeout")
        config.write_text("region = [\n")  # a broken file: logged, the running config stays
        proc.p.send_signal(signal.SIGHUP)
        wait_until(lambda: any("config not reloaded" in line for line in proc.err), 20, "the bad reload to be logged")
        assert proc.p.poll() is None

        # -- SIGTERM: clean exit, and the status says so
        proc.p.send_signal(signal.SIGTERM)
        assert proc.p.wait(30) == 0
        wait_until(lambda: any("stopped cleanly" in line for line in proc.err), 5, "clean-stop log line")
    out = run_cli("status", "--broker", mosquitto.url, "--region", region)
    assert out.returncode == 2 and "NOT ALIVE" in out.stdout and "stopped" in out.stdout, out.stdout + out.stderr


@pytest.mark.broker
def test_status_after_sigkill_says_not_alive_via_last_will(mosquitto: MosquittoProcess, tmp_path: Path, init_model: Path) -> None:
    region = "gone"
    out = run_cli("status", "--broker", mosquitto.url, "--region", region, "--timeout", "1")
    assert out.returncode == 2 and "no coordinator status" in out.stdout
    # --json: stdout is JSON or nothing (this line was on stdout, and `edgeci status --json | jq` failed on it)
    out = run_cli("status", "--json", "--broker", mosquitto.url, "--region", region, "--timeout", "1")
    assert (out.returncode, out.stdout) == (2, "") and "no coordinator status" in out.stderr, out.stdout + out.stderr
    with coordinator({}, "--broker", mosquitto.url, "--region", region, "--state-dir", str(tmp_path / "s"),
                     "--init", str(init_model)) as proc:
        assert status_of(mosquitto.url, region)["alive"] is True
        proc.p.send_signal(signal.SIGKILL)
        proc.p.wait(10)
        wait_until(lambda: status_of(mosquitto.url, region)["alive"] is False, 30, "the last will")
    out = run_cli("status", "--broker", mosquitto.url, "--region", region)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "NOT ALIVE" in out.stdout and "last will" in out.stdout
    with pytest.raises(TransportError):  # nothing listens: an error, not "not alive"
        read_status(f"mqtt://127.0.0.1:{free_port()}", region, timeout=1)


@pytest.mark.parametrize("live", [True, False])
def test_status_of_a_coordinator_whose_clock_is_behind_is_judged_by_a_live_status(
        mosquitto: MosquittoProcess, capsys: pytest.CaptureFixture[str], live: bool) -> None:
    """The retained status says alive but is two hours old by this machine's clock: the
    coordinator is gone, or its clock is behind (network-failure audit: it was called dead).
    ``edgeci status`` waits up to a heartbeat for a live one: if it comes, alive, with the
    clock difference said; if not, NOT ALIVE as before."""
    from coordinator import cli_status
    from edge_sdk.wire.codec import status_json

    region = f"skew{int(live)}"
    c = make_coordinator("spin", k=2, timeout_s=5.0)
    behind = 7200.0

    def stamped() -> bytes:
        body = status_json(c.status()).replace(b'"region": "r1"', f'"region": "{region}"'.encode())
        return stamp_status(body, alive=True, now=time.time() - behind, heartbeat_s=1.0)

    pub = MqttTransport(mosquitto.url, client_id=f"pub-{region}", subscriptions=[], on_message=lambda *_: None, clean_session=True)
    pub.start()
    try:
        pub.publish(topics.status_topic(region), stamped(), retain=True)
        if live:
            threading.Timer(1.5, lambda: pub.publish(topics.status_topic(region), stamped(), retain=True)).start()
        p = argparse.ArgumentParser()
        cli_status.add_arguments(p)
        rc = cli_status.run(p.parse_args(["--broker", mosquitto.url, "--region", region]))
        out = capsys.readouterr()
        assert "waiting up to 6 s for a live one" in out.err
        if live:
            assert rc == 0 and "ALIVE" in out.out and "the coordinator's clock is 7" in out.out and "behind" in out.out
        else:
            assert rc == cli_status.NOT_ALIVE and "more than 13 s" in out.out
    finally:
        pub.publish(topics.status_topic(region), b"", retain=True)
        pub.stop()
