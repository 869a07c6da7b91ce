"""gpopd against a Gmail-like POP3 server: batches, recent mode, Gmail's errors.

Gmail cannot be reached from tests; tests/support/gmailpop.py behaves as
PROTOCOL.md records Gmail (batches of the oldest unpopped messages, popped
only at QUIT, ``recent:`` mode, its error texts).
"""

from __future__ import annotations

import asyncio
import base64
import sys
from collections import Counter
from email.message import EmailMessage
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gpopd.config import load_config
from gpopd.daemon import report_for
from gpopd.errors import AuthError, MailboxBusyError, RateLimitedError, ServerError
from gpopd.fetch import PollResult, poll_once
from gpopd.scheduler import Outcome
from gpopd.store import Store
from tests.support.certs import TestPKI
from tests.support.fakepop import FakePop3
from tests.support.gmailpop import Fault, GmailPop
from tests.support.gpopd_config import AccountSpec, maildir_contents, write_config
from tests.support.tokenserver import TokenServer


def message(n: int, *, sender: str = "bob@example.org") -> bytes:
    """A small distinct message; the body names its number."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "alice@gmail.com"
    msg["Subject"] = f"message {n}"
    msg["Message-ID"] = f"<m{n}@example.org>"
    msg.set_content(f"body of message {n}\n")
    return msg.as_bytes().replace(b"\r\n", b"\n")


def spec(server: GmailPop, tmp_path: Path, *, recent: bool = False, **extra: object) -> AccountSpec:
    return AccountSpec(
        name="alice",
        port=server.port,
        username=server.recent_username if recent else server.username,
        password=server.password,
        maildir=tmp_path / "Maildir",
        ca_file=server.ca_file,
        # The fake listens on 127.0.0.1, not on a Gmail host name.
        extra={"timeout": "10s", "gmail_batch_threshold": 200, **extra},
    )


async def poll(tmp_path: Path, account: AccountSpec) -> PollResult:
    settings = load_config(write_config(tmp_path, [account]), environ={})
    [result] = await poll_once(settings)
    return result


def delivered_bodies(tmp_path: Path) -> Counter[bytes]:
    return Counter(maildir_contents(tmp_path / "Maildir"))


async def test_backlog_of_1000_is_drained_in_one_poll(pki: TestPKI, tmp_path: Path) -> None:
    """A 1,000-message backlog comes in one poll over several 250-message sessions, each once."""
    async with GmailPop(pki) as server:
        sent = [message(n) for n in range(1000)]
        for data in sent:
            server.add(data)
        with capture_logs() as logs:
            result = await poll(tmp_path, spec(server, tmp_path))
        assert result.ok, result.error
        assert result.delivered == 1000
        assert result.sessions == 5  # 4 full batches, then an empty listing
        summary = [e for e in logs if e["event"] == "poll finished"]
        assert summary[0]["sessions"] == 5
        assert server.sessions_quit == 5
        assert len(server.popped_uids()) == 1000
        assert max(server.retrs.values()) == 1
        got = delivered_bodies(tmp_path)
        assert got == Counter(sent)
        # A second poll finds nothing new and takes one session.
        again = await poll(tmp_path, spec(server, tmp_path))
        assert again.ok
        assert (again.delivered, again.sessions) == (0, 1)


async def test_max_sessions_per_poll_bounds_a_poll(pki: TestPKI, tmp_path: Path) -> None:
    """max_sessions_per_poll stops a poll after that many batches; the next poll goes on."""
    async with GmailPop(pki, batch_size=50) as server:
        for n in range(300):
            server.add(message(n))
        first = await poll(
            tmp_path, spec(server, tmp_path, max_sessions_per_poll=2, gmail_batch_threshold=50)
        )
        assert (first.delivered, first.sessions) == (100, 2)
        second = await poll(
            tmp_path, spec(server, tmp_path, max_sessions_per_poll=10, gmail_batch_threshold=50)
        )
        assert second.delivered == 200
        assert sum(delivered_bodies(tmp_path).values()) == 300


@pytest.mark.parametrize(
    ("password", "form"),
    [("short-app-password", "one-line"), ("p" * 200, "two-step")],
    ids=["fits-255-octets", "too-long"],
)
async def test_auth_plain_sends_credentials_on_the_auth_line_when_they_fit(
    pki: TestPKI, tmp_path: Path, password: str, form: str
) -> None:
    """AUTH PLAIN takes one round trip, two only when the line would pass 255 octets."""
    async with GmailPop(pki, password=password) as server:
        server.add(message(1))
        result = await poll(tmp_path, spec(server, tmp_path, auth="plain"))
        assert result.ok, result.error
        assert result.delivered == 1
        assert [(a.mechanism, a.form, a.ok) for a in server.auth_log] == [("PLAIN", form, True)]


async def test_small_listing_does_not_start_another_session(pki: TestPKI, tmp_path: Path) -> None:
    """A session that listed fewer than gmail_batch_threshold messages ends the poll."""
    async with GmailPop(pki) as server:
        for n in range(150):
            server.add(message(n))
        result = await poll(tmp_path, spec(server, tmp_path))
        assert (result.delivered, result.sessions) == (150, 1)
        assert server.sessions_opened == 1


async def test_recent_mode_delivers_each_message_once(pki: TestPKI, tmp_path: Path) -> None:
    """recent: relists 30 days at every session; repeated polls still deliver each message once."""
    async with GmailPop(pki) as server:
        old = server.add(message(0), age_days=45)
        for n in range(1, 40):
            server.add(message(n), age_days=n % 20)
        with capture_logs() as logs:
            first = await poll(tmp_path, spec(server, tmp_path, recent=True))
        assert first.ok, first.error
        assert first.delivered == 39
        assert any("recent mode" in entry["event"] for entry in logs)
        for n in range(40, 45):
            server.add(message(n))
        second = await poll(tmp_path, spec(server, tmp_path, recent=True))
        third = await poll(tmp_path, spec(server, tmp_path, recent=True))
        assert (second.delivered, third.delivered) == (5, 0)
        assert third.listed == 44
        got = delivered_bodies(tmp_path)
        assert sum(got.values()) == 44
        assert set(got.values()) == {1}
        assert server.retrs[old] == 0
        # Recent mode never starts batch sessions: it would list the same mail again.
        assert first.sessions == second.sessions == third.sessions == 1


async def test_recent_mode_keeps_state_of_a_message_missing_from_one_listing(
    pki: TestPKI, tmp_path: Path
) -> None:
    """A UID absent from one listing is not forgotten: it is not delivered again when it returns."""
    async with GmailPop(pki, recent_cap=10) as server:
        for n in range(10):
            server.add(message(n))
        await poll(tmp_path, spec(server, tmp_path, recent=True))
        server.recent_cap = 5  # the next listing omits five known messages
        await poll(tmp_path, spec(server, tmp_path, recent=True))
        server.recent_cap = None
        third = await poll(tmp_path, spec(server, tmp_path, recent=True))
        assert third.delivered == 0
        assert sum(delivered_bodies(tmp_path).values()) == 10
        with Store(tmp_path / "state") as store:
            assert len(store.delivered_uids("alice")) == 10


@pytest.mark.parametrize(
    ("fault", "error_type", "hint"),
    [
        (Fault.BAD_CREDENTIALS, AuthError, "app password"),
        (Fault.WEB_LOGIN_REQUIRED, AuthError, "browser"),
        (Fault.APP_PASSWORD_REQUIRED, AuthError, "apppasswords"),
        (Fault.POP_DISABLED, ServerError, "enable POP in Gmail"),
        (Fault.POP_DISABLED_ON_STAT, ServerError, "enable POP in Gmail"),
        (Fault.BANDWIDTH_EXCEEDED, RateLimitedError, "an hour"),
        (Fault.STILL_ENABLING, MailboxBusyError, "still enabling POP"),
    ],
)
async def test_gmail_errors_map_to_hints(
    pki: TestPKI, tmp_path: Path, fault: Fault, error_type: type[Exception], hint: str
) -> None:
    """Each Gmail error text ends the poll with its own error class and a hint; nothing is lost."""
    async with GmailPop(pki, fault=fault) as server:
        uid = server.add(message(1))
        with capture_logs() as logs:
            result = await poll(tmp_path, spec(server, tmp_path))
        assert isinstance(result.error, error_type)
        assert hint in str(result.error)
        summary = [e for e in logs if e["event"] == "poll finished"]
        assert summary
        assert hint in summary[0]["error"]
        assert uid not in server.popped_uids()
        assert delivered_bodies(tmp_path) == Counter()


async def test_skip_sent_skips_mail_from_the_account_itself(pki: TestPKI, tmp_path: Path) -> None:
    """skip_sent: true leaves out messages From the account's own address, and only those."""
    async with GmailPop(pki) as server:
        received = [message(n) for n in range(3)]
        sent = [message(n, sender="Alice <Alice@Gmail.com>") for n in range(3, 5)]
        lookalike = message(5, sender="notalice@gmail.com")
        for data in [*received, *sent, lookalike]:
            server.add(data)
        result = await poll(tmp_path, spec(server, tmp_path, skip_sent="true"))
        assert result.ok, result.error
        assert delivered_bodies(tmp_path) == Counter([*received, lookalike])
        again = await poll(tmp_path, spec(server, tmp_path, recent=True, skip_sent="true"))
        assert again.delivered == 0


async def test_gpopd_poll_never_logs_the_app_password(pki: TestPKI, tmp_path: Path) -> None:
    """`gpopd poll --trace` at debug level: the app password appears in no output line."""
    async with GmailPop(pki) as server:
        for n in range(5):
            server.add(message(n))
        config = write_config(tmp_path, [spec(server, tmp_path)])
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gpopd",
            "poll",
            "--config",
            str(config),
            "--log-level",
            "debug",
            "--trace",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    text = out + err
    assert b"AUTH PLAIN" in text  # the trace ran (Gmail offers SASL PLAIN)
    assert b"***" in text
    plain = base64.b64encode(f"\0{server.username}\0{server.password}".encode())
    for secret in (server.password.encode(), plain):
        assert secret not in text
    assert sum(delivered_bodies(tmp_path).values()) == 5


# --------------------------------------------------------------------- OAuth2


def oauth_config(
    tmp_path: Path, server: GmailPop, tokens: TokenServer, pki: TestPKI, *, auth: str
) -> tuple[Path, dict[str, str]]:
    """A Gmail-like account with OAuth2; returns the config and its secret values."""
    secrets = {
        "client_secret": tokens.client_secret or "",
        "refresh_token": tokens.issue_refresh_token(),
    }
    for name, value in secrets.items():
        path = tmp_path / name
        path.write_text(value + "\n")
        path.chmod(0o600)
    lines = [
        f"state_dir: {tmp_path / 'state'}",
        "accounts:",
        "  alice:",
        "    host: 127.0.0.1",
        f"    port: {server.port}",
        f"    ca_file: {server.ca_file}",
        f"    username: {server.username}",
        f"    auth: {auth}",
        "    timeout: 10s",
        "    oauth:",
        f"      client_id: {tokens.client_id}",
        f"      client_secret: {{file: {tmp_path / 'client_secret'}}}",
        f"      refresh_token: {{file: {tmp_path / 'refresh_token'}}}",
        f"      token_url: {tokens.token_url}",
        f"      ca_file: {pki.ca_file}",
        "    delivery:",
        "      type: maildir",
        f"      path: {tmp_path / 'Maildir'}",
    ]
    config = tmp_path / "gpopd.yaml"
    config.write_text("\n".join(lines) + "\n")
    config.chmod(0o600)
    return config, secrets


def log_text(logs: list[dict[str, object]]) -> str:
    return "\n".join(repr(entry) for entry in logs)


@pytest.mark.parametrize("auth", ["xoauth2", "oauthbearer"])
async def test_oauth_token_rejected_between_polls_is_refreshed(
    pki: TestPKI, tmp_path: Path, auth: str
) -> None:
    """A token the server stops accepting is refreshed once, the poll succeeds, nothing leaks."""
    with TokenServer(pki.server_cert, pki.server_key) as tokens:
        async with GmailPop(pki, token_valid=tokens.valid) as server:
            config, secrets = oauth_config(tmp_path, server, tokens, pki, auth=auth)
            server.add(message(1))
            with capture_logs() as logs:
                [first] = await poll_once(load_config(config, environ={}))
                assert first.ok, first.error
                tokens.expire()  # the cached token dies before its announced expiry
                server.add(message(2))
                [second] = await poll_once(load_config(config, environ={}))
            assert second.ok, second.error
            assert (first.delivered, second.delivered) == (1, 1)
            assert tokens.counts["refresh_token"] == 2
            attempts = [a for a in server.auth_log if a.mechanism == auth.upper()]
            assert [a.ok for a in attempts] == [True, False, True]
            assert {a.form for a in attempts} == {"two-step"}
            assert server.max_command_length <= 255
            text = log_text(logs)
            assert "refreshing" in text
            for value in [*secrets.values(), *tokens.issued_access]:
                assert value not in text
            assert sum(delivered_bodies(tmp_path).values()) == 2


async def test_oauth_expiring_token_is_refreshed_before_use(pki: TestPKI, tmp_path: Path) -> None:
    """A cached token close to its expiry is replaced before the session, not after a refusal."""
    with TokenServer(pki.server_cert, pki.server_key, lifetime=4.0) as tokens:
        async with GmailPop(pki, token_valid=tokens.valid) as server:
            config, _ = oauth_config(tmp_path, server, tokens, pki, auth="xoauth2")
            [first] = await poll_once(load_config(config, environ={}))
            await asyncio.sleep(2.5)
            [second] = await poll_once(load_config(config, environ={}))
            assert first.ok
            assert second.ok
            assert tokens.counts["refresh_token"] == 2
            assert all(a.ok for a in server.auth_log)


async def test_oauth_revoked_refresh_token_is_a_clear_error(pki: TestPKI, tmp_path: Path) -> None:
    """A revoked refresh token fails the account with a `gpopd auth` hint and loses nothing."""
    with TokenServer(pki.server_cert, pki.server_key) as tokens:
        async with GmailPop(pki, token_valid=tokens.valid) as server:
            config, secrets = oauth_config(tmp_path, server, tokens, pki, auth="xoauth2")
            uid = server.add(message(1))
            tokens.revoke(secrets["refresh_token"])
            with capture_logs() as logs:
                [result] = await poll_once(load_config(config, environ={}))
            assert not result.ok
            assert isinstance(result.error, AuthError)
            assert "gpopd auth alice" in str(result.error)
            assert report_for(result).outcome is Outcome.NEEDS_PERSON
            assert uid not in server.popped_uids()
            assert delivered_bodies(tmp_path) == Counter()
            text = log_text(logs)
            for value in secrets.values():
                assert value not in text


@pytest.mark.parametrize(
    ("threshold", "first_sessions"),
    [(None, 1), (200, 2)],
    ids=["other-server-default", "threshold-set"],
)
async def test_server_that_relists_everything_gets_no_batch_sessions(
    tmp_path: Path, threshold: int | None, first_sessions: int
) -> None:
    """Other servers get one session a poll; with the threshold set, one more on the first sync."""
    messages = [message(n) for n in range(250)]
    extra: dict[str, object] = {"timeout": "5s"}
    if threshold is not None:
        extra["gmail_batch_threshold"] = threshold
    async with FakePop3(messages) as server:
        account = AccountSpec(
            "alice",
            server.port,
            server.user,
            server.password,
            tmp_path / "Maildir",
            tls="none",
            extra=extra,
        )
        first = await poll(tmp_path, account)
        assert (first.delivered, first.sessions) == (250, first_sessions)
        server.messages.append(message(250))
        assert server.uids is not None
        server.uids.append("uid-00251")
        second = await poll(tmp_path, account)
        assert (second.delivered, second.sessions) == (1, 1)
        assert server.sessions == first_sessions + 1
