"""One error tree for edgeci, with a single root.

Like h11, we split errors by *who* is at fault:

* :class:`LocalProtocolError` — this process misused the API (wrong shape handed to
  ``add_sample``, an action the state machine cannot take). Fix the calling code.
* :class:`RemoteProtocolError` — a peer sent something wrong (garbage bytes, an
  oversized message, NaN weights, an unknown model version). The message is rejected,
  counted and never applied; the process keeps running.

Every decoder in the project either returns a valid message or raises a
``RemoteProtocolError`` subclass — the fuzz tests hold it to that.
"""

from __future__ import annotations


class EdgeciError(Exception):
    """Root of every error raised on purpose by edgeci."""


class LocalProtocolError(EdgeciError):
    """The calling code misused an API or asked for an impossible transition."""


class InvalidSample(LocalProtocolError):
    """A sample handed to the SDK has the wrong shape, label, dtype or size."""


class ConfigError(LocalProtocolError):
    """A configuration value is out of range or inconsistent."""


class RemoteProtocolError(EdgeciError):
    """A peer sent something that cannot be accepted. ``reason`` is a short stable code."""

    reason = "malformed"


class MalformedMessage(RemoteProtocolError):
    reason = "malformed"


class MessageTooLarge(RemoteProtocolError):
    reason = "too_large"


class UnsupportedProtocol(RemoteProtocolError):
    reason = "unsupported_protocol"


class BadTensor(RemoteProtocolError):
    """Unknown dtype, or a tensor whose byte length disagrees with its shape."""

    reason = "bad_tensor"


class ShapeMismatch(RemoteProtocolError):
    """Weights whose shape does not match the model's :class:`~edge_sdk.spec.ModelSpec`."""

    reason = "shape_mismatch"


class NonFiniteWeights(RemoteProtocolError):
    reason = "non_finite"


class UnknownModel(RemoteProtocolError):
    reason = "unknown_model"


class UnknownVersion(RemoteProtocolError):
    reason = "unknown_version"


class TopicMismatch(RemoteProtocolError):
    """The message claims a device id other than the topic it arrived on."""

    reason = "topic_mismatch"


class TransportError(EdgeciError):
    """The broker could not be reached or refused us (raised by drivers, never by cores)."""
