"""Wire format v3: a small msgpack header plus the raw tensor tail. Never pickle.

Frame layout (all integers little-endian)::

    0       4 bytes   magic  b"ECI" + protocol version (3)
    4       4 bytes   H = length of the header
    8       H bytes   msgpack map {"type": ..., <fields>..., "w": <tensor>, "sg": <signer>}
    ...     padding   zero bytes up to the next multiple of 16: the tail's offset ``o``
    o       l bytes   the weights, raw (``"w": {"dt": "f4"|"f2"|"i1", "n": N, "l": l, "s": scale}``)
    o + l   64 bytes  Ed25519 signature, present exactly when the header has ``"sg"``

* Decode of ``f4`` weights is ``np.frombuffer(payload, offset=o)``: a read-only view whose
  cost does not depend on the model's size. ``f2`` halves the bytes, ``i1`` (symmetric
  per-tensor int8, ``s = max|w| / 127``) quarters them; both decode to a float32 copy.
* Encode copies the tensor at most once (``bytes.join`` of header and tail).
* A signature covers ``DOMAIN || len(scope) || scope || sha256(frame[:o]) || sha256(tail)``
  — the header with every field, the weights through their digest, and the **scope**: where
  the frame was published (:func:`~edge_sdk.wire.topics.signing_scope`: the region and leaf
  of a device topic, a region's control topic, a peer topic's recipient and kind). The scope
  does not travel; the receiver derives it from the topic the frame arrived on, so a signed
  frame replayed onto another region's, leaf's or peer's topic does not verify (protocol v3;
  v2 signatures bound no scope: region A's model was deployed from region B's topic). A
  model's tail is encoded (and hashed) once per (version, group, encoding) and every pull
  only re-signs its own small header (:class:`EncodedTensor`, :func:`encode_spliced`). Who
  must have signed what is the cores' decision (:mod:`edge_sdk.core.device`); the codec only
  checks the framing and reports the signer.

Validation: size cap first, then the frame's lengths (exact: no overlap, no trailing
bytes), the header's msgpack limits, the dtype whitelist, the message's own checks. Any
bytes either decode or raise a :class:`~edge_sdk.errors.RemoteProtocolError` (fuzzed).
Shape against the model spec and finiteness (one full pass) are checked by the receiving
core with :meth:`~edge_sdk.spec.ModelSpec.check`. A v1 frame (a bare msgpack map) is
refused with :class:`~edge_sdk.errors.UnsupportedProtocol`, and so is a v2 frame.

In-process emulation (:func:`carry_decoded`): a frame's header is still encoded and its size
is exact, but the weights are not copied into it (its bytes are built only on demand) and a
receiver in the same process gets the message its sender built (:class:`CarriedFrame`)
instead of parsing it again; the emulator's results are identical either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, cast

import msgpack
import numpy as np

from edge_sdk.errors import (
    BadTensor,
    ConfigError,
    MalformedMessage,
    MessageTooLarge,
    RemoteProtocolError,
    UnsupportedProtocol,
)
from edge_sdk.fastinit import fast_init
from edge_sdk.signing import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Signer, key_id
from edge_sdk.spec import Vector
from edge_sdk.wire.messages import MESSAGE_TYPES, Message, ModelMsg, Status

PROTOCOL_VERSION = 3
MAGIC = b"ECI" + bytes([PROTOCOL_VERSION])
_PREFIX = struct.Struct("<4sI")
MAX_HEADER_BYTES = 64 * 1024
ALIGN = 16
SIG_DOMAIN = b"edgeci/v3/signature\x00"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # paho refuses payloads over 268,435,455 bytes
PULL_BURST = 8.0
PULL_REFILL_S = 0.5
"""A coordinator answers a device's pulls from a token bucket: ``PULL_BURST`` at once, one more
every ``PULL_REFILL_S`` seconds; a pull beyond it is dropped. A device paces its own pulls by
the same bucket, so an honest one is never dropped (a drop costs it a request timeout)."""


def pull_tokens(tokens: float, since: float, now: float, burst: float, refill_s: float) -> float:
    """A pull bucket that held ``tokens`` at ``since``, refilled to ``now`` (full without refill)."""
    if refill_s <= 0:
        return burst
    return min(burst, tokens + max(0.0, now - since) / refill_s)
Encoding = Literal["f4", "f2", "i1"]
ENCODINGS: dict[str, np.dtype[Any]] = {
    "f4": np.dtype("<f4"),
    "f2": np.dtype("<f2"),
    "i1": np.dtype("i1"),
}
_EMPTY_DIGEST = hashlib.sha256(b"").digest()


@fast_init
@dataclass(frozen=True, slots=True)
class EncodedTensor:
    """A weights vector encoded once: its header entry, raw tail bytes and their digest
    (hashed on first use: only signed frames need it)."""

    meta: dict[str, Any]
    tail: bytes
    _digest: bytes | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, weights: Vector, encoding: Encoding = "f4") -> EncodedTensor:
        meta, tail = _tensor_parts(weights, encoding)
        return cls(meta=meta, tail=bytes(tail))

    @property
    def digest(self) -> bytes:
        """``sha256(tail)``, computed once."""
        digest = self._digest
        if digest is None:
            digest = hashlib.sha256(self.tail).digest()
            object.__setattr__(self, "_digest", digest)
        return digest


@fast_init
@dataclass(frozen=True, slots=True)
class SignatureInfo:
    """Who claims to have signed a frame, and what a verifier must check."""

    kid: str
    public_raw: bytes
    signature: bytes
    digests: bytes
    """``sha256(header) || sha256(tail)``: the signed bytes less the domain and the scope."""

    def signed_for(self, scope: str) -> bytes:
        """The bytes the signature must cover if the frame was published for ``scope``
        (:func:`~edge_sdk.wire.topics.signing_scope` of the topic it arrived on)."""
        return _scoped(scope) + self.digests


@fast_init
@dataclass(frozen=True, slots=True)
class Frame:
    message: Message
    signature: SignatureInfo | None


def _tensor_parts(weights: Vector, encoding: Encoding) -> tuple[dict[str, Any], Any]:
    if encoding not in ENCODINGS:
        raise ConfigError(f"unknown tensor encoding {encoding!r}; use one of {sorted(ENCODINGS)}")
    if encoding == "i1":
        peak = float(np.max(np.abs(weights))) if weights.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        q = np.clip(np.rint(weights / scale), -127, 127).astype(np.int8)
        return {"dt": "i1", "n": int(weights.size), "l": int(q.nbytes), "s": scale}, q.data.cast("B")
    arr = np.ascontiguousarray(weights.astype(ENCODINGS[encoding], copy=False))
    return {"dt": encoding, "n": int(weights.size), "l": int(arr.nbytes)}, arr.data.cast("B")


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tensor_from(meta: Any, payload: Any, offset: int) -> Vector:
    if not isinstance(meta, dict):
        raise BadTensor("tensor must be a map")
    dt, n, length = meta.get("dt"), meta.get("n"), meta.get("l")
    if dt not in ENCODINGS:
        raise BadTensor(f"dtype {dt!r} not in whitelist {sorted(ENCODINGS)}")
    if not (_is_count(n) and _is_count(length)):
        raise BadTensor("tensor needs int length fields")
    assert isinstance(n, int)
    dtype = ENCODINGS[dt]
    if length != n * dtype.itemsize:
        raise BadTensor(f"tensor of {n} {dt} values needs {n * dtype.itemsize} bytes, got {length}")
    arr = np.frombuffer(payload, dtype=dtype, count=n, offset=offset)
    if dt == "f4":
        return arr  # zero-copy, read-only view into the payload
    if dt == "f2":
        return arr.astype(np.float32)
    scale = meta.get("s")
    if not isinstance(scale, float | int) or isinstance(scale, bool) or not np.isfinite(scale) or scale <= 0:
        raise BadTensor("int8 tensor needs a positive finite scale")
    return arr.astype(np.float32) * np.float32(scale)


# ---------------------------------------------------------------- encode


_LAYOUTS: dict[str, tuple[tuple[str, bool], ...]] = {}


def _layout(cls: type[Message]) -> tuple[tuple[str, bool], ...]:
    """``(field name, required)`` per field of a message class (computed once per class)."""
    layout = _LAYOUTS.get(cls.TYPE)
    if layout is None:
        layout = _LAYOUTS[cls.TYPE] = tuple(
            (f.name, f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls)
        )
    return layout


@fast_init
@dataclass(frozen=True, slots=True)
class _Compiled:
    """A message class's layout, precompiled for the hot paths: its header fields (all but
    the weights) in order, the required ones as a set, and how it carries weights."""

    cls: type[Message]
    names: tuple[str, ...]
    required: frozenset[str]
    has_weights: bool
    weights_required: bool
    values: Callable[[Any], tuple[Any, ...]]
    """The header fields' values of a message, in ``names`` order (one C-level call)."""
    omit: tuple[tuple[str, object], ...]
    """The class's ``OMIT_AT_DEFAULT``."""


def _compile(cls: type[Message]) -> _Compiled:
    layout = _layout(cls)
    names = tuple(name for name, _ in layout if name != "weights")
    values: Callable[[Any], tuple[Any, ...]]
    if len(names) == 1:  # attrgetter of one name returns the value, not a tuple
        one = operator.attrgetter(names[0])
        values = lambda msg: (one(msg),)  # noqa: E731
    else:
        values = operator.attrgetter(*names)
    return _Compiled(
        cls=cls,
        names=names,
        required=frozenset(name for name, req in layout if req and name != "weights"),
        has_weights=any(name == "weights" for name, _ in layout),
        weights_required=any(name == "weights" and req for name, req in layout),
        values=values,
        omit=tuple(getattr(cls, "OMIT_AT_DEFAULT", ())),
    )


_COMPILED: dict[str, _Compiled] = {name: _compile(cls) for name, cls in MESSAGE_TYPES.items()}


def _compiled(cls: type[Message]) -> _Compiled:
    c = _COMPILED.get(cls.TYPE)
    if c is None or c.cls is not cls:  # a message class registered after import (tests)
        c = _COMPILED[cls.TYPE] = _compile(cls)
    return c


def _fields(msg: Message) -> dict[str, Any]:
    body: dict[str, Any] = {"type": msg.TYPE}
    c = _compiled(type(msg))
    body.update(zip(c.names, c.values(msg)))
    for name, default in c.omit:
        if body[name] == default:  # a field added later: absent at its default, so older frames keep their bytes
            del body[name]
    return body


_PACKERS: list[msgpack.Packer] = []
"""Idle packers: a caller takes one (``list.pop`` and ``append`` are atomic, so no two
threads share one) and puts it back when done."""


def _packb(header: dict[str, Any]) -> bytes:
    """``msgpack.packb(header, use_bin_type=True)`` (the same bytes), reusing a packer
    instead of building one per frame. One that raised is not reused."""
    try:
        packer = _PACKERS.pop()
    except IndexError:
        packer = msgpack.Packer(use_bin_type=True)
    packed: bytes = packer.pack(header)
    _PACKERS.append(packer)
    return packed


def _prefix(header: dict[str, Any]) -> bytes:
    """A frame's bytes before its tail: magic, header length, the packed header, padding."""
    packed = _packb(header)
    assert isinstance(packed, bytes)
    pad = b"\0" * (-(_PREFIX.size + len(packed)) % ALIGN)
    return b"".join((_PREFIX.pack(MAGIC, len(packed)), packed, pad))


def _frame(header: dict[str, Any], tail: Any, tail_digest: bytes, signer: Signer | None, scope: str | None) -> bytes:
    if signer is None:
        return b"".join((_prefix(header), tail))
    if scope is None:
        raise TypeError("a signed frame needs the scope it is published for: topics.signing_scope(topic)")
    header["sg"] = {"kid": signer.kid, "pk": signer.public_raw}
    prefix = _prefix(header)
    return b"".join((prefix, tail, signer.sign(_scoped(scope) + hashlib.sha256(prefix).digest() + tail_digest)))


def _scoped(scope: str) -> bytes:
    raw = scope.encode()
    if not 0 < len(raw) < 256:
        raise ValueError(f"a signing scope is 1-255 bytes, not {len(raw)}")
    return SIG_DOMAIN + bytes((len(raw),)) + raw


def encode(msg: Message, *, encoding: Encoding = "f4", signer: Signer | None = None, scope: str | None = None) -> bytes:
    """Serialise a message; ``encoding`` applies to its weights, ``signer`` signs the frame
    for ``scope`` (required with a signer: ``topics.signing_scope`` of the topic it goes to)."""
    header = _fields(msg)
    weights = getattr(msg, "weights", None)
    carry = signer is None and _CARRY.get() and msg.TYPE in _CARRIED_TYPES
    if weights is None:
        return _carried(msg, header, None) if carry else _frame(header, b"", _EMPTY_DIGEST, signer, scope)
    if carry and encoding == "f4":
        return _carried(msg, header, _receiver_weights(weights))
    meta, tail = _tensor_parts(weights, encoding)
    header["w"] = meta
    digest = hashlib.sha256(tail).digest() if signer is not None else b""
    return _frame(header, tail, digest, signer, scope)


def encode_spliced(msg: Message, tensor: EncodedTensor, *, signer: Signer | None = None, scope: str | None = None) -> bytes:
    """As :func:`encode`, reusing a tensor encoded once (``msg.weights`` is ignored)."""
    header = _fields(msg)
    if signer is None and _CARRY.get() and msg.TYPE in _CARRIED_TYPES and tensor.meta["dt"] == "f4":
        return _carried(msg, header, np.frombuffer(tensor.tail, dtype=ENCODINGS["f4"], count=tensor.meta["n"]))
    header["w"] = tensor.meta
    return _frame(header, tensor.tail, tensor.digest if signer is not None else b"", signer, scope)


# ---------------------------------------------------------------- in-process emulation


class CarriedFrame:
    """A frame encoded inside :func:`carry_decoded` (the in-process emulator's transport,
    where sender and receiver share one process): the :class:`Frame` decoding it returns,
    its exact size, and its bytes built on demand.

    The emulator's network model needs only a frame's size, so the tensor tail is never
    copied into a frame: ``len()`` is the exact length of the frame :func:`encode` would
    have built, ``bytes()`` builds those very bytes (for a reader that wants them), and
    ``==`` / ``hash`` compare them. It is not a ``bytes`` object: anything else a reader
    might do with a payload (slice it, take a buffer, write it to a socket) raises instead
    of seeing other bytes. :func:`decode_frame` checks the size cap and returns ``frame``.

    Carried are unsigned Pull / Model / Update / Ack / Invite messages whose fields are
    str, int, float, bool, a str → number dict (copied) and ``f4`` weights — for which
    ``frame`` is what decoding returns: the message validated at construction, its weights
    a read-only float32 vector over a ``bytes`` object equal to the frame's tail (shared by
    every receiver of this frame; the sender's own array when that one is such a vector
    already, since nothing can change it). Everything else is encoded as plain bytes and
    decoded as usual."""

    __slots__ = ("_head", "_size", "frame")

    def __init__(self, head: bytes, frame: Frame) -> None:
        self._head = head
        weights = getattr(frame.message, "weights", None)
        self._size = len(head) + (0 if weights is None else weights.nbytes)
        self.frame = frame

    def __len__(self) -> int:
        return self._size

    def __bytes__(self) -> bytes:
        weights = getattr(self.frame.message, "weights", None)
        if weights is None:
            return self._head
        return b"".join((self._head, memoryview(weights).cast("B")))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CarriedFrame):
            other = bytes(other)
        if isinstance(other, bytes | bytearray | memoryview):
            return bytes(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(bytes(self))

    def __repr__(self) -> str:
        return f"CarriedFrame({self.frame.message.TYPE}, {self._size} bytes)"


_CARRY: ContextVar[bool] = ContextVar("edgeci_carry_decoded", default=False)
"""On inside :func:`carry_decoded`, in that context only: a thread started meanwhile begins
with an empty context and encodes bytes (CPython 3.11-3.13; a thread that inherits the
caller's context — free-threaded 3.14's default, ``copy_context().run``,
``asyncio.to_thread`` — would carry too). A core cannot ask which thread it runs on: the
codec imports no threading (tests/test_architecture.py)."""
_CARRIED_TYPES = frozenset({"pull", "model", "update", "ack", "invite"})
_F4 = ENCODINGS["f4"]


@contextmanager
def carry_decoded(enabled: bool = True) -> Iterator[None]:
    """Within this block, frames encoded without a signer carry their decoded message
    (:class:`CarriedFrame`): receivers in this process skip parsing them. For the in-process
    emulator only; the cores and every check stay the same, sizes are exact."""
    token = _CARRY.set(enabled)
    try:
        yield
    finally:
        _CARRY.reset(token)


def _immutable_f4(weights: Vector) -> bool:
    """A contiguous little-endian float32 ndarray, read-only, whose memory is a ``bytes``
    object: nothing can change its values (numpy refuses to make it writeable)."""
    base: object = weights.base
    return (type(weights) is np.ndarray and weights.dtype == _F4 and not weights.flags.writeable
            and weights.flags.c_contiguous and type(base) is bytes)


def _receiver_weights(weights: Vector) -> Vector:
    """What decoding an ``f4`` frame of ``weights`` gives the receiver: the sender's array
    itself when it is immutable, else a read-only vector over a copy of its bytes."""
    if _immutable_f4(weights):
        return weights
    return np.frombuffer(bytes(_tensor_parts(weights, "f4")[1]), dtype=_F4)


def _carried(msg: Message, header: dict[str, Any], weights: Vector | None) -> bytes:
    if weights is not None:
        header["w"] = {"dt": "f4", "n": int(weights.size), "l": int(weights.nbytes)}  # as _tensor_parts
    message: Message = msg  # weightless: every field is an immutable str / int / bool
    if weights is not None and (weights is not getattr(msg, "weights", None) or isinstance(msg, ModelMsg)):
        # A copy of the (validated, frozen) message with the receiver's weights; set slot by
        # slot: the values are the validated ones, the weights equal them.
        message = object.__new__(type(msg))
        c = _compiled(type(msg))
        for name, value in zip(c.names, c.values(msg)):
            object.__setattr__(message, name, value)
        object.__setattr__(message, "weights", weights)
        if isinstance(msg, ModelMsg):
            object.__setattr__(message, "hints", dict(msg.hints))  # a receiver's own dict, as decoding makes
    carried = CarriedFrame(_prefix(header), Frame(message=message, signature=None))
    # The cores hold a payload as ``bytes`` (Publish, MessageReceived); in this block it is a
    # CarriedFrame, which supports what the emulator does with one (len, bytes, ==) and
    # raises on anything else rather than serving other bytes.
    return cast(bytes, carried)


# ---------------------------------------------------------------- decode


def decode(payload: bytes | bytearray | memoryview | CarriedFrame, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Parse and validate one message. Raises a ``RemoteProtocolError`` on anything wrong."""
    return decode_frame(payload, max_bytes=max_bytes).message


def decode_frame(payload: bytes | bytearray | memoryview | CarriedFrame, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Frame:
    """The message and, when the frame is signed, what a verifier needs to check it."""
    size = len(payload)
    if size > max_bytes:
        raise MessageTooLarge(f"{size} bytes exceeds the cap of {max_bytes}")
    if isinstance(payload, CarriedFrame):  # in-process emulation: parsed already (see carry_decoded)
        return payload.frame
    if size < _PREFIX.size:
        raise MalformedMessage("frame too short")
    # bytes are sliced directly (the header is small: a copy is cheaper than a view); anything
    # else through a memoryview. The tail is never copied (see _tensor_from and the signature).
    view = payload if type(payload) is bytes else memoryview(payload)
    magic, hlen = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        if magic[:3] == MAGIC[:3]:
            raise UnsupportedProtocol(f"protocol version {magic[3]}, this side speaks {PROTOCOL_VERSION}")
        if view[0] in (0xDE, 0xDF) or 0x80 <= view[0] <= 0x8F:
            raise UnsupportedProtocol(f"a protocol v1 (bare msgpack) message; this side speaks {PROTOCOL_VERSION}")
        raise MalformedMessage("not an edgeci frame")
    if hlen > min(MAX_HEADER_BYTES, size - _PREFIX.size):
        raise MalformedMessage(f"header length {hlen} out of bounds")
    try:
        header = msgpack.unpackb(
            view[_PREFIX.size : _PREFIX.size + hlen],
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_HEADER_BYTES,
            max_str_len=1 << 14,
            max_array_len=1 << 12,
            max_map_len=1 << 10,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many unrelated types on garbage
        raise MalformedMessage(f"header is not msgpack: {type(exc).__name__}") from exc
    if type(header) is not dict:
        raise MalformedMessage("header must be a map")
    offset = _PREFIX.size + hlen
    offset += -offset % ALIGN
    type_name = header.get("type")
    cls = MESSAGE_TYPES.get(type_name) if type(type_name) is str else None  # an unhashable "type" is unknown too
    if cls is None:
        raise MalformedMessage(f"unknown message type {type_name!r}")
    compiled = _compiled(cls)
    signer = header.get("sg")
    sig_len = SIGNATURE_BYTES if signer is not None else 0
    tensor = header.get("w")
    tail_len = tensor.get("l") if type(tensor) is dict else 0
    if type(tail_len) is not int or tail_len < 0:
        raise BadTensor("tensor needs an int byte length")
    if offset + tail_len + sig_len != size:
        raise MalformedMessage(f"frame of {size} bytes does not hold header, {tail_len} tensor bytes and {sig_len} signature bytes")
    if not compiled.required <= header.keys() or (tensor is None and compiled.weights_required):
        _missing(compiled, header, tensor)
    kwargs = {name: header[name] for name in compiled.names if name in header}
    if tensor is not None:
        if not compiled.has_weights:
            raise MalformedMessage(f"a {cls.TYPE} message carries no weights")
        kwargs["weights"] = _tensor_from(tensor, payload, offset)
    try:
        message = cls(**kwargs)
    except RemoteProtocolError:
        raise
    except Exception as exc:  # e.g. a TypeError from a field of the wrong type
        raise MalformedMessage(f"{cls.TYPE}: {exc}") from exc
    if signer is None:
        return Frame(message=message, signature=None)
    if type(signer) is not dict or type(signer.get("kid")) is not str or type(signer.get("pk")) is not bytes:
        raise MalformedMessage("signer must be {kid: str, pk: bytes}")
    pk = signer["pk"]
    if len(pk) != PUBLIC_KEY_BYTES or key_id(pk) != signer["kid"]:
        raise MalformedMessage("signer key id does not match its public key")
    whole = memoryview(payload)
    tail = whole[offset : offset + tail_len]
    info = SignatureInfo(
        kid=signer["kid"],
        public_raw=pk,
        signature=bytes(whole[size - SIGNATURE_BYTES :]),
        digests=hashlib.sha256(whole[:offset]).digest() + (hashlib.sha256(tail).digest() if tail_len else _EMPTY_DIGEST),
    )
    return Frame(message=message, signature=info)


def _missing(compiled: _Compiled, header: dict[Any, Any], tensor: object) -> None:
    """Raise for the first missing required field, in the message's field order."""
    cls = compiled.cls
    for name, required in _layout(cls):
        if name == "weights":
            if tensor is None and required:
                raise MalformedMessage(f"{cls.TYPE}: missing weights")
        elif required and name not in header:
            raise MalformedMessage(f"{cls.TYPE}: missing field {name!r}")


# ---------------------------------------------------------------- tensors at rest


def encode_tensor(weights: Vector, encoding: Encoding = "f4") -> dict[str, Any]:
    """A self-contained msgpack-able tensor ``{"dt", "n", "b", "s"}`` (for files, not frames)."""
    meta, tail = _tensor_parts(weights, encoding)
    out = {"dt": meta["dt"], "n": meta["n"], "b": bytes(tail)}
    if "s" in meta:
        out["s"] = meta["s"]
    return out


def decode_tensor(obj: Any) -> Vector:
    """Inverse of :func:`encode_tensor`; raises ``BadTensor`` on anything wrong."""
    if not isinstance(obj, dict) or not isinstance(obj.get("b"), bytes):
        raise BadTensor("tensor must be a map with raw bytes")
    meta = {k: obj.get(k) for k in ("dt", "n", "s")}
    meta["l"] = len(obj["b"])
    return _tensor_from(meta, obj["b"], 0)


# ---------------------------------------------------------------- status (JSON)


def status_json(status: Status) -> bytes:
    """Status is published as JSON so that ``mosquitto_sub`` users can read it."""
    body = {f.name: getattr(status, f.name) for f in dataclasses.fields(status)}
    body.update({"v": PROTOCOL_VERSION, "type": Status.TYPE})
    return json.dumps(body, sort_keys=True).encode()


def parse_status_json(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: b"[" * 60000
        raise MalformedMessage("status is not JSON") from exc
    if not isinstance(data, dict) or data.get("type") != Status.TYPE:
        raise MalformedMessage("not a status message")
    return data
