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
from gpopd.delivery.lmtp import LmtpDestination
from gpopd.delivery.maildir import MaildirDestination
from gpopd.delivery.mbox import MboxDestination
from gpopd.delivery.mda import MdaDestination
from gpopd.delivery.smtp import SmtpDestination

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
    if kind == "mbox":
        return MboxDestination.from_config(delivery)
    if kind == "mda":
        return MdaDestination.from_config(delivery)
    if kind == "smtp":
        return SmtpDestination(delivery)
    if kind == "lmtp":
        return LmtpDestination(delivery)
    raise ValueError(f"unknown delivery type {kind!r}")
