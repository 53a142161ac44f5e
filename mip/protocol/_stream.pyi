"""Type stubs of the receive buffers the MIP and MSIP parsers share (mip/protocol/_stream.pyx)."""

from typing import Any, Callable, Generic, TypeVar

_Frame = TypeVar("_Frame")

Buffer = bytes | bytearray | memoryview

IDLE_SIZE: int

class StreamParser(Generic[_Frame]):
    #: size -> an object exporting that many writable octets for a frame's own chunk, or None
    frame_memory: Callable[[int], Any] | None
    @property
    def buffered(self) -> int: ...
    @property
    def buffer_size(self) -> int: ...
    def feed(self, data: Buffer) -> list[_Frame]: ...
    def get_buffer(self, sizehint: int = ...) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> list[_Frame]: ...
