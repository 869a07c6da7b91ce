"""The POP3 client state machine.

Theory of operation (RFC 1939 sections 3-6, RFC 2449, RFC 2595, RFC 5034):

* The server speaks first: ``GREETING`` lasts until its greeting line.
  ``+OK`` opens ``AUTHORIZATION``; an ``-ERR`` greeting means the server
  refuses the session, so the machine goes straight to ``CLOSED``.
* In ``AUTHORIZATION`` the client may probe ``CAPA``, upgrade with ``STLS``
  or log in with ``USER``/``PASS`` or ``AUTH``.  A ``+OK`` to ``STLS`` parks
  the machine in ``STARTING_TLS`` until the caller reports the handshake done;
  every pre-TLS capability is then forgotten (RFC 2595 section 4).
* A successful login enters ``TRANSACTION``, where the mail commands live and
  where commands may be pipelined (RFC 2449 section 6.6).
* ``QUIT`` ends the session from either state.  Anything the engine refuses
  moves it to ``ERROR`` for good, as in h11: after a desync nothing the
  connection says can be trusted.

The table below is the single authority on which command may be sent in
which state and on the state that follows its ``+OK``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from ._commands import (
    Auth,
    AuthResponse,
    Capa,
    Command,
    Dele,
    List,
    Noop,
    Pass,
    Quit,
    Retr,
    Rset,
    Stat,
    Stls,
    Top,
    Uidl,
    User,
    keyword,
)
from ._errors import LocalProtocolError


class State(enum.Enum):
    """Where the POP3 session stands."""

    GREETING = "GREETING"
    AUTHORIZATION = "AUTHORIZATION"
    STARTING_TLS = "STARTING_TLS"
    TRANSACTION = "TRANSACTION"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


_AUTHORIZATION: Final = State.AUTHORIZATION
_TRANSACTION: Final = State.TRANSACTION

# (state the command is sent in, command type) -> state after its +OK.
# A pair that is missing is a command the state does not allow.
TRANSITIONS: Final[Mapping[tuple[State, type[Command]], State]] = {
    (_AUTHORIZATION, Capa): _AUTHORIZATION,
    (_AUTHORIZATION, Stls): State.STARTING_TLS,
    (_AUTHORIZATION, User): _AUTHORIZATION,
    (_AUTHORIZATION, Pass): _TRANSACTION,
    (_AUTHORIZATION, Auth): _TRANSACTION,
    # The +OK that follows a SASL response completes the AUTH.
    (_AUTHORIZATION, AuthResponse): _TRANSACTION,
    (_AUTHORIZATION, Quit): State.CLOSED,
    (_TRANSACTION, Capa): _TRANSACTION,
    (_TRANSACTION, Stat): _TRANSACTION,
    (_TRANSACTION, List): _TRANSACTION,
    (_TRANSACTION, Uidl): _TRANSACTION,
    (_TRANSACTION, Retr): _TRANSACTION,
    (_TRANSACTION, Top): _TRANSACTION,
    (_TRANSACTION, Dele): _TRANSACTION,
    (_TRANSACTION, Noop): _TRANSACTION,
    (_TRANSACTION, Rset): _TRANSACTION,
    (_TRANSACTION, Quit): State.CLOSED,
}


def transition(state: State, command_type: type[Command]) -> State:
    """The state after a ``+OK`` to ``command_type`` sent in ``state``.

    Raises ``LocalProtocolError`` when ``state`` does not allow the command.
    """
    try:
        return TRANSITIONS[(state, command_type)]
    except KeyError:
        raise LocalProtocolError(
            f"{keyword(command_type)} is not allowed in state {state.name}"
        ) from None
