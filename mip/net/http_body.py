"""Reading an HTTP request body, from ASGI (:func:`read_body`) or as a listener takes its
octets (:class:`Body`): bounded in size, decompressed per its ``Content-Encoding`` (gzip,
deflate, identity), bounded again after decompression.

Bad input raises from :mod:`mip.errors`' tree, so it is answered with that error's HTTP
status: :class:`~mip.errors.TooLarge` (413) for a body over the limit before or after
decompression, :class:`~mip.errors.InvalidInput` (400) for an unknown encoding or octets
that do not decompress, :class:`~mip.errors.Cancelled` when the client goes away first.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Any, Union

from starlette.types import Receive, Scope

from mip.errors import Cancelled, InvalidInput, TooLarge

__all__ = ["Body", "Octets", "decompress", "read_body", "request_body", "too_large"]

#: a whole body: ``bytes``, or the memory it was received into (a ``Body``'s ``memory``:
#: an object exporting its octets, e.g. a numpy array of the shared arena)
Octets = Union[bytes, Any]


async def request_body(scope: Scope, receive: Receive, limit: int,
                       setting: str = "") -> bytes:
    """:func:`read_body` with the ``Content-Length`` and ``Content-Encoding`` of
    ``scope``'s headers."""
    length, encoding = _length_and_encoding(scope["headers"])
    return await read_body(receive, limit, length, encoding, setting)


async def read_body(receive: Receive, limit: int, length: bytes | None = None,
                    encoding: bytes | None = None, setting: str = "",
                    memory: Callable[[int], Any] | None = None) -> Octets:
    """The request body, decompressed, at most ``limit`` octets before and after.

    Args:
        receive: the request's ASGI ``receive``.
        limit: the largest body, in octets.
        length: the ``Content-Length`` header's value (a body declared over the limit is
            refused before it is read).
        encoding: the ``Content-Encoding`` header's value (``None``: identity).
        setting: what sets ``limit``, named in the 413 message (e.g. a command-line flag).
        memory: what to receive the body into (see :class:`Body`).
    """
    body = Body(limit, length, encoding, setting, memory)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Cancelled("the client disconnected")
        body.feed(message.get("body", b""))
        if not message.get("more_body", False):
            return body.finish()


class Body:
    """A request body taken as it comes, with no I/O (what :func:`read_body` does with
    ASGI messages, for a listener that has the octets itself): bounded before and after
    decompression.

    Args:
        limit: the largest body, in octets.
        length: the ``Content-Length`` header's value (a body declared over the limit is
            refused here, before it is read: :class:`~mip.errors.TooLarge`).
        encoding: the ``Content-Encoding`` header's value (``None``: identity).
        setting: what sets ``limit``, named in the 413 message.
        memory: for a body of a ``Content-Length`` and no ``Content-Encoding``: called with
            its length, gives a writable 1-D ``uint8`` array of that many octets to receive
            it into (what :meth:`finish` gives back), or ``None`` (the body is then joined
            from its chunks, as without ``memory``).
    """

    __slots__ = ("limit", "encoding", "setting", "size", "chunks", "memory")

    def __init__(self, limit: int, length: bytes | None = None, encoding: bytes | None = None,
                 setting: str = "", memory: Callable[[int], Any] | None = None):
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large(int(length), limit, setting)
        self.limit = limit
        self.encoding = encoding
        self.setting = setting
        self.size = 0  # octets so far
        self.chunks: list[bytes] = []
        self.memory = None  # the array it is received into
        if memory is not None and encoding is None and length is not None and length.isdigit():
            self.memory = memory(int(length))

    def feed(self, chunk: bytes) -> None:
        """Take the next octets (:class:`~mip.errors.TooLarge` past the limit)."""
        start = self.size
        self.size += len(chunk)
        if self.size > self.limit:
            raise too_large(self.size, self.limit, self.setting)
        memory = self.memory
        if memory is None:
            self.chunks.append(chunk)
        elif self.size <= len(memory):
            memoryview(memory)[start:self.size] = chunk
        else:
            raise InvalidInput(f"the request body is longer than its Content-Length "
                               f"({len(memory)} octets)")

    def finish(self) -> Octets:
        """The whole body, decompressed (:class:`~mip.errors.TooLarge`,
        :class:`~mip.errors.InvalidInput`)."""
        memory = self.memory
        if memory is not None:
            self.memory = None
            return memory if self.size == len(memory) else memory[:self.size]
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self.encoding is None:
            return body
        return decompress(body, self.encoding.decode("latin-1").lower(), self.limit,
                          self.setting)


def decompress(body: bytes, encoding: str, limit: int, setting: str = "") -> bytes:
    """``body`` per its Content-Encoding (gzip, deflate, identity), at most ``limit``
    octets once decompressed."""
    if encoding == "identity":
        return body
    if encoding in ("gzip", "deflate"):
        decompressor = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            plain = decompressor.decompress(body, limit + 1)
        except zlib.error as exc:
            raise InvalidInput(f"the {encoding} body does not decompress: {exc}") from None
        if len(plain) > limit or decompressor.unconsumed_tail:
            raise too_large(len(plain), limit, setting, "decompressed ")
        return plain
    raise InvalidInput(f"Content-Encoding {encoding!r} is not supported "
                       "(gzip, deflate, identity)")


def too_large(size: int, limit: int, setting: str = "", what: str = "") -> TooLarge:
    """The error of a body of ``size`` octets (or more) over ``limit``."""
    named = f" ({setting})" if setting else ""
    return TooLarge(f"{what}request body of {size} octets (or more) is over the limit of "
                    f"{limit} octets{named}")


def _length_and_encoding(headers: Iterable[tuple[bytes, bytes]]
                         ) -> tuple[bytes | None, bytes | None]:
    length = encoding = None
    for key, value in headers:
        if key == b"content-length":
            length = value
        elif key == b"content-encoding":
            encoding = value
    return length, encoding
