"""Codec, topics and spec: round trips, typed rejections, and the fuzz invariant
"any bytes either decode or raise RemoteProtocolError"."""

from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.errors import (
    BadTensor,
    ConfigError,
    MalformedMessage,
    MessageTooLarge,
    NonFiniteWeights,
    RemoteProtocolError,
    ShapeMismatch,
    UnsupportedProtocol,
)
from edge_sdk.spec import ModelSpec
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode, parse_status_json, status_json
from edge_sdk.wire.messages import Ack, Invite, ModelMsg, PeerMsg, Pull, Status, Update

SPEC = ModelSpec.build("m", [("a", (2, 3), "extractor"), ("b", (4,), "classifier")])


def _update(weights: np.ndarray, **kw: object) -> Update:
    base = dict(device="d1", seq=7, model_id="m", base_version=3, n_samples=5, weights=weights)
    base.update(kw)
    return Update(**base)  # type: ignore[arg-type]


MESSAGES = [
    Pull(device="d1", seq=1, model_id="m", have_version=2, n_samples=10),
    ModelMsg(model_id="m", version=4, reply_to=1, weights=np.arange(10, dtype=np.float32), hints={"lr": 0.1}),
    _update(np.linspace(-1, 1, 10, dtype=np.float32), loss=0.5, train_seconds=1.5),
    Ack(device="d1", seq=7, status="accepted", version=4),
    Invite(device="d1", round=3, version=4),
    Status(region="r", coordinator="c", version=1, updates_accepted=1, updates_rejected=0, updates_duplicate=0, devices_seen=2, buffered=0),
    PeerMsg(sender="c2", kind="token", body={"ages": [1, 2]}, weights=np.ones(3, dtype=np.float32)),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    out = decode(encode(msg))  # type: ignore[arg-type]
    assert type(out) is type(msg)
    for name in msg.__dataclass_fields__:  # type: ignore[attr-defined]
        a, b = getattr(msg, name), getattr(out, name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b


def test_f4_decode_is_zero_copy_view() -> None:
    payload = encode(_update(np.arange(10, dtype=np.float32)))
    out = decode(payload)
    assert isinstance(out, Update)
    assert not out.weights.flags.owndata  # a view into the payload, not a copy
    assert not out.weights.flags.writeable


@pytest.mark.parametrize(("encoding", "tol"), [("f2", 1e-3), ("i1", 1.0 / 127)])
def test_lossy_encodings(encoding: str, tol: float) -> None:
    w = np.random.default_rng(0).uniform(-1, 1, 1000).astype(np.float32)
    small = encode(_update(w), encoding=encoding)  # type: ignore[arg-type]
    out = decode(small)
    assert isinstance(out, Update)
    assert out.weights.dtype == np.float32
    assert np.max(np.abs(out.weights - w)) <= tol
    assert len(small) < len(encode(_update(w))) * (0.55 if encoding == "f2" else 0.3)


def test_size_cap() -> None:
    payload = encode(_update(np.zeros(1000, dtype=np.float32)))
    with pytest.raises(MessageTooLarge):
        decode(payload, max_bytes=len(payload) - 1)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"v": 2, "type": "pull"}, UnsupportedProtocol),
        ({"v": 1, "type": "nope"}, MalformedMessage),
        ({"v": 1, "type": "pull", "device": "d"}, MalformedMessage),
        ({"v": 1, "type": "ack", "device": "d", "seq": 1, "status": "maybe", "version": 1}, MalformedMessage),
        ({"v": 1, "type": "ack", "device": "d", "seq": -3, "status": "accepted", "version": 1}, MalformedMessage),
        ({"v": 1, "type": "ack", "device": 5, "seq": 1, "status": "accepted", "version": 1}, MalformedMessage),
        (
            {"v": 1, "type": "model", "model_id": "m", "version": 1, "reply_to": 0, "weights": {"dt": "f8", "n": 1, "b": b"\0" * 8}},
            BadTensor,
        ),
        (
            {"v": 1, "type": "model", "model_id": "m", "version": 1, "reply_to": 0, "weights": {"dt": "f4", "n": 3, "b": b"\0" * 8}},
            BadTensor,
        ),
        (
            {"v": 1, "type": "model", "model_id": "m", "version": 1, "reply_to": 0, "weights": {"dt": "i1", "n": 1, "b": b"\0", "s": float("nan")}},
            BadTensor,
        ),
        ([1, 2, 3], MalformedMessage),
    ],
)
def test_typed_rejections(body: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode(msgpack.packb(body, use_bin_type=True))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_any_bytes_decode_or_remote_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode(data)


_leaf = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=16),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["pull", "model", "update", "ack", "invite", "status", "peer"]),
    st.dictionaries(
        st.sampled_from(["device", "seq", "model_id", "weights", "version", "reply_to", "status", "n_samples", "base_version", "group", "hints", "body", "sender", "kind"]),
        _leaf,
    ),
)
def test_fuzz_structured_maps(kind: str, fields: dict[str, object]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode(msgpack.packb({"v": 1, "type": kind, **fields}, use_bin_type=True))


def test_spec_layout_groups_and_checks() -> None:
    assert SPEC.size == 10
    assert SPEC.group_slice("extractor") == slice(0, 6)
    assert SPEC.group_slice("classifier") == slice(6, 10)
    assert ModelSpec.from_dict(SPEC.to_dict()).fingerprint == SPEC.fingerprint
    w = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(SPEC.view(w, "a"), w[:6].reshape(2, 3))
    with pytest.raises(ShapeMismatch):
        SPEC.check(np.zeros(9, dtype=np.float32))
    with pytest.raises(ShapeMismatch):
        SPEC.check(np.zeros(10, dtype=np.float64))
    with pytest.raises(ShapeMismatch):
        SPEC.check(np.zeros(4, dtype=np.float32), "nope")
    bad = np.zeros(4, dtype=np.float32)
    bad[1] = np.inf
    with pytest.raises(NonFiniteWeights):
        SPEC.check(bad, "classifier")
    with pytest.raises(ConfigError):
        ModelSpec.build("m", [("a", (2,), "x"), ("b", (2,), "y"), ("c", (2,), "x")])


def test_topics_round_trip_and_reject_wildcards() -> None:
    t = topics.device_topic("eu", "dev-1", "update")
    assert t == "edgeci/v1/eu/dev/dev-1/update"
    p = topics.parse(t)
    assert (p.kind, p.region, p.device, p.leaf) == ("device", "eu", "dev-1", "update")
    assert topics.parse(topics.status_topic("eu")).kind == "status"
    assert topics.parse(topics.peer_topic("c1", "token")).coordinator == "c1"
    for bad in ("dev/+", "a#", "", "x" * 65, "a/b"):
        with pytest.raises(ConfigError):
            topics.device_topic("eu", bad, "pull")
    for bad_topic in ("edgeci/v1/eu/dev/+/pull", "other/v1/eu/status", "edgeci/v1/eu/dev/d1/hack"):
        with pytest.raises(MalformedMessage):
            topics.parse(bad_topic)


def test_status_json_round_trip() -> None:
    s = MESSAGES[5]
    assert isinstance(s, Status)
    data = parse_status_json(status_json(s))
    assert data["version"] == 1 and data["devices_seen"] == 2
    with pytest.raises(MalformedMessage):
        parse_status_json(b"{not json")
