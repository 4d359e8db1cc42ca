"""CPU per served digits pull in the coordinator core, this tree against an older commit.

Both trees run the same measurement (below) in their own subprocess: a fresh
``CoordinatorCore`` (SPIN, digits model; signing on where the tree has it) handles 5,000
pulls from distinct devices arriving 0.1 ms apart; the best of 3 process-CPU times per
pull is printed, and the baseline / this tree ratio. The baseline is checked out with ``git
worktree`` (default: the last commit before wire v2, ``6260b18``) into a temporary folder and
removed afterwards.

    .venv/bin/python benchmarks/pull_cpu.py [--baseline REV]

Issue 13's alternative target: the coordinator's CPU per served pull at least halved
against the code before this wave (the broker and the load generators are not in it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._cli import baseline_tree, git_commit  # noqa: E402

MEASURE = r'''
import random, sys, time
import numpy as np
from coordinator.core import CoordinatorConfig, CoordinatorCore, Snapshot
from coordinator.strategies import make_strategy
from edge_sdk.core.events import MessageReceived
from edge_sdk.tasks import get_task
from edge_sdk.wire import topics
from edge_sdk.wire.codec import encode
from edge_sdk.wire.messages import Pull
kw = {}
if "signer" in CoordinatorConfig.__dataclass_fields__:
    from edge_sdk.signing import Signer
    kw["signer"] = Signer.generate()
spec = get_task("digits").spec
cfg = CoordinatorConfig(region="bench", coordinator_id="c1", spec=spec, **kw)
n = 5000
evs = [MessageReceived(now=1.0 + i * 1e-4, topic=topics.device_topic("bench", f"d{i}", "pull"),
                       payload=encode(Pull(device=f"d{i}", seq=0, model_id=spec.model_id))) for i in range(n)]
best = 1e9
for _ in range(3):
    core = CoordinatorCore(cfg, make_strategy("spin", k=10, timeout_s=None),
                           Snapshot(version=0, weights=np.zeros(spec.size, np.float32)), rng=random.Random(0))
    t = time.process_time()
    for ev in evs:
        core.handle(ev)
    best = min(best, (time.process_time() - t) / n)
print(best * 1e6)
'''


def measure(tree: Path, name: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE], cwd=tree, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"the measurement failed in {name}:\n{out.stderr.strip()[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=git_commit(ROOT), default="6260b18",
                    help="git revision (a commit of this repository) to compare against (default 6260b18)")
    args = ap.parse_args()
    with baseline_tree(ROOT, args.baseline) as base:
        old = measure(base, f"the baseline {args.baseline[:12]}")
    new = measure(ROOT, "this tree")
    print(f"CPU per served digits pull in the core: baseline {args.baseline[:12]} {old:.1f} us, this tree {new:.1f} us "
          f"-> {old / new:.2f}x less")


if __name__ == "__main__":
    main()
