"""KubeMo's exception names, placed in mip's exception tree."""

from __future__ import annotations

from mip.errors import MipError

__all__ = ["ProtocolVersionError", "MessageError", "InvocationError", "BatchShapeError",
           "ParseAddressError"]


class ProtocolVersionError(MipError):
    """The peer speaks another MIP version."""


class MessageError(MipError):
    """A message of the wrong subtype arrived."""


class InvocationError(MipError, ValueError):
    """The server answered with an ERROR frame."""


class BatchShapeError(MipError):
    """Items of a batch disagree on their number of values, or the reply's batch size differs."""


class ParseAddressError(MipError, ValueError):
    """A URL is neither ``tcp://host:port`` nor ``unix:///path``."""
