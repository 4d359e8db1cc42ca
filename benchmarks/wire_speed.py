"""The wire codec (raw tensor tail: introduced by protocol v2, framed the same in today's v3, which
only binds signatures to their topic) against pickle and against the v1 codec, and the cost of
serving a 47 MB pull (``--floats`` sets the size). "raw-tail" below is today's codec.

Everything is measured in one process, medians of ``--repeat`` runs, and printed as ratios
(this machine is shared and noisy; absolute times move, ratios much less):

1. **Decode** of a 47 MB update (11.75 M float32) with :func:`edge_sdk.wire.codec.decode`
   against ``pickle.loads`` of the same message as a dict with an ndarray, and against the
   v1 codec (a bare msgpack map whose ``bin`` field msgpack copies). The decoded vector must
   share memory with the payload (asserted here and in ``tests/test_wire.py``).
2. **Encode** against ``pickle.dumps`` and the v1 codec, measured interleaved (one run of
   each per round, so a load change hits all alike), and against the floor of any encoder
   that returns one new ``bytes``: ``ndarray.tobytes()``, a single copy into a fresh
   allocation (on this VM page faults, not the memcpy, set most of its cost).
3. **Serving pulls** of a 47 MB model from a real :class:`~coordinator.core.CoordinatorCore`
   (decode the pull, build, sign and publish the reply): the current core encodes each (version,
   group, encoding) once and only re-signs a small header per pull; "today's path" is the
   v1 codec re-encoding the whole model for every pull (``v1_model_reply`` below, the old
   ``CoordinatorCore._model_reply`` body). Also the digits model for pulls/s of the core alone.

    .venv/bin/python benchmarks/wire_speed.py [--repeat 5] [--floats 11750000]

Targets (issue 13): decode ≥ 100× faster than ``pickle.loads``, encode ≥ 2× faster than
``pickle.dumps``, 47 MB pulls ≥ 5× more per second than today's path.
"""

from __future__ import annotations

import argparse
import pickle  # noqa: TID251 — the baseline this benchmark compares against, never on the wire
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import positive_int
from coordinator.core import CoordinatorConfig, CoordinatorCore, Snapshot
from coordinator.strategies import make_strategy
from edge_sdk.core.events import MessageReceived, Publish
from edge_sdk.signing import Signer
from edge_sdk.spec import ModelSpec
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import ModelMsg, Pull, Update


def median_s(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Median seconds of each function, run once each per round for ``repeat`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def v1_encode(msg: Any) -> bytes:
    """The v1 codec's encode (a msgpack map with the tensor as a ``bin`` field)."""
    body: dict[str, Any] = {"v": 1, "type": msg.TYPE}
    for name in msg.__dataclass_fields__:
        value = getattr(msg, name)
        if name == "weights":
            arr = np.ascontiguousarray(value.astype("<f4", copy=False))
            value = {"dt": "f4", "n": int(arr.size), "b": arr.data.cast("B")}
        body[name] = value
    out = msgpack.packb(body, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


def v1_decode(payload: bytes) -> np.ndarray:
    body = msgpack.unpackb(payload, raw=False, max_bin_len=len(payload))
    return np.frombuffer(body["weights"]["b"], dtype="<f4")


def pull_event(device: str, seq: int, now: float, model_id: str) -> MessageReceived:
    pull = Pull(device=device, seq=seq, model_id=model_id)
    return MessageReceived(now=now, topic=topics.device_topic("bench", device, "pull"), payload=encode(pull))


def serve_pulls(spec: ModelSpec, n_pulls: int, *, today: bool) -> float:
    """Pulls served per second by a real core (distinct devices: no rate limit applies)."""
    cfg = CoordinatorConfig(region="bench", coordinator_id="c1", spec=spec, signer=Signer.generate())
    weights = np.random.default_rng(0).normal(size=spec.size).astype(np.float32)
    core = CoordinatorCore(cfg, make_strategy("spin", k=10, timeout_s=None), Snapshot(version=0, weights=weights),
                           rng=random.Random(0))
    # arrivals 0.1 ms apart (10,000 pulls/s): the retained status goes out at most 4×/s
    events = [pull_event(f"d{i}", 0, 1.0 + i * 1e-4, spec.model_id) for i in range(n_pulls)]
    t0 = time.perf_counter()
    for ev in events:
        if today:  # the old core: decode the pull, then encode the whole model for the reply
            msg = decode(ev.payload)
            assert isinstance(msg, Pull)
            reply = ModelMsg(model_id=spec.model_id, version=core.version, reply_to=msg.seq, weights=core.weights)
            out = [Publish(topic=topics.device_topic("bench", msg.device, "model"), payload=v1_encode(reply))]
        else:
            out = core.handle(ev)
        assert any(isinstance(a, Publish) and a.topic.endswith("/model") for a in out)
    return n_pulls / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=positive_int, default=5, help="timed runs of each encode and decode; medians are printed (default 5)")
    ap.add_argument("--floats", type=positive_int, default=11_750_000,
                    help="float32 values in the update and the big model (default 11,750,000: 47 MB)")
    ap.add_argument("--pulls", type=positive_int, default=20, help="big-model pulls served per path (default 20)")
    args = ap.parse_args()

    w = np.random.default_rng(0).normal(size=args.floats).astype(np.float32)
    upd = Update(device="d1", seq=1, model_id="m", base_version=0, n_samples=10, weights=w)
    as_dict = {"device": "d1", "seq": 1, "model_id": "m", "base_version": 0, "n_samples": 10, "weights": w}
    v2 = encode(upd)
    v1 = v1_encode(upd)
    pk = pickle.dumps(as_dict)
    out = decode(v2)
    assert isinstance(out, Update)
    assert np.shares_memory(out.weights, np.frombuffer(v2, dtype=np.uint8)), "decode must be zero-copy"
    np.testing.assert_array_equal(out.weights, w)
    mb = w.nbytes / 1e6

    t_dec = median_s(lambda: decode(v2), args.repeat)
    t_dec_v1 = median_s(lambda: v1_decode(v1), args.repeat)
    t_dec_pk = median_s(lambda: pickle.loads(pk), args.repeat)
    enc = interleaved_medians({"v2": lambda: encode(upd), "v1": lambda: v1_encode(upd),
                               "pickle": lambda: pickle.dumps(as_dict), "tobytes": w.tobytes}, args.repeat)
    t_enc, t_enc_v1, t_enc_pk, t_copy = enc["v2"], enc["v1"], enc["pickle"], enc["tobytes"]
    print(f"update of {mb:.1f} MB ({args.floats:,} float32), medians of {args.repeat}")
    print(f"  decode  raw-tail {t_dec * 1e6:10.1f} us | v1 {t_dec_v1 * 1e3:8.2f} ms | pickle.loads {t_dec_pk * 1e3:8.2f} ms"
          f" -> raw-tail is {t_dec_pk / t_dec:,.0f}x faster than pickle, {t_dec_v1 / t_dec:,.0f}x than v1")
    print(f"  encode  raw-tail {t_enc * 1e3:10.2f} ms | v1 {t_enc_v1 * 1e3:8.2f} ms | pickle.dumps {t_enc_pk * 1e3:8.2f} ms"
          f" -> raw-tail is {t_enc_pk / t_enc:.2f}x faster than pickle, {t_enc_v1 / t_enc:.2f}x than v1")
    print(f"          one-copy floor (ndarray.tobytes) {t_copy * 1e3:.2f} ms: the raw-tail encode takes {t_enc / t_copy:.2f}x it,"
          f" pickle.dumps {t_enc_pk / t_copy:.2f}x (an encoder returning one new bytes copies at least this once)")

    big = ModelSpec.build("big", [("body", (args.floats,), "extractor")])
    today = serve_pulls(big, args.pulls, today=True)
    now = serve_pulls(big, args.pulls, today=False)
    print(f"{mb:.1f} MB model pulls served by one core: v1 path (re-encode per pull) {today:.1f}/s, raw-tail encode-once + signed header "
          f"{now:.1f}/s -> {now / today:.1f}x")
    from edge_sdk.tasks import get_task

    digits = get_task("digits").spec
    today_d = serve_pulls(digits, 3000, today=True)
    now_d = serve_pulls(digits, 3000, today=False)
    print(f"digits pulls served by one core, no broker: current core {now_d:,.0f}/s ({1e6 / now_d:.0f} us of CPU per pull: "
          f"decode, rate limit, reply lookup, status at most 4/s); decode + v1 encode alone {today_d:,.0f}/s")


if __name__ == "__main__":
    main()
