"""Destinations: where fetched messages are delivered."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpopd.delivery.base import (
    CommitResult,
    Destination,
    MessageInfo,
    Staged,
    Writer,
    account_tag,
    message_key,
)

if TYPE_CHECKING:
    from gpopd.delivery.ledger import Ledger

__all__ = [
    "CommitResult",
    "Destination",
    "MessageInfo",
    "Staged",
    "Writer",
    "account_tag",
    "build_account_destination",
    "build_destination",
    "message_key",
]


def build_account_destination(account: Any, state_dir: Path) -> Destination:
    """The destination of a validated account: its ``delivery:`` behind its ``routes:``.

    Lists and routes keep their ledger in ``state_dir`` (see ``ledger``).
    """
    from gpopd.delivery.ledger import Ledger

    ledger = Ledger(state_dir)
    default = build_destination(account.delivery, ledger=ledger)
    routes = getattr(account, "routes", ())
    skip_sent = getattr(account, "skip_sent", False)
    if not routes and not skip_sent:
        return default
    from gpopd.delivery.routing import Route, RoutingDestination, Rule

    def route(delivery: Any, destination: Destination, rule: Rule | None) -> Route:
        leaves = _identities(delivery)
        return Route(destination, "|".join(leaves), frozenset(leaves), rule)

    built = [
        route(
            r.delivery,
            build_destination(r.delivery, ledger=ledger),
            Rule(r.header, r.matches, r.contains),
        )
        for r in routes
    ]
    if skip_sent:
        from gpopd.delivery.discard import DiscardDestination
        from gpopd.gmail import own_address

        # First rule: the account's own address as a whole address in From.
        sent = re.compile(
            rf"(?i)(?:^|[\s<,:;\"]){re.escape(own_address(account.username))}(?:$|[\s>,;\"])"
        )
        built.insert(
            0,
            Route(DiscardDestination("sent"), "discard:sent", frozenset(), Rule("From", sent)),
        )
    return RoutingDestination(built, route(account.delivery, default, None), ledger)


def _identities(delivery: Any) -> list[str]:
    """The ledger identities of one destination or a list (repeats numbered)."""
    from gpopd.delivery.fanout import destination_identity

    items = delivery if isinstance(delivery, list | tuple) else [delivery]
    identities: list[str] = []
    seen: dict[str, int] = {}
    for item in items:
        identity = destination_identity(item)
        seen[identity] = seen.get(identity, 0) + 1
        identities.append(identity if seen[identity] == 1 else f"{identity}#{seen[identity]}")
    return identities


def build_destination(delivery: Any, *, ledger: Ledger | None = None) -> Destination:
    """The destination an account's validated ``delivery:`` section describes.

    A list (several destinations) needs the ``ledger`` that remembers which
    of them accepted what.  Backends are imported on first use: a poll into
    a Maildir does not pay for aiosmtplib and the other backends (about 7 MB
    of resident memory).
    """
    if isinstance(delivery, list | tuple):
        if len(delivery) == 1:
            return build_destination(delivery[0])
        if ledger is None:
            raise ValueError("several destinations need a ledger")
        from gpopd.delivery.fanout import Child, FanOutDestination

        children = [
            Child(identity, build_destination(item))
            for identity, item in zip(_identities(delivery), delivery, strict=True)
        ]
        return FanOutDestination(children, ledger)
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
