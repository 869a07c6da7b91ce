"""The benchmark scenarios and the mailboxes they read.

Each mailbox is one Dovecot user filled from a seeded corpus, so every run
of every tool (and every machine) sees the same bytes.  A mailbox is filled
once and shared by the scenarios that name it (``e`` reads ``a``, ``b``, ``c``,
``d`` and ``f`` again with the floor client).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tests.support.corpus import attachment_message, mixed_corpus, small_corpus

MB = 1024 * 1024
BIG_MESSAGE = 100 * MB
LARGE_MESSAGE = 20 * MB
ACCOUNTS_C = 20
QUICK_COUNT = 50


@dataclass(frozen=True)
class MailboxSpec:
    """A Dovecot user and how to fill it."""

    user: str
    make: Callable[[], list[bytes]]

    @property
    def password(self) -> str:
        return f"bench-{self.user}-pw"


@dataclass(frozen=True)
class Scenario:
    """What one row group of the table measures."""

    name: str
    description: str
    mailboxes: tuple[MailboxSpec, ...]
    #: None: every client the run selected; else exactly these tools.
    tools: tuple[str, ...] | None = None
    via_proxy: bool = False
    #: Scenario whose gpopd wall time is the ratio's denominator.
    baseline: str | None = None
    #: Where the tools deliver: "maildir", or "smtp" (bench/smtpsink.py).
    delivery: str = "maildir"

    @property
    def accounts(self) -> int:
        return len(self.mailboxes)


def _a_big() -> list[bytes]:
    return [*mixed_corpus(2000, 1), attachment_message(BIG_MESSAGE, 2)]


def _d() -> list[bytes]:
    return [attachment_message(LARGE_MESSAGE, 40 + n) for n in range(5)]


def _c(index: int) -> MailboxSpec:
    return MailboxSpec(f"c{index:02d}", lambda: small_corpus(200, 100 + index, size=4096))


def _c_mixed(index: int) -> MailboxSpec:
    return MailboxSpec(f"cm{index:02d}", lambda: mixed_corpus(200, 100 + index))


MAILBOX_A = MailboxSpec("a", lambda: mixed_corpus(2000, 1))
MAILBOX_A_BIG = MailboxSpec("abig", _a_big)
MAILBOX_B = MailboxSpec("b", lambda: small_corpus(4000, 3, size=4096))
MAILBOXES_C = tuple(_c(n) for n in range(1, ACCOUNTS_C + 1))
MAILBOXES_C_MIXED = tuple(_c_mixed(n) for n in range(1, ACCOUNTS_C + 1))
MAILBOX_D = MailboxSpec("d", _d)
MAILBOX_F = MailboxSpec("f", lambda: mixed_corpus(500, 6))

_FLOOR = ("floor",)
# fetchmail forwards to SMTP by nature; mpop and getmail6 have no SMTP client.
_SMTP_TOOLS = ("gpopd", "fetchmail")

SCENARIOS: dict[str, tuple[Scenario, ...]] = {
    "a": (Scenario("a", "one account, 2,000 mixed messages (~240 MB)", (MAILBOX_A,)),),
    "a-big": (Scenario("a-big", "scenario a plus one 100 MB message", (MAILBOX_A_BIG,)),),
    "b": (Scenario("b", "one account, 4,000 small (4 KB) messages", (MAILBOX_B,)),),
    "c": (Scenario("c", "20 accounts x 200 small (4 KB) messages, one invocation", MAILBOXES_C),),
    "c-mixed": (
        Scenario("c-mixed", "20 accounts x 200 mixed messages, one invocation", MAILBOXES_C_MIXED),
    ),
    "d": (Scenario("d", "5 messages of 20 MB", (MAILBOX_D,)),),
    "e": (
        Scenario("e:a", "floor client on the mailbox of a", (MAILBOX_A,), _FLOOR, baseline="a"),
        Scenario("e:b", "floor client on the mailbox of b", (MAILBOX_B,), _FLOOR, baseline="b"),
        Scenario(
            "e:c",
            "floor client on the 20 mailboxes of c, all at once",
            MAILBOXES_C,
            _FLOOR,
            baseline="c",
        ),
        Scenario("e:d", "floor client on the mailbox of d", (MAILBOX_D,), _FLOOR, baseline="d"),
        Scenario(
            "e:f",
            "floor client on the mailbox of f, through the delay proxy",
            (MAILBOX_F,),
            _FLOOR,
            via_proxy=True,
            baseline="f",
        ),
    ),
    "f": (
        Scenario(
            "f",
            "one account, 500 mixed messages, 20 ms added each way",
            (MAILBOX_F,),
            via_proxy=True,
        ),
    ),
    "s": (
        Scenario(
            "s",
            "one account, 2,000 mixed messages forwarded to a local SMTP sink",
            (MAILBOX_A,),
            _SMTP_TOOLS,
            delivery="smtp",
        ),
    ),
}

QUICK: tuple[Scenario, ...] = (
    Scenario(
        "quick-a",
        f"one account, {QUICK_COUNT} mixed messages",
        (MailboxSpec("qa", lambda: mixed_corpus(QUICK_COUNT, 11)),),
        ("gpopd",),
    ),
    Scenario(
        "quick-f",
        f"one account, {QUICK_COUNT} mixed messages, 20 ms added each way",
        (MailboxSpec("qf", lambda: mixed_corpus(QUICK_COUNT, 16)),),
        ("gpopd",),
        via_proxy=True,
    ),
)


def select(names: list[str]) -> list[Scenario]:
    """The scenarios named (in the order given), expanding ``e``."""
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise ValueError(
            f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    return [scenario for name in names for scenario in SCENARIOS[name]]
