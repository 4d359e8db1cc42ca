"""Put on a child's PYTHONPATH by ``tests/soak_measure.py --tracemalloc``: with
``EDGECI_SOAK_TRACEMALLOC=DIR`` set, trace allocations from the interpreter's start and dump a
snapshot to ``DIR/NNN.snap`` every ``EDGECI_SOAK_TRACEMALLOC_EVERY`` s (default 60), so the soak
can say which lines hold what a long-running coordinator grew (no signal: the coordinator's CLI
owns its signal handlers and their wakeup fd)."""

from __future__ import annotations

import os
import threading
import tracemalloc
from pathlib import Path


def _dump_every(folder: Path, every_s: float) -> None:
    n = 0
    stop = threading.Event()
    while not stop.wait(every_s):
        tmp = folder / f"{n:03d}.snap.tmp"
        tracemalloc.take_snapshot().dump(str(tmp))
        tmp.rename(folder / f"{n:03d}.snap")  # (the soak reads only complete snapshots)
        n += 1


_folder = os.environ.get("EDGECI_SOAK_TRACEMALLOC")
if _folder:
    tracemalloc.start(int(os.environ.get("EDGECI_SOAK_TRACEMALLOC_FRAMES", "1")))
    threading.Thread(target=_dump_every, args=(Path(_folder), float(os.environ.get("EDGECI_SOAK_TRACEMALLOC_EVERY", "60"))),
                     name="soak-tracemalloc", daemon=True).start()
