"""Codec, topics and spec: round trips, typed rejections, and the fuzz invariant
"any bytes either decode or raise RemoteProtocolError"."""

from __future__ import annotations

import contextlib
import struct

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
from edge_sdk.signing import Signer, verify
from edge_sdk.spec import ModelSpec
from edge_sdk.wire import topics
from edge_sdk.wire.codec import (
    MAGIC,
    EncodedTensor,
    decode,
    decode_frame,
    encode,
    encode_spliced,
    parse_status_json,
    status_json,
)
from edge_sdk.wire.messages import (
    Ack,
    Canary,
    CanaryReport,
    Invite,
    ModelMsg,
    PeerMsg,
    Pull,
    Recall,
    Status,
    Update,
)

SPEC = ModelSpec.build("m", [("a", (2, 3), "extractor"), ("b", (4,), "classifier")])
_SIGNER = Signer.generate()


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
    Pull(device="d1", seq=2, model_id="m", serve=True, canary=5),
    Canary(device="d1", candidate=5, release=4, samples=20, deadline_s=600.0),
    CanaryReport(device="d1", candidate=5, release=4, both_right=15, only_candidate=2, only_release=1, both_wrong=2),
    Canary(device="d1", candidate=5, release=4, samples=20, deadline_s=600.0, epoch=3, nonce=2**63 - 1),
    CanaryReport(device="d1", candidate=5, release=4, both_right=15, only_candidate=2, only_release=1, both_wrong=2, nonce=1),
    Recall(model_id="m", release=9, abandoned=(4, 8, 11, 11)),
    ModelMsg(model_id="m", version=4, reply_to=-1, weights=np.ones(4, dtype=np.float32), group="b", full_sync=3),
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
    assert out.weights.ctypes.data % 4 == 0  # the tail is aligned


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


def frame(header: object, tail: bytes = b"", trailer: bytes = b"") -> bytes:
    """A frame of this protocol around any header (for rejection and fuzz tests)."""
    packed = msgpack.packb(header, use_bin_type=True)
    start = 8 + len(packed)
    return MAGIC + struct.pack("<I", len(packed)) + packed + b"\0" * (-start % 16) + tail + trailer


def test_f4_decode_shares_memory_with_payload() -> None:
    w = np.arange(1000, dtype=np.float32)
    payload = encode(_update(w))
    out = decode(payload)
    assert isinstance(out, Update)
    buf = np.frombuffer(payload, dtype=np.uint8)
    assert np.shares_memory(out.weights, buf)
    np.testing.assert_array_equal(out.weights, w)


def test_v1_messages_are_refused_with_a_clear_error() -> None:
    v1 = msgpack.packb({"v": 1, "type": "pull", "device": "d", "seq": 1, "model_id": "m"}, use_bin_type=True)
    with pytest.raises(UnsupportedProtocol, match="v1"):
        decode(v1)
    with pytest.raises(UnsupportedProtocol, match="version 2, this side speaks 3"):
        decode(b"ECI\x02" + encode(MESSAGES[0])[4:])  # v2 signatures bound no scope
    with pytest.raises(UnsupportedProtocol, match="version 4"):
        decode(b"ECI\x04" + encode(MESSAGES[0])[4:])


def test_signed_frames_verify_and_tampering_is_detected() -> None:
    signer = Signer.generate()
    msg = ModelMsg(model_id="m", version=4, reply_to=1, weights=np.arange(10, dtype=np.float32))
    scope = topics.device_scope("r1", "model")
    payload = encode(msg, signer=signer, scope=scope)
    f = decode_frame(payload)
    assert f.signature is not None and f.signature.kid == signer.kid
    assert verify(f.signature.public_raw, f.signature.signature, f.signature.signed_for(scope))
    # The same bytes read where they were not published for: another region, leaf or peer.
    for other in ("r2/dev/model", "r1/dev/invite", "r1/control", "peer/c1/beat", "r1/dev/mode"):
        assert not verify(f.signature.public_raw, f.signature.signature, f.signature.signed_for(other))
    with pytest.raises(TypeError, match="scope"):
        encode(msg, signer=signer)  # a signed frame must say where it goes
    # Flip one byte of the weights, then one of the header: the signature no longer holds.
    for pos in (len(payload) - 64 - 3, 12):
        bad = bytearray(payload)
        bad[pos] ^= 0x01
        try:
            g = decode_frame(bytes(bad))
        except RemoteProtocolError:
            continue  # a header byte may break the framing instead: rejected either way
        assert g.signature is not None
        assert not verify(g.signature.public_raw, g.signature.signature, g.signature.signed_for(scope))
    assert decode_frame(encode(msg)).signature is None


def test_spliced_encoding_equals_encode_and_reuses_the_tail() -> None:
    signer = Signer.generate()
    w = np.random.default_rng(1).normal(size=500).astype(np.float32)
    tensor = EncodedTensor.of(w)
    for reply_to in (1, 2):
        msg = ModelMsg(model_id="m", version=4, reply_to=reply_to, weights=w)
        want = encode(msg, signer=signer, scope="r/dev/model")
        assert encode_spliced(msg, tensor, signer=signer, scope="r/dev/model") == want
        # the tensor encoded once is what is sent: the message's own weights are not encoded again
        other = ModelMsg(model_id="m", version=4, reply_to=reply_to, weights=np.zeros_like(w))
        assert encode_spliced(other, tensor, signer=signer, scope="r/dev/model") == want
        assert encode_spliced(other, tensor) == encode(msg)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (frame({"type": "nope"}), MalformedMessage),
        (frame({"type": ["pull"]}), MalformedMessage),  # unhashable: was a TypeError
        (frame({"type": "pull", "device": "d"}), MalformedMessage),
        (frame({"type": "ack", "device": "d", "seq": 1, "status": "maybe", "version": 1}), MalformedMessage),
        (frame({"type": "ack", "device": "d", "seq": -3, "status": "accepted", "version": 1}), MalformedMessage),
        (frame({"type": "ack", "device": 5, "seq": 1, "status": "accepted", "version": 1}), MalformedMessage),
        (frame({"type": "ack", "device": "d", "seq": 1, "status": "rejected", "version": 1,
                "reason": "x\nINFO update accepted"}), MalformedMessage),  # a forged log line (helper-117)
        (frame({"type": "ack", "device": "d", "seq": 1, "status": "rejected", "version": 1, "reason": "\x1b[2J"}), MalformedMessage),
        (frame({"type": "model", "model_id": "m", "version": 1, "reply_to": 0, "w": {"dt": "f8", "n": 1, "l": 8}}, b"\0" * 8), BadTensor),
        (frame({"type": "model", "model_id": "m", "version": 1, "reply_to": 0, "w": {"dt": "f4", "n": 3, "l": 8}}, b"\0" * 8), BadTensor),
        (frame({"type": "model", "model_id": "m", "version": 1, "reply_to": 0, "w": {"dt": "i1", "n": 1, "l": 1, "s": float("nan")}}, b"\0"), BadTensor),
        # the tail must be exactly what the header says: no trailing bytes, no short tail
        (frame({"type": "model", "model_id": "m", "version": 1, "reply_to": 0, "w": {"dt": "f4", "n": 2, "l": 8}}, b"\0" * 12), MalformedMessage),
        (frame({"type": "model", "model_id": "m", "version": 1, "reply_to": 0, "w": {"dt": "f4", "n": 2, "l": 8}}, b"\0" * 4), MalformedMessage),
        (frame({"type": "pull", "device": "d", "seq": 1, "model_id": "m", "w": {"dt": "f4", "n": 1, "l": 4}}, b"\0" * 4), MalformedMessage),
        (frame({"type": "pull", "device": "d", "seq": 1, "model_id": "m", "sg": {"kid": "x", "pk": b"1" * 32}}, b"", b"s" * 64), MalformedMessage),
        # canary reports: counts are non-negative ints summing to 1..10000; requests ask for 1..10000 labels
        (frame({"type": "canary_report", "device": "d", "candidate": 2, "release": 1, "both_right": -1, "only_candidate": 0,
                "only_release": 0, "both_wrong": 5}), MalformedMessage),
        (frame({"type": "canary_report", "device": "d", "candidate": 2, "release": 1, "both_right": 0, "only_candidate": 0,
                "only_release": 0, "both_wrong": 0}), MalformedMessage),
        (frame({"type": "canary_report", "device": "d", "candidate": 2, "release": 1, "both_right": 2**40, "only_candidate": 0,
                "only_release": 0, "both_wrong": 0}), MalformedMessage),
        (frame({"type": "canary_report", "device": "d", "candidate": 2, "release": 1, "both_right": True, "only_candidate": 0,
                "only_release": 0, "both_wrong": 1}), MalformedMessage),
        (frame({"type": "canary", "device": "d", "candidate": 2, "release": 1, "samples": 0, "deadline_s": 10.0}), MalformedMessage),
        (frame({"type": "canary", "device": "d", "candidate": 2, "release": 1, "samples": 5, "deadline_s": float("inf")}), MalformedMessage),
        (frame({"type": "pull", "device": "d", "seq": 1, "model_id": "m", "canary": -2}), MalformedMessage),
        # a part's full sync: -1 (none) or a version up to the model's own
        *[(frame({"type": "model", "model_id": "m", "version": 4, "reply_to": -1, "group": "b", "full_sync": bad,
                  "w": {"dt": "f4", "n": 1, "l": 4}}, b"\0" * 4), MalformedMessage) for bad in (-2, 5, 2**63, True, "3", 1.0, None)],
        # a canary round's nonce (request and report): an int in [0, 2**63), like every other
        *[(frame({"type": "canary", "device": "d", "candidate": 2, "release": 1, "samples": 5, "deadline_s": 10.0, "nonce": bad}),
           MalformedMessage) for bad in (-1, 2**63, True, "7", 1.0, None, [1])],
        *[(frame({"type": "canary_report", "device": "d", "candidate": 2, "release": 1, "both_right": 1, "only_candidate": 0,
                  "only_release": 0, "both_wrong": 0, "nonce": bad}), MalformedMessage) for bad in (-1, 2**63, True, "7", 1.0, None, [1])],
        (frame([1, 2, 3]), MalformedMessage),
        (MAGIC + struct.pack("<I", 1 << 30), MalformedMessage),
        (b"\x00\x01", MalformedMessage),
    ],
)
def test_typed_rejections(payload: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode(payload)


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
    st.sampled_from(["pull", "model", "update", "ack", "invite", "status", "peer", "canary", "canary_report"]),
    st.dictionaries(
        st.sampled_from(["device", "seq", "model_id", "w", "sg", "version", "reply_to", "status", "n_samples", "base_version", "group", "hints", "body", "sender", "kind", "nonce", "serve",
                         "canary", "candidate", "release", "samples", "deadline_s", "both_right", "only_candidate", "only_release", "both_wrong", "full_sync"]),
        _leaf,
    ),
)
def test_fuzz_structured_maps(kind: str, fields: dict[str, object]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode(frame({"type": kind, **fields}))
    with contextlib.suppress(RemoteProtocolError):
        decode(frame({"type": kind, **fields}, b"\0" * 16))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=256), st.integers(0, 300))
def test_fuzz_mutated_real_frames(noise: bytes, pos: int) -> None:
    """Corrupting any byte range of a real, signed frame decodes or raises the remote error."""
    good = bytearray(encode(MESSAGES[1], signer=_SIGNER, scope="r/dev/model"))
    at = pos % len(good)
    good[at : at + len(noise)] = noise
    with contextlib.suppress(RemoteProtocolError):
        decode_frame(bytes(good))


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


def test_signing_scopes_name_where_a_frame_goes_without_the_device() -> None:
    assert topics.signing_scope(topics.device_topic("eu", "dev-1", "model")) == "eu/dev/model"
    assert topics.signing_scope(topics.device_topic("eu", "dev-2", "model")) == topics.device_scope("eu", "model")
    assert topics.signing_scope(topics.device_topic("us", "dev-1", "model")) == "us/dev/model"
    assert topics.signing_scope(topics.device_topic("eu", "dev-1", "invite")) == "eu/dev/invite"
    assert topics.signing_scope(topics.control_topic("eu")) == "eu/control"
    assert topics.signing_scope(topics.status_topic("eu")) == "eu/status"
    assert topics.signing_scope(topics.recall_topic("eu")) == "eu/recall"
    assert topics.signing_scope(topics.peer_topic("c1", "token")) == "peer/c1/token"
    assert topics.signing_scope(topics.peer_topic("all", "token")) == "peer/all/token"
    with pytest.raises(MalformedMessage):
        topics.signing_scope("edgeci/v1/eu/dev/+/model")

def _device_topic_by_the_general_rules(topic: str) -> tuple[str, str, str] | None:
    """What ``topics.parse`` accepted as a device topic before its one-regex fast path."""
    parts = topic.split("/")
    rest = parts[2:]
    if parts[:2] == ["edgeci", "v1"] and len(rest) == 4 and rest[1] == "dev" and rest[3] in topics.UPSTREAM + topics.DOWNSTREAM \
            and topics._ID.match(rest[0]) and topics._ID.match(rest[2]):
        return rest[0], rest[2], rest[3]
    return None


def test_the_device_topic_fast_path_accepts_exactly_what_the_general_rules_accept() -> None:
    """``topics.parse`` matches device topics with one regex; the same topics (and the same
    fields) as the per-part rules."""
    rng = np.random.default_rng(7)
    pieces = ["edgeci", "v1", "eu", "dev", "d-1", "pull", "ack", "update", "", "\n", "x" * 64, "x" * 65, "a\n", "a\n\n",
              "_a", ".b", "peer", "status", "control", "presence", "pull\n", "+", "#", "é"]
    for _ in range(20_000):
        parts = ["edgeci", "v1", *(str(rng.choice(pieces)) for _ in range(4))]
        parts[3] = "dev" if rng.random() < 0.7 else parts[3]
        if rng.random() < 0.3:
            i = int(rng.integers(len(parts)))
            parts[i] += str(rng.choice(pieces))
        topic = "/".join(parts[: int(rng.integers(2, 8))] if rng.random() < 0.2 else parts)
        want = _device_topic_by_the_general_rules(topic)
        try:
            p = topics.parse(topic)
            got = (p.region, p.device, p.leaf) if p.kind == "device" else None
        except MalformedMessage:
            got = None
        assert got == want, topic


def test_an_id_with_a_trailing_newline_is_refused() -> None:
    # "$" in the id pattern used to match before a final newline: "d1\n" passed as a device id
    # (a distinct device, and a forged line in any log that prints it).
    for bad in ("d1\n", "eu\n"):
        with pytest.raises(ConfigError):
            topics.device_topic(bad, "d1", "update")
        with pytest.raises(ConfigError):
            topics.device_topic("eu", bad, "update")
    for topic in ("edgeci/v1/eu/dev/d1\n/update", "edgeci/v1/eu\n/dev/d1/update", "edgeci/v1/eu\n/status",
                  "edgeci/v1/eu/dev/d1/update\n"):
        with pytest.raises(MalformedMessage):
            topics.parse(topic)


def test_a_recall_names_inclusive_ranges_and_refuses_malformed_ones() -> None:
    r = Recall(model_id="m", release=9, abandoned=[4, 8, 11, 11])  # msgpack hands lists: kept as a tuple
    assert r.abandoned == (4, 8, 11, 11)
    assert [v for v in range(13) if r.covers(v)] == [4, 5, 6, 7, 8, 11]
    assert topics.parse(topics.recall_topic("eu")) == topics.ParsedTopic("recall", region="eu")
    for bad in ([4], [8, 4], [-1, 2], [1, 2.5], list(range(34)), "12"):
        with pytest.raises(MalformedMessage):
            Recall(model_id="m", release=9, abandoned=bad)  # type: ignore[arg-type]


def test_status_json_round_trip() -> None:
    s = MESSAGES[5]
    assert isinstance(s, Status)
    data = parse_status_json(status_json(s))
    assert data["version"] == 1 and data["devices_seen"] == 2
    with pytest.raises(MalformedMessage):
        parse_status_json(b"{not json")


def test_a_reused_packer_gives_packb_s_bytes_even_after_a_failed_pack() -> None:
    from edge_sdk.wire import codec

    header = {"type": "ack", "device": "d1", "seq": 3, "hints": {"lr": 0.1}, "b": b"xy"}
    assert codec._packb(header) == msgpack.packb(header, use_bin_type=True)
    with pytest.raises(TypeError):
        codec._packb({"x": object()})
    assert codec._packb(header) == msgpack.packb(header, use_bin_type=True)


def test_a_field_added_later_is_absent_at_its_default_so_old_frames_keep_their_bytes() -> None:
    """``Pull.canary`` came after protocol v2 shipped: a plain pull's frame does not carry it
    (the emulator's byte counts, and every existing frame, stay as they were) and decodes to
    the default; a canary pull carries it."""
    plain, fetch = Pull(device="d1", seq=2, model_id="m"), Pull(device="d1", seq=2, model_id="m", canary=5)

    def header(payload: bytes) -> dict[str, object]:
        (n,) = struct.unpack_from("<I", payload, 4)
        out = msgpack.unpackb(payload[8 : 8 + n], raw=False)
        assert isinstance(out, dict)
        return out

    assert "canary" not in header(encode(plain)) and header(encode(fetch))["canary"] == 5
    assert decode(encode(plain)) == plain and decode(encode(fetch)) == fetch
    assert len(encode(fetch)) > len(encode(plain))
    # the canary round's nonce likewise (helper-114): absent at 0, so a request or a report of a side
    # from before nonces keeps its bytes; a side from before them ignores the field it does not know
    counts = dict(device="d1", candidate=5, release=4, both_right=1, only_candidate=0, only_release=0, both_wrong=0)
    for old, new in [(Canary(device="d1", candidate=5, release=4, samples=20, deadline_s=600.0),
                      Canary(device="d1", candidate=5, release=4, samples=20, deadline_s=600.0, nonce=9)),
                     (CanaryReport(**counts), CanaryReport(**counts, nonce=9))]:  # type: ignore[arg-type]
        assert "nonce" not in header(encode(old)) and header(encode(new))["nonce"] == 9
        assert decode(encode(old)) == old and decode(encode(new)) == new
    # a LASP part's full sync likewise: a model without one (whole, or a part from a coordinator before
    # the field) keeps its bytes and decodes to -1; a side from before the field ignores it
    head = np.ones(4, dtype=np.float32)
    part, named = (ModelMsg(model_id="m", version=4, reply_to=-1, weights=head, group="b", full_sync=f) for f in (-1, 3))
    assert "full_sync" not in header(encode(part)) and header(encode(named))["full_sync"] == 3
    assert decode(encode(part)).full_sync == -1 and decode(encode(named)).full_sync == 3  # type: ignore[union-attr]
    older = frame({"type": "model", "model_id": "m", "version": 4, "reply_to": -1, "group": "b",  # an older coordinator's part
                   "w": {"dt": "f4", "n": 4, "l": 16}}, head.tobytes())
    got = decode(older)
    assert isinstance(got, ModelMsg) and (got.version, got.group, got.full_sync) == (4, "b", -1)


def test_a_part_s_full_sync_is_signed_with_the_rest_of_the_model() -> None:
    """A replayed part must not be able to claim another full sync: the field is in the signed header."""
    scope = topics.device_scope("r1", "model")
    msg = ModelMsg(model_id="m", version=4, reply_to=-1, weights=np.ones(4, dtype=np.float32), group="b", full_sync=3)
    payload = encode(msg, signer=_SIGNER, scope=scope)
    assert payload.count(b"\xa9full_sync\x03") == 1
    forged = payload.replace(b"\xa9full_sync\x03", b"\xa9full_sync\x01")  # fixints: the same length
    good, bad = decode_frame(payload), decode_frame(forged)
    assert isinstance(bad.message, ModelMsg) and bad.message.full_sync == 1
    assert good.signature is not None and bad.signature is not None
    assert verify(good.signature.public_raw, good.signature.signature, good.signature.signed_for(scope))
    assert not verify(bad.signature.public_raw, bad.signature.signature, bad.signature.signed_for(scope))
