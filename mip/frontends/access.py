"""The access log: one record an inference request, whatever protocol carried it.

The data plane calls :meth:`AccessLog.request` when a request is answered, or refused
before it reached a model (frontends report those through :meth:`DataPlane.refused
<mip.frontends.dataplane.DataPlane.refused>`); the record goes to the ``mip.access``
logger at INFO, whose handler (see :mod:`mip.logs`) writes it as text or JSON. Its fields
(:data:`mip.logs.ACCESS_FIELDS`):

* ``protocol``: ``mip``, ``grpc``, ``http`` or ``jobs``;
* ``peer``: the client's ``HOST:PORT`` (MIP: its host; jobs: ``-``);
* ``model``, ``version``: as the request named them (the version that answered, when
  one did);
* ``status`` in the protocol's own terms: the HTTP status (``499`` when the client left
  first, as nginx writes it), the gRPC status name (``OK``, ``NOT_FOUND``, ...), the MIP
  error code name (``OK``, ``SHAPE``, ``METHOD``, ...), or for a job ``completed`` or its
  ``error.code`` (``invalid_input``, ...);
* ``latency_ms``: from the request's arrival at its frontend to its answer, milliseconds;
* ``request_id``: the client's (``X-Request-ID`` header, ``x-request-id`` gRPC metadata,
  else the KServe v2 request ``id``; a job's id); ``-`` when it gave none.

Names and ids the client chose are written with control characters and spaces escaped,
at most :data:`MAX_FIELD` characters, so a request cannot forge log lines.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mip.errors import Cancelled, ProtocolError, ServingError
from mip.jobs.worker import error_code
from mip.logs import ACCESS_LOGGER, ACCESS_MESSAGE, LineHandler

__all__ = ["MAX_FIELD", "AccessLog", "status"]

#: characters of a client-chosen field (model, version, request id) written, at most.
MAX_FIELD = 128
_SUCCESS = {"http": 200, "jobs": "completed"}
_CANCELLED = {"http": 499, "jobs": "cancelled"}
_INTERNAL = {"http": 500, "jobs": "internal_error"}


def status(protocol: str, failure: BaseException | None):
    """What ``protocol`` answered a request that ended with ``failure`` (``None``:
    success): an HTTP status (int) for ``http``, else a name."""
    if failure is None:
        return _SUCCESS.get(protocol, "OK")
    if isinstance(failure, (asyncio.CancelledError, Cancelled)):
        return _CANCELLED.get(protocol, "CANCELLED")
    if isinstance(failure, ServingError):
        if protocol == "http":
            return failure.http_status
        if protocol == "grpc":
            return failure.grpc_status.name
        if protocol == "jobs":
            return error_code(failure)  # the job's error.code
        return failure.error_code.name
    if isinstance(failure, ProtocolError) and protocol == "mip":
        return failure.error_code.name
    return _INTERNAL.get(protocol, "INTERNAL")


def _clean(value) -> str:
    """A client-chosen field as one token: ``-`` when empty, escaped when it holds
    spaces or unprintable characters, cut at :data:`MAX_FIELD` characters."""
    if value is None or value == "":
        return "-"
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_FIELD:
        text = text[:MAX_FIELD]
    if text.isprintable() and " " not in text:
        return text
    return text.encode("unicode_escape").decode("ascii").replace(" ", "\\x20")


def _peer(peer) -> str:
    """``HOST:PORT`` of a peer as frontends know it: a ``(host, port)`` tuple, grpc's
    ``ipv4:HOST:PORT`` / ``ipv6:[HOST]:PORT``, or a host."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    if isinstance(peer, str) and peer:
        if peer.startswith("ipv4:"):
            return peer[5:]
        if peer.startswith("ipv6:"):  # grpcio writes ipv6:%5B::1%5D:PORT
            return peer[5:].replace("%5B", "[").replace("%5D", "]")
        return _clean(peer)
    return "-"


#: what an access record has that no access line shows (formatters read them from the
#: record's __dict__, so they are set on each record)
_RECORD_DEFAULTS = {
    "pathname": "", "filename": "", "module": "", "lineno": 0, "funcName": None,
    "exc_info": None, "exc_text": None, "stack_info": None, "thread": None,
    "threadName": None, "process": None, "processName": None, "levelno": logging.INFO,
    "levelname": "INFO", "msg": ACCESS_MESSAGE,
}


class _AccessRecord(logging.LogRecord):
    """A ``LogRecord`` of an access line, built without the look-ups of the caller,
    thread and process that no access line shows."""

    def __init__(self, name: str, args: tuple):  # noqa: D107 (LogRecord's own is skipped)
        created = time.time()
        self.__dict__.update(_RECORD_DEFAULTS)
        self.name = name
        self.args = args
        self.created = created
        self.msecs = int((created - int(created)) * 1000) + 0.0
        self.relativeCreated = (created - logging._startTime) * 1000  # type: ignore[attr-defined]


class AccessLog:
    """Writes the access records of the requests a data plane answers.

    Args:
        logger: where records go (default: the ``mip.access`` logger).
    """

    __slots__ = ("logger", "_direct")

    def __init__(self, logger: logging.Logger | None = None):
        self.logger = logger = logger or logging.getLogger(ACCESS_LOGGER)
        # As mip serve sets it up (one LineHandler, no filters, not propagated), a line
        # goes straight to the handler: what logging would do with it, without the record.
        handlers = logger.handlers
        self._direct = None
        if (len(handlers) == 1 and isinstance(handlers[0], LineHandler)
                and hasattr(handlers[0].formatter, "access_line") and not logger.filters
                and not handlers[0].filters and not logger.propagate):
            self._direct = handlers[0]

    def request(self, protocol: str, peer, model, version, failure: BaseException | None,
                seconds: float, request_id) -> None:
        """Record one answered request (``failure``: ``None`` when it succeeded, else
        what it failed with; ``seconds``: from its arrival to its answer)."""
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        args = (protocol, _peer(peer), _clean(model), _clean(version),
                status(protocol, failure), seconds * 1e3, _clean(request_id))
        direct = self._direct
        if direct is not None and not logger.disabled:
            direct.access(args, logger.name)
        else:
            logger.handle(_AccessRecord(logger.name, args))
