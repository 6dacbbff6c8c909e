"""FETCH data items against the anchor: the same messages in a private Dovecot and through
``tachymail.imap.fetch``, compared item by item.

Messages of the third-party MIME corpus (../shared/corpus/mime: well-formed, nested,
message/rfc822, 8-bit, and broken ones) are delivered to Dovecot over LMTP; each is fetched
back from Dovecot with imaplib (ENVELOPE, BODYSTRUCTURE, BODY, whole and partial sections,
MIME headers, HEADER.FIELDS, BINARY) and the same FETCH is answered by ``fetch_response`` for
the octets Dovecot serves (CRLF line ends: what Tachymail stores). Both responses are read by
the independent parser of tests/imapwire.py and compared as values. The deliberate differences
between Dovecot and us are normalised narrowly below, each with its reason.
"""

from __future__ import annotations

import contextlib
import imaplib
import smtplib
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dovecot import DovecotServer, running_dovecot
from imapwire import Atom, read_fetch
from tachymail.imap.fetch import ContentRange, FetchError, fetch_response
from tachymail.mailbox import MessageInfo
from tachymail.mailbox.summary import build_summary
from tachymail.protocol.imap import parse_fetch_items
from tachymail.protocol.imap_py import CommandReader

CORPUS_MIME = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "mime"
USER = "alice@example.test"

#: a spread of the corpus: plain, multipart/alternative and /mixed, nested multiparts,
#: message/rfc822 (also nested and broken), 8-bit headers and bodies, RFC 2231 parameters,
#: quoted-printable and base64, group addresses, and broken MIME (missing boundaries, bad
#: header separators, malformed headers, truncated encodings)
MESSAGES = (
    "flanker/tests/fixtures/messages/8bitmime.eml",
    "flanker/tests/fixtures/messages/bilingual-simple.eml",
    "flanker/tests/fixtures/messages/dashed-boundaries.eml",
    "flanker/tests/fixtures/messages/disposition-notification.eml",
    "flanker/tests/fixtures/messages/enclosed.eml",
    "flanker/tests/fixtures/messages/enclosed-broken-body.eml",
    "flanker/tests/fixtures/messages/enclosed-endless.eml",
    "flanker/tests/fixtures/messages/enclosed-global.eml",
    "flanker/tests/fixtures/messages/encoded-header.eml",
    "flanker/tests/fixtures/messages/false-multipart.eml",
    "flanker/tests/fixtures/messages/mailformed-headers.eml",
    "flanker/tests/fixtures/messages/message-external-body.eml",
    "flanker/tests/fixtures/messages/missing-boundaries.eml",
    "flanker/tests/fixtures/messages/missing-final-boundary.eml",
    "flanker/tests/fixtures/messages/no-ctype.eml",
    "flanker/tests/fixtures/messages/quoted-printable.eml",
    "flanker/tests/fixtures/messages/signed.eml",
    "flanker/tests/fixtures/messages/torture.eml",
    "mime4j/testmsgs/base64encoded-rfc822message.msg",
    "mime4j/testmsgs/basic-plain-with-bad-header-separator.msg",
    "mime4j/testmsgs/bad-newlines-multiple-parts.msg",
    "mime4j/mimetools-testmsgs/mp-msg-rfc822.msg",
    "mime4j/testmsgs/multipartdigestnestedemptyparts.msg",
    "mime4j/testmsgs/russian-headers.msg",
    "mime4j/testmsgs/missing-inner-boundary.msg",
    "mime4j/mimetools-testmsgs/attachment-filename-encoding-UTF8.msg",
    "mime4j/mimetools-testmsgs/multi-digest.msg",
    "mime4j/mimetools-testmsgs/frag.msg",
    "mime4j/mimetools-testmsgs/multi-nested.msg",
    "mime4j/mimetools-testmsgs/multi-weirdspace.msg",
    "mime4j/mimetools-testmsgs/re-fwd.msg",
    "spamscope-mail-parser/tests/mails/mail_malformed_1",
    "spamscope-mail-parser/tests/mails/mail_test_3",
    "spamscope-mail-parser/tests/mails/mail_outlook_1",
    "stalwart-mail-parser/resources/eml/rfc/001.eml",
    "stalwart-mail-parser/resources/eml/rfc/003.eml",
    "stalwart-mail-parser/resources/eml/rfc/005.eml",
    "stalwart-mail-parser/resources/eml/malformed/003.eml",
    "stalwart-mail-parser/resources/eml/malformed/017.eml",
    "stalwart-mail-parser/resources/eml/thirdparty/001.eml",
)


# Where Dovecot and we disagree on purpose, by file: the items that differ and why. Each
# difference comes from where the MIME scanner (tachymail.protocol.mime, tested against
# Python's email package in tests/unit/test_mime.py) puts part boundaries in broken or
# unusual MIME, not from fetch.py, except where said otherwise.
_STRUCTURE = frozenset({"BODY", "BODYSTRUCTURE"})
_RFC822_END = (
    "a message/rfc822 part whose content ends with its own close delimiter: the scanner "
    "ends the part there (RFC 2046: the CRLF before the next boundary belongs to it), "
    "Dovecot counts that CRLF in the part"
)
KNOWN_DIFFERENCES: dict[str, tuple[frozenset[str], str]] = {
    "flanker/tests/fixtures/messages/enclosed.eml": (
        _STRUCTURE | {"BODY[2]", "BODY[2.TEXT]"},
        _RFC822_END,
    ),
    "flanker/tests/fixtures/messages/enclosed-broken-body.eml": (
        _STRUCTURE | {"BODY[2]", "BODY[2.TEXT]", "BINARY 1", "BINARY 2.1", "BINARY 2.2"},
        _RFC822_END + "; and its base64 holds 8-bit junk: Dovecot refuses BINARY of every "
        "part with NO, we decode best-effort (broken MIME is served, never refused)",
    ),
    "flanker/tests/fixtures/messages/enclosed-endless.eml": (
        _STRUCTURE | {"BODY[2]", "BODY[2.TEXT]"},
        _RFC822_END,
    ),
    "flanker/tests/fixtures/messages/torture.eml": (
        _STRUCTURE
        | {"BODY[6.1]", "BODY[6.2]", "BODY[11]", "BODY[11.TEXT]", "BODY[12]", "BODY[12.TEXT]"}
        | {"BODY[12.3]", "BODY[12.3.TEXT]"},
        _RFC822_END + " (nested multiparts ending together)",
    ),
    "flanker/tests/fixtures/messages/enclosed-global.eml": (
        frozenset({"BODY[2.1]", "BODY[2.1.MIME]", "BODY[2.2]", "BODY[2.2.MIME]"})
        | {"BODY[2.HEADER]", "BODY[2.TEXT]", "BODY[2.HEADER.FIELDS (FROM SUBJECT)]"}
        | {"BINARY[2.1]", "BINARY.SIZE[2.1]", "BINARY[2.2]", "BINARY.SIZE[2.2]"},
        "message/global (fetch.py): Dovecot 2.3 treats it as a leaf, so its part 2.1 is the "
        "whole part and 2.HEADER is empty; RFC 9051 §6.4.5 makes its content addressable "
        "like message/rfc822's, which we do (its BODYSTRUCTURE is Dovecot's basic form "
        "unless IMAP4rev2 is enabled)",
    ),
    "flanker/tests/fixtures/messages/message-external-body.eml": (
        frozenset({"BODY[2]", "BODY[2.1.MIME]", "BODY[2.2.MIME]"}),
        "parts with a header and no body: Dovecot gives the blank line after the header to "
        "the next boundary, the scanner to the header",
    ),
    "flanker/tests/fixtures/messages/missing-final-boundary.eml": (
        _STRUCTURE | {"BODY[1]", "BINARY[1]", "BINARY.SIZE[1]"},
        "no close delimiter: the scanner ends the last part before the final line break, "
        "Dovecot keeps it",
    ),
    "mime4j/testmsgs/basic-plain-with-bad-header-separator.msg": (
        _STRUCTURE
        | {"BODY[1]", "BODY[1.MIME]", "BODY[HEADER]", "BODY[TEXT]<0>", "RFC822.HEADER"}
        | {"BODY[HEADER.FIELDS.NOT (RECEIVED)]", "BINARY[1]", "BINARY.SIZE[1]"},
        "a line holding one space after the header: the scanner reads it as a continuation "
        "line (the header goes on), Dovecot as the end of the header",
    ),
    "mime4j/testmsgs/multipartdigestnestedemptyparts.msg": (
        frozenset({"BODY[1.1.MIME]"}),
        "an empty part: Dovecot's MIME header is empty, the scanner's is the lone line break",
    ),
    "mime4j/mimetools-testmsgs/multi-digest.msg": (
        _STRUCTURE,
        "'Content-Type: text' without a subtype: the scanner reads text/plain (RFC 2045 §5.2: "
        "an invalid type is text/plain), Dovecot sends the subtype empty",
    ),
    "spamscope-mail-parser/tests/mails/mail_malformed_1": (
        _STRUCTURE
        | {"BODY[1]", "BODY[2]", "BODY[2.MIME]", "BODY[3]", "BODY[3.MIME]"}
        | {"BINARY[2]", "BINARY.SIZE[2]", "BINARY[3]", "BINARY.SIZE[3]"},
        "a nested multipart whose boundary is a prefix of its parent's: the scanner follows "
        "Python's email (the outer boundary wins), Dovecot nests differently",
    ),
    "spamscope-mail-parser/tests/mails/mail_outlook_1": (
        _STRUCTURE
        | {"BODY[1]", "BODY[1.MIME]", "BODY[HEADER]", "BODY[TEXT]<0>", "RFC822.HEADER"}
        | {"BODY[HEADER.FIELDS.NOT (RECEIVED)]", "BINARY[1]", "BINARY.SIZE[1]"},
        "a file that starts with binary junk: the scanner ends the header at the first line "
        "that is no field, Dovecot reads further",
    ),
    "stalwart-mail-parser/resources/eml/malformed/003.eml": (
        _STRUCTURE | {"BODY[1]", "BODY[2]", "BODY[2.MIME]", "BINARY[2]", "BINARY.SIZE[2]"},
        "a boundary line shared by nested multiparts: the scanner gives it to the outermost "
        "(as Python's email does), Dovecot to the innermost",
    ),
    "synthetic:structure": (
        frozenset({"BINARY 1", "BINARY 2", "BINARY 4.1"}),
        "fetch.py: Dovecot refuses BINARY of every part of a message where one part has an "
        "unknown transfer encoding, we refuse only that part (NO [UNKNOWN-CTE])",
    ),
    "stalwart-mail-parser/resources/eml/malformed/017.eml": (
        _STRUCTURE | {"BODY[1.MIME]"},
        "no ';' before boundary=: the scanner reads multipart/mixed without a boundary (one "
        "empty part here), Dovecot an empty type",
    ),
}


#: hand-written messages for what the corpus lacks: address syntax in ENVELOPE (groups,
#: quoted local parts, source routes, comments, missing parts), RFC 2231 and language
#: fields in BODYSTRUCTURE, an unknown transfer encoding
SYNTHETIC: dict[str, bytes] = {
    "synthetic:addresses": (
        b'From: "Doe, John" <john.doe@example.com>, (Ann) ann@example.org\r\n'
        b"Sender: \r\n"
        b"To: undisclosed-recipients:;\r\n"
        b"Cc: Team: a@example.com, B <b@example.com>;, c@example.com (Cee Comment)\r\n"
        b'Bcc: "quoted local"@example.net, <@route.example,@two.example:r@example.com>\r\n'
        b"Reply-To: bare\r\n"
        b"Subject: =?utf-8?q?encoded?= words\r\n"
        b"Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)\r\n"
        b"Message-ID: <B27397-0100000@cac.washington.edu>\r\n"
        b"In-Reply-To: <parent@example.com>\r\n"
        b"\r\nbody\r\n"
    ),
    "synthetic:structure": (
        b"From: a@example.com\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n'
        b"Content-Language: en, de\r\nContent-Location: http://example.com/m\r\n\r\n"
        b"preamble\r\n--b1\r\n"
        b"Content-Type: text/plain; charset=UTF-8; format=flowed\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"Content-ID: <p1@example.com>\r\nContent-Description: first part\r\n"
        b"Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\nContent-Language: fr\r\n\r\n"
        b"caf=C3=A9 =\r\nsoft   \r\nline=20\r\n--b1\r\n"
        b'Content-Type: application/octet-stream; name="data.bin"\r\n'
        b'Content-Disposition: attachment; filename="data.bin"; size=5\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQ=\r\n--b1\r\n"
        b"Content-Type: application/x-thing\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
        b"begin 644 x\r\n--b1\r\nContent-Type: message/rfc822\r\n\r\n"
        b"From: inner@example.com\r\nTo: Group: ;\r\nSubject: inner\r\n\r\ninner body\r\n"
        b"--b1--\r\nepilogue\r\n"
    ),
}


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.fixture(scope="module")
def dovecot_inbox() -> Iterator[tuple[DovecotServer, list[str]]]:
    """A Dovecot whose INBOX holds the corpus messages, UID i+1 for MESSAGES[i] (those that
    exist); yields the server and the list of delivered names."""
    if not CORPUS_MIME.is_dir():
        pytest.skip(f"MIME corpus not found at {CORPUS_MIME} (it lives in ../shared/corpus)")
    names = [name for name in MESSAGES if (CORPUS_MIME / name).is_file()]
    missing = sorted(set(MESSAGES) - set(names))
    assert not missing, f"corpus files missing: {missing}"
    with running_dovecot({USER: "secret"}) as dovecot:
        lmtp = smtplib.LMTP("127.0.0.1", dovecot.ports["lmtp"], timeout=30)
        try:
            for name in names:
                refused = lmtp.sendmail(
                    "bob@example.com",
                    [USER],
                    crlf((CORPUS_MIME / name).read_bytes()),
                    mail_options=["BODY=8BITMIME"],
                )
                assert not refused, (name, refused)
            for message in SYNTHETIC.values():
                assert not lmtp.sendmail("bob@example.com", [USER], message)
        finally:
            lmtp.quit()
        yield dovecot, names + list(SYNTHETIC)


@pytest.fixture(scope="module")
def imap(dovecot_inbox: tuple[DovecotServer, list[str]]) -> Iterator[imaplib.IMAP4]:
    dovecot, _ = dovecot_inbox
    client = imaplib.IMAP4("127.0.0.1", dovecot.ports["imap"], timeout=30)
    try:
        client.login(USER, "secret")
        typ, _ = client.select("INBOX", readonly=True)
        assert typ == "OK"
        yield client
    finally:
        client.logout()


def dovecot_fetch(client: imaplib.IMAP4, uid: int, items: str) -> tuple[str, dict[bytes, Any]]:
    """Dovecot's answer to ``UID FETCH uid (items)``: the tagged status and the items of its
    FETCH responses (it may split one message's items over several), each response rebuilt
    as sent (imaplib splits it at its literals and drops the CRLFs) and read by imapwire."""
    typ, data = client.uid("FETCH", str(uid), f"({items})")
    found: dict[bytes, Any] = {}
    if typ != "OK":
        return typ, found
    response = bytearray()
    for element in data:
        if isinstance(element, tuple):
            response += element[0] + b"\r\n" + element[1]
            continue
        if element is None:
            continue
        response += element + b"\r\n"
        # imaplib gives "n (items...)": put back the FETCH word of the untagged line
        seq, _, rest = bytes(response).partition(b" ")
        found.update(read_fetch(b"* " + seq + b" FETCH " + rest)[1])
        response = bytearray()
    return typ, found


def ours(content: bytes, uid: int, seq: int, items: str) -> bytes:
    """fetch_response() for *content* and the same items, its pieces joined as sent."""
    reader = CommandReader()
    reader.feed(f"t FETCH 1 ({items})\r\n".encode())
    command = reader.next()
    assert command is not None and hasattr(command, "args")
    atts = parse_fetch_items(command.args[1:])  # type: ignore[union-attr]
    info = MessageInfo(uid, len(content), frozenset(), 0.0, 1, b"")
    summary = build_summary(content)
    pieces = fetch_response(
        seq,
        info,
        atts,
        lambda: summary,
        lambda offset, length: content[offset : offset + length],
        uid=True,
    )
    return b"".join(
        content[p.start : p.start + p.length] if isinstance(p, ContentRange) else p for p in pieces
    )


def part_numbers(part: dict[str, Any], prefix: str = "", top: bool = True) -> Iterator[str]:
    """Every part number of a summary tree (as RFC 9051 numbers them), depth first."""
    if part.get("type") == "multipart":
        for i, child in enumerate(part.get("parts") or [], 1):
            number = f"{prefix}{i}"
            yield number
            yield from part_numbers(child, number + ".", top=False)
    elif top:
        yield prefix + "1"
        if "message" in part:
            yield from part_numbers(part["message"]["body"], prefix + "1.", top=True)
    elif "message" in part:
        yield from part_numbers(part["message"]["body"], prefix, top=True)


def find_part(part: dict[str, Any], number: str) -> dict[str, Any]:
    node = part
    in_message = True
    for n in map(int, number.split(".")):
        if not in_message and "message" in node:
            node, in_message = node["message"]["body"], True
        if node.get("type") == "multipart":
            node = node["parts"][n - 1]
        in_message = False
    return node


# ---------------------------------------------------------------------------------------------
# Normalisation: only where Dovecot and RFC 9051 (or our documented choice) differ on purpose


def lower(value: Any) -> Any:
    return value.lower() if isinstance(value, bytes) else value


def norm_params(params: Any) -> Any:
    """Parameter names lower-cased (case-insensitive, RFC 2045 §5.1: Dovecot sends them as
    written) and RFC 2231 ``name*`` values decoded: Dovecot sends them as in the message, we
    re-encode the value the summary decoded (percent-encoding only what must be)."""
    if not isinstance(params, list):
        return params
    out: list[Any] = []
    for i in range(0, len(params) - 1, 2):
        name, value = lower(params[i]), params[i + 1]
        if isinstance(name, bytes) and name.endswith(b"*") and value.count(b"'") >= 2:
            charset, _, encoded = value.split(b"'", 2)
            text = urllib.parse.unquote_to_bytes(encoded)
            name = name[:-1]
            value = text.decode(charset.decode() or "utf-8", "replace").encode()
        out += [name, value]
    return out


def norm_body(body: Any) -> Any:
    """A BODYSTRUCTURE/BODY with the case-insensitive tokens (type, subtype, parameter names,
    encoding, disposition) lower-cased: we upper-case them as RFC 9051's examples do, Dovecot
    sends them as the message has them."""
    if not isinstance(body, list) or not body:
        return body
    if isinstance(body[0], list):  # multipart: parts, subtype, [params dsp lang loc]
        k = next(i for i, v in enumerate(body) if not isinstance(v, list))
        out = [norm_body(child) for child in body[:k]]
        out.append(lower(body[k]))
        ext = body[k + 1 :]
        if ext:
            ext = [norm_params(ext[0]), *ext[1:]]
            if len(ext) > 1:
                ext[1] = norm_dsp(ext[1])
        return out + ext
    out = [lower(body[0]), lower(body[1]), norm_params(body[2]), body[3], body[4], lower(body[5])]
    rest = list(body[6:])
    kind = (lower(body[0]), lower(body[1]))
    fixed = 1  # octets
    if kind == (b"message", b"rfc822") or kind == (b"message", b"global"):
        if len(rest) >= 4:
            rest[2] = norm_body(rest[2])
            fixed = 4
    elif kind[0] == b"text":
        fixed = 2
    ext = rest[fixed:]
    if len(ext) > 1:
        ext[1] = norm_dsp(ext[1])
    return out + rest[:fixed] + ext


def norm_dsp(dsp: Any) -> Any:
    if isinstance(dsp, list) and len(dsp) == 2:
        return [lower(dsp[0]), norm_params(dsp[1])]
    return dsp


def norm_text(value: Any) -> Any:
    """An ENVELOPE string with white space runs collapsed and stripped, and invalid UTF-8
    replaced: Dovecot sends a header's text as it is in the message (trailing white space,
    runs of spaces collapsed, 8-bit octets raw), ours comes from the stored summary, whose
    values are stripped (``header_value``) and decoded as UTF-8 with U+FFFD for invalid
    octets (the summary keeps text)."""
    if isinstance(value, list):
        return [norm_text(v) for v in value]
    if isinstance(value, bytes) and not isinstance(value, Atom):
        return " ".join(value.decode("utf-8", "replace").split()).encode()
    return value


def norm_envelopes(body: Any) -> Any:
    """norm_text on the envelopes inside a normalised BODYSTRUCTURE."""
    if not isinstance(body, list) or not body:
        return body
    if isinstance(body[0], list):
        return [norm_envelopes(v) if isinstance(v, list) else v for v in body]
    if body[:2] in ([b"message", b"rfc822"], [b"message", b"global"]) and len(body) > 9:
        return [*body[:7], norm_text(body[7]), norm_envelopes(body[8]), *body[9:]]
    return body


def compare(name: str, uid: int, want: dict[bytes, Any], mine: bytes) -> list[str]:
    """The differences between Dovecot's and our response, as readable lines."""
    _, got = read_fetch(mine)
    problems = []
    expected, _ = KNOWN_DIFFERENCES.get(name, (frozenset(), ""))
    for key in sorted(set(want) | set(got)):
        a, b = want.get(key), got.get(key)
        if key.startswith((b"BODYSTRUCTURE", b"BODY")) and not key.startswith(b"BODY["):
            a, b = norm_envelopes(norm_body(a)), norm_envelopes(norm_body(b))
        if key == b"ENVELOPE":
            a, b = norm_text(a), norm_text(b)
        if key.startswith(b"BODY[") and a is None and b == b"":
            a = b""  # Dovecot: NIL for a part that does not exist; we send ""
        if key.decode() in expected:
            if a == b:  # a stale entry would hide a regression: keep the list exact
                problems.append(f"{name} {key.decode()}: a known difference that matches now")
        elif a != b:
            problems.append(f"{name} uid {uid} {key.decode()}:\n  dovecot {a!r}\n  ours    {b!r}")
    return problems


def test_fetch_items_match_dovecot(
    dovecot_inbox: tuple[DovecotServer, list[str]], imap: imaplib.IMAP4
) -> None:
    _, names = dovecot_inbox
    problems: list[str] = []
    for seq, name in enumerate(names, 1):
        uid = seq
        typ, whole = dovecot_fetch(imap, uid, "BODY.PEEK[]")
        assert typ == "OK", name
        content = whole[b"BODY[]"]
        # Dovecot serves CRLF, which is what Tachymail stores
        assert b"\n" not in content.replace(b"\r\n", b""), name
        tree = build_summary(content)["body"]
        sections = ["BODY.PEEK[HEADER]", "BODY.PEEK[TEXT]<0.100>", "BODY.PEEK[1.MIME]"]
        for number in part_numbers(tree):
            sections += [f"BODY.PEEK[{number}]", f"BODY.PEEK[{number}.MIME]"]
            node = find_part(tree, number)
            if "message" in node:
                sections += [
                    f"BODY.PEEK[{number}.HEADER]",
                    f"BODY.PEEK[{number}.TEXT]",
                    f"BODY.PEEK[{number}.HEADER.FIELDS (from Subject)]",
                ]
        base = (
            "UID RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY "
            "BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)] BODY.PEEK[HEADER.FIELDS.NOT (Received)] "
            "BODY.PEEK[]<5.10> BODY.PEEK[TEXT]<100000000.5> RFC822.HEADER"
        )
        # a few FETCHes per message: Dovecot bounds the command line (torture.eml has 60 parts)
        batches = [base] + [" ".join(sections[i : i + 30]) for i in range(0, len(sections), 30)]
        for items in batches:
            typ, theirs = dovecot_fetch(imap, uid, items)
            assert typ == "OK", (name, items)
            problems += compare(name, uid, theirs, ours(content, uid, seq, items))
    assert not problems, "\n".join(problems)


def connect(dovecot: DovecotServer) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", dovecot.ports["imap"], timeout=30)
    client.login(USER, "secret")
    typ, _ = client.select("INBOX", readonly=True)
    assert typ == "OK"
    return client


#: messages whose BINARY fetches make Dovecot 2.3.19 fail with "Internal error occurred"
#: and close the session (every leaf part of torture.eml and frag.msg): no reference there, ours is
#: still computed (it must not raise but FetchError)
DOVECOT_BINARY_FAILURES = frozenset(
    {"flanker/tests/fixtures/messages/torture.eml", "mime4j/mimetools-testmsgs/frag.msg"}
)


def test_binary_items_match_dovecot(dovecot_inbox: tuple[DovecotServer, list[str]]) -> None:
    """BINARY.PEEK[n] and BINARY.SIZE[n] of every leaf part: the same decoded octets, and the
    same refusal (NO [UNKNOWN-CTE]) for an encoding neither server can decode."""
    dovecot, names = dovecot_inbox
    problems: list[str] = []
    crashed: list[str] = []
    imap = connect(dovecot)
    try:
        for seq, name in enumerate(names, 1):
            uid = seq
            content = dovecot_fetch(imap, uid, "BODY.PEEK[]")[1][b"BODY[]"]
            tree = build_summary(content)["body"]
            # the first 40 parts: enclosed-endless.eml has 3041, each a FETCH of 3 MB
            for number in list(part_numbers(tree))[:40]:
                node = find_part(tree, number)
                if node.get("type") in ("multipart", "message"):
                    continue
                items = f"BINARY.PEEK[{number}] BINARY.SIZE[{number}]"
                if name in DOVECOT_BINARY_FAILURES:
                    with contextlib.suppress(FetchError):
                        ours(content, uid, seq, items)
                    continue
                try:
                    typ, theirs = dovecot_fetch(imap, uid, items)
                except imaplib.IMAP4.abort as exc:  # Dovecot closed the session: reconnect
                    crashed.append(f"{name} {number}: {exc}")
                    imap = connect(dovecot)
                    continue
                try:
                    mine = ours(content, uid, seq, items)
                except FetchError as exc:
                    if typ == "OK" or exc.code != "UNKNOWN-CTE":
                        problems.append(f"{name} uid {uid} {items}: dovecot {typ}, ours {exc}")
                    continue
                if typ != "OK":
                    if f"BINARY {number}" not in KNOWN_DIFFERENCES.get(name, ((), ""))[0]:
                        problems.append(f"{name} uid {uid} {items}: dovecot {typ}, ours OK")
                    continue
                problems += compare(name, uid, theirs, mine)
    finally:
        imap.logout()
    assert not problems, "\n".join(problems)
    assert crashed == [], crashed


def test_the_spread_holds_what_it_claims(dovecot_inbox: tuple[DovecotServer, list[str]]) -> None:
    """The messages chosen cover what the comparison is meant to exercise."""
    _, names = dovecot_inbox
    trees = [
        build_summary(SYNTHETIC.get(n) or crlf((CORPUS_MIME / n).read_bytes()))["body"]
        for n in names
    ]
    flat: list[dict[str, Any]] = []

    def walk(part: dict[str, Any]) -> None:
        flat.append(part)
        for child in part.get("parts") or []:
            walk(child)
        if "message" in part:
            walk(part["message"]["body"])

    for tree in trees:
        walk(tree)
    assert len(names) >= 20
    assert any("message" in p for p in flat)  # message/rfc822 with its envelope
    assert any(
        p["type"] == "multipart" and any(c["type"] == "multipart" for c in p.get("parts") or [])
        for p in flat
    )
    assert any(p["defects"] for p in flat)  # broken MIME
    assert {"base64", "quoted-printable"} <= {p["encoding"] for p in flat}
