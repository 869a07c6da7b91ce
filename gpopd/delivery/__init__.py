"""Destinations: where fetched messages are delivered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpopd.delivery.base import (
    CommitResult,
    Destination,
    MessageInfo,
    Staged,
    Writer,
    account_tag,
    message_key,
)
from gpopd.delivery.maildir import MaildirDestination

__all__ = [
    "CommitResult",
    "Destination",
    "MessageInfo",
    "Staged",
    "Writer",
    "account_tag",
    "build_destination",
    "message_key",
]


def build_destination(delivery: Any) -> Destination:
    """The destination an account's validated ``delivery:`` section describes."""
    kind = delivery.type
    if kind == "maildir":
        return MaildirDestination(Path(delivery.path))
    raise ValueError(f"unknown delivery type {kind!r}")
