"""`gpopd run` as systemd runs it: a subprocess, a notify socket, signals, real Dovecot."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpopd.store import Store
from tests.support.certs import TestPKI
from tests.support.corpus import expected_delivery, mixed_corpus
from tests.support.dovecot import TEST_USERS, Dovecot
from tests.support.gpopd_config import AccountSpec, maildir_contents, write_config

INTERVAL = {"poll_interval": "2s"}


class NotifySocket:
    """The datagram socket systemd would listen on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        for message in self.messages:
            if text in message:
                return message
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                message = self.sock.recv(65536).decode()
            except TimeoutError:
                break
            self.messages.append(message)
            if text in message:
                return message
        raise AssertionError(f"no {text!r} from the daemon; got {self.messages}")

    def drain(self) -> None:
        self.sock.setblocking(False)
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return

    def close(self) -> None:
        self.sock.close()


class Service:
    def __init__(self, config: Path, tmp_path: Path, env: dict[str, str]) -> None:
        self.log_path = tmp_path / "daemon.log"
        self.notify = NotifySocket(tmp_path / "notify.sock")
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gpopd", "run", "--config", str(config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **env},
            )

    def lines(self) -> list[dict[str, object]]:
        out = []
        for raw in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                out.append({"event": raw})
        return out

    def wait_log(self, match: Callable[[dict[str, object]], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(match(line) for line in self.lines()):
                return
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            time.sleep(0.05)
        raise AssertionError(f"log line not seen; log:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=40)
        self.notify.drain()
        return code


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(config: Path, env: dict[str, str] | None = None) -> Service:
        service = Service(config, tmp_path, env or {})
        started.append(service)
        return service

    yield start
    for service in started:
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait()
        service.notify.close()


def account(dovecot: Dovecot, pki: TestPKI, tmp_path: Path, name: str, user: str) -> AccountSpec:
    return AccountSpec(
        name,
        dovecot.pop3s_port,
        user,
        TEST_USERS[user],
        tmp_path / f"Maildir-{name}",
        ca_file=pki.ca_file,
        extra=dict(INTERVAL),
    )


def polled(name: str, delivered: int | None = None) -> Callable[[dict[str, object]], bool]:
    def match(line: dict[str, object]) -> bool:
        return (
            line.get("event") == "poll finished"
            and line.get("account") == name
            and (delivered is None or line.get("delivered") == delivered)
        )

    return match


def test_ready_then_new_mail_within_an_interval(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path, service_factory: Callable[..., Service]
) -> None:
    """READY=1 arrives, and mail added later is delivered within one poll interval."""
    config = write_config(tmp_path, [account(dovecot, pki, tmp_path, "alice", "alice")])
    service = service_factory(config)
    service.notify.wait_for("READY=1")
    service.wait_log(polled("alice"))
    later = mixed_corpus(5, seed=31)
    dovecot.add_messages("alice", later)
    added = time.monotonic()
    service.wait_log(polled("alice", delivered=5), timeout=10)
    assert time.monotonic() - added < 2 * 1.1 + 3  # one interval with jitter, plus the poll
    assert "STATUS=" in service.notify.wait_for("STATUS=")
    assert service.stop() == 0
    assert any("STOPPING=1" in m for m in service.notify.messages)
    assert maildir_contents(tmp_path / "Maildir-alice") == sorted(map(expected_delivery, later))


def test_sighup_adds_an_account_and_survives_a_broken_file(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path, service_factory: Callable[..., Service]
) -> None:
    """SIGHUP applies a valid new account, and a broken file is logged with file:line."""
    dovecot.add_messages("bob", mixed_corpus(3, seed=32))
    alice = account(dovecot, pki, tmp_path, "alice", "alice")
    config = write_config(tmp_path, [alice])
    service = service_factory(config)
    service.notify.wait_for("READY=1")
    service.wait_log(polled("alice"))

    write_config(tmp_path, [alice, account(dovecot, pki, tmp_path, "bob", "bob")])
    service.process.send_signal(signal.SIGHUP)
    service.notify.wait_for("RELOADING=1")
    service.wait_log(polled("bob", delivered=3))

    config.write_text(config.read_text() + "  broken: [\n")
    service.process.send_signal(signal.SIGHUP)
    service.wait_log(lambda line: "reload failed" in str(line.get("event")))
    [failure] = [line for line in service.lines() if "reload failed" in str(line.get("event"))]
    assert any(f"{config}:" in problem for problem in failure["problems"])  # type: ignore[union-attr]
    service.wait_log(polled("alice"))  # still polling on the old configuration
    assert service.process.poll() is None
    assert service.stop() == 0


def test_sigterm_during_a_large_poll_loses_nothing(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path, service_factory: Callable[..., Service]
) -> None:
    """SIGTERM in the middle of a big transfer exits 0; the next poll completes it exactly."""
    messages = mixed_corpus(600, seed=33)
    dovecot.add_messages("alice", messages)
    spec = account(dovecot, pki, tmp_path, "alice", "alice")
    spec.keep = False
    config = write_config(tmp_path, [spec])
    service = service_factory(config)
    service.notify.wait_for("READY=1")
    service.wait_log(lambda line: line.get("event") == "message delivered")
    assert service.stop() == 0
    assert any("STOPPING=1" in m for m in service.notify.messages)

    done = subprocess.run(
        [sys.executable, "-m", "gpopd", "poll", "--config", str(config)],
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    assert maildir_contents(tmp_path / "Maildir-alice") == sorted(map(expected_delivery, messages))
    assert dovecot.message_count("alice") == 0
    with Store(tmp_path / "state") as store:
        assert store.pending("alice") == {}


def test_watchdog_pings_and_sigusr1_polls_now(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path, service_factory: Callable[..., Service]
) -> None:
    """WATCHDOG=1 arrives when WATCHDOG_USEC is set; SIGUSR1 starts a poll at once."""
    spec = account(dovecot, pki, tmp_path, "alice", "alice")
    spec.extra = {"poll_interval": "1h"}
    config = write_config(tmp_path, [spec])
    service = service_factory(config, {"WATCHDOG_USEC": "400000"})
    service.notify.wait_for("READY=1")
    service.notify.wait_for("WATCHDOG=1", timeout=5)
    service.wait_log(polled("alice"))
    dovecot.add_messages("alice", mixed_corpus(2, seed=34))
    service.process.send_signal(signal.SIGUSR1)
    service.wait_log(polled("alice", delivered=2), timeout=10)
    assert service.stop() == 0
