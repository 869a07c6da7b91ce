"""The set-up shared by the many-account benchmarks (scale.py, idle.py).

A private Dovecot on 127.0.0.1 with one passwd-file user per account, each
mailbox filled with a few small messages, and the matching gpopd accounts
(implicit TLS against the test CA, polled every 10 minutes).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.certs import make_pki
from tests.support.corpus import small_corpus
from tests.support.dovecot import Dovecot
from tests.support.gpopd_config import AccountSpec


def start_accounts(work: Path, accounts: int, messages: int) -> tuple[Dovecot, list[AccountSpec]]:
    """Start the Dovecot (the caller stops it) and return it with one spec per account."""
    # Dovecot's unprivileged processes must reach the mail below it.
    os.chmod(work, 0o755)  # noqa: S103
    users = {f"u{n:04d}": f"pw-{n:04d}" for n in range(accounts)}
    pki = make_pki(work / "pki")
    dovecot = Dovecot(work / "dovecot", pki, users=users, lmtp=False)
    dovecot.start()
    try:
        for n, user in enumerate(users):
            dovecot.add_messages(user, small_corpus(messages, seed=n, size=2048))
    except BaseException:
        dovecot.stop()
        raise
    specs = [
        AccountSpec(
            user,
            dovecot.pop3s_port,
            user,
            password,
            work / "mail" / user,
            ca_file=pki.ca_file,
            extra={"poll_interval": "10m"},
        )
        for user, password in users.items()
    ]
    return dovecot, specs
