# Type stub of the compiled kernel built from ext/mime.pyx; mime_py.py is its twin.

Buffer = bytes | bytearray | memoryview

class Part:
    start: int
    body_start: int
    end: int
    content_type: str
    charset: str | None
    boundary: str | None
    transfer_encoding: str
    has_8bit: bool
    depth: int
    children: list[Part]
    defects: list[str]
    def __init__(self, start: int = 0, depth: int = 0) -> None: ...
    def header_bytes(self, message: Buffer) -> bytes: ...
    def body_bytes(self, message: Buffer) -> bytes: ...

def scan(message: Buffer, max_depth: int = 32) -> Part: ...
def header_value(headers: Buffer, name: Buffer) -> bytes | None: ...
def content_type_params(value: Buffer) -> tuple[str, dict[str, str]]: ...
def canonical_body(body: Buffer, relaxed: bool) -> bytes: ...
