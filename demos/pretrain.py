"""``edgeci pretrain`` — make the deployed model file (no downloads: the task's public split)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from coordinator.config import bounded, task_arg
from edge_sdk.errors import ConfigError
from edge_sdk.modelio import save_model
from edge_sdk.tasks import get_task
from edge_sdk.tasks.registry import TASK_INFO


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", type=task_arg, help=f"task / model: {', '.join(TASK_INFO)}, or an app's own as package.module:Name (on PYTHONPATH) or an "
                   "edgeci.tasks entry point")
    p.add_argument("--out", type=Path, default=Path("deployed.npz"),
                   help="output model file (.npz), in a directory that exists; an existing file is replaced")
    p.add_argument("--seed", type=bounded(int, 0), default=0, help="random seed of the pretraining (default: 0)")


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written before the seconds of pretraining: a
    directory, a parent that is missing (not created: a typo would make directories
    anywhere) or not a directory, or one we cannot create files in."""
    parent = out.parent
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory: give a file name, e.g. {out / 'deployed.npz'}")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist (create it first)"
        raise ConfigError(f"cannot write --out {out}: {parent} {what}")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write --out {out}: cannot create a file in {parent} ({exc.strerror or exc})") from exc


def run(args: argparse.Namespace) -> int:
    task = get_task(args.model)
    check_out(args.out)
    # (stderr, whatever the log level: a detector's first pretraining of a seed takes minutes)
    print(f"pretraining {task.spec.model_id} (seed {args.seed}) on the task's pretraining split, or loading its cached "
          "result...", file=sys.stderr, flush=True)
    weights = task.pretrained(seed=args.seed)
    metrics = task.evaluate(weights)
    try:
        save_model(args.out, task.spec, weights, {"version": 0, "task": task.name, "seed": args.seed, **metrics})
    except OSError as exc:  # e.g. the disk filled up while the model was pretrained
        raise ConfigError(f"cannot write --out {args.out}: {exc.strerror or exc}") from exc
    score = "mAP50" if "mAP50" in metrics else "accuracy"  # (a detector reports mAP50 under "accuracy" too)
    print(f"{task.spec.model_id}: {task.spec.size} parameters, held-out {score} {100 * metrics[score]:.1f}% → {args.out}")
    return 0
