"""EdgeClient — what a device app embeds.

    with EdgeClient(broker="mqtt://127.0.0.1:1883", device_id="headset-7", task="digits") as client:
        client.add_sample(x, label)      # durable when it returns; may trigger a pull
        client.add_frame(image, boxes)   # detection devices: an RGB frame and its boxes
        client.predict(batch)            # with the latest deployed model
        client.detect(image)             # detection devices: boxes, served by onnxruntime
        client.version                   # its version

Behind it: the durable :class:`~edge_sdk.store.SampleStore`, the sans-IO
:class:`~edge_sdk.core.device.DeviceCore` on an actor thread, the paho transport, and a
single trainer thread so that local fine-tuning never blocks the protocol.

Samples follow the task's input contract (``client.contract``, declared in
:mod:`edge_sdk.tasks.registry`: digits are ``(1, 8, 8)`` floats in ``[0, 1]``, an ``(8, 8)``
image is accepted too); the data dir defaults to ``$EDGECI_HOME/devices/<device_id>``
(``~/.edgeci/devices/<device_id>``) and D_min to the task's declared default. With only
``pip install edgeci`` (the ``[device]`` role: no torch) a built-in task stores, labels
and predicts with its shipped ONNX graph; local training needs ``edgeci[train]``.

Failover: with ``regions=["eu", "us"]`` the device talks to its first region's
coordinator and, after ``failover_after`` consecutive request timeouts or when that
coordinator's status says it is gone, to the next region's; it comes back home when the
home coordinator is alive again (after ``failback_after_s``). The rule lives in
:class:`~edge_sdk.core.device.DeviceCore` (see "Failover" there); this driver subscribes
to every listed region's topics from the start and reports each ``SwitchRegion`` as a
``failover`` event.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from edge_sdk._extras import missing
from edge_sdk.cancellation import stoppable
from edge_sdk.core.device import MAX_WATERMARK_JUMP, DeviceConfig, DeviceCore, Phase
from edge_sdk.core.events import (
    CanaryScored,
    DeployModel,
    MarkRegionDown,
    MarkTraining,
    MessageReceived,
    Notify,
    PersistDeviceState,
    PinCanary,
    PinEpoch,
    PinKey,
    Publish,
    SampleAdded,
    ScheduleTimer,
    StartCanary,
    StartTraining,
    StopCanary,
    SwitchRegion,
    TimerFired,
    TrainingFailed,
    TrainingFinished,
    TrainingJob,
)
from edge_sdk.errors import (
    ConfigError,
    EdgeciError,
    LocalProtocolError,
    MissingExtra,
    TrainingCancelled,
)
from edge_sdk.modelio import load_model, save_model
from edge_sdk.mqtt import (
    DUPLICATE_RECONNECT_S,
    KEEPALIVE_S,
    BrokerAuth,
    MqttTransport,
    check_keepalive,
    read_bundle,
    regions_outside,
)
from edge_sdk.paths import device_dir
from edge_sdk.runtime import Actor, Clock, WallClock
from edge_sdk.scc import DeviceScc, SccConfig, scc_head
from edge_sdk.spec import Vector
from edge_sdk.store import (
    DEFAULT_QUOTA_BYTES,
    SampleKind,
    SampleStore,
    Snapshot,
    StorageError,
    check_quota,
)
from edge_sdk.tasks import get_task, resolve_task, task_name
from edge_sdk.tasks.base import (
    Task,
    TrainConfig,
    TrainResult,
    check_detect_input,
    hints_out_of_bounds,
    train_config,
)
from edge_sdk.tasks.registry import (
    DeclaredTask,
    InputContract,
    default_min_samples,
    default_train_config,
    input_contract,
    sample_kind_of,
)
from edge_sdk.wire import topics
from edge_sdk.wire.codec import Encoding

log = logging.getLogger("edgeci.device")
_MAX_CANARY_PIN_CHARS = 1024
"""A stored canary record (``PinCanary``: a few ints and at most 8 nonces) is far shorter: a longer one is damaged."""
RECEIVING_RECHECK_S = 0.5
"""A request timeout held while a packet arrives (:meth:`EdgeClient._handle`) is looked at again this soon."""
_AWAITING_ANSWER = (Phase.PULLING, Phase.DEFERRED, Phase.PUSHING)
Callback = Callable[[str, dict[str, Any]], None]
_R = TypeVar("_R")


def _resolve_task(name: str) -> Task:
    """The task ``name`` names (:func:`edge_sdk.tasks.resolve_task`: a built-in task, its model
    id, an app's ``package.module:Name`` or ``edgeci.tasks`` entry point); on an install without
    its training stack (``[device]``: no torch) its declaration, which stores, labels and serves
    (an app's task: with the graphs its TaskInfo names) but cannot train."""
    info = resolve_task(name)
    name = task_name(name)  # (a model id names its task)
    try:
        return get_task(name)
    except MissingExtra:
        log.info("task %s: %s not installed, serving only", name, info.train_extra)
        return DeclaredTask(info)


class _Exported(NamedTuple):
    """A detection device's exported model: its ONNX file and session, and the weights (by
    identity) it was exported from."""

    version: int
    detector: Any
    weights: Vector
    path: Path


def _saved_meta(meta: object) -> tuple[int, str | None, str | None, int]:
    """The version (>= 0; 0 if absent), region, signing key id (``None`` if absent) and epoch (0
    if absent) of the saved model's meta, as :meth:`EdgeClient._perform` writes it; ConfigError
    for anything else."""
    if not isinstance(meta, dict):
        raise ConfigError(f"the saved model's meta is not an object: {meta!r:.80}")
    version, region, kid, epoch = meta.get("version", 0), meta.get("region"), meta.get("kid"), meta.get("epoch", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ConfigError(f"the saved model's version is not an int >= 0: {version!r:.80}")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < 2**63:
        raise ConfigError(f"the saved model's epoch is not an int >= 0: {epoch!r:.80}")
    if region is not None and not isinstance(region, str):
        raise ConfigError(f"the saved model's region is not a string: {region!r:.80}")
    if kid is not None and not isinstance(kid, str):
        raise ConfigError(f"the saved model's signing key id is not a string: {kid!r:.80}")
    return version, region, kid, epoch


EVENTS = frozenset({
    "*", "model", "trained", "update_acked", "update_rejected", "deferred", "retry", "training_failed", "training_unavailable",
    "message_rejected", "store_recovered", "scc_cache_dropped", "failover", "canary", "canary_reported", "canary_dropped",
    "model_older", "storage", "key_pinned", "recalled", "seq_conflict", "seq_behind", "epoch", "pull_rejected", "training_crashed",
    "connection", "duplicate_id",
})
"""What :meth:`EdgeClient.on` subscribes to: the device core's notifications and the client's own."""


def check_device_bundle(path: Path, manifest: Mapping[str, Any], device_id: str, regions: Sequence[str]) -> None:
    """ConfigError unless the bundle is this device's: its identity, a device's role, and
    every region the device may use (the broker's ACL gives a bundle its regions' topics only;
    any other identity is a client the broker would let take over that identity's session)."""
    who, role, allowed = manifest.get("identity"), manifest.get("role", "device"), manifest.get("regions")
    if who != device_id:
        raise ConfigError(f"bundle {path} was issued for {who!r}, not for device {device_id!r} (the broker would refuse every topic)")
    if role != "device":
        raise ConfigError(f"bundle {path} is a {role}'s, not a device's: a device connecting as {who!r} would take that "
                          f"{role}'s place on the broker; issue one with `edgeci pki issue --role device ID`")
    if missing := regions_outside(manifest, regions):
        raise ConfigError(f"bundle {path} is for region(s) {', '.join(map(str, allowed or ())) or '(none)'}, not "
                          f"{', '.join(map(repr, missing))}: the broker would refuse every topic there (issue it with "
                          f"`edgeci pki issue --region {','.join(regions)}`)")


def hold_data_dir(path: Path, device_id: str) -> IO[str]:
    """Hold ``path/device.lock`` (an exclusive flock, released when the file is closed) while
    a client uses the data dir: a second client on it — another process or this one — would
    share its store and reuse its sequence numbers. ConfigError naming the holder. Where the
    platform has no flock (Windows) nothing is locked."""
    try:
        f = open(path / "device.lock", "a+")  # noqa: SIM115 - held while the client runs
    except OSError as exc:
        raise ConfigError(f"data dir {path}: {exc.strerror or exc}") from exc
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        words = f.read().split()  # "pid N device ID" (a lock from before: "pid N")
        f.close()
        pid = words[1] if len(words) > 1 and words[0] == "pid" else None
        holder = words[3][:100] if len(words) > 3 and words[2] == "device" else None
        who = (f"device {holder}" if holder else "another client") + (f" (pid {pid})" if pid else "")
        raise ConfigError(f"data dir {path} is in use by {who}: stop it, or give this one (device {device_id}) "
                          "another data dir") from None
    try:  # unbuffered: a write that failed must not be tried again when the file is closed
        os.ftruncate(f.fileno(), 0)
        os.write(f.fileno(), f"pid {os.getpid()} device {device_id}\n".encode())
    except OSError as exc:  # a full disk: the flock holds all the same, only the holder's pid goes unsaid
        log.warning("data dir %s: could not write this client's pid into device.lock (%s)", path, exc.strerror or exc)
    return f


def _make_data_dir(path: Path) -> None:
    """Create the data dir (and its parents) or say, as a ConfigError, why it cannot be one."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"data_dir {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create data_dir {path}: {exc}") from exc


class EdgeClient:
    """A device's SDK handle. Thread-safe: call it from the app's threads.

    ``durable=False`` keeps samples and the deployed model in memory only — for emulated
    fleets of hundreds of devices in one process, never for a real device.

    ``refresh_s`` (default an hour, ±10 %): a device that has sent no pull for that long asks
    for the coordinator's current release, so it predicts with every release even when its
    user labels nothing (it learns of releases from its own pulls otherwise). The answer is a
    few bytes when it holds that release already. ``None`` turns it off (e.g. on a metered
    link: releases then arrive with the device's own pulls, a restart or a reconnect).

    ``release_spread_s`` (default 300): an idle device also hears of each new release (its
    coordinator republishes the region's signed, retained recall with it) and fetches it at a
    random time within this long — and at most once per this long, so a release every 30 s
    costs an idle device one fetch per about 5 minutes, each of the newest release. 0: at once;
    ``None``: off (releases then come with ``refresh_s`` and the device's own pulls).

    ``quota_bytes`` (default 512 MiB) and ``quota_samples`` (default none) bound the store of
    labelled samples on the device (payload bytes, and count; ``None``: no bound). Past a
    bound, the samples an acknowledged update already trained on go first, oldest first, then
    the oldest others (see :mod:`edge_sdk.store`).

    ``keepalive_s`` (default 30, 5 to 3600; a ConfigError otherwise): the MQTT keepalive. A broker
    or link that dies without closing the connection is noticed after about 1.5 of them by the broker
    (it publishes the device's ``offline`` will) and 2 by the device (it reconnects); a shorter one
    costs an idle device a ping and its answer every keepalive (about 110 bytes on the wire). A slow
    transfer is not cut by it (bytes that move keep the link alive).

    ``reannounce_s`` (default 600): a device a selecting coordinator (FedAvg, FedBuff, ...) left
    waiting for an invitation sends its pull again after this long, in case the coordinator
    forgot it; a coordinator that says it started again is asked at once (``Recall.started``).

    ``bundle`` (``edgeci pki issue``): broker credentials and the coordinators' model-signing
    keys this device trusts (``trusted/``; a bundle with none is a ConfigError). Without a
    bundle or ``trusted_keys`` the device trusts the first key that signs a model (trust on
    first use): insecure wherever others can publish to the broker — whoever does so before
    the coordinator becomes the trusted key. Trials only.
    """

    def __init__(
        self,
        *,
        broker: str,
        device_id: str,
        data_dir: str | Path | None = None,
        region: str = "default",
        task: str | Task = "digits",
        min_samples: int | None = None,
        train: TrainConfig | None = None,
        encoding: Encoding = "f4",
        request_timeout_s: float = 10.0,
        clock: Clock | None = None,
        seed: int = 0,
        inference: str = "onnx",
        durable: bool = True,
        regions: Sequence[str] | None = None,
        failover_after: int = 3,
        failback_after_s: float = 60.0,
        auth: BrokerAuth | None = None,
        bundle: str | Path | None = None,
        trusted_keys: Mapping[str, bytes] | None = None,
        scc: bool | SccConfig = False,
        refresh_s: float | None = 3600.0,
        release_spread_s: float | None = 300.0,
        quota_bytes: int | None = DEFAULT_QUOTA_BYTES,
        quota_samples: int | None = None,
        keepalive_s: int = KEEPALIVE_S,
        reannounce_s: float = 600.0,
    ) -> None:
        # Everything is checked before anything touches the disk: a ConfigError leaves no data
        # dir, store or model file behind.
        if inference not in ("onnx", "torch"):
            raise ConfigError(f"inference must be 'onnx' or 'torch', got {inference!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        if train is not None and not isinstance(train, TrainConfig):
            raise ConfigError(f"train must be a TrainConfig, got {type(train).__name__}")
        if not isinstance(task, str) and not hasattr(task, "spec"):
            raise ConfigError(f"task must be a task name or a Task, got {type(task).__name__} {task!r}")
        if data_dir is not None and not isinstance(data_dir, str | os.PathLike):
            raise ConfigError(f"data_dir must be a path, got {type(data_dir).__name__}")
        check_quota("quota_bytes", quota_bytes)
        check_quota("quota_samples", quota_samples)
        check_keepalive(keepalive_s)
        self._quota_bytes, self._quota_samples = quota_bytes, quota_samples
        self.regions: tuple[str, ...] = tuple(dict.fromkeys([region, *(regions or ())]))
        """This device's region first, then the regions it may fail over to, in order."""
        self.task: Task = _resolve_task(task) if isinstance(task, str) else task
        if inference == "torch" and isinstance(self.task, DeclaredTask):  # here, not as an AttributeError in predict
            raise missing("torch", self.task.info.train_extra,
                          purpose=f"inference='torch' ({self.task.name}; the default inference='onnx' serves without it)")
        if min_samples is None:  # the task's declared D_min (edge_sdk/tasks/registry.py)
            min_samples = default_min_samples(self.task)
        # Provisioning bundle (`edgeci pki issue`): broker credentials, and the coordinators'
        # model-signing keys this device trusts (bundle/trusted/*.pub).
        self.bundle: Path | None = Path(bundle).expanduser() if bundle is not None else None
        if self.bundle is not None:
            check_device_bundle(self.bundle, read_bundle(self.bundle), device_id, self.regions)
        self.auth: BrokerAuth | None = auth or (BrokerAuth.from_bundle(self.bundle) if self.bundle is not None else None)
        self.trusted_keys: dict[str, bytes] | None = None
        if self.bundle is not None and (self.bundle / "trusted").is_dir():
            from edge_sdk.signing import load_trusted_keys

            self.trusted_keys = load_trusted_keys(self.bundle / "trusted")
        if trusted_keys is not None:
            self.trusted_keys = dict(trusted_keys)
        if not self.trusted_keys and self.bundle is not None:
            # A bundle promises provisioned trust; falling back to trust on first use behind it is
            # what an attacker on the broker would want (a bundle issued before any coordinator).
            raise ConfigError(f"bundle {self.bundle} holds no coordinator keys (trusted/ is empty: it was issued before "
                              "any coordinator); run `edgeci pki trust --dir PKI` and copy the bundle again")
        cfg = DeviceConfig(
            device_id=device_id,
            region=region,
            spec=self.task.spec,
            min_samples=min_samples,
            encoding=encoding,
            request_timeout_s=request_timeout_s,
            trusted_keys=self.trusted_keys or {},
            fallback_regions=self.regions[1:],
            failover_after=failover_after,
            failback_after_s=failback_after_s,
            refresh_s=refresh_s,
            release_spread_s=release_spread_s,
            reannounce_s=reannounce_s,
        )
        # The task declares its sample kind (edge_sdk/tasks/base.py): "gesture" tasks store
        # (T, D) sequences, "frame" tasks frames of any size with boxes, "array" fixed shapes.
        self.sample_kind: SampleKind = sample_kind_of(self.task)
        if scc and self.sample_kind == "frame":
            raise ConfigError("SCC caches classifier features; detection devices cannot use it")
        if scc:
            scc_head(self.task)  # a task SCC cannot run on is refused before the disk is touched
        # Presence: retained "online" after every (re)connect, the broker's last will says "offline".
        self._presence_topic = topics.device_topic(region, device_id, "presence")
        # Every region's topics from the start (MqttTransport's subscriptions are fixed): the
        # core ignores replies from regions it is not using. Built here (it opens no socket) so
        # that a bad broker URL or credentials are refused before the disk is touched.
        self.transport = MqttTransport(
            broker, client_id=f"dev-{region}-{device_id}", subscriptions=cfg.subscriptions(), on_message=self._on_message,
            will=(self._presence_topic, b"offline"),
            on_connection=self._on_connection,
            auth=self.auth,
            skip_held_copies=True,  # a retry of a request still going up (slow link) sends no second copy
            keepalive=keepalive_s,
        )
        self.inference = inference
        self.durable = durable
        if durable and data_dir is None:
            data_dir = device_dir(device_id)  # $EDGECI_HOME/devices/<id> (edge_sdk/paths.py)
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        # the task's own training defaults (detection: AdamW 1e-3, not the classifiers' SGD 0.05)
        self.train_config = train or dataclasses.replace(default_train_config(self.task), seed=int(seed))
        self.clock = clock or WallClock()
        # Shape, value range and class count come from the task's declaration, never from
        # loading its dataset (a [device] install has neither torch nor scikit-learn).
        shape: tuple[int, ...] | None = None
        self.contract: InputContract | None = None
        """What ``add_sample``/``predict`` accept (None for frames)."""
        if self.sample_kind != "frame":
            self.contract = input_contract(self.task)
            shape = self.contract.shape
        declared = getattr(self.task, "n_classes", None)
        n_classes = int(declared) if declared is not None else self.task.data().n_classes
        if self.data_dir is not None:
            _make_data_dir(self.data_dir)
        self._dir_lock = hold_data_dir(self.data_dir, device_id) if self.data_dir is not None and durable else None
        try:
            self._open_store(cfg, shape, n_classes, durable, scc, seed)
        except BaseException:
            if self._dir_lock is not None:
                self._dir_lock.close()
            raise

    def _open_store(self, cfg: DeviceConfig, shape: tuple[int, ...] | None, n_classes: int, durable: bool,
                    scc: bool | SccConfig, seed: int) -> None:
        self.store = SampleStore.open(
            self.data_dir / "samples.sqlite3" if self.data_dir is not None and durable else ":memory:",
            sample_shape=shape if self.sample_kind == "array" else None,
            gesture_shape=shape if self.sample_kind == "gesture" else None,
            n_classes=n_classes,
            recover=True,  # a corrupt file is moved aside (counters kept); ``store_recovered`` says so
            counters=("next_seq", "trained_upto"),  # PersistDeviceState's: ints >= 0, or the file is corrupt
            task=self.task.name,  # another task's store (one device id, two tasks: one default data dir) is refused
            quota_bytes=self._quota_bytes,
            quota_samples=self._quota_samples,
        )
        try:
            self._open(cfg, scc, seed)
        except BaseException:
            self.store.close()
            raise

    def _open(self, cfg: DeviceConfig, scc: bool | SccConfig, seed: int) -> None:
        """The rest of ``__init__``, once the store is open: SCC, the saved model, the core."""
        device_id = cfg.device_id
        # A store belongs to one device: another id adopting it would take over its samples,
        # sequence numbers and key pins without a word (review hB).
        owner = self.store.get_meta("device_id")
        if owner is None:
            self.store.set_meta("device_id", device_id)
        elif owner != device_id:
            raise ConfigError(f"data_dir {self.data_dir} holds the samples, sequence numbers and key pins of device "
                              f"{owner!r}, not {device_id!r}: give each device its own data_dir")
        self.scc: DeviceScc | None = None
        """SCC (opt-in, ``scc=True`` or an :class:`~edge_sdk.scc.SccConfig`): samples older than
        the newest ``keep_raw`` age out into a feature cache kept in the store, compensated
        when a new extractor arrives and used in classifier-only rounds."""
        if scc:
            self.scc = DeviceScc(scc if isinstance(scc, SccConfig) else SccConfig(), self.task, self.store,
                                 kind=self.sample_kind)
        self._engine: Any = None
        self._detector: _Exported | None = None
        """(version, OnnxDetector) serving ``detect``; exported on the first call per version."""
        self._export_lock = threading.Lock()
        self._scratch_dir: Path | None = None
        self._small_box_said = False  # add_frame's warning about boxes training drops: once
        self._model_path = self.data_dir / "deployed.npz" if self.data_dir is not None and self.durable else None
        self._lock = threading.Lock()
        self._deployed_region: str | None = None
        self._deployed_epoch = 0
        self._deployed: tuple[int, Vector] | None = self._load_deployed()
        self._canary: tuple[int, int, Any] | None = None
        """(candidate, release, its predictor): a canary request being scored (test-then-train)."""
        self._callbacks: dict[str, list[Callback]] = defaultdict(list)
        self._connected_once = False
        self._presence_lock = threading.Lock()
        """stop()'s ``offline`` and a reconnect's ``online`` (paho's thread): one after the other, and
        none after stop() said offline (a retained ``online`` left a stopped device online)."""
        self._unsaved: PersistDeviceState | None = None
        """Counters the store could not save (a full disk): no request leaves until they are saved
        (a restarted device must never reuse a sequence number); the core's retries try again."""
        self._held: dict[str, Publish] = {}
        """The newest request per topic held back meanwhile: sent as soon as the counters are saved
        (the next label stored, or the core's next retry, whichever comes first)."""
        self._job_ids: dict[int, list[int]] = {}
        self._seq_behind_said: object = None  # the watermark last warned about (seq_behind)
        self._mark_failed = False  # the last training mark could not be saved (said once)
        self._pull_rejected_said: set[str] = set()  # reasons warned about (pull_rejected)
        self._version_changed = threading.Condition()
        next_seq = int(self.store.get_meta("next_seq", 0) or 0)
        trained_upto = int(self.store.get_meta("trained_upto", 0) or 0)
        # The update the last process sent and saw no ack for (the core sends it again, or drops it if unusable).
        pending, pending_upto = self.store.get_meta("pending_update", b""), self.store.get_meta("pending_upto", 0)
        if not isinstance(pending, bytes) or isinstance(pending_upto, bool) or not isinstance(pending_upto, int):
            log.error("device store holds an unreadable pending update: ignoring it (its samples are trained again)")
            pending, pending_upto = b"", 0
        epochs = {r: self._epoch(r) for r in self.regions}
        saved_in = self._deployed_region or self.regions[0]  # (None: saved before regions were recorded)
        if self._deployed is not None and saved_in in epochs:
            epochs[saved_in] = max(epochs[saved_in], self._deployed_epoch)
        pins = {r: self._pins(r) for r in self.regions}
        # Update nonces from the OS on a durable device: from random.Random(seed) every process drew the same
        # ones, and a reinstall (seqs from 0 again) matched the nonce the coordinator holds for its seq.
        # In-memory fleets keep them seeded (reproducible emulator runs).
        nonces = random.SystemRandom() if self.durable else None
        self.core = DeviceCore(cfg, rng=random.Random(seed), next_seq=next_seq, trained_upto=trained_upto,
                               total=self._added(), pinned_by_region=pins, epochs=epochs, nonces=nonces,
                               pending=pending, pending_upto=pending_upto,
                               canaries=[pin for r in self.regions if (pin := self._canary_taken(r)) is not None],
                               training=self._training_mark(),
                               down={r: at for r in self.regions if (at := self._region_down(r)) is not None})
        if not self.trusted_keys and any(pins.values()):
            log.info("device %s: no provisioned coordinator keys; it trusts the key(s) it pinned on first use (%s) and "
                     "refuses any other; a bundle (`--bundle`, `edgeci pki issue`) replaces them", device_id,
                     "; ".join(f"{r}: {', '.join(sorted(p))}" for r, p in pins.items() if p))
        elif not self.trusted_keys:
            log.info("device %s: no provisioned coordinator keys; it will pin the first key that signs a model "
                     "(trust on first use: insecure, whoever publishes a signed model first becomes that key). "
                     "Provision a bundle (`edgeci pki issue`) for fleets.", device_id)
        if self._deployed is not None:
            version, self.core.state.deployed = self._deployed
            if self._deployed_region not in (None, self.core.state.region):  # (None: saved before regions were recorded)
                # saved after a failover: the weights keep serving, their number is the other region's
                log.info("device %s: the saved model is v%d of region %s; asking %s for its current one",
                         device_id, version, self._deployed_region, self.core.state.region)
            elif self._deployed_epoch == self.core.state.epoch:
                self.core.state.deployed_version = version
            else:  # the weights keep serving; their number counts in an older numbering
                log.info("device %s: the saved model is v%d of an older numbering (epoch %d, the region's is %d now); "
                         "asking for the current one", device_id, version, self._deployed_epoch, self.core.state.epoch)
        self.receiving_holds = 0
        """Request timeouts put off because a packet was still arriving or going up (see :meth:`_handle`)."""
        self.actor = Actor(f"device-{device_id}", self._handle, self._perform, clock=self.clock)
        self._trainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"train-{device_id}")
        self._stopping = threading.Event()
        """Set by :meth:`stop`: a training job in progress ends at its next batch (the task's
        loop calls :func:`edge_sdk.cancellation.checkpoint`)."""
        self._started = False
        self._used = False
        """start() was called (once only: the actor's thread and the store are not restartable)."""
        self._stopped = False
        """stop() ran: a detector exported after it lives in a folder removed once its session is open."""

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 15.0) -> EdgeClient:
        """Connect and begin; at most once per client. If the broker cannot be reached
        (TransportError, ConfigError) the client is stopped again — no thread, no open store
        left behind — and a new ``EdgeClient`` is the way to try again."""
        if self._used:
            raise LocalProtocolError("this EdgeClient was started before (and stopped, or its start failed): "
                                     "make a new EdgeClient to connect again")
        self._used = True
        self.actor.start()
        try:
            self.transport.start(timeout)
        except BaseException:
            self.stop()
            raise
        self._started = True
        if self.store.recovered_from is not None:
            recovered = dict(self.store.recovered_from)
            self.actor.call(lambda: self._emit("store_recovered", recovered))
        if self.scc is not None and self.scc.dropped is not None:
            dropped = {"reason": self.scc.dropped}
            self.actor.call(lambda: self._emit("scc_cache_dropped", dropped))
        self.actor.call(lambda: self.actor.run_actions(self.core.start(self.clock.now())))
        return self

    def stop(self) -> None:
        """Go offline (a retained ``offline`` presence), stop the client's threads and close
        the store; every sample stored so far stays. A training job in progress is cancelled
        at its next batch — the built-in tasks check between batches; a task of the app's own
        that does not call :func:`edge_sdk.cancellation.checkpoint` is waited for — and its
        result is not sent: the next client on this data dir trains again. ``predict()`` keeps serving the last
        model after it.

        What it waits for (milliseconds otherwise): the broker's acknowledgement of what was
        published, up to 2 s while connected (a broker that stalls); the client's thread, up to
        10 s, for the events already queued and an app callback in progress (callbacks run on that
        thread: one that blocks holds stop() that long, and the store is then closed under it);
        the training job until its next batch (the first job of a process also finishes importing
        torch, seconds), or to its end for a task that never calls ``checkpoint``: the job reads
        and writes the store, which must not close under it. A broker that is down or unreachable
        costs nothing: paho's wait between reconnects and a connect in progress are cut short."""
        self._used = True
        with self._presence_lock:
            self._stopping.set()
            if self._started:
                self.transport.publish(self._presence_topic, b"offline", retain=True)  # a clean exit sends no will
        if self._started:
            self.transport.stop()
            self._started = False
        self.actor.stop()
        if self.actor.alive:  # (its join timed out)
            log.warning("device %s: the client's thread is still busy after 10 s (an app callback that blocks? "
                        "callbacks run on that thread and must return quickly); stopping without it",
                        self.core.config.device_id)
        self._trainer.shutdown(wait=True, cancel_futures=True)
        if not self._stopped:
            self._clear_training_mark()
        with self._export_lock:  # after a detect() exporting into the data dir or the scratch folder
            self._stopped = True
            if self._scratch_dir is not None:
                import shutil

                shutil.rmtree(self._scratch_dir, ignore_errors=True)
                self._scratch_dir = None
        self.store.close()
        if self._dir_lock is not None:
            self._dir_lock.close()  # the data dir is free for the next client

    def _clear_training_mark(self) -> None:
        """A clean stop ends the job in flight (cancelled, or its result dropped): not a crash. The
        mark is cleared here (the actor has stopped, the core hears nothing more), keeping its count and hold."""
        mark = self._training_mark()
        if mark is not None and mark.in_flight:
            self._save_training_mark(MarkTraining(in_flight=False, crashes=mark.crashes, hold_until=mark.hold_until,
                                                  failures=mark.failures))

    def __enter__(self) -> EdgeClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ app API

    def add_sample(self, x: npt.NDArray[Any], label: int, *, timestamp: float | None = None) -> int:
        """Store one labelled sample durably, then let the protocol react (the first pull
        waits for ``min_samples``). ``x`` follows :attr:`contract`; anything else (wrong
        shape, dtype or value range) is a typed ``InvalidSample`` saying what was expected.
        ``timestamp``: when it was labelled, in seconds since the epoch as ``time.time()``
        (the default: now; more than a day ahead of the clock is an ``InvalidSample``); eviction
        past a quota goes by it, oldest first. Returns the sample's id in the store."""
        if self.sample_kind == "frame":
            raise LocalProtocolError("a detection device stores frames with boxes: use add_frame(image, boxes)")
        assert self.contract is not None
        sample = self.contract.sample(x)
        label = self.store.check_label(label)  # first: a refused label must not feed the canary
        if timestamp is not None:
            self.store.check_timestamp(timestamp)  # (nor a refused timestamp)
        if self._canary is not None:  # test, then train: score it before it joins the training set
            self._canary_score(sample, label)
        sample_id = self.store.add_sample(self.sample_kind, sample, label, timestamp=timestamp)
        self._sample_added()
        return sample_id

    def add_frame(self, image: npt.NDArray[np.uint8], boxes: npt.ArrayLike | None = (), *, timestamp: float | None = None) -> int:
        """Detection devices: store an (H, W, 3) uint8 RGB frame with its ``(N, 5)`` boxes
        ``class, x1, y1, x2, y2`` in that frame's pixels, durably; then as :meth:`add_sample`."""
        if self.sample_kind != "frame":
            raise LocalProtocolError(f"add_frame is for detection devices; this {self.task.name} device takes add_sample")
        sample_id = self.store.add_frame(image, boxes, timestamp=timestamp)
        if not self._small_box_said:
            self._say_small_boxes(image, boxes)
        self._sample_added()
        return sample_id

    def _say_small_boxes(self, image: npt.NDArray[np.uint8], boxes: npt.ArrayLike | None) -> None:
        """Warn (once) of a stored box under one pixel at the detector's input size: training
        letterboxes the frame to it and drops such a box (helper-182: a 15x15 object in a 1080p
        frame was never trained on, without a word). The rule is the task's (``dropped_boxes``)."""
        dropped = getattr(self.task, "dropped_boxes", None)
        rows = np.asarray(() if boxes is None else boxes, dtype=np.float64).reshape(-1, 5)
        if dropped is None or not len(rows):
            return
        small = dropped(image.shape, rows)
        if small.size:
            i = int(small[0])
            height, width = image.shape[:2]
            detector: Any = self.task  # (a task with dropped_boxes: the detector, with its input size)
            imgsz = int(detector.config.imgsz)
            scale = min(imgsz / height, imgsz / width)
            self._small_box_said = True
            log.warning("device %s: box %d (%gx%g pixels of a %dx%d frame) is under one pixel at the detector's %d-pixel "
                        "input, so training drops it (the frame still trains, as background there): objects under %.3g "
                        "pixels in such frames are not learnt; crop the frame around them to label them (said once)",
                        self.core.config.device_id, i, rows[i, 3] - rows[i, 1], rows[i, 4] - rows[i, 2], width, height,
                        imgsz, 1 / scale)

    @property
    def ready(self) -> bool:
        """True once the device holds a model to predict with: the one saved from its last run,
        or the one its coordinator sends in answer to the serving request made at start."""
        return self.version is not None

    @property
    def connected(self) -> bool:
        """True while the client is started and connected to its broker (the ``connection``
        notification says when that changes; labels are stored either way)."""
        return self._started and self.transport.connected

    @property
    def duplicate_id(self) -> bool:
        """True once this device found another device using its id (a cloned SD card or VM image: the
        coordinator kept taking updates under this id's sequence numbers that this device never sent).
        Both keep working, taking turns on the broker (see :data:`~edge_sdk.mqtt.DUPLICATE_RECONNECT_S`);
        give one of them a new device id and its own data dir, or re-provision it."""
        return self.core.state.duplicate_id

    @property
    def version(self) -> int | None:
        """The deployed model's version (what :meth:`predict` uses), None before the first."""
        with self._lock:
            return None if self._deployed is None else self._deployed[0]

    @property
    def weights(self) -> Vector | None:
        """The deployed model's weights (read-only float32), None before the first."""
        with self._lock:
            return None if self._deployed is None else self._deployed[1]

    def predict(self, x: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """Class labels for a batch ``(N, *contract.shape)`` or one sample, from the latest
        deployed model (input validated as in :meth:`add_sample`).

        With ``inference="onnx"`` (default) an onnxruntime session serves the model; a new
        version is hot-swapped in without failing or blocking a concurrent ``predict``.
        Built-in tasks use their shipped graph; others export theirs once (seconds, torch).
        After :meth:`stop` it keeps serving the last deployed model (offline; nothing newer arrives).
        """
        with self._lock:  # the pair and the engine together: read apart, a deployment between the two reads
            deployed, engine = self._deployed, self._engine  # (another region's lower number) let a stale pair into a new engine
        if deployed is None:
            raise LocalProtocolError(
                "no model to predict with yet: the device asks its coordinator for the current one when it "
                "starts; check `client.ready` or wait with `client.wait_for_version(0, timeout)`"
            )
        if self.sample_kind == "frame":
            raise LocalProtocolError("predict serves classifiers; a detection device serves boxes with detect(image) (an OnnxDetector)")
        assert self.contract is not None
        batch = self.contract.batch(x)  # InvalidSample says what the task expects
        if self.inference == "torch":
            logits = self.task.logits(deployed[1], batch)  # type: ignore[attr-defined]
            return np.asarray(np.argmax(logits, axis=1), dtype=np.int64)
        if engine is None:
            from edge_sdk.inference import InferenceEngine

            with self._lock:
                if self._engine is None:  # the pair deployed now: another region's lower version may have come meanwhile
                    version, weights = self._deployed if self._deployed is not None else deployed
                    self._engine = InferenceEngine(self.task, weights, version=version)  # type: ignore[arg-type]
                engine = self._engine
        elif engine.version < deployed[0]:
            engine.swap(deployed[0], deployed[1])
        return np.asarray(engine.predict(batch).labels, dtype=np.int64)

    def detect(self, image: npt.NDArray[np.uint8], *, conf: float = 0.25) -> npt.NDArray[np.float32]:
        """Detection devices: the objects in one RGB uint8 ``(H, W, 3)`` frame as ``(k, 6)``
        ``x1, y1, x2, y2, score, class`` in that frame's pixels, scoring above ``conf``, from
        the latest deployed model.

        onnxruntime serves it (letterbox and NMS without torch); each new version is exported
        to ONNX once, on the first ``detect`` after it arrives (seconds; the task's
        ``export_onnx`` needs ``edgeci[detection]``). Concurrent calls keep using the previous
        version's session until the new one is ready. After :meth:`stop` it keeps serving the
        last deployed model, as :meth:`predict` does, and writes nothing into the data dir.
        """
        if self.sample_kind != "frame":
            raise LocalProtocolError(f"detect serves detectors; this {self.task.name} device predicts classes with predict(x)")
        check_detect_input(image, conf)  # before any export: a bad call costs nothing
        with self._lock:
            deployed, current = self._deployed, self._detector
        if deployed is None:
            raise LocalProtocolError("no model to detect with yet: check `client.ready` or wait with `client.wait_for_version(0, timeout)`")
        if current is None or current.weights is not deployed[1]:  # by identity: after a region switch numbers repeat
            current = self._export_detector(*deployed)
        return np.asarray(current.detector.detect(image, conf=conf), dtype=np.float32)

    def _export_detector(self, version: int, weights: Vector) -> _Exported:
        """Export ``weights`` to ONNX and open an onnxruntime session on it (one export at a time)."""
        export = getattr(self.task, "export_onnx", None)
        if export is None:
            raise MissingExtra(f"task {self.task.name} cannot export its detector to ONNX here: install edgeci[detection]")
        from edge_sdk.tasks.detection import OnnxDetector

        with self._export_lock:
            with self._lock:
                current, deployed = self._detector, self._deployed
            if deployed is not None and deployed[1] is not weights:  # deployed anew while this waited for the lock:
                version, weights = deployed  # export that (exported, the older one replaced the newer one's session)
            if current is not None and current.weights is weights:
                return current  # another thread exported it meanwhile
            name = f"deployed-v{version}.onnx"
            if current is not None and current.path.name == name:  # the same number from another region
                name = f"deployed-v{version}-{self.core.state.region}.onnx"
            import contextlib
            import tempfile

            # Stopped: the data dir's lock is released and the scratch folder gone; the session
            # reads the file when it opens, so a temporary folder can go at once.
            with (tempfile.TemporaryDirectory(prefix="edgeci-detect-") if self._stopped else
                  contextlib.nullcontext(self.data_dir if self.data_dir is not None and self.durable else self._scratch())) as folder:
                path = Path(export(weights, Path(folder) / name))
                exported = _Exported(version, OnnxDetector(path, threads=1), weights, path)
            with self._lock:
                self._detector = exported
            if current is not None and current.path != path and not self._stopped:  # a stopped client's dir is not its own
                current.path.unlink(missing_ok=True)
            return exported

    def _scratch(self) -> Path:
        """A temporary folder for in-memory clients' exports (removed by ``stop``)."""
        if self._scratch_dir is None:
            import tempfile

            self._scratch_dir = Path(tempfile.mkdtemp(prefix="edgeci-detect-"))
        return self._scratch_dir

    def on(self, kind: str, callback: Callback) -> None:
        """Subscribe to notifications (a name not in :data:`EVENTS` is a ConfigError: a typo would
        never fire): ``model``, ``trained``, ``update_acked``, ``update_rejected``,
        ``deferred``, ``retry``, ``training_failed``, ``training_unavailable`` (a round this
        install cannot train: full rounds without ``[train]``), ``message_rejected``, ``store_recovered``
        (the sample store was corrupt and started clean; ``path``, ``reason``), ``scc_cache_dropped``
        (SCC's stored feature cache was unreadable and starts empty; ``reason``), ``failover`` (the device
        switched regions: ``from``, ``to``, ``reason``, ``after_timeouts``), ``canary`` (asked to score a candidate
        on new labels before training on them), ``canary_reported`` (the paired ``counts`` sent), ``canary_dropped``
        (``reason``), ``model_older`` (the coordinator answers a pull with a ``version`` older than the one
        ``held``: a new coordinator of the same numbering; the device waits for a newer one), ``epoch`` (the
        region's coordinator numbers its versions anew, ``epoch`` after ``previous``: its state dir was created again;
        the device fetches its release and refuses the numbering before), ``storage`` (``ok``,
        ``detail``: the store could not save the device's counters, so its requests are held, or can again),
        ``key_pinned`` (trust on first use: ``kid``, ``region``), ``recalled`` (the coordinator recalled the
        deployed version), ``seq_conflict`` (the coordinator holds another update under this device's sequence number: it is sent
        again under a new one), ``seq_behind`` (``seq``, ``watermark``: it holds updates of this id more than 100,000 seqs
        ahead — a lost store of a long-used id, or a forged ack — which this device cannot pass on its own; logged once
        per watermark, and the update stays pending), ``pull_rejected`` (``seq``, ``reason``: the coordinator refused a
        pull, e.g. ``unknown_model`` when it serves another task; logged once per reason, and the pull is retried),
        ``duplicate_id`` (``device``, ``conflicts``: another device uses this id — a cloned image — said once at
        ERROR; see :attr:`duplicate_id`)
        (or ``*`` for all)."""
        if kind not in EVENTS:
            raise ConfigError(f"no notification is called {kind!r}; use one of {', '.join(sorted(EVENTS))}")
        if not callable(callback):  # else each notification would log a TypeError, far from this call
            raise ConfigError(f"the callback for {kind!r} must be callable as callback(kind, data), got "
                              f"{type(callback).__name__} {callback!r:.60}")
        self._callbacks[kind].append(callback)

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until a model of at least ``version`` is deployed, at most ``timeout`` seconds;
        True if one is (for scripts and tests)."""
        if isinstance(version, bool) or not isinstance(version, int | np.integer):
            raise ConfigError(f"version must be an int, got {type(version).__name__} {version!r:.40}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
            raise ConfigError(f"timeout must be seconds >= 0, got {timeout!r:.40}")
        with self._version_changed:
            return self._version_changed.wait_for(lambda: (v := self.version) is not None and v >= version, timeout)

    # ------------------------------------------------------------------ internals

    def _added(self) -> int:
        return self.store.stats().added

    def _sample_added(self) -> None:
        # The total is read when the actor makes the event, not here: the actor makes its events
        # one at a time, so the totals it reads only grow. Read here, an app thread that stored
        # earlier could submit after one that stored later ("sample total went backwards").
        if self._unsaved is not None:  # (a hint read outside the actor: it checks again)
            self.actor.call(self._retry_unsaved)
        self.actor.submit(lambda now: SampleAdded(now=now, total=self._added()))

    def _canary_score(self, sample: npt.NDArray[Any], label: int) -> None:
        """Canary evaluation: predict a new label with the release (exactly as :meth:`predict`
        does) and with the candidate, and hand the two verdicts to the core."""
        with self._lock:
            canary, deployed = self._canary, self._deployed
        if canary is None or deployed is None or deployed[0] != canary[1]:
            return  # not holding the release the request names (yet): this label is not scored
        candidate, release, predictor = canary
        try:
            release_label = int(self.predict(sample)[0])
            if self.version != release:
                return  # a newer release arrived meanwhile: the prediction was not the named release's
            batch = self.contract.batch(sample) if self.contract is not None else sample
            if self.inference == "torch":
                candidate_label = int(np.argmax(self.task.logits(predictor, batch), axis=1)[0])  # type: ignore[attr-defined]
            else:
                candidate_label = int(predictor.predict(batch).labels[0])
        except Exception:  # scoring must never cost the label itself
            log.exception("canary scoring of candidate %d failed", candidate)
            return
        self.actor.submit(lambda now: CanaryScored(now=now, candidate=candidate, release=release,
                                                   candidate_right=candidate_label == label,
                                                   release_right=release_label == label))

    def _load_deployed(self) -> tuple[int, Vector] | None:
        """The model saved at the last deployment (served until the coordinator answers), and
        the region whose numbering its version is in (``_deployed_region``); a file that cannot
        be read is reported and ignored (the device pulls the current model)."""
        if self._model_path is None or not self._model_path.exists():
            return None
        try:  # NaN or wrong-sized weights (RemoteProtocolError), or meta we did not write: all unreadable
            _, weights, meta = load_model(self._model_path, expect=self.task.spec)
            version, region, kid, epoch = _saved_meta(meta)
        except EdgeciError as exc:
            log.warning("device: ignoring the saved model (%s); serving nothing until the coordinator sends one", exc)
            return None
        # Served again only while the key that signed it is trusted: the provisioned keys, or (trust
        # on first use) the keys pinned for its region. A device moved from a trial broker to a
        # bundle must not serve, nor hold out for versions above, what an untrusted key signed.
        trusted = self.trusted_keys or self._pins(region or self.regions[0])
        if (kid is None and self.trusted_keys) or (kid is not None and kid not in trusted):
            log.warning("device: ignoring the saved model v%d: it was signed by %s, which this device does not trust now "
                        "(%s); serving nothing until the coordinator sends one", version,
                        f"key {kid}" if kid is not None else "an unrecorded key (saved by an older SDK)",
                        f"trusted: {', '.join(sorted(trusted))}" if trusted else "no key trusted yet")
            return None
        self._deployed_region, self._deployed_epoch = region, epoch
        return version, weights

    @property
    def region(self) -> str:
        """The region whose coordinator the device is using now."""
        return self.core.state.region

    def _handle(self, event: Any) -> list[Any]:
        """The core's ``handle``, with one hold: a request's timeout does not run out while a packet
        is still arriving (``MqttTransport.receiving``), which may be its answer, or while what we sent
        is still going up (``MqttTransport.sending``). On a slow downlink a pull retried every
        ``request_timeout_s`` while its model arrived made the coordinator send the whole model again
        per retry (an 8 MB model at 1 Mbit/s: 24 MB down); on a slow uplink an update longer than
        ``failover_after`` timeouts (10 + 20 + 40 s) made a device with a fallback region leave a
        working coordinator and drop the update. The timer is looked at again a moment later instead,
        and fires as before once nothing moves."""
        if (isinstance(event, TimerFired) and self.core.state.phase in _AWAITING_ANSWER
                and (self.transport.receiving() or self.transport.sending())):
            self.receiving_holds += 1
            return [ScheduleTimer(at=event.now + RECEIVING_RECHECK_S)]
        return self.core.handle(event)

    def _on_connection(self, up: bool) -> None:
        if up:  # paho's thread: one retained publish, no domain logic
            with self._presence_lock:
                if self._stopping.is_set():
                    return  # stop() said offline: a reconnect while it disconnects says nothing after it
                self.transport.publish(self._presence_topic, b"online", retain=True)
            if self._connected_once:  # a reconnect: the core asks for what it missed (the first: start())
                self.actor.call(lambda: self.actor.run_actions(self.core.reconnected(self.clock.now())))
            self._connected_once = True
        elif not self._connected_once:
            return  # a start that never connected raises from start(): nothing changed
        info = {"connected": up, "broker": self.transport.address.url}
        self.actor.call(lambda: self._emit("connection", info))  # (in the actor's thread, as every notification)

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.actor.submit(lambda now: MessageReceived(now=now, topic=topic, payload=payload))

    def _epoch(self, region: str) -> int:
        """The numbering ``region``'s coordinator last announced to this device (``PinEpoch``, durable), 0 if none."""
        raw = self.store.get_meta(f"epoch.{region}")
        if isinstance(raw, str) and raw.isdigit() and int(raw) < 2**63:
            return int(raw)
        if raw is not None:
            log.error("device store holds an unreadable epoch for region %s (%.40r): ignoring it", region, raw)
        return 0

    def _meta_record(self, key: str, build: Callable[[dict[str, Any]], _R], *, max_chars: int, what: str) -> _R | None:
        """A short JSON record the driver keeps in the store's meta, built by ``build`` (None if none).
        A damaged one (not short JSON text, a field missing or out of range) is said and ignored."""
        raw = self.store.get_meta(key)
        if raw is None:
            return None
        try:
            if not isinstance(raw, str) or len(raw) > max_chars:
                raise ValueError("not a short JSON text")
            return build(json.loads(raw))
        except (ValueError, KeyError, TypeError, LocalProtocolError) as exc:
            log.error("device store holds an unreadable %s (%s): ignoring it", what, exc)
            return None

    def _canary_taken(self, region: str) -> PinCanary | None:
        """The canary rounds this device took in ``region`` (``PinCanary``, durable), None if none."""
        return self._meta_record(
            f"canary.{region}", lambda d: PinCanary(region=region, epoch=d["epoch"], candidate=d["candidate"],
                                                    release=d["release"], nonces=tuple(d["nonces"])),
            max_chars=_MAX_CANARY_PIN_CHARS, what=f"canary record for region {region}")

    def _region_down(self, region: str) -> float | None:
        """The stamp of ``region``'s status when this device left it after timeouts (``MarkRegionDown``), None if none."""
        raw = self.store.get_meta(f"down.{region}")
        if isinstance(raw, float) and math.isfinite(raw):
            return raw
        if raw not in (None, ""):
            log.error("device store holds an unreadable region mark for %s (%.40r): ignoring it", region, raw)
        return None

    def _training_mark(self) -> MarkTraining | None:
        """The training mark the last process left (``MarkTraining``, durable), None if none."""
        return self._meta_record(
            "training", lambda d: MarkTraining(in_flight=d["in_flight"], crashes=d["crashes"], hold_until=d["hold_until"],
                                               failures=d.get("failures", 0)),  # (no failures: written before they were kept)
            max_chars=200, what="training mark (a crash in training before this start is not seen)")

    def _save_training_mark(self, mark: MarkTraining) -> None:
        """Write the training mark; a store that cannot (a full disk) does not hold training back: the job
        runs unguarded (a crash in it goes unseen, as before marks were kept) and this is said once."""
        record = {"in_flight": mark.in_flight, "crashes": mark.crashes, "hold_until": mark.hold_until, "failures": mark.failures}
        try:
            self.store.set_meta("training", json.dumps(record))
        except StorageError as exc:
            if not self._mark_failed:
                self._mark_failed = True
                log.error("device %s: cannot save its training mark (%s); training goes on, but a crash in it is "
                          "not seen after a restart (no back-off)", self.core.config.device_id, exc)
            return
        self._mark_failed = False

    def _pins(self, region: str) -> dict[str, bytes]:
        """Coordinator keys this device pinned on first use for ``region`` (durable)."""
        raw = self.store.get_meta(f"pins.{region}")
        if not isinstance(raw, str):
            return {}
        try:
            pins = {str(k): bytes.fromhex(v) for k, v in json.loads(raw).items()}
        except (ValueError, AttributeError, TypeError):
            log.error("device store holds unreadable key pins for region %s: ignoring them", region)
            return {}
        from edge_sdk.signing import key_id

        bad = sorted(k for k, v in pins.items() if key_id(v) != k)
        if bad:  # a damaged store must not stop the device from starting (the core refuses such keys)
            log.error("device store holds key pins for region %s whose id does not match the key (%s): ignoring them",
                      region, ", ".join(bad))
        return {k: v for k, v in pins.items() if k not in bad}

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        for cb in (*self._callbacks.get(kind, ()), *self._callbacks.get("*", ())):
            try:
                cb(kind, data)
            except Exception:
                log.exception("callback for %s failed", kind)

    def _save_counters(self, action: PersistDeviceState) -> bool:
        """Save ``next_seq`` / ``trained_upto`` and the update waiting for its ack, in one transaction;
        on a storage error keep them to save before the next publish (nothing raises: training and
        timers go on, so the device never sticks). The update is the large part: a disk with room for
        the counters but not for it saves the counters alone (a restart then trains its samples again)
        rather than hold the update back."""
        counters: dict[str, int | bytes] = {"next_seq": action.next_seq, "trained_upto": action.trained_upto}
        try:
            try:
                self.store.set_meta_many({**counters, "pending_update": action.pending, "pending_upto": action.pending_upto})
            except StorageError as exc:
                if not action.pending:
                    raise
                self.store.set_meta_many({**counters, "pending_update": b"", "pending_upto": 0})
                log.warning("device %s: saved its counters without update %d (%s): a restart before its ack trains "
                            "its samples again", self.core.config.device_id, action.next_seq - 1, exc)
        except StorageError as exc:
            if self._unsaved is None:
                log.error("device %s: cannot save its counters (%s); holding its requests until it can",
                          self.core.config.device_id, exc)
                self._emit("storage", {"ok": False, "detail": str(exc)[:200]})
            self._unsaved = action
            return False
        if self._unsaved is not None:
            self._unsaved = None
            log.warning("device %s: counters saved again; requests resume", self.core.config.device_id)
            self._emit("storage", {"ok": True, "detail": ""})
            held, self._held = self._held, {}
            for request in held.values():  # (their retry timers have backed off, up to max_backoff_s)
                self.transport.publish(request.topic, request.payload, qos=request.qos, retain=request.retain)
        return True

    def _retry_unsaved(self) -> None:
        """A label was stored, so the disk takes writes again: save the held counters now."""
        if self._unsaved is not None:
            self._save_counters(self._unsaved)

    def _perform(self, action: object) -> None:
        if isinstance(action, Publish):
            self._held.pop(action.topic, None)  # superseded by this one
            if self._unsaved is not None and not self._save_counters(self._unsaved):
                self._held[action.topic] = action  # its sequence number is not durable: it must not leave yet
                return
            self.transport.publish(action.topic, action.payload, qos=action.qos, retain=action.retain)
        elif isinstance(action, PersistDeviceState):
            self._save_counters(action)  # the newest supersedes an unsaved one (trained_upto may go back)
        elif isinstance(action, PinKey):
            pins = {**self._pins(action.region), action.kid: action.public_raw}
            try:
                self.store.set_meta(f"pins.{action.region}", json.dumps({k: v.hex() for k, v in pins.items()}))
            except StorageError as exc:  # the core holds the pin; the actions after this one must still run
                log.error("device %s: cannot save the pinned coordinator key %s (%s); it holds until a restart, "
                          "which pins on first use again", self.core.config.device_id, action.kid, exc)
                return
            log.info("device %s: pinned coordinator key %s for region %s (trust on first use); models signed by "
                        "any other key will be refused", self.core.config.device_id, action.kid, action.region)
        elif isinstance(action, PinEpoch):
            try:
                self.store.set_meta(f"epoch.{action.region}", str(action.epoch))
            except StorageError as exc:  # the core holds it; the actions after this one must still run
                log.error("device %s: cannot save region %s's new epoch %d (%s); it holds until a restart",
                          self.core.config.device_id, action.region, action.epoch, exc)
                return
            if action.previous:
                log.warning("device %s: region %s's coordinator numbers its versions anew (epoch %d after %d: a new state "
                            "dir, or one given a new epoch); models of the numbering before are refused from now on",
                            self.core.config.device_id, action.region, action.epoch, action.previous)
            else:
                log.info("device %s: region %s's coordinator numbers its versions in epoch %d",
                         self.core.config.device_id, action.region, action.epoch)
        elif isinstance(action, PinCanary):
            record = {"epoch": action.epoch, "candidate": action.candidate, "release": action.release,
                      "nonces": list(action.nonces)}  # (at most CANARY_NONCES_KEPT: one short record per region)
            try:
                self.store.set_meta(f"canary.{action.region}", json.dumps(record))
            except StorageError as exc:  # the core holds it; the actions after this one must still run
                log.error("device %s: cannot save the canary round it took (%s); a replay of it after a restart "
                          "would be taken again", self.core.config.device_id, exc)
        elif isinstance(action, MarkTraining):
            self._save_training_mark(action)
        elif isinstance(action, MarkRegionDown):
            try:  # "" clears it (the region answered, or said something new)
                self.store.set_meta(f"down.{action.region}", "" if action.status_at is None else action.status_at)
            except StorageError as exc:  # the core holds it; the actions after this one must still run
                log.error("device %s: cannot save that region %s stopped answering (%s); after a restart it is "
                          "tried again first", self.core.config.device_id, action.region, exc)
        elif isinstance(action, StartTraining):
            self._trainer.submit(self._train, action.job)
        elif isinstance(action, DeployModel):
            if self._model_path is not None:
                try:  # a cache for the next start: failing to write it must not stop this deployment
                    save_model(self._model_path, self.task.spec, action.weights,
                               {"version": action.version, "region": self.core.state.region, "kid": action.kid,
                                "epoch": action.epoch})
                except OSError as exc:
                    log.warning("device %s: could not save v%d to %s (%s); serving it from memory",
                                self.core.config.device_id, action.version, self._model_path, exc)
            weights = np.array(action.weights, dtype=np.float32)
            with self._lock:
                self._deployed = (action.version, weights)
                engine = self._engine
            if engine is not None and not engine.swap(action.version, weights):  # built aside; predict never waits
                with self._lock:  # not "newer": another region's numbering (failover); rebuilt on the next predict
                    if self._engine is engine:
                        self._engine = None
            with self._version_changed:
                self._version_changed.notify_all()
        elif isinstance(action, StartCanary):
            self._start_canary(action)
        elif isinstance(action, StopCanary):
            with self._lock:
                if self._canary is not None and self._canary[0] == action.candidate:
                    self._canary = None
        elif isinstance(action, Notify):
            self._on_notify(action)
        elif isinstance(action, SwitchRegion):
            self._held.clear()  # the other region's requests; the core asks the new one itself
            log.warning("device %s: %s; now using region %s instead of %s", self.core.config.device_id,
                        action.reason, action.region, action.previous)
        else:
            raise TypeError(f"unknown action {action!r}")

    def _start_canary(self, action: StartCanary) -> None:
        """Hold the candidate's predictor (the same inference path :meth:`predict` uses) while scoring."""
        if self.sample_kind == "frame":
            return  # detection devices have no per-label correctness: they send no canary report
        weights = np.array(action.weights, dtype=np.float32)
        predictor: Any = weights
        if self.inference != "torch":
            from edge_sdk.inference import InferenceEngine

            try:
                predictor = InferenceEngine(self.task, weights, version=action.candidate)  # type: ignore[arg-type]
            except Exception:
                log.exception("cannot serve canary candidate %d", action.candidate)
                return
        with self._lock:
            self._canary = (action.candidate, action.release, predictor)

    def _remember_job(self, job_id: int, ids: list[int]) -> None:
        """The sample ids job ``job_id`` trained on, until its ``trained`` notify marks them
        used. The core runs one job at a time, so an older entry is a job that will never
        say ``trained`` (its weights were unusable, or a region switch made it stale)."""
        self._job_ids = {k: v for k, v in self._job_ids.items() if k > job_id}
        self._job_ids[job_id] = ids

    def _on_notify(self, note: Notify) -> None:
        if note.kind in ("trained", "update_acked"):
            self._mark_samples(note)
        elif note.kind == "training_crashed":
            log.warning("device %s: the last process died while training (%s in a row: killed for memory? a native "
                        "crash?); no training for %.0f s", self.core.config.device_id, note.data.get("crashes"),
                        note.data.get("retry_in_s", 0.0))
        elif note.kind == "duplicate_id":  # (the core says it once)
            self.transport.yield_session()
            log.error("device %s: another device is using this device id (a cloned SD card or VM image?): the coordinator "
                      "took updates under this id's sequence numbers that this device never sent (%s times), and the broker "
                      "hands the id's connection to whichever connected last. Give one of them a new device id with its own "
                      "data dir (and, with a broker that checks identities, its own bundle: edgeci pki issue), or re-provision "
                      "it. Meanwhile both keep working, taking turns: this one leaves the connection to the other for about "
                      "%.0f s each time it is taken over", self.core.config.device_id, note.data.get("conflicts"),
                      DUPLICATE_RECONNECT_S)
        elif note.kind == "seq_behind" and note.data.get("watermark") != self._seq_behind_said:
            self._seq_behind_said = note.data.get("watermark")
            log.warning("device %s: the coordinator holds updates of this device id up to seq %s, more than %d above this "
                        "device's %s: its store was lost (a reinstall of a long-used id?) or the ack was forged. Its updates "
                        "cannot get through: give this device a new --device-id (or restore its store); it keeps retrying",
                        self.core.config.device_id, note.data.get("watermark"), MAX_WATERMARK_JUMP, note.data.get("seq"))
        elif (note.kind == "pull_rejected" and str(note.data.get("reason")) not in self._pull_rejected_said
              and len(self._pull_rejected_said) < 16):  # (reasons come in unsigned acks: a bounded set)
            reason = str(note.data.get("reason"))
            self._pull_rejected_said.add(reason)
            # A canary fetch after its round closed is refused in a normal race (and given up after 3 tries).
            (log.info if reason.startswith("canary") else log.warning)(
                "device %s: the coordinator of region %s refused its pull (%s)%s; it retries", self.core.config.device_id,
                self.region, reason, ": it serves another model than this device's task — check the task and the region"
                if reason == "unknown_model" else "")
        self._emit(note.kind, dict(note.data))

    def _mark_samples(self, note: Notify) -> None:
        """Record which update trained on the samples, or that it was acknowledged (the eviction
        order's input). A store that cannot (a full disk) leaves the samples where they are in that
        order — they stay longer, never leave early — and the notification and the actions after it
        still run: raised, the error dropped the app's ``trained`` / ``update_acked`` and the pull
        that follows an ack, and the exception the actor kept held the store's files open after stop()."""
        seq = int(note.data["seq"])
        try:
            if note.kind == "trained":
                self.store.mark_used(self._job_ids.pop(int(note.data["job_id"]), []), seq)
            else:
                self.store.mark_acked(seq)
        except StorageError as exc:
            log.warning("device %s: cannot record update %d's samples as %s (%s); they are evicted later, not earlier",
                        self.core.config.device_id, seq, "used" if note.kind == "trained" else "acknowledged", exc)

    def run_training_job(self, job: TrainingJob, config: TrainConfig) -> tuple[TrainResult, list[int]]:
        """What the trainer thread runs for one job: the result and the sample ids it used.
        Public for emulators that drive a fleet of clients round by round without a broker."""
        if self.sample_kind == "frame":  # (x, y) = frames and their boxes
            ids = self.store.ids("frame")
            # ids evicted meanwhile are skipped; each frame shrunk as it is read (a detector's
            # shrink_frame: what its training makes of it, so the same result) instead of every
            # frame held whole at once: 1080p frames filling the store's quota are ~0.5 GB
            shrink = getattr(self.task, "shrink_frame", None)
            frames = [shrink(f, b) if shrink is not None else (f, b) for f, b in self.store.frames(ids)]
            images, boxes = [f for f, _ in frames], [b for _, b in frames]
            return self.task.local_update(job.weights, images, boxes, config), ids
        snap = self._within_contract(self.store.snapshot(self.sample_kind))
        ids = [int(i) for i in snap.ids]
        scc = self.scc
        if scc is None:
            return self.task.local_update(job.weights, snap.x, snap.y, config), ids
        scc.prepare(job.weights, snap.x, snap.y)  # compensate the cache for a new extractor
        if job.group == scc.classifier_group:
            result = scc.calibrate(job.weights, snap.x, snap.y, config)
        else:
            result = self.task.local_update(job.weights, snap.x, snap.y, config)
        scc.age_out(job.weights, snap.ids, snap.x, snap.y)  # older samples live on as features
        return result, ids

    def _within_contract(self, snap: Snapshot) -> Snapshot:
        """``snap`` without the samples the task's input contract refuses, which are removed from
        the store (said once per removal): a store written before a contract's range (gestures:
        ±64) may hold such samples, and one of them would fail every training round."""
        contract = self.contract
        if contract is None or contract.value_range is None or not len(snap):
            return snap
        lo, hi = contract.value_range
        ok = contract.rows_within(snap.x)
        if ok.all():
            return snap
        bad = [int(i) for i in snap.ids[~ok]]
        self.store.remove(bad)
        log.warning("device %s: removed %d stored sample(s) outside the task's input range [%g, %g] (stored before the "
                    "range was checked?); training goes on with the other %d", self.core.config.device_id, len(bad), lo, hi,
                    int(ok.sum()))
        return Snapshot(ids=snap.ids[ok], timestamps=snap.timestamps[ok], x=snap.x[ok], y=snap.y[ok])

    def _train(self, job: TrainingJob) -> None:
        """Trainer thread: fine-tune on all local samples, hand the result to the actor."""
        try:
            cfg = self.train_config
            clamped = hints_out_of_bounds(job.hints)
            if clamped:
                log.warning("device %s: training hints out of bounds, clamped: %s", self.core.config.device_id, clamped)
            # epochs, batch size, lr and FedProx's mu from the coordinator's hints, else ours
            config = train_config(job.hints, cfg, seed=cfg.seed + job.job_id, group=job.group)
            with stoppable(self._stopping.is_set):
                result, ids = self.run_training_job(job, config)

            def finished(now: float) -> TrainingFinished:
                self._remember_job(job.job_id, ids)  # in the actor thread, as _on_notify reads it
                return TrainingFinished(now=now, job_id=job.job_id, weights=result.weights, n_samples=result.n_samples,
                                        loss=result.loss, seconds=result.seconds)

            self.actor.submit(finished)
        except TrainingCancelled:  # stop(): nothing is sent, the actor is stopping too
            log.info("device %s: training job %d cancelled: the client is stopping", self.core.config.device_id, job.job_id)
        except MissingExtra as exc:  # a [device] install: classifier-only rounds only
            info = {"job_id": job.job_id, "group": job.group, "reason": str(exc)}
            log.info("device %s: skipping a %s round: %s", self.core.config.device_id, job.group, exc)
            self.actor.call(lambda: self._emit("training_unavailable", info))
            err = f"{type(exc).__name__}: {exc}"
            self.actor.submit(lambda now: TrainingFailed(now=now, job_id=job.job_id, error=err))
        except Exception as exc:
            log.exception("local training failed")
            err = f"{type(exc).__name__}: {exc}"
            self.actor.submit(lambda now: TrainingFailed(now=now, job_id=job.job_id, error=err))
