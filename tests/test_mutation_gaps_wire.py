"""Wire-codec limits no test checked (helper-158's mutation audit).

Each test kills a mutant of edge_sdk/wire/ that survived every unit test covering the module;
the docstrings name it (file:line at the audit's commit, and the mutation)."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest

from edge_sdk.errors import MalformedMessage, RemoteProtocolError, UnsupportedProtocol
from edge_sdk.wire.codec import MAGIC, decode, encode
from edge_sdk.wire.messages import Canary, CanaryReport, ModelMsg, Pull, Update


def _frame(header: dict[str, object], tail: bytes = b"") -> bytes:
    """A v3 frame built by hand: prefix, msgpack header, zero padding to 16, the tail."""
    packed = msgpack.packb(header)
    offset = 8 + len(packed)
    return MAGIC + struct.pack("<I", len(packed)) + packed + b"\x00" * (-offset % 16) + tail


def _padded_pull(header_bytes: int) -> bytes:
    """A pull whose header, with filler strings (each within msgpack's 16 KiB string limit), is
    ``header_bytes`` long."""
    header: dict[str, object] = {"type": "pull", "device": "d1", "seq": 1, "model_id": "toy"}
    i = 0
    while len(msgpack.packb(header)) < header_bytes - 12 * 1024:
        header[f"x{i}"] = "a" * 8192
        i += 1
    header["zz"] = "a" * 300  # a str16 from here on: one more char, one more byte
    header["zz"] = "a" * (300 + header_bytes - len(msgpack.packb(header)))
    assert len(msgpack.packb(header)) == header_bytes
    return _frame(header)


def test_a_header_over_the_cap_is_refused_and_one_at_it_decodes() -> None:
    """codec.py:73 ``MAX_HEADER_BYTES = 64 * 1024`` -> ``65 * 1024``: no test sent a header
    between the cap and the mutant's; one byte over it must be refused before msgpack reads it."""
    cap = 64 * 1024  # the documented cap, spelled out: the constant is what is under test
    at_cap = decode(_padded_pull(cap))
    assert isinstance(at_cap, Pull) and at_cap.device == "d1"
    with pytest.raises(MalformedMessage, match="header length"):
        decode(_padded_pull(cap + 1))
    with pytest.raises(MalformedMessage, match="header length"):
        decode(_padded_pull(cap + 512))


def test_an_update_frame_without_weights_is_malformed() -> None:
    """codec.py:535 (``if tensor is None and required`` negated in ``_missing``): no test sent
    an update whose header lacks the tensor; it must be refused as missing its weights."""
    whole = encode(Update(device="d1", seq=1, model_id="toy", base_version=0, n_samples=1,
                          weights=np.zeros(9, np.float32)))
    assert isinstance(decode(whole), Update)
    header = {"type": "update", "device": "d1", "seq": 1, "model_id": "toy", "base_version": 0, "n_samples": 1}
    with pytest.raises(MalformedMessage, match="missing weights"):
        decode(_frame(header))


@pytest.mark.parametrize(
    "weights",
    [np.zeros(9, np.float64), np.zeros((3, 3), np.float32), np.zeros(9, np.int32), [0.0] * 9],
    ids=["float64", "2-D", "int32", "list"],
)
def test_an_update_built_with_weights_that_are_not_a_flat_float32_vector_is_refused(weights: object) -> None:
    """messages.py:67 (``and`` -> ``or`` in ``_check_weights``): a float64, 2-D or int array
    was taken as weights, and a list raised AttributeError instead of the protocol's error."""
    with pytest.raises(MalformedMessage, match="1-D float32"):
        Update(device="d1", seq=1, model_id="toy", base_version=0, n_samples=1, weights=weights)  # type: ignore[arg-type]
    assert issubclass(MalformedMessage, RemoteProtocolError)


def _with(frame: bytes, **changes: object) -> bytes:
    """``frame`` (unsigned) with header fields replaced, tail kept: what a hostile peer can send."""
    hlen = struct.unpack_from("<I", frame, 4)[0]
    header = msgpack.unpackb(frame[8 : 8 + hlen])
    offset = 8 + hlen
    offset += -offset % 16
    header.update(changes)
    return _frame(header, frame[offset:])


_UPDATE = encode(Update(device="d1", seq=1, model_id="toy", base_version=0, n_samples=3, weights=np.zeros(9, np.float32)))
_PULL = encode(Pull(device="d1", seq=1, model_id="toy"))
_MODEL = encode(ModelMsg(model_id="toy", version=3, reply_to=1, weights=np.zeros(9, np.float32), release=2, hints={"a": 1.0}))


@pytest.mark.parametrize(
    ("frame", "changes", "reason"),
    [
        (_UPDATE, {"n_samples": 0}, "n_samples"),  # messages.py:194: a zero or negative weight in the mean
        (_UPDATE, {"n_samples": -5}, "n_samples"),
        (_UPDATE, {"device": ""}, "device"),  # messages.py:187
        (_UPDATE, {"device": 7}, "device"),
        (_PULL, {"seq": "x"}, "seq"),  # messages.py:100
        (_PULL, {"seq": -3}, "seq"),
        (_MODEL, {"release": "x"}, "release"),  # messages.py:144
        (_MODEL, {"release": -7}, "release"),
        (_MODEL, {"hints": {f"k{i}": 1.0 for i in range(33)}}, "hints"),  # messages.py:153: 32 at most
        (_MODEL, {"hints": [1.0, 2.0]}, "hints"),
    ],
    ids=["n_samples=0", "n_samples<0", "device empty", "device int", "seq str", "seq<0", "release str",
         "release<-1", "33 hints", "hints list"],
)
def test_a_decoded_field_out_of_its_range_is_a_malformed_message(frame: bytes, changes: dict[str, object],
                                                                 reason: str) -> None:
    """The message classes' own checks, met on the wire: each field value here decoded (or raised
    an untyped error) with one check in ``__post_init__`` deleted or its ``and`` turned ``or``."""
    assert type(decode(frame)) is type(decode(_with(frame)))  # the frame rebuilt unchanged decodes
    with pytest.raises(MalformedMessage, match=reason):
        decode(_with(frame, **changes))


def test_a_model_reply_may_carry_32_hints() -> None:
    """The bound on hints is 32, inclusive (messages.py:153)."""
    hints = {f"k{i}": float(i) for i in range(32)}
    msg = decode(_with(_MODEL, hints=hints))
    assert isinstance(msg, ModelMsg) and msg.hints == hints


_PULL_HEADER = {"type": "pull", "device": "d1", "seq": 1, "model_id": "toy"}


@pytest.mark.parametrize(
    ("extra", "refused"),
    [("a" * 16384, False), ("a" * 16385, True), ([0] * 4096, False), ([0] * 4097, True)],
    ids=["str 16 KiB", "str 16 KiB + 1", "array 4096", "array 4097"],
)
def test_the_header_s_msgpack_string_and_array_limits(extra: object, refused: bool) -> None:
    """codec.py:475-476 (``1 << 14`` -> ``1 << 15``, ``1 << 12`` -> ``1 << 13``): a string or an
    array in a header past msgpack's limits is refused as malformed, one at them decodes."""
    frame = _frame({**_PULL_HEADER, "x": extra})
    if refused:
        with pytest.raises(MalformedMessage, match="not msgpack"):
            decode(frame)
    else:
        assert isinstance(decode(frame), Pull)


@pytest.mark.parametrize("keys", [5, 20], ids=["fixmap", "map16"])
def test_a_v1_message_of_any_map_size_is_refused_as_unsupported(keys: int) -> None:
    """codec.py:464 (``view[0]`` -> ``view[1]``): a v1 message (a bare msgpack map) of more than
    15 keys starts 0xDE; it must be named as v1, not as a frame that is no edgeci frame."""
    v1 = msgpack.packb({**_PULL_HEADER, **{f"k{i}": i for i in range(keys - 4)}})
    with pytest.raises(UnsupportedProtocol, match="v1"):
        decode(v1)


def test_a_canary_asks_for_at_most_10_000_labels_and_a_report_counts_as_many() -> None:
    """messages.py:332 (``MAX_CANARY_SAMPLES = 10_000`` -> ``10_001``): the bound itself was not
    tested; it is spelled out here (the constant is what is under test)."""
    ok = Canary(device="d1", candidate=2, release=1, samples=10_000, deadline_s=60.0)
    assert decode(encode(ok)) == ok
    with pytest.raises(MalformedMessage, match="samples"):
        Canary(device="d1", candidate=2, release=1, samples=10_001, deadline_s=60.0)
    report = CanaryReport(device="d1", candidate=2, release=1, both_right=9_999, only_candidate=1, only_release=0, both_wrong=0)
    assert decode(encode(report)) == report
    with pytest.raises(MalformedMessage, match="canary report"):
        CanaryReport(device="d1", candidate=2, release=1, both_right=10_000, only_candidate=1, only_release=0, both_wrong=0)


def test_a_frame_missing_a_required_field_names_that_field() -> None:
    """codec.py:537 (``name not in header`` -> ``in``): the error named the first field that was
    present instead of the one missing."""
    with pytest.raises(MalformedMessage, match="missing field 'seq'"):
        decode(_frame({"type": "pull", "device": "d1", "model_id": "toy"}))
