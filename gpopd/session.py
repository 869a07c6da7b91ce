"""One POP3 session: pumps bytes between a ``Transport`` and ``pop3.Connection``.

The engine decides what the bytes mean; this module decides what to send next
and turns ``-ERR`` replies into gpopd's errors.  It never logs a PASS or AUTH
argument: the optional ``trace`` callback receives commands with those
arguments already replaced by ``***``.
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from gpopd import gmail, pop3
from gpopd.errors import (
    AuthError,
    MailboxBusyError,
    RateLimitedError,
    ServerError,
    TlsError,
    TokenRejectedError,
)
from gpopd.transport import Transport

# PIPELINING window: commands in flight, and bytes the server still has to
# send for them (LIST sizes).  What is left when a refill goes out (half the
# bound) must cover a round trip's worth of data at full speed, or the
# server sits idle until the refill reaches it: 8 MiB covers 40 ms at
# 200 MB/s.  Bench scenario f (500 mixed messages, 40 ms
# round trip), 8 runs each: 4 MiB 2.29 s, 16 MiB 2.22 s (medians), the
# transfer alone 1.54 s and 1.22-1.43 s.  Nothing is read sooner for it:
# what is asked for and not yet read waits in the kernel's socket buffers.
MAX_PIPELINE_COMMANDS = 100
MAX_PIPELINE_BYTES = 16 * 1024 * 1024

TraceHook = Callable[[str, str], None]

_BUSY_CODES = ("IN-USE", "LOGIN-DELAY", "SYS/TEMP")


def error_for(
    command: pop3.Command | None, err: pop3.Err, *, during_login: bool = False
) -> ServerError:
    """Map an ``-ERR`` reply to the error class that says what to do about it."""
    name = describe(command) if command is not None else "greeting"
    code = (err.code or "").upper()
    hint = gmail.hint_for(err.text)
    if hint is not None:
        if hint.kind == "rate-limited":
            return RateLimitedError(name, err.text, err.code, hint=hint.text)
        if hint.kind == "busy":
            return MailboxBusyError(name, err.text, err.code, hint=hint.text)
        if code.startswith("SYS/PERM"):
            return ServerError(name, err.text, err.code, hint=hint.text)
        return AuthError(name, err.text, err.code, hint=hint.text)
    if code.startswith(_BUSY_CODES):
        return MailboxBusyError(name, err.text, err.code)
    if code.startswith("AUTH") or (during_login and not code):
        return AuthError(name, err.text, err.code)
    return ServerError(name, err.text, err.code)


def describe(command: pop3.Command) -> str:
    """The command as a person would name it, never with a secret argument."""
    match command:
        case pop3.Pass():
            return "PASS"
        case pop3.Auth(mechanism=mech):
            return f"AUTH {mech}"
        case pop3.AuthResponse():
            return "AUTH (response)"
        case pop3.User(name=name):
            return f"USER {name}"
        case pop3.Retr(msg=n) | pop3.Dele(msg=n):
            return f"{type(command).__name__.upper()} {n}"
        case pop3.Top(msg=n, lines=k):
            return f"TOP {n} {k}"
        case pop3.List(msg=n) | pop3.Uidl(msg=n):
            suffix = f" {n}" if n is not None else ""
            return f"{type(command).__name__.upper()}{suffix}"
        case _:
            return type(command).__name__.upper()


def traced(command: pop3.Command) -> str:
    """The command for ``--trace``: secret arguments replaced by ``***``."""
    match command:
        case pop3.Pass():
            return "PASS ***"
        case pop3.AuthResponse(data="*"):
            return "*"
        case pop3.AuthResponse():
            return "***"
        case pop3.Auth(initial_response=str()):
            return f"{describe(command)} ***"
        case _:
            return describe(command)


def bearer_status(challenge: str) -> str | None:
    """The ``status`` of an OAuth2 error challenge (base64 JSON), if readable."""
    try:
        data = json.loads(base64.b64decode(challenge, validate=True))
    except (ValueError, binascii.Error):
        return None
    status = data.get("status") if isinstance(data, dict) else None
    return str(status)[:16] if isinstance(status, str | int) else None


def login_delay(capabilities: dict[str, tuple[str, ...]]) -> float | None:
    """The LOGIN-DELAY a server advertises (RFC 2449 §6.8), in seconds."""
    params = capabilities.get("LOGIN-DELAY", ())
    if params and params[0].isdigit():
        return float(params[0])
    return None


@dataclass(frozen=True, slots=True)
class Mailbox:
    """What the server says it holds, checked for consistency."""

    count: int
    size: int
    uids: tuple[tuple[int, str], ...]
    sizes: dict[int, int]


class Session:
    def __init__(self, transport: Transport, *, trace: TraceHook | None = None) -> None:
        self.transport = transport
        self.conn = pop3.Connection()
        self._trace = trace
        self.greeting: pop3.Greeting | None = None
        # The server's latest CAPA answer (empty when it has none).
        self.capabilities: dict[str, tuple[str, ...]] = {}
        # What the server offered before authentication, and how we logged in.
        self.pre_login_capabilities: dict[str, tuple[str, ...]] = {}
        self.login_method: str | None = None

    # plumbing ------------------------------------------------------------
    def send(self, *commands: pop3.Command) -> None:
        data = b"".join(self.conn.send(command) for command in commands)
        if self._trace is not None:
            for command in commands:
                self._trace("C", traced(command))
        self.transport.write(data)

    async def next_event(self) -> pop3.Event:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is not pop3.NEED_DATA:
                if self._trace is not None and not isinstance(event, pop3.MessageData):
                    self._trace("S", _summarise(event))
                return event
            conn.receive_data(await self.transport.read())

    async def request(self, command: pop3.Command, *, during_login: bool = False) -> pop3.Event:
        """Send one command and return its (complete) reply; ``-ERR`` raises."""
        self.send(command)
        event = await self.next_event()
        if isinstance(event, pop3.Err):
            raise error_for(command, event, during_login=during_login)
        return event

    # session phases ----------------------------------------------------------
    async def read_greeting(self) -> pop3.Greeting:
        event = await self.next_event()
        if isinstance(event, pop3.Err):
            raise error_for(None, event)
        if not isinstance(event, pop3.Greeting):
            raise pop3.RemoteProtocolError(f"expected a greeting, got {event!r}")
        self.greeting = event
        return event

    async def capa(self) -> dict[str, tuple[str, ...]]:
        """CAPA, or an empty dict when the server does not support it."""
        self.send(pop3.Capa())
        return await self._read_capabilities()

    async def _read_capabilities(self) -> dict[str, tuple[str, ...]]:
        event = await self.next_event()
        self.capabilities = dict(event.capabilities) if isinstance(event, pop3.Capabilities) else {}
        return self.capabilities

    async def starttls(
        self, ctx: ssl.SSLContext, server_hostname: str, handshake_timeout: float
    ) -> None:
        """STLS, mandatory: any refusal aborts before a credential is sent."""
        caps = await self.capa()
        if "STLS" not in caps:
            raise TlsError(
                f"{self.transport.host} does not offer STLS (CAPA lacks it); refusing to "
                "continue without TLS"
            )
        self.send(pop3.Stls())
        try:
            event = await self.next_event()
        except pop3.RemoteProtocolError as exc:
            # The engine saw plaintext queued behind the +OK: an injection attempt.
            raise TlsError(f"{self.transport.host}: {exc}; aborting before any credential") from exc
        if not isinstance(event, pop3.Ok):
            text = event.text if isinstance(event, pop3.Err) else repr(event)
            raise TlsError(f"{self.transport.host} refused STLS: {text}")
        await self.transport.start_tls(ctx, server_hostname, handshake_timeout)
        self.conn.tls_established()

    async def login(
        self, username: str, password: str, method: str, caps: dict[str, tuple[str, ...]]
    ) -> str:
        """Authenticate; returns the method used ("user" or "plain")."""
        if method == "auto":
            sasl = {mech.upper() for mech in caps.get("SASL", ())}
            method = "plain" if "PLAIN" in sasl else "user"
        if method == "plain":
            await self._auth_plain(username, password)
        else:
            await self.request(pop3.User(username), during_login=True)
            await self.request(pop3.Pass(password), during_login=True)
        return method

    async def _auth_plain(self, username: str, password: str) -> None:
        token = base64.b64encode(b"\0" + username.encode() + b"\0" + password.encode()).decode()
        # RFC 5034: the credentials go on the AUTH line itself (one round
        # trip less) unless that would make it longer than 255 octets.
        one_line = len("AUTH PLAIN ") + len(token) + 2 <= pop3.MAX_COMMAND_LENGTH
        command = pop3.Auth("PLAIN", token if one_line else None)
        self.send(command)
        event = await self.next_event()
        if isinstance(event, pop3.Continuation):
            # Two steps; or a server that ignored the initial response and
            # asks for the credentials as RFC 1734 servers do: answer it.
            self.send(pop3.AuthResponse(token))
            event = await self.next_event()
        if isinstance(event, pop3.Continuation):
            # A challenge after the credentials means the server rejected
            # them; cancel as the RFC asks.
            self.send(pop3.AuthResponse("*"))
            event = await self.next_event()
        if isinstance(event, pop3.Err):
            raise error_for(command, event, during_login=True)
        if not isinstance(event, pop3.Ok):
            raise pop3.RemoteProtocolError(f"unexpected reply to AUTH PLAIN: {event!r}")

    async def login_bearer(self, mechanism: str, payload: str) -> None:
        """SASL XOAUTH2 or OAUTHBEARER with an access token, always in two steps.

        The payload of a real token is longer than the 255 octets a command
        may have, so it is never sent as an initial response.  A rejected
        token comes back as a ``+`` challenge carrying base64 JSON; it is
        answered as the mechanism requires (an empty line for XOAUTH2, a
        single ^A for OAUTHBEARER) and raised as ``TokenRejectedError``.
        """
        command = pop3.Auth(mechanism)
        self.send(command)
        event = await self.next_event()
        if isinstance(event, pop3.Continuation):
            self.send(pop3.AuthResponse(payload))
            event = await self.next_event()
            if isinstance(event, pop3.Continuation):
                status = bearer_status(event.challenge)
                self.send(pop3.AuthResponse("AQ==" if mechanism == "OAUTHBEARER" else ""))
                final = await self.next_event()
                text = final.text if isinstance(final, pop3.Err) else "token rejected"
                raise TokenRejectedError(describe(command), text, status)
        if isinstance(event, pop3.Err):
            error = error_for(command, event, during_login=True)
            if type(error) is AuthError and error.hint is None:
                raise TokenRejectedError(describe(command), event.text, None)
            raise error
        if not isinstance(event, pop3.Ok):
            raise pop3.RemoteProtocolError(f"unexpected reply to AUTH {mechanism}: {event!r}")

    async def mailbox(self) -> Mailbox:
        """CAPA after login, then STAT, UIDL and LIST, cross-checked.

        Capabilities may change after login (Gmail adds PIPELINING), so
        they are asked again here, first.  A server that allowed pipelining
        before login gets all four commands in one write: one round trip
        where waiting for CAPA first would take two.  Otherwise STAT, UIDL
        and LIST wait for the new CAPA and are pipelined if it allows.
        """
        commands: list[pop3.Command] = [pop3.Stat(), pop3.Uidl(), pop3.List()]
        replies: list[pop3.Event] = []
        pipelined = self.conn.pipelining_allowed
        if pipelined:
            self.send(pop3.Capa(), *commands)
            await self._read_capabilities()
        else:
            await self.capa()
            pipelined = self.conn.pipelining_allowed
            if pipelined:
                self.send(*commands)
        for command in commands:
            if not pipelined:
                self.send(command)
            replies.append(await self._expect_ok(command))
        stat, uidl, listing = replies
        if not (
            isinstance(stat, pop3.StatReply)
            and isinstance(uidl, pop3.UidListing)
            and isinstance(listing, pop3.ScanListing)
        ):
            raise pop3.RemoteProtocolError(f"unexpected replies to STAT/UIDL/LIST: {replies!r}")
        sizes = dict(listing.entries)
        numbers = {n for n, _ in uidl.entries}
        host = self.transport.host
        if len(uidl.entries) != stat.count or len(sizes) != stat.count:
            raise pop3.RemoteProtocolError(
                f"{host} reports {stat.count} messages in STAT but lists "
                f"{len(uidl.entries)} in UIDL and {len(sizes)} in LIST"
            )
        if numbers != set(sizes) or (numbers and max(numbers) > stat.count):
            raise pop3.RemoteProtocolError(
                f"{host}'s UIDL and LIST disagree on message numbers, or a number "
                f"exceeds the STAT count {stat.count}"
            )
        return Mailbox(stat.count, stat.size, uidl.entries, sizes)

    async def _expect_ok(self, command: pop3.Command) -> pop3.Event:
        event = await self.next_event()
        if isinstance(event, pop3.Err):
            raise error_for(command, event)
        return event

    async def retrieve(
        self, numbers: Sequence[int], sizes: dict[int, int]
    ) -> AsyncIterator[pop3.Event]:
        """RETR each message, pipelined when the server allows it.

        Yields MessageStart, MessageData... and MessageEnd per message, in
        order.  A ``-ERR`` to a RETR raises ``ServerError`` for that message.
        """
        window = MAX_PIPELINE_COMMANDS if self.conn.pipelining_allowed else 1
        pending = iter(numbers)
        in_flight: list[int] = []
        head = 0
        # What the server still has to send for the RETRs in flight: their
        # LIST sizes, less what has been read of the oldest (never more than
        # its own LIST size, ``head_left``).  The byte bound limits this.
        bytes_in_flight = 0
        head_left = 0
        # Whether the last refill stopped at the byte bound (large messages)
        # rather than at the command bound (small ones).
        byte_bound = False

        def refill() -> None:
            nonlocal bytes_in_flight, byte_bound
            batch: list[pop3.Command] = []
            byte_bound = False
            while len(in_flight) - head < window:
                if bytes_in_flight >= MAX_PIPELINE_BYTES and len(in_flight) > head:
                    byte_bound = True
                    break
                n = next(pending, None)
                if n is None:
                    break
                in_flight.append(n)
                bytes_in_flight += sizes.get(n, 0)
                batch.append(pop3.Retr(n))
            if batch:
                self.send(*batch)

        refill()
        while head < len(in_flight):
            event = await self.next_event()
            if isinstance(event, pop3.Err):
                raise error_for(event.command, event)
            yield event
            if isinstance(event, pop3.MessageData):
                read = min(len(event.data), head_left)
                head_left -= read
                bytes_in_flight -= read
                # A message larger than the bound: ask for the next one
                # while this one still arrives, or the server would sit idle
                # for a round trip between the two (4-11 ms each on
                # 127.0.0.1 with 20 MB messages).
                if byte_bound and bytes_in_flight < MAX_PIPELINE_BYTES // 2:
                    refill()
            elif isinstance(event, pop3.MessageStart):
                head_left = sizes.get(in_flight[head], 0)
            elif isinstance(event, pop3.MessageEnd):
                bytes_in_flight -= head_left
                head_left = 0
                head += 1
                # Refill in batches, not one RETR per finished message: each
                # write is a TLS record and a send(2) of its own (py-spy on
                # 4,000 small messages: a fifth of the event loop's time went
                # to per-message writes while small messages, far below the
                # byte bound, triggered a refill each).
                outstanding = len(in_flight) - head
                if outstanding <= window // 2 or (
                    byte_bound and bytes_in_flight < MAX_PIPELINE_BYTES // 2
                ):
                    refill()

    async def delete(self, numbers: Sequence[int]) -> None:
        """DELE each message (pipelined when allowed); any ``-ERR`` raises."""
        if not numbers:
            return
        if self.conn.pipelining_allowed:
            for start in range(0, len(numbers), MAX_PIPELINE_COMMANDS):
                chunk = numbers[start : start + MAX_PIPELINE_COMMANDS]
                self.send(*(pop3.Dele(n) for n in chunk))
                for n in chunk:
                    await self._expect_ok(pop3.Dele(n))
        else:
            for n in numbers:
                await self.request(pop3.Dele(n))

    async def quit(self) -> None:
        """QUIT: the server now applies the DELEs (UPDATE state)."""
        await self.request(pop3.Quit())
        await self.transport.close()


def _summarise(event: pop3.Event) -> str:
    match event:
        case pop3.UidListing(entries=entries) | pop3.ScanListing(entries=entries):
            return f"{type(event).__name__} ({len(entries)} entries)"
        case pop3.Continuation():
            return "+ (challenge)"
        case _:
            return repr(event)
