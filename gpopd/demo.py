"""``gpopd demo``: a complete poll against a POP3S server on 127.0.0.1.

The server here is a small, honest POP3 implementation (RFC 1939 with CAPA,
UIDL, PIPELINING and SASL PLAIN) holding generated sample messages, with a
certificate made on the spot by ``openssl`` for 127.0.0.1.  The poll goes
through the same configuration loader, TLS verification, fetch and Maildir
delivery as a real account: only the server is local.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import ssl
import subprocess
import sys
from email.utils import formatdate
from pathlib import Path

from gpopd.daemon import Daemon
from gpopd.errors import EX_OK, EX_SOFTWARE, EX_TEMPFAIL
from gpopd.fetch import protocol_tracer
from gpopd.sdnotify import Notifier

DEMO_USER = "demo@example.test"


def sample_messages(count: int) -> list[bytes]:
    """Plausible mail with the cases that trip naive clients (dot lines, UTF-8)."""
    messages = []
    for i in range(1, count + 1):
        body = (
            f"Hello from the gpopd demo, message {i} of {count}.\n"
            ".A line that starts with a dot survives dot-stuffing.\n"
            "Grüße, ça va? 8-bit text is stored byte for byte.\n"
        )
        messages.append(
            (
                f"From: Demo Sender <sender@example.test>\n"
                f"To: {DEMO_USER}\n"
                f"Subject: gpopd demo message {i}\n"
                f"Date: {formatdate(localtime=False)}\n"
                f"Message-ID: <demo-{i}-{secrets.token_hex(4)}@example.test>\n"
                "MIME-Version: 1.0\n"
                "Content-Type: text/plain; charset=utf-8\n"
                "Content-Transfer-Encoding: 8bit\n"
                "\n" + body
            ).encode()
        )
    return messages


class DemoPop3Server:
    """A minimal RFC 1939 server over TLS for one user, kept in memory."""

    def __init__(self, messages: list[bytes], password: str) -> None:
        self.messages: dict[int, bytes] = dict(enumerate(messages, start=1))
        self.uids = {n: f"demo-{n:06d}" for n in self.messages}
        self.password = password
        self._server: asyncio.Server | None = None

    async def start(self, ssl_ctx: ssl.SSLContext) -> int:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0, ssl=ssl_ctx)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        deleted: set[int] = set()
        user: str | None = None
        authed = False

        def send(line: str) -> None:
            writer.write(line.encode() + b"\r\n")

        send("+OK gpopd demo server ready")
        try:
            while line := await reader.readline():
                words = line.decode("utf-8", "replace").strip().split(" ")
                verb, args = words[0].upper(), words[1:]
                live = {n: m for n, m in self.messages.items() if n not in deleted}
                if verb == "CAPA":
                    send("+OK capability list follows")
                    for cap in ("USER", "UIDL", "TOP", "PIPELINING", "RESP-CODES", "SASL PLAIN"):
                        send(cap)
                    send(".")
                elif verb == "QUIT":
                    for n in deleted:
                        self.messages.pop(n, None)
                    send("+OK bye")
                    await writer.drain()
                    break
                elif not authed:
                    if verb == "USER" and args:
                        user = args[0]
                        send("+OK send PASS")
                    elif verb == "PASS" and user is not None:
                        authed = user == DEMO_USER and " ".join(args) == self.password
                        send("+OK welcome" if authed else "-ERR [AUTH] invalid credentials")
                    elif verb == "AUTH" and args and args[0].upper() == "PLAIN":
                        if len(args) > 1:  # RFC 5034 initial response
                            answer = args[1].encode()
                        else:
                            send("+ ")
                            await writer.drain()
                            answer = (await reader.readline()).strip()
                        try:
                            _, name, secret = base64.b64decode(answer, validate=True).split(b"\0")
                        except ValueError:
                            name = secret = b""
                        authed = name.decode() == DEMO_USER and secret.decode() == self.password
                        send("+OK welcome" if authed else "-ERR [AUTH] invalid credentials")
                    else:
                        send("-ERR not authenticated")
                elif verb == "STAT":
                    send(f"+OK {len(live)} {sum(len(m) for m in live.values())}")
                elif verb in ("LIST", "UIDL"):

                    def item(n: int, verb: str = verb) -> str:
                        return (
                            f"{n} {len(self.messages[n])}"
                            if verb == "LIST"
                            else f"{n} {self.uids[n]}"
                        )

                    if args:
                        n = int(args[0]) if args[0].isdigit() else 0
                        send(f"+OK {item(n)}" if n in live else "-ERR no such message")
                    else:
                        send("+OK")
                        for n in sorted(live):
                            send(item(n))
                        send(".")
                elif verb == "RETR" and args and args[0].isdigit() and int(args[0]) in live:
                    send("+OK message follows")
                    body = live[int(args[0])].replace(b"\r\n", b"\n").split(b"\n")
                    if body and body[-1] == b"":
                        body.pop()
                    for content in body:
                        writer.write(
                            (b"." if content.startswith(b".") else b"") + content + b"\r\n"
                        )
                    send(".")
                elif verb == "DELE" and args and args[0].isdigit() and int(args[0]) in live:
                    deleted.add(int(args[0]))
                    send("+OK marked")
                elif verb == "RSET":
                    deleted.clear()
                    send("+OK")
                elif verb == "NOOP":
                    send("+OK")
                else:
                    send("-ERR unknown command or no such message")
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl tool."""
    cert, key = directory / "demo-cert.pem", directory / "demo-key.pem"
    if cert.exists() and key.exists():
        return cert, key
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the demo needs the `openssl` command (apt-get install openssl)")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "30", "-subj", "/CN=gpopd demo",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    os.chmod(key, 0o600)
    return cert, key


def write_config(directory: Path, port: int, cert: Path, password_file: Path) -> Path:
    config = directory / "gpopd.yaml"
    config.write_text(
        "# Written by `gpopd demo`; a real configuration looks like config/gpopd.example.yaml\n"
        f"state_dir: {directory / 'state'}\n"
        "accounts:\n"
        "  demo:\n"
        "    host: 127.0.0.1\n"
        f"    port: {port}\n"
        "    tls: implicit\n"
        f"    ca_file: {cert}\n"
        f"    username: {DEMO_USER}\n"
        f"    password: {{file: {password_file}}}\n"
        "    keep: false\n"
        "    poll_interval: 10s\n"
        "    delivery:\n"
        "      type: maildir\n"
        f"      path: {directory / 'Maildir'}\n"
    )
    os.chmod(config, 0o600)
    return config


def run_demo(directory: Path, count: int, *, trace: bool = False) -> int:
    directory = directory.resolve()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = make_certificate(directory)
    password = secrets.token_urlsafe(18)
    password_file = directory / "demo.password"
    password_file.write_text(password + "\n")
    os.chmod(password_file, 0o600)

    async def main() -> int:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        server = DemoPop3Server(sample_messages(count), password)
        port = await server.start(ctx)
        try:
            config = write_config(directory, port, cert, password_file)
            # The same service code as `gpopd run`, stopped after one poll.
            daemon = Daemon(
                config,
                os.environ,
                notifier=Notifier({}),
                trace=protocol_tracer() if trace else None,
                once=True,
            )
            await daemon.run()
        finally:
            await server.stop()
        result = daemon.results["demo"]
        maildir = directory / "Maildir"
        stored = len(list((maildir / "new").iterdir())) if (maildir / "new").is_dir() else 0
        out = sys.stderr
        print(
            f"\ngpopd demo: {result.delivered} message(s) delivered "
            f"({result.bytes} bytes, outcome {result.outcome}).\n"
            f"  Maildir:  {maildir}  ({stored} file(s) in new/)\n"
            f"  Config:   {config}\n"
            f"  State:    {directory / 'state'}\n"
            f"Look at the mail with:  mutt -f {maildir}   or   ls -l {maildir}/new\n"
            "Run `gpopd demo` again: a fresh server, and gpopd records every UIDL it\n"
            "delivered, so messages with those UIDLs are skipped, never stored twice.",
            file=out,
        )
        if result.error is not None:
            return EX_TEMPFAIL
        return EX_OK if result.ok else EX_SOFTWARE

    return asyncio.run(main())
