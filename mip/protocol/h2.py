"""gRPC over HTTP/2, sans-I/O, on libnghttp2: octets in, calls and messages out.

:class:`GrpcConnection` is one HTTP/2 connection, server or client side; its
:meth:`~GrpcConnection.receive` answers a list of :class:`Event` values, each naming its
:class:`Call`. Importing this module raises ImportError where mip was built without
libnghttp2 (ModuleNotFoundError) or its run-time library is missing.
"""

from mip.protocol._h2 import (
    HEADER_LIST_TOO_LARGE,
    TOO_MANY_PINGS,
    TOO_MANY_RESETS,
    TOO_MANY_SETTINGS,
    Call,
    Event,
    GrpcConnection,
    MessageReceived,
    MessageTooLarge,
    RequestReceived,
    ResponseReceived,
    StreamClosed,
    StreamEnded,
    TrailersReceived,
    UnaryReceived,
)

__all__ = ["HEADER_LIST_TOO_LARGE", "TOO_MANY_PINGS", "TOO_MANY_RESETS", "TOO_MANY_SETTINGS",
           "Call", "Event", "GrpcConnection", "MessageReceived", "MessageTooLarge",
           "RequestReceived", "ResponseReceived", "StreamClosed", "StreamEnded",
           "TrailersReceived", "UnaryReceived"]
