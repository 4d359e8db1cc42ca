"""What grows with the devices a long-running coordinator has ever seen (helper-150's audit)."""

from __future__ import annotations

import random

import numpy as np

from coordinator.core import MessageReceived
from coordinator.strategies.base import StaticView
from coordinator.strategies.fedbuff import FedBuffConfig, FedBuffStrategy
from edge_sdk.core.events import Publish
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Invite, Pull
from tests.helpers import SPEC, make_coordinator


class _CountingDeferred(dict[str, float]):
    """``view.deferred`` that counts the passes over its times."""

    passes = 0

    def values(self):  # type: ignore[no-untyped-def]
        type(self).passes += 1
        return super().values()


def test_fedbuff_does_not_pass_over_every_deferred_device_after_every_event() -> None:
    """A device that deferred and left stays in the core's deferred table until a draw invites it.
    With the round's devices forgotten (``forget_after_s``) FedBuff's plan, which runs after every
    event, looked at every deferred time for one newer than the draw: 100,000 such ids made each
    event of a real core take 3.3 ms (10,000: 302 us; now ~20 us either way)."""
    ghosts = [f"ghost-{i:05d}" for i in range(1000)]
    deferred = _CountingDeferred(dict.fromkeys(ghosts, 0.5))
    view = StaticView(spec=SPEC, version=0, weights=np.zeros(SPEC.size, dtype=np.float32), deferred=deferred,
                      devices_seen=tuple(ghosts))
    s = FedBuffStrategy(FedBuffConfig(k=2, select=2, forget_after_s=1.0))
    first = s.plan(view, 1.0, random.Random(0))
    assert len(first.invite) == 2
    for d in first.invite:
        del deferred[d]  # (the core's invite takes them out)
    _CountingDeferred.passes = 0
    for k in range(2, 40):  # the two invited never report: forgotten at 2.0, then an empty round
        assert s.plan(view, float(k), random.Random(k)).invite == ()
    assert not s.in_flight
    assert _CountingDeferred.passes <= 1


def test_fedbuff_still_draws_when_a_device_defers_after_the_round_emptied() -> None:
    """The same decision on a real core: ghosts deferred, the drawn ones forgotten, then a live
    device's pull is deferred (newer than the draw): a new round is drawn and invites it."""
    core = make_coordinator("fedbuff", k=2, select=5000, forget_after_s=1.0)
    now = 0.0

    def pull(device: str, seq: int, **kw: object) -> list[object]:
        nonlocal now
        now += 0.001
        msg = Pull(device=device, seq=seq, model_id="toy", have_version=0, n_samples=10, **kw)  # type: ignore[arg-type]
        return list(core.handle(MessageReceived(now=now, topic=topics.device_topic("r1", device, "pull"), payload=encode(msg))))

    for i in range(200):
        pull(f"ghost-{i:04d}", 0)
    now += 10.0  # the first ghost, drawn at its pull, is forgotten: the others (deferred since) are drawn
    pull("ghost-0000", 1, serve=True)
    assert len(core.strategy.in_flight) == 199  # type: ignore[attr-defined]
    now += 10.0  # ... and forgotten too: nothing deferred since that draw, so no new one
    assert pull("ghost-0000", 2, serve=True) and not core.strategy.in_flight  # type: ignore[attr-defined]
    actions = pull("live", 0)
    invites = [decode(a.payload) for a in actions if isinstance(a, Publish) and a.topic.endswith("/invite")]
    assert any(isinstance(i, Invite) and i.device == "live" for i in invites)
