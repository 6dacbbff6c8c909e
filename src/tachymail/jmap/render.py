"""Email properties (RFC 8621 §4.1) from what the store keeps: the summary (MIME tree and
ENVELOPE fields, made once at delivery by the compiled scanner) and byte ranges of the
content. Nothing here parses a whole message again: a header form reads the header block,
a body value reads and decodes its part's octets.

Never raises on broken mail: undecodable octets become U+FFFD (``isEncodingProblem``), an
unknown charset is read as UTF-8 with replacement, a bad date or address is left out.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import datetime
import email.header
import email.utils
import html as html_module
import quopri
import re
from collections.abc import Callable
from typing import Any

#: the Email properties Email/get returns when "properties" is null (RFC 8621 §4.2)
DEFAULT_PROPERTIES = (
    "id", "blobId", "threadId", "mailboxIds", "keywords", "size", "receivedAt", "messageId",
    "inReplyTo", "references", "sender", "from", "to", "cc", "bcc", "replyTo", "subject",
    "sentAt", "hasAttachment", "preview", "bodyValues", "textBody", "htmlBody", "attachments",
)  # fmt: skip
#: the body part properties returned when "bodyProperties" is null
DEFAULT_BODY_PROPERTIES = (
    "partId", "blobId", "size", "name", "type", "charset", "disposition", "cid", "language",
    "location",
)  # fmt: skip
BODY_PROPERTIES = frozenset((*DEFAULT_BODY_PROPERTIES, "headers", "subParts"))
#: properties that need the parsed header block or the MIME tree
HEADER_CONVENIENCE = {
    "messageId": ("message-id", "MessageIds"),
    "inReplyTo": ("in-reply-to", "MessageIds"),
    "references": ("references", "MessageIds"),
    "sender": ("sender", "Addresses"),
    "from": ("from", "Addresses"),
    "to": ("to", "Addresses"),
    "cc": ("cc", "Addresses"),
    "bcc": ("bcc", "Addresses"),
    "replyTo": ("reply-to", "Addresses"),
    "subject": ("subject", "Text"),
    "sentAt": ("date", "Date"),
}
FORMS = ("Raw", "Text", "Addresses", "GroupedAddresses", "MessageIds", "Date", "URLs")
PREVIEW_CHARS = 256

_SPACES = re.compile(r"\s+")
_TAGS = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.IGNORECASE | re.DOTALL)
_MSGID = re.compile(r"<([^<>\s]+)>")


# --- header fields ------------------------------------------------------------------------


def header_fields(block: bytes) -> list[tuple[str, str]]:
    """(name as written, raw value: folding kept, CRLF at the end dropped) of each field."""
    fields: list[list[str]] = []
    current: list[str] | None = None
    for line in block.decode("utf-8", "replace").split("\n"):
        line = line.removesuffix("\r")
        if not line:
            break
        if line[0] in " \t":
            if current is not None:
                current[1] += "\r\n" + line
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or " " in name:
            current = None
            continue
        current = [name, value]
        fields.append(current)
    return [(name, value) for name, value in fields]


def decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded (unknown charsets as UTF-8 with replacement)."""
    if "=?" not in value:
        return value
    try:
        parts = email.header.decode_header(value)
    except Exception:  # a broken encoded word: the text as it is
        return value
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, str):
            out.append(chunk)
        else:
            out.append(decode_text(chunk, charset or "us-ascii")[0])
    return "".join(out)


def decode_text(data: bytes, charset: str | None) -> tuple[str, bool]:
    """(*data* decoded from *charset*, whether something could not be decoded)."""
    name = (charset or "us-ascii").strip().strip('"').lower()
    try:
        codec = codecs.lookup("utf-8" if name in ("us-ascii", "ascii", "unknown-8bit") else name)
    except LookupError:
        codec = codecs.lookup("utf-8")
    try:
        return codec.decode(data, "strict")[0], False
    except (UnicodeDecodeError, ValueError):
        try:
            return data.decode("windows-1252"), True  # what mislabelled mail usually is
        except UnicodeDecodeError:
            return codec.decode(data, "replace")[0], True


def _unfold(raw: str) -> str:
    return raw.replace("\r\n", "").replace("\n", "")


def as_text(raw: str) -> str:
    return decode_words(_SPACES.sub(" ", _unfold(raw))).strip()


_SIMPLE_ADDRESS = re.compile(r"^\s*(?:([^<>]*?)\s*<([^<>\s]+)>|([^<>\s]+@[^<>\s]+))\s*$")


def as_addresses(raw: str) -> list[dict[str, Any]]:
    value = _unfold(raw)
    if not any(ch in value for ch in '",;:()\\'):  # one plain address: no full parse
        simple = _SIMPLE_ADDRESS.match(value)
        if simple is not None:
            name, address, bare = simple.groups()
            if bare is not None:
                return [{"name": None, "email": bare}]
            return [{"name": decode_words(name).strip() or None, "email": address}]
    found = []
    for name, address in email.utils.getaddresses([_unfold(raw)]):
        if not address and not name:
            continue
        found.append({"name": decode_words(name).strip() or None, "email": address})
    return found


def as_grouped(raw: str) -> list[dict[str, Any]]:
    # groups are rare: every address in one unnamed group is what a client can show
    return [{"name": None, "addresses": as_addresses(raw)}]


def as_message_ids(raw: str) -> list[str] | None:
    ids = _MSGID.findall(_unfold(raw))
    return ids or None


def as_date(raw: str) -> str | None:
    try:
        when = email.utils.parsedate_to_datetime(_unfold(raw).strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.isoformat()


def as_urls(raw: str) -> list[str] | None:
    urls = re.findall(r"<([^<>]+)>", _unfold(raw))
    return urls or None


_PARSERS: dict[str, Callable[[str], Any]] = {
    "Raw": lambda raw: raw,
    "Text": as_text,
    "Addresses": as_addresses,
    "GroupedAddresses": as_grouped,
    "MessageIds": as_message_ids,
    "Date": as_date,
    "URLs": as_urls,
}


def parse_header_property(prop: str) -> tuple[str, str, bool] | None:
    """(field name, form, all) of ``header:Name[:asForm][:all]``; None when malformed."""
    pieces = prop.split(":")
    if len(pieces) < 2 or pieces[0] != "header" or not pieces[1]:
        return None
    name, rest = pieces[1], pieces[2:]
    every = bool(rest) and rest[-1] == "all"
    if every:
        rest = rest[:-1]
    form = "Raw"
    if rest:
        if len(rest) != 1 or not rest[0].startswith("as") or rest[0][2:] not in FORMS:
            return None
        form = rest[0][2:]
    return name, form, every


def header_value(fields: list[tuple[str, str]], name: str, form: str, every: bool) -> Any:
    parse = _PARSERS[form]
    lower = name.lower()
    values = [parse(value) for field_name, value in fields if field_name.lower() == lower]
    if every:
        return values
    return values[-1] if values else None


# --- the MIME tree ------------------------------------------------------------------------


def part_type(node: dict[str, Any]) -> str:
    return f"{node.get('type') or 'text'}/{node.get('subtype') or 'plain'}"


def part_name(node: dict[str, Any]) -> str | None:
    name = node.get("disposition_params", {}).get("filename") or node.get("params", {}).get("name")
    return decode_words(name) if name else None


def walk_parts(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(partId, node) of every part, depth first; partIds are IMAP section numbers ("1",
    "1.2"); the root of a single-part message is "1", of a multipart "0"."""
    out: list[tuple[str, dict[str, Any]]] = []

    def visit(node: dict[str, Any], part_id: str) -> None:
        out.append((part_id, node))
        for index, child in enumerate(node.get("parts") or (), start=1):
            visit(child, f"{part_id}.{index}" if part_id != "0" else str(index))

    visit(body, "0" if body.get("parts") is not None else "1")
    return out


def find_part(body: dict[str, Any], part_id: str) -> dict[str, Any] | None:
    for found_id, node in walk_parts(body):
        if found_id == part_id:
            return node
    return None


def body_octets(
    content_read: Callable[[int, int], bytes], node: dict[str, Any], limit: int = 0
) -> bytes:
    """The part's body with its Content-Transfer-Encoding undone (best effort). With a
    *limit* (octets), only a prefix of the part may be read and decoded: the result's first
    *limit* octets are those of the whole decoded body (it may be longer)."""
    start, end = int(node.get("body_start", 0)), int(node.get("end", 0))
    encoding = (node.get("encoding") or "7bit").lower()
    whole = max(0, end - start)
    # encoded octets usually enough for *limit* decoded ones (base64: 4 per 3 plus line
    # ends; quoted-printable: 3 per octet plus soft line breaks); read more if not
    factor = {"base64": 2, "quoted-printable": 4}.get(encoding, 1)
    length = min(whole, limit * factor + 8) if limit else whole
    while True:
        raw = content_read(start, length)
        decoded = _decode_transfer(raw, encoding, cut=length < whole)
        if length >= whole or len(decoded) >= limit:
            return decoded
        length = min(whole, length * 4)


def _decode_transfer(raw: bytes, encoding: str, cut: bool) -> bytes:
    """*raw* with its Content-Transfer-Encoding undone; *cut*: it is a prefix of the part."""
    if encoding == "base64":
        data = b"".join(raw.split())
        if cut:  # whole quanta only: a cut one would spoil the decoding
            data = data[: len(data) - len(data) % 4]
        try:
            return base64.b64decode(data + b"==", validate=False)
        except (binascii.Error, ValueError):
            return raw
    if encoding == "quoted-printable":
        return quopri.decodestring(raw)
    return raw


class BodyView:
    """The body part objects of one message for Email/get (RFC 8621 §4.1.4)."""

    def __init__(
        self,
        content: int,
        summary: dict[str, Any],
        read: Callable[[int, int], bytes],
        properties: list[str],
    ) -> None:
        self.content = content
        self.body: dict[str, Any] = summary.get("body") or {}
        self.read = read
        self.properties = properties
        self.ids = {id(node): part_id for part_id, node in walk_parts(self.body)}

    def part(self, node: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        part_id = self.ids.get(id(node), "1")
        multipart = node.get("parts") is not None
        params = node.get("params") or {}
        for prop in self.properties:
            if prop == "partId":
                out[prop] = None if multipart else part_id
            elif prop == "blobId":
                out[prop] = None if multipart else f"B{self.content:x}.{part_id}"
            elif prop == "size":
                out[prop] = 0 if multipart else len(body_octets(self.read, node))
            elif prop == "name":
                out[prop] = part_name(node)
            elif prop == "type":
                out[prop] = part_type(node)
            elif prop == "charset":
                charset = params.get("charset")
                out[prop] = charset or ("us-ascii" if node.get("type") == "text" else None)
            elif prop == "disposition":
                out[prop] = node.get("disposition")
            elif prop == "cid":
                cid = node.get("id")
                out[prop] = cid.strip().strip("<>") if cid else None
            elif prop == "language":
                lang = node.get("language")
                out[prop] = [x.strip() for x in lang.split(",")] if lang else None
            elif prop == "location":
                out[prop] = node.get("location")
            elif prop == "headers":
                start, body_start = int(node.get("start", 0)), int(node.get("body_start", 0))
                block = self.read(start, max(0, body_start - start))
                out[prop] = [{"name": n, "value": v} for n, v in header_fields(block)]
            elif prop == "subParts":
                out[prop] = [self.part(child) for child in node["parts"]] if multipart else None
        return out

    def structure(self) -> dict[str, Any]:
        props = self.properties if "subParts" in self.properties else [*self.properties, "subParts"]
        saved, self.properties = self.properties, props
        try:
            return self.part(self.body)
        finally:
            self.properties = saved

    def lists(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """(textBody, htmlBody, attachments) nodes, by RFC 8621 §4.1.4's algorithm."""
        text: list[dict[str, Any]] = []
        html: list[dict[str, Any]] = []
        attachments: list[dict[str, Any]] = []
        root = self.body
        if root.get("parts") is not None:
            _structure(root["parts"], root.get("subtype", "mixed"), False, html, text, attachments)
        else:
            _structure([root], "mixed", False, html, text, attachments)
        return text, html, attachments


def _media(node: dict[str, Any]) -> bool:
    return node.get("type") in ("image", "audio", "video")


def _structure(
    parts: list[dict[str, Any]],
    multipart_type: str,
    in_alternative: bool,
    html: list[dict[str, Any]] | None,
    text: list[dict[str, Any]] | None,
    attachments: list[dict[str, Any]],
) -> None:
    text_length = len(text) if text is not None else -1
    html_length = len(html) if html is not None else -1
    for index, part in enumerate(parts):
        kind = part_type(part)
        multipart = part.get("parts") is not None
        inline = (
            part.get("disposition") != "attachment"
            and (kind in ("text/plain", "text/html") or _media(part))
            and (
                index == 0
                or (multipart_type != "related" and (_media(part) or not part_name(part)))
            )
        )
        if multipart:
            sub = part.get("subtype", "mixed")
            _structure(
                part["parts"], sub, in_alternative or sub == "alternative", html, text, attachments
            )
        elif inline:
            if multipart_type == "alternative":
                if kind == "text/plain" and text is not None:
                    text.append(part)
                elif kind == "text/html" and html is not None:
                    html.append(part)
                else:
                    attachments.append(part)
                continue
            own_text, own_html = text, html
            if in_alternative:
                if kind == "text/plain":
                    own_html = None
                if kind == "text/html":
                    own_text = None
            if own_text is not None:
                own_text.append(part)
            if own_html is not None:
                own_html.append(part)
            if (own_text is None or own_html is None) and _media(part):
                attachments.append(part)
        else:
            attachments.append(part)
    if multipart_type == "alternative" and text is not None and html is not None:
        if text_length == len(text) and html_length != len(html):
            text.extend(html[html_length:])
        if html_length == len(html) and text_length != len(text):
            html.extend(text[text_length:])


def body_value(
    read: Callable[[int, int], bytes], node: dict[str, Any], max_bytes: int
) -> dict[str, Any]:
    """The EmailBodyValue of a text part: decoded, truncated to *max_bytes* UTF-8 octets
    (0: no limit) at a character boundary."""
    data = body_octets(read, node)
    text, problem = decode_text(data, (node.get("params") or {}).get("charset"))
    text = text.replace("\r\n", "\n")
    truncated = False
    if max_bytes and len(text.encode()) > max_bytes:
        text = text.encode()[:max_bytes].decode("utf-8", "ignore")
        truncated = True
    return {"value": text, "isEncodingProblem": problem, "isTruncated": truncated}


def plain_text(read: Callable[[int, int], bytes], node: dict[str, Any], limit: int) -> str:
    """Up to about *limit* characters of the part's text (HTML tags dropped), white space
    collapsed: the preview, and what snippets search. With a *limit*, only the part's
    first ``limit * 8`` decoded octets are looked at."""
    data = body_octets(read, node, limit * 8)[: limit * 8 if limit else None]
    text = decode_text(data, (node.get("params") or {}).get("charset"))[0]
    if node.get("subtype") == "html":
        text = _TAGS.sub(" ", text)
        text = html_module.unescape(text)
    return collapse_spaces(text, limit)


def collapse_spaces(text: str, limit: int = 0) -> str:
    """*text* with each run of white space made one space, stripped, then cut to *limit*
    characters (0: no cut). The same as ``re.sub(r"\\s+", " ", text).strip()[:limit]``."""
    # str.split() is several times faster than a regex substitution (this runs once per
    # message of a page), and collapsing a prefix gives a prefix of the whole result, so
    # a preview collapses a window of the text a few times its length, not all of it
    if not limit:
        return " ".join(text.split())
    window = limit * 2
    while True:
        collapsed = " ".join(text[:window].split())
        if len(collapsed) >= limit or window >= len(text):
            return collapsed[:limit]
        window *= 4


def preview(read: Callable[[int, int], bytes], text_parts: list[dict[str, Any]]) -> str:
    for node in text_parts:
        if node.get("type") == "text":
            found = plain_text(read, node, PREVIEW_CHARS)
            if found:
                return found
    return ""
