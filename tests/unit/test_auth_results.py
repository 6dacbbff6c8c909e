"""The Authentication-Results field (RFC 8601): what we write and which fields we remove."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tachymail.mailauth import results
from tachymail.mailauth.arc import ArcResult
from tachymail.mailauth.dkim import DkimResult
from tachymail.mailauth.dmarc import DmarcResult
from tachymail.mailauth.iprev import IprevResult
from tachymail.mailauth.results import authentication_results, authserv_id_of, remove_forged
from tachymail.mailauth.spf import SpfResult

ID = "mx.example.net"


def unfold(field: bytes) -> str:
    """The field as one line, the way a reader sees it (RFC 5322 §2.2.3)."""
    assert field.endswith(b"\r\n")
    return re.sub(r"\r\n(?=[ \t])", "", field.decode("ascii")).removesuffix("\r\n")


def spf(result: str = "pass", **kw: str) -> SpfResult:
    fields = {"identity": "mailfrom", "domain": "example.com", "sender": "alice@example.com"}
    fields.update(kw)
    return SpfResult(result, **fields)  # type: ignore[arg-type]


def sig(result: str, b: str, **kw: str) -> DkimResult:
    fields = {
        "domain": "example.com",
        "selector": "s1",
        "algorithm": "rsa-sha256",
        "identity": "",
        "signature_b": b,
    }
    fields.update(kw)
    return DkimResult(result, **fields)  # type: ignore[arg-type]


def test_nothing_checked_says_none() -> None:
    field = authentication_results(ID, None, None, [], None, None, None)
    assert field == b"Authentication-Results: mx.example.net; none\r\n"


def test_every_method_with_its_properties() -> None:
    field = authentication_results(
        ID,
        spf("pass"),
        spf(
            "pass", identity="helo", domain="mail.example.com", sender="postmaster@mail.example.com"
        ),
        [sig("pass", "AbCdEfGhIjKl")],
        DmarcResult("pass", "example.com", "reject", "none", True, True, "example.com"),
        ArcResult("none", 0),
        IprevResult("pass", "mail.example.com", "", "192.0.2.1"),
        remote_ip="192.0.2.1",
    )
    assert unfold(field) == (
        "Authentication-Results: mx.example.net;"
        "\tspf=pass smtp.mailfrom=alice@example.com;"
        "\tspf=pass smtp.helo=mail.example.com;"
        "\tdkim=pass header.d=example.com header.s=s1 header.a=rsa-sha256 header.b=AbCdEfGh;"
        "\tdmarc=pass (p=reject dis=none) header.from=example.com;"
        "\tarc=none;"
        "\tiprev=pass policy.iprev=192.0.2.1 (mail.example.com)"
    )


@pytest.mark.parametrize(
    ("result", "kw", "expected"),
    [
        ("softfail", {"mechanism": "~all"}, "spf=softfail smtp.mailfrom=alice@example.com"),
        (
            "fail",
            {"mechanism": "-all", "explanation": "Not authorized"},
            'spf=fail reason="Not authorized" smtp.mailfrom=alice@example.com',
        ),
        (
            "fail",
            {"mechanism": "-all"},
            'spf=fail reason="matched -all" smtp.mailfrom=alice@example.com',
        ),
        (
            "permerror",
            {"detail": 'bad "mechanism" a:\\x'},
            'spf=permerror reason="bad \\"mechanism\\" a:\\\\x" smtp.mailfrom=alice@example.com',
        ),
        (
            "temperror",
            {"detail": "example.com TXT: no\tanswer\r\n(timeout)"},
            'spf=temperror reason="example.com TXT: no answer (timeout)" '
            "smtp.mailfrom=alice@example.com",
        ),
        ("none", {"detail": "no SPF record"}, "spf=none smtp.mailfrom=alice@example.com"),
        ("neutral", {}, "spf=neutral smtp.mailfrom=alice@example.com"),
    ],
)
def test_spf_results_and_reasons(result: str, kw: dict[str, str], expected: str) -> None:
    field = authentication_results(ID, spf(result, **kw), None, [], None, None, None)
    assert unfold(field) == f"Authentication-Results: mx.example.net;\t{expected}"


def test_addresses_that_are_not_dot_atoms_are_quoted() -> None:
    odd = spf("pass", sender="john smith@example.com")
    literal = spf("none", identity="helo", domain="[192.0.2.1]", sender="postmaster@[192.0.2.1]")
    text = unfold(authentication_results(ID, odd, literal, [], None, None, None))
    assert 'smtp.mailfrom="john smith"@example.com;' in text
    assert 'smtp.helo="[192.0.2.1]"' in text


def test_dkim_one_result_per_signature_with_unique_b_prefixes() -> None:
    same_start = "abcdefgh1234"
    results = [
        sig("pass", same_start + "XYZ", identity="@example.com"),
        sig(
            "fail",
            same_start + "QRS",
            domain="list.example.org",
            selector="x/y",
            detail="body hash",
        ),
        sig("pass", "zz/zzzzzzzzzz", domain="other.example", algorithm="ed25519-sha256"),
    ]
    text = unfold(authentication_results(ID, None, None, results, None, None, None))
    parts = text.split(";\t")
    assert parts[1] == (
        "dkim=pass header.d=example.com header.i=@example.com header.s=s1 header.a=rsa-sha256 "
        "header.b=abcdefgh1234X"
    )
    assert parts[2] == (
        'dkim=fail reason="body hash" header.d=list.example.org header.s="x/y" '
        "header.a=rsa-sha256 header.b=abcdefgh1234Q"
    )
    # "/" is a tspecial (RFC 2045): the value is quoted
    assert parts[3] == (
        'dkim=pass header.d=other.example header.s=s1 header.a=ed25519-sha256 header.b="zz/zzzzz"'
    )


def test_dmarc_fail_none_and_permerror() -> None:
    fail = DmarcResult(
        "fail",
        "example.com",
        "quarantine",
        "none",
        False,
        False,
        "example.com",
        "not selected by pct=50",
    )
    text = unfold(authentication_results(ID, None, None, [], fail, None, None))
    assert text.endswith(
        'dmarc=fail reason="not selected by pct=50" (p=quarantine dis=none) header.from=example.com'
    )
    none = DmarcResult("none", "example.com", "none", "none", False, False, "", "no record")
    assert unfold(authentication_results(ID, None, None, [], none, None, None)).endswith(
        "\tdmarc=none header.from=example.com"
    )
    bad = DmarcResult("permerror", "", "none", "none", False, False, detail="no single From")
    assert unfold(authentication_results(ID, None, None, [], bad, None, None)).endswith(
        '\tdmarc=permerror reason="no single From"'
    )


def test_arc_and_iprev_failures() -> None:
    arc = ArcResult("fail", 2, "ARC-Seal i=2 did not verify")
    iprev = IprevResult("temperror", "", "PTR lookup of 192.0.2.9: timeout", "192.0.2.9")
    text = unfold(
        authentication_results(ID, None, None, [], None, arc, iprev, remote_ip="192.0.2.9")
    )
    assert text.endswith(
        '\tarc=fail reason="ARC-Seal i=2 did not verify" (i=2) smtp.remote-ip=192.0.2.9;'
        '\tiprev=temperror reason="PTR lookup of 192.0.2.9: timeout" policy.iprev=192.0.2.9'
    )
    passing = ArcResult("pass", 3, oldest_pass=2)
    text = unfold(authentication_results(ID, None, None, [], None, passing, None, remote_ip="::1"))
    # ":" is a tspecial (RFC 2045): an IPv6 address is a quoted-string
    assert text.endswith('\tarc=pass (i=3) header.oldest-pass=2 smtp.remote-ip="::1"')


def test_lines_are_folded_under_78_characters() -> None:
    long_detail = " ".join(["the key record of this selector is not usable"] * 3)
    field = authentication_results(
        "a-rather-long-authserv-id.mx.example.net",
        spf("permerror", detail=long_detail, sender="very.long.local.part@sub.domain.example.com"),
        None,
        [sig("permerror", "Q" * 40, detail=long_detail, domain="very-long-domain.example.com")],
        None,
        None,
        None,
    )
    lines = field.split(b"\r\n")
    assert lines[-1] == b"", "CRLF-terminated"
    for line in lines[1:-1]:
        assert len(line) <= 78, line
        assert line[:1] in (b" ", b"\t"), "every continuation line starts with white space"
    assert max(len(line) for line in lines) <= 78
    # folding only added line breaks: the reason survives whole
    assert f'reason="{long_detail}"' in unfold(field)
    assert field.isascii()


def test_reasons_and_comments_cannot_break_the_field() -> None:
    evil = spf("fail", explanation='x" ; dkim=pass (\r\nX-Evil: 1\u00e9')
    iprev = IprevResult("fail", "host(1).example", "no match", "192.0.2.1")
    field = authentication_results(ID, evil, None, [], None, None, iprev)
    text = unfold(field)
    assert "\r" not in text and "\n" not in text
    assert 'reason="x\\" ; dkim=pass ( X-Evil: 1" smtp.mailfrom=alice@example.com;' in text
    assert text.endswith("(host_1_.example)")


# -- remove_forged ---------------------------------------------------------------------------

MESSAGE = (
    b"Received: from a by b; Mon, 1 Dec 2026 10:00:00 +0000\r\n"
    b"Authentication-Results: mx.example.net; spf=pass smtp.mailfrom=a@b.example\r\n"
    b"From: a@b.example\r\n"
    b"authentication-results:   MX.Example.NET;\r\n\tdkim=pass header.d=b.example\r\n"
    b"Authentication-Results: other.example (seen by mx.example.net); spf=fail\r\n"
    b"Authentication-Results: (mx.example.net) other.example; dkim=fail\r\n"
    b'Authentication-Results: "mx.example.net" 1; none\r\n'
    b"Authentication-Results: mx.example.net.evil; none\r\n"
    b"Subject: hi\r\n"
    b"\r\n"
    b"Authentication-Results: mx.example.net; in the body: kept\r\n"
)


def test_remove_forged_takes_every_field_claiming_our_id() -> None:
    cleaned, removed = remove_forged(MESSAGE, "mx.example.net")
    assert removed == 3
    assert cleaned == (
        b"Received: from a by b; Mon, 1 Dec 2026 10:00:00 +0000\r\n"
        b"From: a@b.example\r\n"
        b"Authentication-Results: other.example (seen by mx.example.net); spf=fail\r\n"
        b"Authentication-Results: (mx.example.net) other.example; dkim=fail\r\n"
        b"Authentication-Results: mx.example.net.evil; none\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"Authentication-Results: mx.example.net; in the body: kept\r\n"
    )


def test_remove_forged_is_case_insensitive_on_our_side_too() -> None:
    cleaned, removed = remove_forged(MESSAGE, "MX.EXAMPLE.NET")
    assert removed == 3
    assert b"dkim=pass header.d=b.example" not in cleaned


def test_remove_forged_leaves_other_messages_alone() -> None:
    plain = b"From: a@b.example\r\nSubject: x\r\n\r\nbody\r\n"
    cleaned, removed = remove_forged(plain, ID)
    assert removed == 0 and cleaned is plain
    theirs = b"Authentication-Results: relay.example; spf=pass\r\n\r\nbody\r\n"
    cleaned, removed = remove_forged(theirs, ID)
    assert removed == 0 and cleaned is theirs


def test_remove_forged_with_bare_lf_and_a_last_field_without_body() -> None:
    content = b"Subject: x\nAuthentication-Results: mx.example.net;\n none\nFrom: a@b\n"
    cleaned, removed = remove_forged(content, ID)
    assert (cleaned, removed) == (b"Subject: x\nFrom: a@b\n", 1)
    last = b"Subject: x\r\nAuthentication-Results: mx.example.net; none\r\n"
    assert remove_forged(last, ID) == (b"Subject: x\r\n", 1)


def test_our_own_field_round_trips() -> None:
    field = authentication_results(ID, spf("pass"), None, [], None, None, None)
    assert remove_forged(field + b"Subject: x\r\n\r\nbody", ID) == (b"Subject: x\r\n\r\nbody", 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b" mx.example.net; none", "mx.example.net"),
        (b" (comment (nested) \\) still) MX.example.net 1; none", "mx.example.net"),
        (b'\r\n\t"quoted.example" ; none', "quoted.example"),
        (b" example.org;spf=pass", "example.org"),
        (b" ; none", None),
        (b"   ", None),
        (b" (unterminated comment", None),
    ],
)
def test_authserv_id_of(value: bytes, expected: str | None) -> None:
    assert authserv_id_of(value) == expected


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


@settings(max_examples=300, deadline=None)
@given(
    signatures=st.lists(
        st.tuples(
            st.sampled_from(["pass", "fail", "neutral", "temperror", "permerror", "policy"]),
            st.text(alphabet=string.printable, max_size=90),
            st.from_regex(r"[a-z0-9-]{1,40}(\.[a-z0-9-]{1,30}){0,3}", fullmatch=True),
            st.text(alphabet=string.ascii_letters + "@.", max_size=60),
            st.text(alphabet=string.ascii_letters + string.digits + "-._/", max_size=50),
            st.sampled_from(["rsa-sha256", "ed25519-sha256", ""]),
            st.text(alphabet=_B64, min_size=0, max_size=24),
        ),
        max_size=4,
    ),
    dmarc_after=st.booleans(),
)
def test_dkim_results_fold_as_their_words_folded_whole(
    signatures: list[tuple[str, str, str, str, str, str, str]], dmarc_after: bool
) -> None:
    """The DKIM words but header.b are cached and folded once, header.b folded onto them
    per message: the field is the one folding every word of each result gives."""
    dkim = [DkimResult(r, d, s, a, i, b, detail) for r, detail, d, i, s, a, b in signatures]
    dmarc = DmarcResult("pass", "a.example", "none", "none", True, False) if dmarc_after else None
    field = authentication_results("mx.test", None, None, dkim, dmarc, None, None)
    prefixes = results._b_prefixes([d.signature_b for d in dkim])
    resinfos = [
        [*results._dkim_head(d), *([results._b_word(b)] if b else [])]
        for d, b in zip(dkim, prefixes, strict=True)
    ]
    if dmarc is not None:
        resinfos.append(list(results._dmarc(dmarc)))
    if not resinfos:
        assert field == b"Authentication-Results: mx.test; none\r\n"
        return
    lines = ["Authentication-Results: mx.test;"]
    for n, words in enumerate(resinfos):
        if n < len(resinfos) - 1:
            words = [*words[:-1], words[-1] + ";"]
        lines += results._fold(words)
    assert field == ("\r\n".join(lines) + "\r\n").encode("ascii")
    assert all(len(line) <= results.LINE or " " not in line[1:] for line in lines)
