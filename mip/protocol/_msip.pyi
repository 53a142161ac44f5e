"""Type stubs of the compiled MSIP codec (mip/protocol/_msip.pyx)."""

from collections import deque
from typing import Any

from typing_extensions import Buffer as _Memory  # any object with the buffer protocol

from mip.protocol._stream import Buffer as Buffer, StreamParser

HEADER_SIZE: int
MAGIC: bytes
VERSION: int
DEFAULT_MAX_PAYLOAD: int

class Frame:
    frame_type: int
    msg_kind: int
    flags: int
    msg_id: int
    payload_len: int
    def __init__(self, frame_type: int, msg_kind: int, payload: Buffer = ..., msg_id: int = ...,
                 flags: int = ...) -> None: ...
    @property
    def payload(self) -> memoryview: ...
    def encode(self) -> bytes: ...

class FrameParser(StreamParser[Frame]):
    def __init__(self, max_payload: int = ..., chunk_size: int = ...) -> None: ...
    @property
    def max_payload_size(self) -> int: ...

def encode(frame_type: int, msg_kind: int, payload: Buffer = ..., msg_id: int = ...,
           flags: int = ...) -> bytes: ...
def encode_header(frame_type: int, msg_kind: int, payload_len: int, msg_id: int = ...,
                  flags: int = ...) -> bytes: ...
def decode(buffer: Buffer, max_payload: int | None = ...) -> Frame: ...
def decode_header(buffer: Buffer, max_payload: int | None = ...) -> tuple[int, int, int, int, int]: ...
def encode_publish_payload(topic: str, data: Buffer = ...) -> bytes: ...
def decode_publish_payload(payload: Buffer) -> tuple[str, memoryview]: ...
def encode_hello_payload(client_id: int | None = ..., token: bytes | None = ...) -> bytes: ...
def decode_hello_payload(payload: Buffer) -> tuple[int | None, bytes | None]: ...

# the broker's hot path (mip.net.msip_core)
class PeerState:
    core: Any
    parser: FrameParser
    session: Any
    host: str | None
    authenticated: bool
    closing: bool
    close_mode: str | None
    close_reason: str | None
    paused: bool
    urgent: deque
    queue: deque
    qbytes: int
    dropped: int
    last_rx: float
    pinged: bool
    rx_total: int
    consumed: int
    partial_since: float | None
    reading_paused: bool
    handle: Any

class CoreState:
    dirty: dict[Any, None]
    closing: list
    _broutes: dict[bytes, list]
    max_topic_length: int
    backplane: Any
    stats: Any

class BrokerProtocol:
    broker: Any
    core: CoreState
    state: PeerState
    parser: FrameParser
    transport: Any
    peer: Any
    host: str | None
    whole_chunk: bool
    def get_buffer(self, sizehint: int) -> _Memory: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def flush(self) -> None: ...

def receive(core: CoreState, peer: Any, nbytes: int, data: Buffer | None, now: float) -> None: ...
def write_out(core: CoreState) -> None: ...
def take_queued(first: deque, second: deque, limit: int) -> tuple[list, int]: ...
