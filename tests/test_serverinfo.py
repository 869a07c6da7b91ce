"""Tests of ``gpopd serverinfo``: what a server offers, learnt without changing anything."""

from __future__ import annotations

import re
import ssl
import time
from pathlib import Path

import pytest

from gpopd.config import Account, load_config
from gpopd.errors import AuthError, StoreError
from gpopd.serverinfo import ServerInfo, render, server_info
from gpopd.store import AccountLock
from tests.support.certs import TestPKI
from tests.support.corpus import mixed_corpus
from tests.support.dovecot import TEST_USERS, Dovecot, virtual_size
from tests.support.fakepop import FakePop3
from tests.support.gpopd_config import AccountSpec, write_config

MESSAGES = mixed_corpus(3, seed=11)
TLS_VERSIONS = {"TLSv1.2", "TLSv1.3"}


def account(tmp_path: Path, spec: AccountSpec) -> Account:
    settings = load_config(write_config(tmp_path, [spec]), environ={})
    return settings.accounts[spec.name]


def dovecot_alice(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path, **overrides: object
) -> AccountSpec:
    spec = AccountSpec(
        name="alice",
        port=dovecot.pop3s_port,
        username="alice",
        password=TEST_USERS["alice"],
        maildir=tmp_path / "Maildir",
        ca_file=pki.ca_file,
    )
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


def snapshot(dovecot: Dovecot, user: str) -> dict[str, list[str]]:
    """The names of every file in the user's Maildir, per subdirectory."""
    maildir = dovecot.maildir(user)
    return {
        sub: sorted(entry.name for entry in (maildir / sub).iterdir())
        for sub in ("new", "cur", "tmp")
        if (maildir / sub).is_dir()
    }


def logout_counts(dovecot: Dovecot, user: str) -> tuple[int, int, int]:
    """TOP, RETR and DELE counts from Dovecot's log line for the user's last logout."""
    pattern = re.compile(rf"pop3\({user}\).*Logged out top=(\d+)/\d+, retr=(\d+)/\d+, del=(\d+)/")
    deadline = time.monotonic() + 10
    while True:
        found = pattern.findall(dovecot.log_path.read_text(errors="replace"))
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert found, dovecot.log_tail()
    top, retr, dele = found[-1]
    return int(top), int(retr), int(dele)


def server_context(pki: TestPKI) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    return context


async def test_dovecot_counts_sizes_and_tls_without_touching_the_mailbox(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path
) -> None:
    """Count and size match the mailbox, TLS is 1.2+, and no message is deleted, read or moved."""
    dovecot.add_messages("alice", MESSAGES)
    before = snapshot(dovecot, "alice")
    assert len(before["new"]) == len(MESSAGES)

    info = await server_info(account(tmp_path, dovecot_alice(dovecot, pki, tmp_path)))

    assert info.message_count == len(MESSAGES)
    assert info.mailbox_size == sum(virtual_size(m) for m in MESSAGES)
    assert info.tls_version in TLS_VERSIONS
    assert info.cipher
    assert info.certificate_subject
    assert info.tls_mode == "implicit"
    assert (info.host, info.port) == ("127.0.0.1", dovecot.pop3s_port)
    assert info.greeting.startswith("Dovecot")
    assert "UIDL" in info.capabilities_after
    assert "USER" in info.capabilities_before
    assert info.auth_method in {"user", "plain"}
    # Dovecot counts what the session did: nothing read, nothing deleted.
    assert logout_counts(dovecot, "alice") == (0, 0, 0)
    # Nothing deleted, nothing marked read: the same files, still in new/.
    assert dovecot.message_count("alice") == len(MESSAGES)
    assert snapshot(dovecot, "alice") == before
    assert sorted(dovecot.messages("alice")) == sorted(MESSAGES)


async def test_dovecot_over_stls(dovecot: Dovecot, pki: TestPKI, tmp_path: Path) -> None:
    """With tls: starttls the report shows the TLS session that STLS set up."""
    dovecot.add_messages("alice", MESSAGES[:1])
    spec = dovecot_alice(dovecot, pki, tmp_path, port=dovecot.pop3_port, tls="starttls")
    info = await server_info(account(tmp_path, spec))
    assert info.tls_mode == "starttls"
    assert info.tls_version in TLS_VERSIONS
    assert info.message_count == 1
    assert dovecot.message_count("alice") == 1


async def test_wrong_password_is_an_auth_error_and_changes_nothing(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path
) -> None:
    """A refused login raises AuthError and the mailbox stays as it was."""
    dovecot.add_messages("alice", MESSAGES)
    before = snapshot(dovecot, "alice")
    spec = dovecot_alice(dovecot, pki, tmp_path, password="not-the-password")
    with pytest.raises(AuthError):
        await server_info(account(tmp_path, spec))
    assert snapshot(dovecot, "alice") == before


async def test_account_lock_is_held_and_respected(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path
) -> None:
    """With a state directory, a poll holding the account's lock makes serverinfo refuse."""
    acc = account(tmp_path, dovecot_alice(dovecot, pki, tmp_path))
    state_dir = tmp_path / "state"
    with AccountLock(state_dir, "alice"), pytest.raises(StoreError, match="another gpopd"):
        await server_info(acc, state_dir=state_dir)
    info = await server_info(acc, state_dir=state_dir)
    assert info.message_count == 0
    with AccountLock(state_dir, "alice") as lock:  # released afterwards
        assert lock.held


def gmail_like_capa(args: list[str], server: FakePop3) -> bytes:
    """Gmail's CAPA: SASL before login, PIPELINING after, LOGIN-DELAY and EXPIRE 0."""
    logged_in = "PASS ***" in server.commands
    caps = ["USER", "RESP-CODES", "EXPIRE 0", "TOP", "UIDL"]
    if logged_in:
        caps += ["LOGIN-DELAY 300", "PIPELINING"]
    else:
        caps += ["LOGIN-DELAY 900 USER", "SASL PLAIN XOAUTH2 OAUTHBEARER"]
    return (
        "+OK Capability list follows\r\n" + "".join(f"{c}\r\n" for c in caps) + ".\r\n"
    ).encode()


async def test_gmail_like_server_reports_login_delay_and_expire(
    pki: TestPKI, tmp_path: Path
) -> None:
    """Only CAPA, login, CAPA, STAT and QUIT are sent; post-login values win."""
    async with FakePop3(
        MESSAGES,
        greeting=b"+OK Gpop ready for requests from 127.0.0.1 x1\r\n",
        script={"CAPA": gmail_like_capa},
        ssl_context=server_context(pki),
    ) as server:
        spec = AccountSpec(
            "gmail",
            server.port,
            server.user,
            server.password,
            tmp_path / "Maildir",
            ca_file=pki.ca_file,
            extra={"auth": "user"},
        )
        info = await server_info(account(tmp_path, spec))
    assert server.commands == ["CAPA", "USER", "PASS ***", "CAPA", "STAT", "QUIT"]
    assert server.deleted == set()
    assert info.greeting == "Gpop ready for requests from 127.0.0.1 x1"
    assert info.login_delay == 300
    assert info.expire == "0"
    assert info.message_count == len(MESSAGES)
    assert info.mailbox_size == sum(len(m) for m in MESSAGES)
    assert info.capabilities_before["SASL"] == ("PLAIN", "XOAUTH2", "OAUTHBEARER")
    assert "PIPELINING" in info.capabilities_after
    assert "SASL" not in info.capabilities_after
    assert info.tls_version in TLS_VERSIONS

    text = render(info)
    assert "EXPIRE        0: the server may delete retrieved messages itself" in text
    assert "LOGIN-DELAY   300 s" in text
    assert "5m between logins" in text
    after = text.split("capabilities after login:\n", 1)[1]
    before = text.split("capabilities before login:\n", 1)[1].split("capabilities after")[0]
    assert "  + PIPELINING" in after
    assert "    UIDL" in after
    assert "  - SASL PLAIN XOAUTH2 OAUTHBEARER" in before


def test_render_of_a_plaintext_server_without_capa() -> None:
    """A report on a server without TLS or CAPA says so plainly and strips control characters."""
    info = ServerInfo(
        account="old",
        host="pop.example.net",
        port=110,
        tls_mode="none",
        greeting="POP3 ready\x1b[31m",
        tls_version=None,
        cipher=None,
        certificate_subject=None,
        auth_method="user",
        message_count=2,
        mailbox_size=3 * 1024 * 1024,
    )
    text = render(info)
    assert "pop.example.net:110 (no TLS)" in text
    assert "travel in plaintext" in text
    assert "messages      2 (3.0 MiB)" in text
    assert "does not answer CAPA" in text
    assert "\x1b" not in text
    assert "LOGIN-DELAY" not in text
    assert "EXPIRE" not in text
