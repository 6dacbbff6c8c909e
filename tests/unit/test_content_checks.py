"""Intake content checks (tachymail.smtp.checks): hop count, header and body rules.

Pure functions over bytes; each test runs over both MIME scanner twins.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import IMPLS, load_impl
from tachymail.config import ConfigError, from_dict
from tachymail.smtp import checks
from tachymail.smtp.checks import ContentChecks, Rule, compile_rule, first_matching_line


@pytest.fixture(params=IMPLS, autouse=True)
def mime(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """Run every test with the compiled scanner and with its pure twin."""
    module = load_impl("mime", request.param)
    monkeypatch.setattr(checks, "scan", module.scan)
    yield module


def message(received: int, extra: str = "", body: str = "Hello.\r\n") -> bytes:
    hops = "".join(
        f"Received: from h{i}.example\r\n\tby x.example; {i}\r\n" for i in range(received)
    )
    return f"{hops}From: a@example.org\r\nSubject: hi\r\n{extra}\r\n{body}".encode()


def test_hops_counted_once_per_folded_field_and_only_in_the_header_block() -> None:
    body = "Received: in the body\r\nDelivered-To: also body\r\n"
    assert checks.count_hops(message(3, body=body)) == 3
    assert checks.count_hops(message(2, extra="delivered-to: a@b\r\nRECEIVED:x\r\n")) == 4
    assert checks.count_hops(b"X-Received: no\r\nReceivedX: no\r\n\r\n") == 0
    assert checks.count_hops(message(5).replace(b"\r\n", b"\n")) == 5  # LF-only too
    assert checks.count_hops(b"") == 0
    assert checks.count_hops(b"\r\nReceived: body only\r\n") == 0


def test_hop_limit_refuses_one_over_the_limit_with_554_5_4_6() -> None:
    verdict = ContentChecks(max_hops=50).check(message(51))
    assert verdict.action == "reject"
    assert verdict.reply == b"554 5.4.6 Too many hops\r\n"
    assert verdict.metric == "loop"
    assert ContentChecks(max_hops=50).check(message(50)).action == "accept"
    assert ContentChecks(max_hops=0).check(message(500)).action == "accept"


def rules(*specs: tuple[str, str, str]) -> list[Rule]:
    return [compile_rule(f"r[{i}]", p, a, t) for i, (p, a, t) in enumerate(specs)]


def test_header_rules_see_unfolded_fields_case_insensitively() -> None:
    folded = message(0, extra="X-Spam-Flag:\r\n YES\r\n")
    verdict = ContentChecks(header_rules=rules((r"^x-spam-flag: YES$", "reject", "go away"))).check(
        folded
    )
    assert verdict.action == "reject"
    assert verdict.reply == b"550 5.7.1 go away\r\n"
    assert verdict.metric == "content"
    assert "r[0]" in verdict.reason
    untouched = ContentChecks(header_rules=rules((r"^x-spam-flag: no", "reject", ""))).check(folded)
    assert untouched.action == "accept" and untouched.content == folded


def test_strip_and_add_rewrite_only_the_matching_fields() -> None:
    original = message(1, extra="X-Secret: 1\r\n  folded\r\nX-Other: 2\r\n", body="X-Secret: b\r\n")
    checker = ContentChecks(
        header_rules=rules(
            (r"^X-Secret:", "strip", ""),
            (r"^Subject:", "add", "X-Checked: yes"),
        )
    )
    verdict = checker.check(original)
    assert verdict.action == "accept"
    head, _, body = verdict.content.partition(b"\r\n\r\n")
    assert b"X-Secret" not in head and b"folded" not in head
    assert b"X-Checked: yes\r\nSubject: hi\r\n" in head + b"\r\n"
    assert b"X-Other: 2" in head
    assert body == b"X-Secret: b\r\n"  # the body is not a header
    assert verdict.applied == ["add by r[1]", "strip by r[0]"]  # in header order


def test_first_matching_header_rule_wins_and_hold_lets_later_reject_win() -> None:
    first = ContentChecks(
        header_rules=rules((r"^Subject: hi", "hold", ""), (r"^Subject:", "reject", ""))
    )
    assert first.check(message(0)).action == "hold"
    later = ContentChecks(header_rules=rules((r"^Subject:", "hold", ""), (r"^From:", "reject", "")))
    assert later.check(message(0)).action == "reject"  # From: comes before Subject:
    both = ContentChecks(header_rules=rules((r"^From:", "hold", ""), (r"^Subject:", "discard", "")))
    assert both.check(message(0)).action == "discard"


MULTIPART = (
    b"From: a@example.org\r\n"
    b"Subject: files\r\n"
    b"Content-Type: multipart/mixed; boundary=XX\r\n"
    b"\r\n"
    b"--XX\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"plain text line\r\n"
    b"--XX\r\n"
    b'Content-Type: application/octet-stream; name="run.exe"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"Zm9yYmlkZGVuIHdvcmQ=\r\n"
    b"forbidden word\r\n"
    b"--XX\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"forbidden word\r\n"
    b"--XX--\r\n"
)


def test_header_rules_reach_mime_part_headers() -> None:
    verdict = ContentChecks(header_rules=rules((r'name="?[^"]*\.exe', "reject", "no .exe"))).check(
        MULTIPART
    )
    assert verdict.action == "reject" and verdict.reply == b"550 5.7.1 no .exe\r\n"


def test_body_rules_skip_base64_and_non_text_parts() -> None:
    checker = ContentChecks(body_rules=rules((r"forbidden", "reject", "")))
    assert checker.check(MULTIPART).action == "accept"
    plain = ContentChecks(body_rules=rules((r"^plain text line$", "hold", "")))
    assert plain.check(MULTIPART).action == "hold"


def test_body_rules_read_only_the_first_body_limit_octets_of_a_part() -> None:
    body = "x" * 70 + "\r\n"
    long = message(0, body=body * 100 + "needle\r\n")
    assert ContentChecks(body_rules=rules(("needle", "reject", ""))).check(long).action == "reject"
    bounded = ContentChecks(body_rules=rules(("needle", "reject", "")), body_limit=1000)
    assert bounded.check(long).action == "accept"


def test_body_lines_are_matched_alone() -> None:
    # "a\s+b" would match across the line break if the body were searched as one string.
    checker = ContentChecks(body_rules=rules((r"a\s+b", "reject", ""), (r"^c$", "discard", "")))
    assert checker.check(message(0, body="xa\r\nb\r\n")).action == "accept"
    assert checker.check(message(0, body="xa\r\nc\r\n")).action == "discard"
    assert checker.check(message(0, body="a   b\r\n")).action == "reject"


def naive(rule_list: list[Rule], text: bytes) -> list[tuple[str, bytes]]:
    """The obvious loop over lines that first_matching_line must agree with."""
    found = []
    text = text[:-1] if text.endswith(b"\n") else text  # the last line's own break
    for line in text.split(b"\n") if text else []:
        for rule in rule_list:
            if rule.regex.search(line):
                found.append((rule.where, line))
                break
    return found


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["ab", "a b", "", "b", "ba", "\n", "c", " "]), max_size=12),
    st.lists(st.sampled_from([r"a\s*b", r"^b", r"a$", r"^$", r"c", r"b\s", r"\Ba"]), min_size=1),
)
def test_first_matching_line_agrees_with_a_loop_over_lines(
    pieces: list[str], patterns: list[str]
) -> None:
    text = "".join(pieces).encode()
    rule_list = rules(*[(p, "reject", "") for p in patterns])
    got = [(r.where, line) for r, line in first_matching_line(rule_list, text)]
    assert got == naive(rule_list, text)


def test_configuration_names_the_bad_rule() -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict(
            {
                "header_check": [
                    {"pattern": "^Subject:", "action": "reject"},
                    {"pattern": "([a-z", "action": "reject"},
                ],
                "body_check": [{"pattern": "x", "action": "strip"}],
                "policy": {"max_hops": -1},
            }
        )
    text = str(caught.value)
    assert "header_check[1].pattern: not a valid regular expression" in text
    assert "header_check[0]" not in text
    assert "body_check[0].action" in text
    assert "policy.max_hops" in text
    config = from_dict({"header_check": [{"pattern": "^X-A:", "action": "add", "text": "X-B: 1"}]})
    assert ContentChecks.from_config(config).header_rules[0].text == "X-B: 1"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_never_raises_on_any_content(data: bytes) -> None:
    checker = ContentChecks(
        max_hops=2,
        header_rules=rules((r"^Received", "strip", ""), (r"^From:", "add", "X-A: b")),
        body_rules=rules((r"^zz", "hold", "")),
    )
    verdict = checker.check(data)
    assert verdict.action in ("accept", "reject", "hold", "discard")


# The fixture only picks the scanner: nothing in it needs resetting between inputs.
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.sampled_from(
            [b"Received: x", b"From a", b"\r\n", b"\n", b" cont", b"X:y", b"bad line", b"\r"]
        ),
        max_size=14,
    )
)
def test_header_block_ends_where_the_scanner_ends_it(mime: ModuleType, pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert checks.header_block_end(data) == mime.scan(data).body_start


_HOP_LINES = st.sampled_from(
    [
        b"Received: by x\r\n",
        b"received:y\n",
        b"DELIVERED-TO: a@b\r\n",
        b"\tfolded\r\n",
        b"Subject: s\r\n",
        b"not a field\r\n",
        b"\r\n",
        b"\n",
        b"Received: late\r\n",
        b"Authentication-Results: mx.example; spf=pass\r\n",
        b"authentication-results : x; none\r\n",
    ]
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_HOP_LINES, max_size=80), st.integers(min_value=1, max_value=20))
def test_the_cheap_hop_bound_never_undercounts(lines: list[bytes], limit: int) -> None:
    """check() counts exactly only when the bound (fields before the first blank line) is
    over the limit; the bound must therefore never be below the exact count."""
    message = b"".join(lines)
    exact = checks.count_hops(message)
    bound, results = checks._trace_fields(message)
    assert bound >= exact
    verdict = ContentChecks(max_hops=limit).check(message)
    assert (verdict.action == checks.REJECT) == (exact > limit)
    # the Authentication-Results flag may over-report (fields past the header), never miss one
    head = message[: checks.header_block_end(message)].lower()
    if b"\nauthentication-results" in b"\n" + head:
        assert results and (verdict.results_fields or verdict.action == checks.REJECT)
