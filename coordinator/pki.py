"""``edgeci pki`` — a small certificate authority and per-identity provisioning bundles.

An identity is a certificate whose common name is the device, coordinator or operator id;
mosquitto maps it to the MQTT username (``use_identity_as_username``) and the ACL file this
module generates confines each username to its own topics. Layout of a PKI directory::

    PKI/ca.key  ca.crt                 the CA (ECDSA P-256; ca.key 0600, keep it offline)
    PKI/identities.json                every issued identity: role, regions, serial, expiry;
                                       and every revoked or superseded certificate's serial
    PKI/ca.crl                         the revocation list (mosquitto's crlfile; re-read on SIGHUP, for
                                       new connections only: see "Revocation" below)
    PKI/signing/<coordinator>.pub      coordinators' Ed25519 model-signing public keys
    PKI/mosquitto.acl                  generated from identities.json (``pki acl``)
    PKI/mosquitto.passwd               username/password alternative (``pki passwd``)
    PKI/bundles/<ID>/                  what is copied to the device / coordinator host:
        ca.crt  <ID>.crt  <ID>.key (0600)  bundle.json  trusted/<coordinator>.pub
        signing.key (0600, coordinators only: its model-signing key)
        password (0600, only after ``pki passwd``)

Private keys are created with mode 0600 before a byte is written (``os.open`` with the
mode), and directories holding them with 0700; public files 0644 and their directories 0755,
whatever the umask.

Revocation is by certificate and by name: ``revoke`` puts the certificate's serial on the CRL
and takes the name out of the ACL (and the password file); issuing a name again (``--force``,
or after a revocation) puts the old certificate on the CRL too, so a stolen copy of it stays
refused although the ACL admits the name again.

mosquitto checks the CRL at the TLS handshake only: a reload (SIGHUP) refuses a revoked
certificate's *next* connection, but a connection it already holds stays open. While the name
is out of the ACL that connection may read and write nothing; once the name is issued again (the
replacement headset, or ``--force``) it publishes in that name again, with the revoked
certificate (helper-159: a stolen headset certificate connected at its revocation published an
update after the re-issue). So a revocation, and a re-issue of a name that had a certificate
before, end with a restart of mosquitto, which closes every connection; the clients reconnect
(the revoked one is refused by the CRL) and send again what was not acknowledged.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator.config import bounded
from coordinator.peering.base import BROADCAST
from edge_sdk import signing
from edge_sdk.errors import ConfigError
from edge_sdk.mqtt import ANY_REGION
from edge_sdk.wire.topics import ROOT, check_id

ROLES = ("device", "coordinator", "operator", "broker")
CA_DAYS = 3650
LEAF_DAYS = 825
BACKDATE = dt.timedelta(days=1)
"""Certificates and the CRL are valid from this long before they were made: a device whose clock is
behind this host's (hours apart in one fleet, a clock set by hand, local time taken for UTC) took a
certificate issued less than that ago for "not yet valid" and could not connect (it was 5 minutes).
The end of validity is not moved: a clock that is right sees no difference."""
MAX_DAYS = 365_000
"""The longest --days (a thousand years): a date past year 9999 has no datetime (`pki init --days
99999999` ended in OverflowError, leaving an empty PKI folder)."""


def _days(text: str) -> int:
    """An argparse ``type`` for --days: 1 to :data:`MAX_DAYS`."""
    days: int = bounded(int, 1, at_most=MAX_DAYS, above_rule=f"must be at most {MAX_DAYS} (a thousand years)")(text)
    return days


# ---------------------------------------------------------------- files


def write_private(path: Path, data: bytes) -> None:
    """Write a secret: created 0600 (never readable by others, not even for an instant), atomic;
    the folder made for it 0700 (and those made above it 0755)."""
    _make_dirs(path.parent, 0o700)
    _write_atomic(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (certificate, key, ACL, CRL): 0644 whatever the umask, atomic."""
    public_dir(path.parent)
    _write_atomic(path, data, 0o644)  # under a umask of 000 trust anchors were world-writable


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """``data`` to a temporary file created with ``mode`` (set again in case the umask or the
    filesystem changed it), synced, then renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:  # closes fd; write() writes every byte
            os.fchmod(fd, mode)
            f.write(data)
            f.flush()
            os.fsync(fd)
    except OSError as exc:  # a full disk: no .NAME.tmp left behind, and the error names the file
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # (write() and fsync() name none: "[Errno 28] No space left on device")
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # (`pki acl --out /tmp` left /.tmp.tmp behind)
        raise


def public_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if missing; a directory created here is 0755 whatever the umask."""
    _make_dirs(path, 0o755)
    return path


def _make_dirs(path: Path, mode: int) -> None:
    """``path`` with ``mode`` and the folders above it that are missing with 0755, whatever the
    umask (``mkdir(parents=True)`` gave those above the last the umask's mode: 0777 under umask
    000, where anyone could swap the folder below for their own)."""
    if path.is_dir():
        return
    missing = [p for p in path.parents if not p.exists()]
    for folder, want in [*((p, 0o755) for p in reversed(missing)), (path, mode)]:
        # Made one at a time with its own mode (the umask can only narrow it: never wider than
        # wanted, not even before the chmod), then set exactly.
        try:
            os.mkdir(folder, want)
        except FileExistsError:
            if folder is path and not folder.is_dir():
                raise
            continue  # made meanwhile by someone else: left as it is
        os.chmod(folder, want)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ---------------------------------------------------------------- the CA


@dataclass(frozen=True, slots=True)
class Identity:
    """One issued certificate, as recorded in ``identities.json``."""

    name: str
    role: str
    regions: tuple[str, ...]
    serial: int
    not_after: str
    trust: tuple[str, ...] = ()
    """Coordinators this identity trusts by name (empty: every coordinator of the PKI)."""

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "regions": list(self.regions), "serial": self.serial,
                "not_after": self.not_after, "trust": list(self.trust)}

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> Identity:
        return cls(name=name, role=str(d["role"]), regions=tuple(d.get("regions", ())), serial=int(d["serial"]),
                   not_after=str(d.get("not_after", "")), trust=tuple(d.get("trust", ())))


@dataclass
class Pki:
    """A PKI directory (see the module docstring). ``Pki.init(dir)`` creates one."""

    root: Path
    identities: dict[str, Identity] = field(default_factory=dict)
    revoked: list[dict[str, Any]] = field(default_factory=list)
    """Certificates that must stay refused: ``{serial, name, at, reason}`` (``revoked`` or
    ``superseded``); the CRL lists them all."""

    # -------------------------------------------------------- paths

    @property
    def ca_key_path(self) -> Path:
        return self.root / "ca.key"

    @property
    def ca_cert_path(self) -> Path:
        return self.root / "ca.crt"

    @property
    def acl_path(self) -> Path:
        return self.root / "mosquitto.acl"

    @property
    def crl_path(self) -> Path:
        return self.root / "ca.crl"

    @property
    def passwd_path(self) -> Path:
        return self.root / "mosquitto.passwd"

    @property
    def signing_dir(self) -> Path:
        return self.root / "signing"

    @property
    def operators_dir(self) -> Path:
        """Operators' Ed25519 command-signing public keys (``<operator>.pub``)."""
        return self.root / "operators"

    def bundle_dir(self, name: str) -> Path:
        return self.root / "bundles" / check_id(name, "identity")

    # -------------------------------------------------------- lifecycle

    @classmethod
    def init(cls, root: str | Path, *, common_name: str = "edgeci CA", days: int = CA_DAYS, force: bool = False) -> Pki:
        """Create the CA: an ECDSA P-256 key (0600) and a self-signed certificate."""
        path = Path(root)
        if (path / "ca.key").exists() and not force:
            raise ConfigError(f"{path} already holds a CA (ca.key); pass --force to replace it and re-issue everything")
        _make_dirs(path, 0o700)
        os.chmod(path, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeci"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(path / "ca.key", _key_pem(key))
        write_public(path / "ca.crt", _cert_pem(cert))
        pki = cls(path)
        pki._save_identities()
        pki.write_crl()
        return pki

    @classmethod
    def open(cls, root: str | Path) -> Pki:
        path = Path(root)
        if not (path / "ca.crt").exists():
            raise ConfigError(f"{path} is not an edgeci PKI (no ca.crt): run `edgeci pki init --dir {path}` first")
        pki = cls(path)
        index = path / "identities.json"
        if index.exists():
            data = json.loads(index.read_text())
            pki.identities = {n: Identity.from_json(n, d) for n, d in data.get("identities", {}).items()}
            pki.revoked = [dict(r) for r in data.get("revoked", [])]
        return pki

    def _save_identities(self) -> None:
        data = {"identities": {n: i.to_json() for n, i in sorted(self.identities.items())}, "revoked": self.revoked}
        write_public(self.root / "identities.json", (json.dumps(data, indent=1) + "\n").encode())

    def write_crl(self) -> Path:
        """(Re)write ``ca.crl``: every revoked or superseded serial, signed by the CA (whose
        key must be here). Valid until the CA expires: an expired CRL would make mosquitto
        refuse every client."""
        ca_key, ca_cert = self._ca_key(), self.ca_cert()
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - BACKDATE)
            .next_update(max(ca_cert.not_valid_after_utc, now + dt.timedelta(days=1)))
        )
        for entry in self.revoked:
            at = dt.datetime.fromisoformat(str(entry["at"]))
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(entry["serial"])).revocation_date(at).build())
        crl = builder.sign(ca_key, hashes.SHA256())
        write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_path

    def _revoke_serial(self, ident: Identity, reason: str) -> None:
        self.revoked.append({"serial": ident.serial, "name": ident.name, "role": ident.role, "reason": reason,
                             "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})

    def ca_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())

    def _ca_key(self) -> ec.EllipticCurvePrivateKey:
        if not self.ca_key_path.exists():
            raise ConfigError(f"the CA key {self.ca_key_path} is not here (kept offline?): run this where it is")
        key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{self.ca_key_path} is not an ECDSA key")
        return key

    # -------------------------------------------------------- issuing

    def signing_keys(self) -> dict[str, Path]:
        """``{coordinator id: its .pub}`` for every coordinator signing key known to the PKI."""
        if not self.signing_dir.is_dir():
            return {}
        return {p.stem: p for p in sorted(self.signing_dir.glob("*.pub"))}

    def issue(
        self,
        name: str,
        role: str,
        *,
        regions: Sequence[str] = (),
        trust: Sequence[str] = (),
        days: int = LEAF_DAYS,
        hosts: Sequence[str] = (),
        force: bool = False,
    ) -> Path:
        """Issue a certificate and write the identity's bundle; returns the bundle directory.

        ``regions``: the regions whose topics the identity may use (a device lists its
        failover regions too); default ``default`` (operators: every region).
        ``trust``: coordinator ids whose model-signing keys go into ``trusted/``
        (default: every coordinator key of the PKI). ``hosts``: extra DNS names or IP
        addresses for a broker's certificate (127.0.0.1 and localhost are always in).
        """
        check_id(name, "identity")
        if name in ("ca", "signing"):  # helper-115: coordinator "ca" got the CA's certificate as its own
            raise ConfigError(f"identity name {name!r} is reserved: its {name}.crt / {name}.key would collide with the "
                              "bundle's ca.crt or signing.key (e.g. coord-ca)")
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        previous = self.identities.get(name)
        if previous is not None and not force:
            raise ConfigError(f"{name!r} is already issued (as {self.identities[name].role}); pass --force to re-issue")
        if role == "broker" and (regions or trust):
            raise ConfigError("a broker certificate takes no --region or --trust")
        if hosts and role != "broker":
            raise ConfigError("--host is for broker certificates")
        if not regions:
            regions = (ANY_REGION,) if role in ("operator", "broker") else ("default",)
        for r in regions:
            if r != ANY_REGION or role not in ("operator", "broker"):  # only operators may span every region
                check_id(r, "region")
        for c in trust:
            check_id(c, "coordinator id")
        ca_key, ca_cert = self._ca_key(), self.ca_cert()
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeci"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
        if role != "broker" and regions != (ANY_REGION,):
            attrs.append(x509.NameAttribute(NameOID.LOCALITY_NAME, ",".join(regions)))
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
        now = dt.datetime.now(dt.UTC)
        not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
        eku = [ExtendedKeyUsageOID.SERVER_AUTH] if role == "broker" else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if role == "broker":
            san = _san(["localhost", "127.0.0.1", *hosts])
        else:  # RFC 5280 path validators want a SAN on client certificates too; mosquitto reads the CN
            san = [x509.UniformResourceIdentifier(f"urn:edgeci:{role}:{name}")]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())

        bundle = self.bundle_dir(name)
        if bundle.exists() and force:
            shutil.rmtree(bundle)
        _make_dirs(bundle, 0o700)
        os.chmod(bundle, 0o700)
        write_private(bundle / f"{name}.key", _key_pem(key))
        write_public(bundle / f"{name}.crt", _cert_pem(cert))
        write_public(bundle / "ca.crt", self.ca_cert_path.read_bytes())
        manifest: dict[str, Any] = {
            "identity": name, "role": role, "regions": list(regions),
            "region": regions[0] if regions[0] != ANY_REGION else None,
            "ca": "ca.crt", "cert": f"{name}.crt", "key": f"{name}.key",
        }
        if role in ("coordinator", "operator"):
            # coordinators sign models; operators sign control commands (rollback, pin)
            signer, _ = signing.load_or_create_signer(bundle / "signing.key")
            pub_dir = self.signing_dir if role == "coordinator" else self.operators_dir
            write_public(pub_dir / f"{name}.pub", signing.public_pem(signer.public_raw))
            manifest["signing_key"] = "signing.key"
            manifest["signing_key_id"] = signer.kid
        identity = Identity(name=name, role=role, regions=tuple(regions), serial=cert.serial_number,
                            not_after=not_after.isoformat(timespec="seconds"), trust=tuple(trust))
        self.identities[name] = identity
        if previous is not None:  # the old certificate (maybe a stolen copy) must not ride on the name
            self._revoke_serial(previous, "superseded")
        self._save_identities()
        if previous is not None:
            self.write_crl()
        if role != "broker":
            manifest["trusted"] = "trusted"
            self._write_trusted(identity)
        write_public(bundle / "bundle.json", (json.dumps(manifest, indent=1) + "\n").encode())
        self.write_acl()
        return bundle

    def _write_trusted(self, identity: Identity) -> list[str]:
        """(Re)write ``trusted/`` of one bundle from the PKI's signing keys."""
        keys = self.signing_keys()
        names = list(identity.trust) if identity.trust else list(keys)
        missing = [n for n in names if n not in keys]
        if missing:
            raise ConfigError(f"--trust names coordinators with no signing key in this PKI: {', '.join(missing)} "
                              f"(issue them first: edgeci pki issue --role coordinator ID)")
        trusted = self.bundle_dir(identity.name) / "trusted"
        if trusted.exists():
            shutil.rmtree(trusted)
        public_dir(trusted)
        for n in names:
            write_public(trusted / f"{n}.pub", keys[n].read_bytes())
        if identity.role == "coordinator":  # the operators whose signed commands it obeys
            operators = self.bundle_dir(identity.name) / "operators"
            if operators.exists():
                shutil.rmtree(operators)
            public_dir(operators)
            for pub in sorted(self.operators_dir.glob("*.pub")) if self.operators_dir.is_dir() else []:
                write_public(operators / pub.name, pub.read_bytes())
        return names

    def refresh_trust(self) -> dict[str, list[str]]:
        """Rewrite every bundle's ``trusted/`` (after issuing a new coordinator)."""
        out = {}
        for ident in self.identities.values():
            if ident.role != "broker" and self.bundle_dir(ident.name).is_dir():
                out[ident.name] = self._write_trusted(ident)
        return out

    def revoke(self, name: str) -> bool:
        """Put ``name``'s certificate on the CRL and take the name out of the ACL (and the
        password file): once the broker is reloaded (SIGHUP) the certificate no longer
        completes a TLS handshake, and the name may read and write nothing. The bundle is
        deleted; a coordinator's model-signing key leaves ``signing/`` and an operator's
        command-signing key ``operators/`` (run ``refresh_trust`` and redistribute the
        coordinators' and devices' bundles). Returns False when the CRL could not be written
        here (the CA key is kept elsewhere: run ``edgeci pki crl`` where it is)."""
        ident = self.identities.pop(check_id(name, "identity"), None)
        if ident is None:
            raise ConfigError(f"{name!r} is not issued")
        self._revoke_serial(ident, "revoked")
        self._save_identities()
        self.write_acl()
        if self.passwd_path.exists():
            kept = [ln for ln in self.passwd_path.read_text().splitlines() if ln and ln.split(":", 1)[0] != name]
            write_private(self.passwd_path, ("\n".join(kept) + "\n").encode() if kept else b"")
        (self.signing_dir / f"{name}.pub").unlink(missing_ok=True)
        (self.operators_dir / f"{name}.pub").unlink(missing_ok=True)  # its signed commands must stop too
        if self.bundle_dir(name).exists():
            shutil.rmtree(self.bundle_dir(name))
        if not self.ca_key_path.exists():
            return False
        self.write_crl()
        return True

    # -------------------------------------------------------- broker files

    def write_acl(self, path: str | Path | None = None) -> Path:
        target = Path(path) if path is not None else self.acl_path
        write_public(target, acl_text(self.identities.values()).encode())
        return target

    def set_password(self, name: str, password: str | None = None) -> str:
        """Give ``name`` a password (random when None): its hash goes into ``mosquitto.passwd``
        (mosquitto's PBKDF2-SHA512 format), the clear text into the bundle's ``password`` (0600)."""
        if name not in self.identities:
            raise ConfigError(f"{name!r} is not issued: edgeci pki issue first")
        password = password or secrets.token_urlsafe(24)
        lines = []
        if self.passwd_path.exists():
            lines = [ln for ln in self.passwd_path.read_text().splitlines() if ln and ln.split(":", 1)[0] != name]
        lines.append(f"{name}:{mosquitto_hash(password)}")
        write_private(self.passwd_path, ("\n".join(lines) + "\n").encode())
        write_private(self.bundle_dir(name) / "password", password.encode())
        manifest_path = self.bundle_dir(name) / "bundle.json"
        manifest = json.loads(manifest_path.read_text())
        manifest.update(username=name, password_file="password")
        write_public(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())
        return password


def _san(hosts: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def mosquitto_hash(password: str, *, iterations: int = 101, salt: bytes | None = None) -> str:
    """A mosquitto 2 password-file hash (``$7$``: PBKDF2-HMAC-SHA512, 12-byte salt),
    the format ``mosquitto_passwd`` writes."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


# ---------------------------------------------------------------- the ACL


def acl_rules(ident: Identity) -> list[tuple[str, str]]:
    """``[(access, topic)]`` for one identity (mosquitto ``topic`` lines). Devices write only
    their own upstream leaves and read only their own downstream leaves, their regions'
    recall and, with a fallback region, their regions' status; coordinators serve their regions' devices (and announce recalls to
    them) and talk to peers; operators write the control topic and read status."""
    rules: list[tuple[str, str]] = []
    n = ident.name
    for r in ident.regions:
        base = f"{ROOT}/{r}"
        if ident.role == "device":
            rules += [("write", f"{base}/dev/{n}/{leaf}") for leaf in ("pull", "update", "presence")]
            rules += [("read", f"{base}/dev/{n}/{leaf}") for leaf in ("model", "ack", "invite")]
            # The status (it names recently seen devices) only to a device with a fallback region,
            # the one that reads it (failover); every device follows its regions' recall.
            rules += [("read", f"{base}/status")] if len(ident.regions) > 1 else []
            rules += [("read", f"{base}/recall")]
        elif ident.role == "coordinator":
            rules += [("write", f"{base}/dev/+/{leaf}") for leaf in ("model", "ack", "invite")]
            rules += [("read", f"{base}/dev/+/{leaf}") for leaf in ("pull", "update", "presence")]
            # recall: readwrite, so a coordinator starting on a new state dir can see which numbering
            # the region's devices follow (its own key's, another state dir: refused without --take-over)
            rules += [("readwrite", f"{base}/status"), ("read", f"{base}/control"), ("readwrite", f"{base}/recall")]
        elif ident.role == "operator":
            rules += [("write", f"{base}/control"), ("read", f"{base}/status")]
    if ident.role == "coordinator":
        # It writes to any peer, and reads only what is addressed to it or to all (what it subscribes
        # to): with readwrite on peer/# one coordinator read every other's peer traffic.
        rules += [("write", f"{ROOT}/peer/#"), ("read", f"{ROOT}/peer/{n}/#"), ("read", f"{ROOT}/peer/{BROADCAST}/#")]
    return rules


def acl_text(identities: Iterable[Identity]) -> str:
    """The mosquitto ``acl_file``: one ``user`` section per identity; whatever is not
    granted is denied (including ``$SYS``). Usernames are certificate CNs
    (``use_identity_as_username``) or password-file usernames — the same names."""
    lines = [
        "# mosquitto ACL generated by `edgeci pki acl` from identities.json — do not edit by hand:",
        "# re-run `edgeci pki acl --dir PKI --out FILE` (or `pki issue`, which rewrites PKI/mosquitto.acl)",
        "# and send mosquitto SIGHUP to reload it. Anything not granted here is denied.",
        "",
    ]
    for ident in sorted(identities, key=lambda i: (i.role, i.name)):
        rules = acl_rules(ident)
        if not rules:
            continue
        lines.append(f"# {ident.role} {ident.name} (regions {', '.join(ident.regions)})")
        lines.append(f"user {ident.name}")
        lines += [f"topic {access} {topic}" for access, topic in rules]
        lines.append("")
    return "\n".join(lines)


def broker_files(pki: Pki, broker_name: str, dest: Path, *, password: bool = False,
                 user: str | None = None) -> dict[str, Path]:
    """Copy what the broker reads into ``dest`` (the folder that goes to the broker's host with
    its config): CA certificate, its certificate and key, the ACL and the CRL (or the password
    hashes). Public files 0644, secrets 0600, the folder 0755. ``user``: the account mosquitto
    runs as once started as root (it drops privileges *before* reading these files): the
    secrets are chowned to it, which only root can do. Running again refreshes the copies
    (after ``pki issue`` / ``revoke``)."""
    bundle = pki.bundle_dir(broker_name)
    if not (bundle / f"{broker_name}.crt").exists():
        raise ConfigError(f"no broker certificate {broker_name!r}: edgeci pki issue --dir {pki.root} --role broker {broker_name}")
    account = None
    if user:
        import pwd

        try:
            account = pwd.getpwnam(user)
        except KeyError:
            raise ConfigError(f"--user {user}: no such account on this machine") from None
        if os.geteuid() != 0 and account.pw_uid != os.geteuid():
            raise ConfigError(f"--user {user}: only root can hand the broker's key to another account")
    if not password and not pki.crl_path.exists():  # a PKI made before CRLs
        pki.write_crl()
    sources = {"cafile": (pki.ca_cert_path, False), "certfile": (bundle / f"{broker_name}.crt", False),
               "keyfile": (bundle / f"{broker_name}.key", True), "acl_file": (pki.acl_path, False)}
    if password:
        sources["password_file"] = (pki.passwd_path, True)
    else:
        sources["crlfile"] = (pki.crl_path, False)
    for key, (source, _) in sources.items():  # all of them, before anything is copied
        if not source.is_file():
            raise ConfigError(f"{source} is missing ({'edgeci pki passwd' if key == 'password_file' else 'edgeci pki issue'} writes it)")
    public_dir(dest)
    os.chmod(dest, 0o755)
    return copy_for_broker(sources, dest, account)


def copy_for_broker(sources: Mapping[str, tuple[Path, bool]], dest: Path, account: Any | None) -> dict[str, Path]:
    """``{key: (file, secret)}`` copied into the existing folder ``dest`` under their own names:
    public files 0644, secrets 0600 and, given ``account`` (a ``pwd`` entry), chowned to it.
    Returns ``{key: the copy's absolute path}``. Also how :class:`coordinator.broker.MosquittoProcess`
    hands a root-started mosquitto files it can read."""
    names = [source.name for source, _ in sources.values()]
    if len(set(names)) != len(names):
        raise ConfigError(f"the broker's files need distinct names to be copied side by side, got {names}")
    out = {}
    for key, (source, secret) in sources.items():
        copy = dest / source.name
        (write_private if secret else write_public)(copy, source.read_bytes())
        if secret and account is not None:
            os.chown(copy, account.pw_uid, account.pw_gid)
        out[key] = copy.resolve()
    return out


def mosquitto_account() -> Any | None:
    """Started as root, Debian's mosquitto drops to the ``mosquitto`` account: its ``pwd``
    entry then (None when not root, or without that account)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        return pwd.getpwnam("mosquitto")
    except KeyError:
        return None


# ---------------------------------------------------------------- CLI

_STEPS = """\
operator's steps (keep PKI/ca.key offline; copy only bundles/<ID>/ to each host):
  1. edgeci pki init   --dir PKI
  2. edgeci pki issue  --dir PKI --role broker broker --host mqtt.example.net
  3. edgeci pki issue  --dir PKI --role operator ops-1                       (operators, then coordinators:
     edgeci pki issue  --dir PKI --role coordinator coord-eu --region eu      a coordinator obeys the operators
                                                                              issued before it, devices trust
                                                                              the coordinators issued before them)
  4. edgeci pki issue  --dir PKI --role device headset-7 --region eu         (one per device)
  5. edgeci pki broker-conf --dir PKI --out /etc/mosquitto/conf.d/edgeci.conf   (the config, and its files
     in edgeci-files/ beside it: CA and broker certificates, broker key, ACL, CRL), then mosquitto -c it
  6. edgeci coordinator --broker mqtts://mqtt.example.net:8883 --bundle PKI/bundles/coord-eu ...
     edgeci device      --broker mqtts://mqtt.example.net:8883 --bundle PKI/bundles/headset-7 ...
Issuing a new coordinator or operator later: `edgeci pki trust --dir PKI` rewrites every bundle's
trusted/ (and coordinators' operators/) keys; re-copy the bundles. A new identity: `pki issue`
rewrites PKI/mosquitto.acl; run broker-conf again, SIGHUP mosquitto. A lost or compromised identity: `edgeci pki
revoke --dir PKI ID` (its certificate goes on PKI/ca.crl, its name out of the ACL), broker-conf, then RESTART
mosquitto (a SIGHUP refuses the certificate's next connection, but leaves open one it holds); issuing the same ID
again later is safe (the old certificate stays on the CRL), as is `--force`, each followed by a restart too.
Every connection of one identity replaces its previous one (mosquitto uses the name as client id):
run `edgeci status` / `rollback` with an operator's bundle, never a coordinator's or a device's.
"""


_RESTART = ("restart mosquitto (not only SIGHUP: a reload refuses the certificate's next connection, but a connection "
            "it already holds stays open, and publishes again once the name is issued again)")
"""What `pki revoke`, `crl` and the re-issue of a name tell the operator to do to the broker."""


def _dir_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, required=True, help="the PKI folder made by `edgeci pki init`")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _STEPS
    sub = p.add_subparsers(dest="pki_command", metavar="ACTION", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    s = sub.add_parser("init", help="create the CA (ECDSA P-256 key, 0600, and a self-signed certificate)",
                       description="Create the CA in --dir: ca.key (0600; keep it offline) and ca.crt "
                                   "(goes into every bundle and the broker's cafile).", epilog=_STEPS, formatter_class=fmt)
    s.add_argument("--dir", type=Path, required=True, help="PKI directory (created 0700)")
    s.add_argument("--days", type=_days, default=CA_DAYS, help="CA validity in days (default: %(default)s)")
    s.add_argument("--name", default="edgeci CA", help="the CA's common name (default: %(default)s)")
    s.add_argument("--force", action="store_true", help="replace an existing CA (every bundle must then be re-issued)")

    s = sub.add_parser("issue", help="issue a certificate and write the identity's bundle",
                       description="Issue a certificate (CN = ID, OU = role, L = regions) and write PKI/bundles/ID/: "
                                   "ca.crt, ID.crt, ID.key (0600), bundle.json and trusted/<coordinator>.pub. "
                                   "A coordinator also gets its Ed25519 model-signing key (signing.key, 0600) and "
                                   "PKI/signing/ID.pub, so bundles issued after it trust it. A broker gets a server "
                                   "certificate for 127.0.0.1, localhost and --host. Rewrites PKI/mosquitto.acl.",
                       epilog=_STEPS, formatter_class=fmt)
    s.add_argument("identity", metavar="ID", help="device / coordinator / operator id (the MQTT username), or the broker's name")
    _dir_argument(s)
    s.add_argument("--role", choices=ROLES, required=True,
                   help="broker: server certificate; coordinator: + model-signing key; operator: + command-signing "
                        "key (rollback / pin); device: one per device, confined to its own topics")
    s.add_argument("--region", default="", help="comma-separated regions whose topics it may use (a device: its own "
                                                "first, then failover regions). Default: 'default'; operators: all")
    s.add_argument("--trust", default="", help="comma-separated coordinator ids to trust (default: every coordinator of the PKI)")
    s.add_argument("--host", action="append", default=[], help="broker: extra DNS name or IP in the certificate (repeatable)")
    s.add_argument("--days", type=_days, default=LEAF_DAYS, help="certificate validity in days (default: %(default)s)")
    s.add_argument("--force", action="store_true", help="re-issue an existing identity (new key; the old bundle is replaced "
                                                        "and the old certificate goes on the CRL: restart mosquitto, which "
                                                        "closes a connection the old certificate holds)")

    s = sub.add_parser("acl", help="write the mosquitto ACL file for every issued identity",
                       description="Generate the mosquitto acl_file from PKI/identities.json: devices write only their "
                                   "own pull/update/presence and read their own model/ack/invite, their regions' recall "
                                   "and, with a fallback region (failover), their regions' status; coordinators serve their region, write peer/# and read the peer messages for them "
                                   "and for all; operators write control.",
                       formatter_class=fmt)
    _dir_argument(s)
    s.add_argument("--out", type=Path, help="output file (default: PKI/mosquitto.acl)")

    s = sub.add_parser("passwd", help="username/password alternative: give an identity a password",
                       description="For brokers without client certificates (edgeci-password.conf): a random password "
                                   "goes into PKI/bundles/ID/password (0600) and its hash into PKI/mosquitto.passwd "
                                   "(mosquitto's format; `mosquitto_passwd -b FILE ID PASSWORD` writes the same). The "
                                   "ACL is the same, keyed by username. Clients: --bundle, or --username and "
                                   "--password-file (or EDGECI_PASSWORD); never a password on the command line.",
                       formatter_class=fmt)
    s.add_argument("identity", metavar="ID", help="the issued identity to give a password")
    _dir_argument(s)

    s = sub.add_parser("revoke", help="put an identity's certificate on the CRL and take it out of the ACL (then restart mosquitto)",
                       description="Put ID's certificate on PKI/ca.crl, remove ID from identities.json, the generated ACL "
                                   "and the password file, and delete its bundle: after a restart of mosquitto its "
                                   "certificate no longer completes a TLS handshake, and its name may read and write "
                                   "nothing (also if the name is issued again later). A reload (SIGHUP) is not enough: "
                                   "mosquitto checks the CRL at the handshake only, and a connection the certificate "
                                   "already holds publishes again once the name is issued again. A revoked coordinator's model-signing "
                                   "key leaves signing/ and an operator's command-signing key operators/: run `edgeci pki "
                                   "trust` and redistribute the bundles. The CRL needs the CA key: without it here, run "
                                   "`edgeci pki crl` where it is.", formatter_class=fmt)
    s.add_argument("identity", metavar="ID", help="the issued identity to revoke")
    _dir_argument(s)

    s = sub.add_parser("crl", help="rewrite PKI/ca.crl from the revoked certificates (needs the CA key)",
                       description="Sign PKI/ca.crl again from identities.json's revoked and superseded certificates "
                                   "(after a revocation made without the CA key at hand, or for a PKI made before CRLs); "
                                   "copy it to the broker's crlfile and restart mosquitto (a SIGHUP leaves open the connections "
                                   "a revoked certificate already holds).", formatter_class=fmt)
    _dir_argument(s)

    s = sub.add_parser("trust", help="rewrite every bundle's trusted/ keys (after issuing a new coordinator)",
                       description="Rewrite every bundle's trusted/ (the coordinators' model-signing keys it "
                                   "trusts: every coordinator of the PKI, or the issue's --trust list) and each "
                                   "coordinator bundle's operators/ (the operators whose rollback / pin it obeys). "
                                   "Run it after issuing a coordinator or an operator (`pki issue` says when), "
                                   "then copy the bundles to their hosts again.", formatter_class=fmt)
    _dir_argument(s)

    s = sub.add_parser("broker-conf", help="write a ready mosquitto config (TLS + ACL) and the files it reads",
                       description="edgeci-secure.conf (or edgeci-password.conf with --password) with the listener and "
                                   "max_packet_size set, and beside it a folder STEM-files/ (edgeci-files/ for edgeci.conf) with copies of what the broker "
                                   "reads (CA certificate, the broker's certificate and key, the ACL, the CRL or the "
                                   "password hashes): copy both to the broker's host, the rest of PKI/ stays with the "
                                   "operator. After `pki issue` / `revoke` run broker-conf again (it refreshes the copies) "
                                   "and SIGHUP mosquitto.", formatter_class=fmt)
    _dir_argument(s)
    s.add_argument("--broker-name", default="broker", help="the broker identity issued with --role broker (default: %(default)s)")
    # (99999 was written into the config, and mosquitto then would not start)
    s.add_argument("--port", type=bounded(int, 1, below=65536, rule="must be a port 1-65535"), default=8883,
                   help="the TLS listener's port (default: 8883)")
    s.add_argument("--bind", default="0.0.0.0", help="the listener's address (default: 0.0.0.0, every interface: TLS with "
                   "client certificates; 127.0.0.1 for a broker only this host reaches)")
    s.add_argument("--model-bytes", type=bounded(int, 0), default=0, help="largest model's float32 bytes: max_packet_size = this + headroom "
                   "(0: paho's 256 MiB limit, which lets any device certificate send the broker and the coordinator 256 MiB messages)")
    s.add_argument("--password", action="store_true", help="username/password variant (server certificate only)")
    s.add_argument("--user", default=None, help="account mosquitto runs as (started as root, it reads its files only "
                   "after dropping to it): the key and password copies are chowned to it. Default: 'mosquitto' when "
                   "run as root and that account exists; '' for none")
    s.add_argument("--out", type=Path, required=True, help="the config file to write (its files go to STEM-files/ beside it: edgeci-files/ for edgeci.conf)")


def run(args: argparse.Namespace) -> int:
    """One `edgeci pki` action; a file or folder it cannot write is one line, not a traceback
    (`pki init --dir FILE`, `pki acl --out /tmp` ended in a FileExistsError / IsADirectoryError)."""
    try:
        return _run(args)
    except OSError as exc:
        where = exc.filename2 if exc.filename2 is not None else exc.filename
        why = "exists and is not a folder" if isinstance(exc, FileExistsError) else exc.strerror or str(exc)
        raise ConfigError(f"{where}: {why}" if where is not None else str(exc)) from exc


def _create_folder(path: Path, flag: str) -> None:
    """Make ``path`` (0700) for ``flag``: one that cannot be made is a ConfigError naming the
    flag, the folder and why (`pki init --dir /proc/x` said only "/proc/x: No such file or
    directory"). A file in its place is left to :func:`run` ("exists and is not a folder")."""
    try:
        _make_dirs(path, 0o700)
    except FileExistsError:
        raise
    except OSError as exc:
        blocker = next((p for p in path.parents if p.exists()), None)
        why = (f"{blocker} is not a folder" if blocker is not None and not blocker.is_dir()
               else f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""))
        raise ConfigError(f"{flag} {path}: cannot create the folder: {why}") from exc


def _run(args: argparse.Namespace) -> int:
    cmd = args.pki_command
    if cmd == "init":
        _create_folder(args.dir, "--dir")
        Pki.init(args.dir, common_name=args.name, days=args.days, force=args.force)
        print(f"CA created: {args.dir / 'ca.crt'} (key {args.dir / 'ca.key'}, 0600: keep it offline)")
        return 0
    pki = Pki.open(args.dir)
    if cmd == "issue":
        regions = [r.strip() for r in args.region.split(",") if r.strip()]
        trust = [c.strip() for c in args.trust.split(",") if c.strip()]
        had_one = args.identity in pki.identities or any(r.get("name") == args.identity for r in pki.revoked)
        bundle = pki.issue(args.identity, args.role, regions=regions, trust=trust, days=args.days,
                           hosts=args.host, force=args.force)
        print(f"{args.role} {args.identity}: bundle {bundle} (ACL rewritten: {pki.acl_path}; a running broker needs "
              "`edgeci pki broker-conf` again and a SIGHUP)")
        if had_one:  # the name is back in the ACL: a connection its old certificate still holds may publish again
            print(f"the previous certificate of {args.identity} is on {pki.crl_path}: {_RESTART}")
        if args.role == "coordinator":
            stale = [n for n, i in pki.identities.items() if i.role not in ("broker", "coordinator") and n != args.identity]
            if stale:
                print(f"note: {len(stale)} earlier bundle{'s do' if len(stale) != 1 else ' does'} not trust {args.identity} yet: run `edgeci pki trust --dir {args.dir}`")
        if args.role == "operator":
            stale = [n for n, i in pki.identities.items() if i.role == "coordinator"]
            if stale:
                print(f"note: {len(stale)} coordinator{'s do' if len(stale) != 1 else ' does'} not obey {args.identity} yet: run `edgeci pki trust --dir {args.dir}` "
                      "and re-copy their bundles")
    elif cmd == "acl":
        print(f"ACL written: {pki.write_acl(args.out)}")
    elif cmd == "passwd":
        pki.set_password(args.identity)
        print(f"password of {args.identity}: {pki.bundle_dir(args.identity) / 'password'} (0600); hash in {pki.passwd_path}")
    elif cmd == "revoke":
        role = pki.identities[args.identity].role if args.identity in pki.identities else ""
        if pki.revoke(args.identity):
            print(f"{args.identity} revoked: certificate on {pki.crl_path}, ACL {pki.acl_path} rewritten; "
                  f"refresh the broker's copies (`edgeci pki broker-conf` again), then {_RESTART}")
        else:
            print(f"{args.identity} revoked from the ACL {pki.acl_path}, but {pki.crl_path} was NOT updated (no CA key "
                  f"here): run `edgeci pki crl` where ca.key is, copy ca.crl to the broker, then {_RESTART}")
        if role in ("coordinator", "operator"):
            print(f"its signing key is no longer trusted by new bundles: run `edgeci pki trust --dir {args.dir}` "
                  "and re-copy the bundles")
    elif cmd == "crl":
        print(f"CRL written: {pki.write_crl()} ({len(pki.revoked)} certificates); {_RESTART}")
    elif cmd == "trust":
        for name, keys in pki.refresh_trust().items():
            print(f"{name}: trusts {', '.join(keys) or '(no coordinator keys yet)'}")
    elif cmd == "broker-conf":
        from coordinator.broker import PAHO_MAX_PAYLOAD, secure_conf

        default = mosquitto_account()
        user = (default.pw_name if default is not None else None) if args.user is None else (args.user or None)
        files = broker_files(pki, args.broker_name, args.out.parent / f"{args.out.stem}-files", password=args.password, user=user)
        text = secure_conf(port=args.port, host=args.bind, model_bytes=args.model_bytes, **files)
        write_public(args.out, text.encode())
        print(f"mosquitto config written: {args.out}, its files in {files['cafile'].parent}"
              f"{f' (key readable by {user})' if user else ''}; after `pki issue`, run this again and SIGHUP mosquitto; "
              "after `pki revoke` (or issuing a name again), run this again and restart mosquitto")
        if not args.model_bytes:
            # helper-159: with paho's limit one device certificate sent 5 messages of 200 MiB on its own update
            # topic: mosquitto peaked at 610 MB, the coordinator 620 MB above its resting size, and an honest
            # device's update took 48 s instead of 8 to be accepted (the coordinator refused each: too_large).
            print(f"note: no --model-bytes: max_packet_size is {(PAHO_MAX_PAYLOAD + 1) >> 20} MiB, so any device certificate may send "
                  "messages that large for the broker and the coordinator to hold; pass --model-bytes (the largest "
                  "model's float32 bytes, 4 x its parameter count) to refuse anything larger than a model")
    return 0
