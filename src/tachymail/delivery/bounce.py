"""Delivery status notifications: RFC 3464 reports built by the rules of RFC 3461.

The one module that builds them, for the delivery worker and for ``tachymail queue
bounce`` alike. ``notifications`` turns what happened to some recipients into the
reports to queue (envelope and content, NOTIFY applied); ``operator_bounce`` does it for
recipients the operator gave up on. Below them, ``report_recipients`` applies NOTIFY (who
gets told about what), ``should_bounce`` the null-sender rule, and ``build_report`` writes
the report itself: a ``multipart/report`` (RFC 6522) with a human explanation, a
``message/delivery-status`` part and the returned message or its headers, ready to be
queued with the null sender ``<>`` and the MAIL parameters of ``report_mail_params``.

Decisions beyond the RFCs' MUSTs, which a caller may rely on:

- **What is returned** (RFC 3461 §4.3). RET applies to failure reports only: delay and
  success reports always return just the headers (nobody wants a second copy of a message
  that is still on its way or has arrived). A failure report returns the whole message with
  RET=FULL, the headers with RET=HDRS, and without RET the whole message up to
  ``RETURN_FULL_LIMIT`` (1 MiB) and the headers of anything larger. A message with a line
  longer than 998 octets cannot travel as ``message/rfc822`` (RFC 5322 §2.1.1), so only its
  headers are returned, whatever RET says; the text part says why.
- **Part types.** The message goes back as ``message/rfc822`` and the headers as
  ``text/rfc822-headers``; when the original's header block is not ASCII (an SMTPUTF8
  message) they are ``message/global`` and ``message/global-headers`` (RFC 6532 §3.7, RFC
  6533 §6.3). An 8-bit returned part is labelled ``Content-Transfer-Encoding: 8bit``, and so
  is the report.
- **7-bit where possible.** The ``message/delivery-status`` part is always ASCII, so any
  reader parses it: a non-ASCII address is written as ``utf-8; `` with the utf-8-addr-xtext
  form of RFC 6533 §3 (``j\\x{F6}rg@example.de``), and other non-ASCII text (an 8-bit
  diagnostic) has ``?`` in place of each such character. The text part keeps the full
  diagnostic (UTF-8, quoted-printable when not ASCII). So the report is 7-bit unless the
  envelope sender is non-ASCII (its To field) or the returned message is 8-bit;
  ``report_mail_params`` gives the MAIL parameters to queue it with.
- **Lines.** Every line ends in CRLF and none is longer than 998 octets: fields are folded at
  white space near 78 characters, a word longer than a line is split (which adds a space
  where it was cut), control characters become spaces, and runs of white space one space.
  The returned message's line ends are made CRLF.
- **Kind.** One report may mix actions; its subject and text follow the most urgent one:
  any "failed" makes it a failure report, else any "delayed" a delay report, else a success
  report. ``notifications`` makes one report per kind.
- **Diagnostic-Code** (RFC 3464 §2.3.6) is ``smtp; `` and the reply for what a server
  said or what the delivery worker says in its place; a recipient the operator bounced
  gets ``X-Tachymail; bounced by the operator ...`` (an ``X-`` type, as RFC 3464 allows
  for types not registered), with the last attempt's reply when there was one.
- **X-Tachymail-Bounce-Class** (an extension field of the per-recipient block) names the
  class the bounce classifier gave the reply (tachymail.delivery.classify), when it gave one.
"""

from __future__ import annotations

import logging
import re
import textwrap
from dataclasses import dataclass
from email.utils import formatdate

from tachymail.delivery.eightbit import qp_encode
from tachymail.queue.envelope import Envelope, Recipient, new_queue_id

__all__ = [
    "ACTIONS",
    "OPERATOR_BOUNCE_STATUS",
    "OPERATOR_BOUNCE_TEXT",
    "RETURN_FULL_LIMIT",
    "Notification",
    "RecipientReport",
    "build_report",
    "notifications",
    "operator_bounce",
    "report_mail_params",
    "report_recipients",
    "should_bounce",
]

log = logging.getLogger(__name__)

#: The Action values of RFC 3464 §2.3.3.
ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
#: Without RET, a failure report returns messages up to this size whole, larger ones' headers.
RETURN_FULL_LIMIT = 1 << 20

_MAX_LINE = 998  # RFC 5322 §2.1.1, without the CRLF
_FOLD_AT = 78
_TEXT_WIDTH = 76
# The NOTIFY keyword (RFC 3461 §4.1) that asks for a report with this action.
_NOTIFY_KEYWORD = {
    "failed": "FAILURE",
    "delayed": "DELAY",
    "delivered": "SUCCESS",
    "relayed": "SUCCESS",
    "expanded": "SUCCESS",
}
_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
}
#: what `tachymail queue bounce` gives as the reason: RFC 3463 X.0.0, "other or undefined"
OPERATOR_BOUNCE_STATUS = "5.0.0"
OPERATOR_BOUNCE_TEXT = "bounced by the operator (tachymail queue bounce)"
#: the Diagnostic-Code type of reasons no server gave (RFC 3464 §2.3.6: X- for unregistered)
_LOCAL_DIAGNOSTIC_TYPE = "X-Tachymail"
# The kind of report (its subject and NOTIFY keyword) each action goes into.
_REPORT_KIND = {
    "failed": "failed",
    "delayed": "delayed",
    "delivered": "delivered",
    "relayed": "delivered",
    "expanded": "delivered",
}
_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")  # RFC 3463 status-code
_FALLBACK_STATUS = {"failed": "5.0.0", "delayed": "4.0.0"}
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """What happened to one recipient, for one block of a report."""

    recipient: Recipient  # final recipient + its ORCPT/NOTIFY params
    action: str  # "failed" | "delayed" | "delivered" | "relayed" | "expanded"
    status: str  # enhanced status code, e.g. "5.1.1"
    diagnostic: str = ""  # the remote reply, e.g. "550 5.1.1 <bob@x>: user unknown"
    remote_mta: str = ""  # remote host name ("" when none was reached)
    last_attempt: float = 0.0  # unix time (0: not written)
    will_retry_until: float = 0.0  # for "delayed": the give-up time (0: not written)
    diagnostic_type: str = "smtp"  # RFC 3464 §2.3.6 diagnostic-type of *diagnostic*
    bounce_class: str = ""  # tachymail.delivery.classify's class of *diagnostic* ("": none)


@dataclass(frozen=True, slots=True)
class Notification:
    """One report ready to queue: its envelope (null sender, to the original sender, the
    MAIL parameters its content needs) and content, its kind ("failed", "delayed" or
    "delivered") and how many recipients it reports on."""

    envelope: Envelope
    content: bytes
    kind: str
    recipients: int


def should_bounce(envelope: Envelope) -> bool:
    """False when the envelope sender is the null path: a report is never sent to ``<>``
    (RFC 5321 §4.5.5), which is also what keeps reports about reports from looping."""
    return envelope.sender != ""


def report_recipients(envelope: Envelope, outcome: str) -> list[Recipient]:
    """The recipients of *envelope* whose NOTIFY asks for a report of *outcome*, in order.

    *outcome* is an action of ``ACTIONS``; "relayed" and "expanded" count as success.
    Without NOTIFY a recipient is told of failures and delays (RFC 3461 §4.1 lets the MTA
    choose; this is what senders expect), NOTIFY=NEVER of nothing, otherwise of what it
    names. Every recipient of *envelope* is considered, so the caller passes the envelope
    with the recipients that had this outcome. Empty when the sender is the null path.
    """
    keyword = _NOTIFY_KEYWORD.get(outcome)
    if keyword is None:
        raise ValueError(f"unknown outcome {outcome!r}: expected one of {', '.join(ACTIONS)}")
    if not should_bounce(envelope):
        return []
    return [recipient for recipient in envelope.recipients if _wants(recipient, keyword)]


def _wants(recipient: Recipient, keyword: str) -> bool:
    """Whether *recipient*'s NOTIFY asks for a report of *keyword* (see report_recipients)."""
    notify = recipient.params.get("NOTIFY")
    if notify is None:
        return keyword in ("FAILURE", "DELAY")
    return keyword in notify.upper().split(",")  # NEVER names no keyword


def notifications(
    envelope: Envelope,
    content: bytes,
    reports: list[RecipientReport],
    *,
    reporting_mta: str,
    now: float,
) -> list[Notification]:
    """The reports to queue about *reports* on the message (*envelope*, *content*).

    One report per kind of outcome (failures, successes, delays: see ``_REPORT_KIND``),
    each about the recipients whose NOTIFY asks for it (``report_recipients``), in that
    order; none to the null sender, none for a kind nobody asked about. Each comes with
    the envelope to queue it under: a new queue id, the null sender, the original sender
    as its one recipient, ``report_mail_params`` of its content, listener "dsn". Whether a
    delay is worth a report at all (the delay warning) is the caller's choice: it passes
    only the reports it wants sent. Raises ValueError as ``build_report`` does.
    """
    for report in reports:
        if report.action not in ACTIONS:
            raise ValueError(f"unknown action {report.action!r} for {report.recipient.address}")
    if not should_bounce(envelope):
        return []  # never report on a report (RFC 5321 §4.5.5, RFC 3461 §6.2)
    out: list[Notification] = []
    for kind in ("failed", "delivered", "delayed"):
        of_kind = [r for r in reports if _REPORT_KIND.get(r.action) == kind]
        if not of_kind:
            continue
        chosen = [r for r in of_kind if _wants(r.recipient, _NOTIFY_KEYWORD[kind])]
        if not chosen:
            continue
        queue_id = new_queue_id()
        body = build_report(
            envelope, content, chosen, reporting_mta=reporting_mta, now=now, queue_id=queue_id
        )
        dsn = Envelope(
            id=queue_id,
            sender="",
            recipients=[Recipient(envelope.sender)],
            mail_params=report_mail_params(body),
            arrival=now,
            size=len(body),
            helo=reporting_mta,
            listener="dsn",
        )
        out.append(Notification(dsn, body, kind, len(chosen)))
    return out


def operator_bounce(
    envelope: Envelope,
    content: bytes,
    recipients: list[Recipient],
    now: float,
    *,
    reporting_mta: str,
) -> list[tuple[Envelope, bytes]]:
    """The failure report (at most one) about *recipients*, which the operator bounced.

    *recipients* are as the queue last had them: each is reported ``failed`` with Status
    ``5.0.0`` and ``Diagnostic-Code: X-Tachymail; bounced by the operator (tachymail
    queue bounce)``, followed by ``; last attempt: <reply>`` when an attempt was made
    (whose time is then the Last-Attempt-Date). NOTIFY, ENVID, ORCPT and RET apply as to
    every report (see ``notifications``). Returns (envelope, content) pairs to queue.
    """
    reports = []
    for rcpt in recipients:
        diagnostic = OPERATOR_BOUNCE_TEXT
        if rcpt.attempts and rcpt.last_reply:
            diagnostic += f"; last attempt: {rcpt.last_reply}"
        reports.append(
            RecipientReport(
                recipient=rcpt,
                action="failed",
                status=OPERATOR_BOUNCE_STATUS,
                diagnostic=diagnostic,
                last_attempt=rcpt.last_attempt if rcpt.attempts else 0.0,
                diagnostic_type=_LOCAL_DIAGNOSTIC_TYPE,
            )
        )
    found = notifications(envelope, content, reports, reporting_mta=reporting_mta, now=now)
    return [(n.envelope, n.content) for n in found]


def report_mail_params(report: bytes) -> dict[str, str]:
    """The MAIL FROM parameters to queue *report* with: ``BODY=8BITMIME`` when it is 8-bit,
    and ``SMTPUTF8`` too when its own header block is (a non-ASCII sender address)."""
    if report.isascii():
        return {}
    params = {"BODY": "8BITMIME"}
    end = report.find(b"\r\n\r\n")
    if not report[: end if end >= 0 else len(report)].isascii():
        params["SMTPUTF8"] = ""
    return params


def build_report(
    envelope: Envelope,
    content: bytes,
    reports: list[RecipientReport],
    *,
    reporting_mta: str,
    now: float,
    queue_id: str,
) -> bytes:
    """The RFC 3464 report about *reports* on the message (*envelope*, *content*).

    A complete RFC 5322 message with CRLF line ends and no line over 998 octets, addressed
    to the envelope sender, from ``MAILER-DAEMON@reporting_mta``, dated *now*. *queue_id*
    is the report's own queue id (it makes its Message-ID); the original's, ``envelope.id``,
    is named in the text and in an ``X-Tachymail-Queue-ID`` field of the delivery-status
    part. *content* may be empty: then nothing is returned. The module docstring says
    what is returned and how 8-bit text is written. Raises ValueError when *reports* is
    empty, names an unknown action, or the sender is the null path (see ``should_bounce``).
    An invalid status code is replaced by the generic one of its action (5.0.0, 4.0.0,
    2.0.0) and logged.
    """
    if not reports:
        raise ValueError("a delivery report needs at least one recipient")
    if not should_bounce(envelope):
        raise ValueError("no report is sent to the null sender")
    for report in reports:
        if report.action not in ACTIONS:
            raise ValueError(f"unknown action {report.action!r} for {report.recipient.address}")
    actions = {report.action for report in reports}
    kind = "failed" if "failed" in actions else "delayed" if "delayed" in actions else "delivered"

    returned, note = _returned(envelope, content, kind)
    parts = [
        _text_part(envelope, reports, kind, note, reporting_mta),
        _status_part(envelope, reports, reporting_mta),
    ]
    if returned is not None:
        parts.append(returned)
    boundary = _boundary(queue_id, now, parts)
    eight_bit = any(not part.isascii() for part in parts)

    head = [
        _field("From", f'"Mail Delivery System" <MAILER-DAEMON@{_ascii(reporting_mta)}>'),
        _field("To", _printable(envelope.sender)),
        _field("Subject", _SUBJECTS[kind]),
        _field("Date", formatdate(now)),
        _field("Message-ID", f"<{int(now)}.{_ascii(queue_id)}.dsn@{_ascii(reporting_mta)}>"),
        "Auto-Submitted: auto-replied\r\n",  # RFC 3834 §5: no auto-replies to this
        "MIME-Version: 1.0\r\n",
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f' boundary="{boundary}"\r\n',
    ]
    if eight_bit:
        head.append("Content-Transfer-Encoding: 8bit\r\n")
    delimiter = f"\r\n--{boundary}\r\n".encode()
    body = [
        "".join(head).encode(),
        b"\r\nThis is a MIME-encapsulated message.\r\n",
        delimiter,
        delimiter.join(parts),
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(body)


# ---------------------------------------------------------------------------------------------
# The three parts


def _text_part(
    envelope: Envelope,
    reports: list[RecipientReport],
    kind: str,
    note: str,
    reporting_mta: str,
) -> bytes:
    """Part 1: what happened, in words, for the person who sent the message."""
    intro = {
        "failed": "Your message could not be delivered to one or more of its recipients. "
        "Delivery to the addresses below failed permanently and will not be retried.",
        "delayed": "Your message has not been delivered yet to the addresses below. The mail "
        "system keeps trying; you do not need to send it again.",
        "delivered": "Your message was delivered to the addresses below.",
    }[kind]
    paragraphs = [f"This is the mail system at host {_printable(reporting_mta)}.", intro]
    lines: list[str] = []
    for report in reports:
        state = {
            "failed": "delivery failed",
            "delayed": "delivery delayed",
            "delivered": "delivered",
            "relayed": "relayed to a system that sends no delivery reports",
            "expanded": "delivered to a list or alias, which passed it on",
        }[report.action]
        line = f"<{_printable(report.recipient.address)}>: {state} ({_status(report)})"
        if report.action == "delayed" and report.will_retry_until:
            line += f"; retried until {formatdate(report.will_retry_until)}"
        lines.append(line)
        diagnostic = _printable(report.diagnostic)
        if diagnostic and report.remote_mta:
            lines.append(f"    host {_printable(report.remote_mta)} said: {diagnostic}")
        elif diagnostic:
            lines.append(f"    {diagnostic}")
    paragraphs = [_wrap(paragraph) for paragraph in paragraphs]
    paragraphs.append(_wrap("\n".join(lines), hanging="    "))
    if note:
        paragraphs.append(_wrap(note))
    paragraphs.append(_wrap(f"Queue ID of your message: {_printable(envelope.id)}"))
    wrapped = "\r\n\r\n".join(paragraphs) + "\r\n"
    data = wrapped.encode("utf-8", "replace")
    if data.isascii():
        head = "Content-Type: text/plain; charset=us-ascii\r\n"
    else:
        head = "Content-Type: text/plain; charset=utf-8\r\n"
        head += "Content-Transfer-Encoding: quoted-printable\r\n"
        data = qp_encode(data)
    head += "Content-Description: Notification\r\n\r\n"
    return head.encode() + data


def _status_part(envelope: Envelope, reports: list[RecipientReport], reporting_mta: str) -> bytes:
    """Part 2: the machine-readable report (RFC 3464 §2.2 and §2.3), always ASCII."""
    per_message = [
        _field("Reporting-MTA", f"dns; {_ascii(reporting_mta)}"),
        _field("X-Tachymail-Queue-ID", _ascii(envelope.id)),
    ]
    envid = envelope.mail_params.get("ENVID")
    if envid:
        per_message.append(_field("Original-Envelope-Id", _ascii(envid)))
    if envelope.helo:
        peer = f" ([{_ascii(envelope.client_ip)}])" if envelope.client_ip else ""
        per_message.append(_field("Received-From-MTA", f"dns; {_ascii(envelope.helo)}{peer}"))
    if envelope.arrival:
        per_message.append(_field("Arrival-Date", formatdate(envelope.arrival)))
    blocks = ["".join(per_message)]
    for report in reports:
        fields = []
        orcpt = report.recipient.params.get("ORCPT")
        if orcpt:
            fields.append(_field("Original-Recipient", _ascii(orcpt)))
        fields.append(_field("Final-Recipient", _address_field(report.recipient.address)))
        fields.append(_field("Action", report.action))
        fields.append(_field("Status", _status(report)))
        if report.remote_mta:
            fields.append(_field("Remote-MTA", f"dns; {_ascii(report.remote_mta)}"))
        diagnostic = _ascii(report.diagnostic)
        if diagnostic:
            kind = _ascii(report.diagnostic_type) or "smtp"
            fields.append(_field("Diagnostic-Code", f"{kind}; {diagnostic}"))
        if report.bounce_class:
            # An extension field (RFC 3464 §3: "X-" names are for local use).
            fields.append(_field("X-Tachymail-Bounce-Class", _ascii(report.bounce_class)))
        if report.last_attempt:
            fields.append(_field("Last-Attempt-Date", formatdate(report.last_attempt)))
        if report.action == "delayed" and report.will_retry_until:
            fields.append(_field("Will-Retry-Until", formatdate(report.will_retry_until)))
        blocks.append("".join(fields))
    head = "Content-Type: message/delivery-status\r\nContent-Description: Delivery report\r\n"
    return (head + "\r\n" + "\r\n".join(blocks)).encode("ascii")


def _returned(envelope: Envelope, content: bytes, kind: str) -> tuple[bytes | None, str]:
    """Part 3 (None when *content* is empty) and the sentence about it for part 1."""
    if not content:
        return None, ""
    content = _crlf(content)
    ret = envelope.mail_params.get("RET")
    full = kind == "failed" and (
        ret == "FULL" or (ret is None and len(content) <= RETURN_FULL_LIMIT)
    )
    note = "Your message is attached." if full else "The headers of your message are attached."
    if kind == "failed" and not full and ret is None:
        note = "Your message is larger than 1 MiB: only its headers are attached."
    if full and max(map(len, content.splitlines()), default=0) > _MAX_LINE:
        full = False
        note = "Your message has lines too long to return it whole: its headers are attached."
    if full:
        data = content
        ctype = "message/rfc822" if _header_block(content).isascii() else "message/global"
        description = "Undelivered message"
    else:
        data = _fold_long_lines(_header_block(content))
        ctype = "text/rfc822-headers" if data.isascii() else "message/global-headers"
        description = "Undelivered message headers" if kind == "failed" else "Message headers"
    head = f"Content-Type: {ctype}\r\nContent-Description: {description}\r\n"
    if not data.isascii():
        head += "Content-Transfer-Encoding: 8bit\r\n"
    return head.encode() + b"\r\n" + data, note


# ---------------------------------------------------------------------------------------------
# Helpers


def _status(report: RecipientReport) -> str:
    if _STATUS.fullmatch(report.status):
        return report.status
    fallback = _FALLBACK_STATUS.get(report.action, "2.0.0")
    log.warning(
        "invalid status %r for %s in a delivery report, using %s",
        report.status,
        report.recipient.address,
        fallback,
    )
    return fallback


def _boundary(queue_id: str, now: float, parts: list[bytes]) -> str:
    """A boundary (RFC 2046 §5.1.1) found in no part; "=_" never occurs in
    quoted-printable text, and the counter settles the rest."""
    base = f"=_{_ascii(queue_id)[:40]}.{int(now)}"
    boundary, n = base, 0
    while any(f"--{boundary}".encode() in part for part in parts):
        n += 1
        boundary = f"{base}.{n}"
    return boundary


def _header_block(content: bytes) -> bytes:
    """The header fields of *content* (CRLF-terminated), without the blank line."""
    if content.startswith(b"\r\n"):
        return b""
    end = content.find(b"\r\n\r\n")
    return content if end < 0 else content[: end + 2]


def _crlf(content: bytes) -> bytes:
    crlf = content.count(b"\r\n")
    if content.count(b"\n") == crlf and content.count(b"\r") == crlf:
        return content
    return re.sub(rb"\r\n|\r|\n", b"\r\n", content)


def _fold_long_lines(block: bytes) -> bytes:
    """Header lines over 998 octets split into continuation lines (only for returned copies)."""
    if max(map(len, block.splitlines()), default=0) <= _MAX_LINE:
        return block
    out = []
    for line in block.split(b"\r\n"):
        while len(line) > _MAX_LINE:
            out.append(line[:_MAX_LINE])
            line = b" " + line[_MAX_LINE:]
        out.append(line)
    return b"\r\n".join(out)


def _printable(text: str) -> str:
    """*text* on one line: control characters (and lone surrogates) as spaces, white space
    runs as one space, none at either end."""
    cleaned = "".join(
        c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else " " for c in text
    )
    return _SPACES.sub(" ", cleaned).strip()


def _ascii(text: str) -> str:
    """``_printable(text)`` with ``?`` for every non-ASCII character."""
    return "".join(c if c.isascii() else "?" for c in _printable(text))


def _address_field(address: str) -> str:
    """An address-type and address for Final-Recipient (RFC 3464 §2.3.2, RFC 6533 §3)."""
    if address.isascii():
        return f"rfc822; {_ascii(address)}"
    chars = (c if "!" <= c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):02X}}}" for c in address)
    return "utf-8; " + "".join(chars)


def _field(name: str, value: str) -> str:
    """``Name: value`` folded before a space near 78 characters, CRLF-terminated; a word too
    long for a 998-octet line is split there (a space is added where it was cut)."""
    line = f"{name}: {value}"
    hard = _MAX_LINE if line.isascii() else _MAX_LINE // 4  # UTF-8: <= 4 octets a character
    low = len(name) + 3  # leave "Name: " and at least one character on the first line
    out = []
    while len(line) > _FOLD_AT:
        cut = line.rfind(" ", low, _FOLD_AT + 1)
        if cut < 0:  # a long word: break after it, or inside it when it is far too long
            cut = line.find(" ", _FOLD_AT + 1)
            if cut < 0 or cut > hard:
                if len(line) <= hard:
                    break
                cut = hard
        out.append(line[:cut])
        line = line[cut:] if line[cut] == " " else " " + line[cut:]
        low = 2  # continuation lines: the folding space and at least one character
    out.append(line)
    return "\r\n".join(out) + "\r\n"


def _wrap(paragraph: str, hanging: str = "") -> str:
    """*paragraph* wrapped at 76 characters for the text part, CRLF between lines; a
    continuation line gets the indentation of the line it continues plus *hanging*."""
    out: list[str] = []
    for line in paragraph.split("\n"):
        indent = " " * (len(line) - len(line.lstrip(" ")))
        wrapped = textwrap.wrap(
            line,
            width=_TEXT_WIDTH,
            subsequent_indent=indent + hanging,
            break_long_words=True,
            break_on_hyphens=False,
        )
        out.extend(wrapped or [""])
    return "\r\n".join(out)
