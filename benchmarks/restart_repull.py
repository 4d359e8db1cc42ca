"""What a restart announcement's herd of re-pulls costs a selecting coordinator core (sans-IO).

A FedAvg core (digits, signed; rounds of 20 drawn once 100 wait: the first round is drawn early and
the other pulls are answered ``deferred``) takes N pulls from distinct devices: the baseline, their first pulls. A
core restarted on the same snapshot then takes the same N pulls again (same seqs, as a deferred
device re-sends after ``Recall.started``), first all at one instant (no device-side spread),
then spread over ``restart_spread_s`` (5 s, the device default). Printed: process-CPU µs per pull
(best of 3) and the ratios against the baseline; whatever the CPU, the herd's cost is N such
pulls, so 100,000 devices cost 10x the N = 10,000 line.

(With ``min_devices`` above the number waiting, FedAvg's plan sorts the whole deferred set on
every event (``sorted(view.deferred)`` before the count check): 60 µs per pull at N = 2,000,
175 µs at 10,000. Bounded in practice: past ``min_devices`` waiting a round opens and plan returns
before the sort.)

    .venv/bin/python benchmarks/restart_repull.py [--devices 10000]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import positive_int
from coordinator.core import CoordinatorConfig, CoordinatorCore, Snapshot
from coordinator.strategies import make_strategy
from edge_sdk.core.events import MessageReceived
from edge_sdk.signing import Signer
from edge_sdk.tasks import get_task
from edge_sdk.wire import topics
from edge_sdk.wire.codec import encode
from edge_sdk.wire.messages import Pull


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=positive_int, default=10_000,
                        help="devices that pull, each once, then again after the restart (default 10000)")
    n = parser.parse_args().devices
    spec = get_task("digits").spec
    cfg = CoordinatorConfig(region="bench", coordinator_id="c1", spec=spec, signer=Signer.generate(), max_devices=4 * n)
    snapshot = Snapshot(version=0, weights=np.zeros(spec.size, np.float32))
    payloads = [(topics.device_topic("bench", f"d{i}", "pull"), encode(Pull(device=f"d{i}", seq=1, model_id=spec.model_id)))
                for i in range(n)]

    def run(core: CoordinatorCore, start: float, spread_s: float) -> float:
        stamps = sorted(start + spread_s * random.Random(i).random() for i in range(n)) if spread_s else [start] * n
        events = [MessageReceived(now=t, topic=topic, payload=p) for t, (topic, p) in zip(stamps, payloads, strict=True)]
        t0 = time.process_time()
        for ev in events:
            core.handle(ev)
        took = (time.process_time() - t0) / n
        assert len(core.deferred) >= n - 20, len(core.deferred)  # (the round's 20 were invited)
        return took * 1e6

    def fresh() -> CoordinatorCore:
        core = CoordinatorCore(cfg, make_strategy("fedavg", select=20, min_devices=100), snapshot, rng=random.Random(0))
        core.start(0.0)
        return core

    first = min(run(fresh(), 1.0, 10.0) for _ in range(3))
    rows = []
    for label, spread in (("re-pulls at one instant", 0.0), ("re-pulls over 5 s", 5.0)):
        best = 1e9
        for _ in range(3):
            before = fresh()
            run(before, 1.0, 10.0)  # the devices it deferred; then the restart (a core on the same snapshot)
            best = min(best, run(fresh(), 100.0, spread))
        rows.append((label, best))
    print(f"{n} devices, FedAvg core (digits, signed), process CPU per pull, best of 3:")
    print(f"  first pulls (baseline)        {first:7.1f} µs   total {first * n / 1e6:.2f} s")
    for label, us in rows:
        print(f"  {label:<29} {us:7.1f} µs   total {us * n / 1e6:.2f} s   ratio {us / first:.2f}x baseline")


if __name__ == "__main__":
    main()
