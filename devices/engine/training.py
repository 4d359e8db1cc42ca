"""The training plumbing every fleet driver shares: one seed formula, one hints rule."""

from __future__ import annotations

from collections.abc import Mapping

from edge_sdk.tasks.base import TrainConfig

__all__ = ["job_seed", "train_config"]


def job_seed(run_seed: int, device_index: int, job_id: int) -> int:
    """The seed of one local update: distinct per run, device and job, stable across drivers."""
    return (run_seed * 1_000_003 + device_index * 10_007 + job_id) % (2**31)


def train_config(hints: Mapping[str, float], defaults: TrainConfig, *, seed: int, group: str) -> TrainConfig:
    """Hyper-parameters for a job: the coordinator's hints, else the scenario's defaults."""
    return TrainConfig(
        epochs=int(hints.get("epochs", defaults.epochs)),
        batch_size=int(hints.get("batch_size", defaults.batch_size)),
        lr=float(hints.get("lr", defaults.lr)),
        mu=float(hints.get("mu", defaults.mu)),
        seed=seed,
        group=group,
    )
