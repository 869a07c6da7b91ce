"""The delay proxy: every chunk late by the delay, in order, without a bandwidth cap."""

from __future__ import annotations

import asyncio
import time

from bench.delayproxy import DelayProxy

DELAY = 0.05


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def start() -> tuple[asyncio.Server, DelayProxy]:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = DelayProxy(server.sockets[0].getsockname()[1], delay=DELAY)
    await proxy.start()
    return server, proxy


async def stop(server: asyncio.Server, proxy: DelayProxy) -> None:
    await proxy.close()
    server.close()
    await server.wait_closed()


async def test_round_trip_takes_both_delays() -> None:
    """One request and its echo take at least the delay each way."""
    server, proxy = await start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        started = time.perf_counter()
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"
        assert time.perf_counter() - started >= 2 * DELAY
        writer.close()
    finally:
        await stop(server, proxy)


async def test_many_chunks_arrive_in_order_within_one_round_trip() -> None:
    """Chunks sent back to back come back in order, delayed once, not once per chunk."""
    server, proxy = await start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        lines = [b"%06d\n" % n for n in range(200)]
        started = time.perf_counter()
        for line in lines:
            writer.write(line)
            await writer.drain()
            await asyncio.sleep(0)
        received = [await reader.readline() for _ in lines]
        elapsed = time.perf_counter() - started
        assert received == lines
        assert 2 * DELAY <= elapsed < 10 * DELAY
        writer.close()
    finally:
        await stop(server, proxy)


async def test_end_of_stream_passes_through() -> None:
    """A client's half-close reaches the server, whose close reaches the client."""
    server, proxy = await start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"last words")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), timeout=5) == b"last words"
        writer.close()
    finally:
        await stop(server, proxy)
