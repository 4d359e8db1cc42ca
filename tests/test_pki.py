"""``edgeci pki``: key modes, certificate contents and chains, bundles, the generated ACL,
the broker configs, and the SDK's credential plumbing (no broker needed)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from coordinator.broker import (
    PAHO_MAX_PAYLOAD,
    PASSWORD_CONF,
    SECURE_CONF,
    inflight_limit,
    packet_limit,
    queue_limit,
    secure_conf,
)
from coordinator.pki import Pki, acl_text, mosquitto_hash, write_private
from demos.cli import main as edgeci
from edge_sdk.errors import ConfigError
from edge_sdk.mqtt import BrokerAuth, MqttTransport, auth_from_args, parse_broker_url
from edge_sdk.signing import key_id, load_public_key, load_signer, load_trusted_keys


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.init(tmp_path / "pki")


def test_ca_key_is_private_and_ca_is_a_p256_ca(pki: Pki) -> None:
    assert mode(pki.ca_key_path) == 0o600
    assert mode(pki.root) == 0o700
    ca = pki.ca_cert()
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    with pytest.raises(ConfigError, match="already holds a CA"):
        Pki.init(pki.root)


def test_private_keys_are_0600_even_with_an_open_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_private(tmp_path / "k" / "secret.key", b"x")
        p = Pki.init(tmp_path / "pki")
        bundle = p.issue("coord-1", "coordinator")
    finally:
        os.umask(old)
    assert mode(tmp_path / "k" / "secret.key") == 0o600
    assert mode(p.ca_key_path) == 0o600
    assert mode(bundle / "coord-1.key") == 0o600
    assert mode(bundle / "signing.key") == 0o600
    assert mode(bundle) == 0o700
    assert not list(bundle.glob(".*.tmp"))
    # public files (trust anchors, the ACL, the CRL) are not world-writable either: under umask 000
    # they were 0666, and anyone on the host could swap the devices' trusted keys or the ACL
    for public in (p.ca_cert_path, p.crl_path, p.root / "identities.json", p.acl_path, bundle / "ca.crt",
                   bundle / "coord-1.crt", p.signing_dir / "coord-1.pub"):
        assert mode(public) == 0o644, public
    for folder in (p.signing_dir, bundle / "trusted", bundle / "operators"):
        assert mode(folder) == 0o755, folder


def test_device_certificate_names_role_region_and_chains_to_the_ca(pki: Pki) -> None:
    bundle = pki.issue("headset-7", "device", regions=["eu", "us"])
    assert sorted(p.name for p in bundle.iterdir()) == ["bundle.json", "ca.crt", "headset-7.crt", "headset-7.key", "trusted"]
    assert mode(bundle / "headset-7.key") == 0o600
    c = cert(bundle / "headset-7.crt")
    assert c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "headset-7"
    assert c.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "device"
    assert c.subject.get_attributes_for_oid(NameOID.LOCALITY_NAME)[0].value == "eu,us"
    assert list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (bundle / "ca.crt").read_bytes() == pki.ca_cert_path.read_bytes()
    # a real path validation, as a TLS server would do it for a client certificate
    store = Store([pki.ca_cert()])
    verified = PolicyBuilder().store(store).build_client_verifier().verify(c, [])
    assert verified.chain[-1] == pki.ca_cert()
    assert x509.UniformResourceIdentifier("urn:edgeci:device:headset-7") in (verified.subjects or [])
    # ...and a client certificate is no server certificate
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("localhost")).verify(c, [])
    # another CA's certificate does not chain to ours
    other = Pki.init(pki.root.parent / "other")
    stranger = cert(other.issue("headset-7", "device") / "headset-7.crt")
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_client_verifier().verify(stranger, [])


def test_broker_certificate_serves_loopback_and_extra_hosts(pki: Pki) -> None:
    bundle = pki.issue("broker", "broker", hosts=["mqtt.example.net", "10.0.0.5"])
    c = cert(bundle / "broker.crt")
    assert list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    store = Store([pki.ca_cert()])
    import ipaddress

    for name in (x509.DNSName("localhost"), x509.DNSName("mqtt.example.net"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        PolicyBuilder().store(store).build_server_verifier(name).verify(c, [])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("evil.example.net")).verify(c, [])
    assert "broker" not in acl_text(pki.identities.values())  # a server identity gets no topics
    with pytest.raises(ConfigError):
        pki.issue("dev", "device", hosts=["x"])


def test_coordinator_signing_key_is_trusted_by_later_bundles(pki: Pki) -> None:
    coord = pki.issue("coord-eu", "coordinator", regions=["eu"])
    signer = load_signer(coord / "signing.key")
    assert load_public_key(pki.signing_dir / "coord-eu.pub") == signer.public_raw
    pki.issue("coord-us", "coordinator", regions=["us"])
    dev = pki.issue("headset-7", "device", regions=["eu"])
    trusted = load_trusted_keys(dev / "trusted")
    assert signer.kid in trusted and len(trusted) == 2
    only = pki.issue("cam-1", "device", regions=["eu"], trust=["coord-eu"])
    assert load_trusted_keys(only / "trusted") == {signer.kid: signer.public_raw}
    with pytest.raises(ConfigError, match="no signing key"):
        pki.issue("cam-2", "device", trust=["coord-ap"])
    # a coordinator issued later reaches earlier bundles through `pki trust`
    late = load_signer(pki.issue("coord-ap", "coordinator", regions=["ap"]) / "signing.key")
    assert late.kid not in load_trusted_keys(dev / "trusted")
    pki.refresh_trust()
    assert late.kid in load_trusted_keys(dev / "trusted")
    assert load_trusted_keys(only / "trusted") == {signer.kid: signer.public_raw}  # its --trust is kept
    assert key_id(late.public_raw) == late.kid


def test_identities_cannot_smuggle_wildcards_or_lines_into_the_acl(pki: Pki) -> None:
    for bad in ("dev/+", "#", "a b", "dev\nuser coord", "", "x" * 65):
        with pytest.raises(ConfigError):
            pki.issue(bad, "device")
    for bad_region in ("+", "eu/#", "eu\ntopic readwrite #"):
        with pytest.raises(ConfigError):
            pki.issue("dev-1", "device", regions=[bad_region])
    pki.issue("dev-1", "device")
    with pytest.raises(ConfigError, match="already issued"):
        pki.issue("dev-1", "coordinator")
    with pytest.raises(ConfigError, match="role"):
        pki.issue("dev-2", "admin")


def acl_sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    user = None
    for line in text.splitlines():
        if line.startswith("user "):
            user = line.split()[1]
            sections[user] = []
        elif line.startswith("topic "):
            assert user is not None, "a topic line outside a user section would apply to everyone"
            sections[user].append(line)
    return sections


def test_an_identity_named_after_a_bundle_file_is_refused_before_anything_is_written(pki: Pki) -> None:
    """helper-115: coordinator "ca" (a region's id) got a bundle whose ca.crt, its certificate,
    was overwritten by the CA's: `edgeci coordinator --bundle` then failed with KEY_VALUES_MISMATCH.
    Coordinator "signing" wrote its TLS key as signing.key and failed half-issued."""
    for name, role in (("ca", "coordinator"), ("ca", "device"), ("signing", "coordinator"), ("signing", "device")):
        with pytest.raises(ConfigError, match="reserved"):
            pki.issue(name, role, regions=["eu"])
        assert name not in pki.identities and not pki.bundle_dir(name).exists()
    bundle = pki.issue("coord-ca", "coordinator", regions=["ca"])
    ssl.create_default_context(cafile=str(bundle / "ca.crt")).load_cert_chain(bundle / "coord-ca.crt", bundle / "coord-ca.key")


def test_acl_confines_each_identity(pki: Pki) -> None:
    pki.issue("coord-eu", "coordinator", regions=["eu"])
    pki.issue("devA", "device", regions=["eu"])
    pki.issue("devB", "device", regions=["eu", "us"])
    pki.issue("ops", "operator")
    text = pki.acl_path.read_text()
    assert text == acl_text(pki.identities.values())
    s = acl_sections(text)
    assert s["devA"] == [
        "topic write edgeci/v1/eu/dev/devA/pull",
        "topic write edgeci/v1/eu/dev/devA/update",
        "topic write edgeci/v1/eu/dev/devA/presence",
        "topic read edgeci/v1/eu/dev/devA/model",
        "topic read edgeci/v1/eu/dev/devA/ack",
        "topic read edgeci/v1/eu/dev/devA/invite",
        "topic read edgeci/v1/eu/recall",
    ]  # no status: it names the region's recently seen devices, and only failover reads it (helper-100)
    assert {line.split()[2].split("/")[2] for line in s["devB"]} == {"eu", "us"}  # failover region too
    assert "topic read edgeci/v1/eu/status" in s["devB"] and "topic read edgeci/v1/us/status" in s["devB"]
    assert all("/dev/devB/" in line or line.endswith(("/status", "/recall")) for line in s["devB"])
    coord = s["coord-eu"]
    for leaf in ("model", "ack", "invite"):
        assert f"topic write edgeci/v1/eu/dev/+/{leaf}" in coord
    for leaf in ("pull", "update", "presence"):
        assert f"topic read edgeci/v1/eu/dev/+/{leaf}" in coord
    assert "topic write edgeci/v1/peer/#" in coord and "topic read edgeci/v1/eu/control" in coord
    # peer messages: only those for it and for all (it used to read every other coordinator's)
    assert [line for line in coord if "/peer/" in line and " read" in line] == [
        "topic read edgeci/v1/peer/coord-eu/#", "topic read edgeci/v1/peer/all/#"]
    assert "topic readwrite edgeci/v1/eu/recall" in coord
    assert not any("/us/" in line for line in coord)
    assert s["ops"] == ["topic write edgeci/v1/+/control", "topic read edgeci/v1/+/status"]
    # nothing grants '#' at the root, $SYS, or another device's subtree to a device
    assert not any(line.endswith(" #") or "$SYS" in line for lines in s.values() for line in lines)
    out = pki.root / "elsewhere.acl"
    assert pki.write_acl(out).read_text() == text


def test_revoke_takes_an_identity_out_of_acl_password_file_and_trust(pki: Pki) -> None:
    pki.issue("coord-eu", "coordinator", regions=["eu"])
    pki.issue("devA", "device", regions=["eu"])
    pki.issue("devB", "device", regions=["eu"])
    pki.set_password("devB")
    pki.revoke("devB")
    s = acl_sections(pki.acl_path.read_text())
    assert "devB" not in s and "devA" in s
    assert "devB" not in pki.passwd_path.read_text() and not pki.bundle_dir("devB").exists()
    assert "devB" not in Pki.open(pki.root).identities
    pki.revoke("coord-eu")
    assert pki.signing_keys() == {}
    pki.issue("ops-1", "operator")
    assert (pki.operators_dir / "ops-1.pub").exists()
    pki.revoke("ops-1")  # its command-signing key stops being trusted by the next coordinator bundles
    assert not (pki.operators_dir / "ops-1.pub").exists()
    pki.refresh_trust()
    assert load_trusted_keys(pki.bundle_dir("devA") / "trusted") == {}
    with pytest.raises(ConfigError, match="not issued"):
        pki.revoke("devB")


def test_revoked_and_superseded_certificates_are_on_the_crl(pki: Pki) -> None:
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())  # init writes an empty one
    assert list(crl) == [] and crl.is_signature_valid(pki.ca_cert().public_key())  # type: ignore[arg-type]
    first = pki.issue("devA", "device", regions=["eu"])
    first_serial = x509.load_pem_x509_certificate((first / "devA.crt").read_bytes()).serial_number
    pki.issue("devB", "device", regions=["eu"])
    second = pki.issue("devA", "device", regions=["eu"], force=True)  # the old certificate is superseded
    serial_b = pki.identities["devB"].serial
    assert pki.revoke("devB") is True
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert sorted(r.serial_number for r in crl) == sorted([first_serial, serial_b])
    assert crl.is_signature_valid(pki.ca_cert().public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc is not None and crl.next_update_utc >= pki.ca_cert().not_valid_after_utc
    live = x509.load_pem_x509_certificate((second / "devA.crt").read_bytes()).serial_number
    assert crl.get_revoked_certificate_by_serial_number(live) is None
    assert [r["reason"] for r in Pki.open(pki.root).revoked] == ["superseded", "revoked"]  # survives a reopen
    # the CA key kept elsewhere: the revocation is recorded, the CRL waits for `pki crl` there
    pki.issue("devC", "device", regions=["eu"])
    moved = pki.ca_key_path.rename(pki.root.parent / "offline-ca.key")
    try:
        assert Pki.open(pki.root).revoke("devC") is False
    finally:
        moved.rename(pki.ca_key_path)
    reopened = Pki.open(pki.root)
    reopened.write_crl()
    assert pki.identities["devC"].serial in {r.serial_number for r in x509.load_pem_x509_crl(pki.crl_path.read_bytes())}


def test_secure_conf_and_packet_limit(tmp_path: Path) -> None:
    files = {k: tmp_path / k for k in ("ca", "crt", "key", "acl", "pw")}
    conf = secure_conf(cafile=files["ca"], certfile=files["crt"], keyfile=files["key"], acl_file=files["acl"],
                       port=18883, host="127.0.0.1", model_bytes=1_000_000)
    lines = set(conf.splitlines())
    for expected in ("require_certificate true", "use_identity_as_username true", "allow_anonymous false",
                     f"acl_file {files['acl']}", f"cafile {files['ca']}", "listener 18883 127.0.0.1",
                     f"max_packet_size {packet_limit(1_000_000)}", "max_queued_messages 100000",
                     f"max_queued_bytes {queue_limit(1_000_000)}", "max_inflight_messages 64",
                     f"max_inflight_bytes {inflight_limit(1_000_000)}", "use_username_as_clientid true",
                     "check_retain_source true"):
        assert expected in lines, expected
    assert not any(ln.startswith("crlfile") for ln in lines)  # none given: the line is dropped (and logged)
    assert f"crlfile {files['ca']}.crl" in secure_conf(cafile=files["ca"], certfile=files["crt"], keyfile=files["key"],
                                                       acl_file=files["acl"], crlfile=f"{files['ca']}.crl").splitlines()
    # the listener settings follow the listener line (before it, mosquitto opens a default listener on 1883)
    order = [ln.split()[0] for ln in conf.splitlines() if ln and not ln.startswith("#")]
    assert order.index("listener") < order.index("use_username_as_clientid")
    # a queue per client holds 32 of the largest messages, within 256 MiB .. 4 GiB (1 GiB without a model size)
    assert queue_limit(1_000_000) == 256 << 20 and queue_limit(0) == 1 << 30
    assert queue_limit(50_000_000) == 32 * packet_limit(50_000_000) and queue_limit(10**12) == 4 << 30
    assert 1_000_000 < packet_limit(1_000_000) < 1_200_000
    # in flight on top of the queue: two of the largest messages, at least 4 MiB (tests/test_security_broker.py
    # shows the bound); the shipped files hold the value for no model size, which secure_conf rewrites
    assert inflight_limit(1_000_000) == 4 << 20 and inflight_limit(50_000_000) == 2 * packet_limit(50_000_000)
    for shipped in (SECURE_CONF, PASSWORD_CONF):
        assert f"max_inflight_bytes {inflight_limit(0)}" in shipped.read_text().splitlines(), shipped
    assert packet_limit(0) == PAHO_MAX_PAYLOAD and packet_limit(10**12) == PAHO_MAX_PAYLOAD
    pw = secure_conf(cafile=files["ca"], certfile=files["crt"], keyfile=files["key"], acl_file=files["acl"],
                     password_file=files["pw"])
    pw_lines = set(pw.splitlines())
    assert f"password_file {files['pw']}" in pw_lines and "allow_anonymous false" in pw_lines
    assert "require_certificate false" in pw_lines and "use_identity_as_username true" not in pw_lines
    assert f"max_inflight_bytes {inflight_limit(0)}" in pw_lines
    with pytest.raises(ConfigError):
        secure_conf(cafile="a\nlistener 1883", certfile="b", keyfile="c", acl_file="d")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_password_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    import base64

    f = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(f), "dev-1", "s3cret pass"], check=True, capture_output=True)
    user, hashed = f.read_text().strip().split(":", 1)
    _, kind, iterations, salt, _ = hashed.split("$")
    assert (user, kind) == ("dev-1", "7")
    assert mosquitto_hash("s3cret pass", iterations=int(iterations), salt=base64.b64decode(salt)) == hashed
    assert mosquitto_hash("other", iterations=int(iterations), salt=base64.b64decode(salt)) != hashed


def test_password_bundle_and_auth_from_args(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = pki.issue("devA", "device")
    auth = BrokerAuth.from_bundle(bundle)
    assert (auth.ca_file, auth.cert_file, auth.key_file) == (bundle / "ca.crt", bundle / "devA.crt", bundle / "devA.key")
    assert auth.username is None and auth.password is None
    password = pki.set_password("devA")
    assert mode(bundle / "password") == 0o600 and mode(pki.passwd_path) == 0o600
    assert pki.passwd_path.read_text().startswith("devA:$7$101$")
    auth = BrokerAuth.from_bundle(bundle)
    assert (auth.username, auth.password) == ("devA", password)
    assert password not in repr(auth)

    def ns(**kw: object) -> argparse.Namespace:
        base: dict[str, object] = {"bundle": None, "ca": None, "cert": None, "key": None, "username": None, "password_file": None}
        return argparse.Namespace(**{**base, **kw})

    assert auth_from_args(ns()) is None
    assert auth_from_args(ns(bundle=bundle)) == auth
    pw_file = tmp_path / "pw.txt"
    pw_file.write_text("from-file\n")
    assert auth_from_args(ns(username="u", password_file=pw_file)) == BrokerAuth(username="u", password="from-file")
    monkeypatch.setenv("EDGECI_PASSWORD", "from-env")
    assert auth_from_args(ns(username="u")) == BrokerAuth(username="u", password="from-env")
    other_ca = pki.root / "ca.crt"
    explicit = auth_from_args(ns(bundle=bundle, ca=other_ca))
    assert explicit is not None and explicit.ca_file == other_ca  # explicit flags win
    with pytest.raises(ConfigError, match="not an edgeci bundle"):
        BrokerAuth.from_bundle(tmp_path)
    with pytest.raises(ConfigError, match="both"):
        BrokerAuth(cert_file=bundle / "devA.crt")


def test_broker_urls_and_transport_safety(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    assert parse_broker_url("mqtts://mqtt.example.net").port == 8883
    assert parse_broker_url("mqtts://h:9000").url == "mqtts://h:9000"
    assert parse_broker_url("mqtt://h").port == 1883 and not parse_broker_url("h:1").tls
    assert parse_broker_url("mqtt://h:1/").port == 1
    for bad in ("http://h", "mqtts://user:pw@h:8883", "mqtt://", "mqtt//127.0.0.1:1883", "mqtt://h:1/x", "mqtt://h:1?q"):
        with pytest.raises(ConfigError):
            parse_broker_url(bad)
    bundle = pki.issue("devA", "device")
    certs = BrokerAuth.from_bundle(bundle)

    def transport(url: str, auth: BrokerAuth | None = None) -> MqttTransport:
        return MqttTransport(url, client_id="t", subscriptions=[], on_message=lambda t, p: None, auth=auth)

    with pytest.raises(ConfigError, match="needs TLS"):
        transport("mqtt://127.0.0.1:1883", certs)
    with pytest.raises(ConfigError, match="clear text"):
        transport("mqtt://10.1.2.3:1883", BrokerAuth(username="u", password="p"))
    with caplog.at_level(logging.WARNING, logger="edgeci.mqtt"):
        transport("mqtt://127.0.0.1:1883")
        assert not caplog.records
        transport("mqtt://10.1.2.3:1883")
        assert any("not encrypted" in r.getMessage() for r in caplog.records)
    transport("mqtts://127.0.0.1:8883", certs)  # builds its TLS context without connecting
    import ssl

    ctx = certs.ssl_context()  # verification cannot be turned off: chain and host name, TLS >= 1.2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_cli_init_issue_acl_passwd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "pki"
    assert edgeci(["pki", "init", "--dir", str(d)]) == 0
    assert edgeci(["pki", "issue", "--dir", str(d), "--role", "coordinator", "coord-eu", "--region", "eu"]) == 0
    assert edgeci(["pki", "issue", "--dir", str(d), "--role", "device", "cam-1", "--region", "eu"]) == 0
    assert edgeci(["pki", "issue", "--dir", str(d), "--role", "device", "cam-1"]) == 1  # already issued: an error, not a crash
    assert "already issued" in capsys.readouterr().err
    assert edgeci(["pki", "acl", "--dir", str(d), "--out", str(tmp_path / "acl")]) == 0
    assert "user cam-1" in (tmp_path / "acl").read_text()
    assert edgeci(["pki", "passwd", "--dir", str(d), "cam-1"]) == 0
    assert edgeci(["pki", "issue", "--dir", str(d), "--role", "broker", "broker"]) == 0
    assert edgeci(["pki", "broker-conf", "--dir", str(d), "--out", str(tmp_path / "m.conf"), "--model-bytes", "4096"]) == 0
    conf = (tmp_path / "m.conf").read_text()
    assert f"acl_file {(tmp_path / 'm-files' / 'mosquitto.acl').resolve()}" in conf and f"max_packet_size {packet_limit(4096)}" in conf
    manifest = Pki.open(d).bundle_dir("cam-1") / "bundle.json"
    assert '"username": "cam-1"' in manifest.read_text()


def test_cli_a_path_it_cannot_write_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`pki init --dir FILE` and `pki acl --out /tmp` ended in a FileExistsError / IsADirectoryError
    traceback (and the latter left `/.tmp.tmp` behind); `broker-conf --port 99999` wrote a
    config mosquitto cannot start with."""
    d, a_file = tmp_path / "pki", tmp_path / "a-file"
    a_file.write_text("")
    assert edgeci(["pki", "init", "--dir", str(a_file)]) == 1
    assert capsys.readouterr().err == f"edgeci pki: error: {a_file}: exists and is not a folder\n"
    assert edgeci(["pki", "init", "--dir", str(a_file / "pki")]) == 1
    assert capsys.readouterr().err == f"edgeci pki: error: --dir {a_file / 'pki'}: cannot create the folder: {a_file} is not a folder\n"
    assert edgeci(["pki", "init", "--dir", str(d)]) == 0
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    assert edgeci(["pki", "acl", "--dir", str(d), "--out", str(a_dir)]) == 1
    assert capsys.readouterr().err.endswith(f"edgeci pki: error: {a_dir}: Is a directory\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "a-file", "pki"]  # no .a-dir.tmp left
    with pytest.raises(SystemExit) as exit_:
        edgeci(["pki", "broker-conf", "--dir", str(d), "--out", str(tmp_path / "m.conf"), "--port", "99999"])
    assert exit_.value.code == 2 and "argument --port: must be a port 1-65535, got 99999" in capsys.readouterr().err


def test_emulated_fleet_takes_a_folder_of_bundles_or_one_devices_own_bundle(pki: Pki) -> None:
    from devices.mqtt_fleet import _fleet_credentials

    pki.issue("fleet-0000", "device")
    base = {"bundle": None, "ca": None, "cert": None, "key": None, "username": None, "password_file": None}
    folder = _fleet_credentials(argparse.Namespace(**{**base, "bundle": pki.root / "bundles"}), ["fleet-0000", "fleet-0001"])
    assert folder == {"bundles": pki.root / "bundles", "auth": None}  # each device its own identity
    one = pki.bundle_dir("fleet-0000")
    # a fleet of exactly that device: it is that device's own bundle (its trusted keys included)
    assert _fleet_credentials(argparse.Namespace(**{**base, "bundle": one}), ["fleet-0000"]) == {"bundles": one.parent, "auth": None}
    # shared by a fleet, one identity would make the devices replace each other on the broker and trust on first use
    with pytest.raises(ConfigError, match=r"one device's bundle \('fleet-0000'\) and this fleet has 2 device"):
        _fleet_credentials(argparse.Namespace(**{**base, "bundle": one}), ["fleet-0000", "fleet-0001"])
    with pytest.raises(ConfigError, match="one device's bundle"):  # another device's bundle
        _fleet_credentials(argparse.Namespace(**{**base, "bundle": one}), ["cam-9"])
    with pytest.raises(ConfigError, match="no such folder"):
        _fleet_credentials(argparse.Namespace(**{**base, "bundle": pki.root / "nope"}), ["fleet-0000"])
    assert _fleet_credentials(argparse.Namespace()) == {"auth": None}


def test_embedded_trial_broker_binds_loopback_only() -> None:
    from coordinator.broker import EmbeddedBroker

    for host in ("0.0.0.0", "10.0.0.5", "mqtt.example.net", "::"):
        with pytest.raises(ConfigError, match="trials"):
            EmbeddedBroker(host=host)
    assert EmbeddedBroker().host == "127.0.0.1" and EmbeddedBroker(host="localhost").host == "localhost"


def test_trust_on_first_use_is_called_insecure_where_it_can_happen() -> None:
    """H4's F12: a device without a bundle trusts the first key that signs a model; the help of
    each command that runs devices, and of the coordinator (its peers), says that is insecure
    and what to do instead."""
    from demos.cli import build_parser

    for command in ("device", "label", "emulate", "run", "coordinator"):
        parser = build_parser([command])
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        text = " ".join(sub.format_help().split())
        assert "trust on first use" in text and "insecure" in text and "trusted/" in text, command
    dockerfile = (Path(__file__).resolve().parents[1] / "Dockerfile").read_text()
    assert "insecure" in dockerfile and "trusted/" in dockerfile


def test_plain_mqtt_is_called_insecure_in_every_help_that_takes_a_broker() -> None:
    """The default --broker, mqtt://127.0.0.1:1883, is plain and (on the trial brokers)
    anonymous; `edgeci status/rollback/pin/unpin/coordinator --help` did not say so."""
    from demos.cli import build_parser

    for command in ("coordinator", "device", "status", "rollback", "pin", "unpin", "emulate", "label"):
        parser = build_parser([command])
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        text = " ".join(sub.format_help().split())
        assert "plain MQTT: unencrypted" in text and "for trials on this machine only" in text, command


def test_a_device_bundle_without_coordinator_keys_is_refused(pki: Pki, tmp_path: Path) -> None:
    """A device given a bundle fell back to trust on first use when the bundle had no
    coordinator keys (issued before any coordinator); now that is a ConfigError naming the fix."""
    from edge_sdk.client import EdgeClient

    bundle = pki.issue("devA", "device")
    with pytest.raises(ConfigError, match="pki trust"):
        EdgeClient(broker="mqtts://127.0.0.1:1", device_id="devA", task="digits", bundle=bundle, durable=False,
                   data_dir=tmp_path / "devA")


@pytest.mark.parametrize("argv, needle", [(["init", "--days", "-5"], "argument --days: must be at least 1, got -5"),
                                          (["init", "--days", "0"], "argument --days: must be at least 1, got 0"),
                                          (["issue", "--role", "device", "cam-1", "--days", "-1"],
                                           "argument --days: must be at least 1, got -1"),
                                          # helper-119: past year 9999, OverflowError (init left an empty folder)
                                          (["init", "--days", "99999999"], "argument --days: must be at most 365000 (a thousand years), got 99999999"),
                                          (["issue", "--role", "device", "cam-1", "--days", "3000000"],
                                           "argument --days: must be at most 365000 (a thousand years), got 3000000"),
                                          (["broker-conf", "--out", "m.conf", "--model-bytes", "-5"],
                                           "argument --model-bytes: must be at least 0, got -5")])
def test_a_validity_or_size_out_of_range_is_a_usage_error(argv: list[str], needle: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`pki init --days -5` and `pki issue --days -1` ended in cryptography's ValueError traceback (and
    init left an empty PKI folder); `--days 0` made a CA that had expired when it was written."""
    with pytest.raises(SystemExit) as exit_:
        edgeci(["pki", argv[0], "--dir", str(tmp_path / "pki"), *argv[1:]])
    assert exit_.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "pki").exists()


def test_without_the_ca_key_issue_and_crl_say_to_run_where_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`edgeci pki crl` without ca.key said "issue from where it is"."""
    d = tmp_path / "pki"
    Pki.init(d)
    (d / "ca.key").rename(tmp_path / "ca.key.offline")
    for argv in (["issue", "--dir", str(d), "--role", "device", "cam-1"], ["crl", "--dir", str(d)]):
        assert edgeci(["pki", *argv]) == 1
        assert capsys.readouterr().err == f"edgeci pki: error: the CA key {d / 'ca.key'} is not here (kept offline?): run this where it is\n"


@pytest.mark.parametrize("action, needle", [("trust", "each coordinator bundle's operators/"),
                                            ("revoke", "the issued identity to revoke"),
                                            ("passwd", "the issued identity to give a password"),
                                            ("init", "CA validity in days (default: 3650)"),
                                            ("init", "the CA's common name (default: edgeci CA)"),
                                            ("issue", "certificate validity in days (default: 825)"),
                                            ("broker-conf", "issued with --role broker (default: broker)")])
def test_every_pki_action_explains_itself(action: str, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`edgeci pki trust --help` printed its usage and --dir only; revoke's and passwd's ID had no help;
    init's and issue's --days, init's --name and broker-conf's --broker-name did not say their defaults."""
    with pytest.raises(SystemExit) as exit_:
        edgeci(["pki", action, "--help"])
    assert exit_.value.code == 0 and needle in " ".join(capsys.readouterr().out.split())
