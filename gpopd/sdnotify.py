"""The systemd notification protocol (sd_notify(3)) without libsystemd.

systemd documents the protocol as stable: one datagram of ``KEY=VALUE`` lines
to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``.  Writing it here avoids
``systemd-python`` (a compiler and libsystemd headers) for a few lines.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

NOTIFY_SOCKET_VAR = "NOTIFY_SOCKET"
WATCHDOG_USEC_VAR = "WATCHDOG_USEC"
WATCHDOG_PID_VAR = "WATCHDOG_PID"

# A blocked notify socket (systemd busy or hung) must not stall the event loop
# for long; a dropped STATUS= or WATCHDOG=1 is harmless, the next one follows.
SEND_TIMEOUT = 1.0


def _socket_address(value: str) -> str | None:
    # sd_notify(3) accepts an absolute path or "@name" (Linux abstract
    # namespace, where the leading byte of the address is NUL); anything else
    # cannot be ours and is ignored as libsystemd does.
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value or "")
    except ValueError:
        return None
    return number if number > 0 else None


def _one_line(text: str) -> str:
    # A newline would end the STATUS= assignment and let the rest of the text
    # be read as another assignment.
    return " ".join(text.splitlines()).strip()


class Notifier:
    """Tells the service manager about start-up, reloads, shutdown and liveness.

    Disabled (every call is a no-op returning ``False``) when gpopd does not run
    under ``Type=notify``, so callers never need to check.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get(NOTIFY_SOCKET_VAR, ""))
        self.enabled: bool = self._address is not None
        self.watchdog_interval: float | None = None
        usec = _positive_int(env.get(WATCHDOG_USEC_VAR))
        watchdog_pid = env.get(WATCHDOG_PID_VAR)
        # WATCHDOG_PID names the process systemd watches; a child that
        # inherited the environment must not ping on its parent's behalf.
        for_us = watchdog_pid is None or _positive_int(watchdog_pid) == os.getpid()
        if self.enabled and usec is not None and for_us:
            # Half the timeout, as sd_watchdog_enabled(3) recommends, so one
            # late ping does not get the service killed.
            self.watchdog_interval = usec / 2 / 1_000_000

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` as one datagram; ``True`` if it was sent, never raises."""
        if self._address is None or not fields or any("\n" in f for f in fields):
            return False
        # "replace": a lone surrogate (from undecodable bytes) still yields valid UTF-8.
        data = "\n".join(fields).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(data, self._address)
        except (OSError, ValueError):
            # ValueError: an address that cannot be encoded (a lone surrogate).
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", f"STATUS={_one_line(status)}")

    def reloading(self) -> bool:
        """A reload has begun; ``ready()`` must follow when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """One line shown by ``systemctl status``."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Keep-alive ping; call every ``watchdog_interval`` seconds."""
        return self.notify("WATCHDOG=1")
