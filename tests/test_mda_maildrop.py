"""maildrop (Courier's MDA) behind gpopd's MDA destination, end to end from Dovecot."""

from __future__ import annotations

import shutil
from pathlib import Path

from gpopd.config import load_config
from gpopd.fetch import poll_once
from gpopd.store import Store
from tests.support.certs import TestPKI
from tests.support.corpus import edge_case_named, expected_delivery, mixed_corpus
from tests.support.dovecot import TEST_USERS, Dovecot
from tests.support.gpopd_config import AccountSpec, maildir_contents, write_config

NOT_INSTALLED = "maildrop is not installed: apt-get install maildrop"


def maildrop_setup(tmp_path: Path) -> tuple[str, Path, Path]:
    """The maildrop binary, a mailfilter delivering into a fresh Maildir, that Maildir."""
    maildrop = shutil.which("maildrop")
    assert maildrop, NOT_INSTALLED
    target = tmp_path / "maildrop-Maildir"
    for sub in ("tmp", "new", "cur"):
        (target / sub).mkdir(parents=True, mode=0o700)
    mailfilter = tmp_path / "mailfilter"
    # A trailing "/" makes maildrop deliver in Maildir format.
    mailfilter.write_text(f'to "{target}/"\n')
    # maildrop refuses a filter file others can read or write.
    mailfilter.chmod(0o600)
    return maildrop, mailfilter, target


def spec_for(dovecot: Dovecot, pki: TestPKI, tmp_path: Path, command: list[str]) -> AccountSpec:
    return AccountSpec(
        "alice",
        dovecot.pop3s_port,
        "alice",
        TEST_USERS["alice"],
        tmp_path / "unused",
        ca_file=pki.ca_file,
        keep=False,
        delivery=["type: mda", f"command: [{', '.join(command)}]"],
    )


async def test_maildrop_as_mda_is_byte_exact(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path
) -> None:
    """maildrop stores every edge case and some realistic mail byte for byte in its Maildir."""
    maildrop, mailfilter, target = maildrop_setup(tmp_path)
    messages = list(edge_case_named().values()) + mixed_corpus(5, seed=71)
    dovecot.add_messages("alice", messages)
    config = write_config(tmp_path, [spec_for(dovecot, pki, tmp_path, [maildrop, str(mailfilter)])])
    [first] = await poll_once(load_config(config, environ={}))
    [second] = await poll_once(load_config(config, environ={}))
    assert first.outcome == "ok", first.error
    assert (first.delivered, second.new) == (len(messages), 0)
    assert maildir_contents(target) == sorted(map(expected_delivery, messages))
    assert dovecot.message_count("alice") == 0
    with Store(tmp_path / "state") as store:
        assert len(store.delivered_uids("alice")) == len(messages)


async def test_maildrop_temporary_failure_keeps_the_message(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path
) -> None:
    """A mailfilter that defers (EXITCODE 75) leaves the message on the server, unrecorded."""
    maildrop, mailfilter, target = maildrop_setup(tmp_path)
    mailfilter.write_text("EXITCODE=75\nexit\n")
    dovecot.add_messages("alice", mixed_corpus(1, seed=72))
    config = write_config(tmp_path, [spec_for(dovecot, pki, tmp_path, [maildrop, str(mailfilter)])])
    [result] = await poll_once(load_config(config, environ={}))
    assert (result.delivered, result.failed) == (0, 1)
    assert result.outcome == "delivery-error"
    assert maildir_contents(target) == []
    assert dovecot.message_count("alice") == 1
    with Store(tmp_path / "state") as store:
        assert store.delivered_uids("alice") == set()
        assert store.skipped_uids("alice", 0) == {}
