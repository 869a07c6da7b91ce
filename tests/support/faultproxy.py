"""A TCP proxy on 127.0.0.1 that injects one network fault per connection.

It forwards bytes between a client and a server untouched (TLS stays end to
end, so the client still verifies the server's certificate) except for the
fault chosen for that connection:

* ``none``: a clean pipe;
* ``delay``: a fixed latency before each forwarded chunk;
* ``throttle``: a few bytes per second for a while, then full speed;
* ``cut``: after ``offset`` bytes in one direction, an orderly close of both sides;
* ``reset``: after ``offset`` bytes, an RST to both sides (SO_LINGER 0);
* ``stall``: after ``offset`` bytes, nothing more is forwarded either way
  while both sockets stay open, until the client gives up;
* ``flip``: the byte at ``offset`` in one direction is XORed with ``mask``.

Faults are drawn from a seeded RNG (:func:`random_fault`); the seed comes
from ``GPOPD_FAULT_SEED`` when set, so a failing run can be repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

FaultKind = Literal["none", "delay", "throttle", "cut", "reset", "stall", "flip"]
Direction = Literal["up", "down"]  # up: client to server; down: server to client
FAULT_KINDS: tuple[FaultKind, ...] = ("none", "delay", "throttle", "cut", "reset", "stall", "flip")
SEED_VARIABLE = "GPOPD_FAULT_SEED"
READ_SIZE = 64 * 1024
# Throttled bytes go out in small pieces this often, so the client sees a
# trickle rather than silence followed by a burst.
THROTTLE_TICK = 0.1


def fault_seed(environ: dict[str, str] | None = None) -> int:
    """``GPOPD_FAULT_SEED`` if set, else a fresh random seed."""
    value = (os.environ if environ is None else environ).get(SEED_VARIABLE)
    return int(value) if value else random.randrange(1 << 30)


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind = "none"
    direction: Direction = "down"
    offset: int = 0  # cut, reset, stall, flip: bytes forwarded in ``direction`` first
    delay: float = 0.0  # delay: seconds before each chunk
    rate: int = 0  # throttle: bytes per second
    duration: float = 0.0  # throttle: seconds before full speed returns
    mask: int = 0  # flip: XOR mask, 1-255

    def __post_init__(self) -> None:
        if self.kind == "flip" and not 0 < self.mask < 256:
            raise ValueError("a flip needs a mask from 1 to 255")

    def __str__(self) -> str:
        match self.kind:
            case "none":
                return "none"
            case "delay":
                return f"delay {self.delay * 1000:.0f}ms/chunk"
            case "throttle":
                return f"throttle {self.direction} {self.rate}B/s for {self.duration:.1f}s"
            case "flip":
                return f"flip {self.direction}@{self.offset} ^{self.mask:#04x}"
            case _:
                return f"{self.kind} {self.direction}@{self.offset}"


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return min(high, int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))


def random_fault(
    rng: random.Random,
    *,
    kinds: tuple[FaultKind, ...] = FAULT_KINDS,
    max_down: int = 256 * 1024,
    max_up: int = 4096,
) -> Fault:
    """A fault drawn from ``rng``; offsets stay within the given byte ranges."""
    kind = rng.choice(kinds)
    direction: Direction = "up" if rng.random() < 0.3 else "down"
    high = max_up if direction == "up" else max_down
    # Half the offsets fall anywhere in the range (mostly inside a RETR),
    # half favour the first bytes (handshake, greeting, login, listing).
    offset = rng.randint(1, high) if rng.random() < 0.5 else _log_uniform(rng, 1, high)
    match kind:
        case "none":
            return Fault()
        case "delay":
            return Fault("delay", delay=rng.uniform(0.002, 0.03))
        case "throttle":
            return Fault(
                "throttle", direction, rate=rng.randint(20, 400), duration=rng.uniform(0.3, 1.5)
            )
        case "flip":
            return Fault("flip", direction, offset=offset - 1, mask=rng.randint(1, 255))
        case _:
            return Fault(kind, direction, offset=offset)


@dataclass(slots=True)
class Connection:
    """What happened on one proxied connection."""

    fault: Fault
    opened: float
    up_bytes: int = 0
    down_bytes: int = 0
    fired: float | None = None  # when the fault took effect (None: never reached)
    closed: float | None = None  # when the proxy saw the client go away or closed it
    ended_by: str = ""

    @property
    def stall_seconds(self) -> float | None:
        """For a stall that fired: how long the client took to give up."""
        if self.fault.kind != "stall" or self.fired is None or self.closed is None:
            return None
        return self.closed - self.fired


class _Teardown(Exception):
    """Ends both pumps of a connection."""


@dataclass
class _Link:
    fault: Fault
    record: Connection
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    throttle_started: float | None = None

    def sent(self, direction: Direction) -> int:
        return self.record.up_bytes if direction == "up" else self.record.down_bytes

    def count(self, direction: Direction, n: int) -> None:
        if direction == "up":
            self.record.up_bytes += n
        else:
            self.record.down_bytes += n


class FaultProxy:
    """Listens on 127.0.0.1 and forwards each connection to ``target``.

    Each new connection takes its fault from ``choose`` when given, else
    from the ``fault`` attribute, which a test may change between polls.
    """

    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        *,
        choose: Callable[[], Fault] | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self.choose = choose
        self.fault = Fault()
        self.connections: list[Connection] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._quiet = asyncio.Event()
        self._quiet.set()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def idle(self) -> None:
        """Wait until every connection accepted so far has been torn down."""
        await self._quiet.wait()

    # ------------------------------------------------------------ plumbing
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._quiet.clear()
        try:
            await self._serve(reader, writer)
        finally:
            self._handlers.discard(task)
            if not self._handlers:
                self._quiet.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fault = self.choose() if self.choose is not None else self.fault
        record = Connection(fault, time.monotonic())
        self.connections.append(record)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            record.ended_by = "server unreachable"
            _abort(writer)
            return
        link = _Link(fault, record, writer, up_writer)
        pumps = [
            asyncio.create_task(self._pump(link, reader, up_writer, "up")),
            asyncio.create_task(self._pump(link, up_reader, writer, "down")),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if link.stalled.is_set():
                # Only the client's pump ends a stall: it is how long the
                # client takes to give up that the test measures.
                await pumps[0]
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            if record.closed is None:
                record.closed = time.monotonic()
            # close(), not abort(): what was forwarded last still reaches the peer.
            for side in (writer, up_writer):
                if not side.transport.is_closing():
                    side.close()

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Direction,
    ) -> None:
        record = link.record
        try:
            while data := await reader.read(READ_SIZE):
                if link.stalled.is_set():
                    continue  # swallowed: the peer keeps waiting for a reply
                await self._forward(link, writer, direction, data)
        except _Teardown:
            return
        except (ConnectionError, OSError) as exc:
            record.ended_by = record.ended_by or f"{direction} error: {type(exc).__name__}"
        else:
            record.ended_by = record.ended_by or f"{direction} eof"
        if direction == "up":
            record.closed = time.monotonic()

    async def _forward(
        self, link: _Link, writer: asyncio.StreamWriter, direction: Direction, data: bytes
    ) -> None:
        fault = link.fault
        record = link.record
        if fault.kind == "delay":
            if record.fired is None:
                record.fired = time.monotonic()
            await asyncio.sleep(fault.delay)
        elif fault.kind == "throttle" and fault.direction == direction:
            await self._throttle(link, writer, direction, data)
            return
        elif fault.kind in ("cut", "reset", "stall") and fault.direction == direction:
            room = fault.offset - link.sent(direction)
            if room < len(data):
                await self._write(link, writer, direction, data[: max(room, 0)])
                self._trigger(link)
                return
        elif fault.kind == "flip" and fault.direction == direction:
            at = fault.offset - link.sent(direction)
            if 0 <= at < len(data):
                changed = bytearray(data)
                changed[at] ^= fault.mask
                data = bytes(changed)
                record.fired = time.monotonic()
        await self._write(link, writer, direction, data)

    async def _write(
        self, link: _Link, writer: asyncio.StreamWriter, direction: Direction, data: bytes
    ) -> None:
        if not data:
            return
        writer.write(data)
        link.count(direction, len(data))
        await writer.drain()

    async def _throttle(
        self, link: _Link, writer: asyncio.StreamWriter, direction: Direction, data: bytes
    ) -> None:
        fault = link.fault
        if link.throttle_started is None:
            link.throttle_started = link.record.fired = time.monotonic()
        step = max(1, int(fault.rate * THROTTLE_TICK))
        view = memoryview(data)
        while view and time.monotonic() - link.throttle_started < fault.duration:
            await self._write(link, writer, direction, bytes(view[:step]))
            view = view[step:]
            await asyncio.sleep(THROTTLE_TICK)
        await self._write(link, writer, direction, bytes(view))

    def _trigger(self, link: _Link) -> None:
        record = link.record
        record.fired = time.monotonic()
        match link.fault.kind:
            case "cut":
                record.ended_by = "cut"
                for side in (link.client, link.server):
                    side.close()
                raise _Teardown
            case "reset":
                record.ended_by = "reset"
                for side in (link.client, link.server):
                    _reset(side)
                raise _Teardown
            case "stall":
                record.ended_by = "stall"
                link.stalled.set()


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _abort(writer: asyncio.StreamWriter) -> None:
    if not writer.transport.is_closing():
        writer.transport.abort()
