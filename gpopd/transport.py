"""The byte pipe to a POP3 server: TCP, implicit TLS or STLS, timeouts.

Built on an asyncio protocol (a ``BufferedProtocol``) rather than streams
for two reasons.  First, STLS safety: with streams, plaintext that a man in
the middle appends after the server's ``+OK`` stays in ``StreamReader``'s
buffer and is later read as if it had come over TLS (PROTOCOL.md §3).  Here
every received byte is in a buffer we own, so ``start_tls`` can refuse to
proceed when anything is waiting.  Second, speed: TLS records are decrypted
into one buffer shared by all connections, and ``read()`` hands over
everything received so far in one piece, so the protocol engine works on
large slices.

Writes never block (asyncio buffers them); the session only writes small
commands and keeps reading, so full socket buffers cannot deadlock a
pipelined exchange.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from gpopd.errors import ConnectTimeout, ReadTimeout, TlsError, TransportError

# Stop reading from the socket while this much received data waits for the
# engine: bounds memory when the consumer (disk) is slower than the network.
READ_HIGH_WATER = 1024 * 1024
READ_LOW_WATER = 256 * 1024
# One read() hands over at most this much, so a slow consumer still sees
# progress in bounded pieces.
MAX_READ = 256 * 1024


# Building a context loads the whole system trust store: 45 ms of CPU here,
# spent on the event loop, at every poll of every account.  Contexts are
# shared between connections and rebuilt after an hour or when the CA file
# changes, so an updated trust store is still picked up.
CONTEXT_MAX_AGE = 3600.0
_contexts: dict[str | None, tuple[float, float | None, ssl.SSLContext]] = {}


def make_tls_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A client context that verifies the certificate and host name, TLS >= 1.2.

    The context is shared: callers must not change it.
    """
    key = str(ca_file) if ca_file else None
    mtime = os.stat(ca_file).st_mtime if ca_file else None
    now = time.monotonic()
    cached = _contexts.get(key)
    if cached is not None and cached[1] == mtime and now - cached[0] < CONTEXT_MAX_AGE:
        return cached[2]
    ctx = ssl.create_default_context(cafile=key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _contexts[key] = (now, mtime, ctx)
    return ctx


@dataclass(frozen=True, slots=True)
class TlsInfo:
    version: str | None
    cipher: str | None
    peer_subject: str | None


class _SharedReceiveBuffer(threading.local):
    """One receive buffer for every connection of an event loop's thread.

    asyncio's selector loop and its TLS layer lend the buffer from
    get_buffer(), fill it and report it to buffer_updated() within one
    callback, so lendings never overlap and a single buffer serves any
    number of connections.  ``borrower`` (the ``id()`` of the last
    connection lent it, so that it keeps none alive) catches a loop that
    would overlap them: that connection fails rather than read another's
    bytes.
    """

    def __init__(self) -> None:
        self.view = memoryview(bytearray(MAX_READ))
        self.borrower = 0


_receive_buffer = _SharedReceiveBuffer()


class _Protocol(asyncio.BufferedProtocol):
    """Receives into the thread's shared buffer and queues a copy of each read.

    As a BufferedProtocol it has TLS records decrypted straight into that
    buffer.  A plain Protocol would have asyncio allocate a fresh 256 KiB
    object for every TLS record (cut to the record's size afterwards) and
    then join the records of a read into one more copy.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.eof = False
        self.error: BaseException | None = None
        self.reading_paused = False
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False

    # asyncio callbacks -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # always a Transport for TCP

    def get_buffer(self, sizehint: int) -> memoryview:
        shared = _receive_buffer
        shared.borrower = id(self)
        return shared.view

    def buffer_updated(self, nbytes: int) -> None:
        shared = _receive_buffer
        if shared.borrower != id(self):
            raise RuntimeError("the receive buffer was lent to two connections at once")
        shared.borrower = 0
        self.chunks.append(bytes(shared.view[:nbytes]))
        self.buffered += nbytes
        if self.buffered > READ_HIGH_WATER and not self.reading_paused and self.transport:
            self.transport.pause_reading()
            self.reading_paused = True
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None:
            self.error = exc
        # asyncio's TLS layer keeps our get_buffer and buffer_updated as bound
        # methods after the connection is gone, and our transport refers back
        # to that layer: a reference cycle that would hold the connection's
        # TLS state and buffers (over 256 KiB) until the garbage collector
        # ran, which in a quiet daemon may be hours.
        self.transport = None
        self._wake_reader()
        self._wake_drain()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # helpers -------------------------------------------------------------
    def _wake_reader(self) -> None:
        waiter, self._data_waiter = self._data_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drain(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> bytes:
        if len(self.chunks) == 1:
            data = self.chunks.popleft()
        else:
            parts: list[bytes] = []
            size = 0
            while self.chunks and size < MAX_READ:
                part = self.chunks.popleft()
                parts.append(part)
                size += len(part)
            data = b"".join(parts)
        self.buffered -= len(data)
        if self.reading_paused and self.buffered <= READ_LOW_WATER and self.transport:
            self.transport.resume_reading()
            self.reading_paused = False
        return data

    async def wait_data(self) -> None:
        loop = asyncio.get_running_loop()
        self._data_waiter = loop.create_future()
        await self._data_waiter

    async def drain(self) -> None:
        if not self._write_paused or self.eof:
            return
        loop = asyncio.get_running_loop()
        self._drain_waiter = loop.create_future()
        await self._drain_waiter


class Transport:
    """A connected byte stream with deadlines on every phase."""

    def __init__(self, protocol: _Protocol, host: str, read_timeout: float) -> None:
        self._protocol = protocol
        self.host = host
        self.read_timeout = read_timeout
        self.bytes_received = 0

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        server_hostname: str | None = None,
    ) -> Transport:
        """Open TCP (and, with ``tls``, implicit TLS) to ``host:port``."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, protocol = await loop.create_connection(
                    _Protocol,
                    host,
                    port,
                    ssl=tls,
                    server_hostname=(server_hostname or host) if tls else None,
                    ssl_handshake_timeout=connect_timeout if tls else None,
                )
        except TimeoutError as exc:
            raise ConnectTimeout(
                f"connecting to {host}:{port} took longer than {connect_timeout:g}s"
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            raise TlsError(
                f"TLS certificate of {host}:{port} rejected: {exc.verify_message}"
            ) from exc
        except ssl.SSLError as exc:
            # Not a TlsError: one byte damaged in transit fails the handshake
            # with any reason (bad record MAC, a garbled ServerHello...), and a
            # TlsError would park the account for a person.  It fails before
            # any credential either way; only the retry schedule differs.
            raise TransportError(f"TLS handshake with {host}:{port} failed: {exc.reason}") from exc
        except OSError as exc:
            if tls is not None and isinstance(exc, ConnectionResetError):
                # A server that cannot agree on TLS >= 1.2 (or any TLS at all)
                # typically drops the connection during the handshake.  It may
                # also be passing trouble, so this stays a (retried) network
                # error rather than a TlsError that waits for a person.
                raise TransportError(
                    f"TLS handshake with {host}:{port} failed: connection reset by the "
                    "server (does it support TLS 1.2 or newer?)"
                ) from exc
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise TransportError(f"cannot connect to {host}:{port}: {reason}") from exc
        return cls(protocol, host, read_timeout)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out by ``read()``."""
        return self._protocol.buffered

    async def read(self) -> bytes:
        """Everything received so far (at least one byte), or b"" at end of stream."""
        protocol = self._protocol
        if not protocol.chunks:
            if protocol.eof:
                return self._eof_or_raise()
            try:
                async with asyncio.timeout(self.read_timeout):
                    while not protocol.chunks and not protocol.eof:
                        await protocol.wait_data()
            except TimeoutError as exc:
                raise ReadTimeout(f"{self.host} sent nothing for {self.read_timeout:g}s") from exc
            if not protocol.chunks:
                return self._eof_or_raise()
        data = protocol.take()
        self.bytes_received += len(data)
        return data

    def _eof_or_raise(self) -> bytes:
        error = self._protocol.error
        if error is not None and not isinstance(error, ssl.SSLError):
            raise TransportError(f"connection to {self.host} broke: {error}") from error
        return b""

    def write(self, data: bytes) -> None:
        transport = self._protocol.transport
        if transport is None or transport.is_closing():
            raise TransportError(f"connection to {self.host} is closed")
        transport.write(data)

    async def drain(self) -> None:
        try:
            async with asyncio.timeout(self.read_timeout):
                await self._protocol.drain()
        except TimeoutError as exc:
            raise ReadTimeout(f"{self.host} stopped reading for {self.read_timeout:g}s") from exc

    async def start_tls(
        self, ctx: ssl.SSLContext, server_hostname: str, handshake_timeout: float
    ) -> None:
        """Upgrade to TLS after the server's STLS ``+OK``.

        Any byte already received at this point was sent in plaintext after the
        server agreed to start TLS, which is the response-injection attack:
        refuse rather than ever treat it as protected.
        """
        protocol = self._protocol
        if protocol.chunks or protocol.buffered:
            raise TlsError(
                f"{self.host} sent {protocol.buffered} plaintext bytes after agreeing to "
                "STLS (possible injection by a man in the middle); aborting"
            )
        transport = protocol.transport
        if transport is None or protocol.eof:
            raise TransportError(f"connection to {self.host} closed before STLS")
        loop = asyncio.get_running_loop()
        try:
            new_transport = await loop.start_tls(
                transport,
                protocol,
                ctx,
                server_hostname=server_hostname,
                ssl_handshake_timeout=handshake_timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            raise TlsError(
                f"TLS certificate of {self.host} rejected: {exc.verify_message}"
            ) from exc
        except ssl.SSLError as exc:
            # Plaintext where the handshake should be is the injection signature.
            raise TlsError(f"STLS handshake with {self.host} failed: {exc}") from exc
        except TimeoutError as exc:
            raise ConnectTimeout(
                f"STLS handshake with {self.host} took longer than {handshake_timeout:g}s"
            ) from exc
        except ConnectionError as exc:
            raise TransportError(f"STLS handshake with {self.host} failed: {exc}") from exc
        if new_transport is None:
            raise TlsError(f"STLS handshake with {self.host} failed: connection closed")
        protocol.transport = new_transport

    def tls_info(self) -> TlsInfo | None:
        transport = self._protocol.transport
        if transport is None:
            return None
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        cert = ssl_object.getpeercert() or {}
        subject = ", ".join(
            f"{key}={value}" for rdn in cert.get("subject", ()) for key, value in rdn
        )
        cipher = ssl_object.cipher()
        return TlsInfo(ssl_object.version(), cipher[0] if cipher else None, subject or None)

    def abort(self) -> None:
        """Drop the connection at once, without any further protocol exchange."""
        transport = self._protocol.transport
        if transport is not None:
            transport.abort()

    async def close(self) -> None:
        transport = self._protocol.transport
        if transport is None:
            return
        transport.close()
        # Give the TLS close_notify a moment; never wait long for a peer.
        for _ in range(20):
            if self._protocol.eof:
                break
            await asyncio.sleep(0.005)
        if not transport.is_closing():
            transport.abort()
