"""What stale invitations cost a selecting core's commits and round records (sans-IO).

``CoordinatorCore._invites`` keeps an invitation until its device pulls it: a device drawn that
never pulls (gone, off, out of data) stays there for the state dir's life, and since the round
record (5c40259) every commit of a selecting strategy (its metadata's ``round``) and every draw's
``RecordSelectionRound`` lists every one of them (``_round_block``). A FedAvg core (digits,
rounds of 2 drawn from 3 waiting, round_timeout_s 5) is given S stale invitations (put straight
into ``_invites``, as S rounds of drawn devices that never pulled would leave), then runs one round:
three pulls draw it, one invitee pulls and reports, the timeout commits. Printed per S: the commit's
metadata and the record as JSON (bytes), process CPU of the round's events and of the
``json.dumps`` the registry does for each (best of 3), ratios against S = 0 in this process.

    .venv/bin/python benchmarks/round_block_cost.py [--stale 0 10000 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import non_negative_int
from coordinator.core import (
    CommitVersion,
    CoordinatorAction,
    CoordinatorConfig,
    CoordinatorCore,
    RecordSelectionRound,
    Snapshot,
)
from coordinator.strategies import make_strategy
from edge_sdk.core.events import MessageReceived, Publish, TimerFired
from edge_sdk.signing import Signer
from edge_sdk.tasks import get_task
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Invite, Pull, Update


def one_round(stale: int) -> tuple[int, int, float, float]:
    """(commit metadata bytes, record bytes, CPU s of the round's events, CPU s of the two dumps)."""
    spec = get_task("digits").spec
    cfg = CoordinatorConfig(region="bench", coordinator_id="c1", spec=spec, signer=Signer.generate())
    core = CoordinatorCore(cfg, make_strategy("fedavg", select=2, min_devices=3, round_timeout_s=5.0),
                           Snapshot(version=0, weights=np.zeros(spec.size, np.float32)), rng=random.Random(0))
    core.start(0.0)
    core._invites.update((f"gone{i:06d}", i + 1) for i in range(stale))
    core._invite_round = stale

    def msg(m: Pull | Update, now: float) -> list[CoordinatorAction]:
        leaf: Literal["pull", "update"] = "pull" if isinstance(m, Pull) else "update"
        return core.handle(MessageReceived(now=now, topic=topics.device_topic("bench", m.device, leaf), payload=encode(m)))

    t0 = time.process_time()
    actions = [a for i in range(3) for a in msg(Pull(device=f"d{i}", seq=1, model_id=spec.model_id), 1.0 + i)]
    invite = next(decode(a.payload) for a in actions if isinstance(a, Publish) and a.topic.endswith("/invite"))
    assert isinstance(invite, Invite)
    msg(Pull(device=invite.device, seq=2, model_id=spec.model_id, invite_round=invite.round), 3.5)
    msg(Update(device=invite.device, seq=3, model_id=spec.model_id, base_version=0, n_samples=1,
                         weights=np.zeros(spec.size, np.float32)), 4.0)
    actions += core.handle(TimerFired(now=9.0))
    events_s = time.process_time() - t0
    (record,) = [a.round for a in actions if isinstance(a, RecordSelectionRound)]
    (commit,) = [a.metadata for a in actions if isinstance(a, CommitVersion)]
    t0 = time.process_time()
    sizes = len(json.dumps(dict(commit)).encode()), len(json.dumps(dict(record)).encode())
    return (*sizes, events_s, time.process_time() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stale", type=non_negative_int, nargs="+", default=[0, 10_000, 100_000],
                        help="stale invitation counts, the first the baseline of the ratios (default 0 10000 100000)")
    counts = parser.parse_args().stale
    rows = {s: min((one_round(s) for _ in range(3)), key=lambda r: r[2]) for s in counts}
    base = rows[counts[0]]
    print(f"FedAvg core (digits), one round; stale invitations put into _invites; best of 3; ratios against {counts[0]}:")
    for s, (meta_b, rec_b, ev_s, dump_s) in rows.items():
        print(f"  stale {s:>7}: commit meta {meta_b:>10,} B ({meta_b / base[0]:7.1f}x)  record {rec_b:>10,} B ({rec_b / base[1]:7.1f}x)"
              f"  round's events {ev_s * 1e3:8.2f} ms ({ev_s / base[2]:6.1f}x)  dumps {dump_s * 1e3:7.2f} ms ({dump_s / max(base[3], 1e-9):6.1f}x)")


if __name__ == "__main__":
    main()
