"""Hostile POP3 replies for ``FakePop3``, and the measure of a ``gpopd poll`` run.

The huge replies are ``Stream``s: generated piece by piece as the client
reads them, so a gigabyte line or an endless message costs the test process
one piece of memory.  ``run_poll`` runs ``gpopd poll`` in a child process of
its own and reads that child's peak RSS from ``wait4(2)``, so the figure is
the case's own and covers the whole process.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.fakepop import FakePop3, Stream, stuff

GIB = 1024**3
PIECE = 1024 * 1024


def repeated(head: bytes, filler: bytes, total: int | None, tail: bytes = b"") -> Iterator[bytes]:
    """``head``, then ``filler`` repeated in 1 MiB pieces up to ``total`` bytes
    (forever with ``None``), then ``tail``."""
    yield head
    piece = filler * max(1, PIECE // len(filler))
    sent = 0
    while total is None or sent < total:
        chunk = piece if total is None else piece[: total - sent]
        yield chunk
        sent += len(chunk)
    if tail:
        yield tail


def uid_listing(count: int, uid_length: int = 70) -> Iterator[bytes]:
    """``+OK`` and ``count`` UIDL lines with the longest UIDs allowed, then ``.``."""
    yield b"+OK\r\n"
    batch: list[bytes] = []
    for n in range(1, count + 1):
        batch.append(b"%d %s\r\n" % (n, str(n).rjust(uid_length, "u").encode()))
        if len(batch) == 10_000:
            yield b"".join(batch)
            batch.clear()
    yield b"".join(batch) + b".\r\n"


def scan_listing(count: int, size: int = 1000) -> Iterator[bytes]:
    """``+OK`` and ``count`` LIST lines of ``size`` octets each, then ``.``."""
    yield b"+OK\r\n"
    for start in range(1, count + 1, 10_000):
        stop = min(start + 10_000, count + 1)
        yield b"".join(b"%d %d\r\n" % (n, size) for n in range(start, stop))
    yield b".\r\n"


# -- TLS renegotiation ------------------------------------------------------

# CPython 3.11's _ssl._SSLSocket: PyObject_HEAD (16 octets), the socket
# weakref, then the SSL pointer.  Python's ssl module has no way to make a
# server renegotiate, so the test reaches libssl directly.
_SSL_POINTER_OFFSET = 24


def _libssl() -> ctypes.CDLL:
    lib = ctypes.CDLL("libssl.so.3")
    for name in ("SSL_renegotiate", "SSL_renegotiate_pending", "SSL_do_handshake", "SSL_is_server"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_int
    lib.SSL_get_version.argtypes = [ctypes.c_void_p]
    lib.SSL_get_version.restype = ctypes.c_char_p
    return lib


def _ssl_pointer(ssl_object: ssl.SSLObject, lib: ctypes.CDLL) -> int:
    inner = ssl_object._sslobj  # type: ignore[attr-defined]
    pointer = ctypes.c_void_p.from_address(id(inner) + _SSL_POINTER_OFFSET).value
    # Guard against another layout: the pointer must be this very session.
    if pointer is None or lib.SSL_is_server(pointer) != 1:
        raise RuntimeError("cannot find the SSL pointer of this Python build")
    if lib.SSL_get_version(pointer).decode() != ssl_object.version():
        raise RuntimeError("cannot find the SSL pointer of this Python build")
    return pointer


class Renegotiate(Stream):
    """A reply preceded by a server-initiated TLS 1.2 renegotiation (HelloRequest).

    ``requested`` counts the HelloRequests sent; ``completed`` the renegotiation
    handshakes found finished when the next reply is due (one session at a time).
    """

    requested = 0
    completed = 0

    async def send(self, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        lib = _libssl()
        pointer = _ssl_pointer(ssl_object, lib)
        if Renegotiate.requested and not lib.SSL_renegotiate_pending(pointer):
            Renegotiate.completed += 1
        if lib.SSL_renegotiate(pointer) != 1:
            raise RuntimeError("SSL_renegotiate refused")
        lib.SSL_do_handshake(pointer)  # queues the HelloRequest
        Renegotiate.requested += 1
        await super().send(writer)


def renegotiating_script() -> dict[str, Any]:
    """Replies that each follow a renegotiation request, for a logged-in session."""

    def listing(verb: str) -> Any:
        return lambda args, server: Renegotiate([server.listing(verb, set())])

    def stat(args: list[str], server: FakePop3) -> Stream:
        size = sum(map(len, server.messages))
        return Renegotiate([f"+OK {len(server.messages)} {size}\r\n".encode()])

    def retr(args: list[str], server: FakePop3) -> Stream:
        return Renegotiate([b"+OK\r\n" + stuff(server.messages[int(args[0]) - 1])])

    return {"STAT": stat, "UIDL": listing("UIDL"), "LIST": listing("LIST"), "RETR": retr}


def tls12_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context limited to TLS 1.2, the last version with renegotiation."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def tls_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context presenting ``cert``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


# -- running gpopd ------------------------------------------------------------


@dataclass(frozen=True)
class PollRun:
    """What one ``gpopd poll`` child did."""

    exit_code: int
    peak_rss_mb: float
    seconds: float
    log: list[dict[str, Any]]
    output: str

    def finished(self, account: str) -> dict[str, Any]:
        """The account's ``poll finished`` log line."""
        for line in self.log:
            if line.get("event") == "poll finished" and line.get("account") == account:
                return line
        raise AssertionError(f"no 'poll finished' line for {account}:\n{self.output[-3000:]}")


# Runs gpopd in a grandchild and reports its rusage.  The child of the test
# process cannot be measured directly: it starts as a (v)fork of the test
# process, and Linux carries that address space's high-water mark into the
# ru_maxrss of the program it then executes.  A plain fork() of this small
# interpreter starts a fresh count.
_MEASURE = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "gpopd", *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as out:
    json.dump({"exit": code, "maxrss_kib": usage.ru_maxrss}, out)
sys.exit(code if code >= 0 else 1)
"""


async def run_poll(config: Path, workdir: Path, limit: float = 120.0) -> PollRun:
    """Run ``gpopd poll`` on ``config`` in a fresh process; the event loop keeps serving."""
    out_path = workdir / "gpopd.out"
    figures = workdir / "gpopd.rusage.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPOPD_")}
    command = [sys.executable, "-c", _MEASURE, str(figures), "poll", "--config", str(config)]
    started = time.monotonic()
    with out_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        await asyncio.wait_for(proc.wait(), limit)
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)  # gpopd too, not only the measuring parent
        await proc.wait()
        raise AssertionError(f"gpopd poll still running after {limit:g}s") from None
    seconds = time.monotonic() - started
    output = out_path.read_text(errors="replace")
    log = []
    for line in output.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            log.append(entry)
    measured = json.loads(figures.read_text())
    return PollRun(measured["exit"], measured["maxrss_kib"] / 1024, seconds, log, output)
