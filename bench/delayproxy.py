"""A TCP proxy on 127.0.0.1 that delays every chunk by a fixed time, each way.

It models a long network path without limiting its bandwidth: each direction
is a delay line (a FIFO of ``(due time, bytes)``), so many chunks can be in
flight at once and they leave in the order they arrived.  TLS passes through
untouched, so clients still verify the server's certificate.

Run it on its own: ``python bench/delayproxy.py --target-port N [--port M]
[--delay-ms 20]``; it prints ``READY <port>`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

DEFAULT_DELAY = 0.020
READ_SIZE = 64 * 1024
# Bytes waiting in one delay line before the reader stops reading: enough for
# 20 ms of a fast local link, small enough that a stalled peer is noticed.
MAX_IN_FLIGHT = 16 * 1024 * 1024


class DelayLine:
    """Copies one direction of a connection, each chunk ``delay`` seconds late."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._delay = delay
        self._queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self._in_flight = 0
        self._room = asyncio.Event()
        self._room.set()

    async def run(self) -> None:
        """Copy until the source closes, then half-close the destination."""
        sender = asyncio.create_task(self._send())
        try:
            await self._receive()
        finally:
            await sender

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._room.wait()
                data = await self._reader.read(READ_SIZE)
                if not data:
                    break
                self._in_flight += len(data)
                if self._in_flight >= MAX_IN_FLIGHT:
                    self._room.clear()
                self._queue.put_nowait((loop.time() + self._delay, data))
        except OSError:
            pass
        finally:
            # The end of the stream is delayed like any other chunk.
            self._queue.put_nowait((loop.time() + self._delay, b""))

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        broken = False
        while True:
            due, data = await self._queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._in_flight -= len(data)
            if self._in_flight < MAX_IN_FLIGHT:
                self._room.set()
            if broken:
                if not data:
                    return
                continue
            try:
                if not data:
                    if self._writer.can_write_eof():
                        self._writer.write_eof()
                    return
                self._writer.write(data)
                await self._writer.drain()
            except OSError:
                broken = True
                self._room.set()


class DelayProxy:
    """Listens on 127.0.0.1 and forwards every connection to one target port."""

    def __init__(
        self, target_port: int, *, delay: float = DEFAULT_DELAY, target_host: str = "127.0.0.1"
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.delay = delay
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> int:
        """Start listening; return the port."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                server_reader, server_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                client_writer.close()
                return
            try:
                await asyncio.gather(
                    DelayLine(client_reader, server_writer, self.delay).run(),
                    DelayLine(server_reader, client_writer, self.delay).run(),
                )
            finally:
                for writer in (client_writer, server_writer):
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        finally:
            self._tasks.discard(task)


async def _serve(args: argparse.Namespace) -> None:
    proxy = DelayProxy(args.target_port, delay=args.delay_ms / 1000.0)
    port = await proxy.start(args.port)
    print(f"READY {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await proxy.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--port", type=int, default=0, help="listen port (default: any)")
    parser.add_argument("--delay-ms", type=float, default=DEFAULT_DELAY * 1000)
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
