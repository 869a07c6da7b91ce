"""Errors of the POP3 engine.

Modelled on h11: *Local* means the caller misused the engine or asked for an
invalid command; *Remote* means the server broke the protocol or one of the
engine's limits.  Either one leaves the connection in ``State.ERROR``.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every error the POP3 engine raises."""


class LocalProtocolError(ProtocolError):
    """The caller misused the engine or tried to send an invalid command."""


class RemoteProtocolError(ProtocolError):
    """The server violated the protocol or exceeded one of the engine's limits."""
