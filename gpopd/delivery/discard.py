"""A destination that accepts and drops messages: ``skip_sent`` routes here.

It never claims an earlier delivery in ``find_delivered()``: a message that
was pending when gpopd stopped is fetched again and dropped again, which
costs a download, while claiming it would risk recording a message that a
routed sibling destination never received.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from gpopd.delivery.base import CommitResult, Destination, MessageInfo, Staged, Writer


class _DropWriter(Writer):
    def __init__(self, info: MessageInfo) -> None:
        self.info = info
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)

    def finish(self) -> Staged:
        return Staged(self.info, self.size)

    def abort(self) -> None:
        pass


class DiscardDestination(Destination):
    """Accepts every message and keeps nothing."""

    def __init__(self, reason: str) -> None:
        self.name = f"discard:{reason}"

    async def prepare(self, account: str) -> None:
        pass

    def open(self, info: MessageInfo) -> Writer:
        return _DropWriter(info)

    async def commit(self, staged: Sequence[Staged]) -> list[CommitResult]:
        return [CommitResult(item, None) for item in staged]

    async def find_delivered(self, account: str, keys: Collection[str]) -> set[str]:
        return set()

    async def close(self) -> None:
        pass
