"""What the daemon keeps for its whole life is left out of cycle collection."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

import gpopd.daemon
from gpopd.daemon import Daemon
from tests.support.dovecot import free_port
from tests.support.gpopd_config import AccountSpec, write_config

# The first poll comes within a tenth of the interval: a second at most.
QUICK = {"poll_interval": "10s"}


def unfrozen_ids() -> set[int]:
    return {id(obj) for obj in gc.get_objects()}


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
    spec = AccountSpec(
        "alice", free_port(), "alice", "secret", tmp_path / "Maildir", tls="none", extra=QUICK
    )
    config = write_config(tmp_path, [spec])
    daemon = Daemon(config, {}, once=True)
    await daemon.run()
    assert daemon.settings is not None
    assert set(daemon.results) == {"alice"}  # it polled (and failed to connect)
    made_after = {"a": [1]}
    unfrozen = unfrozen_ids()
    assert id(made_after) in unfrozen  # the check sees what is not frozen
    assert id(daemon.settings.accounts) not in unfrozen
    assert id(vars(gpopd.daemon)) not in unfrozen


class Node:
    next: object = None


@pytest.mark.usefixtures("unfreeze")
async def test_a_reloaded_configuration_is_frozen_and_no_garbage_with_it(tmp_path: Path) -> None:
    """After a reload the new configuration is frozen too, and garbage is not.

    Left unfrozen, a reloaded configuration of 1,000 accounts would be walked
    by every later full collection again.  Garbage frozen with it (a load
    leaves about 100 cyclic objects) could never be freed.
    """
    alice = AccountSpec(
        "alice", free_port(), "alice", "secret", tmp_path / "A", tls="none", extra=QUICK
    )
    config = write_config(tmp_path, [alice])
    daemon = Daemon(config, {}, once=True)
    await daemon.run()
    bob = AccountSpec("bob", free_port(), "bob", "secret", tmp_path / "B", tls="none", extra=QUICK)
    write_config(tmp_path, [alice, bob])
    gc.disable()  # nothing but the daemon decides when garbage is collected
    try:
        garbage = Node()
        garbage.next = garbage  # a cycle, unreachable once the name is gone
        freed = weakref.ref(garbage)
        del garbage
        assert freed() is not None  # only the cycle collector can free it
        assert await daemon.reload()
        assert daemon.settings is not None
        assert set(daemon.settings.accounts) == {"alice", "bob"}
        assert id(daemon.settings.accounts) not in unfrozen_ids()
        assert freed() is None  # freed, not frozen
    finally:
        gc.enable()
