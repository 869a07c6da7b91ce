"""The sd_notify(3) client, against real AF_UNIX datagram sockets."""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpopd.sdnotify import Notifier


class Listener:
    """The service manager's end: a bound datagram socket and its NOTIFY_SOCKET value."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name

    def receive(self) -> bytes:
        return self.sock.recv(65536)

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            self.sock.recv(65536)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield Listener(sock, str(path))


@pytest.fixture
def notifier(listener: Listener) -> Notifier:
    return Notifier({"NOTIFY_SOCKET": listener.name})


def test_ready_sends_exact_datagram(notifier: Notifier, listener: Listener) -> None:
    """ready() sends exactly READY=1 and reports success."""
    assert notifier.enabled
    assert notifier.ready() is True
    assert listener.receive() == b"READY=1"


def test_ready_with_status_is_one_datagram(notifier: Notifier, listener: Listener) -> None:
    """ready(status) puts READY=1 and STATUS= in a single datagram."""
    assert notifier.ready("polling 3 accounts")
    assert listener.receive() == b"READY=1\nSTATUS=polling 3 accounts"
    listener.assert_empty()


def test_status_newlines_are_flattened(notifier: Notifier, listener: Listener) -> None:
    """A multi-line status becomes one line so it cannot inject other assignments."""
    assert notifier.status("bad config\nREADY=1\r\nsecond\n")
    assert listener.receive() == b"STATUS=bad config READY=1 second"


def test_status_utf8(notifier: Notifier, listener: Listener) -> None:
    """Status text is sent as UTF-8."""
    assert notifier.status("boîte pleine")
    assert listener.receive() == "STATUS=boîte pleine".encode()


def test_stopping_and_watchdog(notifier: Notifier, listener: Listener) -> None:
    """stopping() and watchdog() send their single assignments."""
    assert notifier.stopping()
    assert notifier.watchdog()
    assert listener.receive() == b"STOPPING=1"
    assert listener.receive() == b"WATCHDOG=1"


def test_reloading_carries_monotonic_usec(notifier: Notifier, listener: Listener) -> None:
    """reloading() sends RELOADING=1 with the current CLOCK_MONOTONIC in microseconds."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", listener.receive())
    assert match is not None
    assert before <= int(match[1]) <= after


def test_notify_joins_fields(notifier: Notifier, listener: Listener) -> None:
    """notify() joins its fields with newlines into one datagram."""
    assert notifier.notify("A=1", "B=2")
    assert listener.receive() == b"A=1\nB=2"


def test_notify_refuses_field_with_newline(notifier: Notifier, listener: Listener) -> None:
    """A raw field containing a newline is refused rather than sent as two assignments."""
    assert notifier.notify("STATUS=a\nREADY=1") is False
    assert notifier.notify() is False
    listener.assert_empty()


def test_lone_surrogate_is_replaced(notifier: Notifier, listener: Listener) -> None:
    """Text holding a lone surrogate is still sent, as valid UTF-8."""
    assert notifier.status("x\udcffy")
    assert listener.receive() == b"STATUS=x?y"


def test_abstract_socket() -> None:
    """A NOTIFY_SOCKET starting with @ names the Linux abstract namespace."""
    name = f"gpopd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        assert notifier.ready()
        assert sock.recv(100) == b"READY=1"


@pytest.mark.parametrize("value", [None, "", "notify", "@"])
def test_disabled(
    value: str | None, listener: Listener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a usable NOTIFY_SOCKET every call is a no-op that returns False."""
    # "notify" names the listener relative to the working directory: sd_notify(3)
    # accepts only absolute paths, so it must still be refused.
    monkeypatch.chdir(tmp_path)
    environ = {} if value is None else {"NOTIFY_SOCKET": value}
    environ |= {"WATCHDOG_USEC": "60000000"}
    notifier = Notifier(environ)
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.notify("READY=1") is False
    assert notifier.ready("x") is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    listener.assert_empty()


def test_reads_process_environment(monkeypatch: pytest.MonkeyPatch, listener: Listener) -> None:
    """With no mapping given, the notifier reads os.environ."""
    monkeypatch.setenv("NOTIFY_SOCKET", listener.name)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier()
    assert notifier.watchdog_interval == 1.0
    assert notifier.ready()
    assert listener.receive() == b"READY=1"


def test_missing_socket_returns_false(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET path that does not exist makes calls return False, not raise."""
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False


def test_not_a_socket_returns_false(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET that is a regular file makes calls return False, not raise."""
    path = tmp_path / "file"
    path.write_text("")
    assert Notifier({"NOTIFY_SOCKET": str(path)}).stopping() is False


def test_closed_listener_returns_false(tmp_path: Path) -> None:
    """A socket whose receiver has gone away makes calls return False, not raise."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    assert Notifier({"NOTIFY_SOCKET": str(path)}).status("x") is False


def test_stream_socket_returns_false(tmp_path: Path) -> None:
    """A listener of the wrong socket type makes calls return False, not raise."""
    path = tmp_path / "stream"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        assert Notifier({"NOTIFY_SOCKET": str(path)}).ready() is False


@pytest.mark.parametrize(
    "address",
    ["/" + "a" * 200, "/tmp/\ud800"],
    ids=["too-long", "unencodable"],
)
def test_unusable_address_returns_false(address: str) -> None:
    """An address the kernel or the encoder rejects makes calls return False, not raise."""
    assert Notifier({"NOTIFY_SOCKET": address}).ready() is False


def test_oversized_datagram_returns_false(notifier: Notifier, listener: Listener) -> None:
    """A datagram larger than the socket allows is dropped with False, not raised."""
    assert notifier.status("x" * (16 * 1024 * 1024)) is False
    listener.assert_empty()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("60000000", None, 30.0),
        ("60000000", "self", 30.0),
        ("1000", None, 0.0005),
        ("60000000", "other", None),
        ("60000000", "not-a-pid", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    listener: Listener, usec: str | None, pid: str | None, expected: float | None
) -> None:
    """The ping interval is half of WATCHDOG_USEC, and only for the process systemd watches."""
    environ = {"NOTIFY_SOCKET": listener.name}
    if usec is not None:
        environ["WATCHDOG_USEC"] = usec
    if pid == "self":
        environ["WATCHDOG_PID"] = str(os.getpid())
    elif pid == "other":
        environ["WATCHDOG_PID"] = str(os.getpid() + 1)
    elif pid is not None:
        environ["WATCHDOG_PID"] = pid
    assert Notifier(environ).watchdog_interval == expected
