"""Hard limits of the POP3 engine.

Each one bounds how much a hostile or broken server can make the client
buffer or parse; overrunning any of them is a ``RemoteProtocolError`` (or a
``LocalProtocolError`` for our own commands) that names the limit.
"""

from __future__ import annotations

from typing import Final

# RFC 2449 section 4: the first line of a response is at most 512 octets
# including the CRLF.  Applies to the greeting and every +OK/-ERR line.
MAX_STATUS_LINE: Final = 512
# RFC 2449 section 5: each capability line is at most 512 octets.
MAX_CAPA_LINE: Final = 512
# One "n size" or "n uid" line of a LIST/UIDL listing.
MAX_LISTING_LINE: Final = 512
# RFC 1939 section 7: a unique-id is 1 to 70 characters in 0x21..0x7E.
MAX_UID_LENGTH: Final = 70
# Entries of one LIST/UIDL/CAPA reply; far above any real maildrop listing
# (Gmail offers about 250 messages per session).  A listed message costs the
# poll about 0.8 KB (its UIDL and LIST entries, the plan, the pending row), so
# a server listing this many keeps the whole process under 100 MB RSS;
# 250,000 let one hostile listing take it past 200 MB.
MAX_LISTING_ENTRIES: Final = 50_000
# One line of RETR/TOP content, counted without its line end.  Messages have
# no line limit in POP3; this only stops an endless line from a broken server.
MAX_CONTENT_LINE: Final = 4 * 1024 * 1024
# RFC 2449 section 4: a command is at most 255 octets including the CRLF.
MAX_COMMAND_LENGTH: Final = 255
# RFC 5034 lifts the command limit for SASL responses; an OAuth token
# response is a few kilobytes at most.
MAX_SASL_RESPONSE: Final = 16 * 1024
# A "+ challenge" line from the server during AUTH.
MAX_CHALLENGE: Final = 16 * 1024
# Decimal numbers in listings: 10 digits covers 32-bit message numbers and
# sizes of several gigabytes.
MAX_NUMBER_DIGITS: Final = 10
# The STAT total may legitimately exceed 10 digits for a very large maildrop.
MAX_TOTAL_SIZE_DIGITS: Final = 20
