"""A synchronous two-tier hierarchy (HierFAVG-like, Liu et al. 2020): the baseline Spyker
compares against.

Theory of operation
-------------------
Every coordinator is an **edge** server running synchronous FedAvg rounds with its own
devices (strategy ``"hierfavg"``, :mod:`coordinator.strategies.hierfavg`: FedAvg's rounds plus a gate).
After every ``kappa2`` edge rounds the edge sends its model and the number of samples
behind it to the **cloud** (one coordinator of the ring, ``cloud``), and *stops starting
rounds* until the cloud answers — that is what makes the hierarchy synchronous. The cloud
waits for the models of every edge for that cloud round (or ``sync_timeout_s``),
averages them weighted by samples (no edge's share above ``max_share``: the samples are
each edge's own claim), and broadcasts the result, which every edge (the
cloud's own included) commits as its next version before resuming its rounds. An edge
that hears nothing for ``sync_timeout_s`` resumes on its own model; its model for a cloud round
the cloud has already closed is dropped there (counted, ``ignored``): the paper's cloud averages
one round's edge models, and the edge's next one comes with the next round.

The cloud's collection is tagged by round (helper-177): ``collected`` holds the models for the round
it collects (its own round once its model is in, else the next), ``ahead`` each edge's newest model
for a later round (an edge that timed out and went on counts its rounds ahead of the cloud's), which
waits for its round; the open round averages only its own round's models, and does not wait for an
edge whose model is ahead. When the cloud opens its next round and no edge sent a model for it, it
opens the newest round an edge sent one for (the rounds between had no cloud: an edge's round counter
ran ahead while the cloud was silent), so the edges take its answer again; older ones are dropped
(counted). Before, an edge model for any later round went into the open one, and an edge that had
timed out while the cloud was down never took a global again (each answer a round behind its own).

A restarted cloud has lost the edges' models of the open round (model-sized: not in the commit's
JSON checkpoint). It asks for them again instead (``resend``, broadcast at its first timer, naming
the open round and the time it asked): an edge still waiting on that round or a later one sends the
model it sent again (the version it waits on, with its samples claim), once per request, and waits
``sync_timeout_s`` from then; the cloud's deadline for the round starts again at the request. An
edge that gave up on the round sends nothing and the round closes at its deadline, as it would have.

A rollback or an operator's pin (:meth:`HierPeering.on_line_replaced`) puts the samples count
and the edge rounds counted toward ``kappa2`` back to the restored version's (a rejected edge
round is no aggregation the model sent holds). If it abandons the model this edge sent for the round it waits
on, the edge sends the restored model again for that round, marked ``replaces``: a cloud still
collecting the round takes it instead (a cloud that closed the round, or holds no model of that
edge, ignores it, counted); the global answer names the edges whose replacement it took
(``replaced``), and an edge that sent one and is not named ignores that answer (counted) and
resumes on its own line: the global holds the model its gate abandoned.
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
    body_bool,
    body_float,
    body_id,
    body_int,
    check_ring,
    check_sender,
)
from coordinator.strategies.base import CoordinatorView
from coordinator.strategies.hierfavg import HierEdgeStrategy
from edge_sdk.errors import ConfigError, MalformedMessage, other_protocol
from edge_sdk.spec import Vector
from edge_sdk.wire.messages import PeerMsg

__all__ = ["HierPeerConfig", "HierPeering", "capped_shares", "weighted_mean"]

SAMPLES_KEPT = 64
"""Versions whose samples count an edge remembers for a rollback (older ones restore to 0)."""

MAX_ROUND_GAP = 2**20
"""How far past the cloud's open round an edge model's round may be. An honest edge gets ahead by one
round per ``sync_timeout_s`` the cloud is silent (2**20 rounds: 12 days at 1 s); the cloud opens the
newest round it holds a model for, so a larger claim (refused, malformed) would move every edge's
round counter that far, toward the 2**63 a peer body's int may hold."""


def capped_shares(samples: Sequence[float], max_share: float) -> np.ndarray:
    """Each edge's share of the average, n_e / Σ n, with no share above ``max_share``: the excess
    of a capped edge goes to the others in proportion to their samples (water-filling), so the
    order among them is kept. Equal shares when no edge reports samples, or when ``max_share``
    is below 1 / edges (no share can then meet it)."""
    w = np.asarray(samples, dtype=np.float64)
    n = len(w)
    if w.sum() <= 0 or max_share * n < 1.0:
        return np.full(n, 1.0 / n)
    capped = np.zeros(n, dtype=bool)
    while True:
        free = ~capped
        left = 1.0 - max_share * int(capped.sum())
        total = float(w[free].sum())
        shares = np.where(capped, max_share, 0.0)
        shares[free] = left * w[free] / total if total > 0 else left / int(free.sum())
        over = free & (shares > max_share)
        if not over.any():
            return shares
        capped |= over


def weighted_mean(models: Sequence[Vector], samples: Sequence[int], max_share: float = 1.0) -> Vector:
    """Σ n_e W_e / Σ n_e (equal weights when no edge reports samples), no edge's share above
    ``max_share`` (:func:`capped_shares`)."""
    w = np.asarray(samples, dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    if float(w.max()) / float(w.sum()) > max_share:  # (below it: the sums as before, to the bit)
        w = capped_shares(samples, max_share)
    acc = np.zeros(np.asarray(models[0]).shape, dtype=np.float64)
    for m, we in zip(models, w, strict=True):
        acc += float(we) * np.asarray(m, dtype=np.float64)
    out: Vector = (acc / float(w.sum())).astype(np.float32)
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class HierPeerConfig:
    cloud: str = ""
    """The coordinator that aggregates edges (default: the first of the ring)."""
    kappa2: int = 2
    """Edge rounds per cloud round."""
    sync_timeout_s: float = 60.0
    max_share: float = 0.5
    """The largest share of the cloud's average any one edge gets, whatever samples it claims: an
    edge's ``samples`` is its own word (one claiming 10**12 made the average its model), so no
    edge outweighs all the others together (two edges: equal weights once one has more than half
    the samples). 1: plain sample weights."""

    def __post_init__(self) -> None:
        if self.kappa2 < 1 or not self.sync_timeout_s > 0:
            raise ConfigError("hierfavg: need kappa2 >= 1 and sync_timeout_s > 0")
        if not 0 < self.max_share <= 1:
            raise ConfigError("hierfavg: max_share must be in (0, 1]")


class HierPeering(Peering):
    """Edge ↔ cloud synchronous exchange. See the module docstring."""

    name: ClassVar[str] = "hierfavg"

    def __init__(self, coordinator_id: str, ring: Sequence[str], config: HierPeerConfig | None = None,
                 *, strategy: object = None) -> None:
        self.me = coordinator_id
        self.ring = check_ring(coordinator_id, tuple(ring))
        self.config = config or HierPeerConfig()
        self.cloud = self.config.cloud or self.ring[0]
        if self.cloud not in self.ring:
            raise ConfigError(f"hierfavg: cloud {self.cloud!r} is not in the ring {list(self.ring)}")
        if not isinstance(strategy, HierEdgeStrategy):
            raise ConfigError("peering 'hierfavg' needs strategy 'hierfavg' (the edge rounds wait for the cloud)")
        self.gate = strategy.gate
        self.edge_rounds = 0
        self.cloud_round = 0
        self.wait_started = -math.inf
        self.collected: dict[str, tuple[int, Vector]] = {}
        """Cloud only: the (samples, model) of each edge for the round it collects (:meth:`open_round`)."""
        self.ahead: dict[str, tuple[int, int, Vector, float]] = {}
        """Cloud only: each edge's newest (round, samples, model, arrival) for a round after the open one."""
        self.closed_round = 0
        """Cloud only: the last cloud round it closed (an edge model for it or before is late: dropped)."""
        self.collect_started = -math.inf
        self.cloud_syncs = 0
        self.timeouts = 0
        self.ignored = 0
        """Late answers: a global model or edge model for a cloud round already given up on."""
        self.capped = 0
        """Cloud rounds whose average capped an edge's share at ``max_share`` (its samples claim)."""
        self.sends = 0
        """Models sent to (or, the cloud, put into) a cloud round."""
        self.samples_at: dict[int, tuple[int, int, int]] = {}
        """Version → (``sends`` before it, the samples count behind it, ``edge_rounds`` at it): what a
        rollback restores."""
        self.rounds_at_send = 0
        """``edge_rounds`` when the last model was sent (a multiple of ``kappa2``)."""
        self.sent_version: int | None = None
        """The version of the model in the cloud round this coordinator waits on (None: none)."""
        self.replacing: int | None = None
        """The cloud round this edge sent a replacement for (its model there was rolled back)."""
        self._replacement: tuple[float, PeerSend] | None = None
        """An edge's replacement to send (at the next timer: on_line_replaced sends nothing itself)."""
        self.replacements: set[str] = set()
        """Cloud only: the edges whose model in the open round is a replacement."""
        self.replaced = 0
        """Replacements: sent (an edge) or taken into the open round (the cloud)."""
        self.claim_sent = 0
        """The samples claimed with the model in the cloud round waited on (the cloud's own entry after a restart)."""
        self.restore_refused = 0
        """Parts of the checkpoint that did not fit (not restored): the samples count, the round waited on."""
        self._own_pending = False
        """The cloud restarted while collecting: its own model goes back in at the first view (_take_own_back)."""
        self._ask_resend = False
        """The cloud restarted: it asks the edges for the open round's models at its first timer."""
        self.resent_at = -math.inf
        """Edge only: the time of the last resend request it answered (a replayed request is not answered)."""
        self.resends = 0
        """Resend requests sent (the cloud) or answered with the model again (an edge)."""

    def on_version(self, view: CoordinatorView, now: float) -> PeerPlan:
        if self._own_pending:
            self._take_own_back(view)
        self.edge_rounds += 1
        self._remember(view.version)
        if self.edge_rounds % self.config.kappa2 or len(self.ring) == 1:
            return PeerPlan()
        if self.me == self.cloud and not self.collected:  # (no edge is at its next round: it skips to theirs)
            self._skip_to(max([self.cloud_round + 1, *(held[0] for held in self.ahead.values())]))
        self.cloud_round += 1
        self.rounds_at_send = self.edge_rounds
        self.gate.waiting = True
        self.wait_started = now
        samples, self.gate.samples = self.gate.samples, 0
        self.claim_sent = samples
        self.sends += 1
        self.sent_version, self.replacing = view.version, None
        weights = np.array(view.weights, dtype=np.float32, copy=True)
        if self.me == self.cloud:
            self._promote()
            return self._collect(self.me, self.cloud_round, samples, weights, now)
        body = {"round": self.cloud_round, "samples": samples}
        return PeerPlan(sends=(PeerSend(kind="edge", to=self.cloud, body=body, weights=weights),))

    def on_message(self, view: CoordinatorView, msg: PeerMsg, now: float) -> PeerPlan:
        check_sender("hierfavg", self.me, self.ring, msg.sender)
        if self._own_pending:
            self._take_own_back(view)
        if msg.kind == "resend":
            return self._resend(view, msg, now)
        if msg.weights is None:
            raise MalformedMessage("hierfavg: peer messages carry a model")
        view.spec.check_update(msg.weights)  # (the core checked it already: a cached pass; sans-IO callers too)
        round_ = body_int(msg.body, "round", lo=1)
        if msg.kind == "edge":
            if self.me != self.cloud:
                raise MalformedMessage("hierfavg: edge model sent to a coordinator that is not the cloud")
            replaces = "replaces" in msg.body and body_bool(msg.body, "replaces")
            return self._collect(msg.sender, round_, body_int(msg.body, "samples"), msg.weights, now, replaces=replaces)
        if msg.kind == "global":
            if msg.sender != self.cloud:  # helper-115: any edge's "global" was committed by every edge
                raise MalformedMessage(f"hierfavg: a global model from {msg.sender!r}, which is not the cloud ({self.cloud!r})")
            if round_ < self.cloud_round or not self.gate.waiting:
                self.ignored += 1
                return PeerPlan(counted=True)  # late answer to a round we gave up on
            replaced = msg.body.get("replaced", [])
            if not isinstance(replaced, list) or len(replaced) > len(self.ring):
                raise MalformedMessage("hierfavg: 'replaced' must be a list of the ring's coordinators")
            taken = {body_id(e, "replaced edge") for e in replaced}
            if self.replacing == round_ and self.me not in taken:
                self.ignored += 1  # it averaged the model our gate abandoned (closed before our replacement)
                self.gate.waiting, self.sent_version, self.replacing = False, None, None
                return PeerPlan(counted=True)
            return self._resume(msg.weights, round_)
        raise other_protocol("hierfavg", msg.sender, msg.kind)

    def on_line_replaced(self, view: CoordinatorView, now: float, *, restored: int) -> None:
        """The samples count and the edge rounds counted toward ``kappa2`` go back to the restored
        version's (0 and the count at the last model sent, if it predates that model or is no longer
        remembered). If the model in the cloud round we wait on was built after
        ``restored``, the restored one replaces it: in the cloud's own collection (helper-161), or
        sent again by an edge, marked ``replaces`` (see the module docstring). helper-166: the count
        kept the abandoned rounds' samples (an edge rolled back from 2 rounds to 1, then trained one
        more, claimed 30 samples for a model of 20), and an edge's rejected model already sent came
        back inside the global model (50s rejected, the cloud's 1s: the edge committed 25.5s).
        helper-172: a rejected edge round still counted toward ``kappa2``, so the model sent held
        fewer edge rounds than the other edges' (kappa2 = 3, one round rejected: 2)."""
        if self._own_pending:
            self._take_own_back(view)
        sends, count, rounds = self.samples_at.get(restored, (-1, 0, 0))
        waiting_on = self.sent_version if self.gate.waiting else None
        if waiting_on is not None and waiting_on > restored:
            claim = count if sends == self.sends - 1 else 0  # behind the restored model, for that round
            weights = np.array(view.weights, dtype=np.float32, copy=True)
            if self.me == self.cloud:
                if self.me in self.collected:
                    self.collected[self.me] = (claim, weights)
            else:
                body = {"round": self.cloud_round, "samples": claim, "replaces": True}
                self._replacement = (now, PeerSend(kind="edge", to=self.cloud, body=body, weights=weights))
                self.replaced += 1
                self.replacing = self.cloud_round
            self.sent_version = view.version
            self.gate.samples = 0
        else:
            self.gate.samples = count if sends == self.sends else 0
            self.edge_rounds = rounds if sends == self.sends else self.rounds_at_send
        self._remember(view.version)

    def _remember(self, version: int) -> None:
        self.samples_at[version] = (self.sends, self.gate.samples, self.edge_rounds)
        if len(self.samples_at) > SAMPLES_KEPT:
            del self.samples_at[min(self.samples_at)]

    def open_round(self) -> int:
        """Cloud: the round it collects, its own once its model is in (waiting), else its next."""
        return self.cloud_round if self.gate.waiting else self.cloud_round + 1

    def _collect(self, edge: str, round_: int, samples: int, weights: Vector, now: float, *,
                 replaces: bool = False) -> PeerPlan:
        open_round = self.open_round()
        if round_ < open_round or round_ <= self.closed_round:
            # Late, for a round already closed: an edge that timed out earlier catches up next round.
            # helper-172: one in after the close, before the cloud's own next round began (round_ ==
            # cloud_round), was kept and averaged into the next round, its model from the round before.
            self.ignored += 1
            return PeerPlan(counted=True)
        if round_ > open_round + MAX_ROUND_GAP:
            raise MalformedMessage(f"hierfavg: an edge model for round {round_}, {round_ - open_round} after the cloud's open round")
        if round_ > open_round:
            # The edge went on without the cloud (timed out): its model waits for its round (helper-177:
            # it went into the open round, a model of a later round averaged with this round's).
            held = self.ahead.get(edge)
            if replaces or (held is not None and held[0] > round_):  # (a replacement: of the open round's only)
                self.ignored += 1
                return PeerPlan(counted=True)
            self.ahead[edge] = (round_, samples, np.array(weights, dtype=np.float32, copy=True), now)
            return self._close_if_complete()
        if replaces:
            if edge not in self.collected:  # the round closed before it (or never had its model)
                self.ignored += 1
                return PeerPlan(counted=True)
            self.replaced += 1
            self.replacements.add(edge)
        if not self.collected:
            self.collect_started = now
        self.collected[edge] = (samples, np.array(weights, dtype=np.float32, copy=True))
        return self._close_if_complete()

    def _close_if_complete(self) -> PeerPlan:
        """Close the open round once the cloud's model is in and every edge sent its model for it, or
        one for a later round (it went on: no model of this round comes from it)."""
        if self.me not in self.collected or any(e not in self.collected and e not in self.ahead for e in self.ring):
            return PeerPlan()
        return self._close_cloud_round()

    def _skip_to(self, round_: int) -> None:
        """The cloud's next round is ``round_``: the models for the rounds before it are dropped (counted)."""
        if round_ <= self.open_round():
            return
        self.ignored += len(self.collected) + sum(held[0] < round_ for held in self.ahead.values())
        self.collected, self.replacements = {}, set()
        self.ahead = {e: held for e, held in self.ahead.items() if held[0] >= round_}
        self.cloud_round = round_ - 1

    def _promote(self) -> None:
        """The models held for the round the cloud now collects move into its collection."""
        open_round = self.open_round()
        due = {e: held for e, held in self.ahead.items() if held[0] == open_round}
        if not due:
            return
        if not self.collected:
            self.collect_started = min(held[3] for held in due.values())
        for e, (_, samples, weights, _at) in due.items():
            self.collected[e] = (samples, weights)
            del self.ahead[e]

    def _resend(self, view: CoordinatorView, msg: PeerMsg, now: float) -> PeerPlan:
        """An edge: the restarted cloud asks for the models of its open round again."""
        if msg.sender != self.cloud or msg.weights is not None:
            raise MalformedMessage(f"hierfavg: a resend request is the cloud's ({self.cloud!r}) and carries no model")
        round_, asked_at = body_int(msg.body, "round", lo=1), body_float(msg.body, "at")
        if not self.gate.waiting or self.sent_version is None or self.cloud_round < round_:
            return PeerPlan()  # nothing sent for that round that it still waits on
        if asked_at <= self.resent_at:
            self.ignored += 1  # answered already (a replay would make it send its model again and again)
            return PeerPlan(counted=True)
        weights = view.weights if view.version == self.sent_version else view.weights_at(self.sent_version)
        if weights is None:
            return PeerPlan()  # (the version it waits on is no longer kept: the round closes at its deadline)
        self.resent_at, self.wait_started = asked_at, max(self.wait_started, now)
        self.resends += 1
        # The model it waits on already holds a replacement's (on_line_replaced set sent_version): sent as
        # the model, its answer is taken (the restarted cloud knows nothing of a replacement).
        self.replacing, self._replacement = None, None
        body = {"round": self.cloud_round, "samples": self.claim_sent}
        return PeerPlan(sends=(PeerSend(kind="edge", to=self.cloud, body=body, weights=np.array(weights, dtype=np.float32, copy=True)),))

    def _close_cloud_round(self) -> PeerPlan:
        edges = sorted(self.collected)
        samples = [self.collected[e][0] for e in edges]
        cap = self.config.max_share
        if len(samples) * cap >= 1 and sum(samples) > 0 and max(samples) / sum(samples) > cap:
            self.capped += 1  # (a round closed on the cloud's model alone, at a timeout, caps nothing)
        merged = weighted_mean([self.collected[e][1] for e in edges], samples, self.config.max_share)
        self.collected = {}
        self.closed_round = self.cloud_round
        self.cloud_syncs += 1
        body: dict[str, Any] = {"round": self.cloud_round}
        if self.replacements:  # (only then: the messages' sizes as they were)
            body["replaced"] = sorted(self.replacements)
            self.replacements = set()
        send = PeerSend(kind="global", body=body, weights=merged)
        plan = self._resume(merged, self.cloud_round)
        self._promote()
        return PeerPlan(sends=(send,), merged=plan.merged, meta=plan.meta)

    def _resume(self, weights: Vector, round_: int) -> PeerPlan:
        self.gate.waiting, self.sent_version, self.replacing = False, None, None
        self.cloud_round = max(self.cloud_round, round_)
        return PeerPlan(merged=np.array(weights, dtype=np.float32, copy=True), meta={"cloud_round": round_})

    def on_timer(self, view: CoordinatorView, now: float) -> PeerPlan:
        if self._own_pending:
            self._take_own_back(view)
        if self._replacement is not None:
            _, send = self._replacement
            self._replacement = None
            return PeerPlan(sends=(send,))
        if self._ask_resend:
            self._ask_resend = False
            self.resends += 1
            if self.collected:  # (its own model, put back): the edges' models come again from now
                self.collect_started = now
            return PeerPlan(sends=(PeerSend(kind="resend", body={"round": self.open_round(), "at": now}),))
        timeout = self.config.sync_timeout_s
        if self.me == self.cloud and self.collected and self.me in self.collected and now >= self.collect_started + timeout:
            self.timeouts += 1
            return self._close_cloud_round()
        if self.gate.waiting and now >= self.wait_started + timeout and self.me != self.cloud:
            self.timeouts += 1
            self.gate.waiting, self.sent_version, self.replacing = False, None, None  # the cloud is silent: carry on alone
        return PeerPlan()

    def wake_at(self) -> float | None:
        if self._ask_resend:
            return -math.inf
        if self._replacement is not None:
            return self._replacement[0]
        t = self.config.sync_timeout_s
        wakes = []
        # Only what on_timer acts on: an edge's wait, the cloud's round with its own model in (helper-177: a
        # restarted cloud's deadline is later than its own wait's; a time passed asks the core for no timer)
        if self.gate.waiting and self.me != self.cloud:
            wakes.append(self.wait_started + t)
        if self.me in self.collected:
            wakes.append(self.collect_started + t)
        return min(wakes) if wakes else None

    def checkpoint(self) -> dict[str, Any]:
        """The rounds; once set (a checkpoint from before restores as it was), the samples behind the
        aggregations since the last model sent and the cloud round this coordinator waits on.
        helper-175: a restart while waiting forgot it waited: an edge started its rounds at once and
        ignored the cloud's answer (``not waiting``: a late answer); the cloud, its own model gone from
        the collection (it closes a round only with its own model in), kept the edges' models for its
        next round and averaged them with its own from that round. The edges' models the cloud had
        collected are not kept (model-sized: not in a commit's JSON): a restarted cloud asks the edges
        for them again (helper-177, ``resend``: see the module docstring)."""
        waiting = self.gate.waiting and self.sent_version is not None and math.isfinite(self.wait_started)
        return {"edge_rounds": self.edge_rounds, "cloud_round": self.cloud_round,
                **({"closed_round": self.closed_round} if self.closed_round else {}),
                **({"samples": self.gate.samples} if self.gate.samples else {}),
                **({"waiting": {"version": self.sent_version, "since": self.wait_started, "claim": self.claim_sent,
                                **({"replacing": self.replacing} if self.replacing is not None else {})}} if waiting else {})}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.edge_rounds = int(state.get("edge_rounds", 0))
        # (a state: a restart, not the first start, which has no round open and no edge waiting on one)
        self._ask_resend = self.me == self.cloud and len(self.ring) > 1 and bool(state)
        self.rounds_at_send = self.edge_rounds - self.edge_rounds % self.config.kappa2
        self.cloud_round = int(state.get("cloud_round", 0))
        self.closed_round = max(0, min(int(state.get("closed_round", 0)), self.cloud_round))
        samples = state.get("samples", 0)
        if type(samples) is int and samples >= 0:
            self.gate.samples = samples
        else:
            self.restore_refused += 1
        waiting = state.get("waiting")
        if waiting is None or self.cloud_round <= self.closed_round or len(self.ring) == 1:
            return  # (a cloud round it closed itself is not waited on)
        if not isinstance(waiting, Mapping):
            self.restore_refused += 1
            return
        version, since, replacing = waiting.get("version"), waiting.get("since"), waiting.get("replacing")
        claim = waiting.get("claim", 0)
        if not (type(version) is int and version >= 0 and isinstance(since, (int, float)) and not isinstance(since, bool)
                and math.isfinite(since)
                and (replacing is None or replacing == self.cloud_round) and type(claim) is int and claim >= 0):
            self.restore_refused += 1
            return
        self.claim_sent = claim
        self.gate.waiting, self.sent_version, self.wait_started = True, version, float(since)
        self.replacing = self.cloud_round if replacing is not None else None
        self.rounds_at_send = self.edge_rounds
        if self.me == self.cloud:
            self._own_pending = True  # its own model, the version it sent, goes back in at the first view

    def _take_own_back(self, view: CoordinatorView) -> None:
        """The cloud restarted while collecting: its own model, the version it put in, back in the
        collection (its head while it waits); another head (a rollback since): it waits no longer."""
        self._own_pending = False
        if view.version == self.sent_version:
            self.collect_started = self.wait_started
            self.collected[self.me] = (self.claim_sent, np.array(view.weights, dtype=np.float32, copy=True))
        else:
            self.gate.waiting, self.sent_version, self.replacing = False, None, None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "cloud": self.cloud, "kappa2": self.config.kappa2, "edge_rounds": self.edge_rounds,
                "cloud_round": self.cloud_round, "waiting": self.gate.waiting, "cloud_syncs": self.cloud_syncs,
                "timeouts": self.timeouts,
                # only once it happens: the status (and the emulator's message sizes) stay as they were
                **({"ignored": self.ignored} if self.ignored else {}),
                **({"capped": self.capped} if self.capped else {}),
                **({"replaced": self.replaced} if self.replaced else {}),
                **({"resends": self.resends} if self.resends else {}),
                **({"restore_refused": self.restore_refused} if self.restore_refused else {})}
