"""Runs an older edgeci (the snapshot in ``tests/compat/``) in its own process, driven line by line:
each stdin line is a JSON command, each stdout line its JSON answer. Started by
:mod:`tests.test_sdk_compat` with ``PYTHONPATH`` set to the extracted snapshot, so ``edge_sdk`` and
``coordinator`` below are the OLD packages; this file must therefore use only what they had
(``EdgeClient``'s and ``CoordinatorOptions``' keyword arguments as of the snapshot).

Commands: ``hello`` (which code answers), ``devices`` (start EdgeClients), ``label`` (a device labels
samples), ``state`` (each device's version, weights digest, counters, events), ``coordinator`` (start a
daemon), ``coordinator_state``, ``stop``."""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from frames import digest  # (next to this file: sys.path[0])


def maybe_digest(weights: Any) -> str | None:
    return None if weights is None else digest(weights)


class Side:
    def __init__(self) -> None:
        self.clients: dict[str, Any] = {}
        self.events: dict[str, list[str]] = {}
        self.daemon: Any = None
        self.task: Any = None

    def _task(self, name: str) -> Any:
        from edge_sdk.tasks import get_task

        if self.task is None:
            self.task = get_task(name)
        return self.task

    def hello(self, cmd: dict[str, Any]) -> dict[str, Any]:
        import inspect

        import edge_sdk
        from edge_sdk.client import EdgeClient
        from edge_sdk.wire.codec import PROTOCOL_VERSION

        return {"edge_sdk": edge_sdk.__file__, "protocol": PROTOCOL_VERSION,
                "client_params": sorted(inspect.signature(EdgeClient.__init__).parameters)}

    def devices(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from edge_sdk.client import EdgeClient
        from edge_sdk.tasks.base import TrainConfig

        task = self._task(cmd.get("task", "digits"))
        for d in cmd["devices"]:
            name = d["id"]
            self.events[name] = []
            extra = {"bundle": d["bundle"]} if d.get("bundle") else {}
            extra.update(d.get("options", {}))  # keyword arguments this version has (the test knows which)
            c = EdgeClient(broker=cmd["broker"], device_id=name, region=cmd["region"], task=task, data_dir=d["data_dir"],
                           min_samples=d["min_samples"], train=TrainConfig(epochs=1, seed=d.get("seed", 0)),
                           request_timeout_s=3.0, seed=d.get("seed", 0), inference="torch", **extra)
            c.on("*", lambda kind, data, _n=name: self.events[_n].append(kind))
            self.clients[name] = c.start(15)
        return {"started": sorted(self.clients)}

    def label(self, cmd: dict[str, Any]) -> dict[str, Any]:
        data = self._task(cmd.get("task", "digits")).data()
        split = data.test if cmd.get("split") == "test" else data.pool
        c = self.clients[cmd["device"]]
        start = int(cmd.get("offset", 0))
        for i in range(start, start + int(cmd["n"])):
            c.add_sample(split.x[i], int(split.y[i]))
        return {"labelled": int(cmd["n"])}

    def state(self, cmd: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name, c in self.clients.items():
            s = c.core.state
            out[name] = {"version": c.version, "weights": maybe_digest(c.weights), "counters": dict(s.counters),
                         "events": list(self.events[name]), "canary_state": getattr(s, "canary_state", None),
                         "next_seq": s.next_seq, "total": s.total, "trained_upto": s.trained_upto,
                         "phase": s.phase.value}
        return out

    def coordinator(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions

        task = self._task(cmd.get("task", "digits"))
        opts = dict(cmd["options"])
        for key in ("state_dir", "bundle", "validation", "init"):
            if key in opts:
                opts[key] = Path(opts[key])
        self.daemon = CoordinatorDaemon(CoordinatorOptions(**opts), task=task).start()
        return {"started": True}

    def coordinator_state(self, cmd: dict[str, Any]) -> dict[str, Any]:
        core = self.daemon.core
        version, weights = core.release
        at = cmd.get("weights_at")
        return {"version": core.version, "release": version, "release_weights": maybe_digest(weights),
                "weights_at": None if at is None else maybe_digest(core.weights_at(at)),
                "counters": {k: v for k, v in core.counters.items() if v}}

    def fields(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Each message type this version knows, and its fields in order."""
        from edge_sdk.wire.messages import MESSAGE_TYPES

        return {"fields": {t: [f.name for f in dataclasses.fields(c)] for t, c in MESSAGE_TYPES.items()}}

    def frames(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Write this version's frame of each sample (``<type>.old.bin``, and signed ``<type>.old.signed.bin``),
        and decode each ``*.new*.bin`` frame in ``dir``: its summary, or the error it raised."""
        from frames import TOPICS, VALUES, build, summary

        from edge_sdk.signing import Signer, verify
        from edge_sdk.wire import topics
        from edge_sdk.wire.codec import decode_frame, encode
        from edge_sdk.wire.messages import MESSAGE_TYPES

        out = Path(cmd["dir"])
        signer = Signer.generate()
        fields = self.fields(cmd)["fields"]
        missing = {t: [f for f in names if f not in VALUES.get(t, {})] for t, names in fields.items()}
        assert not any(missing.values()), f"no sample value for {missing}"
        for name in MESSAGE_TYPES:
            msg = build(MESSAGE_TYPES[name], VALUES[name], only=fields[name])
            (out / f"{name}.old.bin").write_bytes(encode(msg))
            (out / f"{name}.old.signed.bin").write_bytes(encode(msg, signer=signer, scope=topics.signing_scope(TOPICS[name])))
        decoded: dict[str, Any] = {}
        for path in sorted(out.glob("*.new*.bin")):
            name = path.name.split(".")[0]
            try:
                frame = decode_frame(path.read_bytes())
            except Exception as exc:
                decoded[path.name] = {"error": type(exc).__name__, "message": str(exc)}
                continue
            got = summary(frame.message)
            sig = frame.signature
            if sig is not None:
                got["verified"] = verify(sig.public_raw, sig.signature, sig.signed_for(topics.signing_scope(TOPICS[name])))
            decoded[path.name] = got
        return {"fields": fields, "decoded": decoded, "key": signer.public_raw.hex()}

    def stop(self, cmd: dict[str, Any]) -> dict[str, Any]:
        for c in self.clients.values():
            c.stop()
        if self.daemon is not None:
            self.daemon.stop()
        return {"stopped": True}


def main() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    side = Side()
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            answer = {"ok": True, **getattr(side, cmd["op"])(cmd)}
        except Exception as exc:  # the test reads it and fails with the old side's traceback
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(json.dumps(answer), flush=True)
        if cmd["op"] == "stop":
            return


if __name__ == "__main__":
    main()
