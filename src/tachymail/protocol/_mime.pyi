# Type stub of the compiled kernel built from ext/mime.pyx; mime_py.py is its twin.

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
    def header_bytes(self, message: bytes) -> bytes: ...
    def body_bytes(self, message: bytes) -> bytes: ...

def scan(message: bytes, max_depth: int = 32) -> Part: ...
def header_value(headers: bytes, name: bytes) -> bytes | None: ...
def content_type_params(value: bytes) -> tuple[str, dict[str, str]]: ...
