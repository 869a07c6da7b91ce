"""Deliver over LMTP (RFC 2033), at least once.

Theory of operation: messages are spooled while RETR streams them, then each
commit sends its window over one LMTP connection (TCP or a Unix socket) that
lives for the whole poll: greeting, ``LHLO``, then per message ``MAIL FROM``
and one ``RCPT TO`` per recipient (sent as one group when the server offers
PIPELINING, RFC 2920), ``DATA`` only when every recipient was accepted or
refused for good, the content streamed from the spool with every bare CR and
bare LF turned into CRLF and every line starting with "." stuffed (RFC 5321
§2.3.8, §4.5.2), and after the final "." one reply per accepted recipient, in
order (RFC 2033 §4.2).  ``QUIT`` at ``close()``.

A message counts as delivered when at least one recipient took it and every
other one refused it permanently (those are named in
``RelayCommitResult.warning``).  A 4xx for any recipient at RCPT keeps the
message back entirely; a 4xx after the data makes the message temporary even
though other recipients have stored it: at the next poll it goes to every
recipient again, and those may get it twice.  The same duplicate window as
SMTP's applies to a connection lost, or gpopd killed, after the final "."
(see ``gpopd.delivery.relay``); LMTP keeps nothing ``find_delivered()`` could
look up.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from gpopd.config import LmtpDelivery
from gpopd.delivery.relay import (
    RelayDestination,
    RelayDropped,
    RelaySessionFailed,
    RelayStaged,
    RelayStalled,
    delivery_error,
    server_words,
)
from gpopd.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError

__all__ = ["MAX_REPLY_LINE", "MAX_REPLY_LINES", "DotStuffer", "LmtpDestination", "Reply"]

# RFC 5321 §4.5.3.1.5 allows 512 octets per reply line; verbose servers get
# room, a server that never ends its line does not get the process's memory.
MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100
_LINE_END = re.compile(rb"\r\n|\n|\r")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?")


@dataclass(frozen=True, slots=True)
class Reply:
    """One (possibly multi-line) reply; ``lines`` hold the text after each code."""

    code: int
    lines: tuple[str, ...]

    @property
    def positive(self) -> bool:
        return 200 <= self.code <= 299

    @property
    def permanent(self) -> bool:
        return 500 <= self.code <= 599

    def __str__(self) -> str:
        text = server_words("\n".join(self.lines))
        return f"{self.code} {text}".rstrip() if self.code else text


class LmtpProtocolError(RelayStalled):
    """The server's reply broke the protocol (no code, too long, too many lines)."""


class DotStuffer:
    """Turns message content into DATA's wire form, one chunk at a time.

    Line ends can be split across chunks (a CR at the end of one chunk and an
    LF at the start of the next are one line end) and so can the start of a
    line: the state carried between chunks is whether a CR is pending and
    whether the output is at the start of a line.
    """

    def __init__(self) -> None:
        self._pending_cr = False
        self._line_start = True

    def feed(self, data: bytes) -> bytes:
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._pending_cr = True
        if not data:
            return b""
        wire = _LINE_END.sub(b"\r\n", data).replace(b"\n.", b"\n..")
        if self._line_start and wire.startswith(b"."):
            wire = b"." + wire
        self._line_start = wire.endswith(b"\n")
        return wire

    def finish(self) -> bytes:
        """The end of the data: a last line end if needed, then ".", CRLF."""
        tail = b""
        if self._pending_cr:
            self._pending_cr = False
            tail = b"\r\n"
        elif not self._line_start:
            tail = b"\r\n"
        self._line_start = True
        return tail + b".\r\n"


class _Connection:
    """One LMTP connection with bounded reads and a timeout on every wait."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.timeout = timeout
        self.extensions: dict[str, str] = {}

    @property
    def usable(self) -> bool:
        return not self._writer.is_closing() and not self._reader.at_eof()

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        async with asyncio.timeout(self.timeout):
            await self._writer.drain()

    async def read_reply(self) -> Reply:
        code: int | None = None
        lines: list[str] = []
        async with asyncio.timeout(self.timeout):
            while True:
                try:
                    raw = await self._reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    raise ConnectionResetError("the server closed the connection") from None
                except asyncio.LimitOverrunError:
                    raise LmtpProtocolError(
                        f"a reply line is longer than {MAX_REPLY_LINE} bytes"
                    ) from None
                line = raw.rstrip(b"\r\n")
                if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                    raise LmtpProtocolError(f"not a reply line: {server_words(repr(line)[2:-1])}")
                this = int(line[:3])
                if code is not None and this != code:
                    raise LmtpProtocolError(f"a reply mixes the codes {code} and {this}")
                code = this
                lines.append(line[4:].decode("utf-8", "replace"))
                if line[3:4] != b"-":
                    return Reply(code, tuple(lines))
                if len(lines) >= MAX_REPLY_LINES:
                    raise LmtpProtocolError(f"a reply has more than {MAX_REPLY_LINES} lines")

    async def command(self, line: bytes) -> Reply:
        await self.send(line + b"\r\n")
        return await self.read_reply()

    def close(self) -> None:
        self._writer.close()


class LmtpDestination(RelayDestination):
    """Deliver each message over the LMTP connection of an ``LmtpDelivery``."""

    def __init__(
        self,
        cfg: LmtpDelivery,
        *,
        spool_dir: Path | None = None,
        local_hostname: str | None = None,
    ) -> None:
        where = cfg.socket if cfg.socket is not None else f"{cfg.host}:{cfg.port}"
        super().__init__(
            f"lmtp:{where}", cfg.recipient, cfg.sender, spool_dir, cfg.recipient_header
        )
        self.cfg = cfg
        hostname = local_hostname or socket.gethostname()
        self._hostname = hostname if _HOSTNAME.fullmatch(hostname) else "localhost"
        self._connection: _Connection | None = None

    @classmethod
    def from_config(cls, cfg: LmtpDelivery) -> Self:
        return cls(cfg)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            if connection.usable:
                await connection.command(b"QUIT")
        except (OSError, LmtpProtocolError):
            pass  # every message is settled already
        finally:
            connection.close()

    # -- one message ---------------------------------------------------------

    async def _transaction(self, item: RelayStaged, sender: str) -> str | None:
        connection = self._connection
        if connection is None:
            raise RelayDropped("no connection")
        parameters = self._mail_parameters(item, sender, connection.extensions.keys())
        mail = " ".join([f"MAIL FROM:<{sender}>", *parameters]).encode()
        recipients = self._recipients_for(item)
        rcpts = [f"RCPT TO:<{r}>".encode() for r in recipients]
        try:
            if "PIPELINING" in connection.extensions:
                await connection.send(b"".join(c + b"\r\n" for c in (mail, *rcpts)))
                replies = []
                for _ in range(1 + len(rcpts)):
                    replies.append(await connection.read_reply())
                    if replies[-1].code == 421:
                        break  # the server is closing: nothing more will come
            else:
                replies = [await connection.command(mail)]
                if replies[0].positive:
                    replies += [await connection.command(c) for c in rcpts]
        except TimeoutError:
            raise
        except OSError as exc:
            raise RelayDropped(f"connection lost before DATA: {exc}") from None
        closing = next((reply for reply in replies if reply.code == 421), None)
        if closing is not None:
            raise RelayDropped(f"the server is closing the connection: {closing}")
        if not replies[0].positive:
            await self._reset(connection)
            what = f"{self.name}: MAIL FROM:<{sender}> refused: {replies[0]}"
            raise delivery_error(replies[0].code, what)
        results = dict(zip(recipients, replies[1:], strict=True))
        accepted = [r for r, reply in results.items() if reply.positive]
        if not accepted or any(_temporary(reply) for reply in results.values()):
            # Deliver to none now, to every recipient at the next poll.
            await self._reset(connection)
            raise self._verdict(results, stored=False)

        try:
            start = await connection.command(b"DATA")
            if start.code != 354:
                await self._reset(connection)
                raise delivery_error(start.code, f"{self.name}: DATA refused: {start}")
            await self._send_content(connection, item)
        except TimeoutError:
            raise
        except OSError as exc:
            raise RelayDropped(f"connection lost before the end of the data: {exc}") from None

        # The final "." is sent: from here on a failure may follow deliveries.
        results.update(dict.fromkeys(accepted, _PENDING))
        try:
            for recipient in accepted:
                results[recipient] = await connection.read_reply()
        except (OSError, LmtpProtocolError) as exc:
            self._abandon()
            if isinstance(exc, TimeoutError):
                self._broken = TemporaryDeliveryError(f"{self.name}: no reply after the data")
            raise TemporaryDeliveryError(
                f"{self.name}: lost the replies after the data ({str(exc) or 'timeout'}): "
                f"{self._describe(results)}; recipients that stored the message get it "
                "again at the next poll"
            ) from None
        if any(_temporary(reply) for reply in results.values()) or not any(
            reply.positive for reply in results.values()
        ):
            raise self._verdict(results, stored=True)
        refused = {r: reply for r, reply in results.items() if not reply.positive}
        return self._describe(refused) or None

    async def _send_content(self, connection: _Connection, item: RelayStaged) -> None:
        stuffer = DotStuffer()
        chunks = item.chunks()
        while (chunk := await asyncio.to_thread(_next_chunk, chunks)) is not None:
            wire = stuffer.feed(chunk)
            if wire:
                await connection.send(wire)
        await connection.send(stuffer.finish())

    def _verdict(self, results: dict[str, Reply], *, stored: bool) -> DeliveryError:
        text = f"{self.name}: {self._describe(results)}"
        if not any(_temporary(reply) for reply in results.values()):
            return PermanentDeliveryError(text)
        if stored and any(reply.positive for reply in results.values()):
            return TemporaryDeliveryError(
                text + "; recipients that stored it get it again at the next poll"
            )
        return TemporaryDeliveryError(text + "; nothing was delivered")

    @staticmethod
    def _describe(results: dict[str, Reply]) -> str:
        return "; ".join(f"<{recipient}>: {reply}" for recipient, reply in results.items())

    # -- the connection ------------------------------------------------------

    def _session_usable(self) -> bool:
        return self._connection is not None and self._connection.usable

    async def _start_session(self) -> None:
        where = self.name
        timeout = self.cfg.timeout
        try:
            async with asyncio.timeout(timeout):
                if self.cfg.socket is not None:
                    reader, writer = await asyncio.open_unix_connection(
                        self.cfg.socket, limit=MAX_REPLY_LINE
                    )
                else:
                    reader, writer = await asyncio.open_connection(
                        self.cfg.host, self.cfg.port, limit=MAX_REPLY_LINE
                    )
        except TimeoutError:
            raise RelaySessionFailed(
                TemporaryDeliveryError(f"{where}: connecting timed out after {timeout:g} s")
            ) from None
        except OSError as exc:
            raise RelaySessionFailed(
                TemporaryDeliveryError(f"{where}: server unreachable: {exc.strerror or exc}")
            ) from None
        connection = _Connection(reader, writer, timeout)
        try:
            greeting = await connection.read_reply()
            if greeting.code != 220:
                error = delivery_error(greeting.code, f"{where}: greeting: {greeting}")
                raise RelaySessionFailed(error)
            hello = await connection.command(b"LHLO " + self._hostname.encode())
            if not hello.positive:
                error = delivery_error(hello.code, f"{where}: LHLO refused: {hello}")
                raise RelaySessionFailed(error)
        except RelaySessionFailed:
            connection.close()
            raise
        except (OSError, LmtpProtocolError) as exc:
            connection.close()
            reason = str(exc) or f"no greeting within {timeout:g} s"
            raise RelaySessionFailed(TemporaryDeliveryError(f"{where}: {reason}")) from None
        for line in hello.lines[1:]:
            keyword, _, value = line.partition(" ")
            connection.extensions[keyword.upper()] = value
        self._connection = connection

    async def _reset(self, connection: _Connection) -> None:
        try:
            reply = await connection.command(b"RSET")
        except (OSError, LmtpProtocolError):
            self._abandon()
            return
        if not reply.positive:
            self._abandon()  # a session whose state is unknown is not reused

    def _abandon(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


# Stands for a reply that never came, in the error text.
_PENDING = Reply(0, ("no reply",))


def _temporary(reply: Reply) -> bool:
    return not reply.positive and not reply.permanent


def _next_chunk(chunks: Iterator[bytes]) -> bytes | None:
    return next(chunks, None)
