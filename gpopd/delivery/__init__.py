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
    """The destination an account's validated ``delivery:`` section describes.

    Backends are imported on first use: a poll into a Maildir does not pay
    for aiosmtplib and the other backends (about 7 MB of resident memory).
    """
    kind = delivery.type
    # ruff: noqa: PLC0415 - lazy imports on purpose, see the docstring
    if kind == "maildir":
        from gpopd.delivery.maildir import MaildirDestination

        return MaildirDestination(Path(delivery.path))
    if kind == "mbox":
        from gpopd.delivery.mbox import MboxDestination

        return MboxDestination.from_config(delivery)
    if kind == "mda":
        from gpopd.delivery.mda import MdaDestination

        return MdaDestination.from_config(delivery)
    if kind == "smtp":
        from gpopd.delivery.smtp import SmtpDestination

        return SmtpDestination(delivery)
    if kind == "lmtp":
        from gpopd.delivery.lmtp import LmtpDestination

        return LmtpDestination(delivery)
    raise ValueError(f"unknown delivery type {kind!r}")
