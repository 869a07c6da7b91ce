"""Routes by header, and envelope recipients taken from a header."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpopd.config import load_config
from gpopd.delivery import build_account_destination
from gpopd.delivery.base import MessageInfo, message_key
from gpopd.delivery.fanout import FanOutDestination
from gpopd.delivery.ledger import Ledger
from gpopd.delivery.memory import MemoryDestination
from gpopd.delivery.relay import MAX_HEADER_RECIPIENTS, RelayWriter, header_recipients
from gpopd.delivery.routing import (
    MAX_HEADER_BLOCK,
    Route,
    RoutingDestination,
    Rule,
    header_fields,
)
from gpopd.errors import EX_CONFIG, TemporaryDeliveryError
from gpopd.fetch import PollResult, poll_once
from tests.support.certs import TestPKI
from tests.support.dovecot import TEST_USERS, Dovecot
from tests.support.gpopd_config import (
    AccountSpec,
    maildir_contents,
    write_account_yaml,
    write_config,
)
from tests.support.smtpd import running_server

ACCOUNT = "acct"


def info(uid: str) -> MessageInfo:
    return MessageInfo(ACCOUNT, uid, message_key(ACCOUNT, uid))


def test_header_fields_unfolds_and_lowers_names() -> None:
    """Names are lower-cased, folded values joined, repeated fields all kept, junk skipped."""
    block = (
        b"From mbox-line\r\nSubject: one\r\n two\r\nX-A: 1\nx-a:2\n"
        b"List-Id: =?UTF-8?Q?Caf=C3=A9?= <cafe.lists.test>\nUnfinished: no"
    )
    fields = header_fields(block)
    assert fields["subject"] == ["one two"]
    assert fields["x-a"] == ["1", "2"]
    assert "unfinished" not in fields
    assert "from mbox-line" not in fields


def test_rules_first_match_any_occurrence_and_encoded_words() -> None:
    """contains ignores case, matches searches, any occurrence counts, encoded words decode."""
    fields = header_fields(
        b"Received: a\nReceived: from lists.example.test\n"
        b"Subject: =?UTF-8?B?UmVjaG51bmcgTsOkY2hzdGU=?=\n\n"
    )
    assert Rule("RECEIVED", contains="LISTS.example").holds(fields)
    assert Rule("subject", pattern=re.compile(r"^Rechnung N\u00e4chste$")).holds(fields)
    assert not Rule("subject", contains="invoice").holds(fields)
    assert not Rule("X-Missing", pattern=re.compile("")).holds(fields)
    with pytest.raises(ValueError, match="exactly one"):
        Rule("subject")


def routing(
    tmp_path: Path, *destinations: MemoryDestination, rules: list[Rule]
) -> RoutingDestination:
    routes = [
        Route(d, d.name, frozenset({d.name}), rule)
        for d, rule in zip(destinations[:-1], rules, strict=True)
    ]
    default = destinations[-1]
    return RoutingDestination(
        routes, Route(default, default.name, frozenset({default.name})), Ledger(tmp_path)
    )


async def test_routes_stream_the_whole_message_into_the_chosen_destination(
    tmp_path: Path,
) -> None:
    """Byte-at-a-time writes, CRLF headers: the first matching route gets the exact bytes."""
    lists, bills, inbox = (
        MemoryDestination("lists"),
        MemoryDestination("bills"),
        MemoryDestination("inbox"),
    )
    router = routing(
        tmp_path,
        lists,
        bills,
        inbox,
        rules=[Rule("List-Id", contains="<dev.lists"), Rule("Subject", pattern=re.compile("Bill"))],
    )
    await router.prepare(ACCOUNT)
    messages = {
        "1": b"List-Id: Dev <dev.lists.test>\r\nSubject: Bill\r\n\r\nbody\r\n",
        "2": b"Subject: Your Bill\r\n\r\n\r\nList-Id: <dev.lists.test>\r\n",
        "3": b"Subject: hello\n\nbody\n",
        "4": b"Subject: Bill, no body at all",
    }
    staged = []
    for uid, message in messages.items():
        with router.open(info(uid)) as writer:
            for byte in range(len(message)):
                writer.write(message[byte : byte + 1])
            staged.append(writer.finish())
    results = await router.commit(staged)
    assert all(r.ok for r in results)
    assert [r.staged for r in results] == staged
    assert lists.messages == {info("1").key: messages["1"]}
    assert bills.messages == {info("2").key: messages["2"], info("4").key: messages["4"]}
    assert inbox.messages == {info("3").key: messages["3"]}
    assert not router.records_routes
    assert await router.find_delivered(ACCOUNT, [info(u).key for u in "1234"]) == {
        info(u).key for u in "1234"
    }


async def test_a_header_block_past_the_bound_is_routed_by_what_was_seen(tmp_path: Path) -> None:
    """Past MAX_HEADER_BLOCK the decision uses the fields seen so far; nothing is lost."""
    hit, inbox = MemoryDestination("hit"), MemoryDestination("inbox")
    router = routing(tmp_path, hit, inbox, rules=[Rule("X-Tag", contains="yes")])
    filler = b"X-Filler: " + b"x" * 1000 + b"\n"
    message = b"X-Tag: yes\n" + filler * (MAX_HEADER_BLOCK // len(filler) + 5) + b"\nbody\n"
    late = filler * (MAX_HEADER_BLOCK // len(filler) + 5) + b"X-Tag: yes\n\nbody\n"
    staged = []
    for uid, text in (("1", message), ("2", late)):
        with router.open(info(uid)) as writer:
            for start in range(0, len(text), 4096):
                writer.write(text[start : start + 4096])
            staged.append(writer.finish())
    await router.commit(staged)
    assert hit.messages == {info("1").key: message}
    assert inbox.messages == {info("2").key: late}


async def test_shared_destination_records_the_route(tmp_path: Path) -> None:
    """With a destination in two routes, recovery asks only the route a message took."""
    ledger = Ledger(tmp_path)
    shared, relay = MemoryDestination("shared"), MemoryDestination("relay")
    relay.exactly_once = False
    from gpopd.delivery.fanout import Child

    fan = FanOutDestination([Child("shared", shared), Child("relay", relay)], ledger)
    router = RoutingDestination(
        [Route(fan, "shared|relay", frozenset({"shared", "relay"}), Rule("X-Copy", contains="y"))],
        Route(shared, "shared", frozenset({"shared"})),
        ledger,
    )
    assert router.records_routes
    await router.prepare(ACCOUNT)
    relay.fail(info("1").key)
    with router.open(info("1")) as writer:
        writer.write(b"X-Copy: y\n\nbody\n")
        staged = writer.finish()
    [result] = await router.commit([staged])
    assert isinstance(result.error, TemporaryDeliveryError)
    # The shared destination alone holds it; a union over routes would say "delivered".
    assert info("1").key in shared.messages
    assert await router.find_delivered(ACCOUNT, [info("1").key]) == set()
    await router.close()


def test_header_recipients_topmost_only_and_strict() -> None:
    """Only the topmost header counts; any unusable address or too many falls back (None)."""
    head = b"X-Original-To: a@x.test, B@x.test, b@X.test\nX-Original-To: old@x.test\n\nbody"
    assert header_recipients(head, "x-original-to") == ("a@x.test", "B@x.test")
    assert header_recipients(b"Subject: s\n\n", "X-Original-To") is None
    assert header_recipients(b"X-Original-To: <>\n\n", "X-Original-To") is None
    assert header_recipients(b'X-Original-To: a@x.test, "b c"@x\n\n', "X-Original-To") is None
    crowd = ", ".join(f"u{n}@x.test" for n in range(MAX_HEADER_RECIPIENTS + 1)).encode()
    assert header_recipients(b"Delivered-To: " + crowd + b"\n\n", "Delivered-To") is None
    injected = b"Delivered-To: a@x.test\r\n>\r\nRCPT TO:<evil@x.test>\r\n\r\n"
    assert header_recipients(injected, "Delivered-To") == ("a@x.test",)


def test_relay_writer_collects_recipients_without_the_sender() -> None:
    """The writer reads the header for recipients even when the sender is configured."""
    writer = RelayWriter(info("1"), want_sender=False, recipient_header="Delivered-To")
    writer.write(b"Delivered-To: me@x.test\r\nFrom: f@x.test\r\n\r\nbody\r\n")
    staged = writer.finish()
    assert (staged.recipients, staged.sender) == (("me@x.test",), None)
    staged.release()


@pytest.mark.parametrize(
    ("route", "named", "message"),
    [
        (
            "{header: Subject, matches: '([', delivery: {type: maildir, path: /x}}",
            "matches",
            "not a valid regular expression",
        ),
        (
            "{header: Subject, matches: a, contains: b, delivery: {type: maildir, path: /x}}",
            "matches",
            "exactly one of matches or contains",
        ),
        (
            "{header: Subject, delivery: {type: maildir, path: /x}}",
            "matches",
            "exactly one of matches or contains",
        ),
        (
            "{header: 'Sub ject', contains: b, delivery: {type: maildir, path: /x}}",
            "header",
            "header field name",
        ),
        ("{header: Subject, contains: b, delivery: []}", "delivery", "between 1 and 16"),
    ],
)
def test_bad_routes_exit_78_naming_the_key(
    tmp_path: Path, route: str, named: str, message: str
) -> None:
    """check-config exits 78 and names the offending key with its line."""
    path = write_account_yaml(
        tmp_path, f"    routes:\n      - {route}\n    delivery: {{type: maildir, path: /m}}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "gpopd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env={"PW": "x", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == EX_CONFIG, done.stderr
    assert "gpopd.yaml:8:" in done.stderr
    assert f"accounts.a.routes[0].{named}: " in done.stderr
    assert message in done.stderr


def test_routes_in_defaults_and_built_destination(tmp_path: Path) -> None:
    """routes may come from defaults; the account's destination then routes."""
    path = tmp_path / "gpopd.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "defaults:\n"
        "  routes: [{header: List-Id, matches: 'a\\.b', delivery: {type: maildir, path: /l}}]\n"
        "accounts:\n"
        "  a: {host: h.test, username: u, password: {env: PW},\n"
        "      delivery: {type: maildir, path: /m}}\n"
    )
    path.chmod(0o600)
    settings = load_config(path, environ={"PW": "x"})
    destination = build_account_destination(settings.accounts["a"], settings.state_dir)
    assert isinstance(destination, RoutingDestination)
    assert destination.choose(b"List-Id: <a.b>\n") == 0
    assert destination.choose(b"List-Id: <axb>\n") == 1


# -- end to end: Dovecot POP3 -> gpopd poll -> routes / recipient_header --------------


async def poll(tmp_path: Path, spec: AccountSpec) -> PollResult:
    [result] = await poll_once(load_config(write_config(tmp_path, [spec]), environ={}))
    return result


def spec(dovecot: Dovecot, pki: TestPKI, tmp_path: Path, **kwargs: object) -> AccountSpec:
    return AccountSpec(
        "alice",
        dovecot.pop3s_port,
        "alice",
        TEST_USERS["alice"],
        tmp_path / "inbox",
        ca_file=pki.ca_file,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_routes_by_subject_and_list_id(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path
) -> None:
    """List mail and invoices land in their own Maildirs, the rest in the inbox."""
    list_mail = b"From: l@x.test\nList-Id: Developers <dev.lists.example.test>\nSubject: hi\n\nl\n"
    invoice = b"From: b@x.test\nSubject: Invoice 42\n\ni\n"
    other = b"From: o@x.test\nSubject: lunch?\n\no\n"
    dovecot.add_messages("alice", [list_mail, invoice, other])
    lists, bills = tmp_path / "lists", tmp_path / "bills"
    account = spec(
        dovecot,
        pki,
        tmp_path,
        extra={
            "routes": (
                f"[{{header: list-id, contains: dev.lists.example.test, "
                f"delivery: {{type: maildir, path: {lists}}}}}, "
                f"{{header: Subject, matches: '^Invoice [0-9]+$', "
                f"delivery: {{type: maildir, path: {bills}}}}}]"
            )
        },
    )
    result = await poll(tmp_path, account)
    assert result.outcome == "ok", result.error
    assert maildir_contents(lists) == [list_mail]
    assert maildir_contents(bills) == [invoice]
    assert maildir_contents(tmp_path / "inbox") == [other]


async def test_recipient_header_sets_rcpt_to(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path
) -> None:
    """RCPT TO comes from X-Original-To; without a usable one, from recipient."""
    messages = [
        b"X-Original-To: sales@shop.test\nFrom: c@x.test\nSubject: 1\n\none\n",
        b"X-Original-To: a@shop.test, b@shop.test\nFrom: c@x.test\nSubject: 2\n\ntwo\n",
        b"X-Original-To: not an address\nFrom: c@x.test\nSubject: 3\n\nthree\n",
        b"From: c@x.test\nSubject: 4\n\nfour\n",
    ]
    dovecot.add_messages("alice", messages)
    with running_server() as relay:
        account = spec(
            dovecot,
            pki,
            tmp_path,
            delivery=[
                "type: smtp",
                "host: 127.0.0.1",
                f"port: {relay.port}",
                "recipient: [postmaster@shop.test]",
                "recipient_header: X-Original-To",
            ],
        )
        result = await poll(tmp_path, account)
        received = relay.received
    assert result.outcome == "ok", result.error
    by_subject = {r.content.split(b"Subject: ")[1][:1]: r.recipients for r in received}
    assert by_subject == {
        b"1": ("sales@shop.test",),
        b"2": ("a@shop.test", "b@shop.test"),
        b"3": ("postmaster@shop.test",),
        b"4": ("postmaster@shop.test",),
    }
