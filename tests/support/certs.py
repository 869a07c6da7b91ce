"""Test certificates: one trusted CA and the server certificates TLS tests need.

Every certificate names ``localhost`` and ``127.0.0.1`` except the wrong-name one,
so a failure is always caused by the one property a test is about.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import trustme

SERVER_IDENTITIES = ("localhost", "127.0.0.1")
WRONG_NAME = "wrong.example"


@dataclass(frozen=True)
class TestPKI:
    """Paths of the PEM files written by :func:`make_pki`."""

    # The name starts with "Test": keep pytest from trying to collect it.
    __test__: ClassVar[bool] = False

    ca_file: Path
    server_cert: Path
    server_key: Path
    wrong_name_cert: Path
    wrong_name_key: Path
    untrusted_ca_file: Path
    untrusted_cert: Path
    untrusted_key: Path
    expired_cert: Path
    expired_key: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA and checks host names."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def pair(self, kind: str) -> tuple[Path, Path]:
        """The (certificate, key) pair a server presents for ``kind``.

        ``kind`` is ``"good"``, ``"wrong_name"``, ``"untrusted"`` or ``"expired"``.
        """
        pairs = {
            "good": (self.server_cert, self.server_key),
            "wrong_name": (self.wrong_name_cert, self.wrong_name_key),
            "untrusted": (self.untrusted_cert, self.untrusted_key),
            "expired": (self.expired_cert, self.expired_key),
        }
        try:
            return pairs[kind]
        except KeyError:
            raise ValueError(
                f"unknown certificate kind {kind!r}; use one of {sorted(pairs)}"
            ) from None


def _write(path: Path, data: bytes, mode: int) -> Path:
    # Create with the final mode so a private key is never readable by others,
    # not even between open() and chmod().
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)
    return path


def _write_leaf(directory: Path, name: str, leaf: trustme.LeafCert) -> tuple[Path, Path]:
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    cert = _write(directory / f"{name}.crt", chain, 0o644)
    key = _write(directory / f"{name}.key", leaf.private_key_pem.bytes(), 0o600)
    return cert, key


def make_pki(directory: Path) -> TestPKI:
    """Create a fresh test CA and the server certificates under ``directory``."""
    # Imported here so that TestPKI (and the Dovecot harness) load without it.
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="gpopd test CA")
    other_ca = trustme.CA(organization_name="gpopd untrusted CA")

    now = dt.datetime.now(dt.UTC)
    good = ca.issue_cert(*SERVER_IDENTITIES)
    wrong = ca.issue_cert(WRONG_NAME)
    untrusted = other_ca.issue_cert(*SERVER_IDENTITIES)
    expired = ca.issue_cert(
        *SERVER_IDENTITIES,
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )

    ca_file = _write(directory / "ca.pem", ca.cert_pem.bytes(), 0o644)
    untrusted_ca_file = _write(directory / "untrusted-ca.pem", other_ca.cert_pem.bytes(), 0o644)
    server_cert, server_key = _write_leaf(directory, "server", good)
    wrong_cert, wrong_key = _write_leaf(directory, "wrong-name", wrong)
    untrusted_cert, untrusted_key = _write_leaf(directory, "untrusted", untrusted)
    expired_cert, expired_key = _write_leaf(directory, "expired", expired)
    return TestPKI(
        ca_file=ca_file,
        server_cert=server_cert,
        server_key=server_key,
        wrong_name_cert=wrong_cert,
        wrong_name_key=wrong_key,
        untrusted_ca_file=untrusted_ca_file,
        untrusted_cert=untrusted_cert,
        untrusted_key=untrusted_key,
        expired_cert=expired_cert,
        expired_key=expired_key,
    )
