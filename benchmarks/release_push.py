"""How soon does a fleet of idle devices predict with a new release, and how hard do they hit the coordinator?

A real coordinator daemon and mosquitto on 127.0.0.1, N idle SDK devices in this process
(``EdgeClient(durable=False)``, on-device inference by torch; they label nothing, so they never
pull to train) and one busy device whose update becomes release 1. Two fleets in one run, each
with a fresh broker and state dir:

* **pushed**: the devices' ``release_spread_s`` (``--spread``); the daemon announces the release on
  the region's retained recall (``release_announce_s`` 1 s here, 30 s by default) and each device
  fetches it at a random time within the spread;
* **refresh only** (the baseline, what every idle device did before): ``release_spread_s=None``,
  ``refresh_s`` = ``--refresh`` (3,600 s by default): the release reaches a device at its next refresh.

Printed per fleet: how many devices deployed release 1 within the wait (``--spread`` + 10 s), the
times after the release at which 50 / 90 / 100 % had it, the serving pulls the coordinator answered
meanwhile (one per device is the floor) and the busiest second of them. The ratio line: the share of
the fleet on the release at the end of the wait, pushed over refresh only.

    .venv/bin/python benchmarks/release_push.py [--devices 300] [--spread 30] [--refresh 3600]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import positive_float, positive_int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=positive_int, default=300, help="idle devices (default %(default)s)")
    p.add_argument("--spread", type=positive_float, default=30.0, help="the pushed fleet's release_spread_s (default %(default)s)")
    p.add_argument("--refresh", type=positive_float, default=3600.0,
                   help="the baseline fleet's refresh_s (default %(default)s, the SDK's)")
    return p.parse_args(argv)


def fleet(n: int, *, spread: float | None, refresh: float | None, wait_s: float) -> dict[str, Any]:
    """One fleet on its own broker and daemon: times (s after release 1) at which each idle device deployed it."""
    from coordinator.broker import MosquittoProcess
    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
    from edge_sdk.client import EdgeClient
    from edge_sdk.tasks import get_task
    from edge_sdk.tasks.base import TrainConfig

    task = get_task("digits")
    pool = task.data().pool
    with tempfile.TemporaryDirectory() as tmp:
        broker = MosquittoProcess().start()
        daemon = CoordinatorDaemon(CoordinatorOptions(require_pull=False, broker=broker.url, region="bench", state_dir=Path(tmp) / "c",
                                                      strategy_params={"k": 1, "timeout_s": 5.0}, release_announce_s=1.0),
                                   task=task).start()
        common: dict[str, Any] = {"broker": broker.url, "region": "bench", "task": task, "train": TrainConfig(epochs=1),
                                  "request_timeout_s": 5.0, "inference": "torch", "durable": False}
        idle: list[Any] = []
        busy = None
        try:
            for i in range(n):
                idle.append(EdgeClient(device_id=f"idle-{i:05d}", min_samples=10**6, release_spread_s=spread, refresh_s=refresh,
                                       seed=i, **common).start())
            deadline = time.monotonic() + 120
            while any(c.version is None for c in idle) and time.monotonic() < deadline:
                time.sleep(0.1)
            busy = EdgeClient(device_id="busy", min_samples=2, release_spread_s=None, refresh_s=None, **common).start()
            for i in range(2):
                busy.add_sample(pool.x[i], int(pool.y[i]))
            while daemon.core.release[0] < 1:
                time.sleep(0.02)
            released = time.monotonic()
            serving = daemon.core.counters["pulls_serving"]
            per_second: Counter[int] = Counter()
            got: dict[int, float] = {}
            while len(got) < n and time.monotonic() - released < wait_s:
                now = time.monotonic() - released
                for i, c in enumerate(idle):
                    if i not in got and (c.version or 0) >= 1:
                        got[i] = now
                count = daemon.core.counters["pulls_serving"]
                per_second[int(now)] += count - serving
                serving = count
                time.sleep(0.05)
            pulls = sum(per_second.values())
            return {"times": sorted(got.values()), "pulls": pulls, "busiest": max(per_second.values(), default=0)}
        finally:
            for c in [*idle, *([busy] if busy is not None else [])]:
                c.stop()
            daemon.stop()
            broker.stop()


def share_at(times: list[float], n: int, q: float) -> str:
    """When the fleet's share q had the release (``-`` if it never did within the wait)."""
    k = int(q * n + 0.999999) - 1
    return f"{times[k]:.1f} s" if 0 <= k < len(times) else "-"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wait = args.spread + 10.0
    rows = []
    for name, spread, refresh in (("pushed", args.spread, None), ("refresh only", None, args.refresh)):
        r = fleet(args.devices, spread=spread, refresh=refresh, wait_s=wait)
        rows.append((name, r))
        print(f"{name:>13}: {len(r['times'])}/{args.devices} on release 1 within {wait:.0f} s; 50 % at {share_at(r['times'], args.devices, 0.5)}, "
              f"90 % at {share_at(r['times'], args.devices, 0.9)}, all at {share_at(r['times'], args.devices, 1.0)}; "
              f"serving pulls {r['pulls']} (busiest second {r['busiest']})", flush=True)
    pushed, base = (len(r["times"]) / args.devices for _, r in rows)
    ratio = f"{pushed / base:.1f}×" if base else "∞ (none of the baseline fleet had it)"
    print(f"share on the new release after {wait:.0f} s: pushed {pushed:.0%}, refresh only {base:.0%} — ratio {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
