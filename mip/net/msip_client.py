"""MSIP clients: :class:`AsyncClient` (asyncio) and :class:`Client` (blocking, own loop thread).

Both speak the reference layout and work against the reference broker unchanged: every
SUBSCRIBE and UNSUBSCRIBE asks for its ACK, and the extensions of ``mip broker``
(at-least-once delivery with event ACKs, session resume, topic patterns) are used only once the
broker has granted them in its answer to HELLO (:attr:`AsyncClient.capabilities`). Against a
broker that grants nothing, ``reliable`` subscriptions are at-most-once, a reconnection starts
a new session (subscriptions are sent again) and topics are literal.

::

    async with AsyncClient("tcp://127.0.0.1:7000") as c:
        sub = await c.subscribe("sensors.>")  # a pattern where the broker grants PATTERNS
        await c.publish("sensors.t", b"21.5", wait=True)
        async for event in sub:
            print(event.topic, bytes(event.data))
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import logging
import secrets
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from mip import msip
from mip.errors import BrokerError, ProtocolError
from mip.net.framing import FramedProtocol
from mip.net.loop import new_event_loop
from mip.net.msip_topics import topic_matches
from mip.net.urls import UnixAddress, parse_url

if TYPE_CHECKING:
    import zstandard

__all__ = ["AsyncClient", "Client", "Event", "Subscription"]

log = logging.getLogger("mip.msip.client")

_HELLO, _SUBSCRIBE, _UNSUBSCRIBE, _PUBLISH, _EVENT, _ACK, _ERROR, _PING, _PONG, _CLOSE = range(1, 11)
_K_EVENT = 1
_F_ACK_REQUIRED, _F_COMPRESSED, _F_URGENT = 1, 2, 4
_F_AT_LEAST_ONCE, _F_PATTERNS, _F_TAKEOVER = (int(msip.Flags.AT_LEAST_ONCE), int(msip.Flags.PATTERNS),
                                              int(msip.Flags.TAKEOVER))
_CAP_AT_LEAST_ONCE, _CAP_PATTERNS = int(msip.Capability.AT_LEAST_ONCE), int(msip.Capability.PATTERNS)
_TOPIC_LEN = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")


class Event:
    """One EVENT received.

    Attributes:
        topic: the topic it was published to.
        data: the published octets (decompressed when the publisher used zstd), a read-only
            memoryview of the received frame or bytes.
        msg_id: the publisher's msg_id (what an at-least-once ACK carries).
        flags: the EVENT frame's flags.
        reliable: whether it arrived on an at-least-once subscription (needs an ACK).
    """

    __slots__ = ("topic", "data", "msg_id", "flags", "reliable")

    def __init__(self, topic: str, data, msg_id: int, flags: int, reliable: bool = False):
        self.topic = topic
        self.data = data
        self.msg_id = msg_id
        self.flags = flags
        self.reliable = reliable

    def __repr__(self) -> str:
        return (f"Event(topic={self.topic!r}, msg_id={self.msg_id}, flags={self.flags}, "
                f"reliable={self.reliable}, {len(self.data)} octets)")

    def text(self) -> str:
        """The data decoded as UTF-8."""
        return bytes(self.data).decode("utf-8")

    def message(self):
        """The data decoded as a MIP message (``mip.decode``)."""
        import mip

        return mip.decode(self.data)

    def arrays(self) -> tuple:
        """The numpy arrays sent with ``publish_arrays`` (read-only views of the received data)."""
        return tuple(self.message().batch[0])


class Subscription:
    """A subscription: iterate it (``async for``) or give a callback to ``subscribe``.

    Events for the iterator wait in a queue of at most ``queue_size`` events; when it is full
    the oldest is dropped and counted in :attr:`dropped`.
    """

    def __init__(self, client: "AsyncClient", topic: str, callback, reliable: bool,
                 queue_size: int):
        self.client = client
        self.topic = topic
        self.callback = callback
        self.reliable = reliable
        self.dropped = 0
        self._queue: collections.deque = collections.deque(maxlen=queue_size)
        self._waiter: asyncio.Future | None = None
        self._closed = False

    def _push(self, event: Event) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(event)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self, timeout: float | None = None) -> Event:
        """The next event; raises ``asyncio.TimeoutError`` after ``timeout`` seconds."""
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            finally:
                self._waiter = None
        event = self._queue.popleft()
        if event.reliable and self.client.auto_ack:
            self.client._send_ack(event.msg_id)
        return event

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        return await self.get()

    async def close(self) -> None:
        """Unsubscribe and end the iteration."""
        await self.client.unsubscribe(self.topic)

    def _end(self) -> None:
        self._closed = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


class _Protocol(FramedProtocol["msip.Frame"]):
    def __init__(self, client: "AsyncClient"):
        self.client = client
        self.parser = msip.FrameParser(max_payload=client.max_payload)
        self.paused = False
        self.drained: asyncio.Future | None = None

    def frames_received(self, frames, nbytes):
        for f in frames:
            self.client._on_frame(self, f)

    def bad_frames(self, exc):
        log.warning("bad frame from broker: %s", exc)
        self.transport.abort()

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def connection_lost(self, exc):
        self.transport = None
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.client._on_lost(self, exc)


class AsyncClient:
    """An asyncio MSIP client. Times are in seconds, sizes in octets.

    Args:
        url: ``tcp://HOST:PORT`` or ``unix:///PATH`` of the broker.
        client_id: a session to resume on the first connect (None: the broker gives one).
        token: authentication token sent in HELLO after the client id.
        reconnect: reconnect automatically (with session resume) when the connection drops.
        reconnect_delay: first delay before reconnecting, doubled up to ``reconnect_max_delay``.
        max_reconnect_attempts: give up after this many failed attempts (None: never).
        request_timeout: how long replies (ACK, PONG) and a reconnection are waited for.
        ping_interval: send a PING this often to keep the connection alive (None: never).
        compress_threshold: zstd-compress published data at least this long (None: never).
        max_payload: largest frame payload accepted from the broker.
        auto_ack: acknowledge at-least-once events once the callback returned or the
            iterator handed them out; otherwise call :meth:`ack`.
        ssl: an ``ssl.SSLContext`` (or True for the default one) to connect with TLS.
    """

    def __init__(self, url: str = "tcp://127.0.0.1:7000", *, client_id: int | None = None,
                 token: bytes | None = None, reconnect: bool = True,
                 reconnect_delay: float = 0.05, reconnect_max_delay: float = 2.0,
                 max_reconnect_attempts: int | None = None, request_timeout: float = 10.0,
                 ping_interval: float | None = None, compress_threshold: int | None = None,
                 max_payload: int = 16 * 1024 * 1024, auto_ack: bool = True, ssl=None):
        self.address = parse_url(url)
        self.client_id = client_id
        self.token = token
        self.reconnect = reconnect
        self.reconnect_delay = reconnect_delay
        self.reconnect_max_delay = reconnect_max_delay
        self.max_reconnect_attempts = max_reconnect_attempts
        self.request_timeout = request_timeout
        self.ping_interval = ping_interval
        self.compress_threshold = compress_threshold
        self.max_payload = max_payload
        self.auto_ack = auto_ack
        self.ssl = ssl
        self._ids = itertools.count(secrets.randbits(40) << 16)
        self._proto: _Protocol | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._subs: dict[str, Subscription] = {}
        self._routes: dict[str, list[Subscription]] = {}  # topic -> matching subscriptions
        self._connected: asyncio.Event | None = None
        self._closing = False
        self._reconnect_task: asyncio.Task | None = None
        self._ping_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._error: BrokerError | None = None
        self._established = False
        self._compressor: zstandard.ZstdCompressor | None = None
        self._decompressor: zstandard.ZstdDecompressor | None = None
        self._resumable = client_id is not None  # send client_id in HELLO
        self._hello_id: int | None = None
        self.reconnects = 0  #: successful reconnections
        #: what the broker granted this session in its answer to HELLO (``msip.Capability``);
        #: NONE from the reference broker
        self.capabilities = msip.Capability.NONE
        self._acks = False  # the broker expects ACK frames for at-least-once events

    # -- connection ----------------------------------------------------------------------
    async def connect(self, resume: bool = True) -> int:
        """Connect and say HELLO (resuming ``client_id`` when known and ``resume``).
        Returns the session's client id."""
        if self._connected is None:
            self._connected = asyncio.Event()
        self._closing = False
        if not resume:
            self.client_id = None
            self._resumable = False
        await self._open()
        if self.ping_interval and self._ping_task is None:
            self._ping_task = asyncio.get_running_loop().create_task(self._ping_loop())
        assert self.client_id is not None  # the HELLO ACK gave it
        return self.client_id

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        a = self.address
        if isinstance(a, UnixAddress):
            _, proto = await loop.create_unix_connection(lambda: _Protocol(self), a.path,
                                                         ssl=self.ssl)
        else:
            _, proto = await loop.create_connection(lambda: _Protocol(self), a.host, a.port,
                                                    ssl=self.ssl)
        self._proto = proto
        self._error = None
        msg_id = next(self._ids)
        resume = self._resumable and self.client_id is not None
        if not resume and self.token is None:
            hello = b""
        else:
            hello = msip.encode_hello_payload(self.client_id if resume else 0, self.token)
        fut = self._expect(msg_id)
        # extensions the reference ignores: this client acknowledges events and wants its
        # session kept (ACK_REQUIRED), uses patterns, and owns the id it resumes (TAKEOVER)
        flags = _F_ACK_REQUIRED | _F_PATTERNS | (_F_TAKEOVER if resume else 0)
        self._hello_id = msg_id
        self._write(msip.encode(_HELLO, _K_EVENT, hello, msg_id, flags))
        await self._wait(fut, msg_id)
        # the broker keeps a session's subscriptions; a restarted broker does not: send them
        for sub in list(self._subs.values()):
            await self._send_subscribe(sub.topic, sub.reliable)
        self._established = True
        assert self._connected is not None
        self._connected.set()

    async def close(self) -> None:
        """Send CLOSE and close the connection; no reconnection afterwards."""
        self._closing = True
        for task in (self._reconnect_task, self._ping_task):
            if task is not None:
                task.cancel()
        self._reconnect_task = self._ping_task = None
        proto = self._proto
        if proto is not None and proto.transport is not None:
            proto.transport.write(msip.encode(_CLOSE, _K_EVENT, b"", next(self._ids), 0))
            proto.transport.close()
        for sub in self._subs.values():
            sub._end()
        self._fail_pending(ConnectionError("client closed"))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> "AsyncClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """Whether a connection is up and its HELLO answered."""
        return self._connected is not None and self._connected.is_set()

    def _on_lost(self, proto: _Protocol, exc) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        if self._connected is not None:
            self._connected.clear()
        err = self._error or ConnectionError(f"connection to the broker lost: {exc}")
        self._fail_pending(err)
        if self._closing:
            return
        if self.reconnect and self._established and self._reconnect_task is None:
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect_loop())
        elif not self.reconnect or not self._established:
            for sub in self._subs.values():
                sub._end()

    async def _reconnect_loop(self) -> None:
        delay = self.reconnect_delay
        attempts = 0
        try:
            while not self._closing:
                await asyncio.sleep(delay)
                attempts += 1
                try:
                    await self._open()
                except (OSError, ConnectionError, asyncio.TimeoutError, BrokerError) as exc:
                    log.debug("reconnect attempt %d failed: %s", attempts, exc)
                    if self._proto is not None and self._proto.transport is not None:
                        self._proto.transport.abort()
                    if self.max_reconnect_attempts is not None and attempts >= self.max_reconnect_attempts:
                        log.warning("giving up reconnecting after %d attempts", attempts)
                        for sub in self._subs.values():
                            sub._end()
                        return
                    delay = min(delay * 2, self.reconnect_max_delay)
                    continue
                self.reconnects += 1
                return
        finally:
            self._reconnect_task = None

    async def _ping_loop(self) -> None:
        interval = self.ping_interval
        assert interval is not None  # started only with a ping interval
        while not self._closing:
            await asyncio.sleep(interval)
            if self.connected:
                try:
                    await self.ping()
                except (ConnectionError, asyncio.TimeoutError, BrokerError):
                    pass

    async def _ready(self) -> None:
        if self._connected is None:
            raise ConnectionError("not connected: call connect() first")
        if self._closing:
            raise ConnectionError("client closed")
        if not self._connected.is_set():
            try:
                await asyncio.wait_for(self._connected.wait(), self.request_timeout)
            except asyncio.TimeoutError:
                raise ConnectionError("not connected to the broker") from None

    # -- frames --------------------------------------------------------------------------
    def _write(self, data, *more) -> None:
        proto = self._proto
        if proto is None or proto.transport is None:
            raise ConnectionError("not connected to the broker")
        if more:
            proto.transport.writelines((data,) + more)
        else:
            proto.transport.write(data)

    async def _drain(self) -> None:
        proto = self._proto
        if proto is not None and proto.paused:
            proto.drained = asyncio.get_running_loop().create_future()
            await proto.drained

    def _expect(self, msg_id: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        return fut

    async def _wait(self, fut: asyncio.Future, msg_id: int):
        # one timer handle per request (cheaper than asyncio.wait_for on this hot path)
        timer = asyncio.get_running_loop().call_later(self.request_timeout, _expire, fut)
        try:
            return await fut
        finally:
            timer.cancel()
            self._pending.pop(msg_id, None)

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: nobody may be waiting any more

    def _on_frame(self, proto: _Protocol, f) -> None:
        ft = f.frame_type
        if ft == _EVENT:
            self._on_event(f)
        elif ft == _ACK or ft == _PONG:
            if ft == _ACK and f.msg_id == self._hello_id:
                self._on_hello_ack(f)
            fut = self._pending.pop(f.msg_id, None)
            if fut is not None and not fut.done():
                fut.set_result(f)
        elif ft == _PING:
            assert proto.transport is not None  # frames come from a connected transport
            proto.transport.write(msip.encode(_PONG, _K_EVENT, b"", f.msg_id, 0))
        elif ft == _ERROR:
            reason = bytes(f.payload).decode("utf-8", "replace")
            log.warning("broker error: %s", reason)
            self._error = BrokerError(reason)
            self._fail_pending(self._error)
        elif ft == _CLOSE:
            assert proto.transport is not None
            proto.transport.close()

    def _on_hello_ack(self, f) -> None:
        # at once, before the events that follow it in the same read (a resumed session's)
        self._hello_id = None
        reply = bytes(f.payload)
        self.client_id = _U64.unpack(reply[:8])[0]
        caps = _U32.unpack(reply[8:12])[0] if len(reply) >= 12 else 0
        self.capabilities = msip.Capability(caps & 7)
        self._acks = self._resumable = bool(caps & _CAP_AT_LEAST_ONCE)  # acks; session kept
        self._routes.clear()

    def _on_event(self, f) -> None:
        try:
            topic, data = msip.decode_publish_payload(f.payload)
        except ProtocolError as exc:
            log.warning("dropping an EVENT with a bad payload: %s", exc)
            return
        if f.flags & _F_COMPRESSED and bytes(data[:4]) == msip.ZSTD_MAGIC:
            data = self._decompress(data)
        matched = self._routes.get(topic)
        if matched is None:
            patterns = bool(self.capabilities & _CAP_PATTERNS)
            matched = [s for s in self._subs.values() if topic_matches(s.topic, topic, patterns)]
            if len(self._routes) > 10_000:
                self._routes.clear()
            self._routes[topic] = matched
        # only a broker that granted at-least-once expects ACK frames (the reference closes
        # the connection on one)
        reliable = self._acks and any(s.reliable for s in matched)
        event = Event(topic, data, f.msg_id, f.flags, reliable)
        acked_later = False
        for sub in matched:
            if sub.callback is None:
                sub._push(event)
                acked_later = acked_later or sub.reliable
                continue
            try:
                result = sub.callback(event)
            except Exception:
                log.exception("subscription callback failed for %r", topic)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._callback_done(event, sub.reliable))
                acked_later = acked_later or sub.reliable
        if reliable and self.auto_ack and not acked_later:
            self._send_ack(event.msg_id)

    def _callback_done(self, event: Event, reliable: bool):
        def done(task: asyncio.Task) -> None:
            self._tasks.discard(task)
            if task.cancelled():
                return
            if task.exception() is not None:
                log.error("subscription callback failed for %r", event.topic,
                          exc_info=task.exception())
                return
            if reliable and self.auto_ack:
                self._send_ack(event.msg_id)
        return done

    def _send_ack(self, msg_id: int) -> None:
        if not self._acks:
            return  # a broker that did not grant at-least-once refuses ACK frames
        try:
            self._write(msip.encode_header(_ACK, _K_EVENT, 0, msg_id, 0))
        except ConnectionError:
            pass  # not acknowledged: the broker sends it again on resume

    def _decompress(self, data):
        if self._decompressor is None:
            import zstandard

            self._decompressor = zstandard.ZstdDecompressor()
        return self._decompressor.decompress(data, max_output_size=self.max_payload)

    # -- API -----------------------------------------------------------------------------
    async def subscribe(self, topic: str, callback: Callable[[Event], Any] | None = None, *,
                        reliable: bool = False, queue_size: int = 10_000) -> Subscription:
        """Subscribe to ``topic`` (exact, or a pattern with ``*`` / final ``>``).

        ``callback(event)`` (a function or a coroutine function) is called for each event;
        without one, iterate the returned :class:`Subscription`. ``reliable`` asks for
        at-least-once delivery: events are acknowledged after the callback returned (or when
        the iterator hands them out), and are sent again if the client dies before (only
        where the broker granted ``Capability.AT_LEAST_ONCE``; at-most-once otherwise).
        ``*`` and ``>`` are wildcards only where the broker granted ``Capability.PATTERNS``.

        Called before :meth:`connect`, it only registers the subscription, which connect
        then sends: this is how a resumed session gets its redelivered events handled."""
        sub = Subscription(self, topic, callback, reliable, queue_size)
        if self._connected is None:
            self._subs[topic] = sub
            self._routes.clear()
            return sub
        await self._ready()
        self._subs[topic] = sub
        self._routes.clear()
        await self._send_subscribe(topic, reliable)
        return sub

    async def _send_subscribe(self, topic: str, reliable: bool) -> None:
        # ACK_REQUIRED always: the reference refuses a SUBSCRIBE without it
        flags = _F_ACK_REQUIRED
        if reliable:
            if self._acks:
                flags |= _F_AT_LEAST_ONCE
            else:
                log.warning("the broker did not grant at-least-once delivery: %r is at-most-once",
                            topic)
        msg_id = next(self._ids)
        fut = self._expect(msg_id)
        self._write(msip.encode(_SUBSCRIBE, _K_EVENT, topic.encode(), msg_id, flags))
        await self._wait(fut, msg_id)

    async def unsubscribe(self, topic: str) -> None:
        """Stop a subscription (waits for the broker's ACK)."""
        sub = self._subs.pop(topic, None)
        self._routes.clear()
        if sub is not None:
            sub._end()
        if not self.connected:
            return
        msg_id = next(self._ids)
        fut = self._expect(msg_id)
        self._write(msip.encode(_UNSUBSCRIBE, _K_EVENT, topic.encode(), msg_id, _F_ACK_REQUIRED))
        await self._wait(fut, msg_id)

    async def publish(self, topic: str, data: bytes | str = b"", *, wait: bool = False,
                      urgent: bool = False, compress: bool | None = None) -> int:
        """Publish ``data`` (bytes-like, or str sent as UTF-8) to ``topic``; returns the msg_id.

        ``wait``: wait for the broker's ACK. ``urgent``: subscribers get it ahead of queued
        events. ``compress``: zstd-compress (default: when ``compress_threshold`` is reached).
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
        await self._ready()
        if compress is None:
            compress = self.compress_threshold is not None and len(data) >= self.compress_threshold
        flags = _F_URGENT if urgent else 0
        if compress:
            if self._compressor is None:
                import zstandard

                self._compressor = zstandard.ZstdCompressor()
            data = self._compressor.compress(data)
            flags |= _F_COMPRESSED
        return await self._publish_parts(topic, [data], len(data), flags, wait)

    def publish_nowait(self, topic: str, data: bytes | str = b"", *, urgent: bool = False) -> int:
        """Publish without waiting for anything (no compression, no drain); returns the msg_id.
        Raises ``ConnectionError`` when not connected."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        t = topic.encode("utf-8")
        msg_id = next(self._ids)
        header = msip.encode_header(_PUBLISH, _K_EVENT, 2 + len(t) + len(data), msg_id,
                                    _F_URGENT if urgent else 0)
        if len(data) <= 16 * 1024:
            self._write(header + _TOPIC_LEN.pack(len(t)) + t + data)
        else:
            self._write(header + _TOPIC_LEN.pack(len(t)) + t, data)
        return msg_id

    async def publish_arrays(self, topic: str, *arrays, wait: bool = False,
                             urgent: bool = False) -> int:
        """Publish numpy arrays as one MIP message (tensor values, one item); the subscriber
        gets them back with :meth:`Event.arrays` as read-only numpy views. Large arrays are
        sent from their own memory, not copied."""
        import mip

        parts = mip.encode_response_buffers([tuple(arrays)])
        n = sum(memoryview(p).nbytes for p in parts)
        await self._ready()
        return await self._publish_parts(topic, parts, n, _F_URGENT if urgent else 0, wait)

    async def _publish_parts(self, topic: str, parts, n: int, flags: int, wait: bool) -> int:
        t = topic.encode("utf-8")
        msg_id = next(self._ids)
        header = msip.encode_header(_PUBLISH, _K_EVENT, 2 + len(t) + n, msg_id, flags)
        fut = self._expect(msg_id) if wait else None
        head = header + _TOPIC_LEN.pack(len(t)) + t
        if len(parts) == 1 and n <= 16 * 1024:
            self._write(head + parts[0])
        else:
            self._write(head, *parts)
        if fut is not None:
            await self._wait(fut, msg_id)
        else:
            await self._drain()
        return msg_id

    async def ping(self) -> float:
        """Round trip to the broker, in seconds."""
        await self._ready()
        msg_id = next(self._ids)
        fut = self._expect(msg_id)
        t0 = time.perf_counter()
        self._write(msip.encode(_PING, _K_EVENT, b"", msg_id, 0))
        await self._wait(fut, msg_id)
        return time.perf_counter() - t0

    def ack(self, msg_id: int) -> None:
        """Acknowledge an at-least-once event by its msg_id (when ``auto_ack`` is off); nothing
        is sent to a broker that did not grant at-least-once delivery."""
        self._send_ack(msg_id)


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError("no reply from the broker in time"))


class _BlockingSubscription:
    """Iterate events in the calling thread: ``for event in sub`` or ``sub.get(timeout)``."""

    def __init__(self, client: "Client", sub: Subscription):
        self._client = client
        self.subscription = sub
        self.topic = sub.topic

    def get(self, timeout: float | None = None) -> Event:
        """The next event; raises ``TimeoutError`` after ``timeout`` seconds."""
        try:
            return self._client._call(self.subscription.get(timeout), None)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no event on {self.topic!r} within {timeout} s") from None

    def __iter__(self):
        return self

    def __next__(self) -> Event:
        try:
            return self.get()
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._client._call(self.subscription.close())


class Client:
    """A blocking MSIP client: an :class:`AsyncClient` on its own event loop thread (uvloop
    when installed). Takes the same arguments. Callbacks run on that thread."""

    def __init__(self, url: str = "tcp://127.0.0.1:7000", **options):
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="msip-client",
                                        daemon=True)
        self._thread.start()
        self._async = AsyncClient(url, **options)

    def _call(self, coro, timeout: float | None = -1):
        if timeout == -1:
            timeout = self._async.request_timeout * 2
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def client_id(self) -> int | None:
        return self._async.client_id

    @property
    def connected(self) -> bool:
        return self._async.connected

    def connect(self, resume: bool = True) -> int:
        """See :meth:`AsyncClient.connect`."""
        return self._call(self._async.connect(resume))

    def subscribe(self, topic: str, callback=None, *, reliable: bool = False,
                  queue_size: int = 10_000) -> _BlockingSubscription:
        """See :meth:`AsyncClient.subscribe`; iterate the result in this thread."""
        sub = self._call(self._async.subscribe(topic, callback, reliable=reliable,
                                               queue_size=queue_size))
        return _BlockingSubscription(self, sub)

    def unsubscribe(self, topic: str) -> None:
        self._call(self._async.unsubscribe(topic))

    def publish(self, topic: str, data=b"", *, wait: bool = False, urgent: bool = False,
                compress: bool | None = None) -> int:
        """See :meth:`AsyncClient.publish`."""
        return self._call(self._async.publish(topic, data, wait=wait, urgent=urgent,
                                              compress=compress))

    def publish_arrays(self, topic: str, *arrays, wait: bool = False, urgent: bool = False) -> int:
        """See :meth:`AsyncClient.publish_arrays`."""
        return self._call(self._async.publish_arrays(topic, *arrays, wait=wait, urgent=urgent))

    def ping(self) -> float:
        """Round trip to the broker, in seconds."""
        return self._call(self._async.ping())

    def ack(self, msg_id: int) -> None:
        self._loop.call_soon_threadsafe(self._async.ack, msg_id)

    def close(self) -> None:
        """Close the connection and stop the loop thread."""
        if not self._loop.is_closed():
            try:
                self._call(self._async.close())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(5)
                self._loop.close()

    def __enter__(self) -> "Client":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
