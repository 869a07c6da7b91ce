"""Long fuzzing runs (``-m slow``): the engine and the config loader fail only in their own way.

The engine, fed arbitrary or mutated server bytes in arbitrary chunks after
arbitrary commands, raises nothing but ``ProtocolError`` and never hangs:
each example runs under a wall-clock alarm and a bounded number of events.
The config loader, given arbitrary bytes or YAML documents, ends in
``Settings`` or ``ConfigError``.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpopd.pop3 import Command, Connection, LocalProtocolError, ProtocolError, State
from tests.test_config_fuzz import DOCUMENT, assert_sane, dump, load_outcome
from tests.test_pop3_properties import (
    ACTIONS,
    PREFIXES,
    VALID_SESSIONS,
    bounded_drain,
    check_only_protocol_errors,
    split_with,
)
from tests.test_pop3_transcripts import C, S

pytestmark = pytest.mark.slow

ENGINE = settings(
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CONFIG = settings(
    max_examples=5_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# Far more than any example needs; only a loop that never returns reaches it.
HANG_SECONDS = 10.0


class Hang(Exception):
    """An example ran past ``HANG_SECONDS``."""


@contextlib.contextmanager
def no_hang(seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Raise ``Hang`` inside the code under test if it runs longer than ``seconds``."""

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"example still running after {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- engine: arbitrary commands and bytes ------------------------------------


@ENGINE
@given(prefix=PREFIXES, actions=ACTIONS, data=st.data())
def test_engine_arbitrary_bytes(
    prefix: str, actions: list[tuple[str, object]], data: st.DataObject
) -> None:
    """20,000 runs of arbitrary commands and server bytes raise only ProtocolError, never hang."""
    with no_hang():
        check_only_protocol_errors(prefix, actions, data)


# -- engine: valid sessions with the server's bytes mutated ---------------------

MUTATION = st.tuples(
    st.integers(0, 10**6),  # position, taken modulo the segment length
    st.sampled_from(["flip", "insert", "delete", "repeat"]),
    st.sampled_from([b"\r", b"\n", b".", b" ", b"\x00", b"\xff", b"+", b"-", b"9", b"["])
    | st.binary(min_size=1, max_size=3),
)


def mutate(segment: bytes, mutations: list[tuple[int, str, bytes]]) -> bytes:
    """``segment`` with each mutation applied at its position."""
    out = bytearray(segment)
    for position, op, value in mutations:
        at = position % (len(out) + 1)
        if op == "flip" and at < len(out):
            out[at] ^= value[0] or 0x20
        elif op == "insert":
            out[at:at] = value
        elif op == "delete":
            del out[at : at + len(value)]
        elif op == "repeat":
            out[at:at] = bytes(out[at : at + 64]) * (1 + value[0] % 4)
    return bytes(out)


def play_mutated(name: str, data: st.DataObject) -> None:
    conn = Connection()
    fed = 0
    try:
        for step in VALID_SESSIONS[name]:
            if isinstance(step, C):
                command: Command = step.command
                conn.send(command)
            elif isinstance(step, S):
                if not step.data:
                    conn.receive_data(b"")
                    bounded_drain(conn, 10)
                    continue
                mutations = data.draw(st.lists(MUTATION, max_size=4))
                segment = mutate(step.data, mutations)
                fed += len(segment)
                for piece in split_with(data)(segment) if segment else []:
                    conn.receive_data(piece)
                    bounded_drain(conn, fed + 10)
    except ProtocolError:
        assert conn.state is State.ERROR
        with pytest.raises(LocalProtocolError, match="ERROR state"):
            conn.next_event()


@ENGINE
@given(name=st.sampled_from(sorted(VALID_SESSIONS)), data=st.data())
def test_engine_mutated_sessions(name: str, data: st.DataObject) -> None:
    """20,000 valid sessions with mutated server bytes raise only ProtocolError, never hang."""
    with no_hang():
        play_mutated(name, data)


# -- config loader ------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return tmp_path / "gpopd.yaml"


@CONFIG
@given(raw=st.binary(max_size=400))
def test_config_arbitrary_bytes(config_file: Path, raw: bytes) -> None:
    """5,000 arbitrary byte strings as the config file give Settings or ConfigError only."""
    config_file.write_bytes(raw)
    config_file.chmod(0o600)
    with no_hang():
        assert_sane(load_outcome(config_file, {}))


YAML_PIECES = st.sampled_from(
    [
        "accounts:", "\n", "  ", "- ", ": ", "{", "}", "[", "]", ",", "&a ", "*a", "<<: ",
        "!!binary ", "!!python/object ", "!!set ", "? ", "|", ">", "'", '"', "#", "---\n",
        "...\n", "%YAML 1.2\n", "%TAG ! x\n", "\t", "host", "alice", "delivery", "type",
        "maildir", "password", "env", "file", "1e999", "0x1F", "~", "null", "\\u0000",
    ]
)  # fmt: skip


@CONFIG
@given(pieces=st.lists(YAML_PIECES | st.text(max_size=6), max_size=60))
def test_config_yaml_shaped_text(config_file: Path, pieces: list[str]) -> None:
    """5,000 texts assembled from YAML syntax and gpopd keys give Settings or ConfigError."""
    config_file.write_text("".join(pieces), encoding="utf-8", errors="surrogatepass")
    config_file.chmod(0o600)
    with no_hang():
        assert_sane(load_outcome(config_file, {}))


@settings(CONFIG, max_examples=2_000)  # large documents: the slowest of these runs
@given(document=DOCUMENT, mode=st.sampled_from([0o600, 0o644]))
def test_config_documents(config_file: Path, document: dict[str, Any], mode: int) -> None:
    """2,000 generated YAML documents give Settings or ConfigError only."""
    config_file.write_text(dump(document))
    config_file.chmod(mode)
    with no_hang():
        assert_sane(load_outcome(config_file, {"ALICE": "pw"}))
