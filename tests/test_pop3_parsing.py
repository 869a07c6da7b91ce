"""Parsing tests of the sans-IO POP3 engine: replies, listings, limits and content."""

from __future__ import annotations

import pytest

from gpopd.pop3 import (
    MAX_CAPA_LINE,
    MAX_CHALLENGE,
    MAX_CONTENT_LINE,
    MAX_LISTING_ENTRIES,
    MAX_LISTING_LINE,
    MAX_STATUS_LINE,
    NEED_DATA,
    Auth,
    Capa,
    Capabilities,
    Command,
    Connection,
    ConnectionClosed,
    Continuation,
    Err,
    Event,
    Greeting,
    List,
    LocalProtocolError,
    MessageData,
    MessageEnd,
    MessageStart,
    Noop,
    Ok,
    Quit,
    RemoteProtocolError,
    Retr,
    ScanListing,
    Stat,
    State,
    StatReply,
    Top,
    Uidl,
    UidListing,
)
from gpopd.pop3._body import SLICE
from tests.test_pop3_engine import answer, greeted, logged_in, reply

CHUNK = 64 * 1024

# -- status lines ----------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (b"+OK", Ok(Noop(), "", None)),
        (b"+OK ", Ok(Noop(), "", None)),
        (b"-ERR", Err(Noop(), "", None)),
        (b"+OK [IN-USE] locked", Ok(Noop(), "locked", "IN-USE")),
        (b"-ERR [sys/temp]   later  ", Err(Noop(), "later", "SYS/TEMP")),
        (b"-ERR [AUTH]", Err(Noop(), "", "AUTH")),
        (b"-ERR [unterminated code", Err(Noop(), "[unterminated code", None)),
        (b"-ERR  [X] spaced", Err(Noop(), "[X] spaced", None)),
        (b"-ERR text [AUTH] later", Err(Noop(), "text [AUTH] later", None)),
        (b"-ERR [] empty", Err(Noop(), "[] empty", None)),
        (b"+OK caf\xc3\xa9", Ok(Noop(), "caf\u00e9", None)),
        (b"+OK bad \xff byte", Ok(Noop(), "bad \ufffd byte", None)),
    ],
)
def test_status_line_parsing(line: bytes, event: Event) -> None:
    """Status, optional [CODE] (upper-cased) and stripped text are parsed from a reply line."""
    assert answer(Noop(), line + b"\r\n") == [event]


@pytest.mark.parametrize(
    "line", [b"+ok fine", b"OK", b"+OKAY", b"-ERROR x", b"", b"220 smtp", b"+OK\tx"]
)
def test_malformed_status_lines(line: bytes) -> None:
    """Anything but exactly "+OK" or "-ERR" as status is a RemoteProtocolError quoting it."""
    with pytest.raises(RemoteProtocolError, match="malformed status line") as info:
        answer(Noop(), line + b"\r\n")
    assert repr(line[:10])[2:-1] in str(info.value)


def test_malformed_status_quote_is_bounded() -> None:
    """The quoted line in the error is a bounded prefix, not the whole line."""
    with pytest.raises(RemoteProtocolError) as info:
        answer(Noop(), b"X" * 400 + b"\r\n")
    assert len(str(info.value)) < 120


def test_greeting_code_is_parsed() -> None:
    """A greeting's response code and text are reported."""
    conn = Connection()
    assert reply(conn, b"+OK [XYZ] hello <1.2@host>\r\n") == [Greeting("hello <1.2@host>", "XYZ")]


def test_bad_greeting() -> None:
    """A greeting that is neither +OK nor -ERR is a RemoteProtocolError."""
    with pytest.raises(RemoteProtocolError, match="malformed status line"):
        reply(Connection(), b"* OK IMAP4rev1 ready\r\n")


# -- STAT, LIST, UIDL, CAPA ------------------------------------------------


def test_stat_parsing() -> None:
    """STAT gives count and size; extra text after them is tolerated."""
    assert answer(Stat(), b"+OK 3 12345 messages\r\n") == [StatReply(Stat(), 3, 12345)]
    assert answer(Stat(), b"+OK 0 0\r\n") == [StatReply(Stat(), 0, 0)]
    big = answer(Stat(), b"+OK 1 123456789012345\r\n")
    assert big == [StatReply(Stat(), 1, 123456789012345)]


@pytest.mark.parametrize("line", [b"+OK 2", b"+OK", b"+OK a 1", b"+OK 1 -1", b"+OK 12345678901 1"])
def test_bad_stat(line: bytes) -> None:
    """A STAT reply without two valid numbers is a RemoteProtocolError."""
    with pytest.raises(RemoteProtocolError):
        answer(Stat(), line + b"\r\n")


def test_list_one_and_many() -> None:
    """LIST n gives one entry; LIST gives all, extra information after the size is ignored."""
    assert answer(List(7), b"+OK 7 120\r\n") == [ScanListing(List(7), ((7, 120),))]
    assert answer(List(), b"+OK\r\n1 10 extra\r\n02 0\r\n.\r\n") == [
        ScanListing(List(), ((1, 10), (2, 0)))
    ]
    assert answer(List(), b"+OK empty\r\n.\r\n") == [ScanListing(List(), ())]


def test_uidl_one() -> None:
    """UIDL n gives one entry."""
    assert answer(Uidl(4), b"+OK 4 GmailIdabc\r\n") == [UidListing(Uidl(4), ((4, "GmailIdabc"),))]


@pytest.mark.parametrize(
    ("command", "line"),
    [
        (List(7), b"+OK 8 120"),
        (List(7), b"+OK 7"),
        (Uidl(4), b"+OK 5 abc"),
        (Uidl(4), b"+OK 4 abc def"),
        (Uidl(4), b"+OK 4"),
    ],
)
def test_bad_single_listing(command: Command, line: bytes) -> None:
    """A one-line LIST/UIDL about another message or with missing fields is an error."""
    with pytest.raises(RemoteProtocolError):
        answer(command, line + b"\r\n")


@pytest.mark.parametrize(
    ("command", "line"),
    [
        (List(), b"+1 100"),
        (List(), b"0 100"),
        (List(), b"1 -5"),
        (List(), b"1 abc"),
        (List(), b"1"),
        (List(), b"12345678901 1"),
        (List(), b"1 12345678901"),
        (List(), b"\xd9\xa1 5"),
        (Uidl(), b"1"),
        (Uidl(), b"1 abc extra"),
        (Uidl(), b"x abc"),
    ],
)
def test_bad_listing_lines(command: Command, line: bytes) -> None:
    """Listing lines with signs, zero, non-digits, over 10 digits or wrong fields are errors."""
    with pytest.raises(RemoteProtocolError):
        answer(command, b"+OK\r\n" + line + b"\r\n.\r\n")


def test_listing_numbers_are_not_checked_against_stat() -> None:
    """Gaps and large message numbers are passed on; the fetch layer judges them."""
    assert answer(Uidl(), b"+OK\r\n5 a\r\n9999999999 b\r\n.\r\n") == [
        UidListing(Uidl(), ((5, "a"), (9999999999, "b")))
    ]


def test_capa_parsing() -> None:
    """CAPA tags are upper-cased, params kept as sent, empty lines ignored, stuffing removed."""
    conn = greeted()
    conn.send(Capa())
    events = reply(
        conn, b"+OK\r\nsasl PLAIN xoauth2\r\n\r\n  \r\n..HIDDEN x\r\nexpire 0 USER\r\n.\r\n"
    )
    assert events == [
        Capabilities(
            Capa(),
            (("SASL", ("PLAIN", "xoauth2")), (".HIDDEN", ("x",)), ("EXPIRE", ("0", "USER"))),
        )
    ]
    assert conn.capabilities == {
        "SASL": ("PLAIN", "xoauth2"),
        ".HIDDEN": ("x",),
        "EXPIRE": ("0", "USER"),
    }
    assert not conn.pipelining_allowed


def test_capabilities_property_is_a_copy() -> None:
    """Mutating the returned capabilities does not change the connection's."""
    conn = greeted()
    conn.send(Capa())
    reply(conn, b"+OK\r\nPIPELINING\r\n.\r\n")
    conn.capabilities.clear()
    assert conn.pipelining_allowed


def test_capa_err_keeps_previous_capabilities() -> None:
    """-ERR to CAPA is an Err event and leaves the known capabilities alone."""
    conn = greeted()
    conn.send(Capa())
    reply(conn, b"+OK\r\nUSER\r\n.\r\n")
    conn.send(Capa())
    assert reply(conn, b"-ERR no\r\n") == [Err(Capa(), "no", None)]
    assert conn.capabilities == {"USER": ()}


# -- limits ----------------------------------------------------------------


def endless(conn: Connection) -> tuple[int, str]:
    """Feed up to 1 GiB without a line end in 64 KiB reads; return bytes fed and the error."""
    chunk = b"x" * CHUNK
    fed = 0
    while fed < 1 << 30:
        conn.receive_data(chunk)
        fed += len(chunk)
        try:
            while conn.next_event() is not NEED_DATA:
                pass
        except RemoteProtocolError as exc:
            return fed, str(exc)
    raise AssertionError("1 GiB without a line end was accepted")


def test_endless_greeting_fails_within_one_chunk() -> None:
    """A 1 GiB greeting without newline fails as soon as the buffer passes MAX_STATUS_LINE."""
    assert endless(Connection()) == (
        CHUNK,
        f"MAX_STATUS_LINE ({MAX_STATUS_LINE} octets) exceeded without a line end",
    )


def test_endless_status_line_fails_within_one_chunk() -> None:
    """An endless +OK line fails after one chunk."""
    conn = logged_in()
    conn.send(Noop())
    fed, message = endless(conn)
    assert fed == CHUNK
    assert "MAX_STATUS_LINE" in message


def test_endless_challenge_fails_past_max_challenge() -> None:
    """An endless AUTH reply fails once MAX_CHALLENGE is exceeded."""
    conn = greeted()
    conn.send(Auth("PLAIN"))
    fed, message = endless(conn)
    assert fed == CHUNK
    assert "MAX_CHALLENGE" in message


@pytest.mark.parametrize(
    ("command", "name"), [(Capa(), "MAX_CAPA_LINE"), (Uidl(), "MAX_LISTING_LINE")]
)
def test_endless_listing_line_fails_within_one_chunk(command: Command, name: str) -> None:
    """An endless CAPA or UIDL line fails after one chunk, naming its limit."""
    conn = logged_in()
    conn.send(command)
    conn.receive_data(b"+OK\r\n")
    fed, message = endless(conn)
    assert fed == CHUNK
    assert name in message


def test_endless_content_line_fails_just_past_the_limit() -> None:
    """An endless message line fails once MAX_CONTENT_LINE is passed, not later."""
    conn = logged_in()
    conn.send(Retr(1))
    conn.receive_data(b"+OK\r\n")
    fed, message = endless(conn)
    assert MAX_CONTENT_LINE < fed <= MAX_CONTENT_LINE + CHUNK
    assert "MAX_CONTENT_LINE" in message


def test_status_line_limit_is_exact() -> None:
    """A 512-octet status line (CRLF included) passes and a 513-octet one fails."""
    text = b"x" * (MAX_STATUS_LINE - len(b"+OK \r\n"))
    assert answer(Noop(), b"+OK " + text + b"\r\n") == [Ok(Noop(), text.decode(), None)]
    with pytest.raises(RemoteProtocolError, match="MAX_STATUS_LINE"):
        answer(Noop(), b"+OK " + text + b"x\r\n")


def test_auth_status_line_limit_is_exact() -> None:
    """During AUTH a +OK/-ERR line still obeys MAX_STATUS_LINE while challenges may be longer."""
    text = b"x" * (MAX_STATUS_LINE - len(b"-ERR \r\n"))
    for extra, ok in ((b"", True), (b"x", False)):
        conn = greeted()
        conn.send(Auth("PLAIN"))
        if ok:
            assert reply(conn, b"-ERR " + text + b"\r\n")[0] == Err(
                Auth("PLAIN"), text.decode(), None
            )
        else:
            with pytest.raises(RemoteProtocolError, match="MAX_STATUS_LINE"):
                reply(conn, b"-ERR " + text + extra + b"\r\n")


def test_challenge_limit_is_exact() -> None:
    """A challenge line of MAX_CHALLENGE octets passes and one more octet fails."""
    challenge = b"A" * (MAX_CHALLENGE - len(b"+ \r\n"))
    conn = greeted()
    conn.send(Auth("XOAUTH2"))
    assert reply(conn, b"+ " + challenge + b"\r\n") == [
        Continuation(Auth("XOAUTH2"), challenge.decode())
    ]
    conn = greeted()
    conn.send(Auth("XOAUTH2"))
    with pytest.raises(RemoteProtocolError, match="MAX_CHALLENGE"):
        reply(conn, b"+ " + challenge + b"A\r\n")


def test_capa_line_limit_is_exact() -> None:
    """A CAPA line of MAX_CAPA_LINE octets passes and one more octet fails."""
    tag = b"X" * (MAX_CAPA_LINE - 2)
    assert answer(Capa(), b"+OK\r\n" + tag + b"\r\n.\r\n") == [
        Capabilities(Capa(), ((tag.decode(), ()),))
    ]
    with pytest.raises(RemoteProtocolError, match="MAX_CAPA_LINE"):
        answer(Capa(), b"+OK\r\n" + tag + b"X\r\n.\r\n")


def test_listing_line_limit_is_exact() -> None:
    """A listing line of MAX_LISTING_LINE octets passes and one more octet fails."""
    line = b"1 10 " + b"x" * (MAX_LISTING_LINE - len(b"1 10 \r\n"))
    assert answer(List(), b"+OK\r\n" + line + b"\r\n.\r\n") == [ScanListing(List(), ((1, 10),))]
    with pytest.raises(RemoteProtocolError, match="MAX_LISTING_LINE"):
        answer(List(), b"+OK\r\n" + line + b"x\r\n.\r\n")


def test_listing_entry_limit() -> None:
    """MAX_LISTING_ENTRIES entries are accepted and one more is a RemoteProtocolError."""
    body = b"".join(b"%d u%d\r\n" % (n, n) for n in range(1, MAX_LISTING_ENTRIES + 1))
    events = answer(Uidl(), b"+OK\r\n" + body + b".\r\n")
    assert isinstance(events[0], UidListing)
    assert len(events[0].entries) == MAX_LISTING_ENTRIES
    extra = b"%d x\r\n" % (MAX_LISTING_ENTRIES + 1)
    with pytest.raises(RemoteProtocolError, match="MAX_LISTING_ENTRIES"):
        answer(Uidl(), b"+OK\r\n" + body + extra + b".\r\n")


def test_capa_entry_limit() -> None:
    """A CAPA reply with more than MAX_LISTING_ENTRIES lines is a RemoteProtocolError."""
    body = b"X\r\n" * (MAX_LISTING_ENTRIES + 1)
    with pytest.raises(RemoteProtocolError, match="MAX_LISTING_ENTRIES"):
        answer(Capa(), b"+OK\r\n" + body + b".\r\n")


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_content_line_limit_is_exact(eol: bytes) -> None:
    """A content line of MAX_CONTENT_LINE octets passes and one more fails, with either line end."""
    line = b"a" * MAX_CONTENT_LINE
    events = answer(Retr(1), b"+OK\r\nshort" + eol + line + eol + b"." + eol)
    data = b"".join(event.data for event in events if isinstance(event, MessageData))
    assert data == b"short\n" + line + b"\n"
    with pytest.raises(RemoteProtocolError, match="MAX_CONTENT_LINE"):
        answer(Retr(1), b"+OK\r\nshort" + eol + line + b"a" + eol + b"." + eol)


def test_content_line_limit_across_small_reads() -> None:
    """A too-long content line is caught even when it ends inside a later read."""
    conn = logged_in()
    conn.send(Retr(1))
    reply(conn, b"+OK\r\n")
    for _ in range(MAX_CONTENT_LINE // CHUNK):
        reply(conn, b"b" * CHUNK)
    with pytest.raises(RemoteProtocolError, match="MAX_CONTENT_LINE"):
        reply(conn, b"bb\r\nnext\r\n")


def test_message_data_is_not_per_line() -> None:
    """A 1 MiB message of short lines fed whole comes out in a handful of MessageData events."""
    content = b"line of text\n" * (1024 * 1024 // 13)
    events = answer(Retr(1), b"+OK\r\n" + content.replace(b"\n", b"\r\n") + b".\r\n")
    data_events = [event for event in events if isinstance(event, MessageData)]
    assert len(data_events) <= 6
    assert b"".join(event.data for event in data_events) == content


# -- end of stream and unexpected bytes -----------------------------------


def test_eof_before_greeting() -> None:
    """The server closing before its greeting is a RemoteProtocolError."""
    conn = Connection()
    conn.receive_data(b"+OK hal")
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="connection closed during the greeting"):
        conn.next_event()


def test_eof_inside_listing_names_the_command() -> None:
    """The server closing inside a UIDL listing is an error naming UIDL."""
    conn = logged_in()
    conn.send(Uidl())
    conn.receive_data(b"+OK\r\n1 a\r\n")
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=r"connection closed during UIDL$"):
        conn.next_event()


def test_eof_during_top_names_both_numbers() -> None:
    """The server closing inside a TOP reply is an error naming TOP with its arguments."""
    conn = logged_in()
    conn.send(Top(3, 10))
    assert reply(conn, b"+OK\r\nSubject: x\r\n")[-1] == MessageData(Top(3, 10), b"Subject: x\n")
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=r"^connection closed during TOP 3 10$"):
        conn.next_event()


def test_eof_during_auth_hides_nothing_secret() -> None:
    """The server closing during AUTH names the mechanism but not the initial response."""
    conn = greeted()
    conn.send(Auth("PLAIN", "c2VjcmV0"))
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert str(info.value) == "connection closed during AUTH PLAIN"


def test_eof_in_message_with_held_back_bytes() -> None:
    """A message cut after a lone "." line start is an error, not a silent end."""
    conn = logged_in()
    conn.send(Retr(2))
    events = reply(conn, b"+OK\r\ntext\r\n.")
    assert events[-1] == MessageData(Retr(2), b"text\n")
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed during RETR 2"):
        conn.next_event()


def test_unsolicited_data_is_an_error() -> None:
    """Bytes when no reply is due are a RemoteProtocolError."""
    conn = logged_in()
    with pytest.raises(RemoteProtocolError, match="no reply is due"):
        reply(conn, b"+OK surprise\r\n")


def test_data_after_quit_is_an_error() -> None:
    """Bytes after QUIT's +OK are a RemoteProtocolError."""
    conn = logged_in()
    conn.send(Quit())
    with pytest.raises(RemoteProtocolError, match="no reply is due"):
        reply(conn, b"+OK bye\r\nmore\r\n")


def test_data_after_eof_is_a_local_error() -> None:
    """Feeding bytes after end of stream is a caller error; repeated EOF is fine."""
    conn = logged_in()
    conn.receive_data(b"")
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after the end of the stream"):
        conn.receive_data(b"x")


def test_connection_closed_repeats() -> None:
    """After an orderly close every next_event() returns ConnectionClosed."""
    conn = logged_in()
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.next_event() == ConnectionClosed()
    assert conn.state is State.CLOSED


def test_bytearray_and_memoryview_input() -> None:
    """receive_data accepts any bytes-like object and copies it."""
    conn = Connection()
    data = bytearray(b"+OK hi\r\n")
    conn.receive_data(data)
    data[:] = b"-ERR xx\r\n"
    conn.receive_data(memoryview(b""))
    assert conn.next_event() == Greeting("hi", None)


def test_message_split_at_every_awkward_point() -> None:
    """A message split at every offset in two reads gives identical content."""
    wire = b"+OK\r\n..a\r\nb\rc\r\n.\rd\r\n.x\r\n\r\n..\r\n.\r\n+OK done\r\n"
    expected = b".a\nb\rc\n\rd\nx\n\n.\n"
    for cut in range(1, len(wire)):
        conn = logged_in()
        conn.send(Retr(1))
        conn.send(Noop())
        events = reply(conn, wire[:cut]) + reply(conn, wire[cut:])
        data = b"".join(event.data for event in events if isinstance(event, MessageData))
        assert data == expected, cut
        assert events[-1] == Ok(Noop(), "done", None)
        assert MessageEnd(Retr(1)) in events


def test_empty_message() -> None:
    """An empty message is MessageStart then MessageEnd with no data."""
    assert answer(Retr(1), b"+OK 0 octets\r\n.\r\n") == [
        MessageStart(Retr(1), "0 octets"),
        MessageEnd(Retr(1)),
    ]


def test_large_message_slices() -> None:
    """A message larger than one slice is parsed across slices with a dot line on the boundary."""
    head = b"h" * (SLICE - 3) + b"\r\n"  # the next line starts one byte before the slice end
    content_wire = head + b"..boundary\r\n" + b"t" * SLICE + b"\r\n"
    events = answer(Retr(1), b"+OK\r\n" + content_wire + b".\r\n")
    data = b"".join(event.data for event in events if isinstance(event, MessageData))
    assert data == b"h" * (SLICE - 3) + b"\n.boundary\n" + b"t" * SLICE + b"\n"
    assert events[-1] == MessageEnd(Retr(1))


def test_many_dots_in_text_use_the_fallback_search() -> None:
    """Text with many mid-line dots and a few dot lines unstuffs correctly."""
    line = b"a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t"
    content = (line + b"\n") * 50 + b".start\n" + (line + b"\n") * 50 + b"..two\n"
    stuffed = b"".join(
        (b"." + part if part.startswith(b".") else part) + b"\r\n"
        for part in content.split(b"\n")[:-1]
    )
    events = answer(Retr(1), b"+OK\r\n" + stuffed + b".\r\n")
    assert b"".join(e.data for e in events if isinstance(e, MessageData)) == content
