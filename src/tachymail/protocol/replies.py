"""The one place SMTP replies are formatted (RFC 5321 §4.2, RFC 3463 enhanced codes)."""

from __future__ import annotations

from collections.abc import Sequence


def reply(code: int, status: str, text: str) -> bytes:
    """A one-line reply: ``"250 2.0.0 Ok\\r\\n"``; ``status`` may be "" (220/221 greetings)."""
    if status:
        return f"{code} {status} {text}\r\n".encode()
    return f"{code} {text}\r\n".encode()


def multiline(code: int, lines: Sequence[str], status: str = "") -> bytes:
    """A multi-line reply: every line but the last has a hyphen after the code."""
    prefix = f"{code} {status} " if status else f"{code} "
    dash = f"{code}-{status} " if status else f"{code}-"
    out = [f"{dash}{line}\r\n" for line in lines[:-1]]
    out.append(f"{prefix}{lines[-1]}\r\n")
    return "".join(out).encode()


# Replies sent often enough to keep as constants.
OK = reply(250, "2.0.0", "Ok")
DATA_GO_AHEAD = reply(354, "", "End data with <CR><LF>.<CR><LF>")
BYE = reply(221, "2.0.0", "Bye")
BAD_SEQUENCE_HELO = reply(503, "5.5.1", "Error: send HELO/EHLO first")
BAD_SEQUENCE_MAIL = reply(503, "5.5.1", "Error: need MAIL command")
BAD_SEQUENCE_RCPT = reply(503, "5.5.1", "Error: need RCPT command")
NESTED_MAIL = reply(503, "5.5.1", "Error: nested MAIL command")
NO_VALID_RCPT = reply(554, "5.5.1", "Error: no valid recipients")
UNKNOWN_COMMAND = reply(500, "5.5.2", "Error: command not recognized")
# 5.5.0, not 5.5.6: RFC 4954 gives X.5.6 to over-long AUTH exchange lines only.
LINE_TOO_LONG = reply(500, "5.5.0", "Error: line too long")
BARE_NEWLINE_COMMAND = reply(500, "5.5.2", "Error: bare <CR> or <LF> in command")
TOO_MANY_ERRORS = reply(421, "4.7.0", "Error: too many errors, closing connection")
TOO_MANY_RECIPIENTS = reply(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = reply(552, "5.3.4", "Error: message size exceeds fixed limit")
BARE_NEWLINE_DATA = reply(550, "5.6.0", "Error: bare <CR> or <LF> in message data")
STORAGE_FULL = reply(452, "4.3.1", "Error: insufficient system storage")
LOCAL_ERROR = reply(451, "4.3.0", "Error: local error in processing")
TIMEOUT = reply(421, "4.4.2", "Error: timeout exceeded, closing connection")
RELAY_DENIED = reply(554, "5.7.1", "Error: relay access denied")
AUTH_REQUIRED = reply(530, "5.7.0", "Error: authentication required")
TLS_REQUIRED = reply(530, "5.7.0", "Error: must issue a STARTTLS command first")
ENCRYPTION_REQUIRED = reply(
    538, "5.7.11", "Error: encryption required for requested authentication mechanism"
)
AUTH_OK = reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = reply(535, "5.7.8", "Error: authentication credentials invalid")
VRFY_REPLY = reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
