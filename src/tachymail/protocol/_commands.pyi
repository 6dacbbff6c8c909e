# Type stub of the compiled kernel built from ext/commands.pyx; commands_py.py is its twin.
from typing import Final

VERB_UNKNOWN: Final[int]
VERB_HELO: Final[int]
VERB_EHLO: Final[int]
VERB_MAIL: Final[int]
VERB_RCPT: Final[int]
VERB_DATA: Final[int]
VERB_BDAT: Final[int]
VERB_RSET: Final[int]
VERB_NOOP: Final[int]
VERB_QUIT: Final[int]
VERB_VRFY: Final[int]
VERB_EXPN: Final[int]
VERB_HELP: Final[int]
VERB_STARTTLS: Final[int]
VERB_AUTH: Final[int]

LINE_TOO_LONG: Final[int]
LINE_BARE_LF: Final[int]
LINE_BARE_CR: Final[int]

class LineReader:
    auth_exchange: bool
    def __init__(self, limit: int = 512, auth_limit: int = 0) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> None: ...
    def readline(self) -> tuple[bytes, int] | None: ...
    def drain(self) -> bytes: ...
    @property
    def limit(self) -> int: ...
    @property
    def auth_limit(self) -> int: ...
    @property
    def pending(self) -> int: ...

def parse_command(line: bytes) -> tuple[int, bytes]: ...
def parse_mail(args: bytes, smtputf8: bool = True) -> tuple[str, dict[str, str]]: ...
def parse_rcpt(args: bytes, smtputf8: bool = False) -> tuple[str, dict[str, str]]: ...
