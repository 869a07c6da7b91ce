"""The sans-IO POP3 client connection.

``send()`` turns commands into bytes and remembers them in a FIFO;
``receive_data()`` buffers the server's bytes; ``next_event()`` parses the
reply to the oldest outstanding command.  Replies come back strictly in
order (RFC 2449 section 6.6), which is what makes pipelining safe to track
with a plain queue.
"""

from __future__ import annotations

from collections import deque

from ._body import Unstuffer
from ._buffer import ReceiveBuffer
from ._commands import (
    Auth,
    AuthResponse,
    Capa,
    Command,
    List,
    Quit,
    Retr,
    Stat,
    Stls,
    Top,
    Uidl,
    describe,
    encode,
)
from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    Capabilities,
    ConnectionClosed,
    Continuation,
    Err,
    Event,
    Greeting,
    MessageData,
    MessageEnd,
    MessageStart,
    Ok,
    ScanListing,
    StatReply,
    UidListing,
    _NeedData,
)
from ._limits import MAX_CHALLENGE, MAX_STATUS_LINE, MAX_TOTAL_SIZE_DIGITS
from ._lines import (
    MultiLineReader,
    parse_number,
    parse_status,
    parse_uid,
    quote,
    strip_eol,
)
from ._state import State, transition


class Connection:
    """One POP3 client session, without any I/O.

    The caller writes what ``send()`` returns, feeds what it reads to
    ``receive_data()`` (``b""`` at end of stream) and calls ``next_event()``
    until it returns ``NEED_DATA``.
    """

    def __init__(self) -> None:
        self._state = State.GREETING
        self._buffer = ReceiveBuffer()
        self._eof = False
        self._outstanding: deque[Command] = deque()
        self._pending: deque[Event] = deque()
        self._listing: tuple[Capa | List | Uidl, MultiLineReader] | None = None
        self._body: tuple[Retr | Top, Unstuffer] | None = None
        # The server sent "+ challenge" and waits for our AuthResponse.
        self._challenge_open = False
        self._quit_sent = False
        self._capabilities: dict[str, tuple[str, ...]] = {}

    @property
    def state(self) -> State:
        """The current state."""
        return self._state

    @property
    def outstanding(self) -> int:
        """Commands sent and not yet fully answered."""
        return len(self._outstanding)

    @property
    def capabilities(self) -> dict[str, tuple[str, ...]]:
        """Upper-cased tag -> parameters from the last CAPA reply; cleared by STLS."""
        return dict(self._capabilities)

    @property
    def pipelining_allowed(self) -> bool:
        """Whether the last CAPA reply listed PIPELINING."""
        return "PIPELINING" in self._capabilities

    # -- sending ---------------------------------------------------------

    def send(self, command: Command) -> bytes:
        """Validate ``command``, record it as outstanding and return its wire bytes."""
        self._check_usable()
        try:
            return self._send(command)
        except ProtocolError:
            self._state = State.ERROR
            raise

    def _send(self, command: Command) -> bytes:
        if not isinstance(command, Command):
            raise LocalProtocolError(f"not a POP3 command: {type(command).__name__}")
        transition(self._state, type(command))
        if isinstance(command, AuthResponse):
            # RFC 5034: one response line per challenge, inside the AUTH exchange.
            if not (self._challenge_open and isinstance(self._outstanding[0], Auth)):
                raise LocalProtocolError("an AUTH response is only allowed after a challenge")
            wire = encode(command)
            self._challenge_open = False
            return wire
        if self._quit_sent:
            raise LocalProtocolError(f"{describe(command)} after QUIT")
        if self._outstanding and self._state is not State.TRANSACTION:
            # RFC 2449 section 6.6: only TRANSACTION commands are pipelined;
            # STLS and AUTH in particular must wait for their reply.
            raise LocalProtocolError(
                f"{describe(command)} sent while {describe(self._outstanding[0])} is"
                f" outstanding in state {self._state.name}"
            )
        wire = encode(command)
        self._outstanding.append(command)
        if isinstance(command, Quit):
            self._quit_sent = True
        return wire

    def tls_established(self) -> None:
        """Report the TLS handshake after STLS as done: back to AUTHORIZATION."""
        self._check_usable()
        if self._state is not State.STARTING_TLS:
            self._state = State.ERROR
            raise LocalProtocolError(f"tls_established() in state {self._state.name}")
        # RFC 2595 section 4: capabilities learnt in plaintext are void.
        self._capabilities = {}
        self._state = State.AUTHORIZATION

    # -- receiving -------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the server; ``b""`` means it closed the connection."""
        self._check_usable()
        if not data:
            self._eof = True
            return
        if self._eof:
            self._state = State.ERROR
            raise LocalProtocolError("data received after the end of the stream")
        if self._state is State.STARTING_TLS:
            # Plaintext where the TLS handshake should be: a response
            # injection attempt (CVE-2020-14954 and relatives).
            self._state = State.ERROR
            raise RemoteProtocolError("data after STLS before the TLS handshake")
        self._buffer.append(data)

    def next_event(self) -> Event | _NeedData:
        """The next event parsed from the buffered bytes, or ``NEED_DATA``.

        Once the server has closed the connection in an orderly way, every
        call returns ``ConnectionClosed``.
        """
        self._check_usable()
        try:
            return self._next_event()
        except ProtocolError:
            self._state = State.ERROR
            raise

    def _next_event(self) -> Event | _NeedData:
        if self._pending:
            return self._pending.popleft()
        if self._body is not None:
            return self._read_body(*self._body)
        if self._listing is not None:
            return self._read_listing(*self._listing)
        if self._state is State.GREETING:
            return self._read_greeting()
        if self._outstanding:
            return self._read_reply(self._outstanding[0])
        if self._buffer:
            raise RemoteProtocolError(
                f"data from the server when no reply is due: {quote(self._buffer.peek(61))}"
            )
        if self._eof:
            self._state = State.CLOSED
            return ConnectionClosed()
        return NEED_DATA

    def _incomplete(self, command: Command | None) -> _NeedData:
        if self._eof:
            what = "the greeting" if command is None else describe(command)
            raise RemoteProtocolError(f"connection closed during {what}")
        return NEED_DATA

    def _read_greeting(self) -> Event | _NeedData:
        raw = self._buffer.take_line(MAX_STATUS_LINE, "MAX_STATUS_LINE")
        if raw is None:
            return self._incomplete(None)
        ok, text, code = parse_status(strip_eol(raw))
        if ok:
            self._state = State.AUTHORIZATION
            return Greeting(text, code)
        self._state = State.CLOSED
        return Err(None, text, code)

    def _read_reply(self, command: Command) -> Event | _NeedData:
        if isinstance(command, Auth):
            # The line may be a SASL challenge, which has a larger limit.
            raw = self._buffer.take_line(MAX_CHALLENGE, "MAX_CHALLENGE")
        else:
            raw = self._buffer.take_line(MAX_STATUS_LINE, "MAX_STATUS_LINE")
        if raw is None:
            return self._incomplete(command)
        line = strip_eol(raw)
        if isinstance(command, Auth) and (line == b"+" or line.startswith(b"+ ")):
            if self._challenge_open:
                raise RemoteProtocolError("second SASL challenge before the client's response")
            self._challenge_open = True
            return Continuation(command, line[2:].decode("utf-8", errors="replace").strip())
        if len(raw) > MAX_STATUS_LINE:
            raise RemoteProtocolError(
                f"MAX_STATUS_LINE ({MAX_STATUS_LINE} octets) exceeded by a reply to AUTH"
            )
        ok, text, code = parse_status(line)
        if not ok:
            self._finish()
            if isinstance(command, Quit):
                # RFC 1939 section 6: the server closes after QUIT either way.
                self._state = State.CLOSED
            return Err(command, text, code)
        self._state = transition(self._state, type(command))
        match command:
            case Capa() | List(msg=None) | Uidl(msg=None):
                self._listing = (command, MultiLineReader(command))
                return self._read_listing(*self._listing)
            case Retr() | Top():
                self._body = (command, Unstuffer())
                return MessageStart(command, text)
            case Stat():
                self._finish()
                count, size = _fields(line, 2, "STAT")
                return StatReply(
                    command,
                    parse_number(count, 0, "message count"),
                    parse_number(size, 0, "maildrop size", MAX_TOTAL_SIZE_DIGITS),
                )
            case List(msg=int() as msg):
                self._finish()
                number, size = _fields(line, 2, describe(command))
                _check_number(number, msg)
                return ScanListing(command, ((msg, parse_number(size, 0, "message size")),))
            case Uidl(msg=int() as msg):
                self._finish()
                number, uid = _fields(line, 2, describe(command), exact=True)
                _check_number(number, msg)
                return UidListing(command, ((msg, parse_uid(uid)),))
            case Stls() if self._buffer:
                raise RemoteProtocolError(
                    "data after the STLS +OK before the TLS handshake (response injection)"
                )
            case Stls():
                self._capabilities = {}
        self._finish()
        return Ok(command, text, code)

    def _finish(self) -> None:
        self._outstanding.popleft()
        self._challenge_open = False

    def _read_listing(
        self, command: Capa | List | Uidl, reader: MultiLineReader
    ) -> Event | _NeedData:
        event = reader.feed(self._buffer)
        if event is None:
            return self._incomplete(command)
        self._listing = None
        self._finish()
        if isinstance(event, Capabilities):
            self._capabilities = dict(event.capabilities)
        return event

    def _read_body(self, command: Retr | Top, unstuffer: Unstuffer) -> Event | _NeedData:
        if not self._buffer:
            return self._incomplete(command)
        data, done = unstuffer.feed(self._buffer)
        if done:
            self._body = None
            self._finish()
            if not data:
                return MessageEnd(command)
            self._pending.append(MessageEnd(command))
        if data:
            return MessageData(command, data)
        return self._incomplete(command)

    def _check_usable(self) -> None:
        if self._state is State.ERROR:
            raise LocalProtocolError("connection is in ERROR state")


def _fields(line: bytes, count: int, what: str, *, exact: bool = False) -> list[bytes]:
    """The first ``count`` fields after the status of a one-line reply."""
    fields = line.split()[1:]
    if len(fields) < count or (exact and len(fields) != count):
        raise RemoteProtocolError(f"malformed reply to {what}: {quote(line)}")
    return fields[:count]


def _check_number(field: bytes, expected: int) -> None:
    if parse_number(field, 1, "message number") != expected:
        raise RemoteProtocolError(f"reply is about message {field!r}, not {expected}")
