"""An in-memory destination for tests (the model is httpx's MockTransport)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from gpopd.delivery.base import CommitResult, Destination, MessageInfo, Staged, Writer
from gpopd.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError

__all__ = ["MemoryDestination", "MemoryStaged"]


@dataclass(eq=False)
class MemoryStaged(Staged):
    """A staged message with its content."""

    data: bytes = b""


class _MemoryWriter(Writer):
    def __init__(self, info: MessageInfo) -> None:
        self._info = info
        self._chunks: list[bytes] = []
        self._done = False

    def write(self, data: bytes) -> None:
        if self._done:
            raise RuntimeError("message is already finished or aborted")
        self._chunks.append(bytes(data))

    def finish(self) -> MemoryStaged:
        if self._done:
            raise RuntimeError("message is already finished or aborted")
        self._done = True
        data = b"".join(self._chunks)
        self._chunks = []
        return MemoryStaged(self._info, len(data), data)

    def abort(self) -> None:
        self._done = True
        self._chunks = []


class MemoryDestination(Destination):
    """Keeps committed messages in ``messages`` (key -> content).

    ``fail(key)`` makes every later commit of that key fail, temporarily
    or permanently, until ``heal(key)``.
    """

    exactly_once = True

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.messages: dict[str, bytes] = {}
        self.prepared: list[str] = []
        self.commits = 0
        self.closed = False
        self._failures: dict[str, DeliveryError] = {}

    def fail(self, key: str, *, permanent: bool = False) -> None:
        error_type = PermanentDeliveryError if permanent else TemporaryDeliveryError
        self._failures[key] = error_type(f"{self.name}: refused {key} (as told)")

    def heal(self, key: str) -> None:
        self._failures.pop(key, None)

    async def prepare(self, account: str) -> None:
        self.prepared.append(account)

    def open(self, info: MessageInfo) -> Writer:
        return _MemoryWriter(info)

    async def commit(self, staged: Sequence[Staged]) -> list[CommitResult]:
        self.commits += 1
        results: list[CommitResult] = []
        for item in staged:
            if not isinstance(item, MemoryStaged):
                raise TypeError(f"{self.name} cannot commit {type(item).__name__}")
            error = self._failures.get(item.info.key)
            if error is None:
                self.messages[item.info.key] = item.data
            results.append(CommitResult(item, error))
        return results

    async def find_delivered(self, account: str, keys: Collection[str]) -> set[str]:
        return {key for key in keys if key in self.messages}

    async def close(self) -> None:
        self.closed = True
