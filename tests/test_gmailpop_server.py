"""The Gmail-like test server behaves as PROTOCOL.md records Gmail, seen by a bare client."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket

import pytest

from tests.support.certs import TestPKI
from tests.support.gmailpop import (
    DEFAULT_ADDRESS,
    DEFAULT_TOKEN,
    Fault,
    GmailPop,
    oauthbearer_payload,
    xoauth2_payload,
)
from tests.support.gmailwire import (
    CAPA_AFTER_LOGIN,
    CAPA_BEFORE_LOGIN,
    ERROR_JSON,
    parse_oauthbearer,
    parse_xoauth2,
)

UID = re.compile(r"GmailId[0-9a-f]{16}")
ERROR_CHALLENGE_LINE = b"+ " + base64.b64encode(ERROR_JSON)


def message(n: int, sender: str = "bob@example.net") -> bytes:
    return f"From: {sender}\nSubject: n{n}\n\nbody {n}\n.dotted\n".encode()


class Client:
    """A minimal POP3 client that sends exactly what a test tells it to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting = b""

    @classmethod
    async def connect(cls, server: GmailPop, pki: TestPKI | None = None) -> Client:
        context = pki.client_context() if pki is not None else None
        reader, writer = await asyncio.open_connection(
            server.host, server.port, ssl=context, server_hostname="localhost" if pki else None
        )
        client = cls(reader, writer)
        client.greeting = await client.line()
        return client

    async def line(self) -> bytes:
        return (await asyncio.wait_for(self.reader.readline(), 10)).rstrip(b"\r\n")

    async def send(self, *lines: bytes | str) -> None:
        self.writer.write(
            b"".join((x.encode() if isinstance(x, str) else x) + b"\r\n" for x in lines)
        )
        await self.writer.drain()

    async def cmd(self, line: bytes | str) -> bytes:
        await self.send(line)
        return await self.line()

    async def body(self) -> list[bytes]:
        out = []
        while (line := await self.line()) != b".":
            out.append(line[1:] if line.startswith(b".") else line)
        return out

    async def multi(self, line: str) -> list[bytes]:
        status = await self.cmd(line)
        assert status.startswith(b"+OK"), status
        return await self.body()

    async def login(self, user: str, password: str) -> bytes:
        assert await self.cmd(f"USER {user}") == b"+OK send PASS"
        return await self.cmd(f"PASS {password}")

    async def uids(self) -> list[str]:
        return [row.split(b" ")[1].decode() for row in await self.multi("UIDL")]

    async def retr_all(self, count: int) -> list[list[bytes]]:
        # Pipelined, as Gmail's post-login CAPA allows.
        await self.send(*(f"RETR {n}" for n in range(1, count + 1)))
        out = []
        for _ in range(count):
            assert (await self.line()).startswith(b"+OK")
            out.append(await self.body())
        return out

    async def quit(self) -> bytes:
        reply = await self.cmd("QUIT")
        await self.close()
        return reply

    async def close(self) -> None:
        """Drop the connection at once, as a crashed client would."""
        self.writer.transport.abort()
        await self.writer.wait_closed()


async def session(server: GmailPop, user: str | None = None, *, retr: bool = True) -> list[str]:
    """One QUIT-ended session that downloads everything listed; returns the UIDs."""
    client = await Client.connect(server)
    assert await client.login(user or server.username, server.password) == b"+OK Welcome."
    uids = await client.uids()
    if retr:
        await client.retr_all(len(uids))
    assert await client.quit() == b"+OK Farewell."
    return uids


async def test_greeting_capa_and_replies_are_gmails(pki: TestPKI) -> None:
    """Over implicit TLS the greeting, both CAPA lists and the login replies match Gmail's."""
    async with GmailPop(pki) as server:
        server.add(message(1))
        client = await Client.connect(server, pki)
        assert re.fullmatch(rb"\+OK Gpop ready for requests from 127\.0\.0\.1 \S+", client.greeting)
        assert await client.multi("CAPA") == [c.encode() for c in CAPA_BEFORE_LOGIN]
        assert b"SASL PLAIN XOAUTH2 OAUTHBEARER" in await client.multi("CAPA")
        assert await client.login(server.username, server.password) == b"+OK Welcome."
        after = await client.multi("CAPA")
        assert after == [c.encode() for c in CAPA_AFTER_LOGIN]
        assert b"PIPELINING" in after
        assert not any(c.startswith(b"SASL") for c in after)
        assert await client.quit() == b"+OK Farewell."
    assert server.ca_file == pki.ca_file


async def test_pipelined_login_and_listing_answer_in_order() -> None:
    """USER, PASS, STAT, UIDL and QUIT sent in one write get their replies in order."""
    async with GmailPop(tls=False) as server:
        uids = [server.add(message(n)) for n in range(2)]
        client = await Client.connect(server)
        await client.send(
            f"USER {server.username}", f"PASS {server.password}", "STAT", "UIDL", "QUIT"
        )
        assert await client.line() == b"+OK send PASS"
        assert await client.line() == b"+OK Welcome."
        size = sum(m.size for m in server.messages)
        assert await client.line() == f"+OK 2 {size}".encode()
        assert await client.line() == b"+OK"
        assert await client.body() == [f"{n} {u}".encode() for n, u in enumerate(uids, 1)]
        assert await client.line() == b"+OK Farewell."
        await client.close()


async def test_normal_mode_serves_batches_of_the_oldest_unpopped() -> None:
    """600 messages come as 250, 250 and 100 oldest first, each popped only by its QUIT."""
    async with GmailPop(tls=False) as server:
        for n in range(599):
            server.add(message(n))
        oldest = server.add(message(999), age_days=400)
        assert all(UID.fullmatch(m.uid) for m in server.messages)
        batches = [await session(server) for _ in range(4)]
    assert [len(b) for b in batches] == [250, 250, 100, 0]
    assert batches[0][0] == oldest
    assert batches[0][1:] == [m.uid for m in server.messages[:249]]
    assert len({u for b in batches for u in b}) == 600
    assert set(server.retrs.values()) == {1}
    assert server.sessions_opened == server.sessions_quit == 4
    assert server.popped_uids() == {m.uid for m in server.messages}


async def test_batch_size_is_configurable_and_messages_added_later_join_the_queue() -> None:
    """A batch_size of 3 lists three messages, and a message added between sessions is listed."""
    async with GmailPop(tls=False, batch_size=3) as server:
        first = [server.add(message(n)) for n in range(4)]
        assert await session(server) == first[:3]
        late = server.add(message(9))
        assert await session(server) == [first[3], late]


async def test_dropped_session_pops_nothing_and_dele_removes_nothing() -> None:
    """RETR and DELE without QUIT leave every message listed; DELE alone never removes one."""
    async with GmailPop(tls=False) as server:
        uids = [server.add(message(n)) for n in range(3)]
        client = await Client.connect(server)
        await client.login(server.username, server.password)
        await client.retr_all(3)
        assert await client.cmd("DELE 1") == b"+OK marked for deletion"
        assert await client.cmd("RETR 1") == b"-ERR no such message"
        assert len(await client.multi("UIDL")) == 2
        await client.close()
        await asyncio.sleep(0.05)
        assert server.popped_uids() == set()
        assert await session(server, retr=False) == uids
        assert server.deles[uids[0]] == 1
        assert len(server.messages) == 3
        # The session above downloaded nothing, so it popped nothing.
        assert server.popped_uids() == set()
        assert server.sessions_quit == 1


async def test_top_does_not_pop_and_dele_with_quit_does() -> None:
    """TOP returns headers, the blank line and k body lines without popping; DELE+QUIT pops."""
    async with GmailPop(tls=False) as server:
        uids = [server.add(message(n)) for n in range(2)]
        client = await Client.connect(server)
        await client.login(server.username, server.password)
        assert await client.multi("TOP 1 0") == [b"From: bob@example.net", b"Subject: n0", b""]
        assert (await client.multi("TOP 1 2"))[-2:] == [b"body 0", b".dotted"]
        assert await client.cmd("DELE 2") == b"+OK marked for deletion"
        assert await client.quit() == b"+OK Farewell."
        assert server.tops[uids[0]] == 2
        assert server.popped_uids() == {uids[1]}
        assert await session(server) == [uids[0]]


async def test_retr_sends_the_message_dot_stuffed() -> None:
    """RETR answers with the message in CRLF lines, dot-stuffed, and counts the download."""
    async with GmailPop(tls=False) as server:
        uid = server.add(message(7))
        client = await Client.connect(server)
        await client.login(server.username, server.password)
        await client.send("RETR 1")
        assert (await client.line()).startswith(b"+OK")
        raw = await client.reader.readuntil(b"\r\n.\r\n")
        assert raw == b"From: bob@example.net\r\nSubject: n7\r\n\r\nbody 7\r\n..dotted\r\n.\r\n"
        await client.close()
    assert server.retrs[uid] == 1


async def test_recent_mode_relists_the_last_30_days_every_session() -> None:
    """recent: lists the last 30 days on every session, popped or not, and can be capped."""
    async with GmailPop(tls=False) as server:
        old = server.add(message(0), age_days=45)
        mid = server.add(message(1), age_days=10)
        new = server.add(message(2))
        first = await session(server, server.recent_username)
        second = await session(server, server.recent_username)
        assert first == second == [mid, new]
        assert server.retrs[mid] == 2
        # Normal mode still offers what recent mode never listed.
        assert await session(server) == [old]
        assert await session(server, server.recent_username) == [mid, new]
        server.recent_cap = 1
        assert await session(server, server.recent_username) == [mid]


async def test_xoauth2_two_step_logs_in_without_an_overlong_line() -> None:
    """AUTH XOAUTH2, an empty continuation, then the payload logs in; no line exceeds 255."""
    async with GmailPop(tls=False) as server:
        payload = base64.b64encode(xoauth2_payload(server.username, DEFAULT_TOKEN))
        assert len(b"AUTH XOAUTH2 " + payload + b"\r\n") > 255
        client = await Client.connect(server)
        assert await client.cmd("AUTH XOAUTH2") == b"+ "
        assert await client.cmd(payload) == b"+OK Welcome."
        assert await client.quit() == b"+OK Farewell."
    assert server.max_command_length <= 255
    assert server.sasl_responses == [payload + b"\r\n"]
    [attempt] = server.auth_log
    assert (attempt.mechanism, attempt.form, attempt.ok) == ("XOAUTH2", "two-step", True)
    assert server.auth_mechanisms == {"XOAUTH2": 1}
    assert server.lines[0] == b"AUTH XOAUTH2\r\n"


async def test_one_line_forms_are_accepted_and_recorded() -> None:
    """One-line XOAUTH2 and OAUTHBEARER log in, and the overlong line is visible in the record."""
    async with GmailPop(tls=False) as server:
        for mechanism, build in (
            ("XOAUTH2", xoauth2_payload),
            ("OAUTHBEARER", oauthbearer_payload),
        ):
            client = await Client.connect(server)
            payload = base64.b64encode(build(server.recent_username, DEFAULT_TOKEN)).decode()
            assert await client.cmd(f"AUTH {mechanism} {payload}") == b"+OK Welcome."
            assert await client.quit() == b"+OK Farewell."
    assert [a.form for a in server.auth_log] == ["one-line", "one-line"]
    assert server.max_command_length > 255
    assert server.sasl_responses == []


@pytest.mark.parametrize("answer", [b"", b"*"])
async def test_xoauth2_bad_token_gets_the_json_continuation_then_err(answer: bytes) -> None:
    """A rejected token gets a base64 JSON continuation; an empty line or * then gets -ERR."""
    async with GmailPop(tls=False) as server:
        client = await Client.connect(server)
        assert await client.cmd("AUTH XOAUTH2") == b"+ "
        challenge = await client.cmd(base64.b64encode(xoauth2_payload(server.username, "nope")))
        assert challenge.startswith(b"+ eyJzdGF0dXMiOiI0MDAi")
        error = json.loads(base64.b64decode(challenge[2:]))
        assert error == {"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"}
        assert await client.cmd(answer) == b"-ERR [AUTH] Invalid credentials"
        assert await client.login(server.username, server.password) == b"+OK Welcome."
        await client.close()
    assert server.auth_log[0].error_response == answer
    assert not server.auth_log[0].ok


async def test_oauthbearer_error_is_answered_with_aq() -> None:
    """OAUTHBEARER's error challenge wants AQ==; an empty line instead is a protocol error."""
    checked: list[str] = []

    def valid(token: str) -> bool:
        checked.append(token)
        return token == "fresh"

    async with GmailPop(tls=False, token_valid=valid) as server:
        bad = base64.b64encode(oauthbearer_payload(server.username, "stale"))
        good = base64.b64encode(oauthbearer_payload(server.username, "fresh", port=None))
        client = await Client.connect(server)
        assert await client.cmd("AUTH OAUTHBEARER") == b"+ "
        assert await client.cmd(bad) == ERROR_CHALLENGE_LINE
        assert await client.cmd("AQ==") == b"-ERR [AUTH] Invalid credentials"
        assert await client.cmd("AUTH OAUTHBEARER") == b"+ "
        assert await client.cmd(bad) == ERROR_CHALLENGE_LINE
        assert (await client.cmd("")).startswith(b"-ERR [AUTH] Invalid response")
        assert await client.cmd("AUTH OAUTHBEARER") == b"+ "
        assert await client.cmd(good) == b"+OK Welcome."
        await client.close()
    assert checked == ["stale", "stale", "fresh"]
    assert [a.error_response for a in server.auth_log] == [b"AQ==", b"", None]


async def test_plain_and_malformed_sasl() -> None:
    """PLAIN takes the app password; bad base64, bad payloads and * get -ERR, not a challenge."""
    async with GmailPop(tls=False) as server:
        client = await Client.connect(server)
        wrong = base64.b64encode(f"\0{server.username}\0guess".encode()).decode()
        assert await client.cmd(f"AUTH PLAIN {wrong}") == (
            b"-ERR [AUTH] Username and password not accepted."
        )
        assert await client.cmd("AUTH XOAUTH2 not*base64") == b"-ERR [AUTH] Invalid SASL argument"
        loose = base64.b64encode(b"user=alice@gmail.com\x01auth=Bearer x\x01").decode()
        assert await client.cmd(f"AUTH XOAUTH2 {loose}") == b"-ERR [AUTH] Invalid SASL argument"
        assert await client.cmd("AUTH OAUTHBEARER") == b"+ "
        assert await client.cmd("*") == b"-ERR [AUTH] Authentication cancelled"
        right = base64.b64encode(f"\0{server.username}\0{server.password}".encode()).decode()
        assert await client.cmd(f"AUTH PLAIN {right}") == b"+OK Welcome."
        await client.close()
    assert server.auth_mechanisms == {"PLAIN": 2, "XOAUTH2": 2, "OAUTHBEARER": 1}


def test_payload_parsers_are_strict() -> None:
    """The SASL payload parsers accept the documented layouts and nothing looser."""
    assert parse_xoauth2(xoauth2_payload("a@b", "tok")) == ("a@b", "tok")
    assert parse_oauthbearer(oauthbearer_payload("a@b", "tok")) == ("a@b", "tok")
    assert parse_oauthbearer(oauthbearer_payload("a@b", "tok", None, None)) == ("a@b", "tok")
    for bad in (
        b"user=a@b\x01auth=Bearer tok\x01",
        b"user=a@b\x01auth=bearer tok\x01\x01",
        b"user=\x01auth=Bearer tok\x01\x01",
        b"user=a@b\x01auth=Bearer tok\x01x=y\x01\x01",
    ):
        assert parse_xoauth2(bad) is None, bad
    for bad in (
        b"n,,\x01auth=Bearer tok\x01\x01",
        b"n,a=a@b,\x01auth=Bearer tok\x01",
        b"n,a=a@b,\x01port=x\x01auth=Bearer tok\x01\x01",
        b"n,a=a@b,\x01host=h\x01\x01",
        b"n,a=a@b,\x01auth=Bearer tok\x01auth=Bearer tok\x01\x01",
    ):
        assert parse_oauthbearer(bad) is None, bad


LOGIN_FAULTS = [
    (Fault.BAD_CREDENTIALS, b"-ERR [AUTH] Username and password not accepted."),
    (
        Fault.WEB_LOGIN_REQUIRED,
        b"-ERR [AUTH] Web login required: https://support.google.com/mail/answer/78754",
    ),
    (
        Fault.APP_PASSWORD_REQUIRED,
        b"-ERR [AUTH] Application-specific password required:"
        b" https://support.google.com/accounts/answer/185833",
    ),
    (
        Fault.POP_DISABLED,
        b"-ERR [SYS/PERM] Your account is not enabled for POP access. Please visit your Gmail"
        b" settings page and enable your account for POP access.",
    ),
    (Fault.BANDWIDTH_EXCEEDED, b"-ERR [SYS/TEMP] Account exceeded POP command or bandwidth limits"),
    (
        Fault.STILL_ENABLING,
        b"-ERR [SYS/TEMP] We are still working on enabling pop for your account so windowed mode"
        b" is not available. Try again later or consider using POP3 in recent mode.",
    ),
]


@pytest.mark.parametrize(("fault", "text"), LOGIN_FAULTS, ids=lambda v: getattr(v, "name", ""))
async def test_login_fault_answers_pass_with_gmails_text(fault: Fault, text: bytes) -> None:
    """Each login fault answers a correct PASS with Gmail's exact line and logs nobody in."""
    async with GmailPop(tls=False, fault=fault) as server:
        server.add(message(1))
        client = await Client.connect(server)
        assert await client.login(server.username, server.password) == text
        assert await client.cmd("STAT") == b"-ERR bad command"
        await client.close()
        server.fault = None
        assert len(await session(server)) == 1
    assert server.logins == 1


async def test_fault_scope_follows_gmail() -> None:
    """Password faults spare OAuth, POP-disabled stops OAuth too, still-enabling spares recent:."""
    token = base64.b64encode(xoauth2_payload(DEFAULT_ADDRESS, DEFAULT_TOKEN)).decode()
    async with GmailPop(tls=False, fault=Fault.APP_PASSWORD_REQUIRED) as server:
        client = await Client.connect(server)
        assert await client.cmd(f"AUTH XOAUTH2 {token}") == b"+OK Welcome."
        await client.close()
        server.fault = Fault.POP_DISABLED
        client = await Client.connect(server)
        assert (await client.cmd(f"AUTH XOAUTH2 {token}")).startswith(b"-ERR [SYS/PERM]")
        await client.close()
        server.fault = Fault.STILL_ENABLING
        assert await session(server, server.recent_username) == []


async def test_pop_disabled_on_stat_lets_login_succeed() -> None:
    """The STAT variant logs in with +OK Welcome. and answers STAT with the SYS/PERM text."""
    async with GmailPop(tls=False, fault=Fault.POP_DISABLED_ON_STAT) as server:
        client = await Client.connect(server)
        assert await client.login(server.username, server.password) == b"+OK Welcome."
        assert await client.cmd("STAT") == Fault.POP_DISABLED_ON_STAT.text.rstrip(b"\r\n")
        assert await client.cmd("NOOP") == b"+OK"
        assert await client.quit() == b"+OK Farewell."


async def test_counters_and_sender() -> None:
    """Sessions, QUITs, line lengths and each message's From are recorded."""
    async with GmailPop(tls=False) as server:
        server.add(message(1, sender="Alice <ALICE@gmail.com>"))
        client = await Client.connect(server)
        assert await client.cmd("X" * 300) == b"-ERR bad command"
        assert await client.cmd("QUIT") == b"+OK Farewell."
        await client.close()
        await session(server)
    assert server.messages[0].sender == "alice@gmail.com"
    assert server.max_line_length == 302
    assert (server.sessions_opened, server.sessions_quit, server.logins) == (2, 1, 1)


def test_server_runs_in_a_thread_for_synchronous_clients(pki: TestPKI) -> None:
    """running_in_thread serves TLS clients from a blocking socket."""
    server = GmailPop(pki)
    server.add(message(1))
    with server.running_in_thread():
        raw = socket.create_connection((server.host, server.port), timeout=10)
        with pki.client_context().wrap_socket(raw, server_hostname="localhost") as conn:
            stream = conn.makefile("rwb")
            assert stream.readline().startswith(b"+OK Gpop ready")
            stream.write(b"USER alice@gmail.com\r\nPASS " + server.password.encode() + b"\r\n")
            stream.write(b"STAT\r\nQUIT\r\n")
            stream.flush()
            replies = [stream.readline() for _ in range(4)]
    assert replies[1:] == [
        b"+OK Welcome.\r\n",
        f"+OK 1 {server.messages[0].size}\r\n".encode(),
        b"+OK Farewell.\r\n",
    ]
    assert server.sessions_quit == 1


def test_tls_needs_a_pki() -> None:
    """Asking for implicit TLS without certificates is refused at construction."""
    with pytest.raises(ValueError, match="TestPKI"):
        GmailPop()


async def test_stopping_with_a_session_open_drops_it_cleanly(pki: TestPKI) -> None:
    """Leaving the context while a TLS client is logged in drops that client, pops nothing."""
    async with GmailPop(pki) as server:
        server.add(message(1))
        client = await Client.connect(server, pki)
        assert await client.login(server.username, server.password) == b"+OK Welcome."
        assert len(await client.retr_all(1)) == 1
    assert await client.reader.read() == b""
    await client.close()
    assert server.popped_uids() == set()
    assert (server.sessions_opened, server.sessions_quit) == (1, 0)
