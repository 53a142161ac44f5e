"""An asyncio MSIP broker, wire-compatible with the reference broker.

Faithful by default: a reference client sees the reference's behaviour, except for fixes no
client can break on (see docs/msip.md for the full list):

* TCP_NODELAY, and every frame or burst of frames leaves in one ``writelines`` call;
* EVENT frames carry COMPRESSED only when the payload data really is a zstd frame;
* bounded frames and topics, and a read timeout for a frame that started arriving, each
  refused with an ERROR that says why;
* subscriptions made before HELLO are delivered (the connection is an anonymous session);
* a bounded outgoing queue per connection with an overflow policy (drop the oldest event and
  count it, or disconnect), so a slow subscriber never grows memory nor slows the others.

As on the reference, topics are literal, no connection is ever pinged or timed out for being
quiet, two connections may use the same client id, frames leave a connection in the order
they were produced, and a session ends with its connection.

Opt-in, per broker (constructor / ``mip broker`` flags) or per session (HELLO flags the
reference ignores, see ``mip.msip.Flags``):

* ``topic_patterns`` / ``Flags.PATTERNS``: NATS-style patterns (``mip.net.msip_topics``);
* ``idle_timeout``: PING a connection silent that long, close it at twice that;
* ``session_takeover`` / ``Flags.TAKEOVER``: a HELLO naming a client id in use closes the
  older connection (ERROR "taken over") instead of serving both;
* at-least-once sessions (``Flags.ACK_REQUIRED`` on HELLO): the client acknowledges events;
  its subscriptions made with ``Flags.AT_LEAST_ONCE`` get each EVENT again after
  ``redelivery_timeout`` until an ACK carrying its msg_id arrives; the session outlives a
  dropped connection for ``session_ttl`` seconds, keeping what is published to it in a backlog
  bounded in messages and octets per session and in octets for the whole broker (oldest
  dropped, counted). CLOSE ends any session at once. ``at_least_once=False`` turns this off.

Several brokers, on one machine or many, form one service through Redis with
``cluster="redis://HOST:PORT[/DB]"`` (``mip broker --cluster``; see ``mip.net.msip_cluster``).

A HELLO that sets any of those flags is answered with the client id followed by the u32
``Capability`` set granted; reference clients never set them and get the reference's 8 octets.
Also beyond the reference: URGENT events overtake the events waiting for a slow subscriber's
socket, optional token authentication (the octets after the 8-octet client id in HELLO), and a
graceful shutdown (CLOSE to every client, then the buffered frames are flushed).

EVENT frames always carry msg_kind EVENT (the publisher's msg_kind is not forwarded, as in the
reference).

Embed it::

    broker = Broker(max_payload=1 << 20)
    await broker.start("tcp://127.0.0.1:7000")
    ...
    await broker.stop()
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import hmac
import logging
import os
import socket
import struct
import time
from typing import Iterable

from mip import msip
from mip.errors import FrameTooLarge, ProtocolError
from mip.net.msip_topics import match_tokens, pattern_tokens
from mip.net.peers import PeerCounts
from mip.net.ratelimit import FailureLimit, peer_of
from mip.net.urls import Address, parse_url

__all__ = ["Broker", "BrokerStats", "OVERFLOW_DROP_OLDEST", "OVERFLOW_DISCONNECT", "serve"]

log = logging.getLogger("mip.msip.broker")

OVERFLOW_DROP_OLDEST = "drop_oldest"
OVERFLOW_DISCONNECT = "disconnect"

ZSTD_MAGIC = msip.ZSTD_MAGIC

_HELLO, _SUBSCRIBE, _UNSUBSCRIBE, _PUBLISH, _EVENT, _ACK, _ERROR, _PING, _PONG, _CLOSE = range(1, 11)
_K_EVENT, _K_STATE = 1, 3
_F_ACK_REQUIRED, _F_COMPRESSED, _F_URGENT = 1, 2, 4
_F_AT_LEAST_ONCE, _F_PATTERNS, _F_TAKEOVER = (int(msip.Flags.AT_LEAST_ONCE), int(msip.Flags.PATTERNS),
                                              int(msip.Flags.TAKEOVER))
_F_HELLO_EXT = _F_ACK_REQUIRED | _F_PATTERNS | _F_TAKEOVER  # any of these: answer capabilities
_CAP_AT_LEAST_ONCE, _CAP_PATTERNS, _CAP_TAKEOVER = (
    int(msip.Capability.AT_LEAST_ONCE), int(msip.Capability.PATTERNS), int(msip.Capability.TAKEOVER))
_HDR = msip.HEADER_SIZE
_INLINE_MAX = 16 * 1024  # octets: smaller events are sent as one joined bytes object
_BURST = 256 * 1024  # octets handed to one writelines() call at most
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_UNSUPPORTED = "Invalid frame or unsupported operation"  # the reference's ERROR text


def _digest(token) -> bytes:
    """What the broker keeps of an authentication token: its SHA-256."""
    return hashlib.sha256(bytes(token)).digest()


@dataclasses.dataclass
class BrokerStats:
    """Counters since the broker started (all are counts of frames unless named otherwise)."""

    connections: int = 0  #: connections open now
    connections_total: int = 0  #: connections accepted in total
    sessions: int = 0  #: sessions known by client id now (attached, or away for at-least-once)
    sessions_away: int = 0  #: at-least-once sessions kept now without a connection
    sessions_expired: int = 0  #: away sessions forgotten (session TTL, or too many sessions)
    published: int = 0  #: PUBLISH frames accepted
    delivered: int = 0  #: EVENT frames queued to connected subscribers (redeliveries included)
    redelivered: int = 0  #: EVENT frames sent again because they were not acknowledged
    acked: int = 0  #: at-least-once events acknowledged by their subscriber
    dropped_overflow: int = 0  #: events dropped from full outgoing queues
    dropped_backlog: int = 0  #: events dropped from full away-session backlogs
    backlog_bytes: int = 0  #: octets held now in away-session backlogs (all sessions)
    dropped_inflight: int = 0  #: unacknowledged events given up on (bound or attempts reached)
    slow_disconnects: int = 0  #: connections closed by the ``disconnect`` overflow policy
    errors: int = 0  #: ERROR frames sent
    takeovers: int = 0  #: connections closed because a newer one took their session
    # with ``cluster`` (a Redis backplane joining brokers; see mip.net.msip_cluster):
    cluster_connected: bool = False  #: the subscribing connection to Redis is up now
    cluster_published: int = 0  #: local publishes sent to Redis for the other brokers
    cluster_received: int = 0  #: publishes of other brokers received from Redis
    cluster_dropped: int = 0  #: local publishes not sent (outgoing queue full, Redis failing)
    cluster_pending_bytes: int = 0  #: octets queued for Redis now
    cluster_reconnects: int = 0  #: times the subscribing connection to Redis was lost
    cluster_invalid: int = 0  #: messages from Redis that were not a broker's envelope


class _Held:
    """An event a session holds: at-least-once and waiting for its ACK (``deadline``,
    ``attempts``), or kept in an away session's backlog (``alive`` false once taken out)."""

    __slots__ = ("msg_id", "item", "size", "urgent", "reliable", "deadline", "attempts", "alive")

    def __init__(self, msg_id, item, size, urgent, reliable, deadline=0.0):
        self.msg_id = msg_id
        self.item = item
        self.size = size
        self.urgent = urgent
        self.reliable = reliable
        self.deadline = deadline
        self.attempts = 1
        self.alive = True


class _Session:
    """Subscriptions, unacknowledged events and the away backlog of one client id."""

    __slots__ = ("client_id", "subs", "conn", "inflight", "inflight_bytes", "by_msg_id", "seq",
                 "backlog", "backlog_bytes", "detached_at", "durable", "patterns")

    def __init__(self, client_id: int | None):
        self.client_id = client_id  # None: anonymous (a connection before HELLO)
        self.subs: dict[str, bool] = {}  # topic or pattern -> at-least-once
        self.conn: _Connection | None = None
        self.inflight: dict[int, _Held] = {}  # delivery sequence number -> pending event
        self.inflight_bytes = 0
        self.by_msg_id: dict[int, collections.deque] = {}
        self.seq = 0
        self.backlog: collections.deque = collections.deque()  # of _Held
        self.backlog_bytes = 0
        self.detached_at = 0.0
        self.durable = False  # HELLO asked for at-least-once: acks, kept while away
        self.patterns = False  # wildcard topics for this session's subscriptions


class _Connection(asyncio.BufferedProtocol):
    """One client connection: parses frames into the broker, queues frames out."""

    def __init__(self, broker: "Broker"):
        self.broker = broker
        self.transport: asyncio.Transport | None = None
        self.parser = msip.FrameParser(max_payload=broker.max_payload)
        self.session = _Session(None)
        self.session.conn = self
        self.authenticated = broker.tokens is None
        self.closing = False
        self.paused = False
        self.dirty = False
        # (item, size, is_event) in the order produced; urgent: URGENT events that arrived
        # while the socket was not writable, sent before the queue
        self.urgent: collections.deque = collections.deque()
        self.queue: collections.deque = collections.deque()
        self.qbytes = 0
        self.dropped = 0
        now = time.monotonic()
        self.last_rx = now
        self.pinged = False
        self.rx_total = 0
        self.consumed = 0
        self.partial_since: float | None = None
        self.peer = None
        self.host: str | None = None  # counted against max_connections_per_peer
        self.reading_paused = False

    # -- asyncio.BufferedProtocol ------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        b = self.broker
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = transport.get_extra_info("peername")
        transport.set_write_buffer_limits(high=b.write_buffer_high)
        b._conns.add(self)
        b.stats.connections_total += 1
        host = self.peer[0] if isinstance(self.peer, tuple) else None  # None: Unix socket
        if b._stopping:
            self.fail("broker is shutting down")
        elif b._per_peer.full(host, b.max_connections_per_peer):
            self.fail(f"too many connections from this address "
                      f"(limit {b.max_connections_per_peer})")
        elif len(b._conns) > b.max_connections and not b._make_room(self):
            self.fail(f"too many connections (limit {b.max_connections})")
        else:
            self.host = host
            b._per_peer.add(host)

    def connection_lost(self, exc):
        b = self.broker
        b._forget_conn(self)
        self.closing = True
        self.urgent.clear()
        self.queue.clear()
        self.qbytes = 0
        self.transport = None
        b._detach(self)
        if not b._conns and b._all_closed is not None:
            b._all_closed.set()

    def get_buffer(self, sizehint):
        return self.parser.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        if self.closing:
            return
        now = time.monotonic()
        self.last_rx = now
        self.pinged = False
        self.rx_total += nbytes
        b = self.broker
        consumed_before = self.consumed
        try:
            frames = self.parser.buffer_updated(nbytes)
            for frame in frames:
                self.consumed += _HDR + frame.payload_len
                if self.closing:
                    break
                b._dispatch(self, frame)
            if frames and not self.closing:
                # the parser raises an error found after complete frames on its next call
                self.parser.feed(b"")
        except FrameTooLarge as exc:
            self.fail(f"frame too large: {exc}")
        except ProtocolError as exc:
            self.fail(f"malformed frame: {exc}")
        if self.rx_total > self.consumed:
            # a frame has started arriving: it must be complete within read_timeout
            if self.consumed != consumed_before or self.partial_since is None:
                self.partial_since = now
        else:
            self.partial_since = None
        b._flush_dirty()
        if self.paused and not self.closing and (
                self.qbytes > b.queue_bytes
                or len(self.urgent) + len(self.queue) > b.queue_limit):
            # The client does not read its replies: read no more of its requests until
            # it does.
            self.reading_paused = True
            self.transport.pause_reading()

    def eof_received(self):
        return False

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self.flush()

    # -- output ------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Queue a control frame (reply) after what is queued: frames leave in the order
        they were produced, as on the reference."""
        if self.closing:
            return
        self.queue.append((data, len(data), False))
        self.qbytes += len(data)
        self._mark()

    def enqueue(self, item, size: int, urgent: bool) -> None:
        """Queue one EVENT (``item`` is bytes or a (header, payload) tuple of ``size`` octets)."""
        if self.closing:
            return
        # URGENT overtakes only events held back by a slow socket, never a reply
        (self.urgent if urgent and self.paused else self.queue).append((item, size, True))
        self.qbytes += size
        b = self.broker
        if self.paused and (len(self.urgent) + len(self.queue) > b.queue_limit
                            or self.qbytes > b.queue_bytes):
            self._overflow()
        self._mark()

    def _overflow(self):
        b = self.broker
        if b.overflow == OVERFLOW_DISCONNECT:
            b.stats.slow_disconnects += 1
            log.info("closing slow subscriber %s: outgoing queue full", self.peer)
            self.urgent.clear()
            self.queue.clear()
            self.qbytes = 0
            self.closing = True
            if self.transport is not None:
                self.transport.abort()
            return
        replies = []  # replies are never dropped: only events are
        while (len(self.urgent) + len(self.queue) > b.queue_limit or self.qbytes > b.queue_bytes):
            q = self.queue if self.queue else self.urgent
            if len(q) == 0:
                break
            entry = q.popleft()
            if not entry[2]:
                replies.append(entry)
                continue
            self.qbytes -= entry[1]
            self.dropped += 1
            b.stats.dropped_overflow += 1
        if replies:
            self.queue.extendleft(reversed(replies))

    def _mark(self):
        if not self.dirty:
            self.dirty = True
            self.broker._dirty.append(self)
            self.broker._schedule_flush()

    def flush(self) -> None:
        """Write queued frames (urgent first) in bursts while the transport accepts them."""
        self.dirty = False
        t = self.transport
        if t is None:
            return
        urgent, queue = self.urgent, self.queue
        while (urgent or queue) and not self.paused:
            chunks = []
            n = 0
            while urgent and n < _BURST:
                item, size, _ = urgent.popleft()
                n += size
                if type(item) is tuple:
                    chunks.extend(item)
                else:
                    chunks.append(item)
            while queue and n < _BURST:
                item, size, _ = queue.popleft()
                n += size
                if type(item) is tuple:
                    chunks.extend(item)
                else:
                    chunks.append(item)
            self.qbytes -= n
            if len(chunks) == 1:
                t.write(chunks[0])
            else:
                t.writelines(chunks)
        if self.reading_paused and not self.paused and not self.closing:
            self.reading_paused = False
            if self.partial_since is not None:
                self.partial_since = time.monotonic()  # the wait was the broker's own
            t.resume_reading()

    def fail(self, reason: str) -> None:
        """Send an ERROR frame with ``reason`` (UTF-8) after what is queued, then close."""
        if self.closing or self.transport is None:
            return
        self.broker.stats.errors += 1
        log.debug("closing %s: %s", self.peer, reason)
        data = reason.encode("utf-8", "replace")
        self.send(msip.encode(_ERROR, _K_EVENT, data, 0, 0))
        self.close()

    def close(self) -> None:
        """Flush what is queued (ignoring backpressure) and close the connection."""
        if self.transport is None:
            return
        self.paused = False
        self.flush()
        self.closing = True
        self.transport.close()


class Broker:
    """An embeddable MSIP broker.

    Sizes are in octets, times in seconds. ``None`` disables a timeout.

    Args:
        max_payload: largest payload a frame may declare; larger -> ERROR and close.
        max_topic_length: longest topic or pattern (UTF-8 octets).
        max_subscriptions: subscriptions per session.
        max_connections: connections open at once; for one more, the longest-silent
            connection that has not sent a complete frame yet is closed to make room, and
            with none such the new one gets an ERROR and is closed.
        max_connections_per_peer: connections one client address may hold; more -> ERROR
            and close (Unix-socket clients are not counted).
        max_sessions: at-least-once sessions kept while away; the longest-away are forgotten
            first.
        idle_timeout: after this long without a frame from a client the broker sends it a PING,
            and closes it (ERROR "idle timeout") after twice this long. None (the default, as
            on the reference): never.
        read_timeout: a frame that started arriving must be complete within this time.
        queue_limit: outgoing frames queued per connection while its socket is not writable.
        queue_bytes: outgoing octets queued per connection while its socket is not writable;
            beyond it (or beyond ``queue_limit`` frames), EVENTs overflow (see ``overflow``)
            and the broker stops reading the connection's frames until its replies drain.
        overflow: ``"drop_oldest"`` (drop the oldest queued event, counted) or ``"disconnect"``.
        write_buffer_high: transport write-buffer high-water mark before queueing starts.
        redelivery_timeout: an at-least-once event not acknowledged within this time is resent.
        max_redeliveries: resends of one event before it is given up (counted); None: no limit.
        max_inflight: unacknowledged events kept per session (oldest given up first, counted).
        max_inflight_bytes: octets of unacknowledged events kept per session (same policy).
        backlog_limit: events kept per session while it is away (oldest dropped first, counted).
        backlog_bytes: octets of events kept per session while it is away (oldest dropped).
        max_backlog_bytes: octets of events kept by all away sessions together (the oldest
            kept event of the broker dropped first, counted).
        session_ttl: how long an at-least-once session is kept after its connection dropped
            (a CLOSE ends it at once; other sessions end with their connection).
        tokens: accepted authentication tokens (bytes); None disables authentication. A
            presented token is compared with every accepted one in constant time.
        auth_failures: failed authentications per client address (IPv6: per /64), ``"N"``
            per minute or ``"N/unit"``; past it, a HELLO from that address is refused before
            its token is looked at, and failures are logged at WARNING within limits
            (:class:`~mip.net.ratelimit.FailureLimit`).
        at_least_once: whether a HELLO with ACK_REQUIRED gets an at-least-once session.
        topic_patterns: ``*`` and a final ``>`` are wildcards for every session (otherwise only
            for sessions whose HELLO set ``Flags.PATTERNS``).
        session_takeover: a HELLO naming a client id in use closes the older connection, for
            every session (otherwise only when the HELLO set ``Flags.TAKEOVER``).
        ssl: an ``ssl.SSLContext`` to serve TLS with (None: plain TCP).
        cluster: ``redis://HOST:PORT[/DB]`` (or ``rediss://``): join the other brokers using
            this Redis as one MSIP service (:mod:`mip.net.msip_cluster`); None: alone.
        cluster_prefix: put before a topic to name its Redis channel (brokers of different
            services sharing one Redis need different prefixes).
        cluster_max_pending: octets of local publishes queued for Redis at most; beyond it
            (Redis slow or down) they are not sent to the other brokers, counted in
            ``stats.cluster_dropped``.
    """

    def __init__(
        self,
        *,
        max_payload: int = 16 * 1024 * 1024,
        max_topic_length: int = 1024,
        max_subscriptions: int = 1024,
        max_connections: int = 10_000,
        max_connections_per_peer: int = 256,
        max_sessions: int = 10_000,
        idle_timeout: float | None = None,
        read_timeout: float | None = 30.0,
        queue_limit: int = 10_000,
        queue_bytes: int = 8 * 1024 * 1024,
        overflow: str = OVERFLOW_DROP_OLDEST,
        write_buffer_high: int = 1024 * 1024,
        redelivery_timeout: float = 30.0,
        max_redeliveries: int | None = 10,
        max_inflight: int = 10_000,
        max_inflight_bytes: int = 16 * 1024 * 1024,
        backlog_limit: int = 1000,
        backlog_bytes: int = 1024 * 1024,
        max_backlog_bytes: int = 64 * 1024 * 1024,
        session_ttl: float = 60.0,
        tokens: Iterable[bytes] | None = None,
        auth_failures: str | int = "10/min",
        at_least_once: bool = True,
        topic_patterns: bool = False,
        session_takeover: bool = False,
        ssl=None,
        cluster: str | None = None,
        cluster_prefix: str = "msip:",
        cluster_max_pending: int = 8 * 1024 * 1024,
    ):
        if overflow not in (OVERFLOW_DROP_OLDEST, OVERFLOW_DISCONNECT):
            raise ValueError(f"overflow must be {OVERFLOW_DROP_OLDEST!r} or {OVERFLOW_DISCONNECT!r}")
        for name, value in (("max_payload", max_payload), ("max_topic_length", max_topic_length),
                            ("session_ttl", session_ttl), ("backlog_limit", backlog_limit),
                            ("backlog_bytes", backlog_bytes),
                            ("max_backlog_bytes", max_backlog_bytes)):
            if value < 0 or (value == 0 and name.startswith("max_")):
                raise ValueError(f"{name} must be {'positive' if name.startswith('max_') else '0 or more'}, "
                                 f"not {value}")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive or None, not {idle_timeout}")
        self.max_payload = max_payload
        self.max_topic_length = max_topic_length
        self.max_subscriptions = max_subscriptions
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.queue_limit = queue_limit
        self.queue_bytes = queue_bytes
        self.overflow = overflow
        self.write_buffer_high = write_buffer_high
        self.redelivery_timeout = redelivery_timeout
        self.max_redeliveries = max_redeliveries
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.backlog_limit = backlog_limit
        self.backlog_bytes = backlog_bytes
        self.max_backlog_bytes = max_backlog_bytes
        self.session_ttl = session_ttl
        self.tokens = None if tokens is None else [_digest(t) for t in tokens]
        self._auth_failures = None if tokens is None else FailureLimit(auth_failures, logger=log)
        self.at_least_once = at_least_once
        self.topic_patterns = topic_patterns
        self.session_takeover = session_takeover
        self.ssl = ssl
        self.stats = BrokerStats()
        self._conns: set[_Connection] = set()
        self._per_peer = PeerCounts()
        self._sessions: dict[int, _Session] = {}  # client id -> attached or durable away session
        self._away: dict[_Session, None] = {}  # durable sessions without a connection, oldest first
        self._kept: collections.deque = collections.deque()  # (session, _Held) of every backlog
        self._kept_live = 0
        self._next_id = 1
        self._exact: dict[str, dict[_Session, bool]] = {}
        self._patterns: dict[str, tuple[tuple[str, ...], dict[_Session, bool]]] = {}
        self._routes: dict[str, tuple] = {}
        self._dirty: list[_Connection] = []
        self._flush_handle: asyncio.Handle | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tick_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._all_closed: asyncio.Event | None = None
        self.address: Address | None = None
        self._cluster = None
        if cluster is not None:
            from mip.net.msip_cluster import RedisCluster
            self._cluster = RedisCluster(self, cluster, prefix=cluster_prefix,
                                         max_pending=cluster_max_pending)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, url: str | None = None, *, host: str | None = None,
                    port: int | None = None, path: str | None = None) -> Address:
        """Listen on ``url`` (``tcp://HOST:PORT``, port 0 = any free port, or
        ``unix:///PATH``), or on ``host``/``port``, or on the Unix socket ``path``.
        Returns the bound address (with the real port)."""
        if url is not None:
            addr = parse_url(url)
        elif path is not None:
            addr = Address("unix", path=path)
        else:
            addr = Address("tcp", host=host or "127.0.0.1", port=port or 0)
        self._loop = loop = asyncio.get_running_loop()
        self._stopping = False
        if addr.scheme == "unix":
            if os.path.exists(addr.path) and not os.path.isfile(addr.path):
                os.unlink(addr.path)
            self._server = await loop.create_unix_server(lambda: _Connection(self), addr.path,
                                                         ssl=self.ssl)
            self.address = addr
        else:
            self._server = await loop.create_server(
                lambda: _Connection(self), addr.host, addr.port, reuse_address=True, backlog=1024,
                ssl=self.ssl)
            sockname = self._server.sockets[0].getsockname()
            self.address = Address("tcp", host=addr.host, port=sockname[1])
        self._tick_task = loop.create_task(self._tick())
        log.info("MSIP broker listening on %s", self.address)
        if self._cluster is not None:
            await self._cluster.start()
        return self.address

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, send CLOSE to every client, flush and close within ``grace`` seconds
        (connections still open then are aborted). Sessions are forgotten."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        if self._cluster is not None:
            await self._cluster.stop()
        if self._tick_task is not None:
            self._tick_task.cancel()
            try:
                await self._tick_task
            except asyncio.CancelledError:
                pass
            self._tick_task = None
        if self._conns:
            self._all_closed = asyncio.Event()
            close_frame = msip.encode(_CLOSE, _K_EVENT, b"", 0, 0)
            for conn in list(self._conns):
                conn.send(close_frame)
                conn.close()
            try:
                await asyncio.wait_for(self._all_closed.wait(), grace)
            except asyncio.TimeoutError:
                for conn in list(self._conns):
                    if conn.transport is not None:
                        conn.transport.abort()
                await asyncio.sleep(0)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), grace)
            except asyncio.TimeoutError:
                pass
            self._server = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for session in list(self._sessions.values()):
            self._forget(session)
        self._sessions.clear()
        self._exact.clear()
        self._patterns.clear()
        self._routes.clear()
        self.stats.sessions = 0

    async def __aenter__(self) -> "Broker":
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- frames ----------------------------------------------------------------------------
    def _dispatch(self, conn: _Connection, f) -> None:
        ft = f.frame_type
        if ft == _PUBLISH:
            if not conn.authenticated:
                conn.fail("authentication required: send HELLO with a token first")
                return
            self._publish(conn, f)
        elif ft == _ACK:
            self._ack(conn.session, f.msg_id)
        elif ft == _PING:
            conn.send(msip.encode_header(_PONG, _K_EVENT, 0, f.msg_id, 0))
        elif ft == _SUBSCRIBE or ft == _UNSUBSCRIBE:
            if not conn.authenticated:
                conn.fail("authentication required: send HELLO with a token first")
                return
            self._subscribe_frame(conn, f, ft == _SUBSCRIBE)
        elif ft == _HELLO:
            self._hello(conn, f)
        elif ft == _CLOSE:
            self._end_session(conn)
            conn.close()
        elif ft == _PONG:
            pass  # answer to our idle PING; last_rx is already updated
        elif ft == _ERROR:
            conn.close()
        else:
            conn.fail(f"{_UNSUPPORTED}: frame type {int(ft)} is sent by the broker, not to it")

    def _token_accepted(self, token: bytes) -> bool:
        """Whether ``token`` is an accepted one, compared with every accepted token's digest
        in constant time (no early exit that would tell which, or how close)."""
        presented = _digest(token)
        accepted = False
        for digest in self.tokens:
            accepted |= hmac.compare_digest(presented, digest)
        return accepted

    def _hello(self, conn: _Connection, f) -> None:
        payload = f.payload
        client_id = None
        token = None
        if len(payload) >= 8:
            client_id, token = msip.decode_hello_payload(payload)
        if self.tokens is not None:
            peer = peer_of(conn.host)
            refusal = self._auth_failures.refuse_now(peer)
            if refusal is not None:
                conn.fail(f"too many failed authentications from this address: retry in "
                          f"{max(1, round(refusal.retry_after))} s")
                return
            if token is None or not self._token_accepted(bytes(token)):
                self._auth_failures.failed_now(peer, "missing token" if token is None
                                               else "unknown token")
                conn.fail("authentication failed: missing or unknown token")
                return
            conn.authenticated = True
        flags = f.flags
        durable = self.at_least_once and bool(flags & _F_ACK_REQUIRED)
        takeover = self.session_takeover or bool(flags & _F_TAKEOVER)
        session, resumed, took_over = self._bind(conn, client_id or None, durable, takeover)
        self._set_patterns(session, bool(flags & _F_PATTERNS))
        reply = _U64.pack(session.client_id)
        if flags & _F_HELLO_EXT:
            caps = ((_CAP_AT_LEAST_ONCE if session.durable else 0)
                    | (_CAP_PATTERNS if session.patterns or self.topic_patterns else 0)
                    | (_CAP_TAKEOVER if took_over else 0))
            reply += _U32.pack(caps)
        conn.send(msip.encode(_ACK, _K_STATE, reply, f.msg_id, 0))
        if resumed:  # the session comes back on a new connection
            self._resume_delivery(session)

    def _bind(self, conn: _Connection, client_id: int | None, durable: bool,
              takeover: bool) -> tuple[_Session, bool, bool]:
        """The session a HELLO gives ``conn``: (session, resumed, took over a connection).

        What the connection did before (subscriptions of an anonymous or plain session) moves
        into it; an at-least-once session the connection had is left away."""
        current = conn.session
        if client_id is None:
            if current.durable:
                return current, False, False  # a second HELLO without id keeps the session
            client_id = self._new_id()  # as the reference: a new id for every HELLO without one
        existing = self._sessions.get(client_id)
        if existing is current:
            return current, False, False
        took_over = False
        if existing is not None and existing.conn is not None:
            if not takeover:
                existing = None  # as the reference: both connections are served
            else:
                took_over = True
                self._take_over(existing)
                if not (durable and existing.durable):
                    self._forget(existing)  # nothing to resume: the old session ends
                    existing = None
        if existing is not None and not durable:
            existing = None  # an away session is resumed only by an at-least-once HELLO
        if existing is not None:
            self._away.pop(existing, None)
            self.stats.sessions_away = len(self._away)
            self._leave(current, existing)
            existing.conn = conn
            conn.session = existing
            return existing, True, took_over
        if current.durable:
            self._leave(current, None)
            session = _Session(None)
        else:
            session = current  # anonymous or plain: the same object takes the new id
            if current.client_id is not None and self._sessions.get(current.client_id) is current:
                del self._sessions[current.client_id]
        session.client_id = client_id
        session.conn = conn
        conn.session = session
        if client_id not in self._sessions:
            self._sessions[client_id] = session
            session.durable = durable
        else:
            session.durable = False  # the id is held by another connection or an away session
        self.stats.sessions = len(self._sessions)
        return session, False, took_over

    def _take_over(self, session: _Session) -> None:
        """Close the connection that holds ``session`` (a newer one named its client id)."""
        old = session.conn
        self.stats.takeovers += 1
        session.conn = None
        old.session = fresh = _Session(None)
        fresh.conn = old
        old.fail(f"session {session.client_id} taken over by a newer connection")

    def _leave(self, current: _Session, into: _Session | None) -> None:
        """The connection of ``current`` moves on: an at-least-once session goes away, any
        other has its subscriptions moved ``into`` the connection's next session (or ended)."""
        if current.durable:
            current.conn = None
            self._set_away(current)
            return
        if into is not None:
            for topic, reliable in list(current.subs.items()):
                self._unsubscribe(current, topic)
                if topic not in into.subs or reliable:
                    self._subscribe(into, topic, reliable)
        self._forget(current)

    def _set_patterns(self, session: _Session, patterns: bool) -> None:
        if session.patterns == patterns:
            return
        subs = list(session.subs.items())
        for topic, _ in subs:
            self._unsubscribe(session, topic)
        session.patterns = patterns
        for topic, reliable in subs:
            self._subscribe(session, topic, reliable)

    def _new_id(self) -> int:
        while self._next_id in self._sessions:
            self._next_id += 1
        cid = self._next_id
        self._next_id += 1
        return cid

    def _set_away(self, session: _Session) -> None:
        session.detached_at = time.monotonic()
        self._away[session] = None
        while len(self._away) > self.max_sessions:  # the longest away are forgotten first
            self._forget(next(iter(self._away)))
            self.stats.sessions_expired += 1
        self.stats.sessions_away = len(self._away)

    def _forget(self, session: _Session) -> None:
        for topic in list(session.subs):
            self._unsubscribe(session, topic)
        if session.client_id is not None and self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
        self._away.pop(session, None)
        self._clear_backlog(session)
        session.inflight.clear()
        session.inflight_bytes = 0
        session.by_msg_id.clear()
        session.durable = False
        self.stats.sessions = len(self._sessions)
        self.stats.sessions_away = len(self._away)

    def _detach(self, conn: _Connection) -> None:
        session = conn.session
        if session.conn is not conn:
            return
        session.conn = None
        if session.durable:
            self._set_away(session)
        else:
            self._forget(session)

    def _end_session(self, conn: _Connection) -> None:
        """CLOSE: the connection's session ends now, whatever it asked for."""
        session = conn.session
        if session.conn is conn:
            self._forget(session)
            conn.session = fresh = _Session(None)
            fresh.conn = conn

    def _subscribe_frame(self, conn: _Connection, f, subscribe: bool) -> None:
        raw = f.payload
        if len(raw) > self.max_topic_length:
            conn.fail(f"topic too long: {len(raw)} octets (limit {self.max_topic_length})")
            return
        try:
            topic = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            conn.fail(f"{_UNSUPPORTED}: topic is not UTF-8")
            return
        session = conn.session
        if subscribe:
            if topic not in session.subs and len(session.subs) >= self.max_subscriptions:
                conn.fail(f"too many subscriptions (limit {self.max_subscriptions} a session)")
                return
            reliable = session.durable and bool(f.flags & _F_AT_LEAST_ONCE)
            self._subscribe(session, topic, reliable)
        else:
            self._unsubscribe(session, topic)
        if f.flags & _F_ACK_REQUIRED:
            conn.send(msip.encode_header(_ACK, _K_STATE, 0, f.msg_id, 0))

    def _subscribe(self, session: _Session, topic: str, reliable: bool) -> None:
        session.subs[topic] = reliable
        tokens = pattern_tokens(topic) if session.patterns or self.topic_patterns else None
        if tokens is None:
            table = self._exact.get(topic)
            if table is None:
                table = self._exact[topic] = {}
                if self._cluster is not None:
                    self._cluster.interest(topic, False, True)
        else:
            entry = self._patterns.get(topic)
            if entry is None:
                entry = self._patterns[topic] = (tokens, {})
                if self._cluster is not None:
                    self._cluster.interest(topic, True, True)
            table = entry[1]
        table[session] = reliable
        self._routes.clear()

    def _unsubscribe(self, session: _Session, topic: str) -> None:
        if session.subs.pop(topic, None) is None:
            return
        table = self._exact.get(topic)
        if table is not None:
            table.pop(session, None)
            if not table:
                del self._exact[topic]
                if self._cluster is not None:
                    self._cluster.interest(topic, False, False)
        entry = self._patterns.get(topic)
        if entry is not None:
            entry[1].pop(session, None)
            if not entry[1]:
                del self._patterns[topic]
                if self._cluster is not None:
                    self._cluster.interest(topic, True, False)
        self._routes.clear()

    def _route(self, topic: str) -> tuple:
        """Sessions subscribed to ``topic`` (exact or by pattern): ((session, reliable), ...)."""
        route = self._routes.get(topic)
        if route is not None:
            return route
        found: dict[_Session, bool] = dict(self._exact.get(topic, ()))
        if self._patterns:
            parts = topic.split(".")
            for tokens, table in self._patterns.values():
                if match_tokens(tokens, parts):
                    for s, reliable in table.items():
                        found[s] = found.get(s, False) or reliable
        route = tuple(found.items())
        if len(self._routes) > 65536:
            self._routes.clear()
        self._routes[topic] = route
        return route

    def _publish(self, conn: _Connection, f) -> None:
        payload = f.payload  # a view of the parser's chunk, which it keeps alive
        if len(payload) < 2:
            conn.fail(f"{_UNSUPPORTED}: PUBLISH payload shorter than its topic length")
            return
        tlen = (payload[0] << 8) | payload[1]
        if len(payload) < 2 + tlen:
            conn.fail(f"{_UNSUPPORTED}: PUBLISH topic length runs past the payload")
            return
        if tlen > self.max_topic_length:
            conn.fail(f"topic too long: {tlen} octets (limit {self.max_topic_length})")
            return
        try:
            topic = bytes(payload[2:2 + tlen]).decode("utf-8")
        except UnicodeDecodeError:
            conn.fail(f"{_UNSUPPORTED}: topic is not UTF-8")
            return
        self.stats.published += 1
        msg_id = f.msg_id
        route = self._route(topic)
        if route:
            flags = 0
            if f.flags & _F_COMPRESSED and payload[2 + tlen:6 + tlen] == ZSTD_MAGIC:
                flags = _F_COMPRESSED
            header = msip.encode_header(_EVENT, _K_EVENT, len(payload), msg_id, flags)
            size = _HDR + len(payload)
            # small events: one joined object (a copy); large: header + the received view
            item = header + payload if len(payload) <= _INLINE_MAX else (header, payload)
            urgent = bool(f.flags & _F_URGENT)
            for session, reliable in route:
                if session.conn is None and type(item) is tuple:
                    # kept for an away session: its own octets, not a view of a read buffer
                    item = header + bytes(payload)
                self._deliver(session, item, size, urgent, reliable, msg_id)
        if self._cluster is not None:
            self._cluster_publish(f, payload, tlen)
        # after the events it produced, as on the reference
        conn.send(msip.encode_header(_ACK, _K_STATE, 0, msg_id, 0))

    # -- cluster: publishes to and from the other brokers --------------------------------
    def _cluster_publish(self, f, payload, tlen: int) -> None:
        flags = f.flags & _F_URGENT
        if f.flags & _F_COMPRESSED and payload[2 + tlen:6 + tlen] == ZSTD_MAGIC:
            flags |= _F_COMPRESSED
        self._cluster.publish(bytes(payload[2:2 + tlen]), payload, f.msg_kind, flags, f.msg_id)

    def _deliver_remote(self, payload, kind: int, flags: int, msg_id: int) -> None:
        """Deliver a publish another broker received (``payload``: its PUBLISH payload) to
        this broker's subscribers, as a local one is."""
        n = len(payload)
        if n < 2 or n > self.max_payload:
            self.stats.cluster_invalid += 1
            return
        tlen = (payload[0] << 8) | payload[1]
        if n < 2 + tlen:
            self.stats.cluster_invalid += 1
            return
        try:
            topic = bytes(payload[2:2 + tlen]).decode("utf-8")
        except UnicodeDecodeError:
            self.stats.cluster_invalid += 1
            return
        self.stats.cluster_received += 1
        route = self._route(topic)
        if route:
            header = msip.encode_header(_EVENT, _K_EVENT, n, msg_id, flags & _F_COMPRESSED)
            item = header + payload if n <= _INLINE_MAX else (header, payload)
            urgent = bool(flags & _F_URGENT)
            for session, reliable in route:
                if session.conn is None and type(item) is tuple:
                    item = header + bytes(payload)
                self._deliver(session, item, _HDR + n, urgent, reliable, msg_id)

    def _deliver(self, session: _Session, item, size, urgent, reliable, msg_id) -> None:
        c = session.conn
        if c is not None:
            if reliable:
                self._track(session, msg_id, item, size, urgent)
            self.stats.delivered += 1
            c.enqueue(item, size, urgent)
        elif session.durable:
            self._keep(session, _Held(msg_id, item, size, urgent, reliable))

    # -- away backlogs: bounded per session (messages, octets) and in total (octets) -------
    def _keep(self, session: _Session, kept: _Held) -> None:
        if kept.size > self.backlog_bytes or kept.size > self.max_backlog_bytes:
            self.stats.dropped_backlog += 1
            return
        backlog = session.backlog
        while backlog and (len(backlog) >= self.backlog_limit
                           or session.backlog_bytes + kept.size > self.backlog_bytes):
            self._unkeep(session, backlog.popleft())
            self.stats.dropped_backlog += 1
        if self.backlog_limit <= 0:
            self.stats.dropped_backlog += 1
            return
        backlog.append(kept)
        session.backlog_bytes += kept.size
        self.stats.backlog_bytes += kept.size
        self._kept.append((session, kept))
        self._kept_live += 1
        kept_order = self._kept
        while self.stats.backlog_bytes > self.max_backlog_bytes and kept_order:
            owner, oldest = kept_order.popleft()
            if oldest.alive:  # the oldest kept event of the broker (it heads its backlog)
                owner.backlog.popleft()
                self._unkeep(owner, oldest)
                self.stats.dropped_backlog += 1
        if len(kept_order) > 2 * self._kept_live + 1024:  # forget entries taken out since
            self._kept = collections.deque(e for e in kept_order if e[1].alive)

    def _unkeep(self, session: _Session, kept: _Held) -> None:
        """Account for ``kept`` having left ``session.backlog``."""
        kept.alive = False
        session.backlog_bytes -= kept.size
        self.stats.backlog_bytes -= kept.size
        self._kept_live -= 1

    def _clear_backlog(self, session: _Session) -> list:
        """Take every event out of the session's backlog; returns them, oldest first."""
        taken = list(session.backlog)
        session.backlog.clear()
        for kept in taken:
            self._unkeep(session, kept)
        return taken

    def _track(self, session: _Session, msg_id, item, size, urgent) -> None:
        seq = session.seq = session.seq + 1
        session.inflight[seq] = _Held(msg_id, item, size, urgent, True,
                                      time.monotonic() + self.redelivery_timeout)
        session.by_msg_id.setdefault(msg_id, collections.deque()).append(seq)
        session.inflight_bytes += size
        while len(session.inflight) > 1 and (len(session.inflight) > self.max_inflight
                                             or session.inflight_bytes > self.max_inflight_bytes):
            self._untrack(session, next(iter(session.inflight)))
            self.stats.dropped_inflight += 1

    def _untrack(self, session: _Session, seq: int) -> None:
        p = session.inflight.pop(seq)
        session.inflight_bytes -= p.size
        seqs = session.by_msg_id.get(p.msg_id)
        if seqs is not None:
            try:
                seqs.remove(seq)
            except ValueError:
                pass
            if not seqs:
                del session.by_msg_id[p.msg_id]

    def _ack(self, session: _Session, msg_id: int) -> None:
        seqs = session.by_msg_id.get(msg_id)
        if not seqs:
            return  # unknown or already acknowledged: ignored
        seq = seqs.popleft()
        if not seqs:
            del session.by_msg_id[msg_id]
        p = session.inflight.pop(seq, None)
        if p is not None:
            session.inflight_bytes -= p.size
        self.stats.acked += 1

    def _resume_delivery(self, session: _Session) -> None:
        """After HELLO: resend unacknowledged events, then what arrived while away."""
        conn = session.conn
        if conn is None:
            return
        now = time.monotonic()
        for p in session.inflight.values():
            p.deadline = now + self.redelivery_timeout
            self.stats.redelivered += 1
            self.stats.delivered += 1
            conn.enqueue(p.item, p.size, p.urgent)
        for k in self._clear_backlog(session):
            self._deliver(session, k.item, k.size, k.urgent, k.reliable, k.msg_id)

    # -- output scheduling -----------------------------------------------------------------
    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        for conn in dirty:
            conn.flush()

    # -- connections ----------------------------------------------------------------------
    def _make_room(self, newcomer: _Connection) -> bool:
        """Close the longest-silent connection that has not sent a complete frame (so has
        no session state), to make room for `newcomer`; False if there is none."""
        oldest = None
        for conn in self._conns:
            if (conn is not newcomer and conn.consumed == 0 and not conn.closing
                    and conn.transport is not None):
                if oldest is None or conn.last_rx < oldest.last_rx:
                    oldest = conn
        if oldest is None:
            return False
        log.info("closing %s to make room: no frame from it yet", oldest.peer)
        self._forget_conn(oldest)
        oldest.fail("closed to make room for another connection: no frame received")
        return True

    def _forget_conn(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        host, conn.host = conn.host, None
        self._per_peer.remove(host)

    # -- timers ---------------------------------------------------------------------------
    def _tick_interval(self) -> float:
        candidates = [1.0, self.redelivery_timeout / 4]
        if self.idle_timeout:
            candidates.append(self.idle_timeout / 4)
        if self.read_timeout:
            candidates.append(self.read_timeout / 4)
        return max(0.02, min(candidates))

    async def _tick(self) -> None:
        interval = self._tick_interval()
        ping_id = 0
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self._conns):
                if conn.closing:
                    continue
                if (self.read_timeout and conn.partial_since is not None
                        and not conn.reading_paused
                        and now - conn.partial_since > self.read_timeout):
                    conn.fail(f"read timeout: frame incomplete after {self.read_timeout} s")
                    continue
                if self.idle_timeout:
                    silent = now - conn.last_rx
                    if silent > 2 * self.idle_timeout:
                        conn.fail(f"idle timeout: nothing received for {silent:.1f} s")
                        continue
                    if silent > self.idle_timeout and not conn.pinged:
                        conn.pinged = True
                        ping_id += 1
                        conn.send(msip.encode_header(_PING, _K_EVENT, 0, ping_id, 0))
            self._redeliver(now)
            for s in list(self._away):  # oldest first
                if now - s.detached_at <= self.session_ttl:
                    break
                self._forget(s)
                self.stats.sessions_expired += 1
            self._flush_dirty()

    def _redeliver(self, now: float) -> None:
        for session in self._sessions.values():
            conn = session.conn
            if conn is None or not session.inflight:
                continue
            give_up = []
            for seq, p in session.inflight.items():
                if p.deadline > now:
                    continue
                if self.max_redeliveries is not None and p.attempts > self.max_redeliveries:
                    give_up.append(seq)
                    continue
                p.attempts += 1
                p.deadline = now + self.redelivery_timeout
                self.stats.redelivered += 1
                self.stats.delivered += 1
                conn.enqueue(p.item, p.size, p.urgent)
            for seq in give_up:
                self._untrack(session, seq)
                self.stats.dropped_inflight += 1

    # -- introspection --------------------------------------------------------------------
    def session_info(self, client_id: int) -> dict | None:
        """Subscriptions, unacknowledged and backlog counts of a session (None if unknown)."""
        s = self._sessions.get(client_id)
        if s is None:
            return None
        return {"client_id": client_id, "connected": s.conn is not None,
                "subscriptions": dict(s.subs), "inflight": len(s.inflight),
                "backlog": len(s.backlog), "backlog_bytes": s.backlog_bytes,
                "at_least_once": s.durable}

    def connection_stats(self) -> list[dict]:
        """Per-connection queue state: peer, client id, queued frames and octets, dropped."""
        return [{"peer": c.peer, "client_id": c.session.client_id,
                 "queued": len(c.urgent) + len(c.queue), "queued_bytes": c.qbytes,
                 "dropped": c.dropped, "paused": c.paused} for c in self._conns]

    @property
    def port(self) -> int | None:
        """The TCP port listened on (after :meth:`start`)."""
        return None if self.address is None else self.address.port


def serve(url: str = "tcp://127.0.0.1:7000", **options) -> None:
    """Run a broker on ``url`` until interrupted (uses uvloop when it is installed)."""
    async def main():
        broker = Broker(**options)
        await broker.start(url)
        try:
            await asyncio.Event().wait()
        finally:
            await broker.stop()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
