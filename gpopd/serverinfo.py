"""``gpopd serverinfo``: what a server offers, without changing anything on it.

The connection is made exactly as a poll makes it (same TLS context, STLS
rules and login), so a problem seen here is the problem a poll would meet.
After login it asks only CAPA and STAT, then QUITs: no RETR, TOP or DELE,
because Gmail marks every message retrieved in a QUIT-ended session as
downloaded, and the point of this command is to look, not to touch.

The session keeps the capabilities announced before login, and CAPA is
asked again after it: both are shown, because RFC 2449 lets values such as
``LOGIN-DELAY`` and ``EXPIRE`` change once the user is known.  OAuth2
accounts get their access token as a poll does (cached, or refreshed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gpopd import pop3
from gpopd.config import Account
from gpopd.login import BEARER_METHODS, TokenSource, open_session, token_manager
from gpopd.session import TraceHook
from gpopd.status import format_bytes, format_span, printable
from gpopd.store import AccountLock

__all__ = ["ServerInfo", "render", "server_info"]

Capabilities = Mapping[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class ServerInfo:
    account: str
    host: str
    port: int
    tls_mode: str
    greeting: str
    tls_version: str | None
    cipher: str | None
    certificate_subject: str | None
    auth_method: str
    capabilities_before: Capabilities = field(default_factory=dict)
    capabilities_after: Capabilities = field(default_factory=dict)
    message_count: int = 0
    mailbox_size: int = 0
    # Seconds between logins the server asks for (RFC 2449 LOGIN-DELAY).
    login_delay: int | None = None
    # Days the server keeps retrieved mail: digits, "NEVER", or None when not
    # advertised.  "0" means it may delete whatever was retrieved (Gmail).
    expire: str | None = None


def _capability_value(caps: Capabilities, tag: str) -> str | None:
    # A trailing "USER" only says the value may differ once logged in.
    params = [p for p in caps.get(tag, ()) if p.upper() != "USER"]
    return params[0] if params else None


def _effective(before: Capabilities, after: Capabilities, tag: str) -> str | None:
    """The post-login value when the server gives one, else the pre-login one."""
    value = _capability_value(after, tag)
    return value if value is not None else _capability_value(before, tag)


def _login_delay(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _expire(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.upper()
    return value if value == "NEVER" or value.isdigit() else None


async def server_info(
    account: Account, trace: TraceHook | None = None, *, state_dir: Path | None = None
) -> ServerInfo:
    """Connect and log in as a poll would, then CAPA, STAT and QUIT.

    With ``state_dir``, the account's lock is held for the session, so that it
    never runs alongside a poll of the same account (the server would answer
    one of them ``[IN-USE]``); a poll in progress makes it fail with
    ``StoreError`` instead.
    """
    if state_dir is None:
        return await _server_info(account, trace, None)
    tokens = token_manager(state_dir) if account.auth in BEARER_METHODS else None
    with AccountLock(state_dir, account.name):
        return await _server_info(account, trace, tokens)


async def _server_info(
    account: Account, trace: TraceHook | None, tokens: TokenSource | None
) -> ServerInfo:
    session = await open_session(account, trace, tokens)
    transport = session.transport
    try:
        greeting = session.greeting
        if greeting is None:
            raise pop3.RemoteProtocolError("no greeting")
        before, after = session.pre_login_capabilities, await session.capa()
        method = session.login_method or account.auth
        stat = await session.request(pop3.Stat())
        if not isinstance(stat, pop3.StatReply):
            raise pop3.RemoteProtocolError(f"unexpected reply to STAT: {stat!r}")
        tls = transport.tls_info()
        await session.quit()
    except BaseException:
        transport.abort()
        raise
    return ServerInfo(
        account=account.name,
        host=account.host,
        port=account.effective_port,
        tls_mode=account.tls,
        greeting=f"[{greeting.code}] {greeting.text}" if greeting.code else greeting.text,
        tls_version=tls.version if tls else None,
        cipher=tls.cipher if tls else None,
        certificate_subject=tls.peer_subject if tls else None,
        auth_method=method,
        capabilities_before=before,
        capabilities_after=after,
        message_count=stat.count,
        mailbox_size=stat.size,
        login_delay=_login_delay(_effective(before, after, "LOGIN-DELAY")),
        expire=_expire(_effective(before, after, "EXPIRE")),
    )


def _capability_lines(caps: Capabilities, other: Capabilities, marker: str) -> list[str]:
    if not caps:
        return ["    (none: the server does not answer CAPA)"]
    lines = []
    for tag, params in caps.items():
        changed = marker if other.get(tag) != params else " "
        lines.append(printable(f"  {changed} {' '.join((tag, *params))}"))
    return lines


def render(info: ServerInfo) -> str:
    """A readable report; ``+``/``-`` mark capabilities gained or lost by logging in."""
    tls_modes = {"implicit": "implicit TLS", "starttls": "STLS", "none": "no TLS"}
    lines = [
        f"account       {printable(info.account)}",
        f"server        {printable(info.host)}:{info.port} "
        f"({tls_modes.get(info.tls_mode, info.tls_mode)})",
        f"greeting      {printable(info.greeting)}",
    ]
    if info.tls_version is not None:
        lines.append(f"TLS           {info.tls_version}, {info.cipher or 'unknown cipher'}")
        lines.append(f"certificate   {printable(info.certificate_subject or '(no subject)')}")
    else:
        lines.append("TLS           none: the password and the mail travel in plaintext")
    lines += [
        f"login         {info.auth_method}",
        f"messages      {info.message_count} ({format_bytes(info.mailbox_size)})",
    ]
    if info.login_delay is not None:
        lines.append(
            f"LOGIN-DELAY   {info.login_delay} s: the server wants at least "
            f"{format_span(info.login_delay)} between logins; poll_interval should not be shorter"
        )
    if info.expire == "0":
        lines.append(
            "EXPIRE        0: the server may delete retrieved messages itself, whatever `keep` says"
        )
    elif info.expire == "NEVER":
        lines.append("EXPIRE        NEVER: messages stay until deleted")
    elif info.expire is not None:
        lines.append(
            f"EXPIRE        {info.expire}: retrieved messages stay at least that many days"
        )
    lines.append("capabilities before login:")
    lines += _capability_lines(info.capabilities_before, info.capabilities_after, "-")
    lines.append("capabilities after login:")
    lines += _capability_lines(info.capabilities_after, info.capabilities_before, "+")
    return "\n".join(lines) + "\n"
