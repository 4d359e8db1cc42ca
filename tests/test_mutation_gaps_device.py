"""Device-core behaviours no test checked (helper-158's mutation audit).

Each test kills a mutant of edge_sdk/core/ that survived every unit test covering the module;
the docstrings name it (file:line at the audit's commit, and the mutation)."""

from __future__ import annotations

import pytest

from edge_sdk.core.device import DeviceConfig
from edge_sdk.core.events import MessageReceived, Notify, Publish, TimerFired
from edge_sdk.errors import ConfigError, LocalProtocolError
from edge_sdk.signing import Signer
from edge_sdk.wire import topics
from edge_sdk.wire.codec import encode
from edge_sdk.wire.messages import Recall
from tests.helpers import SIGNER, SPEC
from tests.test_trust_cores import device, model, to_dev


@pytest.mark.parametrize("signer", [Signer.generate(), None], ids=["forged", "unsigned"])
def test_a_recall_not_signed_by_the_pinned_key_is_refused_and_changes_nothing(signer: Signer | None) -> None:
    """device.py:1211 (``self._check_trusted(...)`` deleted in ``_on_recall``): once the
    coordinator's key is pinned, a recall forged with another key, or unsigned, of the version the
    device serves made it drop that version and fetch another; it must be a counted rejection."""
    d = device()
    d.handle(to_dev(0.0, "model", model(3)))  # serving v3, the coordinator's key pinned
    topic = topics.recall_topic("r1")
    forged = Recall(model_id="toy", release=6, abandoned=(3, 5))
    payload = encode(forged, signer=signer, scope=topics.signing_scope(topic)) if signer else encode(forged)
    acts = d.handle(MessageReceived(now=1.0, topic=topic, payload=payload))
    assert [a.kind for a in acts if isinstance(a, Notify)] == ["message_rejected"]
    assert not [a for a in acts if isinstance(a, Publish)]  # no pull for another model
    assert d.state.recall is None and d.state.release_wanted == -1 and "recalled" not in d.state.counters
    assert sum(n for k, n in d.state.counters.items() if k.startswith("rejected:")) == 1


def test_events_refuse_a_time_that_is_not_finite() -> None:
    """events.py:44 (``_check_time(self.now)`` deleted in ``MessageReceived``): a NaN ``now``
    was taken, and every comparison with a deadline is False for it."""
    MessageReceived(now=1.0, topic="t", payload=b"")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(LocalProtocolError):
            MessageReceived(now=bad, topic="t", payload=b"")
        with pytest.raises(LocalProtocolError):
            TimerFired(now=bad)


def test_a_publish_takes_qos_0_1_or_2() -> None:
    """events.py:70 (``(0, 1, 2)`` -> ``(1, 1, 2)``): a QoS 0 publish was refused."""
    assert [Publish(topic="t", payload=b"", qos=q).qos for q in (0, 1, 2)] == [0, 1, 2]
    for bad in (-1, 3):
        with pytest.raises(LocalProtocolError, match="qos"):
            Publish(topic="t", payload=b"", qos=bad)


def test_an_older_recall_after_a_newer_one_does_not_replace_it() -> None:
    """device.py:1225 (``>=`` -> ``<``): the device keeps the region's newest recall; with the
    mutant a replayed older one (genuinely signed) replaced it and a newer one was not kept."""
    d = device()
    d.handle(to_dev(0.0, "model", model(3)))  # serving v3, the coordinator's key pinned
    topic = topics.recall_topic("r1")

    def recall(release: int, abandoned: tuple[int, int]) -> MessageReceived:
        msg = Recall(model_id="toy", release=release, abandoned=abandoned)
        return MessageReceived(now=1.0, topic=topic, payload=encode(msg, signer=SIGNER, scope=topics.signing_scope(topic)))

    d.handle(recall(6, (4, 5)))
    assert d.state.recall is not None and d.state.recall.release == 6
    d.handle(recall(5, (4, 4)))  # older: a replay, or a retained copy delivered late
    assert d.state.recall.release == 6
    d.handle(recall(9, (7, 8)))
    assert d.state.recall.release == 9


@pytest.mark.parametrize("value", [0, -1, True, 2.0], ids=["0", "-1", "bool", "float"])
def test_a_device_count_setting_must_be_an_int_of_at_least_one(value: object) -> None:
    """device.py:377 (``or`` -> ``and`` in ``_count``): any min_samples was taken."""
    with pytest.raises(ConfigError, match="min_samples"):
        DeviceConfig(device_id="d1", region="r1", spec=SPEC, min_samples=value)  # type: ignore[arg-type]
    assert DeviceConfig(device_id="d1", region="r1", spec=SPEC, min_samples=3).min_samples == 3
