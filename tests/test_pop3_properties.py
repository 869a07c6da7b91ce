"""Hypothesis properties of the sans-IO POP3 engine.

Each property runs with a moderate example count by default and again with
many more examples under the ``slow`` marker.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpopd.pop3 import (
    NEED_DATA,
    Auth,
    AuthResponse,
    Capa,
    Command,
    Connection,
    ConnectionClosed,
    Dele,
    List,
    LocalProtocolError,
    MessageData,
    MessageEnd,
    Noop,
    Ok,
    Pass,
    ProtocolError,
    Quit,
    Retr,
    Rset,
    Stat,
    State,
    Stls,
    Top,
    Uidl,
    User,
)
from gpopd.pop3._commands import COMMAND_TYPES
from gpopd.pop3._state import TRANSITIONS
from tests.test_pop3_engine import in_state, logged_in
from tests.test_pop3_transcripts import (
    CLOSE,
    GMAIL_SESSION,
    LOGIN,
    C,
    S,
    Step,
    run,
    s,
    stuff,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HOSTILE_CONTENT = (
    b"Subject: \xff\n\n..\n.\r.\n.x\n...\n\x00\x00\nbare\rcr\n\r\n" + b"z" * 3000 + b"\n.\n"
)
MIXED_SESSION: tuple[Step, ...] = (
    *LOGIN,
    C(Uidl(), "UIDL"),
    C(Retr(1), "RETR 1"),
    C(Top(2, 0), "TOP 2 0"),
    C(List(2), "LIST 2"),
    C(Dele(1), "DELE 1"),
    C(Quit(), "QUIT"),
    S(
        b"+OK\r\n1 a\r\n2 b\r\n.\r\n"
        + b"+OK\r\n"
        + stuff(HOSTILE_CONTENT)
        + b"+OK\nSubject: lf\n\n..dot\n.\n"
        + b"-ERR [SYS/TEMP] no such message\r\n"
        + b"+OK deleted\r\n"
        + b"+OK [X] bye\r\n"
    ),
    CLOSE,
)
AUTH_SESSION: tuple[Step, ...] = (
    s("+OK ready"),
    C(Auth("XOAUTH2"), "AUTH XOAUTH2"),
    s("+ "),
    C(AuthResponse("dG9rZW4="), "dG9rZW4="),
    s("+ eyJzdGF0dXMiOiI0MDAifQ=="),
    C(AuthResponse(""), ""),
    s("-ERR [AUTH] Invalid credentials"),
    C(Auth("PLAIN", "AGEAYg=="), "AUTH PLAIN AGEAYg=="),
    s("+OK Welcome."),
    C(Capa(), "CAPA"),
    s("+OK", "PIPELINING", "."),
)
VALID_SESSIONS = {"gmail": GMAIL_SESSION, "mixed": MIXED_SESSION, "auth": AUTH_SESSION}


# -- (1) any chunking of a valid transcript gives the same events ---------


def split_with(data: st.DataObject) -> Callable[[bytes], list[bytes]]:
    """A chunker that cuts each server segment at Hypothesis-chosen offsets."""

    def chunks(segment: bytes) -> list[bytes]:
        cuts = data.draw(
            st.lists(st.integers(1, max(1, len(segment) - 1)), max_size=12, unique=True)
        )
        edges = [0, *sorted(cut for cut in cuts if cut < len(segment)), len(segment)]
        return [segment[a:b] for a, b in pairwise(edges)]

    return chunks


def check_chunking(name: str, data: st.DataObject) -> None:
    steps = VALID_SESSIONS[name]
    expected, expected_error, _ = run(steps, bytewise=False)
    assert expected_error is None
    events, error, _ = run(steps, bytewise=False, chunks=split_with(data))
    assert error is None
    assert events == expected


@FAST
@given(name=st.sampled_from(sorted(VALID_SESSIONS)), data=st.data())
def test_any_chunking_gives_the_same_events(name: str, data: st.DataObject) -> None:
    """Feeding a valid transcript's server bytes in any chunks yields the same events."""
    check_chunking(name, data)


@pytest.mark.slow
@SLOW
@given(name=st.sampled_from(sorted(VALID_SESSIONS)), data=st.data())
def test_any_chunking_gives_the_same_events_slow(name: str, data: st.DataObject) -> None:
    """Feeding a valid transcript's server bytes in any chunks yields the same events (long run)."""
    check_chunking(name, data)


# -- (2) arbitrary server bytes raise only ProtocolError -------------------

FRAGMENTS = st.sampled_from(
    [
        b"+OK",
        b"-ERR",
        b"+",
        b" ",
        b"\r\n",
        b"\n",
        b"\r",
        b".",
        b"..",
        b"[SYS/TEMP]",
        b"[",
        b"]",
        b"1",
        b"0",
        b"12345678901",
        b"abc",
        b"\x00",
        b"\xff",
        b"+ eyJ=",
        b"\r\n.\r\n",
    ]
)
SERVER_BYTES = st.one_of(
    st.lists(FRAGMENTS, max_size=40).map(b"".join),
    st.binary(max_size=200),
)
STRINGS = st.text(max_size=12)
COMMANDS: st.SearchStrategy[Command] = st.one_of(
    st.sampled_from(
        [Capa(), Stat(), List(), Uidl(), Noop(), Rset(), Quit(), Stls(), Retr(1), Top(1, 0)]
    ),
    st.builds(User, STRINGS),
    st.builds(Pass, STRINGS),
    st.builds(Auth, STRINGS, st.none() | STRINGS),
    st.builds(AuthResponse, st.sampled_from(["", "*", "AQ==", "bad data"])),
    st.builds(List, st.integers(-2, 5)),
    st.builds(Uidl, st.integers(-2, 5)),
    st.builds(Retr, st.integers(-2, 5)),
    st.builds(Dele, st.integers(-2, 5)),
    st.builds(Top, st.integers(-2, 5), st.integers(-2, 5)),
)
ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), COMMANDS),
        st.tuples(st.just("feed"), SERVER_BYTES),
        st.tuples(st.just("eof"), st.none()),
        st.tuples(st.just("tls"), st.none()),
    ),
    max_size=30,
)
PREFIXES = st.sampled_from(["none", "greeted", "logged-in", "mid-retr"])


def prefix_connection(prefix: str) -> Connection:
    """A connection after a valid prefix of traffic."""
    conn = Connection()
    if prefix == "none":
        return conn
    if prefix == "greeted":
        conn.receive_data(b"+OK hi\r\n")
        conn.next_event()
        return conn
    conn = logged_in()
    if prefix == "mid-retr":
        conn.send(Retr(1))
        conn.receive_data(b"+OK\r\nSubject: x\r\n\r\n")
        while conn.next_event() is not NEED_DATA:
            pass
    return conn


def bounded_drain(conn: Connection, budget: int) -> None:
    """Pull events until NEED_DATA or ConnectionClosed, within ``budget`` calls."""
    for _ in range(budget):
        event = conn.next_event()
        if event is NEED_DATA or isinstance(event, ConnectionClosed):
            return
    raise AssertionError("next_event() kept returning events")


def check_only_protocol_errors(
    prefix: str, actions: list[tuple[str, object]], data: st.DataObject
) -> None:
    conn = prefix_connection(prefix)
    fed = 0
    for kind, value in actions:
        try:
            if kind == "send":
                assert isinstance(value, Command)
                wire = conn.send(value)
                assert wire.endswith(b"\r\n")
            elif kind == "tls":
                conn.tls_established()
            elif kind == "eof":
                conn.receive_data(b"")
                bounded_drain(conn, 10)
            else:
                assert isinstance(value, bytes)
                fed += len(value)
                for piece in split_with(data)(value) if value else []:
                    conn.receive_data(piece)
                    # Each event consumes input, so this bounds a loop-free engine.
                    bounded_drain(conn, fed + 10)
        except ProtocolError:
            assert conn.state is State.ERROR
            with pytest.raises(LocalProtocolError, match="ERROR state"):
                conn.next_event()


@FAST
@given(prefix=PREFIXES, actions=ACTIONS, data=st.data())
def test_arbitrary_server_bytes_raise_only_protocol_errors(
    prefix: str, actions: list[tuple[str, object]], data: st.DataObject
) -> None:
    """Any commands and server bytes in any chunks raise only ProtocolError and never spin."""
    check_only_protocol_errors(prefix, actions, data)


@pytest.mark.slow
@SLOW
@given(prefix=PREFIXES, actions=ACTIONS, data=st.data())
def test_arbitrary_server_bytes_raise_only_protocol_errors_slow(
    prefix: str, actions: list[tuple[str, object]], data: st.DataObject
) -> None:
    """Any commands and server bytes raise nothing but ProtocolError (long run)."""
    check_only_protocol_errors(prefix, actions, data)


# -- (3) unstuffing gives back the content lines ---------------------------

CONTENT_LINES = st.lists(
    st.tuples(st.integers(0, 3), st.binary(max_size=30)).map(
        lambda pair: b"." * pair[0] + pair[1].replace(b"\n", b"")
    ),
    max_size=40,
)


def check_unstuffing(lines: list[bytes], eol: bytes, data: st.DataObject) -> None:
    if eol == b"\n":
        # With bare LF line ends a content line ending in CR would read as CRLF.
        lines = [line.rstrip(b"\r") for line in lines]
    wire = b"".join((b"." + line if line.startswith(b".") else line) + eol for line in lines)
    conn = logged_in()
    conn.send(Retr(1))
    conn.send(Noop())
    events = []
    for piece in split_with(data)(b"+OK\r\n" + wire + b"." + eol + b"+OK next\r\n"):
        conn.receive_data(piece)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    content = b"".join(event.data for event in events if isinstance(event, MessageData))
    assert content == b"".join(line + b"\n" for line in lines)
    assert events[-2:] == [MessageEnd(Retr(1)), Ok(Noop(), "next", None)]


@FAST
@given(lines=CONTENT_LINES, eol=st.sampled_from([b"\r\n", b"\n"]), data=st.data())
def test_unstuffing_round_trip(lines: list[bytes], eol: bytes, data: st.DataObject) -> None:
    """Stuffed content lines fed in any chunks come back exactly, joined with LF."""
    check_unstuffing(lines, eol, data)


# Lines made mostly of CRs and dots: bare CRs next to CRLFs, before a line
# end, doubled, and at the start of stuffed lines.
CR_LINES = st.lists(
    st.lists(st.sampled_from([b"\r", b".", b"a"]), max_size=8).map(b"".join), max_size=30
)


@FAST
@given(lines=CR_LINES, data=st.data())
def test_bare_cr_stays_and_only_crlf_becomes_lf(lines: list[bytes], data: st.DataObject) -> None:
    """Only a CR that starts a CRLF goes; every other CR reaches the content."""
    check_unstuffing(lines, b"\r\n", data)


@pytest.mark.slow
@SLOW
@given(lines=CONTENT_LINES, eol=st.sampled_from([b"\r\n", b"\n"]), data=st.data())
def test_unstuffing_round_trip_slow(lines: list[bytes], eol: bytes, data: st.DataObject) -> None:
    """Stuffed content lines fed in any chunks come back exactly (long run)."""
    check_unstuffing(lines, eol, data)


# -- (4) the transition table is total ---------------------------------------

ARGUMENTS: dict[type[Command], st.SearchStrategy[Command]] = {
    User: st.builds(User, STRINGS),
    Pass: st.builds(Pass, STRINGS),
    Auth: st.builds(Auth, STRINGS, st.none() | STRINGS),
    AuthResponse: st.builds(AuthResponse, STRINGS),
    List: st.builds(List, st.none() | st.integers(-3, 10**12)),
    Uidl: st.builds(Uidl, st.none() | st.integers(-3, 10**12)),
    Retr: st.builds(Retr, st.integers(-3, 10**12)),
    Top: st.builds(Top, st.integers(-3, 10**12), st.integers(-3, 10**12)),
    Dele: st.builds(Dele, st.integers(-3, 10**12)),
}
ANY_COMMAND = st.sampled_from(COMMAND_TYPES).flatmap(lambda cls: ARGUMENTS.get(cls, st.builds(cls)))


def check_table_total(state: State, command: Command) -> None:
    conn = in_state(state)
    try:
        wire = conn.send(command)
    except LocalProtocolError:
        assert conn.state is State.ERROR
    else:
        assert (state, type(command)) in TRANSITIONS
        assert wire.endswith(b"\r\n")


@FAST
@given(state=st.sampled_from(State), command=ANY_COMMAND)
def test_transition_table_is_total(state: State, command: Command) -> None:
    """Every (state, command) either is an allowed transition or raises LocalProtocolError."""
    check_table_total(state, command)


@pytest.mark.slow
@SLOW
@given(state=st.sampled_from(State), command=ANY_COMMAND)
def test_transition_table_is_total_slow(state: State, command: Command) -> None:
    """Every (state, command) is allowed or a LocalProtocolError (long run)."""
    check_table_total(state, command)
