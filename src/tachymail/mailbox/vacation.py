"""Vacation replies (RFC 8621 §8 VacationResponse, RFC 3834 automatic responses).

The user's setting is the JSON file JMAP's ``VacationResponse/set`` writes
(:func:`vacation_path`); local delivery and LMTP read it for each message delivered to the
user (:func:`load_vacation`: one failed ``open`` when there is none). A reply is due when
the setting is enabled and *now* is within fromDate/toDate, and the message is one a
personal responder may answer (:func:`may_reply`, RFC 3834 §2): not from the null sender
or a list or daemon address, no ``Auto-Submitted`` other than "no", no ``List-*`` field,
no ``Precedence`` bulk/list/junk, not from the user. The store remembers whom it answered
(``MailboxStore`` ``replies``): one reply per sender per ``mailbox.vacation_reply_days``.

:func:`auto_reply` writes the reply (``Auto-Submitted: auto-replied``, In-Reply-To and
References of the original, the setting's subject or "Auto: " + the original's, its text
and HTML bodies); the caller queues it with the null envelope sender (RFC 3834 §3.3: its
bounces go nowhere, so two responders never loop).
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import quopri
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from pathlib import Path

import orjson

from tachymail.mailbox.threads import message_ids
from tachymail.protocol.mime import header_value

log = logging.getLogger(__name__)

#: where JMAP keeps per-user settings, under data_dir
SETTINGS_DIRECTORY = Path("jmap") / "settings"
#: the longest subject and bodies a reply carries (a setting is bounded by JMAP's request
#: size already; this keeps a hand-edited file from making a huge reply)
MAX_TEXT = 64 * 1024
# senders that are programs, not people (RFC 3834 §2: do not answer them)
_PROGRAM_SENDER = re.compile(
    r"^(mailer-daemon|postmaster|listserv|majordomo|owner-.*|.*-request|.*-owner|"
    r"no-?reply|bounces?(\+.*)?)@",
    re.IGNORECASE,
)


def vacation_path(data_path: Path, user: str) -> Path:
    """The file holding *user*'s VacationResponse (named by the user's JMAP account id)."""
    account = "a" + hashlib.blake2b(user.lower().encode(), digest_size=8).hexdigest()
    return data_path / SETTINGS_DIRECTORY / f"{account}.vacation.json"


def parse_utc_date(value: object) -> float | None:
    """The instant of an RFC 3339 date-time (JMAP's UTCDate, any offset accepted); None
    when *value* is not one."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


@dataclass(slots=True, frozen=True)
class Vacation:
    """An enabled VacationResponse (the window already checked)."""

    subject: str | None
    text_body: str | None
    html_body: str | None


def load_vacation(data_path: Path, user: str, now: float | None = None) -> Vacation | None:
    """*user*'s vacation when it is enabled and *now* is within its fromDate (inclusive)
    and toDate (exclusive); None otherwise, or when the file is missing or broken (logged)."""
    path = vacation_path(data_path, user)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("vacation setting of %s unreadable: %s", user, exc)
        return None
    try:
        stored = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        log.warning("vacation setting of %s is not JSON: %s", user, exc)
        return None
    if not isinstance(stored, dict) or stored.get("isEnabled") is not True:
        return None
    when = time.time() if now is None else now
    start, end = parse_utc_date(stored.get("fromDate")), parse_utc_date(stored.get("toDate"))
    if (start is not None and when < start) or (end is not None and when >= end):
        return None

    def text(name: str) -> str | None:
        value = stored.get(name)
        return value[:MAX_TEXT] if isinstance(value, str) else None

    return Vacation(text("subject"), text("textBody"), text("htmlBody"))


def _field(headers: bytes, name: bytes) -> str:
    value = header_value(headers, name)
    return "" if value is None else value.decode("utf-8", "replace").strip()


def may_reply(content: bytes, sender: str, own: set[str]) -> bool:
    """Whether RFC 3834 §2 lets a personal responder answer this message from envelope
    *sender* (*own*: the user's addresses, lower case; never answered)."""
    address = sender.strip().strip("<>").lower()
    if not address or "@" not in address or address in own:
        return False
    if _PROGRAM_SENDER.match(address):
        return False
    end = content.find(b"\r\n\r\n")
    headers = content[: end + 2] if 0 <= end < 262144 else content[:262144]
    auto = _field(headers, b"auto-submitted").split(";")[0].strip().lower()
    if auto and auto != "no":
        return False
    if _field(headers, b"precedence").lower() in ("bulk", "list", "junk"):
        return False
    # List-Id, List-Unsubscribe, List-Post, ...: mailing-list traffic (RFC 2369, 2919)
    return not any(line[:5].lower() == b"list-" for line in headers.split(b"\n"))


def _header_text(value: str) -> str:
    """A header field body of *value*: one line, RFC 2047 encoded when not ASCII."""
    flat = " ".join(value.split())
    if flat.isascii():
        return flat
    return Header(flat, "utf-8").encode()


def auto_reply(
    vacation: Vacation, user: str, content: bytes, hostname: str, now: float | None = None
) -> bytes:
    """The reply of *user* (its From) to *content* (the message as received): CRLF lines,
    ``Auto-Submitted: auto-replied``, In-Reply-To/References, To the original's Reply-To
    or From (the envelope sender is the caller's business)."""
    end = content.find(b"\r\n\r\n")
    headers = content[: end + 2] if 0 <= end < 262144 else content[:262144]
    original_id = message_ids(header_value(headers, b"message-id"))
    references = message_ids(header_value(headers, b"references"))[-20:]
    if not references:
        references = message_ids(header_value(headers, b"in-reply-to"))[:1]
    subject = vacation.subject
    if not subject:
        subject = "Auto: " + (_field(headers, b"subject") or "your message")
    to = _field(headers, b"reply-to") or _field(headers, b"from")
    when = time.time() if now is None else now
    lines = [
        f"From: <{user}>",
        f"To: {_header_text(to)}" if to else "",
        f"Subject: {_header_text(subject[:998])}",
        f"Date: {email.utils.formatdate(when)}",
        f"Message-ID: <{uuid.uuid4().hex}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "X-Auto-Response-Suppress: All",
        "Precedence: bulk",
        "MIME-Version: 1.0",
    ]
    if original_id:
        parent = original_id[0].decode("ascii", "replace")
        lines.append(f"In-Reply-To: {parent}")
        chain = [r.decode("ascii", "replace") for r in references] + [parent]
        lines.append("References: " + "\r\n ".join(chain))
    text = vacation.text_body
    html = vacation.html_body
    if not text and not html:
        text = "I am away and will read your message when I am back."
    if text and html:
        boundary = f"=_{uuid.uuid4().hex}"
        lines.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
        body = (
            f"--{boundary}\r\n{_part('plain', text)}\r\n--{boundary}\r\n"
            f"{_part('html', html)}\r\n--{boundary}--\r\n"
        )
    else:
        body = _part("plain" if text else "html", text or html or "")
        head, _, rest = body.partition("\r\n\r\n")
        lines.extend(head.split("\r\n"))
        body = rest
    return ("\r\n".join(line for line in lines if line) + "\r\n\r\n" + body).encode()


def _part(subtype: str, text: str) -> str:
    """A text part (headers, blank line, quoted-printable body) of *text*."""
    normalized = "\n".join(text.splitlines()) + "\n"
    encoded = quopri.encodestring(normalized.encode("utf-8")).decode("ascii")
    encoded = "\r\n".join(encoded.splitlines()) + "\r\n"
    return (
        f"Content-Type: text/{subtype}; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: quoted-printable\r\n\r\n{encoded}"
    )
