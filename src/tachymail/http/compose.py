"""The messages of ``POST /api/v1/messages``: the content models, per-recipient templating
in Jinja2's sandbox, and MIME building with the ``email`` package.

What callers may rely on:

- :class:`MessageParts` (the ``content`` object of a request) builds into one RFC 5322
  message (:func:`build_message`): ``text/plain`` or ``text/html`` alone,
  ``multipart/alternative`` for both, inside ``multipart/mixed`` when there are
  attachments. Every part is 7-bit (non-ASCII text is quoted-printable, attachments
  base64); non-ASCII subjects, display names and header values become RFC 2047 encoded
  words, non-ASCII file names RFC 2231 parameters. Date and Message-ID are added when the
  caller's headers do not carry them; To is the recipient of a personal message, else
  ``undisclosed-recipients:;`` (the caller's own To header wins). Lines end in CRLF.
- Raw content (:func:`prepare_raw`) is kept as given except for line ends (CR, LF and
  CRLF all become CRLF) and a Date and Message-ID put on top when absent, as submission
  does (RFC 6409 §8).
- Templates (:class:`Templates`, dialect ``"jinja"``) are compiled once per request and
  rendered per recipient with request-level substitutions overridden by the
  recipient's. The environment is Jinja2's ``SandboxedEnvironment`` with strict
  undefined variables: a missing variable, an attribute escape (``{{ ''.__class__ }}``)
  or any other rendering failure is a :class:`TemplateProblem`, which the handler turns
  into a 422 naming the recipient. HTML is rendered with autoescaping. Repetition
  (``*``) and powers (``**``) that would build huge values are refused, and ``range`` is
  capped at 10,000 items; the templates come from an authenticated client, so their CPU
  time is not otherwise bounded.
- Nothing here raises anything but :class:`ContentProblem` (and its subclass
  :class:`TemplateProblem`) for bad input.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
import secrets
from email.message import MIMEPart
from email.policy import SMTP
from typing import Annotated, Any, Literal

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from tachymail.protocol.mime import header_value

__all__ = [
    "Attachment",
    "ContentProblem",
    "MessageParts",
    "Rendered",
    "TemplateProblem",
    "Templates",
    "build_message",
    "prepare_raw",
]

#: 7-bit parts only: a built message needs no 8BITMIME anywhere on its way
POLICY = SMTP.clone(cte_type="7bit")
#: fields the content object sets itself (or the MIME structure does): refused in "headers"
STRUCTURAL = frozenset(
    {
        "from",
        "subject",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "content-id",
    }
)
#: RFC 5322 §3.6.8 field name: printable ASCII but the colon
FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")
_CONTENT_TYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)
_LINE_END = re.compile(rb"\r\n|\r|\n")
#: most items of a template's range(), and longest value a ``*`` may build
MAX_RANGE = 10_000
MAX_REPEAT = 1_000_000
#: largest exponent a template's ``**`` may use
MAX_EXPONENT = 64


class ContentProblem(ValueError):
    """The content cannot be built as asked: a 422 ``invalid_content`` with *field*."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class TemplateProblem(ContentProblem):
    """A template failed to compile (*recipient* ``""``) or to render for *recipient*."""

    def __init__(self, field: str, problem: str, recipient: str = "") -> None:
        super().__init__(field, problem)
        self.recipient = recipient


def _base64(value: Any) -> Any:
    """Strict base64 (line breaks and spaces allowed), decoded; ValueError otherwise."""
    if not isinstance(value, str):
        return value
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


Base64Data = Annotated[
    bytes,
    BeforeValidator(_base64),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]


def _no_line_breaks(value: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise ValueError("must not contain CR, LF or NUL")
    return value


class Attachment(BaseModel):
    """One attached file, its octets base64-encoded in ``data``."""

    model_config = ConfigDict(extra="forbid")

    filename: str = Field(min_length=1, max_length=255)
    content_type: str = Field(default="application/octet-stream", max_length=255)
    data: Base64Data

    @field_validator("filename")
    @classmethod
    def _filename(cls, value: str) -> str:
        return _no_line_breaks(value)

    @field_validator("content_type")
    @classmethod
    def _content_type(cls, value: str) -> str:
        if not _CONTENT_TYPE.fullmatch(value):
            raise ValueError("must be a MIME type such as application/pdf")
        return value.lower()


class MessageParts(BaseModel):
    """The message to build: ``from``, ``subject``, a text and/or an HTML body, extra
    header fields and attachments."""

    model_config = ConfigDict(extra="forbid")

    from_: str = Field(alias="from", min_length=3, max_length=998)
    subject: str = Field(max_length=998)
    text_body: str | None = None
    html_body: str | None = None
    headers: dict[str, str] = Field(default_factory=dict, max_length=100)
    attachments: list[Attachment] = Field(default_factory=list, max_length=100)

    @field_validator("from_", "subject")
    @classmethod
    def _one_line(cls, value: str) -> str:
        return _no_line_breaks(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        seen: set[str] = set()
        for name, text in value.items():
            if not FIELD_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a header field name")
            lower = name.lower()
            if lower in STRUCTURAL:
                raise ValueError(f"{name} is set by the content object itself")
            if lower in seen:
                raise ValueError(f"{name} given twice")
            seen.add(lower)
            if len(text) > 998:
                raise ValueError(f"{name}: value over 998 characters")
            try:
                _no_line_breaks(text)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _has_body(self) -> MessageParts:
        if self.text_body is None and self.html_body is None:
            raise ValueError("needs text_body, html_body or both")
        return self


#: one recipient's rendered parts: (subject, text, html, header values in order) for a
#: built message, (raw,) for raw content; equal tuples share one queued message
Rendered = tuple[Any, ...]


class _Sandbox(SandboxedEnvironment):
    """Jinja2's sandbox, refusing the cheap ways to make huge values."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
                raise SecurityError(f"exponent over {MAX_EXPONENT}")
        elif operator == "*":
            for seq, times in ((left, right), (right, left)):
                sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
                if sized and len(seq) * times > MAX_REPEAT:
                    raise SecurityError(f"repetition over {MAX_REPEAT} items")
        return super().call_binop(context, operator, left, right)


def _environment(autoescape: bool) -> _Sandbox:
    env = _Sandbox(autoescape=autoescape, undefined=jinja2.StrictUndefined)
    env.globals["range"] = _range
    return env


def _range(*args: int) -> range:
    items = range(*args)
    if len(items) > MAX_RANGE:
        raise SecurityError(f"range over {MAX_RANGE} items")
    return items


_TEXT = _environment(autoescape=False)
_HTML = _environment(autoescape=True)


class Templates:
    """The request's content, compiled once: :meth:`render` gives each recipient's parts.

    *dialect* ``"static"`` renders nothing (every recipient gets the same tuple);
    ``"jinja"`` compiles the subject, the bodies, the header values (or the raw
    content) here, raising :class:`TemplateProblem` naming the field on a syntax error.
    """

    def __init__(self, content: MessageParts | str, dialect: Literal["jinja", "static"]) -> None:
        self.content = content
        self.dialect = dialect
        if isinstance(content, str):
            self.fields = ["content"]
            sources: list[str | None] = [content]
        else:
            self.fields = [
                "content.subject",
                "content.text_body",
                "content.html_body",
                *(f"content.headers.{name}" for name in content.headers),
            ]
            sources = [content.subject, content.text_body, content.html_body]
            sources += list(content.headers.values())
        self.sources = tuple(sources)
        self.compiled: list[jinja2.Template | None] = []
        if dialect == "jinja":
            for name, source in zip(self.fields, sources, strict=True):
                env = _HTML if name == "content.html_body" else _TEXT
                try:
                    template = env.from_string(source) if source is not None else None
                except jinja2.TemplateSyntaxError as exc:
                    raise TemplateProblem(name, f"line {exc.lineno}: {exc.message}") from None
                # A field without template syntax renders to itself: skip it per recipient.
                if template is not None and "{" not in (source or ""):
                    template = None
                self.compiled.append(template)

    @property
    def personal(self) -> bool:
        """Whether recipients may get different messages (the templating dialect is on)."""
        return self.dialect == "jinja" and any(t is not None for t in self.compiled)

    def render(self, recipient: str, variables: dict[str, Any]) -> Rendered:
        """The parts for *recipient* with *variables* (request-level substitutions
        already overridden by the recipient's); :class:`TemplateProblem` on failure."""
        if not self.personal:
            return self.sources
        out: list[str | None] = []
        for name, source, template in zip(self.fields, self.sources, self.compiled, strict=True):
            if template is None:
                out.append(source)
                continue
            try:
                out.append(template.render(variables))
            except jinja2.TemplateError as exc:
                raise TemplateProblem(name, _template_error(exc), recipient) from None
            except Exception as exc:  # a filter or an operation failing on the given values
                problem = f"{type(exc).__name__}: {exc}"
                raise TemplateProblem(name, problem, recipient) from None
        return tuple(out)


def _template_error(exc: jinja2.TemplateError) -> str:
    if isinstance(exc, SecurityError):
        return f"refused by the sandbox: {exc.message or exc}"
    return exc.message or type(exc).__name__


def message_id(queue_id: str, hostname: str) -> str:
    """The Message-ID we give a message: its (first) queue id at our host name."""
    return f"<{queue_id}@{hostname}>"


class MessageFrame:
    """What every message built from one request's *parts* shares, encoded once: the
    From field, the header fields without templates, the attachments' parts (base64)
    and the MIME boundaries. :meth:`build` writes one recipient's message around them,
    encoding only what the templates rendered for it; the ``email`` package's header
    registry checks every structured field (From, and To, Cc, Date... given in
    ``headers``), and writes the attachment parts (RFC 2231 file names).

    :class:`ContentProblem` (here or from :meth:`build`) when a value does not make a
    valid field: an unparsable From, a bad Date or address list."""

    def __init__(self, parts: MessageParts) -> None:
        self.parts = parts
        self.from_field = _registry_field("From", parts.from_, "content.from")
        author = POLICY.header_store_parse("From", parts.from_)[1]
        addresses = author.addresses
        if len(addresses) != 1 or not addresses[0].domain:
            raise ContentProblem("content.from", "must be one address, with a display name or not")
        if not addresses[0].addr_spec.isascii():
            raise ContentProblem("content.from", "the address must be ASCII (the name may not be)")
        self.lower = {name.lower() for name in parts.headers}
        # Random boundaries, once per request; a 7-bit part that happens to hold one is
        # quoted-printable instead (QP writes every "=" as "=3D": no boundary survives it).
        token = secrets.token_hex(12)
        self.boundaries = (f"=_mixed_{token}", f"=_alt_{token}")
        self.attachments = [_attachment_part(a) for a in parts.attachments]
        #: the encoded fields of header values without template syntax, by position
        self.fixed: dict[int, bytes] = {}
        for index, (name, value) in enumerate(parts.headers.items()):
            if "{" not in value:
                self.fixed[index] = _field(name, value, f"content.headers.{name}")

    def build(self, rendered: Rendered, *, to: str, msgid: str, now: float) -> bytes:
        """The message with *rendered* texts (from :meth:`Templates.render`), addressed
        ``To:`` *to* unless the headers set To; Date (*now*) and Message-ID (*msgid*)
        unless the headers set them. CRLF line ends, 7-bit throughout."""
        subject, text, html, *values = rendered
        head = [self.from_field]
        if "to" not in self.lower:
            # A checked mailbox (the SMTP grammar) or "undisclosed-recipients:;": as is.
            head.append(f"To: {to}\r\n".encode())
        head.append(_field("Subject", subject, "content.subject"))
        for index, (name, value) in enumerate(zip(self.parts.headers, values, strict=True)):
            fixed = self.fixed.get(index)
            head.append(
                fixed if fixed is not None else _field(name, value, f"content.headers.{name}")
            )
        if "date" not in self.lower:
            head.append(f"Date: {email.utils.formatdate(now)}\r\n".encode())
        if "message-id" not in self.lower:
            head.append(f"Message-ID: {msgid}\r\n".encode())
        head.append(b"MIME-Version: 1.0\r\n")
        mixed, alternative = self.boundaries
        if text is not None and html is not None:
            body = _multipart(
                "alternative",
                alternative,
                [
                    _text_part("plain", text, self.boundaries),
                    _text_part("html", html, self.boundaries),
                ],
            )
        elif text is not None:
            body = _text_part("plain", text, self.boundaries)
        else:
            body = _text_part("html", html or "", self.boundaries)
        if self.attachments:
            body = _multipart("mixed", mixed, [body, *self.attachments])
        return b"".join([*head, body])


def build_message(
    parts: MessageParts, rendered: Rendered, *, to: str, msgid: str, now: float
) -> bytes:
    """One message of *parts* (see :class:`MessageFrame`; a request with many recipients
    makes the frame once and calls its ``build`` per recipient)."""
    return MessageFrame(parts).build(rendered, to=to, msgid=msgid, now=now)


#: fields whose values have a structure (addresses, dates, ids) the header registry checks
STRUCTURED = frozenset(
    {
        "to", "cc", "bcc", "reply-to", "sender", "date", "message-id", "in-reply-to",
        "references", "resent-from", "resent-to", "resent-cc", "resent-bcc", "resent-date",
        "resent-sender", "resent-message-id",
    }
)  # fmt: skip
#: UTF-8 octets per RFC 2047 encoded word: 52 base64 characters, a 64-character word
_WORD_OCTETS = 39


def _field(name: str, value: str, where: str) -> bytes:
    """The header field *name*: *value*, folded and CRLF-terminated; a structured field
    through the header registry, an unstructured one written here (RFC 2047 encoded
    words when it is not ASCII)."""
    if any(c in value for c in "\r\n\0"):  # a template may have rendered one
        raise ContentProblem(where, "must not contain CR, LF or NUL")
    if name.lower() in STRUCTURED:
        return _registry_field(name, value, where)
    if value.isascii():
        line = f"{name}: {value}"
        if len(line) <= 78:
            return f"{line}\r\n".encode()
        return _fold_ascii(name, value, where)
    return f"{name}: {_encoded_words(value)}\r\n".encode()


def _registry_field(name: str, value: str, where: str) -> bytes:
    try:
        header = POLICY.header_store_parse(name, value)[1]
        if header.defects:
            raise ContentProblem(where, str(header.defects[0]))
        folded: bytes = POLICY.fold_binary(name, header)
    except (ValueError, TypeError, IndexError, LookupError) as exc:
        if isinstance(exc, ContentProblem):
            raise
        raise ContentProblem(where, f"not a valid {name} field: {exc}") from None
    return folded


def _fold_ascii(name: str, value: str, where: str) -> bytes:
    """An ASCII field folded at white space before 78 characters where it can be (RFC 5322
    §2.2.3); a word longer than that stays whole, up to the 998-octet limit."""
    lines: list[str] = []
    line = f"{name}:"
    for index, word in enumerate(value.split(" ")):
        if index and len(line) + 1 + len(word) > 78:
            lines.append(line)
            line = ""
        line += f" {word}"
    lines.append(line)
    if any(len(part) > 998 for part in lines):
        raise ContentProblem(where, "has a word over 998 characters")
    return ("\r\n".join(lines) + "\r\n").encode()


def _encoded_words(value: str) -> str:
    """*value* as RFC 2047 "B" encoded words of at most 64 characters, one per folded
    line, never splitting a character between two words."""
    words = []
    chunk = bytearray()
    for char in value:
        octets = char.encode("utf-8", "surrogatepass")
        if len(chunk) + len(octets) > _WORD_OCTETS:
            words.append(chunk)
            chunk = bytearray()
        chunk += octets
    if chunk:
        words.append(chunk)
    return "\r\n ".join(
        f"=?utf-8?b?{base64.b64encode(bytes(word)).decode('ascii')}?=" for word in words
    )


def _text_part(subtype: str, text: str, boundaries: tuple[str, ...]) -> bytes:
    """A text/*subtype* part with its fields: 7bit when *text* is ASCII with lines of at
    most 998 octets and no boundary, else quoted-printable (of its UTF-8)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    plain = (
        text.isascii()
        and max(map(len, text.split("\n"))) <= 998
        and not any(b in text for b in boundaries)
    )
    if plain:
        encoding, body = "7bit", text.encode("ascii")
    else:
        encoding = "quoted-printable"
        body = binascii.b2a_qp(text.encode("utf-8", "surrogatepass"), istext=True)
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode() + body.replace(b"\n", b"\r\n")


def _multipart(subtype: str, boundary: str, parts: list[bytes]) -> bytes:
    """A multipart/*subtype* entity of *parts* (each its fields, a blank line, its body)."""
    delimiter = f"\r\n--{boundary}\r\n".encode()
    return b"".join(
        [
            f'Content-Type: multipart/{subtype};\r\n boundary="{boundary}"\r\n\r\n'.encode(),
            f"--{boundary}\r\n".encode(),
            delimiter.join(parts),
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )


def _attachment_part(attachment: Attachment) -> bytes:
    """The attachment as a base64 part with Content-Disposition (the email package writes
    the file name, RFC 2231 encoded when it is not ASCII)."""
    part = MIMEPart(policy=POLICY)
    maintype, _, subtype = attachment.content_type.partition("/")
    try:
        part.set_content(
            attachment.data, maintype=maintype, subtype=subtype, filename=attachment.filename
        )
        return part.as_bytes()
    except (ValueError, TypeError, LookupError) as exc:
        raise ContentProblem("content.attachments", f"cannot be written: {exc}") from None


def prepare_raw(raw: str, *, msgid: str, now: float) -> bytes:
    """*raw* (an RFC 5322 message) with CRLF line ends and a Date and Message-ID on top
    when its header block lacks them; :class:`ContentProblem` when it has no From
    field (every message needs one: RFC 5322 §3.6, and a DKIM signature covers it)."""
    content = _LINE_END.sub(b"\r\n", raw.encode("utf-8"))
    end = content.find(b"\r\n\r\n")
    header_block = content if end < 0 else content[: end + 2]
    if header_value(header_block, b"From") is None:
        raise ContentProblem("content", "the message has no From field in its header block")
    added = []
    if header_value(header_block, b"Date") is None:
        added.append(f"Date: {email.utils.formatdate(now)}\r\n".encode())
    if header_value(header_block, b"Message-ID") is None:
        added.append(f"Message-ID: {msgid}\r\n".encode())
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return b"".join([*added, content])
