"""OAuth2 access tokens for SASL XOAUTH2 and OAUTHBEARER.

``TokenManager`` turns an account's refresh token into access tokens at the
account's token endpoint (RFC 6749 §6), keeps each one in memory and in a
private cache file (``state_dir/oauth/ACCOUNT.json``) until shortly before it
expires, and refreshes at most once per account at a time.  An account with
``oauth.access_token`` (typically ``{command: [...]}``) gets a fresh value
from that source for every session instead.

No log line or exception built here contains a token, a client secret or a
token endpoint's response body: failures name the account, the endpoint's
host and the OAuth2 error code.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog

from gpopd.config import Account, OAuth
from gpopd.errors import AuthError, ConfigError, TlsError, TransportError
from gpopd.secrets import SecretSource
from gpopd.tokencache import (
    cache_owner,
    lifetime,
    number,
    read_cache,
    store_token,
    token_status,
    write_private_file,
)
from gpopd.transport import make_tls_context

log = structlog.get_logger("gpopd.oauth")

# Refresh when less than this is left (never more than half a token's life).
REFRESH_MARGIN = 300.0
REQUEST_TIMEOUT = 30.0
# Background refresh: retry a failed refresh after 30 s, doubling up to 15 min;
# look again for a replaced refresh token an hour after it was refused.
RETRY_MIN = 30.0
RETRY_MAX = 900.0
REVOKED_RECHECK = 3600.0
MAX_SLEEP = 3600.0
# A token the endpoint could not replace is still handed out with this much left.
MIN_TOKEN_LEFT = 60.0
MIN_SLEEP = 0.5
# How much of an endpoint's error_description is shown.
MAX_DESCRIPTION = 200


class OAuthError(AuthError):
    """The token endpoint refused the request for good (bad client, bad grant...).

    Needs a person: retrying with the same credentials will fail the same way.
    """

    def __init__(self, account: str, message: str) -> None:
        super().__init__("OAuth2 token request", message)
        self.account = account
        # ServerError formats a POP3 reply; this error is not one.
        self.args = (f"{account}: {message}",)

    def __str__(self) -> str:
        return str(self.args[0])


class TokenRevokedError(OAuthError):
    """``invalid_grant``: the refresh token expired or was revoked; re-authorize."""


class TokenUnavailableError(TransportError):
    """No access token now (endpoint unreachable, 5xx, a token command failed): retry later."""


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    obtained_at: float
    expires_at: float

    def fresh(self, now: float) -> bool:
        margin = min(REFRESH_MARGIN, (self.expires_at - self.obtained_at) / 2)
        return now < self.expires_at - margin

    @property
    def refresh_due(self) -> float:
        return self.expires_at - min(REFRESH_MARGIN, (self.expires_at - self.obtained_at) / 2)


# -- SASL payloads ------------------------------------------------------------


def xoauth2_payload(user: str, token: str) -> str:
    """The base64 initial response of SASL XOAUTH2 (Google's format)."""
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode("utf-8")).decode("ascii")


def oauthbearer_payload(user: str, token: str, host: str, port: int) -> str:
    """The base64 initial response of SASL OAUTHBEARER (RFC 7628 §3.1)."""
    # RFC 5801 saslname: "," and "=" would end the authzid early.
    authzid = user.replace("=", "=3D").replace(",", "=2C")
    raw = f"n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode("utf-8")).decode("ascii")


# -- the token endpoint -------------------------------------------------------------


def _require_oauth(account: Account) -> OAuth:
    if account.oauth is None:
        raise ConfigError(f"accounts.{account.name}: no oauth section")
    return account.oauth


def _scrub(text: str, hidden: Iterable[str]) -> str:
    for value in hidden:
        if value:
            text = text.replace(value, "***")
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return text[:MAX_DESCRIPTION]


async def token_request(
    account_name: str,
    oauth: OAuth,
    form: Mapping[str, str],
    *,
    time_limit: float = REQUEST_TIMEOUT,
) -> dict[str, Any]:
    """POST ``form`` to the token endpoint; the JSON answer of a 200 with an access token.

    Raises ``TokenRevokedError`` for ``invalid_grant``, ``OAuthError`` for
    other refusals, ``TlsError`` for an untrusted endpoint and
    ``TokenUnavailableError`` for everything worth retrying later.
    """
    host = urlsplit(oauth.token_url).hostname or oauth.token_url
    hidden = [v for k, v in form.items() if k not in ("grant_type", "client_id")]
    try:
        async with httpx.AsyncClient(
            verify=make_tls_context(oauth.ca_file),
            timeout=time_limit,
            # No proxy variables or ~/.netrc: the request carries credentials.
            trust_env=False,
            follow_redirects=False,
        ) as client:
            response = await client.post(
                oauth.token_url, data=dict(form), headers={"Accept": "application/json"}
            )
    except httpx.TimeoutException:
        raise TokenUnavailableError(
            f"{account_name}: token endpoint {host} did not answer within {time_limit:g}s"
        ) from None
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        if "CERTIFICATE_VERIFY_FAILED" in reason or "SSL" in reason:
            raise TlsError(f"{account_name}: token endpoint {host}: TLS failed: {reason}") from None
        raise TokenUnavailableError(
            f"{account_name}: cannot reach token endpoint {host}: {reason}"
        ) from None
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if status >= 500 or status == 429:
        raise TokenUnavailableError(
            f"{account_name}: token endpoint {host} answered HTTP {status}; will retry"
        )
    if not isinstance(body, dict):
        raise TokenUnavailableError(
            f"{account_name}: token endpoint {host} answered HTTP {status} without JSON"
        )
    if status != 200:
        error = _scrub(str(body.get("error", "")), hidden) or f"HTTP {status}"
        description = _scrub(str(body.get("error_description", "")), hidden)
        said = f"{error}: {description}" if description else error
        if body.get("error") == "invalid_grant":
            raise TokenRevokedError(
                account_name,
                f"the refresh token was expired or revoked ({said}); "
                f"run `gpopd auth {account_name}` again",
            )
        raise OAuthError(account_name, f"token endpoint {host} refused the request ({said})")
    token = body.get("access_token")
    if not isinstance(token, str) or not token or any(ch in token for ch in "\r\n\0\x01"):
        raise OAuthError(account_name, f"token endpoint {host} answered without an access token")
    return body


def _fingerprint(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


class TokenManager:
    """Access tokens of every OAuth account: cached, refreshed ahead of expiry."""

    def __init__(
        self,
        state_dir: Path,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.state_dir = Path(state_dir)
        self._environ = os.environ if environ is None else environ
        self._clock = clock
        self._timeout = timeout
        self._tokens: dict[str, _Token] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Fingerprint of a refresh token the endpoint called invalid_grant:
        # it is not sent again, but a replaced one is tried at once.
        self._refused: dict[str, str] = {}

    # -- public -----------------------------------------------------------------

    async def access_token(self, account: Account) -> str:
        """A valid access token for ``account``, refreshed first if it expires soon."""
        oauth = _require_oauth(account)
        if oauth.access_token is not None:
            return await self._from_source(account, oauth.access_token)
        async with self._lock(account.name):
            token = self._current(account, oauth)
            if token is not None and token.fresh(self._clock()):
                return token.value
            try:
                return await self._refresh_locked(account, oauth)
            except TokenUnavailableError as exc:
                # Refreshing early is a courtesy: a token with time left still works.
                if token is None or token.expires_at <= self._clock() + MIN_TOKEN_LEFT:
                    raise
                log.warning("oauth refresh failed; using the current token", error=str(exc))
                return token.value

    async def refresh(self, account: Account, *, rejected: str | None = None) -> str:
        """A new access token after the server refused ``rejected`` (``None``: always refresh).

        When another caller has replaced ``rejected`` meanwhile, that newer
        token is returned without another request.
        """
        oauth = _require_oauth(account)
        if oauth.access_token is not None:
            return await self._from_source(account, oauth.access_token)
        async with self._lock(account.name):
            token = self._current(account, oauth)
            if (
                rejected is not None
                and token is not None
                and token.value != rejected
                and token.expires_at > self._clock()
            ):
                return token.value
            self._tokens.pop(account.name, None)
            return await self._refresh_locked(account, oauth)

    async def run_background(self, accounts: Iterable[Account]) -> None:
        """Refresh each refresh-token account's access token ahead of expiry, forever."""
        chosen = [a for a in accounts if a.oauth is not None and a.oauth.refresh_token is not None]
        retry_at: dict[str, float] = {}
        backoff: dict[str, float] = {}
        while chosen:
            wake = self._clock() + MAX_SLEEP
            for account in chosen:
                now = self._clock()
                due = retry_at.get(account.name, self._due(account))
                if due <= now:
                    try:
                        await self.access_token(account)
                    except TokenRevokedError as exc:
                        log.error("oauth refresh refused", account=account.name, error=str(exc))
                        retry_at[account.name] = now + REVOKED_RECHECK
                    except (OAuthError, TransportError, ConfigError) as exc:
                        delay = min(backoff.get(account.name, RETRY_MIN / 2) * 2, RETRY_MAX)
                        backoff[account.name] = delay
                        retry_at[account.name] = now + delay
                        log.warning(
                            "oauth refresh failed",
                            account=account.name,
                            error=str(exc),
                            retry_in=delay,
                        )
                    else:
                        retry_at.pop(account.name, None)
                        backoff.pop(account.name, None)
                    due = retry_at.get(account.name, self._due(account))
                wake = min(wake, due)
            await asyncio.sleep(max(wake - self._clock(), MIN_SLEEP))

    def token_info(self, account_name: str) -> dict[str, float | None]:
        """Expiry and age of an account's tokens for ``gpopd status``; never a token."""
        info = token_status(self.state_dir, account_name)
        token = self._tokens.get(account_name)
        if token is not None:
            info["access_token_obtained_at"] = token.obtained_at
            info["access_token_expires_at"] = token.expires_at
        return info

    def forget(self, account_name: str) -> None:
        """Drop the in-memory token of an account (the cache file stays)."""
        self._tokens.pop(account_name, None)

    # -- internals ----------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _due(self, account: Account) -> float:
        oauth = _require_oauth(account)
        token = self._current(account, oauth)
        return 0.0 if token is None else token.refresh_due

    def _current(self, account: Account, oauth: OAuth) -> _Token | None:
        token = self._tokens.get(account.name)
        if token is None:
            data = read_cache(self.state_dir, account.name)
            value = data.get("access_token")
            obtained = number(data, "access_token_obtained_at")
            expires = number(data, "access_token_expires_at")
            if (
                data.get("owner") == cache_owner(account, oauth)
                and isinstance(value, str)
                and value
                and obtained is not None
                and expires is not None
            ):
                token = _Token(value, obtained, expires)
                self._tokens[account.name] = token
        return token

    async def _secret(self, account: Account, key: str, source: SecretSource) -> str:
        # Read again each time: `gpopd auth` may have replaced the refresh
        # token since the configuration was loaded.
        try:
            value = await asyncio.to_thread(source.resolve, self._environ)
        except ConfigError as exc:
            raise TokenUnavailableError(f"{account.name}: oauth.{key}: {exc}") from None
        return value.get_secret_value()

    async def _from_source(self, account: Account, source: SecretSource) -> str:
        return await self._secret(account, "access_token", source)

    async def _refresh_locked(self, account: Account, oauth: OAuth) -> str:
        assert oauth.refresh_token is not None  # noqa: S101 - OAuth's validator ensures it
        refresh_token = await self._secret(account, "refresh_token", oauth.refresh_token)
        fingerprint = _fingerprint(refresh_token)
        if self._refused.get(account.name) == fingerprint:
            raise TokenRevokedError(
                account.name,
                "the refresh token was expired or revoked (refused before); "
                f"run `gpopd auth {account.name}` again",
            )
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": oauth.client_id or "",
        }
        if oauth.client_secret is not None:
            form["client_secret"] = await self._secret(
                account, "client_secret", oauth.client_secret
            )
        started = self._clock()
        try:
            response = await token_request(account.name, oauth, form, time_limit=self._timeout)
        except TokenRevokedError:
            self._refused[account.name] = fingerprint
            raise
        self._refused.pop(account.name, None)
        token = _Token(response["access_token"], started, started + lifetime(response))
        self._tokens[account.name] = token
        rotated = response.get("refresh_token")
        if isinstance(rotated, str) and rotated and rotated != refresh_token:
            self._keep_rotated(account, oauth, rotated)
        try:
            store_token(
                self.state_dir,
                account,
                response,
                started,
                new_refresh_token=isinstance(rotated, str) and rotated != refresh_token,
            )
        except OSError as exc:
            log.warning("oauth token cache not written", account=account.name, error=str(exc))
        log.info(
            "oauth access token refreshed",
            account=account.name,
            expires_in=round(token.expires_at - started),
        )
        return token.value

    def _keep_rotated(self, account: Account, oauth: OAuth, rotated: str) -> None:
        # Some providers replace the refresh token on every use: the old one
        # stops working, so the new one must be kept where the old one was.
        source = oauth.refresh_token
        if source is not None and source.file is not None:
            try:
                write_private_file(
                    source.file, rotated.encode("utf-8") + b"\n", owner_of=source.file
                )
            except OSError as exc:
                log.error("oauth new refresh token not saved", account=account.name, error=str(exc))
            return
        log.warning(
            "oauth token endpoint issued a new refresh token that cannot be saved "
            f"to a {source.kind if source else 'missing'} source; the old one may stop working",
            account=account.name,
        )
