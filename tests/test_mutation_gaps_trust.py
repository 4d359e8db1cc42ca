"""Trust-layer behaviours no test checked (helper-186's mutation audit of ``edge_sdk/signing.py``,
``coordinator/pki.py``, ``coordinator/broker.py`` and ``coordinator/cli_control.py``).

Each test kills a mutant that survived every test covering the file; the docstrings name it
(file:line at the audit's base commit ac73730, and the mutation)."""

from __future__ import annotations

import base64
import datetime as dt
import errno
import hashlib
import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from coordinator.broker import EmbeddedBroker, secure_conf
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from coordinator.pki import Pki, mosquitto_account, mosquitto_hash, write_private, write_public
from demos.cli import main as edgeci
from edge_sdk import signing
from edge_sdk.errors import ConfigError
from edge_sdk.modelio import save_model
from edge_sdk.signing import Signer, key_id, load_signer, save_signer, verify
from tests.daemon_rig import Net, Rig


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_verify_refuses_a_signature_or_key_of_the_wrong_length() -> None:
    """signing.py:64 (``return False`` -> ``return True`` for a key that is not 32 bytes or a
    signature that is not 64): a truncated or padded signature, or a short or long key, was taken
    as valid. (The wire codec cuts exactly 64 and 32 bytes, so no frame reaches this today.)"""
    s = Signer.generate()
    data = b"model v7"
    sig = s.sign(data)
    assert verify(s.public_raw, sig, data)
    for bad_sig in (sig[:63], sig + b"\0", b""):
        assert verify(s.public_raw, bad_sig, data) is False
    for bad_key in (s.public_raw[:31], s.public_raw + b"\0", b""):
        assert verify(bad_key, sig, data) is False


def test_a_key_id_is_the_first_16_hex_digits_of_sha256_over_the_raw_key() -> None:
    """signing.py:34 (``[:16]`` -> ``[:17]``): every key id changed length and no test saw it; the
    id is on the wire (a signed frame's ``kid``, checked against the key by every decoder) and in
    each device's pinned keys, so devices and coordinators of two versions would refuse each other."""
    assert key_id(bytes(32)) == "66687aadf862bd77"  # sha256 of 32 zero bytes: 66687aad f862bd77 6c8f...
    s = Signer.generate()
    assert s.kid == hashlib.sha256(s.public_raw).hexdigest()[:16] and len(s.kid) == 16


def test_a_stale_world_readable_temporary_file_does_not_leave_the_signing_key_readable(tmp_path: Path) -> None:
    """signing.py:90 (``os.chmod(tmp, 0o600)`` deleted): ``os.open(..., O_CREAT, 0o600)`` keeps the
    mode of a temporary file that is already there (one left by a crash, or planted), so the
    private key was renamed into place world-readable."""
    path = tmp_path / "signing.key"
    stale = tmp_path / ".signing.key.tmp"
    stale.write_bytes(b"left over")
    os.chmod(stale, 0o644)
    save_signer(Signer.generate(), path)
    assert mode(path) == 0o600
    assert load_signer(path).kid  # and it is the key, whole


def test_saving_a_key_closes_its_file(tmp_path: Path) -> None:
    """signing.py:89 (``os.close(fd)`` deleted): each key saved leaked a file descriptor."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("needs /proc/self/fd")
    s = Signer.generate()
    save_signer(s, tmp_path / "warm.key")
    before = len(list(fds.iterdir()))
    for i in range(5):
        save_signer(s, tmp_path / f"k{i}.key")
    assert len(list(fds.iterdir())) == before


def test_a_signing_key_is_saved_into_folders_that_do_not_exist_yet(tmp_path: Path) -> None:
    """signing.py:82 and :125 (``path.parent.mkdir(...)`` deleted, or ``parents=True`` -> ``False``,
    in ``_write_private`` and ``save_public_key``): a key whose parent folders were not made yet
    could not be written."""
    path = tmp_path / "a" / "b" / "signing.key"
    signer, created = signing.load_or_create_signer(path)
    assert created and mode(path) == 0o600 and load_signer(path).kid == signer.kid
    pub = tmp_path / "c" / "d" / "alice.pub"
    signing.save_public_key(signer.public_raw, pub)
    assert signing.load_public_key(pub) == signer.public_raw


def test_an_existing_signing_key_is_loaded_not_reported_as_created(tmp_path: Path) -> None:
    """signing.py:117 (``return load_signer(p), False`` -> ``True``) and :120 (``True`` ->
    ``False``): the coordinator logs whether it made a new key ("devices without a provisioned key
    will pin it on first use"); each start said so of the key it had kept."""
    path = tmp_path / "signing.key"
    first, created = signing.load_or_create_signer(path)
    again, created_again = signing.load_or_create_signer(path)
    assert (created, created_again) == (True, False) and again.kid == first.kid


def test_certificates_and_the_crl_are_valid_from_a_day_back(tmp_path: Path) -> None:
    """pki.py:70 (``BACKDATE = timedelta(days=1)`` -> ``days=0``): certificates and the CRL were
    valid from the second they were made, so a device whose clock is behind this host's took a
    certificate issued minutes ago for "not yet valid" and could not connect."""
    before = dt.datetime.now(dt.UTC)
    pki = Pki.init(tmp_path / "pki")
    bundle = pki.issue("dev-1", "device", regions=["eu"])
    day_back = before - dt.timedelta(hours=23)
    for crt in (pki.ca_cert_path, bundle / "dev-1.crt"):
        assert x509.load_pem_x509_certificate(crt.read_bytes()).not_valid_before_utc <= day_back, crt
    assert x509.load_pem_x509_crl(pki.crl_path.read_bytes()).last_update_utc <= day_back


def test_a_folder_made_for_a_secret_is_0700_even_with_an_open_umask(tmp_path: Path) -> None:
    """pki.py:91 (``mode=0o700`` -> ``0o701`` in ``write_private``'s ``mkdir``): the module keeps
    secrets in folders only their owner may enter; the folder it made was not checked."""
    old = os.umask(0)
    try:
        write_private(tmp_path / "k" / "secret.key", b"x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "k") == 0o700 and mode(tmp_path / "k" / "secret.key") == 0o600


def test_a_full_disk_names_the_file_it_could_not_write_and_leaves_no_temporary(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """pki.py:116 (``if exc.filename is None`` negated): write() and fsync() raise ENOSPC naming
    no file; the error is given the file's name (``pki`` prints "FILE: No space left on device"),
    which the mutant dropped."""
    target = tmp_path / "mosquitto.acl"

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        write_public(target, b"user dev-1\n")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_folders_made_on_the_way_to_a_file_are_not_world_writable_under_an_open_umask(tmp_path: Path) -> None:
    """pki.py:129 (``parents=True`` -> ``False`` in ``public_dir``) survived: no test wrote below a
    folder that was not there. Doing so showed a bug: ``mkdir(parents=True)`` makes the folders
    above the last one with the umask's mode, so under umask 000 ``pki broker-conf --out
    new/conf.d/edgeci.conf`` left ``new/`` world-writable (0777), and anyone on the host could
    rename ``conf.d/`` and put their own ACL and CA in its place. The same for the folders above a
    secret, above a new PKI, and ``PKI/bundles/`` (a swapped bundle's ``trusted/`` keys)."""
    old = os.umask(0)
    try:
        write_public(tmp_path / "pub" / "conf.d" / "files" / "mosquitto.acl", b"user x\n")
        write_private(tmp_path / "sec" / "bundles" / "dev-1" / "dev-1.key", b"k")
        pki = Pki.init(tmp_path / "ops" / "pki")
        pki.issue("dev-1", "device")
    finally:
        os.umask(old)
    for folder in ("pub", "pub/conf.d", "pub/conf.d/files", "sec", "sec/bundles", "ops", "ops/pki/bundles"):
        assert mode(tmp_path / folder) == 0o755, folder  # (folders above a secret's: others may pass, not write)
    for folder in ("sec/bundles/dev-1", "ops/pki", "ops/pki/bundles/dev-1"):
        assert mode(tmp_path / folder) == 0o700, folder
    assert mode(tmp_path / "pub/conf.d/files/mosquitto.acl") == 0o644
    assert mode(tmp_path / "sec/bundles/dev-1/dev-1.key") == 0o600


def test_a_broker_certificate_takes_neither_regions_nor_trust(tmp_path: Path) -> None:
    """pki.py:336 (``regions or trust`` -> ``regions and trust``): a broker issued with regions
    alone, or a trust list alone, was accepted (only both together were refused)."""
    pki = Pki.init(tmp_path / "pki")
    pki.issue("coord-eu", "coordinator", regions=["eu"])
    for kw in ({"regions": ["eu"]}, {"trust": ["coord-eu"]}):
        with pytest.raises(ConfigError, match="broker certificate takes no"):
            pki.issue("broker", "broker", **kw)  # type: ignore[arg-type]
    assert "broker" not in pki.identities


def test_pki_trust_takes_a_revoked_operator_out_of_every_coordinator_bundle(tmp_path: Path) -> None:
    """pki.py:434 (``shutil.rmtree(operators)`` deleted in ``_write_trusted``): ``pki trust`` after
    ``pki revoke`` of an operator wrote the remaining operators' keys beside the revoked one's, so
    coordinators given the refreshed bundle still obeyed the revoked operator's rollback and pin."""
    pki = Pki.init(tmp_path / "pki")
    pki.issue("ops-1", "operator")
    pki.issue("ops-2", "operator")
    pki.issue("coord-eu", "coordinator", regions=["eu"])
    operators = pki.bundle_dir("coord-eu") / "operators"
    assert sorted(p.name for p in operators.iterdir()) == ["ops-1.pub", "ops-2.pub"]
    pki.revoke("ops-1")
    pki.refresh_trust()
    assert sorted(p.name for p in operators.iterdir()) == ["ops-2.pub"]
    assert set(signing.load_named_keys(operators)) == {"ops-2"}


def test_a_new_password_replaces_only_that_identitys_line(tmp_path: Path) -> None:
    """pki.py:489 (``!= name`` -> ``== name`` when the password file is rewritten): giving one
    identity a password dropped every other identity's line (they could no longer log in) and
    kept this identity's old hash beside the new one (the old password still worked)."""
    pki = Pki.init(tmp_path / "pki")
    for name in ("dev-1", "dev-2"):
        pki.issue(name, "device")
    old = pki.set_password("dev-1", "old password")
    pki.set_password("dev-2")
    new = pki.set_password("dev-1", "new password")
    users = [ln.split(":", 1)[0] for ln in pki.passwd_path.read_text().splitlines() if ln]
    assert sorted(users) == ["dev-1", "dev-2"]
    line = next(ln for ln in pki.passwd_path.read_text().splitlines() if ln.startswith("dev-1:"))
    salt = base64.b64decode(line.split("$")[3])
    assert line == f"dev-1:{mosquitto_hash(new, salt=salt)}" != f"dev-1:{mosquitto_hash(old, salt=salt)}"


def test_broker_conf_copies_the_crl_or_the_password_hashes_with_their_modes(tmp_path: Path) -> None:
    """pki.py:598 (``if password:`` negated), :596 (the CA's and the broker's certificate copied as
    secrets), :768 (``--port`` default 8883 -> 8884) and :859 (``args.user is None`` -> ``is not
    None``): nothing checked what ``pki broker-conf`` writes by default: the TLS listener on 8883,
    the CRL beside the client-certificate config (the password hashes beside the password one, and
    not the other way round), the public files 0644, the broker's key and the hashes 0600 and, run
    as root, the key given to the account mosquitto drops to."""
    d = tmp_path / "pki"
    assert edgeci(["pki", "init", "--dir", str(d)]) == 0
    assert edgeci(["pki", "issue", "--dir", str(d), "--role", "broker", "broker"]) == 0
    assert edgeci(["pki", "issue", "--dir", str(d), "--role", "device", "cam-1"]) == 0
    assert edgeci(["pki", "broker-conf", "--dir", str(d), "--out", str(tmp_path / "tls.conf")]) == 0
    files = tmp_path / "tls-files"
    conf = (tmp_path / "tls.conf").read_text().splitlines()
    assert "listener 8883 0.0.0.0" in conf and "require_certificate true" in conf
    assert f"crlfile {(files / 'ca.crl').resolve()}" in conf and not any(ln.startswith("password_file") for ln in conf)
    assert sorted(p.name for p in files.iterdir()) == ["broker.crt", "broker.key", "ca.crl", "ca.crt", "mosquitto.acl"]
    for name in ("broker.crt", "ca.crl", "ca.crt", "mosquitto.acl"):
        assert mode(files / name) == 0o644, name
    assert mode(files / "broker.key") == 0o600
    account = mosquitto_account()  # run as root: mosquitto reads its key after dropping to its own account
    assert (files / "broker.key").stat().st_uid == (account.pw_uid if account is not None else os.geteuid())
    assert edgeci(["pki", "passwd", "--dir", str(d), "cam-1"]) == 0
    assert edgeci(["pki", "broker-conf", "--dir", str(d), "--password", "--out", str(tmp_path / "pw.conf")]) == 0
    files = tmp_path / "pw-files"
    conf = (tmp_path / "pw.conf").read_text().splitlines()
    assert f"password_file {(files / 'mosquitto.passwd').resolve()}" in conf and not any(ln.startswith("crlfile") for ln in conf)
    assert sorted(p.name for p in files.iterdir()) == ["broker.crt", "broker.key", "ca.crt", "mosquitto.acl", "mosquitto.passwd"]
    assert mode(files / "mosquitto.passwd") == 0o600 and mode(files / "ca.crt") == 0o644


def test_pki_says_when_to_restart_mosquitto_and_when_to_redistribute_trust(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """pki.py:818 (``or`` -> ``and``, ``in`` -> ``not in``), :825-830 (which earlier bundles are
    said not to trust a new coordinator, or coordinators not to obey a new operator) and :840-847
    (a revoked coordinator's or operator's key): the lines that tell the operator to restart
    mosquitto after a name is issued again (a connection its old certificate holds publishes
    again otherwise, helper-159) and to run ``pki trust`` were not checked; the mutants printed
    them at the wrong time or never."""
    d = str(tmp_path / "pki")

    def pki(*argv: str) -> str:
        capsys.readouterr()
        assert edgeci(["pki", *argv, "--dir", d]) == 0
        return capsys.readouterr().out

    restart = "restart mosquitto (not only SIGHUP"
    pki("init")
    assert restart not in pki("issue", "--role", "device", "cam-1")  # a new name: no old certificate
    assert restart in pki("issue", "--role", "device", "cam-1", "--force")
    assert restart in pki("revoke", "cam-1")
    assert restart in pki("issue", "--role", "device", "cam-1")  # issued again after its revocation
    pki("issue", "--role", "device", "cam-2")
    assert "does not trust" not in pki("issue", "--role", "broker", "broker")
    out = pki("issue", "--role", "coordinator", "coord-eu", "--region", "eu")
    assert "note: 2 earlier bundles do not trust coord-eu yet" in out  # the cameras' (not the broker's, nor its own)
    assert "note: 1 coordinator does not obey ops-1 yet" in pki("issue", "--role", "operator", "ops-1")
    trust = "its signing key is no longer trusted by new bundles"
    assert trust not in pki("revoke", "cam-1")
    assert trust in pki("revoke", "ops-1")
    assert trust in pki("revoke", "coord-eu")


def test_a_client_certificate_config_without_a_crl_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """broker.py:100-101 (``elif password_file is None`` negated, or the ``log.warning`` deleted):
    a client-certificate config with no crlfile refuses no revoked certificate, which is logged;
    the mutants logged it for the password config instead, or never."""
    files = {k: tmp_path / k for k in ("cafile", "certfile", "keyfile", "acl_file")}
    for kw, warned in (({}, True), ({"crlfile": tmp_path / "ca.crl"}, False), ({"password_file": tmp_path / "pw"}, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgeci.broker"):
            secure_conf(**files, **kw)  # type: ignore[arg-type]
        assert any("without a crlfile" in r.getMessage() for r in caplog.records) is warned, kw



@pytest.mark.broker
def test_pin_signs_in_the_name_given_with_operator(plain_net: Net, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """cli_control.py:301 (``args.operator or _bundle_identity(key)`` -> ``and``): ``--operator
    alice`` with a key file of another name (no bundle) sent the command in the key file's name,
    which the coordinator refuses (it obeys each key only in the name it knows it by); no test
    gave ``--operator``. And :356 (``or`` -> ``and``, ``!=`` -> ``==``): ``pin`` said "(it was not
    pinned)", which only an ``unpin`` of a release that was not pinned may say; no test unpinned."""
    from demos.cli import main

    alice = Signer.generate()
    save_signer(alice, tmp_path / "k.pem")
    signing.save_public_key(alice.public_raw, tmp_path / "operators" / "alice.pub")
    with Rig(plain_net, tmp_path) as rig:
        save_model(tmp_path / "init.npz", rig.task.spec, rig.task.pretrained(seed=0), {"version": 0})
        rig.daemon = CoordinatorDaemon(CoordinatorOptions(
            broker=plain_net.url, region=plain_net.region, state_dir=tmp_path / "coord", init=tmp_path / "init.npz",
            status_interval_s=1.0, strategy_params={"k": 1, "timeout_s": None},
            operator_keys_dir=tmp_path / "operators"), task=rig.task)
        daemon = rig.daemon.start()
        capsys.readouterr()
        rc = main(["pin", "0", "--broker", plain_net.url, "--region", plain_net.region, "--signing-key",
                   str(tmp_path / "k.pem"), "--operator", "alice", "--wait", "20"])
        out = capsys.readouterr()
        assert rc == 0 and "pin done: release" in out.out and "not pinned" not in out.out, out.out + out.err
        assert daemon.core.counters["control:pin"] == 1
        said = []
        for _ in range(2):  # unpin what is pinned, then what is not
            assert main(["unpin", "--broker", plain_net.url, "--region", plain_net.region, "--signing-key",
                         str(tmp_path / "k.pem"), "--operator", "alice", "--wait", "20"]) == 0
            said.append(capsys.readouterr().out)
        assert "unpin done: release" in said[0] and "(it was not pinned)" not in said[0], said
        assert "unpin done (it was not pinned)" in said[1], said



def test_a_command_with_no_coordinator_on_the_region_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """cli_control.py:319 (the ``print`` deleted): ``edgeci rollback`` on a region no coordinator
    serves exited 2 without a word; nothing is signed or sent."""
    from demos.cli import main

    save_signer(Signer.generate(), tmp_path / "k.pem")
    with EmbeddedBroker() as broker:
        capsys.readouterr()
        rc = main(["rollback", "3", "--broker", broker.url, "--region", "nobody", "--signing-key", str(tmp_path / "k.pem"),
                   "--operator", "alice", "--wait", "1"])
    assert rc == 2 and "no coordinator status on region 'nobody': is it running?" in capsys.readouterr().out
