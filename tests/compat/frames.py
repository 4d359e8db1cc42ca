"""Shared by both sides of the cross-version wire check (:mod:`tests.test_sdk_compat`): sample
messages as JSON-able keyword arguments, and a summary of a decoded message that both versions
compute the same way. Imports no edgeci code: the old side loads it next to ``old_side.py``."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

WEIGHTS = [round(0.1 * i - 0.45, 6) for i in range(10)]
"""Every sample's tensor (float32 on the wire)."""

_OLDEST: dict[str, dict[str, Any]] = {
    "pull": {"device": "dev1", "seq": 7, "model_id": "digits-cnn", "have_version": 3, "n_samples": 12, "invite_round": 2,
             "serve": True, "canary": 5},
    "model": {"model_id": "digits-cnn", "version": 4, "reply_to": 7, "weights": WEIGHTS, "group": "head",
              "train_group": "head", "spec_fingerprint": "ab12",
              "hints": {"lr": 0.05}, "release": 3},
    "update": {"device": "dev1", "seq": 8, "model_id": "digits-cnn", "base_version": 4, "n_samples": 12,
               "weights": WEIGHTS, "group": "head", "loss": 0.5, "train_seconds": 1.5, "nonce": 99},
    "ack": {"device": "dev1", "seq": 8, "status": "accepted", "version": 5, "reason": "", "nonce": 99, "watermark": 8},
    "invite": {"device": "dev1", "round": 2, "version": 4},
    "status": {"region": "r1", "coordinator": "c1", "version": 5, "updates_accepted": 10, "updates_rejected": 1,
               "updates_duplicate": 2, "devices_seen": 4, "buffered": 1, "strategy": "spin", "extra": {"k": 10}},
    "peer": {"sender": "c2", "kind": "model", "body": {"version": 4, "age": 2}, "weights": WEIGHTS},
    "control": {"command": "pin", "operator": "ops", "issued_at": 1796688000.5, "nonce": 12345, "version": 3},
    "canary": {"device": "dev1", "candidate": 5, "release": 4, "samples": 20, "deadline_s": 120.0},
    "canary_report": {"device": "dev1", "candidate": 5, "release": 4, "both_right": 15, "only_candidate": 2,
                      "only_release": 1, "both_wrong": 2},
}
_ADDED: dict[str, dict[str, Any]] = {
    "pull": {"epoch": 9},
    "model": {"epoch": 9, "full_sync": 2},
    "update": {"epoch": 9},
    "control": {"force": True},
    "canary": {"epoch": 9, "nonce": 77},
    "canary_report": {"nonce": 77},
    "recall": {"model_id": "digits-cnn", "release": 4, "abandoned": [5, 6], "epoch": 9, "started": 1796688000,
               "spread_s": 300},
}

VALUES: dict[str, dict[str, Any]] = {name: {**_OLDEST.get(name, {}), **_ADDED.get(name, {})} for name in {*_OLDEST, *_ADDED}}
"""A value for every field of every message type today (the oldest v3 SDK's fields, then those added
since), each other than the field's default, so a field dropped in transit shows. Each side builds a
message from the fields its version has."""

TOPICS: dict[str, str] = {
    "pull": "edgeci/v1/r1/dev/dev1/pull", "model": "edgeci/v1/r1/dev/dev1/model", "update": "edgeci/v1/r1/dev/dev1/update",
    "ack": "edgeci/v1/r1/dev/dev1/ack", "invite": "edgeci/v1/r1/dev/dev1/invite", "status": "edgeci/v1/r1/status",
    "peer": "edgeci/v1/peer/c1/model", "control": "edgeci/v1/r1/control", "canary": "edgeci/v1/r1/dev/dev1/invite",
    "canary_report": "edgeci/v1/r1/dev/dev1/update", "recall": "edgeci/v1/r1/recall",
}
"""Where each is published (the signing scope a signature binds is taken from it)."""


def build(cls: type, kwargs: dict[str, Any], only: list[str] | None = None) -> Any:
    """``cls(**kwargs)`` with the JSON forms turned back (lists of floats into float32 arrays, lists of
    ints into tuples), leaving out the fields not in ``only`` when given."""
    args = {}
    for k, v in kwargs.items():
        if only is not None and k not in only:
            continue
        if k == "weights":
            v = np.asarray(v, np.float32)
        elif isinstance(v, list):
            v = tuple(v)
        args[k] = v
    return cls(**args)


def digest(weights: Any) -> str:
    """sha256 of a model's float32 bytes: how both sides compare weights."""
    return hashlib.sha256(np.asarray(weights, np.float32).tobytes()).hexdigest()


def summary(msg: Any) -> dict[str, Any]:
    """A decoded message as JSON: its type and each field, tensors as dtype, shape and a digest of their float32 bytes."""
    out: dict[str, Any] = {"type": msg.TYPE}
    for f in dataclasses.fields(msg):
        v = getattr(msg, f.name)
        if isinstance(v, np.ndarray):
            v = {"shape": list(v.shape), "sha256": digest(v)}
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out
