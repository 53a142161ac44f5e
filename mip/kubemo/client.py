"""KubeMo's blocking client (``kubemo.client.Client``) over mip's codec.

One connection per call, as KubeMo does, so it works against KubeMo's own server and
against ``mip serve`` alike. Values may be KubeMo values, codec values or numpy arrays.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any, Tuple

import mip as _codec
from mip.kubemo.errors import (BatchShapeError, InvocationError, MessageError, ParseAddressError,
                               ProtocolVersionError)
from mip.kubemo.protocol import FIXED_HEADER_FMT, FIXED_HEADER_LEN, IMAGE, JSON, TEXT
from mip.kubemo.serialize import Serial, as_input

__all__ = ["Client"]

#: seconds a call waits to connect, and for each read, before it gives up.
DEFAULT_TIMEOUT = 30.0


def _wire_value(value: Any) -> Any:
    if isinstance(value, (_codec.Text, _codec.Json, _codec.Image, _codec.Value)) or not (
            isinstance(value, Serial)):
        return value  # codec values, numpy arrays and str go to the encoder as they are
    data = value.encode()
    if value.kind == TEXT:
        return _codec.Text(data.decode())
    if value.kind == JSON:
        return _codec.Json.from_bytes(data)
    if value.kind == IMAGE:
        return _codec.Image(data)
    return _codec.Value(value.kind, data)


def _recv_exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("the server closed the connection mid-message")
        view = view[n:]
    return buffer


class Client:
    """``Client().inference(url, batch)`` and ``Client().ping(url)``, as in KubeMo.

    Args:
        timeout: seconds to wait for a connection and for each read.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *args: Any) -> None:
        pass

    def _connect(self, target: str) -> socket.socket:
        from mip.net.urls import UnixAddress, parse_url

        try:
            address = parse_url(target)
        except ValueError as exc:
            raise ParseAddressError(str(exc)) from None
        if isinstance(address, UnixAddress):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            where: Any = address.path
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in address.host else socket.AF_INET)
            where = (address.host, address.port)
        sock.settimeout(self.timeout)
        try:
            sock.connect(where)
        except BaseException:
            sock.close()
            raise
        return sock

    def _call(self, target: str, frame: bytes) -> Any:
        with self._connect(target) as sock:
            sock.sendall(frame)
            header = _recv_exactly(sock, FIXED_HEADER_LEN)
            version, kind, subtype, _, remaining = struct.unpack(FIXED_HEADER_FMT, header)
            if version != 0:
                raise ProtocolVersionError(f"server speaks MIP version {version}")
            payload = _recv_exactly(sock, remaining)
        message = _codec.decode(bytes(header + payload))
        if message.kind == _codec.KIND_ERROR:
            raise InvocationError(f"responded with error code: {message.error_code}")
        if not message.is_response:
            raise MessageError("the server sent a request, not a response")
        return message

    def inference(self, target: str,
                  batch: Tuple[Tuple[Any, ...], ...]) -> Tuple[Tuple[Any, ...], ...]:
        """Send one batch (items of values) to ``target`` and return the outputs."""
        n_input = len(batch[0])
        if any(len(item) != n_input for item in batch):
            raise BatchShapeError("inconsistent number of inputs")
        request = _codec.encode_request([tuple(_wire_value(v) for v in item) for item in batch])
        message = self._call(target, request)
        if len(message.batch) != len(batch):
            raise BatchShapeError(f"batch sent has {len(batch)} inputs, but the received batch "
                                  f"has {len(message.batch)} outputs")
        return tuple(tuple(as_input(v) for v in item) for item in message.batch)

    def ping(self, target: str) -> int:
        """Round-trip time of a PING to ``target``, in nanoseconds."""
        start = time.time_ns()
        self._call(target, _codec.encode_ping())
        return time.time_ns() - start
