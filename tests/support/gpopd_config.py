"""Write gpopd configuration files for tests and benchmarks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AccountSpec:
    name: str
    port: int
    username: str
    password: str
    maildir: Path
    host: str = "127.0.0.1"
    tls: str = "implicit"
    ca_file: Path | None = None
    keep: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    # YAML lines of another delivery (indented under "delivery:"); default Maildir.
    delivery: list[str] | None = None


def write_config(directory: Path, accounts: list[AccountSpec], **top: Any) -> Path:
    """A 0600 YAML config with each password in its own 0600 file."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"state_dir: {top.pop('state_dir', directory / 'state')}"]
    for key, value in top.items():
        lines.append(f"{key}: {value}")
    lines.append("accounts:")
    for acc in accounts:
        secret = directory / f"{acc.name}.password"
        secret.write_text(acc.password + "\n")
        os.chmod(secret, 0o600)
        lines += [
            f"  {acc.name}:",
            f"    host: {acc.host}",
            f"    port: {acc.port}",
            f"    tls: {acc.tls}",
            f"    username: {acc.username}",
            f"    password: {{file: {secret}}}",
            f"    keep: {'true' if acc.keep else 'false'}",
        ]
        if acc.ca_file is not None:
            lines.append(f"    ca_file: {acc.ca_file}")
        if acc.tls == "none":
            lines.append("    allow_plaintext: true")
        for key, value in acc.extra.items():
            lines.append(f"    {key}: {value}")
        delivery = acc.delivery or ["type: maildir", f"path: {acc.maildir}"]
        lines += ["    delivery:", *(f"      {line}" for line in delivery)]
    path = directory / "gpopd.yaml"
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return path


def write_account_yaml(directory: Path, account_lines: str) -> Path:
    """A config with one account ``a`` (never contacted) and ``account_lines`` appended to it.

    For tests of what the loader builds from the lines; the password comes
    from the environment variable PW.
    """
    path = directory / "gpopd.yaml"
    path.write_text(
        f"state_dir: {directory / 'state'}\n"
        "accounts:\n"
        "  a:\n"
        "    host: pop.example.test\n"
        "    username: u\n"
        "    password: {env: PW}\n"
        f"{account_lines}"
    )
    path.chmod(0o600)
    return path


def maildir_contents(maildir: Path) -> list[bytes]:
    """Every delivered message (new/ and cur/), sorted, for multiset comparison."""
    found = []
    for sub in ("new", "cur"):
        directory = maildir / sub
        if directory.is_dir():
            found += [entry.read_bytes() for entry in directory.iterdir()]
    return sorted(found)
