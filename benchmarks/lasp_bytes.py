"""LASP: bytes per calibration (classifier-only) round vs per full round, as a ratio.

For one device, a round moves one ``ModelMsg`` down and one ``Update`` up. Both are really
encoded with :func:`edge_sdk.wire.codec.encode` (msgpack + raw tensor bytes), once with
the whole vector (full sync) and once with only the ``classifier`` slice (calibration
round), for

* the digits CNN (``DigitsTask``: conv-conv-pool-fc extractor | 32→10 linear head), and
* a ResNet-18-sized extractor (torchvision ``resnet18(weights=None)`` with its ``fc``
  removed, 512-d features) with a 512→10 linear head, laid out by
  :func:`edge_sdk.torchbridge.spec_from_module` (BatchNorm running statistics are part
  of the vector, so they count).

``--coordinator`` also drives a real :class:`~coordinator.core.CoordinatorCore` with
``full_sync_every = T`` for ``--versions`` synchronous one-device rounds and reads
``bytes_in`` + ``bytes_out`` from its status, against the same run with LASP off.

    .venv/bin/python benchmarks/lasp_bytes.py [--encoding f4] [--coordinator --versions 10 -T 5]
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from coordinator.core import CoordinatorConfig, CoordinatorCore, Snapshot
from coordinator.strategies import make_strategy
from edge_sdk.core.events import MessageReceived, Publish
from edge_sdk.spec import FULL, ModelSpec, Vector
from edge_sdk.tasks.digits import DigitsTask
from edge_sdk.torchbridge import module_to_vector, spec_from_module, top_level_group
from edge_sdk.trainer import SplitModel, seeded
from edge_sdk.wire import topics
from edge_sdk.wire.codec import Encoding, decode, encode
from edge_sdk.wire.messages import ModelMsg, Pull, Update

GROUP = "classifier"


@dataclass(frozen=True, slots=True)
class RoundBytes:
    model: str
    params_full: int
    params_classifier: int
    full_bytes: int
    calibration_bytes: int

    @property
    def ratio(self) -> float:
        return self.calibration_bytes / self.full_bytes


def resnet18_split(n_classes: int = 10) -> SplitModel:
    """torchvision's ResNet-18 (random init, nothing downloaded) as extractor | head."""
    import torchvision

    backbone = torchvision.models.resnet18(weights=None)
    features = backbone.fc.in_features
    backbone.fc = nn.Identity()
    return SplitModel(backbone, nn.Linear(features, n_classes))


def one_round_bytes(spec: ModelSpec, weights: Vector, group: str, encoding: Encoding) -> int:
    """Encoded size of the model a device receives plus the update it sends, for ``group``."""
    part = np.ascontiguousarray(weights[spec.group_slice(group)])
    down = ModelMsg(
        model_id=spec.model_id,
        version=7,
        reply_to=3,
        weights=part,
        group=group,
        spec_fingerprint=spec.fingerprint,
        hints={"epochs": 2.0, "batch_size": 16.0, "lr": 0.05},
    )
    up = Update(
        device="device-0001",
        seq=4,
        model_id=spec.model_id,
        base_version=7,
        n_samples=50,
        weights=part,
        group=group,
        loss=0.5,
        train_seconds=1.0,
    )
    return len(encode(down, encoding=encoding)) + len(encode(up, encoding=encoding))


def measure(name: str, spec: ModelSpec, weights: Vector, encoding: Encoding) -> RoundBytes:
    return RoundBytes(
        model=name,
        params_full=spec.size,
        params_classifier=spec.group_size(GROUP),
        full_bytes=one_round_bytes(spec, weights, FULL, encoding),
        calibration_bytes=one_round_bytes(spec, weights, GROUP, encoding),
    )


def coordinator_bytes(spec: ModelSpec, weights: Vector, *, versions: int, every: int) -> int:
    """bytes_in + bytes_out of a real CoordinatorCore after ``versions`` one-device rounds
    (pull → model → update → commit); ``every = 0`` disables LASP."""
    cfg = CoordinatorConfig(region="bench", coordinator_id="c1", spec=spec, full_sync_every=every)
    core = CoordinatorCore(
        cfg,
        make_strategy("spin", k=1, timeout_s=None),
        Snapshot(version=0, weights=weights),
        rng=random.Random(0),
    )
    have, seq, local = -1, 0, np.array(weights, copy=True)
    for _ in range(versions):
        pull = Pull(device="d1", seq=seq, model_id=spec.model_id, have_version=have)
        acts = core.handle(
            MessageReceived(
                now=0.0, topic=topics.device_topic("bench", "d1", "pull"), payload=encode(pull)
            )
        )
        (payload,) = [
            a.payload for a in acts if isinstance(a, Publish) and a.topic.endswith("/model")
        ]
        msg = decode(payload)
        assert isinstance(msg, ModelMsg)
        local[spec.group_slice(msg.group)] = msg.weights
        have = msg.version
        update = Update(
            device="d1",
            seq=seq + 1,
            model_id=spec.model_id,
            base_version=msg.version,
            n_samples=10,
            weights=np.ascontiguousarray(local[spec.group_slice(msg.group)]),
            group=msg.group,
        )
        seq += 2
        core.handle(
            MessageReceived(
                now=0.0, topic=topics.device_topic("bench", "d1", "update"), payload=encode(update)
            )
        )
    extra = core.status().extra
    return int(extra["bytes_in"] + extra["bytes_out"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--encoding", choices=["f4", "f2", "i1"], default="f4")
    parser.add_argument("--coordinator", action="store_true", help="also drive CoordinatorCore")
    parser.add_argument("--versions", type=int, default=10)
    parser.add_argument("-T", "--full-sync-every", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    digits = DigitsTask(device="cpu")
    models: list[tuple[str, ModelSpec, Vector]] = [
        ("digits CNN", digits.spec, digits.initial_weights(seed=0)),
    ]
    with seeded(0):
        resnet = resnet18_split(10)
    rspec = spec_from_module(resnet, "resnet18-10", top_level_group)
    models.append(("ResNet-18 + 10-class head", rspec, module_to_vector(resnet, rspec)))

    print(f"one device, one round = ModelMsg down + Update up, encoding {args.encoding}\n")
    print(
        f"{'model':<27} {'params':>11} {'head':>6} {'full round B':>14} "
        f"{'calib round B':>14} {'calib/full':>11} {'full/calib':>11}"
    )
    for name, spec, weights in models:
        r = measure(name, spec, weights, args.encoding)
        print(
            f"{r.model:<27} {r.params_full:>11,} {r.params_classifier:>6,} {r.full_bytes:>14,} "
            f"{r.calibration_bytes:>14,} {r.ratio:>11.6f} {1 / r.ratio:>10.0f}x"
        )

    if args.coordinator:
        t, n = args.full_sync_every, args.versions
        print(f"\nCoordinatorCore, {n} one-device rounds: bytes_in + bytes_out from its status")
        print(
            "(ideal: only the full-sync versions move the whole vector, both ways; the device\n"
            " trains and sends the group of the model message, as DeviceCore does)"
        )
        print(
            f"{'model':<27} {'LASP off B':>14} {f'LASP T={t} B':>14} {'ratio':>8} "
            f"{'ideal B':>14} {'ideal ratio':>12}"
        )
        n_full = n // t
        for name, spec, weights in models:
            r = measure(name, spec, weights, args.encoding)
            off = coordinator_bytes(spec, weights, versions=n, every=0)
            on = coordinator_bytes(spec, weights, versions=n, every=t)
            ideal = n_full * r.full_bytes + (n - n_full) * r.calibration_bytes
            print(
                f"{name:<27} {off:>14,} {on:>14,} {on / off:>8.3f} {ideal:>14,} "
                f"{ideal / (n * r.full_bytes):>12.3f}"
            )


if __name__ == "__main__":
    main()
