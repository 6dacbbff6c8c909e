"""Pure-Python twin of the compiled SMTP command-line kernel (``ext/commands.pyx``).

Same API, same results and the same ``SmtpSyntaxError`` (code, status, text) for every input;
the API and its guarantees are documented in ``tachymail.protocol.commands``.  The line reader
works on a ``bytearray``; paths and parameters are checked with regular expressions that spell
out the RFC 5321 §4.1.2 grammar.
"""

from __future__ import annotations

import operator
import re

from tachymail.protocol.errors import SmtpSyntaxError

__all__ = [
    "LINE_BARE_CR",
    "LINE_BARE_LF",
    "LINE_TOO_LONG",
    "VERB_AUTH",
    "VERB_BDAT",
    "VERB_DATA",
    "VERB_EHLO",
    "VERB_EXPN",
    "VERB_HELO",
    "VERB_HELP",
    "VERB_MAIL",
    "VERB_NOOP",
    "VERB_QUIT",
    "VERB_RCPT",
    "VERB_RSET",
    "VERB_STARTTLS",
    "VERB_UNKNOWN",
    "VERB_VRFY",
    "LineReader",
    "parse_command",
    "parse_mail",
    "parse_rcpt",
]

VERB_UNKNOWN = 0
VERB_HELO = 1
VERB_EHLO = 2
VERB_MAIL = 3
VERB_RCPT = 4
VERB_DATA = 5
VERB_BDAT = 6
VERB_RSET = 7
VERB_NOOP = 8
VERB_QUIT = 9
VERB_VRFY = 10
VERB_EXPN = 11
VERB_HELP = 12
VERB_STARTTLS = 13
VERB_AUTH = 14

LINE_TOO_LONG = 1
LINE_BARE_LF = 2
LINE_BARE_CR = 4

_VERBS = {
    b"HELO": VERB_HELO,
    b"EHLO": VERB_EHLO,
    b"MAIL": VERB_MAIL,
    b"RCPT": VERB_RCPT,
    b"DATA": VERB_DATA,
    b"BDAT": VERB_BDAT,
    b"RSET": VERB_RSET,
    b"NOOP": VERB_NOOP,
    b"QUIT": VERB_QUIT,
    b"VRFY": VERB_VRFY,
    b"EXPN": VERB_EXPN,
    b"HELP": VERB_HELP,
    b"STARTTLS": VERB_STARTTLS,
    b"AUTH": VERB_AUTH,
}

_LOCAL_MAX = 64  # RFC 5321 §4.5.3.1.1
_DOMAIN_MAX = 255  # §4.5.3.1.2
_PATH_MAX = 256  # §4.5.3.1.3, "<" and ">" included
_ENVID_MAX = 100  # RFC 3461 §4.4


# ---------------------------------------------------------------------------------------------
# Line splitting


class LineReader:
    """Splits a byte stream into command lines; see ``tachymail.protocol.commands``."""

    __slots__ = (
        "_auth_limit",
        "_buf",
        "_cut",
        "_limit",
        "_scan",
        "_skipping",
        "_start",
        "auth_exchange",
    )

    def __init__(self, limit: int = 512, auth_limit: int = 0) -> None:
        limit = operator.index(limit)
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._auth_limit = max(limit, operator.index(auth_limit))
        #: every line is an AUTH exchange line (auth_limit applies)
        self.auth_exchange = False
        self._cut = False  # the line at _start lost bytes: it is too long, whatever limit
        # Unread bytes are _buf[_start:]; _buf[_start:_scan] is known to hold no LF.
        self._buf = bytearray()
        self._start = 0
        self._scan = 0
        self._skipping = False  # dropping the rest of an over-long line until its LF

    @property
    def limit(self) -> int:
        """The longest line accepted, its CRLF included."""
        return self._limit

    @property
    def auth_limit(self) -> int:
        """The longest AUTH command or AUTH exchange line accepted, its CRLF included."""
        return self._auth_limit

    @property
    def pending(self) -> int:
        """Bytes buffered and not yet returned by readline()."""
        return len(self._buf) - self._start

    def _line_limit(self, first: int, end: int) -> int:
        # auth_limit in an AUTH exchange or for "AUTH " (any case), else limit.
        if self._auth_limit == self._limit:
            return self._limit
        if self.auth_exchange:
            return self._auth_limit
        buf = self._buf
        if (
            end - first > 4
            and buf[first + 4] == 32
            and bytes(buf[first : first + 4]).upper() == b"AUTH"
        ):
            return self._auth_limit
        return self._limit

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append a chunk (any contiguous buffer)."""
        chunk = data if isinstance(data, bytes) else bytes(memoryview(data))
        if not chunk:
            return
        buf = self._buf
        if self._skipping:
            lf = chunk.find(b"\n")
            if lf < 0:
                return
            # The over-long line ends here: its kept bytes plus this LF make limit + 1.
            self._skipping = False
            chunk = chunk[lf:]
        if self._start:
            # Compact: drop the lines already returned (cheap at the front of a bytearray).
            del buf[: self._start]
            self._scan -= self._start
            self._start = 0
        buf += chunk
        if len(buf) >= self._limit:
            lf = buf.find(b"\n", self._scan)
            if lf < 0:
                self._scan = len(buf)
                self._truncate_if_overlong()
            else:
                self._scan = lf

    def _truncate_if_overlong(self) -> None:
        # Called when the unread bytes hold no LF: a partial line of its limit or more is
        # already too long, so keep only that many of its bytes and drop the rest until its LF.
        limit = self._line_limit(self._start, len(self._buf))
        if len(self._buf) - self._start >= limit:
            del self._buf[self._start + limit :]
            self._scan = len(self._buf)
            self._skipping = True
            self._cut = True

    def readline(self) -> tuple[bytes, int] | None:
        """The next complete line as (line, flags), or None when no LF is buffered."""
        buf = self._buf
        first = self._start
        if first == len(buf):
            return None
        lf = buf.find(b"\n", self._scan)
        if lf < 0:
            self._scan = len(buf)
            self._truncate_if_overlong()
            return None
        self._start = self._scan = lf + 1
        # Counted as received: a bare LF counts one octet, CRLF two.
        # auth_limit >= limit: only a line over limit needs to know which limit is its own.
        if self._cut or (
            lf + 1 - first > self._limit and lf + 1 - first > self._line_limit(first, lf)
        ):
            self._cut = False
            line, flags = b"", LINE_TOO_LONG
        else:
            stop = lf
            if stop > first and buf[stop - 1] == 13:
                stop -= 1
                flags = 0
            else:
                flags = LINE_BARE_LF
            if buf.find(b"\r", first, stop) >= 0:
                flags |= LINE_BARE_CR
            line = bytes(buf[first:stop])
        if self._start == len(buf):
            self._empty()
        return line, flags

    def drain(self) -> bytes:
        """Every buffered byte, partial line included; the reader is empty afterwards."""
        rest = bytes(self._buf[self._start :])
        self._skipping = False
        self._cut = False
        self._empty()
        return rest

    def _empty(self) -> None:
        self._buf = bytearray()
        self._start = self._scan = 0


# ---------------------------------------------------------------------------------------------
# Verbs


def parse_command(line: bytes) -> tuple[int, bytes]:
    """(VERB_x, text after the first space) or (VERB_UNKNOWN, line)."""
    if not isinstance(line, bytes):
        raise TypeError(f"parse_command() needs bytes, not {type(line).__name__}")
    word, _, args = line.partition(b" ")
    verb = _VERBS.get(word.upper(), VERB_UNKNOWN)
    if verb == VERB_UNKNOWN:
        return VERB_UNKNOWN, line
    return verb, args


# ---------------------------------------------------------------------------------------------
# Paths (RFC 5321 §4.1.2, §4.1.3; RFC 6531 §3.3: UTF-8 octets count as atext, qtext and
# letters of a sub-domain; whether they are allowed is decided after the syntax check)

_ATEXT = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\xff-]"
_LETDIG = rb"[A-Za-z0-9\x80-\xff]"
_SUB_DOMAIN = _LETDIG + rb"(?:-*" + _LETDIG + rb")*"
_DOMAIN = _SUB_DOMAIN + rb"(?:\." + _SUB_DOMAIN + rb")*"
_DOT_STRING = _ATEXT + rb"+(?:\." + _ATEXT + rb"+)*"
_QUOTED = rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\x20-\x7e])*"'
_PATH = re.compile(
    rb"(?:@" + _DOMAIN + rb"(?:,@" + _DOMAIN + rb")*:)?"  # source route, checked then ignored
    rb"(?P<mailbox>(?P<local>" + _DOT_STRING + rb"|" + _QUOTED + rb")"
    rb"@(?P<domain>" + _DOMAIN + rb"|\[(?P<literal>[\x21-\x5a\x5e-\x7e]+)\]))"
)
# The path ends at the first ">" outside a quoted string; after it comes SP or the end.
_ENVELOPE = {
    True: re.compile(rb'(?i:FROM:) *+<((?:[^">]|"(?:[^"\\]|\\.)*+")*+)>(?: |\Z)', re.DOTALL),
    False: re.compile(rb'(?i:TO:) *+<((?:[^">]|"(?:[^"\\]|\\.)*+")*+)>(?: |\Z)', re.DOTALL),
}
_SNUM = re.compile(rb"[0-9]{1,3}")
_IPV6_HEX = re.compile(rb"[0-9A-Fa-f]{1,4}")
_STANDARDIZED_TAG = re.compile(rb"[A-Za-z0-9-]*[A-Za-z0-9]")


def _ipv4_ok(text: bytes) -> bool:
    """Snum 3("." Snum): four decimal numbers of 1-3 digits, each 0-255."""
    parts = text.split(b".")
    return len(parts) == 4 and all(_SNUM.fullmatch(p) and int(p) <= 255 for p in parts)


def _ipv6_ok(text: bytes) -> bool:
    """IPv6-addr of RFC 5321 §4.1.3: eight groups, or at most six around one "::", where an
    IPv4 tail counts as two groups."""
    colon = text.rfind(b":")
    if colon < 0:
        return False
    tail = text[colon + 1 :]
    if b"." in tail:
        if not _ipv4_ok(tail):
            return False
        text = text[: colon + 1] + b"0:0"  # check the rest with two groups in its place
    head, compressed, rest = text.partition(b"::")
    groups = (head.split(b":") if head else []) + (rest.split(b":") if rest else [])
    if not all(_IPV6_HEX.fullmatch(group) for group in groups):
        return False
    return len(groups) <= 6 if compressed else len(groups) == 8


def _literal_ok(inner: bytes) -> bool:
    """The inside of an address literal: IPv4, "IPv6:" IPv6-addr, or tag ":" 1*dcontent."""
    tag, colon, rest = inner.partition(b":")
    if not colon:
        return _ipv4_ok(inner)
    if tag.upper() == b"IPV6":
        return _ipv6_ok(rest)
    return bool(rest) and _STANDARDIZED_TAG.fullmatch(tag) is not None


# ---------------------------------------------------------------------------------------------
# ESMTP parameters (RFC 5321 §4.1.2 esmtp-param; each keyword's own RFC for its value)

_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH", "REQUIRETLS"})
_RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})
_NO_VALUE = frozenset({"SMTPUTF8", "REQUIRETLS"})
_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(rb"[\x21-\x3c\x3e-\x7e]+")
_SIZE = re.compile(rb"[0-9]{1,20}")  # RFC 1870
_BODY = frozenset({"7BIT", "8BITMIME", "BINARYMIME"})  # RFC 6152, RFC 3030
_RET = frozenset({"FULL", "HDRS"})  # RFC 3461 §4.3
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})  # RFC 3461 §4.1
_XTEXT = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+")  # RFC 3461 §4
_HEXCHAR = re.compile(rb"\+([0-9A-F]{2})")
_ORCPT = re.compile(rb"([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+);(.*)", re.DOTALL)  # RFC 3461 §4.2


def _xtext(value: bytes, max_decoded: int = 0) -> str | None:
    """The decoded xtext, which must be printable ASCII (graphic or space); None when the
    xtext is bad or longer than max_decoded (0: no limit) once decoded."""
    if _XTEXT.fullmatch(value) is None:
        return None
    decoded = _HEXCHAR.sub(lambda hexchar: bytes((int(hexchar[1], 16),)), value)
    if not decoded.isascii() or not decoded.decode("ascii").isprintable():
        return None
    if max_decoded and len(decoded) > max_decoded:
        return None
    return decoded.decode("ascii")


def _notify(value: bytes) -> str | None:
    """NEVER alone, or a comma list of SUCCESS, FAILURE, DELAY without repeats."""
    text = value.decode("ascii").upper()
    if text == "NEVER":
        return text
    items = text.split(",")
    if not _NOTIFY.issuperset(items) or len(set(items)) != len(items):
        return None
    return text


def _param_value(key: str, value: bytes) -> str | None:
    """The stored value of a known keyword's esmtp-value, or None when it is not valid."""
    if key == "SIZE":
        return value.decode("ascii") if _SIZE.fullmatch(value) else None
    if key == "BODY" or key == "RET":
        text = value.decode("ascii").upper()
        return text if text in (_BODY if key == "BODY" else _RET) else None
    if key == "NOTIFY":
        return _notify(value)
    if key == "ORCPT":
        match = _ORCPT.fullmatch(value)
        address = _xtext(match[2]) if match else None
        return None if match is None or address is None else f"{match[1].decode()};{address}"
    if key == "ENVID":
        return _xtext(value, _ENVID_MAX)
    return _xtext(value)  # AUTH, RFC 4954 §5: xtext of a mailbox, or "<>" (its own xtext)


def _parse_params(text: bytes, known: frozenset[str]) -> dict[str, str]:
    """The SP-separated esmtp-params in text, checked left to right."""
    params: dict[str, str] = {}
    for token in text.split(b" "):
        if not token:
            continue
        keyword, equals, value = token.partition(b"=")
        if _KEYWORD.fullmatch(keyword) is None:
            raise SmtpSyntaxError(501, "5.5.4", "Bad parameter syntax")
        key = keyword.decode("ascii").upper()
        if key not in known:
            raise SmtpSyntaxError(555, "5.5.4", f"{key} parameter not recognised")
        if key in params:
            raise SmtpSyntaxError(501, "5.5.4", f"Duplicate {key} parameter")
        if key in _NO_VALUE:
            if equals:
                raise SmtpSyntaxError(501, "5.5.4", f"{key} parameter takes no value")
            params[key] = ""
            continue
        if not value:
            raise SmtpSyntaxError(501, "5.5.4", f"{key} parameter needs a value")
        stored = _param_value(key, value) if _VALUE.fullmatch(value) else None
        if stored is None:
            raise SmtpSyntaxError(501, "5.5.4", f"Bad {key} parameter value")
        params[key] = stored
    return params


# ---------------------------------------------------------------------------------------------
# MAIL FROM / RCPT TO


def _parse_envelope(args: bytes, is_mail: bool, smtputf8: bool) -> tuple[str, dict[str, str]]:
    if not isinstance(args, bytes):
        raise TypeError(f"needs bytes, not {type(args).__name__}")
    envelope = _ENVELOPE[is_mail].match(args)
    if envelope is None:
        usage = "Syntax: MAIL FROM:<address>" if is_mail else "Syntax: RCPT TO:<address>"
        raise SmtpSyntaxError(501, "5.5.4", usage)
    path = envelope[1]
    status = "5.1.7" if is_mail else "5.1.3"
    bad_syntax = "Bad sender address syntax" if is_mail else "Bad recipient address syntax"
    non_ascii = False
    if not path:
        if not is_mail:
            raise SmtpSyntaxError(501, status, bad_syntax)
        mailbox = ""
    elif not is_mail and path.upper() == b"POSTMASTER":
        mailbox = path.decode("ascii")  # RFC 5321 §4.5.1, as written
    else:
        match = _PATH.fullmatch(path)
        if match is None or (match["literal"] is not None and not _literal_ok(match["literal"])):
            raise SmtpSyntaxError(501, status, bad_syntax)
        non_ascii = not path.isascii()
        try:
            mailbox = match["mailbox"].decode("utf-8")
            if non_ascii:
                path.decode("utf-8")  # the source route too
        except UnicodeDecodeError:
            raise SmtpSyntaxError(501, status, bad_syntax) from None
        if len(match["local"]) > _LOCAL_MAX:
            raise SmtpSyntaxError(501, status, "Local part too long")
        if len(match["domain"]) > _DOMAIN_MAX:
            raise SmtpSyntaxError(501, status, "Domain too long")
        if len(path) + 2 > _PATH_MAX:
            raise SmtpSyntaxError(501, status, "Path too long")
    params = _parse_params(args[envelope.end() :], _MAIL_PARAMS if is_mail else _RCPT_PARAMS)
    if non_ascii and not (smtputf8 and (not is_mail or "SMTPUTF8" in params)):
        raise SmtpSyntaxError(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
    return mailbox, params


def parse_mail(args: bytes, smtputf8: bool = True) -> tuple[str, dict[str, str]]:
    """(reverse_path, params) of the text after "MAIL "; raises SmtpSyntaxError."""
    return _parse_envelope(args, True, smtputf8)


def parse_rcpt(args: bytes, smtputf8: bool = False) -> tuple[str, dict[str, str]]:
    """(forward_path, params) of the text after "RCPT "; raises SmtpSyntaxError."""
    return _parse_envelope(args, False, smtputf8)
