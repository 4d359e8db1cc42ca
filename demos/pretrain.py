"""``edgeci pretrain`` — make the deployed model file (no downloads: the task's public split)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_sdk.modelio import save_model
from edge_sdk.tasks import get_task


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", help="task / model")
    p.add_argument("--out", type=Path, default=Path("deployed.npz"), help="output model file (.npz)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    task = get_task(args.model)
    weights = task.pretrained(seed=args.seed)
    metrics = task.evaluate(weights)
    save_model(args.out, task.spec, weights, {"version": 0, "task": task.name, "seed": args.seed, **metrics})
    print(f"{task.spec.model_id}: {task.spec.size} parameters, held-out accuracy {100 * metrics['accuracy']:.1f}% → {args.out}")
    return 0
