# Type stub of the compiled kernel built from ext/imap.pyx; imap_py.py is its twin.
from collections.abc import Sequence
from typing import Final

from tachymail.protocol.imap_types import (
    Bad as Bad,
)
from tachymail.protocol.imap_types import (
    Binary as Binary,
)
from tachymail.protocol.imap_types import (
    Command as Command,
)
from tachymail.protocol.imap_types import (
    Continuation as Continuation,
)
from tachymail.protocol.imap_types import (
    FetchAtt as FetchAtt,
)
from tachymail.protocol.imap_types import (
    Section as Section,
)
from tachymail.protocol.imap_types import (
    String as String,
)
from tachymail.protocol.imap_types import (
    TooLarge as TooLarge,
)

STAR: Final[int]
SEARCHRES: Final[int]

class CommandReader:
    def __init__(self, max_line: int = 8192, max_literal: int = 67108864) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> None: ...
    def next(self) -> Command | Continuation | Bad | TooLarge | None: ...
    def next_line(self) -> bytes | Bad | None: ...
    @property
    def max_line(self) -> int: ...
    @property
    def max_literal(self) -> int: ...
    @property
    def pending(self) -> int: ...

def parse_sequence_set(text: bytes) -> list[tuple[int, int]]: ...
def parse_fetch_items(tokens: list[object]) -> list[FetchAtt]: ...
def quote(value: bytes) -> bytes: ...
def fetch_flags_line(
    seq: int, uid: int, flags: bytes, size: int, internaldate: bytes | None, modseq: int
) -> bytes: ...
def fetch_flags_lines(
    seq: int,
    uids: Sequence[int],
    flags: Sequence[bytes],
    sizes: Sequence[int],
    modseqs: Sequence[int] | None,
) -> bytes: ...
def fetch_item_lines(seq: int, parts: Sequence[bytes]) -> bytes: ...
