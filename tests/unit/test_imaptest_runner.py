"""The imaptest script runner's parts that need no server (tests/imaptest.py): the argument
parser, the script format, the mbox reader, and imaptest's matching rules. Against real
servers it runs in tests/integration/test_imaptest_scripts.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imaptest import (
    NIL,
    Arg,
    Atom,
    Matcher,
    ScriptError,
    Text,
    parse_args,
    parse_script,
    read_mbox,
)

MBOX = b"From user@domain  Fri Feb 22 17:06:23 2008\nSubject: a\n\nbody\n\n"


def script(tmp_path: Path, text: str, mbox: bytes = MBOX) -> Path:
    path = tmp_path / "t"
    path.write_bytes(text.encode("latin-1"))
    (tmp_path / "default.mbox").write_bytes(mbox)
    return path


def expected(text: str) -> list[Arg]:
    """The args of one expected untagged line, defaults inserted, as the parser makes them."""
    from imaptest import _directives, _ListContext

    args = parse_args(text)
    name = str(args[1]) if str(args[0])[:1].isdigit() else str(args[0])
    _directives(args, _ListContext(name.lower(), None, None, 0))
    return args


def test_parse_args_atoms_strings_literals_lists() -> None:
    args = parse_args(
        '1 FETCH (UID 7 FLAGS (\\Seen) BODY[HEADER.FIELDS (FROM)] {5}\r\nab"c) "q\\"x" NIL)'
    )
    assert args == [
        "1",
        "FETCH",
        ["UID", "7", "FLAGS", ["\\Seen"], "BODY[HEADER.FIELDS", ["FROM"], "]", 'ab"c)', 'q"x', NIL],
    ]
    assert isinstance(args[2][7], Text) and isinstance(args[2][6], Atom)  # type: ignore[index]


def test_parse_args_lenient_resp_text() -> None:
    assert parse_args("OK [READ-WRITE] done (unbalanced", lenient_tail=True) == [
        "OK",
        "[READ-WRITE]",
        "done",
        "(unbalanced",
    ]


def test_methods_1_2_3_and_the_final_logout(tmp_path: Path) -> None:
    parsed = parse_script(
        script(
            tmp_path,
            "state: auth\n\nok noop\n* ok $\n\nselect $mailbox\n* 0 exists\nok [read-write]\n\n"
            "tag1 create a\ntag2 create b\ntag2 ok\ntag1 no [alreadyexists]\n",
        )
    )
    assert parsed.state == "auth" and parsed.messages is None  # all, the default
    g1, g2, g3, logout = parsed.groups
    assert [(c.text, c.reply) for c in g1.commands] == [("noop", ["ok"])]
    assert [(c.text, c.reply) for c in g2.commands] == [("select $mailbox", ["ok", "[read-write]"])]
    assert [(c.tag, c.reply) for c in g3.commands] == [(1, ["no", "[alreadyexists]"]), (2, ["ok"])]
    assert [(c.text, c.reply, c.line) for c in logout.commands] == [("logout", ["ok"], 0)]


def test_multiline_literals_plain_and_binary(tmp_path: Path) -> None:
    text = (
        "messages: all\n\nok append $mailbox {{{\nl1\nl2\n}}}\n"
        "ok fetch 1 x\n* 1 fetch (x ~{{{\na\r\n\n}}})\n"
    )
    parsed = parse_script(script(tmp_path, text))
    assert parsed.messages is None
    assert parse_script(script(tmp_path, "messages: 3\n\nok noop\n")).messages == 3
    assert parsed.groups[0].commands[0].text == "append $mailbox {6}\r\nl1\r\nl2"
    # in a ~{{{ block every line ends in LF; a CR in the file stays
    assert parsed.groups[1].untagged[0].args[2][2] == "a\r\n"  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("connections: 2\n\nok noop\n", "missing connection number"),
        ("connections: 2\n\n1 tag1 noop\n2 tag2 noop\n", "same connection"),
        ("\n\ntag1 noop\n* ok\n", "missing reply"),
        ("\n\ntag1 noop\ntag2 ok\n", "unknown tag"),
        ("frobs: 1\n\nok noop\n", "unknown setting"),
        ("\n\nok fetch 1 x\n* 1 fetch (a)\n", "chain"),
        ("\n\nok noop\n!ifenv X\nok noop\n", "not closed"),
    ],
)
def test_scripts_imaptest_refuses(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ScriptError, match=error):
        parse_script(script(tmp_path, text))


def test_ifenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAVE_FOO", "1")
    monkeypatch.delenv("HAVE_BAR", raising=False)
    text = "\n\n!ifenv HAVE_FOO\nok foo\n!else\nok nofoo\n!endif\n!ifenv HAVE_BAR\nok bar\n!endif\n"
    parsed = parse_script(script(tmp_path, text))
    assert [g.commands[0].text for g in parsed.groups] == ["foo", "logout"]


def test_default_directives() -> None:
    assert expected("1 fetch (uid 1 flags (\\seen))") == [
        "1",
        "fetch",
        [
            "$!unordered=2",
            "uid",
            "1",
            "flags",
            [
                "$!unordered",
                "$!noextra",
                "$!ignore=\\recent",
                "$!ignore=$HasAttachment",
                "$!ignore=$HasNoAttachment",
                "\\seen",
            ],
        ],
    ]
    assert expected("list (\\noselect) / x") == ["list", ["$!unordered", "\\noselect"], "/", "x"]
    assert expected("status x (messages 1)") == ["status", "x", ["$!unordered=2", "messages", "1"]]
    # a list with its own directives keeps only them
    assert expected("1 fetch (flags ($!extra))")[2] == ["$!unordered=2", "flags", ["$!extra"]]


def test_read_mbox(tmp_path: Path) -> None:
    path = tmp_path / "m.mbox"
    path.write_bytes(
        MBOX + b"From user@domain  Sun Oct 28 03:00:00 2007 +0300\nFrom: x\r\n\r\nFrom the body\n"
    )
    first, second = read_mbox(path)
    assert first.content == b"Subject: a\r\n\r\nbody\r\n\r\n"
    assert first.internaldate == "22-Feb-2008 17:06:23 +0000"
    assert second.content == b"From: x\r\n\r\nFrom the body\r\n"  # not a From_ line
    assert second.internaldate == "28-Oct-2007 03:00:00 +0300"


def matches(matcher: Matcher, want: str, got: str, prefix: bool = False) -> bool:
    return matcher.match_args(expected(want), parse_args(got), None, prefix) is None


def test_variables_are_captured_then_compared() -> None:
    m = Matcher()
    assert matches(m, "1 fetch (uid $uid1)", "1 FETCH (UID 42)")
    assert m.variables["uid1"] == "42"
    assert not matches(m, "2 fetch (uid $uid1)", "2 FETCH (UID 43)")
    m.variables["tag"] = "1.2"
    assert matches(m, "esearch (tag $tag) uid all $uid1:$x", 'ESEARCH (TAG "1.2") UID ALL 42:50')
    assert m.variables["x"] == "50"


def test_unordered_pairs_noextra_ignore_and_dollar() -> None:
    m = Matcher()
    assert matches(
        m,
        "1 fetch (flags (\\seen \\flagged) uid 1)",
        "1 FETCH (UID 1 FLAGS (\\Flagged \\Recent \\Seen))",
    )
    assert not matches(m, "1 fetch (flags (\\seen))", "1 FETCH (FLAGS (\\Seen \\Draft))")
    assert matches(m, "1 fetch (flags ($!unordered \\seen))", "1 FETCH (FLAGS (\\Seen \\Draft))")
    assert not matches(
        m, "1 fetch (flags ($!unordered $!ban=\\draft \\seen))", "1 FETCH (FLAGS (\\Seen \\Draft))"
    )
    assert matches(m, "1 fetch (envelope $ uid 1)", '1 FETCH (UID 1 ENVELOPE (NIL "s" NIL))')
    assert matches(m, "1 fetch (uid 1)", "1 FETCH (UID 1 FLAGS ())")  # FETCH allows extras
    assert matches(m, "list () $sep x", 'LIST (\\HasNoChildren) "/" x')
    assert not matches(m, "1 fetch (body[] $x)", "1 FETCH (BODY[] NIL)")  # "$" is no NIL


def test_tagged_reply_is_a_prefix_and_case_insensitive() -> None:
    m = Matcher()
    assert matches(m, "ok [read-write]", "OK [READ-WRITE] Select completed.", prefix=True)
    assert matches(m, "ok", "OK [READ-WRITE] done", prefix=True)
    assert not matches(m, "ok [read-only]", "OK [READ-WRITE] done", prefix=True)
    assert matches(m, "ok [uidnext $n]", "OK [UIDNEXT 17] Predicted next UID", prefix=True)
    assert m.variables["n"] == "17"
    assert matches(m, "list () / ${case:INBOX}", "LIST () / INBOX")
    assert not matches(m, "list () / ${case:INBOX}", "LIST () / inbox")


def test_relative_sequences_and_modseqs() -> None:
    m = Matcher()
    m.seqmap = [1, 0, 2, 3]  # message 2 was expunged, 3 and 4 moved down
    assert matches(m, "$3 fetch (uid 9)", "2 FETCH (UID 9)")
    assert m.expand("fetch $4,$2") == "fetch 3,<expunged>"
    assert matches(m, "1 fetch (modseq ($modseq2))", "1 FETCH (MODSEQ (10))")
    assert not matches(m, "1 fetch (modseq ($modseq5))", "1 FETCH (MODSEQ (12))")  # >= 13


def test_strings_end_at_nul_as_in_imaptest() -> None:
    m = Matcher()
    assert matches(m, "1 fetch (binary[1] ~{3}\r\n\x00ab)", "1 FETCH (BINARY[1] ~{4}\r\n\x00xyz)")
    assert not matches(
        m, "1 fetch (binary[1] ~{3}\r\na\x00b)", "1 FETCH (BINARY[1] ~{3}\r\nb\x00b)"
    )


def test_a_script_needs_its_messages(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text("\n\nok noop\n")
    with pytest.raises(ScriptError, match=r"no .*default\.mbox"):
        parse_script(path)
    (tmp_path / "t.mbox").write_bytes(MBOX)
    assert parse_script(path).mbox == tmp_path / "t.mbox"
