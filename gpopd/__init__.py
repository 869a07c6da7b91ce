"""gpopd: poll POP3 mailboxes and deliver every message exactly once."""

__version__ = "0.1.0"
