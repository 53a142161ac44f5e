"""A Redis backplane that joins several MSIP brokers into one service.

Each broker given ``cluster="redis://HOST:PORT[/DB]"`` (``mip broker --cluster``) keeps two
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

Both connections reconnect with exponential backoff (0.1 s to 5 s). The broker starts even
when Redis is unreachable (it logs so and serves its local clients meanwhile).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import struct
import time

from mip.net.msip_topics import pattern_tokens

__all__ = ["RedisCluster", "ENVELOPE", "glob_of"]

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


def _open(url: str, **options):
    """An asyncio Redis client that never retries a command by itself: a PUBLISH retried
    after a lost connection could reach the other brokers twice."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return aioredis.from_url(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2.0,
                             **options)


class RedisCluster:
    """The Redis link of one broker (created by :class:`~mip.net.msip_broker.Broker`).

    Args:
        broker: the broker whose local publishes go out and which delivers what comes in.
        url: ``redis://[[USER]:PASSWORD@]HOST:PORT[/DB]`` or ``rediss://`` (TLS, redis-py's
            ``ssl_*`` query options). Pub/sub channels are shared by every database of a
            Redis server: brokers of different services on one Redis need different
            ``prefix``.
        prefix: put before each topic to name its channel.
        max_pending: octets of envelopes queued for Redis at most; more are dropped (counted).
    """

    def __init__(self, broker, url: str, *, prefix: str = "msip:", max_pending: int = 8 << 20):
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"cluster URL must be redis://HOST:PORT[/DB] or rediss://, not {url!r}")
        if max_pending <= 0:
            raise ValueError(f"cluster max_pending must be positive, not {max_pending}")
        try:
            import redis.asyncio  # noqa: F401
        except ImportError as exc:
            raise ImportError("a Redis cluster needs the Python package 'redis', which is not "
                              "installed: pip install 'mip-toolkit[broker]'", name="redis") from exc
        self.broker = broker
        self.url = url
        self.prefix = prefix.encode("utf-8")
        self.max_pending = max_pending
        self.origin = int.from_bytes(os.urandom(8), "big")
        self.stats = broker.stats
        self._queue: collections.deque = collections.deque()  # (channel, envelope)
        self._wake = asyncio.Event()
        self._interest = asyncio.Event()
        self._channels: set[bytes] = set()  # wanted: literal topics' channels
        self._globs: dict[bytes, re.Pattern] = {}  # wanted: patterns' globs -> their regex
        self._pattern_globs: dict[str, bytes] = {}  # pattern topic -> its glob
        self._sub_channels: set[bytes] = set()  # subscribed on the current connection
        self._sub_globs: dict[bytes, re.Pattern] = {}
        self._tasks: list[asyncio.Task] = []
        self._warn_drop = _Warn()
        self._warn_pub = _Warn()
        self._warn_sub = _Warn()
        self._plen = len(self.prefix)

    # -- from the broker (synchronous, on its loop) -----------------------------------------
    def publish(self, topic: bytes, payload, kind: int, flags: int, msg_id: int) -> None:
        """Queue a local publish for the other brokers (``topic``: its UTF-8 octets,
        ``payload``: the PUBLISH payload)."""
        envelope = ENVELOPE.pack(_VERSION, kind, flags, self.origin, msg_id) + payload
        size = len(envelope)
        stats = self.stats
        if stats.cluster_pending_bytes + size > self.max_pending:
            stats.cluster_dropped += 1
            self._warn_drop("cluster: outgoing queue to Redis full (%d octets, limit %d): "
                            "dropping publishes for the other brokers",
                            stats.cluster_pending_bytes, self.max_pending)
            return
        self._queue.append((self.prefix + topic, envelope))
        stats.cluster_pending_bytes += size
        if not self._wake.is_set():
            self._wake.set()

    def interest(self, topic: str, pattern: bool, wanted: bool) -> None:
        """Local sessions started (``wanted``) or stopped wanting ``topic`` (a literal topic,
        or a wildcard pattern when ``pattern``)."""
        if pattern:
            if wanted:
                glob, rx = glob_of(self.prefix, pattern_tokens(topic))
                self._pattern_globs[topic] = glob
                self._globs[glob] = rx
            else:
                glob = self._pattern_globs.pop(topic, None)
                if glob is not None and glob not in self._pattern_globs.values():
                    self._globs.pop(glob, None)
        elif wanted:
            self._channels.add(self.prefix + topic.encode("utf-8"))
        else:
            self._channels.discard(self.prefix + topic.encode("utf-8"))
        self._interest.set()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start both connections' tasks; says whether Redis answers now (the broker starts
        either way)."""
        loop = asyncio.get_running_loop()
        probe = _open(self.url, socket_timeout=2.0)
        try:
            await probe.ping()
            log.info("cluster: Redis at %s answers; broker id %016x", self._where(), self.origin)
            self.stats.cluster_connected = True
        except Exception as exc:  # noqa: BLE001 - any failure: serve locally, keep trying
            log.warning("cluster: Redis at %s is not reachable (%s): serving local clients, "
                        "retrying in the background", self._where(), exc)
        finally:
            await probe.aclose()
        self._tasks = [loop.create_task(self._publisher()), loop.create_task(self._subscriber())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:  # bounded: closing a connection to a Redis that vanished may hang
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks = []
        self._queue.clear()
        self.stats.cluster_pending_bytes = 0
        self.stats.cluster_connected = False

    def _where(self) -> str:
        return self.url.split("@")[-1].split("?")[0]  # no password in logs

    # -- outgoing ----------------------------------------------------------------------------
    async def _publisher(self) -> None:
        backoff = _BACKOFF_MIN
        client = None
        queue = self._queue
        stats = self.stats
        while True:
            if not queue:
                self._wake.clear()
                await self._wake.wait()
            batch: list = []
            try:
                if client is None:
                    client = _open(self.url, socket_timeout=10.0)
                    await client.ping()
                    script = client.register_script(_PUBLISH_ALL)
                args = []
                n = 0
                while queue and len(batch) < _BATCH_MESSAGES and n < _BATCH_OCTETS:
                    entry = queue.popleft()
                    batch.append(entry)
                    n += len(entry[1])
                    args += entry
                await script(args=args)
                stats.cluster_pending_bytes -= n
                stats.cluster_published += len(batch)
                backoff = _BACKOFF_MIN
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis down or failing: drop, retry
                lost = len(batch)
                stats.cluster_pending_bytes -= sum(len(e[1]) for e in batch)
                stats.cluster_dropped += lost
                self._warn_pub("cluster: publishing to Redis at %s failed (%s); %d publishes "
                               "dropped, retrying in %.1f s", self._where(), exc, lost, backoff)
                if client is not None:
                    try:
                        await asyncio.wait_for(client.aclose(), 1.0)
                    except Exception:  # noqa: BLE001 - the connection is broken already
                        pass
                    client = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    # -- incoming ----------------------------------------------------------------------------
    async def _subscriber(self) -> None:
        backoff = _BACKOFF_MIN
        stats = self.stats
        while True:
            client = _open(self.url)
            pubsub = client.pubsub()
            self._sub_channels = set()
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
                        msg = await pubsub.get_message(timeout=0.0)
                        if self._interest.is_set():
                            break
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
        add = [c for c in self._channels if c not in self._sub_channels]
        drop = [c for c in self._sub_channels if c not in self._channels]
        padd = [g for g in self._globs if g not in self._sub_globs]
        pdrop = [g for g in self._sub_globs if g not in self._globs]
        for i in range(0, len(add), _SUB_BATCH):
            await pubsub.subscribe(*add[i:i + _SUB_BATCH])
        for i in range(0, len(padd), _SUB_BATCH):
            await pubsub.psubscribe(*padd[i:i + _SUB_BATCH])
        for i in range(0, len(drop), _SUB_BATCH):
            await pubsub.unsubscribe(*drop[i:i + _SUB_BATCH])
        for i in range(0, len(pdrop), _SUB_BATCH):
            await pubsub.punsubscribe(*pdrop[i:i + _SUB_BATCH])
        self._sub_channels = set(self._channels)
        self._sub_globs = dict(self._globs)

    def _incoming(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "pmessage":
            if not self._first_match(msg["pattern"], msg["channel"]):
                return  # another of this broker's subscriptions delivers it
        elif kind != "message":
            return  # (un)subscribe confirmations
        data = msg["data"]
        if len(data) < ENVELOPE.size or data[0] != _VERSION:
            self.stats.cluster_invalid += 1
            return
        _, msg_kind, flags, origin, msg_id = ENVELOPE.unpack_from(data)
        if origin == self.origin:
            return  # this broker's own publish: its clients have it already
        self.broker._deliver_remote(memoryview(data)[ENVELOPE.size:], msg_kind, flags, msg_id)

    def _first_match(self, pattern: bytes, channel: bytes) -> bool:
        """Whether ``pattern`` is the one subscription of this broker that delivers an event
        on ``channel`` (Redis sends one message per matching channel and glob)."""
        if channel in self._sub_channels:
            return False
        matches = [g for g, rx in self._sub_globs.items() if rx.fullmatch(channel)]
        return not matches or pattern == min(matches)
