"""The training plumbing every fleet driver shares: one seed formula; the hints rule is the
device SDK's own (:func:`edge_sdk.tasks.base.train_config`), so emulated devices train as real ones."""

from __future__ import annotations

from edge_sdk.tasks.base import train_config

__all__ = ["job_seed", "train_config"]


def job_seed(run_seed: int, device_index: int, job_id: int) -> int:
    """The seed of one local update: distinct per run, device and job, stable across drivers."""
    return (run_seed * 1_000_003 + device_index * 10_007 + job_id) % (2**31)
