"""Unit tests of the sans-IO POP3 engine: commands, states, parsing and limits."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from gpopd import pop3
from gpopd.pop3 import (
    MAX_COMMAND_LENGTH,
    MAX_SASL_RESPONSE,
    NEED_DATA,
    Auth,
    AuthResponse,
    Capa,
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
    MessageEnd,
    Noop,
    Ok,
    Pass,
    ProtocolError,
    Quit,
    RemoteProtocolError,
    Retr,
    Rset,
    Stat,
    State,
    StatReply,
    Stls,
    Top,
    Uidl,
    User,
)
from gpopd.pop3._commands import COMMAND_TYPES
from gpopd.pop3._state import TRANSITIONS, transition

PACKAGE = Path(pop3.__file__).parent
ALLOWED_IMPORTS = {
    "__future__",
    "base64",
    "binascii",
    "collections",
    "dataclasses",
    "enum",
    "re",
    "typing",
}
CHUNK = 64 * 1024


def greeted() -> Connection:
    """A connection in AUTHORIZATION."""
    conn = Connection()
    conn.receive_data(b"+OK ready\r\n")
    assert isinstance(conn.next_event(), Greeting)
    return conn


def logged_in() -> Connection:
    """A connection in TRANSACTION."""
    conn = greeted()
    conn.send(User("u"))
    conn.receive_data(b"+OK\r\n")
    conn.next_event()
    conn.send(Pass("p"))
    conn.receive_data(b"+OK\r\n")
    assert isinstance(conn.next_event(), Ok)
    assert conn.state is State.TRANSACTION
    return conn


def reply(conn: Connection, data: bytes) -> list[Event]:
    """Feed ``data`` whole and return every event up to NEED_DATA."""
    conn.receive_data(data)
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def answer(command: Command, data: bytes) -> list[Event]:
    """Send ``command`` in TRANSACTION and return the events of ``data``."""
    conn = logged_in()
    conn.send(command)
    return reply(conn, data)


def in_state(state: State) -> Connection:
    """A connection driven into ``state`` through real traffic."""
    if state is State.GREETING:
        return Connection()
    if state is State.AUTHORIZATION:
        return greeted()
    if state is State.TRANSACTION:
        return logged_in()
    conn = greeted()
    if state is State.STARTING_TLS:
        conn.send(Stls())
        reply(conn, b"+OK go\r\n")
    elif state is State.CLOSED:
        conn.send(Quit())
        reply(conn, b"+OK bye\r\n")
    else:
        with pytest.raises(RemoteProtocolError):
            reply(conn, b"garbage\r\n")
    assert conn.state is state
    return conn


SAMPLES: dict[type[Command], Command] = {
    User: User("alice"),
    Pass: Pass("secret"),
    Auth: Auth("PLAIN"),
    AuthResponse: AuthResponse("AAAA"),
    Capa: Capa(),
    Stls: Stls(),
    Stat: Stat(),
    List: List(),
    Uidl: Uidl(),
    Retr: Retr(1),
    Top: Top(1, 0),
    Dele: Dele(1),
    Noop: Noop(),
    Rset: Rset(),
    Quit: Quit(),
}


# -- the package boundary -------------------------------------------------


def test_engine_imports_only_allowed_stdlib_modules() -> None:
    """No module of gpopd.pop3 imports asyncio, socket, ssl, logging, gpopd or anything unlisted."""
    modules = sorted(PACKAGE.glob("*.py"))
    assert len(modules) >= 5
    found = set()
    for path in modules:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:
                    continue  # relative: inside the package
                names = [node.module or ""]
            else:
                continue
            for name in names:
                found.add(name)
                assert name.split(".")[0] in ALLOWED_IMPORTS, f"{path.name} imports {name}"
    assert "dataclasses" in found


def test_public_api_is_exported() -> None:
    """Every name of the documented API is importable from gpopd.pop3 and listed in __all__."""
    expected = {
        "State", "Connection", "NEED_DATA", "ProtocolError", "LocalProtocolError",
        "RemoteProtocolError", "Command", "Event", "MAX_STATUS_LINE", "MAX_CAPA_LINE",
        "MAX_LISTING_LINE", "MAX_UID_LENGTH", "MAX_LISTING_ENTRIES", "MAX_CONTENT_LINE",
        "MAX_COMMAND_LENGTH", "MAX_SASL_RESPONSE", "MAX_CHALLENGE", "Greeting", "Ok", "Err",
        "Continuation", "Capabilities", "StatReply", "ScanListing", "UidListing",
        "MessageStart", "MessageData", "MessageEnd", "ConnectionClosed",
    } | {cls.__name__ for cls in COMMAND_TYPES}  # fmt: skip
    assert expected <= set(pop3.__all__)
    for name in pop3.__all__:
        assert getattr(pop3, name) is not None


def test_error_hierarchy() -> None:
    """Local and remote errors are both ProtocolErrors and distinct from each other."""
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)


def test_need_data_is_a_singleton_with_a_plain_repr() -> None:
    """NEED_DATA compares by identity and prints as NEED_DATA."""
    assert Connection().next_event() is NEED_DATA
    assert repr(NEED_DATA) == str(NEED_DATA) == "NEED_DATA"


def test_commands_and_events_are_frozen_slotted_values() -> None:
    """Commands and events cannot be mutated, have no __dict__ and compare by value."""
    retr = Retr(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        retr.msg = 2  # type: ignore[misc]
    assert not hasattr(retr, "__dict__")
    assert retr == Retr(1)
    event = MessageEnd(retr)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.command = Retr(2)  # type: ignore[misc]
    assert not hasattr(event, "__dict__")


# -- commands on the wire ---------------------------------------------------


@pytest.mark.parametrize(
    ("command", "wire"),
    [
        (User("alice@gmail.com"), b"USER alice@gmail.com\r\n"),
        (User("recent:alice@gmail.com"), b"USER recent:alice@gmail.com\r\n"),
        (Pass("pass with spaces"), b"PASS pass with spaces\r\n"),
        (Capa(), b"CAPA\r\n"),
        (Stls(), b"STLS\r\n"),
        (Quit(), b"QUIT\r\n"),
        (Auth("XOAUTH2"), b"AUTH XOAUTH2\r\n"),
        (Auth("PLAIN", "AGEAYg=="), b"AUTH PLAIN AGEAYg==\r\n"),
        (Auth("EXTERNAL", "="), b"AUTH EXTERNAL =\r\n"),
    ],
)
def test_authorization_wire_forms(command: Command, wire: bytes) -> None:
    """AUTHORIZATION commands use upper-case keywords, single spaces and CRLF."""
    assert greeted().send(command) == wire


def test_user_name_is_utf8_on_the_wire() -> None:
    """A non-ASCII user name is sent as UTF-8."""
    assert greeted().send(User("j\u00fcrgen")) == b"USER j\xc3\xbcrgen\r\n"


@pytest.mark.parametrize(
    ("command", "wire"),
    [
        (Stat(), b"STAT\r\n"),
        (List(), b"LIST\r\n"),
        (List(7), b"LIST 7\r\n"),
        (Uidl(), b"UIDL\r\n"),
        (Uidl(12), b"UIDL 12\r\n"),
        (Retr(1), b"RETR 1\r\n"),
        (Top(3, 0), b"TOP 3 0\r\n"),
        (Top(3, 10), b"TOP 3 10\r\n"),
        (Dele(250), b"DELE 250\r\n"),
        (Noop(), b"NOOP\r\n"),
        (Rset(), b"RSET\r\n"),
        (Capa(), b"CAPA\r\n"),
        (Quit(), b"QUIT\r\n"),
    ],
)
def test_transaction_wire_forms(command: Command, wire: bytes) -> None:
    """TRANSACTION commands use upper-case keywords, decimal arguments and CRLF."""
    assert logged_in().send(command) == wire


INJECTIONS = ["\r", "\n", "\x00", "\x1b", "\x7f", "\r\nDELE 1"]


@pytest.mark.parametrize("bad", INJECTIONS)
@pytest.mark.parametrize(
    "make",
    [
        lambda bad: User(f"alice{bad}x"),
        lambda bad: Pass(f"pw{bad}x"),
        lambda bad: Auth(f"PLAIN{bad}"),
        lambda bad: Auth("PLAIN", f"AAAA{bad}"),
    ],
    ids=["user", "pass", "auth-mechanism", "auth-initial-response"],
)
def test_control_characters_are_refused(make: object, bad: str) -> None:
    """CR, LF, NUL, ESC or DEL in any string argument is refused as command injection."""
    assert callable(make)
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="control character"):
        conn.send(make(bad))
    assert conn.state is State.ERROR


@pytest.mark.parametrize("bad", INJECTIONS)
def test_control_characters_in_sasl_response_are_refused(bad: str) -> None:
    """CR, LF, NUL or ESC in a SASL response line is refused."""
    conn = greeted()
    conn.send(Auth("PLAIN"))
    reply(conn, b"+ \r\n")
    with pytest.raises(LocalProtocolError):
        conn.send(AuthResponse(f"AAAA{bad}"))


def test_error_message_does_not_leak_the_password() -> None:
    """Refusing a PASS with a control character does not repeat the password."""
    with pytest.raises(LocalProtocolError) as info:
        greeted().send(Pass("hunter2\r\n"))
    assert "hunter2" not in str(info.value)


def test_secrets_are_hidden_from_repr() -> None:
    """repr() of PASS, AUTH and a SASL response never shows the secret."""
    assert "hunter2" not in repr(Pass("hunter2"))
    assert repr(Pass("hunter2")) == "Pass()"
    assert "dG9rZW4=" not in repr(Auth("XOAUTH2", "dG9rZW4="))
    assert "XOAUTH2" in repr(Auth("XOAUTH2", "dG9rZW4="))
    assert "dG9rZW4=" not in repr(AuthResponse("dG9rZW4="))
    assert "hunter2" not in repr(Ok(Pass("hunter2"), "Welcome.", None))


def test_command_length_limit() -> None:
    """A 255-octet command is sent and a 256-octet one is refused."""
    fits = User("a" * (MAX_COMMAND_LENGTH - len("USER \r\n")))
    assert len(greeted().send(fits)) == MAX_COMMAND_LENGTH
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="MAX_COMMAND_LENGTH"):
        conn.send(User("a" * (MAX_COMMAND_LENGTH - len("USER \r\n") + 1)))
    assert conn.state is State.ERROR


def test_long_initial_response_is_refused() -> None:
    """AUTH with an initial response over 255 octets is refused (use the two-step form)."""
    with pytest.raises(LocalProtocolError, match="MAX_COMMAND_LENGTH"):
        greeted().send(Auth("XOAUTH2", "A" * 400))


def test_sasl_response_length_limit() -> None:
    """A SASL response may be up to MAX_SASL_RESPONSE octets with its CRLF, not more."""
    for size, ok in ((MAX_SASL_RESPONSE - 2, True), (MAX_SASL_RESPONSE - 1, False)):
        conn = greeted()
        conn.send(Auth("XOAUTH2"))
        reply(conn, b"+ \r\n")
        if ok:
            assert len(conn.send(AuthResponse("A" * size))) == MAX_SASL_RESPONSE
        else:
            with pytest.raises(LocalProtocolError, match="MAX_SASL_RESPONSE"):
                conn.send(AuthResponse("A" * size))


@pytest.mark.parametrize(
    "command",
    [
        User(""),
        User("two words"),
        Auth(""),
        Auth("X Y"),
        Auth("PLAIN", ""),
        Auth("PLAIN", "not base64!"),
        Auth("PLAIN", "AA==="),
        User("\ud800"),
        User(42),  # type: ignore[arg-type]
        Pass(None),  # type: ignore[arg-type]
    ],
    ids=repr,
)
def test_invalid_authorization_arguments(command: Command) -> None:
    """Empty, spaced, non-base64, unencodable or non-str arguments are refused."""
    with pytest.raises(LocalProtocolError):
        greeted().send(command)


@pytest.mark.parametrize(
    "command",
    [
        Retr(0),
        Retr(-1),
        Dele(0),
        List(0),
        Uidl(-5),
        Top(0, 1),
        Top(1, -1),
        Retr(True),
        Retr("1"),  # type: ignore[arg-type]
        Top(1, 2.5),  # type: ignore[arg-type]
    ],
    ids=repr,
)
def test_invalid_message_numbers(command: Command) -> None:
    """Message numbers below 1, negative TOP counts and non-int values are refused."""
    with pytest.raises(LocalProtocolError):
        logged_in().send(command)


@pytest.mark.parametrize("data", ["", "*", "AQ==", "dXNlcj1hQGIuYw==", "abc+/"])
def test_valid_sasl_responses(data: str) -> None:
    """Base64 text, an empty line and "*" are valid SASL responses."""
    conn = greeted()
    conn.send(Auth("PLAIN"))
    reply(conn, b"+ \r\n")
    assert conn.send(AuthResponse(data)) == data.encode() + b"\r\n"


@pytest.mark.parametrize("data", ["a b", "**", "=A", "abc-", "\u00e9"])
def test_invalid_sasl_responses(data: str) -> None:
    """Anything but base64 text, "" or "*" is refused as a SASL response."""
    conn = greeted()
    conn.send(Auth("PLAIN"))
    reply(conn, b"+ \r\n")
    with pytest.raises(LocalProtocolError, match="base64"):
        conn.send(AuthResponse(data))


def test_non_command_is_refused() -> None:
    """send() refuses objects that are not commands."""
    with pytest.raises(LocalProtocolError, match="not a POP3 command"):
        greeted().send("QUIT")  # type: ignore[arg-type]


def test_unknown_command_subclass_is_refused() -> None:
    """A Command subclass the engine does not know is refused, not sent."""

    @dataclasses.dataclass(frozen=True, slots=True)
    class Apop(Command):
        pass

    with pytest.raises(LocalProtocolError, match="Apop"):
        greeted().send(Apop())


# -- the state machine -----------------------------------------------------


def test_transition_table_covers_documented_moves() -> None:
    """PASS/AUTH lead to TRANSACTION, STLS to STARTING_TLS and QUIT to CLOSED from both states."""
    assert transition(State.AUTHORIZATION, Pass) is State.TRANSACTION
    assert transition(State.AUTHORIZATION, Auth) is State.TRANSACTION
    assert transition(State.AUTHORIZATION, Stls) is State.STARTING_TLS
    assert transition(State.AUTHORIZATION, Quit) is State.CLOSED
    assert transition(State.TRANSACTION, Quit) is State.CLOSED
    assert transition(State.TRANSACTION, Retr) is State.TRANSACTION


def test_transition_table_is_total_exhaustively() -> None:
    """Every (state, command type) pair is a table entry or a LocalProtocolError, never KeyError."""
    allowed = 0
    for state in State:
        for command_type in COMMAND_TYPES:
            if (state, command_type) in TRANSITIONS:
                assert isinstance(transition(state, command_type), State)
                allowed += 1
            else:
                with pytest.raises(LocalProtocolError, match=state.name):
                    transition(state, command_type)
    assert allowed == len(TRANSITIONS)


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("command_type", COMMAND_TYPES)
def test_send_obeys_the_table(state: State, command_type: type[Command]) -> None:
    """send() succeeds for table entries (an AUTH response also needs a challenge), else refuses."""
    conn = in_state(state)
    command = SAMPLES[command_type]
    if (state, command_type) in TRANSITIONS and command_type is not AuthResponse:
        assert conn.send(command).endswith(b"\r\n")
        assert conn.outstanding == 1
    else:
        with pytest.raises(LocalProtocolError):
            conn.send(command)
        assert conn.state is State.ERROR


def test_greeting_is_required_before_commands() -> None:
    """Nothing may be sent before the server greets."""
    with pytest.raises(LocalProtocolError, match="not allowed in state GREETING"):
        Connection().send(Capa())


def test_one_command_at_a_time_in_authorization() -> None:
    """Outside TRANSACTION a second command while one is outstanding is refused."""
    conn = greeted()
    conn.send(User("u"))
    with pytest.raises(LocalProtocolError, match="outstanding"):
        conn.send(Pass("p"))


def test_pipelining_in_transaction_and_fifo_matching() -> None:
    """In TRANSACTION many commands may be outstanding; replies match them in order."""
    conn = logged_in()
    for command in (Noop(), Dele(1), Rset(), Stat()):
        conn.send(command)
    assert conn.outstanding == 4
    events = reply(conn, b"+OK a\r\n-ERR b\r\n+OK c\r\n+OK 0 0\r\n")
    assert events == [
        Ok(Noop(), "a", None),
        Err(Dele(1), "b", None),
        Ok(Rset(), "c", None),
        StatReply(Stat(), 0, 0),
    ]
    assert conn.outstanding == 0


def test_nothing_after_quit() -> None:
    """Once QUIT is sent no command may follow, even pipelined."""
    conn = logged_in()
    conn.send(Quit())
    with pytest.raises(LocalProtocolError, match="after QUIT"):
        conn.send(Noop())


def test_quit_err_also_closes() -> None:
    """QUIT answered by -ERR (some deletions failed) still ends in CLOSED."""
    conn = logged_in()
    conn.send(Quit())
    assert reply(conn, b"-ERR some deleted messages not removed\r\n") == [
        Err(Quit(), "some deleted messages not removed", None)
    ]
    assert conn.state is State.CLOSED


def test_quit_in_authorization_closes() -> None:
    """QUIT before logging in closes the session."""
    conn = greeted()
    conn.send(Quit())
    assert reply(conn, b"+OK bye\r\n") == [Ok(Quit(), "bye", None)]
    assert conn.state is State.CLOSED


def test_auth_response_needs_an_open_challenge() -> None:
    """An AUTH response is refused without an outstanding AUTH and a challenge to answer."""
    with pytest.raises(LocalProtocolError, match="only allowed after a challenge"):
        greeted().send(AuthResponse(""))
    conn = greeted()
    conn.send(Auth("PLAIN"))
    with pytest.raises(LocalProtocolError, match="only allowed after a challenge"):
        conn.send(AuthResponse(""))


def test_one_auth_response_per_challenge() -> None:
    """A second AUTH response before the next challenge is refused."""
    conn = greeted()
    conn.send(Auth("PLAIN"))
    assert reply(conn, b"+ \r\n") == [Continuation(Auth("PLAIN"), "")]
    conn.send(AuthResponse("AAAA"))
    assert conn.outstanding == 1
    with pytest.raises(LocalProtocolError, match="only allowed after a challenge"):
        conn.send(AuthResponse("AAAA"))


def test_no_other_command_during_auth() -> None:
    """While AUTH is outstanding only an AUTH response may be sent."""
    conn = greeted()
    conn.send(Auth("PLAIN"))
    reply(conn, b"+ \r\n")
    with pytest.raises(LocalProtocolError, match="outstanding"):
        conn.send(Capa())


def test_two_challenges_without_response_are_an_error() -> None:
    """A server sending a second challenge before our response breaks the protocol."""
    conn = greeted()
    conn.send(Auth("PLAIN"))
    conn.receive_data(b"+ \r\n+ \r\n")
    assert isinstance(conn.next_event(), Continuation)
    with pytest.raises(RemoteProtocolError, match="second SASL challenge"):
        conn.next_event()


def test_challenge_line_only_for_auth() -> None:
    """A "+ " line in reply to anything but AUTH is a malformed status line."""
    with pytest.raises(RemoteProtocolError, match="malformed status line"):
        answer(Noop(), b"+ hi\r\n")


def test_bare_plus_is_an_empty_challenge() -> None:
    """A challenge line that is just "+" counts as an empty challenge."""
    conn = greeted()
    conn.send(Auth("PLAIN"))
    assert reply(conn, b"+\r\n") == [Continuation(Auth("PLAIN"), "")]


def test_tls_established_only_in_starting_tls() -> None:
    """tls_established() outside STARTING_TLS is a LocalProtocolError."""
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="tls_established"):
        conn.tls_established()
    assert conn.state is State.ERROR


def test_starting_tls_waits_and_then_accepts_eof() -> None:
    """In STARTING_TLS next_event() needs data; an EOF there is an orderly close."""
    conn = in_state(State.STARTING_TLS)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.state is State.CLOSED


@pytest.mark.parametrize(
    "poke",
    [
        lambda conn: conn.send(Noop()),
        lambda conn: conn.receive_data(b"x"),
        lambda conn: conn.receive_data(b""),
        lambda conn: conn.next_event(),
        lambda conn: conn.tls_established(),
    ],
    ids=["send", "receive_data", "receive_eof", "next_event", "tls_established"],
)
@pytest.mark.parametrize("origin", ["local", "remote"])
def test_error_state_is_final(poke: object, origin: str) -> None:
    """After any ProtocolError every method raises LocalProtocolError about the ERROR state."""
    assert callable(poke)
    conn = logged_in()
    if origin == "local":
        with pytest.raises(LocalProtocolError):
            conn.send(Retr(0))
    else:
        conn.send(Noop())
        with pytest.raises(RemoteProtocolError):
            reply(conn, b"HELLO\r\n")
    assert conn.state is State.ERROR
    with pytest.raises(LocalProtocolError, match="connection is in ERROR state"):
        poke(conn)
