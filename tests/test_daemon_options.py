"""A coordinator refuses bad options before it pretrains and initialises an empty state dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.errors import ConfigError
from edge_sdk.tasks import get_task


class Pretrained(Exception):
    """Raised by the stub task's pretraining: reaching it means the options were checked too late."""


@pytest.fixture
def task(monkeypatch: pytest.MonkeyPatch) -> Any:
    task = get_task("digits")

    def pretrained(**_: Any) -> None:
        raise Pretrained

    monkeypatch.setattr(task, "pretrained", pretrained)
    return task


def options(tmp_path: Path, **changes: Any) -> CoordinatorOptions:
    return CoordinatorOptions(broker="mqtt://127.0.0.1:1", region="r", state_dir=tmp_path / "state", **changes)


@pytest.mark.parametrize(("changes", "needle"), [
    ({"strategy_params": {"k": 0}}, "k"),
    ({"strategy": "fedbuff", "strategy_params": {"no_such": 1}}, "no_such"),
    ({"inversion_params": {"bogus": 1}}, "unknown parameter(s) bogus"),
    ({"inversion_params": {"iterations": -5}}, "iterations"),
])
def test_bad_options_are_refused_before_pretraining(tmp_path: Path, task: Any, changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        CoordinatorDaemon(options(tmp_path, **changes), task=task)
    assert needle in str(err.value)
    assert not (tmp_path / "state").exists()  # nothing written: no lock, no signing key, no version


def test_bad_options_leave_an_existing_state_dir_untouched(tmp_path: Path, task: Any) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with pytest.raises(ConfigError):
        CoordinatorDaemon(options(tmp_path, strategy_params={"k": 0}), task=task)
    assert list(state.iterdir()) == []


def test_bad_validation_file_is_refused_before_pretraining(tmp_path: Path, task: Any) -> None:
    bad = tmp_path / "val.npz"
    np.savez(bad, x=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int64))  # wrong input shape for digits
    with pytest.raises(ConfigError, match="--validation"):
        CoordinatorDaemon(options(tmp_path, validation=bad), task=task)
    assert not (tmp_path / "state").exists()


def test_good_options_reach_pretraining(tmp_path: Path, task: Any) -> None:
    """The check is not a blanket refusal: valid options go on to pretrain the empty state dir."""
    with pytest.raises(Pretrained):
        CoordinatorDaemon(options(tmp_path, strategy_params={"k": 3}, inversion_params={"iterations": 5}), task=task)


def test_peer_keys_are_trusted_by_coordinator_name(tmp_path: Path, task: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle's ``trusted/<coordinator id>.pub`` keys reach the core by name: each speaks only
    for the coordinator it is named after (keyed by key id, any of them spoke for every peer)."""
    from coordinator.pki import Pki
    from edge_sdk.signing import load_public_key

    pki = Pki.init(tmp_path / "pki")
    pki.issue("coord-a", "coordinator", regions=["a"])
    pki.issue("coord-b", "coordinator", regions=["b"])
    pki.refresh_trust()
    seen: dict[str, bytes] = {}

    def capture(self: CoordinatorDaemon) -> None:
        seen.update(self.peer_keys)
        raise Pretrained

    monkeypatch.setattr(CoordinatorDaemon, "_check_options", capture)
    with pytest.raises(Pretrained):
        CoordinatorDaemon(options(tmp_path, bundle=pki.bundle_dir("coord-a")), task=task)
    assert seen["coord-b"] == load_public_key(pki.signing_dir / "coord-b.pub")
    assert set(seen) <= {"coord-a", "coord-b"}


@pytest.mark.parametrize(("strategy", "params", "expected"), [
    ("fedbuff", {"k": 3}, 600.0),  # a vanished invited device would hold its slot (and a strict-K round) for ever
    ("port", {}, 600.0),
    ("nebula", {}, 600.0),
    ("fedbuff", {"forget_after_s": 60.0}, 60.0),  # the operator's value
    ("fedbuff", {"forget_after_s": None}, None),  # --param forget_after_s=none: wait for ever, as the paper
    ("spin", {"k": 3}, "absent"),  # SPIN never waits for a device: no such parameter
])
def test_a_daemon_forgets_vanished_invited_devices_by_default(tmp_path: Path, task: Any, monkeypatch: pytest.MonkeyPatch,
                                                               strategy: str, params: dict[str, Any], expected: Any) -> None:
    import coordinator.daemon as daemon_module
    from coordinator.methods import make_method

    built: list[Any] = []

    def capture(*args: Any, **kwargs: Any) -> Any:
        built.append(make_method(*args, **kwargs).strategy)
        raise Pretrained

    monkeypatch.setattr(daemon_module, "make_method", capture)
    with pytest.raises(Pretrained):
        CoordinatorDaemon(options(tmp_path, strategy=strategy, strategy_params=params), task=task)
    config = built[0].config
    assert getattr(config, "forget_after_s", "absent") == expected


def test_a_peer_without_a_provisioned_key_is_refused_at_start(tmp_path: Path, task: Any) -> None:
    """helper-96: coord-a's bundle was issued before coord-b and `edgeci pki trust` was not run, so
    its trusted/ has no coord-b.pub. With provisioned keys a peer without one is never heard (each
    of its messages was a WARNING "signed with key …, which is not the key provisioned for
    'coord-b'", as if coord-b used a wrong key); the start now says which key is missing and how
    to add it, before anything is written. With the key there the start goes on."""
    from coordinator.pki import Pki

    pki = Pki.init(tmp_path / "pki")
    pki.issue("coord-a", "coordinator", regions=["a"])
    pki.issue("coord-b", "coordinator", regions=["b"])  # no refresh_trust: coord-a does not trust coord-b yet
    ring = {"bundle": pki.bundle_dir("coord-a"), "coordinator_id": "coord-a", "peering": "spyker",
            "peers": ("coord-a", "coord-b")}
    with pytest.raises(ConfigError, match=r"coord-b.*pki trust") as err:
        CoordinatorDaemon(options(tmp_path, **ring), task=task)
    assert "coord-b.pub" in str(err.value)
    assert not (tmp_path / "state").exists()
    pki.refresh_trust()
    with pytest.raises(Pretrained):
        CoordinatorDaemon(options(tmp_path, **ring), task=task)


def test_a_strategy_waiting_for_devices_says_so_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`--strategy fedadam` waited silently for 20 devices with new data (its default select):
    with fewer, every pull was deferred and no version was ever made."""
    import logging

    from edge_sdk.modelio import save_model
    from tests.test_durability import FakeTransport

    spec = get_task("digits").spec
    init = save_model(tmp_path / "v0.npz", spec, np.zeros(spec.size, np.float32))
    daemon = CoordinatorDaemon(options(tmp_path, strategy="fedadam", strategy_params={}, init=init), task=get_task("digits"))
    daemon.transport = FakeTransport()  # type: ignore[assignment]
    with caplog.at_level(logging.INFO, logger="edgeci"):
        daemon.start()
        daemon.stop()
    assert "fedadam starts a round only once 20 devices wait with new data (select; --param select=N" in caplog.text


@pytest.mark.parametrize("gate", ["none", "validation", "canary"])
def test_a_coordinator_says_at_start_whether_it_tests_versions_before_release(tmp_path: Path, gate: str,
                                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Without --validation or --canary every version is released untested: the start says so
    (it said nothing), and says the gate is on when it is."""
    import logging

    from coordinator.validation import save_validation
    from edge_sdk.modelio import save_model
    from edge_sdk.tasks.base import Split
    from tests.test_durability import FakeTransport

    task = get_task("digits")
    spec = task.spec
    init = save_model(tmp_path / "v0.npz", spec, np.zeros(spec.size, np.float32))
    changes: dict[str, Any] = {"init": init}
    if gate == "validation":
        test = task.data().test
        save_validation(tmp_path / "val.npz", Split(x=test.x[:50], y=test.y[:50]))
        changes["validation"] = tmp_path / "val.npz"
    elif gate == "canary":
        changes["canary"] = 0.2
    daemon = CoordinatorDaemon(options(tmp_path, **changes), task=task)
    daemon.transport = FakeTransport()  # type: ignore[assignment]
    with caplog.at_level(logging.INFO, logger="edgeci"):
        daemon.start()
        daemon.stop()
    said = {"none": "release gate off: every new version is released to the devices untested",
            "validation": "release gate on: candidates are scored on 50 validation samples",
            "canary": "canary evaluation on: 20% of recent devices"}
    for name, line in said.items():
        assert (line in caplog.text) == (name == gate), (name, caplog.text)
