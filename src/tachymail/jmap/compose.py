"""A message built from an Email/set ``create`` object (RFC 8621 §4.6): drafts the web
page composes. Header properties become fields, ``textBody``/``htmlBody`` take their text
from ``bodyValues``, ``attachments`` take their octets from blobs the user uploaded (or
parts of the user's messages: forwarding). CRLF line ends, as the store keeps mail."""

from __future__ import annotations

import email.policy
import email.utils
import secrets
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

from tachymail.http.compose import FIELD_NAME

if TYPE_CHECKING:
    from tachymail.jmap.account import Account

_ADDRESS_FIELDS = {
    "from": "From",
    "sender": "Sender",
    "to": "To",
    "cc": "Cc",
    "bcc": "Bcc",
    "replyTo": "Reply-To",
}
_ALLOWED = {
    *_ADDRESS_FIELDS, "subject", "sentAt", "messageId", "inReplyTo", "references", "keywords",
    "mailboxIds", "receivedAt", "textBody", "htmlBody", "attachments", "bodyValues",
}  # fmt: skip


def _addresses(value: Any, name: str) -> str:
    if not isinstance(value, list):
        raise ValueError(f"{name} must be an array of EmailAddress")
    out = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("email"), str):
            raise ValueError(f"{name}: an EmailAddress needs 'email'")
        address = item["email"]
        if any(ch in address for ch in "\r\n<>,") or "@" not in address:
            raise ValueError(f"{name}: bad address {address!r}")
        display = item.get("name")
        out.append(email.utils.formataddr((display if isinstance(display, str) else "", address)))
    return ", ".join(out)


def _ids(value: Any, name: str) -> str:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be an array of message ids")
    if any(any(ch in v for ch in "<>\r\n ") for v in value):
        raise ValueError(f"{name}: bad message id")
    return " ".join(f"<{v}>" for v in value)


def _text_of(props: dict[str, Any], parts: Any, name: str) -> str | None:
    if parts is None:
        return None
    if not isinstance(parts, list) or len(parts) != 1 or not isinstance(parts[0], dict):
        raise ValueError(f"{name} must hold exactly one part")
    part_id = parts[0].get("partId")
    values = props.get("bodyValues") or {}
    value = values.get(part_id) if isinstance(values, dict) else None
    if not isinstance(value, dict) or not isinstance(value.get("value"), str):
        raise ValueError(f"{name}: no bodyValues for part {part_id!r}")
    text: str = value["value"]
    return text


def build_message(account: Account, props: dict[str, Any]) -> bytes:
    """The RFC 5322 octets of the create object *props*; ValueError names what is wrong."""
    unknown = [k for k in props if k not in _ALLOWED and not k.startswith("header:")]
    if unknown:
        raise ValueError(f"unsupported properties: {', '.join(sorted(unknown))}")
    message = EmailMessage(policy=email.policy.SMTP)
    for prop, field in _ADDRESS_FIELDS.items():
        if props.get(prop) is not None:
            message[field] = _addresses(props[prop], prop)
    subject = props.get("subject")
    if subject is not None:
        if not isinstance(subject, str):
            raise ValueError("subject must be a string")
        message["Subject"] = subject
    sent = props.get("sentAt")
    message["Date"] = (
        sent if isinstance(sent, str) and sent else email.utils.formatdate(localtime=False)
    )
    if isinstance(sent, str) and sent:
        import datetime

        try:
            when = datetime.datetime.fromisoformat(sent.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError("sentAt is not a date") from None
        del message["Date"]
        message["Date"] = email.utils.format_datetime(when)
    if props.get("messageId") is not None:
        message["Message-ID"] = _ids(props["messageId"], "messageId")
    else:
        domain = account.user.rpartition("@")[2] or "localhost"
        message["Message-ID"] = f"<{secrets.token_hex(12)}@{domain}>"
    for prop, field in (("inReplyTo", "In-Reply-To"), ("references", "References")):
        if props.get(prop) is not None:
            message[field] = _ids(props[prop], prop)
    for key, value in props.items():
        if key.startswith("header:"):
            name = key.split(":")[1]
            if not FIELD_NAME.fullmatch(name):
                raise ValueError(f"{key}: not a header field name (RFC 5322 section 3.6.8)")
            if not isinstance(value, str) or "\n" in value or "\r" in value:
                raise ValueError(f"{key}: a raw header value without line breaks")
            message[name] = value.strip()
    text = _text_of(props, props.get("textBody"), "textBody")
    html = _text_of(props, props.get("htmlBody"), "htmlBody")
    if text is None and html is None:
        text = ""
    if text is not None:
        message.set_content(text, subtype="plain", cte="quoted-printable")
        if html is not None:
            message.add_alternative(html, subtype="html", cte="quoted-printable")
    elif html is not None:
        message.set_content(html, subtype="html", cte="quoted-printable")
    attachments = props.get("attachments") or []
    if not isinstance(attachments, list):
        raise ValueError("attachments must be an array")
    for item in attachments:
        if not isinstance(item, dict) or not isinstance(item.get("blobId"), str):
            raise ValueError("an attachment needs a blobId")
        data = account.read_blob(item["blobId"])
        if data is None:
            raise ValueError(f"no blob {item['blobId']!r}")
        kind = item.get("type") if isinstance(item.get("type"), str) else None
        maintype, _, subtype = (kind or "application/octet-stream").partition("/")
        filename = item.get("name") if isinstance(item.get("name"), str) else None
        disposition = "inline" if item.get("disposition") == "inline" else "attachment"
        cid = item.get("cid") if isinstance(item.get("cid"), str) else None
        if maintype == "message" or maintype == "multipart":
            maintype, subtype = "application", "octet-stream"  # sent as octets, never parsed
        message.add_attachment(
            data,
            maintype=maintype or "application",
            subtype=subtype or "octet-stream",
            filename=filename,
            disposition=disposition,
            cid=f"<{cid}>" if cid else None,
        )
    return message.as_bytes()
