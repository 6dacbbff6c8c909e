"""LMTP (RFC 2033): another MTA hands us mail for local mailboxes, one reply per recipient."""

from tachymail.lmtp.session import LmtpSession

__all__ = ["LmtpSession"]
