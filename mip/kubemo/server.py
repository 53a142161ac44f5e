"""KubeMo's blocking server (``kubemo.server``): one model, one request per connection.

Kept so that a KubeMo server script ports by its imports alone. It serves one
connection at a time, as KubeMo's does; ``mip serve`` is the server to deploy (many
connections, pipelining, dynamic batching, many models).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from abc import ABC, abstractmethod
from typing import Any, Dict, Tuple, Union

import mip as _codec
from mip.errors import ErrorCode, ProtocolError
from mip.kubemo.errors import BatchShapeError
from mip.kubemo.inference import Inference
from mip.kubemo.protocol import FIXED_HEADER_FMT, FIXED_HEADER_LEN, MESSAGE_INFERENCE, MESSAGE_PING

__all__ = ["Handler", "PingHandler", "InferenceHandler", "Server"]

log = logging.getLogger("mip.kubemo.server")

#: the largest request accepted, in octets (header included); larger ones get ERROR/MEMORY.
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
#: seconds a connection may stay silent before it is dropped.
DEFAULT_READ_TIMEOUT = 30.0


class Handler(ABC):
    """Answers one kind of request."""

    @abstractmethod
    def handle(self, message: Any) -> bytes:
        """The response frame for a decoded request."""

    @abstractmethod
    def kind(self) -> int:
        """The MIP kind served."""


class PingHandler(Handler):
    """Answers PING."""

    def handle(self, message: Any) -> bytes:
        return _codec.encode_pong()

    def kind(self) -> int:
        return MESSAGE_PING


class InferenceHandler(Handler):
    """Runs each request's batch through ``model`` (a KubeMo lifecycle object)."""

    def __init__(self, model: Inference) -> None:
        self.model = model

    def handle(self, message: Any) -> bytes:
        batch_output = self.model(*message.batch)
        if len(batch_output) != len(message.batch) or len({len(o) for o in batch_output}) > 1:
            raise BatchShapeError("the model's outputs do not match the batch")
        items: list[Any] = list(batch_output)  # mip.kubemo's values are codec values
        return _codec.encode_response(items, n_input=message.n_input)

    def kind(self) -> int:
        return MESSAGE_INFERENCE


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("client disconnected")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class Server:
    """``Server("tcp", ("127.0.0.1", 50051))`` or ``Server("unix", "/path/to.sock")``.

    Args:
        network: ``"tcp"`` or ``"unix"``.
        address: ``(host, port)`` for TCP, a path for Unix sockets.
        register_ping_handler: answer PING.
        max_frame_size: the largest request accepted, in octets.
        read_timeout: seconds a connection may stay silent.
    """

    def __init__(self, network: str, address: Union[Tuple[str, int], str],
                 register_ping_handler: bool = True,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 read_timeout: float = DEFAULT_READ_TIMEOUT) -> None:
        self.network = network
        self.address = address
        if network == "tcp":
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        elif network == "unix":
            family = socket.AF_UNIX
        else:
            raise ValueError(f"network {network} is not supported yet")
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        if network == "tcp":
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(address)
        self.socket.listen(16)
        self.max_frame_size = max_frame_size
        self.read_timeout = read_timeout
        self.handlers: Dict[int, Handler] = {}
        if register_ping_handler:
            self.handle(PingHandler())

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *args: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening (and remove the Unix socket file)."""
        try:
            self.socket.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()
        except OSError:
            pass
        self.socket.close()
        address = self.address
        if self.network == "unix" and isinstance(address, (str, os.PathLike)) and (
                os.path.exists(address)):
            os.remove(address)

    def handle(self, handler: Handler) -> None:
        """Register ``handler`` for its kind."""
        self.handlers[handler.kind()] = handler

    def serve(self) -> None:
        """Accept connections until the socket is closed; one request each."""
        while True:
            conn, peer = self.socket.accept()
            with conn:
                conn.settimeout(self.read_timeout)
                log.info("accepted connection from %s", peer)
                try:
                    conn.sendall(self.dispatch(conn))
                except (ConnectionError, socket.timeout):
                    log.warning("client disconnected")

    def dispatch(self, conn: socket.socket) -> bytes:
        """Read one request from ``conn`` and return the response frame."""
        header = _recv_exactly(conn, FIXED_HEADER_LEN)
        version, kind, subtype, _, remaining = struct.unpack(FIXED_HEADER_FMT, header)
        if version != 0:
            return _codec.encode_error(ErrorCode.PROTOCOL)
        if FIXED_HEADER_LEN + remaining > self.max_frame_size:
            return _codec.encode_error(ErrorCode.MEMORY)
        payload = _recv_exactly(conn, remaining)
        if subtype != 0:
            return _codec.encode_error(ErrorCode.SUBTYPE)
        handler = self.handlers.get(kind)
        if handler is None:
            return _codec.encode_error(ErrorCode.METHOD)
        try:
            return handler.handle(_codec.decode(header + payload))
        except ProtocolError as exc:
            return _codec.encode_error(exc.error_code)
        except BatchShapeError:
            return _codec.encode_error(ErrorCode.SHAPE)
        except MemoryError:
            return _codec.encode_error(ErrorCode.MEMORY)
        except Exception:
            log.exception("error handling a request")
            return _codec.encode_error(ErrorCode.INTERNAL)
