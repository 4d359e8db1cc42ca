"""Ed25519 model signatures: coordinators sign, devices verify against pinned keys.

A coordinator's signing key is an Ed25519 private key in PEM (PKCS#8), file mode 0600,
kept in its state dir (``STATE_DIR/signing.key``) or handed over in its provisioning
bundle. Devices hold the matching public keys (PEM SubjectPublicKeyInfo, ``<id>.pub``) in
their bundle, or pin the first key they see (trust on first use) when they have none.

A key is named on the wire by its *key id*: the first 16 hex digits of SHA-256 over the
raw 32-byte public key. Signing and verification are pure computations (no IO), so the
sans-IO cores may call :meth:`Signer.sign` and :func:`verify` directly; loading and saving
keys are the drivers' business.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_sdk.errors import ConfigError

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


def key_id(public_raw: bytes) -> str:
    """Short stable name of a public key: 16 hex digits of SHA-256 over its 32 raw bytes."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Signer:
    """A private signing key and its public half (raw bytes and key id)."""

    private: Ed25519PrivateKey
    public_raw: bytes
    kid: str

    @classmethod
    def from_private(cls, private: Ed25519PrivateKey) -> Signer:
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(private=private, public_raw=raw, kid=key_id(raw))

    @classmethod
    def generate(cls) -> Signer:
        return cls.from_private(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    def public_pem(self) -> bytes:
        return public_pem(self.public_raw)


def verify(public_raw: bytes, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data`` by ``public_raw``."""
    if len(public_raw) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def public_pem(public_raw: bytes) -> bytes:
    return Ed25519PublicKey.from_public_bytes(public_raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---------------------------------------------------------------- files (drivers only)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def save_signer(signer: Signer, path: str | Path) -> None:
    """Write the private key as PEM PKCS#8 with mode 0600 (atomic)."""
    pem = signer.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(Path(path), pem)


def load_signer(path: str | Path) -> Signer:
    p = Path(path)
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the signing key {p}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{p} is not an Ed25519 private key")
    return Signer.from_private(key)


def load_or_create_signer(path: str | Path) -> tuple[Signer, bool]:
    """The key at ``path``, created (0600) when missing. Returns ``(signer, created)``."""
    p = Path(path)
    if p.exists():
        return load_signer(p), False
    signer = Signer.generate()
    save_signer(signer, p)
    return signer, True


def save_public_key(public_raw: bytes, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(public_pem(public_raw))


def load_public_key(path: str | Path) -> bytes:
    """Raw 32 bytes of a PEM (SubjectPublicKeyInfo) Ed25519 public key file."""
    p = Path(path)
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the public key {p}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{p} is not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_named_keys(directory: str | Path) -> dict[str, bytes]:
    """Every ``<name>.pub`` in ``directory`` as ``{name: raw public key}`` (operators' and peer
    coordinators' keys: the name is who may sign with it)."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"trusted-keys directory {d} does not exist")
    return {p.stem: load_public_key(p) for p in sorted(d.glob("*.pub"))}


def load_trusted_keys(directory: str | Path) -> dict[str, bytes]:
    """Every ``*.pub`` in ``directory`` as ``{key id: raw public key}``."""
    return {key_id(raw): raw for raw in load_named_keys(directory).values()}


def trusted_from(keys: Mapping[str, bytes] | None) -> dict[str, bytes]:
    """Normalise a mapping of trusted keys, checking each id matches its key."""
    out = {}
    for kid, raw in (keys or {}).items():
        if len(raw) != PUBLIC_KEY_BYTES or key_id(raw) != kid:
            raise ConfigError(f"trusted key {kid!r} does not match its bytes")
        out[kid] = bytes(raw)
    return out
