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


class BadOption(ConfigError):
    """An option's value is wrong on its face (a range, a name, a parameter's type): every
    retry fails the same way. The CLI exits with :attr:`exit_code`, argparse's code for a
    usage error, which the coordinator's systemd unit does not restart (it restarted a typo in
    the config file every 5 s, for ever)."""

    exit_code = 2


class StartRefused(ConfigError):
    """A coordinator start refused as unsafe: another coordinator is live on the region, the
    state dir serves another region, or the region's devices follow another state dir.
    ``edgeci coordinator`` exits with :attr:`exit_code` (the systemd unit does not restart it:
    retrying cannot make it safe, and a retry could displace the live one again)."""

    exit_code = 3


class UnsafeCheckpoint(ConfigError):
    """A model file would run code to load (a pickle of objects beyond tensors and known
    model classes); refused without loading it."""


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


class UnknownPeer(RemoteProtocolError):
    """A peer message from a coordinator that is not in this coordinator's ring."""

    reason = "unknown_peer"


class RingMismatch(MalformedMessage):
    """A peer of the ring runs another configuration than this coordinator (another peering
    protocol: a message kind this one's never sends). Refused, naming the option to fix
    (helper-96: it read as ``malformed: unknown peer message kind``)."""

    reason = "ring_mismatch"


def other_protocol(name: str, sender: str, kind: str) -> RingMismatch:
    """A peer message of a kind protocol ``name`` never sends: the peer runs another one."""
    return RingMismatch(f"{name}: peer {sender!r} sent a {kind[:40]!r} message, which {name} never sends: it runs another "
                        "peering protocol (--peering must be the same on every coordinator of a ring)")


class WeightsOutOfRange(RemoteProtocolError):
    """Finite weights too large for any model (a hostile update whose sum with others would
    overflow float32 in the coordinator's fold): see :data:`edge_sdk.spec.MAX_UPDATE_NORM`."""

    reason = "out_of_range"


class UnknownModel(RemoteProtocolError):
    reason = "unknown_model"


class UnknownVersion(RemoteProtocolError):
    reason = "unknown_version"


class GateRejected(RemoteProtocolError):
    """An operator's rollback or pin names a version the release gate rejected, without ``force``."""

    reason = "gate_rejected"


class RejectedBase(RemoteProtocolError):
    """An update trained from a version the coordinator abandoned (a candidate the release gate
    rejected, one built on it, or a line an operator rolled back past): its weights would bring
    that model back. Its device trains the same samples again from the current training line."""

    reason = "base_rejected"


class NotSelected(RemoteProtocolError):
    """An update from a device the coordinator did not let train: a strategy that selects its
    devices (FedBuff, FedAvg, ...) takes one update per training model it served, so a device
    that was never drawn cannot fill the buffer. Its device trains the same samples again once
    it is selected (a straggler the coordinator forgot, or one in flight across a restart)."""

    reason = "not_selected"


class TopicMismatch(RemoteProtocolError):
    """The message claims a device id other than the topic it arrived on."""

    reason = "topic_mismatch"


class SeqJump(RemoteProtocolError):
    """An update's seq is further above the device's watermark than any honest device gets."""

    reason = "seq_jump"


class TooManySamples(RemoteProtocolError):
    """An update claims more training samples than the coordinator's cap."""

    reason = "n_samples"


class UnsignedMessage(RemoteProtocolError):
    """A model (or peer message) arrived without the signature this side requires."""

    reason = "unsigned"


class BadSignature(RemoteProtocolError):
    """A signature that does not verify, or one by a key this side does not trust."""

    reason = "bad_signature"


class OperatorMismatch(BadSignature):
    """A control command whose ``operator`` is not the name of the key that signed it."""

    reason = "operator_mismatch"


class ReplayedMessage(RemoteProtocolError):
    """A signed command seen before, or outside its time window."""

    reason = "replayed"


class StaleEpoch(ReplayedMessage):
    """A model, recall or canary request numbered in an epoch older than the one the device
    holds: from before its coordinator's state dir was reset, replayed (or left retained)."""

    reason = "epoch_older"


class ForeignExtractor(ReplayedMessage):
    """LASP: a part of a model (its head) built on a full sync after the version the device
    holds (``ModelMsg.full_sync``): patched on, it would pair that head with an older extractor
    (a replayed or misrouted reply; its signature holds region-wide)."""

    reason = "extractor_mismatch"


class RateLimited(RemoteProtocolError):
    """A device asked more often than the coordinator answers; the request is dropped."""

    reason = "rate_limited"


class TooManyDevices(RemoteProtocolError):
    """A message from a new device id once the coordinator tracks its maximum of devices."""

    reason = "too_many_devices"


class BadCanaryReport(RemoteProtocolError):
    """A canary report (or canary fetch) the coordinator cannot accept; ``reason`` says why:
    no such candidate round, a round that is over, not from its cohort, a second report, more
    labels than allowed."""

    reason = "canary"


class UnknownCandidate(BadCanaryReport):
    reason = "canary_unknown_candidate"


class StaleRound(BadCanaryReport):
    """A report for the open round's candidate and release, but of an earlier round (another
    nonce): sent to the coordinator before it restarted and opened this one."""

    reason = "canary_stale_round"


class NotInCohort(BadCanaryReport):
    reason = "canary_not_in_cohort"


class DuplicateReport(BadCanaryReport):
    reason = "canary_duplicate"


class ReportTooLarge(BadCanaryReport):
    reason = "canary_too_many_labels"


class TransportError(EdgeciError):
    """The broker could not be reached or refused us (raised by drivers, never by cores)."""


class BrokerRefused(TransportError):
    """The broker answered our CONNECT with a refusal (its CONNACK): the identity, password or
    client id is not accepted — not a network, TLS or certificate failure."""


class MissingExtra(ConfigError, ImportError):
    """An optional dependency of one role is not installed; the message names the extra
    (``pip install 'edgeci[train]'``). Also an ``ImportError``, so import fallbacks work."""


class TrainingCancelled(EdgeciError):
    """Local training stopped between two batches because its client is stopping
    (:func:`edge_sdk.cancellation.checkpoint`); its result is never sent."""
