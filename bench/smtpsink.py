"""An SMTP sink on 127.0.0.1 for the SMTP scenario: accepts every message, keeps it.

Each recipient's local part names a directory under the sink's root; every
message accepted for that recipient becomes one file in ``<root>/<local>/new/``
with CRLF line ends turned into LF, so that the bench's Maildir checks
(one file per message, each Message-ID once, bytes equal to the expected
delivery) apply unchanged.  Nothing is fsync'd: the sink is not under test,
and it does the same work for every tool.

aiosmtpd reads DATA one line at a time, which costs about 30 s for the
scenario's 68 MB (py-spy: the sink, not the tools, was the bottleneck), so
``FastDataSMTP`` reads it in large pieces up to the ``CRLF.CRLF`` terminator
and undoes the dot-stuffing with one ``replace``; everything else is
aiosmtpd's.

Run it on its own: ``python bench/smtpsink.py --root DIR [--port N]``; it
prints ``READY <port>`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

# A local part becomes a directory name: nothing that could leave the root.
_LOCAL_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# aiosmtpd's default limit (32 MiB) is below the largest bench message.
DATA_SIZE_LIMIT = 1 << 30
TERMINATOR = b"\r\n.\r\n"


def unstuff(data: bytes) -> bytes:
    """The message in a DATA transfer ``data`` that ends just before ``.CRLF``."""
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")


class FastDataSMTP(SMTP):
    """aiosmtpd's SMTP server with DATA read in bulk rather than line by line."""

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reader: Any = self._reader  # its buffer is looked at below
        # Only an empty message starts with ".CRLF" (its terminator begins
        # with the DATA line's CRLF), and reading up to CRLF.CRLF would then
        # swallow the next command: look at the first bytes without taking them.
        while len(reader._buffer) < 3 and not reader.at_eof():
            await reader._wait_for_data("smtp_DATA")
        parts: list[bytes] = []
        if bytes(reader._buffer[:3]) == b".\r\n":
            await reader.readexactly(3)
        else:
            while True:
                try:
                    parts.append(await reader.readuntil(TERMINATOR))
                    break
                except asyncio.LimitOverrunError as exc:
                    parts.append(await reader.readexactly(exc.consumed))
        data = b"".join(parts)
        content = unstuff(data[:-3]) if data else b""
        envelope.content = envelope.original_content = content
        status = await self.event_handler.handle_DATA(self, self.session, envelope)
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)


def local_part(address: str) -> str | None:
    """The directory a recipient's mail goes to, or None when it is not acceptable."""
    local = address.rsplit("@", 1)[0].strip("<>")
    return local if _LOCAL_PART.fullmatch(local) else None


class SinkHandler:
    """Writes each message, once per recipient, into that recipient's directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.messages = 0
        self.bytes = 0
        self._names = itertools.count(1)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if local_part(address) is None:
            return "550 5.1.1 recipient must be <name>@... with a plain name"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content
        if not isinstance(content, bytes):
            return "554 5.6.0 no content"
        data = content.replace(b"\r\n", b"\n")
        for address in envelope.rcpt_tos:
            local = local_part(address)
            assert local is not None
            self.store(local, data)
        self.messages += 1
        self.bytes += len(data)
        return "250 2.0.0 stored"

    def store(self, local: str, data: bytes) -> Path:
        directory = self.root / local / "new"
        directory.mkdir(parents=True, exist_ok=True)
        (self.root / local / "tmp").mkdir(exist_ok=True)
        path = directory / f"{next(self._names)}.sink"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return path


class SmtpSink:
    """The sink's listening socket, started and stopped within one event loop."""

    def __init__(self, root: Path, *, port: int = 0) -> None:
        self.handler = SinkHandler(root)
        self._port = port
        self._server: asyncio.base_events.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, "127.0.0.1", self._port)

    def _protocol(self) -> Any:
        return FastDataSMTP(
            self.handler,
            hostname="sink.bench.test",
            data_size_limit=DATA_SIZE_LIMIT,
            enable_SMTPUTF8=True,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def serve(root: Path, port: int) -> None:
    sink = SmtpSink(root, port=port)
    await sink.start()
    print(f"READY {sink.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await sink.close()
        print(
            f"stored {sink.handler.messages} messages, {sink.handler.bytes} bytes",
            file=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="directory for the mail")
    parser.add_argument("--port", type=int, default=0, help="default: any free port")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.root, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
