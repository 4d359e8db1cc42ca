"""Protocol messages: frozen, slotted, keyword-only dataclasses that validate themselves.

Every message travels as a frame of the codec (protocol v3): a msgpack header ``{"type": <TYPE>, ...}`` plus the
raw weights (see :mod:`.codec`). Weights are a 1-D float32 vector: the whole model
(``group == "full"``), one layer group's slice of it (LASP partial sync), or nothing
(``group == "unchanged"``: "you already hold this version").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from edge_sdk.errors import MalformedMessage
from edge_sdk.fastinit import fast_init
from edge_sdk.spec import FULL, Vector

AckStatus = Literal["accepted", "duplicate", "rejected", "deferred"]
ACK_STATUSES: tuple[str, ...] = ("accepted", "duplicate", "rejected", "deferred")
MAX_ID_LEN = 64
NO_VERSION = -1
UNCHANGED = "unchanged"
"""Model group meaning "the version you already hold": no weights travel."""
NO_EPOCH = 0
"""A coordinator without a state dir (the in-process emulator): version numbers of one run only."""
_EPOCH_OMIT: tuple[tuple[str, object], ...] = (("epoch", NO_EPOCH),)


_INT_END = 2**63
_F32 = np.dtype(np.float32)

# Each check tests the common exact types first (no message is built unless it fails); the
# general rule after it decides everything else, so the accepted set is unchanged.


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise MalformedMessage(what)


def _check_id(value: object, what: str) -> None:
    if type(value) is str and 0 < len(value) <= MAX_ID_LEN:
        return
    _need(isinstance(value, str) and 0 < len(value) <= MAX_ID_LEN, f"{what} must be a 1-64 char string")


def _check_int(value: object, what: str, lo: int = 0) -> None:
    if type(value) is int and lo <= value < _INT_END:
        return
    _need(isinstance(value, int) and not isinstance(value, bool) and lo <= value < 2**63, f"{what} must be an int >= {lo}")


def _check_finite(value: object, what: str) -> None:
    """A finite int or float; not a bool (an int to ``isinstance``, not to a reader of the field)."""
    if type(value) is float and math.isfinite(value):
        return
    _need(isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value), what)


def _check_weights(value: object) -> None:
    if type(value) is np.ndarray and value.dtype is _F32 and value.ndim == 1:
        return
    _need(
        isinstance(value, np.ndarray) and value.dtype == np.float32 and value.ndim == 1,
        "weights must be a 1-D float32 vector",
    )


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Pull:
    """Device asks for the current model (SPIN: after its sample threshold / each new sample)."""

    TYPE: ClassVar[str] = "pull"
    device: str
    seq: int
    model_id: str
    have_version: int = NO_VERSION
    n_samples: int = 0
    invite_round: int = NO_VERSION
    serve: bool = False
    """A serving request: the device wants the model to *predict* with (e.g. right after it
    connects); it does not count as a training pull and is never deferred."""
    canary: int = NO_VERSION
    """A canary fetch: the device, asked to evaluate candidate ``canary`` (see :class:`Canary`),
    wants that candidate's weights to score it. Never a training pull; ``-1``: not one."""
    epoch: int = NO_EPOCH
    """The numbering ``have_version`` is in (:attr:`ModelMsg.epoch`): the same number from
    another epoch is another model."""
    OMIT_AT_DEFAULT: ClassVar[tuple[tuple[str, object], ...]] = (("canary", NO_VERSION), *_EPOCH_OMIT)
    """Fields the codec leaves out at their default (added after protocol v2 first shipped:
    frames without them are byte-identical to before, and decode to the default)."""

    def __post_init__(self) -> None:
        _check_id(self.device, "device")
        _check_id(self.model_id, "model_id")
        _check_int(self.seq, "seq")
        _check_int(self.have_version, "have_version", lo=NO_VERSION)
        _check_int(self.n_samples, "n_samples")
        _check_int(self.invite_round, "invite_round", lo=NO_VERSION)
        _need(isinstance(self.serve, bool), "serve must be a bool")
        _check_int(self.canary, "canary", lo=NO_VERSION)
        _check_int(self.epoch, "epoch")


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class ModelMsg:
    """Coordinator pushes a model version, in reply to pull ``reply_to``."""

    TYPE: ClassVar[str] = "model"
    model_id: str
    version: int
    reply_to: int
    weights: Vector
    group: str = FULL
    spec_fingerprint: str = ""
    hints: dict[str, float] = field(default_factory=dict)
    train_group: str = FULL
    """Which layer group the device should train and send back (LASP: the classifier
    between full syncs, even when ``group`` is full because the device's extractor is old)."""
    release: int = NO_VERSION
    """The coordinator's release (the version devices predict with). A model whose
    ``version`` equals it is the release; a newer one is a training-line candidate that the
    device trains from but does not serve. Without a gate every version the strategy calls a
    candidate is a release when committed (all of them but HFedMS's chain steps)."""
    epoch: int = NO_EPOCH
    """The coordinator's numbering: created with its state dir (microseconds since 1970), so
    a coordinator that lost its state dir and counts from 0 again numbers in a newer epoch.
    A device takes a newer epoch as a new numbering and refuses an older one (a replay)."""
    full_sync: int = NO_VERSION
    """LASP: the full sync (a version) whose other groups — the extractor — a part (``group`` one
    layer group) goes onto: a device patches it only onto weights of that full sync or after it
    (a signed part is valid region-wide: replayed to a device holding an older extractor, it made
    a model no coordinator built). ``-1``: not a part, or a coordinator from before this field."""
    OMIT_AT_DEFAULT: ClassVar[tuple[tuple[str, object], ...]] = (("full_sync", NO_VERSION), *_EPOCH_OMIT)
    """Fields the codec leaves out at their default (added later: frames without them keep their bytes)."""

    def __post_init__(self) -> None:
        _check_id(self.model_id, "model_id")
        _check_int(self.version, "version")
        _check_int(self.release, "release", lo=NO_VERSION)
        _check_int(self.epoch, "epoch")
        _check_int(self.full_sync, "full_sync", lo=NO_VERSION)
        _need(self.full_sync <= self.version, "full_sync must not be after version")
        _check_int(self.reply_to, "reply_to", lo=NO_VERSION)
        _check_id(self.group, "group")
        _check_id(self.train_group, "train_group")
        _check_weights(self.weights)
        _need(isinstance(self.spec_fingerprint, str) and len(self.spec_fingerprint) <= 64, "bad spec_fingerprint")
        _need(isinstance(self.hints, dict) and len(self.hints) <= 32, "hints must be a small dict")
        for k, v in self.hints.items():
            _need(isinstance(k, str), "hints are finite numbers")
            _check_finite(v, "hints are finite numbers")


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Update:
    """Device pushes locally trained weights that started from ``base_version``.

    ``(device, seq)`` is the idempotency key: QoS 1 may deliver twice, and retries resend
    the same seq, so the coordinator applies each key at most once. ``nonce`` (random per
    update, the same on retries) lets the device tell its own accepted update from someone
    else's message that took its seq: the coordinator echoes it in a ``duplicate`` ack.
    """

    TYPE: ClassVar[str] = "update"
    device: str
    seq: int
    model_id: str
    base_version: int
    n_samples: int
    weights: Vector
    group: str = FULL
    loss: float = 0.0
    train_seconds: float = 0.0
    nonce: int = 0
    epoch: int = NO_EPOCH
    """The epoch of ``base_version`` (:attr:`ModelMsg.epoch`): a coordinator refuses an update
    trained from another numbering's model (``base_rejected``: the device trains again)."""
    OMIT_AT_DEFAULT: ClassVar[tuple[tuple[str, object], ...]] = _EPOCH_OMIT

    def __post_init__(self) -> None:
        _check_id(self.device, "device")
        _check_id(self.model_id, "model_id")
        _check_id(self.group, "group")
        _check_int(self.seq, "seq")
        _check_int(self.nonce, "nonce")
        _check_int(self.base_version, "base_version")
        _check_int(self.epoch, "epoch")
        _check_int(self.n_samples, "n_samples", lo=1)
        _check_weights(self.weights)
        _check_finite(self.loss, "loss must be finite")
        _check_finite(self.train_seconds, "train_seconds must be finite")

    @property
    def key(self) -> tuple[str, int]:
        return (self.device, self.seq)


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """Coordinator answers an update (or defers a pull) — ``seq`` echoes the request.

    For ``duplicate``: ``nonce`` is the nonce of the update the coordinator accepted under
    that seq (0 when it no longer knows) and ``watermark`` its highest accepted seq for the
    device, so a device whose seq was taken by someone else can tell and move past it.
    """

    TYPE: ClassVar[str] = "ack"
    device: str
    seq: int
    status: AckStatus
    version: int
    reason: str = ""
    nonce: int = 0
    watermark: int = NO_VERSION

    def __post_init__(self) -> None:
        _check_id(self.device, "device")
        _check_int(self.seq, "seq")
        _check_int(self.nonce, "nonce")
        _check_int(self.watermark, "watermark", lo=NO_VERSION)
        _check_int(self.version, "version", lo=NO_VERSION)
        if self.status not in ACK_STATUSES:  # the message is formatted only when it fails
            raise MalformedMessage(f"status must be one of {ACK_STATUSES}")
        # printable: devices log and show it (the labelling app's panel); a newline or an escape
        # sequence from whoever can publish on the ack topic forged log lines (helper-117)
        _need(isinstance(self.reason, str) and len(self.reason) <= 256 and self.reason.isprintable(),
              "reason must be a short printable string")


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Invite:
    """Coordinator selects a device for round ``round`` (server-driven strategies)."""

    TYPE: ClassVar[str] = "invite"
    device: str
    round: int
    version: int

    def __post_init__(self) -> None:
        _check_id(self.device, "device")
        _check_int(self.round, "round")
        _check_int(self.version, "version")


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    """Coordinator health and progress; published retained (as JSON) on the status topic."""

    TYPE: ClassVar[str] = "status"
    region: str
    coordinator: str
    version: int
    updates_accepted: int
    updates_rejected: int
    updates_duplicate: int
    devices_seen: int
    buffered: int
    strategy: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id(self.region, "region")
        _check_id(self.coordinator, "coordinator")
        for name in ("version", "updates_accepted", "updates_rejected", "updates_duplicate", "devices_seen", "buffered"):
            _check_int(getattr(self, name), name)
        _need(isinstance(self.extra, dict), "extra must be a dict")


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class PeerMsg:
    """Coordinator ↔ coordinator exchange (tokens, model broadcasts). Body is strategy-defined."""

    TYPE: ClassVar[str] = "peer"
    sender: str
    kind: str
    body: dict[str, Any]
    weights: Vector | None = None

    def __post_init__(self) -> None:
        _check_id(self.sender, "sender")
        _check_id(self.kind, "kind")
        _need(isinstance(self.body, dict), "body must be a dict")
        if self.weights is not None:
            _check_weights(self.weights)


CONTROL_COMMANDS: tuple[str, ...] = ("rollback", "pin", "unpin")


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Control:
    """An operator's command to a running coordinator (signed; see ``CoordinatorCore``).

    ``rollback`` makes version ``version`` the release and the training line again (as a
    new version number); ``pin`` does the same and stops promotions until ``unpin``.
    ``issued_at`` and ``nonce`` bound replays: the coordinator accepts a command once, and
    only within a few minutes of its time.
    """

    TYPE: ClassVar[str] = "control"
    command: str
    operator: str
    issued_at: float
    nonce: int
    version: int = NO_VERSION
    force: bool = False
    """Release ``version`` even though the release gate rejected it (otherwise refused: ``gate_rejected``)."""
    OMIT_AT_DEFAULT: ClassVar[tuple[tuple[str, object], ...]] = (("force", False),)
    """Added after the command first shipped: a command without it keeps its bytes and decodes to False."""

    def __post_init__(self) -> None:
        _need(self.command in CONTROL_COMMANDS, f"command must be one of {CONTROL_COMMANDS}")
        _need(isinstance(self.force, bool), "force must be a bool")
        _check_id(self.operator, "operator")
        _need(isinstance(self.issued_at, int | float) and math.isfinite(self.issued_at), "issued_at must be finite")
        _check_int(self.nonce, "nonce")
        _check_int(self.version, "version", lo=NO_VERSION)
        _need(self.command == "unpin" or self.version >= 0, f"{self.command} needs a version")


MAX_CANARY_SAMPLES = 10_000
"""The most labels a canary request may ask one device to score (a report's counts sum to at most this)."""


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Canary:
    """Coordinator asks a device of the canary cohort (on its ``invite`` topic) to evaluate
    candidate ``candidate`` against release ``release`` by test-then-train: score both on
    its next ``samples`` new labels *before* training on them, then send a
    :class:`CanaryReport` — within ``deadline_s`` seconds, with what it has by then."""

    TYPE: ClassVar[str] = "canary"
    device: str
    candidate: int
    release: int
    samples: int
    deadline_s: float
    epoch: int = NO_EPOCH
    """The numbering ``candidate`` and ``release`` are in (:attr:`ModelMsg.epoch`)."""
    nonce: int = 0
    """The round (:class:`~coordinator.canary.CanaryRound`): a coordinator that restarted resumes the
    round it recorded (this nonce again), or asks for the same candidate and release in a new round;
    the device echoes it in its report and refuses only a round it took already. 0: a coordinator
    from before round nonces."""
    OMIT_AT_DEFAULT: ClassVar[tuple[tuple[str, object], ...]] = (("nonce", 0), *_EPOCH_OMIT)

    def __post_init__(self) -> None:
        _check_id(self.device, "device")
        _check_int(self.epoch, "epoch")
        _check_int(self.nonce, "nonce")
        _check_int(self.candidate, "candidate")
        _check_int(self.release, "release")
        _check_int(self.samples, "samples", lo=1)
        _need(self.samples <= MAX_CANARY_SAMPLES, f"samples must be <= {MAX_CANARY_SAMPLES}")
        _need(isinstance(self.deadline_s, int | float) and not isinstance(self.deadline_s, bool)
              and math.isfinite(self.deadline_s) and 0 < self.deadline_s <= 86_400, "deadline_s must be in (0, 86400]")


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class CanaryReport:
    """A canary device's verdict on candidate ``candidate`` vs release ``release`` (on its
    ``update`` topic): *paired counts only*, never data. Of the labels it scored, how many
    both models got right, only the candidate, only the release, and neither."""

    TYPE: ClassVar[str] = "canary_report"
    device: str
    candidate: int
    release: int
    both_right: int
    only_candidate: int
    only_release: int
    both_wrong: int
    nonce: int = 0
    """The round's :attr:`Canary.nonce`, echoed. 0: a device from before round nonces."""
    OMIT_AT_DEFAULT: ClassVar[tuple[tuple[str, object], ...]] = (("nonce", 0),)

    def __post_init__(self) -> None:
        _check_id(self.device, "device")
        _check_int(self.candidate, "candidate")
        _check_int(self.release, "release")
        _check_int(self.nonce, "nonce")
        for name in ("both_right", "only_candidate", "only_release", "both_wrong"):
            _check_int(getattr(self, name), name)
        _need(0 < self.n <= MAX_CANARY_SAMPLES, f"a canary report counts 1-{MAX_CANARY_SAMPLES} labels")

    @property
    def n(self) -> int:
        return self.both_right + self.only_candidate + self.only_release + self.both_wrong

    @property
    def counts(self) -> tuple[int, int, int, int]:
        return (self.both_right, self.only_candidate, self.only_release, self.both_wrong)


MAX_RECALL_RANGES = 16
"""Abandoned ranges a recall names (the most recent: older ones are long superseded)."""
MAX_RELEASE_SPREAD_S = 7 * 86_400
"""The longest spread a recall may ask devices to fetch a release over (a week)."""


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Recall:
    """Coordinator → every device of its region, retained on ``{region}/recall``: the versions
    it abandoned (an operator's rollback or pin, a gate rollback) as inclusive ranges, flat
    ``(lo, hi, lo, hi, ...)``, and its current release. A device *serving* one of them asks for
    the release at once (a serving pull) instead of at its next training round; one serving
    anything else ignores it. Signed like models (the scope binds the region)."""

    TYPE: ClassVar[str] = "recall"
    model_id: str
    release: int
    abandoned: tuple[int, ...]
    epoch: int = NO_EPOCH
    """The numbering the versions are in (:attr:`ModelMsg.epoch`): a retained recall left on
    the broker by a coordinator that lost its state dir speaks of an older epoch's versions."""
    started: int = 0
    """When the coordinator last started (ms of its clock; 0: a coordinator that does not say). It
    kept the devices it left waiting for an invitation in memory only: a device waiting (DEFERRED)
    that sees a newer stamp than the one it saw first sends its pull again, instead of after
    ``reannounce_s``. Signed with the rest; absent at 0, so an old side's bytes are unchanged."""
    spread_s: int = 0
    """Seconds over which the region's idle devices should fetch the release (the coordinator's
    ``--release-spread``, sized to its fleet and model): a device spreads its fetch over the larger of
    this and its own ``release_spread_s``. 0: the devices' own. Absent at 0; a device from before
    it ignores the field (unknown header fields are not read) and still verifies the signature."""
    OMIT_AT_DEFAULT: ClassVar[tuple[tuple[str, object], ...]] = (*_EPOCH_OMIT, ("started", 0), ("spread_s", 0))

    def __post_init__(self) -> None:
        _check_id(self.model_id, "model_id")
        _check_int(self.release, "release")
        _check_int(self.epoch, "epoch")
        _check_int(self.started, "started")
        _check_int(self.spread_s, "spread_s")
        _need(self.spread_s <= MAX_RELEASE_SPREAD_S, f"spread_s must be at most {MAX_RELEASE_SPREAD_S} (a week)")
        flat = self.abandoned
        _need(isinstance(flat, list | tuple) and len(flat) % 2 == 0 and len(flat) <= 2 * MAX_RECALL_RANGES,
              f"abandoned must be at most {MAX_RECALL_RANGES} (lo, hi) pairs, flat")
        for v in flat:
            _check_int(v, "abandoned version")
        _need(all(flat[i] <= flat[i + 1] for i in range(0, len(flat), 2)), "each abandoned range needs lo <= hi")
        if type(flat) is not tuple:
            object.__setattr__(self, "abandoned", tuple(flat))  # msgpack decodes arrays as lists

    def covers(self, version: int) -> bool:
        """Whether ``version`` lies in one of the abandoned ranges."""
        flat = self.abandoned
        return any(flat[i] <= version <= flat[i + 1] for i in range(0, len(flat), 2))


Message = Pull | ModelMsg | Update | Ack | Invite | Status | PeerMsg | Control | Canary | CanaryReport | Recall
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Pull, ModelMsg, Update, Ack, Invite, Status, PeerMsg, Control, Canary, CanaryReport, Recall)
}
