"""Several destinations: every one must accept, none gets a message twice."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path

import pytest

from gpopd.config import load_config
from gpopd.delivery import build_account_destination
from gpopd.delivery.base import CommitResult, MessageInfo, Staged, message_key
from gpopd.delivery.fanout import Child, FanOutDestination, destination_identity
from gpopd.delivery.ledger import LEDGER_KEEP, LEDGER_NAME, Ledger
from gpopd.delivery.maildir import MaildirDestination
from gpopd.delivery.memory import MemoryDestination
from gpopd.errors import PermanentDeliveryError, StoreError, TemporaryDeliveryError
from gpopd.fetch import PollResult, poll_once
from tests.support.certs import TestPKI
from tests.support.corpus import expected_delivery, mixed_corpus
from tests.support.dovecot import TEST_USERS, Dovecot
from tests.support.gpopd_config import (
    AccountSpec,
    maildir_contents,
    write_account_yaml,
    write_config,
)
from tests.support.smtpd import RecordingHandler, running_server

ACCOUNT = "acct"
MESSAGE = b"From: a@example.test\nSubject: hello\n\nbody\n"


class CountingDestination(MemoryDestination):
    """A memory destination that counts how often each key was stored."""

    def __init__(self, name: str, *, exactly_once: bool = True) -> None:
        super().__init__(name)
        self.exactly_once = exactly_once
        self.stored: Counter[str] = Counter()

    async def commit(self, staged: Sequence[Staged]) -> list[CommitResult]:
        results = await super().commit(staged)
        self.stored.update(r.staged.info.key for r in results if r.ok)
        return results

    async def find_delivered(self, account: str, keys: Collection[str]) -> set[str]:
        if not self.exactly_once:
            return set()  # like a relay: keeps no trace gpopd could look up
        return await super().find_delivered(account, keys)


def info(uid: str = "1") -> MessageInfo:
    return MessageInfo(ACCOUNT, uid, message_key(ACCOUNT, uid), len(MESSAGE))


async def fan_out(
    state: Path, *children: CountingDestination, clock: float | None = None
) -> FanOutDestination:
    ledger = Ledger(state, clock=(lambda: clock) if clock is not None else time.time)
    fan = FanOutDestination([Child(c.name, c) for c in children], ledger)
    await fan.prepare(ACCOUNT)
    return fan


async def deliver(fan: FanOutDestination, *infos: MessageInfo) -> list[CommitResult]:
    staged = []
    for item in infos:
        with fan.open(item) as writer:
            writer.write(MESSAGE[:10])
            writer.write(MESSAGE[10:])
            staged.append(writer.finish())
    return await fan.commit(staged)


async def test_every_child_gets_the_message(tmp_path: Path) -> None:
    """A message is ok only when both children stored it, byte for byte."""
    a, b = CountingDestination("a"), CountingDestination("b")
    fan = await fan_out(tmp_path, a, b)
    [result] = await deliver(fan, info())
    assert result.ok
    assert a.messages[info().key] == b.messages[info().key] == MESSAGE
    assert fan.ledger.accepted(info().key) == {"a", "b"}
    await fan.close()


async def test_temporary_failure_redelivers_only_to_the_missing_child(tmp_path: Path) -> None:
    """After one child failed temporarily, the retry goes to that child alone."""
    a, b = CountingDestination("a"), CountingDestination("b")
    b.fail(info().key)
    fan = await fan_out(tmp_path, a, b)
    [first] = await deliver(fan, info())
    assert isinstance(first.error, TemporaryDeliveryError)
    assert "b: " in str(first.error)
    b.heal(info().key)
    [second] = await deliver(fan, info())
    assert second.ok
    assert (a.stored[info().key], b.stored[info().key]) == (1, 1)


async def test_ledger_survives_a_new_poll(tmp_path: Path) -> None:
    """A fresh fan-out over the same state directory still knows who has the message."""
    a, b = CountingDestination("a"), CountingDestination("b", exactly_once=False)
    a.fail(info().key)
    fan = await fan_out(tmp_path, a, b)
    [first] = await deliver(fan, info())
    assert not first.ok
    await fan.close()
    a.heal(info().key)
    again = await fan_out(tmp_path, a, b)
    assert await again.find_delivered(ACCOUNT, [info().key]) == set()
    [second] = await deliver(again, info())
    assert second.ok
    assert (a.stored[info().key], b.stored[info().key]) == (1, 1)
    assert (tmp_path / LEDGER_NAME).stat().st_mode & 0o777 == 0o600


async def test_permanent_failure_of_one_child_is_permanent(tmp_path: Path) -> None:
    """A child refusing for good makes the message's failure permanent, naming that child."""
    a, b, c = CountingDestination("a"), CountingDestination("b"), CountingDestination("c")
    b.fail(info().key, permanent=True)
    c.fail(info().key)
    fan = await fan_out(tmp_path, a, b, c)
    [result] = await deliver(fan, info())
    assert isinstance(result.error, PermanentDeliveryError)
    assert "b: " in str(result.error)
    assert "c: " in str(result.error)
    assert a.stored[info().key] == 1


async def test_open_fails_only_when_every_child_failed(tmp_path: Path) -> None:
    """open() raises the combined error once no child is left to write to."""

    class Broken(CountingDestination):
        def open(self, item: MessageInfo) -> FanOutDestination:  # type: ignore[override]
            raise TemporaryDeliveryError(f"{self.name}: disk full")

    fan = await fan_out(tmp_path, Broken("x"), Broken("y"))
    with pytest.raises(TemporaryDeliveryError, match="x: x: disk full; y: y: disk full"):
        fan.open(info())
    half = await fan_out(tmp_path / "2", Broken("x"), CountingDestination("z"))
    [result] = await deliver(half, info())
    assert isinstance(result.error, TemporaryDeliveryError)


async def test_find_delivered_needs_every_child(tmp_path: Path) -> None:
    """Only keys that every child holds count as delivered, and children's own finds are kept."""
    a, b = CountingDestination("a"), CountingDestination("b")
    one, two = info("1"), info("2")
    a.messages[one.key] = a.messages[two.key] = MESSAGE
    b.messages[two.key] = MESSAGE
    fan = await fan_out(tmp_path, a, b)
    assert await fan.find_delivered(ACCOUNT, [one.key, two.key]) == {two.key}
    assert fan.ledger.accepted(one.key) == {"a"}


async def test_crash_between_child_commit_and_ledger(tmp_path: Path) -> None:
    """A crash before the ledger write: Maildir-like children are found, relays may get a copy.

    This is the documented window: an exactly-once child recognises its own
    copy through find_delivered(), a relay-like one cannot and receives the
    message again at the next poll (at least once).
    """
    exact, relay, failing = (
        CountingDestination("exact"),
        CountingDestination("relay", exactly_once=False),
        CountingDestination("failing"),
    )
    failing.fail(info().key)
    fan = await fan_out(tmp_path, exact, relay, failing)

    async def crash(*args: object, **kwargs: object) -> None:
        raise StoreError("killed before the ledger write")

    fan.ledger.record = crash  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        await deliver(fan, info())
    failing.heal(info().key)
    after = await fan_out(tmp_path, exact, relay, failing)
    assert await after.find_delivered(ACCOUNT, [info().key]) == set()
    [result] = await deliver(after, info())
    assert result.ok
    assert exact.stored[info().key] == 1  # recognised: not stored twice
    assert relay.stored[info().key] == 2  # the documented duplicate
    assert failing.stored[info().key] == 1


async def test_exactly_once_only_if_all_children_are(tmp_path: Path) -> None:
    """A relay-like child makes the whole fan-out at-least-once."""
    exact = await fan_out(tmp_path, CountingDestination("a"), CountingDestination("b"))
    mixed = await fan_out(
        tmp_path, CountingDestination("a"), CountingDestination("r", exactly_once=False)
    )
    assert (exact.exactly_once, mixed.exactly_once) == (True, False)


async def test_old_rows_are_pruned(tmp_path: Path) -> None:
    """Rows untouched for longer than LEDGER_KEEP are removed at the next load."""
    a, b = CountingDestination("a"), CountingDestination("b")
    b.fail(info().key)
    fan = await fan_out(tmp_path, a, b, clock=1000.0)
    await deliver(fan, info())
    await fan.close()
    soon = Ledger(tmp_path, clock=lambda: 1000.0 + LEDGER_KEEP - 1)
    await soon.load(ACCOUNT)
    assert soon.accepted(info().key) == {"a"}
    await soon.close()
    late = Ledger(tmp_path, clock=lambda: 1000.0 + LEDGER_KEEP + 1)
    await late.load(ACCOUNT)
    assert late.accepted(info().key) == frozenset()
    await late.close()


async def test_children_commit_side_by_side(tmp_path: Path) -> None:
    """Children commit concurrently: a slow one does not hold the other back."""
    order: list[str] = []

    class Slow(CountingDestination):
        async def commit(self, staged: Sequence[Staged]) -> list[CommitResult]:
            order.append(f"{self.name} start")
            await asyncio.sleep(0.05 if self.name == "slow" else 0)
            order.append(f"{self.name} end")
            return await super().commit(staged)

    fan = await fan_out(tmp_path, Slow("slow"), Slow("fast"))
    [result] = await deliver(fan, info())
    assert result.ok
    assert order.index("fast end") < order.index("slow end")


async def test_maildirs_as_children(tmp_path: Path) -> None:
    """Two real Maildirs: one copy each, and find_delivered recognises both after a crash."""
    one, two = MaildirDestination(tmp_path / "one"), MaildirDestination(tmp_path / "two")
    ledger = Ledger(tmp_path / "state")
    fan = FanOutDestination([Child("m1", one), Child("m2", two)], ledger)
    await fan.prepare(ACCOUNT)
    assert fan.exactly_once
    [result] = await deliver(fan, info())
    assert result.ok
    await fan.close()
    fresh = FanOutDestination([Child("m1", one), Child("m2", two)], Ledger(tmp_path / "x"))
    await fresh.prepare(ACCOUNT)
    assert await fresh.find_delivered(ACCOUNT, [info().key]) == {info().key}
    assert maildir_contents(tmp_path / "one") == maildir_contents(tmp_path / "two") == [MESSAGE]
    await fresh.close()


def config(tmp_path: Path, delivery: str) -> Path:
    return write_account_yaml(tmp_path, f"    delivery: {delivery}\n")


async def test_config_list_builds_a_fan_out(tmp_path: Path) -> None:
    """A delivery list builds a fan-out whose children carry distinct identities."""
    settings = load_config(
        config(
            tmp_path,
            f"[{{type: maildir, path: {tmp_path}/m}}, {{type: maildir, path: {tmp_path}/m}},"
            " {type: smtp, host: localhost, recipient: [a@b.test]}]",
        ),
        environ={"PW": "x"},
    )
    account = settings.accounts["a"]
    destination = build_account_destination(account, settings.state_dir)
    assert isinstance(destination, FanOutDestination)
    assert [c.identity for c in destination.children] == [
        f"maildir:{tmp_path}/m",
        f"maildir:{tmp_path}/m#2",
        "smtp:localhost:25:a@b.test",
    ]
    assert destination_identity(account.delivery[2]) == "smtp:localhost:25:a@b.test"  # type: ignore[index]
    single = load_config(
        config(tmp_path, f"[{{type: mbox, path: {tmp_path}/x}}]"), environ={"PW": "x"}
    )
    assert not isinstance(
        build_account_destination(single.accounts["a"], tmp_path), FanOutDestination
    )


# -- end to end: Dovecot POP3 -> gpopd poll -> Maildir + SMTP relay --------------


async def poll(tmp_path: Path, spec: AccountSpec) -> PollResult:
    [result] = await poll_once(load_config(write_config(tmp_path, [spec]), environ={}))
    return result


async def test_relay_451_then_only_the_relay_gets_it(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path
) -> None:
    """Maildir + relay, relay answers 451 once: the retry goes to the relay only."""
    messages = mixed_corpus(3, seed=71)
    dovecot.add_messages("alice", messages)
    handler = RecordingHandler(data_replies=["451 4.3.0 try again later"])
    maildir = tmp_path / "Maildir"
    with running_server(handler) as relay:
        spec = AccountSpec(
            "alice",
            dovecot.pop3s_port,
            "alice",
            TEST_USERS["alice"],
            maildir,
            ca_file=pki.ca_file,
            keep=False,
            delivery=[
                f"- {{type: maildir, path: {maildir}}}",
                f"- {{type: smtp, host: 127.0.0.1, port: {relay.port}, recipient: [a@b.test]}}",
            ],
        )
        first = await poll(tmp_path, spec)
        assert (first.delivered, first.failed) == (2, 1)
        assert len(maildir_contents(maildir)) == 3  # the Maildir accepted all three
        second = await poll(tmp_path, spec)
        third = await poll(tmp_path, spec)
        received = relay.received
    assert (second.delivered, second.failed, third.new) == (1, 0, 0)
    assert maildir_contents(maildir) == sorted(map(expected_delivery, messages))
    assert len(received) == 3
    assert dovecot.message_count("alice") == 0
