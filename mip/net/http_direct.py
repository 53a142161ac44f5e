"""Requests an HTTP/1.1 listener answers without ASGI: the app's hot endpoints, called
straight from the parser's callbacks.

An app that has a method ``direct(method, path)`` is asked, once a request's headers are
complete, whether it answers that request directly; it gives back ``None`` (ASGI answers
it, as every other request) or a :class:`DirectEndpoint` and the path's parameters. The
request then takes the place of uvicorn's request cycle on its connection as a
:class:`DirectCycle`: its body is collected into one buffer by
:class:`~mip.net.http_body.Body` (its limits, ``Content-Length`` or chunked,
``Content-Encoding``), ``Expect: 100-continue`` is answered as uvicorn answers it, and once
the body is complete the endpoint's call gives a future of the reply, whose callback writes
it to the transport: no ASGI messages, no task a request. Keep-alive, pipelining, the
``Date`` header, graceful shutdown and backpressure stay uvicorn's and
:mod:`mip.net.http_protocol`'s; a client that disconnects has its request's future
cancelled (the request leaves the batch queue).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from mip.errors import Cancelled
from mip.net.http_body import Body, Octets
from mip.net.http_router import Reply, error_response

if TYPE_CHECKING:
    from mip.net.http_protocol import LimitedHttpProtocol

__all__ = ["DirectCall", "DirectCycle", "DirectEndpoint"]

#: replies from this many octets on are written as they are (scatter-gather), not joined
_JOIN_BELOW = 64 << 10
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: what uvicorn answers a request whose application stopped without answering
_INTERNAL_ERROR: Reply = (500, [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", b"21")], [b"Internal Server Error"])


class DirectCall(Protocol):
    """One request of a :class:`DirectEndpoint`, from its headers to its reply."""

    def body(self) -> Body:
        """The reader of its body (raises what a ``Content-Length`` is refused for)."""

    def answer(self, body: Octets) -> asyncio.Future:
        """A future of the :data:`~mip.net.http_router.Reply` to the whole ``body``
        (cancelled when the client leaves); raises what the request is refused for."""

    def failed(self, exc: BaseException) -> Reply | None:
        """The reply to the request ended by ``exc`` (raised by the other methods or the
        body's reader, or set on the future); ``None`` when there is nobody to answer."""


class DirectEndpoint(Protocol):
    """What answers a kind of request directly."""

    def open(self, params: dict[str, str], headers: list[tuple[bytes, bytes]],
             client: tuple[str, int] | None) -> DirectCall | Reply:
        """The call of a request (path parameters, headers with lowercase names, the
        client's host and port) whose turn on its connection has come, or the reply that
        refuses it at once."""


class DirectCycle:
    """One request answered directly, in the place of uvicorn's ``RequestResponseCycle``
    on its connection (``protocol.cycle``, and its pipeline while requests before it are
    answered), with the attributes the protocol reads of one: ``response_complete``,
    ``keep_alive``, ``disconnected``.

    Its turn comes (:meth:`start`) when the requests before it on the connection are
    answered; octets of its body that come before are kept (reading pauses past uvicorn's
    high-water mark). It is in ``server_state.tasks`` while it is answered, so that a
    graceful shutdown waits for it and, past its timeout, cancels it (:meth:`cancel`).
    """

    __slots__ = ("protocol", "endpoint", "path", "params", "headers", "keep_alive",
                 "expect_100", "response_complete", "disconnected", "call", "body", "early",
                 "early_size", "ended", "work")

    def __init__(self, protocol: LimitedHttpProtocol, endpoint: DirectEndpoint, path: str,
                 params: dict[str, str], headers: list[tuple[bytes, bytes]],
                 keep_alive: bool, expect_100: bool):
        self.protocol = protocol
        self.endpoint = endpoint
        self.path = path
        self.params = params
        self.headers = headers
        self.keep_alive = keep_alive
        self.expect_100 = expect_100
        self.response_complete = False
        self.disconnected = False
        self.call: DirectCall | None = None
        self.body: Body | None = None  # from its start until it is complete
        self.early: list[bytes] = []  # octets of the body that came before its start
        self.early_size = 0
        self.ended = False  # all of the body came
        self.work: asyncio.Future | None = None

    # -- the connection's events -------------------------------------------------------
    def start(self) -> None:
        """Its turn: open the call, and read or take the body."""
        protocol = self.protocol
        if self.disconnected or protocol.transport.is_closing():
            return
        protocol.direct_cycle = self
        protocol.tasks.add(self)  # type: ignore[arg-type]  # a task to a graceful shutdown
        try:
            opened = self.endpoint.open(self.params, self.headers, protocol.client)
        except Exception as exc:  # a bug: answered 500, as uvicorn would
            self.reply(error_response(exc, (), f"POST {self.path}"))
            return
        if isinstance(opened, tuple):
            self.reply(opened)
            return
        self.call = call = opened
        try:
            body = call.body()
            if self.expect_100:
                protocol.transport.write(_CONTINUE)
            for chunk in self.early:
                body.feed(chunk)
        except Exception as exc:
            self.reply(call.failed(exc))
            return
        self.early = []
        self.body = body
        if self.ended:
            self.finish()
        else:
            protocol.flow.resume_reading()  # as uvicorn does when its application reads

    def take(self, chunk: bytes) -> None:
        """Octets of the body."""
        if self.response_complete:
            return  # answered early (413): the rest is read and dropped, as uvicorn does
        body = self.body
        if body is None:
            self.early.append(chunk)
            self.early_size += len(chunk)
            if self.early_size > HIGH_WATER_LIMIT:
                self.protocol.flow.pause_reading()
            return
        try:
            body.feed(chunk)
        except Exception as exc:
            self.reply(self.call.failed(exc))  # type: ignore[union-attr]  # set with body

    def end(self) -> None:
        """All of the body came."""
        self.ended = True
        if self.body is not None and not self.response_complete:
            self.finish()

    def finish(self) -> None:
        call = self.call
        assert call is not None and self.body is not None
        body, self.body = self.body, None
        try:
            work = call.answer(body.finish())
        except Exception as exc:
            self.reply(call.failed(exc))
            return
        self.work = work
        work.add_done_callback(self.answered)

    def answered(self, work: asyncio.Future) -> None:
        self.work = None
        if work.cancelled():
            return  # its client left, or the server stopped it (see lost, cancel)
        exc = work.exception()
        self.reply(work.result() if exc is None else self.call.failed(exc))  # type: ignore[union-attr]

    def lost(self) -> None:
        """The connection is gone while it is answered."""
        self.disconnected = True
        self.protocol.tasks.discard(self)
        self.body = None  # (the memory it was received into goes back now)
        work = self.work
        if work is not None:
            work.cancel()  # the request leaves the batch queue
        elif self.call is not None and not self.response_complete:
            self.call.failed(Cancelled("the client disconnected"))  # recorded, not answered

    def cancel(self, msg: Any = None) -> bool:
        """Stop it (a graceful shutdown past its timeout): answered 500 and the connection
        closed, as uvicorn answers an application it cancels."""
        if self.response_complete or self.disconnected:
            return False
        work, self.work = self.work, None
        if work is not None:
            work.cancel()
        self.keep_alive = False
        self.reply(_INTERNAL_ERROR)
        return True

    # -- the reply ---------------------------------------------------------------------
    def reply(self, reply: Reply | None) -> None:
        """Write ``reply`` (``None``: nobody to answer; the connection is ended as uvicorn
        ends one whose application did not answer), then go on with the connection."""
        protocol = self.protocol
        protocol.tasks.discard(self)
        if protocol.direct_cycle is self:
            protocol.direct_cycle = None
        if self.disconnected or self.response_complete:
            return
        if reply is None:  # uvicorn's answer to an application that did not answer
            reply, self.keep_alive = _INTERNAL_ERROR, False
        transport = protocol.transport
        if not transport.is_closing():
            status, headers, parts = reply
            lines = [STATUS_LINE[status], _defaults(protocol.server_state.default_headers)]
            for name, value in headers:
                lines += (name, b": ", value, b"\r\n")
            if not self.keep_alive:
                lines.append(b"connection: close\r\n")
            lines.append(b"\r\n")
            if len(parts) == 1 and len(parts[0]) < _JOIN_BELOW:
                lines.append(parts[0])
                transport.write(b"".join(lines))
            else:
                transport.writelines([b"".join(lines), *parts])
        self.response_complete = True
        if not self.keep_alive:
            transport.close()
        protocol.on_response_complete()


#: uvicorn's default headers (a list it replaces once a second, for ``Date``), and their lines
_default_lines: list[Any] = [None, b""]


def _defaults(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The header lines of uvicorn's default headers."""
    if _default_lines[0] is not headers:
        _default_lines[:] = headers, b"".join(b"%s: %s\r\n" % header for header in headers)
    return _default_lines[1]
