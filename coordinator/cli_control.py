"""``edgeci versions`` / ``rollback`` / ``pin`` / ``unpin`` — see and steer the release; ``backup`` / ``restore``.

``versions`` reads a coordinator's state dir (safe while it runs: it only reads files that
are written atomically) and prints each version with its time, updates, staleness, source
and the gate's verdicts (validation metrics; promoted, rejected, rolled back, pinned).

``rollback N`` (or ``--to N``), ``pin N`` and ``unpin`` act on a *running* coordinator: they publish
a signed command on ``edgeci/v1/{region}/control`` and wait until the coordinator's
retained status shows the result. The command is signed with an operator key (an
``edgeci pki issue --role operator`` bundle's ``signing.key``, or ``--signing-key``) — or, on the
coordinator's own machine, with its state dir's ``signing.key``. The coordinator accepts
each command once, within five minutes of its time, from keys it trusts and only in the name
it knows the key by (``operators/<name>.pub``; its own key: its id); on a broker with
the project's ACL only operator identities may publish there at all. Both the command and
its outcome are recorded durably in the state dir and survive restarts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coordinator.cli_status import judge_live, liveness, operator_auth, skew_line, wait_seconds
from coordinator.config import bounded, topic_id
from coordinator.metrics import WILL_REASON
from edge_sdk.errors import BadOption, ConfigError, EdgeciError
from edge_sdk.mqtt import MqttTransport, add_broker_arguments, read_bundle
from edge_sdk.signing import Signer, load_signer
from edge_sdk.wire import topics
from edge_sdk.wire.codec import encode, parse_status_json
from edge_sdk.wire.messages import Control

ENV_OPTIONS = ("broker", "region", "state_dir")
CONFIG_LAYERS = "env"


def add_arguments(p: argparse.ArgumentParser) -> None:
    command = p.prog.split()[-1]
    if command == "versions":
        p.add_argument("--state-dir", type=Path, help="the coordinator's state dir; required (or EDGECI_STATE_DIR)")
        p.add_argument("--last", type=_positive, default=30, help="show this many most recent versions (≥ 1)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return
    if command == "backup":
        p.description = BACKUP_HELP
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.add_argument("--state-dir", type=Path, help="the coordinator's state dir (running or stopped); required (or EDGECI_STATE_DIR)")
        p.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="where the backup goes: a new path (refused if it exists) outside the state dir")
        p.add_argument("--json", action="store_true", help="print the result as one JSON object")
        return
    if command == "restore":
        p.description = RESTORE_HELP
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.add_argument("--from", dest="source", type=Path, required=True, metavar="BACKUP", help="a backup made by edgeci backup")
        p.add_argument("--state-dir", type=Path, help="the coordinator's state dir to replace (the coordinator stopped), or a new "
                       "path; required (or EDGECI_STATE_DIR)")
        return
    if command == "new-epoch":
        p.description = NEW_EPOCH_HELP
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.add_argument("--state-dir", type=Path, help="the coordinator's state dir (the coordinator must be stopped); required "
                       "(or EDGECI_STATE_DIR)")
        p.add_argument("--above", type=_epoch, default=0, metavar="EPOCH",
                       help="the epoch the devices hold (edgeci status: 'epoch_ahead'); the new one is above it and the clock")
        p.add_argument("--force", action="store_true",
                       help="number above an --above more than a day ahead of this host's clock (refused otherwise: devices' "
                            "epoch claims are unsigned, and no epoch is left above 2^63-1)")
        return
    if command in ("rollback", "pin", "unpin"):
        p.epilog = CONTROL_HELP
        p.formatter_class = argparse.RawDescriptionHelpFormatter
    if command == "rollback":
        which = p.add_mutually_exclusive_group(required=True)  # `rollback N`, like `pin N`; `--to N` as before
        which.add_argument("version", nargs="?", default=None, type=_version, metavar="N", help="version to make the release again")
        which.add_argument("--to", type=_version, metavar="N", help="the same as N")
    elif command == "pin":
        p.add_argument("version", type=_version, metavar="N", help="version to release and hold (no promotions until unpin)")
    if command in ("rollback", "pin"):
        p.add_argument("--force", action="store_true",
                       help="release it even if the release gate rejected it, or the candidate it was built on (refused otherwise, "
                            "with the gate's scores)")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="MQTT broker URL of the running coordinator (default: %(default)s)")
    p.add_argument("--region", type=topic_id, default="default", help="the coordinator's region (default: %(default)s)")
    p.add_argument("--signing-key", type=Path, help="operator signing key (PEM, Ed25519); default: --bundle's signing.key, else STATE_DIR/signing.key")
    p.add_argument("--state-dir", type=Path, help="the coordinator's state dir (for its signing key when run on its machine)")
    p.add_argument("--operator", help="who you are, recorded with the command; the coordinator refuses any name but the "
                   "one it knows the signing key by (default: the identity the operator bundle was issued for; with the "
                   "coordinator's own key, its id; else the key file's name without .key)")
    # (--wait -1 said "no coordinator status on region ...: is it running?" of a running one)
    p.add_argument("--wait", type=wait_seconds, default=30.0, help="seconds to wait for the coordinator to confirm (default: %(default)s)")
    add_broker_arguments(p)


NEW_EPOCH_HELP = """Start a new numbering for a coordinator's state dir, above EPOCH and the clock.

Each state dir numbers its versions in an epoch (microseconds since 1970 when it was made),
signed into every model. Devices take a newer epoch as a new numbering and refuse an older
one as a replay. Use this when:
  * the state dir was restored from a backup: the fleet has seen its later version numbers already
    (devices holding them wait for a version above theirs; versions would be numbered again);
  * edgeci status warns that devices are ahead of this state dir (a restored backup as above; another
    coordinator of the region ran on another state dir with this signing key; this host's clock was
    behind when the state dir was made): they refuse or outwait this coordinator's models.
The devices then fetch the release again and train the updates they had in flight again; the
versions themselves are kept. Stop the coordinator first."""
BACKUP_HELP = """Copy a coordinator's state dir to a new directory and check that the copy loads.

Safe while the coordinator runs (it is not stopped, its lock is not taken): the copy is made in
the order that keeps it loadable and complete as of its start — the pending-update log, then
the files beside it (release and gate history, rounds, epoch, signing key), then the versions,
oldest first — and then opened as a coordinator would open it. A copy that had to skip an
unreadable version (one caught mid-write) is made again, up to 3 times; only a verified copy is
renamed into place, fsynced (when the same parts fail to load in the last two copies, the state
dir itself is damaged: the copy is kept, as the coordinator would load it, and they are named).
If the state dir holds the model-signing key (signing.key), so does the backup (its mode kept).

To restore: stop the coordinator, run `edgeci restore --from BACKUP --state-dir DIR` (it gives
the copy a new epoch: the fleet has seen the versions after the backup), start it. Updates
acknowledged after the backup was taken are not in it.

Exit status: 0 done; 1 not a state dir, --out's folder missing, or the copy failed or did not
verify (nothing is left at --out); 2 a usage error (--out exists or is inside the state dir)."""
RESTORE_HELP = """Put a backup (edgeci backup) in place of a stopped coordinator's state dir.

It holds the state dir's lock throughout (a running coordinator: refused; one started meanwhile:
refused), copies the backup beside the state dir, gives the copy a new epoch above the backup's
and the replaced state dir's (the fleet has seen the versions after the backup: devices take the
new numbering, fetch the release and train their updates in flight again — what edgeci new-epoch
does), checks that it loads, and only then swaps it in. The state dir it replaces is kept beside
it as STATE_DIR.before-restore-<UTC time>: delete it once the coordinator runs well. Then start
the coordinator. Updates acknowledged after the backup was taken are lost with the restore.

Exit status: 0 done; 1 the coordinator runs, a path is missing or the copy failed (the state dir
is as it was); 2 a usage error (the two paths overlap, --state-dir is something else)."""
CONTROL_HELP = """What rollback N and pin N do: N's weights become the release and the training line again, under a
new version number (devices fetch it). The versions after N leave the training line: an update
trained from one is refused (its device trains again) and a device serving one fetches the release
at once (the region's recall). pin also stops promotions until unpin; rollback keeps a pin.

The coordinator's refusals, printed at once as "the coordinator refused <command>: <reason>: ...":
  unknown_version      no such version (edgeci versions lists them)
  version_unavailable  pruned or unreadable (the state dir keeps the release and the newest 20)
  gate_rejected        the gate rejected N, or the candidate N was built on: --force releases it anyway
  bad_signature        a key the coordinator does not trust (its operators/<name>.pub), or a command
                       signed for another region
  operator_mismatch    --operator is not the name the coordinator knows the key by
  replayed             the same command again, or one issued more than 5 minutes off its clock

Exit status: 0 done; 1 refused, not confirmed within --wait, or a local error (key, bundle);
2 no live coordinator on --region, or a usage error."""
_version = bounded(int, 0, rule="versions start at 0")
_epoch = bounded(int, 0, rule="an epoch is an int >= 0")
_positive = bounded(int, 1)


def run(args: argparse.Namespace) -> int:
    command = args.command
    if command in ("versions", "new-epoch", "backup", "restore") and getattr(args, "state_dir", None) is None:
        # (not argparse's required=True: that refused EDGECI_STATE_DIR, which ENV_OPTIONS reads, before it was read)
        raise BadOption(f"--state-dir is required (or EDGECI_STATE_DIR): the coordinator's state dir that {command} "
                        f"{ {'versions': 'reads', 'backup': 'copies', 'restore': 'replaces'}.get(command, 'renumbers')}")
    if command == "backup":
        return _backup(args)
    if command == "restore":
        return _restore(args)
    if command == "versions":
        return _versions(args)
    if command == "new-epoch":
        return _new_epoch(args)
    return _control(args, command)


def _new_epoch(args: argparse.Namespace) -> int:
    from coordinator.registry import (
        MAX_EPOCH,
        Registry,
        RegistryError,
        StateDirLocked,
        days_beyond_clock,
    )

    if not (args.state_dir / "versions").is_dir():
        raise ConfigError(f"{args.state_dir} is not a coordinator state dir (no versions/)")
    if args.above >= MAX_EPOCH:
        raise ConfigError(f"--above must be below {MAX_EPOCH}")
    days = days_beyond_clock(args.above, time.time())
    if days is not None and not args.force:
        raise ConfigError(f"--above {args.above} is {days:,.1f} days ahead of this host's clock: only a coordinator whose "
                          "clock was that far ahead made it, and the epoch a device reports is not signed (a forger can claim "
                          "any). Every later epoch must be above the new one. Check the clocks and which devices claim it "
                          "(edgeci status); --force numbers above it anyway")
    from edge_sdk.spec import ModelSpec

    try:
        spec = ModelSpec.from_dict(json.loads((args.state_dir / "spec.json").read_text()))
    except (OSError, ValueError, EdgeciError) as exc:
        raise ConfigError(f"{args.state_dir}/spec.json is unreadable ({exc}): is this a coordinator state dir?") from exc
    registry = Registry(args.state_dir, spec)
    try:
        registry.acquire_lock()
    except StateDirLocked as exc:
        raise ConfigError(f"{args.state_dir} is in use by a running coordinator: stop it first, then run this again") from exc
    try:
        old, new = registry.renew_epoch(args.above)
    except RegistryError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        registry.close()
    print(f"{args.state_dir}: epoch {old or 'none'} -> {new}. At its next start the coordinator announces it (retained "
          "recall); its devices fetch the release and train their updates in flight again.")
    return 0


# ---------------------------------------------------------------------- backup


def _backup(args: argparse.Namespace) -> int:
    from coordinator.backup import backup

    copied = [0]
    tty = sys.stderr.isatty() and not args.json

    def progress(n: int) -> None:  # one line, rewritten (a state dir of large models takes a while)
        copied[0] += n
        print(f"\rcopying {args.state_dir}: {copied[0] / 1e6:,.1f} MB", end="", file=sys.stderr, flush=True)

    result = backup(args.state_dir, args.out, progress=progress if tty else None)
    if tty:
        print(file=sys.stderr)
    for part in result.damaged:  # (also in --json)
        print(f"WARNING: the state dir itself cannot load {part}: the coordinator skips it too (a RECOVERY at its start)",
              file=sys.stderr)
    if args.json:
        print(json.dumps({"out": str(result.out), "version": result.version, "release": result.release, "epoch": result.epoch,
                          "pending_updates": result.pending, "files": result.files, "bytes": result.bytes,
                          "attempts": result.attempts, "seconds": round(result.seconds, 3), "damaged": list(result.damaged)}))
        return 0
    print(f"backed up {args.state_dir} to {result.out}: version {result.version} (release {result.release}, epoch "
          f"{result.epoch if result.epoch is not None else 'none'}), {result.pending} acknowledged update(s) pending, "
          f"{result.files} files, {result.bytes / 1e6:,.1f} MB; it loads as a coordinator would load it "
          f"({result.attempts} attempt{'s' if result.attempts > 1 else ''}, {result.seconds:.1f} s).")
    print(f"To restore: stop the coordinator, run `edgeci restore --from {result.out} --state-dir DIR`, start it.")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from coordinator.backup import restore

    r = restore(args.source, args.state_dir)
    for part in r.damaged:
        print(f"WARNING: the backup cannot load {part}: the coordinator will skip it too (a RECOVERY at its start)", file=sys.stderr)
    print(f"restored {args.source} into {r.state_dir}: version {r.version} (release {r.release}), {r.pending} acknowledged "
          f"update(s) pending, epoch {r.old_epoch} -> {r.new_epoch} (devices take the new numbering, fetch the release and "
          "train their updates in flight again).")
    if r.kept is not None:
        print(f"The state dir it replaced is kept as {r.kept}: delete it once the coordinator runs well.")
    print("Start the coordinator.")
    return 0


# ---------------------------------------------------------------------- versions


def _iso(t: float | None) -> str:
    return "-" if not t else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def version_rows(state_dir: Path, last: int = 30) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each kept version's metadata joined with the gate's history, and the release record."""
    from coordinator.registry import read_release_record

    versions_dir = state_dir / "versions"
    if not versions_dir.is_dir():
        raise ConfigError(f"{state_dir} is not a coordinator state dir (no versions/)")
    release = read_release_record(state_dir)
    verdicts: dict[int, list[dict[str, Any]]] = {}
    for event in release.get("history", []):
        verdicts.setdefault(int(event.get("version", -1)), []).append(event)
    rows: list[dict[str, Any]] = []
    newest_release: int | None = None  # each commit records the release then (no gate: nothing in release.json)
    for d in sorted((p for p in versions_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))[-last:]:
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            rows.append({"version": int(d.name), "unreadable": True})
            continue
        v = int(d.name)
        newest_release = meta["release"] if isinstance(meta.get("release"), int) else v
        events = verdicts.get(v, [])
        row: dict[str, Any] = {
            "version": v,
            "created_at": meta.get("created_at"),
            "source": meta.get("source", "?"),
            "updates": meta.get("n_updates", 0),
            "mean_staleness": meta.get("mean_staleness", 0.0),
            "verdict": ", ".join(e.get("action", "?") + (" again" if e.get("unchanged") else "") for e in events) or ("release" if v == release.get("release") else ""),
            "candidate_metric": next((e["candidate_metric"] for e in events if "candidate_metric" in e), None),
            "release_metric": next((e["release_metric"] for e in events if "release_metric" in e), None),
            "canary": next((e["canary"] for e in events if isinstance(e.get("canary"), dict)), None),
            "of": meta.get("of", meta.get("rejected")),
        }
        rows.append(row)
    recorded = release.get("release")
    # Release numbers only grow (a rollback or pin commits a new version), so the later of the
    # release record and the newest commit's own record is the release now: without a gate,
    # release.json holds only operator commands, and every commit after an unpin is the release.
    if newest_release is not None and (not isinstance(recorded, int) or newest_release > recorded):
        release = {**release, "release": newest_release}
        for r in rows:
            if r.get("version") == newest_release and not r.get("verdict") and not r.get("unreadable"):
                r["verdict"] = "release"
    return rows, release


def _versions(args: argparse.Namespace) -> int:
    from coordinator.registry import read_epoch

    rows, release = version_rows(args.state_dir, args.last)
    epoch = read_epoch(args.state_dir)  # the numbering these versions are in (None: from before epochs, or unreadable)
    if args.json:
        print(json.dumps({"release": release.get("release"), "pinned": release.get("pinned", False), "epoch": epoch,
                          "versions": rows}, indent=1))
        return 0
    print(f"release: {release.get('release', '?')}{' (pinned)' if release.get('pinned') else ''} · "
          f"epoch {epoch if epoch is not None else 'none (one is made at the next start)'}")
    print(f"{'version':>8}  {'time (UTC)':20}  {'source':12}  {'updates':>7}  {'staleness':>9}  {'cand.':>6}  {'release':>7}  "
          f"{'canary cand/rel (reports, labels)':33}  verdict")
    for r in rows:
        if r.get("unreadable"):
            print(f"{r['version']:>8}  (unreadable)")
            continue
        cm = "-" if r["candidate_metric"] is None else f"{r['candidate_metric']:.3f}"
        rm = "-" if r["release_metric"] is None else f"{r['release_metric']:.3f}"
        src = r["source"] + (f" of {r['of']}" if r.get("of") is not None else "")
        c = r.get("canary")
        canary = "-" if not c else f"{c.get('candidate', 0):.3f}/{c.get('release', 0):.3f} ({c.get('reports', 0)}, {c.get('n', 0)})"
        print(f"{r['version']:>8}  {_iso(r['created_at']):20}  {src:12}  {r['updates']:>7}  {r['mean_staleness']:>9.2f}  "
              f"{cm:>6}  {rm:>7}  {canary:33}  {r['verdict']}")
    return 0


# ---------------------------------------------------------------------- control


def _key_path(args: argparse.Namespace) -> Path:
    if args.signing_key is not None:
        return Path(args.signing_key)
    if getattr(args, "bundle", None) and (Path(args.bundle) / "signing.key").exists():
        return Path(args.bundle) / "signing.key"
    if args.state_dir is not None:
        return Path(args.state_dir) / "signing.key"
    raise ConfigError("no signing key: pass --signing-key, an operator --bundle, or the coordinator's --state-dir")


def _bundle_identity(key_path: Path) -> str | None:
    """The identity of the bundle a key sits in (``edgeci pki issue`` writes ``signing.key`` beside ``bundle.json``)."""
    return str(read_bundle(key_path.parent)["identity"]) if (key_path.parent / "bundle.json").is_file() else None


def default_operator(key_path: Path, signer: Signer, status: dict[str, Any]) -> str:
    """The name a command signed with ``signer`` must give: the operator bundle's identity (the
    coordinator has its key as ``operators/<identity>.pub``), the coordinator's id when it is
    the coordinator's own key (``status``: its retained status), else the key file's stem."""
    identity = _bundle_identity(key_path)
    if identity:
        return identity
    if status.get("extra", {}).get("signing_key") == signer.kid and status.get("coordinator"):
        return str(status["coordinator"])
    return key_path.stem


def _control_window_s() -> float:
    """How far off the coordinator's clock a command may be issued (its ``control_max_age_s``)."""
    from coordinator.core import CoordinatorConfig

    window = next(f.default for f in dataclasses.fields(CoordinatorConfig) if f.name == "control_max_age_s")
    assert isinstance(window, float)
    return window


def _control(args: argparse.Namespace, command: str) -> int:
    key_path = _key_path(args)
    signer = load_signer(key_path)
    version = getattr(args, "version", -1)
    if getattr(args, "to", None) is not None:
        version = args.to
    operator = args.operator or _bundle_identity(key_path)
    statuses: list[dict[str, Any]] = []
    seen = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        try:
            statuses.append(parse_status_json(payload))
        except EdgeciError:
            return
        seen.set()

    transport = MqttTransport(args.broker, client_id=f"operator-{operator or 'cli'}-{random.getrandbits(32):08x}",
                              subscriptions=[topics.status_topic(args.region)], on_message=on_message,
                              clean_session=True, auth=operator_auth(args))
    transport.start()
    try:
        started = time.monotonic()  # --wait bounds the whole command: the status, then the outcome
        if not seen.wait(min(10.0, args.wait)):
            print(f"no coordinator status on region {args.region!r}: is it running?")
            return 2
        def next_status(wait: float) -> dict[str, Any] | None:
            """The next status to arrive within ``wait`` seconds (and --wait), else None."""
            n, until = len(statuses), min(time.monotonic() + wait, started + args.wait)
            while len(statuses) <= n and (left := until - time.monotonic()) > 0:
                seen.clear()
                if len(statuses) <= n:
                    seen.wait(left)
            return statuses[n] if len(statuses) > n else None

        # A status old by this machine's clock may come from a coordinator whose clock is behind (it
        # accepts commands within the control window of its clock): a live one arriving says so.
        status, now, alive, skew = judge_live(statuses[-1], None, next_status)
        if alive is False:
            print(f"the coordinator of region {args.region!r} is not running ({liveness(status, now, None)[1]}): nothing to {command}")
            return 2
        if skew is not None:
            print(skew_line(skew), file=sys.stderr)
            if abs(skew) > _control_window_s():
                print(f"it refuses a command issued more than {_control_window_s():.0f} s off its clock: correct the clock "
                      "that is wrong (NTP), then send the command again", file=sys.stderr)
        before = statuses[-1].get("extra", {})
        msg = Control(command=command, operator=operator or default_operator(key_path, signer, statuses[-1]),
                      issued_at=time.time(), nonce=random.SystemRandom().randrange(1, 2**63),
                      version=-1 if version is None else version, force=bool(getattr(args, "force", False)))
        topic = topics.control_topic(args.region)
        transport.publish(topic, encode(msg, signer=signer, scope=topics.signing_scope(topic)))
        deadline = started + args.wait
        dropped = False  # its last will was seen (it did not stop: it was cut off)
        while time.monotonic() < deadline:
            seen.clear()
            seen.wait(max(0.0, deadline - time.monotonic()))
            status = statuses[-1]
            extra = status.get("extra", {})
            done = next((e for e in extra.get("recent_versions", []) if e.get("action") == command and e.get("nonce") == msg.nonce), None)
            if done is not None:
                was = "" if command != "unpin" or before.get("pinned") else " (it was not pinned)"
                was = " (already pinned to it: no new version)" if done.get("unchanged") else was
                said = ["pinned"] if extra.get("pinned") else []
                said += [f"a copy of version {done.get('of', version)}"] if command != "unpin" else []
                note = f" ({', '.join(said)})" if said else ""
                print(f"{command} done{was}: release {extra.get('release')}{note}, "
                      f"training line {extra.get('training_version')} (was release {before.get('release')})")
                return 0
            refused = extra.get("control_refused") or {}
            if refused.get("nonce") == msg.nonce:
                print(f"the coordinator refused {command}: {refused.get('reason')}: {refused.get('detail')}")
                return 1
            if status.get("alive") is False:
                if status.get("reason") == WILL_REASON:  # the broker lost it: it may come back (a restart, a redelivery)
                    if not dropped:
                        print(f"the coordinator of region {args.region!r} lost its broker connection before confirming "
                              f"{command}: waiting for it to come back (up to --wait {args.wait:g} s)")
                    dropped = True
                    continue
                print(f"the coordinator of region {args.region!r} stopped before confirming {command}")
                return 1
        reasons = (statuses[-1].get("extra", {}).get("rejected_by_reason") or {})
        grew = sorted(k for k, n in reasons.items() if n > (before.get("rejected_by_reason") or {}).get(k, 0))
        hint = ("it lost its broker connection and did not come back (the command took effect or the broker keeps "
                "it for the coordinator's return; `edgeci status` shows the release before you send it again)" if statuses[-1].get("alive") is False else
                f"it rejected messages meanwhile ({', '.join(grew)})" if grew else
                "a key it does not trust, a clock more than 5 minutes off, a broker ACL that refused the publish, "
                "or its disk failing as it recorded the command (then it may have taken effect: `edgeci status` "
                "shows the release before you send it again)")
        print(f"the coordinator did not confirm {command} within {args.wait:.0f} s: {hint}; see its log")
        return 1
    finally:
        transport.stop()
