"""msgpack codec for every protocol message. Never pickle.

Layout: ``{"v": 1, "type": "<type>", <fields>...}``; a weights vector travels as
``{"dt": "f4"|"f2"|"i1", "n": <len>, "b": <raw little-endian bytes>, "s": <scale>}``.

* ``f4`` decodes zero-copy: the returned vector is a read-only view into the payload.
* ``f2`` halves the bytes (lossy, ~3 significant digits).
* ``i1`` quarters them: symmetric per-tensor int8 with scale ``s = max|w| / 127``.

:func:`decode` either returns a valid message or raises a
:class:`~edge_sdk.errors.RemoteProtocolError` subclass — whatever the bytes.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

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
from edge_sdk.spec import Vector
from edge_sdk.wire.messages import MESSAGE_TYPES, Message, Status

PROTOCOL_VERSION = 1
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # paho refuses payloads over 268,435,455 bytes
Encoding = Literal["f4", "f2", "i1"]
ENCODINGS: dict[str, np.dtype[Any]] = {
    "f4": np.dtype("<f4"),
    "f2": np.dtype("<f2"),
    "i1": np.dtype("i1"),
}


def encode_tensor(weights: Vector, encoding: Encoding = "f4") -> dict[str, Any]:
    if encoding not in ENCODINGS:
        raise ConfigError(f"unknown tensor encoding {encoding!r}; use one of {sorted(ENCODINGS)}")
    if encoding == "i1":
        peak = float(np.max(np.abs(weights))) if weights.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        q = np.clip(np.rint(weights / scale), -127, 127).astype(np.int8)
        return {"dt": "i1", "n": int(weights.size), "b": q.tobytes(), "s": scale}
    arr = weights.astype(ENCODINGS[encoding], copy=False)
    return {"dt": encoding, "n": int(weights.size), "b": np.ascontiguousarray(arr).data.cast("B")}


def decode_tensor(obj: Any) -> Vector:
    if not isinstance(obj, dict):
        raise BadTensor("tensor must be a map")
    dt, n, raw = obj.get("dt"), obj.get("n"), obj.get("b")
    if dt not in ENCODINGS:
        raise BadTensor(f"dtype {dt!r} not in whitelist {sorted(ENCODINGS)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or not isinstance(raw, bytes):
        raise BadTensor("tensor needs an int length and raw bytes")
    dtype = ENCODINGS[dt]
    if len(raw) != n * dtype.itemsize:
        raise BadTensor(f"tensor of {n} {dt} values needs {n * dtype.itemsize} bytes, got {len(raw)}")
    arr = np.frombuffer(raw, dtype=dtype)
    if dt == "f4":
        return arr.astype(np.float32, copy=False)  # zero-copy view (little-endian hosts)
    if dt == "f2":
        return arr.astype(np.float32)
    scale = obj.get("s")
    if not isinstance(scale, float | int) or isinstance(scale, bool) or not np.isfinite(scale) or scale <= 0:
        raise BadTensor("int8 tensor needs a positive finite scale")
    return arr.astype(np.float32) * np.float32(scale)


def encode(msg: Message, *, encoding: Encoding = "f4") -> bytes:
    """Serialise a message; ``encoding`` applies to its weights, if any."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": msg.TYPE}
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if f.name == "weights" and value is not None:
            value = encode_tensor(value, encoding)
        body[f.name] = value
    out = msgpack.packb(body, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


def decode(payload: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Parse and validate one message. Raises a ``RemoteProtocolError`` on anything wrong."""
    if len(payload) > max_bytes:
        raise MessageTooLarge(f"{len(payload)} bytes exceeds the cap of {max_bytes}")
    try:
        body = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=1 << 16,
            max_array_len=1 << 16,
            max_map_len=1 << 12,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many unrelated types on garbage
        raise MalformedMessage(f"not msgpack: {type(exc).__name__}") from exc
    if not isinstance(body, dict):
        raise MalformedMessage("message must be a map")
    if body.get("v") != PROTOCOL_VERSION:
        raise UnsupportedProtocol(f"protocol version {body.get('v')!r}, this side speaks {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(body.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise MalformedMessage(f"unknown message type {body.get('type')!r}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MalformedMessage(f"{cls.TYPE}: missing field {f.name!r}")
            continue
        value = body[f.name]
        if f.name == "weights" and value is not None:
            value = decode_tensor(value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except RemoteProtocolError:
        raise
    except Exception as exc:  # e.g. a TypeError from a field of the wrong type
        raise MalformedMessage(f"{cls.TYPE}: {exc}") from exc


def status_json(status: Status) -> bytes:
    """Status is published as JSON so that ``mosquitto_sub`` users can read it."""
    body = {f.name: getattr(status, f.name) for f in dataclasses.fields(status)}
    body.update({"v": PROTOCOL_VERSION, "type": Status.TYPE})
    return json.dumps(body, sort_keys=True).encode()


def parse_status_json(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage("status is not JSON") from exc
    if not isinstance(data, dict) or data.get("type") != Status.TYPE:
        raise MalformedMessage("not a status message")
    return data
