"""CoordinatorCore — the regional coordinator as a pure state machine.

Theory of operation
-------------------
The coordinator owns one deployed model: a monotonically increasing ``version`` and its
flat float32 ``weights``. Devices talk to it over per-device topics (``edge_sdk.wire.topics``).

* A **pull** is answered with the current model (``reply_to`` = the pull's seq), unless the
  strategy defers it (server-driven strategies); deferred devices are later *invited* and
  pull again. A pull that names an invitation is served only if this coordinator sent that
  invitation to that device and it is unused; a *serving* pull (``serve``: the device wants
  a model to predict with) is always answered and never counts as training. A device that
  already holds the current version gets an ``unchanged`` reply without weights. Model
  replies are rate-limited per device (a token bucket): a flood from one client costs a
  decode each and nothing else. Each (version, group, encoding) is encoded once; every
  reply only builds and signs its small header (``CoordinatorConfig.signer``).
* An **update** is validated (topic ↔ device id, model id, base version ≤ current version,
  shape against the spec, finite values). A bad one is rejected with a typed reason,
  counted, answered with ``Ack(rejected)`` when its sender is known, and never applied.
* Idempotency: a device has at most one update in flight and numbers requests with a
  strictly increasing ``seq``, so the per-device watermark ``accepted_upto[device]`` is an
  exact, bounded encoding of "the set of accepted update keys": an update with
  ``seq <= accepted_upto[device]`` is a duplicate (QoS 1 redelivery or a retry) and is
  acknowledged again as ``duplicate`` without being applied; the ack echoes the accepted
  update's ``nonce`` so the device can tell its own update from a forged one. An update
  whose seq jumps more than ``max_seq_jump`` above the device's watermark (or, for a device
  without one, above its last pull) is rejected (``seq_jump``) and moves nothing; so is one
  claiming more than ``max_samples_per_update`` samples (``n_samples``).
* LASP (``full_sync_every`` = T): every T-th version is a full sync; in between only the head
  (``partial_group``) changes and devices train and send only it. An update trained from before
  the last full sync was fit to the extractor that sync replaced: a head-only one is refused
  (``base_rejected``: the device trains again from the current version), and a whole model too
  at a partial version, where only its head would be taken; at a full version it is merged whole.
  A head-only update at a full sync (a straggler of the partial version before it) is refused as
  well: the sync's whole models replace the extractor it was fit to, and the device trains the
  whole model for the sync instead. One accepted and then overtaken in the buffer by a full sync
  that did not consume it (a peer merge, a parked conversion, a restart under another T or past
  versions the registry could not read) is left out of the version by the same rule and consumed
  by it (counted, ``lasp_dropped_stale``); so is a head-only update in a full version that also
  takes whole models (T = 0, a restart under another T). With T = 0 every version is a full
  sync: a head-only update (a device told to train the head before a restart switched LASP off)
  from before the last one is refused by the same rule; one alone from the current extractor is
  taken. A head-only model reply names the full sync it builds on (``ModelMsg.full_sync``): a
  device holding an older extractor refuses it (a replayed or misrouted reply) instead of
  patching it on.
* Release gate (``CoordinatorConfig.gate``, see :mod:`coordinator.gate`): every commit is
  a *candidate* on the training line; devices predict with the *release*. With a gate, the
  core asks the driver to score each candidate against the release (``EvaluateCandidate``)
  and promotes or rejects it on the answer (``CandidateEvaluated``); a rejection rolls the
  training line back to the release as a new version. Without a gate every commit is the
  release at once. The versions a rollback abandons (the rejected candidate and every version
  built on it; for an operator's rollback or pin, every version after the one restored) are
  remembered as ranges, carried in each commit's metadata (durable with the commit that
  abandoned them). An update trained from one of them is refused (``base_rejected``):
  under ``combine="models"`` its weights — the abandoned model plus a step, which clipping
  measures from that very base — would become the next version and undo the rollback. The
  device trains those samples again from the current training line. Serving pulls get the release, training pulls the training line; every
  model says which version is the release. ``RecordRelease`` makes each decision durable.
  With a canary cohort (``GateConfig.canary``, see :mod:`coordinator.canary`) one candidate
  at a time is also scored by devices (test-then-train): a signed ``Canary`` on each cohort
  member's invite topic, a canary pull for the candidate's weights, a ``CanaryReport`` of
  paired counts on its update topic — checked, counted by reason when bad, pooled by the gate.
  The open round is recorded (``RecordCanaryRound``) when it opens, before its requests, and
  with each accepted report, before the decision it may bring: a restart that gates the same
  candidate against the same release resumes it (nonce, cohort, deadline, reports), so its
  cohort's reports still count; without a record a restart opens a new round, with a new nonce
  (a report echoing another round's is refused, ``canary_stale_round``).
* Operator control (``edgeci/v1/{region}/control``): ``rollback`` / ``pin`` / ``unpin``,
  signed by an operator key (or this coordinator's own), in the name that key belongs to
  (``CoordinatorConfig.operators``; the coordinator's own key: its id), fresh and never
  replayed; the release record keeps the operator and the key id. A verified command that does
  not run (refused, or failed: its version unreadable) is recorded too (``RecordRefusal``, apart from
  the release record), so a restarted core still refuses it replayed. A
  rollback asks the driver for the old weights (``LoadVersion``) and commits them as a new
  version that is also the release.
* Storage: when the driver reports ``StorageChanged(ok=False)`` updates are answered
  ``Ack(deferred, reason="storage")`` and not persisted; pulls keep being served from the
  last committed model. ``StorageChanged(ok=True)`` resumes accepting.
* An accepted update is first persisted (``PersistUpdate``), *then* acknowledged: the
  driver performs actions in order, so nothing acknowledged is lost by a crash.
* After every event the strategy's ``plan`` decides whether to aggregate now, whom to
  invite and when to be woken. Aggregation consumes the whole buffer and emits
  ``CommitVersion`` (the registry writes it atomically with the applied watermarks and
  drops the consumed update files) followed by a retained status publish.
* Restart: :meth:`CoordinatorCore.restore` takes the last committed snapshot plus the
  persisted-but-unapplied updates. Updates at or below the committed ``applied_upto``
  watermark were already applied and are dropped, so none is applied twice or lost. The
  gate's best-release floor comes back from the release record, on the same validation set
  only (``Snapshot.gate_floor``, :meth:`coordinator.gate.Gate.restore_floor`). The abandoned ranges
  come back from the newest commit and from the release record's decisions (a rejection, an operator's
  rollback or pin): when the commit that abandoned the restored training line was unreadable (the
  restart fell back past it), ``start`` rolls the line back to the release again, as a new version.

Transitions::

    Pull (valid)          serve → Publish(model)            | defer → Ack(deferred)
    Pull (over the rate)  dropped, counted
    Update (valid, new)   PersistUpdate, Publish(ack accepted), then plan
    Update (storage down) Publish(ack deferred, reason storage)
    Update (duplicate)    Publish(ack duplicate, nonce of the accepted one)
    Update (invalid)      Publish(ack rejected) if sender known; counted
    Update (abandoned base) Publish(ack rejected, reason base_rejected); counted, nothing kept
    Update (LASP: fit to an extractor a full sync replaced, or a head at a full sync) the same
    Update (not selected) Publish(ack rejected, reason not_selected): a selecting strategy did not serve it
    plan draws a round    RecordSelectionRound, then Publish(invite) per drawn device waiting with data
    TimerFired            plan (and a canary round's deadline: the gate decides on what came in;
                          with none open, a new try: CANARY_RETRY_S after one found no cohort)
    CanaryReport (valid)  RecordCanaryRound, gate evidence; a decision → RecordRelease (+ rollback), next round
    Commit (canary on)    RecordCanaryRound, Publish(canary) per cohort device, when no round is open
    start (line abandoned) CommitVersion(the release's weights), Notify(abandoned_line)
    start (regate)        the recorded round of that candidate and release resumed: Publish(canary) to the
                          members yet to report (past its deadline: it ends, the gate decides on what came in)
    StorageChanged        accept / stop accepting updates
    plan.aggregate        CommitVersion(version + 1), Publish(status, retained)
    plan.invite           Publish(invite) per device
    plan.wake_at          ScheduleTimer
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from bisect import bisect_right
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np

from coordinator.canary import CanaryConfig, CanaryRound, eligible, pick_cohort, round_nonce
from coordinator.conversion import ConversionConfig, SwitchTracker, dc_asgd
from coordinator.gate import Decision, Gate, GateConfig
from coordinator.methods import check_lasp
from coordinator.peering.base import BROADCAST, Peering, PeerPlan, Tallies
from coordinator.strategies.base import BufferedUpdate, Plan, ReadOnlyView, Strategy
from coordinator.strategies.rounds import moment
from coordinator.strategies.staleness import Convert, conversion_of, needs_driver, policy_of
from edge_sdk.core.events import MessageReceived, Notify, Publish, ScheduleTimer, TimerFired
from edge_sdk.errors import (
    BadCanaryReport,
    BadSignature,
    ConfigError,
    GateRejected,
    LocalProtocolError,
    MalformedMessage,
    NotInCohort,
    NotSelected,
    OperatorMismatch,
    RateLimited,
    RejectedBase,
    RemoteProtocolError,
    ReplayedMessage,
    SeqJump,
    ShapeMismatch,
    TooManyDevices,
    TooManySamples,
    TopicMismatch,
    UnknownCandidate,
    UnknownModel,
    UnknownVersion,
    UnsignedMessage,
)
from edge_sdk.fastinit import fast_init
from edge_sdk.signing import PUBLIC_KEY_BYTES, Signer, key_id, verify
from edge_sdk.spec import FULL, ModelSpec, Vector
from edge_sdk.wire import topics
from edge_sdk.wire.codec import (
    DEFAULT_MAX_BYTES,
    PULL_BURST,
    PULL_REFILL_S,
    EncodedTensor,
    Encoding,
    SignatureInfo,
    decode,
    decode_frame,
    encode,
    encode_spliced,
    pull_tokens,
    status_json,
)
from edge_sdk.wire.messages import (
    MAX_RECALL_RANGES,
    MAX_RELEASE_SPREAD_S,
    NO_EPOCH,
    NO_VERSION,
    UNCHANGED,
    Ack,
    Canary,
    CanaryReport,
    Control,
    Invite,
    Message,
    ModelMsg,
    PeerMsg,
    Pull,
    Recall,
    Status,
    Update,
)


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class StorageChanged:
    """The driver found its storage failing (``ok=False``) or working again (``ok=True``)."""

    now: float
    ok: bool
    detail: str = ""


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class CandidateEvaluated:
    """The driver scored candidate ``version`` and the release on the validation set."""

    now: float
    version: int
    candidate_metric: float
    release_metric: float
    release_version: int
    paired: tuple[int, int, int] | None = None
    """(better, worse, n) on the same samples: only the candidate right, only the release right
    (see :func:`coordinator.gate.paired_counts`); None when the task cannot say."""


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class VersionLoaded:
    """The driver read an old version's weights for a rollback / pin (None: unreadable)."""

    now: float
    version: int
    weights: Vector | None
    command: str
    detail: str = ""
    operator: str = ""
    nonce: int = 0
    """The command's operator and nonce (recorded with the release, so a restart still knows it ran)."""
    kid: str = ""
    """The key id that signed the command (recorded with the release)."""


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateConverted:
    """The driver's answer to :class:`ConvertUpdate` ``ticket``: the estimated fresh update
    (based on ``target_version``), or None when the conversion failed."""

    now: float
    ticket: int
    weights: Vector | None
    elapsed_s: float = 0.0
    detail: str = ""


CoordinatorEvent = MessageReceived | TimerFired | StorageChanged | CandidateEvaluated | VersionLoaded | UpdateConverted


DUPLICATE_DEVICE_CONFLICTS = 2
"""Updates under a device's last accepted seq with another nonce before the id is called a duplicate
(two devices on one id: a cloned image). A reinstall that lost its store meets that once."""
MAX_SEQ_CONFLICT_IDS = 1024
"""Device ids whose seq conflicts are counted, and duplicate ids remembered (bounded: ids are free; the
one that conflicted longest ago is forgotten first)."""
DUPLICATE_QUIET_SEQS = 16
"""A conflict this many seqs before an id's next one is forgotten: a clone pair conflicts at every seq
(measured: 28 in 60 s), one device whose store was restored meets its last accepted seq once per restore."""


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class PersistUpdate:
    """Make an accepted update durable. Performed before the ack that follows it."""

    update: BufferedUpdate


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class CommitVersion:
    """Atomically write a new version with the watermarks this commit raised. O(changed
    devices): the registry keeps the cumulative ``applied_upto`` and ``devices_seen``
    (applying ``applied_changed`` and ``devices_added`` to its copy) and restores them."""

    version: int
    weights: Vector
    applied_changed: Mapping[str, int]
    """The new watermark of each device whose updates this commit consumed (only those)."""
    consumed: tuple[tuple[str, int], ...]
    devices_added: tuple[str, ...] = ()
    """Devices first seen since the previous commit, in the order they were seen."""
    metadata: Mapping[str, Any]
    tallies: Tallies | None = None
    """The peering's per-device counts changed since the previous commit (``Peering.take_tallies``:
    the registry keeps the cumulative map as it keeps ``applied_upto``); None: it keeps none."""
    arrays: Mapping[str, Vector] = field(default_factory=dict)
    """The strategy's :meth:`~coordinator.strategies.base.Strategy.checkpoint_arrays` at ``version``
    (FedAdam's moments): kept by the registry beside the newest version only, not in the metadata."""


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluateCandidate:
    """Score ``weights`` (candidate ``version``) and the release's on the validation set."""

    version: int
    weights: Vector
    release_version: int
    release_weights: Vector


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class RecordRelease:
    """Durably record a gate decision or operator action and the release it leaves."""

    release: int
    pinned: bool
    event: Mapping[str, Any]
    floor: Mapping[str, Any] | None = None
    """The gate's best-release floor and the validation set it was scored on (``Gate.floor``):
    kept beside the release, restored after a restart for the same set."""


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class RecordRefusal:
    """Durably record a verified operator command that did not run (``outcome``: ``refused``, or
    ``failed``: its version could not be read), so that a restarted core refuses its replay too."""

    event: Mapping[str, Any]


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class RecordCanaryRound:
    """Durably record the open canary round (:meth:`coordinator.canary.CanaryRound.record`: candidate,
    release, epoch, nonce, deadline, cohort, the reports accepted so far), replacing the last record:
    a restarted core resumes it (``Snapshot.canary_round``)."""

    round: Mapping[str, Any]


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class RecordSelectionRound:
    """Durably record the selection round a plan just drew, replacing the last record, before its
    invitations leave: the strategy's ``round_checkpoint`` (who was drawn, when, the draws'
    generator) and the core's side of it (the round's devices with their accepted seq at the
    record, their invitations), tagged with the version, epoch and strategy it was drawn at. A
    restarted core whose newest version is still that one resumes the round as drawn
    (``Snapshot.selection_round``); without it the replayed part of the round's buffer was
    aggregated at once, or another round drawn, and the round's other updates came in stale or
    refused (helper-169: 0.02-0.57 in L2 over the next 10 versions)."""

    round: Mapping[str, Any]


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class LoadVersion:
    """Read version ``version``'s weights from the registry and answer ``VersionLoaded``."""

    version: int
    command: str
    operator: str = ""
    nonce: int = 0
    kid: str = ""


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class ConvertUpdate:
    """Convert a very stale update (staleness policy ``kind``, e.g. gradient inversion) into an
    estimate of the update the device would have sent from ``target_weights``; answer with
    :class:`UpdateConverted` (same ``ticket``). The core falls back to the policy's damped
    update at ``deadline`` (core clock) and ignores a later answer. The update is already
    durable and acknowledged; nothing here may be published."""

    ticket: int
    device: str
    kind: str
    stale_weights: Vector
    base_version: int
    base_weights: Vector
    target_version: int
    target_weights: Vector
    n_samples: int
    staleness: int
    hints: Mapping[str, float]
    deadline: float


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class _Parked:
    """An accepted update waiting for its conversion (durable and acknowledged already)."""

    update: BufferedUpdate
    deadline: float
    base: Vector
    target_version: int
    target: Vector


CoordinatorAction = (Publish | ScheduleTimer | PersistUpdate | CommitVersion | Notify | EvaluateCandidate | RecordRelease | RecordCanaryRound
                     | RecordSelectionRound | LoadVersion | ConvertUpdate | RecordRefusal)
PRESENCE_LIMIT = 10_000
"""Devices whose presence (online flag, last seen) is tracked; the least recent are forgotten."""
RECENT_DEVICES = 50
"""Per-device rows in the status (the most recently seen)."""
STALENESS_HISTOGRAM_CAP = 1000
"""A staleness of this many versions or more is counted at this key: a key per distinct value let
one device's updates, each from another old version, grow the retained status past the 64 KiB
devices read (5,001 keys: 56.8 KB)."""
_NO_WEIGHTS: Vector = np.zeros(0, dtype=np.float32)
_SEQUENCED = (Pull, Update)
"""The messages that carry a device's request seq (a tuple: ``Pull | Update`` builds a union per test)."""
ABANDONED_RANGES = 256
"""Ranges of abandoned training versions remembered (one per rejection or operator rollback,
merged when they touch); beyond it the oldest are forgotten. 256 ranges are < 8 KB of metadata."""
VersionRange = tuple[int, int]


def abandon(ranges: Sequence[Sequence[int]], first: int, last: int) -> list[VersionRange]:
    """``ranges`` (inclusive ``(first, last)`` pairs) with ``first..last`` added: sorted,
    disjoint, touching ones merged, the newest ``ABANDONED_RANGES`` kept."""
    merged: list[VersionRange] = []
    for lo, hi in sorted([*((int(r[0]), int(r[1])) for r in ranges), (first, last)]):
        if lo > hi:
            continue
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged[-ABANDONED_RANGES:]


RATE_NOTE_EVERY_S = 60.0
"""Pulls dropped by the per-device rate limit are notified (and so logged) at most this often."""
CANARY_RETRY_S = 30.0
"""A canary round that found no cohort (no device seen recently: e.g. right after a restart) is
tried again this long after, on a timer the core asks for (an idle strategy asks for none)."""
GATE_REJECTED_KEPT = 200
"""Rejected versions remembered for ``force`` (the release record keeps as many events)."""


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorConfig:
    region: str
    coordinator_id: str
    spec: ModelSpec
    encoding: Encoding = "f4"
    max_message_bytes: int = DEFAULT_MAX_BYTES
    hints: Mapping[str, float] = field(default_factory=dict)
    """Training hints sent with every model (e.g. epochs, lr)."""
    keep_versions: int = 8
    """How many past global vectors stay in memory for staleness-aware strategies."""
    full_sync_every: int = 0
    """LASP (HFedMS): every T-th version is a full sync; versions in between change only
    ``partial_group`` and devices exchange only that group. 0 disables LASP."""
    partial_group: str = "classifier"
    signer: Signer | None = None
    """Signs every model and peer message (Ed25519). Devices refuse unsigned models."""
    peer_keys: Mapping[str, bytes] = field(default_factory=dict)
    """Peer coordinator id → its Ed25519 public key (a bundle's ``trusted/<id>.pub``): a peer
    message's ``sender`` must be the name of the key that signed it. Empty: pin each peer's
    first key (trust on first use: insecure, see the daemon's ``--peers`` help)."""
    max_seq_jump: int = 100_000
    """An update's seq may exceed the device's watermark (or last pull) by at most this."""
    max_samples_per_update: int = 1_000_000
    """Hard cap on the sample count an update may claim (robust weighting bounds the rest)."""
    pull_burst: float = PULL_BURST
    pull_refill_s: float = PULL_REFILL_S
    """Per-device token bucket for model replies: ``pull_burst`` at once, one more per
    ``pull_refill_s`` seconds; pulls beyond it are dropped and counted (``rate_limited``)."""
    require_pull: bool = False
    """Take an update only from a device served a training model since its last accepted update,
    whatever the strategy (a selecting one always does). Without it a strategy that does not
    select (SPIN, FedAsync, PORT) took any number of updates from one device that never pulled:
    one stolen device certificate filled every buffer alone (helper-159: 1,000 updates in 6 s took
    digits from 0.81 to 0.04). The daemon sets it (``--accept-unpulled-updates`` turns it off);
    an update costs a served pull then, and pulls are rate-limited per device. Across a restart
    (the served set is not kept) each device's first update trained from a version up to the
    restart's is still taken, once."""
    max_devices: int = 1_000_000
    """Devices tracked at once; messages from further new ids are rejected (memory bound). The
    update watermarks are capped at as many (an id that only pushes never counts as tracked)."""
    status_interval_s: float = 0.25
    """Publish the retained status at most this often (immediately when the version changes)."""
    status_payload: bool = True
    """Build the status JSON for each status publish. False (the in-process emulator, where no
    one subscribes to it): on the same schedule the core only says ``Notify(kind="status")``,
    and whoever wants the status calls :meth:`CoordinatorCore.status`."""
    announce_start: bool = False
    """Stamp the region's recall (retained) with this start's time, published by every start: the
    devices this core defers are held in memory only, and a deferred device that sees a newer stamp
    pulls again at once instead of after its ``reannounce_s`` (600 s). The daemon sets it; the
    in-process emulator, whose coordinators never restart, leaves it off (its results unchanged)."""
    announce_releases: bool = False
    """Publish the region's recall (retained, signed; it carries the release) again when the release
    changes (at most every ``release_announce_s``), so that idle devices hear of it (``DeviceConfig.release_spread_s``) instead
    of at their next hourly refresh. The daemon sets it; the in-process emulator leaves it off
    (its devices pull on the scenario's schedule only: results unchanged)."""
    release_announce_s: float = 30.0
    """With ``announce_releases``: a new release is announced at most this often (the recall names
    the newest release when it goes out; devices fetch the newest when they fetch). Every release of
    a busy region announced at once sent each connected device a message per version (100,000
    devices, a version a second: 100,000 messages a second from the broker)."""
    release_spread_s: int = 0
    """Sent with the recall (``Recall.spread_s``): idle devices fetch a release over at least this
    many seconds (0: each device's own ``release_spread_s``). Size it to the fleet and the model."""
    gate: GateConfig | None = None
    """Promote candidates to the release only on evidence (None: every version is released)."""
    operators: Mapping[str, bytes] = field(default_factory=dict)
    """Operator name → the Ed25519 public key that may sign control commands in that name
    (``operators/<name>.pub``). This coordinator's own signing key may too, in the name
    ``coordinator_id``; a command in any other name than its key's is refused."""
    control_max_age_s: float = 300.0
    conversion: ConversionConfig = field(default_factory=ConversionConfig)
    """Converting staleness policies (gradient-inversion, dc-asgd): deadline, switch back."""

    def __post_init__(self) -> None:
        topics.check_id(self.region, "region")
        topics.check_id(self.coordinator_id, "coordinator id")
        if self.coordinator_id == BROADCAST:
            raise ConfigError(f"{BROADCAST!r} is reserved for peer broadcasts")
        if self.keep_versions < 1:
            raise ConfigError("keep_versions must be >= 1")
        if self.full_sync_every < 0:
            raise ConfigError("full_sync_every must be >= 0 (0 disables LASP)")
        if self.full_sync_every and self.partial_group not in self.spec.group_slices:
            raise ConfigError(f"LASP needs a {self.partial_group!r} layer group; {self.spec.model_id} has {self.spec.groups}")
        if self.max_seq_jump < 1 or self.max_samples_per_update < 1 or self.max_devices < 1:
            raise ConfigError("max_seq_jump, max_samples_per_update and max_devices must be >= 1")
        if self.pull_burst < 1 or self.pull_refill_s < 0:
            raise ConfigError("need pull_burst >= 1 and pull_refill_s >= 0")
        if not (math.isfinite(self.release_announce_s) and self.release_announce_s >= 0):
            raise ConfigError(f"release_announce_s must be a finite number of seconds >= 0, got {self.release_announce_s!r}")
        if type(self.release_spread_s) is not int or not 0 <= self.release_spread_s <= MAX_RELEASE_SPREAD_S:
            raise ConfigError(f"release_spread_s must be whole seconds from 0 to {MAX_RELEASE_SPREAD_S} (a week), "
                              f"got {self.release_spread_s!r}")
        for name, raw in self.operators.items():
            if not name or len(raw) != PUBLIC_KEY_BYTES:
                raise ConfigError(f"operator {name!r}: need a name and a {PUBLIC_KEY_BYTES}-byte Ed25519 public key")


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Everything needed to resume: the last commit plus updates accepted since."""

    version: int
    weights: Vector
    applied_upto: Mapping[str, int] = field(default_factory=dict)
    buffer: Sequence[BufferedUpdate] = ()
    devices_seen: Sequence[str] = ()
    last_aggregation_at: float = 0.0
    counters: Mapping[str, int] = field(default_factory=dict)
    last_full_version: int = 0
    peer_state: Mapping[str, Any] = field(default_factory=dict)
    peer_name: str | None = None
    """The peering ``peer_state`` belongs to (None: a state dir from before it was recorded)."""
    peer_tallies: Mapping[str, int] | None = None
    """The peering's per-device counts at ``version`` (``CommitVersion.tallies`` accumulated by the
    registry); None: none recorded (older state dirs kept them inside ``peer_state``)."""
    strategy_arrays: Mapping[str, Vector] | None = None
    """The strategy's ``checkpoint_arrays`` kept with ``version`` (None: none kept for it)."""
    history: Mapping[int, Vector] = field(default_factory=dict)
    """Versions before ``version`` still on disk (the newest few): ``weights_at`` for the stale
    updates in ``buffer`` and those arriving after the restart, as before it."""
    strategy_state: Mapping[str, Any] = field(default_factory=dict)
    """The strategy's :meth:`~coordinator.strategies.base.Strategy.checkpoint` at ``version`` (the
    robust defences' windows and counts, a server optimizer's round, ...), restored before the
    pending updates are replayed into it."""
    staleness_hist: Mapping[int, int] = field(default_factory=dict)
    """Accepted updates by staleness (capped), as of ``version``: the counters' histogram."""
    strategy_name: str | None = None
    """The strategy ``strategy_state`` belongs to: another strategy's state is not restored."""
    recovered_from: Sequence[str] = ()
    """Newer versions the registry could not read and skipped (shown in status)."""
    version_floor: int = -1
    """The highest version number that may exist: the next commit is numbered above it."""
    release_version: int = -1
    """The release (what devices predict with); -1: the snapshot's version."""
    release_weights: Vector | None = None
    pinned: bool = False
    gate_history: Sequence[Mapping[str, Any]] = ()
    control_refused: Sequence[Mapping[str, Any]] = ()
    """Verified operator commands that did not run, as recorded (``RecordRefusal``): a replay is refused."""
    conversion_state: Mapping[str, Any] = field(default_factory=dict)
    """The converting policy's switch point (see coordinator.conversion)."""
    abandoned: Sequence[Sequence[int]] = ()
    """Inclusive ranges of versions a rollback abandoned (updates based on them are refused)."""
    epoch: int = NO_EPOCH
    """The numbering of this state dir's versions (see ``ModelMsg.epoch``): created with it,
    so a coordinator that lost its state dir numbers anew in a newer epoch. 0: none (in memory)."""
    rejected: Sequence[int] = ()
    """``(candidate, through)`` when ``version`` is the gate's rollback of that rejected candidate
    (its commit's metadata): the verdict, should its release record be lost."""
    candidate_devices: Sequence[str] = ()
    """Devices whose updates built ``version`` (its commit's metadata): left out of its canary
    cohort when it is gated again after the restart."""
    gate_floor: Mapping[str, Any] | None = None
    """The gate's best-release floor as last recorded (``RecordRelease.floor``); None: none."""
    canary_round: Mapping[str, Any] | None = None
    """The canary round last recorded (``RecordCanaryRound``); None: none. Resumed when its candidate
    is gated again against its release, in its epoch (else a new round is opened)."""
    selection_round: Mapping[str, Any] | None = None
    """The selection round last recorded (``RecordSelectionRound``); None: none. Resumed when drawn
    at ``version``, in ``epoch``, by the same strategy (else the commit's own round state holds)."""
    round_devices: Mapping[str, Any] | None = None
    """The core's side of the open round at ``version`` (its commit's metadata ``round``: see
    :meth:`CoordinatorCore._round_block`); None: none recorded."""


def abandoned_by(event: object, *, newest: int) -> VersionRange | None:
    """The versions a recorded decision abandoned (``_apply_decision``, ``_on_version_loaded``): a
    rejected candidate through the newest version built on it; an operator's rollback or pin, those
    after the version it restored up to its own commit. Clipped to ``newest`` (what this state dir
    has numbered: a record newer than its versions speaks of others); None: nothing."""
    if not isinstance(event, Mapping) or type(event.get("version")) is not int:
        return None
    version, action = int(event["version"]), event.get("action")
    if action == "reject":
        through = event.get("through")
        first, last = version, through if type(through) is int else version
    elif action in ("rollback", "pin") and type(event.get("of")) is int and not event.get("unchanged"):
        first, last = int(event["of"]) + 1, version - 1
    else:
        return None
    last = min(last, newest)
    return (first, last) if 0 <= first <= last else None


def _round_devices(block: object) -> tuple[dict[str, int], dict[str, int], int]:
    """A recorded round's devices (``CoordinatorCore._round_block``): device -> its accepted seq at
    the record, device -> the invitation it was sent, the invitations numbered so far. Whatever is
    not in that form is left out (nothing, for a block that is not one)."""
    if not isinstance(block, Mapping):
        return {}, {}, 0

    def table(rows: object) -> dict[str, int]:
        return {r[0]: r[1] for r in rows if isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) and type(r[1]) is int
                } if isinstance(rows, list) else {}

    numbered = block.get("invite_round")
    return table(block.get("accepted")), table(block.get("invites")), numbered if type(numbered) is int and numbered >= 0 else 0


_K = TypeVar("_K", tuple[str, int], tuple[str, int, str, int, bool])
"""A remembered control command: (operator, nonce) executed, or refused as a whole (:func:`_command_key`)."""


def _command_key(msg: Control) -> tuple[str, int, str, int, bool]:
    """A verified command as a whole (a refused one is remembered by it: the same one again is a replay)."""
    return (msg.operator, msg.nonce, msg.command, msg.version, msg.force)


class CoordinatorCore:
    """Sans-IO coordinator: ``handle(event) -> list[action]``. See the module docstring."""

    def __init__(
        self,
        config: CoordinatorConfig,
        strategy: Strategy,
        snapshot: Snapshot,
        *,
        rng: random.Random,
        peering: Peering | None = None,
        tickets: Iterator[int] | None = None,
    ) -> None:
        """``tickets``: where conversion tickets come from. A driver that rebuilds its core (a
        storage failure, a core error) passes one source to every core it builds: its worker may
        still answer an old core's ticket, which must match nothing in the new one (numbered from
        1 per core, that answer replaced another device's parked update)."""
        check_lasp(strategy, config.full_sync_every)  # (every driver builds a core: the one check they all meet)
        self.config = config
        self.strategy = strategy
        self.peering = peering or Peering()
        self._peering_changed: tuple[str, str] | None = None
        if snapshot.peer_name not in (None, self.peering.name):  # another peering's state: not this one's to read
            self._peering_changed = (str(snapshot.peer_name), self.peering.name)
        else:
            self.peering.restore(snapshot.peer_state)
            if snapshot.peer_tallies is not None:
                self.peering.restore_tallies(snapshot.peer_tallies)
        self._rng = rng
        self._last_full_version = int(snapshot.last_full_version)
        spec = config.spec
        self._weights = np.array(spec.check(np.asarray(snapshot.weights, dtype=np.float32)), copy=True)
        self._version = int(snapshot.version)
        self._started_version = self._version
        self._version_floor = int(snapshot.version_floor)
        self._epoch = int(snapshot.epoch)
        self._recovered_from = tuple(snapshot.recovered_from)
        self._history: dict[int, Vector] = {
            v: np.array(spec.check(np.asarray(w, dtype=np.float32)), copy=True)
            for v, w in sorted(snapshot.history.items())[-(config.keep_versions - 1):] if v < self._version
        } if config.keep_versions > 1 else {}
        self._history[self._version] = self._weights
        if snapshot.release_version >= 0 and snapshot.release_weights is not None and snapshot.release_version != self._version:
            self._release_version = int(snapshot.release_version)
            self._release_weights = np.array(spec.check(np.asarray(snapshot.release_weights, dtype=np.float32)), copy=True)
            self._history[self._release_version] = self._release_weights
        else:
            self._release_version, self._release_weights = self._version, self._weights
        self._pinned = bool(snapshot.pinned)
        # Versions a rollback abandoned: an update trained from one is refused (see _on_update).
        self._abandoned: list[VersionRange] = []
        for r in snapshot.abandoned:
            self._abandoned = abandon(self._abandoned, int(r[0]), int(r[1]))
        # ... and those the release record's decisions abandoned: the commit that carried them may be
        # the one a restart could not read, the training line restored one of them (start() leaves it
        # for the release). Not a range holding the release: then there is none to leave it for.
        for h in snapshot.gate_history:
            span = abandoned_by(h, newest=max(self._version, self._version_floor))
            if span is not None and not span[0] <= self._release_version <= span[1]:
                self._abandoned = abandon(self._abandoned, *span)
        self._gate = Gate(config.gate) if config.gate is not None else None
        # The best-release floor survives a restart, but only on the validation set it was scored
        # on (otherwise each restart would let releases step down one more margin).
        self._floor_dropped = self._gate.restore_floor(snapshot.gate_floor) if self._gate is not None else None
        self._gate_history: list[dict[str, Any]] = [dict(h) for h in snapshot.gate_history][-20:]
        rejects = [h for h in snapshot.gate_history
                   if isinstance(h, Mapping) and h.get("action") == "reject" and type(h.get("version")) is int]
        self._gate_rejected: dict[int, dict[str, Any]] = {h["version"]: dict(h) for h in rejects[-GATE_REJECTED_KEPT:]}
        """Versions the gate rejected (as far back as the release record goes, at most
        :data:`GATE_REJECTED_KEPT`): an operator's rollback or pin of one needs ``force``."""
        self._unrecorded_reject: tuple[int, int] | None = None
        last = snapshot.gate_history[-1] if snapshot.gate_history else None
        self._unrecorded_command: dict[str, Any] | None = (
            {k: v for k, v in last.items() if k != "recovered"} if isinstance(last, Mapping) and last.get("recovered") and "nonce" in last else None)
        """An operator's command the registry found only in its commit (its record lost): recorded by start()."""
        if len(snapshot.rejected) == 2 and int(snapshot.rejected[0]) not in self._gate_rejected:
            # The newest commit is the rollback after a rejection whose record did not follow it.
            rejected, through = (int(v) for v in snapshot.rejected)
            self._gate_rejected[rejected] = {"action": "reject", "version": rejected, "through": through}
            # Recorded by start(): only the newest commit says so, and the next commit would forget it.
            self._unrecorded_reject = (rejected, through)
        # A candidate committed but not decided before the restart (the process died, or the
        # rollback after its rejection failed to write and this core was rebuilt): gated again
        # by start(), so an unapproved training line does not go on as if it had passed.
        decided = {h.get("version") for h in snapshot.gate_history if isinstance(h, Mapping)}
        self._regate: int | None = (self._version if self._gate is not None and self._version > self._release_version
                                    and self._version not in decided and not self._pinned else None)
        self._regate_devices = tuple(snapshot.candidate_devices)
        self._candidate_devices: dict[int, tuple[str, ...]] = {}
        self._canary_round: CanaryRound | None = None  # the candidate under canary evaluation (one at a time)
        self._canary_ended: dict[int, int] = {}
        """Candidates whose round reached its deadline undecided (validation pending): the release it
        was against. Not asked again against that release: its reports wait for the score, and a device
        refuses a request for a round it served."""
        self._canary_weights: Vector = _NO_WEIGHTS
        self._canary_retry_at: float | None = None
        """When to try again to open a round that found no cohort (:data:`CANARY_RETRY_S`)."""
        self._canary_resume = CanaryRound.from_record(snapshot.canary_round, self._epoch) if snapshot.canary_round else None
        """The round recorded before the restart: resumed by the first round start, if on its candidate and release."""
        # Executed operator commands (within their age window a replay is refused): seeded from the
        # durable release record, so a restart or a rebuilt core does not run a replayed one again.
        # Who may command, by key id: (the name commands signed with it must give, the key).
        self._commanders = {key_id(raw): (name, bytes(raw)) for name, raw in config.operators.items()}
        if config.signer is not None:
            self._commanders.setdefault(config.signer.kid, (config.coordinator_id, config.signer.public_raw))
        # Each remembered command with the time (on the window's clock, MessageReceived.wall) until
        # which its window accepts it: issued_at + max_age; a recorded one, at most its run time
        # ``at`` + 2 max_age (issued up to max_age before or after it ran). See _authenticate_control.
        spent = 2 * config.control_max_age_s
        self._control_seen: dict[tuple[str, int], float] = {
            (str(h["operator"]), int(h["nonce"])): float(h.get("at", 0.0)) + spent
            for h in snapshot.gate_history if isinstance(h, Mapping) and "nonce" in h and "operator" in h}
        self._control_floor: dict[str, float] = {}
        """Per operator, the newest ``issued_at`` (an upper bound for a recorded one) among the commands
        forgotten: one issued no later is refused. Only a clock stepped back after they were forgotten
        brings such a command within its window again, and then it would run twice."""
        # The last control message refused, for the operator's CLI (status ``control_refused``):
        # its reason and detail at once instead of a timeout. The nonce is the refused message's
        # own (unauthenticated when the signature is what failed): it only says which try this was.
        self._control_refused: dict[str, Any] | None = None
        # Verified commands that were refused (operator, nonce, command, version, force): the same
        # one again is a replay (a rejected message), not another operator refusal. Recorded
        # (RecordRefusal) and seeded here, as is a command that failed (its (operator, nonce) spent).
        self._control_refused_seen: dict[tuple[str, int, str, int, bool], float] = {}
        for entry in snapshot.control_refused:
            if not (isinstance(entry, Mapping) and isinstance(entry.get("operator"), str) and type(entry.get("nonce")) is int
                    and type(entry.get("at")) in (int, float)):
                continue  # (a damaged entry: its command is forgotten, as before it was recorded)
            if entry.get("outcome") == "failed":
                self._control_seen.setdefault((entry["operator"], entry["nonce"]), float(entry["at"]) + spent)
            elif isinstance(entry.get("command"), str) and type(entry.get("version")) is int and type(entry.get("force")) is bool:
                key = (entry["operator"], entry["nonce"], entry["command"], entry["version"], entry["force"])
                self._control_refused_seen[key] = float(entry["at"]) + spent
        # Whether the abandoned ranges changed since the region's recall topic (retained) last
        # announced them: a device serving an abandoned version fetches the release at once (an
        # operator's rollback reaches idle devices too, not only those that pull for training).
        self._recall_due = bool(self._abandoned)
        self._recall_release = self._release_version  # the release the last recall named (announce_releases)
        self._recall_next_at = -math.inf  # announce_releases: the next release announcement no sooner than this
        self._started = 0  # this start's stamp on the recall (ms; 0: none), set by start()
        self._pending_actions: list[CoordinatorAction] = []
        # Converting staleness policies: parked updates wait for the driver's conversion; a
        # device's later updates queue behind its parked one (applied in seq order).
        self._policy = policy_of(strategy)
        self._converting = needs_driver(self._policy)
        self._switch = SwitchTracker(config.conversion, dict(snapshot.conversion_state))
        self._parked: dict[int, _Parked] = {}
        self._tickets = tickets if tickets is not None else itertools.count(1)
        self._parked_devices: dict[str, list[BufferedUpdate]] = {}  # device -> updates queued behind its parked one
        self._view = ReadOnlyView(self)  # what strategies and peerings see: no mutators, read-only vectors
        self._applied_upto: dict[str, int] = dict(snapshot.applied_upto)
        self._accepted_upto: dict[str, int] = dict(snapshot.applied_upto)
        self._buffer: list[BufferedUpdate] = []
        self._first_buffered_at: float | None = None
        self._last_aggregation_at = float(snapshot.last_aggregation_at)
        self._devices: dict[str, None] = dict.fromkeys(snapshot.devices_seen)
        self._devices_committed = len(self._devices)  # the first ones are in the registry already
        # Presence (MQTT last will) and last seen, ordered by recency; bookkeeping only, never
        # an input to protocol decisions. device -> (online or None if unknown, last seen, version).
        # An OrderedDict: every message moves its device to the end and, past PRESENCE_LIMIT,
        # the oldest leaves from the front; a dict would make finding that oldest entry a scan
        # over the slots its earlier evictions left empty (at the limit: ~3.4 µs per message, against ~0.7).
        self._presence: OrderedDict[str, tuple[bool | None, float | None, int]] = OrderedDict()
        self._online: set[str] = set()
        self._deferred: dict[str, float] = {}
        self._invites: dict[str, int] = {}
        self._invites_served: dict[str, tuple[int, int]] = {}
        """Device -> (invite round, pull seq) of its invited pull last served, until its update is
        accepted: the same pull again is its retry (the model it was sent lost, e.g. with a broker
        restarted without persistence: helper-157), not a forged or replayed invitation."""
        self._invite_round = 0
        self._training: set[str] = set()
        """Devices served a training model since their last accepted update: with a strategy that
        selects its devices, the only ones whose update is taken (``not_selected`` otherwise)."""
        self._unpulled_grace: set[str] = set()
        """Devices whose one update after this core started was taken without a pull it served (``require_pull``)."""
        self._last_nonce: dict[str, tuple[int, int]] = {}
        # Devices whose last accepted seq came again with another nonce (another sender of that id:
        # a cloned device image), and how often; the second time the id is called a duplicate, once.
        self._seq_conflicts: dict[str, tuple[int, int]] = {}
        """Per id: (conflicts, the seq of the last one), the one longest ago first."""
        self._duplicate_ids: dict[str, None] = {}
        self._last_pull_seq: dict[str, int] = {}
        self._tokens: dict[str, tuple[float, float]] = {}
        self._rate_note: tuple[float, int] = (-math.inf, 0)
        """(when the last ``rate_limited`` notification went out, pulls dropped since)."""
        self._ahead: tuple[int, int, str] = (NO_EPOCH, NO_VERSION, "")
        """The newest (epoch, version) a pull or update said its device holds beyond this state
        dir's numbering, and that device: see :meth:`_note_ahead`."""
        self._ahead_note = -math.inf
        self._encoded: dict[tuple[Any, ...], bytes] = {}
        self._tensors: dict[tuple[int, str, str], EncodedTensor] = {}
        self._peer_pins: dict[str, bytes] = {}
        self._peer_heard: dict[str, float] = {}
        """When each peer's last accepted message arrived (``edgeci status``; silent peers)."""
        self._storage_ok = True
        self._storage_detail = ""
        # The decoder's cap follows the model: a full model plus header room, never more.
        self._max_bytes = min(config.max_message_bytes, 4 * config.spec.size + (1 << 20))
        self._wake_at: float | None = None
        self._inbox: tuple[str, str] | None = None
        """(device, its topics' prefix) of the last device message parsed (see _device_topic)."""
        self._status_dirty = False
        self._status_next_at = float("-inf")
        self._status_version = self._version
        self.counters: Counter[str] = Counter(snapshot.counters)
        self.staleness_hist: Counter[int] = Counter(snapshot.staleness_hist)
        self._strategy_changed: tuple[str, str] | None = None
        if snapshot.strategy_name not in (None, strategy.name):  # another strategy's state: not this one's to read
            self._strategy_changed = (str(snapshot.strategy_name), strategy.name)
        elif snapshot.strategy_state:
            strategy.restore_state(snapshot.strategy_state)  # before the pending updates go back into it
        self._arrays_note = strategy.restore_arrays(snapshot.strategy_arrays) if self._strategy_changed is None else None
        drawn = self._recorded_round(snapshot)
        block = drawn["round"] if drawn is not None else snapshot.round_devices if self._strategy_changed is None else None
        accepted, invites, invite_round = _round_devices(block)
        # A device still holding its invitation at the block had not pulled it (served, it is deleted):
        # only the record's own draw's invitees may have pulled since. The others, as on a live core,
        # pull first (their invitation is kept): a commit's block let in unpulled every device drawn
        # for a round that closed without it, however long ago (helper-180).
        since = drawn.get("invited_from", -1) if drawn is not None else None  # (-1: a record from before the field)
        pulled = {d for d, r in invites.items() if type(since) is int and r > since}
        drawn_at = moment(drawn.get("at")) if drawn is not None else None
        reported: set[str] = set()
        for u in sorted(snapshot.buffer, key=lambda u: (u.arrived_at, u.device, u.seq)):
            if u.seq <= self._applied_upto.get(u.device, -1):
                continue  # applied by the last commit; its file outlived the crash
            # A round device's report after the round's record; or, from a device the record did not list
            # (a late joiner admitted since), one that arrived after it (replayed before restore_round,
            # the round as drawn put it back among those the round still waits for).
            after = u.seq > accepted[u.device] if u.device in accepted else drawn_at is not None and u.arrived_at > drawn_at
            if after and drawn is not None:
                strategy.restore_round(drawn["state"])  # the round as drawn, before the reports it waited for
                drawn = None
            if after:
                reported.add(u.device)
            self._buffer_update(u)
            # Accepted after the commit the counters come from: counted then, lost with the process.
            # (Exact unless a converting policy kept an update parked across that commit.)
            self.counters["accepted"] += 1
            self.staleness_hist[min(u.staleness, STALENESS_HISTOGRAM_CAP)] += 1
            self.strategy.on_restore(self._view, self._as_applied(u))  # averaging strategies rebuild their fold
        if drawn is not None:
            strategy.restore_round(drawn["state"])
        # The round's devices not yet reported may send the update they were invited for (a selecting
        # strategy takes one only from a device in _training, and the set served was lost with the process).
        self._training.update(d for d in accepted if d not in reported and (d not in invites or d in pulled))
        self._invites.update((d, r) for d, r in invites.items() if d not in reported)
        self._invite_round = max(self._invite_round, invite_round)

    # ------------------------------------------------------------------ view (for strategies)

    @property
    def spec(self) -> ModelSpec:
        return self.config.spec

    @property
    def version(self) -> int:
        return self._version

    @property
    def weights(self) -> Vector:
        return self._weights

    @property
    def release(self) -> tuple[int, Vector]:
        """The release: the version (and weights) devices predict with."""
        return self._release_version, self._release_weights

    @property
    def buffer(self) -> Sequence[BufferedUpdate]:
        return tuple(self._buffer)

    @property
    def conversion_policy(self) -> str | None:
        """The converting staleness policy's name (a driver must run its conversions), else None."""
        return conversion_of(self._policy)

    @property
    def last_aggregation_at(self) -> float:
        return self._last_aggregation_at

    @property
    def first_buffered_at(self) -> float | None:
        return self._first_buffered_at

    @property
    def devices_seen(self) -> Sequence[str]:
        return tuple(self._devices)

    @property
    def deferred(self) -> Mapping[str, float]:
        """Read-only and live: FedBuff and HFedMS read it on every event, and a copy each time
        cost O(devices waiting) per message (20,000 distinct ids, one pull each: 0.49 ms a pull)."""
        return MappingProxyType(self._deferred)

    @property
    def applied_upto(self) -> Mapping[str, int]:
        return dict(self._applied_upto)

    def weights_at(self, version: int) -> Vector | None:
        return self._history.get(version)

    def abandoned(self, version: int) -> bool:
        """Whether a rollback abandoned ``version`` (an update trained from it is refused)."""
        ranges = self._abandoned
        i = bisect_right(ranges, version, key=lambda r: r[0])
        return i > 0 and version <= ranges[i - 1][1]

    def subscriptions(self) -> list[str]:
        r = self.config.region
        subs = [topics.device_filter(r, "pull"), topics.device_filter(r, "update"), topics.device_filter(r, "presence"),
                topics.control_topic(r)]
        if self.peering.name != "none":
            subs += [topics.peer_filter(self.config.coordinator_id), topics.peer_filter(BROADCAST)]
        return subs

    @property
    def last_full_version(self) -> int:
        return self._last_full_version

    def next_version_is_full(self) -> bool:
        """LASP: whether the next commit is a full sync, judged on the number it will get (above
        any version the registry skipped unread: ``_commit``), not on ``version + 1``."""
        t = self.config.full_sync_every
        return t == 0 or (self._newest() + 1) % t == 0

    def status(self) -> Status:
        c = self.counters
        heard = self.peers_heard()
        return Status(
            region=self.config.region,
            coordinator=self.config.coordinator_id,
            version=self._version,
            updates_accepted=c["accepted"],
            updates_rejected=c["rejected"],
            updates_duplicate=c["duplicate"],
            devices_seen=len(self._devices),
            buffered=len(self._buffer),
            strategy=self.strategy.name,
            extra={
                "model_id": self.config.spec.model_id,
                "pulls_served": c["pulls_served"],
                "pulls_deferred": c["pulls_deferred"],
                "messages_rejected": c["messages_rejected"],
                "aggregations": c["aggregations"],
                "bytes_in": c["bytes_in"],
                "bytes_out": c["bytes_out"],
                "rejected_by_reason": {k[7:]: v for k, v in c.items() if k.startswith("reject:")},
                "control_refused_by_reason": {k[16:]: v for k, v in c.items() if k.startswith("control_refused:")},
                "staleness_histogram": {str(k): v for k, v in sorted(self.staleness_hist.items())},
                "last_aggregation_at": self._last_aggregation_at,
                "strategy_params": self.strategy.describe(),
                "peering": self.peering.describe(),
                **({"peers_heard": heard} if heard else {}),
                "full_sync_every": self.config.full_sync_every,
                "last_full_version": self._last_full_version,
                **({"lasp_dropped_stale": c["lasp_dropped_stale"]} if self.config.full_sync_every or c["lasp_dropped_stale"] else {}),
                "release": self._release_version,
                "training_version": self._version,
                "pinned": self._pinned,
                "gate": None if self._gate is None else {
                    "margin": self._gate.config.margin,
                    "pending": sorted(self._gate.pending),
                    "promoted": c["gate_promoted"],
                    "held": c["gate_held"],
                    "rejected": c["gate_rejected"],
                    "rejected_devices": c["rejected_devices"],
                    "rolled_back_updates": c["rolled_back_updates"],
                    "abandoned": [list(r) for r in self._abandoned[-10:]],
                    "refused_abandoned_base": c["reject:base_rejected"],
                    "canary": self._canary_status(),
                },
                "recent_versions": self._gate_history[-10:],
                "control_refused": self._control_refused,
                **({"epoch": self._epoch} if self._epoch != NO_EPOCH else {}),
                **({"epoch_ahead": {"highest": self._ahead[0], "version": self._ahead[1], "device": self._ahead[2],
                                    "messages": c["epoch_ahead"]}} if self._ahead[2] else {}),
                "conversion": None if not self._converting else {
                    "policy": conversion_of(self._policy),
                    **self._switch.describe(self._version),
                    "parked": len(self._parked),
                    **{k: c[f"conversion_{k}"] for k in ("requested", "applied", "late", "failed", "no_base", "switched_off")},
                    "deferred": c["deferred_converting"],
                },
                "storage_ok": self._storage_ok,
                "deferred_storage": c["deferred_storage"],
                "storage_detail": self._storage_detail,
                "recovered_from": list(self._recovered_from),
                **self._presence_status(),
                "pulls_serving": c["pulls_serving"],
                "pulls_unchanged": c["pulls_unchanged"],
                "duplicate_devices": c["duplicate_device"],
                "signed": self.config.signer is not None,
                "signing_key": self.config.signer.kid if self.config.signer is not None else "",
            },
        )

    # ------------------------------------------------------------------ dispatch

    def start(self, now: float) -> list[CoordinatorAction]:
        """Announce status and re-arm timers after (re)start (and the recall, when there is
        one: a broker without persistence forgot the retained one); gate the newest version
        again if it is a candidate no decision was recorded for."""
        changed: list[CoordinatorAction] = []
        if self._peering_changed is not None:  # said once, at the start (the daemon logs it)
            was, now_name = self._peering_changed
            changed.append(Notify(kind="peering_changed", data={"was": was, "now": now_name}))
            self._peering_changed = None
        if self._strategy_changed is not None:  # said once, at the start (the daemon logs it)
            was, now_name = self._strategy_changed
            changed.append(Notify(kind="strategy_changed", data={"was": was, "now": now_name}))
            self._strategy_changed = None
        if self._arrays_note is not None:  # said once, at the start (the daemon logs it)
            changed.append(Notify(kind="strategy_state_lost", data={"detail": self._arrays_note}))
            self._arrays_note = None
        if self._floor_dropped is not None:  # said once, at the start (the daemon logs it)
            changed.append(Notify(kind="gate_floor_dropped", data=self._floor_dropped))
            self._floor_dropped = None
        if self._unrecorded_command is not None:  # (once: the record makes it durable)
            changed.append(RecordRelease(release=self._release_version, pinned=self._pinned, event=self._unrecorded_command,
                                         floor=self._gate.floor() if self._gate is not None else None))
            self._unrecorded_command = None
        if self._unrecorded_reject is not None and self._gate is not None:  # (once: the record makes it durable)
            rejected, through = self._unrecorded_reject
            self._unrecorded_reject = None
            changed.append(self._record(now, "reject", rejected, through=through, from_commit=True))
        changed += self._leave_abandoned_line(now)
        # A restart whose clock is behind the last process's (stepped back; a box without a battery-backed
        # clock before NTP): a restored time ahead of now held SPIN's π that much longer (a day behind:
        # a day; helper-153). Taken as now.
        self._last_aggregation_at = min(self._last_aggregation_at, now)
        if self._first_buffered_at is not None:
            self._first_buffered_at = min(self._first_buffered_at, now)
        if self.config.announce_start:  # (a rebuilt core starts again: it lost whom it deferred too)
            self._started = max(1, int(now * 1000))
        actions = [*changed, *self._after(now), *self._regate_newest(now)]
        rnd = self._canary_round  # opened or resumed by the regate, after _after armed the timer: its deadline's wake-up
        if rnd is not None and (self._wake_at is None or rnd.deadline < self._wake_at):
            self._wake_at = rnd.deadline
            actions.append(ScheduleTimer(at=rnd.deadline))
        return [*actions, self._status_action(now), *self._recall(now, force=True)]

    def _leave_abandoned_line(self, now: float) -> list[CoordinatorAction]:
        """The restored training line is a version a rollback abandoned (the rollback's commit was
        unreadable at the restart; its release record says so): back to the release, as a new version,
        as the rollback did. Not gated again: the gate (or the operator) decided on it already."""
        was = self._version
        if not self.abandoned(was) or self._release_version == was or self.abandoned(self._release_version):
            return []
        lineage = self._rejected_lineage(was)
        meta = {"source": "rollback", "of": self._release_version, "recovered": True,
                **({"rejected": lineage["version"]} if lineage is not None else {})}
        commit = self._replace_training_line(np.array(self._release_weights, copy=True), now, meta, abandon_from=was)
        return [commit, Notify(kind="abandoned_line", data={"version": was, "release": self._release_version, "now": commit.version})]

    def refresh_policy(self) -> None:
        """The strategy's staleness parameters changed (SIGHUP): judge stale updates by them from
        now on. Turning conversion on or off or changing its kind is a ConfigError (nothing
        changes): the driver's worker and the versions kept for it are set up at the start."""
        policy = policy_of(self.strategy)
        if conversion_of(policy) != conversion_of(self._policy):
            raise ConfigError(f"the staleness policy cannot change from {self._policy.name!r} to {policy.name!r} "
                              "while running (a converting policy is set up at the start): restart")
        self._policy = policy

    def reannounce(self, now: float) -> list[CoordinatorAction]:
        """The broker connection came back: the status (its last will may say ``alive: false``, a
        broker restarted without persistence forgot it) and the recall (retained), again now."""
        return [self._status_action(now), *self._recall(now, force=True)]

    def _regate_newest(self, now: float) -> list[CoordinatorAction]:
        """The restored training line's undecided candidate, to the gate (once storage works:
        a rejection commits a rollback). A rollback's own version (the release's weights) is not."""
        if self._regate is None or not self._storage_ok:
            return []
        version, self._regate = self._regate, None
        if (self._gate is None or version != self._version or version in self._gate.pending
                or np.array_equal(self._weights, self._release_weights)):
            return []
        self.counters["gate_resubmitted"] += 1
        return self._submit_candidate(self._gate, self._weights, self._regate_devices, now)

    def _submit_candidate(self, gate: Gate, weights: Vector, devices: tuple[str, ...], now: float) -> list[CoordinatorAction]:
        """The newest version, as a candidate: to the gate, to validation, to a canary round."""
        self._candidate_devices[self._version] = devices
        for old in gate.add_candidate(self._version, self._release_version, devices):
            self._candidate_devices.pop(old, None)
            self.counters["gate_superseded"] += 1
        actions: list[CoordinatorAction] = []
        if gate.config.validation:
            actions.append(EvaluateCandidate(version=self._version, weights=weights, release_version=self._release_version,
                                             release_weights=self._release_weights))
        return actions + self._canary_refresh(now)  # (a round whose candidate was just superseded ends)

    def _recall(self, now: float, *, force: bool = False) -> list[CoordinatorAction]:
        """Publish the abandoned ranges and the release (retained) when the ranges changed since the
        last recall, or ``force``; the next release announcement is then due ``release_announce_s`` on."""
        if not (self._abandoned or self._epoch != NO_EPOCH or self._started) or not (self._recall_due or force):
            return []
        self._recall_due = False
        self._recall_release = self._release_version
        self._recall_next_at = now + self.config.release_announce_s
        flat = tuple(v for r in self._abandoned[-MAX_RECALL_RANGES:] for v in r)
        topic = topics.recall_topic(self.config.region)
        msg = Recall(model_id=self.config.spec.model_id, release=self._release_version, abandoned=flat, epoch=self._epoch,
                     started=self._started, spread_s=self.config.release_spread_s)
        return [self._publish(topic, encode(msg, signer=self.config.signer, scope=topics.signing_scope(topic)), retain=True)]

    def handle(self, event: CoordinatorEvent) -> list[CoordinatorAction]:
        if isinstance(event, MessageReceived):
            actions = self._on_message(event)
        elif isinstance(event, StorageChanged):
            actions = []
            if event.ok != self._storage_ok:
                self._storage_ok, self._storage_detail = event.ok, "" if event.ok else event.detail[:200]
                self.counters["storage_failures" if not event.ok else "storage_recoveries"] += 1
                self._status_dirty = True
                actions.append(Notify(kind="storage", data={"ok": event.ok, "detail": event.detail[:200]}))
                actions += self._regate_newest(event.now)
        elif isinstance(event, TimerFired):
            # The driver's timer is consumed: re-arm whatever is still pending, even if the
            # wake-up came a little early (monotonic vs wall clock) and the time is unchanged.
            self._wake_at = None
            actions = []
        elif isinstance(event, CandidateEvaluated):
            actions = self._on_evaluated(event)
        elif isinstance(event, VersionLoaded):
            actions = self._on_version_loaded(event)
        elif isinstance(event, UpdateConverted):
            actions = self._on_converted(event)
        else:
            raise LocalProtocolError(f"CoordinatorCore cannot handle {type(event).__name__}")
        now = event.now
        if self._parked:
            actions += self._expire_conversions(now)
        if self._canary_round is not None:
            actions += self._canary_expire(now)
        elif isinstance(event, TimerFired) and self._gate is not None and self._gate.config.canary is not None:
            actions += self._canary_start(now)  # e.g. no device was recent enough at the last commit
        if self._status_dirty and (now >= self._status_next_at or self._version != self._status_version):
            actions.append(self._status_action(now))  # a new version is announced at once
        actions += self._after(now)
        if self._pending_actions:  # evaluations and release records asked for by commits
            actions += self._pending_actions
            self._pending_actions = []
        if self._status_dirty and (self._version != self._status_version):
            actions.append(self._status_action(now))
        # After the commit that abandoned them, or (announce_releases) one that set a release the last recall did not name.
        if self._recall_due or (self.config.announce_releases and self._release_version != self._recall_release
                                and now >= self._recall_next_at):
            actions += self._recall(now, force=True)
        return actions

    # ------------------------------------------------------------------ messages

    def _on_message(self, ev: MessageReceived) -> list[CoordinatorAction]:
        self.counters["bytes_in"] += len(ev.payload)
        device: str | None = None
        seq: int | None = None
        leaf = ""
        try:
            parsed = topics.parse(ev.topic)
            if parsed.kind == "peer":
                return self._on_peer(ev)
            if parsed.kind == "control" and parsed.region == self.config.region:
                return self._on_control(ev)
            if parsed.kind != "device" or parsed.region != self.config.region:
                raise TopicMismatch(f"not one of this region's device topics: {ev.topic[:120]!r}")
            leaf = parsed.leaf
            device = parsed.device  # the topic names it (parse validated the id): a rejection says whose message it was
            if leaf == "presence":
                if (ev.payload and parsed.device not in self._devices and parsed.device not in self._presence
                        and len(self._devices) >= self.config.max_devices):
                    # An id refused for room is not "seen" by its presence either (a row in the status,
                    # online, eligible for a canary cohort): the pull and update caps, on the will topic.
                    raise TooManyDevices(f"already tracking {len(self._devices)} devices")
                return self._on_presence(parsed.device, ev.payload, ev.now)
            msg = decode(ev.payload, max_bytes=self._max_bytes)
            # The topic's prefix names this device in this region: parse validated both ids
            # in this very string, so replies to the device reuse it (see _device_topic).
            self._inbox = (parsed.device, ev.topic[: len(ev.topic) - len(leaf)])
            if isinstance(msg, _SEQUENCED):
                seq = msg.seq
            if device not in self._devices and len(self._devices) >= self.config.max_devices:
                # Before _track: an id refused for room is not "seen" (it took a presence row from a
                # tracked device, showed in the status and could be drawn into a canary cohort).
                raise TooManyDevices(f"already tracking {len(self._devices)} devices")
            if isinstance(msg, Update) and device not in self._accepted_upto and len(self._accepted_upto) >= self.config.max_devices:
                # The pull cap counts devices that pulled: an id that only pushes leaves a watermark
                # (and a nonce) for good, so the watermarks are capped on their own; before _track too.
                raise TooManyDevices(f"already holding watermarks for {len(self._accepted_upto)} devices")
            self._track(device, None, ev.now)  # seen: alive, whatever it sent
            actions = self._dispatch(parsed.device, leaf, msg, ev.now)
            self._track_version(parsed.device, msg)  # the version it says it runs: only from a message we took
            return actions
        except RemoteProtocolError as exc:
            return self._reject(exc, leaf, device, seq, ev.now)

    def _dispatch(self, device: str, leaf: str, msg: Message, now: float) -> list[CoordinatorAction]:
        if getattr(msg, "device", device) != device:
            raise TopicMismatch(f"message claims device {getattr(msg, 'device', '')!r} on the topic of {device!r}")
        if leaf == "pull" and isinstance(msg, Pull):
            return self._on_pull(msg, now)
        if leaf == "update" and isinstance(msg, Update):
            return self._on_update(msg, now)
        if leaf == "update" and isinstance(msg, CanaryReport):
            return self._on_canary_report(msg, now)
        raise TopicMismatch(f"a {msg.TYPE} message does not belong on the {leaf!r} topic")

    def _reject(self, exc: RemoteProtocolError, leaf: str, device: str | None, seq: int | None, now: float) -> list[CoordinatorAction]:
        self.counters["rejected" if leaf == "update" else "messages_rejected"] += 1
        self.counters[f"reject:{exc.reason}"] += 1
        self._status_dirty = True
        if isinstance(exc, RateLimited):  # a flood must not turn into a flood of notifications: one a minute
            at, dropped = self._rate_note
            if now - at < RATE_NOTE_EVERY_S:
                self._rate_note = (at, dropped + 1)
                return []
            self._rate_note = (now, 0)
            return [Notify(kind="rate_limited", data={"device": device, "detail": str(exc)[:200], "dropped_before": dropped})]
        actions: list[CoordinatorAction] = [
            Notify(kind="rejected", data={"reason": exc.reason, "detail": str(exc)[:200], "device": device})
        ]
        if device is not None and seq is not None and leaf in ("update", "pull"):
            # A refused pull is answered too (helper-92): a device asking for another model (its
            # task is not this region's) or with a bad field otherwise only timed out and retried,
            # its app unable to tell "wrong region or model" from "coordinator down".
            ack = Ack(device=device, seq=seq, status="rejected", version=self._version, reason=exc.reason)
            actions.append(self._publish(topics.device_topic(self.config.region, device, "ack"), encode(ack)))
        return actions

    def _on_presence(self, device: str, payload: bytes, now: float) -> list[CoordinatorAction]:
        """A device's retained ``online`` / ``offline`` (its last will); empty clears it."""
        if payload not in (b"online", b"offline", b""):
            raise MalformedMessage(f"presence must be 'online' or 'offline', got {payload[:20]!r}")
        if payload == b"":
            self._presence.pop(device, None)
            if device in self._online:
                self._online.discard(device)
                self._status_dirty = True
            return []
        online = payload == b"online"
        if online != (device in self._online):
            self._status_dirty = True
        # Presence is retained: a coordinator that (re)starts or reconnects gets every device's
        # last one again, which says nothing of when the device was last seen. Only a *change*
        # of a device already known here is a sighting (it connected, or its will fired); a new
        # device's last seen stays unknown until it sends something, and a repeat changes
        # nothing (a restart showed every stopped device "seen" at that moment; a reconnect did too).
        entry = self._presence.get(device)
        if entry is None:
            self._track(device, online, None)
        elif entry[0] != online:
            self._track(device, online, now)
        return []

    def _track_version(self, device: str, msg: Message) -> None:
        """The version an accepted pull or update says the device runs (in place: no reordering)."""
        if isinstance(msg, Pull) and msg.have_version != NO_VERSION:
            version = self._held(msg)  # (none for another numbering's)
        elif isinstance(msg, Update):
            version = msg.base_version
        else:
            return
        entry = self._presence.get(device)
        if entry is not None and entry[2] != version:
            self._presence[device] = (entry[0], entry[1], version)

    def _track(self, device: str, online: bool | None, now: float | None) -> None:
        """Presence bookkeeping: online flag (None keeps it), last seen (None: not known) and the
        version it runs (:meth:`_track_version`)."""
        old_online, _, version = self._presence.pop(device, (None, None, NO_VERSION))
        flag = old_online if online is None else online
        self._presence[device] = (flag, now, version)
        if flag:
            self._online.add(device)
        else:
            self._online.discard(device)
        while len(self._presence) > PRESENCE_LIMIT:
            oldest, _ = self._presence.popitem(last=False)
            self._online.discard(oldest)

    @property
    def presence(self) -> Mapping[str, tuple[bool | None, float | None, int]]:
        """``{device: (online or None, last seen or None when unknown, version it runs or -1)}``,
        least recent first."""
        return dict(self._presence)

    def _presence_status(self) -> dict[str, Any]:
        recent: list[dict[str, Any]] = []
        for device, (online, seen, version) in reversed(self._presence.items()):
            if len(recent) >= RECENT_DEVICES:
                break
            recent.append({"id": device, "online": online, "last_seen": seen, "version": version})
        return {"devices_online": len(self._online), "devices_tracked": len(self._presence), "devices": recent}

    def _see(self, device: str) -> None:
        if device not in self._devices:
            self._devices[device] = None
            self._status_dirty = True

    def _take_token(self, device: str, now: float) -> None:
        """Per-device token bucket for replies; raises ``RateLimited`` when it is empty."""
        cfg = self.config
        tokens, last = self._tokens.get(device, (cfg.pull_burst, now))
        tokens = pull_tokens(tokens, last, now, cfg.pull_burst, cfg.pull_refill_s)
        if tokens < 1.0:
            self._tokens[device] = (tokens, now)
            raise RateLimited(f"{device} pulls faster than one per {cfg.pull_refill_s} s")
        self._tokens[device] = (tokens - 1.0, now)

    def _on_pull(self, msg: Pull, now: float) -> list[CoordinatorAction]:
        if msg.model_id != self.config.spec.model_id:
            raise UnknownModel(f"this coordinator serves {self.config.spec.model_id!r}, not {msg.model_id!r}")
        ref = self._accepted_upto.get(msg.device, self._last_pull_seq.get(msg.device))
        if ref is not None and msg.seq > ref + self.config.max_seq_jump:
            raise SeqJump(f"pull seq {msg.seq} is more than {self.config.max_seq_jump} above {ref}")
        invited = msg.invite_round >= 0 and self._invites.get(msg.device) == msg.invite_round
        if not (invited and not msg.serve and msg.canary == NO_VERSION):
            # An invitation this coordinator sent is answered whatever the bucket: the deferred pull
            # before it took a token moments ago, and it is deleted once served (one pull per invite).
            self._take_token(msg.device, now)
        self._see(msg.device)
        self._last_pull_seq[msg.device] = max(self._last_pull_seq.get(msg.device, -1), msg.seq)
        ahead = self._note_ahead(msg.device, msg.epoch, msg.have_version, now) if msg.epoch > self._epoch or (
            msg.have_version > self._version and msg.have_version > self._version_floor
            and msg.epoch == self._epoch) else []  # (an SDK from before epochs, 0: new-epoch would not help it)
        if msg.canary != NO_VERSION:
            return [self._canary_fetch(msg)]
        if msg.serve:
            self.counters["pulls_serving"] += 1
            return [*ahead, self._model_reply(msg.device, msg.seq, FULL, self._held(msg), serve=True)]
        if msg.invite_round >= 0 and not invited and self._invites_served.get(msg.device) != (msg.invite_round, msg.seq):
            self.counters["invite_unknown"] += 1  # forged, replayed or from before a restart
        if invited or self.strategy.serve_pull(self._view, msg.device, now):
            if invited:
                del self._invites[msg.device]
                self._invites_served[msg.device] = (msg.invite_round, msg.seq)
            self._deferred.pop(msg.device, None)
            self._training.add(msg.device)
            self.counters["pulls_served"] += 1
            have = self._held(msg)
            return [*ahead, self._model_reply(msg.device, msg.seq, self._group_for(have), have)]
        self._deferred[msg.device] = now
        self.counters["pulls_deferred"] += 1
        ack = Ack(device=msg.device, seq=msg.seq, status="deferred", version=self._version)
        return [*ahead, self._publish(self._device_topic(msg.device, "ack"), encode(ack))]

    def _unpulled_ok(self, msg: Update) -> bool:
        """Whether a strategy that does not select takes an update whose device it served no
        training model since its last accepted one: always, unless ``require_pull``; then only the
        device's first accepted since this core started, trained from a version above 0 and up to
        the one it started at (one in flight across a restart: the served set is not kept). The
        grace is used up when that update is accepted, not when it passes this check: one deferred
        (storage, a conversion) or refused by a later check may come again."""
        if not self.config.require_pull:
            return True
        # (a core started at version 0 had nothing to train from before it)
        return 0 < msg.base_version <= self._started_version and msg.device not in self._unpulled_grace

    def _newest(self) -> int:
        """The newest version number this state dir has given out (an unreadable one included)."""
        return max(self._version, self._version_floor)

    def _note_ahead(self, device: str, epoch: int, version: int, now: float) -> list[CoordinatorAction]:
        """A device holds a numbering ahead of this state dir: a newer epoch (it refuses every model
        of this one, ``epoch_older``), or a version of this epoch above any this dir gave out (it
        waits for a version above it, ``model_older``). The state dir was restored from a backup,
        another coordinator of the region ran on another state dir with this signing key, or this
        host's clock was behind when the dir was made; ``edgeci new-epoch`` starts a numbering above
        it. Counted, in the status, and a notification at most once a minute (a device's claim is
        not signed: it is reported, never acted on)."""
        self.counters["epoch_ahead"] += 1
        if (epoch, version) > self._ahead[:2]:
            self._ahead = (epoch, version, device)
            self._status_dirty = True
        if now - self._ahead_note < RATE_NOTE_EVERY_S:
            return []
        self._ahead_note = now
        return [Notify(kind="epoch_ahead", data={"device": device, "epoch": epoch, "version": version,
                                                 "highest": self._ahead[0], "highest_version": self._ahead[1],
                                                 "own": self._epoch, "own_version": self._newest(),
                                                 "count": self.counters["epoch_ahead"]})]

    def _held(self, msg: Pull) -> int:
        """The version the pulling device holds, in this coordinator's numbering: none for a
        version of another epoch (a device that has not heard of this state dir's reset yet).
        A pull without one comes from an SDK that predates epochs: taken as before."""
        return msg.have_version if msg.epoch == self._epoch or msg.epoch == NO_EPOCH else NO_VERSION

    def _group_for(self, have_version: int) -> str:
        """LASP: a device already holding the current extractor gets only the partial group — in a
        full-sync round too: it trains the whole model (``_train_group``) from the extractor it
        holds and the head it is sent (the whole vector went down again there: 0.280× instead of
        0.219× the bytes of full rounds for digits, benchmarks/lasp_bytes.py --coordinator)."""
        if not self.config.full_sync_every:
            return FULL
        if have_version < self._last_full_version or have_version > self._version:
            return FULL
        return self.config.partial_group

    def _predates_extractor(self, group: str, base_version: int, full: bool) -> bool:
        """LASP: whether an update trained from ``base_version`` would put a head fit to an
        extractor that a full sync has replaced since onto the new one: a group's slice (a
        head) always, a whole model at a partial version (``full`` False: only its head is
        taken). A whole model at a full version is merged whole (its extractor comes with it).
        Without LASP too (T = 0: every version is a full sync): a head a device was told to
        train before a restart that switched LASP off is still one group's slice. A base above
        the current version (only in a buffer restored past versions the registry could not
        read; _on_update refuses one) was fit to an extractor this coordinator no longer knows."""
        return (base_version < self._last_full_version or base_version > self._version) and (group != FULL or not full)

    def _train_group(self) -> str:
        """LASP: between full syncs devices train (and send) only the partial group."""
        if not self.config.full_sync_every or self.next_version_is_full():
            return FULL
        return self.config.partial_group

    def _model_reply(
        self, device: str, reply_to: int, group: str = FULL, have_version: int = NO_VERSION, *, serve: bool = False,
        candidate: tuple[int, Vector] | None = None,
    ) -> Publish:
        """The signed model reply: the training line for training pulls, the release for
        serving pulls. It carries ``reply_to = -1`` ("answers your pull"), so the same bytes
        serve every device that asks for this (version, group, hints): encoded, hashed and
        signed once, then only published; devices never accept a reply older than what they
        hold."""
        cfg = self.config
        version, weights = (self._release_version, self._release_weights) if serve else (self._version, self._weights)
        if candidate is not None:  # a canary fetch: the candidate under evaluation
            version, weights = candidate
        if serve:
            group = FULL
        if have_version == version:
            group = UNCHANGED  # the device holds this very version: no weights need to travel (nor its head)
            self.counters["pulls_unchanged"] += 1
        hints = {**cfg.hints, **self.peering.hints_for(device)}  # e.g. Spyker's per-device lr decay
        train_group = self._train_group()
        # LASP: a part names the full sync whose extractor it goes onto (every version from it to
        # this one has that extractor: _group_for sends a part only to a device holding one of them)
        full_sync = self._last_full_version if group not in (FULL, UNCHANGED) else NO_VERSION
        key = (version, self._release_version, group, train_group, full_sync, cfg.encoding, tuple(sorted(hints.items())))
        payload = self._encoded.get(key)
        if payload is None:
            msg = ModelMsg(
                model_id=cfg.spec.model_id,
                version=version,
                reply_to=NO_VERSION,
                weights=_NO_WEIGHTS if group == UNCHANGED else weights[cfg.spec.group_slice(group)],
                group=group,
                train_group=train_group,
                spec_fingerprint=cfg.spec.fingerprint,
                hints=hints,
                release=self._release_version,
                epoch=self._epoch,
                full_sync=full_sync,
            )
            tail = self._tensors.get((version, group, cfg.encoding))
            if tail is None:  # one encoding + digest per (version, group, encoding)
                tail = EncodedTensor.of(msg.weights, cfg.encoding)
                self._tensors[(version, group, cfg.encoding)] = tail
            payload = encode_spliced(msg, tail, signer=cfg.signer, scope=topics.device_scope(cfg.region, "model"))
            if len(self._encoded) >= 64:  # per-device hints could grow it: keep it bounded
                self._encoded.clear()
            self._encoded[key] = payload
        return self._publish(self._device_topic(device, "model"), payload)

    def _on_update(self, msg: Update, now: float) -> list[CoordinatorAction]:
        cfg = self.config
        ack_topic = self._device_topic(msg.device, "ack")
        if msg.model_id != cfg.spec.model_id:
            raise UnknownModel(f"this coordinator serves {cfg.spec.model_id!r}, not {msg.model_id!r}")
        watermark = self._accepted_upto.get(msg.device, NO_VERSION)  # (capped in _on_message)
        if msg.seq <= watermark:
            self.counters["duplicate"] += 1
            self._status_dirty = True
            seq_nonce = self._last_nonce.get(msg.device)
            nonce = seq_nonce[1] if seq_nonce is not None and seq_nonce[0] == msg.seq else 0
            ack = Ack(device=msg.device, seq=msg.seq, status="duplicate", version=self._version, nonce=nonce, watermark=watermark)
            return [*self._seq_conflict(msg, nonce), self._publish(ack_topic, encode(ack))]
        ref = watermark if watermark != NO_VERSION else self._last_pull_seq.get(msg.device)
        if ref is not None and msg.seq > ref + cfg.max_seq_jump:
            raise SeqJump(f"update seq {msg.seq} is more than {cfg.max_seq_jump} above {ref}")
        if msg.n_samples > cfg.max_samples_per_update:
            raise TooManySamples(f"{msg.n_samples} samples claimed; the cap is {cfg.max_samples_per_update}")
        if msg.epoch != self._epoch and msg.epoch != NO_EPOCH:  # (none: an SDK from before epochs, judged as before)
            if msg.epoch > self._epoch:
                self._pending_actions += self._note_ahead(msg.device, msg.epoch, msg.base_version, now)
            raise RejectedBase(f"trained from version {msg.base_version} of epoch {msg.epoch}; this coordinator numbers in "
                               f"epoch {self._epoch} (another numbering: a new state dir, or edgeci new-epoch): train from {self._version}")
        if msg.base_version > self._version:
            if msg.base_version > self._newest() and msg.epoch == self._epoch:  # (not an SDK from before epochs)
                self._pending_actions += self._note_ahead(msg.device, msg.epoch, msg.base_version, now)
            raise UnknownVersion(f"base version {msg.base_version} is newer than current {self._version}")
        if self._abandoned and self.abandoned(msg.base_version):
            raise RejectedBase(f"base version {msg.base_version} was abandoned by a rollback; train from {self._version}")
        if msg.device not in self._training and (self.strategy.selects() or not self._unpulled_ok(msg)):
            # A device never drawn (or past its one update per invitation) would otherwise fill
            # the buffer on its own: FedBuff's K updates, FedAvg's round, all of one sender.
            raise NotSelected(f"{msg.device} was not served a training model by {self.strategy.name}'s selection "
                              "since its last accepted update")
        cfg.spec.check_update(msg.weights, msg.group)
        if cfg.full_sync_every and msg.group not in (FULL, cfg.partial_group):
            # LASP slices every buffered update to the partial group at a partial version: another
            # group's slice (an extractor-only update) sliced to nothing, and FedAsync, Nebula and
            # Spyker raised out of handle() on it (a core rebuild per message), SPIN committed it.
            raise ShapeMismatch(f"LASP takes the whole model or the {cfg.partial_group!r} group, not {msg.group!r}")
        if self._predates_extractor(msg.group, msg.base_version, self.next_version_is_full()):
            # Its head was fit to the extractor before the last full sync: applied to the new one it
            # is another model's head (helper-116's probe: T = 2, SPIN k = 1, the head became all 9s).
            # A whole model too, at a partial version: only its head would be taken (helper-127's
            # probe, a straggler of a full sync others completed first: the same 9s). At a full
            # version it is merged whole, a stale update like any other (its extractor comes with it).
            what = f"a {msg.group!r} update" if msg.group != FULL else "at a partial version, a whole model"
            raise RejectedBase(f"{what} trained from version {msg.base_version}, before the extractor of "
                               f"full sync {self._last_full_version}: train again from {self._version}")
        if cfg.full_sync_every and msg.group != FULL and self.next_version_is_full():
            # A head trained for a partial version that closed without it (a straggler): the version
            # it would now go into is a full sync, whose whole models replace the extractor it was
            # fit to (_aggregate leaves it out beside them). Refused here instead of accepted and
            # dropped, so that the device trains its samples again, the whole model, for the sync.
            raise RejectedBase(f"a {msg.group!r} update at a full sync: train the whole model from {self._version}")
        if not self._storage_ok:
            self.counters["deferred_storage"] += 1
            self._status_dirty = True
            ack = Ack(device=msg.device, seq=msg.seq, status="deferred", version=self._version, reason="storage")
            return [self._publish(ack_topic, encode(ack))]
        queued = self._parked_devices.get(msg.device)
        if queued is not None and len(queued) >= cfg.conversion.max_queued:
            # Behind a conversion a device's updates wait in memory: a bounded few, then "retry later".
            self.counters["deferred_converting"] += 1
            self._status_dirty = True
            ack = Ack(device=msg.device, seq=msg.seq, status="deferred", version=self._version, reason="converting")
            return [self._publish(ack_topic, encode(ack))]
        update = BufferedUpdate(
            device=msg.device,
            seq=msg.seq,
            base_version=msg.base_version,
            staleness=self._version - msg.base_version,
            n_samples=msg.n_samples,
            weights=msg.weights,
            group=msg.group,
            arrived_at=now,
            loss=msg.loss,
            nonce=msg.nonce,
        )
        self.counters["accepted"] += 1
        if msg.device not in self._training and self.config.require_pull:
            self._unpulled_grace.add(msg.device)  # (taken by _unpulled_ok's restart grace)
        self._training.discard(msg.device)
        self._invites_served.pop(msg.device, None)
        self.staleness_hist[min(update.staleness, STALENESS_HISTOGRAM_CAP)] += 1
        actions: list[CoordinatorAction] = [PersistUpdate(update=update)]
        if self._converting:
            actions += self._admit(update, now)
        else:
            self._buffer_update(update)
            self.strategy.on_update(self._view, self._as_applied(update), now)
        # The nonce echoed: a device that holds the id's session while another one's update is accepted
        # under the same seq (two devices on one id) cannot take that ack for its own update.
        ack = Ack(device=msg.device, seq=msg.seq, status="accepted", version=self._version, nonce=msg.nonce)
        return [*actions, self._publish(ack_topic, encode(ack))]

    def _seq_conflict(self, msg: Update, accepted_nonce: int) -> list[CoordinatorAction]:
        """An update under the seq last accepted from its device, with another nonce: another sender of
        that id (or a reinstall, once). The second time for one id it is called a duplicate device:
        counted (``duplicate_device``) and said once (``Notify(duplicate_device)``); nothing else changes
        (the ack is the ``duplicate`` it was: the sender moves past the watermark with its weights)."""
        if accepted_nonce in (0, msg.nonce) or msg.nonce == 0 or msg.device in self._duplicate_ids:
            return []
        count, last = self._seq_conflicts.pop(msg.device, (0, msg.seq))
        seen = 1 if msg.seq - last > DUPLICATE_QUIET_SEQS else count + 1  # a lone conflict long ago: forgotten
        if seen < DUPLICATE_DEVICE_CONFLICTS:
            if len(self._seq_conflicts) >= MAX_SEQ_CONFLICT_IDS:  # (bounded: the oldest goes, new ids still count)
                del self._seq_conflicts[next(iter(self._seq_conflicts))]
            self._seq_conflicts[msg.device] = (seen, msg.seq)
            return []
        if len(self._duplicate_ids) >= MAX_SEQ_CONFLICT_IDS:
            del self._duplicate_ids[next(iter(self._duplicate_ids))]
        self._duplicate_ids[msg.device] = None
        self.counters["duplicate_device"] += 1
        self._status_dirty = True
        return [Notify(kind="duplicate_device", data={"device": msg.device, "seq": msg.seq})]

    def _buffer_update(self, update: BufferedUpdate) -> None:
        if not self._buffer:
            self._first_buffered_at = update.arrived_at
        self._buffer.append(update)
        self._note_accepted(update)

    def _note_accepted(self, update: BufferedUpdate) -> None:
        self._status_dirty = True
        if update.seq > self._accepted_upto.get(update.device, -1):
            self._accepted_upto[update.device] = update.seq
            self._last_nonce[update.device] = (update.seq, update.nonce)

    # ------------------------------------------------------------------ converting stale updates

    def _admit(self, update: BufferedUpdate, now: float) -> list[CoordinatorAction]:
        """A converting staleness policy is on: buffer the update, converting it first when
        the policy says so. A device's updates stay in seq order behind a parked one."""
        self._note_accepted(update)
        if update.group == FULL and self._switch.tracking(update.device):
            base = self._history.get(update.base_version)
            if base is not None:  # the device's true change: evidence for the switch back
                delta = np.subtract(update.weights, base, dtype=np.float32)
                self._switch.observe(update.device, update.base_version, delta, self._version)
        queue = self._parked_devices.get(update.device)
        if queue is not None:
            queue.append(update)
            return []
        return self._convert_or_buffer(update, now)

    def _convert_or_buffer(self, update: BufferedUpdate, now: float) -> list[CoordinatorAction]:
        verdict = self._policy.judge(update.staleness)
        cc = self.config.conversion
        if isinstance(verdict, Convert) and update.group == FULL:
            base = self._history.get(update.base_version)
            if not self._switch.converting(self._version):
                self.counters["conversion_switched_off"] += 1
            elif base is None:
                self.counters["conversion_no_base"] += 1  # keep_versions too small for this staleness
            elif verdict.kind == "dc-asgd":
                lr = float(self.config.hints.get("lr", cc.default_lr))
                weights = dc_asgd(update.weights, base, self._weights, lr=lr, lam=cc.dc_lambda)
                if self._admissible(weights):
                    self.counters["conversion_applied"] += 1
                    update = self._as_fresh(update, weights, self._version, now)
                else:
                    self.counters["conversion_failed"] += 1
            else:
                ticket = next(self._tickets)
                parked = _Parked(update=update, deadline=now + cc.deadline_s, base=base,
                                 target_version=self._version, target=self._weights)
                self._parked[ticket] = parked
                self._parked_devices[update.device] = []
                self.counters["conversion_requested"] += 1
                self._status_dirty = True
                return [ConvertUpdate(
                    ticket=ticket, device=update.device, kind=verdict.kind, stale_weights=update.weights,
                    base_version=update.base_version, base_weights=base, target_version=self._version,
                    target_weights=self._weights, n_samples=update.n_samples, staleness=update.staleness,
                    hints=dict(self.config.hints), deadline=parked.deadline,
                )]
        self._buffer_update(update)
        self.strategy.on_update(self._view, self._as_applied(update), now)
        return []

    def _admissible(self, weights: Vector) -> bool:
        """A conversion's weights pass what a device's must (its shape, finite, a norm of at most
        MAX_UPDATE_NORM): DC-ASGD's Δ⊙Δ term made 1.8e30 of an admissible change of 9.9e14."""
        try:
            self.config.spec.check_update(weights)
        except RemoteProtocolError:  # ShapeMismatch, NonFiniteWeights, WeightsOutOfRange
            return False
        return True

    def _as_fresh(self, update: BufferedUpdate, weights: Vector, target_version: int, now: float) -> BufferedUpdate:
        return BufferedUpdate(
            device=update.device, seq=update.seq, base_version=target_version,
            staleness=self._version - target_version, n_samples=update.n_samples, weights=weights,
            group=FULL, arrived_at=now, loss=update.loss, nonce=update.nonce,
        )

    def _on_converted(self, ev: UpdateConverted) -> list[CoordinatorAction]:
        parked = self._parked.pop(ev.ticket, None)
        if parked is None:  # past its deadline (fallen back already), or abandoned by a rollback
            self.counters["conversion_late_answers"] += 1
            return []
        update = parked.update
        w = ev.weights
        if isinstance(w, np.ndarray) and self._admissible(w):
            estimate = np.subtract(w, parked.target, dtype=np.float32)
            stale_delta = np.subtract(update.weights, parked.base, dtype=np.float32)
            self._switch.record(update.device, parked.target_version, estimate, stale_delta)
            merged = parked.target + self._switch.blend(estimate, stale_delta, self._version)
            self.counters["conversion_applied"] += 1
            update = self._as_fresh(update, merged.astype(np.float32, copy=False), parked.target_version, ev.now)
        else:
            self.counters["conversion_failed"] += 1
        return self._release_device(update, ev.now)

    def _release_device(self, update: BufferedUpdate, now: float) -> list[CoordinatorAction]:
        """Buffer a device's (converted or fallen-back) update and the ones queued behind it."""
        queue = self._parked_devices.pop(update.device, [])
        self._buffer_update(update)
        self.strategy.on_update(self._view, update, now)
        actions: list[CoordinatorAction] = []
        while queue:
            actions += self._convert_or_buffer(queue.pop(0), now)
            if update.device in self._parked_devices:  # parked again: the rest waits behind it
                self._parked_devices[update.device].extend(queue)
                break
        return actions

    def _expire_conversions(self, now: float) -> list[CoordinatorAction]:
        actions: list[CoordinatorAction] = []
        for ticket in [t for t, p in self._parked.items() if p.deadline <= now]:
            parked = self._parked.pop(ticket)
            self.counters["conversion_late"] += 1  # the damped fallback applies (staleness_factor)
            actions += self._release_device(parked.update, now)
        return actions

    def _abandon_conversions(self) -> None:
        """A rollback consumes the buffer: parked and queued updates go with it, unconverted."""
        for parked in self._parked.values():
            self._buffer.append(parked.update)
        for queue in self._parked_devices.values():
            self._buffer.extend(queue)
        self._parked.clear()
        self._parked_devices.clear()

    # ------------------------------------------------------------------ planning

    def _after(self, now: float) -> list[CoordinatorAction]:
        actions: list[CoordinatorAction] = []
        peer_wake = self.peering.wake_at()
        if peer_wake is not None and now >= peer_wake:
            actions += self._run_peer_plan(self.peering.on_timer(self._view, now), now)
        invites_at: int | None = None  # where this event's first invitation is: its round's record goes before it
        numbered = self._invite_round  # the invitations numbered above it are this draw's
        for _ in range(4):  # an aggregation may enable another decision (e.g. new invites)
            plan: Plan = self.strategy.plan(self._view, now, self._rng)
            if plan.invite and invites_at is None:
                invites_at = len(actions)
            aggregated = plan.aggregate and bool(self._buffer)
            if aggregated:
                commit = self._aggregate(now)
                peer_plan = self.peering.on_version(self._view, now)
                # The version's checkpoint is the peering's state once on_version has counted it
                # (HierFAVG's edge round, Spyker's age under another strategy): taken before, a
                # restart resumed one version behind, and a cloud round due at it never started.
                state = self.peering.checkpoint()
                if state != commit.metadata["peering"]:
                    commit = dataclasses.replace(commit, metadata={**commit.metadata, "peering": state})
                actions.append(commit)
                actions += self._run_peer_plan(peer_plan, now)
            for device in plan.invite:
                actions.extend(self._invite(device))
            if not aggregated and not plan.invite:
                status_due = self._status_next_at if self._status_dirty and self._status_next_at > now else None
                conversion_due = min((p.deadline for p in self._parked.values()), default=None) if self._parked else None
                canary_due = self._canary_round.deadline if self._canary_round is not None else self._canary_retry_at
                announce_due = self._recall_next_at if (self.config.announce_releases and self._recall_next_at > now
                                                        and self._release_version != self._recall_release) else None
                # The earliest of those that are set (min() of them, written out: no list, no call per event)
                wake = plan.wake_at
                for t in (self.peering.wake_at(), status_due, conversion_due, canary_due, announce_due):
                    if t is not None and (wake is None or t < wake):
                        wake = t
                if wake != self._wake_at:
                    self._wake_at = wake
                    if wake is not None:
                        actions.append(ScheduleTimer(at=wake))
                break
        if invites_at is not None:  # (a strategy without round state too: the invitations it sent are the core's)
            record = {"version": self._version, "epoch": self._epoch, "strategy": self.strategy.name, "at": now, "invited_from": numbered,
                      "state": self.strategy.round_checkpoint(), "round": self._round_block()}
            actions.insert(invites_at, RecordSelectionRound(round=record))
        return actions

    def _round_block(self) -> dict[str, Any]:
        """The core's side of a selection round, for its record and each commit of a selecting
        strategy: the devices it may take an update from (served a training model, or invited) with
        their accepted seq now (an update above it, replayed at a restart, is a report the round
        waited for), their invitations, and how many were numbered."""
        devices = sorted(self._training.union(self._invites))
        return {"accepted": [[d, self._accepted_upto.get(d, -1)] for d in devices],
                "invites": [[d, self._invites[d]] for d in devices if d in self._invites], "invite_round": self._invite_round}

    def _recorded_round(self, snapshot: Snapshot) -> Mapping[str, Any] | None:
        """The snapshot's round record if it was drawn at the restored version, in its epoch, by this
        strategy (with its state); else None (a record from before the newest commit, or damaged)."""
        rec = snapshot.selection_round
        if (self._strategy_changed is not None or not isinstance(rec, Mapping) or rec.get("strategy") != self.strategy.name
                or type(rec.get("version")) is not int or rec["version"] != self._version or rec.get("epoch") != self._epoch
                or not isinstance(rec.get("state"), Mapping)):
            return None
        return rec

    def _aggregate(self, now: float) -> CommitVersion:
        updates = tuple(self._buffer)
        full = self.next_version_is_full()
        applied = updates
        if any(self._predates_extractor(u.group, u.base_version, full) for u in updates):
            # Accepted before a full sync that did not consume the buffer (a peer merge), or held
            # across one (a parked conversion, a restart under another T or past unreadable
            # versions): the check _on_update made no longer holds. Left out of this version and
            # consumed with it (counted, in the commit's metadata): its head was fit to the
            # extractor that sync replaced.
            applied = tuple(u for u in applied if not self._predates_extractor(u.group, u.base_version, full))
        if full and any(u.group == FULL for u in applied) and any(u.group != FULL for u in applied):
            # A full sync with whole models replaces the extractor a head-only update was fit to
            # (SCC's "semantic drift": a classifier fit to one extractor's features is not one for
            # another's): left out, as a head from before the last full sync is. Merged in, it was
            # the version's head (models: a slice overwrites the whole models' mean) or added on
            # top of their mean change (deltas). Without a whole model the extractor stays and the
            # head, fit to it, is taken. Heads sent at a LASP full round are refused at receipt;
            # this meets the rest (T = 0, a restart under another T or past unreadable versions).
            applied = tuple(u for u in applied if u.group == FULL)
        if len(applied) < len(updates):
            self.counters["lasp_dropped_stale"] += len(updates) - len(applied)
        used = applied if full else tuple(self._partial(u) for u in applied)
        if used:
            new = np.ascontiguousarray(self.strategy.aggregate(self._view, used), dtype=np.float32)
        else:  # every update predated the extractor: a version that changes nothing consumes them
            new = np.array(self._weights, copy=True)
        if not full:  # LASP: between full syncs only the partial group may change
            keep = np.array(self._weights, copy=True)
            sl = self.config.spec.group_slice(self.config.partial_group)
            keep[sl] = new[sl]
            new = keep
        for u in updates:
            self._applied_upto[u.device] = max(self._applied_upto.get(u.device, -1), u.seq)
        self._buffer.clear()
        self._first_buffered_at = None
        self._last_aggregation_at = now
        self.counters["aggregations"] += 1
        stal = [u.staleness for u in applied]
        commit = self._commit(
            new,
            now,
            consumed=tuple(u.key for u in updates),
            meta={
                "source": "aggregation",
                "n_updates": len(applied),
                "n_samples": int(sum(u.n_samples for u in applied)),
                "devices": sorted({u.device for u in applied}),
                # sum / len: the exact sum of the ints, one correctly rounded division: the very
                # float np.mean gives (its float64 sum of ints < 2**53 is exact too); 0.13 us, not 6.6
                "mean_staleness": sum(stal) / len(stal) if stal else 0.0,
                "max_staleness": int(max(stal)) if stal else 0,
                "full_sync": full,
                **({"lasp_dropped": len(updates) - len(applied)} if len(applied) < len(updates) else {}),
            },
            aggregated=True,
        )
        return commit

    def _as_applied(self, u: BufferedUpdate) -> BufferedUpdate:
        """The update as the next version will take it, for the strategy's hooks: a whole model's
        head at a partial version. The robust fold then measures, clips, counts and records in its
        norm window what is applied (the head), not the whole change: a huge extractor change
        with an ordinary head was counted ``clipped`` and put its norm into the whole models'
        window, while the head went in unclipped. (The trigger refolds from what _aggregate hands
        over when the two differ: a schedule changed in between.)"""
        if self.config.full_sync_every and u.group == FULL and not self.next_version_is_full():
            return self._partial(u)
        return u

    def _partial(self, u: BufferedUpdate) -> BufferedUpdate:
        group = self.config.partial_group
        if u.group == group:
            return u
        sl = self.config.spec.group_slice(group)
        return BufferedUpdate(
            device=u.device, seq=u.seq, base_version=u.base_version, staleness=u.staleness, n_samples=u.n_samples,
            weights=u.weights[sl], group=group, arrived_at=u.arrived_at, loss=u.loss,
        )

    def _take_devices_added(self) -> tuple[str, ...]:
        """Devices first seen since the previous commit (``_devices`` only grows, in order): O(new)."""
        n = len(self._devices) - self._devices_committed
        self._devices_committed = len(self._devices)
        if n <= 0:
            return ()
        newest: list[str] = []
        for device in reversed(self._devices):
            if len(newest) == n:
                break
            newest.append(device)
        return tuple(reversed(newest))

    def _commit(self, weights: Vector, now: float, *, consumed: tuple[tuple[str, int], ...], meta: Mapping[str, Any],
                aggregated: bool = False, restored: int | None = None) -> CommitVersion:
        """Make ``weights`` the next version (validated: a bug must never deploy NaN). ``aggregated``:
        the strategy's ``on_aggregated`` runs once the version is in place, before the checkpoint
        is taken (Spyker's age of this version is in it: a restart resumed the age before it).
        ``restored``: the weights are version ``restored``'s, replacing the training line (a rollback,
        an operator's version); the strategy and the peering then put back what they built from the
        abandoned versions (``on_line_replaced``: FedAdam's moments, Spyker's age, NebulaFL's planets,
        an open merge's own model — helper-161 measured each carried into the next candidate), also
        before the checkpoint, so the commit's state is the restored one."""
        self.config.spec.check(weights)
        self._version = self._newest() + 1  # never reuse a number (next_version_is_full counts on it)
        self._weights = weights
        self._encoded.clear()
        self._tensors.clear()
        self._history[self._version] = weights
        for old in sorted(self._history)[: -self.config.keep_versions]:
            del self._history[old]
        # Everything but a partial aggregation is a full sync: a peer merge, and a rollback or an
        # operator's version too, even one that leaves the extractor as it was (a rollback to a release
        # after the last full sync). That only refuses more than it must (a head trained from the
        # restored version's extractor is base_rejected and trained again; devices holding it get the
        # whole model once), never patches a head onto another extractor; and what it refuses is little:
        # updates from the abandoned versions are refused anyway (_on_update), the buffer is discarded.
        if meta.get("full_sync", True):
            self._last_full_version = self._version
        self._status_dirty = True
        if aggregated:
            self.strategy.on_aggregated(self._view, now)
        if restored is not None:
            self.strategy.on_line_replaced(self._view, now, restored=restored)
            self.peering.on_line_replaced(self._view, now, restored=restored)
        source = meta.get("source")
        if source in ("rollback", "operator"):
            pass  # the caller decides what the release is
        elif self._gate is not None:
            if self.strategy.candidate(self._view):  # (HFedMS: its round's model, not a chain's step)
                self._pending_actions += self._submit_candidate(self._gate, weights, tuple(meta.get("devices", ())), now)
        elif not self._pinned and self.strategy.candidate(self._view):  # (HFedMS: a chain's step is no release)
            self._release_version, self._release_weights = self._version, weights
        return CommitVersion(
            version=self._version,
            weights=weights,
            applied_changed={device: self._applied_upto[device] for device, _ in consumed if device in self._applied_upto},
            consumed=consumed,
            devices_added=self._take_devices_added(),
            tallies=self.peering.take_tallies(),
            arrays=self.strategy.checkpoint_arrays(),
            metadata={
                "created_at": now,
                "strategy": self.strategy.name,
                **meta,
                "last_full_version": self._last_full_version,
                "counters": dict(self.counters),
                "staleness_hist": {str(k): v for k, v in self.staleness_hist.items()},
                "strategy_state": self.strategy.checkpoint(),
                **({"round": self._round_block()} if self.strategy.selects() else {}),
                "peering": self.peering.checkpoint(),
                "peering_name": self.peering.name,
                # (carried through runs under a policy that does not convert: "kept for the state dir's life")
                **({"conversion": self._switch.checkpoint()} if self._converting or self._switch.switch_version is not None else {}),
                **({"abandoned": [list(r) for r in self._abandoned]} if self._abandoned else {}),
                "release": self._release_version,
                "pinned": self._pinned,
            },
        )

    # ------------------------------------------------------------------ the release gate

    def _record(self, now: float, action: str, version: int, **extra: Any) -> RecordRelease:
        event = {"at": now, "action": action, "version": version, "release": self._release_version, **extra}
        self._gate_history = [*self._gate_history[-19:], event]
        if action == "reject":
            self._gate_rejected[version] = event
            if len(self._gate_rejected) > GATE_REJECTED_KEPT:  # bounded: the oldest goes (pruned long since)
                del self._gate_rejected[next(iter(self._gate_rejected))]
        self._status_dirty = True
        return RecordRelease(release=self._release_version, pinned=self._pinned, event=event,
                             floor=self._gate.floor() if self._gate is not None else None)

    def _on_evaluated(self, ev: CandidateEvaluated) -> list[CoordinatorAction]:
        if self._gate is None:
            return []
        if ev.release_version != self._release_version:
            # Scored against a release that has moved on: judge it again against the new one.
            weights = self._history.get(ev.version)
            if ev.version in self._gate.pending and weights is not None and ev.version > self._release_version:
                return [EvaluateCandidate(version=ev.version, weights=weights, release_version=self._release_version,
                                          release_weights=self._release_weights)]
            self._gate.take(ev.version)
            self._candidate_devices.pop(ev.version, None)
            return []
        decision = self._gate.record_validation(ev.version, ev.candidate_metric, ev.release_metric, ev.paired)
        if decision is None:
            return []
        return self._decided(ev.version, decision, ev.now)

    def _decided(self, version: int, decision: Decision, now: float) -> list[CoordinatorAction]:
        """Carry out the gate's decision on candidate ``version`` (validation and/or canary evidence)."""
        assert self._gate is not None
        actions = self._apply_decision(version, decision, now)
        return actions + self._canary_refresh(now)

    def _apply_decision(self, version: int, decision: Decision, now: float) -> list[CoordinatorAction]:
        assert self._gate is not None
        evidence = self._gate.take(version)
        assert evidence is not None
        metrics: dict[str, Any] = {}
        if evidence.candidate_metric is not None and evidence.release_metric is not None:
            metrics = {"candidate_metric": round(evidence.candidate_metric, 5), "release_metric": round(evidence.release_metric, 5)}
        if evidence.paired is not None:
            metrics["paired"] = list(evidence.paired)  # better, worse, n
        if evidence.canary:
            metrics["canary"] = evidence.canary_summary()  # reports, n, paired, candidate / release accuracy
        devices = self._candidate_devices.pop(version, ())
        if decision == "promote":
            weights = self._history.get(version)
            if self._pinned or weights is None or version <= self._release_version:
                self.counters["gate_passed_not_promoted"] += 1
                return [self._record(now, "passed", version, pinned=self._pinned, **metrics)]
            self._release_version, self._release_weights = version, weights
            if evidence.candidate_metric is not None:
                self._gate.promoted(evidence.candidate_metric)
            self.counters["gate_promoted"] += 1
            for older in [v for v in self._gate.pending if v < version]:  # superseded by a newer release
                self._gate.take(older)
                self._candidate_devices.pop(older, None)
            return [self._record(now, "promote", version, **metrics),
                    Notify(kind="release", data={"version": version, **metrics})]
        if decision == "hold":  # slightly worse: not released, but the training line goes on
            self.counters["gate_held"] += 1
            return [self._record(now, "hold", version, **metrics)]
        # Rejected: the training line goes back to the release; candidates built on it go too.
        self.counters["gate_rejected"] += 1
        self.counters["rejected_devices"] += len(devices)
        for v in self._gate.drop_above(version):
            self._candidate_devices.pop(v, None)
        # ``through``: the newest version built on it (dropped with it): releasing one needs force too.
        record = self._record(now, "reject", version, devices=len(devices), through=self._version, **metrics)
        rollback = self._rollback_training_line(now, rejected=version)
        # The commit first: a driver records the decision only once the rollback is durable (a
        # record of "reject" beside a training line still on the rejected version would be a lie).
        return [rollback, record, Notify(kind="rejected_candidate", data={"version": version, "devices": list(devices)[:50], **metrics})]

    # ------------------------------------------------------------------ canary evaluation (coordinator.canary)

    def _canary_start(self, now: float) -> list[CoordinatorAction]:
        """Open a canary round on the newest pending candidate, if none is open: pick the
        cohort among recently seen devices and ask each (signed, on its invite topic)."""
        gate = self._gate
        cfg = gate.config.canary if gate is not None else None
        if gate is None or cfg is None or self._canary_round is not None:
            return []
        self._canary_ended = {v: r for v, r in self._canary_ended.items() if v in gate.pending}
        versions = [v for v in gate.pending if v > self._release_version and v in self._history
                    and self._canary_ended.get(v) != self._release_version]
        self._canary_retry_at = None
        if not versions:
            return []
        version = max(versions)
        resume, self._canary_resume = self._canary_resume, None
        if resume is not None and (resume.candidate, resume.release) == (version, self._release_version):
            return self._canary_resumed(gate, cfg, resume, now)
        # A device does not judge a candidate built from its own update (unless too few others are around).
        recent = eligible(self._presence, now, cfg.recent_s)
        built = set(self._candidate_devices.get(version, ()))  # (once: it was rebuilt per recent device)
        judges = [d for d in recent if d not in built]
        cohort = pick_cohort(judges if len(judges) >= cfg.min_reports else recent, version, cfg)
        if not cohort:
            self.counters["canary_no_cohort"] += 1
            self._canary_retry_at = now + CANARY_RETRY_S
            return []
        gate.reset_canary(version, expected=len(cohort))
        # Its own nonce: after a restart the same candidate, release and cohort make a new round (see coordinator.canary).
        nonce = round_nonce(self.config.coordinator_id, self._epoch, version, self._release_version, now,
                            self.counters["canary_rounds"])
        rnd = self._canary_round = CanaryRound(candidate=version, release=self._release_version, cohort=frozenset(cohort),
                                               deadline=now + cfg.deadline_s, nonce=nonce)
        self._canary_weights = self._history[version]
        self.counters["canary_rounds"] += 1
        self.counters["canary_invited"] += len(cohort)
        self._status_dirty = True
        # Recorded before any device hears of it: a restart resumes it (no device holds a round's nonce unrecorded).
        return [RecordCanaryRound(round=rnd.record(self._epoch)), *self._canary_requests(rnd, cohort, cfg.samples, cfg.report_by_s)]

    def _canary_requests(self, rnd: CanaryRound, devices: Sequence[str], samples: int, deadline_s: float) -> list[CoordinatorAction]:
        """The round's signed requests to ``devices``, on their invite topics."""
        actions: list[CoordinatorAction] = []
        for device in devices:
            ask = Canary(device=device, candidate=rnd.candidate, release=rnd.release, samples=samples,
                         deadline_s=deadline_s, epoch=self._epoch, nonce=rnd.nonce)
            actions.append(self._publish(topics.device_topic(self.config.region, device, "invite"),
                                         encode(ask, signer=self.config.signer, scope=topics.device_scope(self.config.region, "invite"))))
        return actions

    def _canary_resumed(self, gate: Gate, cfg: CanaryConfig, rnd: CanaryRound, now: float) -> list[CoordinatorAction]:
        """The round recorded before the restart, on the candidate gated again: the same nonce, cohort
        and deadline, its recorded reports as evidence; the members yet to report are asked again (one
        that took the round ignores it). Past its deadline it ends now, as the deadline rule says; a
        deadline recorded by a clock ahead of this one is no later than a new round's (helper-153: a
        restart a day behind held the candidate a day)."""
        if rnd.deadline > now + cfg.deadline_s:
            rnd.deadline = now + cfg.deadline_s
        gate.reset_canary(rnd.candidate, expected=len(rnd.cohort))
        for device, counts in sorted(rnd.reports.items()):
            gate.record_canary(rnd.candidate, device, counts)
        self._canary_round, self._canary_weights = rnd, self._history[rnd.candidate]
        self.counters["canary_resumed"] += 1
        self._status_dirty = True
        decision = gate.decide(rnd.candidate)
        if decision is not None:  # its last report was recorded, the decision it brought was not
            return self._decided(rnd.candidate, decision, now)
        if now >= rnd.deadline:  # it ran out while the coordinator was down
            return self._canary_expire(now)
        report_by = min(cfg.report_by_s, rnd.deadline - now - (cfg.deadline_s - cfg.report_by_s))
        if report_by <= 0:
            return []  # too late to ask anyone new: the reports on their way decide at the deadline
        return self._canary_requests(rnd, sorted(rnd.cohort - rnd.reports.keys()), cfg.samples, report_by)

    def _canary_refresh(self, now: float) -> list[CoordinatorAction]:
        """After a decision or a release change: end the round if its candidate is decided or its
        release has moved (its counts compared against the old release), then open the next one."""
        rnd = self._canary_round
        if rnd is not None and self._gate is not None:
            if rnd.candidate in self._gate.pending and rnd.release != self._release_version:
                self._gate.reset_canary(rnd.candidate)
            if rnd.candidate not in self._gate.pending or rnd.release != self._release_version:
                self._canary_round, self._canary_weights = None, _NO_WEIGHTS
        return self._canary_start(now)

    def _canary_expire(self, now: float) -> list[CoordinatorAction]:
        """The round's deadline passed: the gate decides with the reports that came in."""
        rnd = self._canary_round
        if rnd is None or self._gate is None or now < rnd.deadline:
            return []
        self._canary_round, self._canary_weights = None, _NO_WEIGHTS
        self.counters["canary_rounds_expired"] += 1
        decision = self._gate.close_canary(rnd.candidate)
        if decision is None:  # e.g. still waiting for the validation score: its reports wait with it
            self._canary_ended[rnd.candidate] = rnd.release
            return self._canary_start(now)
        return self._decided(rnd.candidate, decision, now)

    def _on_canary_report(self, msg: CanaryReport, now: float) -> list[CoordinatorAction]:
        """A cohort member's paired counts: checked, recorded with the round, then evidence for the
        gate. A bad one is counted by reason and changes nothing."""
        actions: list[CoordinatorAction] = []
        if self._canary_round is None and self._canary_resume is not None:
            # Before start(): a broker hands over what it kept while we were down first. The recorded
            # round is resumed now (its candidate gated again), or its reports would be refused.
            actions = self._regate_newest(now)
        try:
            rnd = self._canary_round
            if self._gate is None or self._gate.config.canary is None or rnd is None:
                raise UnknownCandidate("no canary round is open")
            counts = rnd.check(msg, self._gate.config.canary.cap)
        except BadCanaryReport as exc:
            self.counters["canary_rejected"] += 1
            self.counters[f"canary_reject:{exc.reason}"] += 1
            self._status_dirty = True
            return [*actions, Notify(kind="rejected", data={"reason": exc.reason, "detail": str(exc)[:200], "device": msg.device})]
        rnd.reports[msg.device] = counts
        self.counters["canary_reports"] += 1
        self._status_dirty = True
        # Recorded before the decision it may bring: a restart resumes the round with it (and a redelivered
        # copy is a duplicate then); one that dies before the record takes a redelivered copy, once.
        actions.append(RecordCanaryRound(round=rnd.record(self._epoch)))
        decision = self._gate.record_canary(rnd.candidate, msg.device, counts)
        return actions if decision is None else actions + self._decided(rnd.candidate, decision, now)

    def _canary_fetch(self, msg: Pull) -> Publish:
        """A cohort member fetches the candidate it was asked to evaluate (never a training pull)."""
        rnd = self._canary_round
        if rnd is None or msg.canary != rnd.candidate:
            raise UnknownCandidate(f"candidate {msg.canary} is not under canary evaluation")
        if msg.device not in rnd.cohort:
            raise NotInCohort(f"{msg.device} was not asked to evaluate candidate {msg.canary}")
        self.counters["canary_fetches"] += 1
        return self._model_reply(msg.device, msg.seq, FULL, self._held(msg), serve=True,
                                 candidate=(rnd.candidate, self._canary_weights))

    def _canary_status(self) -> dict[str, Any] | None:
        cfg = self._gate.config.canary if self._gate is not None else None
        if cfg is None:
            return None
        c, rnd = self.counters, self._canary_round
        return {
            "fraction": cfg.fraction,
            "samples": cfg.samples,
            "min_reports": cfg.min_reports,
            "round": None if rnd is None else {"candidate": rnd.candidate, "release": rnd.release, "cohort": len(rnd.cohort),
                                               "reports": len(rnd.reports), "deadline": rnd.deadline},
            **{k: c[f"canary_{k}"] for k in ("rounds", "resumed", "invited", "fetches", "reports", "rejected", "rounds_expired", "no_cohort")},
            "rejected_by_reason": {k.split(":", 1)[1].removeprefix("canary_"): v
                                   for k, v in c.items() if k.startswith("canary_reject:")},
        }

    def _rollback_training_line(self, now: float, *, rejected: int) -> CommitVersion:
        """Commit the release's weights as the next training version, discarding the buffer
        (those updates were trained from the rejected lineage; their keys count as applied)."""
        return self._replace_training_line(np.array(self._release_weights, copy=True), now,
                                           {"source": "rollback", "rejected": rejected, "of": self._release_version},
                                           abandon_from=rejected)

    def _replace_training_line(self, weights: Vector, now: float, meta: Mapping[str, Any], *,
                               abandon_from: int) -> CommitVersion:
        """Commit ``weights`` (a rollback or an operator's version) as the next training
        version; the buffered and parked updates are discarded, their keys counted as applied.
        Versions ``abandon_from`` .. the current one leave the line: updates based on them are
        refused from now on, recorded in this very commit's metadata (durable with it)."""
        before, self._abandoned = self._abandoned, abandon(self._abandoned, abandon_from, self._version)
        self._recall_due = self._recall_due or self._abandoned != before
        self._abandon_conversions()
        consumed = tuple(u.key for u in self._buffer)
        for u in self._buffer:
            self._applied_upto[u.device] = max(self._applied_upto.get(u.device, -1), u.seq)
        self.counters["rolled_back_updates"] += len(self._buffer)
        self._buffer.clear()
        self._first_buffered_at = None
        return self._commit(weights, now, consumed=consumed, meta=meta, aggregated=True, restored=int(meta["of"]))

    # ------------------------------------------------------------------ operator control

    def _on_control(self, ev: MessageReceived) -> list[CoordinatorAction]:
        """A control message that is not a fresh, new command of the operator whose key signed it
        (unsigned, another key, another operator's name, out of its window, replayed) is a rejected
        message like any other (hostile input: raised, counted under ``reject:``); a verified
        command that cannot run (a version that does not exist, one the gate rejected without
        ``--force``, one the registry cannot read) is an operator's refusal, counted apart
        (``control_refused:``, ``edgeci_control_refused_total``): a typo is not a misbehaving device."""
        nonce: int | None = None
        try:
            frame = decode_frame(ev.payload, max_bytes=64 * 1024)
            msg = frame.message
            if not isinstance(msg, Control):
                raise TopicMismatch(f"a {msg.TYPE} message does not belong on the control topic")
            nonce = msg.nonce
            sig = self._authenticate_control(ev, msg, frame.signature)
        except RemoteProtocolError as exc:
            self._control_refused = {"at": ev.now, "reason": exc.reason, "detail": str(exc)[:200], "nonce": nonce}
            raise
        try:
            return self._run_control(ev, msg, sig)
        except RemoteProtocolError as exc:
            # (kept as long as executed ones: see _authenticate_control)
            self._control_refused_seen[_command_key(msg)] = msg.issued_at + self.config.control_max_age_s
            record = RecordRefusal(event={"at": ev.now, "outcome": "refused", "operator": msg.operator, "nonce": msg.nonce,
                                          "command": msg.command, "version": msg.version, "force": msg.force, "reason": exc.reason})
            return [*self._refuse_control(ev.now, exc.reason, str(exc), msg.nonce, command=msg.command, version=msg.version), record]

    def _refuse_control(self, now: float, reason: str, detail: str, nonce: int, **data: Any) -> list[CoordinatorAction]:
        self._control_refused = {"at": now, "reason": reason, "detail": detail[:200], "nonce": nonce}
        self.counters[f"control_refused:{reason}"] += 1
        self._status_dirty = True
        return [Notify(kind="control_refused", data={**data, "reason": reason, "detail": detail[:200]})]

    def _authenticate_control(self, ev: MessageReceived, msg: Control, sig: SignatureInfo | None) -> SignatureInfo:
        """The command's signature, once it is shown to be a fresh, new command of the operator it names."""
        cfg = self.config
        if sig is None:
            raise UnsignedMessage("control commands must be signed by an operator key")
        name, raw = self._commanders.get(sig.kid, ("", b""))
        if raw != sig.public_raw:
            raise BadSignature(f"control command signed by key {sig.kid}, which may not command this coordinator")
        if not verify(sig.public_raw, sig.signature, sig.signed_for(topics.signing_scope(ev.topic))):
            raise BadSignature(f"control command signed by key {sig.kid} does not verify for {ev.topic!r} (another region's?)")
        if msg.operator != name:
            raise OperatorMismatch(f"control command in the name of {msg.operator!r} signed by key {sig.kid}, which belongs to {name!r}")
        # The window is judged on the system clock (ev.wall), not on ev.now: that one never goes back,
        # so after the host's clock was stepped back (NTP correcting a fast clock) it ran ahead of every
        # honest operator's, and every command was refused as replayed until a restart (helper-153).
        wall = ev.now if ev.wall is None else ev.wall
        if abs(wall - msg.issued_at) > cfg.control_max_age_s:
            raise ReplayedMessage(f"control command issued {wall - msg.issued_at:.0f} s from now: too old or from the future")
        # A command is remembered while its window accepts it (until issued_at + max_age on the same
        # clock); once forgotten, the operator's floor refuses it, should the clock be stepped back.
        self._control_seen = self._forget_controls(self._control_seen, wall)
        self._control_refused_seen = self._forget_controls(self._control_refused_seen, wall)
        if (msg.operator, msg.nonce) in self._control_seen:
            raise ReplayedMessage("control command already executed")
        if _command_key(msg) in self._control_refused_seen:  # the same refused command again: a replay, not an operator
            raise ReplayedMessage("control command already refused")
        if msg.issued_at <= self._control_floor.get(msg.operator, -math.inf):
            raise ReplayedMessage("control command issued before one of this operator's that is no longer remembered "
                                  "(this coordinator's clock was stepped back?)")
        return sig

    def _forget_controls(self, seen: dict[_K, float], wall: float) -> dict[_K, float]:
        """``seen`` without the commands whose window has closed by ``wall``, each raising its operator's floor."""
        if all(wall <= until for until in seen.values()):
            return seen
        floor, age = self._control_floor, self.config.control_max_age_s
        for key, until in seen.items():
            if wall > until and until - age > floor.get(key[0], -math.inf):
                floor[key[0]] = until - age
        return {k: until for k, until in seen.items() if wall <= until}

    def _run_control(self, ev: MessageReceived, msg: Control, sig: SignatureInfo) -> list[CoordinatorAction]:
        if msg.command != "unpin" and not 0 <= msg.version <= max(self._version, self._version_floor):
            raise UnknownVersion(f"no version {msg.version} (latest is {self._version})")  # refused: not counted as run
        rejected = self._rejected_lineage(msg.version) if msg.command != "unpin" else None
        if rejected is not None and not msg.force:
            scores = (f": {rejected['candidate_metric']:.3f} against the release's {rejected['release_metric']:.3f}"
                      if isinstance(rejected.get("candidate_metric"), float) and isinstance(rejected.get("release_metric"), float) else "")
            built_on = "" if rejected["version"] == msg.version else f"version {msg.version} was built on a rejected candidate: "
            raise GateRejected(f"{built_on}the release gate rejected version {rejected['version']}{scores}; "
                               "send the command with --force to release it anyway")
        self._control_seen[(msg.operator, msg.nonce)] = msg.issued_at + self.config.control_max_age_s
        self.counters[f"control:{msg.command}"] += 1
        note = Notify(kind="control", data={"command": msg.command, "version": msg.version, "operator": msg.operator})
        if msg.command == "unpin":
            self._pinned = False
            return [note, self._record(ev.now, "unpin", self._release_version, operator=msg.operator, nonce=msg.nonce,
                                       kid=sig.kid)]
        if msg.command == "pin" and self._pinned and self._version == self._release_version \
                and msg.version in (self._release_version, self._pinned_of()):
            # Pinned to this very model and nothing trained since (e.g. a retried command): a new
            # number for the same weights would only make every device pull it again.
            return [note, self._record(ev.now, "pin", self._release_version, of=msg.version, unchanged=True,
                                       operator=msg.operator, nonce=msg.nonce, kid=sig.kid)]
        return [note, LoadVersion(version=msg.version, command=msg.command, operator=msg.operator, nonce=msg.nonce, kid=sig.kid)]

    def _rejected_lineage(self, version: int) -> dict[str, Any] | None:
        """The gate's reject record of ``version``, or of the rejected candidate it was built on
        (a version dropped with it: the rejected model plus training), if still remembered."""
        hit = self._gate_rejected.get(version)
        if hit is not None:
            return hit
        for rejected, event in self._gate_rejected.items():
            through = event.get("through")
            if rejected < version and type(through) is int and version <= through:
                return event
        return None

    def _pinned_of(self) -> int | None:
        """The version the pinned release copies (its pin / rollback record), if still recorded."""
        for event in reversed(self._gate_history):
            if event.get("action") in ("pin", "rollback") and event.get("version") == self._release_version:
                return int(event.get("of", event["version"]))
        return None

    def _on_version_loaded(self, ev: VersionLoaded) -> list[CoordinatorAction]:
        if ev.weights is None:
            self._refuse_control(ev.now, "version_unavailable", ev.detail, ev.nonce)  # counted, in the status
            failed: list[CoordinatorAction] = [
                Notify(kind="control_failed", data={"command": ev.command, "version": ev.version, "detail": ev.detail[:200]})]
            if ev.operator:  # its (operator, nonce) was spent by _run_control: a replay after a restart is refused too
                failed.append(RecordRefusal(event={"at": ev.now, "outcome": "failed", "operator": ev.operator, "nonce": ev.nonce,
                                                   "command": ev.command, "version": ev.version, "reason": "version_unavailable"}))
            return failed
        weights = np.array(self.config.spec.check(np.asarray(ev.weights, dtype=np.float32)), copy=True)
        # Every version after the restored one leaves the training line (what the operator rolled back).
        commit = self._replace_training_line(weights, ev.now, {"source": "operator", "command": ev.command, "of": ev.version},
                                             abandon_from=ev.version + 1)
        self._release_version, self._release_weights = commit.version, weights
        self._pinned = ev.command == "pin" or (self._pinned and ev.command == "rollback")
        # The commit names the release and pin it leaves: it is durable before the release record,
        # and a restart between the two (or a failed write of the record) must not restore the
        # release this very commit abandoned, nor gate the operator's choice as a candidate.
        # The command (operator, nonce) too: the restart's replay protection and the CLI's confirmation.
        control = {"operator": ev.operator, "nonce": ev.nonce, **({"kid": ev.kid} if ev.kid else {})} if ev.operator else {}
        commit = dataclasses.replace(commit, metadata={**commit.metadata, "release": commit.version, "pinned": self._pinned, **control})
        if self._gate is not None:
            for v in self._gate.drop_above(-1):
                self._candidate_devices.pop(v, None)
            self._gate.best = None  # the operator chose this release: it is the new bar
        return [commit, self._record(ev.now, ev.command, commit.version, of=ev.version, **control), *self._canary_refresh(ev.now)]

    # ------------------------------------------------------------------ peering

    def _on_peer(self, ev: MessageReceived) -> list[CoordinatorAction]:
        frame = decode_frame(ev.payload, max_bytes=self._max_bytes)
        msg = frame.message
        if not isinstance(msg, PeerMsg):
            raise TopicMismatch(f"a {msg.TYPE} message does not belong on a peer topic")
        if msg.sender == self.config.coordinator_id:
            signer, sig = self.config.signer, frame.signature
            if signer is None or (sig is not None and sig.public_raw == signer.public_raw):
                return []  # our own broadcast, echoed by the broker
            # helper-115: anyone's frame in this coordinator's name was dropped here uncounted
            raise BadSignature(f"a peer message in this coordinator's own name ({msg.sender!r}) not signed with its key")
        if self.peering.ignores(msg, ev.now):
            # One the peering would ignore whoever signed it (a replayed beat; counted there): not verified,
            # which is most of what it costs (helper-161: a flood of one replayed beat was verified in full
            # each time, 309-365 us against 34-43 us now, and kept its sender "heard").
            self._status_dirty = True
            return []
        try:
            pin = self._check_peer_signature(msg.sender, frame.signature, topics.signing_scope(ev.topic))
            if msg.weights is not None:  # bounded as a device's update: float32-max values overflowed the merge
                self.config.spec.check_update(msg.weights)
            plan = self.peering.on_message(self._view, msg, ev.now)  # raises for a sender or body it refuses
        except RemoteProtocolError as exc:  # say who sent it (a model or peering that differs names no sender itself)
            if msg.sender in str(exc):
                raise
            raise type(exc)(f"from peer {msg.sender!r} ({msg.kind}): {exc}") from None
        if pin is not None:  # first use: pinned once the peering took the message (a refused one pins nothing)
            self._peer_pins[msg.sender] = pin
        self._peer_heard[msg.sender] = ev.now
        self.counters["peer_messages"] += 1
        if plan.counted:  # (the ignored counts reached the status only with whatever published it next)
            self._status_dirty = True
        return self._run_peer_plan(plan, ev.now)

    def peers_heard(self) -> dict[str, float | None]:
        """Each expected peer (:meth:`Peering.expected_peers`): when its last accepted message
        arrived, None if none has since this start."""
        return {p: self._peer_heard.get(p) for p in self.peering.expected_peers()[0]}

    def _check_peer_signature(self, sender: str, sig: SignatureInfo | None, scope: str) -> bytes | None:
        """Peers sign everything, for the topic they send to (recipient and kind: a message
        re-routed to another coordinator does not verify there); trust the provisioned keys,
        each for the coordinator it is named after, or pin each sender's first key: returned,
        for the caller to pin once the message is accepted (else None)."""
        if sig is None:
            raise UnsignedMessage(f"peer message from {sender!r} is not signed")
        trusted = self.config.peer_keys
        if trusted:
            # By name, not by key id: any provisioned coordinator's key used to be accepted for
            # any sender, so one coordinator could speak as another (hold its Spyker token, send
            # its HierFAVG edge model or its Nebula rotation).
            if sender not in trusted:
                raise BadSignature(f"peer message from {sender!r}: no key is provisioned for {sender!r} (trusted/ has no "
                                   f"{sender}.pub: `edgeci pki trust --dir PKI`, then copy the bundle again)")
            if trusted.get(sender) != sig.public_raw:
                raise BadSignature(f"peer message from {sender!r} signed with key {sig.kid}, which is not "
                                   f"the key provisioned for {sender!r}")
        elif self._peer_pins.get(sender, sig.public_raw) != sig.public_raw:
            # helper-96: a peer whose key changed (its state dir replaced) is refused for good, and a
            # restart may pin its old key again from messages queued for this one while it was down.
            # (short: a rejection's detail is cut at 200 characters)
            raise BadSignature(f"peer {sender!r}: key {sig.kid} is not the one pinned since this start. A new key on purpose? "
                               "restart this coordinator to pin again (twice if older messages were queued) or use `edgeci pki`")
        if not verify(sig.public_raw, sig.signature, sig.signed_for(scope)):
            raise BadSignature(f"peer message from {sender!r} has an invalid signature for {scope!r} (re-routed?)")
        return None if trusted or sender in self._peer_pins else bytes(sig.public_raw)

    def _run_peer_plan(self, plan: PeerPlan, now: float) -> list[CoordinatorAction]:
        # The merge's commit first: a driver holds what follows a commit until it is durable, and a
        # send may carry the merged model (a HierFAVG cloud's global). Sent before it, a crash between
        # the two left the edges on a global the restarted cloud did not have, and it reopened the round
        # (helper-177).
        actions: list[CoordinatorAction] = []
        if plan.merged is not None:
            merged = np.ascontiguousarray(plan.merged, dtype=np.float32)
            self.counters["peer_merges"] += 1
            actions.append(self._commit(merged, now, consumed=(), meta={"source": "peer", **plan.meta}))
        for send in plan.sends:
            msg = PeerMsg(sender=self.config.coordinator_id, kind=send.kind, body=send.body, weights=send.weights)
            topic = topics.peer_topic(send.to, send.kind)
            actions.append(self._publish(topic, encode(msg, signer=self.config.signer, scope=topics.signing_scope(topic))))
        return actions

    def _invite(self, device: str) -> list[CoordinatorAction]:
        if self._deferred.pop(device, None) is None:
            return []
        self._invite_round += 1
        self._invites.pop(device, None)  # (re-inserted last: the dict's order is the invitations')
        self._invites[device] = self._invite_round
        if len(self._invites) > PRESENCE_LIMIT:  # a device drawn that never pulls kept its invitation for the state
            del self._invites[next(iter(self._invites))]  # dir's life, listed by every commit and round record
        invite = Invite(device=device, round=self._invite_round, version=self._version)
        return [self._publish(topics.device_topic(self.config.region, device, "invite"), encode(invite))]

    def _device_topic(self, device: str, leaf: topics.DeviceLeaf) -> str:
        """``topics.device_topic(region, device, leaf)``. For the device whose message is
        being handled (the common case: its reply) the prefix of that message's topic, which
        ``topics.parse`` validated (ids, layout) and found to be ours: the same string."""
        inbox = self._inbox
        if inbox is not None and inbox[0] == device:
            return inbox[1] + leaf
        return topics.device_topic(self.config.region, device, leaf)

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> Publish:
        self.counters["bytes_out"] += len(payload)
        return Publish(topic=topic, payload=payload, qos=1, retain=retain)

    def _status_action(self, now: float | None = None) -> Publish | Notify:
        """The retained status; at most one per ``status_interval_s`` unless the version changed
        (a flood of rejected messages must not become a flood of status publishes)."""
        self._status_dirty = False
        self._status_version = self._version
        if now is not None:
            self._status_next_at = now + self.config.status_interval_s
        if not self.config.status_payload:
            return Notify(kind="status", data={"version": self._version})  # built lazily, by whoever asks
        return Publish(topic=topics.status_topic(self.config.region), payload=status_json(self.status()), qos=1, retain=True)
