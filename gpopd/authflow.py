"""``gpopd auth ACCOUNT``: obtain a refresh token with the installed-app flow.

The OAuth2 authorization code flow for native apps (RFC 8252) with PKCE
(RFC 7636, S256): gpopd listens on 127.0.0.1, prints the authorization URL,
the person consents in a browser, the browser is redirected to the listener
with a code, and gpopd exchanges the code for tokens.  On a headless server
the browser runs elsewhere and cannot reach the listener: the person pastes
the URL the browser ended on (or just the code) instead.

The refresh token is written where the account's ``refresh_token`` source
points when that is a file; for any other source gpopd writes it to a
private file in the state directory and prints what to do with it.  It is
shown on the terminal only with ``--print-token``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import html
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import parse_qs, urlencode, urlsplit

from gpopd.config import Account, OAuth
from gpopd.errors import ConfigError, GpopdError
from gpopd.oauth import token_request
from gpopd.status import format_span
from gpopd.tokencache import cache_dir, store_token, write_private_file

# How long the browser (or the person pasting) may take.
FLOW_TIMEOUT = 600.0
MAX_REQUEST_HEAD = 16 * 1024
# Google gives apps in "Testing" status refresh tokens that die after 7 days.
TESTING_HINT = (
    'the OAuth app looks like it is in "Testing" status, whose refresh tokens '
    "expire after 7 days; publish it (Google Cloud Console, OAuth consent screen: "
    "In production) and run `gpopd auth {account}` again, or repeat this before then"
)

PasteReader = Callable[[], Awaitable[str]]


class AuthFlowError(GpopdError):
    """The authorization did not complete: refused, wrong state, no answer in time."""


@dataclass(frozen=True, slots=True)
class AuthResult:
    stored_in: Path | None  # the refresh_token file written, if the source is a file
    pending_file: Path | None  # a private file holding the token for the person to move
    refresh_token_expires_at: float | None


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(64)  # 86 characters: RFC 7636 allows 43..128
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorization_url(oauth: OAuth, redirect_uri: str, challenge: str, state: str) -> str:
    """The URL the person opens in a browser to consent."""
    params = {
        "client_id": oauth.client_id or "",
        "redirect_uri": redirect_uri,
        "response_type": "code",
        "scope": oauth.scope,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": state,
        # A refresh token, and a new one even if the person consented before.
        "access_type": "offline",
        "prompt": "consent",
    }
    separator = "&" if urlsplit(oauth.auth_url).query else "?"
    return f"{oauth.auth_url}{separator}{urlencode(params)}"


def _page(title: str, text: str) -> bytes:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>gpopd</title></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>"
    ).encode()


def _code_from(params: Mapping[str, str], state: str) -> str:
    if "error" in params:
        raise AuthFlowError(f"the authorization was refused: {params['error'][:100]}")
    if not secrets.compare_digest(params.get("state", "").encode(), state.encode()):
        raise AuthFlowError(
            "the redirect carries another state than this request: refused (an old "
            "browser tab, or a forged redirect); run gpopd auth again"
        )
    code = params.get("code", "")
    if not code:
        raise AuthFlowError("the redirect carries no authorization code")
    return code


class _Listener:
    """The loopback redirect target: one HTTP GET with ``code`` and ``state``."""

    def __init__(self, state: str) -> None:
        self.state = state
        self.result: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(30):
                head = await reader.readuntil(b"\r\n\r\n")
            status, page = self._answer(head)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n"
                f"Content-Length: {len(page)}\r\nConnection: close\r\n\r\n".encode()
                + page
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[str, bytes]:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        target = urlsplit(parts[1]) if len(parts) == 3 and parts[0] == "GET" else None
        if target is None or target.path != "/" or self.result.done():
            return "404 Not Found", _page("Not found", "This is gpopd's authorization listener.")
        params = {k: v[0] for k, v in parse_qs(target.query).items()}
        try:
            code = _code_from(params, self.state)
        except AuthFlowError as exc:
            self.result.set_exception(exc)
            return "400 Bad Request", _page("Authorization failed", str(exc))
        self.result.set_result(code)
        return "200 OK", _page(
            "gpopd is authorized", "You can close this window and return to the terminal."
        )


def stdin_reader(stream: TextIO) -> PasteReader:
    """Read lines from ``stream`` without blocking the event loop.

    A daemon thread per line: a thread blocked in ``readline`` cannot be
    cancelled, and the executor's threads would keep ``asyncio.run`` from
    returning until the person pressed Enter.
    """

    async def read_line() -> str:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()

        def settle(line: str) -> None:
            if not future.done():
                future.set_result(line)

        def work() -> None:
            line = stream.readline()
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, line)

        threading.Thread(target=work, daemon=True).start()
        line = await future
        if not line:  # end of input: only the browser's redirect can finish now
            await loop.create_future()
        return line

    return read_line


async def _pasted_code(read_line: PasteReader, state: str, out: TextIO) -> str:
    while True:
        line = (await read_line()).strip()
        if not line:
            continue
        if "=" in line or line.startswith("http"):
            query = urlsplit(line).query or line
            params = {k: v[0] for k, v in parse_qs(query).items()}
            return _code_from(params, state)
        print("(a bare code: the state cannot be checked)", file=out)
        return line


async def run_flow(
    account: Account,
    state_dir: Path,
    *,
    environ: Mapping[str, str],
    out: TextIO,
    err: TextIO,
    port: int = 0,
    read_line: PasteReader | None = None,
    print_token: bool = False,
    wait_limit: float = FLOW_TIMEOUT,
) -> AuthResult:
    """Run the whole flow for ``account``; store the refresh token; return where it went."""
    oauth = account.oauth
    if oauth is None or oauth.refresh_token is None or oauth.client_id is None:
        raise ConfigError(
            f"accounts.{account.name}.oauth: gpopd auth needs client_id and a refresh_token "
            "source (where to store the token)"
        )
    verifier, challenge = _pkce()
    state = secrets.token_urlsafe(24)
    listener = _Listener(state)
    server = await asyncio.start_server(listener.handle, "127.0.0.1", port, limit=MAX_REQUEST_HEAD)
    waiters: list[asyncio.Future[str]] = []
    try:
        bound = server.sockets[0].getsockname()[1]
        redirect_uri = f"http://127.0.0.1:{bound}/"
        url = authorization_url(oauth, redirect_uri, challenge, state)
        print(f"Open this URL in a browser and allow access for {account.username}:\n", file=out)
        print(url, file=out)
        print("", file=out)
        print(f"Waiting for the browser's redirect to {redirect_uri} ...", file=out)
        waiters.append(listener.result)
        if read_line is not None:
            print(
                "If the browser runs on another machine, it ends on a page that cannot be "
                "loaded: paste that page's address (or the code) here and press Enter.",
                file=out,
            )
            waiters.append(asyncio.ensure_future(_pasted_code(read_line, state, out)))
        out.flush()
        done, _ = await asyncio.wait(waiters, timeout=wait_limit, return_when="FIRST_COMPLETED")
        if not done:
            raise AuthFlowError(f"no answer from the browser within {format_span(wait_limit)}")
        code = done.pop().result()
    finally:
        for waiter in waiters:
            if waiter is not listener.result:
                waiter.cancel()
        server.close()
        await server.wait_closed()

    form = {
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": verifier,
        "redirect_uri": redirect_uri,
        "client_id": oauth.client_id,
    }
    if oauth.client_secret is not None:
        try:
            secret = await asyncio.to_thread(oauth.client_secret.resolve, environ)
        except ConfigError as exc:
            raise ConfigError(f"accounts.{account.name}.oauth.client_secret: {exc}") from None
        form["client_secret"] = secret.get_secret_value()
    response = await token_request(account.name, oauth, form)
    refresh_token = response.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token or not refresh_token.isprintable():
        raise AuthFlowError(
            "the token endpoint sent no refresh token; remove gpopd's access in the "
            "account's security settings and run gpopd auth again"
        )
    now = time.time()
    granted = response.get("scope")
    if isinstance(granted, str) and oauth.scope not in granted.split():
        print(
            f"warning: access to {oauth.scope} was not granted; the mail server will refuse",
            file=err,
        )
    expires_at = None
    if isinstance(response.get("refresh_token_expires_in"), int | float):
        expires_at = now + float(response["refresh_token_expires_in"])
        left = format_span(expires_at - now)
        print(
            f"warning: this refresh token expires in {left}: "
            + TESTING_HINT.format(account=account.name),
            file=err,
        )
    store_token(state_dir, account, response, now, new_refresh_token=True)
    return _keep(
        account,
        oauth,
        refresh_token,
        state_dir=state_dir,
        out=out,
        print_token=print_token,
        expires_at=expires_at,
    )


def _keep(
    account: Account,
    oauth: OAuth,
    refresh_token: str,
    *,
    state_dir: Path,
    out: TextIO,
    print_token: bool,
    expires_at: float | None,
) -> AuthResult:
    source = oauth.refresh_token
    assert source is not None  # noqa: S101 - checked by run_flow
    data = refresh_token.encode("utf-8") + b"\n"
    if source.file is not None:
        path = source.file
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True)
        write_private_file(path, data, owner_of=path if path.exists() else path.parent)
        print(f"Refresh token written to {path} (mode 0600).", file=out)
        print("A running gpopd uses it from its next token refresh.", file=out)
        return AuthResult(path, None, expires_at)

    pending: Path | None = None
    if print_token:
        print(f"\nRefresh token (shown once, not logged):\n{refresh_token}\n", file=out)
        holder = "the token above"
    else:
        pending = cache_dir(state_dir) / f"{account.name}.refresh_token"
        write_private_file(pending, data, owner_of=state_dir)
        holder = str(pending)
        print(f"Refresh token written to {pending} (mode 0600).", file=out)
    print(f"The account's refresh_token comes from a {source.kind} source; now:", file=out)
    if source.credential is not None:
        name = source.credential
        print(
            f"  systemd-creds encrypt --name={name} {holder if pending else '-'} "
            f"/etc/credstore.encrypted/{name}\n"
            f"  and in gpopd.service: LoadCredentialEncrypted={name}:"
            f"/etc/credstore.encrypted/{name}",
            file=out,
        )
    elif source.env is not None:
        print(
            f"  set {source.env} to the content of {holder} (for example in a 0600 "
            "EnvironmentFile= of gpopd.service)",
            file=out,
        )
    elif source.command is not None:
        print(f"  store {holder} where the command {source.command[0]!r} reads it", file=out)
    else:
        print(
            f"  replace the inline refresh_token in the configuration with {holder}, or "
            "better point it at a file: refresh_token: {file: /etc/gpopd/ACCOUNT.token}",
            file=out,
        )
    if pending is not None:
        print(f"  then delete {pending} (shred -u {pending})", file=out)
    print("  and restart or reload gpopd.", file=out)
    return AuthResult(None, pending, expires_at)
