"""One exception tree for the whole toolkit.

``ProtocolError`` and its subclasses mean *the bytes on the wire are wrong*: they
carry the offset (in octets from the start of the frame or stream) where the
problem was found and the MIP error code a server should answer with.

``ServingError`` and its subclasses mean *the request was well formed but could
not be served*: they carry an HTTP status, a gRPC status name and a MIP error
code, so that every frontend maps them the same way.
"""

from __future__ import annotations

import enum

__all__ = [
    "ErrorCode",
    "MipError",
    "NotAvailable",
    "ProtocolError",
    "FrameTooLarge",
    "TruncatedFrame",
    "BadMagic",
    "UnsupportedVersion",
    "UnknownKind",
    "BadSubtype",
    "UnknownFrameType",
    "UnknownMessageKind",
    "InconsistentCounts",
    "InvalidValue",
    "UnknownValueType",
    "ServingError",
    "ModelNotFound",
    "ModelNotReady",
    "InvalidInput",
    "QueueFull",
    "DeadlineExceeded",
    "Cancelled",
    "InternalError",
    "RemoteError",
    "Unauthenticated",
    "TooManyAuthFailures",
]


class ErrorCode(enum.IntEnum):
    """MIP error codes, carried in the subtype of an ERROR frame (kind 0)."""

    PROTOCOL = 0  #: unsupported protocol version
    SUBTYPE = 1  #: the frame is not a request
    METHOD = 2  #: unknown kind, or a kind this peer does not serve
    MEMORY = 3  #: too large for the configured limits, or out of memory
    SHAPE = 4  #: inconsistent batch: counts, sizes or shapes do not agree
    INTERNAL = 5  #: the server failed while serving a valid request


class MipError(Exception):
    """Base class of every error raised by this package."""


class ProtocolError(MipError, ValueError):
    """The bytes received do not form a valid frame.

    Attributes:
        offset: octet offset, from the start of the frame, where the problem was
            found (``None`` when it does not apply).
        error_code: the MIP :class:`ErrorCode` a server should answer with.
    """

    error_code: ErrorCode = ErrorCode.PROTOCOL

    def __init__(self, message: str, offset: int | None = None):
        if offset is not None:
            message = f"{message} (at offset {offset})"
        super().__init__(message)
        self.offset = offset


class FrameTooLarge(ProtocolError):
    """A declared size exceeds the configured maximum."""

    error_code = ErrorCode.MEMORY


class TruncatedFrame(ProtocolError):
    """A declared size runs past the end of the octets present."""

    error_code = ErrorCode.SHAPE


class BadMagic(ProtocolError):
    """An MSIP header does not start with ``b"MSIP"``."""


class UnsupportedVersion(ProtocolError):
    """The version field names a protocol version this codec does not speak."""

    error_code = ErrorCode.PROTOCOL


class UnknownKind(ProtocolError):
    """The MIP kind is not one of ERROR, PING, INFERENCE or ROUTED INFERENCE."""

    error_code = ErrorCode.METHOD


class BadSubtype(ProtocolError):
    """The MIP subtype is neither REQUEST nor RESPONSE (or not valid for the kind)."""

    error_code = ErrorCode.SUBTYPE


class UnknownFrameType(ProtocolError):
    """The MSIP frame type is not one of the ten defined types."""


class UnknownMessageKind(ProtocolError):
    """The MSIP msg_kind is not one of the five defined kinds."""


class InconsistentCounts(ProtocolError):
    """Counts and sizes inside a frame contradict each other (e.g. trailing octets)."""

    error_code = ErrorCode.SHAPE


class InvalidValue(ProtocolError):
    """A value's content is malformed (bad UTF-8, bad tensor header, bad dtype, ...)."""

    error_code = ErrorCode.SHAPE


class UnknownValueType(ProtocolError):
    """A TLV type the protocol reserves (0)."""

    error_code = ErrorCode.SHAPE


class ServingError(MipError):
    """A well-formed request that could not be served.

    Attributes:
        http_status: the HTTP status a REST frontend answers with.
        grpc_status: the name of the ``grpc.StatusCode`` a gRPC frontend answers with.
        error_code: the MIP :class:`ErrorCode` a MIP frontend answers with.
    """

    http_status: int = 500
    grpc_status: str = "INTERNAL"
    error_code: ErrorCode = ErrorCode.INTERNAL


class ModelNotFound(ServingError):
    """No model (or version) of that name is in the repository."""

    http_status = 404
    grpc_status = "NOT_FOUND"
    error_code = ErrorCode.METHOD


class ModelNotReady(ServingError):
    """The model exists but is not loaded or is still warming up."""

    http_status = 503
    grpc_status = "UNAVAILABLE"
    error_code = ErrorCode.INTERNAL


class InvalidInput(ServingError):
    """Inputs do not match the model: names, datatypes, shapes or batch size."""

    http_status = 400
    grpc_status = "INVALID_ARGUMENT"
    error_code = ErrorCode.SHAPE


class QueueFull(ServingError):
    """The model's batch queue is at its configured bound."""

    http_status = 503
    grpc_status = "RESOURCE_EXHAUSTED"
    error_code = ErrorCode.MEMORY


class DeadlineExceeded(ServingError):
    """The request's deadline passed before it could be served."""

    http_status = 504
    grpc_status = "DEADLINE_EXCEEDED"
    error_code = ErrorCode.INTERNAL


class Cancelled(ServingError):
    """The request was cancelled by its client."""

    http_status = 499
    grpc_status = "CANCELLED"
    error_code = ErrorCode.INTERNAL


class InternalError(ServingError):
    """The model or the server failed while serving a valid request."""


class Unauthenticated(ServingError):
    """The request needs credentials (an API key or a token) and brought none that verify."""

    http_status = 401
    grpc_status = "UNAUTHENTICATED"
    error_code = ErrorCode.METHOD


class TooManyAuthFailures(ServingError):
    """The client's address failed to authenticate too often: it is refused, credentials
    unexamined, for ``retry_after`` seconds."""

    http_status = 429
    grpc_status = "RESOURCE_EXHAUSTED"
    error_code = ErrorCode.METHOD

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class NotAvailable(MipError, RuntimeError):
    """This installation cannot provide what was asked for: an optional package or a run-time
    library is missing, or the package was built without the feature. The message names what
    to install."""


class RemoteError(MipError):
    """A peer answered with a MIP ERROR frame.

    Attributes:
        error_code: the :class:`ErrorCode` the peer sent.
        detail: what the peer said about it (the text an ERROR frame may carry), or None.
    """

    def __init__(self, error_code: int, detail: str | None = None):
        try:
            code = ErrorCode(error_code)
            name = code.name
        except ValueError:
            code = error_code
            name = str(error_code)
        said = f": {detail}" if detail else ""
        super().__init__(f"peer answered with MIP error {name} ({error_code}){said}")
        self.error_code = code
        self.detail = detail
