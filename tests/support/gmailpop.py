"""A POP3 server on 127.0.0.1 that behaves like Gmail as PROTOCOL.md §4-§5 records it.

Gmail cannot be reached from tests, so this models one Gmail account: ``GmailId``
UIDs, the oldest ``batch_size`` un-popped messages per normal-mode session,
messages marked popped only by a QUIT-ended session (``EXPIRE 0``), the
``recent:`` mode that relists the last 30 days, XOAUTH2/OAUTHBEARER with the
JSON error continuation, and Gmail's ``-ERR`` texts switched on through
:class:`Fault`.  Everything a client sent is recorded so tests can check the
command-length limit and the shape of the SASL exchange.

The texts it answers with live in :mod:`tests.support.gmailwire`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from email.parser import BytesHeaderParser
from email.utils import parseaddr
from pathlib import Path

from tests.support.certs import TestPKI
from tests.support.fakepop import stuff
from tests.support.gmailwire import (
    BAD_COMMAND,
    BAD_CREDENTIALS,
    BAD_SASL,
    BAD_SASL_RESPONSE,
    BATCH_SIZE,
    CAPA_AFTER_LOGIN,
    CAPA_BEFORE_LOGIN,
    DEFAULT_ADDRESS,
    DEFAULT_APP_PASSWORD,
    DEFAULT_TOKEN,
    ERROR_CHALLENGE,
    INVALID_TOKEN,
    MAX_LINE,
    NO_SUCH_MESSAGE,
    PASSWORD_FAULTS,
    RECENT_DAYS,
    SASL_CANCELLED,
    TRANSACTION_FAULT_VERBS,
    AuthAttempt,
    Fault,
    GmailMessage,
    oauthbearer_payload,
    parse_oauthbearer,
    parse_xoauth2,
    uid_for,
    xoauth2_payload,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_APP_PASSWORD",
    "DEFAULT_TOKEN",
    "AuthAttempt",
    "Fault",
    "GmailMessage",
    "GmailPop",
    "oauthbearer_payload",
    "uid_for",
    "xoauth2_payload",
]


def _sender(message: bytes) -> str:
    headers = BytesHeaderParser().parsebytes(message)
    return parseaddr(str(headers.get("From", "")))[1].lower()


class GmailPop:
    """A Gmail-like POP3 server; ``async with GmailPop(pki) as server:`` runs it.

    Log in as ``server.username`` (normal mode) or ``server.recent_username``
    with ``server.password`` over USER/PASS or PLAIN, or with a token accepted
    by ``token_valid`` over XOAUTH2/OAUTHBEARER.  ``fault`` may be changed
    between sessions.
    """

    def __init__(
        self,
        pki: TestPKI | None = None,
        *,
        tls: bool = True,
        address: str = DEFAULT_ADDRESS,
        password: str = DEFAULT_APP_PASSWORD,
        token_valid: Callable[[str], bool] | None = None,
        tokens: Iterable[str] = (DEFAULT_TOKEN,),
        batch_size: int = BATCH_SIZE,
        recent_cap: int | None = None,
        fault: Fault | None = None,
    ) -> None:
        if tls and pki is None:
            raise ValueError("implicit TLS needs a TestPKI; pass tls=False for plain POP3")
        self.pki = pki
        self.tls = tls
        self.address = address
        self.password = password
        self.tokens = set(tokens)
        self.token_valid: Callable[[str], bool] = token_valid or self.tokens.__contains__
        self.batch_size = batch_size
        self.recent_cap = recent_cap
        self.fault = fault
        self.host = "127.0.0.1"
        self.port = 0
        self.messages: list[GmailMessage] = []
        # Observations for assertions.
        # Every line received, line end included; ``commands`` holds the lines read as
        # commands (RFC 2449's 255-octet limit), ``sasl_responses`` the AUTH client
        # responses, which the limit does not cover.
        self.lines: list[bytes] = []
        self.commands: list[bytes] = []
        self.sasl_responses: list[bytes] = []
        self.sessions_opened = 0
        self.sessions_quit = 0  # logged-in sessions ended by QUIT: only these pop
        self.logins = 0
        self.retrs: Counter[str] = Counter()
        self.tops: Counter[str] = Counter()
        self.deles: Counter[str] = Counter()
        self.auth_mechanisms: Counter[str] = Counter()
        self.auth_log: list[AuthAttempt] = []
        self._server: asyncio.Server | None = None
        self._sessions: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    # -- the account -------------------------------------------------------

    @property
    def username(self) -> str:
        return self.address

    @property
    def recent_username(self) -> str:
        return "recent:" + self.address

    @property
    def ca_file(self) -> Path | None:
        return self.pki.ca_file if self.pki is not None and self.tls else None

    @property
    def max_line_length(self) -> int:
        """Octets of the longest line received, line end included."""
        return max(map(len, self.lines), default=0)

    @property
    def max_command_length(self) -> int:
        """Octets of the longest command line received, line end included."""
        return max(map(len, self.commands), default=0)

    def add(self, message: bytes, *, age_days: float = 0) -> str:
        """Put a message in the account (dated ``age_days`` ago); returns its UID."""
        seq = len(self.messages)
        date = dt.datetime.now(dt.UTC) - dt.timedelta(days=age_days)
        self.messages.append(GmailMessage(seq, uid_for(seq), message, date, _sender(message)))
        return self.messages[-1].uid

    def popped_uids(self) -> set[str]:
        return {m.uid for m in self.messages if m.popped}

    def normal_listing(self) -> list[GmailMessage]:
        """What a normal-mode session opened now would list."""
        waiting = sorted((m for m in self.messages if not m.popped), key=_age_order)
        return waiting[: self.batch_size]

    def recent_listing(self) -> list[GmailMessage]:
        """What a recent-mode session opened now would list."""
        since = dt.datetime.now(dt.UTC) - dt.timedelta(days=RECENT_DAYS)
        recent = sorted((m for m in self.messages if m.date >= since), key=_age_order)
        return recent if self.recent_cap is None else recent[: self.recent_cap]

    def check_login(self, user: str, secret: str) -> bool:
        return user in (self.username, self.recent_username) and secret == self.password

    # -- running -----------------------------------------------------------

    async def start(self) -> None:
        context = None
        if self.tls:
            assert self.pki is not None
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.pki.server_cert, self.pki.server_key)
        self._server = await asyncio.start_server(
            self._client, self.host, self.port, ssl=context, limit=MAX_LINE
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Abort rather than cancel: a cancelled task could leave a TLS shutdown
        # half done and its socket open after the loop is gone.
        for writer in self._sessions.values():
            writer.transport.abort()
        if self._sessions:
            _, stuck = await asyncio.wait(list(self._sessions), timeout=5)
            for task in stuck:
                task.cancel()
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> GmailPop:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @contextlib.contextmanager
    def running_in_thread(self) -> Iterator[GmailPop]:
        """Serve from a private event loop in a thread, for synchronous callers."""
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                return
            finally:
                started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())

        thread = threading.Thread(target=serve, name="gmailpop", daemon=True)
        thread.start()
        started.wait(30)
        try:
            if failure:
                raise failure[0]
            yield self
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions[task] = writer
        self.sessions_opened += 1
        try:
            await _Session(self, reader, writer).run()
        except (ConnectionError, ssl.SSLError, ValueError):
            # A dropped or overlong connection just ends the session without QUIT.
            writer.transport.abort()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            del self._sessions[task]


def _age_order(message: GmailMessage) -> tuple[dt.datetime, int]:
    return message.date, message.seq


class _Session:
    """One connection: AUTHORIZATION until a login succeeds, then TRANSACTION."""

    def __init__(
        self, server: GmailPop, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.user: str | None = None  # after USER, before PASS
        self.listed: list[GmailMessage] | None = None  # set once logged in
        self.deleted: set[int] = set()
        self.downloaded: set[int] = set()

    async def readline(self, record: list[bytes]) -> bytes:
        line = await self.reader.readline()
        if line:
            self.server.lines.append(line)
            record.append(line)
        return line

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def run(self) -> None:
        peer = self.writer.get_extra_info("peername")
        token = f"gp{self.server.sessions_opened:06d}mb"
        await self.send(f"+OK Gpop ready for requests from {peer[0]} {token}\r\n".encode())
        while line := await self.readline(self.server.commands):
            text = line.rstrip(b"\r\n").decode("latin-1")
            verb, _, rest = text.partition(" ")
            verb = verb.upper()
            if verb == "QUIT":
                await self.quit()
                return
            if verb == "CAPA":
                caps = CAPA_AFTER_LOGIN if self.listed is not None else CAPA_BEFORE_LOGIN
                body = "".join(f"{cap}\r\n" for cap in caps)
                await self.send(f"+OK Capability list follows\r\n{body}.\r\n".encode())
            elif self.listed is None:
                await self.authorization(verb, rest)
            else:
                await self.transaction(verb, rest)

    async def quit(self) -> None:
        # Recent mode pops too: a download is a download, whichever listing offered it.
        if self.listed is not None:
            self.server.sessions_quit += 1
            for index in self.downloaded | self.deleted:
                self.listed[index].popped = True
        await self.send(b"+OK Farewell.\r\n")

    # -- AUTHORIZATION -----------------------------------------------------

    async def authorization(self, verb: str, rest: str) -> None:
        if verb == "USER" and rest:
            self.user = rest
            await self.send(b"+OK send PASS\r\n")
        elif verb == "PASS" and self.user is not None:
            user, self.user = self.user, None
            self.server.auth_mechanisms["USER"] += 1
            ok = self.server.check_login(user, rest)
            await self.finish_login(AuthAttempt("USER", "user-pass", user, ok), password=True)
        elif verb == "AUTH" and rest:
            await self.auth(*rest.split(" ", 1))
        else:
            await self.send(BAD_COMMAND)

    async def auth(self, mechanism: str, initial: str | None = None) -> None:
        mechanism = mechanism.upper()
        if mechanism not in ("PLAIN", "XOAUTH2", "OAUTHBEARER"):
            await self.send(BAD_SASL)
            return
        self.server.auth_mechanisms[mechanism] += 1
        form = "one-line" if initial is not None else "two-step"
        if initial is None:
            await self.send(b"+ \r\n")
            initial = (
                (await self.readline(self.server.sasl_responses)).rstrip(b"\r\n").decode("latin-1")
            )
        if initial == "*":
            self.server.auth_log.append(AuthAttempt(mechanism, form, None, ok=False))
            await self.send(SASL_CANCELLED)
            return
        try:
            payload = b"" if initial == "=" else base64.b64decode(initial, validate=True)
        except binascii.Error:
            payload = None
        if mechanism == "PLAIN":
            fields = payload.split(b"\x00") if payload is not None else []
            if len(fields) != 3 or fields[0] not in (b"", fields[1]):
                await self.reject(AuthAttempt(mechanism, form, None, ok=False), BAD_SASL)
                return
            user, secret = (f.decode("utf-8", "replace") for f in fields[1:])
            ok = self.server.check_login(user, secret)
            await self.finish_login(AuthAttempt(mechanism, form, user, ok), password=True)
            return
        parse = parse_xoauth2 if mechanism == "XOAUTH2" else parse_oauthbearer
        parsed = parse(payload) if payload is not None else None
        if parsed is None:
            await self.reject(AuthAttempt(mechanism, form, None, ok=False), BAD_SASL)
            return
        user, token = parsed
        if user in (self.server.username, self.server.recent_username) and self.server.token_valid(
            token
        ):
            await self.finish_login(AuthAttempt(mechanism, form, user, ok=True), password=False)
            return
        # Gmail refuses a token with a continuation, never with a direct -ERR.
        await self.send(ERROR_CHALLENGE)
        answer = (await self.readline(self.server.sasl_responses)).rstrip(b"\r\n")
        expected = b"" if mechanism == "XOAUTH2" else b"AQ=="
        reply = INVALID_TOKEN if answer in (expected, b"*") else BAD_SASL_RESPONSE
        await self.reject(
            AuthAttempt(mechanism, form, user, ok=False, error_response=answer), reply
        )

    async def reject(self, attempt: AuthAttempt, reply: bytes) -> None:
        self.server.auth_log.append(attempt)
        await self.send(reply)

    async def finish_login(self, attempt: AuthAttempt, *, password: bool) -> None:
        server = self.server
        recent = attempt.user is not None and attempt.user.startswith("recent:")
        fault = server.fault
        if not attempt.ok:
            await self.reject(attempt, BAD_CREDENTIALS)
        elif (
            fault is not None
            and fault is not Fault.POP_DISABLED_ON_STAT
            and (password or fault not in PASSWORD_FAULTS)
            and not (fault is Fault.STILL_ENABLING and recent)
        ):
            await self.reject(
                AuthAttempt(attempt.mechanism, attempt.form, attempt.user, ok=False), fault.text
            )
        else:
            server.auth_log.append(attempt)
            server.logins += 1
            self.listed = server.recent_listing() if recent else server.normal_listing()
            await self.send(b"+OK Welcome.\r\n")

    # -- TRANSACTION -------------------------------------------------------

    def message(self, arg: str) -> int | None:
        """The index of a live message named by ``arg``, else None."""
        assert self.listed is not None
        if not arg.isdigit() or not 1 <= int(arg) <= len(self.listed):
            return None
        index = int(arg) - 1
        return None if index in self.deleted else index

    async def transaction(self, verb: str, rest: str) -> None:
        assert self.listed is not None
        if self.server.fault is Fault.POP_DISABLED_ON_STAT and verb in TRANSACTION_FAULT_VERBS:
            await self.send(Fault.POP_DISABLED_ON_STAT.text)
            return
        args = rest.split(" ") if rest else []
        live = [i for i in range(len(self.listed)) if i not in self.deleted]
        if verb == "STAT" and not args:
            octets = sum(self.listed[i].size for i in live)
            await self.send(f"+OK {len(live)} {octets}\r\n".encode())
        elif verb in ("LIST", "UIDL") and not args:
            rows = "".join(f"{i + 1} {self.column(verb, i)}\r\n" for i in live)
            await self.send(f"+OK\r\n{rows}.\r\n".encode())
        elif verb in ("LIST", "UIDL") and len(args) == 1:
            index = self.message(args[0])
            if index is None:
                await self.send(NO_SUCH_MESSAGE)
            else:
                await self.send(f"+OK {index + 1} {self.column(verb, index)}\r\n".encode())
        elif verb == "RETR" and len(args) == 1:
            await self.retr(args[0])
        elif verb == "TOP" and len(args) == 2 and args[1].isdigit():
            await self.top(args[0], int(args[1]))
        elif verb == "DELE" and len(args) == 1:
            index = self.message(args[0])
            if index is None:
                await self.send(NO_SUCH_MESSAGE)
            else:
                self.deleted.add(index)
                self.server.deles[self.listed[index].uid] += 1
                await self.send(b"+OK marked for deletion\r\n")
        elif verb in ("NOOP", "RSET") and not args:
            if verb == "RSET":
                self.deleted.clear()
            await self.send(b"+OK\r\n")
        else:
            await self.send(BAD_COMMAND)

    def column(self, verb: str, index: int) -> str:
        assert self.listed is not None
        message = self.listed[index]
        return str(message.size) if verb == "LIST" else message.uid

    async def retr(self, arg: str) -> None:
        assert self.listed is not None
        index = self.message(arg)
        if index is None:
            await self.send(NO_SUCH_MESSAGE)
            return
        message = self.listed[index]
        self.downloaded.add(index)
        self.server.retrs[message.uid] += 1
        await self.send(b"+OK message follows\r\n" + stuff(message.data))

    async def top(self, arg: str, count: int) -> None:
        assert self.listed is not None
        index = self.message(arg)
        if index is None:
            await self.send(NO_SUCH_MESSAGE)
            return
        message = self.listed[index]
        self.server.tops[message.uid] += 1
        lines = message.data.replace(b"\r\n", b"\n").split(b"\n")
        blank = lines.index(b"") if b"" in lines else len(lines)
        # The trailing LF keeps the blank separator line when ``count`` is 0.
        kept = b"\n".join(lines[: blank + 1 + count]) + b"\n"
        await self.send(b"+OK message follows\r\n" + stuff(kept))
