"""The labelling app (``edgeci label``): its pure interaction core, its driver's checks, the
detection device it embeds, and the app driven as a person drives it.

The last test starts its own Xvfb, launches ``python -m demos.cli label --source synthetic``
against a test mosquitto, finds the window with xdotool, drags real mouse boxes and a
gesture and presses real keys, quits, and opens the device's sample stores. Screenshots
are the window's pixels as the X server holds them (Pillow's ``ImageGrab`` over XCB,
cropped to the window's geometry): ``label-window-boxes.png`` (paused frame, one labelled
box, one pending) and ``label-window-gesture.png`` under the test's ``tmp_path``; the
app's own ``s`` snapshot (its last rendered canvas) is checked too.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from demos.label import (
    SyntheticSource,
    check_broker,
    check_display,
    open_source,
)
from demos.label_ui import (
    MAGENTA,
    YELLOW,
    Key,
    LabelSession,
    MouseDown,
    MouseMove,
    MouseUp,
    Notice,
    Overlay,
    Phase,
    Quit,
    SaveFrame,
    SaveGesture,
    Snapshot,
    Status,
    View,
    box_from_drag,
    canvas_size,
    class_colour,
    fit_view,
    panel_lines,
    render,
    resample_gesture,
    wrap,
)
from edge_sdk.errors import ConfigError, LocalProtocolError, TransportError
from edge_sdk.tasks.gestures import GESTURES, LENGTH, VELOCITY_GAIN, gesture_path
from tests.helpers import wait_until
from tests.secure_broker import SecureBroker

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("circle", "square", "triangle", "cross", "star")


def session(scale: float = 2.0, mode: str = "box") -> LabelSession:
    return LabelSession(view=View(frame_w=240, frame_h=180, scale=scale), n_box_classes=5,
                        n_gesture_classes=8, gesture_length=LENGTH, gesture_gain=VELOCITY_GAIN,
                        mode=mode)  # type: ignore[arg-type]


def drag(s: LabelSession, a: tuple[float, float], b: tuple[float, float], t0: float = 0.0) -> list[Any]:
    out = s.handle(MouseDown(x=a[0], y=a[1], t=t0))
    mid = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
    out += s.handle(MouseMove(x=mid[0], y=mid[1], t=t0 + 0.1))
    out += s.handle(MouseUp(x=b[0], y=b[1], t=t0 + 0.2))
    return out


def key(s: LabelSession, ch: str | int) -> list[Any]:
    return s.handle(Key(code=ord(ch) if isinstance(ch, str) else ch))


def mode(s: LabelSession) -> str:
    return s.state.mode


# ---------------------------------------------------------------------- geometry


@pytest.mark.parametrize(("size", "zoom", "scale"), [
    ((96, 96), None, 4.0),          # tiny frames: at most 4x
    ((240, 240), None, 2.0),        # whole factors only: crisp pixels
    ((320, 240), None, 2.0),
    ((640, 480), None, 1.0),
    ((1280, 720), None, 0.5),       # HD webcams shrink to fit
    ((240, 240), 3.0, 3.0),
])
def test_fit_view(size: tuple[int, int], zoom: float | None, scale: float) -> None:
    view = fit_view(*size, zoom=zoom)
    assert view.scale == scale
    assert (view.image_w, view.image_h) == (round(size[0] * scale), round(size[1] * scale))


@pytest.mark.parametrize(("scale", "start", "end", "box"), [
    (2.0, (40, 50), (120, 130), (20, 25, 61, 66)),     # the far pixel is inside the box
    (2.0, (120, 130), (40, 50), (20, 25, 61, 66)),     # any drag direction
    (2.0, (41, 51), (121, 131), (20, 25, 61, 66)),     # odd pixels fall in the same frame pixel
    (2.0, (0, 0), (479, 359), (0, 0, 240, 180)),       # the whole frame
    (2.0, (400, 300), (900, 900), (200, 150, 240, 180)),  # clipped to the frame
    (0.5, (10, 10), (100, 60), (20, 20, 202, 122)),    # a shrunk HD frame
    (1.0, (10, 10), (11, 11), None),                    # a click, not a box
    (2.0, (10, 10), (13, 200), None),                   # two frame pixels wide: too thin
])
def test_box_from_drag_maps_window_pixels_to_frame_pixels(
        scale: float, start: tuple[int, int], end: tuple[int, int], box: tuple[int, int, int, int] | None) -> None:
    view = View(frame_w=240, frame_h=180, scale=scale)
    assert box_from_drag(view, start, end) == box


# ---------------------------------------------------------------------- gestures


def test_resampled_gesture_is_the_tasks_layout() -> None:
    # a right swipe drawn slowly at first: resampling is uniform in *time*
    pts = [(0.0, 100.0, 200.0), (0.5, 110.0, 200.0), (0.6, 300.0, 200.0)]
    seq = resample_gesture(pts, length=LENGTH, gain=VELOCITY_GAIN)
    assert seq is not None and seq.shape == (LENGTH, 4) and seq.dtype == np.float32
    x, y = seq[:, 0], seq[:, 1]
    assert x[0] == pytest.approx(-0.8) and x[-1] == pytest.approx(0.8)  # longer side spans 1.6
    assert np.allclose(y, 0.0) and np.all(np.diff(x) >= 0)
    assert x[LENGTH // 2] < -0.6  # half the time went into the first 10 px
    assert np.allclose(seq[1:, 2], np.diff(x) * VELOCITY_GAIN, atol=1e-5) and seq[0, 2] == 0.0
    up = resample_gesture([(0.0, 50.0, 300.0), (0.3, 50.0, 100.0)], length=LENGTH, gain=VELOCITY_GAIN)
    assert up is not None and up[-1, 1] > up[0, 1]  # screen y grows downwards, the task's up
    same_time = resample_gesture([(1.0, 0.0, 0.0), (1.0, 50.0, 0.0), (1.0, 100.0, 0.0)],
                                 length=LENGTH, gain=VELOCITY_GAIN)
    assert same_time is not None and np.all(np.diff(same_time[:, 0]) > 0)  # by point order
    assert resample_gesture([(0.0, 5.0, 5.0)], length=LENGTH, gain=VELOCITY_GAIN) is None
    assert resample_gesture([(0.0, 5.0, 5.0), (0.1, 9.0, 8.0)], length=LENGTH, gain=VELOCITY_GAIN) is None


def test_mouse_drawn_canonical_strokes_are_recognised_by_the_deployed_gesture_model() -> None:
    """The app's gestures speak the task's language: each class's canonical path, drawn as
    a mouse trajectory in screen pixels, is classified as that class by the pretrained model."""
    from edge_sdk.tasks import get_task

    task = get_task("gestures")
    weights = task.pretrained()
    seqs = []
    for label in range(len(GESTURES)):
        pos = gesture_path(label, np.linspace(0.0, 1.0, 40))
        points = [(0.02 * i, 300 + 150 * px, 300 - 150 * py) for i, (px, py) in enumerate(pos)]
        seq = resample_gesture(points, length=LENGTH, gain=VELOCITY_GAIN)
        assert seq is not None
        seqs.append(seq)
    predicted = task.logits(weights, np.stack(seqs)).argmax(axis=1)  # type: ignore[attr-defined]
    assert (predicted == np.arange(len(GESTURES))).mean() >= 0.75, predicted


# ---------------------------------------------------------------------- the session


def test_drag_then_digit_saves_the_held_frame_with_one_box() -> None:
    s = session()
    assert not s.frozen
    s.handle(MouseDown(x=40, y=50, t=0))
    assert s.frozen and s.state.phase is Phase.DRAWING  # the frame on screen is held
    s.handle(MouseMove(x=90, y=95, t=0.1))
    assert s.state.drag_end == (90, 95)
    out = s.handle(MouseUp(x=120, y=130, t=0.2))
    assert s.state.pending_box == (20, 25, 61, 66) and isinstance(out[0], Notice)
    assert s.frozen
    assert key(s, "4") == [SaveFrame(boxes=((4, 20, 25, 61, 66),))]
    assert not s.frozen and s.state.phase is Phase.LIVE and s.state.pending_box is None


@pytest.mark.parametrize(("steps", "expected_phase", "expect"), [
    # a click is not a box
    ([("drag", (40, 40), (41, 41))], Phase.LIVE, "drag to draw"),
    # a digit with nothing drawn
    ([("key", "3")], Phase.LIVE, "draw a box first"),
    # a digit beyond the classes keeps the box pending
    ([("drag", (10, 10), (60, 60)), ("key", "7")], Phase.BOX_PENDING, "no class 7"),
    # u drops the pending box
    ([("drag", (10, 10), (60, 60)), ("key", "u")], Phase.LIVE, "box dropped"),
    # g is refused while a box is pending
    ([("drag", (10, 10), (60, 60)), ("key", "g")], Phase.BOX_PENDING, "label or undo"),
    # space is refused while a box is pending
    ([("drag", (10, 10), (60, 60)), ("key", " ")], Phase.BOX_PENDING, "label (0-9) or undo"),
    # u with nothing to undo
    ([("key", "u")], Phase.LIVE, "nothing to undo"),
])
def test_session_refusals_and_undo(steps: list[tuple[Any, ...]], expected_phase: Phase, expect: str) -> None:
    s = session()
    out: list[Any] = []
    for step in steps:
        out = drag(s, step[1], step[2]) if step[0] == "drag" else key(s, step[1])
    assert s.state.phase is expected_phase
    assert not any(isinstance(a, SaveFrame | SaveGesture) for a in out)
    assert any(isinstance(a, Notice) and expect in a.text for a in out), out


@pytest.mark.parametrize("code", [178, 179, 185, 0, -78, 65470, 10**6])
def test_keys_that_are_not_ascii_digits_label_nothing(code: int) -> None:
    """The keys "²" (178; its own key on AZERTY keyboards), "³", "¹" passed str.isdigit() and
    int() raised ValueError out of the window loop (helper-117; this Linux Qt build sends
    them as -78 ..., others as Latin-1 codes). Any code is a key or nothing, never a crash."""
    s = session()
    drag(s, (10, 10), (60, 60))
    out = s.handle(Key(code=code))
    assert s.state.phase is Phase.BOX_PENDING and not any(isinstance(a, SaveFrame) for a in out)


def test_paused_frame_collects_several_boxes_and_saves_them_together() -> None:
    s = session()
    key(s, " ")
    assert s.state.paused and s.frozen
    drag(s, (10, 10), (60, 60))
    assert not any(isinstance(a, SaveFrame) for a in key(s, "1"))
    drag(s, (100, 100), (200, 160))
    key(s, "0")
    drag(s, (300, 200), (340, 260))
    key(s, "2")
    assert key(s, "u")[0].text.startswith("last box dropped")  # the third one
    assert s.state.draft == [(1, 5, 5, 31, 31), (0, 50, 50, 101, 81)]
    assert s.frozen  # still paused: the same frame
    assert key(s, " ") == [SaveFrame(boxes=((1, 5, 5, 31, 31), (0, 50, 50, 101, 81)))]
    assert not s.frozen and not s.state.paused and not s.state.draft
    key(s, " ")
    assert key(s, " ") == [Notice(text="live")]  # an empty pause saves nothing


def test_enter_resumes_and_quit_keeps_a_labelled_draft() -> None:
    s = session()
    assert key(s, 13) == []  # Enter only resumes a pause
    key(s, " ")
    drag(s, (10, 10), (60, 60))
    key(s, "3")
    assert key(s, 27) == [SaveFrame(boxes=((3, 5, 5, 31, 31),)), Quit()]
    s2 = session()
    drag(s2, (10, 10), (60, 60))
    assert key(s2, "q") == [Quit()]  # an unlabelled box is not a label
    assert key(session(), "s") == [Snapshot()]


def test_a_refused_save_puts_its_boxes_back_on_the_paused_frame() -> None:
    """The session dropped a paused frame's draft when it asked for the save, so a store that
    refused it (disk full) lost every box on that frame (helper-117). Until the driver reports
    FrameSaved the boxes are kept; SaveFailed puts them back, paused, and space tries again."""
    from demos.label_ui import FrameSaved, SaveFailed

    s = session()
    key(s, " ")
    drag(s, (10, 10), (60, 60))
    key(s, "1")
    drag(s, (100, 100), (200, 160))
    key(s, "0")
    boxes = ((1, 5, 5, 31, 31), (0, 50, 50, 101, 81))
    assert key(s, " ") == [SaveFrame(boxes=boxes)]
    [notice] = s.handle(SaveFailed(reason="database or disk is full"))
    assert notice.error and "not saved: database or disk is full" in notice.text and "space tries again" in notice.text
    assert s.state.paused and s.frozen and s.state.draft == list(boxes)  # the same frame, every box
    assert key(s, " ") == [SaveFrame(boxes=boxes)]  # again, once there is room
    assert s.handle(FrameSaved()) == [] and not s.state.paused and not s.state.draft and not s.frozen
    assert s.handle(SaveFailed(reason="late")) == [Notice(text="not saved: late", error=True)] and not s.state.paused
    # one box, not paused: a refusal keeps it too, on its (paused) frame
    drag(s, (10, 10), (60, 60))
    assert key(s, "2") == [SaveFrame(boxes=((2, 5, 5, 31, 31),))]
    s.handle(SaveFailed(reason="full"))
    assert s.state.paused and s.state.draft == [(2, 5, 5, 31, 31)]
    # quitting: there is no frame to go back to; the refusal says which boxes are lost and asks for a
    # snapshot of the window, which still shows them (it said only "not saved: full")
    assert key(s, "q") == [SaveFrame(boxes=((2, 5, 5, 31, 31),)), Quit()]
    assert s.handle(SaveFailed(reason="full")) == [
        Notice(text="quitting: 1 box(es) of the paused frame were not saved (full): boxes=[[2, 5, 5, 31, 31]]; "
                    "a snapshot of the window shows them", error=True), Snapshot()]
    assert not s.state.paused and not s.state.draft
    assert s.handle(SaveFailed(reason="late")) == [Notice(text="not saved: late", error=True)]  # said once
    # a quit whose save goes through says nothing more
    key(s, " ")
    drag(s, (10, 10), (60, 60))
    key(s, "4")
    assert key(s, "q") == [SaveFrame(boxes=((4, 5, 5, 31, 31),)), Quit()]
    assert s.handle(FrameSaved()) == [] and s.handle(SaveFailed(reason="late")) == [Notice(text="not saved: late", error=True)]


def test_a_new_drag_says_that_it_dropped_the_unlabelled_box() -> None:
    """Starting a new box while one waited for its class replaced it without a word (helper-117)."""
    s = session()
    drag(s, (10, 10), (60, 60))
    out = s.handle(MouseDown(x=100, y=100, t=1.0))
    assert [n.text for n in out] == ["box (5, 5, 31, 31) dropped unlabelled: press its class (0-4) before drawing the next"]
    assert s.state.phase is Phase.DRAWING and s.state.pending_box is None
    assert s.handle(MouseUp(x=140, y=140, t=1.1))[0].text.startswith("box (50, 50, 71, 71)")
    key(s, "1")
    assert s.handle(MouseDown(x=10, y=10, t=2.0)) == []  # nothing was pending: nothing to say
    g = session(mode="gesture")
    drag(g, (10, 10), (200, 10))
    assert g.state.phase is Phase.GESTURE_PENDING
    assert "gesture dropped unlabelled" in g.handle(MouseDown(x=10, y=10, t=3.0))[0].text


def test_drags_start_on_the_image_and_are_clamped_to_it() -> None:
    s = session()  # image 480 x 360 at 2x; the panel lies to its right
    assert s.handle(MouseDown(x=600, y=20, t=0)) == [] and s.state.phase is Phase.LIVE
    s.handle(MouseDown(x=400, y=300, t=0))
    s.handle(MouseUp(x=900, y=-40, t=0.1))  # released over the panel, above the window
    assert s.state.pending_box == (200, 0, 240, 151)


def test_gesture_mode_records_resamples_and_labels_a_stroke() -> None:
    s = session()
    assert key(s, "g")[0].text == "gesture mode" and mode(s) == "gesture"
    s.handle(MouseDown(x=100, y=200, t=0.0))
    for i in range(1, 10):
        s.handle(MouseMove(x=100 + 20 * i, y=200, t=0.03 * i))
    assert not s.frozen  # the feed keeps running under a gesture
    (note,) = s.handle(MouseUp(x=300, y=200, t=0.3))
    assert s.state.phase.value == "gesture_pending" and isinstance(note, Notice) and "press 0-7" in note.text
    assert key(s, "9")[0].error  # 8 gesture classes
    (saved,) = key(s, "1")
    assert isinstance(saved, SaveGesture) and saved.label == 1 and saved.sequence.shape == (LENGTH, 4)
    assert s.state.phase is Phase.LIVE and not s.state.trajectory
    s.handle(MouseDown(x=10, y=10, t=1.0))
    s.handle(MouseUp(x=12, y=11, t=1.1))
    assert s.state.phase is Phase.LIVE  # too short: nothing pending
    key(s, "g")
    assert mode(s) == "box"


# ---------------------------------------------------------------------- overlay


def status(**over: Any) -> Status:
    base: dict[str, Any] = dict(device="tester @ lab", source="synthetic 240x240", model_version=3,
                                detector="v3: 2 objects, 4 ms", phase="training on local samples",
                                last_event="update accepted (v3)", coordinator="external, mqtt://127.0.0.1:1883",
                                frames=12, frames_min=64, gestures=20, gestures_min=16, gesture_version=1, fps=24.7)
    base.update(over)
    return Status(**base)


def test_panel_reports_model_training_and_counts() -> None:
    texts = [line.text for line in panel_lines(status(), session().state, NAMES, GESTURES, new_class=4)]
    assert "detector  v3" in texts
    assert "frames    12 / 64 until the first pull" in texts
    assert "gestures  20 (D_min 16 reached)" in texts
    assert "device  training on local samples" in texts
    assert "  4  star  (new)" in texts and "  0  circle" in texts
    gesture_state = session(mode="gesture").state
    texts = [line.text for line in panel_lines(status(model_version=None), gesture_state, NAMES, GESTURES)]
    assert "detector  no model yet" in texts and "  7  check_mark" in texts


def test_wrap_breaks_long_panel_lines_at_spaces() -> None:
    text = "coordinator embedded: gestures v0, detector pretraining (first run only; long on a CPU)"
    rows = wrap(text, 300)
    assert len(rows) == 2 and rows[1].startswith("    ")
    assert all(cv2.getTextSize(r, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)[0][0] <= 300 for r in rows)
    assert wrap("short", 300) == ["short"]


def test_render_draws_frame_detections_and_pending_box_where_they_belong() -> None:
    frame = np.zeros((180, 240, 3), np.uint8)
    frame[:, :, 0] = 200  # red in RGB: blue must not appear
    s = session()
    dets = np.array([[100, 100, 140, 150, 0.9, 4]], np.float32)
    overlay = Overlay(status=status(), detections=dets, class_names=NAMES, gesture_names=GESTURES, new_class=4)
    canvas = render(frame, s.view, s.state, overlay)
    assert canvas.shape == (*canvas_size(s.view)[::-1], 3) and canvas.dtype == np.uint8
    assert tuple(canvas[300, 20]) == (0, 0, 200)  # BGR: the frame, scaled 2x
    assert tuple(canvas[250, 280]) == class_colour(4)  # the star's box: frame (140, 125) at 2x
    drag(s, (40, 50), (120, 130))  # pending: detections hide, the box shows in yellow
    held = render(frame, s.view, s.state, overlay)
    assert tuple(held[90, 40]) == YELLOW and tuple(held[90, 121]) == YELLOW
    assert tuple(held[250, 280]) == (0, 0, 200)
    key(s, "4")
    key(s, "g")
    s.handle(MouseDown(x=50, y=100, t=0))
    s.handle(MouseUp(x=250, y=100, t=0.3))
    traced = render(frame, s.view, s.state, overlay)
    assert tuple(traced[100, 150]) == MAGENTA


def test_a_model_that_outputs_nan_boxes_does_not_crash_the_window(tmp_path: Path) -> None:
    """A deployed detector whose box head gives NaN with a confident class score (diverged, or
    a hostile coordinator's) came out of OnnxDetector.detect as a NaN row (NMS keeps it), and the
    window's render() died on it with "cannot convert float NaN to integer" at every frame, on
    every start (the model stays deployed) (helper-117). Non-finite boxes are dropped now."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from edge_sdk.tasks.detection import OnnxDetector

    # a graph whose output is a constant (1, 4 + 5 classes, 3 anchors): cx, cy, w, h, scores
    out = np.zeros((1, 9, 3), np.float32)
    out[0, :4, 0], out[0, 5, 0] = [np.nan, 20, 10, 10], 0.9  # a confident box with a NaN corner
    out[0, :4, 1], out[0, 6, 1] = [32, 32, 16, 16], 0.8  # a good one
    out[0, :4, 2], out[0, 7, 2] = [np.inf, 5, np.inf, 5], 0.7
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["output0"], value=numpy_helper.from_array(out))], "constant",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 9, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "nan.onnx"))
    dets = OnnxDetector(tmp_path / "nan.onnx").detect(np.zeros((64, 64, 3), np.uint8))
    assert dets.tolist() == [[24.0, 24.0, 40.0, 40.0, pytest.approx(0.8), 2.0]]
    s = session()
    render(np.zeros((64, 64, 3), np.uint8), s.view, s.state,
           Overlay(status=status(), detections=dets, class_names=NAMES, gesture_names=GESTURES))


# ---------------------------------------------------------------------- driver checks


@pytest.mark.parametrize(("env", "platform", "error"), [
    ({}, "linux", "xvfb-run"),
    ({"DISPLAY": ":987"}, "linux", "no X server listens"),
    ({"QT_QPA_PLATFORM": "offscreen"}, "linux", None),
    ({}, "darwin", None),
])
def test_check_display(env: dict[str, str], platform: str, error: str | None) -> None:
    if error is None:
        check_display(env, platform)
    else:
        with pytest.raises(ConfigError, match=error):
            check_display(env, platform)


def test_sources_open_or_say_why(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="video file not found"):
        open_source(str(tmp_path / "missing.mp4"), size=96, seed=0)
    (tmp_path / "notavideo.mp4").write_text("hello")
    with pytest.raises(ConfigError, match=r"cannot open video|no frame could be read"):
        open_source(str(tmp_path / "notavideo.mp4"), size=96, seed=0)
    with pytest.raises(ConfigError, match="camera 97 did not open"):
        open_source("97", size=96, seed=0)
    # a real clip: RGB frames, looping
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (64, 48))
    for i in range(3):
        writer.write(np.full((48, 64, 3), (255, 0, 40 * i), np.uint8))  # BGR: blue
    writer.release()
    clip = open_source(str(path), size=96, seed=0)
    frames = [clip.read(0.01 + t * 0.1) for t in range(8)]  # 10 fps
    clip.close()
    assert all(f.shape == (48, 64, 3) for f in frames)
    assert frames[0][0, 0, 2] > 200 and frames[0][0, 0, 0] < 40  # RGB now
    assert abs(int(frames[3][0, 0, 0]) - int(frames[0][0, 0, 0])) <= 8  # looped back to the start


def test_frames_larger_than_the_store_takes_are_scaled_down(tmp_path: Path) -> None:
    """A 2560x1440 clip (a 1440p camera) opened and showed, but every labelled frame was
    refused: "not saved: frame of 11059200 bytes exceeds max_frame_bytes=6220800" (helper-117)."""
    from edge_sdk.store import DEFAULT_MAX_FRAME_BYTES, SampleStore

    path = tmp_path / "big.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (2560, 1440))
    for _ in range(2):
        writer.write(np.full((1440, 2560, 3), (255, 0, 0), np.uint8))  # BGR: blue
    writer.release()
    clip = open_source(str(path), size=96, seed=0)
    frame = clip.read(0.0)
    clip.close()
    assert frame.shape == (1080, 1920, 3) and frame.nbytes <= DEFAULT_MAX_FRAME_BYTES
    assert frame[540, 960, 2] > 200 and frame[540, 960, 0] < 40  # still RGB
    assert "scaled to 1920x1080" in clip.name
    with SampleStore.open(tmp_path / "s.sqlite3") as store:
        store.add_frame(frame, np.array([[0, 10, 10, 50, 50]], np.float32))
        assert store.count("frame") == 1


def test_synthetic_source_is_animated_and_reproducible() -> None:
    a, b = SyntheticSource(96, seed=1), SyntheticSource(96, seed=1)
    assert a.read(0.0).shape == (96, 96, 3)
    assert np.array_equal(a.read(1.5), b.read(1.5))
    assert not np.array_equal(a.read(0.0), a.read(1.5))  # the camera pans
    assert not np.array_equal(a.read(0.0), a.read(a.hold_s))  # then cuts to the next scene
    with pytest.raises(ConfigError):
        SyntheticSource(10)


def test_unreachable_broker_is_a_clear_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    from coordinator.broker import free_port
    from demos.cli import main

    port = free_port()
    with pytest.raises(TransportError, match=f"127.0.0.1:{port} is unreachable"):
        check_broker(f"mqtt://127.0.0.1:{port}", timeout=1.0)
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")  # past the display check; no window opens
    rc = main(["label", "--source", "synthetic", "--size", "96", "--broker", f"mqtt://127.0.0.1:{port}",
               "--data-dir", str(tmp_path)])
    assert rc == 1
    assert f"edgeci label: error: broker mqtt://127.0.0.1:{port} is unreachable" in capsys.readouterr().err
    monkeypatch.delenv("QT_QPA_PLATFORM")
    monkeypatch.delenv("DISPLAY", raising=False)
    assert main(["label", "--source", "synthetic", "--data-dir", str(tmp_path)]) == 1
    assert "xvfb-run" in capsys.readouterr().err
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert main(["label", "--source", str(tmp_path / "nope.mp4"), "--data-dir", str(tmp_path)]) == 1
    assert "video file not found" in capsys.readouterr().err


def exit_code(argv: list[str]) -> int:
    """``edgeci ARGV``'s exit status, whether argparse exits or main() returns it."""
    from demos.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.parametrize(("flags", "error"), [
    (["--source", "{tmp}/nope.mp4"], "video file not found: {tmp}/nope.mp4"),
    (["--data-dir", "{tmp}/afile"], "--data-dir {tmp}/afile is not a folder this app can use"),
    (["--broker", "mqtt://127.0.0.1:{port}"], "broker mqtt://127.0.0.1:{port} is unreachable"),
    (["--broker", "mqtts://127.0.0.1:{port}", "--ca", "{tmp}/missing.pem"], "--ca {tmp}/missing.pem: no such file"),
    (["--bundle", "{tmp}/nope"], "--bundle/--cert/--username are for an external --broker"),
    (["--broker", "mqtt://127.0.0.1:{port}", "--bundle", "{tmp}/nope"], "{tmp}/nope"),
    (["--init", "{tmp}/missing.npz"], "--init {tmp}/missing.npz: cannot read it"),
])
def test_without_a_display_the_other_mistakes_are_said_first(flags: list[str], error: str, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The display was checked first: without one, a missing video file, a data dir that is a
    file, a broker that is down or a missing --ca / --init said only "no display", and the user
    met each of them only once the app ran under xvfb-run (helper-152). Now the display is the
    last check. (A bad bundle was already read before it: kept so.)"""
    import demos.label as label
    from coordinator.broker import free_port

    def no_backend(*a: Any) -> None:
        raise AssertionError("the backend started")

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    monkeypatch.setattr(label, "start_backend", no_backend)
    (tmp_path / "afile").write_text("")
    values = {"tmp": tmp_path, "port": free_port()}
    argv = [f.format(**values) for f in flags]
    data_dir = [] if "--data-dir" in argv else ["--data-dir", str(tmp_path / "d")]
    code = exit_code(["label", "--source", "synthetic", "--size", "96", *data_dir, *argv])
    err = capsys.readouterr().err
    assert code in (1, 2) and "edgeci label: error: " in err and error.format(**values) in err, err
    assert "no display" not in err and "Traceback" not in err, err
    # with those fixed, the display is what is left, its advice kept
    assert exit_code(["label", "--source", "synthetic", "--size", "96", "--data-dir", str(tmp_path / "d")]) == 1
    assert "no display: DISPLAY is not set" in (err := capsys.readouterr().err) and "xvfb-run -a edgeci label" in err, err


def test_a_read_only_data_dir_is_said_before_the_display(tmp_path: Path) -> None:
    """`--data-dir` was only created (mkdir): a read-only one passed, hidden behind "no display"
    on a machine without one, and failed later from the model loading. (Run as an ordinary user:
    root may write anywhere.)"""
    base = Path(tempfile.mkdtemp(prefix="edgeci-ro-"))  # (pytest's tmp_path is root's alone)
    try:
        base.chmod(0o755)
        read_only = base / "ro"
        read_only.mkdir(mode=0o555)
        read_only.chmod(0o555)
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "QT_QPA_PLATFORM")}
        env.update(PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1", EDGECI_HOME=str(base), HOME=str(base))
        as_nobody = (lambda: (os.setgroups([]), os.setgid(65534), os.setuid(65534))) if os.geteuid() == 0 else None
        proc = subprocess.run([sys.executable, "-m", "demos.cli", "label", "--source", "synthetic", "--size", "96",
                               "--data-dir", str(read_only)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120, preexec_fn=as_nobody)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == f"edgeci label: error: --data-dir {read_only} is not a folder this app can use: Permission denied\n", proc.stderr
        assert list(read_only.iterdir()) == []
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize(("flags", "error"), [
    (["--seed", "-1"], "argument --seed: must be at least 0"),
    (["--fps", "nan"], "argument --fps: must be at least 0.1"),
    (["--fps", "1e-9"], "argument --fps: must be at least 0.1"),
    (["--fps", "inf"], "argument --fps: must be a finite number"),
    (["--min-samples", "0"], "argument --min-samples: must be at least 1"),
    (["--gesture-min-samples", "-3"], "argument --gesture-min-samples: must be at least 1"),
])
def test_absurd_numbers_are_refused_by_the_parser(flags: list[str], error: str,
                                                  capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`--seed -1` ended in numpy's ValueError traceback, `--fps nan` / `--fps 1e-9` in one from
    the window loop after the models had loaded (helper-117): each is now argparse's one line."""
    from demos.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["label", *flags, "--data-dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert error in err and "Traceback" not in err, err


def test_a_bundle_without_broker_is_that_mistake_said_before_the_backend_starts(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`edgeci label --bundle DIR` without --broker started the embedded broker and both
    coordinators, loaded YOLOv8n, then said "DIR is not an edgeci bundle" for a mistyped DIR
    instead of the mistake itself (helper-117)."""
    from demos.cli import main

    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")  # past the display check; no window opens
    rc = main(["label", "--source", "synthetic", "--size", "96", "--bundle", str(tmp_path / "nope"),
               "--data-dir", str(tmp_path / "d")])
    captured = capsys.readouterr()
    assert rc == 1 and "are for an external --broker" in captured.err, captured.err
    assert "loading YOLOv8n" not in captured.out and not (tmp_path / "d" / "coordinator").exists()


def test_help_says_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    """The window's keys were only in the README and the bottom bar, not in --help (helper-117)."""
    from demos.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["label", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for words in ("drag a box, then a digit for its class", "u undoes", "space pauses", "g switches",
                  "s saves a snapshot", "q or Esc quits"):
        assert words in out, words


def test_a_data_dir_that_is_a_file_is_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """`--data-dir FILE` ended in NotADirectoryError from ultralytics' config set-up (helper-117)."""
    from demos.cli import main

    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")  # past the display check; no window opens
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["label", "--source", "synthetic", "--size", "96", "--data-dir", str(afile)]) == 1
    err = capsys.readouterr().err
    assert f"edgeci label: error: --data-dir {afile} is not a folder" in err and "Traceback" not in err, err


@pytest.mark.parametrize(("flags", "fits"), [(["--size", "1024", "--zoom", "8"], "3.6"), (["--size", "640", "--zoom", "7"], "5.8")])
def test_a_window_over_4096_pixels_is_a_usage_error_before_the_backend_starts(
        flags: list[str], fits: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--zoom 8 --size 1024` was accepted and drew an 8192-pixel window, ~200 MB a frame (helper-117)."""
    import demos.label as label
    from demos.cli import main

    def no_backend(*a: Any) -> None:
        raise AssertionError("the backend started")

    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")  # past the display check; no window opens
    monkeypatch.setattr(label, "start_backend", no_backend)
    assert main(["label", "--source", "synthetic", *flags, "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "edgeci label: error: --zoom" in err and f"over 4096 pixels a side: use --zoom {fits} or less" in err, err


# ---------------------------------------------------------------------- the detection device


@pytest.fixture(scope="module")
def tiny_detection(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("ultralytics")
    from edge_sdk.tasks.detection import DetectionConfig, DetectionTask

    return DetectionTask(DetectionConfig(imgsz=64, scene_size=64, pretrain_scenes=8, pretrain_epochs=1,
                                         pool_scenes=4, test_scenes=4),
                         data_dir=tmp_path_factory.mktemp("detection"))


# DetectionTask.load_vector hands the read-only weights decoded from the wire to
# torch.from_numpy, which warns (once) that it does not support read-only arrays; it only
# reads them. Reported to the detection task's owner; the filter goes when that is fixed.
@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable:UserWarning")
def test_detection_device_stores_frames_and_trains_through_the_sdk(tiny_detection: Any, mosquitto: Any,
                                                                   tmp_path: Path) -> None:
    """EdgeClient with a detection task: frames + boxes in, a pull at D_min, a local YOLO
    fine-tune on the stored frames, an accepted update, the samples marked as used."""
    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
    from edge_sdk.client import EdgeClient
    from edge_sdk.tasks.base import TrainConfig
    from edge_sdk.tasks.scenes import make_scenes, new_class_config

    task = tiny_detection
    scenes = make_scenes(3, seed=5, config=new_class_config(64))
    daemon = CoordinatorDaemon(
        CoordinatorOptions(broker=mosquitto.url, region="det", state_dir=tmp_path / "c", model="detection",
                           strategy_params={"k": 1, "timeout_s": 5.0}),
        task=task,
    )
    outcome: list[tuple[str, dict[str, Any]]] = []
    done = threading.Event()

    def on_outcome(kind: str, data: dict[str, Any]) -> None:
        outcome.append((kind, data))
        done.set()
    with daemon, EdgeClient(broker=mosquitto.url, device_id="cam", region="det", task=task,
                            data_dir=tmp_path / "d", min_samples=2,
                            train=TrainConfig(epochs=1, batch_size=2, lr=1e-3)) as client:
        client.on("update_acked", on_outcome)
        client.on("training_failed", on_outcome)
        assert client.sample_kind == "frame"
        with pytest.raises(LocalProtocolError, match="add_frame"):
            client.add_sample(scenes.images[0], 0)
        for image, boxes in zip(scenes.images[:2], scenes.boxes[:2]):
            client.add_frame(image, boxes)
        assert done.wait(120), "no update was acknowledged"
        kind, data = outcome[0]
        assert kind == "update_acked" and data["status"] == "accepted", outcome
        assert client.version is not None
        with pytest.raises(LocalProtocolError, match="OnnxDetector"):
            client.predict(scenes.images[:1])
        stored = list(client.store.frames())
        assert len(stored) == 2 and np.array_equal(stored[1][1], scenes.boxes[1])
        assert client.store.unused_count() == 0  # both frames went into the update
    gestures = EdgeClient(broker=mosquitto.url, device_id="g", region="det", task="gestures", durable=False)
    try:
        with pytest.raises(LocalProtocolError, match="add_frame is for detection devices"):
            gestures.add_frame(scenes.images[0], scenes.boxes[0])
    finally:
        gestures.stop()


# ---------------------------------------------------------------------- the app, as a person uses it


@pytest.fixture
def xvfb() -> Iterator[str]:
    """A private X server, stopped afterwards. Its display number is drawn at random from a
    high range and claimed by Xvfb's own lock file (a taken number makes Xvfb exit; we draw
    again): ``-displayfd`` alone searches from :0 and races with concurrent test runs."""
    exe = shutil.which("Xvfb")
    if exe is None or shutil.which("xdotool") is None:
        pytest.skip("needs Xvfb and xdotool (apt-get install xvfb xdotool; `make setup` does it)")
    rng = random.Random()
    for _ in range(20):
        number = rng.randrange(200, 5000)
        if Path(f"/tmp/.X{number}-lock").exists() or Path(f"/tmp/.X11-unix/X{number}").exists():
            continue
        read_fd, write_fd = os.pipe()
        # -displayfd: Xvfb writes the number there once it accepts clients.
        # -s 0 -dpms: no screen saver or power saving; -noreset: no server regeneration
        # when the last client disconnects (each xdotool call is a client)
        proc = subprocess.Popen(
            [exe, f":{number}", "-displayfd", str(write_fd), "-screen", "0", "1280x900x24",
             "-nolisten", "tcp", "-s", "0", "-dpms", "-noreset"],
            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(write_fd)
        try:
            ready, _, _ = select.select([read_fd], [], [], 20)
            started = ready and os.read(read_fd, 32).decode().strip() == str(number)
            if started and proc.poll() is None:
                yield f":{number}"
                return
        finally:
            os.close(read_fd)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    pytest.fail("could not start Xvfb on a free display")


class AppProcess:
    """``edgeci label`` as a child process; its merged output read line by line."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, pattern: str, timeout: float = 30.0, *, anytime: bool = False) -> re.Match[str]:
        """The next output line matching ``pattern`` (earlier lines are consumed); with
        ``anytime``, also a line already consumed (for output that comes asynchronously)."""
        if anytime:
            for earlier in self.seen:
                if m := re.search(pattern, earlier):
                    return m
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n"
                                     + "\n".join(self.seen[-40:])) from None
            if line is None:
                self.lines.put(None)
                raise AssertionError(f"the app exited ({self.proc.poll()}) before {pattern!r}; output:\n"
                                     + "\n".join(self.seen[-40:]))
            self.seen.append(line)
            if m := re.search(pattern, line):
                return m

    def output(self) -> str:
        """Everything printed so far (drains the queue into ``seen``)."""
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self.lines.put(None)
                break
            self.seen.append(line)
        return "\n".join(self.seen[-40:])

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return rc


def poll(what: str, probe: Callable[[], Any], app: AppProcess, timeout: float = 20.0) -> Any:
    """``probe()`` until it returns something other than ``None`` or ``""``, while the app runs."""
    deadline = time.monotonic() + timeout
    while (result := probe()) is None or (isinstance(result, str) and not result):
        rc = app.proc.poll()
        if rc is not None or time.monotonic() > deadline:
            state = f"the app exited with {rc}" if rc is not None else f"timed out after {timeout} s"
            raise AssertionError(f"waiting for {what}: {state}; its output:\n{app.output()}")
        time.sleep(0.05)
    return result


def test_person_labels_boxes_and_a_gesture_in_the_window(xvfb: str, mosquitto: Any, tiny_detection: Any,
                                                         tmp_path: Path) -> None:
    from PIL import Image, ImageGrab  # Pillow with XCB: comes with matplotlib / ultralytics

    from edge_sdk.modelio import save_model
    from edge_sdk.store import SampleStore

    data = tmp_path / "device"
    # a deployed model already on the device (same spec as the app's detector): live
    # detection exports it to ONNX and runs it while the person labels
    task = tiny_detection
    save_model(data / "detect" / "deployed.npz", task.spec, task.initial_weights(), {"version": 0})
    env = {**os.environ, "DISPLAY": xvfb, "QT_QPA_PLATFORM": "xcb", "OMP_NUM_THREADS": "1",
           "EDGECI_HOME": str(tmp_path / "sdk")}
    app = AppProcess([sys.executable, "-m", "demos.cli", "-v", "label", "--source", "synthetic", "--size", "240",
                      "--zoom", "2", "--broker", mosquitto.url, "--region", "t", "--device-id", "tester",
                      "--data-dir", str(data), "--min-samples", "64"], env)

    def xdo(*args: str, check: bool = True) -> str:
        out = subprocess.run(["xdotool", *args], env=env, capture_output=True, text=True, timeout=20)
        if check:
            assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    try:
        app.expect(r"ready: synthetic 240x240 shown at 2x", timeout=90)
        window = poll("the window", lambda: xdo("search", "--onlyvisible", "--name", "^edgeci label$", check=False), app)
        window = window.split()[0]
        geometry = xdo("getwindowgeometry", "--shell", window)
        geo = dict(line.split("=") for line in geometry.splitlines())
        x0, y0, width, height = (int(geo[k]) for k in ("X", "Y", "WIDTH", "HEIGHT"))
        assert width >= 480 + 300 and height >= 480  # image at 2x plus the panel

        def mouse_drag(a: tuple[int, int], b: tuple[int, int], steps: int = 4) -> None:
            moves: list[str] = []
            for i in range(1, steps + 1):
                px, py = (round(a[k] + (b[k] - a[k]) * i / steps) for k in (0, 1))
                moves += ["mousemove", "--window", window, str(px), str(py), "sleep", "0.02"]
            xdo("mousemove", "--window", window, str(a[0]), str(a[1]), "mousedown", "1", *moves, "mouseup", "1")

        def press(name: str, *, check: bool = True) -> None:
            xdo("key", "--window", window, name, check=check)

        def grab_when(shows: Callable[[np.ndarray], bool]) -> Callable[[], np.ndarray | None]:
            """A probe: the window's pixels from the X server, once they show something
            (the last grab is kept in ``last-grab.png`` to see what it showed instead)."""
            def probe() -> np.ndarray | None:
                shot = ImageGrab.grab(xdisplay=xvfb).crop((x0, y0, x0 + width, y0 + height))
                pixels = np.asarray(shot.convert("RGB"))
                if shows(pixels):
                    return pixels
                shot.save(tmp_path / "last-grab.png")
                return None
            return probe

        # Qt5 on a bare X server (no window manager) now and then misses the first Expose of a
        # window mapped while the machine is busy, and then never draws it (seen ~1 run in 15
        # with two test runs in parallel on 2 cores). A window manager maps windows itself;
        # here, if nothing is drawn within 3 s, the window is mapped once more.
        painted = grab_when(lambda px: bool(px.std() > 5))
        try:
            poll("the window's first paint", painted, app, timeout=3)
        except AssertionError:
            xdo("windowunmap", "--sync", window)
            xdo("windowmap", "--sync", window)
            poll("the window's first paint after mapping it again", painted, app)

        # 1. live feed: drag a box, press its class -> frame + box stored at once
        mouse_drag((40, 50), (120, 130))
        app.expect(r"box \(20, 25, 61, 66\): press 0-4")
        press("4")
        first = app.expect(r"saved frame (\d+) boxes=(\[\[.*\]\]) \(star\); frames 1 / 64")
        # 2. a box undone is not stored
        mouse_drag((200, 200), (260, 260))
        app.expect(r"press 0-4 for its class")
        press("u")
        app.expect(r"box dropped")
        # 3. pause, box two objects of one frame, screenshot mid-way, save both
        press("space")
        app.expect(r"paused")
        mouse_drag((300, 40), (400, 140))
        app.expect(r"box \(150, 20, 201, 71\)")
        press("1")
        app.expect(r"1 box\(es\) on this frame")
        mouse_drag((60, 300), (180, 420))
        app.expect(r"box \(30, 150, 91, 211\)")
        yellow = np.array(YELLOW[::-1])  # RGB on screen
        shot = poll("the pending box on screen", grab_when(
            # its 2-px edge and the "class?" tag above it, not the 1-px rubber band of the drag
            lambda px: bool(np.abs(px[288:420, 61].astype(int) - yellow).sum(axis=1).max() < 40)), app)
        Image.fromarray(shot).save(tmp_path / "label-window-boxes.png")
        press("0")  # HighGUI keeps one key per waitKey: wait for each answer, as a person does
        app.expect(r"2 box\(es\) on this frame")
        press("space")
        second = app.expect(r"saved frame (\d+) boxes=(\[\[.*\]\]) \(square, circle\); frames 2 / 64")
        # 4. gesture mode: draw a right swipe, label it swipe_right
        press("g")
        app.expect(r"gesture mode")
        mouse_drag((100, 240), (400, 250), steps=12)
        app.expect(r"gesture of \d+ points: press 0-7")
        magenta = np.array(MAGENTA[::-1])
        gesture_shot = poll("the stroke on screen", grab_when(
            lambda px: bool((np.abs(px[230:260, 200:300].astype(int) - magenta).sum(axis=2) < 40).any())), app)
        Image.fromarray(gesture_shot).save(tmp_path / "label-window-gesture.png")
        press("1")
        app.expect(r"saved gesture (\d+) label=1 \(swipe_right\); gestures 1 / 16")
        # 5. the app's own snapshot key, and live detection of the pre-deployed model
        press("s")
        snapshot = Path(app.expect(r"snapshot (\S+\.png)")[1])
        app.expect(r"live detection: model v0 \(onnxruntime\)", timeout=60, anytime=True)
        press("q", check=False)  # the window may be gone before xdotool sends the key's release
        assert app.proc.wait(60) == 0, "\n".join(app.seen[-30:])
    finally:
        rc = app.close()
    assert rc == 0

    # what the person saw: a real window with the feed, the panel and the pending box
    png = tmp_path / "label-window-boxes.png"
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (height, width, 3)
    assert image.std() > 25 and len(np.unique(image.reshape(-1, 3), axis=0)) > 2000
    assert image[:480, :480].std() > 15  # the scene, not a blank image area
    saved = cv2.imread(str(snapshot))
    assert saved is not None and saved.shape == (height, width, 3)

    # what the device stored: frames with boxes mapped from window to frame pixels
    with SampleStore.open(data / "detect" / "samples.sqlite3") as store:
        frames = list(store.frames())
        assert store.count("frame") == 2
    assert [f.shape for f, _ in frames] == [(240, 240, 3), (240, 240, 3)]
    assert all(f.std() > 10 for f, _ in frames)
    expected = [np.array([[4, 20, 25, 61, 66]]), np.array([[1, 150, 20, 201, 71], [0, 30, 150, 91, 211]])]
    for (_, boxes), want in zip(frames, expected):  # whole window pixels map exactly
        assert np.array_equal(boxes, want), (boxes, want)
    assert json.loads(first[2]) == [[4, 20, 25, 61, 66]] and len(json.loads(second[2])) == 2
    with SampleStore.open(data / "gesture" / "samples.sqlite3") as store:
        x, y = store.gestures()
    assert x.shape == (1, LENGTH, 4) and y.tolist() == [1]
    assert x[0, -1, 0] - x[0, 0, 0] > 1.4 and np.abs(x[0, :, 1]).max() < 0.2  # left to right, level


def test_a_snapshot_that_cannot_be_written_is_a_notice_not_a_crash(tmp_path: Path) -> None:
    """`s` with no room for (or a file in place of) the snapshots folder raised OSError out of
    the window loop: the app died with a traceback, a paused frame's boxes with it (helper-117)."""
    from demos.label import LabelApp

    (tmp_path / "snapshots").write_text("")
    app = LabelApp.__new__(LabelApp)  # only what _snapshot reads: no window, no backend
    app.data_dir, app.canvas, app._snapshots, app.notice = tmp_path, np.zeros((8, 8, 3), np.uint8), 0, None
    app._snapshot()
    assert app.notice is not None and app.notice[1].error
    assert "could not write a snapshot" in app.notice[1].text


def test_sigterm_keeps_a_paused_frames_boxes_as_q_does(xvfb: str, mosquitto: Any, tmp_path: Path) -> None:
    """README: "q / Esc quit; SIGTERM stops it the same way", and q saves a paused frame's boxes
    ("labelled on purpose"). SIGTERM dropped them: exit 143, nothing stored (helper-117)."""
    from edge_sdk.store import SampleStore

    data = tmp_path / "device"
    env = {**os.environ, "DISPLAY": xvfb, "QT_QPA_PLATFORM": "xcb", "OMP_NUM_THREADS": "1",
           "EDGECI_HOME": str(tmp_path / "sdk")}
    app = AppProcess([sys.executable, "-m", "demos.cli", "-v", "label", "--source", "synthetic", "--size", "240",
                      "--zoom", "2", "--broker", mosquitto.url, "--region", "t", "--device-id", "tester",
                      "--data-dir", str(data)], env)

    def xdo(*args: str) -> str:
        out = subprocess.run(["xdotool", *args], env=env, capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    try:
        app.expect(r"ready: synthetic 240x240 shown at 2x", timeout=90)
        window = poll("the window", lambda: xdo("search", "--onlyvisible", "--name", "^edgeci label$"), app).split()[0]
        xdo("key", "--window", window, "space")
        app.expect(r"paused")
        xdo("mousemove", "--window", window, "40", "50", "mousedown", "1", "mousemove", "--window", window, "80", "90",
            "sleep", "0.05", "mousemove", "--window", window, "120", "130", "mouseup", "1")
        app.expect(r"box \(20, 25, 61, 66\)")
        xdo("key", "--window", window, "3")
        app.expect(r"1 box\(es\) on this frame")
        app.proc.terminate()
        assert app.proc.wait(60) == 128 + signal.SIGTERM
        app.expect(r"saved frame \d+ boxes=\[\[3, 20, 25, 61, 66\]\]", timeout=5, anytime=True)
    finally:
        app.close()
    with SampleStore.open(data / "detect" / "samples.sqlite3") as store:
        frames = list(store.frames())
    assert len(frames) == 1 and frames[0][1].tolist() == [[3, 20, 25, 61, 66]]


def test_sigterm_stops_the_embedded_backend_as_quitting_does(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`kill <edgeci label>` ended the app at once and left both embedded coordinators running
    (parent PID 1), one still pretraining (helper-85): SIGTERM now unwinds like `q`."""
    import argparse
    import signal
    import types

    import demos.label as label

    stopped: list[str] = []
    source = types.SimpleNamespace(name="fake", read=lambda t: np.zeros((60, 80, 3), np.uint8), close=lambda: stopped.append("source"))
    backend = types.SimpleNamespace(detect=None, detect_task=types.SimpleNamespace(config=types.SimpleNamespace(n_classes=5)),
                                    stop=lambda: stopped.append("backend"))

    class App:
        def __init__(self, **kw: Any) -> None:
            pass

        def run(self) -> int:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler interrupts this
            return 0

    monkeypatch.setattr(label, "check_display", lambda: None)
    monkeypatch.setattr(label, "check_backend", lambda args, data_dir: False)  # (no broker flags in these args)
    monkeypatch.setattr(label, "open_source", lambda *a, **k: source)
    monkeypatch.setattr(label, "start_backend", lambda args, data_dir: backend)
    monkeypatch.setattr(label, "LabelApp", App)
    args = argparse.Namespace(device_id="tester", fps=10.0, zoom=None, data_dir=tmp_path, source="synthetic", size=80, seed=0,
                              mode="detect")
    def unhandled(signum: int, frame: object) -> None:  # what would have killed the app (and this test run)
        raise AssertionError("run() left SIGTERM to the default action")

    original = signal.signal(signal.SIGTERM, unhandled)
    try:
        started = time.monotonic()
        with pytest.raises(SystemExit) as exit_:
            label.run(args)
        assert exit_.value.code == 128 + signal.SIGTERM and time.monotonic() - started < 5
        assert stopped == ["source", "backend"] and signal.getsignal(signal.SIGTERM) is unhandled
    finally:
        signal.signal(signal.SIGTERM, original)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_embedded_coordinators_die_with_a_killed_app(tmp_path: Path) -> None:
    """Even a kill -9 of the app (no handler runs) takes its coordinator processes with it, also one
    that would not act on SIGTERM yet (helper-87: a pretraining coordinator went on for minutes)."""
    script = (
        "import sys, os, time\n"
        "from pathlib import Path\n"
        "from demos.label import CoordinatorProcess\n"
        # the child ignores SIGTERM, as a coordinator still pretraining in effect does (it acts on it once it is up)
        f"p = CoordinatorProcess('x', [sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"print(chr(114) * 3, flush=True); time.sleep(60)'], env=dict(os.environ), "
        f"log_path=Path({str(tmp_path / 'c.log')!r})).start()\n"
        "print(p._proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    app = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert app.stdout is not None
        child = int(app.stdout.readline())
        log = tmp_path / "c.log"
        deadline = time.monotonic() + 30
        while not (log.exists() and "rrr" in log.read_text()):  # its SIGTERM handler is set
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.02)
        os.kill(child, 0)  # running
        app.kill()
        app.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            with open(f"/proc/{child}/stat") as f:  # a zombie (reaped by init shortly) counts as gone
                if f.read().split(") ")[1].startswith("Z"):
                    break
            time.sleep(0.05)
        else:
            os.kill(child, 9)
            pytest.fail("the coordinator outlived the killed app")
    finally:
        if app.poll() is None:
            app.kill()
            app.wait(10)
        if app.stdout is not None:
            app.stdout.close()


def test_an_init_that_is_not_a_detector_is_refused_before_the_window_opens(capsys: pytest.CaptureFixture[str],
                                                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`edgeci label --init <a digits model>` printed "ready" and opened the window while the
    embedded detector coordinator had exited on it; the device then pulled for ever (helper-85)."""
    from demos.cli import main
    from edge_sdk.modelio import save_model
    from edge_sdk.tasks import get_task

    digits = get_task("digits")
    wrong = tmp_path / "digits.npz"
    save_model(wrong, digits.spec, np.zeros(digits.spec.size, np.float32), {"version": 0})
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")  # past the display check
    rc = main(["label", "--source", "synthetic", "--size", "96", "--data-dir", str(tmp_path / "d"), "--init", str(wrong)])
    err = capsys.readouterr()
    assert rc == 1 and "edgeci label: error: " in err.err and "digits" in err.err, err.err
    assert "ready:" not in err.out


def test_an_init_a_detector_with_versions_will_not_use_is_said(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A detector state dir that holds versions goes on from them and ignores --init, even a
    missing file: only the coordinator child's log said so, out of sight (helper-117)."""
    from coordinator.broker import EmbeddedBroker
    from demos.cli import main

    (tmp_path / "d" / "coordinator" / "detection" / "versions" / "000001").mkdir(parents=True)

    def stop_here(self: object) -> None:
        raise ConfigError("stopped before the broker")

    monkeypatch.setattr(EmbeddedBroker, "start", stop_here)
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")  # past the display check
    rc = main(["label", "--source", "synthetic", "--size", "96", "--data-dir", str(tmp_path / "d"),
               "--init", str(tmp_path / "missing.npz")])
    err = capsys.readouterr().err
    assert rc == 1 and "stopped before the broker" in err, err
    assert f"note: --init {tmp_path / 'missing.npz'} is not used: " in err and "already holds the detector's versions" in err


def test_a_missing_camera_is_one_line_not_a_page_of_opencv_warnings(capfd: pytest.CaptureFixture[str]) -> None:
    """With no camera, OpenCV's backends printed ~10 WARN/ERROR lines before the app's own
    clear one (helper-85); the probe runs with OpenCV's logging silenced, then restored."""
    level = cv2.utils.logging.getLogLevel()
    with pytest.raises(ConfigError, match="camera 97 did not open"):
        open_source("97", size=96, seed=0)
    err = capfd.readouterr().err
    assert "VIDEOIO" not in err and "WARN" not in err, err
    assert cv2.utils.logging.getLogLevel() == level


def test_a_paused_frame_the_store_refuses_keeps_its_boxes_and_its_frame(tmp_path: Path) -> None:
    """helper-117: with the store refusing (disk full), space on a paused frame with boxes said
    "not saved" and went live: the boxes and the frame they were drawn on were gone."""
    from demos.label import Backend, LabelApp
    from edge_sdk.store import DEFAULT_MAX_FRAME_BYTES
    from tests.helpers import close_unstarted, unstarted_client

    client = unstarted_client(tmp_path, task="detection", min_samples=64)
    try:
        app = LabelApp.__new__(LabelApp)  # only what _dispatch and _save_frame read: no window
        app.backend, app.notice, app.class_names = Backend(broker_url="mqtt://127.0.0.1:1", detect=client), None, NAMES
        app.session, app._counts = session(), (0, 0)
        side = int((DEFAULT_MAX_FRAME_BYTES / 3) ** 0.5) + 8
        refused = np.zeros((side, side, 3), np.uint8)  # over the store's frame cap: refused, as a full disk is
        app.held, app.shown = None, refused
        app._dispatch(Key(code=ord(" ")))
        assert app.held is refused
        for a, b, cls in [((10, 10), (60, 60), "1"), ((100, 100), (200, 160), "0")]:
            for ev in (MouseDown(x=a[0], y=a[1], t=0), MouseUp(x=b[0], y=b[1], t=0.1)):
                app._dispatch(ev)
            app._dispatch(Key(code=ord(cls)))
        app._dispatch(Key(code=ord(" ")))  # save: refused
        assert client.store.count("frame") == 0
        assert app.notice is not None and app.notice[1].error and "not saved" in app.notice[1].text
        assert app.session.state.paused and app.session.state.draft == [(1, 5, 5, 31, 31), (0, 50, 50, 101, 81)]
        assert app.held is refused  # still the frame they were drawn on
        app.held = np.zeros((180, 240, 3), np.uint8)  # (room again; the same frame, smaller)
        app._dispatch(Key(code=ord(" ")))
        assert client.store.count("frame") == 1 and not app.session.state.draft and app.held is None
        [(_, stored_boxes, *_)] = list(client.store.frames())
        assert stored_boxes.tolist() == [[1, 5, 5, 31, 31], [0, 50, 50, 101, 81]]
    finally:
        close_unstarted(client)


def test_a_frame_the_store_refuses_is_said_on_the_terminal_too(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """A refused save ("not saved: database or disk is full", seen with the data dir on a full
    tmpfs) was only a notice in the window and an INFO line: at the default log level the
    terminal showed each "saved frame" line but none of the failures (helper-117)."""
    import logging

    from demos.label import Backend, LabelApp
    from edge_sdk.store import DEFAULT_MAX_FRAME_BYTES
    from tests.helpers import close_unstarted, unstarted_client

    client = unstarted_client(tmp_path, task="detection", min_samples=64)
    try:
        app = LabelApp.__new__(LabelApp)  # only what _save_frame reads: no window
        app.backend, app.notice, app.class_names = Backend(broker_url="mqtt://127.0.0.1:1", detect=client), None, NAMES
        app.session = session()
        side = int((DEFAULT_MAX_FRAME_BYTES / 3) ** 0.5) + 8
        app.held, app.shown = np.zeros((side, side, 3), np.uint8), None  # over the store's frame cap: refused
        with caplog.at_level(logging.WARNING, logger="edgeci.label"):
            app._save_frame(SaveFrame(boxes=((1, 2, 2, 20, 20),)))
        assert client.store.count("frame") == 0
        assert app.notice is not None and app.notice[1].error and "not saved" in app.notice[1].text
        assert [r.levelno for r in caplog.records if "not saved" in r.getMessage()] == [logging.WARNING]
    finally:
        close_unstarted(client)


def test_quitting_after_a_refused_save_says_which_boxes_are_lost_and_snapshots_them(
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """q on a paused frame whose save the store had refused tried once more and, refused again,
    said only "not saved: ..." (a notice in a window about to close): nothing said that the
    frame's boxes were gone, nor which. Now the terminal says how many and which, and the
    window, which still shows them, is written to --data-dir/snapshots as `s` does."""
    import logging

    from demos.label import Backend, LabelApp
    from edge_sdk.store import DEFAULT_MAX_FRAME_BYTES
    from tests.helpers import close_unstarted, unstarted_client

    client = unstarted_client(tmp_path, task="detection", min_samples=64)
    try:
        app = LabelApp.__new__(LabelApp)  # only what _dispatch, _save_frame and _snapshot read: no window
        app.backend, app.notice, app.class_names = Backend(broker_url="mqtt://127.0.0.1:1", detect=client), None, NAMES
        app.session, app._counts, app.running = session(), (0, 0), True
        app.data_dir, app._snapshots = tmp_path / "device", 0
        side = int((DEFAULT_MAX_FRAME_BYTES / 3) ** 0.5) + 8
        app.held, app.shown = None, np.zeros((side, side, 3), np.uint8)  # over the store's frame cap: refused
        app._dispatch(Key(code=ord(" ")))
        for a, b, cls in [((10, 10), (60, 60), "1"), ((100, 100), (200, 160), "0")]:
            for ev in (MouseDown(x=a[0], y=a[1], t=0), MouseUp(x=b[0], y=b[1], t=0.1)):
                app._dispatch(ev)
            app._dispatch(Key(code=ord(cls)))
        app._dispatch(Key(code=ord(" ")))  # save: refused, the boxes stay on the paused frame
        app.canvas = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)  # (what the window shows)
        with caplog.at_level(logging.WARNING, logger="edgeci.label"):
            app._dispatch(Key(code=ord("q")))  # refused again
        assert client.store.count("frame") == 0 and not app.running
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert said[-1].startswith(f"quitting: 2 box(es) of the paused frame were not saved (a {side}x{side} frame "), said
        assert said[-1].endswith("boxes=[[1, 5, 5, 31, 31], [0, 50, 50, 101, 81]]; a snapshot of the window shows them")
        [png] = (tmp_path / "device" / "snapshots").iterdir()
        assert f"snapshot {png}" in capsys.readouterr().out
        assert (cv2.imread(str(png)) == app.canvas).all()
    finally:
        close_unstarted(client)


def _fleet_args(*flags: str) -> argparse.Namespace:
    from demos.label import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(flags))


def test_one_identity_for_both_clients_is_refused_before_the_models_load(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """README's `edgeci label --broker mqtts://… --bundle PKI/bundles/headset-7` connected the
    detector and the gesture client under the bundle's one certificate name, which the broker
    makes the client id: each connection closed the other's every second (helper-145, a
    reconnect storm in mosquitto's log). Without a gesture identity it is now said at start."""
    from coordinator.pki import Pki
    from demos.cli import main

    pki = Pki.init(tmp_path / "pki")
    pki.issue("headset-7", "device", regions=["eu", "eu-gestures"])  # both regions: the old checks passed
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")  # past the display check; no window opens
    rc = main(["label", "--source", "synthetic", "--size", "96", "--broker", "mqtts://127.0.0.1:1",
               "--bundle", str(pki.bundle_dir("headset-7")), "--device-id", "headset-7", "--region", "eu",
               "--data-dir", str(tmp_path / "d")])
    captured = capsys.readouterr()
    assert rc == 1 and "--gesture-bundle" in captured.err and "--region eu-gestures" in captured.err, captured.err
    assert "loading YOLOv8n" not in captured.out
    rc = main(["label", "--source", "synthetic", "--size", "96", "--broker", "mqtts://127.0.0.1:1",
               "--bundle", str(pki.bundle_dir("headset-7")), "--device-id", "headset-7", "--region", "eu",
               "--gesture-bundle", str(pki.bundle_dir("headset-7")), "--data-dir", str(tmp_path / "d")])
    captured = capsys.readouterr()
    assert rc == 1 and "the detector's identity" in captured.err, captured.err
    assert "loading YOLOv8n" not in captured.out


def test_a_gesture_bundle_gives_the_gesture_client_its_own_connection(
        secure_broker: SecureBroker, tmp_path: Path) -> None:
    """With --gesture-bundle both clients stay connected to the production TLS + ACL broker, each
    under its own certificate name (the gesture client's device id is that bundle's identity: the
    client refuses a bundle issued for another)."""
    from demos.label import start_backend

    detect_bundle = secure_broker.bundle("labA", regions=("sec",))
    gesture_bundle = secure_broker.bundle("labA-g", regions=("sec-gestures",))
    args = _fleet_args("--broker", secure_broker.url, "--bundle", str(detect_bundle), "--device-id", "labA",
                       "--region", "sec", "--gesture-bundle", str(gesture_bundle))
    backend = start_backend(args, tmp_path / "d")
    try:
        assert backend.detect is not None and backend.gesture is not None
        detect, gesture = backend.detect, backend.gesture
        # (both up first: on a loaded machine the TLS connects may come after the handlers below,
        # each a "connection" event that is no drop)
        wait_until(lambda: detect.connected and gesture.connected, 30, "both clients connected")
        drops: list[str] = []
        # only the drops: the "connection" event of the connect already seen may still be on its way
        # (helper-182: 1 run in 3 under load failed on "gesture {'connected': True, ...}")
        backend.detect.on("connection", lambda kind, info: info["connected"] or drops.append(f"detect {info}"))
        backend.gesture.on("connection", lambda kind, info: info["connected"] or drops.append(f"gesture {info}"))
        time.sleep(3.0)  # one identity for both: each was closed by the other's reconnect every second
        assert backend.detect.connected and backend.gesture.connected and drops == [], drops
    finally:
        backend.stop()


def test_the_bundles_name_the_devices_and_their_regions(secure_broker: SecureBroker, tmp_path: Path) -> None:
    """`edgeci label --broker … --bundle B --gesture-bundle G` with no --device-id or --region: each
    client takes its bundle's identity and region (`edgeci pki issue` writes them into bundle.json).
    Before, the detector was 'labeller' in region 'default', refused by its own bundle check after
    YOLOv8n had loaded, and the user had to repeat what the bundles say as flags."""
    from demos.label import start_backend

    detect_bundle = secure_broker.bundle("labB", regions=("sec",))
    gesture_bundle = secure_broker.bundle("labB-g", regions=("sec-gestures",))
    args = _fleet_args("--broker", secure_broker.url, "--bundle", str(detect_bundle), "--gesture-bundle", str(gesture_bundle))
    backend = start_backend(args, tmp_path / "d")
    try:
        assert backend.detect is not None and backend.gesture is not None
        assert (backend.detect.core.config.device_id, backend.detect.region) == ("labB", "sec")
        assert (backend.gesture.core.config.device_id, backend.gesture.region) == ("labB-g", "sec-gestures")
        assert backend.detect.connected and backend.gesture.connected
    finally:
        backend.stop()


@pytest.mark.parametrize(("flags", "said"), [
    (["--device-id", "headset-8"], "--device-id headset-8 contradicts --bundle"),
    (["--region", "us"], "--region us contradicts --bundle"),
    (["--gesture-region", "us-gestures"], "--gesture-region us-gestures contradicts --gesture-bundle"),
])
def test_a_flag_that_contradicts_its_bundle_is_refused_before_the_models_load(
        flags: list[str], said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """Before, a --device-id or --region other than the bundle's was found by the client's own bundle check,
    after YOLOv8n had loaded (4-8 s here), and a --gesture-region after the detector had connected."""
    import socket as socket_

    from coordinator.pki import Pki
    from demos.cli import main

    pki = Pki.init(tmp_path / "pki")
    pki.issue("headset-7", "device", regions=["eu"])
    pki.issue("headset-7-g", "device", regions=["eu-gestures"])
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")  # past the display check; no window opens
    with socket_.socket() as listener:  # a port that takes connections: past check_broker, as a real broker
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        rc = main(["label", "--source", "synthetic", "--size", "96", "--broker", f"mqtts://127.0.0.1:{listener.getsockname()[1]}",
                   "--bundle", str(pki.bundle_dir("headset-7")), "--gesture-bundle", str(pki.bundle_dir("headset-7-g")),
                   *flags, "--data-dir", str(tmp_path / "d")])
    captured = capsys.readouterr()
    assert rc == 1 and said in captured.err, captured.err
    assert "loading YOLOv8n" not in captured.out


def test_flags_that_agree_with_the_bundles_are_kept_and_no_bundle_keeps_the_defaults(tmp_path: Path) -> None:
    from coordinator.pki import Pki
    from demos.label import resolve_identity

    pki = Pki.init(tmp_path / "pki")
    pki.issue("headset-7", "device", regions=["eu", "us"])
    args = _fleet_args("--broker", "mqtts://127.0.0.1:1", "--bundle", str(pki.bundle_dir("headset-7")), "--region", "us")
    resolve_identity(args)
    assert (args.device_id, args.region, args.gesture_region) == ("headset-7", "us", None)
    args = _fleet_args()
    resolve_identity(args)
    assert (args.device_id, args.region, args.gesture_region) == ("labeller", "default", None)
