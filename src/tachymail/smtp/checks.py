"""Content checks at intake: the hop count (mail loops) and the operator's header and body
rules, as Postfix's ``hopcount_limit``, ``header_checks`` and ``body_checks``.

Pure functions over the message bytes (no sockets, no event loop), so they can be unit
tested and fuzzed; the SMTP session calls :meth:`ContentChecks.check` once per message at
the end of DATA/BDAT and turns the :class:`Verdict` into its reply.

What callers may rely on:

- The hop count is the number of ``Received:`` and ``Delivered-To:`` fields (name at the
  start of a line, any case, optional white space before the colon) in the top-level
  header block only; a folded field counts once. Over ``max_hops`` the verdict is
  ``reject`` with ``554 5.4.6 Too many hops``. Only the header block is read.
- Header rules are tried in order against every header field, unfolded (line breaks
  removed, the white space after them kept) and without its line break, of the message
  and of every MIME part and attached message (as Postfix's header_checks,
  mime_header_checks and nested_header_checks do by default). The first rule that
  matches a field decides for that field.
- Body rules are tried in order against each line (without its line break) of every
  ``text/*`` part that is not base64-encoded, read from the raw (undecoded) part body and
  only over its first ``body_limit`` octets (Postfix's body_checks_size_limit); other
  parts are skipped. The first rule that matches a line decides for that line.
- Actions: ``reject`` ends the checks: ``550 5.7.1`` with the rule's text (default
  "Message content rejected"); ``discard`` ends the checks: the client gets 250 and
  nothing is queued; ``hold``: the message is queued on hold (checks go on, a later
  reject or discard wins); ``strip`` removes the matching header field; ``add``
  prepends the rule's text (a whole ``Name: value`` field) before the matching field.
  ``strip`` and ``add`` are header actions only.
- Patterns are Python regular expressions over the raw octets (the pattern's text is
  encoded as UTF-8), case-insensitive unless the pattern turns that off (``(?-i:...)``),
  as Postfix's regexp tables are. ``^`` and ``$`` match at the start and end of the
  header field or body line.
- Never raises on any content; the work is linear in the header bytes plus, per text
  part, at most ``body_limit`` octets per rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tachymail.protocol import replies as R
from tachymail.protocol.mime import Part, scan

if TYPE_CHECKING:
    from tachymail.config import Config

ACCEPT, REJECT, HOLD, DISCARD, STRIP, ADD = "accept", "reject", "hold", "discard", "strip", "add"
HEADER_ACTIONS = (REJECT, HOLD, DISCARD, STRIP, ADD)
BODY_ACTIONS = (REJECT, HOLD, DISCARD)
DEFAULT_REJECT_TEXT = "Message content rejected"
TOO_MANY_HOPS = R.reply(554, "5.4.6", "Too many hops")

# A hop header's name at the start of a line of the header block (continuations start
# with white space, so a folded field is counted once).
_HOP_FIELD = re.compile(rb"^(?:received|delivered-to)[ \t]*:", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled header or body rule; ``where`` names it in logs ("header_check[2]")."""

    where: str
    regex: re.Pattern[bytes]
    action: str
    text: str = ""


def compile_rule(where: str, pattern: str, action: str, text: str = "") -> Rule:
    """The rule, compiled case-insensitive over octets; ValueError (naming *where*) when the
    pattern is not a valid regular expression."""
    try:
        regex = re.compile(pattern.encode("utf-8"), re.IGNORECASE | re.MULTILINE)
    except re.error as exc:
        raise ValueError(f"{where}.pattern: not a valid regular expression: {exc}") from None
    return Rule(where, regex, action, text)


@dataclass(slots=True)
class Verdict:
    """What to do with one message.

    ``action`` is ACCEPT, REJECT, HOLD or DISCARD; ``content`` is the message to queue
    (with stripped and added headers); ``reply`` the SMTP reply of a REJECT; ``reason``
    says why for the log ("header_check[0]: Subject: ..."); ``metric`` is the
    messages_rejected reason of a REJECT ("loop" or "content").
    """

    content: bytes
    action: str = ACCEPT
    reply: bytes = b""
    reason: str = ""
    metric: str = ""
    #: the rules that acted (hold, strip, add), for the log
    applied: list[str] = field(default_factory=list)
    #: the header block may hold Authentication-Results fields (before the first blank line)
    results_fields: bool = False


def header_block_end(message: bytes) -> int:
    """Offset just past the top-level header block, where :func:`scan` ends it (past the
    blank line; at the first line that is not a field; or the end of the message)."""
    crlf = message.find(b"\n\r\n")
    # Only up to the first CRLF blank line: a CRLF message is not searched to its end.
    lf = message.find(b"\n\n", 0, len(message) if crlf < 0 else crlf)
    end = crlf if lf < 0 else lf
    # Only the header block goes to the scanner: a large body costs nothing here.
    prefix = memoryview(message) if end < 0 else memoryview(message)[: end + 3]
    return scan(prefix, max_depth=0).body_start


def count_hops(message: bytes) -> int:
    """Received and Delivered-To fields in the top-level header block (see module doc)."""
    block = memoryview(message)[: header_block_end(message)]
    return sum(1 for _ in _HOP_FIELD.finditer(block))


def _trace_fields(message: bytes) -> tuple[int, bool]:
    """An upper bound of :func:`count_hops` without the MIME scan: the lines before the
    first blank line that begin with a hop field's name (the scanner ends the header block
    there or earlier, and a field is a line beginning with its name, so the exact count is
    needed only when this bound is over the limit: almost never); and whether a line there
    begins with Authentication-Results (the session then looks for forged ones).

    Substring counts over the lowered block: a regex anchored at every line start tries
    every position of the block (4.9 us for a signed 1 KiB message, this 2.4 us)."""
    crlf = message.find(b"\n\r\n")
    lf = message.find(b"\n\n", 0, len(message) if crlf < 0 else crlf)
    end = crlf if lf < 0 else lf
    block = b"\n" + (message if end < 0 else message[: end + 1]).lower()
    hops = block.count(b"\nreceived") + block.count(b"\ndelivered-to")
    return hops, block.find(b"\nauthentication-results") >= 0


def header_fields(message: bytes, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each header field in message[start:end], its continuation lines and
    line break included; stops at the blank line."""
    pos, field_start = start, -1
    while pos < end:
        newline = message.find(b"\n", pos, end)
        line_end = end if newline < 0 else newline + 1
        if message[pos : pos + 1] in (b" ", b"\t") and field_start >= 0:
            pos = line_end
            continue
        if field_start >= 0:
            yield field_start, pos
            field_start = -1
        if not message[pos:line_end].strip(b"\r\n"):
            return  # the blank line ending the block
        field_start = pos
        pos = line_end
    if field_start >= 0:
        yield field_start, end


def unfold(raw: bytes) -> bytes:
    """A header field as one line: line breaks removed, the white space after them kept."""
    return raw.replace(b"\r\n", b"").replace(b"\n", b"").rstrip(b"\r")


def _parts(root: Part) -> Iterator[Part]:
    stack = [root]
    while stack:
        part = stack.pop()
        yield part
        stack.extend(reversed(part.children))


def first_matching_line(rules: Sequence[Rule], text: bytes) -> Iterator[tuple[Rule, bytes]]:
    """For each line of *text* (LF line ends) that some rule matches on its own, in line
    order: the first such rule and the line.

    Each rule searches the whole text (C speed) for its next candidate; a candidate line
    is confirmed by trying the rules in order on that line alone, so the result is what a
    Python loop over lines would give, without one per line.
    """
    if text.endswith(b"\n"):
        text = text[:-1]  # the last line's break: no empty line after it
    if not text:
        return
    pending: list[int] = [-1] * len(rules)  # each rule's next candidate start; -1: unknown
    done = [False] * len(rules)
    pos = 0
    size = len(text)
    while pos <= size:
        nearest = size + 1
        for i, rule in enumerate(rules):
            if done[i]:
                continue
            if pending[i] < pos:
                found = rule.regex.search(text, pos)
                if found is None:
                    done[i] = True
                    continue
                pending[i] = found.start()
            nearest = min(nearest, pending[i])
        if nearest > size:
            return
        line_start = text.rfind(b"\n", 0, nearest) + 1
        newline = text.find(b"\n", nearest)
        line_end = size if newline < 0 else newline
        line = text[line_start:line_end]
        for rule in rules:
            if rule.regex.search(line) is not None:
                yield rule, line
                break
        pos = line_end + 1


class ContentChecks:
    """The hop limit and the compiled rules of one configuration (compile once, check many)."""

    @classmethod
    def from_config(cls, config: Config) -> ContentChecks:
        """Compiled from ``policy.max_hops``, ``policy.body_check_size_limit`` and the
        ``[[header_check]]`` / ``[[body_check]]`` rules (validated by the configuration)."""
        return cls(
            config.policy.max_hops,
            [
                compile_rule(f"header_check[{i}]", r.pattern, r.action, r.text)
                for i, r in enumerate(config.header_checks)
            ],
            [
                compile_rule(f"body_check[{i}]", r.pattern, r.action, r.text)
                for i, r in enumerate(config.body_checks)
            ],
            config.policy.body_check_size_limit,
        )

    def __init__(
        self,
        max_hops: int = 50,
        header_rules: Sequence[Rule] = (),
        body_rules: Sequence[Rule] = (),
        body_limit: int = 51200,
    ) -> None:
        self.max_hops = max_hops
        self.header_rules = list(header_rules)
        self.body_rules = list(body_rules)
        self.body_limit = body_limit

    def check(self, message: bytes) -> Verdict:
        """The verdict on *message* (CRLF or LF line ends; see the module docstring)."""
        verdict = Verdict(message)
        hops, verdict.results_fields = _trace_fields(message)
        if self.max_hops and hops > self.max_hops:
            hops = count_hops(message)
            if hops > self.max_hops:
                verdict.action, verdict.reply, verdict.metric = REJECT, TOO_MANY_HOPS, "loop"
                limit = self.max_hops
                verdict.reason = f"too many hops ({hops} Received/Delivered-To, limit {limit})"
                return verdict
        if not self.header_rules and not self.body_rules:
            return verdict
        root = scan(message)
        edits: list[tuple[int, int, bytes]] = []
        for part in _parts(root):
            if self.header_rules and self._headers(message, part, verdict, edits):
                return verdict
            if (
                self.body_rules
                and not part.children
                and part.content_type.startswith("text/")
                and part.transfer_encoding != "base64"
                and self._body(message, part, verdict)
            ):
                return verdict
        if edits:
            verdict.content = _apply(message, edits)
        return verdict

    def _headers(
        self, message: bytes, part: Part, verdict: Verdict, edits: list[tuple[int, int, bytes]]
    ) -> bool:
        """Apply the header rules to *part*'s fields; True when the checks end (reject,
        discard)."""
        for start, end in header_fields(message, part.start, part.body_start):
            line = unfold(message[start:end])
            for rule in self.header_rules:
                if rule.regex.search(line) is None:
                    continue
                if _decide(rule, line, verdict):
                    return True
                if rule.action == STRIP:
                    edits.append((start, end, b""))
                elif rule.action == ADD:
                    edits.append((start, start, rule.text.encode("utf-8") + b"\r\n"))
                break
        return False

    def _body(self, message: bytes, part: Part, verdict: Verdict) -> bool:
        """Apply the body rules to the first body_limit octets of a text part; True when
        the checks end."""
        stop = min(part.end, part.body_start + self.body_limit)
        text = message[part.body_start : stop].replace(b"\r\n", b"\n")
        for rule, line in first_matching_line(self.body_rules, text):
            if _decide(rule, line, verdict):
                return True
        return False


# The checks of the configuration a worker runs: compiled once per worker process (a
# reload starts new workers with the new configuration).
_compiled: tuple[Config, ContentChecks] | None = None


def checks_for(config: Config) -> ContentChecks:
    """The compiled checks of *config*, built on first use and kept while it is current."""
    global _compiled
    if _compiled is None or _compiled[0] is not config:
        _compiled = (config, ContentChecks.from_config(config))
    return _compiled[1]


def _decide(rule: Rule, line: bytes, verdict: Verdict) -> bool:
    """Record what *rule* does to the message; True when it ends the checks."""
    shown = line[:200].decode("utf-8", "replace")
    if rule.action == REJECT:
        verdict.action, verdict.metric = REJECT, "content"
        verdict.reply = R.reply(550, "5.7.1", rule.text or DEFAULT_REJECT_TEXT)
        verdict.reason = f"{rule.where}: {shown}"
        return True
    if rule.action == DISCARD:
        verdict.action = DISCARD
        verdict.reason = f"{rule.where}: {shown}"
        return True
    if rule.action == HOLD and verdict.action == ACCEPT:
        verdict.action = HOLD
        verdict.reason = f"{rule.where}: {shown}"
    verdict.applied.append(f"{rule.action} by {rule.where}")
    return False


def _apply(message: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """*message* with each (start, end, replacement) edit made; edits do not overlap."""
    out: list[bytes] = []
    pos = 0
    for start, end, replacement in sorted(edits, key=lambda e: (e[0], e[1])):
        out.append(message[pos:start])
        out.append(replacement)
        pos = end
    out.append(message[pos:])
    return b"".join(out)
