"""The OAuth2 token cache: one private JSON file per account under ``state_dir/oauth``.

It holds the current access token and its expiry (so that a restart does not
cost a refresh) and when the refresh token was obtained and expires (written
by ``gpopd auth``, shown by ``gpopd status``).  Apart from the token itself,
everything in it may be shown; ``token_status`` returns only times.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpopd.config import Account, OAuth
from gpopd.durable import fsync_dir, write_all
from gpopd.privatefs import open_private

CACHE_DIR = "oauth"
CACHE_FORMAT = 1
# Without expires_in, RFC 6749 leaves the lifetime open; Google's is one hour.
DEFAULT_LIFETIME = 3600.0


def _owner_like(path: Path, reference: Path) -> None:
    """As root, give ``path`` to ``reference``'s owner (the daemon's user must read it)."""
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):
        st = reference.stat()
        if st.st_uid != 0:
            os.chown(path, st.st_uid, st.st_gid)


def write_private_file(path: Path, data: bytes, *, owner_of: Path | None = None) -> None:
    """Replace ``path`` atomically with ``data``, mode 0600 (tmp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if owner_of is not None:
            _owner_like(tmp, owner_of)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def cache_dir(state_dir: Path) -> Path:
    return Path(state_dir) / CACHE_DIR


def cache_path(state_dir: Path, account_name: str) -> Path:
    """Where the token cache of ``account_name`` lives."""
    return cache_dir(state_dir) / f"{account_name}.json"


def read_cache(state_dir: Path, account_name: str) -> dict[str, Any]:
    """The cache of one account, or ``{}`` when there is none or it is unreadable."""
    try:
        data = json.loads(cache_path(state_dir, account_name).read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return {}
    return data


def write_cache(state_dir: Path, account_name: str, data: Mapping[str, Any]) -> None:
    """Write one account's cache (the directory is created 0700)."""
    state_dir = Path(state_dir)
    directory = cache_dir(state_dir)
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        _owner_like(directory, state_dir)
    document = {**data, "format": CACHE_FORMAT}
    write_private_file(
        cache_path(state_dir, account_name),
        json.dumps(document, sort_keys=True).encode("utf-8"),
        owner_of=state_dir,
    )


def number(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def token_status(state_dir: Path, account_name: str) -> dict[str, float | None]:
    """What ``gpopd status`` may show about an account's tokens: times only, never a token."""
    data = read_cache(state_dir, account_name)
    return {
        key: number(data, key)
        for key in (
            "access_token_obtained_at",
            "access_token_expires_at",
            "last_refresh_at",
            "refresh_token_obtained_at",
            "refresh_token_expires_at",
        )
    }


def cache_owner(account: Account, oauth: OAuth) -> dict[str, str | None]:
    # A cached token belongs to one client, endpoint and user; after any of
    # them changed in the configuration it is not used.
    return {"token_url": oauth.token_url, "client_id": oauth.client_id, "user": account.username}


def store_token(
    state_dir: Path,
    account: Account,
    response: Mapping[str, Any],
    now: float,
    *,
    new_refresh_token: bool = False,
) -> None:
    """Record a token endpoint's successful response in the account's cache."""
    oauth = account.oauth
    assert oauth is not None  # noqa: S101 - only OAuth accounts have tokens
    data = read_cache(state_dir, account.name)
    if data.get("owner") != cache_owner(account, oauth):
        data = {}
    data.update(
        owner=cache_owner(account, oauth),
        access_token=response["access_token"],
        access_token_obtained_at=now,
        access_token_expires_at=now + lifetime(response),
        last_refresh_at=now,
    )
    if new_refresh_token:
        expires_in = number(response, "refresh_token_expires_in")
        data["refresh_token_obtained_at"] = now
        data["refresh_token_expires_at"] = None if expires_in is None else now + expires_in
    write_cache(state_dir, account.name, data)


def lifetime(response: Mapping[str, Any]) -> float:
    expires_in = number(response, "expires_in")
    return DEFAULT_LIFETIME if expires_in is None or expires_in <= 0 else expires_in
