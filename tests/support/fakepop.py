"""A scripted POP3 server on 127.0.0.1 for faults Dovecot cannot show.

By default it behaves (RFC 1939 with CAPA, UIDL, PIPELINING, USER); a test
breaks exactly the reply it is about by giving ``script`` a function for a
verb.  The function gets the command's arguments and the server, and returns
the raw bytes to send (or ``None`` to drop the connection there).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


class CloseAfter(bytes):
    """A reply after which the server closes the connection."""


class Stream:
    """A reply made piece by piece as the client reads it, never held whole.

    Each piece is drained before the next one is made, so a reply of
    gigabytes (or one that never ends) costs the server one piece of memory.
    ``delay`` seconds pass between pieces; ``sent`` counts the bytes written.
    """

    def __init__(self, pieces: Iterable[bytes], delay: float = 0.0) -> None:
        self.pieces = pieces
        self.delay = delay
        self.sent = 0

    async def send(self, writer: asyncio.StreamWriter) -> None:
        for piece in self.pieces:
            writer.write(piece)
            await writer.drain()
            self.sent += len(piece)
            if self.delay:
                await asyncio.sleep(self.delay)


Reply = bytes | Stream | None
Script = Callable[[list[str], "FakePop3"], Reply]


def stuff(message: bytes) -> bytes:
    """A message as a server sends it after ``+OK``: CRLF lines, dot-stuffed, terminated."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = [(b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines]
    return b"".join(out) + b".\r\n"


@dataclass
class FakePop3:
    messages: list[bytes]
    uids: list[str] | None = None
    user: str = "alice"
    password: str = "fake-secret-pw"
    capabilities: tuple[str, ...] = ("USER", "UIDL", "TOP", "PIPELINING", "RESP-CODES")
    greeting: bytes | Stream = b"+OK fake POP3 ready\r\n"
    script: dict[str, Script] = field(default_factory=dict)
    ssl_context: ssl.SSLContext | None = None
    # Observations for assertions.
    commands: list[str] = field(default_factory=list)
    deleted: set[int] = field(default_factory=set)
    sessions: int = 0
    quits: int = 0

    def __post_init__(self) -> None:
        if self.uids is None:
            self.uids = [f"uid-{n:05d}" for n in range(1, len(self.messages) + 1)]
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> FakePop3:
        self._server = await asyncio.start_server(
            self._client, "127.0.0.1", 0, ssl=self.ssl_context
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def listing(self, verb: str, marked: set[int]) -> bytes:
        assert self.uids is not None
        out = [b"+OK\r\n"]
        for n, message in enumerate(self.messages, start=1):
            if n in marked:
                continue
            value = str(len(message)) if verb == "LIST" else self.uids[n - 1]
            out.append(f"{n} {value}\r\n".encode())
        out.append(b".\r\n")
        return b"".join(out)

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, reply: bytes | Stream) -> None:
        if isinstance(reply, Stream):
            await reply.send(writer)
        else:
            writer.write(reply)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        marked: set[int] = set()
        authed = False
        try:
            await self._write(writer, self.greeting)
            while line := await reader.readline():
                words = line.decode("latin-1").rstrip("\r\n").split(" ")
                verb, args = words[0].upper(), words[1:]
                self.commands.append(verb if verb != "PASS" else "PASS ***")
                if verb in self.script:
                    reply = self.script[verb](args, self)
                    if reply is None:
                        writer.transport.abort()
                        return
                    await self._write(writer, reply)
                    if isinstance(reply, CloseAfter):
                        await writer.drain()
                        return
                elif verb == "CAPA":
                    caps = "".join(f"{cap}\r\n" for cap in self.capabilities)
                    writer.write(f"+OK\r\n{caps}.\r\n".encode())
                elif verb == "USER":
                    writer.write(b"+OK\r\n")
                elif verb == "PASS":
                    authed = " ".join(args) == self.password
                    writer.write(b"+OK\r\n" if authed else b"-ERR [AUTH] bad password\r\n")
                elif verb == "QUIT":
                    self.quits += 1
                    self.deleted |= marked
                    writer.write(b"+OK bye\r\n")
                    await writer.drain()
                    return
                elif not authed:
                    writer.write(b"-ERR not logged in\r\n")
                elif verb == "STAT":
                    live = [m for n, m in enumerate(self.messages, 1) if n not in marked]
                    writer.write(f"+OK {len(live)} {sum(map(len, live))}\r\n".encode())
                elif verb in ("LIST", "UIDL"):
                    writer.write(self.listing(verb, marked))
                elif verb == "RETR":
                    n = int(args[0])
                    writer.write(b"+OK\r\n" + stuff(self.messages[n - 1]))
                elif verb == "DELE":
                    marked.add(int(args[0]))
                    writer.write(b"+OK\r\n")
                else:
                    writer.write(b"+OK\r\n")
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
