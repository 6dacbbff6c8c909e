"""tachymail.imap.search: SEARCH keys parsed and evaluated on real messages (built with the
email package and from the third-party MIME corpus, summarised by build_summary), ESEARCH and
SAVE responses, sequence sets, base subjects, SORT and THREAD.

Command arguments come from the real tokenizer (CommandReader), as the session gets them.
"""

from __future__ import annotations

import base64
import calendar
import email
import email.policy
import re
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tachymail.imap.search import (
    MAX_DEPTH,
    SearchError,
    base_subject,
    decode_words,
    parse_search,
    parse_sort,
    parse_thread,
    run_search,
    run_sort,
    run_thread,
    saved_uids,
    search_response,
    sequence_set,
    sort_response,
)
from tachymail.mailbox import MessageInfo
from tachymail.mailbox.summary import build_summary
from tachymail.protocol.imap import Command, CommandReader, String

CORPUS_MIME = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "mime"


def args(text: bytes) -> list[object]:
    """The arguments of ``SEARCH <text>`` as the tokenizer gives them (literals allowed)."""
    reader = CommandReader()
    reader.feed(b"a SEARCH " + text + b"\r\n")
    item = reader.next()
    while item is not None and not isinstance(item, Command):
        item = reader.next()
    assert isinstance(item, Command), text
    return item.args


def lit(text: str) -> bytes:
    data = text.encode()
    return b"{%d}\r\n" % len(data) + data


def when(day: str) -> float:
    """A UTC timestamp from "2024-01-05 12:00"."""
    date, time_of_day = day.split()
    y, m, d = map(int, date.split("-"))
    hh, mm = map(int, time_of_day.split(":"))
    return float(calendar.timegm((y, m, d, hh, mm, 0, 0, 0, 0)))


@dataclass
class Box:
    """A SearchContext over messages in memory; counts what the search reads."""

    messages: list[MessageInfo] = field(default_factory=list)
    saved: list[int] = field(default_factory=list)
    contents: dict[bytes, bytes] = field(default_factory=dict)
    content_reads: int = 0
    summary_reads: int = 0
    recent: set[int] = field(default_factory=set)  # UIDs \Recent in the session

    def add(
        self,
        content: bytes,
        *,
        flags: tuple[str, ...] = (),
        date: str = "2024-01-05 12:00",
        modseq: int = 1,
        uid: int | None = None,
    ) -> int:
        uid = uid if uid is not None else (self.messages[-1].uid + 1 if self.messages else 1)
        key = b"c%d" % uid
        self.contents[key] = content
        self.messages.append(
            MessageInfo(uid, len(content), frozenset(flags), when(date), modseq, key)
        )
        return len(self.messages)

    def content(self, info: MessageInfo) -> bytes:
        self.content_reads += 1
        return self.contents[info.content_id]

    def summary(self, info: MessageInfo) -> dict[str, Any]:
        self.summary_reads += 1
        return build_summary(self.contents[info.content_id])

    def is_recent(self, uid: int) -> bool:
        return uid in self.recent

    def search(self, text: bytes, *, rev2: bool = False) -> list[int]:
        return run_search(parse_search(args(text), rev2=rev2), self)


def message(
    subject: str = "Hello",
    body: str = "plain body\n",
    *,
    charset: str = "us-ascii",
    cte: str | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.org>"
    msg["To"] = "Bob <bob@example.net>"
    msg["Subject"] = subject
    msg["Date"] = "Fri, 05 Jan 2024 10:00:00 +0000"
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body, charset=charset, cte=cte)
    return msg.as_bytes(policy=email.policy.SMTP)


def raw(head: str, body: bytes) -> bytes:
    return head.replace("\n", "\r\n").encode() + b"\r\n" + body


# ---------------------------------------------------------------------------------------------
# parsing


EVERY_KEY = [
    b"ALL",
    b"ANSWERED",
    b"BCC bob",
    b"BEFORE 1-Feb-1994",
    b"BODY word",
    b"CC bob",
    b"DELETED",
    b"DRAFT",
    b"FLAGGED",
    b'FROM "Smith"',
    b"HEADER X-Mailer foo",
    b"KEYWORD $Junk",
    b"LARGER 100",
    b"NEW",
    b"NOT SEEN",
    b"OLD",
    b"ON 17-Jul-1996",
    b"OR SEEN DRAFT",
    b"RECENT",
    b"SEEN",
    b"SENTBEFORE 1-Feb-1994",
    b"SENTON 01-Feb-1994",
    b"SENTSINCE 1-Feb-1994",
    b'SINCE "1-Feb-1994"',
    b"SMALLER 100",
    b"SUBJECT " + lit("café"),
    b"TEXT word",
    b"TO bob",
    b"UID 1:*",
    b"UID $",
    b"UNANSWERED",
    b"UNDELETED",
    b"UNDRAFT",
    b"UNFLAGGED",
    b"UNKEYWORD $Junk",
    b"UNSEEN",
    b"1:3,5,*",
    b"$",
    b"(SEEN FLAGGED)",
    b"((SEEN) (NOT FLAGGED))",
    b"MODSEQ 5",
    b'MODSEQ "/flags/\\\\Seen" all 5',
    b"YOUNGER 60",
    b"OLDER 60",
    b"CHARSET UTF-8 TEXT x",
    b"CHARSET us-ascii TEXT x",
    b"RETURN (MIN MAX COUNT ALL SAVE) ALL",
    b"RETURN () CHARSET UTF-8 ALL",
    b"seen uid 1 larger 5",
]


@pytest.mark.parametrize("text", EVERY_KEY)
def test_every_key_parses_and_runs(text: bytes) -> None:
    box = Box()
    box.add(message())
    query = parse_search(args(text), rev2=False)
    seqs = run_search(query, box)
    assert set(seqs) <= {1}


BAD = [
    b"",
    b"FOO",
    b"LARGER",
    b"LARGER abc",
    b"LARGER -1",
    b"BEFORE 1-Foo-1994",
    b"BEFORE 32-Jan-2024",
    b"BEFORE 1994-02-01",
    b"OR SEEN",
    b"NOT",
    b"HEADER",
    b"HEADER X-A",
    b'HEADER "bad name" x',
    b"UID",
    b"UID 0",
    b"UID 1:x",
    b"1:0",
    b"()",
    b"RETURN (BOGUS) ALL",
    b"RETURN MIN ALL",
    b"RETURN (MIN)",
    b"CHARSET",
    b"MODSEQ",
    b'MODSEQ "/flags/x" bogus 5',
    b"YOUNGER 0",
    b"KEYWORD",
    b"UNRECENT",
    b'"ALL"',
    b"ALL )",
    b"NOT " * (MAX_DEPTH + 2) + b"SEEN",
]


@pytest.mark.parametrize("text", BAD)
def test_bad_syntax_is_bad(text: bytes) -> None:
    try:
        tokens = args(text)
    except AssertionError:
        return  # the tokenizer already refuses it (BAD before SEARCH sees it)
    with pytest.raises(SearchError) as caught:
        parse_search(tokens, rev2=False)
    assert caught.value.bad and caught.value.code is None


def test_badcharset_is_no_with_the_supported_list() -> None:
    with pytest.raises(SearchError) as caught:
        parse_search(args(b"CHARSET ISO-8859-1 TEXT x"), rev2=False)
    assert not caught.value.bad
    assert caught.value.code == "BADCHARSET (UTF-8 US-ASCII)"
    with pytest.raises(SearchError) as caught:
        parse_sort([[b"DATE"], b"KOI8-R", b"ALL"])
    assert caught.value.code == "BADCHARSET (UTF-8 US-ASCII)"


def test_query_fields() -> None:
    query = parse_search(args(b"RETURN (min Count) CHARSET UTF-8 MODSEQ 3"), rev2=False)
    assert query.returns == ("MIN", "COUNT")
    assert query.esearch and query.uses_modseq and query.charset == "UTF-8"
    plain = parse_search(args(b"ALL"), rev2=False)
    assert plain.returns == () and not plain.esearch and not plain.uses_modseq
    assert parse_search(args(b"ALL"), rev2=True).esearch
    assert parse_search(args(b"RETURN () ALL"), rev2=False).returns == ("ALL",)


# ---------------------------------------------------------------------------------------------
# evaluation


@pytest.fixture
def mailbox() -> Box:
    box = Box()
    box.add(message("Weekly report", "The zebrafish count is up.\n"), flags=("\\Seen",))
    box.add(
        message(
            "=?ISO-8859-1?Q?Caf=E9_cr=E8me?=",
            "Grüße aus Köln, le café est prêt.\n",
            charset="iso-8859-1",
            cte="quoted-printable",
        ),
        flags=("\\Flagged", "$Junk"),
        date="2024-01-03 23:59",
    )
    box.add(
        message(
            "=?UTF-8?B?0J/RgNC40LLQtdGCINC80LjRgA==?=",
            "Съешь же ещё этих мягких французских булок.\n",
            charset="utf-8",
            cte="base64",
            headers={"Cc": "Carol <carol@example.com>", "X-Tracking": "ABC-123"},
        ),
        flags=("\\Answered", "\\Seen"),
        date="2024-01-04 00:01",
        modseq=7,
    )
    # a part in an unknown charset, an attachment, an attached message
    box.add(
        raw(
            "From: Zed <zed@example.org>\nSubject: parts\nDate: Sat, 06 Jan 2024 00:30:00 +0200\n"
            'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n',
            b"--b\r\nContent-Type: text/plain; charset=x-unknown-charset\r\n\r\n"
            b"unknowncharsetword caf\xc3\xa9\r\n"
            b"--b\r\nContent-Type: application/octet-stream; name=blob.bin\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(b"binaryword")
            + b"--b\r\nContent-Type: message/rfc822\r\n\r\n"
            b"Subject: inner marker\r\n\r\ninnerbody\r\n--b--\r\n",
        ),
        flags=("\\Deleted", "\\Draft", "Work"),
        date="2024-01-06 08:00",
        modseq=9,
    )
    return box


CASES = [
    (b"ALL", [1, 2, 3, 4]),
    (b"SEEN", [1, 3]),
    (b"UNSEEN", [2, 4]),
    (b"ANSWERED", [3]),
    (b"UNANSWERED", [1, 2, 4]),
    (b"DELETED", [4]),
    (b"UNDELETED", [1, 2, 3]),
    (b"DRAFT", [4]),
    (b"UNDRAFT", [1, 2, 3]),
    (b"FLAGGED", [2]),
    (b"UNFLAGGED", [1, 3, 4]),
    (b"KEYWORD $junk", [2]),
    (b"UNKEYWORD $Junk", [1, 3, 4]),
    (b"KEYWORD work", [4]),
    (b"RECENT", []),
    (b"NEW", []),
    (b"OLD", [1, 2, 3, 4]),
    (b"2:3", [2, 3]),
    (b"*", [4]),
    (b"3:*", [3, 4]),
    (b"9:*", []),  # no sequence number 9: nothing (as Dovecot), unlike a UID range
    (b"4,1:2", [1, 2, 4]),
    (b"2:1,1,3:3", [1, 2, 3]),
    (b",".join(b"%d" % n for n in range(1, 2000, 2)), [1, 3]),
    (b"UID 2,4", [2, 4]),
    (b"UID 9:*", [4]),  # a UID range reaching "*" holds the last UID (RFC 9051 §9)
    (b"ON 3-Jan-2024", [2]),
    (b"BEFORE 4-Jan-2024", [2]),
    (b"SINCE 4-Jan-2024", [1, 3, 4]),
    (b"SENTON 5-Jan-2024", [1, 2, 3]),
    (b"SENTON 6-Jan-2024", [4]),  # 00:30 +0200 is 5 Jan in UTC: the field's own date counts
    (b"SENTBEFORE 6-Jan-2024", [1, 2, 3]),
    (b"SENTSINCE 6-Jan-2024", [4]),
    (b"SUBJECT report", [1]),
    (b"SUBJECT " + lit("CAFÉ CRÈME"), [2]),
    (b"SUBJECT " + lit("привет"), [3]),
    (b"SUBJECT =?iso", []),
    (b"FROM alice", [1, 2, 3]),
    (b"FROM zed@", [4]),
    (b"TO bob", [1, 2, 3]),
    (b"CC carol", [3]),
    (b"BCC carol", []),
    (b"HEADER X-Tracking abc-", [3]),
    (b'HEADER x-tracking ""', [3]),
    (b"HEADER Subject " + lit("café"), [2]),
    (b"BODY zebrafish", [1]),
    (b"BODY " + lit("KÖLN"), [2]),
    (b"BODY " + lit("французских"), [3]),
    (b"BODY unknowncharsetword", [4]),
    (b"BODY " + lit("café"), [2, 4]),  # the unknown charset's octets read as UTF-8
    (b"BODY binaryword", []),  # attachments that are not text are not searched
    (b"BODY innerbody", [4]),
    (b"BODY inner", [4]),
    (b'BODY "inner marker"', []),  # an attached message's header is TEXT, not BODY
    (b'TEXT "inner marker"', [4]),
    (b"TEXT blob.bin", [4]),  # a part's MIME header is TEXT
    (b"TEXT zebrafish", [1]),
    (b"TEXT report", [1]),
    (b"TEXT abc-123", [3]),
    (b"BODY report", []),
    (b"LARGER 10000", []),
    (b"SMALLER 10000", [1, 2, 3, 4]),
    (b"NOT SEEN", [2, 4]),
    (b"OR FLAGGED DELETED", [2, 4]),
    (b"(SEEN ANSWERED)", [3]),
    (b"NOT (OR SEEN ANSWERED)", [2, 4]),
    (b"OR (FROM zed) (BODY zebrafish)", [1, 4]),
    (b"MODSEQ 7", [3, 4]),
    (b'MODSEQ "/flags/\\\\Answered" priv 8', [4]),
    (b"OLDER 3600", [1, 2, 3, 4]),
    (b"YOUNGER 3600", []),
    (b"CHARSET US-ASCII SUBJECT parts", [4]),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_evaluation(mailbox: Box, text: bytes, expected: list[int]) -> None:
    assert mailbox.search(text) == expected


def test_larger_and_smaller_compare_rfc822_size(mailbox: Box) -> None:
    size = mailbox.messages[1].size
    assert mailbox.search(b"LARGER %d" % (size - 1)) == [
        i + 1 for i, m in enumerate(mailbox.messages) if m.size > size - 1
    ]
    assert 2 not in mailbox.search(b"LARGER %d" % size)
    assert 2 not in mailbox.search(b"SMALLER %d" % size)
    assert 2 in mailbox.search(b"SMALLER %d" % (size + 1))


def test_saved_result_dollar(mailbox: Box) -> None:
    mailbox.saved = [mailbox.messages[1].uid, mailbox.messages[3].uid]
    assert mailbox.search(b"$") == [2, 4]
    assert mailbox.search(b"UID $") == [2, 4]
    assert mailbox.search(b"NOT $") == [1, 3]
    assert parse_search(args(b"$ SEEN"), rev2=False).uses_saved
    mailbox.saved = []
    assert mailbox.search(b"$") == []


def test_flag_only_search_reads_no_message(mailbox: Box) -> None:
    mailbox.search(b"OR SEEN (FLAGGED UID 1:* 2:* LARGER 1 SINCE 1-Jan-2000)")
    assert mailbox.content_reads == 0 and mailbox.summary_reads == 0


def test_each_message_decoded_once_per_run() -> None:
    box = Box()
    for index in range(200):
        box.add(message(f"message {index}", f"body number {index} zebra\n", cte="base64"))
    query = parse_search(
        args(b"OR TEXT nothing-here (OR BODY zebra-less (NOT BODY zebra)) HEADER X-None x"),
        rev2=False,
    )
    assert run_search(query, box) == []
    # every message needed its content and summary: each was read exactly once
    assert box.content_reads == 200 and box.summary_reads == 200


def test_cheap_keys_decide_first() -> None:
    box = Box()
    for _ in range(50):
        box.add(message(body="zebra\n"))
    # no message is flagged: the BODY key never needs to run
    assert box.search(b"BODY zebra FLAGGED") == []
    assert box.content_reads == 0


class Broken(Box):
    def content(self, info: MessageInfo) -> bytes:
        raise OSError("gone")

    def summary(self, info: MessageInfo) -> dict[str, Any]:
        return {"v": 1, "body": {"type": "text", "parts": "junk", "start": "x"}}


def test_broken_store_entries_search_as_empty() -> None:
    box = Broken()
    box.add(b"Subject: x\r\n\r\nbody\r\n")
    assert box.search(b"OR TEXT body (OR BODY body HEADER subject x)") == []
    assert box.search(b"SUBJECT x SENTON 1-Jan-1970") == []
    assert box.search(b"SENTBEFORE 1-Jan-2000") == [1]  # no Date: 1 Jan 1970, as Dovecot


BROKEN_MIME = [
    (b"no headers at all, just text with zebra\r\n", True),
    (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nzebra no close\r\n", True),
    (b"Content-Transfer-Encoding: base64\r\n\r\n!!!!emVicmE=???\r\n", True),  # junk around
    (b"Content-Transfer-Encoding: base64\r\n\r\nemVicm\r\n", False),  # "zebr" and a stub
    (b"Content-Transfer-Encoding: quoted-printable\r\n\r\nzebra =ZZ =\r\n", True),
    (b"Subject: =?utf-8?q?broken=ZZ?= =?nope?b?!!!?=\r\n\r\nzebra\r\n", True),
    (b'Content-Type: text/plain; charset="utf-8\r\n\r\nzebra\r\n', True),
    (b"Date: Mon, 99 Foo 2024 99:99:99 +9999\r\n\r\nzebra\r\n", True),
    (b"\xff\xfe\x00Subject: \xff\r\n\r\n\xffzebra\x00\r\n", True),
]


@pytest.mark.parametrize(("content", "finds"), BROKEN_MIME)
def test_broken_mime_is_searched_best_effort(content: bytes, finds: bool) -> None:
    box = Box()
    box.add(content)
    for text in (b"SUBJECT broken", b"SENTON 1-Jan-2024", b"HEADER date x"):
        assert box.search(text) in ([], [1])
    assert box.search(b"TEXT zebra") == ([1] if finds else [])
    assert box.search(b"BODY zebra") == ([1] if finds else [])
    thread = parse_thread([b"REFERENCES", b"UTF-8", b"ALL"])
    assert run_thread(thread, box, uid=False) == b"* THREAD (1)\r\n"


def test_decode_words() -> None:
    assert decode_words("=?ISO-8859-1?Q?Caf=E9?= au lait") == "Café au lait"
    # white space between adjacent words goes; a character split across two words survives
    assert (
        decode_words("=?UTF-8?B?w6k=?= =?UTF-8?Q?=C3?= =?UTF-8?Q?=A9t=C3=A9?=") == "ééte"[:2] + "té"
    )
    assert decode_words("a =?utf-8?q?b?= c") == "a b c"
    assert decode_words("=?x-unknown?q?plain?=") == "plain"
    assert decode_words("=?utf-8*en?q?lang?=") == "lang"
    assert decode_words("no words") == "no words"


# ---------------------------------------------------------------------------------------------
# the corpus: every MIME file searched; the email package's decoded text is the oracle


def corpus_files() -> list[Path]:
    if not CORPUS_MIME.is_dir():
        return []
    return sorted(
        p
        for p in CORPUS_MIME.rglob("*")
        if p.is_file() and p.suffix in (".eml", ".msg", ".txt") and p.stat().st_size < 300_000
    )


def oracle_word(content: bytes) -> str | None:
    """A word of the first text/plain part, decoded by the email package (None if it cannot
    or there is none)."""
    try:
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        for part in parsed.walk():
            if part.get_content_type() == "text/plain" and not part.is_attachment():
                charset = part.get_content_charset() or "us-ascii"
                if part.defects or charset.lower() not in ("us-ascii", "utf-8", "iso-8859-1"):
                    return None
                text = part.get_content()
                words = re.findall(r"[^\W\d_]{6,}", text)
                return max(words, key=len) if words else None
    except Exception:
        return None
    return None


def test_corpus_messages_are_searchable() -> None:
    files = corpus_files()
    if not files:
        pytest.skip(f"third-party corpus not found at {CORPUS_MIME} (it lives in ../shared)")
    box = Box()
    words: dict[int, str] = {}
    for path in files:
        content = path.read_bytes()
        seq = box.add(content)
        word = oracle_word(content)
        if word is not None:
            words[seq] = word
    assert len(words) > 50
    # the whole mailbox through every kind of key: no exception
    for text in (b"TEXT zz-none", b"SENTSINCE 1-Jan-2000", b"SUBJECT re", b"HEADER x-foo y"):
        box.search(text)
    run_thread(parse_thread([b"REFERENCES", b"UTF-8", b"ALL"]), box, uid=False)
    run_sort(parse_sort([[b"SUBJECT", b"FROM", b"DATE"], b"UTF-8", b"ALL"]), box)
    missing = [
        (box.contents[box.messages[seq - 1].content_id][:0], seq, word)
        for seq, word in words.items()
        if seq not in box.search(b"BODY " + lit(word))
    ]
    assert not missing, missing


# ---------------------------------------------------------------------------------------------
# responses


def test_sequence_set() -> None:
    assert sequence_set([]) == b""
    assert sequence_set([5]) == b"5"
    assert sequence_set([1, 2, 3, 5]) == b"1:3,5"
    assert sequence_set([9, 3, 1, 2, 2, 10, 7]) == b"1:3,7,9:10"


def test_plain_search_response(mailbox: Box) -> None:
    query = parse_search(args(b"SEEN"), rev2=False)
    seqs = run_search(query, mailbox)
    assert search_response(query, seqs, mailbox, uid=False, tag=b"a") == b"* SEARCH 1 3\r\n"
    empty = parse_search(args(b"LARGER 99999"), rev2=False)
    assert search_response(empty, [], mailbox, uid=True, tag=b"a") == b"* SEARCH\r\n"
    modseq = parse_search(args(b"MODSEQ 2"), rev2=False)
    found = run_search(modseq, mailbox)
    assert search_response(modseq, found, mailbox, uid=True, tag=b"a") == (
        b"* SEARCH 3 4 (MODSEQ 9)\r\n"
    )
    assert search_response(modseq, [], mailbox, uid=True, tag=b"a") == b"* SEARCH\r\n"


def test_esearch_forms() -> None:
    box = Box()
    for uid in (3, 5, 6, 7, 20):
        box.add(message(), uid=uid, modseq=uid * 10, flags=("\\Seen",) if uid != 6 else ())

    def esearch(text: bytes, *, uid: bool = False, rev2: bool = False) -> bytes:
        query = parse_search(args(text), rev2=rev2)
        return search_response(query, run_search(query, box), box, uid=uid, tag=b"A1")

    assert esearch(b"RETURN (MIN MAX COUNT ALL) SEEN") == (
        b'* ESEARCH (TAG "A1") MIN 1 MAX 5 ALL 1:2,4:5 COUNT 4\r\n'
    )
    assert esearch(b"RETURN (ALL COUNT) SEEN", uid=True) == (
        b'* ESEARCH (TAG "A1") UID ALL 3,5,7,20 COUNT 4\r\n'
    )
    assert esearch(b"RETURN () UNSEEN") == b'* ESEARCH (TAG "A1") ALL 3\r\n'
    assert esearch(b"UNSEEN", rev2=True) == b'* ESEARCH (TAG "A1") ALL 3\r\n'
    assert esearch(b"RETURN (MIN MAX) LARGER 99999") == b'* ESEARCH (TAG "A1")\r\n'
    assert esearch(b"RETURN (COUNT) LARGER 99999", uid=True) == (
        b'* ESEARCH (TAG "A1") UID COUNT 0\r\n'
    )
    # MODSEQ: of every match with ALL/COUNT, of the ones returned with MIN/MAX alone
    assert esearch(b"RETURN (MIN) MODSEQ 1", uid=True) == (
        b'* ESEARCH (TAG "A1") UID MIN 3 MODSEQ 30\r\n'
    )
    assert esearch(b"RETURN (MIN COUNT) MODSEQ 1") == (
        b'* ESEARCH (TAG "A1") MIN 1 COUNT 5 MODSEQ 200\r\n'
    )
    assert esearch(b"RETURN (COUNT) MODSEQ 999") == b'* ESEARCH (TAG "A1") COUNT 0\r\n'
    assert esearch(b"RETURN (SAVE) SEEN") == b""


def test_save_keeps_uids(mailbox: Box) -> None:
    def saved(text: bytes) -> list[int] | None:
        query = parse_search(args(text), rev2=False)
        return saved_uids(query, run_search(query, mailbox), mailbox)

    assert saved(b"SEEN") is None
    assert saved(b"RETURN (SAVE) UNSEEN") == [2, 4]
    assert saved(b"RETURN (SAVE MIN) UNSEEN") == [2]
    assert saved(b"RETURN (SAVE MAX MIN) ALL") == [1, 4]
    assert saved(b"RETURN (SAVE MIN COUNT) UNSEEN") == [2, 4]
    assert saved(b"RETURN (SAVE MIN) LARGER 99999") == []


# ---------------------------------------------------------------------------------------------
# base subject, SORT, THREAD


@pytest.mark.parametrize(
    ("subject", "base", "reply"),
    [
        ("Hello", "HELLO", False),
        ("Re: Hello", "HELLO", True),
        ("RE: re: FWD: Hello", "HELLO", True),
        ("Fw: Hello", "HELLO", True),
        ("Re[2]: Hello", "HELLO", True),  # "re" *WSP [subj-blob] ":"
        ("Re [2]: Hello", "HELLO", True),
        ("[list] Re: Hello", "HELLO", True),
        ("[list] Hello", "HELLO", False),
        ("[list]", "[LIST]", False),  # a blob that would leave nothing is kept
        ("Hello (fwd)", "HELLO", True),
        ("Hello   (fwd) (FWD)  ", "HELLO", True),
        ("[fwd: Hello]", "HELLO", True),
        ("[Fwd: Re: Hello (fwd)]", "HELLO", True),
        ("  Hello\tworld  ", "HELLO WORLD", False),
        ("=?utf-8?q?Re=3A_caf=C3=A9?=", "CAFÉ", True),
        ("", "", False),
        ("Re:", "", True),
    ],
)
def test_base_subject(subject: str, base: str, reply: bool) -> None:
    assert base_subject(subject) == (base, reply)


@pytest.fixture
def sortbox() -> Box:
    box = Box()
    rows = [
        ("b", "Re: beta", "Carol <carol@x>", "Wed, 03 Jan 2024 10:00:00 +0000", 300),
        ("a", "alpha", "bob@x", "Mon, 01 Jan 2024 10:00:00 -0500", 100),
        ("c", "[fwd: Alpha]", '"Zed Z" <adam@x>', "", 200),
        ("d", "Gamma", "=?utf-8?q?=C3=89mile?= <emile@x>", "Mon, 01 Jan 2024 12:00:00 +0000", 50),
    ]
    for index, (mid, subject, sender, date, pad) in enumerate(rows):
        head = f"Message-ID: <{mid}@x>\nSubject: {subject}\nFrom: {sender}\nTo: t{3 - index}@x\n"
        if date:
            head += f"Date: {date}\n"
        box.add(raw(head, b"x" * pad + b"\r\n"), date=f"2024-01-0{4 - index} 09:00")
    return box


@pytest.mark.parametrize(
    ("criteria", "expected"),
    [
        ([b"ARRIVAL"], [4, 3, 2, 1]),
        ([b"REVERSE", b"ARRIVAL"], [1, 2, 3, 4]),
        ([b"DATE"], [4, 2, 3, 1]),  # 12:00 UTC < 15:00 UTC; no Date: the INTERNALDATE
        ([b"SIZE"], [4, 2, 3, 1]),
        ([b"SUBJECT"], [2, 3, 1, 4]),
        ([b"SUBJECT", b"REVERSE", b"DATE"], [3, 2, 1, 4]),
        ([b"FROM"], [3, 2, 1, 4]),  # the addr-mailbox: adam, bob, carol, emile
        ([b"DISPLAY"], [2, 1, 4, 3]),  # bob@x, Carol, Émile (É sorts as E), Zed Z
        ([b"TO"], [4, 3, 2, 1]),
        ([b"CC"], [1, 2, 3, 4]),  # no Cc anywhere: all equal, sequence order
    ],
)
def test_sort(sortbox: Box, criteria: list[bytes], expected: list[int]) -> None:
    query = parse_sort([criteria, b"UTF-8", b"ALL"])
    assert run_sort(query, sortbox) == expected


def test_sort_response_and_errors(sortbox: Box) -> None:
    query = parse_sort([[b"SIZE"], b"UTF-8", b"MODSEQ", b"1"])
    seqs = run_sort(query, sortbox)
    assert sort_response(query, seqs, sortbox, uid=True) == b"* SORT 4 2 3 1 (MODSEQ 1)\r\n"
    empty = parse_sort([[b"SIZE"], b"UTF-8", b"LARGER", b"99999"])
    assert sort_response(empty, [], sortbox, uid=False) == b"* SORT\r\n"
    for bad in (
        [[b"NOPE"], b"UTF-8", b"ALL"],
        [[b"REVERSE"], b"UTF-8", b"ALL"],
        [[], b"UTF-8", b"ALL"],
        [b"DATE", b"UTF-8", b"ALL"],
        [[b"DATE"], b"UTF-8"],
    ):
        with pytest.raises(SearchError) as caught:
            parse_sort(bad)
        assert caught.value.bad


def threaded(box: Box, algorithm: bytes, *, uid: bool = False) -> bytes:
    return run_thread(parse_thread([algorithm, b"UTF-8", b"ALL"]), box, uid=uid)


def add_thread_message(
    box: Box, mid: str, subject: str, day: int, refs: str = "", irt: str = ""
) -> None:
    head = f"Message-ID: <{mid}>\nSubject: {subject}\nDate: {day:02d} Jan 2024 10:00:00 +0000\n"
    if refs:
        head += f"References: {refs}\n"
    if irt:
        head += f"In-Reply-To: {irt}\n"
    box.add(raw(head, b"body\r\n"))


def test_thread_references() -> None:
    box = Box()
    add_thread_message(box, "1@x", "Topic", 1)
    add_thread_message(box, "2@x", "Re: Topic", 2, refs="<1@x>")
    add_thread_message(box, "3@x", "Re: Topic", 3, refs="<1@x> <2@x>")
    add_thread_message(box, "4@x", "Re: Topic", 4, irt="<1@x>")
    add_thread_message(box, "5@x", "Other", 5, refs="<ghost@x>")
    add_thread_message(box, "6@x", "Other", 6, refs="<ghost@x>")
    add_thread_message(box, "7@x", "Re: Lonely", 7, refs="<gone@x>")
    add_thread_message(box, "8@x", "Lonely", 8)
    add_thread_message(box, "9@x", "Loop", 9, refs="<10@x>")
    add_thread_message(box, "10@x", "Loop", 10, refs="<9@x>")
    # 2 and 4 answer 1 (3 answers 2); 5 and 6 share a missing parent (a dummy at the root);
    # 7 is a reply to "Lonely" with a lost parent: gathered under 8 by subject; the loop
    # 9 <-> 10 is broken where it would close (10 keeps the child 9 its reference made)
    assert threaded(box, b"REFERENCES") == (b"* THREAD (1 (2 3)(4))((5)(6))(8 7)(10 9)\r\n")
    assert threaded(box, b"ORDEREDSUBJECT") == (b"* THREAD (1 (2)(3)(4))(5 6)(7 8)(9 10)\r\n")


def test_thread_uid_and_empty() -> None:
    box = Box()
    assert threaded(box, b"REFERENCES") == b"* THREAD\r\n"
    box.add(raw("Subject: a\nMessage-ID: <a@x>\n", b"x\r\n"), uid=40)
    box.add(raw("Subject: b\nReferences: <a@x>\n", b"x\r\n"), uid=41)
    assert threaded(box, b"REFERENCES", uid=True) == b"* THREAD (40 41)\r\n"
    for algorithm in (b"BOGUS", b"\x80", [b"REFERENCES"]):
        with pytest.raises(SearchError):
            parse_thread([algorithm, b"UTF-8", b"ALL"])


def test_deep_thread_needs_no_recursion() -> None:
    box = Box()
    depth = 3000
    for index in range(depth):
        refs = f"<{index - 1}@x>" if index else ""
        # every message also answers the root: a branch at each level of a long chain
        add_thread_message(box, f"{index}@x", f"Re: deep {index}", 1 + index % 28, refs=refs)
    text = threaded(box, b"REFERENCES")
    assert text.startswith(b"* THREAD (1 2 3 ") and text.endswith(b" %d)\r\n" % depth)
    assert text.count(b"(") == 1


# ---------------------------------------------------------------------------------------------
# random input: only SearchError from the parser, nothing at all from the evaluator

_ATOMS = st.sampled_from(
    [b"ALL", b"NOT", b"OR", b"SEEN", b"UID", b"1:*", b"$", b"*", b"3", b"BODY", b"TEXT",
     b"HEADER", b"LARGER", b"SINCE", b"1-Jan-2024", b"RETURN", b"CHARSET", b"UTF-8",
     b"MODSEQ", b"KEYWORD", b"x", b"MIN", b"SAVE", b"0", b"99999999999999999999"]
)  # fmt: skip
_TOKENS: st.SearchStrategy[object] = st.recursive(
    st.one_of(_ATOMS, st.binary(max_size=8), st.binary(max_size=8).map(String)),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_TOKENS, max_size=8))
@example([b"RETURN", [b"\x80"]])  # a non-ASCII option name once raised UnicodeDecodeError
def test_random_arguments_raise_only_search_error(tokens: list[object]) -> None:
    box = Box()
    box.add(message(body="zebra\n"), flags=("\\Seen",))
    try:
        query = parse_search(tokens, rev2=True)
    except SearchError:
        return
    seqs = run_search(query, box)
    assert set(seqs) <= {1}
    search_response(query, seqs, box, uid=True, tag=b"t")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([b"TEXT a", b"BODY a", b"HEADER b a"]))
def test_random_content_never_raises(content: bytes, key: bytes) -> None:
    box = Box()
    box.add(b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n" + content)
    box.add(content)
    assert set(box.search(key + b" SENTON 1-Jan-2024")) <= {1, 2}
    run_thread(parse_thread([b"REFERENCES", b"UTF-8", b"ALL"]), box, uid=False)
    run_sort(parse_sort([[b"SUBJECT", b"DISPLAY", b"DATE"], b"UTF-8", b"ALL"]), box)


def test_address_keys_ignore_comments_inside_addresses() -> None:
    # imaptest search-addresses: RFC 5322 comments and CFWS inside an address do not hide it
    box = Box()
    box.add(raw("From: <user-from (comment)@ (comment) domain.org>\nTo: <to@x.org>\n", b"b\r\n"))
    box.add(raw("From: user-from@domain.org (RealFrom)\nCc: cc @ x . org\n", b"b\r\n"))
    box.add(raw("From: Other <other@domain.org>\nSubject: a (b) c\n", b"b\r\n"))
    assert box.search(b"FROM user-from@domain.org") == [1, 2]
    assert box.search(b"FROM realfrom") == [2]
    assert box.search(b"FROM comment") == [1]
    assert box.search(b"CC cc@x.org") == [2]
    assert box.search(b"FROM ser-from@dom") == [1, 2]
    assert box.search(b"SUBJECT ac") == []


def test_recent_new_and_old_follow_the_sessions_recent_messages(mailbox: Box) -> None:
    # imaptest search-flags: RECENT, NEW (recent and unseen) and OLD on the session's set
    mailbox.recent = {mailbox.messages[i].uid for i in (0, 1, 3)}
    assert mailbox.search(b"RECENT") == [1, 2, 4]
    assert mailbox.search(b"NEW") == [2, 4]  # 1 is \Seen
    assert mailbox.search(b"OLD") == [3]
    assert mailbox.search(b"NOT RECENT") == [3]
    assert mailbox.content_reads == 0 and mailbox.summary_reads == 0
