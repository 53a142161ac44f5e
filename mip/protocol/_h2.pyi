"""Type stubs of the compiled gRPC-over-HTTP/2 layer (mip/protocol/_h2.pyx); the attributes
of Call (but those the application sets), Event and GrpcConnection are read-only."""

from collections.abc import Callable, Iterable
from typing import Any, Final

from typing_extensions import Buffer

TOO_MANY_PINGS: Final[str]
TOO_MANY_RESETS: Final[str]
TOO_MANY_SETTINGS: Final[str]
HEADER_LIST_TOO_LARGE: Final[str]

class Call:
    stream_id: int
    method: str | None
    path: str | None
    content_type: str | None
    timeout: float | None
    encoding: str | None
    metadata: list[tuple[str, str | bytes]]
    http_status: int | None
    grpc_status: int | None
    grpc_message: str | None
    tag: Any
    data: Any
    finished: bool
    incomplete: bool
    def __init__(self, stream_id: int) -> None: ...

class Event:
    call: Call

class RequestReceived(Event): ...

class MessageReceived(Event):
    data: bytes | memoryview
    compressed: bool

class UnaryReceived(Event):
    data: bytes | memoryview

class StreamEnded(Event): ...

class StreamClosed(Event):
    error_code: int

class MessageTooLarge(Event):
    length: int
    over_buffered: bool

class ResponseReceived(Event): ...
class TrailersReceived(Event): ...

class GrpcConnection:
    def __init__(self, *, client: bool = False, max_message_size: int = ...,
                 max_concurrent_streams: int = ..., window_size: int = ...,
                 max_header_list_size: int = ..., header_table_size: int = ...,
                 max_buffered: int = ..., max_pending_out: int = ...,
                 min_ping_interval: float = ..., max_ping_strikes: int = ...,
                 reset_burst: float = ..., reset_rate: float = ...,
                 scheme: bytes = ..., unary_paths: Iterable[str] = (),
                 message_memory: Callable[[int], Buffer | None] | None = None,
                 message_memory_min: int = ...) -> None: ...
    client: bool
    max_message_size: int
    max_buffered: int
    buffered: int
    max_pending_out: int
    pending_out: int
    max_header_list_size: int
    handshaken: bool
    streams_started: int
    ping_pending: bool
    shutdown_state: int
    want_read: bool
    want_write: bool
    open_calls: int
    reading_held: bool
    message_memory: Callable[[int], Buffer | None] | None
    message_memory_min: int
    def receive(self, data: Buffer) -> list[Event]: ...
    def data_to_send(self) -> list[bytes | memoryview]: ...
    def live_calls(self) -> list[Call]: ...
    def let_go(self) -> None: ...
    def send_message(self, call: Call, message: Buffer | list[Buffer]) -> None: ...
    def finish(self, call: Call, status: int, message: str = "",
               trailers: Iterable[tuple[str | bytes, str | bytes]] = ()) -> None: ...
    def refuse(self, call: Call, http_status: int, status: int, message: str) -> None: ...
    def unary(self, call: Call, message: Buffer | list[Buffer]) -> None: ...
    def reset(self, call: Call, error_code: int = ...) -> None: ...
    def goaway(self, error_code: int = ..., debug: bytes = b"") -> None: ...
    def shutdown_notice(self) -> None: ...
    def ping(self) -> None: ...
    def start_call(self, path: bytes, authority: bytes, message: Buffer | list[Buffer] | None = None,
                   metadata: Iterable[tuple[str | bytes, str | bytes]] = (),
                   timeout: float | None = None, end: bool = True) -> Call: ...
    def end_call(self, call: Call) -> None: ...
