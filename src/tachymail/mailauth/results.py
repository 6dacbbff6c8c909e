"""The Authentication-Results header field (RFC 8601): writing ours, removing forged ones.

:func:`authentication_results` turns the results of the checks into one field, put on top
of the message by intake; :func:`remove_forged` takes away every field that claims our
authserv-id before that (RFC 8601 §5: a receiver must not let an earlier hop, or the
sender, speak in its name).

The field reads, one result per folded line::

    Authentication-Results: mx.example.net;
    \tspf=pass smtp.mailfrom=alice@example.com;
    \tspf=pass smtp.helo=mail.example.com;
    \tdkim=pass header.d=example.com header.s=s1 header.a=rsa-sha256 header.b=AbCdEfGh;
    \tdmarc=pass (p=reject dis=none) header.from=example.com;
    \tarc=none;
    \tiprev=pass policy.iprev=192.0.2.1 (mail.example.com)

Failures and errors carry ``reason="..."`` with the check's own words; lines are folded at
spaces to stay under 78 characters where a single word allows it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # the result types only; results.py needs none of their code
    from tachymail.mailauth.arc import ArcResult
    from tachymail.mailauth.dkim import DkimResult
    from tachymail.mailauth.dmarc import DmarcResult
    from tachymail.mailauth.iprev import IprevResult
    from tachymail.mailauth.spf import SpfResult

__all__ = [
    "FIELD",
    "FIELD_NAME",
    "FieldTemplate",
    "authentication_results",
    "authserv_id_of",
    "field_template",
    "remove_forged",
    "render",
]

FIELD = "Authentication-Results"
#: the field's name as header readers compare it: lower-case bytes
FIELD_NAME = FIELD.lower().encode("ascii")
#: RFC 5322 §2.1.1: lines SHOULD be at most 78 characters, CRLF excluded
LINE = 78
#: header.b carries at least this many characters of b= (RFC 6008 §4)
B_PREFIX = 8

# RFC 2045 token: printable ASCII but space and tspecials
_TOKEN = re.compile(r"[!#$%&\'*+\-.0-9A-Z^_`a-z{|}~]+")
# printable ASCII but white space, ``"`` and ``\``: quoted as it is
_PLAIN_QUOTED = re.compile(r"[!#-\[\]-~]+")
# RFC 5322 dot-atom, the unquoted form of a local-part
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_DOMAIN = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")
# what a result keyword may be; anything else is written as "permerror"
_KEYWORD = re.compile(r"[a-z]+")
# results whose detail is worth a reason=
_EXPLAINED = frozenset({"fail", "softfail", "temperror", "permerror", "policy", "neutral"})
# the longest reason text kept (a DNS error or an exp= text can be long)
_REASON_MAX = 200


def _quoted(text: str) -> str:
    """*text* as an RFC 5322 quoted-string: printable ASCII, runs of white space made one
    space, ``\\`` and ``"`` escaped."""
    if _PLAIN_QUOTED.fullmatch(text):  # nothing to change (a header.b word: base64 with "/")
        return '"' + text + '"'
    clean = "".join(ch if " " <= ch <= "~" else " " for ch in text)
    clean = " ".join(clean.split())
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _value(text: str) -> str:
    """An RFC 8601 ``value`` (RFC 2045 token, else a quoted-string)."""
    return text if _TOKEN.fullmatch(text) else _quoted(text)


def _pvalue(text: str) -> str:
    """An RFC 8601 ``pvalue``: ``[[local-part] "@"] domain-name``, or a ``value``."""
    local, at, domain = text.rpartition("@")
    if at and _DOMAIN.fullmatch(domain):
        if not local or _DOT_ATOM.fullmatch(local):
            return text
        return _quoted(local) + "@" + domain
    return _value(text)


def _keyword(result: str) -> str:
    keyword = result.strip().lower()
    return keyword if _KEYWORD.fullmatch(keyword) else "permerror"


def _reason(result: str, *texts: str) -> list[str]:
    """``reason="..."`` from the first non-empty text, for results that need explaining."""
    if result not in _EXPLAINED:
        return []
    for text in texts:
        if text and text.strip():
            text = text.strip()
            if len(text) > _REASON_MAX:
                text = text[: _REASON_MAX - 3] + "..."
            return ["reason=" + _quoted(text)]
    return []


def _spf(result: SpfResult, prop: str) -> list[str]:
    keyword = _keyword(result.result)
    match = f"matched {result.mechanism}" if result.mechanism and keyword == "fail" else ""
    words = [f"spf={keyword}"]
    words += _reason(keyword, result.detail, result.explanation, match)
    identity = result.sender if prop == "mailfrom" else result.domain
    if identity:
        words.append(f"smtp.{prop}={_pvalue(identity)}")
    return words


def _b_prefixes(signatures: Sequence[str]) -> list[str]:
    """The shortest prefix of each b= value, at least 8 characters, that tells it apart
    from the others (RFC 6008 §4: header.b must identify one signature)."""
    if len(signatures) == 1:  # the usual message: nothing to tell it apart from
        return [signatures[0][:B_PREFIX]]
    prefixes = []
    for i, b in enumerate(signatures):
        others = [s for j, s in enumerate(signatures) if j != i and s != b]
        size = min(B_PREFIX, len(b))
        while size < len(b) and any(o.startswith(b[:size]) for o in others):
            size += 1
        prefixes.append(b[:size])
    return prefixes


def _dkim_head(result: DkimResult) -> tuple[str, ...]:
    return _dkim_words(
        result.result,
        result.detail,
        result.domain,
        result.identity,
        result.selector,
        result.algorithm,
    )


@functools.lru_cache(maxsize=4096)
def _dkim_words(
    result: str, detail: str, domain: str, identity: str, selector: str, algorithm: str
) -> tuple[str, ...]:
    """A DKIM result's words but ``header.b``: the same from message to message of one
    signer (keyed without b=, which differs every time)."""
    keyword = _keyword(result)
    words = [f"dkim={keyword}"]
    words += _reason(keyword, detail)
    if domain:
        words.append(f"header.d={_pvalue(domain)}")
    if identity:
        words.append(f"header.i={_pvalue(identity)}")
    if selector:
        words.append(f"header.s={_value(selector)}")
    if algorithm:
        words.append(f"header.a={_value(algorithm)}")
    return tuple(words)


def _b_word(b_prefix: str) -> str:
    return f"header.b={_value(b_prefix)}"


def _dmarc(result: DmarcResult) -> list[str]:
    keyword = _keyword(result.result)
    words = [f"dmarc={keyword}"]
    words += _reason(keyword, result.detail)
    if keyword in ("pass", "fail"):
        # the comment OpenDMARC and the big receivers write: the policy and what we did
        words.append(f"(p={_comment(result.policy)} dis={_comment(result.disposition)})")
    if result.from_domain:
        words.append(f"header.from={_pvalue(result.from_domain)}")
    return words


def _arc(result: ArcResult, remote_ip: str) -> list[str]:
    keyword = _keyword(result.result)
    words = [f"arc={keyword}"]
    words += _reason(keyword, result.detail)
    if result.instance:
        words.append(f"(i={result.instance})")
    if result.oldest_pass:
        words.append(f"header.oldest-pass={result.oldest_pass}")
    if remote_ip and keyword != "none":
        words.append(f"smtp.remote-ip={_value(remote_ip)}")  # RFC 8617 §10.2
    return words


def _iprev(result: IprevResult) -> list[str]:
    keyword = _keyword(result.result)
    words = [f"iprev={keyword}"]
    words += _reason(keyword, result.detail)
    if result.ip:
        words.append(f"policy.iprev={_value(result.ip)}")
    if result.name:
        words.append(f"({_comment(result.name)})")
    return words


def _comment(text: str) -> str:
    """Text safe inside an RFC 5322 comment: printable ASCII without parentheses or ``\\``."""
    return "".join(ch if " " < ch <= "~" and ch not in "()\\" else "_" for ch in text) or "-"


def authentication_results(
    authserv_id: str,
    spf: SpfResult | None,
    helo: SpfResult | None,
    dkim: Sequence[DkimResult],
    dmarc: DmarcResult | None,
    arc: ArcResult | None,
    iprev: IprevResult | None,
    *,
    remote_ip: str = "",
) -> bytes:
    """The whole field, ``Authentication-Results: <authserv-id>; ...\\r\\n``, folded.

    One result per method that ran, in this order: spf (MAIL FROM, ``smtp.mailfrom``), spf
    (HELO, ``smtp.helo``), dkim (one per signature: ``header.d``, ``header.i``, ``header.s``,
    ``header.a``, ``header.b`` with the shortest unique prefix of at least 8 characters),
    dmarc (``header.from``, the policy and disposition in a comment), arc
    (``smtp.remote-ip`` when *remote_ip* is given), iprev (``policy.iprev``, the name in a
    comment). ``None`` (and an empty *dkim*) means the method did not run and is left out;
    when none ran the field says ``none`` (RFC 8601 §2.2). Failures and errors carry
    ``reason="..."``. Values that are not RFC 2045 tokens are quoted; the text is ASCII.
    """
    return render(
        field_template(authserv_id, spf, helo, dkim, dmarc, arc, iprev, remote_ip=remote_ip), dkim
    )


def field_template(
    authserv_id: str,
    spf: SpfResult | None,
    helo: SpfResult | None,
    dkim: Sequence[DkimResult],
    dmarc: DmarcResult | None,
    arc: ArcResult | None,
    iprev: IprevResult | None,
    *,
    remote_ip: str = "",
) -> FieldTemplate:
    """The field :func:`authentication_results` makes of these results, but for each DKIM
    result's header.b word: :func:`render` fills those in. Everything else repeats from
    message to message (one sender's SPF, DMARC and DKIM results; a connection's iprev),
    so it is made once, and cached."""
    return _template(
        authserv_id, spf, helo, tuple(map(_dkim_head, dkim)), dmarc, arc, iprev, remote_ip
    )


def render(template: FieldTemplate, dkim: Sequence[DkimResult]) -> bytes:
    """The field of *template* (:func:`field_template`) with the header.b words of *dkim*,
    results like those the template was made from but for their b= values."""
    slots = template.slots
    if not slots:
        return template.whole
    texts = template.texts
    if len(dkim) == 1 and len(slots) == 1:  # the usual message: one signature (_b_prefixes)
        own = _slot(slots[0], dkim[0].signature_b[:B_PREFIX])
        return (texts[0] + own + texts[1]).encode("ascii")
    prefixes = _b_prefixes([d.signature_b for d in dkim])
    out = [texts[0]]
    for slot, b, text in zip(slots, prefixes, texts[1:], strict=True):
        out.append(_slot(slot, b))
        out.append(text)
    return "".join(out).encode("ascii")


def _slot(slot: tuple[str, str, bool, str], b: str) -> str:
    """The lines of a DKIM result's resinfo (a template's *slot*) with the header.b word
    of the prefix *b*, folded onto its last line."""
    lead, last, more, plain = slot
    if not b:
        return plain
    own = _b_word(b) + (";" if more else "")
    if len(last) + 1 + len(own) <= LINE and " " not in own:  # the usual case
        return f"{lead}{last} {own}\r\n"
    return lead + _lines(_fold_onto([last], own.split(" ")))


class FieldTemplate(NamedTuple):
    """A field made from results, with a slot for each DKIM result's header.b word.
    ``texts``: the fixed text before the first slot, between slots, and after the last
    (lines with their CRLF). ``slots``: per DKIM result, the lines of its resinfo but
    the last, its last line, whether more resinfos follow, and its lines as they are
    without a header.b word. ``whole``: the field, when there is no slot."""

    texts: tuple[str, ...]
    slots: tuple[tuple[str, str, bool, str], ...]
    whole: bytes = b""


@functools.lru_cache(maxsize=1024)
def _template(
    authserv_id: str,
    spf: SpfResult | None,
    helo: SpfResult | None,
    dkim_heads: tuple[tuple[str, ...], ...],
    dmarc: DmarcResult | None,
    arc: ArcResult | None,
    iprev: IprevResult | None,
    remote_ip: str,
) -> FieldTemplate:
    """The :class:`FieldTemplate` of :func:`authentication_results` for these results (the
    DKIM ones as their words but header.b)."""
    resinfos: list[tuple[tuple[str, ...], bool]] = []  # (words, a DKIM slot)
    if spf is not None:
        resinfos.append((_spf_words(spf, "mailfrom"), False))
    if helo is not None:
        resinfos.append((_spf_words(helo, "helo"), False))
    resinfos += [(words, True) for words in dkim_heads]
    if dmarc is not None:
        resinfos.append((_dmarc_words(dmarc), False))
    if arc is not None:
        resinfos.append((_arc_words(arc, remote_ip), False))
    if iprev is not None:
        resinfos.append((_iprev_words(iprev), False))
    head = f"{FIELD}: {_value(authserv_id)};"
    if not resinfos:
        return FieldTemplate((), (), (head + " none\r\n").encode("ascii"))
    texts: list[str] = []
    slots: list[tuple[str, str, bool, str]] = []
    fixed = [head]  # lines since the last slot
    last = len(resinfos) - 1
    for n, (words, slot) in enumerate(resinfos):
        more = n < last
        if not slot:
            fixed += _folded(words, more)
            continue
        texts.append(_lines(fixed))
        fixed = []
        *lead, final = _folded(words, False)
        slots.append((_lines(lead), final, more, _lines(_folded(words, more))))
    texts.append(_lines(fixed))
    if not slots:
        return FieldTemplate((), (), texts[0].encode("ascii"))
    return FieldTemplate(tuple(texts), tuple(slots))


def _lines(lines: Iterable[str]) -> str:
    return "".join(line + "\r\n" for line in lines)


@functools.lru_cache(maxsize=1024)
def _spf_words(result: SpfResult, prop: str) -> tuple[str, ...]:
    return tuple(_spf(result, prop))


@functools.lru_cache(maxsize=1024)
def _dmarc_words(result: DmarcResult) -> tuple[str, ...]:
    return tuple(_dmarc(result))


@functools.lru_cache(maxsize=1024)
def _arc_words(result: ArcResult, remote_ip: str) -> tuple[str, ...]:
    return tuple(_arc(result, remote_ip))


@functools.lru_cache(maxsize=1024)
def _iprev_words(result: IprevResult) -> tuple[str, ...]:
    return tuple(_iprev(result))


@functools.lru_cache(maxsize=4096)
def _folded(words: tuple[str, ...], more: bool) -> tuple[str, ...]:
    """One resinfo's lines (:func:`_fold`), with the ";" that separates it from the next
    resinfo when *more* follow."""
    if more:
        words = (*words[:-1], words[-1] + ";")
    return tuple(_fold(list(words)))


def _fold(words: list[str]) -> list[str]:
    """One resinfo as lines: the first starts with a tab, the rest (folded before one of
    its spaces, which RFC 5322 allows inside quoted strings and comments too) with that
    space; a run without spaces longer than a line stays whole."""
    pieces = " ".join(words).split(" ")  # quoted text has single spaces (see _quoted)
    return _fold_onto(["\t" + pieces[0]], pieces[1:])


def _fold_onto(lines: list[str], pieces: Iterable[str]) -> list[str]:
    """*lines* (a resinfo folded so far) with *pieces* added, each after a space on the
    last line or, when that would pass ``LINE``, starting a line of its own."""
    for word in pieces:
        if len(lines[-1]) + 1 + len(word) > LINE:
            lines.append(" " + word)
        else:
            lines[-1] += " " + word
    return lines


# -- forged fields -------------------------------------------------------------------------

_ID_END = re.compile(rb'[\s;()"]')


def _skip_cfws(value: bytes, pos: int) -> int:
    """The position after white space and (nested) comments from *pos*."""
    depth = 0
    while pos < len(value):
        ch = value[pos : pos + 1]
        if depth:
            if ch == b"\\":
                pos += 1
            elif ch == b"(":
                depth += 1
            elif ch == b")":
                depth -= 1
        elif ch == b"(":
            depth = 1
        elif ch not in (b" ", b"\t", b"\r", b"\n"):
            return pos
        pos += 1
    return pos


def authserv_id_of(value: bytes) -> str | None:
    """The authserv-id of an Authentication-Results field value (lower-cased), skipping
    comments and white space; a quoted-string is unquoted. None when there is none."""
    pos = _skip_cfws(value, 0)
    if pos >= len(value):
        return None
    if value[pos : pos + 1] == b'"':
        out = bytearray()
        pos += 1
        while pos < len(value) and value[pos : pos + 1] != b'"':
            if value[pos : pos + 1] == b"\\":
                pos += 1
            if value[pos : pos + 1] not in (b"\r", b"\n"):
                out += value[pos : pos + 1]
            pos += 1
        text = bytes(out)
    else:
        end = _ID_END.search(value, pos)
        text = value[pos : end.start() if end else len(value)]
    if not text:
        return None
    return text.decode("utf-8", "replace").strip().lower()


def remove_forged(content: bytes, authserv_id: str) -> tuple[bytes, int]:
    """*content* without the Authentication-Results fields whose authserv-id is
    *authserv_id* (compared case-insensitively), and how many were removed.

    Only the top-level header block (up to the first empty line) is looked at; a field is
    taken with its continuation lines; every other byte, line endings included, is kept as
    it was. A field that only mentions our id elsewhere (in a comment, a property) stays.
    When nothing is removed the very same object is returned.
    """
    ours = authserv_id.strip().lower()
    name = FIELD_NAME
    if name not in content[: _header_end(content)].lower():
        return content, 0  # the common case: a scan, no copy
    out: list[bytes] = []
    removed = 0
    pos = 0
    end = _header_end(content)
    dropping = False
    while pos < end:
        nl = content.find(b"\n", pos, end)
        stop = end if nl < 0 else nl + 1
        line = content[pos:stop]
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                out.append(line)
        else:
            dropping = False
            field_name, colon, _rest = line.partition(b":")
            if colon and field_name.rstrip(b" \t").lower() == name:
                value = _field_value(content, pos + len(field_name) + 1, end)
                if authserv_id_of(value) == ours:
                    dropping = True
                    removed += 1
            if not dropping:
                out.append(line)
        pos = stop
    if not removed:
        return content, 0
    return b"".join(out) + content[end:], removed


def _header_end(content: bytes) -> int:
    """Where the header block ends: the start of the empty line that ends it (or the end)."""
    if content.startswith(b"\r\n") or content.startswith(b"\n"):
        return 0
    crlf = content.find(b"\r\n\r\n")
    # the LF-only form only before the CRLF one (else every octet of the body is read)
    lf = content.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else len(content))
    ends = [i + 2 for i in (crlf,) if i >= 0] + [i + 1 for i in (lf,) if i >= 0]
    return min(ends) if ends else len(content)


def _field_value(content: bytes, start: int, end: int) -> bytes:
    """The value of the field whose value starts at *start*: up to the next line that does
    not begin with white space."""
    pos = start
    while True:
        nl = content.find(b"\n", pos, end)
        if nl < 0 or nl + 1 >= end or content[nl + 1 : nl + 2] not in (b" ", b"\t"):
            return content[start : end if nl < 0 else nl + 1]
        pos = nl + 1
