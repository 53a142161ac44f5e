"""The asyncio side of the codec's streaming parsers, shared by the MIP and MSIP connections.

:class:`FramedProtocol` lets a socket receive straight into a parser's buffer
(``asyncio.BufferedProtocol``) and hands the complete frames of each read to the
subclass; a ``ProtocolError`` while parsing or handling them goes to ``bad_frames``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Generic, TypeVar, cast

from mip.errors import ProtocolError

if TYPE_CHECKING:
    from mip.protocol._stream import StreamParser

__all__ = ["FramedProtocol"]

F = TypeVar("F")


class FramedProtocol(asyncio.BufferedProtocol, Generic[F]):
    """A stream connection read through ``parser`` (set by the subclass)."""

    parser: StreamParser[F]
    transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.parser.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.frames_received(self.parser.buffer_updated(nbytes), nbytes)
        except ProtocolError as exc:
            self.bad_frames(exc)

    def frames_received(self, frames: list[F], nbytes: int) -> None:
        """The complete frames a read of ``nbytes`` octets finished (often none)."""
        raise NotImplementedError

    def bad_frames(self, exc: ProtocolError) -> None:
        """The peer sent what the parser or ``frames_received`` refused."""
        raise NotImplementedError
