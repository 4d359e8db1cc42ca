"""What grows with the devices a long-running coordinator has ever seen (helper-150's audit).
Gaps in coordinator/core.py are documented here as strict xfails: they flip when fixed."""

from __future__ import annotations

import pytest

from coordinator.core import PRESENCE_LIMIT, MessageReceived
from edge_sdk.core.events import Publish
from edge_sdk.wire import topics
from tests.helpers import make_coordinator


@pytest.mark.xfail(strict=True, reason="core.py (lead): a presence row evicted past PRESENCE_LIMIT leaves its retained "
                   "'offline' on the broker for good (helper-150: 20,000 ids, 20,055 retained, all replayed at each restart)")
def test_an_offline_presence_the_table_evicts_is_cleared_on_the_broker() -> None:
    """Every device id that ever connected leaves a retained ``offline`` (its will or its clean
    exit) that nothing clears: the broker keeps one per id ever seen, and every (re)start of the
    coordinator receives them all again (a real daemon after 20,000 churned ids: 140,000 bytes
    of presence in its first 7 s). The core forgets all but the newest PRESENCE_LIMIT rows; an
    evicted offline one should be cleared on the broker too (an empty retained publish), which
    bounds the retained presences by PRESENCE_LIMIT plus the devices online."""
    core = make_coordinator("spin")
    extra = 50
    cleared: set[str] = set()
    for i in range(PRESENCE_LIMIT + extra):
        topic = topics.device_topic("r1", f"gone-{i:06d}", "presence")
        for action in core.handle(MessageReceived(now=float(i), topic=topic, payload=b"offline")):
            if isinstance(action, Publish) and action.retain and action.payload == b"" and action.topic.endswith("/presence"):
                cleared.add(action.topic)
    assert len(core.presence) == PRESENCE_LIMIT
    assert cleared == {topics.device_topic("r1", f"gone-{i:06d}", "presence") for i in range(extra)}
