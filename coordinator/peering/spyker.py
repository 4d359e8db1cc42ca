"""Spyker's peering (paper 004): a token ring and age-weighted merges between coordinators.

The client-update half (the age ledger, age-damped mixing, the learning-rate decay) is the
strategy :mod:`coordinator.strategies.spyker`; :func:`coordinator.methods.make_method`
wires both around one :class:`~coordinator.strategies.spyker.AgeLedger`.

Theory of operation
-------------------
Every coordinator (a Spyker *server*) keeps a model **age** ``A_i``: how many client updates
its model embodies. Two pieces share it through one :class:`AgeLedger`:

* :class:`SpykerStrategy` (strategy ``"spyker"``) mixes each client update in on arrival,
  damped by the age gap between the current model and the model the client trained from::

      w_i ← w_i + η · s(A_i − A_k) · (w_k − w_i),   s(τ) = (τ + 1)^(−a),   A_i ← A_i + 1

  and keeps ``u[k]``, the number of updates per client, for the learning-rate decay that
  :meth:`SpykerPeering.hints_for` sends to each device with its model::

      η_k = η_init                                  while u[k] < ū
      η_k = max(η_min, η_init − β (u[k] − ū))       otherwise

  (ū: mean of ``u`` over this coordinator's clients; the paper's Decay() with the
  undecayed rate η[u[k]] = η_init, so a client that falls back to the mean trains again).

* :class:`SpykerPeering` exchanges models between coordinators. A **token** walks the ring
  (``--peers`` order) carrying the age vector; only its holder *starts* a synchronisation
  (sync id = the token's position, see below), when ``max(ages) − min(ages) ≥ h_inter``
  (default ``n_clients / 5n``) or ``A_i − A_i,prev ≥ h_intra`` (350). A coordinator that
  receives a model for a sync id it has not answered first broadcasts its own model for
  that id (so each coordinator broadcasts **at most once per sync id**), then merges::

      a = φ (A_j − A_i) / A_i,   w = 1 / (1 + e^−a)
      W_i ← W_i + η_a w (W_j − W_i),   A_i ← (1 − η_a w) A_i + η_a w A_j

  Each merge is committed as a new version. The holder passes the token to its ring
  successor once every live peer's model for its sync id has arrived (or after
  ``sync_timeout_s``). A non-holder whose own trigger fires broadcasts its age at once
  (the paper's RcvAge), so that the holder can start a sync.

The token rule (loss, regeneration, never two live tokens)
----------------------------------------------------------
A token has a **position** ``(epoch, created_at, origin, hop)``, compared
lexicographically. ``(epoch, created_at, origin)`` names one token for its whole life;
``hop`` counts its passes and doubles as the sync id.

1. *Passing.* The holder sends ``hop + 1`` to the next coordinator on the ring that it
   believes alive (heard from within ``token_timeout_s``) and stops holding at once.
2. *Accepting.* A coordinator accepts a token message only if its position is at least the
   largest position it knows *and* larger than any token it accepted before (QoS 1
   duplicates and retries are ignored). On accepting it broadcasts a beat at once.
3. *Dropping.* Every peer message carries the largest position its sender knows. A holder
   that learns of a larger position drops its token. A position is learnt from the coordinator
   that holds it (a hold rule 6 believes) or passed it on (the position after its last hold),
   every holder saying so each beacon (rule 4), so of two live tokens the smaller disappears as
   soon as a beat of the larger one's holder reaches its holder. (Anyone else's claim is only
   counted, ``positions_ignored``: a peer's claims of a position ahead dropped every holder's token.)
4. *Beacons.* Every coordinator broadcasts a beat every ``beacon_s``; the holder's beat says
   so. A beat from a holder whose position is not below the receiver's knowledge is
   *evidence* of the live token.
5. *Regeneration.* A coordinator that has had no evidence for ``token_timeout_s`` (plus
   ``(rank − 1) × stagger_s``, where rank is its place among the live coordinators that
   follow the last known holder on the ring) creates the token
   ``(known epoch + 1, now, itself, 0)`` and holds it. The successor of a silent holder is
   thus the first to regenerate; if it is dead too, the next one does, a stagger later.
   Coordinators restart holding nothing. On a cold ring ``ring[0]`` creates the first
   token when it starts with an empty state dir (any other start waits for the timeout,
   ``ring[0]`` being the first in line); if that races an existing token, rule 3 keeps
   the larger one.

6. *Sync ids.* A model is merged only for a sync id that a holder explains: the start of a
   sync by the holder of that position (its model says it holds the sync id), or an answer to a
   sync this coordinator took part in, or whose holder it saw (``holds``). A coordinator is taken
   as holding a position above the last one it was seen holding only once the token has moved
   on: another coordinator was seen holding a later position (this one too, once it passed it
   on), or it heard none of them for ``token_timeout_s`` (it regenerated, or passed the token to
   itself): its clock (``at``) moved on that much since its last hold, and is at most
   ``MAX_CLOCK_AHEAD_S`` ahead of ours. So a peer starts syncs as the token reaches it, as an
   honest one does (or one per ``token_timeout_s`` of its clock, after a burst of at most
   ``MAX_CLOCK_AHEAD_S / token_timeout_s``), and a model for a sync id it made up is ignored and
   counted (``models_unexplained``).

Safety: positions are totally ordered, and a token is only accepted when it is not below
everything its receiver knows, so two holders of the *same* position cannot coexist
(only a crash that loses the first one can repeat an acceptance). Two *different* tokens
can coexist transiently (a regeneration racing a slow holder, a restart that receives a
token queued while it was down), but every holder broadcasts its position every beacon,
so once messages flow again every holder but the largest drops its token: the ring never
*ends* with two live tokens. Liveness: a lost token (dead holder, dead recipient, a
dropped message) is regenerated ``token_timeout_s`` after the last evidence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from coordinator.peering.base import (
    Peering,
    PeerPlan,
    PeerSend,
    Tallies,
    body_bool,
    body_count,
    body_float,
    body_id,
    body_int,
    body_table,
    check_ring,
    check_sender,
)
from coordinator.strategies.base import CoordinatorView, Strategy
from coordinator.strategies.spyker import AgeLedger, SpykerStrategy
from edge_sdk.errors import ConfigError, MalformedMessage, other_protocol
from edge_sdk.spec import Vector
from edge_sdk.wire.messages import PeerMsg

__all__ = ["SpykerPeerConfig", "SpykerPeering", "SyncSpykerPeering", "TokenPos", "merge_in_order", "merge_weight", "server_merge"]

TokenPos = tuple[int, float, str, int]
"""(epoch, created_at, origin, hop): totally ordered; the first three name one token."""

_KEEP_SIDS = 64
MAX_EPOCH_JUMP = 2**22
"""How far a position's epoch may exceed the largest one known (0 when none is): an epoch grows
by one per regeneration, each after ``token_timeout_s`` without evidence, so an honest ring never
gets near it. helper-115: one message at epoch 2**62 - 1 left no honest coordinator able to
regenerate a token (epoch + 1 is past the cap) for good; now that takes 2**40 messages."""
MAX_ROUND_JUMP = 2**22
"""Sync-Spyker: how far a peer's round may exceed the receiver's next one (it catches up to it). An
honest ring closes one round per synchronisation, so a server would have to miss four million of
them. helper-134: one model for round 2**63 - 1 was taken: the receiver caught up, the ring with it,
and the next round, 2**63, was past what any peer reads (``body_int``): no synchronisation ever
completed again, every server merging alone at each timeout. Now that takes 2**41 messages."""
MAX_CLOCK_AHEAD_S = 60.0
"""How far ahead of the receiver's clock a token's relayed age report may be stamped (clock skew).
helper-115: an entry stamped 1e300 was newer than anything its coordinator would ever say, so the
receiver kept that age for it for good; an entry further ahead is skipped (``ages_ignored``)."""


# --------------------------------------------------------------------------- maths


def merge_weight(age_self: float, age_other: float, phi: float) -> float:
    """w = 1 / (1 + e^−a), a = φ (A_j − A_i) / A_i (A_i clamped to ≥ 1: a fresh model)."""
    a = phi * (age_other - age_self) / max(age_self, 1.0)
    if a >= 0:
        return 1.0 / (1.0 + math.exp(-a))
    e = math.exp(a)  # stable for very negative a
    return e / (1.0 + e)


def server_merge(
    w_self: Vector, age_self: float, w_other: Vector, age_other: float, *, phi: float, eta_a: float
) -> tuple[Vector, float]:
    """Spyker's SERVERAGG: W_i + η_a w (W_j − W_i) and the age moved by the same share."""
    share = eta_a * merge_weight(age_self, age_other, phi)
    merged = np.asarray(w_self, dtype=np.float32) + np.float32(share) * (
        np.asarray(w_other, dtype=np.float32) - np.asarray(w_self, dtype=np.float32)
    )
    return merged.astype(np.float32, copy=False), (1.0 - share) * age_self + share * age_other


def merge_in_order(models: Mapping[str, tuple[float, Vector]], *, phi: float, eta_a: float) -> tuple[Vector, float]:
    """Sync-Spyker's deterministic aggregation: start from the model of the smallest server id
    and SERVERAGG the others into it in id order. Every server that holds the same models
    gets the same model and age."""
    ids = sorted(models)
    age, weights = models[ids[0]]
    out = np.asarray(weights, dtype=np.float32)
    for j in ids[1:]:
        age_j, w_j = models[j]
        out, age = server_merge(out, age, w_j, age_j, phi=phi, eta_a=eta_a)
    return np.array(out, dtype=np.float32, copy=True), age


# --------------------------------------------------------------------------- peering


@dataclass(frozen=True, slots=True, kw_only=True)
class SpykerPeerConfig:
    phi: float = 1.5
    eta_a: float = 0.6
    h_inter: float | None = None
    """Age-spread trigger; None = n_clients / (5 n) with n_clients summed over the ring."""
    h_intra: float = 350.0
    beacon_s: float = 1.0
    token_timeout_s: float = 5.0
    stagger_s: float = 1.0
    sync_timeout_s: float = 10.0
    min_sync_interval_s: float = 0.0
    n_clients: int | None = None
    """Total clients for the default h_inter; None = the sum the coordinators report."""
    mode: str = "async"
    """``async``: Spyker (token ring, asynchronous merges); ``sync``: Sync-Spyker (the paper's
    baseline, :class:`SyncSpykerPeering`: every server broadcasts, waits for all, merges)."""
    period_s: float = 0.0
    """Sync-Spyker only: also start a synchronisation this long after the last (0: only h_intra)."""

    def __post_init__(self) -> None:
        if not (self.phi > 0 and math.isfinite(self.phi)):
            raise ConfigError("spyker: phi must be > 0")
        if not 0 < self.eta_a <= 1:
            raise ConfigError("spyker: eta_a must be in (0, 1]")
        if self.h_inter is not None and not self.h_inter > 0:
            raise ConfigError("spyker: h_inter must be > 0 (or None for n_clients / 5n)")
        if not self.h_intra > 0:
            raise ConfigError("spyker: h_intra must be > 0")
        if not 0 < self.beacon_s < self.token_timeout_s:
            raise ConfigError("spyker: need 0 < beacon_s < token_timeout_s")
        if not (self.stagger_s >= 0 and self.sync_timeout_s > 0 and self.min_sync_interval_s >= 0):
            raise ConfigError("spyker: stagger_s, min_sync_interval_s must be >= 0 and sync_timeout_s > 0")
        if self.n_clients is not None and self.n_clients < 1:
            raise ConfigError("spyker: n_clients must be >= 1")
        if self.mode not in ("async", "sync"):
            raise ConfigError("spyker: mode must be 'async' (Spyker) or 'sync' (Sync-Spyker)")
        if not (self.period_s >= 0 and math.isfinite(self.period_s)):
            raise ConfigError("spyker: period_s must be a finite number >= 0")


@dataclass(slots=True)
class _PeerInfo:
    age: float = 0.0
    age_at: float = -math.inf
    """The sender's clock when it reported ``age`` (latest report wins)."""
    clients: int = 0
    heard_at: float = -math.inf
    """Our clock when we last heard anything from it."""
    beat_at: float = -math.inf
    """The sender's clock on its newest beat: a beat not newer is a replay (or a duplicate)."""


def _age(body: Mapping[str, Any], key: str = "age") -> float:
    """A peer's age claim (:func:`~coordinator.peering.base.body_count`: any finite number was taken)."""
    return body_count(body, key, f"peer body: {key!r} must be an age")


def _starts(body: Mapping[str, Any], sid: TokenPos) -> bool:
    """A model whose sender says it holds ``sid``: the start of that sync, not an answer."""
    raw = body.get("pos")
    return body.get("hold") is True and raw is not None and _pos(raw) == sid


def _pos(value: object, what: str = "token position") -> TokenPos:
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise MalformedMessage(f"peer body: {what} must be [epoch, created_at, origin, hop]")
    epoch, created, origin, hop = value
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < 2**62:
        raise MalformedMessage(f"peer body: bad epoch in {what}")
    if not isinstance(created, int | float) or isinstance(created, bool) or not math.isfinite(created):
        raise MalformedMessage(f"peer body: bad created_at in {what}")
    if not isinstance(hop, int) or isinstance(hop, bool) or not 0 <= hop < 2**62:
        raise MalformedMessage(f"peer body: bad hop in {what}")
    return (epoch, float(created), body_id(origin, f"{what} origin"), hop)


@dataclass(slots=True)
class _Counters:
    syncs_started: int = 0
    syncs_joined: int = 0
    syncs_timed_out: int = 0
    merges: int = 0
    tokens_passed: int = 0
    tokens_accepted: int = 0
    tokens_rejected: int = 0
    tokens_dropped: int = 0
    regenerations: int = 0
    age_pushes: int = 0
    models_ignored: int = 0
    beats_ignored: int = 0
    ages_ignored: int = 0
    """Relayed age reports stamped too far in the future (:data:`MAX_CLOCK_AHEAD_S`)."""
    models_unexplained: int = 0
    """Models for a sync id no holder explains (rule 6): ignored, not merged."""
    holds_ignored: int = 0
    """Beats claiming a hold that no token pass or regeneration explains (rule 6): not taken as a holder."""
    positions_ignored: int = 0
    """Positions above the known one that their own holder did not say (rule 3, :meth:`_learn_from`): not learnt."""
    positions_forgotten: int = 0
    """Checkpointed token positions out of range, dropped at the restore (:meth:`SpykerPeering._restored_pos`)."""
    ages_capped: int = 0
    """Merges whose peer claimed more age than :meth:`SpykerPeering.age_cap` (the age taken is the cap)."""


class SpykerPeering(Peering):
    """Token-ring model exchange between coordinators. See the module docstring."""

    name: ClassVar[str] = "spyker"

    def __init__(
        self,
        coordinator_id: str,
        ring: Sequence[str],
        config: SpykerPeerConfig | None = None,
        *,
        strategy: Strategy | None = None,
    ) -> None:
        self.me = coordinator_id
        self.ring = check_ring(coordinator_id, tuple(ring))
        self.config = config or SpykerPeerConfig()
        self.strategy = strategy if isinstance(strategy, SpykerStrategy) else None
        self.ledger = self.strategy.ledger if self.strategy is not None else AgeLedger()
        """Shared with a :class:`SpykerStrategy`; otherwise ours, one unit of age per local version."""
        self.peers = tuple(c for c in self.ring if c != coordinator_id)
        self.info: dict[str, _PeerInfo] = {c: _PeerInfo() for c in self.peers}
        self.age_prev = 0.0
        self.known: TokenPos | None = None
        """The largest token position this coordinator has heard of."""
        self.accepted: TokenPos | None = None
        """The largest token position it ever accepted (rejects duplicates)."""
        self.holding = False
        self.last_holder: str | None = None
        self.evidence_at = -math.inf
        self.ongoing: TokenPos | None = None
        """Sync id of the synchronisation this holder started, until it passes the token."""
        self.sync_started_at = -math.inf
        self.last_sync_end = -math.inf
        self.answered: TokenPos | None = None
        """Every sync id at or below this one counts as answered (bounded memory)."""
        self.did_broadcast: set[TokenPos] = set()
        self.merged: dict[str, set[TokenPos]] = {}
        """Per peer, the sync ids whose model was merged (its newest ``_KEEP_SIDS``): a model for
        one of them (a replay, a QoS 1 redelivery), or for a sync older than all of them once
        that many are kept, is ignored, not merged again. (Models of different syncs may
        arrive out of order: a set, not a watermark.)"""
        self.got_models: set[str] = set()
        self.holds: dict[str, tuple[TokenPos, float]] = {}
        """Per coordinator, the largest position it was seen holding, and its clock then: from its
        beats and the syncs it started, each taken only when plausible (:meth:`_plausible_hold`);
        ours, the positions we passed on. A model's sync id must be one of them (rule 6)."""
        self.next_beat_at = -math.inf
        self.last_beat_sent_at = -math.inf
        self.last_age_push = -math.inf
        self.started = False
        self.fresh = True
        """No checkpoint was restored: ``ring[0]`` bootstraps the first token at once."""
        self.now = -math.inf
        """The time of the last hook call (wake_at has no clock of its own)."""
        self.clients_here = 0
        self.counters = _Counters()

    # ------------------------------------------------------------------ helpers

    @property
    def age(self) -> float:
        return self.ledger.age

    def alive(self, peer: str, now: float) -> bool:
        return peer == self.me or now - self.info[peer].heard_at < self.config.token_timeout_s

    def age_cap(self) -> float:
        """The most age one merge may take from a peer's claim: ours plus ``h_intra`` + ``h_inter``
        (about what an honest peer gains between two synchronisations; in 724 merges of the quick
        paper-spyker runs and digits-4regions' Spyker run the largest lead was 4.3). helper-159: a hostile peer
        answering a sync with age 2**53 set this coordinator's age to 7.7e15; the gate rolled the
        merged weights back, not the age, and by the merge rule every honest peer's model then
        weighs eta_a x sigmoid(-phi) = 0.11 in its merges instead of eta_a x sigmoid(0) = 0.3, for
        good. Now a lie adds at most ``eta_a`` x (h_intra + h_inter) per merge, as an honest peer
        that far ahead would."""
        return self.age + self.config.h_intra + self.h_inter()

    def h_inter(self) -> float:
        cfg = self.config
        if cfg.h_inter is not None:
            return cfg.h_inter
        total = cfg.n_clients if cfg.n_clients is not None else self.clients_here + sum(self._clients_counted().values())
        return max(1.0, total / (5.0 * len(self.ring)))

    def _clients_capped(self) -> list[str]:
        """The peers whose client count the default h_inter caps (:meth:`_clients_counted`) now."""
        if self.config.h_inter is not None or self.config.n_clients is not None:
            return []
        return sorted(p for p, n in self._clients_counted().items() if n < self.info[p].clients)

    def _clients_counted(self) -> dict[str, int]:
        """Each peer's client count as the default h_inter counts it: its claim, at most all the
        others' together (ours included). A claim is the peer's own word (up to 2**63 - 1): one of
        2**62 made h_inter ~3e17 and switched the age-spread trigger off. So no coordinator's word is
        the larger part of the ring's count: a liar at most doubles it (pin ``n_clients`` or
        ``h_inter`` to take the claims out of it), an honest region larger than all the others
        together counts as large as they are."""
        claims = {p: i.clients for p, i in self.info.items()}
        everyone = self.clients_here + sum(claims.values())
        return {p: min(c, everyone - c) for p, c in claims.items()}

    def _successor(self, of: str, now: float) -> str | None:
        """The first coordinator after ``of`` on the ring that we believe alive (not ``of``)."""
        i = self.ring.index(of)
        for k in range(1, len(self.ring)):
            c = self.ring[(i + k) % len(self.ring)]
            if self.alive(c, now):
                return c
        return None

    def regenerate_at(self, now: float) -> float:
        """When this coordinator will regenerate the token if no evidence arrives."""
        holder = self.last_holder if self.last_holder is not None else self.ring[-1]
        i = self.ring.index(holder)
        order = [self.ring[(i + k) % len(self.ring)] for k in range(1, len(self.ring) + 1)]
        live = [c for c in order if self.alive(c, now)]
        rank = live.index(self.me) + 1
        cfg = self.config
        return self.evidence_at + cfg.token_timeout_s + (rank - 1) * cfg.stagger_s

    def _learn(self, pos: TokenPos) -> None:
        if self.known is None or pos > self.known:
            self.known = pos
            if self.holding:  # rule 3: a larger position exists, ours is stale
                self.holding = False
                self.ongoing = None
                self.counters.tokens_dropped += 1

    def _hear(self, peer: str, now: float, body: Mapping[str, Any]) -> None:
        info = self.info[peer]
        at, age, clients = body_float(body, "at"), _age(body), body_int(body, "clients")  # all, then assign
        info.heard_at = now
        if at >= info.age_at:
            info.age_at, info.age, info.clients = at, age, clients

    def _base(self, now: float) -> dict[str, Any]:
        return {
            "at": now,
            "age": self.age,
            "clients": self.clients_here,
            "pos": list(self.known) if self.known is not None else None,
            "hold": self.holding,
        }

    def _beat(self, now: float) -> PeerSend:
        self.next_beat_at = now + self.config.beacon_s
        body = self._base(now)
        # Each beat newer than the last (peers ignore one that is not: a replay): a second beat in
        # the same instant (an age push right after the periodic beat) is stamped a hair later.
        body["at"] = self.last_beat_sent_at = max(now, math.nextafter(self.last_beat_sent_at, math.inf))
        return PeerSend(kind="beat", body=body)

    def _model(self, view: CoordinatorView, sid: TokenPos, now: float) -> PeerSend:
        self.did_broadcast.add(sid)
        if len(self.did_broadcast) > _KEEP_SIDS:
            for old in sorted(self.did_broadcast)[: -_KEEP_SIDS]:
                self.did_broadcast.discard(old)
                self.answered = old if self.answered is None else max(self.answered, old)
        self.age_prev = self.age
        return PeerSend(kind="model", body={**self._base(now), "sid": list(sid)}, weights=view.weights)

    def _was_answered(self, sid: TokenPos) -> bool:
        return sid in self.did_broadcast or (self.answered is not None and sid <= self.answered)

    # ------------------------------------------------------------------ hooks

    def on_timer(self, view: CoordinatorView, now: float) -> PeerPlan:
        self.ledger.see(view.version)  # the number of a merge committed since the last call
        self.now = now
        self.clients_here = len(view.devices_seen)
        if not self.started:
            self.started = True
            self.evidence_at = now
            for info in self.info.values():
                info.heard_at = max(info.heard_at, now)  # assume the ring is up until it is silent
            if self.fresh and self.peers and self.me == self.ring[0]:
                return PeerPlan(sends=(*self._regenerate(now), *self._check_sync(view, now)))
        if not self.peers:
            return PeerPlan()
        sends: list[PeerSend] = []
        if self.holding and self.ongoing is not None and now >= self.sync_started_at + self.config.sync_timeout_s:
            self.counters.syncs_timed_out += 1
            sends += self._finish_sync(now)
        if not self.holding and now >= self.regenerate_at(now):
            sends += self._regenerate(now)
        if now >= self.next_beat_at:
            sends.append(self._beat(now))
        sends += self._check_sync(view, now)
        return PeerPlan(sends=tuple(sends))

    def on_version(self, view: CoordinatorView, now: float) -> PeerPlan:
        self.ledger.see(view.version)
        self.now = now
        self.clients_here = len(view.devices_seen)
        if self.strategy is None:  # another strategy aggregates: one unit of age per version
            self.ledger.record(view.version, self.ledger.age + 1.0)
        if not self.peers or not self.started:
            return PeerPlan()
        return PeerPlan(sends=tuple(self._check_sync(view, now)))

    def on_line_replaced(self, view: CoordinatorView, now: float, *, restored: int) -> None:
        """The age goes back with the weights (the strategy's hook does it for a shared ledger); the
        intra-server trigger counts from there. A sync already answered stays answered: peers
        merged the abandoned model, each under its own gate."""
        if self.strategy is None:
            self.ledger.rolled_back(view.version, restored)
        self.age_prev = min(self.age_prev, self.age)

    def ignores(self, msg: PeerMsg, now: float) -> bool:
        """A beat stamped no later than the sender's newest (:meth:`on_message`'s replay rule)."""
        info = self.info.get(msg.sender)
        at = msg.body.get("at")
        if msg.kind != "beat" or info is None or not isinstance(at, int | float) or isinstance(at, bool) or not at <= info.beat_at:
            return False
        self.counters.beats_ignored += 1
        return True

    def on_message(self, view: CoordinatorView, msg: PeerMsg, now: float) -> PeerPlan:
        check_sender("spyker", self.me, self.ring, msg.sender)  # (another ring on the same broker: helper-96 read it as "malformed")
        if msg.kind not in ("token", "beat", "model"):  # before anything is heard from it
            raise other_protocol("spyker", msg.sender, msg.kind)
        self._check_fields(msg, now)
        body = msg.body
        if msg.kind == "model" and not self._explained(msg.sender, body, _pos(body.get("sid")), now):
            self.counters.models_unexplained += 1  # rule 6 (before anything is heard: it changes nothing)
            return PeerPlan(counted=True)
        if msg.kind == "beat":
            # helper-115: a dead peer's captured beats, replayed, kept it alive here (the token was
            # passed to it and lost, again and again) and a dead holder's kept its token's evidence
            # fresh (no regeneration). A sender's beats carry its clock, which only goes forward.
            info, at = self.info[msg.sender], body_float(body, "at")
            if at <= info.beat_at:
                self.counters.beats_ignored += 1
                return PeerPlan(counted=True)
            info.beat_at = at
        self.now = now
        self.clients_here = len(view.devices_seen)
        self._hear(msg.sender, now, body)
        if msg.kind == "token":
            c = self.counters
            ignored = (c.tokens_rejected, c.ages_ignored)
            sends = tuple(self._on_token(view, msg.sender, body, now))
            return PeerPlan(sends=sends, counted=(c.tokens_rejected, c.ages_ignored) != ignored)
        if msg.kind == "beat":
            c = self.counters
            ignored = (c.holds_ignored, c.positions_ignored)
            sends = tuple(self._on_beat(view, msg.sender, body, now))
            return PeerPlan(sends=sends, counted=(c.holds_ignored, c.positions_ignored) != ignored)
        if msg.kind == "model":
            return self._on_model(view, msg, now)
        raise MalformedMessage(f"spyker: unknown peer message kind {msg.kind!r}")

    def _check_fields(self, msg: PeerMsg, now: float) -> None:
        """Read every field that handling ``msg`` reads, before anything is heard from it: a message
        refused for one changes nothing. helper-115: a model without weights, or with a bad sync id,
        a beat without ``hold``, or a token with one bad ``ages`` entry were refused only after the
        sender's age was recorded and the message's position learnt (which drops our token, rule 3)
        or, for the token, after the entries before the bad one were taken."""
        body = msg.body
        body_float(body, "at")
        _age(body)
        body_int(body, "clients")
        raw = body.get("pos")
        if raw is not None or msg.kind == "token":
            self._plausible(_pos(raw), "token position")
        if msg.kind == "beat":
            body_bool(body, "hold")
        elif msg.kind == "model":
            if msg.weights is None:
                raise MalformedMessage("spyker: a model message needs weights")
            self._plausible(_pos(body.get("sid"), "sync id"), "sync id")
        else:
            for entry in body_table(body, "ages", max_len=len(self.ring) + 1).values():
                if not isinstance(entry, list) or len(entry) != 2:
                    raise MalformedMessage("spyker token: ages entries are [age, at]")
                _age({"age": entry[0]})
                body_float({"x": entry[1]}, "x")

    def _plausible(self, pos: TokenPos, what: str) -> None:
        """Refuse a position whose epoch jumps more than :data:`MAX_EPOCH_JUMP` above the known one."""
        known_epoch = self.known[0] if self.known is not None else 0
        if pos[0] > known_epoch + MAX_EPOCH_JUMP:
            raise MalformedMessage(f"peer body: {what} epoch {pos[0]} jumps more than 2**22 above the known {known_epoch}")

    def _explained(self, sender: str, body: Mapping[str, Any], sid: TokenPos, now: float) -> bool:
        """Rule 6: does a holder explain a model's sync id? A sync is started by the holder of a
        position, at that position: a model is either that start (``hold`` and ``pos`` = sid) or an
        answer to a sync this coordinator took part in or whose holder it saw. helper-121: each model
        for an invented sync id (hop + 1 per message) was merged and committed, 3,000 in 14 s.
        Ignored and counted, not refused: an honest model can be unexplained too, after a restart
        (an answer to a sync started since the last commit) or with the holders' beats lost."""
        if sid in self.did_broadcast or sid == self.answered or self._merged_already(sender, sid):
            # a sync we took part in (the last one before a restart: answers to it may come after),
            # or a replay that _on_model ignores and counts. (Not every sync id up to ``answered``:
            # positions have no gaps, a peer could invent any number of them below it.)
            return True
        if _starts(body, sid):  # the holder's start
            prev = self.holds.get(sender)
            at = body_float(body, "at")
            return prev is None or prev[0] == sid or (sid > prev[0] and self._plausible_hold(sender, sid, at, now))
        return any(pos == sid for pos, _ in self.holds.values())  # an answer to the sync of a holder we know

    def _merged_already(self, sender: str, sid: TokenPos) -> bool:
        """``sender``'s model for ``sid`` was merged (or is older than every sync id kept for it:
        a replay)."""
        done = self.merged.get(sender, ())
        return sid in done or (len(done) >= _KEEP_SIDS and sid < min(done))

    def _plausible_hold(self, peer: str, pos: TokenPos, at: float, now: float) -> bool:
        """Can ``peer`` hold ``pos``, above the last position it was seen holding, saying so at ``at``
        (its clock)? A holder passes the token on to another coordinator (rule 1), so only after one
        was seen holding a later position, or once ``peer`` heard none of them for
        ``token_timeout_s`` (it regenerated, rule 5, or passed the token to itself): its clock has
        moved on that much since its last hold (and is not more than MAX_CLOCK_AHEAD_S ahead of
        ours, so a peer cannot claim that time in advance beyond it)."""
        prev = self.holds.get(peer)
        if prev is None:
            return True
        if any(c != peer and held > prev[0] for c, (held, _) in self.holds.items()):
            return True
        return prev[1] + self.config.token_timeout_s <= at <= now + MAX_CLOCK_AHEAD_S

    def _learn_from(self, sender: str, body: Mapping[str, Any]) -> None:
        """Rule 3 from a beat's or model's position, taken only from the coordinator that made it: its
        hold, as rule 6 believes it (:meth:`_note_hold`), or the position after its last believed hold
        (it passed the token on). helper-134: a compromised peer's beats claiming a position ahead
        (hop + 1 is enough) dropped every holder's token and kept the real holder's beats from being
        evidence (below the known position): 21 regenerations in 100 s instead of 1, 630 merges instead
        of 927. Another claim is ignored and counted (``positions_ignored``): the position's holder
        says it itself, every beacon, so a holder of a smaller token still drops it (rule 3)."""
        raw = body.get("pos")
        if raw is None:
            return
        pos = _pos(raw)
        held = self.holds.get(sender)
        if held is not None:
            epoch, created, origin, hop = held[0]
            if pos == held[0] if body.get("hold") is True else pos == (epoch, created, origin, hop + 1):
                self._learn(pos)
                return
        if self.known is None or pos > self.known:
            self.counters.positions_ignored += 1

    def _note_hold(self, peer: str, pos: TokenPos, at: float, now: float) -> None:
        """``peer`` says it holds ``pos`` at ``at``, its clock (a beat, or the start of a sync we took)."""
        prev = self.holds.get(peer)
        if prev is not None and pos <= prev[0]:
            return  # the same hold (each beat repeats it), or an older one
        if self._plausible_hold(peer, pos, at, now):
            self.holds[peer] = (pos, min(at, now + MAX_CLOCK_AHEAD_S))
        else:
            self.counters.holds_ignored += 1

    def hints_for(self, device: str) -> Mapping[str, float]:
        return self.strategy.lr_hint(device) if self.strategy is not None else {}

    def wake_at(self) -> float | None:
        if not self.started:
            return -math.inf  # run on_timer at the first opportunity (core start)
        if not self.peers:
            return None
        wakes = [self.next_beat_at]
        if self.holding and self.ongoing is not None:
            wakes.append(self.sync_started_at + self.config.sync_timeout_s)
        if not self.holding:
            # Computed at the last event; peers falling silent can only bring it forward,
            # and our own beats re-evaluate it every beacon_s.
            wakes.append(self.regenerate_at(self.now))
        return min(wakes)

    # ------------------------------------------------------------------ protocol

    def _on_beat(self, view: CoordinatorView, sender: str, body: Mapping[str, Any], now: float) -> list[PeerSend]:
        raw = body.get("pos")
        hold = body_bool(body, "hold") and raw is not None
        if hold:
            self._note_hold(sender, _pos(raw), body_float(body, "at"), now)
        self._learn_from(sender, body)
        if hold and self.known is not None and _pos(raw) >= self.known:
            self.last_holder = sender
            self.evidence_at = now
        return self._check_sync(view, now) if self.holding else []

    def _on_token(self, view: CoordinatorView, sender: str, body: Mapping[str, Any], now: float) -> list[PeerSend]:
        pos = _pos(body.get("pos"))
        if (self.known is not None and pos < self.known) or (self.accepted is not None and pos <= self.accepted):
            self.counters.tokens_rejected += 1  # stale or duplicate (rule 2)
            return []
        for peer, entry in body_table(body, "ages", max_len=len(self.ring) + 1).items():
            if peer in self.info:
                if not isinstance(entry, list) or len(entry) != 2:
                    raise MalformedMessage("spyker token: ages entries are [age, at]")
                age, at = _age({"age": entry[0]}), body_float({"x": entry[1]}, "x")
                info = self.info[peer]
                if at > now + MAX_CLOCK_AHEAD_S:
                    self.counters.ages_ignored += 1
                elif at > info.age_at:
                    info.age, info.age_at = age, at
        self.known = pos
        self.accepted = pos
        self.holding = True
        self.ongoing = None
        self.last_holder = self.me
        self.evidence_at = now
        self.counters.tokens_accepted += 1
        return [self._beat(now), *self._check_sync(view, now)]

    def _on_model(self, view: CoordinatorView, msg: PeerMsg, now: float) -> PeerPlan:
        if msg.weights is None:
            raise MalformedMessage("spyker: a model message needs weights")
        body = msg.body
        sid = _pos(body.get("sid"), "sync id")
        if self._merged_already(msg.sender, sid):
            self.counters.models_ignored += 1
            return PeerPlan(counted=True)
        done = self.merged.setdefault(msg.sender, set())
        if _starts(body, sid):
            self._note_hold(msg.sender, sid, body_float(body, "at"), now)  # its start (_explained found it plausible)
        self._learn_from(msg.sender, body)
        self._learn(sid)  # a sync a holder explains (rule 6)
        sends: list[PeerSend] = []
        if not self._was_answered(sid):
            self.counters.syncs_joined += 1
            sends.append(self._model(view, sid, now))  # answer first, then merge (Alg. 2 l. 32-33)
        cfg = self.config
        age_j = _age(body)
        merged, new_age = server_merge(view.weights, self.age, msg.weights, age_j, phi=cfg.phi, eta_a=cfg.eta_a)
        cap = self.age_cap()
        if age_j > cap:  # the model is merged as the claim says (its share is at most eta_a); the age taken is bounded
            self.counters.ages_capped += 1
            new_age = min(new_age, (1.0 - cfg.eta_a) * self.age + cfg.eta_a * cap)
        self.ledger.record_merge(view.version, new_age)  # numbered by the commit (after a restart: not version + 1)
        done.add(sid)
        if len(done) > _KEEP_SIDS:
            done.discard(min(done))
        self.counters.merges += 1
        if self.holding and self.ongoing == sid:
            self.got_models.add(msg.sender)
            if all(p in self.got_models for p in self.peers if self.alive(p, now)):
                sends += self._finish_sync(now)
        return PeerPlan(sends=tuple(sends), merged=merged, meta={"peer": msg.sender, "sid": list(sid), "age": new_age})

    def _check_sync(self, view: CoordinatorView, now: float) -> list[PeerSend]:
        live = [p for p in self.peers if self.alive(p, now)]
        if not live:
            return []
        ages = [self.age, *(self.info[p].age for p in live)]
        if max(ages) - min(ages) < self.h_inter() and self.age - self.age_prev < self.config.h_intra:
            return []
        if self.holding:
            if self.ongoing is not None or now - self.last_sync_end < self.config.min_sync_interval_s:
                return []
            assert self.known is not None
            sid = self.known
            if self._was_answered(sid):
                return []  # this holding period already synchronised (answered someone else's)
            self.ongoing = sid
            self.sync_started_at = now
            self.got_models = set()
            self.counters.syncs_started += 1
            return [self._model(view, sid, now)]
        if now - self.last_age_push >= self.config.beacon_s / 2:
            self.last_age_push = now
            self.counters.age_pushes += 1
            return [self._beat(now)]  # RcvAge: tell the holder our age now
        return []

    def _finish_sync(self, now: float) -> list[PeerSend]:
        self.ongoing = None
        self.last_sync_end = now
        assert self.known is not None
        successor = self._successor(self.me, now)
        if successor is not None:  # the token moves on: another coordinator may hold it next (rule 6)
            self.holds[self.me] = (self.known, now)
        epoch, created, origin, hop = self.known
        pos: TokenPos = (epoch, created, origin, hop + 1)
        if successor is None:  # alone: pass the token to ourselves (a fresh sync id)
            self.known = self.accepted = pos
            return []
        ages = {self.me: [self.age, now], **{p: [i.age, i.age_at] for p, i in self.info.items() if math.isfinite(i.age_at)}}
        self.holding = False
        self.known = pos
        self.last_holder = successor
        self.evidence_at = now
        self.counters.tokens_passed += 1
        return [PeerSend(kind="token", to=successor, body={**self._base(now), "pos": list(pos), "ages": ages})]

    def _regenerate(self, now: float) -> list[PeerSend]:
        epoch = self.known[0] + 1 if self.known is not None else 0
        pos: TokenPos = (epoch, now, self.me, 0)
        self.known = pos
        self.accepted = pos
        self.holding = True
        self.ongoing = None
        self.last_holder = self.me
        self.evidence_at = now
        self.counters.regenerations += 1
        return [self._beat(now)]

    # ------------------------------------------------------------------ durability, status

    def checkpoint(self) -> dict[str, Any]:
        answered = max(self.did_broadcast, default=None)
        if self.answered is not None and (answered is None or self.answered > answered):
            answered = self.answered
        return {
            "ledger": self.ledger.checkpoint(counts=False),  # the update counts: take_tallies()
            "age_prev": self.age_prev,
            "known": list(self.known) if self.known is not None else None,
            "accepted": list(self.accepted) if self.accepted is not None else None,
            "answered": list(answered) if answered is not None else None,
            "merged": {peer: sorted(list(sid) for sid in sids) for peer, sids in self.merged.items()},
            "regenerations": self.counters.regenerations,
            "syncs_started": self.counters.syncs_started,
            # each peer's newest beat (its clock): a dead peer's beats captured before this commit and
            # replayed after a restart are replays still (helper-141: they kept it alive again)
            "beats": {peer: info.beat_at for peer, info in self.info.items() if math.isfinite(info.beat_at)},
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Resume ages and token knowledge; never the token itself (rule 5: restart empty-handed)."""
        if not state:
            return
        self.fresh = False
        self.ledger.restore(state.get("ledger", {}))
        self.age_prev = float(state.get("age_prev", 0.0))
        for key in ("known", "accepted", "answered"):
            raw = state.get(key)
            setattr(self, key, self._restored_pos(raw) if raw is not None else None)
        merged = {str(peer): {self._restored_pos(sid) for sid in list(sids)[-_KEEP_SIDS:]}
                  for peer, sids in dict(state.get("merged", {})).items() if peer in self.info}
        self.merged = {peer: {sid for sid in sids if sid is not None} for peer, sids in merged.items()}
        self.counters.regenerations = int(state.get("regenerations", 0))
        self.counters.syncs_started = int(state.get("syncs_started", 0))
        beats = state.get("beats")
        for peer, at in (beats.items() if isinstance(beats, Mapping) else ()):
            if peer in self.info and type(at) in (int, float) and math.isfinite(at):
                self.info[peer].beat_at = float(at)

    def _restored_pos(self, raw: object) -> TokenPos | None:
        """A checkpointed position, or None (forgotten, counted) when no peer would take it: a ring
        peer that sent a position at the cap (epoch or hop 2**62 − 1) made this coordinator derive
        one past it (hop + 1, epoch + 1), and refusing its own checkpoint kept it from starting
        at all (helper-115). Forgetting token knowledge is safe: a restart holds no token (rule 5)."""
        try:
            return _pos(raw, "checkpointed token position")
        except MalformedMessage:
            self.counters.positions_forgotten += 1
            return None

    def take_tallies(self) -> Tallies:
        """The ledger's update counts changed since the previous commit (stored with this one)."""
        changed, whole = self.ledger.take_changed()
        return Tallies(changed=changed, whole=whole)

    def restore_tallies(self, counts: Mapping[str, int]) -> None:
        self.ledger.restore_counts(counts)

    def expected_peers(self) -> tuple[tuple[str, ...], float | None]:
        """Every peer beacons each ``beacon_s``: 30 s (at least 10 beacons) of silence is not normal."""
        return self.peers, max(30.0, 10 * self.config.beacon_s)

    def describe(self) -> dict[str, Any]:
        c = self.counters
        return {
            "name": self.name,
            "ring": list(self.ring),
            "holds_token": self.holding,
            "token": list(self.known) if self.holding and self.known is not None else None,
            "known_token": list(self.known) if self.known is not None else None,
            "last_holder": self.last_holder,
            "age": round(self.age, 3),
            "ages": {p: round(i.age, 3) for p, i in self.info.items()},
            "h_inter": self.h_inter(),
            **({"clients_capped": capped} if (capped := self._clients_capped()) else {}),
            "h_intra": self.config.h_intra,
            "syncs_started": c.syncs_started,
            "syncs_joined": c.syncs_joined,
            "syncs_timed_out": c.syncs_timed_out,
            "merges": c.merges,
            "tokens_passed": c.tokens_passed,
            "tokens_accepted": c.tokens_accepted,
            "tokens_rejected": c.tokens_rejected,
            "tokens_dropped": c.tokens_dropped,
            "regenerations": c.regenerations,
            # only once it happens: the status (and the emulator's message sizes) stay as they were
            **({"models_ignored": c.models_ignored} if c.models_ignored else {}),
            **({"beats_ignored": c.beats_ignored} if c.beats_ignored else {}),
            **({"ages_ignored": c.ages_ignored} if c.ages_ignored else {}),
            **({"models_unexplained": c.models_unexplained} if c.models_unexplained else {}),
            **({"holds_ignored": c.holds_ignored} if c.holds_ignored else {}),
            **({"positions_ignored": c.positions_ignored} if c.positions_ignored else {}),
            **({"positions_forgotten": c.positions_forgotten} if c.positions_forgotten else {}),
            **({"ages_capped": c.ages_capped} if c.ages_capped else {}),
        }



# --------------------------------------------------------------------------- Sync-Spyker


class SyncSpykerPeering(Peering):
    """Sync-Spyker, the paper's synchronous baseline (§6.1; ``mode = "sync"``).

    Clients are served exactly as in Spyker (the same strategy, age ledger and lr decay).
    Servers synchronise in numbered **rounds**, triggered without h_inter: when a server's age
    has grown by ``h_intra`` since its last synchronisation (or ``period_s`` after it, when
    set), it broadcasts its model and age for round ``r + 1`` and stops processing client
    updates — they wait in the buffer (``AgeLedger.hold``). A server that receives a model for
    a round it has not joined broadcasts its own and holds too. Once a server holds the models
    of every server for the round (its own included) it aggregates them in server-id order
    (:func:`merge_in_order`), so every server commits the same model and age; then it
    processes the stored client updates. A server missing models ``sync_timeout_s`` after it
    joined merges those it has and resumes; a model of a round already closed is ignored.
    """

    name: ClassVar[str] = "spyker"

    def __init__(self, coordinator_id: str, ring: Sequence[str], config: SpykerPeerConfig | None = None,
                 *, strategy: Strategy | None = None) -> None:
        self.me = coordinator_id
        self.ring = check_ring(coordinator_id, tuple(ring))
        self.config = config or SpykerPeerConfig(mode="sync")
        self.strategy = strategy if isinstance(strategy, SpykerStrategy) else None
        self.ledger = self.strategy.ledger if self.strategy is not None else AgeLedger()
        self.peers = tuple(c for c in self.ring if c != coordinator_id)
        self.round = 0
        """The last round this server closed."""
        self.models: dict[str, tuple[float, Vector]] = {}
        """Models (age, weights) received for round ``round + 1``."""
        self.joined_at = -math.inf
        self.age_prev = 0.0
        self.last_sync_end = 0.0
        self.syncs = 0
        self.timeouts = 0
        self.ignored = 0
        self.ages_capped = 0
        """Peer models whose age claim exceeded :meth:`age_cap` (merged with the cap as their age)."""
        self.clients_here = 0

    @property
    def age(self) -> float:
        return self.ledger.age

    def age_cap(self) -> float:
        """The most age a peer's model may claim in a round: ours plus ``h_intra`` + ``h_inter``, as
        async Spyker's :meth:`SpykerPeering.age_cap` (an honest server joins a round once it gained
        ``h_intra`` since the last, which every server closed at the same age). helper-161: without
        it one model claiming 2**53 set this server's age to 4.8e15 for good. Sync servers report no
        client counts, so the default h_inter (``n_clients / 5n``) counts this server's clients as
        each server's share."""
        cfg = self.config
        if cfg.h_inter is not None:
            h_inter = cfg.h_inter
        else:
            total = cfg.n_clients if cfg.n_clients is not None else self.clients_here * len(self.ring)
            h_inter = max(1.0, total / (5.0 * len(self.ring)))
        return self.age + cfg.h_intra + h_inter

    @property
    def syncing(self) -> bool:
        return self.ledger.hold

    def _due(self, now: float) -> bool:
        cfg = self.config
        if self.age - self.age_prev >= cfg.h_intra:
            return True
        return cfg.period_s > 0 and now - self.last_sync_end >= cfg.period_s

    def _join(self, view: CoordinatorView, now: float) -> list[PeerSend]:
        """Broadcast our model for round ``round + 1`` and stop processing client updates."""
        self.ledger.hold = True
        self.joined_at = now
        weights = np.array(view.weights, dtype=np.float32, copy=True)
        self.models[self.me] = (self.age, weights)
        return [PeerSend(kind="model", body={"round": self.round + 1, "age": self.age}, weights=weights)]

    def _close(self, view: CoordinatorView, now: float) -> PeerPlan:
        cfg = self.config
        merged, age = merge_in_order(self.models, phi=cfg.phi, eta_a=cfg.eta_a)
        got = sorted(self.models)
        self.round += 1
        self.models = {}
        self.ledger.hold = False
        self.ledger.record_merge(view.version, age)  # numbered by the commit (after a restart: not version + 1)
        self.age_prev = age
        self.last_sync_end = now
        self.syncs += 1
        return PeerPlan(merged=merged, meta={"round": self.round, "models": got, "age": age})

    def on_version(self, view: CoordinatorView, now: float) -> PeerPlan:
        self.ledger.see(view.version)
        self.clients_here = len(view.devices_seen)
        if self.strategy is None:  # another strategy aggregates: one unit of age per version
            self.ledger.record(view.version, self.ledger.age + 1.0)
        if not self.peers or self.syncing or not self._due(now):
            return PeerPlan()
        return PeerPlan(sends=tuple(self._join(view, now)))

    def on_timer(self, view: CoordinatorView, now: float) -> PeerPlan:
        self.ledger.see(view.version)
        if not self.peers:
            return PeerPlan()
        if self.syncing:
            if now >= self.joined_at + self.config.sync_timeout_s:
                self.timeouts += 1
                return self._close(view, now)
            return PeerPlan()
        if self._due(now):
            return PeerPlan(sends=tuple(self._join(view, now)))
        return PeerPlan()

    def on_line_replaced(self, view: CoordinatorView, now: float, *, restored: int) -> None:
        """The age goes back with the weights, and in a round still open our own model is the
        restored one. helper-161: the round kept the model this server joined with, so a rollback
        during a synchronisation (the gate deciding while the server holds) was undone at the
        close: the merge committed the rejected model again, weighted as our own."""
        if self.strategy is None:
            self.ledger.rolled_back(view.version, restored)
        self.age_prev = min(self.age_prev, self.age)
        if self.syncing and self.me in self.models:
            self.models[self.me] = (self.age, np.array(view.weights, dtype=np.float32, copy=True))

    def ignores(self, msg: PeerMsg, now: float) -> bool:
        """A model for a round this server closed (:meth:`on_message` ignores it)."""
        round_ = msg.body.get("round")
        if msg.kind != "model" or msg.sender not in self.peers or type(round_) is not int or not 1 <= round_ <= self.round:
            return False
        self.ignored += 1
        return True

    def on_message(self, view: CoordinatorView, msg: PeerMsg, now: float) -> PeerPlan:
        check_sender("sync-spyker", self.me, self.ring, msg.sender)  # (as async Spyker: not "malformed")
        if msg.kind != "model":
            raise other_protocol("sync-spyker", msg.sender, msg.kind)
        if msg.weights is None:
            raise MalformedMessage("sync-spyker: a model message needs weights")
        round_ = body_int(msg.body, "round", lo=1)
        age = _age(msg.body)
        if round_ > self.round + 1 + MAX_ROUND_JUMP:
            raise MalformedMessage(f"sync-spyker: round {round_} jumps more than 2**22 above the next one ({self.round + 1})")
        if round_ <= self.round:
            self.ignored += 1  # a round we already closed (we timed out on it)
            return PeerPlan(counted=True)
        self.clients_here = len(view.devices_seen)
        cap = self.age_cap()  # (our age: frozen while we hold, the same as we join now)
        if age > cap:  # the model is merged with the cap as its age: a lie adds at most eta_a x cap per round
            self.ages_capped += 1
            age = cap
        sends: list[PeerSend] = []
        if round_ > self.round + 1:  # the others closed rounds without us: catch up
            if self.syncing:
                self.models = {self.me: self.models[self.me]}
            self.round = round_ - 1
            self.ledger.hold = False
        if not self.syncing:
            sends += self._join(view, now)
        self.models[msg.sender] = (age, np.array(msg.weights, dtype=np.float32, copy=True))
        if all(p in self.models for p in self.ring):
            plan = self._close(view, now)
            return PeerPlan(sends=tuple(sends), merged=plan.merged, meta=plan.meta)
        return PeerPlan(sends=tuple(sends))

    def hints_for(self, device: str) -> Mapping[str, float]:
        return self.strategy.lr_hint(device) if self.strategy is not None else {}

    def wake_at(self) -> float | None:
        if not self.peers:
            return None
        if self.syncing:
            return self.joined_at + self.config.sync_timeout_s
        return self.last_sync_end + self.config.period_s if self.config.period_s > 0 else None

    def checkpoint(self) -> dict[str, Any]:
        return {"ledger": self.ledger.checkpoint(counts=False), "age_prev": self.age_prev, "round": self.round, "syncs": self.syncs}

    def take_tallies(self) -> Tallies:
        changed, whole = self.ledger.take_changed()
        return Tallies(changed=changed, whole=whole)

    def restore_tallies(self, counts: Mapping[str, int]) -> None:
        self.ledger.restore_counts(counts)

    def restore(self, state: Mapping[str, Any]) -> None:
        """Resume ages and the round count; a synchronisation in progress is not resumed
        (the peers time out on it, or this server catches up at the next round's model)."""
        if not state:
            return
        self.ledger.restore(state.get("ledger", {}))
        self.ledger.hold = False
        self.age_prev = float(state.get("age_prev", 0.0))
        self.round = int(state.get("round", 0))
        self.syncs = int(state.get("syncs", 0))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "mode": "sync", "ring": list(self.ring), "round": self.round, "syncing": self.syncing,
                "age": round(self.age, 3), "h_intra": self.config.h_intra, "period_s": self.config.period_s,
                "syncs": self.syncs, "timeouts": self.timeouts, "ignored": self.ignored,
                **({"ages_capped": self.ages_capped} if self.ages_capped else {})}
