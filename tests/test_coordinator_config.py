"""The coordinator's configuration surface: strategy parameters by name and type, flags that
do not apply, the state dir, and checks that run before anything is written."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator import cli as coordinator_cli
from coordinator.core import MessageReceived, PersistUpdate
from coordinator.methods import make_method
from coordinator.registry import Registry, RegistryError
from coordinator.strategies import make_strategy
from edge_sdk.errors import ConfigError
from edge_sdk.modelio import save_model
from edge_sdk.tasks import get_task
from edge_sdk.wire import topics
from edge_sdk.wire.codec import encode
from edge_sdk.wire.messages import Update
from tests.helpers import SPEC, make_coordinator

# ---------------------------------------------------------------------- strategy parameters


@pytest.mark.parametrize(("strategy", "params", "needle"), [
    ("spin", {"k": 2.5}, "strategy 'spin': parameter k expects an integer, got 2.5"),
    ("spin", {"k": True}, "strategy 'spin': parameter k expects an integer, got True"),
    ("spin", {"k": "ten"}, "strategy 'spin': parameter k expects an integer, got 'ten'"),
    ("spin", {"timeout_s": "abc"}, "parameter timeout_s expects a finite number or none, got 'abc'"),
    ("spin", {"timeout_s": float("inf")}, "parameter timeout_s expects a finite number or none, got inf"),
    ("fedopt", {"server_lr": "abc"}, "strategy 'fedopt': parameter server_lr expects a finite number, got 'abc'"),
    ("fedbuff", {"late_join": 1}, "parameter late_join expects true or false, got 1"),
    ("nebula", {"resource_prices": [1, "x"]}, "parameter resource_prices expects a list of finite numbers"),
    ("spin", {"timeout": 30}, "strategy 'spin': unknown parameter 'timeout' (did you mean 'timeout_s'?); known parameters: "),
])
def test_strategy_parameters_are_checked_by_name_and_type(strategy: str, params: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)) as err:
        make_strategy(strategy, **params)
    if "unknown" in needle:
        assert "timeout_s" in str(err.value)  # the known keys are listed


def test_well_typed_parameters_are_converted_not_refused() -> None:
    spin = make_strategy("spin", k=3, timeout_s=5, combine="deltas")
    assert spin.describe()["timeout_s"] == 5.0 and isinstance(spin.describe()["timeout_s"], float)
    assert make_strategy("spin", timeout_s=None).describe()["timeout_s"] is None
    nebula = make_strategy("nebula", resource_speeds=[1, 2.5], resource_prices=[1, 1])
    assert nebula.config.resource_speeds == (1.0, 2.5)  # type: ignore[attr-defined]


def test_peering_parameters_are_checked_by_type() -> None:
    with pytest.raises(ConfigError, match=re.escape("peering 'hierfavg': parameter kappa2 expects an integer, got 'two'")):
        make_method("hierfavg", params={"kappa2": "two"})
    with pytest.raises(ConfigError, match=re.escape("peering 'spyker': parameter phi expects a finite number, got True")):
        make_method("spyker", params={"phi": True})


def test_live_spin_reconfiguration_checks_types() -> None:
    spin = make_strategy("spin")
    with pytest.raises(ConfigError, match="parameter k expects an integer"):
        spin.reconfigure(k="x")  # type: ignore[attr-defined]
    assert spin.describe()["k"] == 10


@pytest.mark.parametrize(("strategy", "params"), [
    ("fedbuff", {"population": 10**20}),  # OverflowError inside handle() when it drew a round
    ("nebula", {"t_c": 1e-320}),  # OverflowError at the first rotation
    ("hfedms", {"alpha": 1e308}),  # OverflowError at the first regroup
    ("fedopt", {"server_lr": 1e30}),  # every aggregation non-finite
    ("spin", {"k": 10**12}),
])
def test_numbers_beyond_any_sane_size_are_refused_at_configuration(strategy: str, params: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=r"is out of range: parameters hold numbers up to 1e9"):
        make_method(strategy, params=params)


def test_per_parameter_bounds_and_a_huge_k_that_allocates_as_it_goes() -> None:
    with pytest.raises(ConfigError, match=r"planets must be 1-1024"):
        make_method("nebula", params={"planets": 5000})
    with pytest.raises(ConfigError, match=r"0 < server_lr <= 100"):
        make_method("fedopt", params={"server_lr": 1e6})
    # k = 1e9 with a row-storing combiner: rows are allocated as updates come (it preallocated k rows)
    c = make_coordinator("spin", k=10**9, combiner="median", timeout_s=None)
    update = Update(device="a", seq=0, model_id="toy", base_version=0, n_samples=1, weights=np.ones(SPEC.size, np.float32))
    acts = c.handle(MessageReceived(now=0.0, topic=topics.device_topic("r1", "a", "update"), payload=encode(update)))
    assert any(isinstance(a, PersistUpdate) for a in acts) and c.status().buffered == 1


def test_range_errors_name_the_strategy_or_peering_that_holds_the_parameter() -> None:
    """A config's own range check does not know its owner; the builder puts it in front, once."""
    with pytest.raises(ConfigError, match=r"^strategy 'spin': k must be >= 1$"):
        make_strategy("spin", k=0)
    with pytest.raises(ConfigError, match=r"^strategy 'fedbuff': k and select must be >= 1$"):
        make_strategy("fedbuff", k=0)
    spin = make_strategy("spin")
    with pytest.raises(ConfigError, match=r"^strategy 'spin': k must be >= 1$"):
        spin.reconfigure(k=0)  # type: ignore[attr-defined]
    assert spin.describe()["k"] == 10
    with pytest.raises(ConfigError, match=r"^spyker: decay_beta must be"):  # named already: not twice
        make_method("spyker", params={"decay_beta": -1.0})


# ---------------------------------------------------------------------- before anything is written


def edgeci(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``edgeci coordinator ARGV`` in this process: (exit code, stderr)."""
    from demos.cli import main

    rc = main(["coordinator", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.fixture
def no_pretraining(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reaching the pretraining of an empty state dir fails the start (as a slow or broken one would)."""
    def pretrained(self: object, **_: object) -> None:
        raise ConfigError("pretraining failed (stub)")

    monkeypatch.setattr(type(get_task("digits")), "pretrained", pretrained)  # get_task makes a new instance per call


@pytest.fixture
def empty_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """The start's broker probe answers as a broker with nothing retained (the daemon's own
    connection, later, still finds nothing listening on 127.0.0.1:1)."""
    monkeypatch.setattr(coordinator_cli, "_probe", lambda *_, **__: coordinator_cli._Probe({}, False))


def digits_model(path: Path) -> Path:
    spec = get_task("digits").spec
    return save_model(path, spec, np.zeros(spec.size, np.float32))


def test_state_dir_that_is_a_file_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "sfile"
    state.write_text("")
    rc, err = edgeci(["--broker", "mqtt://127.0.0.1:1", "--state-dir", str(state)], capsys)
    assert rc == 1 and f"--state-dir {state}: not a directory" in err
    rc, err = edgeci(["--broker", "mqtt://127.0.0.1:1", "--state-dir", str(state / "sub")], capsys)
    assert rc == 1 and "is not a directory" in err


def test_read_only_state_dir_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))  # as on a ro mount
    rc, err = edgeci(["--broker", "mqtt://127.0.0.1:1", "--state-dir", str(tmp_path / "s")], capsys)
    assert rc == 1 and f"--state-dir {tmp_path / 's'}: not writable" in err


def test_registry_turns_state_dir_os_errors_into_registry_errors(tmp_path: Path) -> None:
    spec = get_task("digits").spec
    (tmp_path / "file").write_text("")
    with pytest.raises(RegistryError, match="not a directory"):
        Registry(tmp_path / "file", spec)
    reg = Registry(tmp_path / "s", spec)
    (tmp_path / "s" / "lock").mkdir()  # open(lock) fails like a read-only filesystem would
    with pytest.raises(RegistryError, match="not writable: cannot open"):
        reg.acquire_lock()
    reg.close()


@pytest.mark.parametrize(("argv", "needle", "code"), [
    (["--broker", "http://127.0.0.1:1883"], "broker URL must look like", 2),
    (["--region", "eu/#"], "invalid --region 'eu/#'", 2),
    (["--id", "a b"], "invalid --id (coordinator id) 'a b'", 2),
    (["--metrics-port", "99999"], "--metrics-port must be 0 (off) or a port 1-65535, got 99999", 2),
    (["--metrics-port", "-1"], "--metrics-port must be 0 (off) or a port", 2),
    (["--metrics-host", "no-such-host.invalid", "--metrics-port", "19999"], "cannot serve metrics there", 1),
    (["--model", "gestures", "--init", "MODEL"], "expected 'gesture-cnn1d'", 1),
    (["--init", "TEXT"], "not an edgeci model file (a .npz written by `edgeci pretrain`)", 1),
    (["--init", "MISSING"], "--init", 1),
    (["--gate-margin", "1.5"], "--gate-margin must be in [0, 1), got 1.5", 2),
    (["--gate-z", "-1"], "--gate-z must be in [0, 10], got -1.0", 2),
    (["--gate-margin", "0.5", "--rollback-margin", "0.1"], "--rollback-margin 0.1 is below --gate-margin 0.5", 2),
    (["--param", "k=ten"], "parameter k expects an integer, got 'ten'", 2),
    (["--peering", "spyker", "--peers", "a,b,a"], "--peers names a more than once", 2),
])
def test_bad_options_are_refused_before_the_state_dir_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_pretraining: None, argv: list[str], needle: str,
        code: int) -> None:
    """Exit 2 (BadOption) for a value wrong on its face, which the systemd unit does not restart;
    exit 1 where a file or a port decides, which it retries."""
    files = {"MODEL": str(digits_model(tmp_path / "deployed.npz")), "MISSING": str(tmp_path / "missing.npz")}
    (tmp_path / "notes.npz").write_text("not a model\n")
    files["TEXT"] = str(tmp_path / "notes.npz")
    argv = [files.get(a, a) for a in argv]
    if "--broker" not in argv:
        argv = ["--broker", "mqtt://127.0.0.1:1", *argv]
    state = tmp_path / "state"
    rc, err = edgeci([*argv, "--state-dir", str(state)], capsys)
    assert rc == code and needle in err, err
    assert not state.exists()  # nothing created: no lock, no signing key, no spec.json


def test_metrics_port_in_use_is_refused_before_the_state_dir_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_pretraining: None) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, err = edgeci(["--broker", "mqtt://127.0.0.1:1", "--metrics-port", str(port),
                          "--state-dir", str(tmp_path / "state")], capsys)
    assert rc == 1 and "cannot serve metrics there" in err
    assert not (tmp_path / "state").exists()


def test_failed_initialisation_leaves_the_state_dir_as_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_pretraining: None, empty_broker: None) -> None:
    missing = tmp_path / "new" / "state"
    rc, err = edgeci(["--broker", "mqtt://127.0.0.1:1", "--state-dir", str(missing)], capsys)
    assert rc == 1 and "pretraining failed (stub)" in err
    assert not (tmp_path / "new").exists()  # the dirs this run made are gone too
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = edgeci(["--broker", "mqtt://127.0.0.1:1", "--state-dir", str(empty)], capsys)
    assert rc == 1 and list(empty.iterdir()) == []
    # hA8: a start with the wrong --model for --init does not stamp the dir with that model; the retry works
    model = str(digits_model(tmp_path / "deployed.npz"))
    rc, err = edgeci(["--broker", "mqtt://127.0.0.1:1", "--model", "gestures", "--init", model, "--state-dir", str(empty)],
                     capsys)
    assert rc == 1 and "expected 'gesture-cnn1d'" in err and list(empty.iterdir()) == []
    rc, err = edgeci(["--broker", "mqtt://127.0.0.1:1", "--model", "digits", "--init", model, "--state-dir", str(empty)],
                     capsys)
    assert rc == 1 and "cannot reach broker" in err and "holds model" not in err
    assert list((empty / "versions").iterdir())  # initialised from --init, then the broker was down: v0 is kept


def test_canary_evaluation_of_a_detector_is_refused_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """helper-182: detection devices send no canary reports (a frame has no one label to score), so
    `edgeci coordinator --model detection --canary F` held every candidate once --canary-deadline
    (600 s) had passed and released nothing (measured over mosquitto: "gate: hold version 1 → release
    0 {}"), after saying at start that devices would score each candidate. Refused now (exit 2)."""
    frames_task = get_task("digits")
    frames_task.sample_kind = "frame"  # type: ignore[attr-defined]  # a detector as the checks see it, without ultralytics
    monkeypatch.setattr(coordinator_cli, "get_task", lambda name: frames_task)
    state = tmp_path / "state"
    rc, err = edgeci(["--broker", "mqtt://127.0.0.1:1", "--model", "detection", "--canary", "0.5", "--state-dir", str(state)],
                     capsys)
    assert rc == 2 and "--canary" in err and "send no canary reports" in err and "--validation" in err, err
    assert not state.exists()
    monkeypatch.undo()  # a classifier keeps its canary: this start goes on to the broker (down here)
    rc, err = edgeci(["--broker", "mqtt://127.0.0.1:1", "--model", "digits", "--canary", "0.5", "--state-dir", str(state)],
                     capsys)
    assert rc == 1 and "cannot reach broker" in err, err


def test_a_daemon_built_in_code_refuses_canary_evaluation_of_a_detector(tmp_path: Path) -> None:
    """The same refusal for a coordinator built in code (``CoordinatorDaemon``), before the state dir is written."""
    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions

    frames_task = get_task("digits")
    frames_task.sample_kind = "frame"  # type: ignore[attr-defined]
    state = tmp_path / "state"
    with pytest.raises(ConfigError, match="send no canary reports"):
        CoordinatorDaemon(CoordinatorOptions(broker="mqtt://127.0.0.1:1", region="r", state_dir=state, canary=0.5),
                          task=frames_task)
    assert not state.exists()


def test_an_unreachable_broker_is_refused_before_the_state_dir_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_pretraining: None) -> None:
    """Operator trial: a mistyped --broker was found only after an empty state dir's pretraining
    (minutes for detection), and left the pretrained state dir behind."""
    state = tmp_path / "new" / "state"
    rc, err = edgeci(["--broker", "mqtt://127.0.0.1:1", "--state-dir", str(state)], capsys)
    assert rc == 1 and "cannot reach broker mqtt://127.0.0.1:1" in err, err
    assert "pretraining failed (stub)" not in err  # stopped before the pretraining
    assert not (tmp_path / "new").exists()


def test_a_broker_that_refuses_the_probe_connection_leaves_the_start_to_the_daemon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """helper-93: a broker that binds an identity to one client id (mosquitto's dynamic security,
    cloud IoT policies) refuses the probe's `<id>-preflight`; that refused every start, which the
    daemon's own connect (its own client id) would pass. The probe's refusal skips the checks."""
    import logging

    from coordinator.cli import check_take_over
    from coordinator.daemon import CoordinatorOptions
    from edge_sdk import mqtt
    from edge_sdk.errors import BrokerRefused, TransportError

    def refused(self: mqtt.MqttTransport, timeout: float = 0.0) -> None:
        raise BrokerRefused(f"broker {self.address.url} refused the connection: Not authorized")

    options = CoordinatorOptions(broker="mqtt://127.0.0.1:1", region="eu", state_dir=tmp_path / "s")
    monkeypatch.setattr(mqtt.MqttTransport, "start", refused)
    with caplog.at_level(logging.WARNING, logger="edgeci"):
        check_take_over(options, take_over=False)
    assert "start-up checks are skipped" in caplog.text and "coord-eu-preflight" in caplog.text
    monkeypatch.undo()
    with pytest.raises(TransportError, match="cannot reach broker"):  # unreachable stays this start's error
        check_take_over(options, take_over=False)


class _FakeProbe:
    """An MqttTransport stand-in for the start-up probe: connects at once; ``drop_at`` (seconds
    after start, None: never) is when the broker closes its connection."""

    drop_at: float | None = None

    def __init__(self, url: str, *, on_connection: Any = None, **_: object) -> None:
        self.on_connection, self.refused_subscriptions = on_connection, set()
        self._timer: Any = None

    def start(self, timeout: float = 0.0) -> None:
        import threading

        if self.drop_at == 0.0:
            self.on_connection(False)
        elif self.drop_at is not None:
            self._timer = threading.Timer(self.drop_at, self.on_connection, args=(False,))
            self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.on_connection(False)  # as the real one: its own disconnect says "lost" too


@pytest.mark.parametrize(("drop_at", "auth", "taken_over"), [
    (None, "cert", False),  # nobody took the id back
    (0.0, "cert", False),   # dropped before the watch (while reading): a drop, not a takeover
    (1.5, "cert", True),    # closed during the watch, on an identity: a live client took the id back
    (1.5, "user", True),
    (1.5, "ca-only", False),  # TLS without an identity: the broker cannot assign it a client id: not watched
    (1.5, None, False),       # anonymous: not watched
])
def test_only_a_drop_during_the_watch_of_an_identity_is_a_takeover(
        drop_at: float | None, auth: str | None, taken_over: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """helper-95: any drop (a network blip, a broker restart) during the start, anonymous brokers
    included, was read as a live coordinator taking its id back, and the start refused."""
    from coordinator.daemon import CoordinatorOptions
    from edge_sdk import mqtt

    fake = type("Probe", (_FakeProbe,), {"drop_at": drop_at})
    monkeypatch.setattr(mqtt, "MqttTransport", fake)
    monkeypatch.setattr(coordinator_cli, "TAKEOVER_WATCH_S", 3.0)
    for name in ("ca", "c", "k"):
        (tmp_path / name).write_text("")
    ca, cert, key = (tmp_path / name for name in ("ca", "c", "k"))
    creds = {"cert": lambda: mqtt.BrokerAuth(ca_file=ca, cert_file=cert, key_file=key),
             "user": lambda: mqtt.BrokerAuth(username="u", password="p"), "ca-only": lambda: mqtt.BrokerAuth(ca_file=ca),
             None: lambda: None}[auth]()
    options = CoordinatorOptions(broker="mqtts://127.0.0.1:1", region="eu", state_dir=tmp_path / "s", auth=creds)
    probe = coordinator_cli._probe(options, ["edgeci/v1/eu/status"], 0.2, required=True, watch=lambda got: True)
    assert probe.taken_over is taken_over


def test_an_unsafe_start_exits_3_which_systemd_does_not_restart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """helper-95: systemd restarted a refused start every 5 s; each retry displaced the live
    coordinator again until its reconnect back-off outgrew the watch and a retry got through."""
    from coordinator.cli import record_region

    state = tmp_path / "eu"
    state.mkdir()
    record_region(state, "eu")
    rc, err = edgeci(["--broker", "mqtt://127.0.0.1:1", "--region", "asia", "--state-dir", str(state)], capsys)
    assert rc == 3 and "serves region 'eu', not 'asia'" in err
    unit = (Path(__file__).resolve().parents[1] / "deploy" / "edgeci-coordinator.service").read_text()
    assert "Restart=on-failure" in unit and "RestartPreventExitStatus=2 3" in unit
    rc, err = edgeci(["--broker", "mqtt://127.0.0.1:1", "--state-dir", str(tmp_path / "new")], capsys)
    assert rc == 1 and "cannot reach broker" in err  # a broker down stays a failure systemd retries


def test_a_full_disk_at_start_is_an_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch, no_pretraining: None, empty_broker: None) -> None:
    """Operator trial, finding 4: ENOSPC while opening the state dir ended in a traceback."""
    import errno

    import coordinator.cli as cli

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "s" / "log"))

    monkeypatch.setattr(cli, "CoordinatorDaemon", full)
    rc, err = edgeci(["--broker", "mqtt://127.0.0.1:1", "--state-dir", str(tmp_path / "s")], capsys)
    assert rc == 1 and "cannot start on state dir" in err and "No space left on device" in err, err
    assert not (tmp_path / "s").exists() or list((tmp_path / "s").iterdir()) == []  # a new dir: what it wrote is gone


def test_a_state_dir_that_held_anything_is_never_cleaned(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         no_pretraining: None, empty_broker: None) -> None:
    from coordinator.cli import _undo_failed_init

    spec = get_task("digits").spec
    held = tmp_path / "held"
    reg = Registry(held, spec)
    reg.initialise(np.zeros(spec.size, np.float32), now=0.0, source="test")
    reg.close()
    before = sorted(p.name for p in held.iterdir())
    _undo_failed_init(held, None, held)  # even if asked to: it holds a version
    _undo_failed_init(held, set(), held)
    assert sorted(p.name for p in held.iterdir()) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")  # not empty before: not ours to tidy
    rc, _ = edgeci(["--broker", "mqtt://127.0.0.1:1", "--state-dir", str(other)], capsys)
    assert rc == 1 and (other / "notes.txt").exists() and (other / "signing.key").exists()


# ---------------------------------------------------------------------- layered repeatable flags


def layered(argv: list[str], env: dict[str, str] | None = None, toml: str | None = None) -> Any:
    """The coordinator's options resolved from flags, ``env`` and a config file holding ``toml``."""
    import argparse

    from coordinator.config import resolve
    from demos.cli import build_parser

    parser = build_parser(["coordinator"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["coordinator"]
    argv = ["coordinator", "--state-dir", "s", *argv, *(["--config", "c.toml"] if toml is not None else [])]
    return resolve(parser, argv, env or {}, options_parser=sub, read_text=lambda _: toml or "")


def options(argv: list[str], env: dict[str, str] | None = None, toml: str | None = None) -> Any:
    got = layered(argv, env, toml)
    return coordinator_cli.options_from(got.args, got)


@pytest.mark.parametrize(("env", "toml"), [
    ({"EDGECI_PARAM": "k=3,timeout_s=5"}, None),
    ({"EDGECI_PARAM": " k=3 , timeout_s=5 "}, None),
    ({}, 'param = ["k=3", "timeout_s=5"]\n'),
    ({}, 'param = "k=3, timeout_s=5"\n'),
])
def test_param_from_the_environment_and_the_file(env: dict[str, str], toml: str | None) -> None:
    opts = options([], env, toml)
    assert opts.strategy_params["k"] == 3 and opts.strategy_params["timeout_s"] == 5


def test_param_items_keep_commas_inside_values_and_flags_win() -> None:
    opts = options(["--strategy", "nebula"], {"EDGECI_PARAM": "resource_speeds=[1, 2],resource_prices=[1, 1]"})
    assert list(opts.strategy_params["resource_speeds"]) == [1, 2]
    assert options(["--param", "timeout_s=7"], {"EDGECI_PARAM": "timeout_s=5"}).strategy_params["timeout_s"] == 7
    opts = options([], {"EDGECI_INVERSION": "iterations=5,time_budget_s=2"})
    assert dict(opts.inversion_params) == {"iterations": 5, "time_budget_s": 2}
    with pytest.raises(ConfigError, match=re.escape('param: expected a list of "NAME=VALUE" strings')):
        layered([], toml="param = [1, 2]\n")


# ---------------------------------------------------------------------- flags that do not apply, twice, inf


@pytest.mark.parametrize(("argv", "env", "toml", "needle"), [
    (["--phi", "2"], {}, None, "--phi is for peering spyker; strategy 'spin' with peering 'none' does not use it"),
    (["--rotation", "5"], {}, None, "--rotation is for strategy nebula or peering nebula"),
    (["--kappa2", "3"], {}, None, "--kappa2 is for peering hierfavg"),
    (["--eta", "0.5"], {}, None, "--eta is for strategy spyker"),
    (["--strategy", "fedbuff", "--timeout", "5"], {}, None, "--timeout is for strategy spin; strategy 'fedbuff'"),
    (["--strategy", "fedbuff", "--combine", "deltas"], {}, None, "--combine is for strategy spin / spin-notimeout"),
    (["--strategy", "spin-notimeout", "--timeout", "5"], {}, None, "--timeout is for strategy spin;"),  # it never waits
    (["--strategy", "fedavg", "--k", "0"], {}, None, "--k is for strategy spin / spin-notimeout / fedbuff / port"),
    (["--strategy", "fedasync", "--combiner", "median"], {}, None, "--combiner is for strategy spin / spin-notimeout"),
    (["--strategy", "fedbuff"], {"EDGECI_TIMEOUT": "5"}, None, "--timeout is for strategy spin"),  # env counts as given
    (["--strategy", "fedbuff"], {}, "timeout = 5\n", "--timeout is for strategy spin"),  # so does the file
    (["--peering", "spyker", "--kappa2", "3"], {}, None, "--kappa2 is for peering hierfavg; strategy 'spyker'"),
])
def test_flags_that_the_method_does_not_use_are_refused(argv: list[str], env: dict[str, str], toml: str | None,
                                                        needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        options(argv, env, toml)


def test_defaults_and_flags_that_apply_are_not_refused() -> None:
    assert options(["--strategy", "fedavg"]).strategy_params == {}  # --k / --timeout / --combine defaults: not given
    assert options(["--strategy", "fedbuff", "--k", "4"]).strategy_params == {"k": 4}
    opts = options(["--strategy", "spin-notimeout", "--combine", "deltas"])
    assert opts.strategy_params == {"k": 10, "combine": "deltas"}  # spin-notimeout has SPIN's combine rule
    opts = options(["--strategy", "hierfavg", "--kappa2", "3", "--sync-timeout", "9"])
    assert dict(opts.peering_params) == {"kappa2": 3, "sync_timeout_s": 9.0}
    assert options(["--strategy", "nebula", "--rotation", "5"]).strategy_params["t_c"] == 5.0
    # the strategies whose config has the parameter (researcher trial, finding 4: fedasync, spyker and
    # nebula take max_staleness, and --max-staleness was refused for them)
    for strategy in ("fedasync", "spyker", "nebula"):
        assert options(["--strategy", strategy, "--max-staleness", "5"]).strategy_params["max_staleness"] == 5


def test_a_registered_strategy_takes_the_flags_of_its_config_s_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a strategy is its module and one registration: its config's ``k`` and ``combiner``
    take ``--k`` and ``--combiner`` without an entry in the CLI's tables."""
    import dataclasses

    import coordinator.strategies as strategies

    @dataclasses.dataclass(frozen=True)
    class ToyConfig:
        k: int = 3
        combiner: str = "mean"

    monkeypatch.setitem(strategies.CONFIGS, "toy", ToyConfig)
    from coordinator.cli import strategy_flag_users

    users = strategy_flag_users()
    assert "toy" in users["k"][1] and "toy" in users["combiner"][1] and "toy" not in users["timeout"][1]


@pytest.mark.parametrize(("argv", "env", "toml", "needle"), [
    (["--k", "7", "--param", "k=3"], {}, None, "k is given twice: --k 7 and --param k=3; keep one"),
    ([], {"EDGECI_K": "7", "EDGECI_PARAM": "k=3"}, None, "k is given twice: EDGECI_K=7 and EDGECI_PARAM k=3; keep one"),
    ([], {}, 'k = 7\nparam = ["k=3"]\n', "k is given twice: k = 7 in the config file and param k=3 in the config file"),
    (["--strategy", "spyker", "--phi", "2", "--param", "phi=3"], {}, None, "phi is given twice: --phi 2.0 and --param phi=3"),
    ([], {}, 'param = ["k=3"]\n[strategy]\nk = 4\n', "sets k both in param and in [strategy]: keep one"),
    ([], {"EDGECI_PARAM": "timeout_s=6"}, 'param = ["k=3"]\n[strategy]\nk = 4\n', "sets k both in param and in [strategy]"),
])
def test_one_parameter_given_twice_is_refused(argv: list[str], env: dict[str, str], toml: str | None, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        options(argv, env, toml)


def test_named_parameters_merge_per_name_across_the_layers() -> None:
    """flag > environment > file for each NAME, whichever spelling (own flag, --param, [strategy])."""
    toml = 'param = ["k=4", "timeout_s=5"]\n'
    opts = options([], {"EDGECI_PARAM": "k=3"}, toml)
    assert (opts.strategy_params["k"], opts.strategy_params["timeout_s"]) == (3, 5)  # the file's timeout_s stays
    opts = options(["--param", "timeout_s=9"], {"EDGECI_PARAM": "k=3"}, toml)
    assert (opts.strategy_params["k"], opts.strategy_params["timeout_s"]) == (3, 9)
    assert options(["--param", "k=3"], {"EDGECI_K": "7"}).strategy_params["k"] == 3  # the flag beats the environment
    assert options([], {"EDGECI_K": "7"}, 'param = ["k=3"]\n').strategy_params["k"] == 7  # the environment beats the file
    assert options(["--k", "8"], {"EDGECI_PARAM": "k=3"}).strategy_params["k"] == 8
    opts = options(["--strategy", "spyker"], {"EDGECI_PHI": "2"}, 'param = ["phi=3"]\n')
    assert opts.peering_params["phi"] == 2.0  # a peering parameter's own flag, from the environment
    assert options([], {"EDGECI_PARAM": "k=3"}, "[strategy]\nk = 4\n").strategy_params["k"] == 3  # over [strategy]
    got = layered(["--param", "k=2"], {"EDGECI_PARAM": "k=3,combine=deltas"}, 'param = ["timeout_s=5"]\n')
    assert got.item_sources["param"] == {"timeout_s": "file", "k": "flag", "combine": "env"}
    assert got.sources["param"] == "flag"


@pytest.mark.parametrize(("argv", "needle"), [
    (["--timeout", "inf"], "--timeout must be a finite number, got inf"),
    (["--status-interval", "inf"], "--status-interval must be a finite number, got inf"),
    (["--status-interval", "nan"], "--status-interval must be a finite number, got nan"),
    (["--canary-deadline", "inf"], "--canary-deadline must be a finite number, got inf"),
    (["--param", "timeout_s=inf"], "parameter timeout_s expects a finite number or none, got inf"),
])
def test_non_finite_numbers_are_refused(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        opts = options(argv)
        make_method(opts.strategy, strategy_params=opts.strategy_params)


# ---------------------------------------------------------------------- SIGHUP


def sighup(toml: str, running: Any, caplog: pytest.LogCaptureFixture, argv: list[str] | None = None,
           env: dict[str, str] | None = None, **kw: Any) -> tuple[Any, str]:
    """Reload with the file now holding ``toml`` into a daemon stand-in running ``running``'s
    options (no strategy change is applied, so no actor is needed)."""
    import logging
    from types import SimpleNamespace

    daemon = SimpleNamespace(options=coordinator_cli.options_from(running.args, running))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgeci.coordinator"):
        got = coordinator_cli.reload(daemon, running, lambda: layered(argv or [], env or {}, toml), lambda level, fmt: None,  # type: ignore[arg-type]
                                     **kw)
    return got, caplog.text


@pytest.mark.parametrize("bad", ["[strategy]\nk = 0\n", '[strategy]\nk = "x"\n', "[strategy]\nbogus_key = 1\n"])
def test_sighup_with_an_invalid_strategy_value_keeps_the_whole_running_config(
        caplog: pytest.LogCaptureFixture, bad: str) -> None:
    running = layered([], {}, 'log_level = "info"\n[strategy]\nk = 5\n')
    got, text = sighup('log_level = "debug"\n' + bad, running, caplog)
    assert got is running  # nothing applied, the log level included
    assert "config not reloaded, keeping the running one" in text and "without a restart" not in text


def test_sighup_compares_metrics_with_the_running_server(caplog: pytest.LogCaptureFixture) -> None:
    running = layered([], {}, "metrics_port = 19464\n")
    moved = layered([], {}, "metrics_port = 19465\n")  # the previous reload read 19465; the server still runs on 19464
    _, text = sighup("metrics_port = 19465\n", moved, caplog, metrics=("127.0.0.1", 19464))
    assert "cannot reload metrics_port without a restart (running 19464, file says 19465)" in text
    _, text = sighup("metrics_port = 19464\n", moved, caplog, metrics=("127.0.0.1", 19464))
    assert "metrics_port" not in text  # back to the running value: nothing to warn about
    _, text = sighup("metrics_port = 19464\n", running, caplog, metrics=("127.0.0.1", 19464))
    assert "metrics_port" not in text and "config reloaded" in text


@pytest.mark.parametrize(("argv", "env", "key", "by"), [
    (["--k", "7"], {}, "k", "--k (flag) sets it to 7"),
    ([], {"EDGECI_K": "7"}, "k", "--k (env) sets it to 7"),
    (["--param", "timeout_s=9"], {}, "timeout_s", "--param sets it to 9"),
])
def test_sighup_says_when_a_flag_beats_the_file_s_strategy_value(caplog: pytest.LogCaptureFixture, argv: list[str],
                                                                 env: dict[str, str], key: str, by: str) -> None:
    """The operator edits [strategy] k and sends SIGHUP, but the daemon was started with --k 7:
    the edit cannot apply, and the log says why instead of nothing."""
    running = layered(argv, env, "[strategy]\nk = 5\ntimeout_s = 5\n")
    edited = "[strategy]\nk = 5\ntimeout_s = 5\n".replace(f"{key} = 5", f"{key} = 6")
    _, text = sighup(edited, running, caplog, argv=argv, env=env)
    assert f"[strategy] {key} = 6 in the config file does not apply: {by}" in text
    assert text.count("does not apply") == 1  # the other value is the file's own
    assert "config reloaded" in text


def sighup_live(toml: str, running_toml: str, caplog: pytest.LogCaptureFixture) -> tuple[Any, str]:
    """Reload into a daemon stand-in whose core runs ``running_toml``'s strategy (changes applied
    on the calling thread, as the actor would)."""
    import logging
    from types import SimpleNamespace

    running = layered([], {}, running_toml)
    opts = coordinator_cli.options_from(running.args, running)
    core = make_coordinator(opts.strategy, **opts.strategy_params)
    actor = SimpleNamespace(call=lambda fn: fn(), run_actions=lambda actions: None)
    daemon = SimpleNamespace(options=opts, core=core, actor=actor, clock=SimpleNamespace(now=lambda: 0.0))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgeci.coordinator"):
        coordinator_cli.reload(daemon, running, lambda: layered([], {}, toml), lambda level, fmt: None)  # type: ignore[arg-type]
    return core, caplog.text


def test_sighup_cannot_turn_a_conversion_on_or_off_and_the_core_takes_its_new_bound(caplog: pytest.LogCaptureFixture) -> None:
    # Observed: SIGHUP said "staleness is now 'none'" while the core went on converting (and, the
    # other way round, "now 'gradient-inversion'" with no conversion ever asked): the core's policy
    # and the daemon's worker are set up at the start; only the strategy changed.
    from coordinator.core import ConvertUpdate
    from tests.test_conversion import upd

    table = "[strategy]\nk = 2\ntimeout_s = 600.0\nclip_multiplier = 0.0\nsample_weight_cap = 0.0\nconvert_beyond = 2\n"
    for was, now in (("gradient-inversion", "none"), ("none", "gradient-inversion"), ("dc-asgd", "gradient-inversion")):
        core, text = sighup_live(table + f'staleness = "{now}"\n', table + f'staleness = "{was}"\n', caplog)
        assert "cannot reload strategy parameter staleness without a restart" in text, text
        assert core.strategy.config.staleness == was and core.conversion_policy == (None if was == "none" else was)
    # convert_beyond (and max_staleness) change live: the core judges by the new value too
    core, text = sighup_live(table.replace("convert_beyond = 2", "convert_beyond = 5") + 'staleness = "gradient-inversion"\n',
                             table + 'staleness = "gradient-inversion"\n', caplog)
    assert "strategy parameter convert_beyond is now 5" in text, text
    for i in range(4):
        core.handle(upd("fresh", 2 * i, 1.0, base=core.version))
        core.handle(upd("fresh2", 2 * i, 1.0, base=core.version))
    assert core.version == 4
    assert not [a for a in core.handle(upd("slow", 0, 9.0, base=0)) if isinstance(a, ConvertUpdate)]  # 4 <= 5: damped


def test_sighup_widens_the_release_spread_live(caplog: pytest.LogCaptureFixture) -> None:
    """A big model release ahead: the operator widens ``release_spread`` and sends SIGHUP instead of
    restarting. The running core sends the new spread with its next announcement. (It said "cannot
    reload release_spread_s without a restart".)"""
    core, text = sighup_live("release_spread = 600\n", "release_spread = 30\n", caplog)
    assert "release_spread is now 600 s (from 30 s" in text and "without a restart" not in text, text
    assert core.config.release_spread_s == 600  # what _recall sends (test_release_push: the recall carries it)
    core, text = sighup_live("release_spread = 30\n", "release_spread = 30\n", caplog)  # unchanged: left alone
    assert "release_spread is now" not in text and "reload release_spread" not in text and core.config.release_spread_s == 0


def test_a_file_value_the_environment_or_a_flag_replaces_is_named() -> None:
    """Operator trial: the systemd unit's EDGECI_STATE_DIR beat the config file's state_dir, said
    only at INFO ("from the environment: state_dir"). The coordinator now warns of each file value
    replaced by another one; the same value given twice is not reported."""
    got = layered(["--k", "5"], {"EDGECI_STATE_DIR": "/var/lib/edgeci", "EDGECI_REGION": "eu"},
                  toml='state_dir = "/srv/edgeci"\nk = 3\nregion = "eu"\n')
    assert str(got.args.state_dir) == "s" and got.args.k == 5  # (the helper passes --state-dir s)
    assert got.overridden == ["state_dir = '/srv/edgeci' in c.toml: --state-dir wins ('s')", "k = 3 in c.toml: --k wins (5)"]
    got = layered([], {"EDGECI_TIMEOUT": "9"}, toml="timeout = 2.0\n")
    assert got.overridden == ["timeout = 2.0 in c.toml: EDGECI_TIMEOUT wins (9.0)"]


def test_a_misspelled_environment_variable_is_named_not_ignored() -> None:
    """Operator trial: EDGECI_TIMOUT in a unit file was ignored without a word. A name close to
    one of the command's options is reported (the coordinator logs it at WARNING); another
    command's variable (EDGECI_DATASET is edgeci device's) is not."""
    got = layered([], {"EDGECI_TIMOUT": "3", "EDGECI_STATEDIR": "/x", "EDGECI_DATASET": "digits", "EDGECI_HOME": "/h",
                       "EDGECI_K": "4"})
    assert got.unknown_env == ["EDGECI_STATEDIR (did you mean EDGECI_STATE_DIR?)", "EDGECI_TIMOUT (did you mean EDGECI_TIMEOUT?)"]
    assert got.args.k == 4


def test_a_state_dir_started_under_another_region_is_refused_unless_take_over(tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Operator trial: `edgeci coordinator --region asia --state-dir <eu's dir>` served eu's versions
    and key to asia's devices without a word (helper-85). A start records the region in the state dir;
    another region is refused — before any broker is contacted — unless --take-over."""
    import logging

    from coordinator.cli import check_take_over, record_region, recorded_region
    from coordinator.daemon import CoordinatorOptions
    from edge_sdk.errors import ConfigError, TransportError

    state = tmp_path / "eu"
    state.mkdir()
    record_region(state, "eu")
    assert recorded_region(state) == "eu"

    def options(region: str) -> CoordinatorOptions:  # nothing listens there: the region check comes before the broker's
        return CoordinatorOptions(broker="mqtt://127.0.0.1:1", region=region, state_dir=state)

    with pytest.raises(ConfigError, match=r"serves region 'eu', not 'asia'.*--take-over"):
        check_take_over(options("asia"), take_over=False)
    with caplog.at_level(logging.WARNING, logger="edgeci"), pytest.raises(TransportError, match="cannot reach broker"):
        check_take_over(options("asia"), take_over=True)  # allowed: on to the broker's checks, and nothing listens there
    assert "moving state dir" in caplog.text and "from region 'eu' to region 'asia'" in caplog.text
    with pytest.raises(TransportError, match="cannot reach broker"):
        check_take_over(options("eu"), take_over=False)  # its own region: no question; on to the broker
    record_region(state, "asia")  # what the start does once the daemon is up
    assert recorded_region(state) == "asia" and not (state / "region.tmp").exists()


def test_a_restart_that_drops_the_gate_or_ignores_init_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                               request: pytest.FixtureRequest) -> None:
    """Restarting a gated coordinator without --validation released every later version untested,
    and an --init for a state dir that holds versions was ignored, both without a word (helper-85)."""
    import logging

    import numpy as np

    from coordinator.cli import _warn_dropped_settings
    from coordinator.daemon import CoordinatorOptions
    from coordinator.registry import Registry
    from edge_sdk.tasks import get_task

    spec = get_task("digits").spec
    reg = Registry(tmp_path / "s", spec)
    reg.initialise(np.zeros(spec.size, np.float32), now=0.0, source="test")
    request.addfinalizer(reg.close)

    def warnings(**kw: Any) -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgeci"):
            _warn_dropped_settings(CoordinatorOptions(broker="mqtt://127.0.0.1:1", region="eu", state_dir=tmp_path / "s", **kw))
        return caplog.text

    assert warnings() == ""  # no gate ever: nothing to say
    assert "--init" in warnings(init=tmp_path / "model.npz") and "is ignored" in caplog.text
    caplog.clear()  # a config file's `init` (there for the first start): said at INFO, not a WARNING on every restart
    with caplog.at_level(logging.INFO, logger="edgeci"):
        _warn_dropped_settings(CoordinatorOptions(broker="mqtt://127.0.0.1:1", region="eu", state_dir=tmp_path / "s",
                                                  init=tmp_path / "model.npz"), init_in_file=True)
    assert [r.levelname for r in caplog.records] == ["INFO"] and "is ignored" in caplog.text
    reg.record_release(0, False, {"action": "hold", "version": 1, "release": 0, "at": 5.0})
    assert "ran with the release gate (1 verdicts in release.json)" in warnings()
    assert warnings(validation=tmp_path / "val.npz") == ""  # the gate given again


@pytest.mark.parametrize("params, inversion, said", [
    ({"staleness": "damped", "convert_beyond": 5}, {}, "convert_beyond = 5 has no effect with staleness 'damped'"),
    ({"staleness": "damped"}, {"iterations": 10}, "--inversion iterations=10 has no effect with staleness 'damped'"),
    ({"staleness": "gradient-inversion", "convert_beyond": 5}, {"iterations": 10}, ""),
])
def test_staleness_settings_that_do_nothing_are_named(params: dict[str, Any], inversion: dict[str, Any], said: str,
                                                       tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """helper-89: `--param staleness=damped --param convert_beyond=5` or `--inversion …` without
    gradient inversion were accepted without a word."""
    import logging

    from coordinator.cli import _warn_idle_settings
    from coordinator.daemon import CoordinatorOptions

    with caplog.at_level(logging.WARNING, logger="edgeci"):
        _warn_idle_settings(CoordinatorOptions(broker="mqtt://127.0.0.1:1", region="eu", state_dir=tmp_path,
                                               strategy_params=params, inversion_params=inversion))
    assert (said in caplog.text) if said else caplog.text == ""


@pytest.mark.parametrize("peers", [(), ("sa",)])
def test_a_peering_without_other_coordinators_is_refused(peers: tuple[str, ...], tmp_path: Path) -> None:
    """helper-88: `--peering spyker` without --peers (or naming only itself) started a ring of one and
    then logged every beat of the real ring as 'not in this coordinator's ring', about 3 a second."""
    from coordinator.cli import check_method
    from coordinator.daemon import CoordinatorOptions
    from edge_sdk.errors import ConfigError

    options = CoordinatorOptions(broker="mqtt://127.0.0.1:1", region="sa", coordinator_id="sa", state_dir=tmp_path,
                                 peering="spyker", peers=peers)
    with pytest.raises(ConfigError, match="--peering spyker needs the other coordinators: --peers sa,OTHER"):
        check_method(options)
    check_method(CoordinatorOptions(broker="mqtt://127.0.0.1:1", region="sa", coordinator_id="sa", state_dir=tmp_path,
                                    peering="spyker", peers=("sa", "eu")))


@pytest.mark.parametrize("strategy", ["hfedms", "fedasync"])
def test_a_strategy_that_cannot_run_lasp_is_refused_with_the_options(strategy: str, tmp_path: Path) -> None:
    """`--strategy hfedms --full-sync-every 5` passed the option checks (exit 2, no restart) and
    was refused only when the daemon built its core (coordinator.methods.check_lasp), after the
    pretraining, as a runtime ConfigError that systemd restarts. Now the option check says it."""
    from coordinator.cli import check_method
    from coordinator.daemon import CoordinatorOptions
    from edge_sdk.errors import ConfigError

    def options(t: int) -> CoordinatorOptions:
        return CoordinatorOptions(broker="mqtt://127.0.0.1:1", region="sa", state_dir=tmp_path, strategy=strategy,
                                  strategy_params={}, full_sync_every=t)

    with pytest.raises(ConfigError, match=rf"strategy '{strategy}' cannot run with LASP \(full_sync_every = 5\)"):
        check_method(options(5))
    check_method(options(0))
    check_method(options(1))


@pytest.mark.parametrize(("name", "role", "regions", "argv", "needle"), [
    ("dev-1", "device", ["eu"], ["--region", "eu"], "a device's"),  # it connected as dev-1, knocking that device off
    ("coord-ap", "coordinator", ["ap"], ["--region", "zz", "--id", "coord-ap"], "region(s) ap, not 'zz'"),
    ("coord-ap", "coordinator", ["ap"], ["--region", "ap", "--id", "coord-us"], "--id coord-ap"),
])
def test_a_bundle_that_is_not_this_coordinators_is_refused_before_anything_is_written(
        name: str, role: str, regions: list[str], argv: list[str], needle: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """helper-96: a coordinator took any bundle without a word — a device's (the broker then named it
    that device), one issued for another region (the ACL refused every topic, the daemon said
    'ready'), or another id than its identity (its peers' trusted/ name the identity, so a ring
    refused all its messages). Each is one line now, before the broker or the state dir is touched."""
    from coordinator.pki import Pki
    from demos.cli import main

    pki = Pki.init(tmp_path / "pki")
    pki.issue(name, role, regions=regions)
    rc = main(["coordinator", "--broker", "mqtts://127.0.0.1:1", "--bundle", str(pki.bundle_dir(name)),
               "--state-dir", str(tmp_path / "s"), *argv])
    err = capsys.readouterr().err
    assert rc == 1 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("options", "text", "answer"), [
    ({"at_most": 10}, "10", 10),  # at_most is inclusive, below is not
    ({"at_most": 10}, "11", "must be at most 10, got 11"),
    ({"below": 10}, "10", "must be below 10, got 10"),
    ({"at_most": 10, "rule": "must be 1 to 10"}, "11", "must be 1 to 10, got 11"),
    ({"at_most": 10, "rule": "must be 1 to 10"}, "0", "must be 1 to 10, got 0"),
    # above_rule: the words for a value over the upper bound only; the lower bound keeps its own
    ({"at_most": 10, "above_rule": "must be at most 10 (ten)"}, "11", "must be at most 10 (ten), got 11"),
    ({"at_most": 10, "above_rule": "must be at most 10 (ten)"}, "0", "must be at least 1, got 0"),
    ({"below": 10, "above_rule": "must be below 10 seconds"}, "1e3", "must be below 10 seconds, got 1e3"),
    # finite: ±inf is refused as not finite before the upper bound sees it (what wait_seconds said)
    ({"below": 10, "finite": True}, "inf", "must be a finite number, got inf"),
    ({"below": 10}, "inf", "must be below 10, got inf"),
    ({"finite": True}, "nan", "must be at least 1, got nan"),
])
def test_bounded_states_its_upper_bound_in_its_own_words(options: dict[str, Any], text: str, answer: Any) -> None:
    """`status --timeout` and `pki --days` hand-rolled their upper bounds beside bounded() for the
    words ("... seconds", "at most 365000 (a thousand years)"); bounded takes them now."""
    import argparse

    from coordinator.config import bounded

    parse = bounded(float, 1, **options)
    if isinstance(answer, str):
        with pytest.raises(argparse.ArgumentTypeError) as refused:
            parse(text)
        assert str(refused.value) == answer
    else:
        assert parse(text) == answer


def test_bounded_takes_one_upper_bound() -> None:
    from coordinator.config import bounded

    with pytest.raises(ValueError, match="below or at_most, not both"):
        bounded(int, 0, below=3, at_most=2)


class _RebuildingActor:
    """A stand-in actor thread that rebuilds the daemon's core from ``daemon.options`` (as
    ``CoordinatorDaemon._rebuild_core`` does after a storage or core failure) just before
    (``when="before"``) or just after (``"after"``) it runs a call: the interleaving a
    failure queued next to SIGHUP's call produces on the real actor."""

    def __init__(self, when: str) -> None:
        self.when, self.daemon, self.rebuilds = when, None, 0

    def rebuild(self) -> None:
        opts = self.daemon.options  # type: ignore[attr-defined]
        self.daemon.core = make_coordinator(opts.strategy, **opts.strategy_params)  # type: ignore[attr-defined]
        self.rebuilds += 1

    def call(self, fn: Any) -> None:
        if self.when == "before":
            self.rebuild()
        fn()
        if self.when == "after":
            self.rebuild()

    def run_actions(self, actions: Any) -> None:
        pass


@pytest.mark.parametrize("when", ["before", "after"])
def test_sighup_survives_a_core_rebuild_next_to_it_on_the_actor(caplog: pytest.LogCaptureFixture, when: str) -> None:
    # helper-146: reload() read daemon.core.strategy on the signal's thread and set daemon.options
    # there after the actor had applied the change. A rebuild on the actor (storage or core
    # failure) before the call reconfigured the discarded core's strategy; one after it rebuilt
    # from the options before they named the change. Either way the log said "k is now 7" and
    # the running core kept k = 5.
    import logging
    from types import SimpleNamespace

    running = layered([], {}, "[strategy]\nk = 5\n")
    opts = coordinator_cli.options_from(running.args, running)
    actor = _RebuildingActor(when)
    daemon = SimpleNamespace(options=opts, core=make_coordinator(opts.strategy, **opts.strategy_params), actor=actor,
                             clock=SimpleNamespace(now=lambda: 0.0))
    actor.daemon = daemon  # type: ignore[assignment]
    with caplog.at_level(logging.INFO, logger="edgeci.coordinator"):
        coordinator_cli.reload(daemon, running, lambda: layered([], {}, "[strategy]\nk = 7\n"),  # type: ignore[arg-type]
                               lambda level, fmt: None)
    assert actor.rebuilds == 1
    assert "strategy parameter k is now 7" in caplog.text
    assert daemon.options.strategy_params["k"] == 7
    assert daemon.core.strategy.config.k == 7  # the core that runs now, not the one the rebuild replaced
    actor.rebuild()  # and any later rebuild keeps it
    assert daemon.core.strategy.config.k == 7


def test_a_change_the_actor_did_not_apply_in_time_is_never_applied_later() -> None:
    # helper-146: _on_actor gave up after its timeout and reload() logged "cannot reload", but
    # the call stayed queued: once the busy actor reached it, the strategy changed after all,
    # against the log and daemon.options (a later rebuild then reverted it, silently).
    from types import SimpleNamespace

    queued: list[Any] = []
    daemon = SimpleNamespace(actor=SimpleNamespace(call=queued.append))
    applied: list[int] = []
    with pytest.raises(ConfigError, match="did not apply the change"):
        coordinator_cli._on_actor(daemon, lambda: applied.append(1), timeout=0.01)  # type: ignore[arg-type]
    assert len(queued) == 1
    queued[0]()  # the actor reaches it now
    assert applied == []
