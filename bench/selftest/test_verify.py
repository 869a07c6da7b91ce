"""Correctness checks of a run's Maildir."""

from __future__ import annotations

from pathlib import Path

from bench.verify import Expected, check_count, check_maildir, message_id
from tests.support.corpus import expected_delivery, small_corpus

SOURCE = small_corpus(5, seed=7, size=2048)


def maildir(tmp_path: Path, files: list[bytes]) -> Path:
    path = tmp_path / "md"
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True)
    for number, data in enumerate(files):
        (path / "new" / f"{number}.bench").write_bytes(data)
    return path


def expected() -> Expected:
    return Expected.of(SOURCE, expected_delivery)


def test_message_id_is_unfolded_and_case_insensitive() -> None:
    """A folded, lower-case Message-ID header is found and unfolded."""
    head = b"Received: x\nmessage-id:\n <a@b>\nSubject: s\n\nMessage-ID: <body@x>\n"
    assert message_id(head) == b"<a@b>"


def test_message_id_ignores_the_body() -> None:
    """A Message-ID line after the header block does not count."""
    assert message_id(b"Subject: s\n\nMessage-ID: <body@x>\n") is None


def test_exact_copy_passes_byte_check(tmp_path: Path) -> None:
    """A Maildir holding exactly the expected deliveries passes the byte-exact check."""
    path = maildir(tmp_path, [expected_delivery(m) for m in SOURCE])
    check = check_maildir(path, expected(), byte_exact=True)
    assert check.ok, check.problems
    assert check.delivered == len(SOURCE)


def test_added_header_fails_only_byte_check(tmp_path: Path) -> None:
    """A prepended trace header is fine for other tools but not byte-exact."""
    path = maildir(tmp_path, [b"Received: by tool\n" + m for m in SOURCE])
    assert check_maildir(path, expected(), byte_exact=False).ok
    problems = check_maildir(path, expected(), byte_exact=True).problems
    assert any("differ" in text for text in problems)


def test_duplicate_and_missing_are_reported(tmp_path: Path) -> None:
    """One message twice and another never is reported as both."""
    files = [SOURCE[0], *SOURCE[:4]]
    problems = " ".join(
        check_maildir(maildir(tmp_path, files), expected(), byte_exact=False).problems
    )
    assert "1 duplicate" in problems
    assert "1 messages missing" in problems


def test_leftover_tmp_file_fails_gpopd(tmp_path: Path) -> None:
    """A file left in tmp/ fails the byte-exact check."""
    path = maildir(tmp_path, [expected_delivery(m) for m in SOURCE])
    (path / "tmp" / "partial").write_bytes(b"half")
    assert not check_maildir(path, expected(), byte_exact=True).ok


def test_count_check() -> None:
    """The floor's check compares the number of messages read."""
    assert check_count(5, 5, "x").ok
    assert not check_count(4, 5, "x").ok
