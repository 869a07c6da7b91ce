"""Connecting to a POP3 server and logging in, with a password or OAuth2.

A session is opened over implicit TLS, STARTTLS or (when allowed) plain
TCP, and authenticated with USER/PASS, AUTH PLAIN or a SASL bearer
mechanism.  OAuth2 code (and httpx with it) is imported only when an
account uses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import structlog

from gpopd.config import Account
from gpopd.errors import AuthError, TokenRejectedError
from gpopd.session import Session, TraceHook
from gpopd.transport import Transport, make_tls_context

log = structlog.get_logger("gpopd.login")


class TokenSource(Protocol):
    """Where OAuth2 access tokens come from (``gpopd.oauth.TokenManager``)."""

    async def access_token(self, account: Account) -> str: ...

    async def refresh(self, account: Account, *, rejected: str | None = None) -> str: ...

    async def run_background(self, accounts: Sequence[Account]) -> None: ...


def token_manager(state_dir: Path, environ: Mapping[str, str] | None = None) -> TokenSource:
    """The OAuth2 token manager; imported only when an account uses OAuth2."""
    from gpopd.oauth import TokenManager  # noqa: PLC0415 - keeps httpx out of other polls

    return TokenManager(state_dir, environ=environ)


async def open_session(
    account: Account, trace: TraceHook | None = None, tokens: TokenSource | None = None
) -> Session:
    """Connect, verify TLS, read the greeting and authenticate.

    Capabilities may change after login (Gmail adds PIPELINING); asking for
    them again is left to the caller, so that ``Session.mailbox()`` can send
    that CAPA together with STAT, UIDL and LIST.

    With OAuth2, a token the server refuses is refreshed once and tried in a
    new session before the account is reported as failing.
    """
    if account.auth not in BEARER_METHODS:
        return await _open_session(account, trace, None)
    if tokens is None:
        raise AuthError("AUTH", f"auth: {account.auth} needs OAuth2 tokens", "AUTH")
    token = await tokens.access_token(account)
    try:
        return await _open_session(account, trace, token)
    except TokenRejectedError as exc:
        log.warning("the server refused the access token; refreshing it", status=exc.status)
        token = await tokens.refresh(account, rejected=token)
    return await _open_session(account, trace, token)


async def _open_session(account: Account, trace: TraceHook | None, token: str | None) -> Session:
    tls_ctx = make_tls_context(account.ca_file) if account.tls != "none" else None
    transport = await Transport.connect(
        account.host,
        account.effective_port,
        tls=tls_ctx if account.tls == "implicit" else None,
        connect_timeout=account.connect_timeout,
        read_timeout=account.timeout,
    )
    session = Session(transport, trace=trace)
    try:
        await session.read_greeting()
        if tls_ctx is not None and account.tls == "starttls":
            await session.starttls(tls_ctx, account.host, account.connect_timeout)
        caps = session.pre_login_capabilities = await session.capa()
        if token is not None:
            await session.login_bearer(account.auth.upper(), bearer_payload(account, token))
            session.login_method = account.auth
        else:
            password = account.password.secret.get_secret_value() if account.password else ""
            session.login_method = await session.login(
                account.username, password, account.auth, caps
            )
    except BaseException:
        transport.abort()
        raise
    return session


BEARER_METHODS = ("xoauth2", "oauthbearer")


def bearer_payload(account: Account, token: str) -> str:
    """The base64 SASL response for ``account.auth`` with ``token``."""
    from gpopd.oauth import oauthbearer_payload, xoauth2_payload  # noqa: PLC0415 - lazy

    if account.auth == "oauthbearer":
        return oauthbearer_payload(account.username, token, account.host, account.effective_port)
    return xoauth2_payload(account.username, token)
