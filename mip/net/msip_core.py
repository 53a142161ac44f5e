"""The MSIP broker's core, without I/O: what `mip broker` decides, apart from moving bytes.

:class:`BrokerCore` keeps the sessions, the subscription tables and the routing, the
at-least-once in-flight events and the away backlogs, and each connection's outgoing queue.
It never reads a clock nor touches a socket: every entry point takes ``now`` (seconds, any
monotonic origin), and its effects are

* frames queued on connections (:class:`Peer`): ``peer.take(limit)`` hands out what to write,
  in the order the frames were produced; :attr:`BrokerCore.dirty` holds the peers that have
  frames to write;
* connections to close (:attr:`BrokerCore.closing`): ``peer.close_mode`` is ``"close"`` (write
  what is queued, ERROR included, then close) or ``"abort"`` (drop it, abort), and
  ``peer.close_reason`` says why (None for a CLOSE or ERROR from the client, or a shutdown).

The transport (``mip.net.msip_broker``) admits connections, hands received octets to
:meth:`BrokerCore.data_received`, reports a socket that stops or starts accepting writes
(:meth:`BrokerCore.set_writable`) and a lost connection (:meth:`BrokerCore.lost`), calls
:meth:`BrokerCore.tick` on a timer, and after each of those writes what ``dirty`` and
``closing`` name. The behaviour itself is described in ``mip.net.msip_broker`` and
docs/msip.md.

Routing one PUBLISH to N subscribers encodes the EVENT once; each connected, writable,
at-most-once subscriber then costs one append of the same shared entry to its queue (the
route of a topic is computed once and kept until a subscription, a session's connection or a
connection's writability changes).

The hot path is compiled (``mip.protocol._msip``: ``receive``, and for the broker's
connections ``BrokerProtocol`` and ``write_out``): a PING, and the PUBLISH of a topic whose
route is kept and has only such subscribers (without a backplane), are handled there without
calling back into this module; every other frame goes to :meth:`BrokerCore._dispatch`. A
connection's fields are C fields (``PeerState``) so that path reads them directly.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import struct
from typing import TYPE_CHECKING, Callable

from mip import msip
from mip.net.msip_topics import match_tokens, pattern_tokens
from mip.protocol._msip import CoreState, PeerState, receive, take_queued

if TYPE_CHECKING:
    from mip.net.msip_cluster import Backplane

__all__ = ["BrokerCore", "BrokerStats", "Peer", "OVERFLOW_DROP_OLDEST", "OVERFLOW_DISCONNECT"]

log = logging.getLogger("mip.msip.broker")

OVERFLOW_DROP_OLDEST = "drop_oldest"
OVERFLOW_DISCONNECT = "disconnect"
CLOSE, ABORT = "close", "abort"  # Peer.close_mode

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
_INLINE_MAX = 16 * 1024  # octets: smaller events are queued as one joined bytes object
_ROUTES_MAX = 65536  # topics whose route is kept at most (the cache is emptied beyond)
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_LOCAL, _REMOTE, _OWN = range(3)  # where an event comes from: a client here, another broker,
# or this broker's own publish back from the backplane (for its recorded subscriptions)
_UNSUPPORTED = "Invalid frame or unsupported operation"  # the reference's ERROR text
_AUTH_REQUIRED = "authentication required: send HELLO with a token first"


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
    #: events dropped from full away-session backlogs (a resume's catch-up from a backplane
    #: included: what it reads that the session missed is kept as a backlog until handed over)
    dropped_backlog: int = 0
    backlog_bytes: int = 0  #: octets held now in backlogs (all sessions; catch-ups included)
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

    __slots__ = ("msg_id", "item", "size", "urgent", "reliable", "deadline", "attempts", "alive",
                 "stream")

    def __init__(self, msg_id, item, size, urgent, reliable, deadline=0.0, stream=None):
        self.msg_id = msg_id
        self.item = item
        self.size = size
        self.urgent = urgent
        self.reliable = reliable
        self.deadline = deadline
        self.attempts = 1
        self.alive = True
        self.stream = stream  # (topic, stream id) of an event read from the backplane's stream


class _Stream:
    """Where an at-least-once session is in a topic's backplane stream (stream ids are
    (milliseconds, sequence) tuples): the last id routed to it, the ids delivered and not yet
    acknowledged (in order), the highest id delivered, and the live events held back while the
    stream is read from the session's recorded position (``catching``, None once caught up),
    the first of them (``live``: events from there on were published while the session was
    here, not missed)."""

    __slots__ = ("last", "unacked", "tracked", "catching", "overflowed", "live")

    def __init__(self):
        self.last = (0, 0)
        self.unacked: dict[tuple, None] = {}
        self.tracked = (0, 0)
        self.catching: list | None = []
        self.overflowed = False  # live events held back were dropped: read the stream again
        self.live: tuple | None = None


class _Session:
    """Subscriptions, unacknowledged events and the away backlog of one client id."""

    __slots__ = ("client_id", "subs", "conn", "inflight", "inflight_bytes", "by_msg_id", "seq",
                 "backlog", "backlog_bytes", "detached_at", "durable", "patterns", "streams")

    def __init__(self, client_id: int | None):
        self.client_id = client_id  # None: anonymous (a connection before HELLO)
        self.subs: dict[str, bool] = {}  # topic or pattern -> at-least-once
        self.conn: Peer | None = None
        self.inflight: dict[int, _Held] = {}  # delivery sequence number -> pending event
        self.inflight_bytes = 0
        self.by_msg_id: dict[int, collections.deque] = {}
        self.seq = 0
        self.backlog: collections.deque = collections.deque()  # of _Held
        self.backlog_bytes = 0
        self.detached_at = 0.0
        self.durable = False  # HELLO asked for at-least-once: acks, kept while away
        self.patterns = False  # wildcard topics for this session's subscriptions
        self.streams: dict[str, _Stream] = {}  # at-least-once topics recorded by the backplane


class Peer(PeerState):
    """One connection as the core sees it: its frame parser, session and outgoing queue.

    ``queue`` holds ``(item, size, is_event)`` entries in the order produced (``item``: bytes,
    or a (header, payload) tuple); ``urgent`` holds URGENT events that arrived while the socket
    was not writable, written first. ``qbytes`` counts the octets queued while not writable
    (it is not kept while the socket accepts writes: the queue is then written out after every
    entry point)."""

    __slots__ = ()  # the fields are PeerState's (compiled: the hot path reads them)

    def __init__(self, core: "BrokerCore", host: str | None, now: float, handle=None,
                 parser: msip.FrameParser | None = None):
        self.core = core
        self.parser = msip.FrameParser(max_payload=core.max_payload) if parser is None else parser
        self.session = _Session(None)
        self.session.conn = self
        self.host = host
        self.authenticated = core.authenticate is None
        self.closing = False
        self.close_mode = None
        self.close_reason = None  # what the ERROR said, or why it was aborted
        self.paused = False
        self.urgent = collections.deque()
        self.queue = collections.deque()
        self.qbytes = 0
        self.dropped = 0
        self.last_rx = now
        self.pinged = False
        self.rx_total = 0
        self.consumed = 0
        self.partial_since = None
        self.reading_paused = False  # the transport stopped reading (its replies back up)
        self.handle = handle  # the transport's object for this connection

    def __repr__(self):
        return f"<Peer {self.session.client_id} {self.handle!r}>"

    # -- output ------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Queue a control frame (a reply) after what is queued."""
        if self.closing:
            return
        self.queue.append((data, len(data), False))
        if self.paused:
            self.qbytes += len(data)
        self.core.dirty[self] = None

    def enqueue(self, item, size: int, urgent: bool) -> None:
        """Queue one EVENT (``item`` is bytes or a (header, payload) tuple of ``size`` octets)."""
        if self.closing:
            return
        core = self.core
        if self.paused:
            # URGENT overtakes only events held back by a slow socket, never a reply
            (self.urgent if urgent else self.queue).append((item, size, True))
            self.qbytes += size
            if (len(self.urgent) + len(self.queue) > core.queue_limit
                    or self.qbytes > core.queue_bytes):
                self._overflow()
        else:
            self.queue.append((item, size, True))
        core.dirty[self] = None

    def backed_up(self) -> bool:
        """Whether the socket is not writable and the queue is past its bounds (the client
        does not read its replies: the transport should stop reading its requests)."""
        core = self.core
        return self.paused and not self.closing and (
            self.qbytes > core.queue_bytes or len(self.urgent) + len(self.queue) > core.queue_limit)

    def queued_bytes(self) -> int:
        return sum(e[1] for e in self.urgent) + sum(e[1] for e in self.queue)

    def take(self, limit: int) -> tuple[list, int]:
        """Take queued frames (urgent first) of about ``limit`` octets: (chunks, octets)."""
        chunks, n = take_queued(self.urgent, self.queue, limit)  # bytes in a row joined
        if self.paused:
            self.qbytes -= n
        return chunks, n

    def _overflow(self):
        core = self.core
        stats = core.stats
        if core.overflow == OVERFLOW_DISCONNECT:
            stats.slow_disconnects += 1
            log.info("closing slow subscriber %r: outgoing queue full", self.handle)
            self.urgent.clear()
            self.queue.clear()
            self.qbytes = 0
            core._set_closing(self, ABORT, "outgoing queue full")
            return
        replies = []  # replies are never dropped: only events are (set aside, still counted)
        while (len(self.urgent) + len(self.queue) + len(replies) > core.queue_limit
               or self.qbytes > core.queue_bytes):
            q = self.queue if self.queue else self.urgent
            if len(q) == 0:
                break
            entry = q.popleft()
            if not entry[2]:
                replies.append(entry)
                continue
            self.qbytes -= entry[1]
            self.dropped += 1
            stats.dropped_overflow += 1
        if replies:
            self.queue.extendleft(reversed(replies))


class BrokerCore(CoreState):
    """Sessions, subscriptions, routing, in-flight events and backlogs of an MSIP broker.

    The limits are :class:`~mip.net.msip_broker.Broker`'s arguments of the same names.
    ``authenticate(host, token)`` (None: no authentication) returns None to accept a HELLO's
    token (``None`` when absent) or the reason to refuse it. ``backplane``, when set, is told
    of every topic or pattern that gains its first or loses its last subscriber
    (``interest(topic, is_pattern, on)``) and of every local publish
    (``publish(topic_octets, payload, msg_kind, flags, msg_id)``). The fields the compiled
    path reads (``dirty``, ``closing``, ...) are C fields (``CoreState``).
    """

    def __init__(self, *, max_payload: int = 16 * 1024 * 1024, max_topic_length: int = 1024,
                 max_subscriptions: int = 1024, max_sessions: int = 10_000,
                 idle_timeout: float | None = None, read_timeout: float | None = 30.0,
                 queue_limit: int = 10_000, queue_bytes: int = 8 * 1024 * 1024,
                 overflow: str = OVERFLOW_DROP_OLDEST, redelivery_timeout: float = 30.0,
                 max_redeliveries: int | None = 10, max_inflight: int = 10_000,
                 max_inflight_bytes: int = 16 * 1024 * 1024, backlog_limit: int = 1000,
                 backlog_bytes: int = 1024 * 1024, max_backlog_bytes: int = 64 * 1024 * 1024,
                 session_ttl: float = 60.0,
                 authenticate: Callable[[str | None, bytes | None], str | None] | None = None,
                 at_least_once: bool = True, topic_patterns: bool = False,
                 session_takeover: bool = False, stats: BrokerStats | None = None):
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
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.queue_limit = queue_limit
        self.queue_bytes = queue_bytes
        self.overflow = overflow
        self.redelivery_timeout = redelivery_timeout
        self.max_redeliveries = max_redeliveries
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.backlog_limit = backlog_limit
        self.backlog_bytes = backlog_bytes
        self.max_backlog_bytes = max_backlog_bytes
        self.session_ttl = session_ttl
        self.authenticate = authenticate
        self.at_least_once = at_least_once
        self.topic_patterns = topic_patterns
        self.session_takeover = session_takeover
        self.stats = BrokerStats() if stats is None else stats
        self.backplane: Backplane | None = None
        #: peers with frames to write, in the order they got them
        self.dirty: dict[Peer, None] = {}
        #: peers to close (``peer.close_mode``), in the order decided
        self.closing: list[Peer] = []
        #: open connections
        self.peers: dict[Peer, None] = {}
        self._sessions: dict[int | None, _Session] = {}  # client id -> attached or durable away session
        self._away: dict[_Session, None] = {}  # durable sessions without a connection, oldest first
        self._kept: collections.deque = collections.deque()  # (session, _Held) of every backlog
        self._kept_live = 0
        self._next_id = 1
        self._ping_id = 0
        self._exact: dict[str, dict[_Session, bool]] = {}
        self._patterns: dict[str, tuple[tuple[str, ...], dict[_Session, bool]]] = {}
        # topic -> (appends of the fast subscribers' queues, their peers, (session, reliable)
        # of the others)
        self._routes: dict[str, tuple] = {}
        # the same routes by the topic's UTF-8 octets, for the compiled PUBLISH path
        # (mip.protocol._msip._dispatch_frames): [appends, peers, any others, its own memo]
        self._broutes: dict[bytes, list] = {}
        # literal topic -> local at-least-once subscriptions fed from the backplane's stream
        self._streamed: dict[str, int] = {}

    # -- entry points ---------------------------------------------------------------------
    def open(self, now: float, host: str | None = None, handle=None,
             parser: msip.FrameParser | None = None) -> Peer:
        """A new connection (``host``: the client's address, for authentication limits;
        ``parser``: its frame parser, made with ``max_payload`` if None)."""
        peer = Peer(self, host, now, handle, parser)
        self.peers[peer] = None
        self.stats.connections = len(self.peers)
        return peer

    def data_received(self, peer: Peer, nbytes: int, now: float) -> None:
        """``nbytes`` were written into ``peer.parser.get_buffer()``: handle the frames."""
        if peer.closing:
            return
        receive(self, peer, nbytes, None, now)  # frames -> self._dispatch

    def feed(self, peer: Peer, data, now: float) -> None:
        """Handle received octets (a copy into the parser; tests, or a plain ``Protocol``)."""
        if peer.closing:
            return
        receive(self, peer, len(data), data, now)

    def set_writable(self, peer: Peer, writable: bool) -> None:
        """The socket stopped (False) or started again (True) accepting writes (then the
        peer is in :attr:`dirty` if it has frames queued)."""
        if peer.paused == (not writable):
            return
        peer.paused = not writable
        peer.qbytes = 0 if writable else peer.queued_bytes()
        self._forget_routes()
        if writable and (peer.queue or peer.urgent):
            self.dirty[peer] = None

    def lost(self, peer: Peer, now: float) -> None:
        """The connection is gone: what is queued is dropped, its session detached."""
        peer.closing = True
        peer.urgent.clear()
        peer.queue.clear()
        peer.qbytes = 0
        self.dirty.pop(peer, None)
        self.peers.pop(peer, None)
        self.stats.connections = len(self.peers)
        self._forget_routes()
        session = peer.session
        if session.conn is not peer:
            return
        session.conn = None
        if session.durable:
            self._set_away(session, now)
        else:
            self._forget(session)

    def fail(self, peer: Peer, reason: str) -> None:
        """Send an ERROR frame with ``reason`` (UTF-8) after what is queued, then close."""
        if peer.closing:
            return
        self.stats.errors += 1
        log.debug("closing %r: %s", peer.handle, reason)
        peer.send(msip.encode(_ERROR, _K_EVENT, reason.encode("utf-8", "replace"), 0, 0))
        self._set_closing(peer, CLOSE, reason)

    def close(self, peer: Peer, frame: bytes | None = None) -> None:
        """Send ``frame`` (if any) after what is queued, then close."""
        if peer.closing:
            return
        if frame is not None:
            peer.send(frame)
        self._set_closing(peer, CLOSE)

    def _forget_routes(self) -> None:
        """A subscription, a session's connection or a connection's state changed."""
        self._routes.clear()
        self._broutes.clear()

    def _set_closing(self, peer: Peer, mode: str, reason: str | None = None) -> None:
        peer.closing = True
        peer.close_mode = mode
        peer.close_reason = reason
        self.closing.append(peer)
        self._forget_routes()

    def tick(self, now: float) -> None:
        """Timers: read and idle timeouts, idle PINGs, redelivery, away sessions' TTL."""
        for peer in list(self.peers):
            if not peer.closing:
                self._check_peer(peer, now)
        self._redeliver(now)
        for s in list(self._away):  # oldest first
            if now - s.detached_at <= self.session_ttl:
                break
            self._forget(s)
            self.stats.sessions_expired += 1

    def _check_peer(self, peer: Peer, now: float) -> None:
        if (self.read_timeout and peer.partial_since is not None and not peer.reading_paused
                and now - peer.partial_since > self.read_timeout):
            self.fail(peer, f"read timeout: frame incomplete after {self.read_timeout} s")
            return
        if self.idle_timeout:
            silent = now - peer.last_rx
            if silent > 2 * self.idle_timeout:
                self.fail(peer, f"idle timeout: nothing received for {silent:.1f} s")
                return
            if silent > self.idle_timeout and not peer.pinged:
                peer.pinged = True
                self._ping_id += 1
                peer.send(msip.encode_header(_PING, _K_EVENT, 0, self._ping_id, 0))

    def deliver_remote(self, payload, kind: int, flags: int, msg_id: int, now: float,
                       sid: tuple | None = None, own: bool = False, apart: bool = False) -> None:
        """Deliver a publish another broker received (``payload``: its PUBLISH payload) to
        this broker's subscribers, as a local one is. ``sid``: its id in the topic's stream
        (the backplane recorded it). ``own``: this broker's own publish coming back, for the
        subscriptions fed from the stream only (the others had it at once). ``apart``: for
        all but those (they get it from the stream, apart)."""
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
        if not own:
            self.stats.cluster_received += 1
        self._route_event(topic, payload, flags & _F_COMPRESSED, flags & _F_URGENT, msg_id, now,
                          _OWN if own else _LOCAL if apart else _REMOTE, sid)

    def stream_replay(self, session: _Session, topic: str, entries, done: bool,
                      now: float, live: tuple | None = None) -> tuple | None:
        """Events read from ``topic``'s stream from the session's recorded position
        (``entries``: (stream id, PUBLISH payload, EVENT flags, msg_id), in stream order);
        ``done``: the stream is read to its end, the live events held back meanwhile follow.
        ``live``: the stream id of the first live event the backplane holds back for the
        session meanwhile, if it holds them (the core holds a literal topic's). Returns the
        stream id to read on from (exclusive), or None: caught up, or the subscription is gone.

        The events the session missed (before the first live one) are kept in its backlog
        until the stream is read up to the live ones, bounded as an away session's backlog is
        (``backlog_limit`` events and ``backlog_bytes`` octets a session, ``max_backlog_bytes``
        in total; the oldest dropped and counted in ``stats.dropped_backlog``): a resume is
        handed at most what an away session keeps, however many it missed. The live ones
        follow them, delivered as they would have been."""
        st = session.streams.get(topic)
        if st is None or self._sessions.get(session.client_id) is not session:
            return None  # unsubscribed or ended meanwhile
        catching = st.catching is not None
        if catching and live is not None and (st.live is None or live < st.live):
            st.live = live
        for sid, payload, flags, msg_id in entries:
            if sid > st.last:
                st.last = sid
                missed = catching and (st.live is None or sid < st.live)
                if catching and not missed:
                    self._deliver_backlog(session, now)  # the missed ones first
                self._deliver_stream(session, topic, payload, flags & _F_COMPRESSED,
                                     flags & _F_URGENT, msg_id, sid, now, missed)
        if not done or not catching:
            return st.last if catching else None
        if st.overflowed:  # too many live events while reading: read on from the last one
            st.overflowed = False
            st.catching = []
            return st.last
        held, st.catching = st.catching or (), None
        self._deliver_backlog(session, now)  # (an away session keeps it)
        for sid, payload, compressed, urgent, msg_id in held:
            if sid > st.last:
                st.last = sid
                self._deliver_stream(session, topic, payload, compressed, urgent, msg_id, sid,
                                     now)
        return None

    def stream_declined(self, session: _Session, topic: str) -> None:
        """The backplane does not record ``topic`` for the session after all (it records as
        many patterns as it can already): the subscription is served from this broker's
        memory, as without a backplane (its events routed here, kept here while away)."""
        if topic in session.streams:
            self._unstream(session, topic, False)
            self._forget_routes()

    def restore_subscriptions(self, session: _Session, topics) -> None:
        """At-least-once subscriptions the backplane recorded for a session resuming here
        (those it has not made again itself, within ``max_subscriptions``)."""
        if self._sessions.get(session.client_id) is not session or not session.durable:
            return
        for topic in topics:
            if (topic not in session.subs and len(session.subs) < self.max_subscriptions
                    and len(topic.encode("utf-8")) <= self.max_topic_length):
                self._subscribe(session, topic, True)

    def stream_sessions(self) -> list[tuple[int, list[str]]]:
        """(client id, recorded topics) of the sessions whose subscriptions the backplane
        records (connected or away), for it to keep their records alive: the topics whose
        record is made (the stream read from it once)."""
        found = []
        for s in self._sessions.values():
            topics = [t for t, st in s.streams.items() if st.catching is None]
            if topics and s.client_id is not None:
                found.append((s.client_id, topics))
        return found

    def _deliver_stream(self, session, topic, payload, compressed, urgent, msg_id, sid, now,
                        catching=False):
        """An event of ``topic``'s stream for the session: delivered, or (``catching``: one it
        missed, read by a catch-up) kept in its backlog until the catch-up is done."""
        n = len(payload)
        item = msip.encode_header(_EVENT, _K_EVENT, n, msg_id, compressed) + bytes(payload)
        if catching and session.durable:
            self._keep(session, _Held(msg_id, item, _HDR + n, bool(urgent), True,
                                      stream=(topic, sid)))
        else:
            self._deliver(session, item, _HDR + n, bool(urgent), True, msg_id, now, (topic, sid))

    def reset(self) -> None:
        """Forget every session and subscription (the broker stopped)."""
        for session in list(self._sessions.values()):
            self._forget(session)
        self._sessions.clear()
        self._exact.clear()
        self._patterns.clear()
        self._forget_routes()
        self.stats.sessions = 0

    # -- frames ----------------------------------------------------------------------------
    def _dispatch(self, conn: Peer, f, now: float) -> None:
        ft = f.frame_type
        if ft == _PUBLISH:
            if not conn.authenticated:
                self.fail(conn, _AUTH_REQUIRED)
                return
            self._publish(conn, f, now)
        elif ft == _ACK:
            self._ack(conn.session, f.msg_id)
        elif ft == _PING:
            conn.send(msip.encode_header(_PONG, _K_EVENT, 0, f.msg_id, 0))
        elif ft == _SUBSCRIBE or ft == _UNSUBSCRIBE:
            if not conn.authenticated:
                self.fail(conn, _AUTH_REQUIRED)
                return
            self._subscribe_frame(conn, f, ft == _SUBSCRIBE)
        elif ft == _HELLO:
            self._hello(conn, f, now)
        elif ft == _CLOSE:
            self._end_session(conn)
            self.close(conn)
        elif ft == _PONG:
            pass  # answer to our idle PING; last_rx is already updated
        elif ft == _ERROR:
            self.close(conn)
        else:
            self.fail(conn, f"{_UNSUPPORTED}: frame type {int(ft)} is sent by the broker, not to it")

    def _hello(self, conn: Peer, f, now: float) -> None:
        payload = f.payload
        client_id = None
        token = None
        if len(payload) >= 8:
            client_id, token = msip.decode_hello_payload(payload)
        if self.authenticate is not None:
            refusal = self.authenticate(conn.host, None if token is None else bytes(token))
            if refusal is not None:
                self.fail(conn, refusal)
                return
            conn.authenticated = True
        flags = f.flags
        durable = self.at_least_once and bool(flags & _F_ACK_REQUIRED)
        takeover = self.session_takeover or bool(flags & _F_TAKEOVER)
        session, resumed, took_over = self._bind(conn, client_id or None, durable, takeover, now)
        self._set_patterns(session, bool(flags & _F_PATTERNS))
        reply = _U64.pack(session.client_id)
        if flags & _F_HELLO_EXT:
            caps = ((_CAP_AT_LEAST_ONCE if session.durable else 0)
                    | (_CAP_PATTERNS if session.patterns or self.topic_patterns else 0)
                    | (_CAP_TAKEOVER if took_over else 0))
            reply += _U32.pack(caps)
        conn.send(msip.encode(_ACK, _K_STATE, reply, f.msg_id, 0))
        if resumed:  # the session comes back on a new connection
            self._resume_delivery(session, now)
        elif (client_id and session.durable and session.client_id == client_id
                and self.backplane is not None and self.backplane.streams):
            # maybe a session whose broker died: its subscriptions may be recorded
            self.backplane.restore(session)

    def _bind(self, conn: Peer, client_id: int | None, durable: bool,
              takeover: bool, now: float) -> tuple[_Session, bool, bool]:
        """The session a HELLO gives ``conn``: (session, resumed, took over a connection).

        What the connection did before (subscriptions of an anonymous or plain session) moves
        into it; an at-least-once session the connection had is left away."""
        current: _Session = conn.session
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
        self._forget_routes()
        if existing is not None:
            self._away.pop(existing, None)
            self.stats.sessions_away = len(self._away)
            self._leave(current, existing, now)
            existing.conn = conn
            conn.session = existing
            return existing, True, took_over
        if current.durable:
            self._leave(current, None, now)
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
        assert old is not None  # only an attached session is taken over
        self.stats.takeovers += 1
        session.conn = None
        old.session = fresh = _Session(None)
        fresh.conn = old
        self.fail(old, f"session {session.client_id} taken over by a newer connection")

    def _leave(self, current: _Session, into: _Session | None, now: float) -> None:
        """The connection of ``current`` moves on: an at-least-once session goes away, any
        other has its subscriptions moved ``into`` the connection's next session (or ended)."""
        if current.durable:
            current.conn = None
            self._set_away(current, now)
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

    def _set_away(self, session: _Session, now: float) -> None:
        session.detached_at = now
        self._away[session] = None
        while len(self._away) > self.max_sessions:  # the longest away are forgotten first
            self._forget(next(iter(self._away)))
            self.stats.sessions_expired += 1
        self.stats.sessions_away = len(self._away)

    def _forget(self, session: _Session) -> None:
        self._clear_backlog(session)  # (first: unstreaming a topic then looks through it)
        for topic in list(session.streams):  # the backplane's record outlives this broker's
            self._unstream(session, topic, False)
        for topic in list(session.subs):
            self._unsubscribe(session, topic)
        if session.client_id is not None and self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
        self._away.pop(session, None)
        session.inflight.clear()
        session.inflight_bytes = 0
        session.by_msg_id.clear()
        session.durable = False
        self.stats.sessions = len(self._sessions)
        self.stats.sessions_away = len(self._away)

    def _end_session(self, conn: Peer) -> None:
        """CLOSE: the connection's session ends now, whatever it asked for."""
        session = conn.session
        if session.conn is conn:
            if session.streams and self.backplane is not None:
                self.backplane.drop(session.client_id)
            self._forget(session)
            conn.session = fresh = _Session(None)
            fresh.conn = conn

    def _subscribe_frame(self, conn: Peer, f, subscribe: bool) -> None:
        raw = f.payload
        if len(raw) > self.max_topic_length:
            self.fail(conn, f"topic too long: {len(raw)} octets (limit {self.max_topic_length})")
            return
        try:
            topic = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(conn, f"{_UNSUPPORTED}: topic is not UTF-8")
            return
        session = conn.session
        if subscribe:
            if topic not in session.subs and len(session.subs) >= self.max_subscriptions:
                self.fail(conn, f"too many subscriptions (limit {self.max_subscriptions} a session)")
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
                if self.backplane is not None:
                    self.backplane.interest(topic, False, True)
        else:
            entry = self._patterns.get(topic)
            if entry is None:
                entry = self._patterns[topic] = (tokens, {})
                if self.backplane is not None:
                    self.backplane.interest(topic, True, True)
            table = entry[1]
        table[session] = reliable
        self._forget_routes()
        bp = self.backplane
        if topic in session.streams:
            if not reliable:
                self._unstream(session, topic, True)
        elif (reliable and bp is not None and bp.streams
                and session.client_id is not None):
            session.streams[topic] = _Stream()
            self._streamed[topic] = self._streamed.get(topic, 0) + 1
            bp.begin(session, topic)

    def _unstream(self, session: _Session, topic: str, tell: bool) -> None:
        """The backplane stops recording ``topic`` for the session (``tell``: forget its
        position there too)."""
        del session.streams[topic]
        if session.backlog:  # what a catch-up of the topic kept: the subscription ended
            for kept in session.backlog:
                if kept.stream is not None and kept.stream[0] == topic:
                    self._unkeep(session, kept)
            session.backlog = collections.deque(k for k in session.backlog if k.alive)
        n = self._streamed[topic] - 1
        if n:
            self._streamed[topic] = n
        else:
            del self._streamed[topic]
        if tell and self.backplane is not None and session.client_id is not None:
            self.backplane.unstream(session.client_id, topic)  # (a recorded session has an id)

    def _unsubscribe(self, session: _Session, topic: str) -> None:
        if session.subs.pop(topic, None) is None:
            return
        if topic in session.streams:
            self._unstream(session, topic, True)
        table = self._exact.get(topic)
        if table is not None:
            table.pop(session, None)
            if not table:
                del self._exact[topic]
                if self.backplane is not None:
                    self.backplane.interest(topic, False, False)
        entry = self._patterns.get(topic)
        if entry is not None:
            entry[1].pop(session, None)
            if not entry[1]:
                del self._patterns[topic]
                if self.backplane is not None:
                    self.backplane.interest(topic, True, False)
        self._forget_routes()

    # -- routing ---------------------------------------------------------------------------
    def _route(self, topic: str) -> tuple:
        """Who gets an event on ``topic``: (appends of the queues of connected, writable,
        at-most-once subscribers; their peers; ((session, reliable), ...) of the others)."""
        route = self._routes.get(topic)
        if route is not None:
            return route
        found: dict[_Session, bool] = dict(self._exact.get(topic, ()))
        if self._patterns:
            parts = topic.split(".")
            for pattern, (tokens, table) in self._patterns.items():
                if match_tokens(tokens, parts):
                    for s, reliable in table.items():
                        if not (reliable and pattern in s.streams):  # fed by the backplane
                            found[s] = found.get(s, False) or reliable
        appends = []
        peers: dict = {}
        others = []
        for s, reliable in found.items():
            c = s.conn
            if c is not None and not reliable and not c.closing and not c.paused:
                appends.append(c.queue.append)
                peers[c] = None
            else:
                others.append((s, reliable))
        route = (tuple(appends), peers, tuple(others))
        if len(self._routes) > _ROUTES_MAX:
            self._routes.clear()
        self._routes[topic] = route
        return route

    def _publish(self, conn: Peer, f, now: float) -> None:
        payload = f.payload  # a view of the parser's chunk, which it keeps alive
        if len(payload) < 2:
            self.fail(conn, f"{_UNSUPPORTED}: PUBLISH payload shorter than its topic length")
            return
        tlen = (payload[0] << 8) | payload[1]
        if len(payload) < 2 + tlen:
            self.fail(conn, f"{_UNSUPPORTED}: PUBLISH topic length runs past the payload")
            return
        if tlen > self.max_topic_length:
            self.fail(conn, f"topic too long: {tlen} octets (limit {self.max_topic_length})")
            return
        try:
            topic = bytes(payload[2:2 + tlen]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(conn, f"{_UNSUPPORTED}: topic is not UTF-8")
            return
        self.stats.published += 1
        if self.backplane is None:  # the compiled path takes the topic's next publishes
            if len(self._broutes) > _ROUTES_MAX:
                self._broutes.clear()
            appends, peers, others = self._route(topic)
            self._broutes[bytes(payload[2:2 + tlen])] = [appends, peers, bool(others), None]
        fflags = f.flags
        compressed = 0
        if fflags & _F_COMPRESSED and payload[2 + tlen:6 + tlen] == ZSTD_MAGIC:
            compressed = _F_COMPRESSED
        msg_id = f.msg_id
        self._route_event(topic, payload, compressed, fflags & _F_URGENT, msg_id, now)
        if self.backplane is not None:
            self.backplane.publish(bytes(payload[2:2 + tlen]), payload, f.msg_kind,
                                   (fflags & _F_URGENT) | compressed, msg_id)
        # after the events it produced, as on the reference
        conn.send(msip.encode_header(_ACK, _K_STATE, 0, msg_id, 0))

    def _route_event(self, topic: str, payload, compressed: int, urgent: int, msg_id: int,
                     now: float, origin: int = _LOCAL, sid: tuple | None = None) -> None:
        """Queue the EVENT of a publish (``payload``: its PUBLISH payload) to its subscribers.

        Subscriptions the backplane records get a local publish only when it comes back from
        the backplane (``origin`` ``_OWN``), in the stream's order, with its stream id."""
        appends, peers, others = self._route(topic)
        if not (appends or others):
            return
        n = len(payload)
        header = msip.encode_header(_EVENT, _K_EVENT, n, msg_id, compressed)
        size = _HDR + n
        # small events: one joined object (a copy); large: header + the received view
        item = header + payload if n <= _INLINE_MAX else (header, payload)
        if appends and origin != _OWN:
            entry = (item, size, True)  # one entry shared by every queue
            for append in appends:
                append(entry)
            self.stats.delivered += len(appends)
            self.dirty.update(peers)
        if not others:
            return
        streamed = topic in self._streamed
        if origin == _OWN and not streamed:
            return
        urgent = bool(urgent)
        for session, reliable in others:
            st = session.streams.get(topic) if streamed and reliable else None
            stream = None
            if st is None:
                if origin == _OWN:
                    continue
            elif origin == _LOCAL:
                continue  # it comes back from the backplane with its stream id
            elif sid is not None:
                if st.catching is not None:  # the stream is being read up to now: after it
                    if len(st.catching) >= self.max_inflight:  # they are in the stream too
                        st.catching.clear()
                        st.overflowed = True
                    st.catching.append((sid, payload, compressed, urgent, msg_id))
                    if st.live is None or sid < st.live:
                        st.live = sid
                    continue
                if sid <= st.last:
                    continue  # read from the stream already
                st.last = sid
                stream = (topic, sid)
            if session.conn is None and type(item) is tuple:
                # kept for an away session: its own octets, not a view of a read buffer
                item = header + bytes(payload)
            self._deliver(session, item, size, urgent, reliable, msg_id, now, stream)

    def _deliver(self, session: _Session, item, size, urgent, reliable, msg_id, now,
                 stream=None) -> None:
        c = session.conn
        if c is not None:
            if reliable:
                self._track(session, msg_id, item, size, urgent, now, stream)
            self.stats.delivered += 1
            c.enqueue(item, size, urgent)
        elif session.durable:
            self._keep(session, _Held(msg_id, item, size, urgent, reliable, stream=stream))

    # -- away backlogs: bounded per session (messages, octets) and in total (octets) -------
    def _keep(self, session: _Session, kept: _Held) -> None:
        stats = self.stats
        if kept.size > self.backlog_bytes or kept.size > self.max_backlog_bytes:
            stats.dropped_backlog += 1
            return
        backlog = session.backlog
        while backlog and (len(backlog) >= self.backlog_limit
                           or session.backlog_bytes + kept.size > self.backlog_bytes):
            self._unkeep(session, backlog.popleft())
            stats.dropped_backlog += 1
        if self.backlog_limit <= 0:
            stats.dropped_backlog += 1
            return
        backlog.append(kept)
        session.backlog_bytes += kept.size
        stats.backlog_bytes += kept.size
        self._kept.append((session, kept))
        self._kept_live += 1
        kept_order = self._kept
        while stats.backlog_bytes > self.max_backlog_bytes and kept_order:
            owner, oldest = kept_order.popleft()
            if oldest.alive:  # the oldest kept event of the broker (it heads its backlog)
                owner.backlog.popleft()
                self._unkeep(owner, oldest)
                stats.dropped_backlog += 1
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

    # -- in flight: at-least-once events waiting for their ACK ----------------------------
    def _track(self, session: _Session, msg_id, item, size, urgent, now: float,
               stream=None) -> None:
        seq = session.seq = session.seq + 1
        session.inflight[seq] = _Held(msg_id, item, size, urgent, True,
                                      now + self.redelivery_timeout, stream)
        if stream is not None:
            st = session.streams.get(stream[0])
            if st is not None:
                st.unacked[stream[1]] = None
                if stream[1] > st.tracked:
                    st.tracked = stream[1]
        session.by_msg_id.setdefault(msg_id, collections.deque()).append(seq)
        session.inflight_bytes += size
        while len(session.inflight) > 1 and (len(session.inflight) > self.max_inflight
                                             or session.inflight_bytes > self.max_inflight_bytes):
            self._untrack(session, next(iter(session.inflight)))
            self.stats.dropped_inflight += 1

    def _untrack(self, session: _Session, seq: int) -> None:
        p = session.inflight.pop(seq)
        session.inflight_bytes -= p.size
        if p.stream is not None:
            self._stream_done(session, p.stream)
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
            if p.stream is not None:
                self._stream_done(session, p.stream)
        self.stats.acked += 1

    def _stream_done(self, session: _Session, stream: tuple) -> None:
        """An event read from a stream was acknowledged (or given up): the session's position
        there moves to its oldest unacknowledged event, or past the last one delivered."""
        topic, sid = stream
        st = session.streams.get(topic)
        if st is None or sid not in st.unacked:
            return
        del st.unacked[sid]
        pos = "%d-%d" % next(iter(st.unacked)) if st.unacked else "(%d-%d" % st.tracked
        if self.backplane is not None and session.client_id is not None:
            self.backplane.position(session.client_id, topic, pos)

    def _resume_delivery(self, session: _Session, now: float) -> None:
        """After HELLO: resend unacknowledged events, then what arrived while away."""
        conn = session.conn
        if conn is None:
            return
        for p in session.inflight.values():
            p.deadline = now + self.redelivery_timeout
            self.stats.redelivered += 1
            self.stats.delivered += 1
            conn.enqueue(p.item, p.size, p.urgent)
        self._deliver_backlog(session, now)

    def _deliver_backlog(self, session: _Session, now: float) -> None:
        """A connected session is handed its backlog, oldest first."""
        if session.conn is None:
            return
        for k in self._clear_backlog(session):
            self._deliver(session, k.item, k.size, k.urgent, k.reliable, k.msg_id, now, k.stream)

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
