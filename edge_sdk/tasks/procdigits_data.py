"""A procedural digits set of MNIST's size, rendered offline from fonts that ship with
installed packages, plus a reader for real MNIST/EMNIST IDX files (numpy + OpenCV + PIL;
no torch, no downloads).

Theory of operation. A *glyph bank* holds each digit rendered large (about 64 px high) from
every usable font: OpenCV's Hershey stroke fonts (upright and italic, thin and heavy) and
matplotlib's bundled TrueType fonts (DejaVu, STIX, Computer Modern) through PIL. Each sample
picks a glyph and maps it into a 56×56 canvas (2× the output) by one ``cv2.remap`` that
combines a random affine (scale so the longer side fills MNIST's 20-px box ± jitter, aspect,
rotation, shear, translation, centred on the glyph's centre of mass as MNIST is) with a
smooth elastic displacement field; then a random stroke-width change (erode/dilate), an
area downsample to 28×28, a Gaussian blur, a contrast stretch that saturates stroke cores
as MNIST's do, and pixel noise. Labels are exactly balanced.

Determinism: samples are made in chunks of :data:`CHUNK` and chunk ``i`` of split ``s``
draws from ``SeedSequence([seed, s, i])``, so the arrays depend on the seed only, never on
the worker count. A build is cached as ``$EDGECI_HOME/data/procdigits-<key>.npz`` where the
key hashes this file's source, the font list and the library versions (a changed generator
rebuilds); a cache that fails to load or check is rebuilt.

    python -m edge_sdk.tasks.procdigits_data            # build (or load) the full set, timed
    python -m edge_sdk.tasks.procdigits_data --quick    # 2,000 + 500
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from multiprocessing import get_context
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_sdk._extras import require
from edge_sdk.errors import ConfigError
from edge_sdk.paths import edgeci_home

__all__ = [
    "CHUNK",
    "FULL_SIZE",
    "QUICK_SIZE",
    "DigitSet",
    "build",
    "cache_path",
    "generate",
    "load",
    "load_mnist_dir",
    "read_idx",
]

CHUNK = 1_000
FULL_SIZE = (60_000, 10_000)
QUICK_SIZE = (2_000, 500)
SIDE = 28
CANVAS = 2 * SIDE
BOX = 20.0 * CANVAS / SIDE
"""MNIST's digits fill a 20×20 box of the 28×28 image (longer side), at canvas scale."""

# matplotlib's TrueType fonts that have ordinary lining digits (the STIX size/non-Unicode
# variants, cmex/cmsy symbols and cmmi's old-style figures are left out).
TTF_NAMES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmti10.ttf",
)
HERSHEY_NAMES = (
    "FONT_HERSHEY_SIMPLEX",
    "FONT_HERSHEY_PLAIN",
    "FONT_HERSHEY_DUPLEX",
    "FONT_HERSHEY_COMPLEX",
    "FONT_HERSHEY_TRIPLEX",
    "FONT_HERSHEY_COMPLEX_SMALL",
    "FONT_HERSHEY_SCRIPT_SIMPLEX",
    "FONT_HERSHEY_SCRIPT_COMPLEX",
)
HERSHEY_THICKNESS = (3, 6, 9)
"""Stroke widths (px) of the Hershey glyphs at bank scale (~64 px high)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DigitSet:
    """Images as uint8 ``(N, 28, 28)`` (0 = background) and int64 labels 0–9."""

    train_x: npt.NDArray[np.uint8]
    train_y: npt.NDArray[np.int64]
    test_x: npt.NDArray[np.uint8]
    test_y: npt.NDArray[np.int64]
    source: str
    """``procdigits-<key>`` or the directory real files were read from."""

    @staticmethod
    def as_float(x: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """uint8 images → float32 ``(N, 1, 28, 28)`` in [0, 1]."""
        return (x.astype(np.float32) / np.float32(255.0)).reshape(x.shape[0], 1, *x.shape[1:])


# --------------------------------------------------------------------------- glyph bank


@dataclass(frozen=True, slots=True)
class _Glyph:
    image: npt.NDArray[np.uint8]  # tight crop, 0 = background
    com: tuple[float, float]  # centre of mass (x, y) in crop pixels


def _crop(canvas: npt.NDArray[np.uint8]) -> _Glyph | None:
    ys, xs = np.nonzero(canvas > 16)
    if ys.size < 20:
        return None
    pad = 2
    y0, y1 = max(int(ys.min()) - pad, 0), int(ys.max()) + pad + 1
    x0, x1 = max(int(xs.min()) - pad, 0), int(xs.max()) + pad + 1
    crop = np.ascontiguousarray(canvas[y0:y1, x0:x1])
    weights = crop.astype(np.float64)
    total = weights.sum()
    gy, gx = np.indices(crop.shape)
    return _Glyph(crop, (float((gx * weights).sum() / total), float((gy * weights).sum() / total)))


def _ttf_dir() -> Path:
    matplotlib = require("matplotlib", "emulate", purpose="the procedural digits' fonts")
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _font_list() -> tuple[str, ...]:
    """The fonts the bank is rendered from (part of the cache key)."""
    ttf_dir = _ttf_dir()
    ttfs = tuple(f"ttf:{name}" for name in TTF_NAMES if (ttf_dir / name).is_file())
    hershey = tuple(
        f"hershey:{name}:{italic}:{t}"
        for name in HERSHEY_NAMES
        for italic in (0, 1)
        for t in HERSHEY_THICKNESS
    )
    return ttfs + hershey


def _render_ttf(path: Path) -> list[_Glyph] | None:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(path), size=72)
    glyphs = []
    for digit in range(10):
        image = Image.new("L", (160, 160), 0)
        ImageDraw.Draw(image).text((80, 80), str(digit), font=font, fill=255, anchor="mm")
        glyph = _crop(np.asarray(image, dtype=np.uint8))
        if glyph is None:
            return None
        glyphs.append(glyph)
    return glyphs


def _render_hershey(cv2: Any, face: int, thickness: int) -> list[_Glyph] | None:
    (_, height), _ = cv2.getTextSize("8", face, 1.0, 1)
    scale = 60.0 / max(height, 1)
    glyphs = []
    for digit in range(10):
        canvas = np.zeros((160, 160), dtype=np.uint8)
        (w, h), _ = cv2.getTextSize(str(digit), face, scale, thickness)
        cv2.putText(
            canvas,
            str(digit),
            ((160 - w) // 2, (160 + h) // 2),
            face,
            scale,
            255,
            thickness,
            cv2.LINE_AA,
        )
        glyph = _crop(canvas)
        if glyph is None:
            return None
        glyphs.append(glyph)
    return glyphs


@cache
def glyph_bank() -> tuple[tuple[_Glyph, ...], ...]:
    """``bank[style][digit]``: every font style that renders ten distinct digits."""
    cv2 = require("cv2", "detection", purpose="the procedural digits")
    ttf_dir = _ttf_dir()
    styles: list[tuple[_Glyph, ...]] = []
    for entry in _font_list():
        kind, name, *rest = entry.split(":")
        if kind == "ttf":
            glyphs = _render_ttf(ttf_dir / name)
        else:
            face = getattr(cv2, name) | (cv2.FONT_ITALIC if rest[0] == "1" else 0)
            glyphs = _render_hershey(cv2, face, int(rest[1]))
        # A font without digits draws ten identical boxes; keep only ten distinct glyphs.
        if glyphs is not None and len({g.image.tobytes() for g in glyphs}) == 10:
            styles.append(tuple(glyphs))
    if not styles:
        raise ConfigError("no font renders the digits (matplotlib's fonts and OpenCV needed)")
    return tuple(styles)


# --------------------------------------------------------------------------- samples


def _sample(
    cv2: Any,
    glyph: _Glyph,
    rng: np.random.Generator,
    grid: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]],
) -> npt.NDArray[np.uint8]:
    h, w = glyph.image.shape
    scale = BOX / max(h, w) * rng.uniform(0.75, 1.1)
    sx, sy = scale * np.exp(rng.normal(0.0, 0.1)), scale
    theta = np.deg2rad(rng.uniform(-15.0, 15.0))
    shear = rng.uniform(-0.3, 0.3)
    c, s = np.cos(theta), np.sin(theta)
    forward = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])
    inverse = np.linalg.inv(forward).astype(np.float32)
    centre = CANVAS / 2.0 + rng.uniform(-2.5, 2.5, size=2)
    # Elastic field: a coarse random grid of displacements, smoothly upsampled.
    alpha = rng.uniform(0.0, 2.5)
    coarse = rng.normal(0.0, alpha, size=(2, 4, 4)).astype(np.float32)
    dx = cv2.resize(coarse[0], (CANVAS, CANVAS), interpolation=cv2.INTER_CUBIC)
    dy = cv2.resize(coarse[1], (CANVAS, CANVAS), interpolation=cv2.INTER_CUBIC)
    ox = grid[0] + dx - np.float32(centre[0])
    oy = grid[1] + dy - np.float32(centre[1])
    map_x = inverse[0, 0] * ox + inverse[0, 1] * oy + np.float32(glyph.com[0])
    map_y = inverse[1, 0] * ox + inverse[1, 1] * oy + np.float32(glyph.com[1])
    canvas = cv2.remap(
        glyph.image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    # Stroke width: thinner, unchanged or thicker pens (erosion only where strokes survive it).
    stroke = rng.choice(4, p=(0.3, 0.4, 0.2, 0.1))
    if stroke == 0:
        thinner = cv2.erode(canvas, np.ones((3, 3), np.uint8))
        if int(thinner.sum()) > 0.5 * int(canvas.sum()):
            canvas = thinner
    elif stroke >= 2:
        size = (2, 3)[stroke - 2]
        canvas = cv2.dilate(canvas, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    small = cv2.resize(canvas, (SIDE, SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    sigma = rng.uniform(0.0, 1.0)
    if sigma > 0.25:
        small = cv2.GaussianBlur(small, (0, 0), sigma)
    peak = float(small.max())
    if peak > 0:
        # MNIST's stroke cores are saturated: stretch so the top of the range clips at 1.
        small *= rng.uniform(1.0, 1.4) / peak
    small += rng.normal(0.0, rng.uniform(0.0, 0.05), size=small.shape).astype(np.float32)
    return np.rint(np.clip(small, 0.0, 1.0) * 255.0).astype(np.uint8)  # type: ignore[no-any-return]


def _chunk(
    seed: int, split: int, index: int, n: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Chunk ``index`` of ``split`` (0 train, 1 test): ``n`` images and labels."""
    cv2 = require("cv2", "detection", purpose="the procedural digits")
    cv2.setNumThreads(1)
    bank = glyph_bank()
    rng = np.random.default_rng(np.random.SeedSequence([seed, split, index]))
    labels = rng.permutation(np.arange(n, dtype=np.int64) % 10)
    styles = rng.integers(0, len(bank), size=n)
    gy, gx = np.indices((CANVAS, CANVAS), dtype=np.float32)
    grid = (gx, gy)
    images = np.empty((n, SIDE, SIDE), dtype=np.uint8)
    for i in range(n):
        images[i] = _sample(cv2, bank[styles[i]][labels[i]], rng, grid)
    return images, labels


def _split_chunks(n: int) -> list[tuple[int, int]]:
    return [(i, min(CHUNK, n - i * CHUNK)) for i in range(-(-n // CHUNK))]


def _balanced_chunks(n: int) -> list[tuple[int, int]]:
    # Each chunk is balanced when its size is a multiple of 10, so the split is exactly balanced.
    if n % 10:
        raise ConfigError(f"split sizes must be multiples of 10, got {n}")
    return _split_chunks(n)


def generate(n_train: int, n_test: int, *, seed: int = 0, workers: int = 1) -> DigitSet:
    """Render a fresh set (no cache). ``workers`` > 1 uses that many spawned processes;
    the arrays are identical for any worker count."""
    if n_train < 10 or n_test < 10:
        raise ConfigError(f"need at least 10 train and 10 test images, got {n_train}, {n_test}")
    jobs = [
        (seed, split, index, size)
        for split, n in ((0, n_train), (1, n_test))
        for index, size in _balanced_chunks(n)
    ]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            parts = list(pool.map(_chunk, *zip(*jobs)))
    else:
        parts = [_chunk(*job) for job in jobs]
    n_train_chunks = len(_split_chunks(n_train))
    train, test = parts[:n_train_chunks], parts[n_train_chunks:]
    return DigitSet(
        train_x=np.concatenate([p[0] for p in train]),
        train_y=np.concatenate([p[1] for p in train]),
        test_x=np.concatenate([p[0] for p in test]),
        test_y=np.concatenate([p[1] for p in test]),
        source=f"procdigits-{cache_key(n_train, n_test, seed)}",
    )


# --------------------------------------------------------------------------- cache


@cache
def _generator_digest() -> str:
    cv2 = require("cv2", "detection", purpose="the procedural digits")
    matplotlib = require("matplotlib", "emulate", purpose="the procedural digits' fonts")
    import PIL

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update("|".join(_font_list()).encode())
    h.update(
        f"{cv2.__version__}|{matplotlib.__version__}|{PIL.__version__}|{np.__version__}".encode()
    )
    return h.hexdigest()[:12]


def cache_key(n_train: int, n_test: int, seed: int) -> str:
    """``<generator digest>-s<seed>-<n_train>x<n_test>``."""
    return f"{_generator_digest()}-s{seed}-{n_train}x{n_test}"


def cache_path(n_train: int, n_test: int, seed: int, root: Path | None = None) -> Path:
    """Where a build is cached: ``$EDGECI_HOME/data/procdigits-<key>.npz``."""
    return (root or edgeci_home() / "data") / f"procdigits-{cache_key(n_train, n_test, seed)}.npz"


def _read_cache(path: Path, n_train: int, n_test: int) -> DigitSet | None:
    """The cached set, or None when the file is missing or does not load and check out
    (zip CRCs catch flipped bytes; shapes, dtypes and labels are checked)."""
    try:
        # Our own handle: np.load leaks the file it opened when the zip is unreadable.
        with path.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in ("train_x", "train_y", "test_x", "test_y")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    shapes_ok = (
        arrays["train_x"].shape == (n_train, SIDE, SIDE)
        and arrays["test_x"].shape == (n_test, SIDE, SIDE)
        and arrays["train_y"].shape == (n_train,)
        and arrays["test_y"].shape == (n_test,)
        and arrays["train_x"].dtype == np.uint8
        and arrays["test_x"].dtype == np.uint8
        and arrays["train_y"].dtype == np.int64
        and arrays["test_y"].dtype == np.int64
    )
    if not shapes_ok or any(
        not ((y >= 0) & (y < 10)).all() for y in (arrays["train_y"], arrays["test_y"])
    ):
        return None
    return DigitSet(**arrays, source=path.stem)


def load(
    n_train: int = FULL_SIZE[0],
    n_test: int = FULL_SIZE[1],
    *,
    seed: int = 0,
    workers: int = 2,
    root: Path | None = None,
) -> tuple[DigitSet, bool]:
    """The set from its cache, built and cached first when missing or corrupt; returns
    ``(set, built)`` where ``built`` says whether it was rendered in this call."""
    path = cache_path(n_train, n_test, seed, root)
    cached = _read_cache(path, n_train, n_test)
    if cached is not None:
        return cached, False
    fresh = generate(n_train, n_test, seed=seed, workers=workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with partial.open("wb") as fh:
        np.savez(
            fh,
            train_x=fresh.train_x,
            train_y=fresh.train_y,
            test_x=fresh.test_x,
            test_y=fresh.test_y,
        )
    os.replace(partial, path)  # atomic: readers see the old file or the whole new one
    return fresh, True


def build(
    n_train: int = FULL_SIZE[0],
    n_test: int = FULL_SIZE[1],
    *,
    seed: int = 0,
    workers: int = 2,
    mnist_dir: Path | str | None = None,
) -> DigitSet:
    """Real MNIST/EMNIST digits from ``mnist_dir`` when given, else the procedural set
    (cached)."""
    if mnist_dir is not None:
        return load_mnist_dir(mnist_dir)
    return load(n_train, n_test, seed=seed, workers=workers)[0]


# --------------------------------------------------------------------------- real IDX files

_IDX_TYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: Path | str) -> npt.NDArray[Any]:
    """An IDX file (MNIST's format, gzipped or not) as a numpy array; a malformed file is a
    :class:`~edge_sdk.errors.ConfigError` that names it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ConfigError(f"{path}: cannot read IDX file: {exc}") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise ConfigError(f"{path}: not an IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"{path}: IDX header cut short")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ConfigError(
            f"{path}: IDX dims {dims} need {expected} data bytes, file has {len(raw) - header}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
    )


def _find(directory: Path, kind: str) -> Path:
    """The one file in ``directory`` for ``kind`` (e.g. ``train-images``), MNIST or EMNIST
    naming, gzipped or not."""
    prefix, what = kind.split("-")
    ndim = 3 if what == "images" else 1
    stems = (
        f"{'t10k' if prefix == 'test' else 'train'}-{what}-idx{ndim}-ubyte",
        f"emnist-digits-{prefix}-{what}-idx{ndim}-ubyte",
    )
    for stem in stems:
        for name in (stem, f"{stem}.gz", stem.replace("-idx", ".idx")):
            if (directory / name).is_file():
                return directory / name
    raise ConfigError(f"{directory}: no {kind} IDX file (looked for {', '.join(stems)}[.gz])")


def load_mnist_dir(directory: Path | str) -> DigitSet:
    """MNIST (or EMNIST digits) from a local copy of the standard IDX files; never downloads."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"MNIST directory {directory} does not exist")
    arrays: dict[str, npt.NDArray[Any]] = {}
    for split in ("train", "test"):
        images_path = _find(directory, f"{split}-images")
        images, labels = read_idx(images_path), read_idx(_find(directory, f"{split}-labels"))
        if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE) or images.dtype != np.uint8:
            raise ConfigError(
                f"{directory}: {split} images must be uint8 (N, 28, 28), got {images.dtype}{images.shape}"
            )
        if (
            labels.shape != (images.shape[0],)
            or labels.size == 0
            or labels.min() < 0
            or labels.max() > 9
        ):
            raise ConfigError(f"{directory}: {split} labels must be {images.shape[0]} digits 0-9")
        if images_path.name.startswith("emnist"):
            images = images.transpose(0, 2, 1)  # EMNIST stores images transposed
        arrays[f"{split}_x"] = np.ascontiguousarray(images)
        arrays[f"{split}_y"] = labels.astype(np.int64)
    return DigitSet(**arrays, source=str(directory))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_SIZE[0]:,} + {QUICK_SIZE[1]:,} images"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rebuild", action="store_true", help="ignore the cache")
    args = parser.parse_args(argv)
    n_train, n_test = QUICK_SIZE if args.quick else FULL_SIZE
    started = perf_counter()
    if args.rebuild:
        cache_path(n_train, n_test, args.seed).unlink(missing_ok=True)
    digits, built = load(n_train, n_test, seed=args.seed, workers=args.workers)
    seconds = perf_counter() - started
    print(
        f"{'built' if built else 'loaded'} {len(digits.train_y):,} + {len(digits.test_y):,} images "
        f"in {seconds:.1f} s ({args.workers} workers): {cache_path(n_train, n_test, args.seed)}; "
        f"{len(glyph_bank())} font styles"
    )


if __name__ == "__main__":
    main()
