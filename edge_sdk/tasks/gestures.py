"""Procedural touch/air gestures: 8 classes of 2-D strokes drawn by users with a style.

Each sample is a (T, 4) float32 sequence of pen position and velocity ``(x, y, vx, vy)``.
A class is a canonical path; a *user* draws it with a personal style (speed profile,
scale, rotation, offset, tremor, sensor noise) seeded from the user id, and every sample
adds its own small variation. So the data are non-IID across users the way real
on-device labels are, and a model pretrained on a few users has headroom on the rest.
Nothing is downloaded; the same (user, seed) always gives the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from edge_sdk._extras import missing

try:
    import torch
    from torch import nn
except ImportError as exc:  # declared without torch in edge_sdk.tasks.registry
    raise missing("torch", "train", purpose="the gestures model", cause=exc) from exc

from edge_sdk.errors import ConfigError
from edge_sdk.tasks.base import TaskData, TrainConfig
from edge_sdk.trainer import ClassifierTask, SplitModel, stratified_split, take

__all__ = [
    "GESTURES",
    "GestureTask",
    "UserStyle",
    "gesture_path",
    "make_gestures",
    "user_style",
]

GESTURES: tuple[str, ...] = (
    "swipe_left",
    "swipe_right",
    "swipe_up",
    "swipe_down",
    "circle_cw",
    "circle_ccw",
    "zigzag",
    "check_mark",
)
LENGTH = 32
CHANNELS = 4
VELOCITY_GAIN = 8.0
"""Velocities are per-step differences × this gain, so they are O(1) like positions."""
_STYLE_STREAM = 0x57_1E
_DATA_SEED = 20_240_601


@dataclass(frozen=True, slots=True, kw_only=True)
class UserStyle:
    """How one user draws: applied on top of every canonical path they trace."""

    speed: float
    """Time-warp exponent γ (progress = u**γ): < 1 starts fast, > 1 starts slow."""
    scale: float
    rotation: float
    """Radians, within ±35° (each sample adds ~10° more): a rotated swipe mostly stays
    nearer its own direction than a neighbour's; the rare overlap is part of why even a
    well-trained model stays near 95 %."""
    offset: tuple[float, float]
    lead_in: float
    """Fraction of the window before the stroke starts (the pen rests meanwhile)."""
    duration: float
    """Fraction of the window the stroke takes."""
    tremor: float
    noise: float


def user_style(user_id: int) -> UserStyle:
    """The drawing style of ``user_id`` (deterministic, independent of any other seed)."""
    if user_id < 0:
        raise ConfigError(f"user_id must be >= 0, got {user_id}")
    rng = np.random.default_rng([_STYLE_STREAM, user_id])
    lead_in = float(rng.uniform(0.0, 0.2))
    return UserStyle(
        speed=float(np.exp(rng.uniform(np.log(0.6), np.log(1.7)))),
        scale=float(rng.uniform(0.6, 1.3)),
        rotation=float(np.deg2rad(rng.uniform(-35.0, 35.0))),
        offset=(float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.3, 0.3))),
        lead_in=lead_in,
        duration=float(rng.uniform(0.55, 1.0 - lead_in)),
        tremor=float(rng.uniform(0.0, 0.12)),
        noise=float(rng.uniform(0.03, 0.12)),
    )


def gesture_path(label: int, progress: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Canonical position (len(progress), 2) of gesture ``label`` at ``progress`` ∈ [0, 1]."""
    s = np.clip(progress, 0.0, 1.0)
    name = GESTURES[label]
    if name in ("swipe_left", "swipe_right", "swipe_up", "swipe_down"):
        along = -0.8 + 1.6 * s
        bow = 0.1 * np.sin(np.pi * s)  # real swipes arc slightly
        if name == "swipe_left":
            return np.stack([-along, bow], axis=1)
        if name == "swipe_right":
            return np.stack([along, bow], axis=1)
        if name == "swipe_up":
            return np.stack([bow, along], axis=1)
        return np.stack([bow, -along], axis=1)
    if name in ("circle_cw", "circle_ccw"):
        sign = -1.0 if name == "circle_cw" else 1.0
        theta = np.pi / 2 + sign * 2 * np.pi * s
        return 0.7 * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    if name == "zigzag":
        triangle = 2 * np.abs(2 * ((2 * s + 0.25) % 1.0) - 1) - 1  # two full periods
        return np.stack([-0.8 + 1.6 * s, 0.5 * triangle], axis=1)
    # check_mark: a short stroke down-right, then a long one up-right.
    knots_s = np.array([0.0, 0.3, 1.0])
    return np.stack(
        [np.interp(s, knots_s, [-0.6, -0.2, 0.7]), np.interp(s, knots_s, [0.1, -0.5, 0.7])], axis=1
    )


def _draw(
    label: int, style: UserStyle, rng: np.random.Generator, length: int
) -> npt.NDArray[np.float32]:
    # Per-sample variation around the user's style.
    lead_in = np.clip(style.lead_in + rng.normal(0, 0.04), 0.0, 0.3)
    duration = np.clip(style.duration * rng.uniform(0.85, 1.15), 0.35, 1.0 - lead_in)
    u = (np.linspace(0.0, 1.0, length) - lead_in) / duration
    progress = np.clip(u, 0.0, 1.0) ** (style.speed * rng.uniform(0.85, 1.15))
    pos = gesture_path(label, progress)

    angle = style.rotation + np.deg2rad(rng.normal(0, 10.0))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pos = (pos @ rot.T) * style.scale * rng.uniform(0.9, 1.1)
    pos += np.asarray(style.offset) + rng.normal(0, 0.05, size=2)
    t = np.arange(length)[:, None]
    pos += style.tremor * np.sin(
        2 * np.pi * t / rng.uniform(4, 8, size=2) + rng.uniform(0, 2 * np.pi, size=2)
    )
    pos += np.cumsum(rng.normal(0, style.noise / 3, size=(length, 2)), axis=0)  # sensor drift
    pos += rng.normal(0, style.noise, size=(length, 2))

    vel = np.diff(pos, axis=0, prepend=pos[:1]) * VELOCITY_GAIN
    return np.concatenate([pos, vel], axis=1).astype(np.float32)


def make_gestures(
    labels: Sequence[int] | npt.NDArray[np.integer[Any]],
    *,
    user_id: int,
    seed: int = 0,
    length: int = LENGTH,
) -> npt.NDArray[np.float32]:
    """Samples (N, length, 4) of ``labels`` drawn by ``user_id``; deterministic in
    (labels, user_id, seed, length)."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= len(GESTURES))):
        raise ConfigError(f"labels must be a 1-D sequence in [0, {len(GESTURES)})")
    if length < 8:
        raise ConfigError(f"length must be >= 8, got {length}")
    if user_id < 0 or seed < 0:
        raise ConfigError(f"user_id and seed must be >= 0, got {user_id} and {seed}")
    style = user_style(user_id)
    rng = np.random.default_rng([seed, user_id])
    out = np.empty((labels.shape[0], length, CHANNELS), dtype=np.float32)
    for i, label in enumerate(labels):
        out[i] = _draw(int(label), style, rng, length)
    return out


class _ChannelsFirst(nn.Module):
    """(N, T, C) sequences → (N, C, T) for Conv1d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class GestureTask(ClassifierTask):
    """8 gesture classes over (32, 4) sequences with a small 1-D CNN.

    The data come from ``n_users`` users; the pretrain/pool/test split is the same
    stratified scheme as digits, and :meth:`users` says who drew each sample (for per-user
    device partitions).
    """

    name: str = "gestures"
    model_id: ClassVar[str] = "gesture-cnn1d"
    input_shape: ClassVar[tuple[int, ...]] = (LENGTH, CHANNELS)
    n_classes: ClassVar[int] = len(GESTURES)
    class_names: ClassVar[tuple[str, ...]] = GESTURES
    feature_dim: ClassVar[int] = 32
    n_users: ClassVar[int] = 50
    per_user_per_class: ClassVar[int] = 5
    pretrain_per_class: ClassVar[int] = 4
    n_test: ClassVar[int] = 400
    pretrain_config: ClassVar[TrainConfig] = TrainConfig(epochs=20, batch_size=8, lr=0.02)

    def __init__(self, *, device: str | torch.device | None = None) -> None:
        super().__init__(device=device)
        self._users: dict[str, npt.NDArray[np.int64]] = {}

    def build_module(self) -> SplitModel:
        extractor = nn.Sequential(
            _ChannelsFirst(),
            nn.Conv1d(CHANNELS, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Flatten(),
            nn.Linear(32 * (LENGTH // 4), self.feature_dim),
            nn.ReLU(),
        )
        return SplitModel(extractor, nn.Linear(self.feature_dim, self.n_classes))

    def users(self, part: str) -> npt.NDArray[np.int64]:
        """The user id behind each sample of ``data().<part>`` (pretrain, pool or test)."""
        self.data()
        try:
            return self._users[part].copy()
        except KeyError:
            raise ConfigError(f"no split {part!r}; use pretrain, pool or test") from None

    def _make_data(self) -> TaskData:
        per_user = np.repeat(np.arange(self.n_classes), self.per_user_per_class)
        xs, ys, us = [], [], []
        for user in range(self.n_users):
            xs.append(make_gestures(per_user, user_id=user, seed=_DATA_SEED))
            ys.append(per_user)
            us.append(np.full(per_user.shape[0], user, dtype=np.int64))
        x, y, u = np.concatenate(xs), np.concatenate(ys).astype(np.int64), np.concatenate(us)
        pretrain, pool, test = stratified_split(
            y, n_test=self.n_test, pretrain_per_class=self.pretrain_per_class, seed=_DATA_SEED
        )
        self._users = {"pretrain": u[pretrain], "pool": u[pool], "test": u[test]}
        return TaskData(
            pretrain=take(x, y, pretrain),
            pool=take(x, y, pool),
            test=take(x, y, test),
            n_classes=self.n_classes,
        )
