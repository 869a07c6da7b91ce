"""What gpopd knows about Gmail's POP service.

Gmail is reached by host name (``pop.gmail.com``), but also through
tunnels and proxies, so the behaviour that matters everywhere (batches,
``recent:`` usernames, error texts) is recognised by what the server says,
not by its name.  Only the defaults for an account that names Gmail's host
depend on the host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GMAIL_HOSTS = frozenset({"pop.gmail.com", "pop.googlemail.com"})
# Gmail advertises LOGIN-DELAY 300; polling it more often only earns
# "exceeded POP command or bandwidth limits".
GMAIL_MIN_INTERVAL = 300.0
# Gmail lists ~250 conversations per session; a listing this long is
# taken as a full batch (see ``Account.batch_threshold``).
GMAIL_BATCH_THRESHOLD = 200
RECENT_PREFIX = "recent:"


def is_gmail_host(host: str) -> bool:
    """Whether ``host`` is Gmail's POP server."""
    return host.lower().rstrip(".") in GMAIL_HOSTS


def is_recent_mode(username: str) -> bool:
    """Whether ``username`` asks Gmail for recent mode (the last 30 days)."""
    return username.lower().startswith(RECENT_PREFIX)


def own_address(username: str) -> str:
    """The mailbox's own address: the username without the ``recent:`` prefix."""
    if is_recent_mode(username):
        username = username[len(RECENT_PREFIX) :]
    return username.lower()


@dataclass(frozen=True, slots=True)
class Hint:
    """What a person should do about one of Gmail's error texts."""

    text: str
    # "needs-person": no retry helps; "rate-limited": back off an hour;
    # "busy": retry later as usual.
    kind: str


_HINTS: tuple[tuple[re.Pattern[str], Hint], ...] = (
    (
        re.compile(r"application-specific password required", re.I),
        Hint(
            "the account has 2-Step Verification: create an app password "
            "(https://myaccount.google.com/apppasswords) or use auth: xoauth2",
            "needs-person",
        ),
    ),
    (
        re.compile(r"web login required", re.I),
        Hint(
            "Google blocked a password sign-in: use an app password or auth: xoauth2, "
            "or sign in once in a browser to clear the block",
            "needs-person",
        ),
    ),
    (
        re.compile(r"not enabled for pop access", re.I),
        Hint(
            "enable POP in Gmail: Settings > Forwarding and POP/IMAP > POP download",
            "needs-person",
        ),
    ),
    (
        re.compile(r"still working on enabling pop", re.I),
        Hint("Gmail is still enabling POP for this account: try again later", "busy"),
    ),
    (
        re.compile(r"exceeded (the )?pop command or bandwidth limit", re.I),
        Hint(
            "Gmail says this account polls too often: backing off for an hour; "
            "lengthen poll_interval",
            "rate-limited",
        ),
    ),
    (
        re.compile(r"username and password not accepted", re.I),
        Hint(
            "for Gmail use the full address as username and an app password "
            "(not the account password), or auth: xoauth2",
            "needs-person",
        ),
    ),
)


def hint_for(text: str) -> Hint | None:
    """The hint for one of Gmail's known ``-ERR`` texts, or ``None``."""
    for pattern, hint in _HINTS:
        if pattern.search(text):
            return hint
    return None
