"""Every destination end to end: Dovecot POP3 -> gpopd poll -> SMTP, LMTP, MDA, mbox."""

from __future__ import annotations

import shutil
from pathlib import Path

from gpopd.config import load_config
from gpopd.fetch import PollResult, poll_once
from gpopd.store import Store
from tests.support.certs import TestPKI
from tests.support.corpus import edge_case_named, expected_delivery, mixed_corpus
from tests.support.dovecot import TEST_USERS, Dovecot
from tests.support.gpopd_config import AccountSpec, write_config
from tests.support.smtpd import RecordingHandler, running_server, server_tls_context

# NUL bytes cannot cross SMTP/LMTP without BINARYMIME: those destinations
# refuse them on purpose, so the relay corpus leaves that edge case out.
RELAY_CORPUS = [m for name, m in edge_case_named().items() if name != "nul_and_ff"]


def crlf(message: bytes) -> bytes:
    """What an SMTP/LMTP peer receives: the stored form with every line end CRLF."""
    return expected_delivery(message).replace(b"\r", b"").replace(b"\n", b"\r\n")


def account(dovecot: Dovecot, pki: TestPKI, tmp_path: Path, delivery: list[str]) -> AccountSpec:
    return AccountSpec(
        "alice",
        dovecot.pop3s_port,
        "alice",
        TEST_USERS["alice"],
        tmp_path / "unused",
        ca_file=pki.ca_file,
        delivery=delivery,
    )


async def poll(tmp_path: Path, spec: AccountSpec) -> PollResult:
    [result] = await poll_once(load_config(write_config(tmp_path, [spec]), environ={}))
    return result


def bare_cr_free(messages: list[bytes]) -> list[bytes]:
    return [m for m in messages if b"\r" not in m.replace(b"\r\n", b"")]


async def test_smtp_relay_with_starttls_and_auth(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path
) -> None:
    """Mail goes through a STARTTLS + AUTH relay, CRLF and dot-stuffed, byte-exact otherwise."""
    from tests.support.smtpd import password_checker

    # RFC 5321 limits a line to 1000 octets; the 200,000-octet line is refused
    # (permanently, staying on the server) by a relay that enforces it.
    within_limits = [m for m in RELAY_CORPUS if m != edge_case_named()["line_200000"]]
    messages = bare_cr_free(within_limits) + mixed_corpus(20, seed=51)
    dovecot.add_messages("alice", messages)
    tls = server_tls_context(pki.server_cert, pki.server_key)
    secret = tmp_path / "relay.password"
    secret.write_text("relay-pw\n")
    secret.chmod(0o600)
    with running_server(
        starttls=tls,
        require_starttls=True,
        authenticator=password_checker("gpopd", "relay-pw"),
        auth_require_tls=True,
    ) as relay:
        spec = account(
            dovecot,
            pki,
            tmp_path,
            [
                "type: smtp",
                "host: localhost",
                f"port: {relay.port}",
                "tls: starttls",
                f"ca_file: {pki.ca_file}",
                "username: gpopd",
                f"password: {{file: {secret}}}",
                "recipient: [alice@example.test]",
            ],
        )
        result = await poll(tmp_path, spec)
        assert result.outcome == "ok", result.error
        received = relay.received
    assert sorted(r.content for r in received) == sorted(map(crlf, messages))
    assert all(r.tls for r in received)
    assert {r.recipients for r in received} == {("alice@example.test",)}
    assert relay.handler.sessions == 1  # one connection for the whole poll


async def test_smtp_451_then_250_delivers_once(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path
) -> None:
    """A relay answering 451 keeps the message on the server; the next poll delivers it once."""
    messages = mixed_corpus(3, seed=52)
    dovecot.add_messages("alice", messages)
    handler = RecordingHandler(data_replies=["451 4.3.0 try again later"])
    with running_server(handler) as relay:
        spec = account(
            dovecot,
            pki,
            tmp_path,
            ["type: smtp", "host: 127.0.0.1", f"port: {relay.port}", "recipient: [a@b.test]"],
        )
        first = await poll(tmp_path, spec)
        assert (first.delivered, first.failed) == (2, 1)
        assert "451" in str(first.outcome) or first.outcome == "delivery-error"
        second = await poll(tmp_path, spec)
        third = await poll(tmp_path, spec)
        received = relay.received
    assert (second.delivered, third.delivered) == (1, 0)
    assert sorted(r.content for r in received) == sorted(map(crlf, messages))


async def test_smtp_550_is_set_aside_not_retried(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path
) -> None:
    """A 550 keeps the message on the server, records the failure, and the next poll skips it."""
    dovecot.add_messages("alice", mixed_corpus(2, seed=53))
    handler = RecordingHandler(data_replies=["550 5.7.1 rejected by policy"])
    with running_server(handler) as relay:
        spec = account(
            dovecot,
            pki,
            tmp_path,
            ["type: smtp", "host: 127.0.0.1", f"port: {relay.port}", "recipient: [a@b.test]"],
        )
        first = await poll(tmp_path, spec)
        second = await poll(tmp_path, spec)
        attempts = len(relay.received)
    assert (first.delivered, first.failed) == (1, 1)
    assert (second.delivered, second.failed, second.new) == (0, 0, 0)
    assert attempts == 1
    assert dovecot.message_count("alice") == 2
    with Store(tmp_path / "state") as store:
        [reason] = store.skipped_uids("alice", 0).values()
    assert "550" in reason


async def test_relay_down_keeps_everything(dovecot: Dovecot, pki: TestPKI, tmp_path: Path) -> None:
    """With the relay unreachable nothing is recorded and the poll reports a failure."""
    dovecot.add_messages("alice", mixed_corpus(3, seed=54))
    spec = account(
        dovecot,
        pki,
        tmp_path,
        ["type: smtp", "host: 127.0.0.1", "port: 1", "recipient: [a@b.test]"],
    )
    spec.keep = False
    result = await poll(tmp_path, spec)
    assert result.outcome == "delivery-error"
    assert result.delivered == 0
    assert dovecot.message_count("alice") == 3
    with Store(tmp_path / "state") as store:
        assert store.delivered_uids("alice") == set()


async def test_lmtp_into_dovecot(dovecot: Dovecot, pki: TestPKI, tmp_path: Path) -> None:
    """LMTP delivery into Dovecot's own store, read back from bob's mailbox."""
    messages = bare_cr_free(RELAY_CORPUS)
    dovecot.add_messages("alice", messages)
    spec = account(
        dovecot,
        pki,
        tmp_path,
        ["type: lmtp", "host: 127.0.0.1", f"port: {dovecot.lmtp_port}", "recipient: [bob]"],
    )
    result = await poll(tmp_path, spec)
    assert result.outcome == "ok", result.error
    stored = dovecot.messages("bob")
    assert len(stored) == len(messages)
    for message in messages:
        body = expected_delivery(message)
        assert any(s.replace(b"\r\n", b"\n").endswith(body) for s in stored), message[:80]


async def test_procmail_as_mda(dovecot: Dovecot, pki: TestPKI, tmp_path: Path) -> None:
    """procmail (a real MDA) stores every message byte for byte into its Maildir."""
    procmail = shutil.which("procmail")
    assert procmail, "procmail is not installed: apt-get install procmail"
    messages = list(edge_case_named().values())
    dovecot.add_messages("alice", messages)
    target = tmp_path / "procmail-Maildir"
    spec = account(
        dovecot,
        pki,
        tmp_path,
        ["type: mda", f"command: [{procmail}, -m, 'DEFAULT={target}/', /dev/null]"],
    )
    result = await poll(tmp_path, spec)
    assert result.outcome == "ok", result.error
    stored = sorted(p.read_bytes() for p in (target / "new").iterdir())
    assert stored == sorted(map(expected_delivery, messages))


async def test_mda_exit_codes(dovecot: Dovecot, pki: TestPKI, tmp_path: Path) -> None:
    """MDA exit 75 retries at the next poll; exit 1 sets the message aside."""
    dovecot.add_messages("alice", mixed_corpus(1, seed=55))
    script = tmp_path / "mda.sh"
    state = tmp_path / "mda.state"
    script.write_text(
        "#!/bin/sh\ncat >/dev/null\n"
        f"if [ ! -e {state} ]; then touch {state}; exit 75; fi\necho refused >&2; exit 1\n"
    )
    script.chmod(0o700)
    spec = account(dovecot, pki, tmp_path, ["type: mda", f"command: [{script}]"])
    first = await poll(tmp_path, spec)
    second = await poll(tmp_path, spec)
    third = await poll(tmp_path, spec)
    assert (first.failed, second.failed, third.failed) == (1, 1, 0)
    assert third.new == 0
    with Store(tmp_path / "state") as store:
        [reason] = store.skipped_uids("alice", 0).values()
    assert "refused" in reason
    assert dovecot.message_count("alice") == 1


def read_mboxrd(path: Path) -> list[bytes]:
    """Messages of an mboxrd file, un-quoted (Python's mailbox module reads mboxo)."""
    import mailbox
    import re

    box = mailbox.mbox(str(path), create=False)
    out = []
    for key in box.iterkeys():
        raw = box.get_bytes(key)
        out.append(re.sub(rb"(?m)^>(>*From )", rb"\1", raw))
    box.close()
    return out


async def test_mbox_read_back(dovecot: Dovecot, pki: TestPKI, tmp_path: Path) -> None:
    """Every edge case lands in an mboxrd file once, read back byte-exact."""
    messages = list(edge_case_named().values()) + mixed_corpus(10, seed=56)
    dovecot.add_messages("alice", messages)
    target = tmp_path / "mail" / "alice.mbox"
    spec = account(dovecot, pki, tmp_path, ["type: mbox", f"path: {target}"])
    first = await poll(tmp_path, spec)
    second = await poll(tmp_path, spec)
    assert first.outcome == "ok", first.error
    assert (first.delivered, second.delivered) == (len(messages), 0)
    stored = read_mboxrd(target)
    # The mbox format separates messages with a blank line; mailbox hands it back.
    assert sorted(m.rstrip(b"\n") for m in stored) == sorted(
        expected_delivery(m).rstrip(b"\n") for m in messages
    )


async def test_refused_message_is_quarantined(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path
) -> None:
    """With quarantine: set, a message the relay refuses for good is stored there, others not."""
    messages = mixed_corpus(3, seed=57)
    dovecot.add_messages("alice", messages)
    handler = RecordingHandler(data_replies=["250 ok", "550 5.7.1 rejected by policy"])
    quarantine = tmp_path / "Quarantine"
    with running_server(handler) as relay:
        spec = account(
            dovecot,
            pki,
            tmp_path,
            ["type: smtp", "host: 127.0.0.1", f"port: {relay.port}", "recipient: [a@b.test]"],
        )
        spec.extra = {"quarantine": str(quarantine)}
        result = await poll(tmp_path, spec)
    assert (result.delivered, result.failed) == (2, 1)
    assert [p.read_bytes() for p in (quarantine / "new").iterdir()] == [
        expected_delivery(messages[1])
    ]
    assert list((quarantine / "tmp").iterdir()) == []
    assert dovecot.message_count("alice") == 3
