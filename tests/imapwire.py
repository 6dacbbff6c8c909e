"""A small reader of IMAP response data for tests: parses what a server sent, independently of
Tachymail's own writer, so a test compares values, not the writer's output with itself.

``read_fetch(data)`` parses one ``* n FETCH (...)`` response (with or without the leading
``* ``; literals ``{n}`` and literal8 ``~{n}`` included) into ``(n, {item name: value})``.
Values: ``None`` for NIL, ``Atom`` (a bytes subclass) for atoms and numbers, plain ``bytes``
for quoted strings and literals (a quoted string and a literal with the same octets are the
same value), ``list`` for parenthesised lists. Item names are atoms as sent, section names
included: ``BODY[HEADER.FIELDS (FROM SUBJECT)]<0>``.
"""

from __future__ import annotations

from typing import Any


class Atom(bytes):
    """An atom (or number) as sent; compares unequal to a string with the same octets."""

    def __eq__(self, other: object) -> bool:
        return type(other) is Atom and bytes.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = bytes.__hash__

    def __repr__(self) -> str:
        return f"Atom({bytes(self)!r})"


class ParseError(ValueError):
    pass


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.i = 0

    def error(self, what: str) -> ParseError:
        return ParseError(f"{what} at {self.i}: {self.data[self.i : self.i + 40]!r}")

    def expect(self, text: bytes) -> None:
        if not self.data.startswith(text, self.i):
            raise self.error(f"expected {text!r}")
        self.i += len(text)

    def value(self) -> Any:
        data, i = self.data, self.i
        if i >= len(data):
            raise self.error("unexpected end")
        c = data[i : i + 1]
        if c == b"(":
            self.i += 1
            items: list[Any] = []
            while True:
                if data[self.i : self.i + 1] == b")":
                    self.i += 1
                    return items
                if items and data[self.i : self.i + 1] != b"(":
                    self.expect(b" ")  # address lists run their entries together: ((..)(..))
                items.append(self.value())
        if c == b'"':
            out = bytearray()
            j = i + 1
            while True:
                if j >= len(data) or data[j : j + 1] in (b"\r", b"\n"):
                    raise self.error("unterminated quoted string")
                d = data[j : j + 1]
                if d == b"\\":
                    out += data[j + 1 : j + 2]
                    j += 2
                elif d == b'"':
                    self.i = j + 1
                    return bytes(out)
                else:
                    out += d
                    j += 1
        if c in (b"{", b"~"):
            start = i + 1 if c == b"~" else i
            if data[start : start + 1] != b"{":
                raise self.error("bad literal")
            end = data.index(b"}", start)
            size = int(data[start + 1 : end])
            self.i = end + 1
            self.expect(b"\r\n")
            literal = data[self.i : self.i + size]
            if len(literal) != size:
                raise self.error("short literal")
            self.i += size
            return literal
        return self.atom()

    def atom(self) -> Any:
        data = self.data
        j = self.i
        while j < len(data):
            d = data[j : j + 1]
            if d == b"[":  # a section: anything up to its "]" (it may hold spaces and lists)
                close = data.find(b"]", j)
                if close < 0:
                    raise self.error("unterminated section")
                j = close + 1
            elif d in b' ()"{\r\n':
                break
            else:
                j += 1
        if j == self.i:
            raise self.error("expected a value")
        text = data[self.i : j]
        self.i = j
        return None if text.upper() == b"NIL" else Atom(text)


def read_fetch(data: bytes) -> tuple[int, dict[bytes, Any]]:
    """``(seq, {item name: value})`` of one FETCH response (see the module docstring)."""
    reader = _Reader(data.removeprefix(b"* "))
    seq = reader.atom()
    reader.expect(b" FETCH ")
    items = reader.value()
    rest = reader.data[reader.i :]
    if rest not in (b"", b"\r\n"):
        raise reader.error("junk after the response")
    if not isinstance(items, list) or len(items) % 2:
        raise ParseError(f"not a FETCH item list: {items!r}")
    return int(seq), {bytes(items[k]).upper(): items[k + 1] for k in range(0, len(items), 2)}


def read_value(data: bytes) -> Any:
    """One value (a list, string, atom or NIL) that is the whole of *data*."""
    reader = _Reader(data)
    value = reader.value()
    if reader.i != len(data):
        raise reader.error("junk after the value")
    return value
