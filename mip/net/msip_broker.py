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

Several brokers, on one machine or many, form one service through Redis or NATS with
``cluster="redis://HOST:PORT[/DB]"`` or ``"nats://HOST:PORT"`` (``mip broker --cluster``; see
``mip.net.msip_cluster``).

A HELLO that sets any of those flags is answered with the client id followed by the u32
``Capability`` set granted; reference clients never set them and get the reference's 8 octets.
Also beyond the reference: URGENT events overtake the events waiting for a slow subscriber's
socket, optional token authentication (the octets after the 8-octet client id in HELLO), and a
graceful shutdown (CLOSE to every client, then the buffered frames are flushed).

EVENT frames always carry msg_kind EVENT (the publisher's msg_kind is not forwarded, as in the
reference).

What the broker decides (sessions, subscriptions, routing, in-flight events, backlogs, each
connection's outgoing queue) is ``mip.net.msip_core.BrokerCore``, which does no I/O; this module
accepts connections, moves octets between sockets and the core, and runs its timer.

Embed it::

    broker = Broker(max_payload=1 << 20)
    await broker.start("tcp://127.0.0.1:7000")
    ...
    await broker.stop()
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import time
from typing import Iterable

from mip import msip
from mip.net.msip_core import (
    OVERFLOW_DISCONNECT,
    OVERFLOW_DROP_OLDEST,
    BrokerCore,
    BrokerStats,
    Peer,
)
from mip.net.loop import run
from mip.net.peers import PeerCounts
from mip.net.ratelimit import FailureLimit, peer_of
from mip.net.urls import Address, TcpAddress, UnixAddress, parse_url
from mip.protocol._msip import BrokerProtocol, write_out

__all__ = ["Broker", "BrokerStats", "OVERFLOW_DROP_OLDEST", "OVERFLOW_DISCONNECT", "serve"]

log = logging.getLogger("mip.msip.broker")

_CLOSE_FRAME = msip.encode(msip.FrameType.CLOSE, msip.MsgKind.EVENT, b"", 0, 0)


def _digest(token) -> bytes:
    """What the broker keeps of an authentication token: its SHA-256."""
    return hashlib.sha256(bytes(token)).digest()


class _Tokens:
    """The core's check of a HELLO's token (``authenticate``): the accepted tokens' digests,
    and the failed authentications counted per client address."""

    def __init__(self, tokens: Iterable[bytes], failures: str | int):
        self.digests = [_digest(t) for t in tokens]
        self.failures = FailureLimit(failures, logger=log)

    def __call__(self, host: str | None, token: bytes | None) -> str | None:
        """None (accepted) or why the token is refused."""
        peer = peer_of(host)
        refusal = self.failures.refuse_now(peer)
        if refusal is not None:
            return (f"too many failed authentications from this address: retry in "
                    f"{max(1, round(refusal.retry_after))} s")
        if token is None or not self.accepted(token):
            self.failures.failed_now(peer, "missing token" if token is None else "unknown token")
            return "authentication failed: missing or unknown token"
        return None

    def accepted(self, token: bytes) -> bool:
        """Whether ``token`` is an accepted one, compared with every accepted token's digest
        in constant time (no early exit that would tell which, or how close)."""
        presented = _digest(token)
        accepted = False
        for digest in self.digests:
            accepted |= hmac.compare_digest(presented, digest)
        return accepted


class _Connection(BrokerProtocol, asyncio.BufferedProtocol):
    """One client connection: octets in to the core, queued frames out to the socket (every
    read is handled by the compiled ``BrokerProtocol``: ``get_buffer``, ``buffer_updated``
    and ``flush``)."""

    __slots__ = ()  # (the fields are BrokerProtocol's)
    broker: Broker
    core: BrokerCore
    state: Peer  # the core's side of the connection, from connection_made on
    transport: asyncio.Transport | None  # None once the connection is lost
    peer: object  # the client's socket address
    host: str | None  # counted against max_connections_per_peer

    def __init__(self, broker: Broker):
        self.broker = broker
        self.core = broker.core
        # the loop takes get_buffer before connection_made
        self.parser = msip.FrameParser(max_payload=broker.core.max_payload)
        self.whole_chunk = broker.ssl is None  # (TLS slices what get_buffer hands out)

    def __repr__(self):
        return repr(self.peer)

    # what the core knows of the connection, by the names the broker always used
    @property
    def session(self):
        return self.state.session

    @property
    def paused(self) -> bool:
        return self.state.paused

    @property
    def last_rx(self) -> float:
        return self.state.last_rx

    @last_rx.setter
    def last_rx(self, value: float) -> None:
        self.state.last_rx = value

    # -- asyncio.BufferedProtocol (get_buffer, buffer_updated: BrokerProtocol's) --------
    def connection_made(self, transport):
        self.transport = transport
        b = self.broker
        self.state = b.core.open(time.monotonic(), handle=self, parser=self.parser)
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
            self.host = self.state.host = host
            b._per_peer.add(host)

    def connection_lost(self, exc):
        b = self.broker
        b._forget_conn(self)
        self.transport = None
        b.core.lost(self.state, time.monotonic())
        b.write_out()
        if not b._conns and b._all_closed is not None:
            b._all_closed.set()

    def eof_received(self):
        return False

    def pause_writing(self):
        self.broker.core.set_writable(self.state, False)

    def resume_writing(self):
        self.broker.core.set_writable(self.state, True)
        self.flush()  # (and reads again, if it had stopped)
        self.broker.write_out()

    # -- output ------------------------------------------------------------------------
    def fail(self, reason: str) -> None:
        """Send an ERROR frame with ``reason`` after what is queued, then close."""
        if self.transport is not None:
            self.broker.core.fail(self.state, reason)
            self.broker.write_out()


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
        cluster: ``redis://HOST:PORT[/DB]`` (or ``rediss://``) or ``nats://HOST:PORT`` (or
            ``tls://``): join the other brokers using this Redis or NATS as one MSIP service
            (:mod:`mip.net.msip_cluster`, :mod:`mip.net.msip_nats`); None: alone.
        cluster_prefix: put before a topic to name its Redis channel or NATS subject (brokers
            of different services sharing one engine need different prefixes).
        cluster_max_pending: octets of local publishes queued for Redis at most; beyond it
            (Redis slow or down) they are not sent to the other brokers, counted in
            ``stats.cluster_dropped``.
        cluster_stream_max: events kept in Redis per topic that at-least-once sessions
            subscribe to (about: ``XADD MAXLEN ~``; NATS: in JetStream, every topic's), so that
            such a session resumes on any broker; 0: no streams, at-least-once sessions live
            in one broker's memory.
        cluster_max_patterns: distinct patterns this broker's at-least-once sessions have
            recorded in the engine at most (beyond, such a subscription stays in memory).
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
        cluster_stream_max: int = 10_000,
        cluster_max_patterns: int = 256,
    ):
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.write_buffer_high = write_buffer_high
        self._tokens = None if tokens is None else _Tokens(tokens, auth_failures)
        self.ssl = ssl
        self.core = BrokerCore(
            max_payload=max_payload, max_topic_length=max_topic_length,
            max_subscriptions=max_subscriptions, max_sessions=max_sessions,
            idle_timeout=idle_timeout, read_timeout=read_timeout, queue_limit=queue_limit,
            queue_bytes=queue_bytes, overflow=overflow, redelivery_timeout=redelivery_timeout,
            max_redeliveries=max_redeliveries, max_inflight=max_inflight,
            max_inflight_bytes=max_inflight_bytes, backlog_limit=backlog_limit,
            backlog_bytes=backlog_bytes, max_backlog_bytes=max_backlog_bytes,
            session_ttl=session_ttl, at_least_once=at_least_once, topic_patterns=topic_patterns,
            session_takeover=session_takeover,
            authenticate=self._tokens)
        self.stats = self.core.stats
        self._conns: set[_Connection] = set()
        self._per_peer = PeerCounts()
        self._server: asyncio.AbstractServer | None = None
        self._tick_task: asyncio.Task | None = None
        self._stopping = False
        self._all_closed: asyncio.Event | None = None
        self._write_soon: asyncio.Handle | None = None
        self.address: Address | None = None
        self._cluster = None
        if cluster is not None:
            from mip.net.msip_cluster import open_backplane
            self._cluster = self.core.backplane = open_backplane(
                self, cluster, prefix=cluster_prefix, max_pending=cluster_max_pending,
                stream_max=cluster_stream_max, max_patterns=cluster_max_patterns)
            # client ids name sessions across brokers: start each broker's at a random place
            self.core._next_id = (int.from_bytes(os.urandom(6), "big") << 14) + 1

    @property
    def _sessions(self):
        return self.core._sessions

    @property
    def _exact(self):
        return self.core._exact

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, url: str | None = None, *, host: str | None = None,
                    port: int | None = None, path: str | None = None) -> Address:
        """Listen on ``url`` (``tcp://HOST:PORT``, port 0 = any free port, or
        ``unix:///PATH``), or on ``host``/``port``, or on the Unix socket ``path``.
        Returns the bound address (with the real port)."""
        addr: Address
        if url is not None:
            addr = parse_url(url)
        elif path is not None:
            addr = UnixAddress(path)
        else:
            addr = TcpAddress(host or "127.0.0.1", port or 0)
        loop = asyncio.get_running_loop()
        self._stopping = False
        if isinstance(addr, UnixAddress):
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
            self.address = TcpAddress(addr.host, sockname[1])
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
            for conn in list(self._conns):
                if conn.transport is not None:
                    self.core.close(conn.state, _CLOSE_FRAME)
            self.write_out()
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
        if self._write_soon is not None:
            self._write_soon.cancel()
            self._write_soon = None
        self.core.reset()

    async def __aenter__(self) -> "Broker":
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- moving what the core decided ------------------------------------------------------
    def write_out(self) -> None:
        """Write the frames the core queued, and close the connections it ended (after
        anything that changed the core outside a connection's own event: a backplane's
        delivery or replay)."""
        write_out(self.core)

    def deliver_remote(self, payload, kind: int, flags: int, msg_id: int,
                        sid: tuple | None = None, own: bool = False, apart: bool = False) -> None:
        """Deliver a publish another broker received (``payload``: its PUBLISH payload) to
        this broker's subscribers, as a local one is (``sid``, ``own``, ``apart``: see
        :meth:`BrokerCore.deliver_remote`)."""
        self.core.deliver_remote(payload, kind, flags, msg_id, time.monotonic(), sid, own, apart)
        if self._write_soon is None:  # one write per connection for a batch from Redis
            self._write_soon = asyncio.get_running_loop().call_soon(self._write_out_soon)

    def _write_out_soon(self) -> None:
        self._write_soon = None
        self.write_out()

    # -- connections ----------------------------------------------------------------------
    def _make_room(self, newcomer: _Connection) -> bool:
        """Close the longest-silent connection that has not sent a complete frame (so has
        no session state), to make room for `newcomer`; False if there is none."""
        oldest = None
        for conn in self._conns:
            p = conn.state
            if (conn is not newcomer and p.consumed == 0 and not p.closing
                    and conn.transport is not None):
                if oldest is None or p.last_rx < oldest.state.last_rx:
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
        core = self.core
        candidates = [1.0, core.redelivery_timeout / 4]
        if core.idle_timeout:
            candidates.append(core.idle_timeout / 4)
        if core.read_timeout:
            candidates.append(core.read_timeout / 4)
        return max(0.02, min(candidates))

    async def _tick(self) -> None:
        interval = self._tick_interval()
        while True:
            await asyncio.sleep(interval)
            self.core.tick(time.monotonic())
            self.write_out()

    # -- introspection --------------------------------------------------------------------
    def session_info(self, client_id: int) -> dict | None:
        """Subscriptions, unacknowledged and backlog counts of a session (None if unknown)."""
        return self.core.session_info(client_id)

    def connection_stats(self) -> list[dict]:
        """Per-connection queue state: peer, client id, queued frames and octets, dropped."""
        return [{"peer": c.peer, "client_id": c.state.session.client_id,
                 "queued": len(c.state.urgent) + len(c.state.queue),
                 "queued_bytes": c.state.queued_bytes(),
                 "dropped": c.state.dropped, "paused": c.state.paused} for c in self._conns]

    @property
    def port(self) -> int | None:
        """The TCP port listened on (after :meth:`start`)."""
        return self.address.port if isinstance(self.address, TcpAddress) else None


def _core_setting(name: str) -> property:
    def get(self):
        return getattr(self.core, name)

    def set_(self, value):
        setattr(self.core, name, value)

    return property(get, set_, doc=f"The core's ``{name}`` (see the class docstring).")


# the limits and switches the core applies, under the broker's names
for _name in ("max_payload", "max_topic_length", "max_subscriptions", "max_sessions",
              "idle_timeout", "read_timeout", "queue_limit", "queue_bytes", "overflow",
              "redelivery_timeout", "max_redeliveries", "max_inflight", "max_inflight_bytes",
              "backlog_limit", "backlog_bytes", "max_backlog_bytes", "session_ttl",
              "at_least_once", "topic_patterns", "session_takeover"):
    setattr(Broker, _name, _core_setting(_name))
del _name


def serve(url: str = "tcp://127.0.0.1:7000", **options) -> None:
    """Run a broker on ``url`` until interrupted (uses uvloop when it is installed)."""
    async def main():
        broker = Broker(**options)
        await broker.start(url)
        try:
            await asyncio.Event().wait()
        finally:
            await broker.stop()

    run(main())
