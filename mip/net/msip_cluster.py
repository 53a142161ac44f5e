"""A backplane that joins several MSIP brokers into one service: Redis, or NATS
(:mod:`mip.net.msip_nats`).

:class:`Backplane` is what the broker and its core call, whatever the engine: a local
publish goes out (:meth:`Backplane.publish`, queued and bounded in octets), the topics local
sessions subscribe to come in (:meth:`Backplane.interest`), and at-least-once sessions'
positions are recorded (:meth:`Backplane.begin`, :meth:`Backplane.position`, ...). The engine
classes implement the sending, subscribing and recording. :func:`open_backplane` picks the
engine from the URL's scheme.

Redis: each broker given ``cluster="redis://HOST:PORT[/DB]"`` (``mip broker --cluster``) keeps two
connections to Redis:

* a publishing connection: every PUBLISH a local client makes is sent, after local delivery,
  as a Redis ``PUBLISH`` on the channel ``PREFIX + topic`` (one channel per MSIP topic), in
  batches (a Lua script that publishes a batch: one command and one reply for up to 1,024
  messages), from an outgoing queue bounded in octets (``max_pending``). What does not
  fit while Redis is slow or down is dropped and counted (``BrokerStats.cluster_dropped``), with
  a rate-limited WARNING; local delivery never waits for Redis.
* a subscribing connection that listens only to what local sessions subscribed to: a literal
  topic appearing in (disappearing from) the broker's subscription table becomes a Redis
  ``SUBSCRIBE`` (``UNSUBSCRIBE``) of its channel, sent in batches; a wildcard pattern
  (``--topic-patterns`` or ``Flags.PATTERNS``) becomes a ``PSUBSCRIBE`` of a glob that matches
  at least its topics (``*`` and a final ``>`` both become the glob ``*``), and the broker's own
  matching picks the sessions, as for a local publish. A message that several of the broker's
  Redis subscriptions match is delivered once.

The message is a compact binary envelope: version (1 octet), the publisher's msg_kind
(1 octet), the EVENT flags (COMPRESSED, URGENT; 1 octet), the origin broker's random id
(8 octets), the msg_id (8 octets), then the PUBLISH payload as received (topic length, topic,
data). A broker ignores envelopes carrying its own id (its clients already got the event) and
never sends to Redis what came from Redis, so there are no loops and no duplicates.

Redis pub/sub is at most once: what is published while a broker's subscribing connection is
down (Redis restarting, a broker reconnecting) is not delivered to that broker's clients, and a
client that moves to another broker receives what is published after it subscribed there.

At-least-once sessions (``stream_max`` > 0, ``mip broker --cluster-stream-max``, the default)
can resume on another broker: their backlog lives in Redis, not in one broker's memory.

* A broker with an at-least-once subscription to a literal topic keeps the key
  ``PREFIX + "want:" + topic`` alive in Redis (expiring ``session_ttl`` after its last
  refresh). While it exists, every broker's publish batch script also appends the envelope to
  the topic's stream ``PREFIX + "stream:" + topic`` (``XADD MAXLEN ~ stream_max``, in the same
  script as the ``PUBLISH``, so the stream's order is the channel's) and publishes a version-2
  envelope carrying the stream id. Topics nobody subscribes to at-least-once cost one
  ``EXISTS`` a message and no stream. One stream per topic: a session replays only its
  topics, with ``XRANGE`` from its position, and the bound is per topic.
* The session's record is the hash ``PREFIX + "session:" + client id``: topic -> position in
  the topic's stream (an ``XRANGE`` start: its oldest unacknowledged event, or ``(`` and the
  last one delivered when all are acknowledged). Positions move as ACKs arrive, written in one
  pipeline per pass of the session task; the record expires ``session_ttl`` after the last
  refresh, and a CLOSE deletes it.
* Such subscriptions get every event, local publishes included, from Redis, with its stream
  id: when one is made (a new subscription, or a session resuming here after its broker died),
  the broker reads the stream from the recorded position, holding back live events meanwhile,
  then continues live, skipping ids it has delivered. A session that resumes on a broker that
  does not hold it gets the subscriptions of its record back (``HKEYS``), unless it makes
  them again itself. At least once: what was delivered and
  not yet acknowledged when a broker died is delivered again. What such a read hands the
  session is bounded as an away session's backlog is: at most the newest ``backlog_limit``
  events and ``backlog_bytes`` octets of the session (``max_backlog_bytes`` of the broker's
  sessions in total), the older ones dropped and counted (``stats.dropped_backlog``), however
  many it missed.
* An at-least-once subscription to a wildcard pattern (a session with patterns) is recorded
  the same way, with one stream per pattern rather than per topic. The broker keeps the
  pattern in the hash ``PREFIX + "patterns"`` (pattern -> until when it is wanted, in Redis's
  clock, refreshed with the records), and the publish script matches each topic against the
  patterns there (one ``HGETALL`` a batch, then token comparisons with each pattern, a
  message): for each that matches, it appends the envelope to the pattern's stream
  ``PREFIX + "pstream:" + pattern`` (``MAXLEN ~ stream_max``) and publishes a version-3
  envelope, with that stream's id, on the pattern's feed channel (a NUL octet, ``PREFIX``,
  the pattern: no topic's channel), which the brokers recording the pattern subscribe to;
  such subscriptions get their events from there, in the stream's order (the broker's own
  matching leaves them out). The position is the record's field 0xFF + pattern (no UTF-8 topic is such
  a field). A resume reads that one stream from its position: ``stream_max`` entries at most
  (about), whatever the number of topics. A broker records at most
  ``max_patterns`` distinct patterns (``--cluster-max-patterns``; beyond, a subscription stays
  in its memory), which bounds the publish script's work a message by the brokers' sum.

Both connections reconnect with exponential backoff (0.1 s to 5 s). The broker starts even
when Redis is unreachable (it logs so and serves its local clients meanwhile).
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import logging
import os
import re
import struct
import time
from typing import Any

from mip.net.msip_topics import pattern_tokens

__all__ = ["Backplane", "RedisCluster", "ENVELOPE", "glob_of", "open_backplane"]

log = logging.getLogger("mip.msip.cluster")

#: version, msg_kind, EVENT flags, origin broker id, msg_id; then the PUBLISH payload
ENVELOPE = struct.Struct(">BBBQQ")
_VERSION = 1
_BATCH_MESSAGES = 1024  # messages in one batch at most
_BATCH_OCTETS = 1 << 20  # envelope octets in one batch at most (one message may be more)
# one command and one reply for a batch: PUBLISH channel envelope, for each pair of arguments
_PUBLISH_ALL = """
for i = 1, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"""
# Redis's clock in milliseconds, in a script
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# the same, and for a topic some at-least-once session records (its "want" key exists): XADD
# the envelope to the topic's stream first, and publish a version-2 envelope with the stream id;
# for each recorded pattern the topic matches (the hash "patterns": pattern -> until when it is
# wanted), XADD it to the pattern's stream and publish a version-3 envelope with that stream's
# id on the pattern's feed channel
_PUBLISH_STREAMED = """
local n = ARGV[1]
local pre = ARGV[2]
local plen = #pre
local function tokens(text)
  local out = {}
  for tok in string.gmatch(text .. '.', '([^.]*)%.') do
    out[#out + 1] = tok
  end
  return out
end
local function matches(pat, parts)
  for i = 1, #pat do
    if pat[i] == '>' then
      return #parts >= i
    end
    if i > #parts or (pat[i] ~= '*' and pat[i] ~= parts[i]) then
      return false
    end
  end
  return #pat == #parts
end
local pats = {}
local matched = {}  -- topic -> the patterns it matches
local wanted = redis.call('HGETALL', pre .. 'patterns')
if #wanted > 0 then""" + _NOW_MS + """
  for i = 1, #wanted, 2 do
    if tonumber(wanted[i + 1]) < now then
      redis.call('HDEL', pre .. 'patterns', wanted[i])
    else
      pats[#pats + 1] = {wanted[i], tokens(wanted[i])}
    end
  end
end
for i = 3, #ARGV, 2 do
  local channel, env = ARGV[i], ARGV[i + 1]
  local topic = string.sub(channel, plen + 1)
  local sent = env
  if redis.call('EXISTS', pre .. 'want:' .. topic) == 1 then
    local id = redis.call('XADD', pre .. 'stream:' .. topic, 'MAXLEN', '~', n, '*', 'e', env)
    sent = '\2' .. string.char(#id) .. id .. string.sub(env, 2)
  end
  redis.call('PUBLISH', channel, sent)
  if #pats > 0 then
    local hits = matched[topic]
    if hits == nil then  -- once a topic a batch
      hits = {}
      local parts = tokens(topic)
      for _, p in ipairs(pats) do
        if matches(p[2], parts) then
          hits[#hits + 1] = p[1]
        end
      end
      matched[topic] = hits
    end
    for _, p in ipairs(hits) do
      local id = redis.call('XADD', pre .. 'pstream:' .. p, 'MAXLEN', '~', n, '*', 'e', env)
      redis.call('PUBLISH', '\0' .. pre .. p, '\3' .. string.char(#id) .. id .. string.sub(env, 2))
    end
  end
end
return (#ARGV - 2) / 2
"""
# patterns (ARGV[3] on) are wanted ARGV[2] milliseconds more, in the hash ARGV[1]
_WANT_PATTERNS = _NOW_MS + """
for i = 3, #ARGV do
  redis.call('HSET', ARGV[1], ARGV[i], now + tonumber(ARGV[2]))
end
return #ARGV - 2
"""
# a session's subscription starts being recorded: want the topic (or, with ARGV[6], the
# pattern ARGV[6] in the hash ARGV[1]), and return the session's position in its stream
# (recorded before, or after the stream's last entry now)
_BEGIN = """
if ARGV[6] then""" + _NOW_MS + """
  redis.call('HSET', ARGV[1], ARGV[6], now + tonumber(ARGV[5]))
else
  redis.call('SET', ARGV[1], '1', 'PX', ARGV[5])
end
local pos = redis.call('HGET', ARGV[2], ARGV[3])
if not pos then
  pos = '-'
  local last = redis.call('XREVRANGE', ARGV[4], '+', '-', 'COUNT', 1)
  if #last > 0 then
    pos = '(' .. last[1][1]
  end
  redis.call('HSET', ARGV[2], ARGV[3], pos)
end
redis.call('PEXPIRE', ARGV[2], ARGV[5])
return pos
"""
_TAIL = struct.Struct(">BBQQ")  # a version-2 envelope after its stream id: as version 1's
_REPLAY_PAGE = 1000  # stream entries read in one XRANGE
_SUB_BATCH = 1000  # channels or patterns in one SUBSCRIBE/UNSUBSCRIBE command at most
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 5.0
_WARN_EVERY = 10.0  # seconds between two WARNINGs of one kind


def _glob_escape(text: bytes) -> bytes:
    return re.sub(rb"([\\*?\[\]])", rb"\\\1", text)


def glob_of(prefix: bytes, tokens: tuple[str, ...]) -> tuple[bytes, re.Pattern]:
    """The Redis glob subscribing to a pattern's channels, and a regex that matches exactly
    the channels the glob matches (``*`` and ``>`` tokens both become ``*``)."""
    glob = []
    rx = []
    for tok in tokens:
        if tok == "*" or tok == ">":
            glob.append(b"*")
            rx.append(b".*")
        else:
            raw = tok.encode("utf-8")
            glob.append(_glob_escape(raw))
            rx.append(re.escape(raw))
    return (_glob_escape(prefix) + b".".join(glob),
            re.compile(re.escape(prefix) + rb"\.".join(rx), re.DOTALL))


class _Warn:
    """A WARNING at most every ``_WARN_EVERY`` seconds, saying how many were held back."""

    __slots__ = ("last", "held")

    def __init__(self):
        self.last = -_WARN_EVERY
        self.held = 0

    def __call__(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self.last < _WARN_EVERY:
            self.held += 1
            return
        if self.held:
            msg += f" ({self.held} more since the last such warning)"
        self.last, self.held = now, 0
        log.warning(msg, *args)


async def _close_quietly(client) -> None:
    """Close a client whose connection failed (bounded: Redis may have vanished)."""
    if client is not None:
        try:
            await asyncio.wait_for(client.aclose(), 1.0)
        except Exception:  # noqa: BLE001 - the connection is broken already
            pass


def _open(url: str, **options):
    """An asyncio Redis client that never retries a command by itself: a PUBLISH retried
    after a lost connection could reach the other brokers twice."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return aioredis.from_url(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2.0,
                             **options)




def open_backplane(broker, url: str, **options) -> Backplane:
    """The backplane of ``url``'s engine: ``redis://``, ``rediss://`` or ``unix://`` (Redis),
    ``nats://`` or ``tls://`` (NATS); ``options``: the engine class's keywords."""
    if url.startswith(("nats://", "tls://")):
        from mip.net.msip_nats import NatsCluster

        return NatsCluster(broker, url, **options)
    if url.startswith(RedisCluster.schemes):
        return RedisCluster(broker, url, **options)
    raise ValueError("cluster URL must be redis://HOST:PORT[/DB], rediss://, or "
                     f"nats://HOST:PORT, not {url!r}")


def parse_envelope(data) -> tuple[int, int, int, int] | None:
    """(msg_kind, EVENT flags, origin, msg_id) of a version-1 envelope, None if it is not one
    (its PUBLISH payload starts at ``ENVELOPE.size``)."""
    if len(data) < ENVELOPE.size or data[0] != _VERSION:
        return None
    return ENVELOPE.unpack_from(data)[1:]


class Backplane:
    """The link of one broker to the engine that joins it to the others (created by
    :class:`~mip.net.msip_broker.Broker`, through :func:`open_backplane`).

    What is shared by the engines lives here: the outgoing queue bounded in octets and the
    task sending it in batches, the topics and patterns local sessions want, and the queue of
    at-least-once sessions' records with the task writing it (retrying, refreshing records
    before they expire). An engine provides ``_channel`` (a topic's name there), ``_send``
    (a batch), ``_record`` (a pass of records), and the hooks named below.
    """

    engine = "?"  #: the engine's name in log messages
    schemes: tuple[str, ...] = ()  #: the schemes of its URLs
    url_form = "?"  #: its URL, as an error message shows it
    client = ("?", "?")  #: the module of its Python client, and the package that brings it

    def __init__(self, broker, url: str, *, prefix: str = "msip:", max_pending: int = 8 << 20,
                 stream_max: int = 10_000, max_patterns: int = 256):
        if not url.startswith(self.schemes):
            raise ValueError(f"cluster URL must be {self.url_form}, not {url!r}")
        if stream_max < 0:
            raise ValueError(f"cluster stream_max must be 0 or more, not {stream_max}")
        if max_pending <= 0:
            raise ValueError(f"cluster max_pending must be positive, not {max_pending}")
        if max_patterns < 0:
            raise ValueError(f"cluster max_patterns must be 0 or more, not {max_patterns}")
        try:
            importlib.import_module(self.client[0])
        except ImportError as exc:
            raise ImportError(f"a {self.engine} cluster needs the Python package "
                              f"'{self.client[1]}', which is not installed: "
                              "pip install 'mip-toolkit[broker]'",
                              name=self.client[0].split(".")[0]) from exc
        self.broker = broker
        self.url = url
        self.max_pending = max_pending
        self.origin = int.from_bytes(os.urandom(8), "big")
        self.stats = broker.stats
        self._queue: collections.deque = collections.deque()  # (channel, envelope)
        self._wake = asyncio.Event()
        self._interest = asyncio.Event()
        self._topics: set[str] = set()  # wanted: literal topics
        self._patterns: set[str] = set()  # wanted: wildcard patterns
        self._tasks: list[asyncio.Task] = []
        self._warn_drop = _Warn()
        self._warn_pub = _Warn()
        self._warn_sub = _Warn()
        self.stream_max = stream_max
        self.streams = stream_max > 0  # at-least-once sessions are recorded in the engine
        self._ops: list = []  # ("begin", session, topic), ("hdel", id, topic), ("del", id)
        # (client id, topic or pattern, is a pattern) -> position
        self._positions: dict[tuple[int, str, bool], str] = {}
        self._session_wake = asyncio.Event()
        self._warn_rec = _Warn()
        self.max_patterns = max_patterns
        # recorded patterns: pattern -> {client id: local session recording it}
        self._recording: dict[str, dict[int, Any]] = {}
        # (session, pattern) not caught up yet -> live events held meanwhile (None: more than
        # max_inflight, given up: they are read again from the stream), and the stream id of
        # the first of them (kept when they are given up: where the missed events end)
        self._held: dict[tuple, list | None] = {}
        self._first_live: dict[tuple, tuple] = {}
        self._write_due = False
        self._warn_pat = _Warn()

    # -- the engine's part -----------------------------------------------------------------
    def _channel(self, topic: bytes):
        """The name of ``topic`` (its UTF-8 octets) in the engine."""
        raise NotImplementedError

    async def _connect(self) -> None:
        """At start: whether the engine answers (raise if not; the broker starts either
        way). A task it starts goes into ``_tasks``."""
        raise NotImplementedError

    def _loops(self) -> list:
        """The engine's own tasks' coroutines (besides the publisher and the recorder)."""
        return []

    async def _pub_open(self) -> None:
        """Before a batch: the publishing connection is ready (raise: retried later)."""

    async def _send(self, batch: list) -> None:
        """Send a batch of (channel, envelope)."""
        raise NotImplementedError

    async def _pub_reset(self) -> None:
        """A batch failed: drop the publishing connection (opened again for the next)."""

    async def _record(self, ops: list, positions: dict, refresh: bool, ttl_ms: int) -> list:
        """Write a pass of sessions' records (``refresh``: keep every live record from
        expiring, ``ttl_ms`` more); returns the begins to do again on the next pass."""
        raise NotImplementedError

    async def _rec_reset(self) -> None:
        """A pass of records failed: drop the recording connection."""

    async def _close(self) -> None:
        """At stop, after the tasks ended: close what is left open (bounded)."""

    def _where(self) -> str:
        return self.url.split("@")[-1].split("?")[0]  # no password in logs

    def _refresh_every(self) -> float:
        """Seconds between two refreshes of the live sessions' records, which expire the
        session TTL plus this after the last one."""
        return max(0.5, min(self.broker.core.session_ttl / 3, 10.0))

    # -- from the broker (synchronous, on its loop) -----------------------------------------
    def publish(self, topic: bytes, payload, kind: int, flags: int, msg_id: int) -> None:
        """Queue a local publish for the other brokers (``topic``: its UTF-8 octets,
        ``payload``: the PUBLISH payload)."""
        envelope = ENVELOPE.pack(_VERSION, kind, flags, self.origin, msg_id) + payload
        size = len(envelope)
        stats = self.stats
        if stats.cluster_pending_bytes + size > self.max_pending:
            stats.cluster_dropped += 1
            self._warn_drop("cluster: outgoing queue to %s full (%d octets, limit %d): "
                            "dropping publishes for the other brokers", self.engine,
                            stats.cluster_pending_bytes, self.max_pending)
            return
        self._queue.append((self._channel(topic), envelope))
        stats.cluster_pending_bytes += size
        if not self._wake.is_set():
            self._wake.set()

    def interest(self, topic: str, pattern: bool, wanted: bool) -> None:
        """Local sessions started (``wanted``) or stopped wanting ``topic`` (a literal topic,
        or a wildcard pattern when ``pattern``)."""
        which = self._patterns if pattern else self._topics
        if wanted:
            which.add(topic)
        else:
            which.discard(topic)
        self._interest.set()

    # -- at-least-once sessions' records (from the core, synchronous) -----------------------
    def begin(self, session, topic: str) -> None:
        """The core records ``topic`` (a literal topic or, for a session with patterns, a
        wildcard pattern) for an at-least-once session."""
        cid = session.client_id
        if self._is_pattern(session, topic):
            sessions = self._recording.get(topic)
            if sessions is None:
                if len(self._recording) >= self.max_patterns:
                    self._warn_pat("cluster: %d patterns recorded already (limit %d): the "
                                   "at-least-once subscription to %r stays in this broker's "
                                   "memory", len(self._recording), self.max_patterns, topic)
                    self.broker.core.stream_declined(session, topic)
                    return
                sessions = self._recording[topic] = {}
                self._interest.set()  # its feed
            sessions[cid] = session
            self._held[(session, topic)] = []
        else:
            self._unrecord(cid, topic)
        self._ops.append(("begin", session, topic))
        self._session_wake.set()

    def position(self, client_id: int, topic: str, pos: str) -> None:
        self._positions[(client_id, topic, self._recorded_pattern(client_id, topic))] = pos
        self._session_wake.set()

    def unstream(self, client_id: int, topic: str) -> None:
        pattern = self._recorded_pattern(client_id, topic)
        self._positions.pop((client_id, topic, pattern), None)
        self._ops.append(("hdel", client_id, topic, pattern))
        if pattern:
            self._unrecord(client_id, topic)
        self._session_wake.set()

    def restore(self, session) -> None:
        self._ops.append(("restore", session))
        self._session_wake.set()

    def drop(self, client_id: int) -> None:
        for topic in [t for t, sessions in self._recording.items() if client_id in sessions]:
            self._unrecord(client_id, topic)
        self._ops.append(("del", client_id))
        self._session_wake.set()

    def _still_subscribed(self, session, topic: str) -> bool:
        """Whether a queued begin of ``topic`` for ``session`` still stands: False, and the
        events held for it dropped, once the session has unsubscribed meanwhile."""
        if session.streams.get(topic) is None:
            self._unhold((session, topic))
            return False
        return True

    # -- recorded patterns -------------------------------------------------------------------
    def _is_pattern(self, session, topic: str) -> bool:
        """Whether ``topic`` is a wildcard pattern for ``session``."""
        return (bool(session.patterns or self.broker.core.topic_patterns)
                and pattern_tokens(topic) is not None)

    def _recorded_pattern(self, client_id: int, topic: str) -> bool:
        return client_id in self._recording.get(topic, ())

    def _unrecord(self, client_id: int, pattern: str) -> None:
        sessions = self._recording.get(pattern)
        if sessions is None:
            return
        session = sessions.pop(client_id, None)
        if session is not None:
            self._unhold((session, pattern))
        if not sessions:
            del self._recording[pattern]
            self._interest.set()

    def _prune(self) -> None:
        """Forget the sessions that stopped recording a pattern without saying so (ended on
        this broker: the record in the engine outlives them)."""
        for pattern, sessions in list(self._recording.items()):
            for cid, session in list(sessions.items()):
                if pattern not in session.streams:
                    self._unrecord(cid, pattern)

    def _restore(self, session, literal: list[str], patterns: list[str]) -> None:
        """Give a resuming session its recorded subscriptions back (those that mean, for the
        session, what they meant when recorded)."""
        self.broker.core.restore_subscriptions(
            session, [t for t in literal if not self._is_pattern(session, t)]
            + [p for p in patterns if self._is_pattern(session, p)])

    def _feed(self, pattern: str, sid: tuple, payload, flags: int, msg_id: int) -> None:
        """An event of a recorded pattern's stream, for the local sessions recording it (held
        while a session catches up)."""
        sessions = self._recording.get(pattern)
        if not sessions:
            return
        core = self.broker.core
        entry = (sid, payload, flags, msg_id)
        now = time.monotonic()
        for session in list(sessions.values()):
            where = (session, pattern)
            if where in self._held:
                self._first_live.setdefault(where, sid)  # the feed is in the stream's order
                held = self._held[where]
                if held is not None:
                    if len(held) >= core.max_inflight:  # they are in the stream too: read again
                        self._held[where] = None
                    else:
                        held.append(entry)
            elif pattern in session.streams:
                core.stream_replay(session, pattern, (entry,), True, now)
        if not self._write_due:  # one write per connection for a batch
            self._write_due = True
            asyncio.get_running_loop().call_soon(self._write_now)

    def _write_now(self) -> None:
        self._write_due = False
        self.broker.write_out()

    def _first_held(self, where: tuple):
        """The stream id of the first live event held for (session, pattern) during its
        catch-up (held still, or given up), if any: the missed events end there."""
        return self._first_live.get(where)

    def _unhold(self, where: tuple) -> None:
        """(session, pattern) is caught up, or no longer catching up."""
        self._held.pop(where, None)
        self._first_live.pop(where, None)

    async def _catch_up(self, session, pattern: str, read) -> None:
        """Hand a session what its recorded pattern missed, then the live events held
        meanwhile, and let it go on live. ``read(after)`` iterates over pages of entries
        (stream id, PUBLISH payload, EVENT flags, msg_id) in stream order, from the recorded
        position (``after`` None) or after the stream id ``after``.

        What the session missed (before the first live event held) is bounded as an away
        session's backlog is (see :meth:`~mip.net.msip_core.BrokerCore.stream_replay`). The
        live events are held up to ``max_inflight``; beyond, those held are given up and the
        stream is read on from where the read got (they are there), the first live one's id
        kept: live events are never bounded as missed ones, and each is delivered once."""
        core = self.broker.core
        where = (session, pattern)
        after = None
        try:
            while True:
                on: tuple | None = None
                gone = False
                async for page in read(after):
                    if not gone and page:
                        on = core.stream_replay(session, pattern, page, False, time.monotonic(),
                                                self._first_held(where))
                        gone = on is None
                live = self._first_held(where)
                held = self._held.get(where, [])
                self._held[where] = []
                if not gone and held is None:  # too many live events meanwhile: read on
                    after = on or after
                    continue
                if not gone:
                    core.stream_replay(session, pattern, held, True, time.monotonic(), live)
                # caught up (or unsubscribed, or ended meanwhile); on a failure, live events
                # are held until the read is done again
                self._unhold(where)
                return
        finally:
            self.broker.write_out()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and start the tasks; logs whether the engine answers now (the broker
        starts either way)."""
        loop = asyncio.get_running_loop()
        try:
            await self._connect()
            log.info("cluster: %s at %s answers; broker id %016x", self.engine, self._where(),
                     self.origin)
            self.stats.cluster_connected = True
        except Exception as exc:  # noqa: BLE001 - any failure: serve locally, keep trying
            log.warning("cluster: %s at %s is not reachable (%s): serving local clients, "
                        "retrying in the background", self.engine, self._where(), exc)
        self._tasks += [loop.create_task(c) for c in [self._publisher(), *self._loops()]]
        if self.streams:
            self._tasks.append(loop.create_task(self._recorder()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:  # bounded: closing a connection to an engine that vanished may hang
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks = []
        await self._close()
        self._queue.clear()
        self.stats.cluster_pending_bytes = 0
        self.stats.cluster_connected = False

    # -- outgoing ----------------------------------------------------------------------------
    async def _publisher(self) -> None:
        backoff = _BACKOFF_MIN
        queue = self._queue
        stats = self.stats
        while True:
            if not queue:
                self._wake.clear()
                await self._wake.wait()
            batch: list = []
            try:
                await self._pub_open()
                n = 0
                while queue and len(batch) < _BATCH_MESSAGES and n < _BATCH_OCTETS:
                    entry = queue.popleft()
                    batch.append(entry)
                    n += len(entry[1])
                await self._send(batch)
                stats.cluster_pending_bytes -= n
                stats.cluster_published += len(batch)
                backoff = _BACKOFF_MIN
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the engine down or failing: drop, retry
                lost = len(batch)
                stats.cluster_pending_bytes -= sum(len(e[1]) for e in batch)
                stats.cluster_dropped += lost
                self._warn_pub("cluster: publishing to %s at %s failed (%s); %d publishes "
                               "dropped, retrying in %.1f s", self.engine, self._where(), exc,
                               lost, backoff)
                await self._pub_reset()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    # -- at-least-once sessions' records -------------------------------------------------------
    async def _recorder(self) -> None:
        """Write sessions' records and positions, and read streams for new subscriptions."""
        backoff = _BACKOFF_MIN
        refresh_every = self._refresh_every()
        ttl_ms = int((self.broker.core.session_ttl + refresh_every) * 1000)
        next_refresh = 0.0
        waiting: list = []  # begins the engine is not ready for yet
        while True:
            if not (self._ops or self._positions):
                self._session_wake.clear()
                try:
                    await asyncio.wait_for(self._session_wake.wait(),
                                           0.05 if waiting else refresh_every)
                except asyncio.TimeoutError:
                    pass
            ops, self._ops = self._ops, []
            positions, self._positions = self._positions, {}
            try:
                now = time.monotonic()
                refresh = now >= next_refresh
                if refresh:
                    next_refresh = now + refresh_every
                    self._prune()
                waiting = await self._record(waiting + ops, positions, refresh, ttl_ms)
                backoff = _BACKOFF_MIN
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the engine down or failing: retry
                waiting = [op for op in waiting + ops if op[0] == "begin"]
                # idempotent: again
                self._ops[:0] = [op for op in ops if op[0] != "begin"]
                for where, pos in positions.items():
                    self._positions.setdefault(where, pos)
                self._warn_rec("cluster: recording sessions in %s at %s failed (%s); "
                               "retrying in %.1f s", self.engine, self._where(), exc, backoff)
                await self._rec_reset()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

class RedisCluster(Backplane):
    """The Redis link of one broker.

    Args:
        broker: the broker whose local publishes go out and which delivers what comes in.
        url: ``redis://[[USER]:PASSWORD@]HOST:PORT[/DB]`` or ``rediss://`` (TLS, redis-py's
            ``ssl_*`` query options). Pub/sub channels are shared by every database of a
            Redis server: brokers of different services on one Redis need different
            ``prefix``.
        prefix: put before each topic to name its channel.
        max_pending: octets of envelopes queued for Redis at most; more are dropped (counted).
        stream_max: events kept per topic in its stream (``XADD MAXLEN ~``), and per recorded
            pattern in its own; 0: no streams.
        max_patterns: distinct patterns this broker records at most.
    """

    engine = "Redis"
    schemes = ("redis://", "rediss://", "unix://")
    url_form = "redis://HOST:PORT[/DB] or rediss://"
    client = ("redis.asyncio", "redis")

    def __init__(self, broker, url: str, *, prefix: str = "msip:", max_pending: int = 8 << 20,
                 stream_max: int = 10_000, max_patterns: int = 256):
        super().__init__(broker, url, prefix=prefix, max_pending=max_pending,
                         stream_max=stream_max, max_patterns=max_patterns)
        self.prefix = prefix.encode("utf-8")
        self._sub_channels: set[bytes] = set()  # subscribed on the current connection
        self._feed_channels: dict[bytes, str] = {}  # of them: recorded patterns' feeds
        self._sub_globs: dict[bytes, re.Pattern] = {}  # glob -> the regex of its channels
        self._pub: Any = None  # the publishing connection, and its batch script
        self._script: Any = None
        self._rec: Any = None  # the recording connection, and its scripts
        self._begin: Any = None
        self._want_patterns: Any = None

    def _channel(self, topic: bytes) -> bytes:
        return self.prefix + topic

    def _session_key(self, client_id: int) -> bytes:
        return self.prefix + b"session:%d" % client_id

    def _feed_channel(self, pattern: str) -> bytes:
        """The channel of a recorded pattern's feed (outside ``PREFIX`` + any topic)."""
        return b"\0" + self.prefix + pattern.encode("utf-8")

    @staticmethod
    def _field(topic: str, pattern: bool) -> bytes:
        """A session record's field: the topic, or (never UTF-8) 0xFF and the pattern."""
        return (b"\xff" if pattern else b"") + topic.encode("utf-8")

    async def _connect(self) -> None:
        probe = _open(self.url, socket_timeout=2.0)
        try:
            await probe.ping()
        finally:
            await probe.aclose()

    def _loops(self) -> list:
        return [self._subscriber()]

    async def _close(self) -> None:
        for client in (self._pub, self._rec):
            await _close_quietly(client)
        self._pub = self._rec = None

    # -- outgoing ----------------------------------------------------------------------------
    async def _pub_open(self) -> None:
        if self._pub is None:
            client = _open(self.url, socket_timeout=10.0)
            try:
                await client.ping()
            except BaseException:
                await _close_quietly(client)
                raise
            self._pub = client
            self._script = client.register_script(
                _PUBLISH_STREAMED if self.streams else _PUBLISH_ALL)

    async def _send(self, batch: list) -> None:
        args = [self.stream_max, self.prefix] if self.streams else []
        for entry in batch:
            args += entry
        await self._script(args=args)

    async def _pub_reset(self) -> None:
        await _close_quietly(self._pub)
        self._pub = None

    # -- incoming ----------------------------------------------------------------------------
    async def _subscriber(self) -> None:
        backoff = _BACKOFF_MIN
        stats = self.stats
        while True:
            client = _open(self.url)
            pubsub = client.pubsub()
            self._sub_channels = set()
            self._feed_channels = {}
            self._sub_globs = {}
            try:
                await client.ping()
                if not stats.cluster_connected:
                    log.warning("cluster: connected to Redis at %s", self._where())
                stats.cluster_connected = True
                backoff = _BACKOFF_MIN
                self._interest.set()
                while True:
                    if self._interest.is_set():
                        self._interest.clear()
                        await self._sync(pubsub)
                    if not pubsub.subscribed:
                        try:
                            await asyncio.wait_for(self._interest.wait(), 5.0)
                        except asyncio.TimeoutError:
                            await client.ping()  # notice a lost Redis while nothing is wanted
                        continue
                    msg = await pubsub.get_message(timeout=0.05)
                    while msg is not None:
                        self._incoming(msg)
                        if self._interest.is_set():
                            break  # (after the message taken)
                        msg = await pubsub.get_message(timeout=0.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis down or failing: reconnect
                if stats.cluster_connected:
                    stats.cluster_reconnects += 1
                stats.cluster_connected = False
                self._warn_sub("cluster: lost Redis at %s (%s); events from other brokers are "
                               "missed until it is back; retrying in %.1f s", self._where(),
                               exc, backoff)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), 1.0)
                    await asyncio.wait_for(client.aclose(), 1.0)
                except Exception:  # noqa: BLE001 - the connection is broken already
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _sync(self, pubsub) -> None:
        """Bring the connection's subscriptions to what local sessions want, in batches."""
        channels = {self.prefix + t.encode("utf-8") for t in self._topics}
        feeds = {self._feed_channel(p): p for p in self._recording}
        channels.update(feeds)
        globs = dict(glob_of(self.prefix, pattern_tokens(p) or (p,)) for p in self._patterns)
        add = [c for c in channels if c not in self._sub_channels]
        drop = [c for c in self._sub_channels if c not in channels]
        padd = [g for g in globs if g not in self._sub_globs]
        pdrop = [g for g in self._sub_globs if g not in globs]
        for i in range(0, len(add), _SUB_BATCH):
            await pubsub.subscribe(*add[i:i + _SUB_BATCH])
        for i in range(0, len(padd), _SUB_BATCH):
            await pubsub.psubscribe(*padd[i:i + _SUB_BATCH])
        for i in range(0, len(drop), _SUB_BATCH):
            await pubsub.unsubscribe(*drop[i:i + _SUB_BATCH])
        for i in range(0, len(pdrop), _SUB_BATCH):
            await pubsub.punsubscribe(*pdrop[i:i + _SUB_BATCH])
        self._sub_channels = channels
        self._feed_channels = feeds
        self._sub_globs = globs

    def _incoming(self, msg: dict) -> None:
        kind = msg["type"]
        data = msg["data"]
        if kind == "pmessage":
            if data[:1] == b"\3":
                return  # a pattern's feed that a glob matches too
            if not self._first_match(msg["pattern"], msg["channel"]):
                return  # another of this broker's subscriptions delivers it
        elif kind != "message":
            return  # (un)subscribe confirmations
        elif data[:1] != b"\3" and msg["channel"] in self._feed_channels:
            self.stats.cluster_invalid += 1
            return
        sid = None
        if len(data) >= 2 and (data[0] == 2 or data[0] == 3):  # recorded in a stream
            at = 2 + data[1]
            sid = _stream_id(data[2:at])
            if sid is None or len(data) < at + _TAIL.size:
                self.stats.cluster_invalid += 1
                return
            msg_kind, flags, origin, msg_id = _TAIL.unpack_from(data, at)
            at += _TAIL.size
            if data[0] == 3:  # version 3: a recorded pattern's stream
                pattern = self._feed_channels.get(msg["channel"])
                if pattern is None:
                    self.stats.cluster_invalid += 1
                else:
                    self._feed(pattern, sid, memoryview(data)[at:], flags, msg_id)
                return
        else:
            head = parse_envelope(data)
            if head is None:
                self.stats.cluster_invalid += 1
                return
            msg_kind, flags, origin, msg_id = head
            at = ENVELOPE.size
        own = origin == self.origin
        if own and not self.streams:
            return  # this broker's own publish: its clients have it already
        self.broker.deliver_remote(memoryview(data)[at:], msg_kind, flags, msg_id, sid, own)

    def _first_match(self, pattern: bytes, channel: bytes) -> bool:
        """Whether ``pattern`` is the one subscription of this broker that delivers an event
        on ``channel`` (Redis sends one message per matching channel and glob)."""
        if channel in self._sub_channels:
            return False
        matches = [g for g, rx in self._sub_globs.items() if rx.fullmatch(channel)]
        return not matches or pattern == min(matches)

    # -- at-least-once sessions' records -------------------------------------------------------
    async def _record(self, ops: list, positions: dict, refresh: bool, ttl_ms: int) -> list:
        if self._rec is None:
            self._rec = _open(self.url, socket_timeout=10.0)
            self._begin = self._rec.register_script(_BEGIN)
            self._want_patterns = self._rec.register_script(_WANT_PATTERNS)
        client = self._rec
        pipe = client.pipeline(transaction=False)
        begins: list[tuple[Any, int | None]] = []
        restores = []
        patterns_key = self.prefix + b"patterns"
        for op in ops:
            if op[0] == "begin":
                session, topic = op[1], op[2]
                if not self._still_subscribed(session, topic):
                    continue
                t = topic.encode("utf-8")
                pattern = self._recorded_pattern(session.client_id, topic)
                channel = self._feed_channel(topic) if pattern else self.prefix + t
                if channel not in self._sub_channels:
                    begins.append((op, None))  # not subscribed in Redis yet: later
                    continue
                begins.append((op, len(pipe)))
                if pattern:
                    args = [patterns_key, self._session_key(session.client_id),
                            self._field(topic, True), self.prefix + b"pstream:" + t, ttl_ms, t]
                else:
                    args = [self.prefix + b"want:" + t, self._session_key(session.client_id), t,
                            self.prefix + b"stream:" + t, ttl_ms]
                await self._begin(args=args, client=pipe)
            elif op[0] == "restore":
                restores.append((op[1], len(pipe)))
                pipe.hkeys(self._session_key(op[1].client_id))
            elif op[0] == "hdel":
                pipe.hdel(self._session_key(op[1]), self._field(op[2], op[3]))
            else:
                pipe.delete(self._session_key(op[1]))
        for (cid, topic, pattern), pos in positions.items():
            key = self._session_key(cid)
            pipe.hset(key, self._field(topic, pattern), pos)
            pipe.pexpire(key, ttl_ms)
        if refresh:
            wanted = set()
            for cid, topics in self.broker.core.stream_sessions():
                pipe.pexpire(self._session_key(cid), ttl_ms)
                for topic in topics:
                    t = topic.encode("utf-8")
                    if self._recorded_pattern(cid, topic):
                        if t not in wanted:
                            wanted.add(t)
                            pipe.pexpire(self.prefix + b"pstream:" + t, 2 * ttl_ms)
                        continue
                    pipe.set(self.prefix + b"want:" + t, b"1", px=ttl_ms)
                    pipe.pexpire(self.prefix + b"stream:" + t, 2 * ttl_ms)
            if wanted:
                await self._want_patterns(args=[patterns_key, ttl_ms, *wanted], client=pipe)
        results = await pipe.execute() if len(pipe) else []
        for restoring, at in restores:
            topics, patterns = [], []
            for raw in results[at]:
                try:
                    if raw[:1] == b"\xff":
                        patterns.append(raw[1:].decode("utf-8"))
                    else:
                        topics.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    self.stats.cluster_invalid += 1
            self._restore(restoring, topics, patterns)
        for op, index in begins:
            if index is None:
                continue
            session, topic = op[1], op[2]
            if self._recorded_pattern(session.client_id, topic):
                await self._catch_up(session, topic, self._reader(
                    client, self.prefix + b"pstream:" + topic.encode("utf-8"), results[index]))
            else:
                await self._replay(client, session, topic, results[index])
        return [op for op, at in begins if at is None]

    async def _rec_reset(self) -> None:
        await _close_quietly(self._rec)
        self._rec = None

    def _entries(self, page) -> list:
        """The (stream id, PUBLISH payload, EVENT flags, msg_id) of a page of stream entries."""
        entries = []
        for raw_id, fields in page:
            sid = _stream_id(raw_id)
            env = fields.get(b"e", b"")
            head = parse_envelope(env)
            if sid is None or head is None:
                self.stats.cluster_invalid += 1
                continue
            entries.append((sid, memoryview(env)[ENVELOPE.size:], head[1], head[3]))
        return entries

    def _reader(self, client, key: bytes, pos):
        """The pages of the stream ``key`` from the position ``pos``, for :meth:`_catch_up`
        (as many as the stream holds: ``stream_max`` about)."""
        async def read(after):
            start = _as_text(pos) if after is None else "(%d-%d" % after
            while True:
                page = await client.xrange(key, start, "+", count=_REPLAY_PAGE)
                yield self._entries(page)
                if len(page) < _REPLAY_PAGE:
                    return
                start = "(" + _as_text(page[-1][0])
        return read

    async def _replay(self, client, session, topic: str, pos) -> None:
        """Hand the session the events of ``topic``'s stream after its position ``pos``."""
        start = _as_text(pos)
        key = self.prefix + b"stream:" + topic.encode("utf-8")
        core = self.broker.core
        while True:
            page = await client.xrange(key, start, "+", count=_REPLAY_PAGE)
            entries = self._entries(page)
            done = len(page) < _REPLAY_PAGE
            on = core.stream_replay(session, topic, entries, done, time.monotonic())
            self.broker.write_out()
            if on is None:
                return
            if page:  # past malformed entries too
                on = max(on, _stream_id(page[-1][0]) or on)
            start = "(%d-%d" % on


def _as_text(raw) -> str:
    return raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)


def _stream_id(raw: bytes) -> tuple[int, int] | None:
    """A Redis stream id ``MS-SEQ`` as a tuple that orders as the ids do (None if malformed)."""
    ms, sep, seq = bytes(raw).partition(b"-")
    if not (sep and ms.isdigit() and seq.isdigit()):
        return None
    return int(ms), int(seq)
