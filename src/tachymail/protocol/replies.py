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
# AUTH brute-force lockout (issue 16): temporary, so a locked-out user retries later.
AUTH_LOCKED = reply(454, "4.7.0", "Temporary authentication failure: too many failures, try later")
# RFC 4954 §4: an AUTH exchange line over the limit ends the exchange.
AUTH_LINE_TOO_LONG = reply(500, "5.5.6", "Authentication Exchange line is too long")


def unknown_local_user(address: str) -> bytes:
    """550 5.1.1 for a recipient in a local domain that has no mailbox (as Postfix words it)."""
    return reply(
        550,
        "5.1.1",
        f"<{address}>: Recipient address rejected: User unknown in local recipient table",
    )


def suppressed_recipient(address: str, reason: str) -> bytes:
    """550 5.7.1 for a recipient on the suppression list; *reason* is shortened to keep
    the reply line within RFC 5321's 512 octets, and to ASCII unless it is."""
    gist = " ".join(reason.split())[:200].encode("ascii", "replace").decode() or "no reason given"
    return reply(550, "5.7.1", f"<{address}>: Recipient address rejected: suppressed ({gist})")


def mailbox_full(address: str) -> bytes:
    """452 4.2.2 for a local recipient whose mailbox holds its quota already (temporary:
    the sender retries while the user makes room)."""
    return reply(452, "4.2.2", f"<{address}>: Recipient address rejected: Mailbox full")


def sender_not_owned(address: str, user: str) -> bytes:
    """553 5.7.1 for a MAIL FROM the authenticated *user* does not own (sender-login policy)."""
    return reply(553, "5.7.1", f"<{address}>: Sender address rejected: not owned by user {user}")


#: longest reply text: code, status and CRLF fit the 512-octet reply line (RFC 5321 §4.5.3.1.5)
REPLY_TEXT_LIMIT = 490


def undeliverable_recipient(address: str, status: str, detail: str) -> bytes:
    """550 for a relay-domain recipient its next hop refused when probed (Postfix's words);
    *status* is 5.1.1 for a refused RCPT, or the routing failure's (5.1.2, 5.1.10)."""
    text = f"<{address}>: Recipient address rejected: undeliverable address: {detail}"
    return reply(550, status, text[:REPLY_TEXT_LIMIT])


def unverified_recipient(address: str, detail: str) -> bytes:
    """450 4.1.1 for a relay-domain recipient whose probe could not tell (a 4xx, a timeout,
    no connection): Postfix's unverified_recipient_defer_code."""
    text = f"<{address}>: Recipient address rejected: unverified address: {detail}"
    return reply(450, "4.1.1", text[:REPLY_TEXT_LIMIT])
