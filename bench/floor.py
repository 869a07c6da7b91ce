"""The floor: the least work any POP3 client must do to download a mailbox.

It logs in over verified implicit TLS, asks STAT for the message count, sends
every ``RETR`` pipelined in windows, reads all the bytes and throws them away.
It parses nothing but status lines and the ``CRLF.CRLF`` terminators, and
writes nothing to disk, so its time is the cost of the server, TLS and the
network path alone.

``python bench/floor.py --port N --ca-file CA --user U --password-file F``
prints one JSON object: accounts, messages, bytes.  Several ``--user`` (with as
many ``--password-file``) poll those mailboxes all at once, one thread and
one connection each: the floor of a many-account poll is the accounts in
parallel, not one after another.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

READ_SIZE = 256 * 1024
# Commands in flight: the same order as mpop's window (at most 100, refilled
# when 20 are left), far below what the socket buffers hold.
WINDOW = 100
REFILL_AT = 20
TERMINATOR = b"\r\n.\r\n"
MAX_STATUS_LINE = 512


class FloorError(Exception):
    """The server refused a command or broke the protocol."""


@dataclass
class ResponseScanner:
    """Counts multi-line responses in a byte stream without keeping their bodies.

    A multi-line response is a status line and a body ending in ``CRLF.CRLF``;
    the status line's own CRLF may be the first half of the terminator (an
    empty body).  Only the last four bytes of a body are kept between chunks.
    """

    completed: int = 0
    body_bytes: int = 0
    _in_body: bool = False

    def scan(self, buffer: bytes | bytearray, end: int) -> int:
        """Count the responses in ``buffer[:end]``; return where its unread tail starts.

        The caller keeps ``buffer[returned:end]`` and puts it before the next
        chunk: it is at most a partial status line or four bytes of a body.
        """
        pos = 0
        while True:
            if not self._in_body:
                line_end = buffer.find(b"\r\n", pos, end)
                if line_end < 0:
                    if end - pos > MAX_STATUS_LINE:
                        raise FloorError("status line too long")
                    return pos
                if not buffer.startswith(b"+OK", pos, line_end):
                    raise FloorError(bytes(buffer[pos:line_end]).decode("ascii", "replace"))
                # Keep the status line's CRLF: it may start the terminator.
                pos = line_end
                self._in_body = True
            term = buffer.find(TERMINATOR, pos, end)
            if term < 0:
                keep = max(pos, end - (len(TERMINATOR) - 1))
                self.body_bytes += keep - pos
                return keep
            self.body_bytes += term - pos
            pos = term + len(TERMINATOR)
            self.completed += 1
            self._in_body = False


class Client:
    """A blocking TLS POP3 client that only downloads."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, server_name: str) -> None:
        raw = socket.create_connection((host, port), timeout=300)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname=server_name)
        self._pending = b""

    def close(self) -> None:
        self.sock.close()

    def line(self) -> bytes:
        while b"\r\n" not in self._pending:
            data = self.sock.recv(READ_SIZE)
            if not data:
                raise FloorError("connection closed")
            self._pending += data
        line, _, self._pending = self._pending.partition(b"\r\n")
        return line

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise FloorError(f"{text.split(maxsplit=1)[0]}: {reply.decode('ascii', 'replace')}")
        return reply

    def download_all(self) -> tuple[int, int]:
        """RETR every message; return (messages, body bytes).

        The bytes are read into one buffer that is reused, as a C client
        would: a fresh 256 KiB object for every TLS record would make the
        floor pay for the allocator (an mmap, mremap and munmap a record).
        """
        count = int(self.command("STAT").split()[1])
        scanner = ResponseScanner()
        buffer = bytearray(MAX_STATUS_LINE + len(TERMINATOR) + READ_SIZE)
        view = memoryview(buffer)
        filled = len(self._pending)
        buffer[:filled] = self._pending
        self._pending = b""
        sent = 0
        while True:
            keep = scanner.scan(buffer, filled)
            buffer[: filled - keep] = bytes(view[keep:filled])
            filled -= keep
            if scanner.completed >= count:
                return count, scanner.body_bytes
            if sent - scanner.completed <= REFILL_AT and sent < count:
                batch = range(sent + 1, min(count, scanner.completed + WINDOW) + 1)
                self.sock.sendall(b"".join(b"RETR %d\r\n" % n for n in batch))
                sent = batch[-1]
            received = self.sock.recv_into(view[filled : filled + READ_SIZE])
            if not received:
                raise FloorError("connection closed during RETR")
            filled += received


@dataclass(frozen=True)
class Target:
    """Where to connect and which name the certificate must carry."""

    host: str
    port: int
    server_name: str
    context: ssl.SSLContext


def poll(target: Target, user: str, password: str) -> tuple[int, int]:
    client = Client(target.host, target.port, target.context, target.server_name)
    try:
        greeting = client.line()
        if not greeting.startswith(b"+OK"):
            raise FloorError(greeting.decode("ascii", "replace"))
        client.command(f"USER {user}")
        client.command(f"PASS {password}")
        result = client.download_all()
        client.command("QUIT")
        return result
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--server-name", help="name to verify (default: --host)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--user", action="append", required=True)
    parser.add_argument("--password-file", action="append", required=True)
    args = parser.parse_args(argv)
    if len(args.user) != len(args.password_file):
        parser.error("give one --password-file per --user")
    context = ssl.create_default_context(cafile=args.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    target = Target(args.host, args.port, args.server_name or args.host, context)
    passwords = [Path(name).read_text().removesuffix("\n") for name in args.password_file]
    # Blocking TLS reads release the GIL, so the threads download in parallel.
    with ThreadPoolExecutor(len(args.user)) as pool:
        results = list(pool.map(poll, [target] * len(passwords), args.user, passwords))
    messages = sum(count for count, _ in results)
    total = sum(size for _, size in results)
    print(json.dumps({"accounts": len(args.user), "messages": messages, "bytes": total}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FloorError, OSError) as exc:
        print(f"floor: {exc}", file=sys.stderr)
        sys.exit(1)
