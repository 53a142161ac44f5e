"""One exception tree for the whole toolkit.

``ProtocolError`` and its subclasses mean *the bytes on the wire are wrong*: they
carry the offset (in octets from the start of the frame or stream) where the
problem was found and the MIP error code a server should answer with.

``ServingError`` and its subclasses mean *the request was well formed but could
not be served*: they carry an HTTP status, a :class:`GrpcStatus` and a MIP error
code, so that every frontend (and both gRPC transports) maps them the same way.

The others say what failed outside a request: a model's configuration
(``ConfigError``), a device or package this installation lacks (``NotAvailable``,
``DeviceUnavailable``), an HTTP/2 connection (``H2Error``), a gRPC call that ended
with a status (``RpcError``), a peer's MIP ERROR frame (``RemoteError``).
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "ErrorCode",
    "GrpcStatus",
    "MipError",
    "NotAvailable",
    "DeviceUnavailable",
    "ConfigError",
    "QueueInUse",
    "RpcError",
    "BrokerError",
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
    "H2Error",
    "ServingError",
    "ModelNotFound",
    "ModelNotReady",
    "InvalidInput",
    "ModelLoadError",
    "QueueFull",
    "TooLarge",
    "DeadlineExceeded",
    "Cancelled",
    "InternalError",
    "RemoteError",
    "Unauthenticated",
    "AuthError",
    "InvalidCredentials",
    "TooManyAuthFailures",
    "Unsupported",
    "RegionNotFound",
    "RegionExists",
    "TooManyRegions",
    "ApiError",
    "NoSuchEndpoint",
    "MethodNotAllowed",
]


class ErrorCode(enum.IntEnum):
    """MIP error codes, carried in the subtype of an ERROR frame (kind 0)."""

    PROTOCOL = 0  #: unsupported protocol version
    SUBTYPE = 1  #: the frame is not a request
    METHOD = 2  #: unknown kind, or a kind this peer does not serve
    MEMORY = 3  #: too large for the configured limits, or out of memory
    SHAPE = 4  #: inconsistent batch: counts, sizes or shapes do not agree
    INTERNAL = 5  #: the server failed while serving a valid request


class GrpcStatus(enum.IntEnum):
    """gRPC status codes: the number in ``grpc-status``, the name of ``grpc.StatusCode``."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def of(cls, code) -> GrpcStatus:
        """The status ``code`` names: a :class:`GrpcStatus`, an int, a name or a
        ``grpc.StatusCode`` (whose value is ``(number, name)``)."""
        if isinstance(code, str):
            return cls[code]
        value = getattr(code, "value", code)
        if isinstance(value, tuple):
            value = value[0]
        return cls(int(value))


class MipError(Exception):
    """Base class of every error raised by this package."""

    def __init_subclass__(cls, *, http: int | None = None, grpc: GrpcStatus | None = None,
                          mip: ErrorCode | None = None, **kwargs: Any) -> None:
        """A subclass states its codes in its header, inheriting each one it leaves out:
        ``class X(ServingError, http=404, grpc=GrpcStatus.NOT_FOUND, mip=ErrorCode.METHOD)``
        sets ``X.http_status``, ``X.grpc_status`` and ``X.error_code``."""
        super().__init_subclass__(**kwargs)
        for attr, code in (("http_status", http), ("grpc_status", grpc), ("error_code", mip)):
            if code is not None:
                setattr(cls, attr, code)


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


class FrameTooLarge(ProtocolError, mip=ErrorCode.MEMORY):
    """A declared size exceeds the configured maximum."""


class TruncatedFrame(ProtocolError, mip=ErrorCode.SHAPE):
    """A declared size runs past the end of the octets present."""


class BadMagic(ProtocolError):
    """An MSIP header does not start with ``b"MSIP"``."""


class UnsupportedVersion(ProtocolError, mip=ErrorCode.PROTOCOL):
    """The version field names a protocol version this codec does not speak."""


class UnknownKind(ProtocolError, mip=ErrorCode.METHOD):
    """The MIP kind is not one of ERROR, PING, INFERENCE or ROUTED INFERENCE."""


class BadSubtype(ProtocolError, mip=ErrorCode.SUBTYPE):
    """The MIP subtype is neither REQUEST nor RESPONSE (or not valid for the kind)."""


class UnknownFrameType(ProtocolError):
    """The MSIP frame type is not one of the ten defined types."""


class UnknownMessageKind(ProtocolError):
    """The MSIP msg_kind is not one of the five defined kinds."""


class InconsistentCounts(ProtocolError, mip=ErrorCode.SHAPE):
    """Counts and sizes inside a frame contradict each other (e.g. trailing octets)."""


class InvalidValue(ProtocolError, mip=ErrorCode.SHAPE):
    """A value's content is malformed (bad UTF-8, bad tensor header, bad dtype, ...)."""


class UnknownValueType(ProtocolError, mip=ErrorCode.SHAPE):
    """A TLV type the protocol reserves (0)."""


class H2Error(ProtocolError):
    """The HTTP/2 connection failed (a protocol violation by the peer, or a library error)."""


class ServingError(MipError):
    """A well-formed request that could not be served.

    Attributes:
        http_status: the HTTP status a REST frontend answers with.
        grpc_status: the :class:`GrpcStatus` a gRPC frontend answers with.
        error_code: the MIP :class:`ErrorCode` a MIP frontend answers with.
    """

    http_status: int = 500
    grpc_status: GrpcStatus = GrpcStatus.INTERNAL
    error_code: ErrorCode = ErrorCode.INTERNAL


class ModelNotFound(ServingError, http=404, grpc=GrpcStatus.NOT_FOUND, mip=ErrorCode.METHOD):
    """No model (or version) of that name is in the repository."""


class ModelNotReady(ServingError, http=503, grpc=GrpcStatus.UNAVAILABLE, mip=ErrorCode.INTERNAL):
    """The model exists but is not loaded or is still warming up."""


class InvalidInput(ServingError, http=400, grpc=GrpcStatus.INVALID_ARGUMENT, mip=ErrorCode.SHAPE):
    """Inputs do not match the model: names, datatypes, shapes or batch size."""


class ModelLoadError(ServingError, http=400, grpc=GrpcStatus.INVALID_ARGUMENT):
    """A model could not be loaded; the message carries the reason of every version."""


class TooLarge(ServingError, http=413, grpc=GrpcStatus.RESOURCE_EXHAUSTED, mip=ErrorCode.MEMORY):
    """A request or reply over a configured size limit; the message names the setting."""


class QueueFull(ServingError, http=503, grpc=GrpcStatus.RESOURCE_EXHAUSTED, mip=ErrorCode.MEMORY):
    """The model's batch queue is at its configured bound."""


class DeadlineExceeded(ServingError, http=504, grpc=GrpcStatus.DEADLINE_EXCEEDED, mip=ErrorCode.INTERNAL):
    """The request's deadline passed before it could be served."""


class Cancelled(ServingError, http=499, grpc=GrpcStatus.CANCELLED, mip=ErrorCode.INTERNAL):
    """The request was cancelled by its client."""


class InternalError(ServingError):
    """The model or the server failed while serving a valid request."""


class Unauthenticated(ServingError, http=401, grpc=GrpcStatus.UNAUTHENTICATED, mip=ErrorCode.METHOD):
    """The request needs credentials (an API key or a token) and brought none that verify."""


class AuthError(Unauthenticated):
    """Credentials missing or malformed (answered as :class:`Unauthenticated`, not counted
    against the client's failure budget)."""


class InvalidCredentials(AuthError):
    """Credentials were presented and did not verify (a failed authentication: counted
    against the peer's failure budget and logged)."""


class TooManyAuthFailures(ServingError, http=429, grpc=GrpcStatus.RESOURCE_EXHAUSTED, mip=ErrorCode.METHOD):
    """The client's address failed to authenticate too often: it is refused, credentials
    unexamined, for ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Unsupported(ServingError, http=400, grpc=GrpcStatus.UNIMPLEMENTED, mip=ErrorCode.METHOD):
    """A call of an extension this server does not implement (CUDA shared memory)."""


class RegionNotFound(ServingError, http=400, grpc=GrpcStatus.NOT_FOUND, mip=ErrorCode.METHOD):
    """No shared memory region of that name is registered (answered 400, as Triton does)."""


class RegionExists(ServingError, http=400, grpc=GrpcStatus.ALREADY_EXISTS, mip=ErrorCode.METHOD):
    """A shared memory region of that name is already registered."""


class TooManyRegions(ServingError, http=400, grpc=GrpcStatus.RESOURCE_EXHAUSTED, mip=ErrorCode.MEMORY):
    """A shared memory registration past the server's region or octet limit (the message
    names the setting)."""


class NoSuchEndpoint(ServingError):
    """An HTTP request for a path no endpoint serves."""

    http_status = 404
    grpc_status = GrpcStatus.UNIMPLEMENTED
    error_code = ErrorCode.METHOD


class MethodNotAllowed(NoSuchEndpoint):
    """An HTTP request for an endpoint's path with a method the endpoint does not take."""

    http_status = 405


class ApiError(ServingError):
    """An error of the ``/v1`` API, answered as ``{"error": {"code", "message",
    "details"?}}`` with HTTP ``status``; its gRPC and MIP codes are those of the tree's error
    for that status (:class:`InternalError`'s for another).

    Attributes:
        code: the ``error.code`` string, e.g. ``"invalid_request"``.
        details: the ``error.details`` object, or ``None``.
        headers: extra response headers, or ``None``.
    """

    def __init__(self, status: int, code: str, message: str, details: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        kind = _BY_HTTP_STATUS.get(status, InternalError)
        self.http_status, self.grpc_status, self.error_code = (
            status, kind.grpc_status, kind.error_code)
        self.code, self.details, self.headers = code, details, headers


_BY_HTTP_STATUS: dict[int, type[ServingError]] = {
    cls.http_status: cls for cls in (InvalidInput, Unauthenticated, ModelNotFound, TooLarge,
                                     TooManyAuthFailures, ModelNotReady, DeadlineExceeded)}


class NotAvailable(MipError, RuntimeError):
    """This installation cannot provide what was asked for: an optional package or a run-time
    library is missing, or the package was built without the feature. The message names what
    to install."""


class DeviceUnavailable(NotAvailable):
    """The configured device cannot be used by this ONNX Runtime installation."""


class ConfigError(MipError, ValueError):
    """A model configuration (``config.json``, ``config.pbtxt``, a load's config) that
    cannot be used; the message says which key and why."""


class QueueInUse(MipError, OSError):
    """Another live process holds the job queue this server was to own."""


class BrokerError(MipError):
    """An MSIP broker answered with an ERROR frame (``reason``: its UTF-8 text) and closed."""

    def __init__(self, reason: str):
        super().__init__(f"broker error: {reason}")
        self.reason = reason


class RpcError(MipError):
    """A gRPC call ended with ``code`` (a :class:`GrpcStatus`), ``details`` and
    ``trailers`` (trailing metadata, ``[(name, value)]``): raised by a handler (or its
    ``context.abort``) to end the call so, and by the client with the server's status."""

    def __init__(self, code, details: str = "", trailers=()):
        super().__init__(details)
        self.code: GrpcStatus | int
        self.grpc_status: GrpcStatus | int
        try:
            self.code = self.grpc_status = GrpcStatus.of(code)
        except ValueError:  # a number this table does not name: kept as the peer sent it
            self.code = self.grpc_status = int(code)
        self.details = details
        self.trailers = tuple(trailers)


class RemoteError(MipError):
    """A peer answered with a MIP ERROR frame.

    Attributes:
        error_code: the :class:`ErrorCode` the peer sent.
        detail: what the peer said about it (the text an ERROR frame may carry), or None.
    """

    def __init__(self, error_code: int, detail: str | None = None):
        code: ErrorCode | int
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
