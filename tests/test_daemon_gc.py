"""What the daemon keeps for its whole life is left out of cycle collection."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

import gpopd.daemon
from gpopd.daemon import Daemon
from tests.support.dovecot import free_port
from tests.support.gpopd_config import AccountSpec, write_config


@pytest.fixture
def unfreeze() -> Iterator[None]:
    """The daemon freezes what the test process holds; release it afterwards."""
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("unfreeze")
async def test_modules_and_configuration_are_frozen(tmp_path: Path) -> None:
    """Full collections skip the modules and the loaded configuration.

    Each full collection walked them all: with 1,000 accounts (bench/scale.py)
    60-132 ms, the event loop standing still meanwhile.
    """
    spec = AccountSpec("alice", free_port(), "alice", "secret", tmp_path / "Maildir", tls="none")
    config = write_config(tmp_path, [spec])
    daemon = Daemon(config, {}, once=True)
    await daemon.run()
    assert daemon.settings is not None
    assert set(daemon.results) == {"alice"}  # it polled (and failed to connect)
    made_after = {"a": [1]}
    collected = {id(obj) for obj in gc.get_objects()}
    assert id(made_after) in collected  # the check sees what is not frozen
    assert id(daemon.settings.accounts) not in collected
    assert id(vars(gpopd.daemon)) not in collected
