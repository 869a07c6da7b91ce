"""The test servers themselves: Dovecot harness, certificates and mail corpus.

Dovecot is driven with the standard library only (poplib, smtplib, ssl), so a
failure here points at the harness, never at gpopd.
"""

from __future__ import annotations

import datetime as dt
import email
import email.parser
import email.policy
import os
import poplib
import re
import signal
import smtplib
import socket
import ssl
import stat
import time
import warnings
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.certs import TestPKI
from tests.support.corpus import (
    BIG_MESSAGE_BYTES,
    attachment_message,
    edge_case_messages,
    edge_case_named,
    expected_delivery,
    mixed_corpus,
    small_corpus,
)
from tests.support.dovecot import (
    NOT_INSTALLED,
    TEST_USERS,
    Dovecot,
    DovecotFactory,
    virtual_size,
)

ALICE = "alice"
ALICE_PW = TEST_USERS[ALICE]
X509_HOSTNAME_MISMATCH = 62
X509_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
X509_CERT_HAS_EXPIRED = 10


# -- helpers ------------------------------------------------------------------


def pop3s(server: Dovecot, pki: TestPKI) -> poplib.POP3_SSL:
    """A verified implicit-TLS POP3 session, logged in as alice."""
    client = poplib.POP3_SSL("localhost", server.pop3s_port, context=pki.client_context())
    client.user(ALICE)
    client.pass_(ALICE_PW)
    return client


def delivered(lines: list[bytes]) -> bytes:
    """What a client storing LF line ends keeps from poplib's RETR lines."""
    return b"".join(line + b"\n" for line in lines)


def stls_handshake(server: Dovecot, context: ssl.SSLContext) -> None:
    """Upgrade a plain-port connection with STLS (poplib cannot close after a failed one)."""
    with socket.create_connection((server.host, server.pop3_port), timeout=10) as raw:
        assert raw.recv(512).startswith(b"+OK")
        raw.sendall(b"STLS\r\n")
        assert raw.recv(512).startswith(b"+OK")
        context.wrap_socket(raw, server_hostname="localhost").close()


def tls_connect(server: Dovecot, context: ssl.SSLContext, mode: str) -> None:
    """Open and close a TLS session: implicit TLS or STLS on the plain port."""
    if mode == "implicit":
        poplib.POP3_SSL("localhost", server.pop3s_port, context=context).close()
    else:
        stls_handshake(server, context)


class RawPop3:
    """Byte-exact POP3 over TLS: poplib refuses lines over 2048 bytes."""

    def __init__(self, server: Dovecot, pki: TestPKI) -> None:
        raw = socket.create_connection((server.host, server.pop3s_port), timeout=10)
        self.sock = pki.client_context().wrap_socket(raw, server_hostname="localhost")
        self.buffer = b""
        assert self.line().startswith(b"+OK")
        self.command(f"USER {ALICE}")
        self.command(f"PASS {ALICE_PW}")

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line + b"\r\n"

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        status = self.line()
        assert status.startswith(b"+OK"), status
        return status

    def retr(self, number: int) -> bytes:
        """The message as sent on the wire, terminator removed and dots unstuffed."""
        self.command(f"RETR {number}")
        lines = []
        while (line := self.line()) != b".\r\n":
            lines.append(line[1:] if line.startswith(b".") else line)
        return b"".join(lines)

    def list_sizes(self) -> list[int]:
        self.command("LIST")
        sizes = []
        while (line := self.line()) != b".\r\n":
            sizes.append(int(line.split()[1]))
        return sizes

    def close(self) -> None:
        self.command("QUIT")
        self.sock.close()


# -- Dovecot over POP3 ----------------------------------------------------------


def test_pop3s_login_lists_added_messages(dovecot: Dovecot, pki: TestPKI) -> None:
    """Messages written with add_messages are listed over verified implicit TLS."""
    messages = small_corpus(3, seed=1)
    dovecot.add_messages(ALICE, messages)
    client = pop3s(dovecot, pki)
    count, octets = client.stat()
    _, uidls, _ = client.uidl()
    client.quit()
    assert count == 3
    assert octets == sum(virtual_size(message) for message in messages)
    assert len({line.split()[1] for line in uidls}) == 3
    assert dovecot.message_count(ALICE) == 3
    assert dovecot.message_count("bob") == 0


def test_retr_returns_expected_delivery(dovecot: Dovecot, pki: TestPKI) -> None:
    """RETR through poplib yields expected_delivery of the stored message."""
    messages = [edge_case_named()["dot_lines"], *small_corpus(2, seed=2)]
    dovecot.add_messages(ALICE, messages)
    client = pop3s(dovecot, pki)
    retrieved = [delivered(client.retr(number)[1]) for number in (1, 2, 3)]
    client.quit()
    assert retrieved == [expected_delivery(message) for message in messages]


def test_dele_and_quit_remove_the_message(dovecot: Dovecot, pki: TestPKI) -> None:
    """DELE followed by QUIT removes exactly that message from the Maildir."""
    first, second = small_corpus(2, seed=3)
    dovecot.add_messages(ALICE, [first, second])
    client = pop3s(dovecot, pki)
    client.dele(1)
    client.quit()
    assert dovecot.message_count(ALICE) == 1
    assert dovecot.messages(ALICE) == [second]
    client = pop3s(dovecot, pki)
    assert client.stat()[0] == 1
    assert delivered(client.retr(1)[1]) == second
    client.quit()


def test_stls_on_plain_port(dovecot: Dovecot, pki: TestPKI) -> None:
    """The plain port offers STLS, and USER/PASS work after the upgrade."""
    dovecot.add_messages(ALICE, small_corpus(1, seed=4))
    client = poplib.POP3("localhost", dovecot.pop3_port, timeout=10)
    assert "STLS" in client.capa()
    client.stls(context=pki.client_context())
    assert "STLS" not in client.capa()
    client.user(ALICE)
    client.pass_(ALICE_PW)
    assert client.stat()[0] == 1
    client.quit()


def test_wrong_password_is_refused(dovecot: Dovecot, pki: TestPKI) -> None:
    """A wrong password gets -ERR [AUTH] well within a second (no auth penalty)."""
    client = poplib.POP3_SSL("localhost", dovecot.pop3s_port, context=pki.client_context())
    client.user(ALICE)
    started = time.monotonic()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("not-the-password")
    client.close()
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("cert", "verify_code"),
    [
        ("wrong_name", X509_HOSTNAME_MISMATCH),
        ("untrusted", X509_UNABLE_TO_GET_ISSUER_CERT_LOCALLY),
        ("expired", X509_CERT_HAS_EXPIRED),
    ],
)
@pytest.mark.parametrize("mode", ["implicit", "stls"])
def test_bad_certificates_fail_verification(
    dovecot_factory: DovecotFactory, pki: TestPKI, cert: str, verify_code: int, mode: str
) -> None:
    """Each bad certificate fails verification for its own reason, on both ports."""
    server = dovecot_factory(cert=cert)
    with pytest.raises(ssl.SSLCertVerificationError) as caught:
        tls_connect(server, pki.client_context(), mode)
    assert caught.value.verify_code == verify_code


def test_untrusted_certificate_is_valid_for_its_own_ca(
    dovecot_factory: DovecotFactory, pki: TestPKI
) -> None:
    """The untrusted server certificate verifies against its own CA, so only trust fails."""
    server = dovecot_factory(cert="untrusted")
    context = ssl.create_default_context(cafile=str(pki.untrusted_ca_file))
    client = poplib.POP3_SSL("localhost", server.pop3s_port, context=context)
    client.user(ALICE)
    client.pass_(ALICE_PW)
    assert client.stat() == (0, 0)
    client.quit()


def test_lmtp_delivery_is_served_by_pop3(dovecot: Dovecot, pki: TestPKI) -> None:
    """A message delivered over LMTP appears for POP3 with only headers prepended."""
    body = b"Subject: via LMTP\r\nMessage-ID: <lmtp.1@gpopd.test>\r\n\r\nhello\r\n.dot\r\n"
    with smtplib.LMTP(dovecot.host, dovecot.lmtp_port) as lmtp:
        refused = lmtp.sendmail("sender@example.net", ["alice@example.org"], body)
    assert refused == {}
    client = pop3s(dovecot, pki)
    assert client.stat()[0] == 1
    message = delivered(client.retr(1)[1])
    client.quit()
    assert message.endswith(body.replace(b"\r\n", b"\n"))
    assert b"Delivered-To: alice@example.org\n" in message
    assert dovecot.message_count("bob") == 0


def test_edge_cases_are_served_as_expected_delivery(dovecot: Dovecot, pki: TestPKI) -> None:
    """Byte-exact RETR of every edge case matches expected_delivery and LIST sizes."""
    messages = edge_case_messages()
    dovecot.add_messages(ALICE, messages)
    client = RawPop3(dovecot, pki)
    sizes = client.list_sizes()
    wire = [client.retr(number) for number in range(1, len(messages) + 1)]
    client.close()
    for source, sent, size in zip(messages, wire, sizes, strict=True):
        assert sent.replace(b"\r\n", b"\n") == expected_delivery(source)
        # Dovecot adds the missing final CRLF on the wire but not to LIST.
        added = 0 if source.endswith(b"\n") else 2
        assert len(sent) - added == size == virtual_size(source)


def test_two_thousand_mixed_messages(dovecot: Dovecot, pki: TestPKI) -> None:
    """2,000 mixed messages are added in seconds and all served with correct sizes."""
    corpus = mixed_corpus(2000, seed=5)
    started = time.monotonic()
    dovecot.add_messages(ALICE, corpus)
    elapsed = time.monotonic() - started
    assert elapsed < 30.0
    assert dovecot.message_count(ALICE) == 2000
    client = pop3s(dovecot, pki)
    assert client.stat() == (2000, sum(virtual_size(message) for message in corpus))
    for number in (1, 777, 2000):
        assert delivered(client.retr(number)[1]) == expected_delivery(corpus[number - 1])
    client.quit()


def test_clear_empties_mailbox_and_uidls_stay_unique(dovecot: Dovecot, pki: TestPKI) -> None:
    """After clear() the mailbox is empty and later messages get new UIDLs."""
    dovecot.add_messages(ALICE, small_corpus(3, seed=6))
    client = pop3s(dovecot, pki)
    before = {line.split()[1] for line in client.uidl()[1]}
    client.quit()
    dovecot.clear(ALICE)
    assert dovecot.message_count(ALICE) == 0
    client = pop3s(dovecot, pki)
    assert client.stat() == (0, 0)
    client.quit()
    dovecot.add_messages(ALICE, small_corpus(1, seed=7))
    client = pop3s(dovecot, pki)
    after = {line.split()[1] for line in client.uidl()[1]}
    client.quit()
    assert len(after) == 1
    assert not after & before


def test_restart_keeps_messages_and_uidls(dovecot: Dovecot, pki: TestPKI) -> None:
    """Stopping and starting the same server keeps its mail and its UIDLs."""
    dovecot.add_messages(ALICE, small_corpus(2, seed=8))
    client = pop3s(dovecot, pki)
    before = client.uidl()[1]
    client.quit()
    dovecot.stop()
    dovecot.start()
    client = pop3s(dovecot, pki)
    assert client.uidl()[1] == before
    client.quit()


def test_stop_leaves_no_process_and_no_listener(
    dovecot_factory: DovecotFactory, pki: TestPKI
) -> None:
    """stop() ends every Dovecot process and closes every port, and may run twice."""
    server = dovecot_factory()
    group = int(server.supervisor_pid_path.read_text())
    ports = (server.pop3_port, server.pop3s_port, server.lmtp_port)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    server.stop()
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.killpg(group, signal.SIGCONT)
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((server.host, port), timeout=2).close()


def test_start_and_stop_are_fast(dovecot_factory: DovecotFactory) -> None:
    """A server starts and stops in well under a second, so one per test is affordable."""
    started = time.monotonic()
    server = dovecot_factory()
    startup = time.monotonic() - started
    started = time.monotonic()
    server.stop()
    shutdown = time.monotonic() - started
    assert startup < 1.0
    assert shutdown < 1.0


def test_without_lmtp_no_lmtp_listener(dovecot_factory: DovecotFactory, pki: TestPKI) -> None:
    """lmtp=False leaves LMTP out of the configuration and the port at 0."""
    server = dovecot_factory(lmtp=False)
    assert server.lmtp_port == 0
    assert "lmtp" not in server.config_path.read_text().split("protocols = ")[1].split("\n")[0]
    client = pop3s(server, pki)
    assert client.stat() == (0, 0)
    client.quit()


def _handshake(server: Dovecot, context: ssl.SSLContext) -> str | None:
    with (
        socket.create_connection((server.host, server.pop3s_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.version()


def _context_for(pki: TestPKI, version: str) -> ssl.SSLContext:
    context = pki.client_context()
    with warnings.catch_warnings():
        # Deliberately old protocol versions warn on use.
        warnings.simplefilter("ignore", DeprecationWarning)
        tls_version = getattr(ssl.TLSVersion, version.replace(".", "_"))
        context.minimum_version = tls_version
        context.maximum_version = tls_version
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def test_tls_min_refuses_older_clients(dovecot_factory: DovecotFactory, pki: TestPKI) -> None:
    """tls_min="TLSv1.3" refuses a TLS 1.2 client and accepts TLS 1.3."""
    server = dovecot_factory(tls_min="TLSv1.3")
    with pytest.raises(ssl.SSLError):
        _handshake(server, _context_for(pki, "TLSv1.2"))
    assert _handshake(server, _context_for(pki, "TLSv1.3")) == "TLSv1.3"


def test_tls_max_makes_a_tls11_only_server(dovecot_factory: DovecotFactory, pki: TestPKI) -> None:
    """tls_max="TLSv1.1" yields a server that speaks TLS 1.1 and refuses TLS 1.2+."""
    server = dovecot_factory(tls_max="TLSv1.1")
    assert _handshake(server, _context_for(pki, "TLSv1.1")) == "TLSv1.1"
    with pytest.raises(ssl.SSLError):
        _handshake(server, pki.client_context())


def test_session_server_greets_with_capabilities(dovecot_session: Dovecot) -> None:
    """The shared server greets on the plain port and lists the extensions tests rely on."""
    client = poplib.POP3("localhost", dovecot_session.pop3_port, timeout=10)
    assert client.getwelcome().startswith(b"+OK")
    capabilities = client.capa()
    client.quit()
    for name in ("STLS", "USER", "UIDL", "TOP", "PIPELINING", "RESP-CODES"):
        assert name in capabilities
    assert "PLAIN" in capabilities["SASL"]


def test_dovecot_fixtures_mark_the_test(
    request: pytest.FixtureRequest, dovecot_session: Dovecot
) -> None:
    """A test using a Dovecot fixture carries the dovecot marker."""
    assert request.node.get_closest_marker("dovecot") is not None
    assert dovecot_session.running


def test_unit_tests_are_not_marked(request: pytest.FixtureRequest) -> None:
    """A test without Dovecot fixtures is not marked dovecot."""
    assert request.node.get_closest_marker("dovecot") is None


def test_missing_binary_fails_with_install_hint(tmp_path: Path, pki: TestPKI) -> None:
    """Without the dovecot binary start() raises RuntimeError naming the packages."""
    server = Dovecot(tmp_path / "dc", pki, users=TEST_USERS, binary="gpopd-no-such-dovecot")
    with pytest.raises(RuntimeError) as caught:
        server.start()
    assert str(caught.value) == NOT_INSTALLED
    assert "apt-get install dovecot-core dovecot-pop3d dovecot-lmtpd" in NOT_INSTALLED


def test_config_refuses_unsafe_users(tmp_path: Path, pki: TestPKI) -> None:
    """User names and passwords that would corrupt the passwd-file are refused."""
    with pytest.raises(ValueError, match="user name"):
        Dovecot(tmp_path, pki, users={"a:b": "pw"})
    with pytest.raises(ValueError, match="password"):
        Dovecot(tmp_path, pki, users={"alice": "pw\nroot::0:0"})
    with pytest.raises(ValueError, match="TLS"):
        Dovecot(tmp_path, pki, users=TEST_USERS, tls_min="SSLv3")


# -- certificates ------------------------------------------------------------------


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _names(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(name.value) for name in san}


def test_pki_certificates_have_the_promised_properties(pki: TestPKI) -> None:
    """Good, wrong-name, untrusted and expired certificates differ in one property each."""
    ca = _load(pki.ca_file)
    good = _load(pki.server_cert)
    assert _names(good) == {"localhost", "127.0.0.1"}
    good.verify_directly_issued_by(ca)
    wrong = _load(pki.wrong_name_cert)
    assert _names(wrong) == {"wrong.example"}
    wrong.verify_directly_issued_by(ca)
    untrusted = _load(pki.untrusted_cert)
    assert _names(untrusted) == {"localhost", "127.0.0.1"}
    untrusted.verify_directly_issued_by(_load(pki.untrusted_ca_file))
    with pytest.raises(ValueError, match="issuer"):
        untrusted.verify_directly_issued_by(ca)
    expired = _load(pki.expired_cert)
    expired.verify_directly_issued_by(ca)
    assert expired.not_valid_after_utc < dt.datetime.now(dt.UTC)
    assert good.not_valid_after_utc > dt.datetime.now(dt.UTC)


def test_private_keys_are_owner_only(pki: TestPKI) -> None:
    """Every private key file is mode 0600."""
    for key in (pki.server_key, pki.wrong_name_key, pki.untrusted_key, pki.expired_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


# -- corpus ------------------------------------------------------------------------


def _lines(message: bytes) -> list[bytes]:
    return message.split(b"\n")


def test_edge_cases_cover_what_they_promise() -> None:
    """The edge-case messages contain every hostile construct listed in the brief."""
    named = edge_case_named()
    assert list(named.values()) == edge_case_messages()
    assert {b".", b"..", b"..."} <= set(_lines(named["dot_lines"]))
    assert _lines(named["dot_lines"])[-2] == b"."
    utf8 = named["utf8"]
    header, _, body = utf8.partition(b"\n\n")
    assert header.decode("utf-8") != header.decode("ascii", errors="ignore")
    assert body.decode("utf-8") != body.decode("ascii", errors="ignore")
    assert 998 in {len(line) for line in _lines(named["line_998"])}
    assert 200_000 in {len(line) for line in _lines(named["line_200000"])}
    assert b"\x00" in named["nul_and_ff"]
    assert b"\xff" in named["nul_and_ff"]
    assert any(line.startswith(b"From ") for line in _lines(named["from_lines"]))
    assert re.search(rb"[^\r\n]\r[^\n]", named["bare_cr"])
    assert named["empty_body"].endswith(b"\n\n")
    assert named["empty_body"].count(b"\n\n") == 1
    assert b"\r\n" in named["crlf_source"]
    unterminated = [name for name, message in named.items() if not message.endswith(b"\n")]
    assert unterminated == ["no_trailing_newline"]


def test_expected_delivery_rules() -> None:
    """expected_delivery turns CRLF into LF, adds a final LF and keeps bare CR."""
    assert expected_delivery(b"a\r\nb\r\n") == b"a\nb\n"
    assert expected_delivery(b"a\nlast") == b"a\nlast\n"
    assert expected_delivery(b"x\ry\n") == b"x\ry\n"
    assert expected_delivery(b"\x00\xff\n") == b"\x00\xff\n"


def test_mixed_corpus_is_deterministic_and_realistic() -> None:
    """mixed_corpus is seeded, prefix-stable, ~120 KB on average and well formed."""
    corpus = mixed_corpus(400, seed=11)
    assert corpus == mixed_corpus(400, seed=11)
    assert corpus[:50] == mixed_corpus(50, seed=11)
    assert corpus[:50] != mixed_corpus(50, seed=12)
    sizes = [len(message) for message in corpus]
    assert min(sizes) >= 2_000
    assert max(sizes) <= 2_000_000
    assert 80_000 < sum(sizes) / len(sizes) < 170_000
    assert sum(size < 50_000 for size in sizes) > 0.8 * len(sizes)
    headers = [email.parser.BytesHeaderParser().parsebytes(message) for message in corpus]
    for name in ("Message-ID", "Subject", "From", "To"):
        assert len({header[name] for header in headers}) == len(corpus), name
    assert all(header["Date"] for header in headers)
    parsed = [email.message_from_bytes(m, policy=email.policy.default) for m in corpus[:40]]
    attachments = [part for message in parsed for part in message.iter_attachments()]
    assert attachments
    assert all(part.get_content() for part in attachments)
    assert not any(message.defects for message in parsed)


def test_mixed_corpus_big_messages() -> None:
    """big=N replaces N messages with 10 MiB ones."""
    corpus = mixed_corpus(20, seed=13, big=2)
    big = [message for message in corpus if len(message) > 5_000_000]
    assert len(big) == 2
    assert all(abs(len(message) - BIG_MESSAGE_BYTES) < 1_000 for message in big)


def test_small_corpus_has_exact_sizes() -> None:
    """small_corpus returns distinct messages of exactly the requested size."""
    corpus = small_corpus(10, seed=14, size=2048)
    assert {len(message) for message in corpus} == {2048}
    assert len(set(corpus)) == 10
    assert all(message.endswith(b"\n") for message in corpus)


def test_attachment_message_size_and_content() -> None:
    """attachment_message is close to the asked size and its attachment decodes."""
    message = attachment_message(300_000, seed=15)
    assert abs(len(message) - 300_000) < 300
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    (attachment,) = parsed.iter_attachments()
    assert len(attachment.get_content()) > 200_000
    assert attachment_message(300_000, seed=15) == message
