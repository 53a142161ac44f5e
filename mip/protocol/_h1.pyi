"""Type stubs of the compiled HTTP/1.1 request head reader (mip/protocol/_h1.pyx)."""

MAX_HEAD: int
MAX_FIELDS: int

def parse_head(data: bytes, start: int = ...
               ) -> tuple[int, bytes, int, list[tuple[bytes, bytes]]] | None: ...
