"""Gaps the mutation audit of the operator's configuration found (helper-197, seed 197): changes
to ``coordinator/config.py`` and ``coordinator/cli.py`` that the tests covering the mutated line
did not notice. Each test names the line (at 4899075) and the mutation it catches; each asserts
what the operator sees: the resolved options, the error, the warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from coordinator import cli as coordinator_cli
from coordinator.config import Layered
from edge_sdk.errors import ConfigError
from tests.test_coordinator_config import layered

# ---------------------------------------------------------------------- coordinator/config.py


def test_a_config_key_in_the_file_is_an_unknown_key() -> None:
    """config.py:35, ``NOT_LAYERED`` without ``"config"``: the file's own ``config = "…"`` key (a
    file cannot name another file) was taken without a word and ``config`` listed as a valid key."""
    with pytest.raises(ConfigError, match=r"c\.toml: unknown key 'config'; valid keys: ") as err:
        layered([], toml='config = "other.toml"\n')
    assert "config," not in str(err.value).split("valid keys: ")[1]


@pytest.mark.parametrize(("toml", "needle"), [
    ("timeout = true\n", "c.toml: timeout: expected a float, got True"),
    ("canary = true\n", "c.toml: canary: expected a float, got True"),  # (True == 1.0: every device a canary)
    ('state_dir = ["a", "b"]\n', "c.toml: state_dir: expected a path, got ['a', 'b']"),
], ids=["bool-for-float", "bool-for-share", "list-for-path"])
def test_a_file_value_of_the_wrong_toml_type_is_refused_not_converted(toml: str, needle: str) -> None:
    """config.py:165, ``or`` -> ``and`` in ``isinstance(value, bool) or not isinstance(value, str | int | float)``:
    a TOML boolean for a number became 1.0 (``timeout = true`` ran a 1 s timeout, ``canary = true``
    asked every device) and a list for a path became the path ``['a', 'b']``, without a word."""
    with pytest.raises(ConfigError) as err:
        layered([], toml=toml)
    assert str(err.value) == needle


# ---------------------------------------------------------------------- coordinator/cli.py


def test_a_bare_command_line_runs_the_documented_defaults() -> None:
    """cli.py:198, ``--rollback-margin``'s default 0.10 -> 0: every candidate a hair worse than the
    release (beyond the 0.02 gate margin) was rejected and the training line rolled back, where
    the help promises a hold up to 0.10. The defaults the help states, and the secure ones, as
    CoordinatorOptions receives them."""
    got = layered([])
    o = coordinator_cli.options_from(got.args, got)
    assert (o.gate_margin, o.rollback_margin, o.gate_z) == (0.02, 0.10, 1.0)
    assert (o.canary, o.canary_samples, o.canary_max_per_device, o.canary_min_reports, o.canary_deadline_s) == (0.0, 20, 0, 3, 600.0)
    assert (o.strategy, o.strategy_params, o.peering, o.peers) == ("spin", {"k": 10, "timeout_s": 30.0, "combine": "models"}, "none", ())
    assert (o.status_interval_s, o.release_spread_s, o.keepalive_s, o.conversion_deadline_s) == (30.0, 0, 30, 60.0)
    assert (o.seed, o.encoding, o.full_sync_every, o.hints, o.validation, o.init) == (0, "f4", 0, {}, None, None)
    assert o.require_pull is True and o.auth is None and o.signing_key is None and o.operator_keys_dir is None
    assert (got.args.metrics_port, got.args.metrics_host, got.args.take_over) == (0, "127.0.0.1", False)
    assert o.broker == "mqtt://127.0.0.1:1883" and o.region == "default"


def test_a_gate_margin_above_the_default_rollback_margin_is_not_refused_without_sources() -> None:
    """cli.py:498, ``not in (None, "default")`` -> ``not in ("default",)``: a namespace that comes
    without sources (``run(args)`` from a driver: ``Layered(args=args)``) counted the untouched
    default rollback margin 0.10 as given, and ``--gate-margin 0.2`` was refused instead of raising
    it (the daemon does that; the start log says so)."""
    from demos.cli import build_parser

    parser = build_parser(["coordinator"])
    args = parser.parse_args(["coordinator", "--state-dir", "s", "--gate-margin", "0.2"])
    o = coordinator_cli.options_from(args)
    coordinator_cli._check_gate(o, Layered(args=args))  # not refused
    with pytest.raises(ConfigError, match=r"--rollback-margin 0.1 is below --gate-margin 0.2"):
        coordinator_cli._check_gate(o, Layered(args=args, sources={"rollback_margin": "flag"}))


def test_an_invalid_inversion_setting_is_refused_before_the_state_dir_is_written(tmp_path: Path) -> None:
    """cli.py:557, ``inversion_config(**options.inversion_params)`` deleted from check_before_start:
    ``--inversion iterations=-1`` (or a name that is none) passed the checks that run before
    anything is written, as a usage error (exit 2, not retried by systemd)."""
    from edge_sdk.errors import BadOption

    for item, needle in (("iterations=-1", "iterations"), ("iteratons=5", "iteratons")):
        got = layered(["--state-dir", str(tmp_path / "s"), "--param", "staleness=gradient-inversion",
                       "--param", "convert_beyond=2", "--inversion", item])
        o = coordinator_cli.options_from(got.args, got)
        with pytest.raises(BadOption, match=needle):
            coordinator_cli.check_before_start(o, got)
        assert not (tmp_path / "s").exists()


def test_an_init_ignored_on_restart_is_a_warning_from_a_flag_and_info_from_the_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest) -> None:
    """cli.py:570, ``layered.sources.get("init") == "file"`` -> ``!=``: ``--init`` given on the command
    line for a state dir that already holds versions (ignored) was said at INFO only, and the
    config file's ``init`` (there for the first start) was a WARNING on every restart."""
    import numpy as np

    from coordinator.registry import Registry
    from edge_sdk.tasks import get_task

    spec = get_task("digits").spec
    reg = Registry(tmp_path / "s", spec)
    reg.initialise(np.zeros(spec.size, np.float32), now=0.0, source="test")
    request.addfinalizer(reg.close)
    init = str(tmp_path / "model.npz")
    for argv, toml, level in ((["--init", init], None, logging.WARNING), ([], f'init = "{init}"\n', logging.INFO)):
        got = layered(["--state-dir", str(tmp_path / "s"), *argv], toml=toml)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="edgeci"):
            coordinator_cli.check_before_start(coordinator_cli.options_from(got.args, got), got)
        said = [r.levelno for r in caplog.records if "is ignored" in r.getMessage()]
        assert said == [level], (argv, toml, caplog.text)


def test_taking_over_a_region_whose_devices_follow_another_key_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """cli.py:1022, the WARNING ``taking over region … with another key (--take-over)`` deleted: a
    start with --take-over on a region whose retained recall is signed by another key (its devices
    refuse this coordinator's models until they trust the new key) went on without a word."""
    from coordinator.daemon import CoordinatorOptions
    from edge_sdk.errors import StartRefused
    from edge_sdk.signing import Signer
    from edge_sdk.wire import topics
    from edge_sdk.wire.codec import encode
    from edge_sdk.wire.messages import Recall

    topic = topics.recall_topic("eu")
    other = encode(Recall(model_id="digits", release=4, abandoned=(), epoch=7), signer=Signer.generate(),
                   scope=topics.signing_scope(topic))
    monkeypatch.setattr(coordinator_cli, "_probe", lambda *_, **__: coordinator_cli._Probe({topic: other}, False))
    o = CoordinatorOptions(broker="mqtt://127.0.0.1:1", region="eu", state_dir=tmp_path / "s")
    with pytest.raises(StartRefused, match="follow a coordinator that signs with key"):
        coordinator_cli.check_take_over(o, take_over=False)
    with caplog.at_level(logging.WARNING, logger="edgeci"):
        coordinator_cli.check_take_over(o, take_over=True)
    assert "taking over region 'eu' with another key (--take-over)" in caplog.text
    assert "epoch 7, release 4" in caplog.text


def _bundle_with_password(where: Path) -> Path:
    """A coordinator bundle whose manifest names a password file (``edgeci pki passwd``)."""
    import json

    where.mkdir()
    (where / "bundle.json").write_text(json.dumps({"identity": "coord-default", "role": "coordinator",
                                                   "username": "coord-default", "password_file": "password"}))
    (where / "password").write_text("s3cret\n")
    (where / "ca.crt").write_text("")  # (read only when connecting)
    return where


def test_sighup_while_the_bundle_s_password_file_is_unreadable_keeps_the_running_config(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """cli.py:1137, ``OSError`` dropped from reload's ``except (EdgeciError, OSError, ValueError)``:
    a SIGHUP while the bundle's password file is gone (rotated, a volume remounting) raised
    FileNotFoundError out of the reload (``BrokerAuth.from_bundle`` reads it raw) and the
    coordinator's signal loop ended: SIGHUP stopped the coordinator."""
    from types import SimpleNamespace

    bundle = _bundle_with_password(tmp_path / "b")
    running = layered(["--bundle", str(bundle)], toml='log_level = "info"\n')
    daemon = SimpleNamespace(options=coordinator_cli.options_from(running.args, running))
    (bundle / "password").unlink()
    with caplog.at_level(logging.INFO, logger="edgeci.coordinator"):
        got = coordinator_cli.reload(daemon, running, lambda: layered(["--bundle", str(bundle)], toml='log_level = "debug"\n'),  # type: ignore[arg-type]
                                     lambda level, fmt: None)
    assert got is running
    assert "SIGHUP: config not reloaded, keeping the running one" in caplog.text and "password" in caplog.text


def test_readyz_names_the_version_and_storage_once_started_and_says_not_started_before() -> None:
    """cli.py:1220, ``if snap is not None`` negated in the /readyz probe: a started coordinator's
    answer lost its version and storage detail, and one not started yet failed to answer at all
    (``None.extra``) instead of saying "not started"."""
    from types import SimpleNamespace

    daemon = SimpleNamespace(actor=SimpleNamespace(alive=True), transport=SimpleNamespace(connected=True),
                             coordinator_id="coord-eu", metrics=SimpleNamespace(snapshot=None))
    health, ready = coordinator_cli._probes(daemon)  # type: ignore[arg-type]
    assert health() == (True, {"actor_alive": True, "coordinator": "coord-eu"})
    # before the first snapshot the storage is not known, not failing (it said "storage is failing" too)
    assert ready() == (False, {"broker_connected": True, "storage_ok": None, "why": ["not started"]})
    daemon.metrics.snapshot = SimpleNamespace(version=7, extra={"storage_ok": True, "storage_detail": "ok"})
    assert ready() == (True, {"broker_connected": True, "storage_ok": True, "why": [], "storage_detail": "ok", "version": 7})


def test_a_bundle_whose_password_file_is_missing_is_one_line_at_start(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Found beside cli.py:1137's survivor: ``edgeci coordinator --bundle B``, B's manifest naming a
    password file that is not there, ended in a FileNotFoundError traceback from options_from
    (BrokerAuth.from_bundle read it unguarded). Now one line and exit 2, as any other bad option,
    before the state dir is written."""
    from demos.cli import main

    bundle = _bundle_with_password(tmp_path / "b")
    (bundle / "password").unlink()
    rc = main(["coordinator", "--state-dir", str(tmp_path / "s"), "--broker", "mqtt://127.0.0.1:1", "--bundle", str(bundle)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "cannot read its password file password" in err, err
    assert not (tmp_path / "s").exists()
