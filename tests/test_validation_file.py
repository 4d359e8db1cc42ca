"""The release gate's validation file (``--validation FILE.npz``): what ``save_validation``
writes ``load_validation`` reads back, for every sample kind, without pickle. Detection's
labels (one box array per frame) were saved as a pickled object array that the loader then
refused ("Object arrays cannot be loaded when allow_pickle=False"), so a detection coordinator
could not be given a gate."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.validation import fingerprint, load_validation, save_validation
from edge_sdk.errors import ConfigError
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import MAX_BOXES, Split, TaskData

N_CLASSES = 5


class FrameTask:
    """A frames-with-boxes task as the loader sees one: its sample kind and class count."""

    name = "frames"
    sample_kind = "frame"

    def data(self) -> TaskData:
        empty = Split(x=np.zeros((0, 8, 8, 3), np.uint8), y=np.empty(0, dtype=object))
        return TaskData(pretrain=empty, pool=empty, test=empty, n_classes=N_CLASSES)


def frames(boxes: list[list[list[float]]], size: tuple[int, int] = (32, 48)) -> Split:
    """Frames of ``size`` (H, W), one per entry of ``boxes``, labelled as detection labels them."""
    rng = np.random.default_rng(0)
    y = np.empty(len(boxes), dtype=object)
    for i, b in enumerate(boxes):
        y[i] = np.asarray(b, dtype=np.float32).reshape(-1, 5)
    return Split(x=rng.integers(0, 256, (len(boxes), *size, 3), dtype=np.uint8), y=y)


def test_a_frames_split_round_trips_without_pickle(tmp_path: Path) -> None:
    split = frames([[[0, 1, 2, 10, 12], [4, 0, 0, 48, 32]], [], [[3, 5.5, 6, 7.25, 8]]])
    save_validation(tmp_path / "val.npz", split)
    with np.load(tmp_path / "val.npz", allow_pickle=False) as data:  # no object array: pickle is never needed
        assert sorted(data.files) == ["box_counts", "boxes", "x"]
        assert data["boxes"].shape == (3, 5) and data["box_counts"].tolist() == [2, 0, 1]
    loaded = load_validation(tmp_path / "val.npz", FrameTask())  # type: ignore[arg-type]
    assert loaded.x.dtype == np.uint8 and np.array_equal(loaded.x, split.x)
    assert loaded.y.dtype == object and len(loaded.y) == 3
    for got, want in zip(loaded.y, split.y):
        assert got.dtype == np.float32 and got.shape == want.shape and np.array_equal(got, want)


@pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None, reason="needs the detection extra (ultralytics)")
def test_detection_s_own_test_split_is_a_validation_file_its_coordinator_loads(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The tester's reproduction: ``save_validation(path, get_task("detection").data().test)``, then
    ``edgeci coordinator --model detection --validation path`` refused it."""
    monkeypatch.setenv("EDGECI_HOME", str(tmp_path / "home"))
    task = get_task("detection")
    test = task.data().test
    save_validation(tmp_path / "dval.npz", test)
    loaded = load_validation(tmp_path / "dval.npz", task)
    assert len(loaded) == len(test) and np.array_equal(loaded.x, test.x)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.y, test.y))


def test_a_classifier_split_round_trips_as_before(tmp_path: Path) -> None:
    task = get_task("digits")
    test = task.data().test
    save_validation(tmp_path / "val.npz", test)
    with np.load(tmp_path / "val.npz", allow_pickle=False) as data:
        assert sorted(data.files) == ["x", "y"]
    loaded = load_validation(tmp_path / "val.npz", task)
    assert loaded.x.dtype == np.float32 and loaded.y.dtype == np.int64
    assert np.array_equal(loaded.x, test.x) and np.array_equal(loaded.y, test.y)


def test_the_fingerprint_names_the_samples_as_loaded(tmp_path: Path) -> None:
    """The gate's best-release floor is restored only on the same validation set: the same
    samples (saved again, another file) give the same fingerprint, one changed label another."""
    task = get_task("digits")
    test = task.data().test
    save_validation(tmp_path / "a.npz", test)
    np.savez(tmp_path / "b.npz", x=test.x.astype(np.float64), y=test.y.astype(np.int32))
    same = {fingerprint(load_validation(tmp_path / f"{name}.npz", task)) for name in ("a", "b")}
    assert len(same) == 1 and next(iter(same)).startswith("sha256:")
    y = test.y.copy()
    y[0] = (y[0] + 1) % 10
    assert fingerprint(Split(x=test.x, y=y)) not in same
    assert fingerprint(Split(x=test.x[:-1], y=test.y[:-1])) not in same
    one = frames([[[0, 1, 2, 10, 12]], []])
    moved = frames([[[0, 1, 2, 10, 13]], []])
    assert fingerprint(one) == fingerprint(frames([[[0, 1, 2, 10, 12]], []])) != fingerprint(moved)


class Payload:
    """Pickled, it would create ``marker`` when unpickled: a validation file must never run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_pickled_object_array_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    y = np.empty(2, dtype=object)
    y[0], y[1] = Payload(marker), np.zeros((0, 5), np.float32)
    np.savez(tmp_path / "old.npz", x=np.zeros((2, 8, 8, 3), np.uint8), y=y)  # the old format, and an attack
    with pytest.raises(ConfigError, match=r"it has no boxes, box_counts .*could only be read with pickle"):
        load_validation(tmp_path / "old.npz", FrameTask())  # type: ignore[arg-type]
    np.savez(tmp_path / "attack.npz", x=np.zeros((2, 8, 8, 3), np.uint8), boxes=y, box_counts=np.zeros(2, np.int64))
    with pytest.raises(ConfigError, match="allow_pickle=False"):
        load_validation(tmp_path / "attack.npz", FrameTask())  # type: ignore[arg-type]
    assert not marker.exists()


def test_a_classifier_s_file_given_to_a_detector_is_named_as_one(tmp_path: Path) -> None:
    """helper-182: a digits or gestures validation file (x, integer y) given to `--model detection`
    was said to hold 'one object array of per-frame boxes' that 'could only be read with pickle'."""
    np.savez(tmp_path / "digits.npz", x=np.zeros((3, 1, 8, 8), np.float32), y=np.array([0, 1, 2]))
    with pytest.raises(ConfigError) as err:
        load_validation(tmp_path / "digits.npz", FrameTask())  # type: ignore[arg-type]
    assert "it has no boxes, box_counts" in str(err.value) and "pickle" not in str(err.value), err.value
    assert "its y is int64 (3,): one class label per sample, a classifier's validation set" in str(err.value), err.value


def write(path: Path, **arrays: Any) -> Path:
    np.savez(path, **{name: np.asarray(value) for name, value in arrays.items()})
    return path


X2 = np.zeros((2, 32, 48, 3), np.uint8)
BOX = [1, 2, 3, 10, 12]


@pytest.mark.parametrize("arrays, needle", [
    ({"x": X2, "boxes": [BOX]}, "it has no box_counts"),
    ({"x": X2.astype(np.float32), "boxes": [BOX], "box_counts": [1, 0]}, "x must be (N, H, W, 3) uint8 RGB frames"),
    ({"x": X2[..., :1], "boxes": [BOX], "box_counts": [1, 0]}, "x must be (N, H, W, 3) uint8 RGB frames"),
    ({"x": X2, "boxes": [BOX], "box_counts": [1]}, "box_counts must be (N,) integers, one per frame of x (2)"),
    ({"x": X2, "boxes": [BOX], "box_counts": [1.0, 0.0]}, "box_counts must be (N,) integers"),
    ({"x": X2, "boxes": [BOX], "box_counts": [2, -1]}, f"box_counts must be 0 to {MAX_BOXES} boxes a frame"),
    ({"x": X2, "boxes": [BOX] * (MAX_BOXES + 1), "box_counts": [MAX_BOXES + 1, 0]}, "box_counts must be 0 to"),
    ({"x": X2, "boxes": [BOX], "box_counts": [1, 1]}, "boxes must be (M, 5) numbers (class_id, x1, y1, x2, y2) with M = box_counts' sum (2)"),
    ({"x": X2, "boxes": [BOX[:4]], "box_counts": [1, 0]}, "boxes must be (M, 5)"),
    ({"x": X2, "boxes": [[1, 2, 3, np.nan, 12]], "box_counts": [1, 0]}, "boxes hold NaN or Inf"),
    ({"x": X2, "boxes": [[5, 2, 3, 10, 12]], "box_counts": [1, 0]}, "box class ids must be integers 0 to 4"),
    ({"x": X2, "boxes": [[1.5, 2, 3, 10, 12]], "box_counts": [1, 0]}, "box class ids must be integers 0 to 4"),
    ({"x": X2, "boxes": [BOX, [1, 2, 3, 49, 12]], "box_counts": [1, 1]}, "frame 1 has an empty box or one outside its 48x32 pixels"),
    ({"x": X2, "boxes": [[1, -1, 3, 10, 12]], "box_counts": [1, 0]}, "frame 0 has an empty box or one outside"),
    ({"x": X2, "boxes": [[1, 10, 3, 10, 12]], "box_counts": [0, 1]}, "frame 1 has an empty box"),
    ({"x": X2[:0], "boxes": np.zeros((0, 5), np.float32), "box_counts": np.zeros(0, np.int64)}, "holds no samples"),
    # helper-182: frames without one box scored mAP50 0.0 for every model, so the gate promoted every candidate
    ({"x": X2, "boxes": np.zeros((0, 5), np.float32), "box_counts": [0, 0]}, "its 2 frames hold no boxes"),
    ({"x": X2, "boxes": [BOX, [1, 0.1, 0.2, 0.4, 0.5]], "box_counts": [1, 1]},  # normalised corners (helper-182)
     "frame 1 has a box under one pixel (0.3x0.3): boxes are in the frame's pixels, not normalised to [0, 1]"),
])
def test_a_bad_frames_file_is_one_clear_error(tmp_path: Path, arrays: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_validation(write(tmp_path / "val.npz", **arrays), FrameTask())  # type: ignore[arg-type]
    assert str(err.value).startswith(f"--validation {tmp_path / 'val.npz'}: ") and needle in str(err.value), err.value


@pytest.mark.parametrize("arrays, needle", [
    ({"x": np.zeros((3, 1, 8, 8))}, "it has no y"),
    ({"x": np.zeros((3, 1, 8, 8)), "y": [0, 1, 10]}, "y must be integer class labels 0 to 9"),
    ({"x": np.zeros((3, 1, 8, 8)), "y": [0, 1.5, 2]}, "y must be integer class labels 0 to 9"),
    ({"x": np.zeros((3, 1, 8, 8)), "y": [[0, 1, 2]]}, "x must be (N, 1, 8, 8) with N labels"),
    ({"x": np.zeros((3, 8, 8)), "y": [0, 1, 2]}, "x must be (N, 1, 8, 8) with N labels"),
    ({"x": np.full((3, 1, 8, 8), np.inf), "y": [0, 1, 2]}, "x holds NaN or Inf"),
    ({"x": np.full((3, 1, 8, 8), 16.0), "y": [0, 1, 2]},
     "x holds values in [16, 16]; the task's inputs lie in [0, 1] (scikit-learn's 0-16 pixel counts divided by 16)"),
])
def test_a_bad_classifier_file_is_one_clear_error(tmp_path: Path, arrays: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_validation(write(tmp_path / "val.npz", **arrays), get_task("digits"))
    assert needle in str(err.value), err.value


def test_a_single_npy_array_or_no_file_is_one_clear_error(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((3, 1, 8, 8)))
    with pytest.raises(ConfigError, match=r"not a single \.npy array"):
        load_validation(tmp_path / "x.npy", get_task("digits"))
    with pytest.raises(ConfigError, match=r"need an \.npz with arrays x .*No such file"):
        load_validation(tmp_path / "missing.npz", get_task("digits"))
