"""``edgeci label`` — label a live feed by hand; the deployed detector learns what you box.

    edgeci label --source synthetic                 # animated procedural scenes
    edgeci label --source 0                         # webcam 0
    edgeci label --source clip.mp4 --broker mqtt://10.0.0.5:1883 --region lab
    xvfb-run -a edgeci label --source synthetic     # on a machine without a display

Draw a box with the mouse (press, drag, release) and press a digit for its class: the
frame and the box are stored durably through the SDK. ``space`` pauses the feed so that
several objects of one frame can be boxed (``space`` again saves the frame with all of
them). ``g`` switches to gesture mode: a mouse-drawn stroke plus a digit is stored as a
gesture sample. ``u`` undoes, ``s`` saves a snapshot of the window, ``q``/Esc quits.

The app is one device taking part in two federations, one per task: the detector
(YOLOv8n, region ``--region``) and gestures (region ``--gesture-region``), each an
:class:`~edge_sdk.client.EdgeClient` with its own store under ``--data-dir``
(``detect/samples.sqlite3``, ``gesture/samples.sqlite3``). Without ``--broker`` it starts
the embedded broker and both coordinators in-process; the detection coordinator pretrains
the deployed detector on its first run (minutes on a CPU; cached in the data dir, or pass
``--init`` a model file from ``edgeci pretrain --model detection``). The UI is live and
labelling works meanwhile.

Everything the person does is decided by the pure :class:`demos.label_ui.LabelSession`;
this module is the driver: HighGUI window and callbacks, frame sources, the SDK clients,
and a thread that runs the deployed detector (onnxruntime) on the newest frame.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from coordinator.cli import check_init, check_init_file, holds_versions
from coordinator.config import bounded
from demos.label_ui import (
    HELP_H,
    KEY_ESC,
    PANEL_W,
    Action,
    FrameSaved,
    Key,
    LabelSession,
    MouseDown,
    MouseMove,
    MouseUp,
    Notice,
    Overlay,
    Quit,
    SaveFailed,
    SaveFrame,
    SaveGesture,
    Snapshot,
    Status,
    View,
    canvas_size,
    fit_view,
    progress,
    render,
)
from edge_sdk.errors import BadOption, ConfigError, EdgeciError, TransportError
from edge_sdk.mqtt import TOFU_DEVICES, add_broker_arguments
from edge_sdk.paths import HOME_ENV, device_dir
from edge_sdk.store import DEFAULT_MAX_FRAME_BYTES
from edge_sdk.tasks.registry import TASK_INFO

log = logging.getLogger("edgeci.label")

TITLE = "edgeci label"
MAX_WINDOW_PX = 4096
"""The window's longest side: `--zoom 8 --size 1024` drew an 8192-pixel one (about 200 MB a frame)."""
NOTICE_S = 4.0
Frame = npt.NDArray[np.uint8]


KEYS_HELP = ("in the window: drag a box, then a digit for its class; u undoes; space pauses the feed to box "
             "several objects of one frame (space again saves it); g switches to drawing gestures; s saves a "
             "snapshot of the window; q or Esc quits (SIGTERM too). Labelled frames stay in --data-dir: the "
             "device sends model updates, never frames.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = KEYS_HELP  # (the keys were only in the README and the window's bottom bar)
    p.add_argument("--source", default="synthetic",
                   help="a webcam index (0, 1, ...), a video file, or 'synthetic' (animated procedural scenes)")
    p.add_argument("--mode", choices=["detect", "gesture"], default="detect",
                   help="start boxing objects (detect) or drawing gestures; g switches")
    p.add_argument("--broker", help="mqtts://HOST[:8883] (or mqtt://HOST:PORT on a trusted network) of a broker with running coordinators (default: start an embedded trial broker on 127.0.0.1 and coordinators, whose keys the device trusts on first use)")
    add_broker_arguments(p, trust=TOFU_DEVICES)  # --bundle etc.: with --broker only
    p.add_argument("--region", help="region of the detection coordinator (default: the --bundle's region, else 'default')")
    p.add_argument("--gesture-region",
                   help="region of the gesture coordinator (default: the --gesture-bundle's region, else REGION-gestures)")
    p.add_argument("--gesture-bundle", metavar="DIR",
                   help="with --broker and a client identity (--bundle, --cert or --username): the gesture client's own "
                        "bundle, a device issued for the gesture region (the broker makes an identity's name its client "
                        "id, so the detector's and the gesture client's connections cannot share one); its identity is "
                        "the gesture client's device id and its region the default --gesture-region")
    p.add_argument("--device-id", help="this device's id (A-Z a-z 0-9 _ . -; default: the --bundle's identity, else 'labeller')")
    p.add_argument("--data-dir", type=Path,
                   help="where this device keeps its samples, models and caches (default: $EDGECI_HOME/devices/DEVICE_ID, EDGECI_HOME defaulting to ~/.edgeci)")
    p.add_argument("--min-samples", type=bounded(int, 1), default=TASK_INFO["detection"].min_samples,
                   help="D_min: frames before the first pull (default: the task's, the paper's 64 for YOLOv8)")
    p.add_argument("--gesture-min-samples", type=bounded(int, 1), default=TASK_INFO["gestures"].min_samples, help="D_min for gestures")
    p.add_argument("--init", type=Path, help="embedded coordinator: deploy this detector model file instead of pretraining one")
    p.add_argument("--size", type=bounded(int, 64, at_most=1024, rule="must be 64..1024 pixels"), default=320,
                   help="side of the synthetic scenes in pixels, 64..1024")
    p.add_argument("--zoom", type=bounded(float, 0.1, at_most=8, finite=True, rule="must be 0.1..8"), help="display scale of the frame, 0.1..8, the window at most 4096 px a side (default: fit about 640 px)")
    p.add_argument("--fps", type=bounded(float, 0.1, finite=True), default=25.0, help="frame rate cap of the window (at least 0.1)")
    p.add_argument("--seed", type=bounded(int, 0), default=0, help="synthetic scenes and training seed (>= 0)")


# ---------------------------------------------------------------------- preflight checks


DEFAULT_DEVICE_ID = "labeller"
DEFAULT_REGION = "default"


def _bundle_region(manifest: dict[str, Any]) -> str | None:
    """The region a bundle was issued for first (``edgeci pki issue --region``), None for one of any region."""
    from edge_sdk.mqtt import ANY_REGION

    region = manifest.get("region")
    if isinstance(region, str):
        return region
    regions = manifest.get("regions")  # (a manifest written before "region" was)
    if isinstance(regions, list) and regions and isinstance(regions[0], str) and regions[0] != ANY_REGION:
        return regions[0]
    return None


def _check_flag_region(flag: str, region: str, bundle_flag: str, bundle: Path, manifest: dict[str, Any]) -> None:
    from edge_sdk.mqtt import regions_outside

    if regions_outside(manifest, [region]):
        allowed = ", ".join(str(r) for r in manifest.get("regions") or ()) or "(none)"
        raise ConfigError(f"{flag} {region} contradicts {bundle_flag} {bundle}, issued for region(s) {allowed}: leave "
                          f"out {flag} (the bundle names it) or pass a bundle issued for {region}")


def resolve_identity(args: argparse.Namespace) -> None:
    """Fill ``--device-id``, ``--region`` and ``--gesture-region`` from the bundles (``--bundle``,
    ``--gesture-bundle``: ``edgeci pki issue`` writes the identity and regions into each), else the
    defaults. A flag that contradicts its bundle is a ConfigError here, before any model loads: the
    client found it only after YOLOv8n had loaded, and the user had to repeat what the bundle says.
    Bundles count with ``--broker`` only (without, :func:`_credentials` says that mistake)."""
    from edge_sdk.client import check_device_bundle
    from edge_sdk.mqtt import read_bundle

    broker, device_id = getattr(args, "broker", None), getattr(args, "device_id", None)
    region, gesture_region = getattr(args, "region", None), getattr(args, "gesture_region", None)
    if broker and getattr(args, "bundle", None):
        bundle = Path(args.bundle).expanduser()
        manifest = read_bundle(bundle)
        identity = manifest.get("identity")
        if not isinstance(identity, str):
            raise ConfigError(f"bundle {bundle} names no identity")
        if device_id is None:
            device_id = identity
        elif device_id != identity:
            raise ConfigError(f"--device-id {device_id} contradicts --bundle {bundle}, issued for {identity!r} (the "
                              "broker would refuse every topic): leave out --device-id (the bundle names it) or pass "
                              f"{device_id}'s bundle")
        if region is None:
            region = _bundle_region(manifest)
        else:
            _check_flag_region("--region", region, "--bundle", bundle, manifest)
        check_device_bundle(bundle, manifest, identity, [region or DEFAULT_REGION])  # (a device's, not a coordinator's)
    gesture_bundle = getattr(args, "gesture_bundle", None)
    if broker and gesture_bundle:
        bundle = Path(gesture_bundle).expanduser()
        manifest = read_bundle(bundle)
        if gesture_region is None:
            gesture_region = _bundle_region(manifest)
        else:
            _check_flag_region("--gesture-region", gesture_region, "--gesture-bundle", bundle, manifest)
        identity = manifest.get("identity")
        if isinstance(identity, str):  # (none: _gesture_credentials says so)
            check_device_bundle(bundle, manifest, identity, [gesture_region or f"{region or DEFAULT_REGION}-gestures"])
    args.device_id, args.region = device_id or DEFAULT_DEVICE_ID, region or DEFAULT_REGION
    args.gesture_region = gesture_region


def check_display(env: dict[str, str] | None = None, platform: str = sys.platform) -> None:
    """Fail with advice before Qt would abort the process for want of an X server."""
    env = dict(os.environ) if env is None else env
    if not platform.startswith("linux"):
        return
    qpa = env.get("QT_QPA_PLATFORM", "")
    if qpa and not qpa.startswith("xcb"):
        return  # offscreen, wayland, vnc...: the person chose a Qt platform on purpose
    display = env.get("DISPLAY", "")
    if not display:
        raise ConfigError(
            "no display: DISPLAY is not set. On a machine without a screen run the app under a "
            "virtual X server: xvfb-run -a edgeci label ..."
        )
    local = re.fullmatch(r"(?:unix)?:(\d+)(?:\.\d+)?", display)
    if local and not Path(f"/tmp/.X11-unix/X{local[1]}").exists():
        raise ConfigError(
            f"DISPLAY={display} but no X server listens there (no /tmp/.X11-unix/X{local[1]}); "
            "start it, or run the app under xvfb-run -a edgeci label ..."
        )


def check_broker(url: str, timeout: float = 3.0) -> None:
    """A clear error for a broker that is not there, before seconds of model loading."""
    from edge_sdk.mqtt import parse_broker_url

    address = parse_broker_url(url)
    try:
        socket.create_connection((address.host, address.port), timeout=timeout).close()
    except OSError as exc:
        raise TransportError(
            f"broker {address.url} is unreachable ({exc.strerror or exc}): start it "
            f"(e.g. mosquitto -p {address.port}) or leave out --broker to use the embedded one"
        ) from exc


# ---------------------------------------------------------------------- frame sources


class FrameSource(Protocol):
    name: str

    def read(self, now: float) -> Frame:
        """The RGB frame to show at ``now`` (seconds since the source opened)."""
        ...

    def close(self) -> None: ...


class SyntheticSource:
    """Procedural scenes (the detection task's own generator) seen by a slowly panning
    camera that cuts to the next scene every ``hold_s`` seconds. Every scene shows the
    class users label after deployment next to known ones. Frames are a pure function
    of time."""

    def __init__(self, size: int, *, seed: int = 0, n_scenes: int = 8, hold_s: float = 6.0) -> None:
        from edge_sdk.tasks.scenes import new_class_config, render_scene

        if not 64 <= size <= 1024:
            raise ConfigError(f"--size must be in 64..1024, got {size}")
        self.size, self.hold_s = size, hold_s
        self.margin = max(8, size // 6)
        big = size + self.margin
        self.scenes = [render_scene(np.random.default_rng([seed, i]), new_class_config(big))[0] for i in range(n_scenes)]
        self.name = f"synthetic {size}x{size}"

    def read(self, now: float) -> Frame:
        index = int(now // self.hold_s) % len(self.scenes)
        phase = (now % self.hold_s) / self.hold_s
        ox = round(self.margin * (1 - math.cos(2 * math.pi * phase)) / 2)
        oy = round(self.margin * (1 - math.cos(math.pi * phase)) / 2)
        return self.scenes[index][oy:oy + self.size, ox:ox + self.size]

    def close(self) -> None:
        pass


class CaptureSource:
    """A webcam or a video file through OpenCV; files loop at their own frame rate."""

    def __init__(self, capture: Any, name: str, *, is_file: bool) -> None:
        self._cap = capture
        self.name = name
        self._is_file = is_file
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        self._period = 1.0 / fps if is_file and 1.0 <= fps <= 240.0 else 0.0
        self._due = 0.0
        self._failures = 0
        self._raw_nbytes = 0
        first = self._grab()
        if first is None:
            raise ConfigError(f"{name}: opened, but no frame could be read")
        self._last: Frame = first
        if first.nbytes < self._raw_nbytes:
            self.name = f"{name} (scaled to {first.shape[1]}x{first.shape[0]})"
        if is_file:
            capture.set(cv2.CAP_PROP_POS_FRAMES, 0)  # that was a check: show the clip from its start

    def _grab(self) -> Frame | None:
        ok, bgr = self._cap.read()
        if not ok and self._is_file:  # end of the clip: loop
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, bgr = self._cap.read()
        if not ok or bgr is None or bgr.ndim != 3:
            return None
        self._raw_nbytes = bgr.nbytes
        return fit_frame(np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))

    def read(self, now: float) -> Frame:
        if self._is_file and now < self._due:
            return self._last
        frame = self._grab()
        if frame is None:
            self._failures += 1
            if self._failures > 50:
                raise ConfigError(f"{self.name} stopped delivering frames")
            return self._last
        self._failures, self._last = 0, frame
        self._due = max(self._due + self._period, now) if self._is_file else now
        return frame

    def close(self) -> None:
        self._cap.release()


def fit_frame(rgb: Frame, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """``rgb`` scaled down, aspect kept, to a size the device's store takes (1080p): a 1440p or
    4K camera's frames were refused at every save. Boxes are drawn on the frame as shown, so
    they are in the stored frame's pixels."""
    if rgb.nbytes <= max_bytes:
        return rgb
    scale = math.sqrt(max_bytes / rgb.nbytes)
    size = (max(1, math.floor(rgb.shape[1] * scale)), max(1, math.floor(rgb.shape[0] * scale)))
    return np.ascontiguousarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA))


def open_source(spec: str, *, size: int, seed: int) -> FrameSource:
    """``synthetic``, a webcam index, or a video file; a clear error when it cannot open."""
    if spec == "synthetic":
        return SyntheticSource(size, seed=seed)
    if spec.isdigit():
        quiet = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # each backend's probe printed WARN/ERROR lines
        try:  # before the one line below that says what is wrong
            cap = cv2.VideoCapture(int(spec))
        finally:
            cv2.utils.logging.setLogLevel(quiet)
        if not cap.isOpened():
            raise ConfigError(
                f"camera {spec} did not open: no camera with that index, or another program is using it "
                "(try another index, a video file, or --source synthetic)"
            )
        return CaptureSource(cap, f"camera {spec}", is_file=False)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"video file not found: {path} (--source takes a webcam index, a video file or 'synthetic')")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ConfigError(f"cannot open video {path}: not a format this OpenCV can decode")
    return CaptureSource(cap, f"video {path.name}", is_file=True)


# ---------------------------------------------------------------------- SDK side


_EVENT_TEXT: dict[str, Callable[[dict[str, Any]], str]] = {
    "model": lambda d: f"model v{d.get('version')} received",
    "trained": lambda d: f"trained: loss {float(d.get('loss', 0.0)):.3f} in {float(d.get('seconds', 0.0)):.0f} s",
    "update_acked": lambda d: f"update {d.get('status')} (v{d.get('version')})",
    "update_rejected": lambda d: f"update rejected: {d.get('reason')}",
    "deferred": lambda d: "pull deferred by the coordinator",
    "retry": lambda d: f"no answer yet: retrying {d.get('what')} (attempt {d.get('attempt')})",
    "training_failed": lambda d: f"training failed: {d.get('error')}",
    "message_rejected": lambda d: f"rejected a message: {d.get('reason')}",
}

_PHASE_TEXT = {
    "idle": "idle",
    "pulling": "pulling the model",
    "deferred": "waiting for the coordinator",
    "training": "training on local samples",
    "pushing": "pushing the update",
}


class EventLog:
    """SDK notifications (from the clients' actor threads) as text for the panel."""

    def __init__(self) -> None:
        self._latest: dict[str, str] = {}
        self._lock = threading.Lock()

    def listener(self, task: str) -> Callable[[str, dict[str, Any]], None]:
        def on_event(kind: str, data: dict[str, Any]) -> None:
            describe = _EVENT_TEXT.get(kind)
            text = describe(data) if describe is not None else kind
            log.info("%s device: %s", task, text)
            with self._lock:
                self._latest[task] = text

        return on_event

    def latest(self, task: str) -> str:
        with self._lock:
            return self._latest.get(task, "")


class CoordinatorProcess:
    """One embedded ``edgeci coordinator`` as a child process: pretraining the deployed
    detector takes minutes of CPU on a first run, and in a child it neither competes with
    the window for the GIL nor keeps the app from quitting (the child is simply stopped;
    the task caches the pretrained model only once it is complete)."""

    def __init__(self, what: str, argv: list[str], *, env: dict[str, str], log_path: Path) -> None:
        self.what, self._argv, self._env, self.log_path = what, argv, env, log_path
        self.status = "starting"
        self._proc: subprocess.Popen[str] | None = None
        self._stopping = False
        self._reader = threading.Thread(target=self._read, name=f"coordinator-{what}", daemon=True)

    def start(self) -> CoordinatorProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=self._env, preexec_fn=_die_with_parent)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with open(self.log_path, "a", encoding="utf-8") as out:
            for line in self._proc.stdout:
                out.write(line)
                out.flush()
                if "pretraining" in line:
                    self.status = "pretraining (first run only; long on a CPU)"
                elif ready := re.search(r" ready: region \S+, version (\d+)", line):
                    self.status = f"v{ready[1]}"
                    log.info("embedded %s coordinator serving v%s", self.what, ready[1])
        rc = self._proc.wait()
        if not self._stopping:
            self.status = f"exited ({rc}), see {self.log_path}"
            log.error("embedded %s coordinator exited with %d; its log: %s", self.what, rc, self.log_path)

    def terminate(self) -> None:
        """Ask the child to stop (the coordinator CLI stops cleanly on SIGTERM)."""
        self._stopping = True
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()

    def stop(self, timeout: float = 10.0) -> None:
        self.terminate()
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        if self._reader.is_alive():
            self._reader.join(5)
        if self._proc is not None and self._proc.stdout is not None and not self._reader.is_alive():
            self._proc.stdout.close()  # (the reader is done with it)


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
"""libc's prctl, looked up before any fork (a child between fork and exec must not import)."""


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it when the app dies, however it dies (a kill -9
    left the coordinators running with no app and no broker). Not SIGTERM: a coordinator acts on
    that only once it is up, so one still pretraining went on for minutes, holding its state dir's
    lock; with the app gone its broker is gone too, and a state dir survives a kill -9 by design.
    Linux sends it when the *thread* that started the child ends: coordinators are started on the
    main thread. Elsewhere nothing: the app's own SIGTERM / SIGINT handling stops them."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def coordinator_process(what: str, model: str, *, broker: str, region: str, data_dir: Path,
                        init: Path | None, seed: int) -> CoordinatorProcess:
    """``edgeci coordinator`` for one task, its state and caches under ``data_dir``."""
    state_dir = data_dir / "coordinator" / model
    argv = [sys.executable, "-m", "demos.cli", "coordinator", "--broker", broker, "--region", region,
            "--state-dir", str(state_dir), "--model", model, "--seed", str(seed),
            # one labelling person: every update becomes a version at once
            "--k", "1", "--timeout", "30",
            # the app's own state dir on its own embedded broker: started again under another --region, it moves
            "--take-over"]
    if init is not None:
        argv += ["--init", str(init.expanduser().resolve())]
    env = dict(os.environ)
    env[HOME_ENV] = str(data_dir)  # the detection task's cache and ultralytics' files
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) - 1)))  # a core for the window
    return CoordinatorProcess(what, argv, env=env, log_path=data_dir / "coordinator" / f"{model}.log")


class LiveDetector:
    """Runs the deployed detector on the newest submitted frame, on its own thread: the
    window never waits for inference, and a new model version (exported to ONNX once,
    a second or two) replaces the old one between frames."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._stop = False
        self._version: int | None = None
        self._failed_version: int | None = None
        self.state = "no model yet"
        self.result: tuple[int, npt.NDArray[np.float32]] | None = None
        """``(version, (k, 6) detections)`` for the latest frame processed."""
        self._thread = threading.Thread(target=self._run, name="live-detector", daemon=True)

    def start(self) -> LiveDetector:
        self._thread.start()
        return self

    def submit(self, frame: Frame) -> None:
        with self._cond:
            self._frame = frame
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(30)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._frame is not None)
                if self._stop:
                    return
                frame, self._frame = self._frame, None
            assert frame is not None
            try:
                self._step(frame)
            except Exception as exc:  # keep the window alive; say what broke
                log.exception("live detection failed")
                self.state = f"failed: {type(exc).__name__}"

    def _step(self, frame: Frame) -> None:
        version = self._client.version
        if version is None:
            self.state = "no model yet"
            return
        if version == self._failed_version:
            return
        if version != self._version:
            self.state = f"exporting v{version} to ONNX..."
        started = time.perf_counter()
        try:
            dets = self._client.detect(frame)  # exports a new version once (onnxruntime serves it)
        except Exception:
            self._failed_version = version
            raise
        if version != self._version:
            self._version = version
            print(f"live detection: model v{version} (onnxruntime)", flush=True)
        self.result = (version, dets)
        self.state = f"v{version}: {len(dets)} objects, {1000 * (time.perf_counter() - started):.0f} ms"


@dataclass
class Backend:
    """The SDK side of the app: one EdgeClient per task, and the embedded services if any."""

    broker_url: str
    broker: Any = None
    coordinators: list[CoordinatorProcess] = field(default_factory=list)
    events: EventLog = field(default_factory=EventLog)
    detect_task: Any = None
    """The :class:`~edge_sdk.tasks.detection.DetectionTask` (``Any``: it takes frames and
    boxes where the classifier ``Task`` protocol takes arrays and labels)."""
    detect: Any = None
    gesture: Any = None

    def coordinator_status(self) -> str:
        if not self.coordinators:
            return f"external, {self.broker_url}"
        return "embedded: " + ", ".join(f"{c.what} {c.status}" for c in self.coordinators)

    def stop(self) -> None:
        started = time.monotonic()
        for client in (self.detect, self.gesture):
            if client is not None:
                client.stop()
        log.debug("clients stopped in %.1f s", time.monotonic() - started)
        for coordinator in self.coordinators:
            coordinator.terminate()  # all at once: each takes seconds to wind down
        for coordinator in self.coordinators:
            coordinator.stop()
            log.debug("%s coordinator stopped after %.1f s", coordinator.what, time.monotonic() - started)
        if self.broker is not None:
            self.broker.stop()
        log.debug("backend stopped in %.1f s", time.monotonic() - started)


def check_backend(args: argparse.Namespace, data_dir: Path) -> bool:
    """What the backend needs that no model and no window does: the credentials, a reachable
    ``--broker``, a readable ``--init``. Whether ``--init`` is used (it is checked against the
    detector once that has loaded)."""
    _credentials(args)  # its mistakes before the embedded broker, its coordinators and the models start
    _gesture_credentials(args)
    if args.broker:
        if args.init is not None:
            raise ConfigError("--init sets the embedded coordinator's model; with --broker give it to "
                              "your coordinator instead (edgeci coordinator --init FILE)")
        check_broker(args.broker)
        return False
    # A detector state dir that holds versions ignores --init (the coordinator says so): only a new one is checked.
    used = args.init is not None and not holds_versions(data_dir / "coordinator" / "detection")
    if used:
        check_init_file(args.init.expanduser())
    return used


def start_backend(args: argparse.Namespace, data_dir: Path) -> Backend:
    """The embedded broker and coordinators (unless ``--broker``), the tasks, the two clients."""
    resolve_identity(args)  # (again after run(): the flags it filled agree with their bundles)
    region = args.region
    gesture_region = args.gesture_region or f"{region}-gestures"
    init_used = check_backend(args, data_dir)
    if args.broker:
        backend = Backend(broker_url=args.broker)
    else:
        from coordinator.broker import EmbeddedBroker

        detector_dir = data_dir / "coordinator" / "detection"
        if args.init is not None and not init_used:  # said here: the coordinator's log line is out of sight
            print(f"note: --init {args.init} is not used: {detector_dir} already holds the detector's versions "
                  "(it goes on from them; delete that folder to start again from the file)", file=sys.stderr)
        broker = EmbeddedBroker().start()
        backend = Backend(broker_url=broker.url, broker=broker)
    try:
        if backend.broker is not None:  # children start while this process loads its models
            backend.coordinators.append(coordinator_process(
                "gestures", "gestures", broker=backend.broker_url, region=gesture_region,
                data_dir=data_dir, init=None, seed=args.seed).start())
            backend.coordinators.append(coordinator_process(
                "detector", "detection", broker=backend.broker_url, region=region,
                data_dir=data_dir, init=args.init, seed=args.seed).start())
        _start_clients(backend, args, data_dir, region=region, gesture_region=gesture_region)
        if init_used:  # before the window opens: the coordinator child fails on it out of sight
            check_init(args.init.expanduser(), backend.detect_task.spec)
    except BaseException:
        backend.stop()
        raise
    return backend


def _credentials(args: argparse.Namespace) -> dict[str, Any]:
    """Broker credentials for the clients: only for an external ``--broker`` (the bundle's
    regions must include both the detection and the gesture region)."""
    from edge_sdk.mqtt import auth_from_args

    if not args.broker:  # (before reading them: a missing bundle was reported as that, not as this mistake)
        if any(getattr(args, name, None) for name in ("bundle", "ca", "cert", "key", "username", "password_file")):
            raise ConfigError("--bundle/--cert/--username are for an external --broker; the embedded one is anonymous")
        return {}
    return {"auth": auth_from_args(args), "bundle": args.bundle}


def _gesture_credentials(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The gesture client's device id and broker credentials. A client identity (a bundle's
    or --cert's name, --username) is the client id on edgeci's brokers
    (``use_username_as_clientid``): two connections under one replace each other every second,
    so with one the gesture client needs its own, ``--gesture-bundle``."""
    from edge_sdk.mqtt import BrokerAuth, read_bundle

    gesture_bundle = getattr(args, "gesture_bundle", None)
    if not args.broker:
        if gesture_bundle:
            raise ConfigError("--gesture-bundle is for an external --broker; the embedded one is anonymous")
        return args.device_id, {}
    if gesture_bundle:
        identity = read_bundle(gesture_bundle).get("identity")
        if not isinstance(identity, str):
            raise ConfigError(f"bundle {gesture_bundle} names no identity")
        if identity == args.device_id:
            raise ConfigError(f"--gesture-bundle {gesture_bundle} is {identity!r}'s, the detector's identity: the two "
                              "connections would replace each other; issue the gesture client its own")
        return identity, {"auth": BrokerAuth.from_bundle(gesture_bundle), "bundle": gesture_bundle}
    credentials = _credentials(args)
    auth = credentials["auth"]
    if auth is not None and (auth.cert_file is not None or auth.username):
        gesture_region = args.gesture_region or f"{args.region}-gestures"
        raise ConfigError(
            "the detector and the gesture client are two broker connections, and the broker makes a client "
            "identity its client id: under one identity they would replace each other every second. Give the "
            "gesture client its own: --gesture-bundle DIR, a device issued with `edgeci pki issue --role device "
            f"{args.device_id}-gestures --region {gesture_region}`")
    return args.device_id, credentials


def _start_clients(backend: Backend, args: argparse.Namespace, data_dir: Path, *,
                   region: str, gesture_region: str) -> None:
    from edge_sdk.client import EdgeClient
    from edge_sdk.tasks import get_task
    from edge_sdk.tasks.base import TrainConfig
    from edge_sdk.tasks.detection import DEFAULT_TRAIN, DetectionTask

    print("loading YOLOv8n and the gesture model...", flush=True)
    backend.detect_task = DetectionTask(data_dir=data_dir)
    backend.detect = EdgeClient(
        broker=backend.broker_url, device_id=args.device_id, region=region, task=backend.detect_task,
        data_dir=data_dir / "detect", min_samples=args.min_samples,
        train=TrainConfig(epochs=DEFAULT_TRAIN.epochs, batch_size=DEFAULT_TRAIN.batch_size,
                          lr=DEFAULT_TRAIN.lr, seed=args.seed),
        seed=args.seed, **_credentials(args),
    )
    backend.detect.on("*", backend.events.listener("detect"))
    backend.detect.start(timeout=10.0)
    gesture_id, gesture_credentials = _gesture_credentials(args)
    backend.gesture = EdgeClient(
        broker=backend.broker_url, device_id=gesture_id, region=gesture_region,
        task=get_task("gestures"), data_dir=data_dir / "gesture",
        min_samples=args.gesture_min_samples, train=TrainConfig(seed=args.seed), seed=args.seed, **gesture_credentials,
    )
    backend.gesture.on("*", backend.events.listener("gesture"))
    backend.gesture.start(timeout=10.0)


# ---------------------------------------------------------------------- the window


class LabelApp:
    """The HighGUI driver: frames in, the session's events out, its actions performed."""

    def __init__(self, *, source: FrameSource, backend: Backend, session: LabelSession,
                 data_dir: Path, args: argparse.Namespace, zoom: float | None) -> None:
        from edge_sdk.tasks.gestures import GESTURES

        self.source, self.backend, self.session = source, backend, session
        self.data_dir, self.args, self.zoom = data_dir, args, zoom
        detection = backend.detect_task.config  # the deployed detector's classes
        self.class_names = tuple(detection.class_names[: detection.n_classes])
        self.gesture_names = tuple(GESTURES)
        self.new_class = int(detection.new_class)
        self.detector = LiveDetector(backend.detect)
        self.shown: Frame | None = None
        self.held: Frame | None = None
        self.canvas: npt.NDArray[np.uint8] | None = None
        self.notice: tuple[float, Notice] | None = None
        self.running = True
        self._t0 = time.monotonic()
        self._fps = 0.0
        self._counts = (0, 0)
        self._counts_at = -1.0
        self._snapshots = 0

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        cv2.namedWindow(TITLE, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)
        cv2.setMouseCallback(TITLE, self._on_mouse)
        self.detector.start()
        ready = False
        last = time.monotonic()
        try:
            while self.running:
                now = time.monotonic()
                self._show(now)
                wait_ms = max(1, round(1000 / self.args.fps - 1000 * (time.monotonic() - now)))
                key = cv2.waitKeyEx(wait_ms)  # mouse callbacks run in here, on this thread
                if key != -1:
                    self._dispatch(Key(code=key))
                if not ready:
                    view = self.session.view
                    print(f"edgeci label: ready: {self.source.name} shown at {view.scale:g}x in window "
                          f"'{TITLE}'; {self._counts[0]} frames and {self._counts[1]} gestures stored in {self.data_dir}",
                          flush=True)
                    ready = True
                elif cv2.getWindowProperty(TITLE, cv2.WND_PROP_VISIBLE) < 1:
                    break  # the person closed the window
                dt = time.monotonic() - last
                last = time.monotonic()
                self._fps = 0.9 * self._fps + 0.1 / max(dt, 1e-3)
        finally:
            started = time.monotonic()
            if self.session.state.draft:  # SIGTERM, or the window closed: keep a paused frame's boxes as q does
                self._dispatch(Key(code=KEY_ESC))
            self.detector.stop()
            cv2.destroyAllWindows()
            cv2.waitKey(1)
            log.debug("window closed in %.1f s", time.monotonic() - started)
        return 0

    def _show(self, now: float) -> None:
        if self.held is not None:
            frame = self.held
        else:
            frame = self.source.read(now - self._t0)
            view = fit_view(frame.shape[1], frame.shape[0], zoom=self.zoom)
            self.session.set_view(view)
            if self.session.state.mode == "box":
                self.detector.submit(frame)
        self.shown = frame
        self.canvas = render(frame, self.session.view, self.session.state, self._overlay(now))
        cv2.imshow(TITLE, self.canvas)

    def _overlay(self, now: float) -> Overlay:
        backend = self.backend
        if now - self._counts_at > 0.5:
            self._counts = (backend.detect.store.count("frame"), backend.gesture.store.count("gesture"))
            self._counts_at = now
        mode_client, task = (backend.detect, "detect") if self.session.state.mode == "box" else (backend.gesture, "gesture")
        phase = _PHASE_TEXT.get(mode_client.core.state.phase.value, mode_client.core.state.phase.value)
        status = Status(
            device=f"{self.args.device_id} @ {mode_client.core.config.region}",
            source=self.source.name,
            model_version=backend.detect.version,
            detector=self.detector.state,
            phase=phase,
            last_event=backend.events.latest(task),
            coordinator=backend.coordinator_status(),
            frames=self._counts[0],
            frames_min=backend.detect.core.config.min_samples,
            gestures=self._counts[1],
            gestures_min=backend.gesture.core.config.min_samples,
            gesture_version=backend.gesture.version,
            fps=self._fps,
        )
        result = self.detector.result
        dets = result[1] if result is not None else np.zeros((0, 6), np.float32)
        notice = self.notice[1] if self.notice is not None and now - self.notice[0] < NOTICE_S else None
        return Overlay(status=status, detections=dets, notice=notice, class_names=self.class_names,
                       gesture_names=self.gesture_names, new_class=self.new_class)

    # ------------------------------------------------------------------ events

    def _on_mouse(self, event: int, x: int, y: int, flags: int, param: Any) -> None:
        t = time.monotonic()
        if event == cv2.EVENT_LBUTTONDOWN:
            self._dispatch(MouseDown(x=x, y=y, t=t))
        elif event == cv2.EVENT_MOUSEMOVE and flags & cv2.EVENT_FLAG_LBUTTON:
            self._dispatch(MouseMove(x=x, y=y, t=t))
        elif event == cv2.EVENT_LBUTTONUP:
            self._dispatch(MouseUp(x=x, y=y, t=t))

    def _dispatch(self, event: Key | MouseDown | MouseMove | MouseUp) -> None:
        for action in self.session.handle(event):
            self._perform(action)
        # hold the frame the person started drawing on; let go once it is stored or dropped
        if self.session.frozen:
            if self.held is None:
                self.held = self.shown
        else:
            self.held = None

    def _perform(self, action: Action) -> None:
        if isinstance(action, SaveFrame):
            self._save_frame(action)
        elif isinstance(action, SaveGesture):
            self._save_gesture(action)
        elif isinstance(action, Snapshot):
            self._snapshot()
        elif isinstance(action, Notice):
            self._notify(action)
        elif isinstance(action, Quit):
            self.running = False

    def _notify(self, notice: Notice) -> None:
        # a refusal reaches the terminal at the default level: "saved frame" lines did, "not saved" ones did not
        (log.warning if notice.error else log.info)("%s", notice.text)
        self.notice = (time.monotonic(), notice)

    def _save_frame(self, action: SaveFrame) -> None:
        frame = self.held if self.held is not None else self.shown
        if frame is None:
            self._saved(SaveFailed(reason="no frame on screen yet"))
            return
        boxes = np.array(action.boxes, dtype=np.float32).reshape(-1, 5)
        try:
            sample_id = self.backend.detect.add_frame(frame, boxes)
        except EdgeciError as exc:  # the session puts the boxes back on the held frame (and says why)
            self._saved(SaveFailed(reason=str(exc)))
            return
        self._saved(FrameSaved())
        count = self.backend.detect.store.count("frame")
        self._counts = (count, self._counts[1])
        names = ", ".join(self.class_names[int(b[0])] for b in boxes)
        print(f"saved frame {sample_id} boxes={boxes.astype(int).tolist()} ({names}); frames "
              f"{progress(count, self.backend.detect.core.config.min_samples)}", flush=True)
        self._notify(Notice(text=f"saved frame #{sample_id}: {names}"))

    def _saved(self, outcome: FrameSaved | SaveFailed) -> None:
        """Tell the session how its SaveFrame went (before _dispatch decides whether to hold the frame)."""
        for action in self.session.handle(outcome):
            self._perform(action)

    def _save_gesture(self, action: SaveGesture) -> None:
        try:
            sample_id = self.backend.gesture.add_sample(action.sequence, action.label)
        except EdgeciError as exc:
            self._notify(Notice(text=f"not saved: {exc}", error=True))
            return
        count = self.backend.gesture.store.count("gesture")
        self._counts = (self._counts[0], count)
        name = self.gesture_names[action.label]
        print(f"saved gesture {sample_id} label={action.label} ({name}); gestures "
              f"{progress(count, self.backend.gesture.core.config.min_samples)}", flush=True)
        self._notify(Notice(text=f"saved gesture #{sample_id}: {name}"))

    def _snapshot(self) -> None:
        if self.canvas is None:
            return
        folder = self.data_dir / "snapshots"
        try:  # (no room for the folder, or a file in its place: the app died here, drawn boxes and all)
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._notify(Notice(text=f"could not write a snapshot to {folder}: {exc.strerror or exc}", error=True))
            return
        self._snapshots += 1
        path = folder / f"label-{time.strftime('%Y%m%d-%H%M%S')}-{self._snapshots}.png"
        if not cv2.imwrite(str(path), self.canvas):
            self._notify(Notice(text=f"could not write {path}", error=True))
            return
        print(f"snapshot {path}", flush=True)
        self._notify(Notice(text=f"snapshot {path.name}"))


def default_data_dir(device_id: str) -> Path:
    return device_dir(device_id)  # the SDK's convention: $EDGECI_HOME/devices/<id>


def usable_data_dir(path: Path) -> Path:
    """``--data-dir``, created if missing, where this app can create files: a file there, a
    read-only folder or no room is a ConfigError now, not a traceback from deep in the model
    loading (or a coordinator child that dies out of sight)."""
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(f"--data-dir {path} is not a folder this app can use: {exc.strerror or exc}") from exc
    return path


def check_window(view: View, source_name: str) -> None:
    """A window (frame at its zoom, side panel, help bar) over MAX_WINDOW_PX a side is a BadOption."""
    width, height = canvas_size(view)
    if max(width, height) <= MAX_WINDOW_PX:
        return
    fits = min((MAX_WINDOW_PX - PANEL_W) / view.frame_w, (MAX_WINDOW_PX - HELP_H) / view.frame_h)
    raise BadOption(f"--zoom {view.scale:g} shows the {view.frame_w}x{view.frame_h} frames of {source_name} in a "
                    f"{width}x{height} window, over {MAX_WINDOW_PX} pixels a side: use --zoom {math.floor(fits * 10) / 10:g} "
                    "or less (or no --zoom)")


def run(args: argparse.Namespace) -> int:
    from edge_sdk.wire.topics import check_id

    # cheap checks first, so a mistake is reported before seconds of model loading; those that need
    # no window (bundles, files, the data dir, the broker, the source) before the display: without
    # one, "no display" hid every other mistake until the app ran under xvfb-run (helper-152)
    resolve_identity(args)
    check_id(args.device_id, "device id")
    if not 0.1 <= args.fps < math.inf or (args.zoom is not None and not 0.1 <= args.zoom <= 8):
        raise ConfigError("--fps must be at least 0.1 and --zoom in 0.1..8")
    data_dir = usable_data_dir((args.data_dir or default_data_dir(args.device_id)).expanduser())
    check_backend(args, data_dir)
    source = open_source(args.source, size=args.size, seed=args.seed)
    backend: Backend | None = None

    def terminated(signum: int, _frame: object) -> None:  # SIGTERM as `q`: unwind, stop the coordinators and broker
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminated)  # (the default killed the app and left its coordinators running)
    try:
        first = source.read(0.0)
        view = fit_view(first.shape[1], first.shape[0], zoom=args.zoom)
        check_window(view, source.name)  # before the backend (minutes of pretraining on a first run)
        check_display()  # the last check: what it asks for (xvfb-run) is the last thing to fix
        backend = start_backend(args, data_dir)
        from edge_sdk.tasks.gestures import GESTURES, LENGTH, VELOCITY_GAIN

        session = LabelSession(
            view=view,
            n_box_classes=int(backend.detect_task.config.n_classes), n_gesture_classes=len(GESTURES),
            gesture_length=LENGTH, gesture_gain=VELOCITY_GAIN,
            mode="box" if args.mode == "detect" else "gesture",
        )
        app = LabelApp(source=source, backend=backend, session=session, data_dir=data_dir, args=args, zoom=args.zoom)
        return app.run()
    finally:
        signal.signal(signal.SIGTERM, previous)  # a second SIGTERM ends the app: its coordinators die with it
        source.close()
        if backend is not None:
            if backend.detect is not None and backend.detect.core.state.phase.value == "training":
                print("stopping: waiting for local training to finish...", flush=True)
            backend.stop()
