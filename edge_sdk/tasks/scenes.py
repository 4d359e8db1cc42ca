"""Procedural detection scenes: coloured shapes on cluttered backgrounds, with exact boxes.

The detection task needs data it can make without any download: to pretrain the
deployed detector on the *known* classes, and to emulate users boxing a *new* class
the deployed detector never saw (SPIN's headline scenario). Each scene is an RGB
``uint8`` image with 0..n objects of :data:`CLASS_NAMES`; every object has its own
colour/size/rotation jitter, objects never overlap, and each box is the exact pixel
extent of the drawn shape (``x2``/``y2`` are exclusive pixel edges).

Boxes are one ``(k, 5)`` float32 array per image, columns ``class, x1, y1, x2, y2`` in
pixels — the layout the detection task's ``local_update`` takes from the sample store.
Scene ``i`` of a set depends only on ``(seed, i)``, so sets are reproducible and any
prefix of a larger set equals the smaller set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_sdk._extras import missing

try:
    import cv2
except ImportError as exc:
    raise missing("cv2", "detection", purpose="drawing detection scenes", cause=exc) from exc

from edge_sdk.errors import ConfigError

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
KNOWN_CLASSES: tuple[int, ...] = (0, 1, 2, 3)
"""Classes the deployed detector is pretrained on."""
NEW_CLASS: int = 4
"""The class users start labelling after deployment (``star``)."""

# Base hue (OpenCV's 0..179 scale) per class; jitter keeps colour a cue, not a giveaway.
_BASE_HUE: tuple[int, ...] = (0, 110, 60, 25, 150)
_HUE_JITTER = 8

Image = npt.NDArray[np.uint8]
Boxes = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True, kw_only=True)
class SceneConfig:
    """How scenes look: image side, which classes appear, how many objects, how big."""

    size: int = 96
    classes: tuple[int, ...] = KNOWN_CLASSES
    required: tuple[int, ...] = ()
    """Classes that appear at least once in every scene (e.g. the new class)."""
    min_objects: int = 1
    max_objects: int = 3
    min_object_frac: float = 0.18
    """Smallest object side as a fraction of the image side."""
    max_object_frac: float = 0.38
    clutter: int = 5
    """Distractor strokes and blobs drawn under the objects."""
    noise: float = 6.0
    """Std of the additive pixel noise (0..255 scale)."""

    def __post_init__(self) -> None:
        if not 32 <= self.size <= 2048:
            raise ConfigError(f"scene size must be in 32..2048, got {self.size}")
        if not self.classes or any(not 0 <= c < len(CLASS_NAMES) for c in self.classes):
            raise ConfigError(f"classes must be non-empty indices into {CLASS_NAMES}")
        if any(c not in self.classes for c in self.required):
            raise ConfigError("every required class must be in classes")
        if not 0 <= self.min_objects <= self.max_objects:
            raise ConfigError("need 0 <= min_objects <= max_objects")
        if len(self.required) > self.max_objects:
            raise ConfigError("more required classes than max_objects")
        if not 0.05 <= self.min_object_frac <= self.max_object_frac <= 0.9:
            raise ConfigError("need 0.05 <= min_object_frac <= max_object_frac <= 0.9")


@dataclass(frozen=True, slots=True)
class SceneSet:
    """``images`` (n, H, W, 3) RGB uint8 and one ``(k, 5)`` box array per image."""

    images: Image
    boxes: tuple[Boxes, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: slice) -> SceneSet:
        return SceneSet(self.images[index], self.boxes[index])

    def class_counts(self, n_classes: int = len(CLASS_NAMES)) -> npt.NDArray[np.int64]:
        """Objects per class over the whole set."""
        counts = np.zeros(n_classes, dtype=np.int64)
        for b in self.boxes:
            np.add.at(counts, b[:, 0].astype(np.int64), 1)
        return counts


def _random_colour(rng: np.random.Generator, hue: int, saturated: bool) -> tuple[int, int, int]:
    """An RGB colour near ``hue`` (saturated, for objects) or a dull one (for clutter)."""
    h = (hue + int(rng.integers(-_HUE_JITTER, _HUE_JITTER + 1))) % 180
    s = int(rng.integers(150, 256)) if saturated else int(rng.integers(0, 70))
    v = int(rng.integers(150, 256)) if saturated else int(rng.integers(40, 220))
    hsv = np.array([[[h, s, v]]], dtype=np.uint8)
    r, g, b = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]
    return int(r), int(g), int(b)


def _background(rng: np.random.Generator, size: int) -> npt.NDArray[np.float32]:
    """A two-colour linear gradient at a random angle plus low-frequency blotches."""
    c0 = np.array(_random_colour(rng, int(rng.integers(0, 180)), False), dtype=np.float32)
    c1 = np.array(_random_colour(rng, int(rng.integers(0, 180)), False), dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (xx * math.cos(angle) + yy * math.sin(angle) + 1.5) / 3.0
    img = c0 + (c1 - c0) * t[..., None]
    grid = int(rng.integers(3, 7))
    blotch = rng.normal(0.0, 18.0, size=(grid, grid, 3)).astype(np.float32)
    img += cv2.resize(blotch, (size, size), interpolation=cv2.INTER_CUBIC)
    out: npt.NDArray[np.float32] = img.astype(np.float32, copy=False)
    return out


def _draw_clutter(rng: np.random.Generator, img: npt.NDArray[np.float32], count: int) -> None:
    """Dull lines, rectangle outlines and small blobs: edges that are not objects."""
    size = img.shape[0]
    for _ in range(count):
        colour = _random_colour(rng, int(rng.integers(0, 180)), False)
        kind = int(rng.integers(0, 3))
        p1 = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        p2 = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        thickness = max(1, int(rng.integers(1, max(2, size // 48) + 1)))
        if kind == 0:
            cv2.line(img, p1, p2, colour, thickness)
        elif kind == 1:
            cv2.rectangle(img, p1, p2, colour, thickness)
        else:
            radius = max(1, int(rng.integers(1, max(2, size // 24) + 1)))
            cv2.circle(img, p1, radius, colour, -1)


def _rotate(points: npt.NDArray[np.float64], angle: float) -> npt.NDArray[np.float64]:
    c, s = math.cos(angle), math.sin(angle)
    rotated: npt.NDArray[np.float64] = points @ np.array([[c, s], [-s, c]])
    return rotated


def _shape_mask(
    rng: np.random.Generator, cls: int, side: float, size: int, centre: tuple[float, float]
) -> npt.NDArray[np.uint8]:
    """A binary mask of one shape of class ``cls`` with about ``side`` pixels extent."""
    mask = np.zeros((size, size), dtype=np.uint8)
    r = side / 2.0
    angle = rng.uniform(-math.pi, math.pi)
    name = CLASS_NAMES[cls]
    if name == "circle":
        axes = (max(1, round(r)), max(1, round(r * rng.uniform(0.8, 1.0))))
        cv2.ellipse(
            mask, (round(centre[0]), round(centre[1])), axes, math.degrees(angle), 0, 360, 1, -1
        )
        return mask
    if name == "square":
        aspect = rng.uniform(0.8, 1.0)
        pts = np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]]) * r * 0.75
        pts = _rotate(pts, rng.uniform(-0.45, 0.45))
    elif name == "triangle":
        pts = (
            np.array(
                [
                    [math.cos(a), math.sin(a)]
                    for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))
                ]
            )
            * r
        )
        pts = _rotate(pts, rng.uniform(-0.35, 0.35))
    elif name == "cross":
        arm = rng.uniform(0.22, 0.34)
        pts = (
            np.array(
                [
                    [-arm, -1],
                    [arm, -1],
                    [arm, -arm],
                    [1, -arm],
                    [1, arm],
                    [arm, arm],
                    [arm, 1],
                    [-arm, 1],
                    [-arm, arm],
                    [-1, arm],
                    [-1, -arm],
                    [-arm, -arm],
                ]
            )
            * r
        )
        pts = _rotate(pts, rng.uniform(-0.35, 0.35))
    else:  # star
        inner = rng.uniform(0.38, 0.5)
        pts = (
            np.array(
                [
                    [
                        math.cos(a) * (1.0 if k % 2 == 0 else inner),
                        math.sin(a) * (1.0 if k % 2 == 0 else inner),
                    ]
                    for k, a in enumerate(-math.pi / 2 + k * math.pi / 5 for k in range(10))
                ]
            )
            * r
        )
        pts = _rotate(pts, angle)
    poly = np.round(pts + np.array(centre)).astype(np.int32)
    cv2.fillPoly(mask, [poly], 1)
    return mask


def render_scene(rng: np.random.Generator, config: SceneConfig) -> tuple[Image, Boxes]:
    """One scene: an RGB image and its ``(k, 5)`` boxes ``class, x1, y1, x2, y2``."""
    size = config.size
    img = _background(rng, size)
    _draw_clutter(rng, img, config.clutter)

    n = int(rng.integers(max(config.min_objects, len(config.required)), config.max_objects + 1))
    wanted = list(config.required) + [
        int(c) for c in rng.choice(config.classes, n - len(config.required))
    ]
    rng.shuffle(wanted)
    occupied = np.zeros((size, size), dtype=bool)
    boxes: list[list[float]] = []
    for cls in wanted:
        for _attempt in range(30):
            side = size * rng.uniform(config.min_object_frac, config.max_object_frac)
            margin = side / 2 + 1
            centre = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
            mask = _shape_mask(rng, cls, side, size, centre).astype(bool)
            ys, xs = np.nonzero(mask)
            if xs.size == 0:
                continue
            x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            pad = max(1, size // 64)  # keep boxes apart so no object occludes another
            if occupied[max(0, y1 - pad) : y2 + pad, max(0, x1 - pad) : x2 + pad].any():
                continue
            occupied[y1:y2, x1:x2] = True
            img[mask] = _random_colour(rng, _BASE_HUE[cls], True)
            boxes.append([float(cls), float(x1), float(y1), float(x2), float(y2)])
            break
        # A required object that found no room after 30 tries is dropped, never misplaced;
        # with the default sizes this does not happen (max 3 objects at <= 38 % side).
    img += rng.normal(0.0, config.noise, size=img.shape).astype(np.float32)
    image = np.clip(img, 0, 255).astype(np.uint8)
    box_array = np.array(boxes, dtype=np.float32).reshape(-1, 5)
    return image, box_array


def make_scenes(n: int, *, seed: int, config: SceneConfig | None = None) -> SceneSet:
    """``n`` scenes; scene ``i`` depends only on ``(seed, i)`` and the config."""
    config = config or SceneConfig()
    if n < 0:
        raise ConfigError("n must be >= 0")
    images = np.empty((n, config.size, config.size, 3), dtype=np.uint8)
    boxes: list[Boxes] = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        images[i], b = render_scene(rng, config)
        boxes.append(b)
    return SceneSet(images, tuple(boxes))


def new_class_config(size: int = 96, *, with_known: bool = True) -> SceneConfig:
    """Scenes as a device's user labels them after deployment: every frame shows the new
    class, usually next to known objects (all objects boxed)."""
    classes = (*KNOWN_CLASSES, NEW_CLASS) if with_known else (NEW_CLASS,)
    return SceneConfig(size=size, classes=classes, required=(NEW_CLASS,))
