"""A spool for destinations that hand a message over only at commit time.

SMTP, LMTP and MDA destinations cannot start delivering while RETR is still
streaming (a failure halfway would leave a half-sent message), so the
message is first written to an anonymous temporary file: nothing is ever
whole in memory, and a crash leaves nothing behind because the file has no
name.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from gpopd.delivery.base import MessageInfo, Staged, Writer
from gpopd.errors import TemporaryDeliveryError

__all__ = ["CHUNK_SIZE", "SpoolWriter", "SpooledMessage"]

CHUNK_SIZE = 1 << 20


@dataclass
class SpooledMessage(Staged):
    """A whole message in an anonymous file; ``chunks()`` reads it back."""

    file: IO[bytes] | None = field(default=None, repr=False)

    def chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        if self.file is None:
            raise ValueError("the spooled message was already released")
        self.file.seek(0)
        while chunk := self.file.read(size):
            yield chunk

    def read_all(self) -> bytes:
        """The whole message; only for destinations whose client needs one bytes object."""
        return b"".join(self.chunks())

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class SpoolWriter(Writer):
    """Writes one message into an unnamed temporary file in ``directory``."""

    def __init__(self, info: MessageInfo, directory: Path | None = None) -> None:
        self._info = info
        try:
            # The file outlives this call: finish() hands it to the staged message.
            self._file: IO[bytes] | None = tempfile.TemporaryFile(  # noqa: SIM115
                dir=directory, buffering=CHUNK_SIZE
            )
        except OSError as exc:
            raise TemporaryDeliveryError(f"cannot create a spool file: {exc}") from exc
        self._size = 0

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError("write() after finish() or abort()")
        try:
            self._file.write(data)
        except OSError as exc:
            self.abort()
            raise TemporaryDeliveryError(f"cannot write the spool file: {exc}") from exc
        self._size += len(data)

    def finish(self) -> SpooledMessage:
        if self._file is None:
            raise ValueError("finish() after finish() or abort()")
        try:
            self._file.flush()
        except OSError as exc:
            self.abort()
            raise TemporaryDeliveryError(f"cannot write the spool file: {exc}") from exc
        spooled = SpooledMessage(self._info, self._size, self._file)
        self._file = None
        return spooled

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
