"""The values the IMAP command tokenizer returns, shared by the compiled kernel and its twin.

Both ``tachymail.protocol._imap`` and ``tachymail.protocol.imap_py`` build these same classes,
so their results compare equal and a caller can test ``type(item)`` whatever the kernel.
"""

from __future__ import annotations

from typing import NamedTuple

#: ``*`` in a sequence set: the largest number in use (never a real number: nz-number >= 1)
STAR = 0
#: ``$`` (RFC 5182 SEARCHRES): ``parse_sequence_set(b"$")`` is ``[(SEARCHRES, SEARCHRES)]``
SEARCHRES = -1


class String(bytes):
    """A quoted string or a literal: its value, unquoted.

    A ``bytes`` subclass, so it can be used as bytes, but it never equals an atom: ``NIL`` the
    atom is ``b"NIL"``, the string ``"NIL"`` is ``String(b"NIL")``, and the two differ.
    """

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and bytes.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = bytes.__hash__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({bytes(self)!r})"


class Binary(String):
    """A literal8 (``~{n}``, RFC 3516 / RFC 9051): may hold NUL octets (BINARY APPEND)."""

    __slots__ = ()


class Section(NamedTuple):
    """``BODY[...]<o.n>`` and its kin as one token.

    ``name`` is the text before ``[`` upper-cased (``BODY``, ``BODY.PEEK``, ``BINARY``,
    ``BINARY.PEEK``, ``BINARY.SIZE``); ``spec`` the tokens between the brackets (atoms, strings
    and lists, as elsewhere); ``partial`` is ``(offset, length)`` from ``<offset.length>`` or
    None.
    """

    name: bytes
    spec: list[object]
    partial: tuple[int, int] | None


class Command(NamedTuple):
    """One complete command: ``name`` upper-cased, ``b"UID FETCH"`` style after UID."""

    tag: bytes
    name: bytes
    args: list[object]


class Continuation(NamedTuple):
    """A synchronizing literal ``{size}`` was announced: send ``+ ...`` and keep reading."""

    tag: bytes
    size: int


class Bad(NamedTuple):
    """A command the reader could not tokenize: answer ``tag BAD reason`` (``* BAD`` when tag
    is None).  The reader has dropped the command and goes on with the next one."""

    tag: bytes | None
    reason: str


class TooLarge(NamedTuple):
    """A literal over ``max_literal`` octets (or over what is left of it for this command).

    The command is dropped.  ``synchronizing``: the client waits for a continuation that will
    not come, so answer ``tag NO [TOOBIG]`` or ``BAD``; otherwise (``{n+}``) the reader skips
    the literal's octets as they arrive, without keeping them, and the rest of the command.
    """

    tag: bytes | None
    size: int
    synchronizing: bool


class FetchAtt(NamedTuple):
    """One FETCH data item.

    ``name`` upper-cased: FLAGS, INTERNALDATE, RFC822.SIZE, ENVELOPE, BODY, BODYSTRUCTURE, UID,
    RFC822, RFC822.HEADER, RFC822.TEXT, MODSEQ, BODY.PEEK, BINARY, BINARY.PEEK, BINARY.SIZE.
    ``part`` is None when the item has no section (``BODY`` alone is the structure), else the
    part numbers, ``()`` for the whole message.  ``text`` is b"", HEADER, HEADER.FIELDS,
    HEADER.FIELDS.NOT, TEXT or MIME; ``fields`` the header names of HEADER.FIELDS (.NOT)
    upper-cased; ``partial`` ``(offset, length)`` or None.
    """

    name: bytes
    part: tuple[int, ...] | None = None
    text: bytes = b""
    fields: tuple[bytes, ...] = ()
    partial: tuple[int, int] | None = None
