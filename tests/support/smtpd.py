"""aiosmtpd servers for the SMTP and LMTP delivery tests.

Each server runs in aiosmtpd's threaded ``Controller`` on 127.0.0.1, on a
port the system picks (or on a Unix socket), and records every message it
accepts.  Replies can be scripted: per recipient at RCPT, per DATA for SMTP,
per recipient after DATA for LMTP (one reply line each, RFC 2033 §4.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller, UnixSocketController
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

HOST = "127.0.0.1"
SERVER_NAME = "relay.test"


@dataclass(frozen=True)
class Received:
    """One message as the server took it (content after dot-unstuffing, CRLF kept)."""

    mail_from: str
    recipients: tuple[str, ...]
    content: bytes
    mail_options: tuple[str, ...]
    session: int
    tls: bool


@dataclass
class RecordingHandler:
    """Accepts and records mail; ``refuse`` and the reply lists script other answers.

    ``mail_replies`` are used one per MAIL (``None``: accept); ``refuse`` maps a
    recipient to its RCPT reply; ``data_replies`` are used one per SMTP DATA;
    ``lmtp_replies`` map a recipient to its replies after LMTP DATA, one per
    transaction.  Unscripted answers are "250 OK".
    """

    refuse: Mapping[str, str] = field(default_factory=dict)
    mail_replies: list[str | None] = field(default_factory=list)
    data_replies: list[str] = field(default_factory=list)
    lmtp_replies: dict[str, list[str]] = field(default_factory=dict)
    offer_8bitmime: bool = True
    pipelining: bool = False
    received: list[Received] = field(default_factory=list)
    quits: int = 0
    # One aiosmtpd SMTP instance per connection (its Session object is
    # replaced after STARTTLS, so it cannot tell connections apart).
    _connections: list[SMTP] = field(default_factory=list)

    @property
    def sessions(self) -> int:
        """How many connections said EHLO/LHLO."""
        return len(self._connections)

    def _session_number(self, server: SMTP) -> int:
        for number, known in enumerate(self._connections):
            if known is server:
                return number
        self._connections.append(server)
        return len(self._connections) - 1

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        self._session_number(server)
        if not self.offer_8bitmime:
            responses = [line for line in responses if "8BITMIME" not in line]
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        reply = self.mail_replies.pop(0) if self.mail_replies else None
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if isinstance(server, LMTP):
            replies = []
            for recipient in envelope.rcpt_tos:
                scripted = self.lmtp_replies.get(recipient)
                reply = scripted.pop(0) if scripted else "250 OK"
                if reply.startswith("2"):
                    self._record(server, envelope, (recipient,))
                replies.append(reply)
            return "\r\n".join(replies)
        reply = self.data_replies.pop(0) if self.data_replies else "250 OK"
        if reply.startswith("2"):
            self._record(server, envelope, tuple(envelope.rcpt_tos))
        return reply

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.quits += 1
        return "221 Bye"

    def _record(self, server: SMTP, envelope: Envelope, recipients: tuple[str, ...]) -> None:
        content = envelope.original_content
        assert isinstance(content, bytes)
        self.received.append(
            Received(
                mail_from=envelope.mail_from or "",
                recipients=recipients,
                content=content,
                mail_options=tuple(envelope.mail_options),
                session=self._session_number(server),
                tls=server.session is not None and server.session.ssl is not None,
            )
        )


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context presenting ``cert``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def password_checker(user: str, password: str) -> Any:
    """An aiosmtpd authenticator accepting exactly ``user``/``password``."""

    def check(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: object
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user.encode()
            and auth_data.password == password.encode()
        )
        # handled=False: aiosmtpd itself answers a failure with 535.
        return AuthResult(success=ok, handled=False)

    return check


class _InetController(Controller):
    def __init__(self, handler: RecordingHandler, *, lmtp: bool, **kwargs: Any) -> None:
        super().__init__(handler, hostname=HOST, port=0, server_hostname=SERVER_NAME, **kwargs)
        self._lmtp = lmtp

    def factory(self) -> SMTP:
        return (LMTP if self._lmtp else SMTP)(self.handler, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # Listening on port 0: learn the port before the controller's own
        # first connection, which goes to self.port.
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


class _UnixController(UnixSocketController):
    def __init__(self, handler: RecordingHandler, *, lmtp: bool, **kwargs: Any) -> None:
        super().__init__(handler, server_hostname=SERVER_NAME, **kwargs)
        self._lmtp = lmtp

    def factory(self) -> SMTP:
        return (LMTP if self._lmtp else SMTP)(self.handler, **self.SMTP_kwargs)


@dataclass
class RunningServer:
    """Where a started server listens and what it has recorded."""

    handler: RecordingHandler
    controller: Controller | UnixSocketController
    host: str = HOST
    port: int = 0
    socket: Path | None = None

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def drop_connection(self) -> None:
        """Close the newest connection from the server's side, as an idle timeout would."""
        smtpd = self.controller.smtpd
        assert smtpd is not None
        assert smtpd.transport is not None
        self.controller.loop.call_soon_threadsafe(smtpd.transport.close)


@contextlib.contextmanager
def running_server(
    handler: RecordingHandler | None = None,
    *,
    lmtp: bool = False,
    starttls: ssl.SSLContext | None = None,
    require_starttls: bool = False,
    implicit_tls: ssl.SSLContext | None = None,
    authenticator: Any = None,
    unix_socket: Path | None = None,
    **smtp_options: Any,
) -> Iterator[RunningServer]:
    """Run an SMTP (or LMTP) server for the ``with`` block."""
    handler = handler or RecordingHandler()
    options: dict[str, Any] = dict(smtp_options)
    if starttls is not None:
        options.update(tls_context=starttls, require_starttls=require_starttls)
    if authenticator is not None:
        options["authenticator"] = authenticator
    controller: Controller | UnixSocketController
    if unix_socket is not None:
        controller = _UnixController(
            handler, lmtp=lmtp, unix_socket=unix_socket, ssl_context=implicit_tls, **options
        )
    else:
        controller = _InetController(handler, lmtp=lmtp, ssl_context=implicit_tls, **options)
    controller.start()
    try:
        yield RunningServer(
            handler,
            controller,
            port=getattr(controller, "port", 0),
            socket=unix_socket,
        )
    finally:
        controller.stop()


class ScriptedLmtp:
    """A tiny LMTP server in the test's own event loop, answering from a script.

    It records the raw bytes of every DATA phase (stuffed, CRLF, with the
    final ".") so that tests can check the wire form itself.  ``mail_replies``
    answer the MAIL commands one by one (a 421 also closes the connection);
    ``after_data`` is sent once the data ends, ``None`` meaning never.
    """

    def __init__(
        self,
        *,
        greeting: bytes = b"220 scripted LMTP ready\r\n",
        lhlo: bytes = b"250-scripted\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
        replies: Mapping[bytes, bytes] | None = None,
        mail_replies: list[bytes] | None = None,
        after_data: bytes | None = b"250 2.0.0 ok\r\n",
    ) -> None:
        self.greeting = greeting
        self.lhlo = lhlo
        self.replies = dict(replies or {})
        self.mail_replies = list(mail_replies or [])
        self.after_data = after_data
        self.connections = 0
        self.data: list[bytes] = []
        self.commands: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ScriptedLmtp:
        # Room for the long lines big-message tests send.
        self._server = await asyncio.start_server(self._serve, HOST, 0, limit=1 << 23)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.connections += 1
        try:
            writer.write(self.greeting)
            while line := await reader.readline():
                self.commands.append(line)
                verb = line.split(b":")[0].split(b" ")[0].strip().upper()
                if verb == b"LHLO":
                    writer.write(self.lhlo)
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    payload = bytearray()
                    while (part := await reader.readline()) and part != b".\r\n":
                        payload += part
                    self.data.append(bytes(payload + part))
                    if self.after_data is None:
                        await asyncio.Event().wait()
                    writer.write(self.after_data or b"")
                elif verb == b"MAIL" and self.mail_replies:
                    reply = self.mail_replies.pop(0)
                    writer.write(reply)
                    if reply.startswith(b"421"):
                        break
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(self.replies.get(verb, b"250 ok\r\n"))
                await writer.drain()
        finally:
            writer.close()
