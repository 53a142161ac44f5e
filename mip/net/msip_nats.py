"""A NATS backplane that joins several MSIP brokers into one service.

Each broker given ``cluster="nats://HOST:PORT"`` (``mip broker --cluster``; ``tls://`` for
TLS, ``nats://USER:PASSWORD@HOST:PORT`` or ``nats://TOKEN@HOST:PORT`` to authenticate) keeps
one connection to ``nats-server``, made with ``no_echo``: the server never hands a broker its
own publishes, so a broker's clients get a local publish once (locally).

* Subjects: an MSIP topic is a literal string (``a..b``, ``temp>30``, ``é``); its subject is
  ``PREFIX.`` then its dot-separated tokens, each kept as it is when made only of
  ``A-Z a-z 0-9 _ - /`` and otherwise escaped: every other octet of its UTF-8 form becomes
  ``=XX`` (upper-case hex), and an empty token becomes ``=``. Every topic has a valid subject
  (no empty token, no wildcard, no space) and :func:`topic_of` gives the topic back, losslessly.
  ``PREFIX`` is ``--cluster-prefix`` without its final ``:`` or ``.``, escaped the same way
  (``msip`` by default).
* Live events: each local PUBLISH goes out, after local delivery, as a NATS publish on its
  topic's subject, in batches from an outgoing queue bounded in octets (``max_pending``;
  while NATS is down the queue fills and what does not fit is dropped and counted). The
  message is the envelope of :mod:`mip.net.msip_cluster` (version, msg_kind, EVENT flags,
  origin broker, msg_id, then the PUBLISH payload). A literal topic local sessions subscribe
  to becomes a NATS subscription of its subject; a wildcard pattern (``--topic-patterns`` or
  ``Flags.PATTERNS``) becomes a subscription with NATS wildcards (MSIP's ``*`` and final
  ``>`` mean what NATS's do). An event that several of the broker's subscriptions match is
  delivered once. NATS is at most once: what is published while the connection is down is
  not delivered to that broker's clients. NATS messages are at most the server's
  ``max_payload`` (1 MiB by default): a larger publish does not reach the other brokers
  (counted in ``cluster_dropped``).
* At-least-once sessions (``stream_max`` > 0, the default) resume on another broker, their
  backlog in JetStream: the stream ``NAME_events`` takes every subject under ``PREFIX``
  (every event is stored, whoever subscribes), keeping ``stream_max`` events per topic
  (``max_msgs_per_subject``) for twice the session record's lifetime (``max_age``); its
  sequence number is the event's stream id. A broker with an at-least-once subscription to a
  topic reads it from an ordered JetStream consumer (from then on, with the sequence), and
  such subscriptions get every event, local publishes included, from there; the others get
  it from the plain subscription. The session's record is the key-value bucket
  ``NAME_sessions``: the key ``s.CLIENTID.SUBJECT-TOKENS`` holds its position in the stream
  (as with Redis: its oldest unacknowledged event, or ``(`` and the last one delivered), the
  bucket's TTL the session TTL (with a margin): brokers holding the session put its keys
  again before they expire, a CLOSE purges them. A new subscription, or a session resuming
  here after its broker died, reads the stream from the recorded position (a pull consumer),
  holding back live events meanwhile, then continues live, skipping what it had. A session
  resuming on a broker that does not hold it gets the subscriptions of its record back.
  ``NAME`` is ``PREFIX`` with other characters than ``A-Z a-z 0-9 _ -`` replaced.

  At-least-once subscriptions to wildcard patterns use the same stream: its sequence orders
  every topic's events, so a pattern's position is one sequence. The pattern is read live from
  an ordered consumer filtered by its wildcard subject, and a resume reads a pull consumer with
  that filter from the position; the key is ``p.CLIENTID.PATTERN-TOKENS`` (the pattern escaped
  as a literal topic). A pattern's read is bounded by the session's ``backlog_limit``: when
  more matching messages were missed (stored before the first live event held back for the
  session, or before the stream's end once the pattern's live read runs), it starts later, at
  a sequence found by bisection (about 2 x log2 of the stream's length consumers made, each
  telling its pending count), the skipped ones counted in ``stats.dropped_backlog``; live
  events are read and delivered whatever the bound. What a resume is handed (a topic's or a
  pattern's) is bounded as with Redis. A broker
  records at most ``max_patterns`` distinct patterns (an ordered consumer each).

  A server without JetStream (no ``-js``): the broker says so and keeps at-least-once
  sessions in its memory, as with ``stream_max`` 0.

nats-py reconnects by itself (every 0.5 s, forever) and subscribes again; until the first
connection is made the broker tries with exponential backoff (0.1 s to 5 s), serving its
local clients meanwhile.
"""

from __future__ import annotations

import asyncio
import re
import time
import zlib
from typing import Any

from mip.net.msip_cluster import (_BACKOFF_MAX, _BACKOFF_MIN, ENVELOPE, Backplane, _Warn, log,
                                  parse_envelope)
from mip.net.msip_topics import match_tokens, pattern_tokens

__all__ = ["NatsCluster", "names", "subject_of", "topic_of"]

_PLAIN = re.compile(r"[A-Za-z0-9_\-/]+(?:\.[A-Za-z0-9_\-/]+)*\Z")
_UNSAFE = re.compile(rb"[^A-Za-z0-9_\-/]")
_TOKEN = re.compile(r"(?:[A-Za-z0-9_\-/]|=[0-9A-F]{2})+\Z")
_HEX = re.compile(r"=([0-9A-F]{2})")
_SUB_PENDING_MSGS = 65_536  # messages a NATS subscription holds for the broker at most
_SUB_PENDING_BYTES = 64 << 20  # and octets
_REPLAY_PAGE = 1000  # stream messages fetched at once
_CACHE = 65_536  # subjects of published topics remembered at most


def _token(raw: bytes) -> str:
    if not raw:
        return "="
    return _UNSAFE.sub(lambda m: b"=%02X" % m.group()[0], raw).decode("ascii")


def subject_of(prefix: str, topic: str, pattern: bool = False) -> str:
    """The NATS subject of ``topic`` under ``prefix`` (``pattern``: its ``*`` and ``>``
    tokens are wildcards; otherwise every topic is literal)."""
    if _PLAIN.match(topic):
        return prefix + "." + topic
    wild = pattern_tokens(topic) if pattern else None
    return prefix + "." + ".".join(
        t if wild is not None and (t == "*" or t == ">") else _token(t.encode("utf-8"))
        for t in topic.split("."))


def topic_of(prefix: str, subject: str) -> str | None:
    """The topic of a (literal) subject made by :func:`subject_of`, None if it is not one."""
    if not subject.startswith(prefix + "."):
        return None
    out = []
    for t in subject[len(prefix) + 1:].split("."):
        if t == "=":
            out.append(b"")
        elif _TOKEN.match(t):
            out.append(_HEX.sub(lambda m: chr(int(m.group(1), 16)), t).encode("latin-1"))
        else:
            return None
    try:
        return b".".join(out).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _client():
    """A nats-py client with one addition, ``subscribe_in_order(subject, handler)`` (and
    ``unsubscribe_in_order(sub)``): the messages of such a subscription are handed to
    ``handler(subject, data)`` by the connection's read loop, at once and in the order they
    arrive. nats-py hands each subscription's messages to a task of its own, which reorders
    events across subscriptions, and makes a message object of each.

    nats-py has no public API for this (a callback run by the read loop itself, and a
    subscription's id to route by): this class alone uses its internals (``_process_msg``,
    ``_sid``, ``Subscription._id``), hence the range of nats-py versions in pyproject.toml."""
    from nats.aio.client import Client

    class _Client(Client):
        def __init__(self):
            super().__init__()
            self._in_order: dict[int, Any] = {}  # subscription id -> handler(subject, data)

        async def _process_msg(self, sid, subject, reply, data, headers):
            handler = self._in_order.get(sid)
            if handler is None:
                return await super()._process_msg(sid, subject, reply, data, headers)
            self.stats["in_msgs"] += 1
            self.stats["in_bytes"] += len(data)
            handler(subject, data)

        async def subscribe_in_order(self, subject: str, handler):
            # its id is the next one: the handler is there before any message can come
            sid = self._sid + 1
            self._in_order[sid] = handler
            sub = await self.subscribe(subject)
            if sub._id != sid:  # numbered otherwise: from now on, then
                self._in_order[sub._id] = self._in_order.pop(sid)
            return sub

        async def unsubscribe_in_order(self, sub) -> None:
            self._in_order.pop(sub._id, None)
            await sub.unsubscribe()

    return _Client()


def names(prefix: str) -> tuple[str, str, str]:
    """The subject prefix, the stream's name and the bucket's name for a cluster prefix."""
    subject = subject_of("", prefix.rstrip(":."))[1:]
    name = re.sub(r"[^A-Za-z0-9_-]", "_", subject)
    if name != subject:
        name += "_%08x" % zlib.crc32(subject.encode("ascii"))
    return subject, name + "_events", name + "_sessions"


def _start(pos: str) -> int | None:
    """The first stream sequence to read for a recorded position (None if malformed)."""
    m = re.fullmatch(r"(\(?)(\d+)-\d+", pos)
    if m is None:
        return 1 if pos == "-" else None
    return int(m.group(2)) + (1 if m.group(1) else 0)


class NatsCluster(Backplane):
    """The NATS link of one broker.

    Args:
        broker: the broker whose local publishes go out and which delivers what comes in.
        url: ``nats://[USER:PASSWORD@]HOST:PORT`` (``tls://`` for TLS); several servers of one
            NATS cluster, comma-separated.
        prefix: the first subject tokens (its final ``:`` or ``.`` dropped); brokers of
            different services on one NATS account need different prefixes.
        max_pending: octets of envelopes queued for NATS at most; more are dropped (counted).
        stream_max: events kept per topic in JetStream; 0: no JetStream.
        max_patterns: distinct patterns this broker records at most.
    """

    engine = "NATS"
    schemes = ("nats://", "tls://")
    url_form = "nats://HOST:PORT or tls://"
    client = ("nats", "nats-py")

    def __init__(self, broker, url: str, *, prefix: str = "msip:", max_pending: int = 8 << 20,
                 stream_max: int = 10_000, max_patterns: int = 256):
        if not prefix.rstrip(":."):
            raise ValueError(f"a NATS cluster needs a prefix, not {prefix!r}")
        super().__init__(broker, url, prefix=prefix, max_pending=max_pending,
                         stream_max=stream_max, max_patterns=max_patterns)
        self.subject_prefix, self.stream_name, self.bucket = names(prefix)
        self._subjects: dict[bytes, str] = {}  # published topics' subjects, a bounded cache
        self._nc: Any = None
        self._js: Any = None
        self._kv: Any = None
        self._connected = asyncio.Event()
        self._setup_due = False  # the stream and the bucket are to be made (again)
        self._subs: dict[str, Any] = {}  # subject -> its NATS subscription
        self._sub_patterns: dict[str, tuple[str, ...]] = {}  # wildcard subjects -> tokens
        self._feeds: dict[bytes, Any] = {}  # topic -> its ordered JetStream consumer
        self._pattern_feeds: dict[str, Any] = {}  # recorded pattern -> the same
        self._recorded: dict[tuple[int, str], str] = {}  # positions put, refreshed
        self._warn_js = _Warn()

    def _channel(self, topic: bytes) -> str:
        subject = self._subjects.get(topic)
        if subject is None:
            if len(self._subjects) >= _CACHE:
                self._subjects.clear()
            subject = self._subjects[topic] = self._subject(topic.decode("utf-8"))
        return subject

    def _subject(self, topic: str, pattern: bool = False) -> str:
        return subject_of(self.subject_prefix, topic, pattern)

    def _key(self, client_id: int, topic: str, pattern: bool = False) -> str:
        """A session's key in the bucket for a topic (``s.``) or a pattern (``p.``)."""
        return "%s.%d.%s" % ("p" if pattern else "s", client_id,
                             self._subject(topic)[len(self.subject_prefix) + 1:])

    # -- connection ------------------------------------------------------------------------
    async def _connect(self) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self._keeper()))
        try:  # the keeper connects
            await asyncio.wait_for(self._connected.wait(), 3.0)
        except asyncio.TimeoutError:
            raise ConnectionError("no answer in 3 s") from None

    async def _open(self) -> None:
        stats = self.stats

        async def disconnected():
            if nc is not self._nc:
                return  # closed at stop
            if stats.cluster_connected:
                stats.cluster_reconnects += 1
                self._warn_sub("cluster: lost NATS at %s; events from other brokers are "
                               "missed until it is back", self._where())
            stats.cluster_connected = False
            self._connected.clear()

        async def reconnected():
            log.warning("cluster: connected to NATS at %s again", self._where())
            stats.cluster_connected = True
            self._setup_due = self.streams  # a server started anew may lack them
            self._connected.set()
            self._interest.set()

        async def error(exc):
            self._warn_sub("cluster: NATS at %s: %s", self._where(), exc)

        nc = _client()
        await nc.connect(
            servers=self.url.split(","), no_echo=True, name="mip broker %016x" % self.origin,
            connect_timeout=2, allow_reconnect=True, max_reconnect_attempts=-1,
            reconnect_time_wait=0.5, pending_size=max(self.max_pending, 1 << 20),
            disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error)
        self._nc = nc
        self._js = nc.jetstream(timeout=5)
        stats.cluster_connected = True
        if self.streams:
            self._setup_due = True
            try:
                await self._setup()
            except Exception as exc:  # noqa: BLE001 - the keeper tries again
                self._warn_js("cluster: making the JetStream stream and bucket in NATS at %s "
                              "failed (%s); trying again", self._where(), exc)
        self._connected.set()
        self._interest.set()

    async def _setup(self) -> None:
        """Make the stream and the bucket (or update them); without JetStream on the
        server, at-least-once sessions stay in this broker's memory."""
        from nats.js.api import DiscardPolicy, StorageType, StreamConfig
        from nats.js.errors import BadRequestError, ServiceUnavailableError

        js = self._js
        ttl = self.broker.core.session_ttl + self._refresh_every()  # the records' lifetime
        config = StreamConfig(name=self.stream_name, subjects=[self.subject_prefix + ".>"],
                              max_msgs_per_subject=self.stream_max, max_age=2 * ttl,
                              storage=StorageType.FILE, discard=DiscardPolicy.OLD,
                              num_replicas=1)
        try:
            try:
                await js.add_stream(config)
            except BadRequestError:  # made by another broker, maybe with other limits
                await js.update_stream(config)
            try:
                self._kv = await js.create_key_value(bucket=self.bucket, ttl=ttl, history=1)
            except BadRequestError:
                self._kv = await js.key_value(self.bucket)
        except ServiceUnavailableError:
            self.streams = False
            log.warning("cluster: NATS at %s has no JetStream (nats-server -js): "
                        "at-least-once sessions stay in one broker's memory", self._where())
        self._setup_due = False

    async def _keeper(self) -> None:
        """Connect (nats-py tries until it can, then reconnects by itself), and keep the
        NATS subscriptions what local sessions want."""
        backoff = _BACKOFF_MIN
        while True:
            try:
                if self._nc is None:
                    await self._open()
                    log.info("cluster: connected to NATS at %s", self._where())
                    backoff = _BACKOFF_MIN
                if self._setup_due and self._nc.is_connected:
                    await self._setup()
                if self._interest.is_set():
                    self._interest.clear()
                    await self._sync()
                try:
                    await asyncio.wait_for(self._interest.wait(), 1.0 if self._setup_due else 5.0)
                except asyncio.TimeoutError:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS down or failing: again later
                self._warn_sub("cluster: NATS at %s: %s; retrying in %.1f s", self._where(),
                               exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                self._interest.set()

    async def _close(self) -> None:
        nc, self._nc = self._nc, None
        self._connected.clear()
        if nc is not None:
            try:
                await asyncio.wait_for(nc.close(), 2.0)
            except Exception:  # noqa: BLE001 - the connection is broken already
                pass

    # -- outgoing ----------------------------------------------------------------------------
    async def _pub_open(self) -> None:
        await self._connected.wait()  # meanwhile the queue fills up to max_pending

    async def _send(self, batch: list) -> None:
        from nats.errors import MaxPayloadError

        publish = self._nc.publish
        for subject, envelope in batch:
            try:
                await publish(subject, envelope)
            except MaxPayloadError as exc:
                self.stats.cluster_dropped += 1
                self.stats.cluster_published -= 1
                self._warn_pub("cluster: a publish for the other brokers is dropped: %s", exc)

    # -- incoming ----------------------------------------------------------------------------
    async def _sync(self) -> None:
        """Bring the connection's subscriptions to what local sessions want."""
        nc = self._nc
        if nc is None:
            return
        want: dict[str, tuple[str, ...] | None] = {self._subject(t): None for t in self._topics}
        for p in self._patterns:
            subject = self._subject(p, True)
            want[subject] = tuple(subject.split("."))
        for subject in [s for s in self._subs if s not in want]:
            sub = self._subs.pop(subject)
            self._sub_patterns.pop(subject, None)
            await nc.unsubscribe_in_order(sub)
        for subject, tokens in want.items():
            if subject not in self._subs:
                if tokens is not None:
                    self._sub_patterns[subject] = tokens
                self._subs[subject] = await nc.subscribe_in_order(
                    subject, self._handler(subject, tokens is None))

    def _handler(self, key: str, literal: bool):
        incoming = self._incoming

        def on_message(subject: bytes, data: bytes) -> None:
            if literal or self._first_match(key, subject.decode("utf-8", "replace")):
                incoming(data)
        return on_message

    def _first_match(self, key: str, subject: str) -> bool:
        """Whether the wildcard subscription ``key`` is the one of this broker that delivers
        an event on ``subject`` (NATS sends one message per matching subscription)."""
        if subject in self._subs and subject not in self._sub_patterns:
            return False
        tokens = subject.split(".")
        return key == min(k for k, pat in self._sub_patterns.items()
                          if k == key or match_tokens(pat, tokens))

    def _incoming(self, data: bytes) -> None:
        head = parse_envelope(data)
        if head is None:
            self.stats.cluster_invalid += 1
            return
        kind, flags, origin, msg_id = head
        if origin == self.origin:
            return  # not with no_echo; from a second connection of this broker's id at most
        # every event is in the stream: recorded sessions get it from there, with its id
        self.broker.deliver_remote(memoryview(data)[ENVELOPE.size:], kind, flags, msg_id, None,
                                    False, self.streams)

    def _stream_entry(self, msg) -> tuple | None:
        """(envelope head, stream sequence) of a message read from the stream, None (counted)
        if it is not one."""
        head = parse_envelope(msg.data)
        try:
            seq = msg.metadata.sequence.stream
        except Exception:  # noqa: BLE001 - not a JetStream delivery
            seq = None
        if head is None or seq is None:
            self.stats.cluster_invalid += 1
            return None
        return head, seq

    async def _on_stream(self, msg) -> None:
        """An event from a topic's ordered consumer: for the subscriptions it feeds."""
        found = self._stream_entry(msg)
        if found is not None:
            head, seq = found
            self.broker.deliver_remote(memoryview(msg.data)[ENVELOPE.size:], head[0], head[1],
                                        head[3], (seq, 0), True)

    def _on_pattern(self, pattern: str):
        """The handler of a recorded pattern's ordered consumer."""
        async def on_message(msg) -> None:
            found = self._stream_entry(msg)
            if found is not None:
                head, seq = found
                self._feed(pattern, (seq, 0), memoryview(msg.data)[ENVELOPE.size:], head[1],
                           head[3])
        return on_message

    # -- at-least-once sessions' records -------------------------------------------------------
    async def _record(self, ops: list, positions: dict, refresh: bool, ttl_ms: int) -> list:
        if not self.streams:
            return []  # no JetStream after all
        if not self._connected.is_set() or self._kv is None:
            raise ConnectionError("not connected to NATS (with JetStream)")
        js, kv = self._js, self._kv
        for topic in [t for t in self._feeds if t.decode("utf-8") not in self._topics]:
            await self._feeds.pop(topic).unsubscribe()  # nobody here subscribes any more
        for pattern in [p for p in self._pattern_feeds if p not in self._recording]:
            await self._pattern_feeds.pop(pattern).unsubscribe()
        puts: dict[str, str] = {}
        for op in ops:
            if op[0] == "begin":
                session, topic = op[1], op[2]
                if not self._still_subscribed(session, topic):
                    continue
                if self._recorded_pattern(session.client_id, topic):
                    await self._begin_pattern(session, topic)
                else:
                    await self._begin(session, topic)
            elif op[0] == "restore":
                found: dict[str, list[str]] = {"s": [], "p": []}
                for entry in await self._read(self._kv_subject(op[1].client_id, ">"),
                                              1, "KV_" + self.bucket, last_per_subject=True):
                    parts = entry.subject.split(".", 4)
                    name = topic_of(self.subject_prefix, self.subject_prefix + "." + parts[4])
                    if name is None or parts[2] not in found:
                        self.stats.cluster_invalid += 1
                    else:
                        found[parts[2]].append(name)
                self._restore(op[1], found["s"], found["p"])
            elif op[0] == "hdel":
                self._recorded.pop((op[1], op[2]), None)
                key = self._key(op[1], op[2], op[3])
                puts.pop(key, None)
                await js.purge_stream("KV_" + self.bucket, subject=self._kv_subject(op[1], key))
            else:
                for where in [w for w in self._recorded if w[0] == op[1]]:
                    del self._recorded[where]
                await js.purge_stream("KV_" + self.bucket, subject=self._kv_subject(op[1], ">"))
        for (cid, topic, pattern), pos in positions.items():
            self._recorded[(cid, topic)] = pos
            puts[self._key(cid, topic, pattern)] = pos
        if refresh:
            live = set()
            for cid, topics in self.broker.core.stream_sessions():
                for topic in topics:
                    pos = self._recorded.get((cid, topic))
                    if pos is not None:
                        live.add((cid, topic))
                        puts.setdefault(self._key(cid, topic, self._recorded_pattern(cid, topic)),
                                        pos)
            for where in [w for w in self._recorded if w not in live]:
                del self._recorded[where]  # ended or gone: its record expires by itself
        if puts:
            await asyncio.gather(*(kv.put(k, v.encode("ascii")) for k, v in puts.items()))
        return []

    def _kv_subject(self, client_id: int, key: str) -> str:
        """The bucket's subject of a session's key, or (``key`` ``>``) of all its keys."""
        if key == ">":
            return "$KV.%s.*.%d.>" % (self.bucket, client_id)
        return "$KV.%s.%s" % (self.bucket, key)

    async def _live(self, feeds: dict, name, subject: str, cb) -> None:
        """Read ``subject`` (literal or wildcard) live from the stream, with an ordered
        consumer kept in ``feeds[name]``."""
        from nats.js.api import DeliverPolicy

        if name not in feeds:
            feeds[name] = await self._js.subscribe(
                subject, stream=self.stream_name, cb=cb, ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW, pending_msgs_limit=_SUB_PENDING_MSGS,
                pending_bytes_limit=_SUB_PENDING_BYTES)

    async def _position(self, session, topic: str, pattern: bool) -> int:
        """The first stream sequence to read for a session's recorded subscription (its
        record made now, after the stream's last message, if there is none)."""
        from nats.js.errors import NotFoundError

        key = self._key(session.client_id, topic, pattern)
        try:
            pos = (await self._kv.get(key)).value.decode("ascii")
        except NotFoundError:
            info = await self._js.stream_info(self.stream_name)
            pos = "(%d-0" % info.state.last_seq
            await self._kv.put(key, pos.encode("ascii"))
        self._recorded[(session.client_id, topic)] = pos
        start = _start(pos)
        if start is None:
            self.stats.cluster_invalid += 1
            start = 1
        return start

    def _entries(self, msgs) -> list:
        """The (stream id, PUBLISH payload, EVENT flags, msg_id) of messages read."""
        entries = []
        for m in msgs:
            head = parse_envelope(m.data)
            if head is None:
                self.stats.cluster_invalid += 1
                continue
            entries.append(((m.metadata.sequence.stream, 0),
                            memoryview(m.data)[ENVELOPE.size:], head[1], head[3]))
        return entries

    async def _begin(self, session, topic: str) -> None:
        """A session's subscription starts being recorded: read the topic from the stream
        live, and hand the session what it missed since its recorded position (bounded by
        the core as an away session's backlog)."""
        subject = self._subject(topic)
        await self._live(self._feeds, topic.encode("utf-8"), subject, self._on_stream)
        start = await self._position(session, topic, False)
        core = self.broker.core
        psub = await self._pull(subject, start, self.stream_name)
        try:
            while True:
                msgs, done = await self._fetch(psub)
                on = core.stream_replay(session, topic, self._entries(msgs), done,
                                        time.monotonic())
                self.broker.write_out()
                if on is None:
                    return
        finally:
            await self._unpull(psub)

    async def _begin_pattern(self, session, pattern: str) -> None:
        """The same for a pattern: one ordered consumer and one pull consumer filtered by its
        wildcard subject over the one stream (whose sequence orders every topic's events),
        reading at most the session's ``backlog_limit`` newest events it missed (see
        :meth:`_newest`): those before the first live one held back for it, or before the
        stream's end when it arrived (what comes later was published while it was here)."""
        subject = self._subject(pattern, True)
        await self._live(self._pattern_feeds, pattern, subject, self._on_pattern(pattern))
        # its feed runs: what is stored from now on is live for the session
        arrived = (await self._js.stream_info(self.stream_name)).state.last_seq + 1
        start = await self._position(session, pattern, True)
        limit = self.broker.core.backlog_limit
        where = (session, pattern)

        async def read(after):
            live = self._first_held(where)
            end = arrived if live is None else min(arrived, live[0])
            first = await self._newest(subject, start if after is None else after[0] + 1,
                                       end, limit)
            psub = await self._pull(subject, first, self.stream_name)
            try:
                while True:
                    msgs, done = await self._fetch(psub)
                    yield self._entries(msgs)
                    if done:
                        return
            finally:
                await self._unpull(psub)

        await self._catch_up(session, pattern, read)

    async def _pending(self, subject: str, start: int) -> int:
        """Messages of the stream on ``subject`` from the sequence ``start`` on."""
        psub = await self._pull(subject, start, self.stream_name)
        info = None
        try:
            info = await psub.consumer_info()
            return info.num_pending
        finally:
            await self._unpull(psub, info)

    async def _count(self, subject: str, start: int, end: int) -> int:
        """Messages of the stream on ``subject`` from the sequence ``start`` to ``end``
        (exclusive); those stored meanwhile (after ``end``) may make it a little less."""
        if start >= end:
            return 0
        pending = await self._pending(subject, start)
        return max(0, pending - await self._pending(subject, end))

    async def _newest(self, subject: str, start: int, end: int, limit: int) -> int:
        """The sequence to read ``subject`` from so as to read its ``limit`` newest messages
        from ``start`` to ``end`` (exclusive; those before are counted as dropped): a
        bisection over the sequences, O(log2(stream length)) consumers made, each telling its
        pending count. What is stored from ``end`` on is not counted (read all the same)."""
        total = await self._count(subject, start, end)
        if total <= limit:
            return start
        lo, hi = start + 1, end
        while lo < hi:
            mid = (lo + hi) // 2
            if await self._count(subject, mid, end) <= limit:
                hi = mid
            else:
                lo = mid + 1
        self.stats.dropped_backlog += max(0, total - await self._count(subject, lo, end))
        return lo

    async def _pull(self, subject: str, start: int, stream: str, last_per_subject=False):
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        if last_per_subject:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                                    ack_policy=AckPolicy.NONE, inactive_threshold=30.0,
                                    mem_storage=True)
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                    opt_start_seq=max(start, 1), ack_policy=AckPolicy.NONE,
                                    inactive_threshold=30.0, mem_storage=True)
        return await self._js.pull_subscribe(subject, stream=stream, config=config,
                                             pending_msgs_limit=2 * _REPLAY_PAGE,
                                             pending_bytes_limit=_SUB_PENDING_BYTES)

    async def _unpull(self, psub, info=None) -> None:
        """Delete a pull consumer (``info``: its info, when at hand)."""
        try:
            if info is None:
                info = await psub.consumer_info()
            await psub.unsubscribe()
            await self._js.delete_consumer(info.stream_name, info.name)
        except Exception:  # noqa: BLE001 - it expires by itself (inactive_threshold)
            pass

    async def _fetch(self, psub) -> tuple[list, bool]:
        """A page of a pull consumer's messages, and whether it was read to its end."""
        pending = (await psub.consumer_info()).num_pending
        if pending == 0:
            return [], True
        msgs = await psub.fetch(min(pending, _REPLAY_PAGE), timeout=5)
        return msgs, msgs[-1].metadata.num_pending == 0

    async def _read(self, subject: str, start: int, stream: str, last_per_subject=False):
        """Every message of ``stream`` on ``subject`` (a small read: a session's keys)."""
        psub = await self._pull(subject, start, stream, last_per_subject)
        try:
            found = []
            done = False
            while not done:
                msgs, done = await self._fetch(psub)
                found += msgs
            return found
        finally:
            await self._unpull(psub)
