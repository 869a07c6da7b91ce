"""A local HTTPS OAuth2 authorization server for tests: token endpoint and consent.

``TokenServer`` listens on 127.0.0.1 with a test certificate and answers
``POST /token`` for the ``refresh_token`` and ``authorization_code`` grants
the way Google's endpoint does: JSON access tokens with ``expires_in``,
``400 {"error": "invalid_grant", ...}`` for an expired or revoked refresh
token or a bad code, PKCE (S256) checked against the challenge of the
authorization request.  Tests can expire and revoke tokens, make the
endpoint answer 500 or stall, and count requests.  ``valid(token)`` tells a
mail server whether an access token is currently good.

``authorize(url)`` plays the browser and the consent screen: it reads the
authorization URL ``gpopd auth`` printed, issues a code and (by default)
performs the GET to the loopback redirect with the code and the state.
``write_config`` writes a gpopd configuration with one OAuth2 account using it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import ssl
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit

if TYPE_CHECKING:
    from tests.support.certs import TestPKI

INVALID_GRANT = {
    "error": "invalid_grant",
    "error_description": "Token has been expired or revoked.",
}
STALL_LIMIT = 30.0


def pkce_challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        # The handshake happens here, in the request's own thread, so that a
        # client refusing the certificate never blocks the accept loop.
        self.request.settimeout(10)
        self.request = self.server.owner.ssl_context.wrap_socket(self.request, server_side=True)
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.request.close()  # the TLS wrapper; socketserver closes only the raw socket

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length", "0"))
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        status, body = owner.handle(self.path, form)
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: TokenServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a refused handshake or a client gone mid-request is expected


class TokenServer:
    """An OAuth2 token endpoint on 127.0.0.1 (thread-safe; use as a context manager)."""

    def __init__(
        self,
        certfile: Path,
        keyfile: Path,
        *,
        client_id: str = "1234-test.apps.example.com",
        client_secret: str | None = "test-client-secret-Qx7",  # noqa: S107 - test value
        lifetime: float = 3600.0,
        refresh_token_expires_in: int | None = None,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.lifetime = lifetime
        # Google sends this for apps in "Testing" status (604799 s: 7 days).
        self.refresh_token_expires_in = refresh_token_expires_in
        self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ssl_context.load_cert_chain(str(certfile), str(keyfile))
        self.fail_status: int | None = None
        self.stall = False
        self.counts: Counter[str] = Counter()
        self.issued_access: list[str] = []
        self.last_page = ""
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._refresh: dict[str, bool] = {}  # refresh token -> revoked
        self._access: dict[str, float] = {}  # access token -> expires_at (time.time)
        self._codes: dict[str, dict[str, str]] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> TokenServer:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def auth_url(self) -> str:
        return f"{self.base_url}/auth"

    # -- what tests control and inspect ----------------------------------------------

    def issue_refresh_token(self) -> str:
        token = "1//0g" + secrets.token_urlsafe(70)
        with self._lock:
            self._refresh[token] = False
        return token

    def revoke(self, refresh_token: str) -> None:
        """Revoke a refresh token and every access token (as a password change does)."""
        with self._lock:
            self._refresh[refresh_token] = True
            self._access.clear()

    def expire(self, access_token: str | None = None) -> None:
        """Expire one access token, or every one."""
        with self._lock:
            if access_token is None:
                self._access.clear()
            else:
                self._access.pop(access_token, None)

    def valid(self, token: str) -> bool:
        """Whether ``token`` is an access token that is neither expired nor revoked."""
        with self._lock:
            expires_at = self._access.get(token)
        return expires_at is not None and time.time() < expires_at

    def unstall(self) -> None:
        self.stall = False
        self._release.set()

    # -- the endpoint ------------------------------------------------------------------

    def handle(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        grant = form.get("grant_type", "")
        with self._lock:
            self.counts["requests"] += 1
            self.counts[grant] += 1
        if self.stall:
            self._release.wait(STALL_LIMIT)
        if self.fail_status is not None:
            return self.fail_status, {"error": "internal_failure"}
        if path != "/token":
            return 404, {"error": "not_found"}
        if form.get("client_id") != self.client_id or (
            self.client_secret is not None and form.get("client_secret") != self.client_secret
        ):
            return 401, {"error": "invalid_client", "error_description": "Unauthorized"}
        if grant == "refresh_token":
            with self._lock:
                revoked = self._refresh.get(form.get("refresh_token", ""), True)
            if revoked:
                return 400, INVALID_GRANT
            return 200, self._issue()
        if grant == "authorization_code":
            with self._lock:
                request = self._codes.pop(form.get("code", ""), None)
            if (
                request is None
                or form.get("redirect_uri") != request["redirect_uri"]
                or pkce_challenge(form.get("code_verifier", "")) != request["challenge"]
            ):
                return 400, {"error": "invalid_grant", "error_description": "Bad Request"}
            body = self._issue()
            body["refresh_token"] = self.issue_refresh_token()
            body["scope"] = request["scope"]
            if self.refresh_token_expires_in is not None:
                body["refresh_token_expires_in"] = self.refresh_token_expires_in
            return 200, body
        return 400, {"error": "unsupported_grant_type"}

    def _issue(self) -> dict[str, Any]:
        token = "ya29.a0" + secrets.token_urlsafe(150)
        with self._lock:
            self._access[token] = time.time() + self.lifetime
            self.issued_access.append(token)
        return {
            "access_token": token,
            "expires_in": int(self.lifetime),
            "token_type": "Bearer",
            "scope": "https://mail.google.com/",
        }

    # -- the browser ---------------------------------------------------------------------

    def authorize(self, url: str, *, follow: bool = True, state: str | None = None) -> str:
        """Consent to the authorization request ``url``; return the redirect URL.

        With ``follow`` the redirect is also performed (GET on the loopback
        listener) and the page it answered is kept in ``last_page``;
        ``state`` replaces the request's state, to test that a mismatch is refused.
        """
        parts = urlsplit(url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        expected = urlsplit(self.auth_url)
        if (parts.scheme, parts.netloc, parts.path) != (
            expected.scheme,
            expected.netloc,
            expected.path,
        ):
            raise AssertionError(f"not this server's authorization URL: {url}")
        if query.get("client_id") != self.client_id:
            raise AssertionError("authorization URL with another client_id")
        if query.get("response_type") != "code" or query.get("code_challenge_method") != "S256":
            raise AssertionError("authorization URL without response_type=code and S256 PKCE")
        code = "4/0A" + secrets.token_urlsafe(40)
        with self._lock:
            self._codes[code] = {
                "challenge": query["code_challenge"],
                "redirect_uri": query["redirect_uri"],
                "scope": query.get("scope", ""),
            }
        params = {
            "state": query.get("state", "") if state is None else state,
            "code": code,
            "scope": query.get("scope", ""),
        }
        redirect = f"{query['redirect_uri']}?{urlencode(params)}"
        if follow:
            self.last_page = browse(redirect)
        return redirect


def browse(url: str) -> str:
    """GET ``url`` like a browser would (plain HTTP on loopback); the page, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback test URL
            return str(response.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            return str(exc.read().decode("utf-8", "replace"))


def write_config(
    tmp_path: Path,
    server: TokenServer,
    pki: TestPKI,
    *,
    refresh_token: str | None = None,
    oauth_lines: list[str] | None = None,
    auth: str = "xoauth2",
    mode: int = 0o600,
) -> Path:
    """A configuration with one OAuth2 account, its secrets in 0600 files."""
    secret = tmp_path / "client_secret"
    secret.write_text(f"{server.client_secret}\n")
    secret.chmod(0o600)
    if oauth_lines is None:
        token_file = tmp_path / "refresh_token"
        token_file.write_text(f"{refresh_token or server.issue_refresh_token()}\n")
        token_file.chmod(0o600)
        oauth_lines = [
            f"client_id: {server.client_id}",
            f"client_secret: {{file: {secret}}}",
            f"refresh_token: {{file: {token_file}}}",
            f"token_url: {server.token_url}",
            f"ca_file: {pki.ca_file}",
        ]
    lines = [
        f"state_dir: {tmp_path / 'state'}",
        "accounts:",
        "  alice:",
        "    host: 127.0.0.1",
        "    username: alice@example.com",
        f"    auth: {auth}",
        "    oauth:",
        *(f"      {line}" for line in oauth_lines),
        "    delivery:",
        "      type: maildir",
        f"      path: {tmp_path / 'Maildir'}",
    ]
    path = tmp_path / "gpopd.yaml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(mode)
    return path
