"""``edgeci status`` — a region's coordinator, as an operator reads it.

Reads the retained status from the broker and renders it (``--json``: the raw JSON). Exit
code 0 when the coordinator is alive, 2 when none is: no retained status, a status whose
``alive`` is false (the coordinator stopped, or the broker published its last will), or a
status older than a few heartbeats (``published_at``, ``heartbeat_s``) with no live one within
a heartbeat (one that does arrive means the coordinator's clock is behind: said, and alive).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from coordinator.config import bounded, topic_id
from edge_sdk.errors import ConfigError, MalformedMessage, TransportError
from edge_sdk.mqtt import (
    BrokerAuth,
    MqttTransport,
    add_broker_arguments,
    auth_from_args,
    read_bundle,
)
from edge_sdk.wire import topics
from edge_sdk.wire.codec import parse_status_json

log = logging.getLogger("edgeci.status")

CONFIG_LAYERS = "env"
ENV_OPTIONS = ("broker", "region", "bundle", "ca", "cert", "key", "username", "password_file")
"""The coordinator's ``EDGECI_BROKER``, ``EDGECI_REGION`` and broker credentials apply here
too (not ``EDGECI_TIMEOUT``: that is the coordinator's SPIN timeout)."""
NOT_ALIVE = 2
WAIT_LIMIT_S = 1e9
"""The longest --timeout / --wait: Python's waits overflow from about 9.2e9 s (``threading.TIMEOUT_MAX``;
`status --timeout 1e10` ended in an OverflowError traceback, `rollback --wait 1e10` after sending the command)."""


def wait_seconds(text: str) -> float:
    """An argparse ``type`` for a wait: a finite number of seconds above 0 and below :data:`WAIT_LIMIT_S`."""
    value: float = bounded(float, 0, strict=True, finite=True, below=WAIT_LIMIT_S,
                           above_rule=f"must be below {WAIT_LIMIT_S:g} seconds")(text)
    return value


class NoStatus(TransportError):
    """The broker answered but holds no retained status for the region."""


def operator_auth(args: argparse.Namespace) -> BrokerAuth | None:
    """The broker credentials of an operator's command (``status``, ``rollback``, ``pin``).
    A coordinator's or device's bundle is refused: the broker makes a certificate's name its
    client id, so connecting with it would replace that coordinator's (or device's) own
    connection — the coordinator drops off the broker while you read its status."""
    bundle = getattr(args, "bundle", None)
    if bundle is not None:
        manifest = read_bundle(bundle)
        role = manifest.get("role")
        if role in ("coordinator", "device"):
            raise ConfigError(
                f"{bundle} is the {role} bundle of {manifest['identity']!r}: connecting with it would replace the "
                f"broker connection of {role} {manifest['identity']!r} (its certificate name is its client id). "
                f"Use an operator's bundle: edgeci pki issue --dir PKI --role operator NAME (check EDGECI_BUNDLE)")
    return auth_from_args(args)


class StatusReader:
    """The region's status topic, read while open: the retained status first, then live ones."""

    def __init__(self, broker: str, region: str, timeout: float = 5.0, *, auth: BrokerAuth | None = None) -> None:
        self.broker, self.region = broker, region
        self._got: list[dict[str, object]] = []
        self._cond = threading.Condition()
        self._t = MqttTransport(broker, client_id=f"edgeci-status-{uuid.uuid4().hex[:8]}", subscriptions=[topics.status_topic(region)],
                                on_message=self._on_message, clean_session=True, auth=auth)
        self._t.start(timeout)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic != topics.status_topic(self.region):
            return
        try:
            status = parse_status_json(payload)
        except MalformedMessage:
            log.warning("ignoring a message on %s that is not a status (%d bytes)", topic, len(payload))
            return
        with self._cond:
            self._got.append(status)
            self._cond.notify_all()

    def status(self, index: int, timeout: float) -> dict[str, object] | None:
        """The ``index``-th status that arrived (0: the retained one), waiting up to ``timeout`` s."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._got) > index, timeout):
                return None
            return self._got[index]

    def close(self) -> None:
        self._t.stop()


def read_status(broker: str, region: str, timeout: float = 5.0, *, auth: BrokerAuth | None = None) -> dict[str, object]:
    """The retained status JSON of ``region`` (raises NoStatus if none arrives)."""
    reader = StatusReader(broker, region, timeout, auth=auth)
    try:
        status = reader.status(0, timeout)
    finally:
        reader.close()
    if status is None:
        raise NoStatus(f"no status for region {region!r} on {broker} within {timeout:.0f} s")
    return status


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtts://HOST[:8883] with an operator's --bundle in production")
    add_broker_arguments(p)
    p.add_argument("--region", type=topic_id, default="default", help="the coordinator's region")
    # (--timeout -1 was "no connection to broker ... within -1 s", a broker that was there)
    p.add_argument("--timeout", type=wait_seconds, default=5.0, help="seconds to wait for the retained status")
    p.add_argument("--json", action="store_true", help="print the status JSON (machine form)")
    p.add_argument("--stale-after", type=bounded(float, 0, strict=True, finite=True), help="call a status this many seconds old dead (default: 3 heartbeats + 10 s)")


# ---------------------------------------------------------------------- liveness


def liveness(status: Mapping[str, Any], now: float, stale_after: float | None = None) -> tuple[bool | None, str]:
    """``(alive, why)``: True / False, or None when the status carries no liveness fields."""
    published = status.get("published_at")
    age = None if not isinstance(published, int | float) else max(0.0, now - float(published))
    when = "" if age is None else f" (status {_ago(age)})"
    if status.get("alive") is False:
        return False, f"{status.get('reason') or 'stopped'}{when}"
    if age is not None:
        beat = status.get("heartbeat_s")
        limit = stale_after if stale_after is not None else 3 * float(beat if isinstance(beat, int | float) else 30.0) + 10.0
        if age > limit:
            return False, f"last status {_ago(age)}, more than {limit:.0f} s: the coordinator is gone or cut off"
    if status.get("alive") is True:
        return True, f"alive{when}"
    return None, "liveness unknown (this coordinator does not stamp its status)"


# ---------------------------------------------------------------------- rendering


def _ago(seconds: float) -> str:
    s = round(seconds)
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    if s < 172800:
        return f"{s // 3600} h ago"
    return f"{s // 86400} d ago"


def _bytes(n: Any) -> str:
    v = float(n or 0)
    for unit in ("B", "kB", "MB", "GB"):
        if v < 1000 or unit == "GB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1000
    return f"{v:.1f} GB"  # pragma: no cover


def _value(v: Any, nested: bool = False) -> str:
    if isinstance(v, Mapping):
        inner = ", ".join(f"{k}={_value(x, True)}" for k, x in v.items() if k != "name" and x not in (None, "", {}, []))
        return inner if not nested else f"({inner})"
    if isinstance(v, list | tuple):
        return ", ".join(_value(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _gate_line(gate: Mapping[str, Any]) -> str:
    """The release gate's counts and, with --canary, its open round."""
    line = (f"gate      margin {_value(gate.get('margin'))} · pending {len(gate.get('pending') or ())} · promoted "
            f"{gate.get('promoted', 0)} · held {gate.get('held', 0)} · rejected {gate.get('rejected', 0)}")
    canary = gate.get("canary")
    if not isinstance(canary, Mapping):
        return line
    reasons = canary.get("rejected_by_reason") or {}
    why = f" ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))})" if reasons else ""
    line += (f"\ncanary    {_value(canary.get('fraction'))} of devices × {canary.get('samples', '?')} labels · rounds "
             f"{canary.get('rounds', 0)} · reports {canary.get('reports', 0)} · rejected {canary.get('rejected', 0)}{why}")
    rnd = canary.get("round")
    if isinstance(rnd, Mapping):
        line += (f" · open: v{rnd.get('candidate')} vs release v{rnd.get('release')}, "
                 f"{rnd.get('reports', 0)}/{rnd.get('cohort', 0)} reports")
    return line


def ahead_warning(ahead: Mapping[str, Any], now: float) -> str:
    """What to do about devices that claim a numbering ahead of the state dir (``epoch_ahead``).
    The claim is unsigned: an epoch far beyond the clock is named as a likely forgery, and the
    irreversible ``new-epoch --above`` is not suggested for it."""
    from coordinator.registry import days_beyond_clock

    highest = ahead.get("highest")
    said = (f"devices claim a numbering ahead of this state dir (e.g. {ahead.get('device')}: version {ahead.get('version')} of "
            f"epoch {highest}; {ahead.get('messages')} messages, unsigned)")
    days = days_beyond_clock(highest, now)
    if days is not None:
        return (f"WARNING   {said}: that epoch is {days:,.0f} days ahead of the clock, so no "
                f"coordinator of yours made it unless a clock was that far ahead — most likely forged. Do not number above it; "
                f"find the device (broker logs, its certificate) and revoke it")
    return (f"WARNING   {said}: a restored backup, another coordinator on another state dir, or a clock behind. They refuse "
            f"or outwait this coordinator's models: if they are your fleet's, stop it and run "
            f"`edgeci new-epoch --state-dir DIR --above {highest}`")


def render(status: Mapping[str, Any], now: float, stale_after: float | None = None) -> str:
    """The readable view. Keys added later (release, training line, recent versions) are
    shown when present."""
    x: Mapping[str, Any] = status.get("extra") or {}
    alive, why = liveness(status, now, stale_after)
    state = {True: "ALIVE", False: "NOT ALIVE", None: "UNKNOWN"}[alive]
    said = f"{state}{why[len('alive'):]}" if alive and why.startswith("alive") else f"{state}: {why}"  # not "ALIVE: alive"
    out = [f"coordinator {status.get('coordinator', '?')} · region {status.get('region', '?')} · {said}"]
    if "version" not in status:  # e.g. only the last will is retained
        return "\n".join(out)
    params = x.get("strategy_params")
    strategy = str(status.get("strategy", "?")) + (f" ({_value(params)})" if isinstance(params, Mapping) and params else "")
    epoch = f" · epoch {x['epoch']}" if isinstance(x.get("epoch"), int) else ""  # the state dir's numbering
    out.append(f"model     {x.get('model_id', '?')} · version {status.get('version')}{epoch} · strategy {strategy}")
    ahead = x.get("epoch_ahead")
    if isinstance(ahead, Mapping):
        out.append(ahead_warning(ahead, now))
    peering = x.get("peering")
    if isinstance(peering, Mapping) and peering.get("name") not in (None, "none"):  # (the whole of it: --json)
        ring = peering.get("ring")
        facts = [f"{k.replace('_', ' ')} {({True: 'yes', False: 'no'}[v] if isinstance(v, bool) else _value(v))}" for k, v in peering.items()
                 if k not in ("name", "ring") and isinstance(v, bool | int | float | str) and v is not None]
        out.append(f"peering   {peering.get('name')}" + (f" · ring {', '.join(map(str, ring))}" if isinstance(ring, list) else "")
                   + (f" · {' · '.join(facts)}" if facts else ""))
    heard = x.get("peers_heard")
    if isinstance(heard, Mapping) and heard:  # when each peer was last heard from (a silent one: helper-96)
        out.append("peers     " + " · ".join(
            f"{peer} " + (f"heard {max(0.0, now - t):.0f} s ago" if isinstance(t, int | float) and not isinstance(t, bool)
                          else "not heard since the start") for peer, t in heard.items()))
    lines = {k: v for k, v in x.items() if ("release" in k or "training" in k) and v not in (None, "", {})}
    for k, v in sorted(lines.items()):
        pinned = " (pinned: no promotions until `edgeci unpin`)" if k == "release" and x.get("pinned") else ""
        out.append(f"{k.replace('_', ' '):<9} {_value(v)}{pinned}")
    storage = "ok" if x.get("storage_ok", True) else f"FAILING: {x.get('storage_detail') or 'unknown'}"
    out.append(f"storage   {storage}")
    recovered = x.get("recovered_from")
    if isinstance(recovered, list) and recovered:  # the start skipped unreadable versions (helper-98: only --json said so)
        out.append(f"RECOVERY  at start, unreadable and skipped ({len(recovered)}): "
                   + "; ".join(str(r)[:160] for r in recovered[:3]) + (" …" if len(recovered) > 3 else "")
                   + " — the coordinator's log has the details")
    reasons = x.get("rejected_by_reason") or {}
    out.append(f"updates   accepted {status.get('updates_accepted', 0)} · duplicate {status.get('updates_duplicate', 0)} · "
               f"rejected {status.get('updates_rejected', 0)} · buffered {status.get('buffered', 0)} · "
               f"other messages rejected {x.get('messages_rejected', 0)}")
    if reasons:  # updates' and other messages' together (one counter per reason)
        out.append(f"rejected  by reason: {', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))}")
    refused = x.get("control_refused_by_reason") or {}
    if refused:  # verified operator commands that could not run (not hostile: apart from the rejections)
        out.append(f"operator  commands refused: {', '.join(f'{k} {v}' for k, v in sorted(refused.items()))}")
    extra_pulls = "".join(f" · {k} {x[f'pulls_{k}']}" for k in ("serving", "unchanged") if f"pulls_{k}" in x)
    last = x.get("last_aggregation_at")  # is training advancing (helper-171: only --json had it)
    aggregated = x.get("aggregations")  # (a fresh state dir's last_aggregation_at is version 0's creation: no aggregation)
    last_agg = (f" (last {_ago(now - last)})" if isinstance(last, int | float) and not isinstance(last, bool) and last > 0
                and isinstance(aggregated, int) and aggregated > 0 else "")
    out.append(f"pulls     served {x.get('pulls_served', 0)} · deferred {x.get('pulls_deferred', 0)}{extra_pulls} · "
               f"aggregations {x.get('aggregations', 0)}{last_agg} · traffic in {_bytes(x.get('bytes_in'))}, "
               f"out {_bytes(x.get('bytes_out'))}")
    gate = x.get("gate")
    if isinstance(gate, Mapping):
        out.append(_gate_line(gate))
    conv = x.get("conversion")
    if isinstance(conv, Mapping):
        mode = str(conv.get("mode", "?"))
        if mode == "blending":
            mode += f" since version {conv.get('switch_version')} (α {_value(conv.get('alpha'))})"
        elif mode == "switched-off":
            mode += f" at version {conv.get('switch_version')} (stale updates are damped)"
        evidence = "" if conv.get("e1_l1") is None else (
            f" · estimate vs stale error (L1) {_value(conv.get('e1_l1'))} vs {_value(conv.get('e2_l1'))}"
            f" over {conv.get('observations', 0)} devices"
            + (f", worse in {conv['worse_l1']} (L1) / {conv['worse_cos']} (cosine): more than half on both switch"
               if isinstance(conv.get("worse_l1"), int) and isinstance(conv.get("worse_cos"), int) else ""))
        out.append(f"stale     {conv.get('policy', '?')}: {mode} · requested {conv.get('requested', 0)} · applied "
                   f"{conv.get('applied', 0)} · late {conv.get('late', 0)} · failed {conv.get('failed', 0)} · "
                   f"parked {conv.get('parked', 0)}{evidence}")
    online, tracked = x.get("devices_online"), x.get("devices_tracked")
    # pulled: devices whose pull this state dir took (served, deferred or a canary fetch), ever; the
    # table below: every device heard from lately, a refused one included (helper-92 read "seen 3"
    # above a table of 4; "served" counted deferred pulls too)
    out.append(f"devices   pulled {status.get('devices_seen', 0)} (since the state dir began)"
               + (f" · tracked {tracked}" if isinstance(tracked, int) else "")
               + (f" · online {online}" if online is not None else ""))
    devices = x.get("devices") or []
    if devices:
        rows = [["device", "online", "version", "last seen"]]
        for d in devices:
            on = d.get("online")
            version = d.get("version", -1)
            seen = d.get("last_seen")
            rows.append([str(d.get("id", "?")), {True: "yes", False: "no"}.get(on, "?"),
                         str(version) if isinstance(version, int) and version >= 0 else "-",
                         _ago(now - float(seen)) if isinstance(seen, int | float) else "-"])
        out += _table(rows)
        if isinstance(tracked, int) and tracked > len(devices):
            out.append(f"  … {tracked - len(devices)} more (least recently seen)")
    recent = x.get("recent_versions")
    if isinstance(recent, list) and recent and all(isinstance(r, Mapping) for r in recent):
        out.append("release history (newest last): the gate's verdicts on candidates, operators' commands")
        rows = [["when", "event", "version", "release", "details"]]
        rows += [_history_row(r, now) for r in recent]
        out += _table(rows)
    return "\n".join(out)


EVENTS = {"promote": "promoted", "hold": "held", "reject": "rejected", "passed": "passed, not promoted",
          "rollback": "rollback", "pin": "pin", "unpin": "unpin"}
OPERATOR_COMMANDS = ("rollback", "pin", "unpin")
_SHOWN = {"at", "action", "version", "release", "of", "operator", "kid", "nonce", "pinned", "candidate_metric",
          "release_metric", "paired", "canary", "devices"}


def _history_row(event: Mapping[str, Any], now: float) -> list[str]:
    """One entry of the release history (``recent_versions``, coordinator/core.py ``_record``):
    a gate verdict on candidate ``version``, or an operator's command (``version``: the copy of
    version ``of`` it released). ``release``: the release after it. The nonce is left out."""
    action = str(event.get("action", "?"))
    at = event.get("at")
    details = []
    if action in OPERATOR_COMMANDS:
        if event.get("of") is not None:
            details.append(f"copy of v{event['of']}")
        if event.get("operator"):
            details.append(f"by {event['operator']}" + (f" (key {event['kid']})" if event.get("kid") else ""))
    if isinstance(event.get("candidate_metric"), int | float) and isinstance(event.get("release_metric"), int | float):
        details.append(f"validation {event['candidate_metric']:.3f} vs release {event['release_metric']:.3f}")
    paired = event.get("paired")
    if isinstance(paired, list | tuple) and len(paired) == 3:
        details.append(f"better on {paired[0]}, worse on {paired[1]} of {paired[2]}")
    canary = event.get("canary")
    if isinstance(canary, Mapping):
        details.append(f"canary {_value(canary.get('candidate'))} vs {_value(canary.get('release'))} "
                       f"({canary.get('reports', 0)} reports, {canary.get('n', 0)} labels)")
    if event.get("devices") is not None:
        details.append(f"built from the updates of {event['devices']} devices")
    if event.get("pinned"):
        details.append("release pinned")
    details += [f"{k} {_value(v)}" for k, v in event.items() if k not in _SHOWN and v not in (None, "", {}, [])]
    return [_ago(max(0.0, now - float(at))) if isinstance(at, int | float) else "-",
            EVENTS.get(action, action),
            f"v{event['version']}" if isinstance(event.get("version"), int) else "-",
            f"v{event['release']}" if isinstance(event.get("release"), int) else "-",
            " · ".join(details)]


LIVE_WAIT_MAX_S = 120.0
"""The longest ``edgeci status`` waits for a live status when the retained one looks stale."""


def heartbeat_wait(status: Mapping[str, Any], wait_max: float = LIVE_WAIT_MAX_S) -> float:
    """How long to wait for a live coordinator's next status: its heartbeat (30 s if it names none) + 5 s, at most ``wait_max``."""
    beat = status.get("heartbeat_s")
    return min(wait_max, (float(beat) if isinstance(beat, int | float) else 30.0) + 5.0)


def judge_live(status: Mapping[str, Any], stale_after: float | None, next_status: Callable[[float], Mapping[str, Any] | None],
               wait_max: float = LIVE_WAIT_MAX_S) -> tuple[Mapping[str, Any], float, bool | None, float | None]:
    """``(status, now, alive, skew)``: ``status`` judged by :func:`liveness` on this machine's clock,
    unless it is old by that clock yet not stopped: gone, or the clocks differ. A coordinator
    publishes at least once a heartbeat, so the next status (``next_status(seconds)``: None if none
    came) that arrives within a heartbeat + 5 s (at most ``wait_max``) is live, whatever time it
    carries: it is judged on its own clock (``now`` = its ``published_at``) and ``skew`` says how
    far this machine's clock is ahead of the coordinator's (None: not measured)."""
    now = time.time()
    alive, _ = liveness(status, now, stale_after)
    published = status.get("published_at")
    if alive is not False or status.get("alive") is not True or not isinstance(published, int | float):
        return status, now, alive, None
    wait = heartbeat_wait(status, wait_max)
    print(f"(the retained status is {_ago(now - float(published))} by this machine's clock; "
          f"waiting up to {wait:.0f} s for a live one)", file=sys.stderr)
    live = next_status(wait)
    stamp = live.get("published_at") if live is not None else None
    if live is None or not isinstance(stamp, int | float):
        return status, now, alive, None
    skew = time.time() - float(stamp)
    alive, _ = liveness(live, float(stamp), stale_after)
    return live, float(stamp), alive, skew


def skew_line(skew: float) -> str:
    return (f"clock: the coordinator's clock is {abs(skew):.0f} s {'behind' if skew > 0 else 'ahead of'} this machine's "
            "(its status arrived live; liveness judged on its clock)")


def run(args: argparse.Namespace) -> int:
    reader = StatusReader(args.broker, args.region, args.timeout, auth=operator_auth(args))
    try:  # (an unreachable broker is a TransportError: exit 1 with its message)
        status = reader.status(0, args.timeout)
        if status is None:
            # (--json: on stderr, so that stdout holds JSON or nothing; `| jq` failed on this line)
            print(f"NOT ALIVE: no coordinator status for region {args.region!r} on {args.broker} "
                  f"(no coordinator has published there, or the broker lost its retained messages)",
                  file=sys.stderr if args.json else sys.stdout)
            return NOT_ALIVE
        judged, now, alive, skew = judge_live(status, args.stale_after, lambda wait: reader.status(1, wait))
        status = dict(judged)
    finally:
        reader.close()
    if args.json:
        print(json.dumps(status if skew is None else {**status, "clock_behind_s": round(skew, 1)}, indent=2, sort_keys=True))
    else:
        print(render(status, now, args.stale_after))
        if skew is not None:
            print(f"  {skew_line(skew)}")
    return NOT_ALIVE if alive is False else 0
