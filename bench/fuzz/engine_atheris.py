"""Coverage-guided fuzzing of the sans-IO POP3 engine with atheris.

Each input is read as a script: commands to send, server bytes to feed in
chunks of chosen sizes, end of stream, TLS established.  The engine may
raise ``ProtocolError`` (that is its job with hostile input); any other
exception, or ``next_event()`` returning events without consuming input,
is a finding and stops the run with the input that caused it.

    pip install atheris
    python -m bench.fuzz.engine_atheris --seeds ~/.cache/gpopd-fuzz
    python -m bench.fuzz.engine_atheris -dict=bench/fuzz/pop3.dict \
        -max_total_time=600 ~/.cache/gpopd-fuzz

Arguments after the script go to libFuzzer (``-runs=N``, ``-jobs=N``,
``-max_len=N``, a corpus directory to grow and reuse).
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from gpopd import pop3

COMMANDS: tuple[pop3.Command, ...] = (
    pop3.Capa(),
    pop3.Stls(),
    pop3.User("alice"),
    pop3.Pass("secret"),
    pop3.Auth("PLAIN"),
    pop3.Auth("XOAUTH2", "dG9rZW4="),
    pop3.AuthResponse("AQ=="),
    pop3.AuthResponse("*"),
    pop3.Stat(),
    pop3.List(),
    pop3.List(1),
    pop3.Uidl(),
    pop3.Uidl(2),
    pop3.Retr(1),
    pop3.Top(1, 0),
    pop3.Dele(1),
    pop3.Noop(),
    pop3.Rset(),
    pop3.Quit(),
)
# A valid opening, so that inputs reach the states behind the login quickly:
# the first byte of an input picks how many of these steps are played.
OPENING: tuple[tuple[pop3.Command | None, bytes], ...] = (
    (None, b"+OK ready\r\n"),
    (pop3.Capa(), b"+OK\r\nPIPELINING\r\nUIDL\r\n.\r\n"),
    (pop3.User("alice"), b"+OK\r\n"),
    (pop3.Pass("secret"), b"+OK logged in\r\n"),
)


def drain(conn: pop3.Connection, budget: int) -> None:
    for _ in range(budget):
        event = conn.next_event()
        if event is pop3.NEED_DATA or isinstance(event, pop3.ConnectionClosed):
            return
    raise RuntimeError("next_event() kept returning events without new input")


def one_input(data: bytes) -> None:
    # A plain cursor rather than atheris.FuzzedDataProvider: the layout is
    # simple enough to write seeds for by hand (see encode_seed).
    conn = pop3.Connection()
    steps = data[0] % (len(OPENING) + 1) if data else 0
    at = 1
    fed = 0
    try:
        for command, reply in OPENING[:steps]:
            if command is not None:
                conn.send(command)
            conn.receive_data(reply)
            drain(conn, 10)
        while at + 1 < len(data):
            op, arg = data[at] % 10, data[at + 1]
            at += 2
            if op <= 2:
                conn.send(COMMANDS[arg % len(COMMANDS)])
            elif op == 3:
                conn.receive_data(b"")
                drain(conn, 10)
            elif op == 4:
                conn.tls_established()
            else:
                chunk = data[at : at + 1 + arg % 64]
                at += len(chunk)
                if not chunk:
                    break
                fed += len(chunk)
                conn.receive_data(chunk)
                drain(conn, fed + 10)
    except pop3.ProtocolError:
        if conn.state is not pop3.State.ERROR:
            raise RuntimeError("ProtocolError left the connection out of ERROR state") from None


# Valid exchanges after the login prefix, as (command index, server reply).
SEED_EXCHANGES: tuple[tuple[tuple[int, bytes], ...], ...] = (
    ((8, b"+OK 2 320\r\n"), (11, b"+OK\r\n1 a\r\n2 b\r\n.\r\n"), (9, b"+OK\r\n1 100\r\n.\r\n")),
    (
        (13, b"+OK\r\nSubject: x\r\n\r\n..dot\r\nbody\r\n.\r\n"),
        (15, b"+OK\r\n"),
        (18, b"+OK bye\r\n"),
    ),
    ((14, b"+OK\nSubject: y\n\n.\n"), (12, b"+OK 2 b\r\n"), (10, b"-ERR [SYS/TEMP] no\r\n")),
)


def encode_seed(exchanges: tuple[tuple[int, bytes], ...]) -> bytes:
    """An input that ``one_input`` reads as: log in, then each command and its reply."""
    out = bytearray([len(OPENING)])  # logged in
    for command, reply in exchanges:
        out += bytes([0, command])
        for start in range(0, len(reply), 64):
            piece = reply[start : start + 64]
            out += bytes([5, len(piece) - 1]) + piece
    return bytes(out)


def main() -> None:
    if sys.argv[1:2] == ["--seeds"]:
        # Start a corpus from valid sessions, so that mutation begins past the login.
        for n, exchanges in enumerate(SEED_EXCHANGES):
            Path(sys.argv[2], f"seed-{n}").write_bytes(encode_seed(exchanges))
        return
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
