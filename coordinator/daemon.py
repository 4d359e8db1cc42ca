"""The coordinator daemon: CoordinatorCore + registry + MQTT, on an actor thread.

``edgeci coordinator --broker mqtt://HOST:PORT --region R --state-dir DIR --model digits``

With ``peering`` other than ``none`` (``--peering spyker --peers eu,us,ap``) the daemon
builds the peering component of :mod:`coordinator.peering` around the same strategy
object and hands it to the core, which then also subscribes to ``edgeci/v1/peer/...``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.canary import CanaryConfig, check_canary_task
from coordinator.conversion import ConversionConfig
from coordinator.conversion_worker import ConversionWorker, Converter
from coordinator.core import (
    RATE_NOTE_EVERY_S,
    CommitVersion,
    ConvertUpdate,
    CoordinatorConfig,
    CoordinatorCore,
    EvaluateCandidate,
    LoadVersion,
    PersistUpdate,
    RecordCanaryRound,
    RecordRefusal,
    RecordRelease,
    RecordSelectionRound,
    Snapshot,
    StorageChanged,
    UpdateConverted,
    VersionLoaded,
)
from coordinator.gate import GateConfig
from coordinator.inversion import inversion_config  # the module needs no torch (the inverter does)
from coordinator.methods import make_method
from coordinator.metrics import CoordinatorMetrics, stamp_status, status_will
from coordinator.registry import Registry, RegistryError, days_beyond_clock
from coordinator.strategies import strategy_params
from coordinator.strategies.base import BufferedUpdate
from coordinator.strategies.staleness import converting_policy, needs_driver, policy_of
from coordinator.validation import Validator, fingerprint, load_validation
from edge_sdk.core.device import MAX_STATUS_BYTES
from edge_sdk.core.events import MessageReceived, Notify, Publish
from edge_sdk.errors import ConfigError, EdgeciError, TransportError, UnknownCandidate
from edge_sdk.modelio import load_model
from edge_sdk.mqtt import (
    COORDINATOR_RECONNECT_MAX_S,
    KEEPALIVE_S,
    BrokerAuth,
    HeldAck,
    MqttTransport,
    check_keepalive,
)
from edge_sdk.runtime import Actor, Clock, WallClock
from edge_sdk.signing import Signer, load_named_keys, load_or_create_signer
from edge_sdk.spec import Vector
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import Task
from edge_sdk.wire import topics
from edge_sdk.wire.codec import Encoding, parse_status_json, status_json

log = logging.getLogger("edgeci.coordinator")

_monotonic = time.monotonic  # (the probe's rate limit reads it: a test sets a fake clock here)
STORAGE_WARN_EVERY_S = 60.0
"""While storage fails, the probe thread warns at most this often (each probe is logged at debug)."""
STORAGE_STABLE_S = 60.0
"""Storage that fails again within this long of its recovery relapsed (see :data:`STORAGE_BACKOFF_MAX_S`)."""
STORAGE_BACKOFF_MAX_S = 120.0
"""After a relapse the daemon resumes no sooner than ``storage_probe_s`` x 2^relapses after the
failure, at most this long. A write that fails where the probe's works (a version or canary
record larger than the probe's write on a nearly full disk, one file that cannot be written)
fails again at each recovery, as the broker delivers its message again: without the backoff,
a recovery and a redelivery at the probe's pace for ever."""
def probe_bytes(model_size: int, copies: int = 1) -> int:
    """What the storage probe writes (and fsyncs) while storage fails: ``copies`` float32 models of
    ``model_size`` values and 64 KB more. A commit writes the version and the strategy's
    model-sized arrays beside it (FedAdam's 2 moments, NebulaFL's K planets and stellar model): the
    probe is as large as the last commit's, so a disk it passes on holds the next commit too."""
    return 4 * model_size * max(1, copies) + (64 << 10)


START_TIMEOUT_S = 15.0
"""How long a start waits for the broker's answer (the CLI's start-up probe waits as long)."""
REJECTED_LOG_BUDGET = 20
"""Rejected-message WARNINGs per :data:`RATE_NOTE_EVERY_S` over all senders (see :class:`RejectedLog`)."""
REJECTED_LOG_KEYS = 1024
"""(reason, sender) pairs :class:`RejectedLog` remembers (oldest first out)."""


class PeerWatch:
    """Which expected peers have been silent longer than is normal (helper-96: a peer that was
    down, mistyped in ``--peers`` or on an unbridged broker was never reported): one WARNING when
    a silence passes the peering's limit (:meth:`Peering.expected_peers`), one INFO when the peer
    is heard again. Pure: :meth:`check` returns the (level, line) pairs to log."""

    __slots__ = ("silent",)

    def __init__(self) -> None:
        self.silent: dict[str, float] = {}
        """Peers reported silent -> when their silence began (their last message, or the start)."""

    def check(self, heard: Mapping[str, float | None], limit: float | None, started: float,
              now: float) -> list[tuple[int, str]]:
        if limit is None:
            return []
        out: list[tuple[int, str]] = []
        for peer, last in heard.items():
            since = started if last is None or last < started else last
            quiet = now - since
            if quiet > limit and peer not in self.silent:
                self.silent[peer] = since
                what = "nothing since this coordinator started" if last is None else f"nothing for {quiet:.0f} s"
                out.append((logging.WARNING, f"peer {peer!r}: {what} (its messages come within {limit:.0f} s): is it "
                                             "running, with the same --peers and --peering, on this broker or one bridged to it?"))
            elif quiet <= limit and peer in self.silent:
                out.append((logging.INFO, f"peer {peer!r} is heard again, after {now - self.silent.pop(peer):.0f} s"))
        return out


class RejectedLog:
    """Which rejected messages the daemon logs (every one is counted in the status and /metrics
    all the same). A WARNING per (reason, sender) at most once per :data:`RATE_NOTE_EVERY_S`,
    the next one saying how many were held since (a peer with a new key sent ~2 a second, each
    one a WARNING); and, per such period, at most :data:`REJECTED_LOG_BUDGET` of them over all
    senders but the ``exempt`` ones — on a plain broker a client can claim a new sender id per
    message. The configured peers are exempt (a bounded set): a flood of forged ids cannot hide
    a real peer's rejections. Once a period is over, :meth:`flush` (the daemon calls it every
    second) says how many were not logged, by reason. Pure: both return the lines to log."""

    __slots__ = ("_exempt", "_held", "_held_from", "_held_reasons", "_logged", "_said", "_window_start")

    def __init__(self, exempt: Iterable[str] = ()) -> None:
        self._exempt = frozenset(exempt)
        self._said: dict[tuple[str, str], tuple[float, int]] = {}  # (reason, sender) -> (last logged, held since)
        self._window_start = -math.inf
        self._logged = 0
        self._held = 0  # over the budget, this period
        self._held_from: set[tuple[str, str]] = set()  # (bounded: REJECTED_LOG_KEYS)
        self._held_reasons: Counter[str] = Counter()

    def flush(self, now: float) -> list[str]:
        """The summary of a period that is over (if anything was held), and a new period."""
        if now - self._window_start < RATE_NOTE_EVERY_S:
            return []
        lines: list[str] = []
        if self._held:
            reasons = ", ".join(f"{reason} {n}" for reason, n in self._held_reasons.most_common())
            capped = len(self._held_from) >= REJECTED_LOG_KEYS
            lines.append(f"{self._held} more rejected message(s) ({reasons}) from {'at least ' if capped else ''}"
                         f"{len(self._held_from)} (reason, sender) pair(s) were not logged (at most {REJECTED_LOG_BUDGET} "
                         f"such warnings a minute; all are counted in edgeci_rejected_total)")
        self._window_start, self._logged, self._held = now, 0, 0
        self._held_from, self._held_reasons = set(), Counter()
        return lines

    def note(self, data: Mapping[str, Any], now: float) -> list[str]:
        detail = str(data.get("detail", ""))
        sender = str(data.get("device") or detail.split(":", 1)[0])
        key = (str(data.get("reason")), sender)
        lines = self.flush(now)
        last, held = self._said.get(key, (-math.inf, 0))
        if now - last < RATE_NOTE_EVERY_S:  # (the period of the core's own rate-limit note)
            self._said[key] = (last, held + 1)
            return lines
        peer = _PEER_SENDER.match(sender)
        if self._logged >= REJECTED_LOG_BUDGET and not (peer is not None and peer.group(1) in self._exempt):
            self._held += 1
            self._held_reasons[key[0]] += 1
            if len(self._held_from) < REJECTED_LOG_KEYS:
                self._held_from.add(key)
            return lines
        self._logged += 1
        self._said.pop(key, None)  # (re-inserted last: the oldest logged is the first out)
        self._said[key] = (now, 0)
        if len(self._said) > REJECTED_LOG_KEYS:
            del self._said[next(iter(self._said))]
        lines.append(f"rejected a message: {dict(data)}"
                     + (f" ({held} more of these since it was last logged, not logged)" if held else ""))
        return lines


_PEER_SENDER = re.compile(r"from peer '([^']*)'")
"""The sender part of a peer message's rejection detail (``from peer 'ap' (beat)``)."""


DAEMON_FORGET_AFTER_S = 600.0
"""A daemon's ``forget_after_s`` for strategies that wait for invited devices (FedBuff, PORT,
NebulaFL) unless the operator sets one (``--param forget_after_s=none`` waits for ever, as the
papers and the emulator, whose devices never vanish): a device that is invited and then
uninstalled, wiped or lost would otherwise hold its slot, and with strict K the whole round,
for ever."""


def daemon_strategy_params(strategy: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` plus the daemon's own defaults for what the strategy accepts and was not given."""
    out = dict(params)
    if "forget_after_s" in strategy_params(strategy) and "forget_after_s" not in out:
        out["forget_after_s"] = DAEMON_FORGET_AFTER_S
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorOptions:
    broker: str
    region: str
    state_dir: Path
    model: str = "digits"
    coordinator_id: str = ""
    strategy: str = "spin"
    strategy_params: Mapping[str, Any] = field(default_factory=lambda: {"k": 10, "timeout_s": 30.0})
    init: Path | None = None
    encoding: Encoding = "f4"
    hints: Mapping[str, float] = field(default_factory=dict)
    keep_versions: int = 20
    seed: int = 0
    peering: str = "none"
    """``none`` | ``spyker`` | ``nebula`` | ``hierfavg`` (see :mod:`coordinator.peering`)."""
    peers: tuple[str, ...] = ()
    """Every coordinator id in ring order, this one included (``--peers``)."""
    peering_params: Mapping[str, Any] = field(default_factory=dict)
    full_sync_every: int = 0
    """LASP: every T-th version is a full sync, classifier-only versions between (0: off)."""
    max_batch: int = 256
    """Group commit: events handled per batch, whose accepted updates share one log fsync."""
    storage_probe_s: float = 2.0
    """While storage is failing, try a model-sized probe write this often; resume when it works."""
    signing_key: Path | None = None
    """Ed25519 key that signs every model and peer message (default: STATE_DIR/signing.key)."""
    peer_keys_dir: Path | None = None
    """Folder of trusted peer coordinators' keys, ``<coordinator id>.pub`` (a bundle's ``trusted/``):
    each key speaks only for the coordinator it is named after. Default: pin each peer's first key."""
    keepalive_s: int = KEEPALIVE_S
    """The MQTT keepalive (``--keepalive``; :data:`~edge_sdk.mqtt.KEEPALIVE_HELP` says what it trades)."""
    status_interval_s: float = 30.0
    """Republish the retained status (``published_at``) at least this often: a liveness beat."""
    require_pull: bool = True
    """Refuse an update from a device served no training model since its last accepted one, whatever
    the strategy (``CoordinatorConfig.require_pull``; ``--accept-unpulled-updates`` turns it off)."""
    auth: BrokerAuth | None = None
    """Broker credentials for an ``mqtts://`` broker (default: the bundle's, if any)."""
    bundle: Path | None = None
    """Provisioning bundle (``edgeci pki issue --role coordinator``): broker credentials, its
    ``signing.key`` (used unless ``signing_key`` is given) and ``trusted/`` peer keys."""
    validation: Path | None = None
    """Operator validation set (.npz with x, y): turns the release gate on."""
    gate_margin: float = 0.02
    """Promote a candidate unless its validation accuracy is this much below the release's."""
    rollback_margin: float = 0.10
    """Reject a candidate and roll the training line back when it is this much worse."""
    gate_z: float = 1.0
    """The gate's one-sided bound on the paired accuracy difference (``GateConfig.paired_z``)."""
    canary: float = 0.0
    """Federated evaluation: share of recently seen devices asked to score each candidate
    (test-then-train, see :mod:`coordinator.canary`); 0 = off. Turns the gate on by itself."""
    canary_samples: int = 20
    """New labels each canary device scores per candidate."""
    canary_max_per_device: int = 0
    """Most labels one device's report may count (0: ``canary_samples``)."""
    canary_min_reports: int = 3
    """Devices whose reports must be in before the canary evidence decides (>= 3: the most
    favourable and the most unfavourable report are dropped before pooling)."""
    canary_deadline_s: float = 600.0
    """A canary round lasts at most this long; then the reports that came in decide."""
    release_announce_s: float = 30.0
    """A new release is announced to the region's devices (the retained recall) at most this often."""
    release_spread_s: int = 0
    """Idle devices fetch each new release over at least this many seconds (sent with the recall; 0:
    each device's own ``release_spread_s``, the SDK's default 300 s)."""
    operator_keys_dir: Path | None = None
    """Folder of operator ``*.pub`` keys allowed to sign control commands (besides our own key)."""
    conversion_deadline_s: float = 60.0
    """Converting staleness policies: a conversion not back within this falls back to damping."""
    conversion_history: int = 48
    """Converting policies: past versions kept in memory; staler updates cannot be converted (damped, counted)."""
    inversion_params: Mapping[str, Any] = field(default_factory=dict)
    """gradient-inversion: ``coordinator.inversion.InversionConfig`` fields (iterations, time_budget_s, ...)."""

    @property
    def own_id(self) -> str:
        """The coordinator's id: ``coordinator_id``, else ``coord-<region>``."""
        return self.coordinator_id or f"coord-{self.region}"


ACTOR_STOP_S = 10.0
"""How long :meth:`CoordinatorDaemon.stop` waits for the actor to finish; after that the state
dir is left locked and its files open (the process's exit releases them), never closed under it."""

OUTAGE_HELD_ACKS = 16
"""PUBACKs of messages refused while storage fails that are withheld until it works again (see
CoordinatorDaemon._withhold_while_failing): below mosquitto's default in-flight window (20), so
the broker keeps delivering the rest."""


def kept_signing_key(options: CoordinatorOptions) -> Path | None:
    """The signing key kept apart from the state dir: ``--signing-key``, else the bundle's
    ``signing.key`` if it has one; None: the state dir's own."""
    bundled = options.bundle / "signing.key" if options.bundle is not None else None
    return options.signing_key or (bundled if bundled is not None and bundled.exists() else None)


def canary_config(options: CoordinatorOptions) -> CanaryConfig | None:
    """``--canary`` and its settings (None: off); a ConfigError names what is wrong (also
    `edgeci coordinator`'s check before it connects: an exit 2, not 1 after the connection)."""
    if not 0 <= options.canary <= 1:
        raise ConfigError(f"--canary must be a fraction in [0, 1] (0 = off), got {options.canary}")
    if options.canary == 0:
        return None
    return CanaryConfig(fraction=options.canary, samples=options.canary_samples, max_per_device=options.canary_max_per_device,
                        min_reports=options.canary_min_reports, deadline_s=options.canary_deadline_s,
                        recent_s=max(600.0, options.canary_deadline_s))


class CoordinatorDaemon:
    """Start with :meth:`start`, stop with :meth:`stop` (SIGTERM handler in the CLI)."""

    def __init__(
        self,
        options: CoordinatorOptions,
        *,
        task: Task | None = None,
        clock: Clock | None = None,
        on_commit: Callable[[int, Vector], None] | None = None,
        on_release: Callable[[int, Vector], None] | None = None,
        converter: Converter | None = None,
    ) -> None:
        self.options = options
        self.task = task or get_task(options.model)
        self.clock = clock or WallClock()
        self.on_commit = on_commit
        self.on_release = on_release
        self.validator: Validator | None = None
        self._converter = converter
        self.conversions: ConversionWorker | None = None
        self._tickets = itertools.count(1)  # one source for every core this daemon builds (CoordinatorCore's tickets)
        operator_dir = options.operator_keys_dir or (options.bundle / "operators" if options.bundle is not None else None)
        # operators/<name>.pub: the key that may sign control commands in that name
        self.operators = load_named_keys(operator_dir) if operator_dir is not None and Path(operator_dir).is_dir() else {}
        self.coordinator_id = options.own_id
        peer_dir = options.peer_keys_dir or (options.bundle / "trusted" if options.bundle is not None else None)
        self.peer_keys = load_named_keys(peer_dir) if peer_dir is not None and Path(peer_dir).is_dir() else {}
        # Before anything is written: the state dir (lock, signing key) and, for an empty
        # one, its pretraining (minutes) and first version.
        self._check_options()
        self.registry = Registry(options.state_dir, self.task.spec, keep_versions=options.keep_versions, background_prune=True)
        try:
            self.registry.acquire_lock()  # a second coordinator on this state dir stops here
            self.signer = self._signing_key()
            self.core = self._build_core(self._initial_snapshot())
        except BaseException:
            self.registry.close()
            raise
        # Group commit (driver state, actor thread only): accepted updates of the batch wait
        # in _log; once the batch has one, every later action waits in _held until the log
        # is fsynced at the end of the batch (or before a commit). See _perform.
        self._log: list[BufferedUpdate] = []
        self._held: list[object] = []
        self._discarding = False
        self._rebuild: str | None = None
        self._status_due = False
        self._storage_ok = True
        self.storage_failures = 0
        self.storage_relapses = 0
        """Storage failures within STORAGE_STABLE_S of a recovery (each doubles the wait before the next one)."""
        self._relapses = 0  # in a row: the current backoff's exponent
        self._recovered_at = -math.inf  # (_monotonic) when storage last recovered
        self.probe_copies = 1
        """Models the last commit wrote (the version, and the strategy's arrays beside it): the probe's size."""
        self._resume_at = -math.inf  # (_monotonic) no recovery before this, whatever the probe says
        self.publish_failures = 0
        """Publishes the transport refused (logged; the batch's other actions still ran)."""
        self.core_failures = 0
        """Events the core raised on (the core was rebuilt from the durable state each time)."""
        self._last_status: bytes | None = None
        """The last status JSON published (durable by then), unstamped: the final one repeats it."""
        self._probe_stop = threading.Event()
        self._probe_thread = threading.Thread(target=self._probe_loop, name=f"storage-probe-{options.region}", daemon=True)
        # ops: metrics snapshot after handled events, liveness stamps and last will on the status topic
        self.metrics = CoordinatorMetrics(problems=self._problems, connected=lambda: self.transport.connected,
                                          state_dir=Path(options.state_dir))
        self.metrics.count_from(self.core.status())  # Prometheus counters count from this process's start
        self._status_topic = topics.status_topic(options.region)
        self._instance = secrets.token_hex(6)
        """This process, in every status it publishes: another process's live status is another coordinator."""
        self._started_at = float("inf")
        self._others: set[tuple[str, str]] = set()
        self._stamps: dict[str, float] = {}
        """The newest status stamped before our start, by process (see :meth:`_seen_status`)."""
        self.duplicate_coordinators = 0
        """Other live coordinators seen publishing this region's status (each said at ERROR once)."""
        self._snapshot_at = 0.0
        self._closing = threading.Event()
        self._status_lock = threading.Lock()
        """Stamping and publishing a status (actor) and stop()'s final one (its caller's thread):
        a status stamped alive before stop() began went out after its final ``alive: false``."""
        self._rejected = RejectedLog(exempt=options.peers)
        self._peer_watch = PeerWatch()
        # One thread reads, handles and answers (own_loop): the actor drives paho's loop.
        self.transport = MqttTransport(
            options.broker,
            client_id=self.coordinator_id,
            subscriptions=[*self.core.subscriptions(), self._status_topic],  # (its own: another coordinator's too)
            on_message=self._on_message,
            will=(self._status_topic, status_will(options.region, self.coordinator_id, self._instance)),
            auth=options.auth or (BrokerAuth.from_bundle(options.bundle) if options.bundle is not None else None),
            own_loop=True,
            on_connection=self._on_connection,
            manual_ack=True,
            keepalive=options.keepalive_s,
            reconnect_max_s=COORDINATOR_RECONNECT_MAX_S,  # every device waits on it: back soon after a flapping link settles
        )
        self._acks: list[HeldAck] = []
        """PUBACKs of the batch's messages (actor thread): sent at its end, once what it changed is durable."""
        self._redeliver = False
        """The batch dropped what a message changed (storage failed): its PUBACKs are withheld (see _end_batch)."""
        self._in_hand: HeldAck | None = None
        """The PUBACK of the message whose event is being handled (actor thread; see _perform)."""
        self._outage_acks: dict[object, HeldAck] = {}
        """PUBACKs of messages refused while storage fails, by device, withheld until it works again (see _withhold_while_failing)."""
        self._withhold = False
        """The batch dropped what a message changed while storage was failing already: its PUBACKs are withheld until it works
        again, then redelivered (see _end_batch): one redelivery per outage, not a reconnect per batch."""
        self._outage_batches: list[HeldAck] = []
        """PUBACKs of such batches (actor thread), redelivered by the recovery."""
        self._after_batch: list[Callable[[], None]] = []
        """Called once the batch's PUBACKs are sent (actor thread; see _settle)."""
        self._loads = 0
        """Versions read for an operator's rollback or pin whose :class:`VersionLoaded` event is still queued (actor thread)."""
        self._after_loads: list[HeldAck] = []
        """PUBACKs held until no such read is pending (see _end_batch)."""
        self._announced = False
        """start() announced the status and recall; a later connection is a reconnect."""
        self._core_started = False
        """The core's start() ran (actor thread): before it, no event reaches the core (see _start_core)."""
        self.actor = Actor(
            f"coordinator-{options.region}", self._handle, self._perform, clock=self.clock,
            on_batch_end=self._end_batch, max_batch=options.max_batch, io=self.transport,
        )
        self.stopped = threading.Event()

    def _problems(self) -> dict[str, int]:
        """For the metrics endpoint (its thread): counters that only ever grow."""
        return {"publish_refused": self.publish_failures, "storage_failures": self.storage_failures,
                "storage_relapses": self.storage_relapses,
                "duplicate_coordinator": self.duplicate_coordinators,
                "core_failures": self.core_failures,
                "messages_dropped": getattr(self.transport, "dropped_messages", 0),
                "malformed_packets": getattr(self.transport, "malformed_packets", 0),
                "unsubscribed": getattr(self.transport, "unsubscribed_messages", 0),
                "actor_errors": self.actor.error_count}

    def _signing_key(self) -> Signer:
        """The model-signing key: ``--signing-key`` (e.g. from a PKI bundle), else the state
        dir's own ``signing.key``, created (0600) on first start."""
        path = kept_signing_key(self.options) or Path(self.options.state_dir) / "signing.key"
        signer, created = load_or_create_signer(path)
        log.info("%s model-signing key %s (%s)%s", "created" if created else "using", signer.kid, path,
                 ": devices without a provisioned key will pin it on first use" if created else "")
        return signer

    def _build_core(self, snapshot: Snapshot) -> CoordinatorCore:
        """A core resumed from ``snapshot`` with a fresh strategy and peering, as at a restart."""
        options = self.options
        method = make_method(  # strategy + peering, checked together (coordinator/methods.py)
            options.strategy,
            peering=options.peering,
            coordinator_id=self.coordinator_id,
            ring=options.peers or (self.coordinator_id,),
            strategy_params=daemon_strategy_params(options.strategy, options.strategy_params),
            peering_params=options.peering_params,
        )
        strategy, peering = method.strategy, method.peering
        # A converting staleness policy needs the base version of the stale updates it converts: the
        # core keeps conversion_history versions, and a restart hands it as many (the registry's
        # load reads HISTORY_VERSIONS: before, 7 of 48 came back and every update staler than that
        # fell back to the damped update until 48 new versions were made).
        keep = options.conversion_history if needs_driver(policy_of(strategy)) else 8
        if keep - 1 > len(snapshot.history):
            snapshot = dataclasses.replace(snapshot, history=self.registry.read_history(snapshot.version, keep - 1))
        core = CoordinatorCore(
            CoordinatorConfig(
                region=options.region,
                coordinator_id=self.coordinator_id,
                spec=self.task.spec,
                encoding=options.encoding,
                hints=dict(options.hints),
                full_sync_every=options.full_sync_every,
                signer=self.signer,  # every model and peer message is signed
                peer_keys=self.peer_keys,
                gate=GateConfig(margin=options.gate_margin, rollback_margin=self._rollback_margin(),
                                paired_z=options.gate_z, validation=options.validation is not None,
                                canary=canary_config(options),
                                validation_set=self._validation_set)
                if options.validation is not None or options.canary > 0 else None,
                operators=self.operators,
                require_pull=options.require_pull,
                conversion=ConversionConfig(deadline_s=options.conversion_deadline_s),
                status_payload=False,  # the status JSON is built once per batch (_end_batch), not per version
                announce_start=True,  # deferred devices pull again at once after a restart (Recall.started)
                announce_releases=True,  # idle devices hear of each release (Recall.release), not an hour later
                release_spread_s=options.release_spread_s,
                release_announce_s=options.release_announce_s,
                keep_versions=keep,
            ),
            strategy,
            snapshot,
            rng=random.Random(options.seed),
            tickets=self._tickets,
            peering=peering,
        )
        # The gate may promote any version the core still holds (a canary round lasts minutes;
        # a converting policy keeps 48): the registry must not have pruned its directory by then.
        self.registry.keep_versions = max(options.keep_versions, core.config.keep_versions)
        return core

    def _rollback_margin(self) -> float:
        """At least the gate margin (a candidate between the two is held, so they cannot cross)."""
        return max(self.options.rollback_margin, self.options.gate_margin)

    def _check_options(self) -> None:
        """Refuse bad strategy/peering parameters, --inversion fields and --validation files
        now, with the ConfigError the later use would raise — not after pretraining."""
        options = self.options
        check_keepalive(options.keepalive_s, "--keepalive")
        canary_config(options)
        check_canary_task(self.task, options.canary)  # a detector's devices send no reports: every candidate was held
        make_method(options.strategy, peering=options.peering, coordinator_id=self.coordinator_id,
                    ring=options.peers or (self.coordinator_id,),
                    strategy_params=daemon_strategy_params(options.strategy, options.strategy_params),
                    peering_params=options.peering_params, full_sync_every=options.full_sync_every)
        if self.peer_keys and options.peering not in (None, "none"):
            # With provisioned keys a peer without one is never heard: every message of its is refused.
            missing = [p for p in options.peers if p != self.coordinator_id and p not in self.peer_keys]
            if missing:
                where = options.peer_keys_dir or (Path(options.bundle) / "trusted" if options.bundle is not None else "?")
                raise ConfigError(
                    f"--peers names {', '.join(map(repr, missing))} but {where} holds no key for "
                    f"{'it' if len(missing) == 1 else 'them'} ({', '.join(p + '.pub' for p in missing)}): its messages would "
                    f"all be refused. Issue {'it' if len(missing) == 1 else 'them'} (`edgeci pki issue --role coordinator`), "
                    "run `edgeci pki trust --dir PKI` and copy this bundle again")
        if options.inversion_params:
            inversion_config(**dict(options.inversion_params))
        # Loaded once: the set the validator scores on is the one the gate's floor is fingerprinted by.
        self._validation = load_validation(options.validation, self.task) if options.validation is not None else None
        self._validation_set = fingerprint(self._validation) if self._validation is not None else ""

    def _initial_snapshot(self) -> Snapshot:
        snap = self.registry.load()
        if snap is not None:
            log.info("resuming from %s at version %d (%d pending updates)", self.registry.root, snap.version, len(snap.buffer))
            return snap
        if self.options.init is not None:
            _, weights, _ = load_model(self.options.init, expect=self.task.spec)
            source = str(self.options.init)
        else:
            log.info("empty state dir: pretraining the deployed %s model", self.task.name)
            weights, source = self.task.pretrained(seed=self.options.seed), f"pretrained:{self.task.name}"
        self.registry.initialise(weights, now=self.clock.now(), source=source)
        loaded = self.registry.load()
        assert loaded is not None
        return loaded

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = START_TIMEOUT_S) -> CoordinatorDaemon:
        self._started_at = self.clock.now()
        if self._validation is not None:
            split = self._validation
            self.validator = Validator(self.task, split, self.actor.submit).start()
            log.info("release gate on: candidates are scored on %d validation samples (%s), margin %.3f, rollback margin %.3f%s",
                     len(split), self.options.validation, self.options.gate_margin, self._rollback_margin(),
                     " (raised to the gate margin)" if self._rollback_margin() != self.options.rollback_margin else "")
        elif self.options.canary <= 0:
            log.info("release gate off: every new version is released to the devices untested "
                     "(--validation FILE and/or --canary FRACTION test it before release)")
        if self.options.canary > 0:
            log.info("canary evaluation on: %.0f%% of recent devices (at least %d) score each candidate on %d new labels "
                     "(test-then-train), margin %.3f", 100 * self.options.canary, self.options.canary_min_reports,
                     self.options.canary_samples, self.options.gate_margin)
        if self.core.conversion_policy == "gradient-inversion":
            converter = self._converter
            if converter is None:
                from coordinator.inversion import make_inverter  # needs torch (the [train] extra)

                converter = make_inverter(self.task, self.task.spec, **dict(self.options.inversion_params))
            self.conversions = ConversionWorker(converter, self.actor.submit, self.clock.now).start()
            log.info("staleness policy gradient-inversion: updates staler than %g versions are converted on a worker "
                     "(deadline %.0f s, then damped)", getattr(converting_policy(policy_of(self.core.strategy)), "beyond", float("nan")),
                     self.options.conversion_deadline_s)
        self.actor.start()
        self._probe_thread.start()
        self.transport.start(timeout)
        self.actor.call(lambda: self._start_core(self.clock.now()))  # (at once if the broker delivered nothing yet)
        self._announced = True
        self.actor.call(self._refresh_snapshot)
        threading.Thread(target=self._beat, name=f"status-beat-{self.options.region}", daemon=True).start()
        log.info(
            "coordinator %s serving %s v%d on %s (strategy %s, peering %s)",
            self.coordinator_id, self.task.spec.model_id, self.core.version, self.options.broker, self.core.strategy.describe(),
            self.options.peering,
        )
        need = self.core.strategy.devices_per_round()
        if need is not None:  # (fedadam with its default select waited silently for 20 devices)
            log.info("%s starts a round only once %d devices wait with new data (%s; --param %s=N to change it): "
                     "until then their pulls are deferred", self.core.strategy.name, need[0], need[1], need[1])
        return self

    def stop(self, *, drain: bool = True) -> None:
        """Stop serving. ``drain=False`` (SIGTERM) abandons queued events after the batch in
        hand: nothing unacknowledged is lost (devices retry), and a backlog cannot delay it."""
        if self.stopped.is_set():
            return
        with self._status_lock:  # (an alive status the actor is stamping goes out before this one)
            self._closing.set()  # from here on every status says alive: false
            # The last status that went out, not the metrics snapshot: that is refreshed before the
            # batch's fsync, so it may name a version that never becomes durable (the next run would
            # then publish other weights under that number).
            last = self._last_status
            if last is not None and self.transport.connected:  # straight out: _perform is the actor's
                self.transport.publish(self._status_topic, stamp_status(
                    last, alive=False, now=self.clock.now(), heartbeat_s=self.options.status_interval_s,
                    reason="stopped", instance=self._instance), qos=1, retain=True)
        self._probe_stop.set()
        if drain:
            self._settle(ACTOR_STOP_S)
        self.transport.stop()
        if self.validator is not None:
            self.validator.stop()
        if self.conversions is not None:
            self.conversions.stop()
        self.actor.stop(ACTOR_STOP_S, drain=drain)
        if self.actor.alive:  # still in an event (a long backlog with drain): it may write yet
            log.error("the actor did not stop within %.0f s; the state dir stays locked until this process exits", ACTOR_STOP_S)
        else:
            self.registry.close()  # (only the actor's thread touches the registry while it runs)
        self.stopped.set()

    def _settle(self, timeout: float) -> None:
        """stop(drain): the actor handles what is queued and sends its PUBACKs while still
        connected (up to ``timeout``). Once the transport disconnects, held PUBACKs are void: what
        the drain handled after it would come back from the broker to the next start as
        duplicates (refused, counted, logged). The transport's own wait for the final status's
        PUBACK covered a backlog only up to its STOP_DRAIN_S."""
        if not self.actor.alive or self.actor.on_thread:
            return
        settled = threading.Event()
        self.actor.call(lambda: self._after_batch.append(settled.set))
        if not settled.wait(timeout):
            log.warning("the backlog was not handled within %.0f s: what is handled after the disconnect comes "
                        "back from the broker at the next start (refused as duplicates)", timeout)

    def __enter__(self) -> CoordinatorDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ IO

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self._status_topic:
            self._seen_status(payload)
            # Nothing to make durable, but its PUBACK must not overtake those held before it (MQTT
            # 3.1.1 [MQTT-4.6.0-2]: PUBACKs in the order of the PUBLISHes). Sent at once, ahead of
            # them (our own retained status, read back), it let mosquitto 2.0.11 send a message that
            # had just arrived before those it had queued for us: a device's older updates came after
            # a newer one and were refused as duplicates. It leaves with the batch's PUBACKs.
            held_status = self.transport.hold_ack()
            if held_status is not None:
                self.actor.call(lambda: self._acks.append(held_status))
            return
        held = self.transport.hold_ack()
        if held is None:  # QoS 0
            self.actor.submit(lambda now: MessageReceived(now=now, topic=topic, payload=payload, wall=self._wall()))
            return

        def received(now: float) -> MessageReceived:  # handled now: acknowledged at the batch's end
            self._acks.append(held)
            self._in_hand = held
            return MessageReceived(now=now, topic=topic, payload=payload, wall=self._wall())

        self.actor.submit(received)

    def _wall(self) -> float | None:
        """The system clock (``WallClock.wall``), for the core's control window; None: a clock without one."""
        wall = getattr(self.clock, "wall", None)
        return float(wall()) if callable(wall) else None

    def _seen_status(self, payload: bytes) -> None:
        """A status on this region's topic from another live process (not ours, not a status or
        last will retained from before we started; stamped before our start, only once a newer
        one of that process arrives): two coordinators answer the same devices
        and split the fleet (each its own versions and signing key). Said at ERROR once per
        process, counted (``duplicate_coordinator`` in /metrics); nothing else changes."""
        if len(payload) > MAX_STATUS_BYTES:
            return
        try:
            status = parse_status_json(payload)
        except EdgeciError:
            return
        instance, published = status.get("instance"), status.get("published_at")
        if instance == self._instance or status.get("alive") is not True or not isinstance(published, int | float) \
                or isinstance(published, bool):
            return
        if published < self._started_at:
            # Stamped before this process started by this host's clock: retained from before we
            # started, or published now by a coordinator whose clock is behind ours (helper-153:
            # unnoticed for as long as it is behind). A newer status of that process says it is live.
            process = str(instance)[:40]
            last = self._stamps.get(process)
            if last is not None or len(self._stamps) < 64:
                self._stamps[process] = published if last is None else max(last, published)
            if last is None or published <= last:
                return
        key = (str(status.get("coordinator", "?"))[:100], str(instance)[:40])
        if key in self._others or len(self._others) >= 64:
            return
        self._others.add(key)
        self.duplicate_coordinators += 1
        log.error("another coordinator (id %r, process %s) is live on the status topic of region %r while this one (id %r) runs: "
                  "two coordinators on one region answer the same devices with different versions and keys; stop one of them",
                  key[0], key[1], self.options.region, self.coordinator_id)

    def _start_core(self, now: float) -> None:
        """Actor thread: the core's start() (status, recall, timers, the regate that resumes a
        recorded canary round, what the restore left to record), once, before any event.

        The session is persistent: the broker delivers what it kept for us while we were down
        as soon as we connect, while :meth:`start` still waits for the SUBACK — before its own
        call to start the core is queued. Those messages are in the inbox first; the first of
        them starts the core here, on its own time stamp, before the core sees it (their
        canary fetches and reports find the recorded round resumed). Only the order on the actor
        thread changes: no message is held back, so their PUBACKs leave as before."""
        if self._core_started:
            return
        self._core_started = True
        self.actor.run_actions(self.core.start(now))

    def _handle(self, event: Any) -> list[Any]:
        """Actor thread: the core handles the event; then the metrics snapshot is refreshed
        (at most every 0.2 s; the beat refreshes an idle one every second)."""
        if not isinstance(event, MessageReceived):
            self._in_hand = None  # (received() set it for a message)
        if not self._core_started:  # a message the broker kept for us, before start()'s own call
            try:
                self._start_core(event.now)
            except Exception as exc:  # as if in the event: rebuilt (and so started) before it
                self._core_failed(exc)
        if self._rebuild is not None:  # storage failed in the previous event (see _perform)
            self._rebuild_core()
        self._discarding = False
        if self._rebuild is not None:  # the durable state cannot even be read: answer nothing (the broker sends it again)
            if self._storage_ok:
                self._redeliver = True
            else:
                self._withhold = True  # (once it works again: no reconnect per batch meanwhile)
            return []
        t0 = time.perf_counter()
        try:
            actions = self.core.handle(event)
        except Exception as exc:
            self._settle_earlier()
            self._core_failed(exc)
            raise  # the actor logs and counts it
        t1 = time.perf_counter()
        if any(isinstance(a, CommitVersion) for a in actions):
            self.metrics.aggregation_seconds.observe(t1 - t0)
        if t1 - self._snapshot_at >= 0.2:  # status() costs ~25 us: not on every event under load
            self._refresh_snapshot()
        return actions

    def _refresh_snapshot(self) -> None:
        self._snapshot_at = time.perf_counter()
        self.metrics.publish(self.core.status())

    def _on_connection(self, up: bool) -> None:
        """A reconnect: status and recall again at once, not at the next beat or version (the
        broker's last will said ``alive: false``, and devices that can fail over leave on it; a
        broker restarted without persistence holds neither)."""
        if up and self._announced:
            self.actor.call(lambda: self.actor.run_actions(self.core.reannounce(self.clock.now())))

    def _beat(self) -> None:
        """Refresh the snapshot every second and republish the status every status_interval_s."""
        last = time.monotonic()
        while not self._closing.wait(1.0):
            if time.monotonic() - last >= self.options.status_interval_s:
                last = time.monotonic()
                self.actor.call(lambda: self._perform(
                    Publish(topic=self._status_topic, payload=status_json(self.core.status()), qos=1, retain=True)))
            self.actor.call(self._refresh_snapshot)
            self.actor.call(self._flush_rejected)
            self.actor.call(self._check_peers)

    def _perform(self, action: object) -> None:
        """Actor thread. Group commit: an accepted update is appended to the batch's log;
        from then on every action of the batch is held until the log is fsynced (at the end
        of the batch, or before a commit). A storage failure drops what was held."""
        if self._discarding:
            return  # the rest of an event whose storage write failed
        if isinstance(action, PersistUpdate):
            self._log.append(action.update)
        elif isinstance(action, CommitVersion):
            self.probe_copies = 1 + len(action.arrays)
            try:  # into the log after the batch's updates, without fsync: the batch's one fsync covers it
                self.registry.stage(self._log)
                self.registry.stage_version(action)
                self._log = []
            except OSError as exc:
                self._storage_failed(f"writing version {action.version}: {exc}")
                return
            self._held.append(action)  # the directory, logs and on_commit after the fsync
        elif self._log or self._held:
            self._held.append(action)  # after an update or a version that is not durable yet
        else:
            self._do(action)

    def _flush_log(self) -> None:
        if self._log or self.registry.unflushed:
            self.registry.append_updates(self._log)  # one write, one fsync (also of staged versions)
            self._log = []

    def _end_batch(self) -> None:
        """Actor thread, after each batch: one fsync for the batch's updates, its held actions,
        then the PUBACKs of its messages. Where storage failed, what the batch's messages changed
        was dropped: no PUBACK of theirs leaves, the connection is closed and the broker delivers
        them again (the persistent session) once we reconnect; whatever of them was durable
        comes back as a duplicate, which the core refuses. Where storage was failing already (an
        outage) they are withheld instead and redelivered by the recovery (_storage_recovered):
        one reconnect per outage, not one per batch. An event the core raised on is
        acknowledged (the core was rebuilt; the same message would fail it again), and so is a
        batch whose end raised other than by a storage failure (a bug, handled as if the core had
        raised: redelivered, the same message would fail again, a connection loop with the batch's
        unwritten updates kept for every later batch)."""
        try:
            self._finish_batch()
        except Exception as exc:
            self._core_failed(exc)  # (drops the log and held actions that failed: no later batch retries them)
            self._rebuild_core()
            raise  # the actor logs and counts it
        finally:
            acks, self._acks = self._acks, []
            redeliver, self._redeliver = self._redeliver, False
            withhold, self._withhold = self._withhold, False
            if self._loads and not (redeliver or withhold):
                # An operator's rollback or pin commits its version in a later event (the VersionLoaded
                # that the read queued): its PUBACK, and those after it (in order), wait for that
                # event's batch. Sent here, a crash before the commit lost the command.
                self._after_loads += acks
                acks = []
            else:
                acks, self._after_loads = self._after_loads + acks, []
            if redeliver and acks:
                self.transport.redeliver()
            elif withhold and acks:  # (those of an earlier connection are void: their messages came back)
                self._outage_batches = [h for h in self._outage_batches if self.transport.is_current(h)] + acks
            else:
                self.transport.ack(acks)
            settled, self._after_batch = self._after_batch, []
            for done in settled:  # (see _settle)
                done()

    def _finish_batch(self, *, status: bool = True) -> None:
        if self._rebuild is None:
            try:
                self._flush_log()
            except OSError as exc:
                self._storage_failed(f"appending to the pending log: {exc}")
        if self._rebuild is not None:
            self._rebuild_core()
            return
        held, self._held = self._held, []
        for i, action in enumerate(held):
            try:
                self._do(action)
            except OSError as exc:  # a version directory (the version itself is durable in the log)
                self._held = held[i + 1:]
                self._storage_failed(f"writing version {getattr(action, 'version', '?')}'s directory: {exc}")
            if self._rebuild is not None:  # nothing after a storage failure leaves
                self._held = []
                self._rebuild_core()
                return
        if self._status_due and status:  # the core asked for a status (new version, or due): the batch's last state, once
            self._status_due = False
            self._do(Publish(topic=self._status_topic, payload=status_json(self.core.status()), qos=1, retain=True))

    def _withhold_while_failing(self, refusal: Mapping[str, Any]) -> None:
        """A message refused while storage fails may be refused because of it (a canary report:
        the recorded round is not resumed until storage works; a device sends its report once
        and gets no answer): its PUBACK is withheld and, once storage works again, the connection
        is closed so that the broker delivers it to the recovered core (see _storage_recovered).
        At most OUTAGE_HELD_ACKS, below the broker's in-flight window, which they keep taken:
        beyond that they are acknowledged as before. Only a refusal the outage can cause
        (canary_unknown_candidate) and one per device: messages refused for good (malformed bytes,
        which anyone on a trial broker can send) or a device's flood must not take the places
        of the reports they are kept for."""
        held = self._in_hand
        if self._storage_ok or held is None or held not in self._acks or refusal.get("reason") != UnknownCandidate.reason:
            return
        # Those of an earlier connection are void (a reconnect in the outage): their messages came
        # back, refused again, and may take their places now.
        self._outage_acks = {d: h for d, h in self._outage_acks.items() if self.transport.is_current(h)}
        device = refusal.get("device")
        if device in self._outage_acks or len(self._outage_acks) >= OUTAGE_HELD_ACKS:
            return
        self._acks.remove(held)
        self._outage_acks[device] = held

    def _settle_earlier(self) -> None:
        """The core raised on an event (it returned no actions): what the batch's earlier events
        hold for durability came from the core before it failed, so it is made durable and
        performed now, as if the batch had ended before this event; then the core is rebuilt.
        Dropped with the batch instead, it was lost where no retry comes: a canary report's record
        held behind an update's fsync, its PUBACK sent at the batch's end all the same. A
        failure here (storage: see _finish_batch; a bug) drops what is left, as before."""
        if self._rebuild is not None or not (self._log or self._held or self.registry.unflushed):
            return
        try:
            self._finish_batch(status=False)
        except Exception:
            log.exception("making the batch's earlier events durable before the core's rebuild failed")

    def _core_failed(self, exc: BaseException) -> None:
        """The core raised part-way through an event: its memory may no longer match what is
        durable (an update counted as applied, a buffer cleared). Nothing of the batch that
        waited for durability leaves (its devices ask again) and the core is rebuilt from the
        durable state before anything else, exactly as at a restart."""
        self.core_failures += 1
        log.error("the core failed handling an event (%s: %s); dropping %d unacknowledged updates and %d held "
                  "actions and rebuilding it from %s", type(exc).__name__, exc, len(self._log), len(self._held), self.registry.root)
        self._abandon_batch(f"core error ({type(exc).__name__})")

    def _storage_failed(self, detail: str) -> None:
        """Nothing that waited for durability may leave: drop it, rebuild the core next."""
        log.error("storage failure: %s; dropping %d unacknowledged updates and %d held actions, "
                  "deferring updates until storage works again", detail, len(self._log), len(self._held))
        self.storage_failures += 1
        if self._storage_ok:
            self._redeliver = True  # the batch's messages come back at once, to the core of the outage
            detail = self._storage_down(detail)
        else:
            self._withhold = True  # already in an outage: once storage works again
        self._abandon_batch(detail)

    def _storage_down(self, detail: str) -> str:
        """Storage works no more: a relapse if it recovered within STORAGE_STABLE_S, and then
        the probe's next success is taken no sooner than the doubled backoff. The ``detail``
        the status shows (StorageChanged), saying so."""
        self._storage_ok = False
        now = _monotonic()
        since = now - self._recovered_at
        if since >= STORAGE_STABLE_S:
            self._relapses = 0
            self._resume_at = -math.inf
            return detail
        self._relapses += 1
        self.storage_relapses += 1
        wait = min(max(self.options.storage_probe_s, STORAGE_BACKOFF_MAX_S), self.options.storage_probe_s * 2 ** self._relapses)
        self._resume_at = now + wait
        log.error("storage failed again %.1f s after it recovered (%d time(s) in a row): a write larger than the probe's "
                  "(%d bytes) on a nearly full disk, or one file that cannot be written? Resuming no sooner than %.0f s from "
                  "now (doubling up to %.0f s); updates are deferred meanwhile", since, self._relapses,
                  probe_bytes(self.task.spec.size, self.probe_copies), wait, STORAGE_BACKOFF_MAX_S)
        return f"failed again {since:.0f} s after recovering ({self._relapses}x; next try in {wait:.0f} s): {detail}"

    def _abandon_batch(self, reason: str) -> None:
        """Drop what the batch held for durability (the rest of the event's actions too) and
        rebuild the core from the durable state before the next event."""
        self._log, self._held = [], []
        self._discarding = True
        self._rebuild = reason

    def _rebuild_core(self) -> None:
        """Replace the core by one rebuilt from the durable state, exactly as at a restart.

        While storage fails the core gets no buffered updates (they stay in the log), so it
        has nothing to aggregate and never tries to commit; they come back on recovery.
        """
        detail = self._rebuild or ""
        if self._storage_ok and self.registry.unflushed:
            # An earlier event of the abandoned batch staged a version (in the log, not fsynced):
            # load() reads it, and the rebuilt core announces it. Durable first; a failed fsync cuts it.
            try:
                self.registry.flush()
            except OSError as exc:
                self._storage_failed(f"flushing the log before the rebuild: {exc}")
                detail = self._rebuild or detail
        self._discarding = False
        try:
            snapshot = self.registry.load()
        except (OSError, RegistryError) as exc:
            log.error("storage failure: cannot reload %s (%s); dropping events until it can", self.registry.root, exc)
            if self._storage_ok:  # the probe tries again (and paces the redeliveries: see _handle)
                self._storage_down(f"cannot reload: {exc}")
            return
        assert snapshot is not None
        if not self._storage_ok:
            snapshot = dataclasses.replace(snapshot, buffer=())
        self.core = self._build_core(snapshot)
        self._rebuild = None
        now = self.clock.now()  # (storage first: start() leaves what would write to a failing disk for later)
        self.actor.run_actions(self.core.handle(StorageChanged(now=now, ok=self._storage_ok, detail=detail)))
        self._core_started = True  # (its own start: a rebuild before the first start is that start)
        self.actor.run_actions(self.core.start(now))
        log.warning("core rebuilt from %s at version %d; storage %s", self.registry.root, self.core.version,
                    "ok" if self._storage_ok else f"failing ({detail})")

    def _probe_loop(self) -> None:
        """Probe thread: while storage fails, try a model-sized write + fsync every few seconds
        (a warning at most every :data:`STORAGE_WARN_EVERY_S`, with the failed probes since)."""
        failed, warned_at = 0, -math.inf
        while not self._probe_stop.wait(self.options.storage_probe_s):
            if self._storage_ok:
                failed, warned_at = 0, -math.inf
                continue
            try:
                self.registry.probe(probe_bytes(self.task.spec.size, self.probe_copies))
            except OSError as exc:
                failed += 1
                if (now := _monotonic()) - warned_at >= STORAGE_WARN_EVERY_S:
                    warned_at = now
                    log.warning("storage still failing (%d probe(s) since it failed): %s", failed, exc)
                else:
                    log.debug("storage still failing: %s", exc)
                continue
            self.actor.call(self._storage_recovered)

    def _storage_recovered(self) -> None:
        """Actor thread: the probe worked; resume from the durable state, buffer included (after
        a relapse only once its backoff has passed: see :meth:`_storage_down`)."""
        if self._storage_ok:
            return
        if (left := self._resume_at - _monotonic()) > 0:
            log.debug("the storage probe works; resuming in %.0f s (backoff after a relapse)", left)
            return
        log.warning("storage works again: resuming")
        self._storage_ok = True
        self._recovered_at = _monotonic()
        self._rebuild = "recovered"
        self._rebuild_core()
        if not self._storage_ok:
            return  # the reload failed: still failing (_rebuild_core said why)
        withheld = [h for h in self._outage_batches if self.transport.is_current(h)]
        self._outage_batches = []
        if self._outage_acks or withheld:  # refused or dropped during the outage: the broker delivers them again, to this core
            log.warning("%d messages refused while storage failed are delivered again", len(self._outage_acks) + len(withheld))
            self._outage_acks = {}
            self.transport.redeliver()

    @staticmethod
    def _version_loaded(action: LoadVersion, weights: Vector | None, detail: str, now: float) -> VersionLoaded:
        return VersionLoaded(now=now, version=action.version, weights=weights, command=action.command, detail=detail,
                             operator=action.operator, nonce=action.nonce, kid=action.kid)

    def _log_rejected(self, data: Mapping[str, Any]) -> None:
        for line in self._rejected.note(data, time.monotonic()):
            log.warning("%s", line)

    def _check_peers(self) -> None:
        heard, limit = self.core.peers_heard(), self.core.peering.expected_peers()[1]
        for level, line in self._peer_watch.check(heard, limit, self._started_at, self.clock.now()):
            log.log(level, "%s", line)

    def _flush_rejected(self) -> None:
        for line in self._rejected.flush(time.monotonic()):
            log.warning("%s", line)

    def _publish(self, action: Publish, payload: bytes) -> None:
        try:
            self.transport.publish(action.topic, payload, qos=action.qos, retain=action.retain)
        except (TransportError, ValueError) as exc:  # one message lost (its device asks again), never
            self.publish_failures += 1  # the acks, commits and directory writes held behind it
            log.error("publishing to %s failed: %s", action.topic, exc)

    def _do(self, action: object) -> None:
        if isinstance(action, Publish):
            if action.topic != self._status_topic:
                self._publish(action, action.payload)
                return
            with self._status_lock:  # stamped and sent before stop()'s final status, or stamped by it as stopped
                self._last_status = action.payload
                closing = self._closing.is_set()
                self._publish(action, stamp_status(action.payload, alive=not closing, now=self.clock.now(), instance=self._instance,
                                                   heartbeat_s=self.options.status_interval_s, reason="stopped" if closing else ""))
        elif isinstance(action, PersistUpdate):
            self.registry.persist_update(action.update)
        elif isinstance(action, CommitVersion):
            t0 = time.perf_counter()
            self.registry.commit(action)
            self.metrics.commit_seconds.observe(time.perf_counter() - t0)
            if action.metadata.get("source") == "peer":
                log.info("version %d: merged %s's model (%s)", action.version, action.metadata.get("peer", "?"),
                         {k: v for k, v in action.metadata.items() if k in ("sid", "age", "cloud_round")})
            else:
                log.info(
                    "version %d from %d updates (mean staleness %.2f)",
                    action.version, action.metadata.get("n_updates", 0), action.metadata.get("mean_staleness", 0.0),
                )
            if self.on_commit is not None:
                self.on_commit(action.version, action.weights)
        elif isinstance(action, EvaluateCandidate):
            if self.validator is not None:
                self.validator.submit(action)
        elif isinstance(action, RecordRelease):
            try:
                self.registry.record_release(action.release, action.pinned, action.event, action.floor)
            except OSError as exc:
                self._storage_failed(f"recording the release: {exc}")
                return
            event = action.event
            log.info("gate: %s version %s → release %d%s %s", event.get("action"), event.get("version"), action.release,
                     " (pinned)" if action.pinned else "",
                     {k: v for k, v in event.items() if k in ("candidate_metric", "release_metric", "canary", "devices", "of", "operator", "kid")})
            if self.on_release is not None:
                version, weights = self.core.release
                self.on_release(version, weights)
        elif isinstance(action, RecordCanaryRound):
            try:
                self.registry.record_canary_round(action.round)
            except OSError as exc:  # nothing after it leaves: no request of an unrecorded round, no decision on an unrecorded report
                self._storage_failed(f"recording the canary round: {exc}")
        elif isinstance(action, RecordSelectionRound):
            try:
                self.registry.record_selection_round(action.round)
            except OSError as exc:  # as a canary round's: no invitation of an unrecorded round leaves
                self._storage_failed(f"recording the selection round: {exc}")
        elif isinstance(action, RecordRefusal):
            try:
                self.registry.record_refusal(action.event)
            except OSError as exc:  # as a canary round's: the command comes back to the rebuilt core, refused again
                self._storage_failed(f"recording a refused operator command: {exc}")
        elif isinstance(action, ConvertUpdate):
            if self.conversions is not None:
                self.conversions.submit(action)
            else:  # no worker (e.g. dc-asgd never asks): answer at once, the core falls back
                self.actor.submit(lambda now: UpdateConverted(now=now, ticket=action.ticket, weights=None, detail="no converter"))
        elif isinstance(action, LoadVersion):
            try:
                weights, detail = self.registry.read_version(action.version)[0], ""
            except RegistryError as exc:
                weights, detail = None, str(exc)
            self._loads += 1

            def loaded(now: float) -> VersionLoaded:
                self._loads -= 1  # (the batch that handles it sends the PUBACKs held for it)
                return self._version_loaded(action, weights, detail, now)

            self.actor.submit(loaded)
        elif isinstance(action, Notify):
            if action.kind == "status":
                self._status_due = True  # built once, at the end of the batch
            elif action.kind == "rejected":
                self._log_rejected(action.data)
                self._withhold_while_failing(action.data)
            elif action.kind == "control_failed":  # an operator's rollback / pin of a version the registry cannot read
                log.warning("operator %s of version %s failed: %s", action.data.get("command"), action.data.get("version"),
                            action.data.get("detail"))
            elif action.kind == "control":
                log.info("operator command: %s", action.data)
            elif action.kind == "peering_changed":
                log.warning("this state dir last ran with peering %r, now %r: the %s state (ages, rounds, …) is not carried "
                            "over; if the change was not meant, stop and restart with --peering %s", action.data.get("was"),
                            action.data.get("now"), action.data.get("was"), action.data.get("was"))
            elif action.kind == "strategy_changed":
                log.warning("this state dir last ran with strategy %r, now %r: the %s state (the robust defences' windows "
                            "and counts, rounds, …) is not carried over (the new one starts afresh: robust defences from empty windows)",
                            action.data.get("was"), action.data.get("now"), action.data.get("was"))
            elif action.kind == "strategy_state_lost":  # its model-sized state (FedAdam's moments) not kept for this version
                log.warning("RECOVERY: %s", action.data.get("detail"))
            elif action.kind == "gate_floor_dropped":
                log.info("gate: the best-release floor (%.4f) is not restored: %s (was %s, now %s); the gate starts "
                         "without one", action.data.get("best"), action.data.get("why"), action.data.get("was"),
                         action.data.get("now"))
            elif action.kind == "abandoned_line":  # the rollback that left it was unreadable at the restart
                log.warning("RECOVERY: the training line restored, version %s, is one a rollback abandoned (release.json says so; "
                            "the rollback's commit was unreadable): back to the release, version %s, as version %s",
                            action.data.get("version"), action.data.get("release"), action.data.get("now"))
            elif action.kind == "control_refused":  # a verified operator's command that cannot run (the CLI says why too)
                log.warning("operator %s of version %s refused: %s: %s", action.data.get("command"), action.data.get("version"),
                            action.data.get("reason"), action.data.get("detail"))
            elif action.kind == "rate_limited":  # (at most once a minute: see RATE_NOTE_EVERY_S)
                d = action.data
                before = int(d.get("dropped_before", 0) or 0)
                log.warning("dropping pulls beyond the per-device rate limit: %s%s (edgeci devices pace their pulls to this "
                            "limit: one that exceeds it runs an older SDK, is misconfigured or hostile; "
                            "edgeci_rejections_total{reason=\"rate_limited\"} counts every drop)", d.get("detail"),
                            f"; {before} more pulls (any device) were dropped, unlogged, in the minute before this note" if before else "")
            elif action.kind == "epoch_ahead":  # (at most once a minute)
                d = action.data
                highest = d.get("highest")
                days = days_beyond_clock(highest, time.time())
                if days is not None:
                    advice = (f"That epoch is {days:.0f} days ahead of this host's clock: most likely forged (the claim is "
                              "unsigned). Do not number above it; find the device and revoke it")
                else:
                    advice = (f"The state dir was restored from a backup, another coordinator of the region ran on another state "
                              f"dir with this signing key, or this host's clock was behind when the state dir was made. If these "
                              f"are your fleet's devices, stop this coordinator and run `edgeci new-epoch --state-dir "
                              f"{self.registry.root} --above {highest}`")
                log.warning("device %s claims version %s of epoch %s, ahead of this state dir (epoch %s, newest version %s): it "
                            "refuses this coordinator's models or waits for a version above its own (%s pulls and updates "
                            "said so, unsigned; the newest: epoch %s). %s",
                            d.get("device"), d.get("version"), d.get("epoch"), d.get("own"), d.get("own_version"), d.get("count"),
                            highest, advice)
            elif action.kind == "duplicate_device":  # (the core says it once per id)
                log.error("device id %r is used by two devices (a cloned SD card or VM image?): updates under its last "
                          "accepted sequence number keep coming with another nonce. Both are served (each update applied "
                          "once), but they take the id's MQTT session from each other; give one of them a new device id "
                          "with its own data dir (and its own bundle: edgeci pki issue), or re-provision it "
                          "(edgeci_duplicate_devices counts such ids)", action.data.get("device"))
            else:
                log.debug("%s %s", action.kind, action.data)
        else:
            raise TypeError(f"unknown action {action!r}")
