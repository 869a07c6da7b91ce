"""No password, token or client secret in any output of any gpopd command.

Every command a user runs (poll with --trace at debug level, a failing
poll, status in both formats, serverinfo, check-config) runs as a child
process; everything it prints or logs, plus the log file and the state
directory's text, is searched for each secret's value and for the base64
forms in which a secret travels on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from pathlib import Path

from tests.support.certs import TestPKI
from tests.support.gmailpop import GmailPop
from tests.support.tokenserver import TokenServer

MESSAGE = b"From: bob@example.org\nTo: alice@gmail.com\nSubject: hi\n\nhello\n"


async def gpopd(*args: str) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gpopd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out + err


def secret_file(directory: Path, name: str, value: str) -> Path:
    path = directory / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def wire_forms(user: str, secret: str) -> list[bytes]:
    """The secret itself and the SASL payloads that carry it."""
    forms = [secret.encode()]
    for raw in (
        f"\0{user}\0{secret}",
        f"user={user}\x01auth=Bearer {secret}\x01\x01",
    ):
        forms.append(base64.b64encode(raw.encode()))
    return forms


async def test_no_secret_in_any_output(pki: TestPKI, tmp_path: Path) -> None:
    """Passwords, client secret, refresh and access tokens appear in no command's output."""
    with TokenServer(pki.server_cert, pki.server_key) as tokens:
        async with GmailPop(pki, token_valid=tokens.valid) as server:
            server.add(MESSAGE)
            refresh = tokens.issue_refresh_token()
            wrong = "Wr0ng-app-password-zz"
            client_secret = tokens.client_secret or ""
            log_file = tmp_path / "gpopd.log"
            lines = [
                f"state_dir: {tmp_path / 'state'}",
                f"log_file: {log_file}",
                "accounts:",
            ]
            accounts = {
                "pw": (
                    "auto",
                    f"password: {{file: {secret_file(tmp_path, 'pw.secret', server.password)}}}",
                ),
                "bad": (
                    "user",
                    f"password: {{file: {secret_file(tmp_path, 'bad.secret', wrong)}}}",
                ),
                "oauth": ("xoauth2", None),
            }
            for name, (auth, password_line) in accounts.items():
                lines += [
                    f"  {name}:",
                    "    host: 127.0.0.1",
                    f"    port: {server.port}",
                    f"    ca_file: {server.ca_file}",
                    f"    username: {server.username}",
                    f"    auth: {auth}",
                    "    timeout: 10s",
                ]
                if password_line:
                    lines.append(f"    {password_line}")
                else:
                    lines += [
                        "    oauth:",
                        f"      client_id: {tokens.client_id}",
                        f"      client_secret: {{file: {secret_file(tmp_path, 'cs', client_secret)}}}",  # noqa: E501
                        f"      refresh_token: {{file: {secret_file(tmp_path, 'rt', refresh)}}}",
                        f"      token_url: {tokens.token_url}",
                        f"      ca_file: {pki.ca_file}",
                    ]
                lines += [
                    "    delivery:",
                    "      type: maildir",
                    f"      path: {tmp_path / name / 'Maildir'}",
                ]
            config = tmp_path / "gpopd.yaml"
            config.write_text("\n".join(lines) + "\n")
            config.chmod(0o600)
            c = str(config)

            outputs: dict[str, bytes] = {}
            code, outputs["poll"] = await gpopd(
                "poll", "--config", c, "--trace", "--log-level", "debug"
            )
            assert code == 75  # the account with the wrong password fails
            assert b"Username and password not accepted" in outputs["poll"]
            code, outputs["poll-json"] = await gpopd("poll", "--config", c, "pw", "oauth")
            assert code == 0
            for args in (("status",), ("status", "--json"), ("check-config",)):
                _, outputs[" ".join(args)] = await gpopd(*args, "--config", c)
            code, outputs["serverinfo"] = await gpopd(
                "serverinfo", "--config", c, "--trace", "--log-level", "debug", "oauth"
            )
            assert code == 0, outputs["serverinfo"][-2000:]  # serverinfo logs in with OAuth2
            assert b"AUTH XOAUTH2" in outputs["poll"]  # the OAuth2 login was traced
            assert b"oauth" in outputs["status"]
            outputs["log file"] = log_file.read_bytes()
            for path in (tmp_path / "state").rglob("*"):
                if path.is_file() and not path.name.startswith("gpopd.db"):
                    outputs[str(path)] = path.read_bytes()

    secrets = [
        *wire_forms(server.username, server.password),
        *wire_forms(server.username, wrong),
        *wire_forms(server.username, refresh),
        client_secret.encode(),
    ]
    for token in tokens.issued_access:
        secrets += wire_forms(server.username, token)
    assert tokens.issued_access, "no access token was issued"
    for where, text in outputs.items():
        for secret in secrets:
            if where.endswith(".json") and secret in {t.encode() for t in tokens.issued_access}:
                continue  # the 0600 token cache holds the access token on purpose
            assert secret not in text, f"a secret appears in {where}"
