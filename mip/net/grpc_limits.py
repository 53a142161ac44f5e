"""The limits of a gRPC listener: what one connection may hold and how long it may idle.

:class:`GrpcLimits` is what :class:`mip.net.grpc_server.GrpcServer` enforces (and what
``--grpc-impl grpcio`` is configured with, where grpcio has the same setting); the
``mip serve`` flags that set each field are added by :func:`add_arguments`. docs/grpc.md
says what happens when each is exceeded.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Callable

__all__ = ["GrpcLimits", "add_arguments", "from_arguments"]

_RESET_BURST = 1000


@dataclass(frozen=True, slots=True)
class GrpcLimits:
    """Per-listener and per-connection bounds of the gRPC transport.

    Octet counts are octets, times are seconds; 0 turns a timer or a rate limit off.
    """

    #: calls open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS, enforced)
    max_concurrent_streams: int = 256
    #: request header list, name + value + 32 per field (SETTINGS_MAX_HEADER_LIST_SIZE,
    #: enforced on what arrives)
    max_header_list_size: int = 16 << 10
    #: HPACK dynamic table of each direction (SETTINGS_HEADER_TABLE_SIZE)
    header_table_size: int = 4096
    #: request octets of unfinished messages held per connection (0: four times the
    #: largest message, at least 64 MiB)
    max_buffered: int = 0
    #: reply octets waiting to be written per connection; over it, new calls wait and
    #: request DATA is not acknowledged (the peer stops sending) until half have drained
    max_pending_reply: int = 4 << 20
    #: connections open at once; at the limit the longest-idle one is closed for a new one
    max_connections: int = 1024
    #: the client preface and SETTINGS must arrive this long after accept (TLS included)
    handshake_timeout: float = 20.0
    #: a connection without calls this long gets GOAWAY and is closed
    idle_timeout: float = 300.0
    #: send a PING this often while calls are open, as grpc-core ... (0: no keepalive pings)
    keepalive_interval: float = 0.0
    #: ... and close the connection when its ACK takes longer than this
    keepalive_timeout: float = 20.0
    #: PINGs closer together than this (with no reply data in between) are strikes
    min_ping_interval: float = 300.0
    #: strikes allowed before GOAWAY ENHANCE_YOUR_CALM "too_many_pings" (0: no limit)
    max_ping_strikes: int = 2
    #: streams a client may reset per second (after a burst of 1000) before GOAWAY
    #: ENHANCE_YOUR_CALM "too_many_resets"
    max_reset_rate: float = 33.0
    reset_burst: int = _RESET_BURST

    def grpcio_options(self) -> list[tuple[str, int]]:
        """The grpcio server options that have the same meaning as these limits (grpcio has
        none for max_buffered, max_pending_reply, max_connections and the reset rate)."""
        options = [
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.max_metadata_size", self.max_header_list_size),
            ("grpc.http2.hpack_table_size.decoder", self.header_table_size),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.min_ping_interval * 1000)),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
        ]
        for option, seconds in (("grpc.max_connection_idle_ms", self.idle_timeout),
                                ("grpc.server_handshake_timeout_ms", self.handshake_timeout),
                                ("grpc.keepalive_time_ms", self.keepalive_interval)):
            if seconds:
                options.append((option, int(seconds * 1000)))
        if self.keepalive_interval:
            options.append(("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)))
        return options

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"gRPC limit {f.name} must not be negative")
        if self.max_concurrent_streams < 1 or self.max_connections < 1:
            raise ValueError("max_concurrent_streams and max_connections must be at least 1")
        if self.max_header_list_size < 1024:
            raise ValueError("max_header_list_size must be at least 1024 octets")


# (field, flag, metavar, help) of the `mip serve` flags; the default comes from GrpcLimits
_FLAGS = [
    ("max_concurrent_streams", "--grpc-max-concurrent-streams", "N",
     "gRPC calls open at once on one connection"),
    ("max_header_list_size", "--grpc-max-header-list-size", "OCTETS",
     "largest gRPC request header list (name + value + 32 per field); larger: "
     "RESOURCE_EXHAUSTED, four times larger: the connection is closed"),
    ("header_table_size", "--grpc-header-table-size", "OCTETS", "HPACK dynamic table size"),
    ("max_buffered", "--grpc-max-buffered", "OCTETS",
     "request octets of unfinished messages held per gRPC connection (0: four times "
     "--grpc-max-message-size, at least 64M)"),
    ("max_pending_reply", "--grpc-max-pending-reply", "OCTETS",
     "reply octets waiting to be written on one gRPC connection before its new calls "
     "wait and its requests stop being read"),
    ("handshake_timeout", "--grpc-handshake-timeout", "SECONDS",
     "close gRPC connections whose TLS handshake, HTTP/2 preface and SETTINGS do not "
     "arrive within this time of accept"),
    ("keepalive_interval", "--grpc-keepalive-interval", "SECONDS",
     "PING gRPC clients with calls open this often (0 = never)"),
    ("keepalive_timeout", "--grpc-keepalive-timeout", "SECONDS",
     "close a gRPC connection whose keepalive PING is not answered within this time"),
    ("min_ping_interval", "--grpc-min-ping-interval", "SECONDS",
     "PINGs from a client closer together than this (without reply data between) are "
     "strikes"),
    ("max_ping_strikes", "--grpc-max-ping-strikes", "N",
     "strikes before GOAWAY ENHANCE_YOUR_CALM too_many_pings (0 = no limit)"),
    ("max_reset_rate", "--grpc-max-reset-rate", "PER_SECOND",
     "streams a gRPC client may reset per second, after a burst of "
     f"{_RESET_BURST}, before its connection is closed (0 = no limit)"),
]


def add_arguments(parser: argparse.ArgumentParser, size: Callable[[str], int]) -> None:
    """Add the ``--grpc-*`` limit flags to ``parser``; ``size`` parses octet counts."""
    defaults = GrpcLimits()
    for name, flag, metavar, text in _FLAGS:
        default = getattr(defaults, name)
        kind = size if metavar == "OCTETS" else type(default)
        if metavar == "OCTETS":
            shown = next((f"{default >> shift}{suffix}" for shift, suffix in ((20, "M"), (10, "K"))
                          if default and default % (1 << shift) == 0), str(default))
        else:
            shown = f"{default:g}" + {"SECONDS": " s", "PER_SECOND": "/s"}.get(metavar, "")
        parser.add_argument(flag, dest=f"grpc_{name}", type=kind, default=default,
                            metavar=metavar, help=f"{text} (default {shown})")


def from_arguments(args: argparse.Namespace, **overrides) -> GrpcLimits:
    """The :class:`GrpcLimits` of parsed ``mip serve`` arguments (and ``overrides``)."""
    values = {name: getattr(args, f"grpc_{name}") for name, *_ in _FLAGS}
    values.update(overrides)
    return GrpcLimits(**values)
