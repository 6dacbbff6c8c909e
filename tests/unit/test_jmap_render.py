"""The cheap paths of a JMAP list page, without a server: the preview's white space
collapsing and bounded body decoding (tachymail.jmap.render), and the per-process cache
of content-derived Email properties (tachymail.jmap.view.PropertyCache)."""

from __future__ import annotations

import base64
import quopri
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from tachymail.jmap.render import PREVIEW_CHARS, body_octets, collapse_spaces, preview
from tachymail.jmap.view import PropertyCache

_SPACES = re.compile(r"\s+")
# white space of every kind str.split() and the regex know, among a few letters
_TEXT = st.text(
    alphabet=st.sampled_from(list(" \t\r\n\x0b\x0c\x1c\x85\xa0\u2003\u3000ab\xe9-")), max_size=800
)


@given(_TEXT, st.sampled_from([0, 1, 7, 64, PREVIEW_CHARS]))
def test_collapse_spaces_is_the_regex_substitution(text: str, limit: int) -> None:
    expected = _SPACES.sub(" ", text).strip()
    assert collapse_spaces(text, limit) == (expected[:limit] if limit else expected)


def _part(body: bytes, encoding: str) -> tuple[bytes, dict[str, object]]:
    """A message of one part in *encoding* holding *body*, and its summary node."""
    encoded = {
        "base64": lambda b: base64.encodebytes(b).replace(b"\n", b"\r\n"),
        "quoted-printable": lambda b: quopri.encodestring(b).replace(b"\n", b"\r\n"),
        "7bit": lambda b: b,
    }[encoding](body)
    head = f"Content-Transfer-Encoding: {encoding}\r\n\r\n".encode()
    message = head + encoded
    node = {"body_start": len(head), "end": len(message), "encoding": encoding}
    return message, node


@settings(max_examples=200)
@given(
    st.binary(max_size=6000),
    st.sampled_from(["base64", "quoted-printable", "7bit"]),
    st.sampled_from([1, 57, 256, 2048]),
)
def test_a_bounded_decode_starts_as_the_whole_decode(
    body: bytes, encoding: str, limit: int
) -> None:
    message, node = _part(body, encoding)

    def read(offset: int, length: int) -> bytes:
        return message[offset : offset + length]

    whole = body_octets(read, node)
    assert body_octets(read, node, limit)[:limit] == whole[:limit]


def test_a_preview_of_a_big_part_reads_a_window_of_it() -> None:
    words = b"alpha  beta\r\n\tgamma " * 200_000  # 4 MB
    for encoding in ("base64", "quoted-printable", "7bit"):
        message, node = _part(words, encoding)
        asked: list[int] = []

        def read(
            offset: int, length: int, message: bytes = message, asked: list[int] = asked
        ) -> bytes:
            asked.append(length)
            return message[offset : offset + length]

        node["type"], node["subtype"] = "text", "plain"
        found = preview(read, [node])
        assert found == ("alpha beta gamma " * 20)[:PREVIEW_CHARS]
        assert sum(asked) < 64 * 1024, (encoding, asked)


def test_property_cache_merges_evicts_the_oldest_and_stays_bounded() -> None:
    cache = PropertyCache(max_bytes=4000)
    cache.add(1, {"subject": "one"})
    cache.add(1, {"preview": "the first"})
    assert cache.get(1) == {"subject": "one", "preview": "the first"}
    assert cache.get(2) is None
    for content in range(2, 40):
        cache.add(content, {"subject": f"message {content}", "preview": "x" * 50})
        assert cache.size <= 4000
    assert cache.get(1) is None  # the least recently used went first
    assert cache.get(39) == {"subject": "message 39", "preview": "x" * 50}
    assert 0 < len(cache) < 38
    cache.add(100, {"preview": "y" * 5000})  # bigger than the whole cache: not kept
    assert cache.get(100) is None and cache.size <= 4000
    off = PropertyCache(max_bytes=0)
    off.add(1, {"subject": "one"})
    assert off.get(1) is None and len(off) == 0
