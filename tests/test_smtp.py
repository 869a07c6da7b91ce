"""SMTP relay delivery against real aiosmtpd servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from gpopd.config import SmtpDelivery
from gpopd.delivery.base import CommitResult, MessageInfo, message_key
from gpopd.delivery.relay import (
    EIGHT_BIT_REFUSED,
    RelayCommitResult,
    RelayStaged,
    envelope_sender,
    tls_client_context,
)
from gpopd.delivery.smtp import SmtpDestination
from gpopd.errors import ConfigError, PermanentDeliveryError, TemporaryDeliveryError
from tests.support.certs import TestPKI
from tests.support.dovecot import free_port
from tests.support.smtpd import (
    RecordingHandler,
    RunningServer,
    password_checker,
    running_server,
    server_tls_context,
)

ACCOUNT = "alice@example.com"
TO = "rcpt@example.net"
USER, PASSWORD = "relay-user", "s3cret-relay-pw"
PLAIN = b"From: Sender <sender@example.org>\nSubject: hello\n\nbody line\n"
# Dot lines, a bare CR, a CRLF already there, an empty line: what the
# smuggling class and dot-stuffing bugs are made of.
TRICKY = (
    b"From: sender@example.org\nSubject: dots\n\n"
    b".\n..\n.leading dot\n...\nmid.dle\nbare\rcr\ncrlf\r\n\n.\n"
    b"last line\n"
)
EIGHT_BIT = "From: sender@example.org\nSubject: caf\u00e9\n\n\u00e9t\u00e9 \u2603\n".encode()


def crlf(data: bytes) -> bytes:
    """``data`` as SMTP carries it: every CRLF, bare CR and bare LF become CRLF."""
    return re.sub(rb"\r\n|\n|\r", b"\r\n", data)


def config(server: RunningServer | None = None, **fields: Any) -> SmtpDelivery:
    values: dict[str, Any] = {
        "type": "smtp",
        "host": "127.0.0.1",
        "port": server.port if server else 25,
        "tls": "none",
        "recipient": [TO],
        "timeout": 5,
    }
    values.update(fields)
    return SmtpDelivery.model_validate(values)


def destination(cfg: SmtpDelivery) -> SmtpDestination:
    return SmtpDestination(cfg, local_hostname="client.test")


def stage(dest: SmtpDestination, uid: str, content: bytes, chunk: int = 7) -> RelayStaged:
    writer = dest.open(MessageInfo(ACCOUNT, uid, message_key(ACCOUNT, uid), len(content)))
    for start in range(0, len(content), chunk):
        writer.write(content[start : start + chunk])
    staged = writer.finish()
    assert isinstance(staged, RelayStaged)
    return staged


async def commit(dest: SmtpDestination, *contents: bytes, first: int = 0) -> list[CommitResult]:
    staged = [stage(dest, str(first + n), content) for n, content in enumerate(contents)]
    return await dest.commit(staged)


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with running_server() as running:
        yield running


@pytest.fixture
def tls_server(pki: TestPKI) -> Iterator[RunningServer]:
    context = server_tls_context(pki.server_cert, pki.server_key)
    with running_server(starttls=context, require_starttls=True) as running:
        yield running


# -- content ---------------------------------------------------------------


async def test_content_arrives_byte_exact_modulo_crlf(server: RunningServer) -> None:
    """Dot lines, a line "." alone, a bare CR and CRLF arrive exactly, all line ends CRLF."""
    dest = destination(config(server))
    (result,) = await commit(dest, TRICKY)
    await dest.close()
    assert result.ok
    (received,) = server.received
    assert received.content == crlf(TRICKY)
    assert b"\r\n.\r\n" in received.content  # the "." line survived as content
    assert received.recipients == (TO,)


async def test_eight_bit_content_is_sent_as_8bitmime(server: RunningServer) -> None:
    """8-bit content goes with BODY=8BITMIME and arrives unchanged."""
    dest = destination(config(server))
    (result,) = await commit(dest, EIGHT_BIT)
    await dest.close()
    assert result.ok
    (received,) = server.received
    assert "BODY=8BITMIME" in received.mail_options
    assert received.content == crlf(EIGHT_BIT)


async def test_seven_bit_content_does_not_claim_8bitmime(server: RunningServer) -> None:
    """A pure ASCII message is sent without a BODY parameter."""
    dest = destination(config(server))
    await commit(dest, PLAIN)
    await dest.close()
    assert not any(o.startswith("BODY") for o in server.received[0].mail_options)


async def test_eight_bit_without_8bitmime_is_permanent() -> None:
    """A relay without 8BITMIME gets no 8-bit message, but still the 7-bit ones."""
    with running_server(RecordingHandler(offer_8bitmime=False)) as server:
        dest = destination(config(server))
        eight, seven = await commit(dest, EIGHT_BIT, PLAIN)
        await dest.close()
    assert isinstance(eight.error, PermanentDeliveryError)
    assert EIGHT_BIT_REFUSED in str(eight.error)
    assert seven.ok
    assert [r.content for r in server.received] == [crlf(PLAIN)]


async def test_nul_bytes_are_permanent(server: RunningServer) -> None:
    """A message with a NUL byte is refused locally and never reaches the relay."""
    dest = destination(config(server))
    (result,) = await commit(dest, b"Subject: nul\n\na\0b\n")
    await dest.close()
    assert isinstance(result.error, PermanentDeliveryError)
    assert "NUL" in str(result.error)
    assert server.received == []


async def test_spool_files_are_released_after_commit(server: RunningServer) -> None:
    """Every staged message gives its spool file back once committed."""
    dest = destination(config(server))
    staged = [stage(dest, "1", PLAIN), stage(dest, "2", b"Subject: x\n\0\n")]
    await dest.commit(staged)
    await dest.close()
    assert all(item.file is None for item in staged)


# -- envelope ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "sender"),
    [
        (b"Return-Path: <bounce@list.example>\nFrom: a@b.example\n\nx\n", "bounce@list.example"),
        (b"Return-Path: <>\nFrom: daemon@b.example\n\nx\n", ""),
        (b'From: "Some One" <some.one@b.example>\n\nx\n', "some.one@b.example"),
        (b"From: a@b.example\n\nReturn-Path: <late@c.example>\n", "a@b.example"),
        (b"Subject: nobody\n\nx\n", ""),
        (b"From: not an address\n\nx\n", ""),
        (b'From: "x" <evil@a.example> SIZE=1\r\nRCPT TO:<y@z>\n\nx\n', "evil@a.example"),
        (b"From: <a@b.example> NOTIFY=NEVER\n\nx\n", "a@b.example"),
        (b"From: <a b@c.example>\n\nx\n", ""),
        (b"From: caf\xc3\xa9@b.example\n\nx\n", ""),
    ],
)
def test_envelope_sender_from_headers(head: bytes, sender: str) -> None:
    """The sender comes from the first Return-Path, else From, else the null sender."""
    assert envelope_sender(head) == sender


async def test_sender_defaults_to_the_messages_from(server: RunningServer) -> None:
    """Without a configured sender, MAIL FROM carries the message's own sender."""
    dest = destination(config(server))
    await commit(dest, PLAIN, b"Return-Path: <>\nFrom: daemon@x.example\n\nbounce\n")
    await dest.close()
    assert [r.mail_from for r in server.received] == ["sender@example.org", "<>"]


async def test_configured_sender_wins(server: RunningServer) -> None:
    """A configured sender replaces whatever the message says."""
    dest = destination(config(server, sender="gpopd@relay.example"))
    await commit(dest, PLAIN)
    await dest.close()
    assert server.received[0].mail_from == "gpopd@relay.example"


def test_unusable_recipient_is_a_config_error() -> None:
    """A recipient that could smuggle SMTP parameters is refused when the destination is built."""
    with pytest.raises(ConfigError, match="usable envelope address"):
        destination(config(recipient=["a@b.example NOTIFY=NEVER"]))


# -- TLS and AUTH ------------------------------------------------------------


async def test_starttls_required_and_offered(tls_server: RunningServer, pki: TestPKI) -> None:
    """With tls: starttls the message goes over TLS to a relay that insists on it."""
    dest = destination(config(tls_server, tls="starttls", ca_file=str(pki.ca_file)))
    (result,) = await commit(dest, PLAIN)
    await dest.close()
    assert result.ok
    assert [r.content for r in tls_server.received] == [crlf(PLAIN)]


async def test_starttls_offered_but_optional_is_still_used(pki: TestPKI) -> None:
    """tls: starttls upgrades even when the relay would also accept plaintext."""
    context = server_tls_context(pki.server_cert, pki.server_key)
    with running_server(starttls=context) as server:
        dest = destination(config(server, tls="starttls", ca_file=str(pki.ca_file)))
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert result.ok
    assert [r.tls for r in server.received] == [True]


async def test_tls_none_stays_plain(pki: TestPKI) -> None:
    """tls: none never upgrades, even when the relay offers STARTTLS."""
    context = server_tls_context(pki.server_cert, pki.server_key)
    with running_server(starttls=context) as server:
        dest = destination(config(server, tls="none"))
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert result.ok
    assert [r.tls for r in server.received] == [False]


def test_client_tls_context_verifies() -> None:
    """The client context checks the chain and the host name, and needs TLS 1.2 at least."""
    context = tls_client_context(None)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_starttls_not_offered_aborts(server: RunningServer, pki: TestPKI) -> None:
    """A relay that does not offer STARTTLS gets nothing, not even in plaintext."""
    dest = destination(config(server, tls="starttls", ca_file=str(pki.ca_file)))
    results = await commit(dest, PLAIN, PLAIN)
    await dest.close()
    for result in results:
        assert isinstance(result.error, PermanentDeliveryError)
        assert "does not offer STARTTLS" in str(result.error)
    assert server.received == []


@pytest.mark.parametrize("kind", ["wrong_name", "untrusted", "expired"])
async def test_bad_certificate_is_refused(pki: TestPKI, kind: str) -> None:
    """A certificate with the wrong name, an unknown CA or past its date stops the delivery."""
    cert, key = pki.pair(kind)
    with running_server(starttls=server_tls_context(cert, key)) as server:
        dest = destination(config(server, tls="starttls", ca_file=str(pki.ca_file)))
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert isinstance(result.error, PermanentDeliveryError)
    assert "TLS failed" in str(result.error)
    assert server.received == []


async def test_implicit_tls(pki: TestPKI) -> None:
    """tls: implicit talks TLS from the first byte and checks the certificate."""
    context = server_tls_context(pki.server_cert, pki.server_key)
    with running_server(implicit_tls=context) as server:
        dest = destination(config(server, tls="implicit", ca_file=str(pki.ca_file)))
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert result.ok
    assert len(server.received) == 1


def auth_server(pki: TestPKI, attempts: list[str]) -> Any:
    checker = password_checker(USER, PASSWORD)

    def counting(*args: Any) -> Any:
        attempts.append(args[3])
        return checker(*args)

    return running_server(
        starttls=server_tls_context(pki.server_cert, pki.server_key),
        require_starttls=True,
        authenticator=counting,
        auth_required=True,
    )


async def test_auth_ok(pki: TestPKI) -> None:
    """The relay's AUTH accepts the configured user and password."""
    attempts: list[str] = []
    with auth_server(pki, attempts) as server:
        cfg = config(
            server, tls="starttls", ca_file=str(pki.ca_file), username=USER, password=PASSWORD
        )
        dest = destination(cfg)
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert result.ok
    assert len(server.received) == 1
    assert len(attempts) == 1


async def test_auth_bad_password_is_permanent_and_secret(pki: TestPKI) -> None:
    """A refused password fails the whole window once, and the error never shows it."""
    attempts: list[str] = []
    with auth_server(pki, attempts) as server:
        cfg = config(
            server,
            tls="starttls",
            ca_file=str(pki.ca_file),
            username=USER,
            password="wrong-" + PASSWORD,
        )
        dest = destination(cfg)
        results = await commit(dest, PLAIN, PLAIN)
        await dest.close()
    for result in results:
        assert isinstance(result.error, PermanentDeliveryError)
        assert "535" in str(result.error)
        assert PASSWORD not in str(result.error)
    # One session: the second message did not log in again (aiosmtplib
    # tries each offered mechanism once within that login).
    assert server.handler.sessions == 1
    assert sorted(attempts) == ["LOGIN", "PLAIN"]
    assert server.received == []


# -- replies -----------------------------------------------------------------


async def test_451_then_250_across_two_commits() -> None:
    """A 451 keeps the message for later; the next commit delivers it."""
    handler = RecordingHandler(data_replies=["451 4.3.0 queue full, try later"])
    with running_server(handler) as server:
        dest = destination(config(server))
        (first,) = await commit(dest, PLAIN)
        (second,) = await commit(dest, PLAIN)
        await dest.close()
    assert isinstance(first.error, TemporaryDeliveryError)
    assert "451 4.3.0 queue full, try later" in str(first.error)
    assert second.ok
    assert len(server.received) == 1


async def test_550_is_permanent() -> None:
    """A 550 after the data is a permanent failure with the relay's words."""
    handler = RecordingHandler(data_replies=["550 5.7.1 content rejected"])
    with running_server(handler) as server:
        dest = destination(config(server))
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert isinstance(result.error, PermanentDeliveryError)
    assert "550 5.7.1 content rejected" in str(result.error)
    assert server.received == []


async def test_relay_down_fails_the_whole_window_temporarily() -> None:
    """Connection refused makes every message of the window temporary."""
    dest = destination(config(port=free_port()))
    results = await commit(dest, PLAIN, PLAIN, PLAIN)
    await dest.close()
    assert len(results) == 3
    for result in results:
        assert isinstance(result.error, TemporaryDeliveryError)
        assert "unreachable" in str(result.error)


async def test_silent_relay_times_out_temporarily() -> None:
    """A relay that accepts the connection but never greets fails within the timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        dest = destination(config(port=listener.getsockname()[1], timeout=0.3))
        results = await asyncio.wait_for(commit(dest, PLAIN, PLAIN), 5)
        await dest.close()
    assert all(isinstance(r.error, TemporaryDeliveryError) for r in results)


async def test_one_connection_for_the_whole_poll(server: RunningServer) -> None:
    """Several commits of several messages share one session, closed by QUIT."""
    dest = destination(config(server))
    results = await commit(dest, PLAIN, TRICKY)
    results += await commit(dest, EIGHT_BIT, PLAIN, first=2)
    await dest.close()
    await asyncio.sleep(0.05)
    assert all(result.ok for result in results)
    assert len(server.received) == 4
    assert {r.session for r in server.received} == {0}
    assert server.handler.sessions == 1
    assert server.handler.quits == 1


async def test_reconnects_once_after_the_relay_dropped_the_session(
    server: RunningServer,
) -> None:
    """A session closed by the relay between messages is replaced by a new one."""
    dest = destination(config(server))
    (first,) = await commit(dest, PLAIN)
    server.drop_connection()
    await asyncio.sleep(0.1)
    (second,) = await commit(dest, PLAIN, first=1)
    await dest.close()
    assert first.ok
    assert second.ok
    assert [r.session for r in server.received] == [0, 1]


# -- recipients --------------------------------------------------------------


async def test_some_recipients_refused_permanently() -> None:
    """One of three recipients refused with 5xx: delivered to the others, with a warning."""
    handler = RecordingHandler(refuse={"gone@example.net": "550 5.1.1 no such user"})
    with running_server(handler) as server:
        cfg = config(server, recipient=["a@example.net", "gone@example.net", "b@example.net"])
        dest = destination(cfg)
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert result.ok
    assert isinstance(result, RelayCommitResult)
    assert result.warning is not None
    assert "gone@example.net" in result.warning
    assert "550 5.1.1 no such user" in result.warning
    assert server.received[0].recipients == ("a@example.net", "b@example.net")


async def test_all_recipients_refused_is_permanent() -> None:
    """When every recipient is refused with 5xx the message fails permanently."""
    handler = RecordingHandler(
        refuse={"x@example.net": "550 5.1.1 no x", "y@example.net": "553 5.1.3 bad y"}
    )
    with running_server(handler) as server:
        dest = destination(config(server, recipient=["x@example.net", "y@example.net"]))
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert isinstance(result.error, PermanentDeliveryError)
    assert "550 5.1.1 no x" in str(result.error)
    assert "553 5.1.3 bad y" in str(result.error)
    assert server.received == []


async def test_a_deferred_recipient_holds_the_whole_message() -> None:
    """A 4xx for one recipient sends the message to nobody now (everybody later)."""
    handler = RecordingHandler(refuse={"busy@example.net": "450 4.2.1 mailbox busy"})
    with running_server(handler) as server:
        dest = destination(config(server, recipient=["a@example.net", "busy@example.net"]))
        (result,) = await commit(dest, PLAIN)
        (after,) = await commit(dest, PLAIN, first=1)
        await dest.close()
    assert isinstance(result.error, TemporaryDeliveryError)
    assert "450 4.2.1 mailbox busy" in str(result.error)
    assert isinstance(after.error, TemporaryDeliveryError)
    assert server.received == []  # RSET: the accepted recipient got nothing either


async def test_relay_is_at_least_once() -> None:
    """An SMTP relay cannot recognise earlier deliveries, and says so."""
    dest = destination(config())
    assert dest.exactly_once is False
    assert await dest.find_delivered(ACCOUNT, [message_key(ACCOUNT, "1")]) == set()


def test_name_shows_the_relay() -> None:
    """The destination's name carries the relay's host and port for the logs."""
    assert destination(config(port=2525)).name == "smtp:127.0.0.1:2525"


async def test_reconnects_once_when_the_relay_closes_at_mail() -> None:
    """A reused session answered by 421 at MAIL is replaced once, and the message delivered."""
    handler = RecordingHandler(mail_replies=[None, "421 4.4.2 idle too long, closing"])
    with running_server(handler) as server:
        dest = destination(config(server))
        (first,) = await commit(dest, PLAIN)
        (second,) = await commit(dest, PLAIN, first=1)
        await dest.close()
    assert first.ok
    assert second.ok
    assert [r.session for r in server.received] == [0, 1]


async def test_no_second_try_on_a_fresh_session() -> None:
    """A 421 on a session opened for this very message is not retried."""
    handler = RecordingHandler(mail_replies=["421 4.3.2 shutting down"] * 3)
    with running_server(handler) as server:
        dest = destination(config(server))
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert isinstance(result.error, TemporaryDeliveryError)
    assert "421 4.3.2 shutting down" in str(result.error)
    assert server.handler.sessions == 1
    assert server.received == []


async def test_abort_after_finish_discards_the_spool(server: RunningServer) -> None:
    """A staged message aborted before its commit is released and cannot be committed."""
    dest = destination(config(server))
    writer = dest.open(MessageInfo(ACCOUNT, "1", message_key(ACCOUNT, "1")))
    writer.write(PLAIN)
    staged = writer.finish()
    writer.abort()
    assert isinstance(staged, RelayStaged)
    assert staged.file is None
    with pytest.raises(ValueError, match="already committed or aborted"):
        await dest.commit([staged])
    await dest.close()
    assert server.received == []


async def test_non_ascii_recipient_uses_smtputf8(server: RunningServer) -> None:
    """A non-ASCII recipient is sent with SMTPUTF8 when the relay offers it."""
    dest = destination(config(server, recipient=["jos\u00e9@example.net"]))
    (result,) = await commit(dest, PLAIN)
    await dest.close()
    assert result.ok
    (received,) = server.received
    assert received.recipients == ("jos\u00e9@example.net",)
    assert "SMTPUTF8" in received.mail_options
