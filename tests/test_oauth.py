"""OAuth2 access tokens: refresh, cache, concurrency, errors, secrecy, configuration."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from gpopd import logs
from gpopd.config import Account, load_config
from gpopd.errors import AuthError, ConfigError, TlsError, TransportError
from gpopd.oauth import (
    TokenManager,
    TokenRevokedError,
    TokenUnavailableError,
    oauthbearer_payload,
    xoauth2_payload,
)
from gpopd.tokencache import cache_path
from tests.support.certs import TestPKI
from tests.support.tokenserver import TokenServer, write_config


@pytest.fixture
def server(pki: TestPKI) -> Iterator[TokenServer]:
    """A token endpoint with the trusted test certificate."""
    with TokenServer(pki.server_cert, pki.server_key) as token_server:
        yield token_server


def account_of(path: Path, environ: dict[str, str] | None = None) -> Account:
    return load_config(path, environ=environ or {}).accounts["alice"]


def problems_of(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ or {})
    return "\n".join(caught.value.problems)


# -- refresh and cache ------------------------------------------------------------------


async def test_refresh_then_cache_survives_a_new_manager(
    tmp_path: Path, server: TokenServer, pki: TestPKI
) -> None:
    """The first token costs one refresh; a new manager reuses it from the 0600 cache file."""
    account = account_of(write_config(tmp_path, server, pki))
    first = await TokenManager(tmp_path / "state").access_token(account)
    assert server.valid(first)
    assert server.counts["refresh_token"] == 1

    cache = cache_path(tmp_path / "state", "alice")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    assert json.loads(cache.read_text())["access_token"] == first

    again = await TokenManager(tmp_path / "state").access_token(account)
    assert again == first
    assert server.counts["refresh_token"] == 1


async def test_refresh_ahead_of_expiry(tmp_path: Path, server: TokenServer, pki: TestPKI) -> None:
    """A token is reused until less than five minutes are left, then replaced early."""
    server.lifetime = 3600
    account = account_of(write_config(tmp_path, server, pki))
    now = [1_000_000.0]
    manager = TokenManager(tmp_path / "state", clock=lambda: now[0])
    first = await manager.access_token(account)
    now[0] += 3600 - 301
    assert await manager.access_token(account) == first
    now[0] += 2
    second = await manager.access_token(account)
    assert second != first
    assert server.counts["refresh_token"] == 2
    info = manager.token_info("alice")
    assert info["access_token_expires_at"] == pytest.approx(now[0] + 3600)
    assert "ya29" not in json.dumps(info)


async def test_early_refresh_failure_keeps_the_current_token(
    tmp_path: Path, server: TokenServer, pki: TestPKI
) -> None:
    """An endpoint that fails while the token has minutes left costs nothing; at the end it does."""
    account = account_of(write_config(tmp_path, server, pki))
    now = [1_000_000.0]
    manager = TokenManager(tmp_path / "state", clock=lambda: now[0])
    first = await manager.access_token(account)
    server.fail_status = 500
    now[0] += 3600 - 200
    assert await manager.access_token(account) == first
    now[0] += 170
    with pytest.raises(TokenUnavailableError):
        await manager.access_token(account)


async def test_concurrent_callers_share_one_refresh(
    tmp_path: Path, server: TokenServer, pki: TestPKI
) -> None:
    """Twenty sessions asking at once cause one request and all get the same token."""
    account = account_of(write_config(tmp_path, server, pki))
    manager = TokenManager(tmp_path / "state")
    tokens = await asyncio.gather(*(manager.access_token(account) for _ in range(20)))
    assert len(set(tokens)) == 1
    assert server.counts["refresh_token"] == 1


async def test_forced_refresh_after_rejection_happens_once(
    tmp_path: Path, server: TokenServer, pki: TestPKI
) -> None:
    """Callers reporting the same rejected token share one refresh; a later report reuses it."""
    account = account_of(write_config(tmp_path, server, pki))
    manager = TokenManager(tmp_path / "state")
    rejected = await manager.access_token(account)
    server.expire(rejected)
    fresh = await asyncio.gather(*(manager.refresh(account, rejected=rejected) for _ in range(5)))
    assert len(set(fresh)) == 1
    assert fresh[0] != rejected
    assert server.valid(fresh[0])
    assert server.counts["refresh_token"] == 2
    assert await manager.refresh(account, rejected=rejected) == fresh[0]
    assert server.counts["refresh_token"] == 2
    assert await manager.refresh(account) != fresh[0]  # no rejected token: always refresh
    assert server.counts["refresh_token"] == 3


async def test_background_refresh_keeps_a_valid_token(
    tmp_path: Path, server: TokenServer, pki: TestPKI
) -> None:
    """run_background replaces short-lived tokens before they expire, without any caller."""
    server.lifetime = 2
    account = account_of(write_config(tmp_path, server, pki))
    manager = TokenManager(tmp_path / "state")
    task = asyncio.create_task(manager.run_background([account]))
    try:
        async with asyncio.timeout(15):
            while server.counts["refresh_token"] < 4:  # noqa: ASYNC110 - another thread counts
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    cached = json.loads(cache_path(tmp_path / "state", "alice").read_text())
    assert server.valid(cached["access_token"])


# -- failures --------------------------------------------------------------------------


async def test_invalid_grant_says_to_run_gpopd_auth_and_is_not_retried(
    tmp_path: Path, server: TokenServer, pki: TestPKI
) -> None:
    """A revoked refresh token is a permanent AuthError naming `gpopd auth alice`, asked once."""
    refresh_token = server.issue_refresh_token()
    account = account_of(write_config(tmp_path, server, pki, refresh_token=refresh_token))
    server.revoke(refresh_token)
    manager = TokenManager(tmp_path / "state")
    with pytest.raises(TokenRevokedError) as caught:
        await manager.access_token(account)
    assert isinstance(caught.value, AuthError)
    assert "expired or revoked" in str(caught.value)
    assert "gpopd auth alice" in str(caught.value)
    with pytest.raises(TokenRevokedError):
        await manager.access_token(account)
    assert server.counts["refresh_token"] == 1

    # A new refresh token in the same file is picked up without a reload.
    (tmp_path / "refresh_token").write_text(server.issue_refresh_token() + "\n")
    assert server.valid(await manager.access_token(account))


async def test_server_error_and_stall_are_temporary(
    tmp_path: Path, server: TokenServer, pki: TestPKI
) -> None:
    """HTTP 500 and an endpoint that never answers raise a TransportError (retry later)."""
    account = account_of(write_config(tmp_path, server, pki))
    server.fail_status = 500
    with pytest.raises(TokenUnavailableError, match="HTTP 500") as caught:
        await TokenManager(tmp_path / "state").access_token(account)
    assert isinstance(caught.value, TransportError)

    server.fail_status = None
    server.stall = True
    with pytest.raises(TokenUnavailableError, match="did not answer"):
        await TokenManager(tmp_path / "state", timeout=0.5).access_token(account)
    server.unstall()


async def test_untrusted_certificate_is_refused(tmp_path: Path, pki: TestPKI) -> None:
    """An endpoint whose certificate the configured CA did not sign gets no credentials."""
    with TokenServer(pki.untrusted_cert, pki.untrusted_key) as untrusted:
        account = account_of(write_config(tmp_path, untrusted, pki))
        with pytest.raises(TlsError, match="CERTIFICATE_VERIFY_FAILED"):
            await TokenManager(tmp_path / "state").access_token(account)
        assert untrusted.counts["requests"] == 0


@pytest.fixture
def captured_logs(tmp_path: Path) -> Iterator[Path]:
    """Every log line (gpopd's and the HTTP client's, at debug) into a file."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    path = tmp_path / "log.txt"
    with path.open("w", encoding="utf-8") as stream:
        logs.configure(fmt="json", level="debug", stream=stream)
        yield path
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in logs._installed:
        handler.close()
    logs._installed.clear()
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    structlog.reset_defaults()


async def test_no_token_or_secret_in_logs_or_errors(
    tmp_path: Path, server: TokenServer, pki: TestPKI, captured_logs: Path
) -> None:
    """Refreshes, rejections, revocation and 500s log and raise without any secret value."""
    refresh_token = server.issue_refresh_token()
    account = account_of(write_config(tmp_path, server, pki, refresh_token=refresh_token))
    manager = TokenManager(tmp_path / "state")
    errors: list[str] = []
    first = await manager.access_token(account)
    await manager.refresh(account, rejected=first)
    server.fail_status = 503
    for call in (manager.refresh(account), manager.run_background([account])):
        try:
            async with asyncio.timeout(2):
                await call
        except (TransportError, AuthError, TimeoutError) as exc:
            errors.append(repr(exc) + str(exc))
    server.fail_status = None
    server.revoke(refresh_token)
    with pytest.raises(TokenRevokedError) as caught:
        await manager.refresh(account)
    errors.append(repr(caught.value) + str(caught.value))

    text = captured_logs.read_text() + "\n".join(errors)  # noqa: ASYNC240 - small file
    assert "oauth access token refreshed" in text  # the log really was captured
    assert "HTTP 503" in text
    secrets = [refresh_token, str(server.client_secret), *server.issued_access]
    assert len(server.issued_access) == 2
    for value in secrets:
        assert value not in text


async def test_access_token_command_runs_for_every_session(
    tmp_path: Path, server: TokenServer, pki: TestPKI
) -> None:
    """oauth.access_token: {command: ...} is run again for each token, nothing is cached."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    script = (
        f"import pathlib; p = pathlib.Path({str(counter)!r}); n = int(p.read_text()) + 1; "
        "p.write_text(str(n)); print(f'ya29.command-token-{n}')"
    )
    path = write_config(
        tmp_path,
        server,
        pki,
        oauth_lines=[f"access_token: {{command: [{sys.executable}, -c, {json.dumps(script)}]}}"],
    )
    account = account_of(path)
    assert counter.read_text() == "1"  # validated once at load
    manager = TokenManager(tmp_path / "state")
    assert await manager.access_token(account) == "ya29.command-token-2"
    assert await manager.access_token(account) == "ya29.command-token-3"
    assert await manager.refresh(account, rejected="ya29.command-token-3") == "ya29.command-token-4"
    assert not cache_path(tmp_path / "state", "alice").exists()
    assert server.counts["requests"] == 0


# -- SASL payloads ----------------------------------------------------------------------


def test_xoauth2_payload_matches_googles_example() -> None:
    """The XOAUTH2 response is byte for byte the example in Google's documentation."""
    payload = xoauth2_payload(
        "someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
    )
    assert payload == (
        "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52"
        "YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
    )


def test_oauthbearer_payload_follows_rfc_7628() -> None:
    """The OAUTHBEARER response has the gs2 header, host, port and bearer token of RFC 7628."""
    payload = oauthbearer_payload("user@example.com", "vF9dft4qmTc2", "server.example.com", 143)
    assert base64.b64decode(payload) == (
        b"n,a=user@example.com,\x01host=server.example.com\x01port=143"
        b"\x01auth=Bearer vF9dft4qmTc2\x01\x01"
    )
    odd = base64.b64decode(oauthbearer_payload("a,b=c", "t", "h", 1))
    assert odd.startswith(b"n,a=a=2Cb=3Dc,\x01")


# -- configuration ----------------------------------------------------------------------


def test_oauth_account_loads_with_defaults(
    tmp_path: Path, server: TokenServer, pki: TestPKI
) -> None:
    """An OAuth2 account loads; scope and auth_url default to Google's."""
    account = account_of(write_config(tmp_path, server, pki, auth="oauthbearer"))
    assert account.auth == "oauthbearer"
    assert account.oauth is not None
    assert account.oauth.scope == "https://mail.google.com/"
    assert account.oauth.auth_url == "https://accounts.google.com/o/oauth2/v2/auth"


@pytest.mark.parametrize(
    ("auth", "oauth_lines", "expected"),
    [
        ("xoauth2", None, "accounts.alice.oauth: auth: xoauth2 needs an oauth section"),
        ("plain", ["client_id: x", "refresh_token: {env: RT}"], "accounts.alice.oauth: oauth is"),
        ("xoauth2", ["client_id: x"], "accounts.alice.oauth.refresh_token: needs refresh_token"),
        ("xoauth2", ["refresh_token: {env: RT}"], "accounts.alice.oauth.client_id: refresh_token"),
        (
            "xoauth2",
            ["client_id: x", "refresh_token: {env: RT}", "token_url: http://oauth.example/t"],
            "accounts.alice.oauth.token_url: must start with https://",
        ),
        (
            "xoauth2",
            ["client_id: x", "refresh_token: {env: RT}", "auth_url: ftp://oauth.example/"],
            "accounts.alice.oauth.auth_url: must be a URL",
        ),
        (
            "xoauth2",
            ["access_token: {env: AT}", "refresh_token: {env: RT}"],
            "accounts.alice.oauth.access_token: give either",
        ),
    ],
)
def test_invalid_oauth_configurations(  # noqa: PLR0917 - fixtures and parameters
    tmp_path: Path, server: TokenServer, pki: TestPKI, auth: str, oauth_lines: Any, expected: str
) -> None:
    """Each inconsistent OAuth2 setting is refused with the key it is about."""
    path = write_config(tmp_path, server, pki, auth=auth, oauth_lines=oauth_lines or [])
    if oauth_lines is None:
        text = path.read_text().replace("    oauth:\n", "")
        path.write_text(text)
        path.chmod(0o600)
    found = problems_of(path, {"RT": "1//x", "AT": "ya29.x"})
    assert expected in found


def test_loopback_http_endpoint_is_allowed(
    tmp_path: Path, server: TokenServer, pki: TestPKI
) -> None:
    """http:// is accepted for a token endpoint on 127.0.0.1, ::1 or localhost only."""
    lines = ["client_id: x", "refresh_token: {env: RT}", "token_url: http://127.0.0.1:8080/token"]
    account = account_of(write_config(tmp_path, server, pki, oauth_lines=lines), {"RT": "1//x"})
    assert account.oauth is not None
    assert account.oauth.token_url == "http://127.0.0.1:8080/token"


def test_inline_oauth_secrets_need_a_private_file(
    tmp_path: Path, server: TokenServer, pki: TestPKI
) -> None:
    """Inline client_secret/refresh_token in a group-readable file are refused, from env not."""
    lines = ["client_id: x", 'client_secret: "cs-inline"', 'refresh_token: "1//inline"']
    path = write_config(tmp_path, server, pki, oauth_lines=lines, mode=0o644)
    found = problems_of(path)
    assert "accounts.alice.oauth.client_secret: inline secret in a file readable by others" in found
    assert "accounts.alice.oauth.refresh_token: inline secret" in found
    assert "cs-inline" not in found
    assert "1//inline" not in found

    lines = ["client_id: x", "refresh_token: {file: /nonexistent}"]
    path = write_config(tmp_path, server, pki, oauth_lines=lines, mode=0o644)
    environ = {"GPOPD_ACCOUNTS__ALICE__OAUTH__REFRESH_TOKEN": "0123"}
    account = account_of(path, environ)
    assert account.oauth is not None
    assert account.oauth.refresh_token is not None
    assert account.oauth.refresh_token.secret.get_secret_value() == "0123"
