"""Broken and hostile servers: a clean error for that account, nothing lost or recorded wrongly."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from gpopd.config import load_config
from gpopd.errors import TlsError
from gpopd.fetch import PollResult, poll_once
from gpopd.store import Store
from tests.support.corpus import expected_delivery, mixed_corpus
from tests.support.fakepop import CloseAfter, FakePop3, stuff
from tests.support.gpopd_config import AccountSpec, maildir_contents, write_config

MESSAGES = mixed_corpus(6, seed=21)


def spec(server: FakePop3, tmp_path: Path, name: str = "alice", keep: bool = False) -> AccountSpec:
    return AccountSpec(
        name,
        server.port,
        server.user,
        server.password,
        tmp_path / name,
        tls="none",
        keep=keep,
        extra={"timeout": "5s"},  # a hang shows up as a failure, not a stuck suite
    )


async def poll(tmp_path: Path, *specs: AccountSpec) -> list[PollResult]:
    config = write_config(tmp_path, list(specs))
    return await poll_once(load_config(config, environ={}))


def delivered_uids(tmp_path: Path, account: str = "alice") -> set[str]:
    with Store(tmp_path / "state") as store:
        return store.delivered_uids(account)


BROKEN_REPLIES = {
    "garbage status": ("STAT", lambda a, s: b"HELLO? \x00\xff\r\n", "HELLO?"),
    "overlong status line": ("STAT", lambda a, s: b"+OK " + b"9" * (2 * 1024 * 1024), "512"),
    "count not honoured": ("STAT", lambda a, s: b"+OK 9 1000\r\n", "9 messages in STAT"),
    "illegal uid": ("UIDL", lambda a, s: b"+OK\r\n1 bad\x01uid\r\n.\r\n", "UID"),
    "overlong uid": ("UIDL", lambda a, s: b"+OK\r\n1 " + b"u" * 71 + b"\r\n.\r\n", "UID"),
    "repeated number": ("UIDL", lambda a, s: b"+OK\r\n1 a\r\n1 b\r\n.\r\n", "1"),
    "busy on retr": ("RETR", lambda a, s: b"-ERR [SYS/TEMP] try later\r\n", "try later"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_REPLIES))
async def test_broken_reply_is_a_clean_account_error(tmp_path: Path, case: str) -> None:
    """Each broken reply ends the poll with an error naming the server's words; nothing deleted."""
    verb, reply, words = BROKEN_REPLIES[case]
    async with FakePop3(MESSAGES, script={verb: reply}) as server:
        [result] = await poll(tmp_path, spec(server, tmp_path))
    assert result.outcome != "ok"
    assert result.error is not None
    assert words in str(result.error)
    assert server.quits == 0, "QUIT after a failure would let the server apply DELEs"
    assert server.deleted == set()
    assert result.delivered == len(delivered_uids(tmp_path))


async def test_drop_mid_retr_keeps_what_was_whole_and_recovers(tmp_path: Path) -> None:
    """A connection cut inside RETR 4: 1-3 are kept, 4 is not recorded, the next poll completes."""

    def cut(args: list[str], server: FakePop3) -> bytes | None:
        n = int(args[0])
        body = b"+OK\r\n" + stuff(server.messages[n - 1])
        return CloseAfter(body[: len(body) // 2]) if n == 4 else body

    async with FakePop3(MESSAGES, script={"RETR": cut}) as server:
        [first] = await poll(tmp_path, spec(server, tmp_path))
        assert first.outcome in ("network-error", "protocol-error"), first.error
        assert server.quits == 0
        assert server.deleted == set()
        assert "uid-00004" not in delivered_uids(tmp_path)
        assert not any((tmp_path / "alice" / "tmp").iterdir())
        server.script.clear()
        [second] = await poll(tmp_path, spec(server, tmp_path))
    assert second.outcome == "ok", second.error
    assert maildir_contents(tmp_path / "alice") == sorted(map(expected_delivery, MESSAGES))
    assert delivered_uids(tmp_path) == {f"uid-{n:05d}" for n in range(1, 7)}


async def test_half_a_message_then_close(tmp_path: Path) -> None:
    """Half of a message followed by EOF is not stored, even partly."""

    def half(args: list[str], server: FakePop3) -> bytes | None:
        body = b"+OK\r\n" + stuff(server.messages[int(args[0]) - 1])
        return CloseAfter(body[: len(body) // 2])

    async with FakePop3(MESSAGES[:1], script={"RETR": half}) as server:
        [result] = await poll(tmp_path, spec(server, tmp_path))
    assert result.outcome != "ok"
    assert maildir_contents(tmp_path / "alice") == []
    assert delivered_uids(tmp_path) == set()


async def test_duplicate_uids_are_each_fetched_once(tmp_path: Path) -> None:
    """Two messages sharing a UID are both delivered, once each, across polls."""
    uids = ["same", "same", "other"]
    async with FakePop3(MESSAGES[:3], uids=uids) as server:
        [first] = await poll(tmp_path, spec(server, tmp_path, keep=True))
        [second] = await poll(tmp_path, spec(server, tmp_path, keep=True))
    assert (first.outcome, first.delivered) == ("ok", 3)
    assert (second.delivered, second.skipped) == (0, 3)
    assert maildir_contents(tmp_path / "alice") == sorted(map(expected_delivery, MESSAGES[:3]))


async def test_a_hostile_server_does_not_stop_other_accounts(tmp_path: Path) -> None:
    """One account's garbage server fails that account only; the other delivers."""
    bad_script = {"UIDL": lambda a, s: b"+OK\r\n" + b"x" * 5_000_000}
    async with FakePop3(MESSAGES, script=bad_script) as bad, FakePop3(MESSAGES) as good:
        results = await poll(tmp_path, spec(bad, tmp_path, "bad"), spec(good, tmp_path, "good"))
    outcome = {r.account: r.outcome for r in results}
    assert outcome["good"] == "ok"
    assert outcome["bad"] == "protocol-error"
    assert len(maildir_contents(tmp_path / "good")) == len(MESSAGES)
    assert good.deleted == set(range(1, len(MESSAGES) + 1))
    assert bad.deleted == set()


async def test_wrong_password_is_an_auth_error(tmp_path: Path) -> None:
    """-ERR [AUTH] to PASS is reported as an authentication failure, nothing fetched."""
    async with FakePop3(MESSAGES) as server:
        account = spec(server, tmp_path)
        account.password = "not-the-password"
        [result] = await poll(tmp_path, account)
    assert result.outcome == "AuthError"
    assert "bad password" in str(result.error)
    assert "not-the-password" not in str(result.error)
    assert "RETR" not in server.commands


def stls_spec(server: FakePop3, tmp_path: Path) -> AccountSpec:
    account = spec(server, tmp_path)
    account.tls = "starttls"
    return account


STLS_ATTACKS = {
    "not offered": {},
    "refused": {"STLS": lambda a, s: b"-ERR TLS not available\r\n"},
    "plaintext injected after +OK": {
        "STLS": lambda a, s: b"+OK Begin TLS\r\n+OK INJECTED-PLAINTEXT\r\n"
    },
    "plaintext in a later segment": {
        "STLS": lambda a, s: CloseAfter(b"+OK Begin TLS\r\n" + b"+OK not TLS at all\r\n" * 40)
    },
}


@pytest.mark.parametrize("attack", sorted(STLS_ATTACKS))
async def test_stls_stripping_is_refused_before_credentials(
    tmp_path: Path, pki_ca_file: Path, attack: str
) -> None:
    """With tls: starttls, a missing, refused or tampered STLS aborts before USER/PASS."""
    script = dict(STLS_ATTACKS[attack])
    async with FakePop3(MESSAGES, script=script) as server:
        if attack != "not offered":
            server.capabilities = (*server.capabilities, "STLS")
        account = stls_spec(server, tmp_path)
        account.ca_file = pki_ca_file
        [result] = await poll(tmp_path, account)
    assert isinstance(result.error, TlsError), result.error
    assert "USER" not in server.commands
    assert "PASS ***" not in server.commands
    assert not any(cmd.startswith("AUTH") for cmd in server.commands)


@pytest.fixture
def pki_ca_file(pki: object) -> Path:
    """The test CA, so that only the STLS behaviour decides the outcome."""
    return pki.ca_file  # type: ignore[attr-defined, no-any-return]


async def test_server_ignoring_the_auth_initial_response_still_logs_in(tmp_path: Path) -> None:
    """A server that answers AUTH PLAIN <credentials> with "+ " gets them again and lets us in."""
    user, password = "alice", "s3cret"
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    seen: list[str] = []

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK ready\r\n")
        authed = False
        while line := await reader.readline():
            text = line.decode().rstrip("\r\n")
            seen.append(text.split(" ")[0] if text != token else "<credentials>")
            verb = text.split(" ")[0].upper()
            if verb == "CAPA":
                writer.write(b"+OK\r\nSASL PLAIN\r\nUIDL\r\n.\r\n")
            elif verb == "AUTH":
                writer.write(b"+ \r\n")  # the initial response is ignored
            elif text == token and not authed:
                authed = True
                writer.write(b"+OK welcome\r\n")
            elif verb == "STAT" and authed:
                writer.write(b"+OK 0 0\r\n")
            elif verb in ("UIDL", "LIST") and authed:
                writer.write(b"+OK\r\n.\r\n")
            elif verb == "QUIT":
                writer.write(b"+OK bye\r\n")
                break
            else:
                writer.write(b"-ERR no\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        account = AccountSpec(
            "alice", port, user, password, tmp_path / "alice", tls="none", extra={"timeout": "5s"}
        )
        [result] = await poll(tmp_path, account)
    finally:
        server.close()
        await server.wait_closed()
    assert result.ok, result.error
    assert seen[:3] == ["CAPA", "AUTH", "<credentials>"]
