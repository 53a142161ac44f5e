"""uvicorn's httptools protocol with the limits a public HTTP/1.1 listener needs.

What it adds to ``uvicorn.protocols.http.httptools_impl.HttpToolsProtocol``:

* a header block must arrive within ``header_timeout`` seconds of its first octet, and a
  body within ``body_timeout`` seconds of the end of its headers (a peer sending one
  octet at a time cannot hold a connection); a fresh connection that sends nothing is
  closed after the keep-alive timeout, as an idle keep-alive connection is;
* backpressure: uvicorn resumes reading whenever the application awaits ``receive()``
  and after every response, whether or not the peer reads its replies, and parses every
  pipelined request of each read into its queue. A peer that pipelines requests and never
  reads piles up parsed requests and their replies without bound. Here, octets that come
  while a request of the connection is being answered are held unparsed (reading pauses
  until that request's reply is written), and reading stays paused while the replies not
  yet taken by the peer exceed ``max_pending_reply`` octets;
* ``max_connections`` per listener, closing the longest-idle connection to make room
  (503 when none is idle), and ``max_connections_per_peer`` per client address (503);
* requests the app answers directly (its ``direct(method, path)``, see
  :mod:`mip.net.http_direct`): no ASGI scope, messages or task for them. The plainest
  of them (a ``POST`` to a direct target, with a ``Content-Length``, whose head comes in
  one read: :func:`mip.protocol._h1.parse_head`) are not read by httptools at all: their
  head is read in one call and their body handed to the endpoint as it comes; every other
  request, and a head that comes in pieces, goes through httptools' callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mip.net.http_direct import DirectCycle, DirectEndpoint
from mip.net.http_router import error_body
from mip.net.peers import PeerCounts, longest_idle, sweep_timeouts
from mip.protocol._h1 import parse_head

log = logging.getLogger("mip.net.http")

_SLICE = 64 << 10  # octets parsed at a time when a read brings more
_TARGETS = 256  # POST targets whose routing a listener remembers
_TARGET_KEPT = 1024  # ... each of at most this many octets


@dataclass(frozen=True)
class HttpLimits:
    """The limits of one HTTP listener (sizes in octets, times in seconds, 0 = none)."""

    #: connections open at once; at the limit the longest-idle one is closed for a new one
    #: (503 when none is idle)
    max_connections: int = 1024
    #: connections open at once from one address (503 beyond)
    max_connections_per_peer: int = 256
    #: reply octets the peer has not taken before reading pauses
    max_pending_reply: int = 1 << 20
    #: a header block must be complete this long after its first octet (408)
    header_timeout: float = 10.0
    #: a body must be complete this long after its headers (the connection is closed)
    body_timeout: float = 60.0
    #: an idle connection, or a new one that sends nothing, is closed after this long
    idle_timeout: float = 5.0
    #: octets of a request's head (request line and header fields) before it is refused
    #: with 431 and the connection closed (0 = none)
    max_header_bytes: int = 64 << 10


#: the app's ``direct(method, path)``: what answers a request without ASGI, and the path's
#: parameters, or ``None``
Direct = Callable[[str, str], "tuple[DirectEndpoint, dict[str, str]] | None"]


class Listener:
    """What the connections of one HTTP listener share: limits, connection counts, and the
    app's ``direct`` (``None``: every request through ASGI)."""

    def __init__(self, limits: HttpLimits, direct: Direct | None = None):
        self.limits = limits
        self.direct = direct
        #: the raw target of a POST -> its path and what ``direct`` said of it
        self.targets: dict[bytes, tuple[str, Any]] = {}
        self.header_late = (f"header block not complete {limits.header_timeout:g}s after "
                            "its first octet")
        self.header_large = (f"request header block larger than {limits.max_header_bytes} "
                             "octets (--http-max-header-size)")
        self.body_late = f"request body not complete {limits.body_timeout:g}s after its headers"
        self.connections: set[LimitedHttpProtocol] = set()
        self.per_peer = PeerCounts()
        self.linger = 1.0  # seconds a refused connection drains before it closes
        self._sweeper: asyncio.Task | None = None

    def protocol_class(self) -> type:
        """A protocol class for ``uvicorn.Config(http=...)`` bound to this listener."""
        return type("HttpProtocol", (LimitedHttpProtocol,), {"listener": self})

    def start(self) -> None:
        limits = self.limits
        timeouts = [t for t in (limits.header_timeout, limits.body_timeout,
                                limits.idle_timeout) if t]
        if timeouts:
            self._sweeper = asyncio.ensure_future(sweep_timeouts(
                self.connections, max(0.02, min(1.0, min(timeouts) / 4))))

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def admit(self, conn: "LimitedHttpProtocol") -> str:
        """Why `conn` is refused ("" = admitted and counted)."""
        limits = self.limits
        host = conn.peer
        if self.per_peer.full(host, limits.max_connections_per_peer):
            return (f"too many connections from this address (max_connections_per_peer "
                    f"{limits.max_connections_per_peer})")
        if len(self.connections) >= limits.max_connections:
            oldest = longest_idle(self.connections)
            if oldest is None:
                return (f"too many connections (max_connections {limits.max_connections}, "
                        "none idle)")
            log.info("closing the longest-idle HTTP connection (from %s) to make room",
                     oldest.peer)
            self.forget(oldest)
            oldest.transport.close()
        self.connections.add(conn)
        self.per_peer.add(host)
        return ""

    def forget(self, conn: "LimitedHttpProtocol") -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.per_peer.remove(conn.peer)


class _Flow(FlowControl):
    """uvicorn's flow control, except that reading resumes only when the connection may
    read: nothing held back and the peer taking its replies."""

    def __init__(self, transport, protocol: "LimitedHttpProtocol"):
        super().__init__(transport)
        self.protocol = protocol

    def resume_reading(self) -> None:
        if self.protocol.held:
            self.protocol.feed_held_soon()  # the application wants more of its request
        elif self.read_paused and not self.write_paused:
            self.read_paused = False
            self._transport.resume_reading()


class LimitedHttpProtocol(HttpToolsProtocol):
    listener: Listener  # set on the class made by Listener.protocol_class()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held = bytearray()  # octets read while a request is answered, not parsed yet
        self.in_message = False  # a request's octets have started and not all came
        self.headers_done = False  # ... and its header block is complete
        self.feed_due = False
        self.deadline: float | None = None  # of the header block or body arriving
        self.deadline_what = ""
        self.last_activity = self.loop.time()
        self.peer: str | None = None
        self.refused = False
        self.next_due = False  # a response completed while the peer was not reading
        self.direct_cycle: DirectCycle | None = None  # the direct request being answered
        self.idle_since: float | None = None  # waiting for a request since (keep-alive)
        self.head_octets = 0  # of the head being received (see _parse)
        self.begun = 0  # requests whose first octet was parsed
        self.body_left = 0  # octets still to come of the body of a request read by parse_head
        self.heads = self.listener.direct is not None and self.limit_concurrency is None

    # -- connection ------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.flow = _Flow(transport, self)
        self.last_activity = self.loop.time()
        self.peer = self.client[0] if self.client else None
        reason = self.listener.admit(self)
        if reason:
            log.warning("refusing an HTTP connection from %s: %s", self.peer, reason)
            self._refuse(reason)
            return
        transport.set_write_buffer_limits(high=self.listener.limits.max_pending_reply)

    def connection_lost(self, exc) -> None:
        self.listener.forget(self)
        self.held = bytearray()
        if isinstance(self.cycle, DirectCycle):
            self.cycle = None  # uvicorn's handling is for its own cycles
        if self.direct_cycle is not None:
            self.direct_cycle.lost()
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        super().connection_lost(exc)

    def _refuse(self, reason: str) -> None:
        """Answer 503 and close, letting the reply reach the peer before the socket goes."""
        self.refused = True
        self._write_error(b"503 Service Unavailable", reason)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(self.listener.linger, self.transport.close)

    @property
    def idle(self) -> bool:
        """No request in progress and none started: closing it loses nothing."""
        cycle = self.cycle
        return (not self.in_message and not self.held and not self.pipeline
                and (cycle is None or cycle.response_complete)
                and not self.transport.is_closing())

    def check_timeouts(self, now: float) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        deadline = self.deadline
        if deadline is not None and now > deadline and not self.flow.read_paused:
            log.info("closing an HTTP connection from %s: %s", self.peer, self.deadline_what)
            cycle = self.cycle
            if self.deadline_what.startswith("header") and (
                    cycle is None or cycle.response_complete):
                self._send_408(self.deadline_what)
            else:
                self.transport.close()
        elif (self.idle and self.listener.limits.idle_timeout
              and now - self.last_activity > self.listener.limits.idle_timeout):
            self.transport.close()

    def _send_408(self, reason: str) -> None:
        self._write_error(b"408 Request Timeout", reason)
        self.transport.close()

    def _write_error(self, status: bytes, reason: str) -> None:
        """Write an error reply (``status``: code and reason phrase) that ends the
        connection, straight to the transport: no request of it is being answered."""
        body = error_body(reason)
        self.transport.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, len(body), body))

    # -- input -----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        self.last_activity = self.loop.time()
        if self.held or self._answering():
            # Pipelined octets: parsed once the replies before them are written.
            self.held += data
            self.flow.pause_reading()
            return
        self.idle_since = None  # (uvicorn's _unset_keepalive_if_required)
        self._feed(data)

    def _parse(self, data: bytes) -> None:
        """Parse `data`, refusing a head that grows past ``max_header_bytes`` (httptools
        keeps a header field or target that has not ended in memory, however long).

        The head's octets are counted a read at a time: a read that comes while the head
        is incomplete, or that starts a request whose head it does not complete, is all
        head. The share of a read that ends one request and starts the next is not
        counted, so a head is refused at most one read (64K) late and never early."""
        in_head = self.in_message and not self.headers_done
        between = not self.in_message
        begun = self.begun
        super().data_received(data)
        if not self.in_message or self.headers_done or self.transport.is_closing():
            return
        if (in_head and self.begun == begun) or (between and self.begun == begun + 1):
            self.head_octets += len(data)
            limit = self.listener.limits.max_header_bytes
            if limit and self.head_octets > limit:
                log.info("closing an HTTP connection from %s: %s", self.peer,
                         self.listener.header_large)
                cycle = self.cycle
                if cycle is None or cycle.response_complete:
                    self._write_error(b"431 Request Header Fields Too Large",
                                      self.listener.header_large)
                self.transport.close()

    def _feed(self, data: bytes) -> None:
        """Parse `data` (its octets may be parsed now: see _answering): the heads
        :func:`parse_head` takes here, the rest by httptools a slice at a time; what follows
        a complete request that is being answered is held (one read can hold thousands of
        small pipelined requests)."""
        position, size = 0, len(data)
        while True:
            if self.body_left:
                position = self._fast_body(data, position)
            elif self.heads and not self.in_message and (
                    head := parse_head(data, position)) is not None and (
                    known := self.listener.targets.get(head[1]) or self._route(head[1])
                    )[1] is not None:
                position = self._fast_request(data, head, known)
                if position < size and self.transport.is_closing():
                    return
            else:
                end = position + _SLICE
                self._parse(data[position:end] if position or end < size else data)
                position = end
                if self.parser is None or self.transport.is_closing():
                    return
            if position >= size:
                return
            if self._answering():
                self.held += memoryview(data)[position:]
                self.flow.pause_reading()
                return

    def _fast_request(self, data: bytes, head: tuple, known: tuple[str, Any]) -> int:
        """Answer the request to a direct target whose head parse_head read (no request
        of the connection is being answered): its cycle, started with the part of its body
        in `data`; where the next request starts."""
        end, _, length, headers = head
        path, (endpoint, params) = known
        self.cycle = cycle = DirectCycle(  # type: ignore[assignment]  # uvicorn's cycle's place
            self, endpoint, path, params, headers, True, False)
        left = end + length - len(data)
        if left <= 0:  # all of it: the body is given to the cycle as it starts
            if length:
                cycle.early.append(data[end:end + length])
            cycle.ended = True
            cycle.start()
            return end + length
        self.in_message = self.headers_done = True
        cycle.start()
        if end < len(data):
            cycle.take(data[end:])
        self.body_left = left
        self._body_due()
        return len(data)

    def _body_due(self) -> None:
        """A request's head is complete: its body must come within ``body_timeout``."""
        timeout = self.listener.limits.body_timeout
        if timeout:
            self.deadline = self.loop.time() + timeout
            self.deadline_what = self.listener.body_late
        else:
            self.deadline = None

    def _fast_body(self, data: bytes, position: int) -> int:
        """More of the body of a request read by parse_head: where what follows it
        starts."""
        cycle: Any = self.cycle
        left, size = self.body_left, len(data)
        if position + left > size:
            cycle.take(data[position:] if position else data)
            self.body_left = left - (size - position)
            return size
        end = position + left
        cycle.take(data[position:end] if position or end < size else data)
        self.body_left = 0
        self.in_message = False
        self.deadline = None
        cycle.end()
        return end

    def _answering(self) -> bool:
        """Whether octets that come now must wait: requests read before them are not
        answered yet, or the peer leaves more than ``max_pending_reply`` octets of
        replies untaken. The rest of the body of the request being answered is wanted."""
        if self.pipeline or self.flow.write_paused:
            return True
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return False
        return not (self.in_message and self.headers_done)

    def feed_held_soon(self) -> None:
        if not self.feed_due:
            self.feed_due = True
            self.loop.call_soon(self._feed_held)

    def _feed_held(self) -> None:
        self.feed_due = False
        if not self.held or self._answering() or self.parser is None:
            return
        if self.transport.is_closing():
            self.held = bytearray()
            return
        data, self.held = bytes(self.held), bytearray()
        self._feed(data)
        if not self.held:
            self.flow.resume_reading()

    # -- parser callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        # uvicorn's per-request state without its ASGI scope, which a direct request does
        # not need: the others get it once their headers are complete (_asgi_scope)
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.in_message = True
        self.headers_done = False
        self.head_octets = 0
        self.begun += 1
        listener = self.listener
        timeout = listener.limits.header_timeout
        if timeout:
            self.deadline = self.loop.time() + timeout
            self.deadline_what = listener.header_late

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self._body_due()
        direct = self.listener.direct
        if direct is None or self.parser.get_method() != b"POST" or not self._direct():
            self._asgi_scope()
            super().on_headers_complete()

    def _asgi_scope(self) -> None:
        """uvicorn's scope of the request whose headers just came (what its
        ``on_message_begin`` makes), with the target and headers read since."""
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.expect_100_continue = url, expect
        self.headers += headers  # the scope's list

    def _direct(self) -> bool:
        """Whether the app answers the request whose headers just came directly; if so it
        is this connection's cycle from now on (started, or queued behind the requests
        before it)."""
        if self.limit_concurrency is not None or self.parser.should_upgrade():
            return False
        path, found = self._route(self.url)
        if found is None:
            return False
        endpoint, params = found
        parser = self.parser
        cycle = DirectCycle(self, endpoint, path, params, self.headers,
                            parser.get_http_version() != "1.0" and parser.should_keep_alive(),
                            self.expect_100_continue)
        existing = self.cycle
        self.cycle = cycle  # type: ignore[assignment]  # in uvicorn's cycle's place
        if existing is None or existing.response_complete:
            cycle.start()
        else:
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, None))  # type: ignore[arg-type]
        return True

    def _route(self, url: bytes) -> tuple[str, Any]:
        """The path of the POST target `url` and what the app's ``direct`` says of it."""
        targets = self.listener.targets
        known = targets.get(url)
        if known is None:
            path = httptools.parse_url(url).path.decode("ascii")  # as uvicorn reads it
            if "%" in path:
                path = urllib.parse.unquote(path)
            path = self.root_path + path
            direct = self.listener.direct
            assert direct is not None  # (asked only of a listener that has one)
            known = (path, direct("POST", path))
            if len(url) <= _TARGET_KEPT:
                if len(targets) >= _TARGETS:
                    targets.clear()
                targets[url] = known
        return known

    def on_body(self, body: bytes) -> None:
        cycle: Any = self.cycle
        if type(cycle) is DirectCycle:
            cycle.take(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        self.deadline = None
        cycle: Any = self.cycle
        if type(cycle) is DirectCycle:
            cycle.end()
        else:
            super().on_message_complete()

    def _start_asgi_task(self, cycle, app) -> None:
        if app is None:  # a direct request whose turn came: started as a task would be
            self.loop.call_soon(cycle.start)
        else:
            super()._start_asgi_task(cycle, app)

    # -- output ------------------------------------------------------------------------
    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.idle_since = None  # (_unset_keepalive_if_required)
        self.last_activity = self.loop.time()
        if self.flow.write_paused:
            self.next_due = True  # resume_writing goes on once the peer takes its replies
            return
        self._next()

    def _next(self) -> None:
        """Start the next pipelined request, or parse what was held, or wait for more."""
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            if self.held and not self.pipeline:
                self.feed_held_soon()  # the rest of this request's body may be there
            return
        if self.held:
            self.feed_held_soon()
            return
        if self.flow.read_paused:
            self.flow.resume_reading()
        self.idle_since = self.last_activity
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self._keep_alive_due)

    # uvicorn arms a timer after each response and cancels it on the next octets; here one
    # timer a connection is re-armed when it fires early: the same timeout, without a
    # timer made and cancelled a request.
    def _unset_keepalive_if_required(self) -> None:
        self.idle_since = None

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task = None
        since = self.idle_since
        if since is None:
            return  # busy: armed again when it next waits
        left = since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_due)
        else:
            self.timeout_keep_alive_handler()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.flow.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.transport.is_closing():
            return
        if self.next_due:
            self.next_due = False
            self._next()
        else:
            self.flow.resume_reading()
