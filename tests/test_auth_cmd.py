"""`gpopd auth ACCOUNT` end to end: a real subprocess, the local token server as Google."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpopd.config import Account, load_config
from gpopd.errors import EX_OK, EX_TEMPFAIL
from gpopd.oauth import TokenManager
from gpopd.tokencache import cache_path
from tests.support.certs import TestPKI
from tests.support.tokenserver import TokenServer, write_config

TIMEOUT = 60


@pytest.fixture
def server(pki: TestPKI) -> Iterator[TokenServer]:
    """A token endpoint with the trusted test certificate."""
    with TokenServer(pki.server_cert, pki.server_key) as token_server:
        yield token_server


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


class AuthProcess:
    """``gpopd auth alice`` running in a subprocess, its URL read from stdout."""

    def __init__(self, config: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpopd", "auth", "alice", "--config", str(config), *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        self.head: list[str] = []

    def url(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.head.append(line)
            if line.startswith(prefix):
                return line.strip()
        raise AssertionError(f"no authorization URL printed: {self.finish()}")

    def finish(self, stdin: str | None = None) -> Finished:
        out, err = self.proc.communicate(stdin, timeout=TIMEOUT)
        return Finished(self.proc.returncode, "".join(self.head) + out, err)


def run_gpopd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpopd", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_loopback_flow_stores_refresh_token_and_status_shows_its_age(
    tmp_path: Path, server: TokenServer, pki: TestPKI
) -> None:
    """The browser's redirect completes the flow; the token file is 0600 and works."""
    config = write_config(tmp_path, server, pki, oauth_lines=_oauth_lines(tmp_path, server, pki))
    auth = AuthProcess(config)
    url = auth.url(server.auth_url)
    assert "access_type=offline" in url
    assert "prompt=consent" in url
    assert "redirect_uri=http%3A%2F%2F127.0.0.1%3A" in url
    server.authorize(url)
    done = auth.finish()
    assert done.returncode == EX_OK, done.stderr
    assert "gpopd is authorized" in server.last_page

    token_file = tmp_path / "refresh_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    refresh_token = token_file.read_text().strip()
    assert refresh_token.startswith("1//")
    assert refresh_token not in done.stdout + done.stderr
    assert server.counts["authorization_code"] == 1

    # The stored token works, and the access token from the exchange was cached.
    account = load_config(config, environ={}).accounts["alice"]
    cached = json.loads(cache_path(tmp_path / "state", "alice").read_text())
    assert server.valid(cached["access_token"])
    assert cached["refresh_token_expires_at"] is None
    assert server.valid(_refreshed(tmp_path, account))

    shown = run_gpopd("status", "--config", str(config))
    assert shown.returncode == EX_OK, shown.stderr
    assert "OAuth2 tokens" in shown.stdout
    table = shown.stdout.split("OAuth2 tokens\n", 1)[1].splitlines()
    assert table[0].split()[:4] == ["ACCOUNT", "ACCESS", "TOKEN", "LAST"]
    assert table[1].split()[:4] == ["alice", "expires", "in", "59m"]
    assert table[1].split()[-1] == "-"  # no known end
    assert table[1].split()[-2].endswith("s")  # the refresh token is seconds old


def _oauth_lines(tmp_path: Path, server: TokenServer, pki: TestPKI, source: str = "") -> list[str]:
    secret = tmp_path / "client_secret"
    secret.write_text(f"{server.client_secret}\n")
    secret.chmod(0o600)
    return [
        f"client_id: {server.client_id}",
        f"client_secret: {{file: {secret}}}",
        f"refresh_token: {source or '{file: ' + str(tmp_path / 'refresh_token') + '}'}",
        f"token_url: {server.token_url}",
        f"auth_url: {server.auth_url}",
        f"ca_file: {pki.ca_file}",
    ]


def _refreshed(tmp_path: Path, account: Account) -> str:
    return asyncio.run(TokenManager(tmp_path / "state").refresh(account))


def test_paste_fallback_accepts_the_redirected_url(
    tmp_path: Path, server: TokenServer, pki: TestPKI
) -> None:
    """With --paste, the URL the browser ended on, typed into stdin, completes the flow."""
    config = write_config(tmp_path, server, pki, oauth_lines=_oauth_lines(tmp_path, server, pki))
    auth = AuthProcess(config, "--paste")
    redirect = server.authorize(auth.url(server.auth_url), follow=False)
    done = auth.finish(f"\n{redirect}\n")
    assert done.returncode == EX_OK, done.stderr
    assert (tmp_path / "refresh_token").read_text().startswith("1//")
    assert server.counts["authorization_code"] == 1


def test_state_mismatch_is_refused(tmp_path: Path, server: TokenServer, pki: TestPKI) -> None:
    """A redirect with another state is answered with an error page and exchanges nothing."""
    config = write_config(tmp_path, server, pki, oauth_lines=_oauth_lines(tmp_path, server, pki))
    auth = AuthProcess(config)
    server.authorize(auth.url(server.auth_url), state="forged-state")
    done = auth.finish()
    assert done.returncode == EX_TEMPFAIL
    assert "state" in done.stderr
    assert "Authorization failed" in server.last_page
    assert server.counts["authorization_code"] == 0
    assert not (tmp_path / "refresh_token").exists()


def test_testing_status_warning_and_status_alert(
    tmp_path: Path, server: TokenServer, pki: TestPKI
) -> None:
    """refresh_token_expires_in warns about "Testing" status; status warns a day before."""
    server.refresh_token_expires_in = 86400
    config = write_config(tmp_path, server, pki, oauth_lines=_oauth_lines(tmp_path, server, pki))
    auth = AuthProcess(config)
    server.authorize(auth.url(server.auth_url))
    done = auth.finish()
    assert done.returncode == EX_OK, done.stderr
    assert '"Testing" status' in done.stderr
    assert "expires in 1d" in done.stderr

    shown = run_gpopd("status", "--json", "--config", str(config))
    assert shown.returncode == EX_OK, shown.stderr
    oauth = json.loads(shown.stdout)["accounts"][0]["oauth"]
    assert oauth["source"] == "refresh_token"
    assert 0 <= oauth["refresh_token_age"] < 120
    assert oauth["warning"].startswith("refresh token expires in 23h")
    assert "ya29" not in shown.stdout
    assert "1//" not in shown.stdout


def test_credential_source_gets_instructions_not_the_token(
    tmp_path: Path, server: TokenServer, pki: TestPKI
) -> None:
    """For a systemd credential the token goes to a private file and the steps are printed."""
    lines = _oauth_lines(tmp_path, server, pki, source="{credential: alice.refresh_token}")
    config = write_config(tmp_path, server, pki, oauth_lines=lines)
    auth = AuthProcess(config)
    server.authorize(auth.url(server.auth_url))
    done = auth.finish()
    assert done.returncode == EX_OK, done.stderr
    pending = tmp_path / "state" / "oauth" / "alice.refresh_token"
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600
    token = pending.read_text().strip()
    assert token not in done.stdout + done.stderr
    assert f"systemd-creds encrypt --name=alice.refresh_token {pending}" in done.stdout

    auth = AuthProcess(config, "--print-token")
    server.authorize(auth.url(server.auth_url))
    done = auth.finish()
    assert done.returncode == EX_OK, done.stderr
    second = next(line for line in done.stdout.splitlines() if line.startswith("1//"))
    assert done.stdout.count(second) == 1
    assert second not in done.stderr
