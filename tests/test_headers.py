"""add_headers: trace headers on request only, injection-proof, message otherwise untouched."""

from __future__ import annotations

from email.parser import BytesHeaderParser
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from gpopd.config import load_config
from gpopd.delivery.base import message_key
from gpopd.fetch import poll_once
from gpopd.headers import trace_headers
from tests.support.corpus import expected_delivery, mixed_corpus
from tests.support.fakepop import FakePop3
from tests.support.gpopd_config import AccountSpec, maildir_contents, write_config

ALL = ("received", "delivered_to", "uidl", "key")


def test_nothing_is_added_unless_asked() -> None:
    """With no header requested the prefix is empty."""
    assert trace_headers((), host="h", tls="implicit", username="u", uid="1", key="k" * 32) == b""


def test_headers_parse_and_carry_the_values() -> None:
    """The four headers parse as RFC 5322 headers with the expected values."""
    raw = trace_headers(
        ALL,
        host="pop.gmail.com",
        tls="implicit",
        username="alice@gmail.com",
        uid="GmailId18c1",
        key="0123456789abcdef" * 2,
        when=0,
        local_host="mx.example.org",
    )
    headers = BytesHeaderParser().parsebytes(raw + b"\n")
    assert headers["Delivered-To"] == "alice@gmail.com"
    assert headers["X-Gpopd-UIDL"] == "GmailId18c1"
    assert headers["X-Gpopd-Key"] == "0123456789abcdef" * 2
    received = " ".join(headers["Received"].split())
    assert received.startswith("from pop.gmail.com (pop.gmail.com) by mx.example.org (gpopd")
    assert "with POP3S id 0123456789abcdef for <alice@gmail.com>; Thu, 01 Jan 1970" in received


@given(st.text(), st.text(), st.text())
def test_no_value_can_inject_a_line(host: str, username: str, uid: str) -> None:
    """Whatever the server or config supplies, the output has exactly the requested lines."""
    raw = trace_headers(ALL, host=host, tls="none", username=username, uid=uid, key="a" * 32)
    lines = raw.decode("ascii").split("\n")
    assert lines[-1] == ""
    starts = [line.split(":", 1)[0] for line in lines[:-1] if not line.startswith("\t")]
    assert starts == ["Received", "Delivered-To", "X-Gpopd-UIDL", "X-Gpopd-Key"]
    assert "\r" not in raw.decode("ascii")


async def test_headers_prepended_to_delivered_mail(tmp_path: Path) -> None:
    """Delivered files are the requested headers followed by the untouched message."""
    messages = mixed_corpus(3, seed=61)
    async with FakePop3(messages) as server:
        spec = AccountSpec(
            "alice",
            server.port,
            server.user,
            server.password,
            tmp_path / "Maildir",
            tls="none",
            extra={"add_headers": "[received, delivered_to, uidl, key]"},
        )
        [result] = await poll_once(load_config(write_config(tmp_path, [spec]), environ={}))
    assert result.outcome == "ok", result.error
    stored = maildir_contents(tmp_path / "Maildir")
    for n, message in enumerate(messages, start=1):
        uid = f"uid-{n:05d}"
        key = message_key("alice", uid)
        [mine] = [s for s in stored if f"X-Gpopd-Key: {key}\n".encode() in s]
        head, _, rest = mine.partition(f"X-Gpopd-Key: {key}\n".encode())
        assert rest == expected_delivery(message)
        assert head.startswith(b"Received: from 127.0.0.1 (127.0.0.1)\n")
        assert f"Delivered-To: alice\nX-Gpopd-UIDL: {uid}\n".encode() in head
