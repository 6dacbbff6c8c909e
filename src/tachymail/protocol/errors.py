"""Errors raised by the parsers, each carrying the SMTP reply it turns into."""

from __future__ import annotations


class SmtpSyntaxError(ValueError):
    """A command or parameter the server must refuse.

    ``code`` is the SMTP reply code, ``status`` the RFC 3463 enhanced status
    code and ``text`` the human-readable part; the server sends them as one
    reply line and the transaction state is left unchanged.
    """

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(f"{code} {status} {text}")
        self.code = code
        self.status = status
        self.text = text

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SmtpSyntaxError):
            return NotImplemented
        return (self.code, self.status, self.text) == (other.code, other.status, other.text)

    def __hash__(self) -> int:
        return hash((self.code, self.status, self.text))

    def __reduce__(self) -> tuple[type[SmtpSyntaxError], tuple[int, str, str]]:
        return (SmtpSyntaxError, (self.code, self.status, self.text))
