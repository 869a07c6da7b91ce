"""Byte transcripts (S:/C:) for the sans-IO POP3 engine, PROTOCOL.md section 7.

Every transcript runs twice, once with each server segment fed whole and
once fed one byte at a time, and both runs must produce the same events.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from gpopd.pop3 import (
    NEED_DATA,
    Auth,
    AuthResponse,
    Capa,
    Capabilities,
    Command,
    Connection,
    ConnectionClosed,
    Continuation,
    Dele,
    Err,
    Event,
    Greeting,
    List,
    LocalProtocolError,
    MessageData,
    MessageEnd,
    MessageStart,
    Ok,
    Pass,
    ProtocolError,
    Quit,
    RemoteProtocolError,
    Retr,
    ScanListing,
    Stat,
    State,
    StatReply,
    Stls,
    Top,
    Uidl,
    UidListing,
    User,
)

# -- the transcript runner -------------------------------------------------


@dataclass(frozen=True)
class C:
    """A client line: the command and its exact wire text without CRLF."""

    command: Command
    wire: str


@dataclass(frozen=True)
class S:
    """Bytes from the server; ``b""`` is the server closing the connection."""

    data: bytes


Check = Callable[[Connection], None]
Step = C | S | Check


def s(*lines: str) -> S:
    """Server lines, each sent with CRLF."""
    return S(b"".join(line.encode() + b"\r\n" for line in lines))


CLOSE = S(b"")


def drain(conn: Connection, events: list[Event]) -> None:
    """Collect events until NEED_DATA or ConnectionClosed, failing if neither comes."""
    for _ in range(100_000):
        event = conn.next_event()
        if event is NEED_DATA:
            return
        events.append(event)
        if isinstance(event, ConnectionClosed):
            # It is returned again on every later call, as in h11.
            assert conn.next_event() == event
            return
    raise AssertionError("next_event() never returned NEED_DATA")


def merge_data(events: Sequence[Event]) -> list[Event]:
    """Join consecutive MessageData of one reply, whose chunking varies."""
    groups: list[Event | list[MessageData]] = []
    for event in events:
        last = groups[-1] if groups else None
        if not isinstance(event, MessageData):
            groups.append(event)
        elif isinstance(last, list) and last[0].command is event.command:
            last.append(event)
        else:
            groups.append([event])
    return [
        MessageData(group[0].command, b"".join(part.data for part in group))
        if isinstance(group, list)
        else group
        for group in groups
    ]


def run(
    steps: Sequence[Step], *, bytewise: bool, chunks: Callable[[bytes], list[bytes]] | None = None
) -> tuple[list[Event], ProtocolError | None, Connection]:
    """Play ``steps`` against a fresh Connection; return events, error, connection."""
    conn = Connection()
    events: list[Event] = []
    try:
        for step in steps:
            if isinstance(step, C):
                assert conn.send(step.command) == step.wire.encode() + b"\r\n"
            elif isinstance(step, S):
                if not step.data:
                    pieces = [b""]
                elif chunks is not None:
                    pieces = chunks(step.data)
                elif bytewise:
                    pieces = [step.data[i : i + 1] for i in range(len(step.data))]
                else:
                    pieces = [step.data]
                for piece in pieces:
                    conn.receive_data(piece)
                    drain(conn, events)
            else:
                step(conn)
    except ProtocolError as exc:
        return merge_data(events), exc, conn
    return merge_data(events), None, conn


def play(*steps: Step) -> tuple[list[Event], ProtocolError | None]:
    """Run ``steps`` whole and byte by byte and insist both agree."""
    whole, whole_error, _ = run(steps, bytewise=False)
    single, single_error, _ = run(steps, bytewise=True)
    assert whole == single
    assert type(whole_error) is type(single_error)
    assert str(whole_error) == str(single_error)
    return whole, whole_error


def events_of(*steps: Step) -> list[Event]:
    """The events of a transcript that must not fail."""
    events, error = play(*steps)
    assert error is None, error
    return events


def state_is(state: State) -> Check:
    """A step asserting the connection's state."""

    def check(conn: Connection) -> None:
        assert conn.state is state

    return check


def outstanding_is(count: int) -> Check:
    """A step asserting how many commands await their reply."""

    def check(conn: Connection) -> None:
        assert conn.outstanding == count

    return check


def stuff(content: bytes, eol: bytes = b"\r\n") -> bytes:
    """A message as a POP3 server sends it after the +OK line."""
    lines = content.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    body = b"".join((b"." + line if line.startswith(b".") else line) + eol for line in lines)
    return body + b"." + eol


# -- fixtures of a Gmail session -------------------------------------------

GREETING = "+OK Gpop ready for requests from 127.0.0.1 x1"
GMAIL_CAPA = (
    "USER",
    "RESP-CODES",
    "EXPIRE 0",
    "LOGIN-DELAY 300",
    "TOP",
    "UIDL",
    "X-GOOGLE-RICO",
    "SASL PLAIN XOAUTH2 OAUTHBEARER",
)
GMAIL_CAPS = (
    ("USER", ()),
    ("RESP-CODES", ()),
    ("EXPIRE", ("0",)),
    ("LOGIN-DELAY", ("300",)),
    ("TOP", ()),
    ("UIDL", ()),
    ("X-GOOGLE-RICO", ()),
    ("SASL", ("PLAIN", "XOAUTH2", "OAUTHBEARER")),
)
USER = User("alice@gmail.com")
PASS = Pass("app password")
LOGIN: tuple[Step, ...] = (
    s(GREETING),
    C(USER, "USER alice@gmail.com"),
    s("+OK send PASS"),
    C(PASS, "PASS app password"),
    s("+OK Welcome."),
)
LOGIN_EVENTS: list[Event] = [
    Greeting("Gpop ready for requests from 127.0.0.1 x1", None),
    Ok(USER, "send PASS", None),
    Ok(PASS, "Welcome.", None),
]
MESSAGE_1 = b"From: bob@example.com\nSubject: one\n\nHello Alice.\n"
MESSAGE_2 = b"From: carol@example.com\nSubject: two\n\nSee you.\n-- \nCarol\n"


def wire_size(content: bytes) -> int:
    """The RFC 1939 size: line ends counted as CRLF, no stuffing."""
    return len(content.replace(b"\n", b"\r\n"))


# -- section 7 transcripts -------------------------------------------------


SIZE_1, SIZE_2 = wire_size(MESSAGE_1), wire_size(MESSAGE_2)


def pipelining_offered(conn: Connection) -> None:
    """A step asserting that the post-login CAPA enabled pipelining."""
    assert conn.pipelining_allowed
    assert conn.capabilities["LOGIN-DELAY"] == ("300",)


GMAIL_SESSION: tuple[Step, ...] = (
    s(GREETING),
    C(Capa(), "CAPA"),
    s("+OK Capability list follows", *GMAIL_CAPA, "."),
    C(USER, "USER alice@gmail.com"),
    s("+OK send PASS"),
    C(PASS, "PASS app password"),
    s("+OK Welcome."),
    C(Capa(), "CAPA"),
    s("+OK Capability list follows", *GMAIL_CAPA[:-1], "PIPELINING", "."),
    pipelining_offered,
    C(Stat(), "STAT"),
    C(Uidl(), "UIDL"),
    C(List(), "LIST"),
    outstanding_is(3),
    s(
        f"+OK 2 {SIZE_1 + SIZE_2}",
        "+OK",
        "1 GmailId18c0000000000001",
        "2 GmailId18c0000000000002",
        ".",
        "+OK 2 messages",
        f"1 {SIZE_1}",
        f"2 {SIZE_2}",
        ".",
    ),
    outstanding_is(0),
    C(Retr(1), "RETR 1"),
    C(Retr(2), "RETR 2"),
    S(
        f"+OK {SIZE_1} octets\r\n".encode()
        + stuff(MESSAGE_1)
        + f"+OK {SIZE_2} octets\r\n".encode()
        + stuff(MESSAGE_2)
    ),
    C(Quit(), "QUIT"),
    s("+OK Farewell."),
    state_is(State.CLOSED),
    CLOSE,
)


def test_normal_gmail_session_pipelined() -> None:
    """Vector 1: a Gmail session with STAT+UIDL+LIST and two RETRs pipelined gives every event."""
    size_1, size_2 = SIZE_1, SIZE_2
    events = events_of(*GMAIL_SESSION)
    assert events == [
        Greeting("Gpop ready for requests from 127.0.0.1 x1", None),
        Capabilities(Capa(), GMAIL_CAPS),
        *LOGIN_EVENTS[1:],
        Capabilities(Capa(), (*GMAIL_CAPS[:-1], ("PIPELINING", ()))),
        StatReply(Stat(), 2, size_1 + size_2),
        UidListing(Uidl(), ((1, "GmailId18c0000000000001"), (2, "GmailId18c0000000000002"))),
        ScanListing(List(), ((1, size_1), (2, size_2))),
        MessageStart(Retr(1), f"{size_1} octets"),
        MessageData(Retr(1), MESSAGE_1),
        MessageEnd(Retr(1)),
        MessageStart(Retr(2), f"{size_2} octets"),
        MessageData(Retr(2), MESSAGE_2),
        MessageEnd(Retr(2)),
        Ok(Quit(), "Farewell.", None),
        ConnectionClosed(),
    ]


@pytest.mark.parametrize(
    ("reply", "code", "text"),
    [
        (
            "-ERR [AUTH] Username and password not accepted.",
            "AUTH",
            "Username and password not accepted.",
        ),
        (
            "-ERR [AUTH] Web login required: https://support.google.com/mail/answer/78754",
            "AUTH",
            "Web login required: https://support.google.com/mail/answer/78754",
        ),
        (
            "-ERR [AUTH] Application-specific password required: "
            "https://support.google.com/accounts/answer/185833",
            "AUTH",
            "Application-specific password required: "
            "https://support.google.com/accounts/answer/185833",
        ),
        (
            "-ERR [SYS/PERM] Your account is not enabled for POP access.",
            "SYS/PERM",
            "Your account is not enabled for POP access.",
        ),
    ],
)
def test_auth_failure_on_pass(reply: str, code: str, text: str) -> None:
    """Vector 2: a refused PASS yields Err with the parsed code and the server may then close."""
    events = events_of(
        *LOGIN[:4],
        s(reply),
        state_is(State.AUTHORIZATION),
        outstanding_is(0),
        CLOSE,
        state_is(State.CLOSED),
    )
    assert events == [*LOGIN_EVENTS[:2], Err(PASS, text, code), ConnectionClosed()]


def test_pop_disabled_reported_on_stat() -> None:
    """Vector 2: Gmail may accept PASS and refuse STAT with [SYS/PERM]."""
    events = events_of(
        *LOGIN,
        C(Stat(), "STAT"),
        s("-ERR [SYS/PERM] Your account is not enabled for POP access."),
        state_is(State.TRANSACTION),
    )
    assert events[-1] == Err(Stat(), "Your account is not enabled for POP access.", "SYS/PERM")


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        ("-ERR [IN-USE] Unable to lock maildrop", "IN-USE"),
        ("-ERR [LOGIN-DELAY] Logged in too recently", "LOGIN-DELAY"),
        ("-ERR [login-delay] lower case code", "LOGIN-DELAY"),
    ],
)
def test_busy_codes_on_pass(reply: str, code: str) -> None:
    """Vector 3: IN-USE and LOGIN-DELAY codes are parsed (upper-cased) from a PASS -ERR."""
    events = events_of(*LOGIN[:4], s(reply))
    last = events[-1]
    assert isinstance(last, Err)
    assert last.command == PASS
    assert last.code == code


def test_sys_temp_greeting_then_close() -> None:
    """Vector 4: a [SYS/TEMP] greeting is Err(None) then ConnectionClosed; nothing may be sent."""

    def refuses_commands(conn: Connection) -> None:
        with pytest.raises(LocalProtocolError, match="not allowed in state CLOSED"):
            conn.send(User("x"))

    events = events_of(
        s("-ERR [SYS/TEMP] Server busy, try later"),
        state_is(State.CLOSED),
        CLOSE,
        refuses_commands,
    )
    assert events == [Err(None, "Server busy, try later", "SYS/TEMP"), ConnectionClosed()]


def test_sys_temp_on_retr_keeps_the_pipeline_in_step() -> None:
    """Vector 4: -ERR [SYS/TEMP] to RETR 1 is an Err and RETR 2 behind it still parses."""
    events = events_of(
        *LOGIN,
        C(Retr(1), "RETR 1"),
        C(Retr(2), "RETR 2"),
        s("-ERR [SYS/TEMP] Temporary system problem", "+OK", "body", "."),
    )
    assert events[3:] == [
        Err(Retr(1), "Temporary system problem", "SYS/TEMP"),
        MessageStart(Retr(2), ""),
        MessageData(Retr(2), b"body\n"),
        MessageEnd(Retr(2)),
    ]


def test_dot_stuffing() -> None:
    """Vector 5: server lines "..", "..foo", "..." become ".", ".foo", ".."."""
    events = events_of(
        *LOGIN,
        C(Retr(1), "RETR 1"),
        s("+OK", "..", "..foo", "...", "From me", ">From x", "a.b", "."),
    )
    assert events[-2] == MessageData(Retr(1), b".\n.foo\n..\nFrom me\n>From x\na.b\n")


def test_message_without_trailing_line_end() -> None:
    """Vector 6: a last line directly followed by CRLF "." CRLF is stored with one newline."""
    events = events_of(
        *LOGIN, C(Retr(1), "RETR 1"), S(b"+OK\r\nSubject: x\r\n\r\nlast line\r\n.\r\n")
    )
    assert events[-2] == MessageData(Retr(1), b"Subject: x\n\nlast line\n")


def test_bare_lf_server() -> None:
    """Vector 7: a server using bare LF for every reply and terminator is understood."""
    events = events_of(
        S(b"+OK ready\n"),
        C(Capa(), "CAPA"),
        S(b"+OK\nUSER\nUIDL\n.\n"),
        C(USER, "USER alice@gmail.com"),
        S(b"+OK\n"),
        C(PASS, "PASS app password"),
        S(b"+OK\n"),
        C(Uidl(), "UIDL"),
        C(Retr(1), "RETR 1"),
        C(Quit(), "QUIT"),
        S(b"+OK\n1 u1\n.\n+OK\nSubject: lf\n\n..dot\nend\n.\n+OK bye\n"),
        CLOSE,
    )
    assert events == [
        Greeting("ready", None),
        Capabilities(Capa(), (("USER", ()), ("UIDL", ()))),
        Ok(USER, "", None),
        Ok(PASS, "", None),
        UidListing(Uidl(), ((1, "u1"),)),
        MessageStart(Retr(1), ""),
        MessageData(Retr(1), b"Subject: lf\n\n.dot\nend\n"),
        MessageEnd(Retr(1)),
        Ok(Quit(), "bye", None),
        ConnectionClosed(),
    ]


def test_hostile_content_is_byte_exact() -> None:
    """Vector 8: a 200000-byte line, NUL, 0xFF and a bare CR pass through unchanged."""
    long_line = bytes(range(32, 127)) * (200_000 // 95) + b"x" * (200_000 % 95)
    content = b"Subject: \xff\xfe\n\n" + long_line + b"\n\x00\x00 nul\nbare\rcr\n\xff\n"
    events = events_of(*LOGIN, C(Retr(1), "RETR 1"), S(b"+OK\r\n" + stuff(content)))
    assert events[-2] == MessageData(Retr(1), content)
    assert events[-1] == MessageEnd(Retr(1))


def test_uidl_duplicate_uid_text_is_allowed() -> None:
    """Vector 9: two messages sharing one UID is the fetch layer's business, not an error."""
    uid_70 = "U" * 70
    events = events_of(
        *LOGIN, C(Uidl(), "UIDL"), s("+OK", "1 abc", "2 abc", "3 def", f"9 {uid_70}", ".")
    )
    assert events[-1] == UidListing(Uidl(), ((1, "abc"), (2, "abc"), (3, "def"), (9, uid_70)))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (("1 abc", "1 def"), "message number 1 listed twice"),
        (("1 " + "U" * 71,), "MAX_UID_LENGTH"),
        (("1 ab\x01cd",), "outside 0x21..0x7E"),
        (("1 ab\x7fcd",), "outside 0x21..0x7E"),
        (("1 caf\u00e9",), "outside 0x21..0x7E"),
    ],
)
def test_uidl_oddities_are_errors(lines: tuple[str, ...], message: str) -> None:
    """Vector 9: a repeated number, a 71-char UID or a control-char UID is a RemoteProtocolError."""
    _, error = play(*LOGIN, C(Uidl(), "UIDL"), s("+OK", *lines, "."))
    assert isinstance(error, RemoteProtocolError)
    assert message in str(error)


def test_drop_mid_retr() -> None:
    """Vector 10: the connection closing inside a message is an error naming RETR 5."""
    events, error = play(
        *LOGIN, C(Retr(5), "RETR 5"), S(b"+OK 900 octets\r\nSubject: half\r\n\r\nfirst"), CLOSE
    )
    assert isinstance(error, RemoteProtocolError)
    assert str(error) == "connection closed during RETR 5"
    assert events[-2:] == [
        MessageStart(Retr(5), "900 octets"),
        MessageData(Retr(5), b"Subject: half\n\nfirst"),
    ]


def test_drop_with_dele_outstanding() -> None:
    """Vector 11: closing while DELE awaits its reply is an error, since its outcome is unknown."""
    _, error = play(*LOGIN, C(Dele(1), "DELE 1"), CLOSE)
    assert isinstance(error, RemoteProtocolError)
    assert str(error) == "connection closed during DELE 1"


def test_drop_after_dele_answered() -> None:
    """Vector 11: closing after DELE's +OK and before QUIT is an orderly ConnectionClosed."""
    events = events_of(
        *LOGIN, C(Dele(1), "DELE 1"), s("+OK message 1 deleted"), CLOSE, state_is(State.CLOSED)
    )
    assert events[-2:] == [Ok(Dele(1), "message 1 deleted", None), ConnectionClosed()]


STLS_PREFIX: tuple[Step, ...] = (
    S(b"+OK ready\r\n"),
    C(Capa(), "CAPA"),
    s("+OK", "STLS", "USER", "."),
    C(Stls(), "STLS"),
)


def test_stls_response_injection_in_one_segment() -> None:
    """Vector 12: "+OK Begin TLS" and an injected line in one segment is a RemoteProtocolError."""
    events, error, conn = run(
        [*STLS_PREFIX, S(b"+OK Begin TLS\r\n+OK INJECTED\r\n")], bytewise=False
    )
    assert isinstance(error, RemoteProtocolError)
    assert "injection" in str(error)
    assert conn.state is State.ERROR
    assert not any(isinstance(event, Ok) for event in events)


def test_stls_plaintext_after_ok_in_a_later_segment() -> None:
    """Vector 12: bytes arriving in STARTING_TLS (a separate segment) are a RemoteProtocolError."""
    events, error, conn = run(
        [*STLS_PREFIX, S(b"+OK Begin TLS\r\n+OK INJECTED\r\n")], bytewise=True
    )
    assert isinstance(error, RemoteProtocolError)
    assert str(error) == "data after STLS before the TLS handshake"
    assert events[-1] == Ok(Stls(), "Begin TLS", None)
    assert conn.state is State.ERROR


def test_clean_stls_forgets_and_rereads_capabilities() -> None:
    """Vector 12: after STLS and tls_established() the capabilities are empty until CAPA again."""

    def handshake(conn: Connection) -> None:
        assert conn.capabilities == {}
        conn.tls_established()

    def reread(conn: Connection) -> None:
        assert conn.capabilities == {"USER": (), "SASL": ("PLAIN",)}

    events = events_of(
        *STLS_PREFIX,
        s("+OK Begin TLS negotiation"),
        state_is(State.STARTING_TLS),
        handshake,
        state_is(State.AUTHORIZATION),
        C(Capa(), "CAPA"),
        s("+OK", "USER", "SASL PLAIN", "."),
        reread,
        C(USER, "USER alice@gmail.com"),
        s("+OK"),
    )
    assert events[2:] == [
        Ok(Stls(), "Begin TLS negotiation", None),
        Capabilities(Capa(), (("USER", ()), ("SASL", ("PLAIN",)))),
        Ok(USER, "", None),
    ]


def test_stls_refused_stays_in_authorization() -> None:
    """Vector 12: -ERR to STLS leaves the machine in AUTHORIZATION with capabilities intact."""
    events = events_of(*STLS_PREFIX, s("-ERR not now"), state_is(State.AUTHORIZATION))
    assert events[-1] == Err(Stls(), "not now", None)


# -- SASL ------------------------------------------------------------------

PLAIN = base64.b64encode(b"\0alice@gmail.com\0app password").decode()


def test_sasl_plain_two_step() -> None:
    """AUTH PLAIN, an empty challenge, the response and +OK log the client in."""
    auth = Auth("PLAIN")
    events = events_of(
        s(GREETING),
        C(auth, "AUTH PLAIN"),
        S(b"+ \r\n"),
        outstanding_is(1),
        C(AuthResponse(PLAIN), PLAIN),
        s("+OK Welcome."),
        state_is(State.TRANSACTION),
        outstanding_is(0),
    )
    assert events[1:] == [Continuation(auth, ""), Ok(auth, "Welcome.", None)]


def test_sasl_plain_initial_response() -> None:
    """AUTH PLAIN with an initial response succeeds in one round trip."""
    auth = Auth("PLAIN", PLAIN)
    events = events_of(s(GREETING), C(auth, f"AUTH PLAIN {PLAIN}"), s("+OK Welcome."))
    assert events[-1] == Ok(auth, "Welcome.", None)


def test_xoauth2_failure_continuation() -> None:
    """A rejected XOAUTH2 token: "+ eyJ..." challenge, empty response, then -ERR [AUTH]."""
    token = base64.b64encode(b"user=alice@gmail.com\x01auth=Bearer ya29.x\x01\x01").decode()
    challenge = base64.b64encode(
        json.dumps(
            {"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"}
        ).encode()
    ).decode()
    assert challenge.startswith("eyJ")
    auth = Auth("XOAUTH2")
    events = events_of(
        s(GREETING),
        C(auth, "AUTH XOAUTH2"),
        S(b"+ \r\n"),
        C(AuthResponse(token), token),
        s(f"+ {challenge}"),
        C(AuthResponse(""), ""),
        s("-ERR [AUTH] Invalid credentials"),
        state_is(State.AUTHORIZATION),
        outstanding_is(0),
    )
    assert events[1:] == [
        Continuation(auth, ""),
        Continuation(auth, challenge),
        Err(auth, "Invalid credentials", "AUTH"),
    ]


def test_sasl_cancel_with_star() -> None:
    """The client may cancel a SASL exchange with "*" and gets -ERR."""
    auth = Auth("OAUTHBEARER")
    events = events_of(
        s(GREETING),
        C(auth, "AUTH OAUTHBEARER"),
        s("+ "),
        C(AuthResponse("*"), "*"),
        s("-ERR authentication cancelled"),
    )
    assert events[-1] == Err(auth, "authentication cancelled", None)


def test_top_is_unstuffed_like_retr() -> None:
    """TOP replies go through the same unstuffing as RETR."""
    events = events_of(*LOGIN, C(Top(3, 0), "TOP 3 0"), s("+OK", "Subject: t", "", "..x", "."))
    assert events[-3:] == [
        MessageStart(Top(3, 0), ""),
        MessageData(Top(3, 0), b"Subject: t\n\n.x\n"),
        MessageEnd(Top(3, 0)),
    ]


def test_pipelined_retr_dele_quit() -> None:
    """RETR, DELE and QUIT pipelined are answered in order and QUIT closes the session."""
    events = events_of(
        *LOGIN,
        C(Retr(1), "RETR 1"),
        C(Dele(1), "DELE 1"),
        C(Quit(), "QUIT"),
        outstanding_is(3),
        S(b"+OK\r\n.\r\n+OK deleted\r\n+OK bye\r\n"),
        state_is(State.CLOSED),
        CLOSE,
    )
    assert events[3:] == [
        MessageStart(Retr(1), ""),
        MessageEnd(Retr(1)),
        Ok(Dele(1), "deleted", None),
        Ok(Quit(), "bye", None),
        ConnectionClosed(),
    ]
