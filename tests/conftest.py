"""Shared fixtures: test certificates and private Dovecot servers.

A test that uses a Dovecot fixture is marked ``dovecot`` automatically, so
``pytest -m "not dovecot"`` runs the unit tests alone.  Without Dovecot
installed those tests fail with the apt-get line to run; they never skip.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.certs import TestPKI, make_pki
from tests.support.dovecot import TEST_USERS, Dovecot, DovecotFactory

DOVECOT_FIXTURES = frozenset({"dovecot", "dovecot_session", "dovecot_factory"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if DOVECOT_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.dovecot)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """A test CA with good, wrong-name, untrusted and expired server certificates."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server_dir() -> Path:
    # Not under pytest's basetemp: Dovecot's unprivileged processes need to
    # traverse every parent, and pytest resets pytest-of-<user> to 0700 at
    # the start of each session, including sessions running in parallel.
    return Path(tempfile.mkdtemp(prefix="gpopd-dovecot-"))


@pytest.fixture
def dovecot_factory(pki: TestPKI) -> Iterator[DovecotFactory]:
    """Start Dovecot servers with custom options; all are stopped after the test."""
    servers: list[tuple[Dovecot, Path]] = []

    def start(**options: Any) -> Dovecot:
        options.setdefault("users", TEST_USERS)
        base = _server_dir()
        server = Dovecot(base, pki, **options)
        servers.append((server, base))
        server.start()
        return server

    yield start
    for server, base in servers:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def dovecot(dovecot_factory: DovecotFactory) -> Dovecot:
    """A fresh Dovecot for this test, users alice and bob, empty mailboxes."""
    return dovecot_factory()


@pytest.fixture(scope="session")
def dovecot_session(pki: TestPKI) -> Iterator[Dovecot]:
    """One Dovecot shared by the session: only for tests that change nothing."""
    base = _server_dir()
    server = Dovecot(base, pki, users=TEST_USERS)
    try:
        with server:
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)
