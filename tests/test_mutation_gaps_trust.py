"""Trust-layer behaviours no test checked (helper-186's mutation audit of ``edge_sdk/signing.py``,
``coordinator/pki.py``, ``coordinator/broker.py`` and ``coordinator/cli_control.py``).

Each test kills a mutant that survived every test covering the file; the docstrings name it
(file:line at the audit's base commit ac73730, and the mutation)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from coordinator.pki import Pki, write_private, write_public


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


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

