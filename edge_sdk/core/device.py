"""DeviceCore — the SPIN device protocol as a pure state machine.

Theory of operation
-------------------
A device keeps every labelled sample. It pulls the current model once it holds at least
``min_samples`` (D_min) samples, trains E epochs over *all* of them, pushes the result
tagged with the version it started from, and waits for the coordinator's ack. After that
every new sample triggers the next pull; samples that arrive while a pull, training or
push is in flight only raise ``total`` and are picked up by the next cycle.

One rule covers both cases: the device wants a pull when
``total >= min_samples and total > trained_upto``, where ``trained_upto`` is the number
of samples it held when its last training started.

Requests are retried with capped exponential backoff (jittered by the injected rng) until
answered. A retried pull or update reuses its sequence number, so the coordinator's
idempotency key ``(device, seq)`` makes a retry harmless. The counters ``next_seq`` and
``trained_upto`` are persisted (``PersistDeviceState``) before the message that uses them
leaves, so a restarted device never reuses a sequence number. An update waiting for its ack
is persisted with them (``pending``) and a restarted device sends it again, same seq and nonce,
before anything else: the coordinator may have applied it already (its ack lost with the
process), and training the same samples into a new update would apply them twice.

Server-driven strategies (FedBuff, FedAvg) answer a pull with ``Ack(status="deferred")``;
the device then waits in DEFERRED until an ``Invite`` arrives (or a long re-announce timer
fires, in case the coordinator restarted and forgot it). A coordinator keeps the devices it
deferred in memory only, so each start of it stamps the region's retained recall
(``Recall.started``); a DEFERRED device that sees a stamp newer than the one it saw first sends
its pull again (same seq) within ``restart_spread_s`` (a random share of it: a fleet deferred
together does not pull in one burst), paced by the pull bucket. The first stamp a device sees
(the retained one on connect, or the first after a region switch) is only noted: it names the
coordinator already running. An older or equal stamp changes nothing (a reconnect, a replay).

Release and training line. A model message says which version is the coordinator's
release. The device deploys (predicts with) release versions only; a newer training-line
model that answers its pull is trained from but not served, and a newer release it hears
of is fetched with a serving pull when the device is idle. A device that stays idle (its
user labels nothing) asks for the release every ``refresh_s`` if configured: the reply
holds no weights when it has that release already. With ``release_spread_s`` it also hears
of each new release from the region's retained recall (a coordinator with
``announce_releases`` publishes it again per release) and fetches it within that spread.

Trust. Every model must carry a valid Ed25519 signature by a key the device trusts: the
provisioned ``trusted_keys``, or — without any — the first key it sees (trust on first
use: ``PinKey`` makes the pin durable before the model is used). Anything else is rejected
(``unsigned`` / ``bad_signature``), counted, reported, never deployed. A model that answers
none of the device's requests is deployed only if it is signed and newer than the deployed
one. On start the device sends a *serving* pull so it can predict with the current model
before it has labelled anything; that request never starts training.

LASP parts. Between full syncs a coordinator answers a device that holds the current extractor
with the head only (``ModelMsg.group``), naming the full sync it builds on (``full_sync``); the
device patches it onto the weights it serves. A part whose full sync is after the deployed
version (replayed or misrouted: its signature is valid region-wide) would pair that head with an
older extractor: refused (``extractor_mismatch``), nothing changes, the device waits for the answer
to its pull. A part without ``full_sync`` (a coordinator from before it) is patched as before.

Epochs. A coordinator numbers its versions in the epoch of its state dir (``ModelMsg.epoch``,
signed; 0 for the in-process emulator). A signed model or recall of the current region in a newer
epoch means its coordinator started again on a new state dir, counting from 0: the device
forgets what it knew by number (deployed version, recall, canary rounds), keeps serving its
weights, makes the epoch durable (``PinEpoch``) and fetches the release; its update in flight,
trained in the old numbering, is refused as ``base_rejected`` and its samples trained again. A
model, recall or canary request of an older epoch is a replay (``epoch_older``; an old retained
recall is only counted). Pulls and updates carry the epoch their version counts in.

Crashes in training. A job that kills the process (the OOM killer on a phone, a native crash in
torch) raises nothing the core could see, and a supervisor that restarts the app started the same
job again at once, for ever. So a job is made durable as in flight (``MarkTraining``) before it
starts and cleared when it ends (finished, failed, or dropped; the driver clears it on a clean stop).
A device restored with the mark still in flight (``training``) counts the job as failed: the same
back-off as a failed job, grown by the failures in a row, with ``Notify(training_crashed)``; from
``CRASH_LONG_AFTER`` crashes in a row the hold is ``CRASH_HOLD_S``, doubling per crash up to
``CRASH_HOLD_MAX_S``: it still tries again (the app may have freed memory, the coordinator sent
other hints), but at most a few times a day. The hold is in the record too, so a restart does not
end it; so are a job that raised's back-off and the failures in a row (a job that raises every
time, in an app its supervisor or the phone's OS restarts, was trained again at once on every
start, its back-off never growing). A job that finishes resets the counts.

Idempotency under attack. Each update carries a random ``nonce``; a ``duplicate`` ack
counts as success only when it echoes that nonce, or carries none with the device's own seq
as the watermark (a restarted coordinator no longer knows the nonce of the last update it
accepted). Otherwise someone else took the seq, or the device numbers below seqs it never sent
(a reinstall that lost its store starts again at 0): the device moves past the coordinator's
watermark and sends the same weights again under a fresh seq (``seq_conflicts``); so does an ``accepted`` ack
that echoes a nonce not its own (a coordinator that echoes it: the update accepted under that seq was
another sender's). An update deferred for
the coordinator's storage stays pending and is retried with back-off. A training job that
fails — or returns non-finite weights — returns the device to IDLE with a back-off. An update
refused because its base version was abandoned by a rollback (``base_rejected``: the release
gate rejected that candidate, or an operator rolled back past it) was trained from a model the
coordinator will not build on; its samples are trained again from the current training line
(``trained_upto`` rolls back, as after a failed job); so are those of an update a coordinator
that selects its devices did not take (``not_selected``: it forgot a straggler or restarted).
Other refusals end the round.

Two devices on one id (a cloned SD card or VM image: the same id and a copy of one store, so the same
seqs). A reinstall meets the coordinator's watermark once and moves past it for good; a clone keeps
meeting seqs the other took, so the ``DUPLICATE_CONFLICTS``-th seq conflict in a process is the
verdict: ``Notify(duplicate_id)`` once, ``state.duplicate_id`` set (the driver says it at ERROR and
stops taking the MQTT session back at once from the other, which the broker hands to whichever
connected last). Nothing else changes: each conflict's update is still sent again under a fresh seq,
so neither clone's samples are lost and none is applied twice (the coordinator's ``(device, seq)``).

Failover. A device may list ``fallback_regions`` after its home ``region``. It reads its
downstream topics and the coordinators' retained status in all of them, and uses one region
at a time (``state.region``); device messages from the others are ignored. It moves on to
the next region (cyclically, preferring one not known to be down) after ``failover_after``
consecutive request timeouts, or at once when the region's status says ``alive: false``
(the coordinator's last will). It goes back home when the home coordinator's status says
``alive: true`` again after the device left, once ``failback_after_s`` have passed since it
left and the device is not in the middle of a training round (a round in flight finishes
where it started). A switch (``SwitchRegion``) keeps ``next_seq`` (persisted first), so the
idempotency keys ``(device, seq)`` stay unique everywhere and nothing is applied twice by a
coordinator. A pull in flight is sent again to the new region under a fresh seq; a model in
training or an unacknowledged update came from the old region's line, whose version numbers
mean nothing to the new coordinator, so it is dropped and its samples are trained again there
(``trained_upto`` rolls back); an acknowledged update is never undone. ``deployed_version`` is
forgotten (the new region numbers its own) but the deployed weights keep serving; the canary
rounds it took are remembered per region. A region left after timeouts is marked down durably with
the stamp (``published_at``) of the newest ``alive: true`` status it had published (``MarkRegionDown``):
the broker sends that same retained status again after a restart or a reconnect, and taking it as
news sent the device back to a coordinator that does not answer, to wait out ``failover_after``
timeouts again (74 s with the defaults) every time. A status no newer than the mark leaves the region
down (and a device in it moves on at once); a newer one, or any answer from the region, clears it.

Canary evaluation (test-then-train). A signed ``Canary`` on the device's invite topic asks
it to score candidate C against release R (see :mod:`coordinator.canary`). When idle (after
fetching R if it lacks it) the device fetches C with a canary pull (``Pull(canary=C)``, never a
training pull) and hands it to the driver (``StartCanary``); for each new label the driver
predicts with both models before storing the label and feeds back ``CanaryScored``. After
``samples`` labels, or at the request's deadline with what it has (checked on every event),
the device publishes a ``CanaryReport`` — four counts, never data — on its update topic and
emits ``StopCanary``. A newer request replaces the current one; a canary fetch unanswered
after three tries, or a region switch, abandons it. Each request names its round (``nonce``,
echoed in the report): a coordinator that restarted resumes the round it recorded (the same
nonce: a request of it again is a repeat, ignored, and the report goes to it), or, without that
record, asks for the same candidate and release in a new round, which the device takes (keeping
what it scored, if it is still scoring); a repeat of a round it took is refused, and so is any
second request without a nonce. The rounds taken are made durable per region (``PinCanary``, before
anything else the request causes) and restored at construction (``canaries``), so a restarted
device refuses the replay too (helper-144: it took the same signed request again and scored it).

Transitions (event → action, new phase)::

    IDLE      SampleAdded and wants_pull   → Publish(pull)                 PULLING
    PULLING   Model(reply_to = pull seq or -1, not older than deployed)
                                           → DeployModel, Persist, MarkTraining(in flight), StartTraining  TRAINING
    PULLING   Ack(deferred)                → ScheduleTimer(re-announce)    DEFERRED
    PULLING   Ack(rejected)                → Notify(pull_rejected)         PULLING (retried at the deadline)
    PULLING   TimerFired (deadline)        → Publish(pull, same seq)       PULLING
    DEFERRED  Invite                       → Publish(pull, invite_round)   PULLING
    DEFERRED  TimerFired (deadline)        → Publish(pull, same seq)       PULLING
    DEFERRED  reconnected (a token due)    → Publish(pull, same seq)       PULLING
    DEFERRED  signed Recall, started newer than the stamp seen → ScheduleTimer(within restart_spread_s)  DEFERRED
    DEFERRED  TimerFired (that timer)      → Publish(pull, same seq; not a timeout)  PULLING
    IDLE      start                        → Publish(pull, serve)          PULLING (serving)
    IDLE      start, training mark in flight → MarkTraining(cleared), Notify(training_crashed), back-off  IDLE
    IDLE      start, an update persisted unacked → Publish(update, its seq and nonce)  PUSHING
    PULLING   Model answering a serve pull → DeployModel if newer          IDLE, then pull if wanted
    TRAINING  TrainingFinished(job)        → MarkTraining(cleared), Persist, Publish(update)  PUSHING
    TRAINING  TrainingFinished(non-finite) → MarkTraining(cleared), Notify, back-off  IDLE
    TRAINING  TrainingFailed(job)          → MarkTraining(cleared), Notify, back-off  IDLE
    not TRAINING  TrainingFinished / TrainingFailed of a dropped job → MarkTraining(cleared)  (unchanged)
    PUSHING   Ack(accepted | own duplicate)→ Notify, then pull if wanted   IDLE / PULLING
    PUSHING   Ack(duplicate, other nonce)  → Persist, Publish(update, new seq)  PUSHING
    PUSHING   Ack(accepted, other nonce ≠ 0) → Persist, Publish(update, new seq)  PUSHING
              (either, the DUPLICATE_CONFLICTS-th time) + Notify(duplicate_id), once
    PUSHING   Ack(deferred: storage)       → retry later, same seq         PUSHING
    PUSHING   Ack(rejected: base_rejected | not_selected) → Persist, Notify, pull (same samples again)  PULLING
    PUSHING   Ack(rejected, other reason)  → Persist, Notify                IDLE
    PUSHING   TimerFired (deadline)        → Publish(update, same seq)     PUSHING
    IDLE      TimerFired (back-off over)   → pull if wanted                IDLE / PULLING
    IDLE      TimerFired (refresh_s without a pull) → Publish(pull, serve)  PULLING (serving)
    IDLE      signed Recall, release newer than deployed (release_spread_s)
                                           → ScheduleTimer(refresh within the spread)  IDLE
    not IDLE  signed Recall, release newer than deployed (release_spread_s) → release wanted  (unchanged)
    any       signed Model newer than deployed → DeployModel               (unchanged)
    any       signed Recall covering the deployed version → Notify(recalled); when IDLE:
    IDLE      release wanted               → Publish(pull, serve)          PULLING (serving)
    any       signed Model / Recall of a newer epoch → PinEpoch, Notify(epoch); forget numbers, fetch the release
    any       Model / Recall / Canary of an older epoch → Notify(rejected: epoch_older) (old recall: counted only)
    any       unsigned / badly signed / bad bytes → Notify(rejected)       (unchanged)
    any       signed part of a full sync after the deployed version → Notify(rejected: extractor_mismatch)  (unchanged)
    PULLING/DEFERRED/PUSHING  failover_after-th timeout in a row
                                           → MarkRegionDown, Persist, SwitchRegion(next), pull  PULLING
    any       status(current region, alive: false)
                                           → Persist, SwitchRegion(next), pull  PULLING
    any       status(alive: true) no newer than the region's down mark → region stays down; if current:
                                           → Persist, SwitchRegion(next), pull  PULLING
    IDLE/PULLING/DEFERRED  status(home, alive: true), away ≥ failback_after_s
                                           → Persist, SwitchRegion(home), pull  PULLING
    any       device message from a region not in use → ignored            (unchanged)
    any       Canary(C, R) newer than the current one → PinCanary, (release pull,) then when IDLE:
    IDLE      canary wanted                → Publish(pull, canary=C)        PULLING
    PULLING   Model(version C) answering it → StartCanary                  IDLE
    any       CanaryScored; samples reached / deadline → Publish(report), StopCanary
    any       Canary(C, R, new nonce) while evaluating (C, R) → PinCanary, Notify(canary): same counts, report to it
    any       Canary(C, R) of a round taken (before a restart too), or older → ignored   (unchanged)
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

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
    BadSignature,
    ConfigError,
    ForeignExtractor,
    LocalProtocolError,
    MalformedMessage,
    NotSelected,
    RejectedBase,
    RemoteProtocolError,
    ShapeMismatch,
    StaleEpoch,
    TopicMismatch,
    UnknownModel,
    UnsignedMessage,
)
from edge_sdk.signing import trusted_from, verify
from edge_sdk.spec import FULL, ModelSpec, Vector
from edge_sdk.wire import topics
from edge_sdk.wire.codec import (
    DEFAULT_MAX_BYTES,
    ENCODINGS,
    PULL_BURST,
    PULL_REFILL_S,
    Encoding,
    SignatureInfo,
    decode_frame,
    encode,
    parse_status_json,
    pull_tokens,
)
from edge_sdk.wire.messages import (
    NO_EPOCH,
    NO_VERSION,
    UNCHANGED,
    Ack,
    Canary,
    CanaryReport,
    Invite,
    ModelMsg,
    Pull,
    Recall,
    Update,
)

DeviceEvent = SampleAdded | MessageReceived | TrainingFinished | TrainingFailed | TimerFired | CanaryScored
DeviceAction = (Publish | ScheduleTimer | StartTraining | DeployModel | PersistDeviceState | PinKey | PinEpoch | PinCanary
                | Notify | SwitchRegion | StartCanary | StopCanary | MarkTraining | MarkRegionDown)
MAX_WATERMARK_JUMP = 100_000
"""The furthest a ``duplicate`` ack may move the device's seq past its own (the coordinator's
``max_seq_jump``): a forged ack with a huge watermark would otherwise make every later request
a ``seq_jump`` there, for ever (acks are not signed)."""
DUPLICATE_CONFLICTS = 2
"""Seq conflicts in one process that mean another device uses this id: a reinstall that lost its store
meets the coordinator's watermark once (it then numbers above it); a clone of this device keeps taking
seqs (measured with two clones on one id, tests/duplicate_measure.py: 28 conflicts in 60 s)."""
CANARY_FETCH_TRIES = 3
"""A canary fetch unanswered after this many tries abandons the canary request."""
CANARY_NONCES_KEPT = 8
"""Rounds of one candidate and release whose nonces a device keeps (each restart of the
coordinator opens one): a repeat of any of them is a replay, not served."""
PULL_MARGIN = 0.25
"""Tokens a device keeps in hand before it holds a pull (a quarter of ``pull_refill_s``): its
pulls reach the coordinator after network delays that vary from one to the next."""
_PULL_READY = 1.0 + PULL_MARGIN
CRASH_LONG_AFTER = 3
"""Training jobs in a row that died with the process before the device holds training for hours:
one crash may be bad luck (the user opened the camera), three on the same samples are a job this
device cannot run now (its memory), and a retry every ``max_backoff_s`` costs a model download and a
partial training each time."""
CRASH_HOLD_S = 3600.0
"""The hold after ``CRASH_LONG_AFTER`` crashes in a row; it doubles with each further crash."""
CRASH_HOLD_MAX_S = 86_400.0
"""The longest crash hold: a device keeps trying once a day (memory freed, other hints, a new model)."""
MAX_STATUS_BYTES = 65_536
"""A coordinator status larger than this is not read (it is a few hundred bytes)."""


class Phase(enum.Enum):
    IDLE = "idle"
    PULLING = "pulling"
    DEFERRED = "deferred"
    TRAINING = "training"
    PUSHING = "pushing"


_IDLE, _PULLING, _DEFERRED, _TRAINING, _PUSHING = Phase.IDLE, Phase.PULLING, Phase.DEFERRED, Phase.TRAINING, Phase.PUSHING
"""The phases as module constants (the same members; read on every event without the enum's class look-up)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceConfig:
    device_id: str
    region: str
    spec: ModelSpec
    min_samples: int = 16
    request_timeout_s: float = 10.0
    max_backoff_s: float = 300.0
    reannounce_s: float = 600.0
    encoding: Encoding = "f4"
    max_message_bytes: int = DEFAULT_MAX_BYTES
    trusted_keys: Mapping[str, bytes] = field(default_factory=dict)
    """Coordinator model-signing keys by key id (from the provisioning bundle)."""
    pin_first: bool = True
    """Without ``trusted_keys``: trust the first key that signs a model (and say so)."""
    require_signature: bool = True
    """Refuse unsigned models. Only the in-process emulator turns this off."""
    serve_on_start: bool = True
    """Ask for the current model to predict with as soon as the device starts."""
    fallback_regions: tuple[str, ...] = ()
    """Regions to fail over to, in order of preference (``region`` is home)."""
    failover_after: int = 3
    """Consecutive request timeouts in the current region before moving to the next one."""
    failback_after_s: float = 60.0
    """Stay at least this long in a fallback region before going home (damps flapping)."""
    pull_burst: float = PULL_BURST
    pull_refill_s: float = PULL_REFILL_S
    """The coordinator's per-device limit on pulls (its ``pull_burst`` / ``pull_refill_s``): the
    device holds a pull that would find the bucket empty until a token is due (0: no pacing).
    A device that labels faster than one sample per ``pull_refill_s`` and trains fast pulled
    about once per label, emptied the bucket, and waited out a request timeout for each
    dropped pull (10 s) while its labels piled up."""
    restart_spread_s: float = 5.0
    """A deferred device that hears its coordinator started again (``Recall.started``) sends its
    pull again after a random delay up to this long (0: at once): 100,000 devices deferred
    together reach the restarted coordinator spread over it, not in one burst."""
    refresh_s: float | None = None
    """An idle device that has sent no pull for this long (±10 %, drawn per wait) asks for the
    current release with a serving pull, so a device whose user labels nothing still predicts
    with every release; the reply holds no weights when it has that release already. None:
    releases arrive only with the device's own pulls, a restart or a reconnect."""
    release_spread_s: float | None = None
    """An idle device that hears of a release newer than the one it serves (the region's signed,
    retained recall, which a coordinator with ``announce_releases`` publishes again with each new
    release) asks for it with a serving pull at a random time within this long, and at most once
    per this long, instead of at its next ``refresh_s``: 100,000 idle devices fetch a release
    spread over the window, not in one burst. A busy device fetches it when next idle. 0: at
    once; None: off (releases arrive with the device's own pulls and ``refresh_s``)."""

    def __post_init__(self) -> None:
        topics.check_id(self.device_id, "device id")
        object.__setattr__(self, "trusted_keys", trusted_from(self.trusted_keys))
        topics.check_id(self.region, "region")
        fallbacks = tuple(dict.fromkeys(topics.check_id(r, "region") for r in self.fallback_regions if r != self.region))
        object.__setattr__(self, "fallback_regions", fallbacks)
        if not isinstance(self.spec, ModelSpec):
            raise ConfigError(f"spec must be a ModelSpec, got {type(self.spec).__name__}")
        for name in ("min_samples", "failover_after", "max_message_bytes"):
            object.__setattr__(self, name, _count(name, getattr(self, name)))
        for name in ("request_timeout_s", "max_backoff_s", "reannounce_s", "failback_after_s", "restart_spread_s"):
            object.__setattr__(self, name, _seconds(name, getattr(self, name), zero=name in ("failback_after_s", "restart_spread_s")))
        if self.refresh_s is not None:
            object.__setattr__(self, "refresh_s", _seconds("refresh_s", self.refresh_s, zero=False))
        if self.release_spread_s is not None:
            object.__setattr__(self, "release_spread_s", _seconds("release_spread_s", self.release_spread_s, zero=True))
        if self.request_timeout_s > self.max_backoff_s:
            raise ConfigError("need request_timeout_s <= max_backoff_s")
        if not (math.isfinite(self.pull_burst) and self.pull_burst >= 1 and math.isfinite(self.pull_refill_s)
                and self.pull_refill_s >= 0):
            raise ConfigError(f"need pull_burst >= 1 and pull_refill_s >= 0, got {self.pull_burst!r} and {self.pull_refill_s!r}")
        if self.encoding not in ENCODINGS:  # else the first update fails to encode, stuck in PUSHING
            raise ConfigError(f"encoding must be one of {sorted(ENCODINGS)}, got {self.encoding!r}")

    @property
    def regions(self) -> tuple[str, ...]:
        """Home first, then the fallback regions in order."""
        return (self.region, *self.fallback_regions)

    def subscriptions(self) -> list[str]:
        """Every topic this device may read, in any of its regions: what a driver with a
        fixed subscription list subscribes to (replies from regions not in use are ignored).
        A function of the configuration alone, so a driver can set up before its core exists."""
        return [t for r in self.regions for t in self.region_topics(r)] + self.watched()

    def region_topics(self, region: str) -> list[str]:
        """This device's downstream topics in ``region`` and the region's recall (retained)."""
        return [*(topics.device_topic(region, self.device_id, leaf) for leaf in topics.DOWNSTREAM), topics.recall_topic(region)]

    def watched(self) -> list[str]:
        """Coordinators' retained status, watched only by devices that can fail over."""
        return [topics.status_topic(r) for r in self.regions] if self.fallback_regions else []


def _count(name: str, value: object) -> int:
    """A DeviceConfig count: an int >= 1 (a numpy int too; not a bool, a float or NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _seconds(name: str, value: object, *, zero: bool) -> float:
    """A DeviceConfig duration: a finite number of seconds, > 0 (or >= 0 with ``zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not (math.isfinite(seconds) and (seconds > 0 or (zero and seconds == 0))):
        raise ConfigError(f"{name} must be a finite number {'>=' if zero else '>'} 0, got {value!r}")
    return seconds


@dataclass(slots=True)
class DeviceState:
    """Read-only view for callers; the core mutates it."""

    phase: Phase = Phase.IDLE
    total: int = 0
    trained_upto: int = 0
    next_seq: int = 0
    deployed_version: int = NO_VERSION
    deployed: Vector | None = None
    pending_seq: int = NO_VERSION
    pending_payload: bytes = b""
    deadline: float | None = None
    attempts: int = 0
    job_id: int = 0
    job_base_version: int = NO_VERSION
    job_n_samples: int = 0
    job_group: str = FULL
    prev_trained_upto: int = 0
    updates_acked: int = 0
    rejected_messages: int = 0
    pull_tokens: float = PULL_BURST
    """The coordinator's bucket for this device, as the device reckons it (at ``pull_at``)."""
    pull_at: float = -math.inf
    counters: dict[str, int] = field(default_factory=dict)
    serving: bool = False
    """The request in flight is a serving pull (no training follows)."""
    pending_update: Update | None = None
    hold_until: float = 0.0
    """After a failed training job: no new pull before this time (back-off)."""
    train_failures: int = 0
    train_crashes: int = 0
    """Training jobs in a row that died with the process (seen at a restart: ``MarkTraining``)."""
    pins: dict[str, bytes] = field(default_factory=dict)
    seq_conflicts: int = 0
    duplicate_id: bool = False
    """Another device uses this id (``DUPLICATE_CONFLICTS`` seq conflicts in this process): said once."""
    release_wanted: int = NO_VERSION
    """A release newer than the deployed model was announced: fetch it when idle."""
    region: str = ""
    """The region whose coordinator the device uses now (home unless it failed over)."""
    timeouts: int = 0
    """Request timeouts in a row in the current region (reset by any answer from it)."""
    region_alive: dict[str, bool] = field(default_factory=dict)
    """Last word on each region's coordinator: its status, or our own verdict when we left it."""
    status_at: dict[str, float] = field(default_factory=dict)
    """The stamp (``published_at``) of the newest ``alive: true`` status of each region's coordinator."""
    left_home_at: float | None = None
    failovers: int = 0
    canary: Canary | None = None
    """The canary request being served (candidate vs release), if any."""
    canary_state: str = ""
    """``fetch`` (wants the candidate), ``fetching`` (canary pull in flight), ``scoring``."""
    canary_deadline: float = 0.0
    canary_counts: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    """both right, only the candidate right, only the release right, both wrong."""
    canary_reports: int = 0
    canary_last: tuple[int, int] = (NO_VERSION, NO_VERSION)
    """(candidate, release) of the newest canary request taken: none below it is served, nor a
    round of it taken already (:attr:`canary_nonces`)."""
    canary_nonces: tuple[int, ...] = ()
    """The rounds (:attr:`Canary.nonce`) of ``canary_last`` taken, the newest
    ``CANARY_NONCES_KEPT``: a coordinator that restarted asks again for the same candidate and
    release in a new round, which is served; a repeat of one of these is not (nor, from a
    coordinator without nonces, any second request)."""
    recall: Recall | None = None
    """The region's newest recall: a model of a version it abandoned is never deployed (a
    captured, genuinely signed reply replayed after the recall)."""
    refresh_at: float | None = None
    """When an idle device asks for the release again (``DeviceConfig.refresh_s``); None
    while it is busy or until it next becomes idle. Any pull it sends clears it."""
    refresh_for_release: bool = False
    """``refresh_at`` was brought forward by an announced release (``release_spread_s``)."""
    release_fetched_at: float = -math.inf
    """When the device last fetched an announced release: the next waits ``release_spread_s``."""
    epoch: int = NO_EPOCH
    """The current region's numbering (``ModelMsg.epoch``): ``deployed_version`` counts in it;
    a model, recall or canary request of an older one is refused."""
    job_epoch: int = NO_EPOCH
    """The epoch of the model being trained (``job_base_version``'s): sent with its update."""
    coordinator_started: int | None = None
    """The newest start stamp (``Recall.started``) of the current region's coordinator seen; None
    until the first (which is only noted)."""
    restart_repull: bool = False
    """The DEFERRED deadline is the re-pull after a coordinator's restart, not the re-announce:
    its firing is no timeout (the coordinator just said it is there)."""


class DeviceCore:
    """Sans-IO SPIN device: ``handle(event) -> list[action]``. See the module docstring."""

    # Slots, not an instance dict: an emulated fleet holds 100,000 cores (≈ 150 bytes each
    # less), and each event reads a few of these attributes from the object itself.
    __slots__ = ("_canary_by_region", "_down", "_epochs", "_inbox", "_marked", "_nonces", "_pins_by_region", "_pull_ready",
                 "_refresh_s", "_refreshes", "_restored", "_rng", "_s", "_t_pull", "_t_update", "_timer_at", "_training", "config")

    def __init__(
        self,
        config: DeviceConfig,
        *,
        rng: random.Random,
        next_seq: int = 0,
        trained_upto: int = 0,
        total: int = 0,
        pinned: Mapping[str, bytes] | None = None,
        pinned_by_region: Mapping[str, Mapping[str, bytes]] | None = None,
        epochs: Mapping[str, int] | None = None,
        nonces: random.Random | None = None,
        pending: bytes = b"",
        pending_upto: int = 0,
        canaries: Iterable[PinCanary] = (),
        training: MarkTraining | None = None,
        down: Mapping[str, float] | None = None,
    ) -> None:
        """``pinned``: the home region's trust-on-first-use keys; ``pinned_by_region``: any
        region's (for devices with fallback regions). ``epochs``: each region's numbering as
        ``PinEpoch`` last made durable (a restarted device refuses anything older).
        ``nonces``: where update nonces are drawn (default ``rng``). A device with a durable
        store passes one seeded from the OS: a seeded ``rng`` draws the same nonces in every
        process, so a reinstall that starts its seqs again at 0 sent the nonce the coordinator
        holds for that seq and took its ``duplicate`` for its own update (helper-144).
        ``pending`` / ``pending_upto``: the update waiting for its ack and its round's watermark,
        as the last ``PersistDeviceState`` made them durable: :meth:`start` sends it again.
        ``canaries``: each region's canary rounds taken, as the last ``PinCanary`` made them
        durable; one of another epoch than its region's (numbers from before a reset) or of a
        region not configured is ignored. ``training``: the training mark as the last ``MarkTraining``
        made it durable: one in flight means the last process died training (:meth:`start` backs off).
        ``down``: the regions left after timeouts, with the stamp of the newest alive status seen from each
        then, as the last ``MarkRegionDown`` made them durable (a region not configured is ignored)."""
        self.config = config
        self._rng = rng
        self._nonces = rng if nonces is None else nonces
        self._pins_by_region = {r: trusted_from(p) for r, p in (pinned_by_region or {}).items()}
        if pinned:
            self._pins_by_region[config.region] = trusted_from(pinned)
        self._epochs: dict[str, int] = {}
        for r, e in (epochs or {}).items():
            if isinstance(e, bool) or not isinstance(e, int) or e < 0:
                raise ConfigError(f"the epoch of region {r!r} must be an int >= 0, got {e!r}")
            self._epochs[r] = e
        self._canary_by_region: dict[str, tuple[tuple[int, int], tuple[int, ...]]] = {}
        """``canary_last`` and ``canary_nonces`` of the regions not in use: each numbers its own versions."""
        for pin in canaries:
            if pin.region in config.regions and pin.epoch == self._epochs.get(pin.region, NO_EPOCH):
                self._canary_by_region[pin.region] = ((pin.candidate, pin.release), pin.nonces[-CANARY_NONCES_KEPT:])
        self._s = DeviceState(next_seq=next_seq, trained_upto=trained_upto, total=total,
                              pins=self._pins_by_region.setdefault(config.region, {}), region=config.region,
                              epoch=self._epochs.get(config.region, NO_EPOCH))
        self._s.canary_last, self._s.canary_nonces = self._canary_by_region.pop(config.region, ((NO_VERSION, NO_VERSION), ()))
        self._refresh_s = config.refresh_s
        self._refreshes = config.refresh_s is not None or config.release_spread_s is not None
        """Whether the core keeps the driver's timer for refreshes (``refresh_s``, ``release_spread_s``)."""
        self._pull_ready = min(_PULL_READY, config.pull_burst) if config.pull_refill_s > 0 else -math.inf
        """The tokens a pull waits for (a bucket of 1: until full); -inf: no pacing."""
        self._timer_at: float | None = None
        """The driver's one timer as this core last set it (kept only with ``refresh_s``)."""
        self._address(config.region)
        self._restored: tuple[bytes, int] | None = (bytes(pending), pending_upto) if pending else None
        """The update a previous process left waiting for its ack: :meth:`start` sends it again."""
        self._training = training
        """The training mark a previous process left: :meth:`start` reads it."""
        self._down: dict[str, float] = {}
        """Regions left after timeouts, with the stamp of the newest alive status seen from each then: that
        status again (retained: a restart, a reconnect) is no news of the coordinator (``MarkRegionDown``)."""
        for r, at in (down or {}).items():
            if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
                raise ConfigError(f"the status stamp of region {r!r} must be a finite time, got {at!r}")
            if r in config.regions:
                self._down[r] = float(at)
        self._marked = False
        """A ``MarkTraining(in_flight=True)`` went out and was not cleared since."""

    def _address(self, region: str) -> None:
        self._t_pull = topics.device_topic(region, self.config.device_id, "pull")
        self._t_update = topics.device_topic(region, self.config.device_id, "update")
        self._inbox = self._t_pull[: -len("pull")]  # this device's topics in this region, less the leaf

    @property
    def state(self) -> DeviceState:
        return self._s

    def timer_is_idle(self) -> bool:
        """True when ``handle(TimerFired(...))`` now would return ``[]`` and change nothing
        (no deadline, no canary request open): a driver may skip the call."""
        s = self._s
        return s.deadline is None and s.canary is None and s.refresh_at is None

    def wants_pull(self) -> bool:
        s = self._s
        return s.total >= self.config.min_samples and s.total > s.trained_upto

    @property
    def regions(self) -> tuple[str, ...]:
        """Home first, then the fallback regions in order."""
        return self.config.regions

    def subscriptions(self) -> list[str]:
        """Every topic this device may read (:meth:`DeviceConfig.subscriptions`)."""
        return self.config.subscriptions()

    def active_subscriptions(self) -> list[str]:
        """What the device needs right now: for a driver that follows ``SwitchRegion``'s
        ``subscribe`` / ``unsubscribe``."""
        return self.config.region_topics(self._s.region) + self.config.watched()

    # ------------------------------------------------------------------ dispatch

    def handle(self, event: DeviceEvent) -> list[DeviceAction]:
        actions = self._handle(event) if self._s.canary is None else self._canary_due(event.now) + self._handle(event)
        return actions if not self._refreshes else self._arm_refresh(event.now, actions, fired=isinstance(event, TimerFired))

    def _arm_refresh(self, now: float, actions: list[DeviceAction], *, fired: bool = False) -> list[DeviceAction]:
        """``refresh_s``: an idle device with no deadline of its own sets the driver's timer for
        its next refresh (drawn when it becomes idle) unless that timer is set already.
        ``fired``: the driver's timer has just gone off (it is no longer set)."""
        if fired:
            self._timer_at = None
        for a in actions:
            if type(a) is ScheduleTimer:
                self._timer_at = a.at
        s = self._s
        if s.phase is not _IDLE or s.deadline is not None or s.canary is not None:
            return actions
        if s.refresh_at is None:
            if self._refresh_s is None:  # (release_spread_s only: armed when a release is heard)
                return actions
            s.refresh_at = now + self._refresh_s * (0.9 + 0.2 * self._rng.random())
        if self._timer_at == s.refresh_at:
            return actions
        self._timer_at = s.refresh_at
        return [*actions, ScheduleTimer(at=s.refresh_at)]

    def _handle(self, event: DeviceEvent) -> list[DeviceAction]:
        name = _HANDLERS.get(type(event))  # by class (a subclass as the class it extends)
        if name is None:
            name = next((_HANDLERS[b] for b in type(event).__mro__ if b in _HANDLERS), None)
            if name is None:
                raise LocalProtocolError(f"DeviceCore cannot handle {type(event).__name__}")
        handler: Callable[[DeviceEvent], list[DeviceAction]] = getattr(self, name)
        return handler(event)

    def start(self, now: float) -> list[DeviceAction]:
        """Kick off after (re)start: pull if samples are already waiting, else ask for the
        current model to serve predictions with (``serve_on_start``)."""
        crashed = self._restore_training(now) if self._training is not None else []
        actions = self._resume_pending(now) if self._restored is not None else []
        actions = crashed + (actions or self._kick_off(now))
        return actions if not self._refreshes else self._arm_refresh(now, actions)

    def _restore_training(self, now: float) -> list[DeviceAction]:
        """The training mark the previous process left: still in flight, its job died with the process
        (nothing raised): counted as a failed job, backed off, said, and the mark cleared with the count
        and the hold (a restart during the hold keeps it). A hold further off than its failure count's
        back-off (a damaged record; a clock set back — a device without a battery-backed clock that
        boots in 1970 held training a day, the longest hold, after a 10 s one) is cut to it."""
        assert self._training is not None
        mark, self._training = self._training, None
        s = self._s
        s.train_crashes, s.train_failures = mark.crashes, max(mark.failures, mark.crashes)  # (a record from before failures: its crashes)
        if not mark.in_flight:
            cap = self._backoff(s.train_failures, s.train_crashes)
            s.hold_until = min(mark.hold_until, now + cap) if mark.hold_until > now else 0.0
            return []
        s.train_crashes = crashes = mark.crashes + 1
        s.train_failures = failures = s.train_failures + 1
        backoff = self._backoff(failures, crashes)
        s.hold_until = now + backoff
        s.counters["training_crashed"] = s.counters.get("training_crashed", 0) + 1
        return [
            MarkTraining(in_flight=False, crashes=crashes, hold_until=s.hold_until, failures=failures),
            Notify(kind="training_crashed", data={"crashes": crashes, "retry_in_s": backoff}),
        ]

    def _backoff(self, failures: int, crashes: int) -> float:
        """The hold after ``failures`` failed training jobs in a row, ``crashes`` of them crashes (0: none)."""
        if failures < 1:
            return 0.0
        cfg = self.config
        backoff = min(cfg.request_timeout_s * 2 ** min(failures - 1, 16), cfg.max_backoff_s)
        if crashes >= CRASH_LONG_AFTER:
            backoff = max(backoff, min(CRASH_HOLD_S * 2 ** min(crashes - CRASH_LONG_AFTER, 16), CRASH_HOLD_MAX_S))
        return float(backoff)

    def _unmark(self, *, crashes: int, failures: int, hold_until: float = 0.0) -> list[DeviceAction]:
        """The training job in flight ended (or was dropped and has now ended): clear its mark."""
        if not self._marked:
            return []
        self._marked = False
        return [MarkTraining(in_flight=False, crashes=crashes, hold_until=hold_until, failures=failures)]

    def _resume_pending(self, now: float) -> list[DeviceAction]:
        """The update the previous process sent and saw no ack for: send it again, same seq and
        nonce (the coordinator answers a ``duplicate`` with its nonce if it applied it). Anything
        that is not such an update of this device (a damaged store) is counted and dropped: the
        samples are then trained again, as before this was kept."""
        assert self._restored is not None
        (payload, upto), self._restored = self._restored, None
        s, cfg = self._s, self.config
        try:
            msg = decode_frame(payload, max_bytes=cfg.max_message_bytes).message
        except RemoteProtocolError:
            msg = None
        if (not isinstance(msg, Update) or msg.device != cfg.device_id or msg.model_id != cfg.spec.model_id
                or msg.seq >= s.next_seq or not s.trained_upto <= upto <= s.total):
            s.counters["ignored:pending_unusable"] = s.counters.get("ignored:pending_unusable", 0) + 1
            return []
        s.prev_trained_upto, s.trained_upto = s.trained_upto, upto
        s.job_base_version, s.job_epoch, s.job_group, s.job_n_samples = msg.base_version, msg.epoch, msg.group, upto
        s.phase, s.pending_update, s.pending_seq, s.pending_payload, s.attempts = _PUSHING, msg, msg.seq, payload, 0
        s.deadline = now + self._timeout()
        return [
            Publish(topic=self._t_update, payload=payload, qos=1),
            ScheduleTimer(at=s.deadline),
            Notify(kind="retry", data={"what": "update", "seq": msg.seq, "attempt": 0, "after_restart": True}),
        ]

    def reconnected(self, now: float) -> list[DeviceAction]:
        """The broker connection came back: an idle device asks again, as after a start (a
        release it missed while away: neither acks nor a recall that does not cover it say so).
        A deferred device sends its pull again, same seq: the invitation it waits for may have
        gone with a broker restarted without persistence (or a queue it overflowed), and the
        coordinator's round waited for it until the re-announce (``reannounce_s``, 600 s; helper-157).
        The coordinator serves the pull of a device its round counts and defers any other again.
        Held if the coordinator's bucket has no token for it: the re-announce timer stays."""
        s = self._s
        if s.phase is _IDLE:
            actions = self._kick_off(now)
        elif s.phase is _DEFERRED and self._pull_wait(now) <= 0:
            actions = self._send_pull(now, fresh=False)
        else:
            actions = []
        return actions if not self._refreshes else self._arm_refresh(now, actions)

    def _kick_off(self, now: float) -> list[DeviceAction]:
        actions = self._maybe_pull(now)
        if not actions and self.config.serve_on_start and self._s.phase is _IDLE:
            actions = self._send_pull(now, fresh=True, serve=True)
        return actions

    # ------------------------------------------------------------------ handlers

    def _on_sample(self, ev: SampleAdded) -> list[DeviceAction]:
        if ev.total < self._s.total:
            raise LocalProtocolError(f"sample total went backwards: {self._s.total} -> {ev.total}")
        self._s.total = ev.total
        return self._maybe_pull(ev.now)

    def _on_message(self, ev: MessageReceived) -> list[DeviceAction]:
        s = self._s
        try:
            topic = ev.topic
            if not (topic.startswith(self._inbox) and topic[len(self._inbox) :] in topics.DOWNSTREAM):
                # Not one of our downstream topics in the region we use (those pass every check below).
                parsed = topics.parse(topic)
                if parsed.kind == "status" and parsed.region in self.regions and self.config.fallback_regions:
                    return self._on_status(parsed.region, ev.payload, ev.now)
                if parsed.kind == "recall" and parsed.region == s.region:
                    return self._on_recall(ev.payload, topic, ev.now)
                if parsed.kind == "recall" and parsed.region in self.regions:
                    s.counters["ignored:other_region"] = s.counters.get("ignored:other_region", 0) + 1
                    return []  # a region we do not use now: its versions are not the ones we serve
                if parsed.kind != "device" or parsed.device != self.config.device_id:
                    raise TopicMismatch(f"message for {parsed.device!r} reached {self.config.device_id!r}")
                if parsed.region != s.region:
                    if parsed.region not in self.regions:
                        raise TopicMismatch(f"region {parsed.region!r} is none of this device's {list(self.regions)}")
                    s.counters["ignored:other_region"] = s.counters.get("ignored:other_region", 0) + 1
                    return []  # e.g. a late answer from the region we left
            frame = decode_frame(ev.payload, max_bytes=self.config.max_message_bytes)
            msg = frame.message
            if isinstance(msg, ModelMsg):
                pin = self._check_signature(frame.signature, topic)
                actions = self._on_model(msg, ev.now, "" if frame.signature is None else frame.signature.kid)
                if pin is not None:  # pinned once the model is accepted: a rejected one pins nothing
                    actions = self._pin(*pin) + actions
            elif isinstance(msg, Ack):
                if msg.device != self.config.device_id:  # another device's answer, replayed onto our topic
                    raise TopicMismatch(f"an ack for device {msg.device!r} reached {self.config.device_id!r}")
                actions = self._on_ack(msg, ev.now)
            elif isinstance(msg, Invite):
                if msg.device != self.config.device_id:  # another device's invitation, replayed onto our topic
                    raise TopicMismatch(f"an invitation for device {msg.device!r} reached {self.config.device_id!r}")
                actions = self._on_invite(msg, ev.now)
            elif isinstance(msg, Canary):
                self._check_trusted(frame.signature, topic, "canary request")
                actions = self._on_canary(msg, ev.now)
            else:
                raise TopicMismatch(f"a {msg.TYPE} message is not for devices")
            s.timeouts = 0  # the coordinator we use answers
            if s.region in self._down:
                del self._down[s.region]
                actions = [MarkRegionDown(region=s.region, status_at=None), *actions]
            return actions + self._maybe_fail_back(ev.now)
        except RemoteProtocolError as exc:
            s.rejected_messages += 1
            s.counters[f"rejected:{exc.reason}"] = s.counters.get(f"rejected:{exc.reason}", 0) + 1
            return [Notify(kind="message_rejected", data={"reason": exc.reason, "detail": str(exc)})]

    def _check_signature(self, sig: SignatureInfo | None, topic: str) -> tuple[str, bytes] | None:
        """Raise unless the model is signed by a trusted (or, first time, pinnable) key, for
        the topic it came on: another region's model replayed here does not verify (and so
        pins no key either). Returns the ``(kid, key)`` to pin (trust on first use) once the
        model itself is accepted, else None."""
        cfg, s = self.config, self._s
        if sig is None:
            if cfg.require_signature:
                raise UnsignedMessage("model is not signed")
            return None
        trusted = cfg.trusted_keys or s.pins
        if trusted and trusted.get(sig.kid) != sig.public_raw:
            raise BadSignature(f"model signed by key {sig.kid}, which this device does not trust ({sorted(trusted)})")
        if not trusted and not cfg.pin_first:
            raise BadSignature("no trusted coordinator keys are configured")
        if not verify(sig.public_raw, sig.signature, sig.signed_for(topics.signing_scope(topic))):
            raise BadSignature(f"model signature by key {sig.kid} does not verify for {topic!r} (another region's model?)")
        return None if trusted else (sig.kid, sig.public_raw)

    def _pin(self, kid: str, public_raw: bytes) -> list[DeviceAction]:
        s = self._s
        s.pins[kid] = public_raw
        return [
            PinKey(region=s.region, kid=kid, public_raw=public_raw),
            Notify(kind="key_pinned", data={"kid": kid, "region": s.region}),
        ]

    def _on_model(self, msg: ModelMsg, now: float, kid: str = "") -> list[DeviceAction]:
        s, cfg = self._s, self.config
        if msg.model_id != cfg.spec.model_id:
            raise UnknownModel(f"model {msg.model_id!r} is not {cfg.spec.model_id!r}")
        if msg.spec_fingerprint and msg.spec_fingerprint != cfg.spec.fingerprint:  # same id, another layout
            raise ShapeMismatch(f"model {msg.model_id!r} has layout {msg.spec_fingerprint}, this device's is {cfg.spec.fingerprint}")
        if msg.group != UNCHANGED:
            cfg.spec.check(msg.weights, msg.group)  # skips finiteness for one frame's array seen before
        elif msg.weights.size:
            raise ShapeMismatch("an 'unchanged' model reply carries no weights")
        if msg.train_group != FULL:
            cfg.spec.group_slice(msg.train_group)  # ShapeMismatch now, not out of handle() after training
        actions: list[DeviceAction] = []
        if msg.epoch != s.epoch:
            if not kid:  # (only where unsigned models are allowed at all: the in-process emulator)
                raise UnsignedMessage("an unsigned model cannot change the version numbering")
            actions = self._renumber(msg.epoch, "model")
        full = self._assemble(msg)
        # Devices predict with the release only; a newer training-line model is for training.
        is_release = msg.release in (NO_VERSION, msg.version)
        recalled = s.recall is not None and msg.version < s.recall.release and s.recall.covers(msg.version)
        if recalled:
            s.counters["ignored:recalled_model"] = s.counters.get("ignored:recalled_model", 0) + 1
        if full is not None and is_release and msg.version > s.deployed_version and not recalled:
            s.deployed_version, s.deployed = msg.version, full
            actions.append(DeployModel(version=msg.version, weights=full, kid=kid, epoch=msg.epoch))
            actions.append(Notify(kind="model", data={"version": msg.version, "group": msg.group}))
        if msg.release > s.deployed_version and not is_release:
            s.release_wanted = max(s.release_wanted, msg.release)  # fetched by a serving pull when idle
        # A coordinator answers with the bytes it sends every device that asks for the same
        # model (reply_to = -1); such an answer must not be older than what the device holds.
        answers_pull = s.phase is _PULLING and (
            msg.reply_to == s.pending_seq
            or (msg.reply_to == NO_VERSION and msg.version >= s.deployed_version)
        )
        if not answers_pull:
            if s.phase is _PULLING and msg.reply_to == NO_VERSION and msg.version < s.deployed_version:
                # Not silence: the coordinator answers, with a version older than the one held here
                # (a new coordinator, or its state dir reset); the device waits for a newer one.
                s.counters["ignored:older_model"] = s.counters.get("ignored:older_model", 0) + 1
                actions.append(Notify(kind="model_older", data={"version": msg.version, "held": s.deployed_version}))
            return actions
        self._pull_answered(now)
        if s.canary_state == "fetching":
            return actions + self._on_canary_model(msg, full, now)
        if full is None:
            # A partial model we cannot patch (we hold no full base): ask for a full one.
            s.deployed_version = NO_VERSION
            return actions + self._send_pull(now, fresh=True, serve=s.serving)
        if s.serving:
            s.serving = False
            s.phase, s.deadline, s.pending_seq, s.pending_payload, s.attempts = _IDLE, None, NO_VERSION, b"", 0
            return actions + self._maybe_pull(now)
        s.prev_trained_upto = s.trained_upto
        s.trained_upto = s.total
        s.job_id += 1
        s.job_base_version = msg.version
        s.job_epoch = msg.epoch
        s.job_n_samples = s.total
        s.job_group = msg.train_group
        s.phase, s.deadline, s.pending_seq, s.pending_payload = _TRAINING, None, NO_VERSION, b""
        job = TrainingJob(
            job_id=s.job_id,
            base_version=msg.version,
            weights=full,
            n_samples=s.total,
            group=msg.train_group,
            hints=dict(msg.hints),
        )
        actions.append(self._persist())
        self._marked = True  # durable before the job starts: a process that dies in it is seen at the restart
        actions.append(MarkTraining(in_flight=True, crashes=s.train_crashes, failures=s.train_failures))
        actions.append(StartTraining(job=job))
        return actions

    def _renumber(self, epoch: int, what: str) -> list[DeviceAction]:
        """A signed message of the current region in another ``epoch``: an older one is a replay
        of the numbering before (``StaleEpoch``); a newer one means the region's coordinator
        counts anew (it lost its state dir): what the device knew by version number (the
        deployed version, the recall, the canary rounds served) belongs to the old numbering
        and is forgotten, the weights keep serving. A round in flight ends by itself: its
        update, of the old epoch, is refused as ``base_rejected`` and its samples trained again."""
        s = self._s
        if epoch < s.epoch:
            raise StaleEpoch(f"{what} of epoch {epoch}, older than this region's {s.epoch}: from before its coordinator's reset")
        previous = s.epoch
        s.epoch = self._epochs[s.region] = epoch
        s.deployed_version, s.release_wanted, s.recall = NO_VERSION, NO_VERSION, None
        s.canary_last, s.canary_nonces = (NO_VERSION, NO_VERSION), ()
        dropped = self._canary_end("epoch_changed") if s.canary is not None else []
        s.counters["epoch_changed"] = s.counters.get("epoch_changed", 0) + 1
        return [PinEpoch(region=s.region, epoch=epoch, previous=previous),
                Notify(kind="epoch", data={"region": s.region, "epoch": epoch, "previous": previous}), *dropped]

    def _assemble(self, msg: ModelMsg) -> Vector | None:
        """Full weights for a model message: itself, or a group patched onto our copy."""
        if msg.group == FULL:
            return msg.weights
        s = self._s
        if msg.group == UNCHANGED:
            return s.deployed if s.deployed_version == msg.version else None
        if s.deployed is None or s.deployed_version == NO_VERSION:
            return None  # weights of no numbering in use (another region's, an older epoch's): a part cannot go on them
        if s.deployed_version < msg.full_sync:
            # LASP: the coordinator sends a part only to a device holding its full sync's extractor
            # or a version after it; this one is replayed or misrouted (its signature holds
            # region-wide). Without the field (a coordinator from before it): patched as before.
            raise ForeignExtractor(f"version {msg.version}'s {msg.group!r} goes onto full sync {msg.full_sync}'s "
                                   f"extractor; this device holds version {s.deployed_version}, before it")
        full = np.array(s.deployed, dtype=np.float32, copy=True)
        full[self.config.spec.group_slice(msg.group)] = msg.weights
        return full

    def _on_ack(self, msg: Ack, now: float) -> list[DeviceAction]:
        s = self._s
        if msg.seq != s.pending_seq:
            return []  # an answer to a request we already gave up on or retried past
        if s.phase is _PULLING and msg.status == "deferred":
            self._pull_answered(now)
            s.phase = _DEFERRED
            s.attempts = 0
            s.restart_repull = False
            s.deadline = now + self.config.reannounce_s
            return [ScheduleTimer(at=s.deadline), Notify(kind="deferred", data={"seq": msg.seq})]
        if s.phase is _PULLING and msg.status == "rejected":
            # Said, and nothing else changes: acks are unsigned, so a forged one must not stop
            # the device pulling; the pull is sent again at its timeout as before.
            reason = msg.reason[:64]  # (an unsigned ack's free text: the counters stay few and short)
            key = f"pull_rejected:{reason}"
            if key not in s.counters and sum(k.startswith("pull_rejected:") for k in s.counters) >= 16:
                key = "pull_rejected:other"
            s.counters[key] = s.counters.get(key, 0) + 1
            return [Notify(kind="pull_rejected", data={"seq": msg.seq, "reason": reason, "version": msg.version})]
        if s.phase is not _PUSHING:
            return []
        pending = s.pending_update
        if msg.status == "deferred":  # the coordinator cannot store updates now: retry later
            s.attempts += 1
            s.deadline = now + self._timeout()
            return [ScheduleTimer(at=s.deadline), Notify(kind="deferred", data={"seq": msg.seq, "what": "update", "reason": msg.reason})]
        if msg.status == "duplicate" and pending is not None and msg.nonce != pending.nonce and (msg.nonce != 0 or msg.watermark > msg.seq):
            # Not our update: another nonce under our seq, or no nonce (the coordinator keeps only
            # the last accepted one's) with a watermark *above* our seq — it accepted later seqs this
            # device never sent (a reinstall that lost the store and starts again at 0, or a forger)
            # and applied nothing of ours. Only a watermark equal to our seq without a nonce is our
            # own update accepted before the coordinator restarted (it forgot the nonce): success.
            if msg.watermark > s.next_seq + MAX_WATERMARK_JUMP:  # forged (see MAX_WATERMARK_JUMP): ignored,
                s.counters["ignored:watermark_jump"] = s.counters.get("ignored:watermark_jump", 0) + 1
                # and the update is sent again at its timeout. Said: a reinstall of a device id that sent
                # more than MAX_WATERMARK_JUMP requests before cannot get past this on its own.
                return [Notify(kind="seq_behind", data={"seq": msg.seq, "watermark": msg.watermark, "nonce": msg.nonce})]
            return self._resend_under_new_seq(pending, msg, now)
        if msg.status == "accepted" and pending is not None and msg.nonce not in (0, pending.nonce):
            # Accepted under our seq, but another nonce (a coordinator that echoes it; 0: one that does
            # not, taken as ours as before): the other sender's update, not ours — ours would be lost.
            return self._resend_under_new_seq(pending, msg, now)
        s.phase, s.deadline, s.pending_seq, s.pending_payload, s.attempts = _IDLE, None, NO_VERSION, b"", 0
        s.pending_update = None
        if msg.status in ("accepted", "duplicate"):
            s.updates_acked += 1
        elif msg.status == "rejected" and msg.reason in (RejectedBase.reason, NotSelected.reason):
            # Trained from a version a rollback abandoned, or not taken by a coordinator that did
            # not select this device (it forgot a straggler, or restarted): the samples are in no
            # model the coordinator keeps. Train them again from the current line (the pull below).
            s.trained_upto = s.prev_trained_upto
            key = f"retrain:{msg.reason}"
            s.counters[key] = s.counters.get(key, 0) + 1
        persist = self._persist()  # the round is over: its samples acknowledged, refused, or to train again
        note = Notify(
            kind="update_acked" if msg.status != "rejected" else "update_rejected",
            data={"seq": msg.seq, "status": msg.status, "version": msg.version, "reason": msg.reason},
        )
        return [persist, note, *self._maybe_pull(now)]

    def _resend_under_new_seq(self, pending: Update, ack: Ack, now: float) -> list[DeviceAction]:
        """Someone else's message holds our seq at the coordinator: move past its watermark."""
        s, cfg = self._s, self.config
        s.seq_conflicts += 1
        seq = max(s.next_seq, ack.watermark + 1)
        s.next_seq = seq + 1
        update = dataclasses.replace(pending, seq=seq, nonce=self._nonce())
        s.pending_update, s.pending_seq, s.attempts = update, seq, 0
        s.pending_payload = encode(update, encoding=cfg.encoding)
        s.deadline = now + self._timeout()
        return [
            self._persist(),
            Publish(topic=self._t_update, payload=s.pending_payload, qos=1),
            ScheduleTimer(at=s.deadline),
            Notify(kind="seq_conflict", data={"old_seq": pending.seq, "new_seq": seq, "watermark": ack.watermark}),
            *self._duplicate_verdict(),
        ]

    def _duplicate_verdict(self) -> list[DeviceAction]:
        """``Notify(duplicate_id)`` at the ``DUPLICATE_CONFLICTS``-th seq conflict, once."""
        s = self._s
        if s.duplicate_id or s.seq_conflicts < DUPLICATE_CONFLICTS:
            return []
        s.duplicate_id = True
        s.counters["duplicate_id"] = 1
        return [Notify(kind="duplicate_id", data={"device": self.config.device_id, "conflicts": s.seq_conflicts})]

    def _persist(self) -> PersistDeviceState:
        """The state to make durable: while a round's samples are being trained or pushed, the
        watermark from before it — a crash or stop while training trains them again after the
        restart; while pushing, the update itself too (``pending``, with the round's watermark):
        the restarted device sends it again under its seq, since the coordinator may have applied
        it; the round's own watermark once its update is acknowledged."""
        s = self._s
        if s.phase is _PUSHING and s.pending_update is not None and s.region == self.config.region:
            # The update in flight, to send again after a restart (a restart starts at home: an update
            # of a fallback region's numbering is not kept, its samples are trained again there).
            return PersistDeviceState(next_seq=s.next_seq, trained_upto=s.prev_trained_upto, pending=s.pending_payload,
                                      pending_upto=s.trained_upto)
        upto = s.prev_trained_upto if s.phase is _TRAINING or s.phase is _PUSHING else s.trained_upto
        return PersistDeviceState(next_seq=s.next_seq, trained_upto=upto)

    def _nonce(self) -> int:
        return self._nonces.randrange(1, 2**63)

    def _on_invite(self, msg: Invite, now: float) -> list[DeviceAction]:
        s = self._s
        if s.phase is not _DEFERRED:
            return []
        return self._send_pull(now, fresh=True, invite_round=msg.round)

    def _on_trained(self, ev: TrainingFinished) -> list[DeviceAction]:
        s, cfg = self._s, self.config
        if s.phase is not _TRAINING or ev.job_id != s.job_id:
            return [] if s.phase is _TRAINING else self._unmark(crashes=s.train_crashes, failures=s.train_failures,
                                                                hold_until=s.hold_until)  # a job dropped (region switch)
        weights = np.ascontiguousarray(ev.weights, dtype=np.float32)
        try:
            cfg.spec.check_update(weights)
        except RemoteProtocolError as exc:  # e.g. a diverged run (NaN, or a norm no coordinator takes): never send it
            return self._training_failed(ev.now, f"trainer returned unusable weights: {exc}")
        s.train_failures = s.train_crashes = 0
        unmark = self._unmark(crashes=0, failures=0)
        if s.job_group != FULL:  # LASP: only the group we were asked to train travels
            weights = np.ascontiguousarray(weights[cfg.spec.group_slice(s.job_group)])
        seq = s.next_seq
        s.next_seq += 1
        update = Update(
            device=cfg.device_id,
            seq=seq,
            model_id=cfg.spec.model_id,
            base_version=s.job_base_version,
            n_samples=ev.n_samples,
            weights=weights,
            group=s.job_group,
            loss=float(ev.loss) if math.isfinite(ev.loss) else 0.0,
            train_seconds=float(ev.seconds),
            nonce=self._nonce(),
            epoch=s.job_epoch,
        )
        s.phase = _PUSHING
        s.pending_update = update
        s.pending_seq, s.pending_payload, s.attempts = seq, encode(update, encoding=cfg.encoding), 0
        s.deadline = ev.now + self._timeout()
        return [
            *unmark,
            self._persist(),
            Publish(topic=self._t_update, payload=s.pending_payload, qos=1),
            ScheduleTimer(at=s.deadline),
            Notify(
                kind="trained",
                data={"seq": seq, "job_id": ev.job_id, "loss": float(ev.loss), "seconds": float(ev.seconds)},
            ),
        ]

    def _on_train_failed(self, ev: TrainingFailed) -> list[DeviceAction]:
        s = self._s
        if s.phase is not _TRAINING or ev.job_id != s.job_id:
            return [] if s.phase is _TRAINING else self._unmark(crashes=s.train_crashes, failures=s.train_failures,
                                                                hold_until=s.hold_until)  # a job dropped (region switch)
        return self._training_failed(ev.now, ev.error)

    def _training_failed(self, now: float, error: str) -> list[DeviceAction]:
        """Back to IDLE; the samples were not learned, so retry them after a back-off."""
        s = self._s
        s.phase = _IDLE
        s.trained_upto = s.prev_trained_upto
        s.train_failures += 1
        backoff = self._backoff(s.train_failures, 0)  # (a job that raised: no crash's long hold)
        s.hold_until = s.deadline = now + backoff
        return [
            # A job that raised is no crash (that count stays as it was); its back-off is kept with the mark,
            # or a restarted app (a supervisor, the phone's OS) trained the failing job again at once, every time.
            *self._unmark(crashes=s.train_crashes, failures=s.train_failures, hold_until=s.hold_until),
            ScheduleTimer(at=s.deadline),
            Notify(kind="training_failed", data={"error": error[:500], "retry_in_s": backoff, "failures": s.train_failures}),
        ]

    def _on_timer(self, ev: TimerFired) -> list[DeviceAction]:
        s = self._s
        if s.deadline is None and s.refresh_at is not None and ev.now >= s.refresh_at and s.phase is _IDLE:
            if (wait := self._pull_wait(ev.now)) > 0:  # paced as every pull (a refresh_s below pull_refill_s drained the bucket)
                s.refresh_at = ev.now + wait
                return [ScheduleTimer(at=s.refresh_at)]
            if s.refresh_for_release:
                s.release_fetched_at = ev.now
                s.counters["release_pulls"] = s.counters.get("release_pulls", 0) + 1
            else:
                s.counters["refresh_pulls"] = s.counters.get("refresh_pulls", 0) + 1
            return self._send_pull(ev.now, fresh=True, serve=True)  # idle for refresh_s, or a release heard: the release
        if s.deadline is None or ev.now < s.deadline:
            return [] if s.deadline is None else [ScheduleTimer(at=s.deadline)]
        if s.phase is _DEFERRED and s.restart_repull:
            s.restart_repull = False  # the coordinator's own announcement, not a request unanswered
        elif s.phase in (_PULLING, _DEFERRED, _PUSHING):
            s.timeouts += 1
            if self.config.fallback_regions and s.timeouts >= self.config.failover_after:
                return self._switch(ev.now, self._next_region(), "timeouts")
        if s.phase is _PULLING and s.canary_state == "fetching" and s.attempts + 1 >= CANARY_FETCH_TRIES:
            s.phase, s.deadline, s.pending_seq, s.pending_payload, s.attempts = _IDLE, None, NO_VERSION, b"", 0
            s.serving = False
            return self._canary_end("unanswered") + self._maybe_pull(ev.now)
        if s.phase in (_PULLING, _DEFERRED):
            return self._send_pull(ev.now, fresh=False)
        if s.phase is _PUSHING:
            s.attempts += 1
            s.deadline = ev.now + self._timeout()
            return [
                Publish(topic=self._t_update, payload=s.pending_payload, qos=1),
                ScheduleTimer(at=s.deadline),
                Notify(kind="retry", data={"what": "update", "seq": s.pending_seq, "attempt": s.attempts}),
            ]
        s.deadline = None
        return self._maybe_pull(ev.now)  # e.g. a training back-off is over

    # ------------------------------------------------------------------ failover

    def _on_status(self, region: str, payload: bytes, now: float) -> list[DeviceAction]:
        """A coordinator's retained status (JSON): only its ``alive`` flag matters here."""
        s = self._s
        if len(payload) > MAX_STATUS_BYTES:
            raise MalformedMessage(f"status of {len(payload)} bytes (cap {MAX_STATUS_BYTES})")
        status = parse_status_json(payload)
        alive = status.get("alive", True)  # a status without the flag: someone published it
        if not isinstance(alive, bool):
            raise MalformedMessage(f"status 'alive' must be true or false, got {alive!r}")
        if not alive:
            s.region_alive[region] = False
            if region == s.region:
                return self._switch(now, self._next_region(), "coordinator_offline")
            return []
        stamp = status.get("published_at")
        stamp = float(stamp) if isinstance(stamp, int | float) and not isinstance(stamp, bool) and math.isfinite(stamp) else None
        if stamp is not None and region in self._down and stamp <= self._down[region]:
            # The status it had when the device's requests there timed out, sent again (retained) after a
            # restart or a reconnect: its coordinator has said nothing since. Down it stays.
            s.counters["ignored:status_unchanged"] = s.counters.get("ignored:status_unchanged", 0) + 1
            s.region_alive[region] = False
            if region == s.region:
                return self._switch(now, self._next_region(), "status_unchanged")
            return []
        actions: list[DeviceAction] = []
        if stamp is not None:
            s.status_at[region] = max(stamp, s.status_at.get(region, stamp))
        if region in self._down:  # a newer status (or one without a stamp, from an older coordinator)
            del self._down[region]
            actions.append(MarkRegionDown(region=region, status_at=None))
        s.region_alive[region] = True  # (again): home may take the device back
        return actions + self._maybe_fail_back(now)

    def _next_region(self) -> str:
        """The next region after the current one, cyclically, preferring one not known down."""
        regions, s = self.regions, self._s
        i = regions.index(s.region)
        order = [regions[(i + k) % len(regions)] for k in range(1, len(regions))]
        return next((r for r in order if s.region_alive.get(r) is not False), order[0])

    def _maybe_fail_back(self, now: float) -> list[DeviceAction]:
        s, cfg = self._s, self.config
        if (s.region == cfg.region or s.region_alive.get(cfg.region) is not True
                or s.phase in (_TRAINING, _PUSHING)
                or (s.left_home_at is not None and now < s.left_home_at + cfg.failback_after_s)):
            return []
        return self._switch(now, cfg.region, "home_back")

    def _switch(self, now: float, region: str, reason: str) -> list[DeviceAction]:
        """Use ``region``'s coordinator from now on; keep seq, re-train what was not acked."""
        s, cfg = self._s, self.config
        previous, timeouts = s.region, s.timeouts
        if region == previous:
            return []
        if reason != "home_back":
            s.region_alive[previous] = False  # our verdict, until its status says otherwise
        down: list[DeviceAction] = []
        if reason == "timeouts" and (seen := s.status_at.get(previous)) is not None:
            self._down[previous] = seen  # that status again (a restart, a reconnect) is no news
            down.append(MarkRegionDown(region=previous, status_at=seen))
        if s.phase in (_TRAINING, _PUSHING):
            s.trained_upto = s.prev_trained_upto  # trained on the old line: train those samples again
        s.phase, s.deadline, s.pending_seq, s.pending_payload, s.attempts = _IDLE, None, NO_VERSION, b"", 0
        s.pending_update, s.serving, s.timeouts, s.release_wanted = None, False, 0, NO_VERSION
        s.deployed_version = NO_VERSION  # the new region numbers its own versions; the weights keep serving
        dropped = self._canary_end("region_switch") if s.canary is not None else []  # its versions mean nothing there
        s.region = region
        s.pins = self._pins_by_region.setdefault(region, {})
        s.recall = None  # another region's coordinator numbers its own versions
        s.coordinator_started = None  # and has its own start stamps (on its own clock)
        # The canary rounds taken are kept per region: another numbering's would refuse this one's lower
        # versions, and coming back, a replay of a round taken here is still refused.
        self._canary_by_region[previous] = (s.canary_last, s.canary_nonces)
        s.canary_last, s.canary_nonces = self._canary_by_region.pop(region, ((NO_VERSION, NO_VERSION), ()))
        s.epoch = self._epochs.get(region, NO_EPOCH)
        s.failovers += 1
        s.left_home_at = None if region == cfg.region else (s.left_home_at if previous != cfg.region else now)
        self._address(region)
        actions: list[DeviceAction] = [
            *down,
            self._persist(),
            SwitchRegion(region=region, previous=previous, reason=reason,
                         subscribe=tuple(cfg.region_topics(region)), unsubscribe=tuple(cfg.region_topics(previous))),
            Notify(kind="failover", data={"from": previous, "to": region, "reason": reason, "after_timeouts": timeouts}),
            *dropped,
        ]
        return actions + self._kick_off(now)

    # ------------------------------------------------------------------ canary evaluation

    def _check_trusted(self, sig: SignatureInfo | None, topic: str, what: str) -> None:
        """A canary request or a recall must be signed by a key already trusted or pinned: it never pins one."""
        cfg, s = self.config, self._s
        if sig is None:
            if cfg.require_signature:
                raise UnsignedMessage(f"{what} is not signed")
            return
        trusted = cfg.trusted_keys or s.pins
        if trusted.get(sig.kid) != sig.public_raw or not verify(sig.public_raw, sig.signature, sig.signed_for(topics.signing_scope(topic))):
            raise BadSignature(f"{what} signed by key {sig.kid}, which this device does not trust")

    def _on_recall(self, payload: bytes, topic: str, now: float) -> list[DeviceAction]:
        """The region's retained recall (versions its coordinator abandoned: an operator's
        rollback or pin): serving one of them, fetch the release now, with a serving pull when
        idle, instead of predicting with it until the next training round (which an idle device
        may never start)."""
        s = self._s
        frame = decode_frame(payload, max_bytes=self.config.max_message_bytes)
        msg = frame.message
        if not isinstance(msg, Recall):
            raise TopicMismatch(f"a {msg.TYPE} message does not belong on the recall topic")
        if frame.signature is not None and not self.config.trusted_keys and not s.pins:
            # Trust on first use, nothing pinned yet: the retained recall reaches a new device before its first
            # model does (and pins nothing): not a refusal to report, the first model brings the numbering.
            s.counters["ignored:recall_before_pin"] = s.counters.get("ignored:recall_before_pin", 0) + 1
            if msg.started and s.coordinator_started is None:
                # Its start stamp is noted (unverified: nothing to check it against), so that the next start's
                # is news to this device. Under trust on first use whoever publishes first is trusted anyway.
                s.coordinator_started = msg.started
            return []
        self._check_trusted(frame.signature, topic, "recall")
        if msg.model_id != self.config.spec.model_id:
            raise UnknownModel(f"recall of model {msg.model_id!r}, not {self.config.spec.model_id!r}")
        if msg.epoch < s.epoch:  # left retained on the broker by the coordinator before its reset: comes on every connect
            s.counters["ignored:old_epoch"] = s.counters.get("ignored:old_epoch", 0) + 1
            return []
        if msg.epoch > s.epoch:  # the region's coordinator counts anew: fetch its release now
            if frame.signature is None:
                raise UnsignedMessage("an unsigned recall cannot change the version numbering")
            actions = self._renumber(msg.epoch, "recall")
            s.recall, s.release_wanted = msg, msg.release
            if msg.started:
                s.coordinator_started = msg.started  # (this branch asks again anyway)
            if s.phase is _PULLING or s.phase is _DEFERRED:  # a request waiting out its back-off: the coordinator is back
                return [*actions, *self._send_pull(now, fresh=True, serve=s.serving)]
            return [*actions, *self._maybe_pull(now)]
        repull = self._coordinator_restarted(msg.started, now) if msg.started else []
        if s.recall is None or msg.release >= s.recall.release:
            s.recall = msg
        if not (msg.covers(s.deployed_version) and msg.release > s.deployed_version):
            # Serving something else (a retained recall comes again on every connect): a newer release is fetched soon.
            return [*repull, *self._release_heard(msg.release, msg.spread_s, now)] if msg.release > s.deployed_version else repull
        s.release_wanted = max(s.release_wanted, msg.release)
        s.counters["recalled"] = s.counters.get("recalled", 0) + 1
        note = Notify(kind="recalled", data={"version": s.deployed_version, "release": msg.release})
        return [*repull, note, *self._maybe_pull(now)]

    def _release_heard(self, release: int, spread_s: int, now: float) -> list[DeviceAction]:
        """``release_spread_s``: a signed recall names a release newer than the one served. An idle
        device brings its refresh forward to a random time within the spread — the larger of its own
        and the coordinator's (``Recall.spread_s``) — and at least the spread after its last such fetch;
        a busy one, or one waiting out a back-off, fetches it when next idle."""
        own = self.config.release_spread_s
        if own is None:
            return []
        spread = max(own, float(spread_s))
        s = self._s
        s.counters["releases_heard"] = s.counters.get("releases_heard", 0) + 1
        if s.phase is not _IDLE or s.deadline is not None or s.canary is not None:
            s.release_wanted = max(s.release_wanted, release)
            return []
        at = max(now + spread * self._rng.random(), s.release_fetched_at + spread)
        if s.refresh_at is None or (not s.refresh_for_release and at < s.refresh_at):  # (a fetch drawn already stands)
            s.refresh_at, s.refresh_for_release = at, True  # (the driver's timer: _arm_refresh, after this event)
        return []

    def _coordinator_restarted(self, started: int, now: float) -> list[DeviceAction]:
        """A (signed, trusted) start stamp of the region's coordinator: newer than the one seen, the
        coordinator started again and forgot whom it deferred; a DEFERRED device sends its pull
        again (same seq) after a random share of ``restart_spread_s``, or when a token is due if
        later. The first stamp seen and an older or equal one change nothing (the latter counted)."""
        s = self._s
        seen = s.coordinator_started
        if seen is not None and started <= seen:
            if started < seen:  # a replayed recall of an earlier start
                s.counters["ignored:old_start"] = s.counters.get("ignored:old_start", 0) + 1
            return []
        s.coordinator_started = started
        if seen is None:
            return []  # the coordinator running when we connected: our requests reach it already
        s.counters["coordinator_restarts"] = s.counters.get("coordinator_restarts", 0) + 1
        if s.phase is not _DEFERRED:
            return []  # a request in flight is retried by its own timer; an idle device has nothing pending
        spread = self.config.restart_spread_s
        delay = max(self._pull_wait(now), spread * self._rng.random() if spread > 0 else 0.0)
        if delay <= 0:
            return self._send_pull(now, fresh=False)
        if s.deadline is not None and s.deadline <= now + delay:
            return []  # its re-announce is due sooner
        s.deadline, s.restart_repull = now + delay, True
        return [ScheduleTimer(at=s.deadline)]

    def _on_canary(self, msg: Canary, now: float) -> list[DeviceAction]:
        s = self._s
        if msg.device != self.config.device_id:
            raise TopicMismatch(f"canary request for {msg.device!r} reached {self.config.device_id!r}")
        if msg.epoch != s.epoch:  # older: a replay; newer: the device takes the new numbering from a model first
            if msg.epoch < s.epoch:
                raise StaleEpoch(f"canary request of epoch {msg.epoch}, older than this region's {s.epoch}")
            s.counters["ignored:canary_new_epoch"] = s.counters.get("ignored:canary_new_epoch", 0) + 1
            return []
        current, asked = s.canary, (msg.candidate, msg.release)
        if current is not None and asked < (current.candidate, current.release):
            return []  # older than what we evaluate
        if asked < s.canary_last or (asked == s.canary_last and (msg.nonce in s.canary_nonces or not msg.nonce)):
            return []  # a redelivery, or a round this device took already, replayed (after it ended)
        # A new round: of a newer candidate or release, or of the same ones after the coordinator restarted.
        s.canary_nonces = (*s.canary_nonces, msg.nonce)[-CANARY_NONCES_KEPT:] if asked == s.canary_last else (msg.nonce,)
        s.canary_last = asked
        # Durable before anything it causes: a restarted device refuses this round's replay too.
        pin = PinCanary(region=s.region, epoch=s.epoch, candidate=msg.candidate, release=msg.release, nonces=s.canary_nonces)
        if current is not None and asked == (current.candidate, current.release):
            # The same evaluation in the restarted coordinator's round: the labels scored so far count
            # there too; the report goes to it (its nonce) by its deadline.
            s.canary, s.canary_deadline = msg, now + msg.deadline_s
            return [pin, Notify(kind="canary", data={"candidate": msg.candidate, "release": msg.release, "samples": msg.samples,
                                                "scored": sum(s.canary_counts)})]
        actions: list[DeviceAction] = [pin, *(self._canary_end("replaced") if current is not None else [])]
        s.canary, s.canary_state, s.canary_deadline, s.canary_counts = msg, "fetch", now + msg.deadline_s, [0, 0, 0, 0]
        if msg.release > s.deployed_version:
            s.release_wanted = max(s.release_wanted, msg.release)  # score against the release it names
        actions.append(Notify(kind="canary", data={"candidate": msg.candidate, "release": msg.release, "samples": msg.samples}))
        return actions + self._maybe_pull(now)

    def _on_canary_model(self, msg: ModelMsg, full: Vector | None, now: float) -> list[DeviceAction]:
        """The reply to a canary fetch: the candidate to score, or (another model) not ours."""
        s = self._s
        if s.canary is None or msg.version != s.canary.candidate:
            return []  # not the answer: keep waiting (the fetch times out and is retried)
        s.serving = False
        s.phase, s.deadline, s.pending_seq, s.pending_payload, s.attempts = _IDLE, None, NO_VERSION, b"", 0
        if full is None:
            return self._canary_end("unusable_model") + self._maybe_pull(now)
        s.canary_state = "scoring"
        return [StartCanary(candidate=s.canary.candidate, release=s.canary.release, weights=full), *self._maybe_pull(now)]

    def _on_canary_scored(self, ev: CanaryScored) -> list[DeviceAction]:
        s = self._s
        ask = s.canary
        if ask is None or s.canary_state != "scoring" or (ev.candidate, ev.release) != (ask.candidate, ask.release):
            return []  # scored for a request that is over, or against another release
        cand, rel = bool(ev.candidate_right), bool(ev.release_right)
        s.canary_counts[0 if cand and rel else 1 if cand else 2 if rel else 3] += 1
        return self._canary_report(ev.now) if sum(s.canary_counts) >= ask.samples else []

    def _canary_due(self, now: float) -> list[DeviceAction]:
        """The request's deadline passed: report what was scored, or give it up."""
        s = self._s
        if s.canary is None or now < s.canary_deadline:
            return []
        return self._canary_report(now) if sum(s.canary_counts) else self._canary_end("deadline")

    def _canary_report(self, now: float) -> list[DeviceAction]:
        s, cfg = self._s, self.config
        ask = s.canary
        assert ask is not None
        both, cand, rel, neither = s.canary_counts
        report = CanaryReport(device=cfg.device_id, candidate=ask.candidate, release=ask.release, both_right=both,
                              only_candidate=cand, only_release=rel, both_wrong=neither, nonce=ask.nonce)
        s.canary_reports += 1
        return [Publish(topic=self._t_update, payload=encode(report), qos=1),
                Notify(kind="canary_reported", data={"candidate": ask.candidate, "release": ask.release,
                                                     "counts": list(report.counts)}),
                *self._canary_end("")]

    def _canary_end(self, why: str) -> list[DeviceAction]:
        s = self._s
        ask = s.canary
        if ask is None:
            return []
        started = s.canary_state == "scoring"
        s.canary, s.canary_state, s.canary_counts = None, "", [0, 0, 0, 0]
        actions: list[DeviceAction] = [StopCanary(candidate=ask.candidate)] if started else []
        if why:
            actions.append(Notify(kind="canary_dropped", data={"candidate": ask.candidate, "reason": why}))
        return actions

    # ------------------------------------------------------------------ helpers

    def _maybe_pull(self, now: float) -> list[DeviceAction]:
        s = self._s
        if s.phase is _IDLE and (back := self._maybe_fail_back(now)):
            return back
        if s.phase is _IDLE and s.pull_tokens < self._pull_ready and (wait := self._pull_wait(now)) > 0 and (
                s.release_wanted > s.deployed_version or (s.canary is not None and s.canary_state == "fetch") or self.wants_pull()):
            s.deadline = now + wait  # the timer pulls then, with every label that arrived meanwhile
            s.counters["pulls_paced"] = s.counters.get("pulls_paced", 0) + 1
            return [ScheduleTimer(at=s.deadline)]
        if s.phase is _IDLE and s.release_wanted > s.deployed_version:
            s.release_wanted = NO_VERSION
            return self._send_pull(now, fresh=True, serve=True)  # a newer release to predict with
        if s.phase is _IDLE and s.canary is not None and s.canary_state == "fetch":
            s.canary_state = "fetching"
            return self._send_pull(now, fresh=True, serve=True, canary=s.canary.candidate)
        if s.phase is _IDLE and self.wants_pull():
            if now < s.hold_until:  # a training back-off: the timer pulls when it is over
                s.deadline = s.hold_until
                return [ScheduleTimer(at=s.deadline)]
            return self._send_pull(now, fresh=True)
        return []

    def _send_pull(self, now: float, *, fresh: bool, invite_round: int = NO_VERSION, serve: bool = False,
                   canary: int = NO_VERSION) -> list[DeviceAction]:
        s, cfg = self._s, self.config
        actions: list[DeviceAction] = []
        if fresh or s.pending_seq == NO_VERSION:
            s.pending_seq = s.next_seq
            s.next_seq += 1
            s.attempts = 0
            s.serving = serve
            s.refresh_at, s.refresh_for_release = None, False  # the answer tells the release: the next refresh counts from the next idle
            actions.append(self._persist())
            pull = Pull(
                device=cfg.device_id,
                seq=s.pending_seq,
                model_id=cfg.spec.model_id,
                have_version=s.deployed_version,
                n_samples=s.total,
                invite_round=invite_round,
                serve=serve,
                canary=canary,
                epoch=s.epoch,
            )
            s.pending_payload = encode(pull)
        else:
            s.attempts += 1
        self._spend_pull_token(now)
        s.phase = _PULLING
        s.deadline = now + self._timeout()
        actions += [Publish(topic=self._t_pull, payload=s.pending_payload, qos=1), ScheduleTimer(at=s.deadline)]
        if s.attempts:
            actions.append(Notify(kind="retry", data={"what": "pull", "seq": s.pending_seq, "attempt": s.attempts}))
        return actions

    def _pull_tokens(self, now: float) -> float:
        s, cfg = self._s, self.config
        return pull_tokens(s.pull_tokens, s.pull_at, now, cfg.pull_burst, cfg.pull_refill_s)  # (the coordinator's arithmetic)

    def _pull_wait(self, now: float) -> float:
        """Seconds until a pull would find a token in the coordinator's bucket, with
        ``PULL_MARGIN`` to spare (the coordinator counts arrivals, which jitter); 0: pull now."""
        ready = self._pull_ready
        if self._s.pull_tokens >= ready:  # (tokens only refill: ready without the sum; never without pacing)
            return 0.0
        wait = (ready - self._pull_tokens(now)) * self.config.pull_refill_s
        return wait if now + wait > now else 0.0  # (a timer set for that very instant found a rounding error short)

    def _spend_pull_token(self, now: float) -> None:
        if self._pull_ready == -math.inf:
            return  # no pacing: nothing to reckon
        s = self._s
        s.pull_tokens, s.pull_at = self._pull_tokens(now) - 1.0, now

    def _pull_answered(self, now: float) -> None:
        """The coordinator answered the pending pull: it took its token on arrival, at most now,
        so the bucket refills from now, not from the send (delays that vary from one pull to
        the next cannot make the device's reckoning exceed the coordinator's)."""
        s = self._s
        if now > s.pull_at:
            s.pull_at = now

    def _timeout(self) -> float:
        cfg = self.config
        base = min(cfg.request_timeout_s * (2 ** min(self._s.attempts, 16)), cfg.max_backoff_s)
        return float(base * (1.0 + 0.1 * self._rng.random()))


_HANDLERS: dict[type, str] = {
    MessageReceived: "_on_message",
    SampleAdded: "_on_sample",
    TrainingFinished: "_on_trained",
    TimerFired: "_on_timer",
    TrainingFailed: "_on_train_failed",
    CanaryScored: "_on_canary_scored",
}
"""The :class:`DeviceCore` method that handles each event class (by name: a subclass's override counts)."""
