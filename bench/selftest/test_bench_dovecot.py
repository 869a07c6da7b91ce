"""Every client the bench drives, run for real against Dovecot on a small mailbox."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.run import Bench, delay_proxy, make_pki, smtp_sink
from bench.scenarios import MailboxSpec, Scenario
from bench.tools import TOOLS, Server
from tests.support.corpus import edge_case_messages, mixed_corpus
from tests.support.dovecot import Dovecot

pytestmark = pytest.mark.dovecot

# Mixed mail plus the messages that trip naive clients; two accounts so that
# every tool's multi-account configuration is exercised.
BOXES = (
    MailboxSpec("one", lambda: mixed_corpus(12, 21) + edge_case_messages()),
    MailboxSpec("two", lambda: mixed_corpus(8, 22)),
)
DIRECT = Scenario("direct", "two small accounts", BOXES)
PROXIED = Scenario("proxied", "two small accounts, delayed", BOXES, via_proxy=True)
# Mixed mail only: SMTP cannot carry the edge cases' NUL bytes (gpopd sets
# such a message aside) and turns bare CRs into line ends.
SMTP = Scenario("smtp", "one small account, into the SMTP sink", BOXES[1:], delivery="smtp")


@pytest.fixture(scope="module")
def bench() -> Iterator[Bench]:
    # Not under pytest's basetemp: Dovecot's unprivileged processes must be
    # able to traverse every parent directory.
    work = Path(tempfile.mkdtemp(prefix="gpopd-bench-"))
    bench = Bench(work)
    pki = make_pki(work / "pki")
    users = {spec.user: spec.password for spec in BOXES}
    try:
        with Dovecot(work / "dovecot", pki, users=users, lmtp=False) as dovecot:
            bench.server = Server(dovecot.pop3s_port, pki.ca_file)
            with delay_proxy(dovecot.pop3s_port, 5.0, work / "proxy.log") as port:
                bench.proxy_server = Server(port, pki.ca_file)
                with smtp_sink(work / "sink", work / "sink.log") as sink:
                    bench.smtp = sink
                    bench.fill(dovecot, list(BOXES))
                    yield bench
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("tool", ["gpopd", "mpop", "fetchmail", "getmail6", "floor"])
def test_tool_delivers_every_message_once(bench: Bench, tool: str) -> None:
    """The tool, configured by the bench, delivers each message exactly once."""
    assert TOOLS[tool].missing() is None
    result = bench.run_one(DIRECT, TOOLS[tool], 1)
    assert result.problems == []
    assert result.delivered == result.expected > 0
    assert result.wall > 0
    assert result.max_rss_mb > 0


@pytest.mark.parametrize("tool", ["mpop", "floor"])
def test_tool_through_delay_proxy(bench: Bench, tool: str) -> None:
    """TLS passes the delay proxy untouched: the certificate still verifies."""
    result = bench.run_one(PROXIED, TOOLS[tool], 1)
    assert result.problems == []
    assert result.delivered == result.expected


def test_second_run_starts_from_fresh_state(bench: Bench) -> None:
    """A repeated run re-downloads everything: no client state survives a run."""
    first = bench.run_one(DIRECT, TOOLS["mpop"], 2)
    second = bench.run_one(DIRECT, TOOLS["mpop"], 2)
    assert first.delivered == second.delivered == first.expected


@pytest.mark.parametrize("tool", ["gpopd", "fetchmail"])
def test_tool_forwards_every_message_once_to_the_smtp_sink(bench: Bench, tool: str) -> None:
    """Through SMTP, each message reaches the sink once (byte-exact for gpopd)."""
    result = bench.run_one(SMTP, TOOLS[tool], 1)
    assert result.problems == []
    assert result.delivered == result.expected > 0
