"""The labelling app's interaction and overlay as a pure core: events in, actions and pixels out.

Theory of operation
-------------------
:class:`LabelSession` is the state machine of one person labelling a live feed. The window
driver (:mod:`demos.label`) turns HighGUI mouse callbacks and key codes into events
(:class:`MouseDown`, :class:`MouseMove`, :class:`MouseUp` in *window* pixels with the time
they happened, :class:`Key`) and performs the actions the session returns
(:class:`SaveFrame`, :class:`SaveGesture`, :class:`Snapshot`, :class:`Notice`,
:class:`Quit`). The session never touches a window, a clock, a thread or the SDK, so every
rule below is unit-tested without a display.

Box mode (detection)::

    LIVE     mouse down on the image      → hold the frame             DRAWING
    DRAWING  mouse move                   → (rubber band)              DRAWING
    DRAWING  mouse up, box big enough     →                            BOX_PENDING
    DRAWING  mouse up, a click            → Notice                     LIVE
    BOX_PENDING digit c (a class)         → SaveFrame([c, box])        LIVE
                (paused: the box joins the frame's draft instead;      LIVE, still paused)
    BOX_PENDING u                         → drop the box               LIVE
    BOX_PENDING mouse down                → drop the box, Notice       DRAWING
    LIVE     u (paused, draft non-empty)  → drop the last draft box    LIVE
    LIVE     space                        → pause (hold the frame) / resume: SaveFrame(draft)
    any      SaveFailed (after a SaveFrame, not quitting)
                                          → its boxes as the draft, Notice   LIVE, paused
    any      SaveFailed (after quitting's SaveFrame)
                                          → Notice (N boxes not saved, which), Snapshot
    any      FrameSaved                   → (the boxes are stored: forgotten)

The driver answers every :class:`SaveFrame` with :class:`FrameSaved` or :class:`SaveFailed`
(the store refused it: disk full, ...). Until then the session keeps the boxes it asked to
save; a failure puts them back on the held frame, paused, so nothing labelled is lost and
space tries again.

Gesture mode: mouse down starts a trajectory, moves extend it, mouse up resamples it to the
gesture task's ``T x 4`` (x, y, vx, vy) → GESTURE_PENDING; a digit → SaveGesture; ``u``
drops it (so does a new stroke, which says so). ``g`` switches modes (only with nothing pending), ``s`` asks for a snapshot,
``q``/Esc quit (a paused draft is saved first: those boxes were labelled on purpose; if the
store refuses them then, there is no frame to go back to: the notice lists them, and a
snapshot of the window, which shows them, is asked for).

While a frame is *held* (``session.frozen``) the driver keeps showing, and finally stores,
the frame that was on screen when the person pressed the mouse, so the box always belongs
to the pixels it was drawn on.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

import cv2
import numpy as np
import numpy.typing as npt

Mode: TypeAlias = Literal["box", "gesture"]
Box: TypeAlias = tuple[int, int, int, int]
"""``x1, y1, x2, y2`` in frame pixels; ``x2``/``y2`` are exclusive edges."""
LabelledBox: TypeAlias = tuple[int, int, int, int, int]
"""``class, x1, y1, x2, y2``: one row of the store's ``(N, 5)`` boxes."""
Point: TypeAlias = tuple[float, float, float]
"""``t, x, y``: seconds and window pixels."""

KEY_ESC: Final = 27
KEY_ENTER: Final = (10, 13)
MIN_BOX_PX: Final = 3
"""A drag smaller than this (in frame pixels, either side) is a click, not a box."""
MIN_GESTURE_PX: Final = 8.0
"""A trajectory whose extent stays under this many window pixels is not a gesture."""


# ---------------------------------------------------------------------- geometry


@dataclass(frozen=True, slots=True, kw_only=True)
class View:
    """How the frame is shown: scaled by ``scale``, top-left corner at window (0, 0)."""

    frame_w: int
    frame_h: int
    scale: float

    def __post_init__(self) -> None:
        if self.frame_w < 1 or self.frame_h < 1 or not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"bad view {self.frame_w}x{self.frame_h} at {self.scale}")

    @property
    def image_w(self) -> int:
        return round(self.frame_w * self.scale)

    @property
    def image_h(self) -> int:
        return round(self.frame_h * self.scale)

    def contains(self, wx: float, wy: float) -> bool:
        return 0 <= wx < self.image_w and 0 <= wy < self.image_h

    def to_frame(self, wx: float, wy: float) -> tuple[float, float]:
        """Window pixel → frame coordinates (continuous; the pixel's top-left corner)."""
        return wx / self.scale, wy / self.scale

    def to_window(self, fx: float, fy: float) -> tuple[int, int]:
        return round(fx * self.scale), round(fy * self.scale)


def fit_view(frame_w: int, frame_h: int, *, zoom: float | None = None, max_side: int = 640) -> View:
    """Show small frames (synthetic scenes) enlarged by a whole factor (crisp pixels, at
    most 4x) and big ones (HD webcams) reduced, so the longer side is at most about
    ``max_side`` window pixels; ``zoom`` fixes the scale instead."""
    if zoom is None:
        fit = max_side / max(frame_w, frame_h)
        zoom = float(min(4, math.floor(fit))) if fit >= 1 else fit
    return View(frame_w=frame_w, frame_h=frame_h, scale=float(zoom))


def box_from_drag(view: View, start: tuple[float, float], end: tuple[float, float], *,
                  min_px: int = MIN_BOX_PX) -> Box | None:
    """The frame-pixel box covering every window pixel between two drag corners (either
    order, clipped to the frame); ``None`` for a drag under ``min_px`` frame pixels."""
    (ax, ay), (bx, by) = start, end
    left, top = view.to_frame(min(ax, bx), min(ay, by))
    # the far corner's pixel is inside the box: its right/bottom edge is one pixel on
    right, bottom = view.to_frame(max(ax, bx) + 1, max(ay, by) + 1)
    x1 = max(0, math.floor(left))
    y1 = max(0, math.floor(top))
    x2 = min(view.frame_w, math.ceil(right - 1e-9))
    y2 = min(view.frame_h, math.ceil(bottom - 1e-9))
    if x2 - x1 < min_px or y2 - y1 < min_px:
        return None
    return x1, y1, x2, y2


def resample_gesture(points: Sequence[Point], *, length: int, gain: float,
                     min_extent: float = MIN_GESTURE_PX) -> npt.NDArray[np.float32] | None:
    """A mouse trajectory as the gesture task's ``(length, 4)`` ``x, y, vx, vy`` sequence.

    Resampled uniformly in time over the stroke (by point order if the timestamps do not
    advance); centred on its bounding box and scaled so its longer side spans 1.6, the
    extent of the task's canonical paths; y points up as in the task (screen y points
    down); velocities are per-step differences × ``gain`` as the task's generator makes
    them. ``None`` when the stroke is too short to be a gesture.
    """
    if length < 2:
        raise ValueError("length must be >= 2")
    if len(points) < 2:
        return None
    arr = np.asarray(points, dtype=np.float64)
    t, xy = arr[:, 0], arr[:, 1:3] * np.array([1.0, -1.0])
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    extent = float((hi - lo).max())
    if extent < min_extent:
        return None
    if t[-1] - t[0] > 1e-3:
        # non-decreasing, then strictly increasing by a hair so np.interp is well defined
        param = np.maximum.accumulate(t) + np.arange(t.shape[0]) * 1e-9
    else:
        param = np.arange(t.shape[0], dtype=np.float64)
    grid = np.linspace(param[0], param[-1], length)
    pos = np.stack([np.interp(grid, param, xy[:, k]) for k in range(2)], axis=1)
    pos = (pos - (lo + hi) / 2.0) * (1.6 / extent)
    vel = np.diff(pos, axis=0, prepend=pos[:1]) * gain
    return np.concatenate([pos, vel], axis=1).astype(np.float32)


# ---------------------------------------------------------------------- events and actions


@dataclass(frozen=True, slots=True, kw_only=True)
class MouseDown:
    x: float
    y: float
    t: float


@dataclass(frozen=True, slots=True, kw_only=True)
class MouseMove:
    x: float
    y: float
    t: float


@dataclass(frozen=True, slots=True, kw_only=True)
class MouseUp:
    x: float
    y: float
    t: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Key:
    """A HighGUI key code (``cv2.waitKeyEx``); -1 means none and is never sent."""

    code: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FrameSaved:
    """The driver stored the frame of the last :class:`SaveFrame`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveFailed:
    """The driver could not store the frame of the last :class:`SaveFrame` (``reason``: why)."""

    reason: str


Event: TypeAlias = MouseDown | MouseMove | MouseUp | Key | FrameSaved | SaveFailed


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveFrame:
    """Store the held frame with these boxes."""

    boxes: tuple[LabelledBox, ...]

    def __post_init__(self) -> None:
        if not self.boxes:
            raise ValueError("SaveFrame needs at least one box")


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SaveGesture:
    sequence: npt.NDArray[np.float32]
    label: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Write what the window shows to a PNG."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Notice:
    """A short message for the person (shown for a few seconds)."""

    text: str
    error: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Quit:
    pass


Action: TypeAlias = SaveFrame | SaveGesture | Snapshot | Notice | Quit


class Phase(enum.Enum):
    LIVE = "live"
    DRAWING = "drawing"
    BOX_PENDING = "box_pending"
    RECORDING = "recording"
    GESTURE_PENDING = "gesture_pending"


# ---------------------------------------------------------------------- the session


@dataclass(slots=True)
class SessionState:
    """Read-only view for the renderer; :class:`LabelSession` mutates it."""

    mode: Mode = "box"
    phase: Phase = Phase.LIVE
    paused: bool = False
    drag_start: tuple[float, float] | None = None
    drag_end: tuple[float, float] | None = None
    pending_box: Box | None = None
    draft: list[LabelledBox] = field(default_factory=list)
    trajectory: list[Point] = field(default_factory=list)
    pending_gesture: npt.NDArray[np.float32] | None = None
    saving: tuple[LabelledBox, ...] | None = None
    """The boxes of a :class:`SaveFrame` whose outcome the driver has not reported yet."""
    quitting: bool = False
    """``saving`` is the paused frame's draft, saved on the way out (:class:`Quit` follows)."""


class LabelSession:
    """The labelling interaction: ``handle(event) -> list[Action]``. See the module docstring."""

    def __init__(self, *, view: View, n_box_classes: int, n_gesture_classes: int,
                 gesture_length: int, gesture_gain: float, mode: Mode = "box") -> None:
        if not 1 <= n_box_classes <= 10 or not 1 <= n_gesture_classes <= 10:
            raise ValueError("digit keys label at most 10 classes")
        self.view = view
        self.n_box_classes = n_box_classes
        self.n_gesture_classes = n_gesture_classes
        self.gesture_length = gesture_length
        self.gesture_gain = gesture_gain
        self._s = SessionState(mode=mode)

    @property
    def state(self) -> SessionState:
        return self._s

    @property
    def frozen(self) -> bool:
        """Whether the driver must keep showing (and will store) the held frame."""
        s = self._s
        return s.mode == "box" and (s.paused or s.phase in (Phase.DRAWING, Phase.BOX_PENDING))

    def set_view(self, view: View) -> None:
        """The frame size or zoom changed (a new video): drop anything drawn on the old one."""
        if view != self.view:
            self.view = view
            self._reset()

    def n_classes(self) -> int:
        return self.n_box_classes if self._s.mode == "box" else self.n_gesture_classes

    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, Key):
            return self._on_key(event.code)
        if isinstance(event, FrameSaved | SaveFailed):
            return self._on_saved(event)
        if self._s.mode == "box":
            return self._on_box_mouse(event)
        return self._on_gesture_mouse(event)

    # ------------------------------------------------------------------ mouse

    def _on_box_mouse(self, ev: MouseDown | MouseMove | MouseUp) -> list[Action]:
        s = self._s
        if isinstance(ev, MouseDown):
            if not self.view.contains(ev.x, ev.y):
                return []
            dropped = s.pending_box if s.phase is Phase.BOX_PENDING else None
            s.phase, s.drag_start, s.drag_end, s.pending_box = Phase.DRAWING, (ev.x, ev.y), (ev.x, ev.y), None
            if dropped is not None:  # (redrawing a bad box is fine; losing one without a word was not)
                return [Notice(text=f"box {dropped} dropped unlabelled: press its class (0-{self.n_box_classes - 1}) "
                                    "before drawing the next")]
            return []
        if s.phase is not Phase.DRAWING or s.drag_start is None:
            return []
        # a drag may leave the image: clamp to its edge rather than lose the box
        end = (min(max(ev.x, 0.0), self.view.image_w - 1.0), min(max(ev.y, 0.0), self.view.image_h - 1.0))
        s.drag_end = end
        if isinstance(ev, MouseMove):
            return []
        box = box_from_drag(self.view, s.drag_start, end)
        s.drag_start = s.drag_end = None
        if box is None:
            s.phase = Phase.LIVE
            return [Notice(text="drag to draw a box (press, move, release)")]
        s.phase, s.pending_box = Phase.BOX_PENDING, box
        return [Notice(text=f"box {box}: press 0-{self.n_box_classes - 1} for its class, u to undo")]

    def _on_gesture_mouse(self, ev: MouseDown | MouseMove | MouseUp) -> list[Action]:
        s = self._s
        if isinstance(ev, MouseDown):
            dropped = s.phase is Phase.GESTURE_PENDING and s.pending_gesture is not None
            s.phase, s.trajectory, s.pending_gesture = Phase.RECORDING, [(ev.t, ev.x, ev.y)], None
            if dropped:
                return [Notice(text=f"gesture dropped unlabelled: press its class (0-{self.n_gesture_classes - 1}) "
                                    "before drawing the next")]
            return []
        if s.phase is not Phase.RECORDING:
            return []
        s.trajectory.append((ev.t, ev.x, ev.y))
        if isinstance(ev, MouseMove):
            return []
        seq = resample_gesture(s.trajectory, length=self.gesture_length, gain=self.gesture_gain)
        if seq is None:
            s.phase, s.trajectory = Phase.LIVE, []
            return [Notice(text="too short for a gesture: press, draw the stroke, release")]
        s.phase, s.pending_gesture = Phase.GESTURE_PENDING, seq
        return [Notice(text=f"gesture of {len(s.trajectory)} points: press 0-{self.n_gesture_classes - 1} to label it, u to undo")]

    # ------------------------------------------------------------------ keys

    def _on_key(self, code: int) -> list[Action]:
        s = self._s
        ch = chr(code) if 0 <= code < 256 else ""
        if code == KEY_ESC or ch == "q":
            return self._quit()
        if "0" <= ch <= "9":  # (not isdigit(): "²" is a digit to it, and int("²") raises)
            return self._label(int(ch))
        if ch == "u":
            return self._undo()
        if ch == "g":
            if s.phase is not Phase.LIVE or s.draft:
                return [Notice(text="label or undo (u) what is pending before switching modes", error=True)]
            self._reset()
            s.mode = "gesture" if s.mode == "box" else "box"
            return [Notice(text=f"{s.mode} mode")]
        if ch == " " or code in KEY_ENTER:
            return self._toggle_pause(resume_only=ch != " ")
        if ch == "s":
            return [Snapshot()]
        return []

    def _label(self, cls: int) -> list[Action]:
        s = self._s
        if cls >= self.n_classes():
            return [Notice(text=f"no class {cls}: classes are 0-{self.n_classes() - 1}", error=True)]
        if s.phase is Phase.BOX_PENDING and s.pending_box is not None:
            row = (cls, *s.pending_box)
            s.pending_box, s.phase = None, Phase.LIVE
            if s.paused:
                s.draft.append(row)
                return [Notice(text=f"{len(s.draft)} box(es) on this frame: draw more, space saves it")]
            return self._save((row,))
        if s.phase is Phase.GESTURE_PENDING and s.pending_gesture is not None:
            seq = s.pending_gesture
            s.pending_gesture, s.trajectory, s.phase = None, [], Phase.LIVE
            return [SaveGesture(sequence=seq, label=cls)]
        what = "a box" if s.mode == "box" else "a gesture"
        return [Notice(text=f"draw {what} first, then press its class")]

    def _undo(self) -> list[Action]:
        s = self._s
        if s.phase is Phase.BOX_PENDING:
            s.pending_box, s.phase = None, Phase.LIVE
            return [Notice(text="box dropped")]
        if s.phase is Phase.GESTURE_PENDING:
            s.pending_gesture, s.trajectory, s.phase = None, [], Phase.LIVE
            return [Notice(text="gesture dropped")]
        if s.phase is Phase.LIVE and s.draft:
            s.draft.pop()
            return [Notice(text=f"last box dropped ({len(s.draft)} left on this frame)")]
        return [Notice(text="nothing to undo")]

    def _toggle_pause(self, *, resume_only: bool) -> list[Action]:
        s = self._s
        if s.mode != "box" or (resume_only and not s.paused):
            return []
        if s.phase is not Phase.LIVE:
            return [Notice(text="label (0-9) or undo (u) the pending box first", error=True)]
        if not s.paused:
            s.paused = True
            return [Notice(text="paused: box several objects, then space saves the frame with all of them")]
        s.paused = False
        draft, s.draft = s.draft, []
        return self._save(tuple(draft)) if draft else [Notice(text="live")]

    def _save(self, boxes: tuple[LabelledBox, ...]) -> list[Action]:
        """SaveFrame, the boxes kept until the driver says they are stored."""
        self._s.saving = boxes
        return [SaveFrame(boxes=boxes)]

    def _on_saved(self, ev: FrameSaved | SaveFailed) -> list[Action]:
        s = self._s
        boxes, quitting, s.saving, s.quitting = s.saving, s.quitting, None, False
        if isinstance(ev, FrameSaved):
            return []
        if quitting and boxes is not None:
            rows = [list(b) for b in boxes]
            return [Notice(text=f"quitting: {len(boxes)} box(es) of the paused frame were not saved ({ev.reason}): "
                                f"boxes={rows}; a snapshot of the window shows them", error=True), Snapshot()]
        if boxes is None or s.mode != "box" or s.phase is not Phase.LIVE:
            return [Notice(text=f"not saved: {ev.reason}", error=True)]
        # back on the held frame, paused, with whatever was drafted since (nothing, in the driver)
        s.paused, s.draft = True, [*boxes, *s.draft]
        return [Notice(text=f"not saved: {ev.reason}; its {len(boxes)} box(es) stay on this paused frame: "
                            "space tries again, u drops the last", error=True)]

    def _quit(self) -> list[Action]:
        s = self._s
        draft = tuple(s.draft)
        self._reset()
        if not draft:
            return [Quit()]
        s.saving, s.quitting = draft, True  # (a refusal is then said with its boxes: there is no frame to go back to)
        return [SaveFrame(boxes=draft), Quit()]

    def _reset(self) -> None:
        s = self._s
        s.phase, s.paused, s.draft = Phase.LIVE, False, []
        s.drag_start = s.drag_end = None
        s.pending_box, s.trajectory, s.pending_gesture = None, [], None
        s.saving, s.quitting = None, False


# ---------------------------------------------------------------------- overlay


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    """What the panel reports, gathered by the driver from the SDK each frame."""

    device: str
    source: str
    model_version: int | None
    detector: str
    """Live-detection state: ``"v3 · 4 ms"``, ``"exporting v3…"``, ``"no model yet"``."""
    phase: str
    """The device's protocol phase: idle / pulling / training / pushing / deferred."""
    last_event: str
    coordinator: str
    frames: int
    frames_min: int
    gestures: int
    gestures_min: int
    gesture_version: int | None = None
    fps: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Line:
    text: str
    colour: tuple[int, int, int] = (235, 235, 235)
    """BGR."""


WHITE: Final = (235, 235, 235)
GREY: Final = (150, 150, 150)
YELLOW: Final = (0, 230, 255)
GREEN: Final = (80, 220, 80)
CYAN: Final = (255, 220, 0)
MAGENTA: Final = (255, 80, 255)
RED: Final = (60, 60, 255)
CLASS_COLOURS: Final[tuple[tuple[int, int, int], ...]] = (
    (60, 60, 240), (240, 140, 40), (60, 200, 60), (0, 170, 255), (220, 60, 220),
    (200, 200, 40), (40, 200, 200), (160, 100, 240), (120, 200, 120), (200, 120, 120),
)


def class_colour(cls: int) -> tuple[int, int, int]:
    return CLASS_COLOURS[cls % len(CLASS_COLOURS)]


def progress(count: int, minimum: int) -> str:
    """``12 / 64 until the first pull``, or ``70 (D_min 64 reached)``."""
    if count < minimum:
        return f"{count} / {minimum} until the first pull"
    return f"{count} (D_min {minimum} reached)"


def help_text(state: SessionState, n_classes: int) -> str:
    digits = f"0-{n_classes - 1}"
    if state.mode == "gesture":
        return f"drag: gesture   {digits}: label   u: undo   g: boxes   s: snapshot   q/Esc: quit"
    if state.paused:
        return f"drag: box   {digits}: class   u: undo   space: save frame + go live   s: snapshot   q: quit"
    return f"drag: box   {digits}: class   u: undo   space: pause (several boxes)   g: gestures   s: snapshot   q/Esc: quit"


def panel_lines(status: Status, state: SessionState, class_names: Sequence[str],
                gesture_names: Sequence[str], new_class: int | None = None) -> list[Line]:
    """The side panel, top to bottom: device, model, training, counters, class legend."""
    version = "no model yet" if status.model_version is None else f"v{status.model_version}"
    lines = [
        Line(text=f"device  {status.device}"),
        Line(text=f"source  {status.source}   {status.fps:.0f} fps", colour=GREY),
        Line(text=f"coordinator  {status.coordinator}", colour=GREY),
        Line(text=""),
        Line(text=f"detector  {version}", colour=GREEN if status.model_version is not None else GREY),
        Line(text=f"  live: {status.detector}", colour=GREY),
        Line(text=f"device  {status.phase}", colour=YELLOW if status.phase not in ("idle", "") else WHITE),
        Line(text=f"  {status.last_event}", colour=GREY),
        Line(text=""),
        Line(text=f"frames    {progress(status.frames, status.frames_min)}"),
        Line(text=f"gestures  {progress(status.gestures, status.gestures_min)}"),
    ]
    if status.gesture_version is not None:
        lines.append(Line(text=f"  gesture model v{status.gesture_version}", colour=GREY))
    lines.append(Line(text=""))
    if state.mode == "box":
        lines.append(Line(text="BOX MODE  - press a digit for the class", colour=YELLOW))
        for i, name in enumerate(class_names):
            suffix = "  (new)" if i == new_class else ""
            lines.append(Line(text=f"  {i}  {name}{suffix}", colour=class_colour(i)))
    else:
        lines.append(Line(text="GESTURE MODE  - press a digit", colour=MAGENTA))
        for i, name in enumerate(gesture_names):
            lines.append(Line(text=f"  {i}  {name}", colour=WHITE))
    return lines


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Overlay:
    """Everything the renderer draws besides the frame."""

    status: Status
    detections: npt.NDArray[np.float32] = field(default_factory=lambda: np.zeros((0, 6), np.float32))
    """``(k, 6)`` ``x1, y1, x2, y2, score, class`` in frame pixels."""
    notice: Notice | None = None
    class_names: tuple[str, ...] = ()
    gesture_names: tuple[str, ...] = ()
    new_class: int | None = None


PANEL_W: Final = 330
HELP_H: Final = 30
_FONT: Final = cv2.FONT_HERSHEY_SIMPLEX
_TEXT_SCALE: Final = 0.5
_LINE_H: Final = 21
_PANEL_ROWS: Final = 27
"""Rows the panel may use: the longest (gesture mode, 8 names) plus a few wrapped lines."""


def _text(img: npt.NDArray[np.uint8], text: str, org: tuple[int, int], colour: tuple[int, int, int],
          scale: float = _TEXT_SCALE, *, shadow: bool = True) -> None:
    if shadow:  # legible on any background
        cv2.putText(img, text, (org[0] + 1, org[1] + 1), _FONT, scale, (0, 0, 0), 2, cv2.LINE_AA)
    cv2.putText(img, text, org, _FONT, scale, colour, 1, cv2.LINE_AA)


def _label_tag(img: npt.NDArray[np.uint8], text: str, x: int, y: int, colour: tuple[int, int, int]) -> None:
    """A filled tag with dark text above (or inside, at the top edge) a box."""
    (tw, th), _ = cv2.getTextSize(text, _FONT, 0.45, 1)
    top = y - th - 6 if y - th - 6 >= 0 else y
    cv2.rectangle(img, (x, top), (x + tw + 6, top + th + 6), colour, -1)
    cv2.putText(img, text, (x + 3, top + th + 2), _FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)


def canvas_size(view: View) -> tuple[int, int]:
    """``(width, height)`` of the whole window: image + side panel, help bar below."""
    height = max(view.image_h, _PANEL_ROWS * _LINE_H + 40)
    return view.image_w + PANEL_W, height + HELP_H


def render(frame_rgb: npt.NDArray[np.uint8], view: View, state: SessionState, overlay: Overlay) -> npt.NDArray[np.uint8]:
    """The window's pixels (BGR): the frame scaled by ``view``, detections, what the person
    is drawing, the side panel and the help bar. Deterministic in its inputs."""
    width, height = canvas_size(view)
    canvas = np.full((height, width, 3), 32, dtype=np.uint8)
    interp = cv2.INTER_NEAREST if view.scale >= 2 else cv2.INTER_LINEAR
    image = cv2.resize(np.ascontiguousarray(frame_rgb[..., ::-1]), (view.image_w, view.image_h), interpolation=interp)
    canvas[: view.image_h, : view.image_w] = image
    img = canvas[: view.image_h, : view.image_w]  # a view: drawing on it draws on the canvas

    names = overlay.class_names
    if state.mode == "box" and not (state.paused or state.phase in (Phase.DRAWING, Phase.BOX_PENDING)):
        # detections belong to the live feed; over a held frame they would mislead
        for x1, y1, x2, y2, score, cls in overlay.detections.tolist():
            c = int(cls)
            p1, p2 = view.to_window(x1, y1), view.to_window(x2, y2)
            cv2.rectangle(img, p1, p2, class_colour(c), 2)
            name = names[c] if 0 <= c < len(names) else str(c)
            _label_tag(img, f"{name} {score:.2f}", p1[0], p1[1], class_colour(c))

    for cls, x1, y1, x2, y2 in state.draft:
        p1, p2 = view.to_window(x1, y1), view.to_window(x2, y2)
        cv2.rectangle(img, p1, (p2[0] - 1, p2[1] - 1), GREEN, 2)
        _label_tag(img, f"{cls} {names[cls] if cls < len(names) else ''}", p1[0], p1[1], GREEN)
    if state.phase is Phase.DRAWING and state.drag_start and state.drag_end:
        a = tuple(round(v) for v in state.drag_start)
        b = tuple(round(v) for v in state.drag_end)
        cv2.rectangle(img, (a[0], a[1]), (b[0], b[1]), YELLOW, 1)
    if state.pending_box is not None:
        x1, y1, x2, y2 = state.pending_box
        p1, p2 = view.to_window(x1, y1), view.to_window(x2, y2)
        cv2.rectangle(img, p1, (p2[0] - 1, p2[1] - 1), YELLOW, 2)
        _label_tag(img, f"class? 0-{max(len(names), 1) - 1}", p1[0], p1[1], YELLOW)
    if state.trajectory:
        pts = np.array([[round(x), round(y)] for _, x, y in state.trajectory], dtype=np.int32)
        colour = MAGENTA if state.phase is Phase.GESTURE_PENDING else CYAN
        cv2.polylines(img, [pts], False, colour, 3, cv2.LINE_AA)
        cv2.circle(img, (int(pts[0, 0]), int(pts[0, 1])), 5, colour, -1, cv2.LINE_AA)
    if state.phase is Phase.GESTURE_PENDING:
        _label_tag(img, f"gesture? 0-{max(len(overlay.gesture_names), 1) - 1}", 6, 24, MAGENTA)

    banner = None
    if state.mode == "gesture":
        banner = ("GESTURE MODE", MAGENTA)
    elif state.paused:
        banner = ("PAUSED - space saves the frame", YELLOW)
    elif state.phase in (Phase.DRAWING, Phase.BOX_PENDING):
        banner = ("HELD - label the box", YELLOW)
    if banner is not None:
        (tw, _), _ = cv2.getTextSize(banner[0], _FONT, 0.55, 1)
        _label_tag(img, banner[0], max(0, view.image_w - tw - 14), 24, banner[1])

    # side panel
    x0 = view.image_w + 12
    cv2.line(canvas, (view.image_w, 0), (view.image_w, height), (70, 70, 70), 1)
    _text(canvas, "edgeci label", (x0, 24), WHITE, 0.65, shadow=False)
    rows: list[Line] = []
    for line in panel_lines(overlay.status, state, overlay.class_names, overlay.gesture_names, overlay.new_class):
        rows.extend(Line(text=t, colour=line.colour) for t in wrap(line.text, PANEL_W - 24))
    y = 24 + _LINE_H + 6
    for row in rows[: _PANEL_ROWS - 2]:
        if row.text:
            _text(canvas, row.text, (x0, y), row.colour, shadow=False)
        if row.text.startswith("frames"):
            _progress_bar(canvas, overlay.status, x0, y + 5)
        y += _LINE_H

    # notice above the help bar, help bar at the bottom
    bar_top = height - HELP_H
    if overlay.notice is not None:
        colour = RED if overlay.notice.error else WHITE
        (tw, th), _ = cv2.getTextSize(overlay.notice.text, _FONT, _TEXT_SCALE, 1)
        ny = min(view.image_h, bar_top) - 10
        cv2.rectangle(canvas, (4, ny - th - 8), (min(width - 4, 16 + tw), ny + 6), (20, 20, 20), -1)
        _text(canvas, overlay.notice.text, (10, ny), colour, shadow=False)
    cv2.rectangle(canvas, (0, bar_top), (width, height), (55, 55, 55), -1)
    n = len(overlay.class_names) if state.mode == "box" else len(overlay.gesture_names)
    _text(canvas, _fit(help_text(state, max(n, 1)), width - 20), (10, bar_top + 20), WHITE, 0.48, shadow=False)
    return canvas


def _width(text: str, scale: float = _TEXT_SCALE) -> int:
    return int(cv2.getTextSize(text, _FONT, scale, 1)[0][0])


def _fit(text: str, max_w: int, scale: float = _TEXT_SCALE) -> str:
    """Cut ``text`` with an ellipsis so it fits ``max_w`` pixels."""
    if _width(text, scale) <= max_w:
        return text
    while text and _width(text + "...", scale) > max_w:
        text = text[:-1]
    return text + "..."


def wrap(text: str, max_w: int, *, max_rows: int = 2, scale: float = _TEXT_SCALE) -> list[str]:
    """``text`` on at most ``max_rows`` rows of ``max_w`` pixels, broken at spaces,
    continuation rows indented; what still does not fit ends in an ellipsis."""
    if _width(text, scale) <= max_w:
        return [text]
    rows: list[str] = []
    rest = text
    while rest and len(rows) < max_rows - 1:
        words = rest.split(" ")
        row = words[0]
        for i in range(1, len(words)):
            if _width(row + " " + words[i], scale) > max_w:
                rest = "    " + " ".join(words[i:]).lstrip()
                break
            row += " " + words[i]
        else:
            rest = ""
        rows.append(_fit(row, max_w, scale))
    if rest:
        rows.append(_fit(rest, max_w, scale))
    return rows


def _progress_bar(canvas: npt.NDArray[np.uint8], status: Status, x0: int, y: int) -> None:
    """A thin bar under the ``frames`` line: samples collected towards D_min."""
    frac = min(1.0, status.frames / max(1, status.frames_min))
    cv2.rectangle(canvas, (x0, y), (x0 + PANEL_W - 30, y + 2), (80, 80, 80), -1)
    cv2.rectangle(canvas, (x0, y), (x0 + round((PANEL_W - 30) * frac), y + 2), GREEN, -1)
