"""Brokers joined through a real redis-server or nats-server (``cluster=``, ``mip broker
--cluster``): what is published on one broker reaches the subscribers of the others, once, in
order; at-least-once sessions resume on another broker. Each test runs on both engines (the
``plane`` fixture), against a server the tests start on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from mip.net import AsyncClient, Broker

import _msip_support as w
from _redis import start_redis
from _serve_process import free_port, stop_process

redis = pytest.importorskip("redis")


def _redis(port: int, host: str = "127.0.0.1"):
    return redis.Redis(host=host, port=port, socket_timeout=5)


class RedisPlane:
    """A redis-server as the backplane, and what the tests look up in it (blocking calls:
    from a thread, ``asyncio.to_thread`` or :func:`until`)."""

    name = "redis"

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.port, self.host = port, host
        self.url = f"redis://{host}:{port}/0"
        self.proc = None

    def restart(self) -> None:  # for a private server (:func:`private_plane`)
        self.proc = start_redis(self.port, bind=self.host)

    def stop(self) -> None:
        stop_process(self.proc)

    def numsub(self, topic: str, prefix: str = "msip:") -> int:
        """Brokers subscribed to ``topic``."""
        with contextlib.closing(_redis(self.port, self.host)) as r:
            return dict(r.pubsub_numsub(prefix + topic))[(prefix + topic).encode()]

    def numpat(self, prefix: str = "msip:") -> int:
        """Wildcard subscriptions (of any prefix)."""
        with contextlib.closing(_redis(self.port, self.host)) as r:
            return r.pubsub_numpat()

    def raw_publish(self, topic: str, data: bytes, prefix: str = "msip:") -> None:
        with contextlib.closing(_redis(self.port, self.host)) as r:
            r.publish(prefix + topic, data)

    def position(self, client_id: int, topic: str, prefix: str,
                 pattern: bool = False) -> str | None:
        """The session's recorded position in ``topic``'s stream (or the pattern's)."""
        field = (b"\xff" if pattern else b"") + topic.encode()
        with contextlib.closing(_redis(self.port, self.host)) as r:
            pos = r.hget(f"{prefix}session:{client_id}", field)
            return None if pos is None else pos.decode()

    def recorded(self, client_id: int, topic: str, prefix: str) -> bool:
        """The subscription is recorded, and the topic's events stored."""
        with contextlib.closing(_redis(self.port, self.host)) as r:
            return bool(r.exists(f"{prefix}want:{topic}")
                        and r.hexists(f"{prefix}session:{client_id}", topic))

    def record_exists(self, client_id: int, prefix: str) -> bool:
        with contextlib.closing(_redis(self.port, self.host)) as r:
            return bool(r.exists(f"{prefix}session:{client_id}"))

    def stream(self, topic: str, prefix: str) -> tuple[int, str]:
        """(events stored for ``topic``, the last one's id)."""
        with contextlib.closing(_redis(self.port, self.host)) as r:
            last = r.xrevrange(f"{prefix}stream:{topic}", count=1)
            return r.xlen(f"{prefix}stream:{topic}"), last[0][0].decode() if last else ""

    def stored(self, prefix: str) -> bool:
        with contextlib.closing(_redis(self.port, self.host)) as r:
            return bool(r.keys(prefix + "*"))


def start_nats(port: int, monitor: int, store: str, host: str = "127.0.0.1", prefix=(),
               call=lambda f: f()) -> subprocess.Popen:
    """nats-server with JetStream (its files in ``store``) on ``host``:``port``, its
    monitoring endpoint on ``monitor``; returns once it answers. Skips the test without the
    binary. Elsewhere than on this host: ``prefix`` (the command that runs it, such as ``ip
    netns exec NS``) and ``call`` (``call(f)`` runs ``f`` where the server is reachable)."""
    binary = shutil.which("nats-server")
    if binary is None:
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    proc = subprocess.Popen([*prefix, binary, "-a", host, "-p", str(port), "-m", str(monitor),
                             "-js", "-sd", store], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def healthy() -> bool:
        with urllib.request.urlopen(f"http://{host}:{monitor}/healthz?js-enabled-only=true",
                                    timeout=1) as r:
            return r.status == 200

    end = time.monotonic() + 10
    while time.monotonic() < end:
        with contextlib.suppress(OSError):
            if call(healthy):
                return proc
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError("nats-server did not start")


class NatsPlane:
    """A nats-server (with JetStream) as the backplane, as :class:`RedisPlane`."""

    name = "nats"

    def __init__(self, port: int, monitor: int, store: str, host: str = "127.0.0.1"):
        self.port, self.monitor, self.store, self.host = port, monitor, store, host
        self.url = f"nats://{host}:{port}"
        self.proc = None

    def restart(self) -> None:
        self.proc = start_nats(self.port, self.monitor, self.store, self.host)

    def stop(self) -> None:
        stop_process(self.proc)

    def _run(self, work):
        import nats

        async def main():
            nc = await nats.connect(self.url, allow_reconnect=False, connect_timeout=5)
            try:
                return await work(nc, nc.jetstream(timeout=5))
            finally:
                await nc.close()

        return asyncio.run(main())

    def _subjects(self) -> list[str]:
        with urllib.request.urlopen(f"http://{self.host}:{self.monitor}/connz?subs=1",
                                    timeout=5) as r:
            doc = json.load(r)
        return [s for c in doc.get("connections") or [] for s in c.get("subscriptions_list", [])]

    def numsub(self, topic: str, prefix: str = "msip:") -> int:
        from mip.net.msip_nats import subject_of

        return self._subjects().count(subject_of(prefix.rstrip(":."), topic))

    def sent_to(self, broker: Broker) -> int:
        """Messages the server sent a broker's connection."""
        name = "mip broker %016x" % broker._cluster.origin
        with urllib.request.urlopen(f"http://{self.host}:{self.monitor}/connz", timeout=5) as r:
            doc = json.load(r)
        return sum(c["out_msgs"] for c in doc["connections"] if c.get("name") == name)

    def numpat(self, prefix: str = "msip:") -> int:
        """Wildcard subscriptions under ``prefix``."""
        start = prefix.rstrip(":.") + "."
        return sum(1 for s in self._subjects()
                   if s.startswith(start) and ("*" in s.split(".") or s.endswith(".>")))

    def raw_publish(self, topic: str, data: bytes, prefix: str = "msip:") -> None:
        from mip.net.msip_nats import subject_of

        async def work(nc, js):
            await nc.publish(subject_of(prefix.rstrip(":."), topic), data)
            await nc.flush()

        self._run(work)

    def _key(self, client_id: int, topic: str, prefix: str,
             pattern: bool = False) -> tuple[str, str]:
        from mip.net.msip_nats import names, subject_of

        subject, _, bucket = names(prefix)
        return bucket, "%s.%d.%s" % ("p" if pattern else "s", client_id,
                                     subject_of("", topic)[1:])

    def position(self, client_id: int, topic: str, prefix: str,
                 pattern: bool = False) -> str | None:
        from nats.js.errors import NotFoundError

        bucket, key = self._key(client_id, topic, prefix, pattern)

        async def work(nc, js):
            try:
                return (await js.get_last_msg("KV_" + bucket, f"$KV.{bucket}.{key}")).data.decode()
            except NotFoundError:
                return None

        return self._run(work)

    def recorded(self, client_id: int, topic: str, prefix: str) -> bool:
        return self.position(client_id, topic, prefix) is not None

    def record_exists(self, client_id: int, prefix: str) -> bool:
        from mip.net.msip_nats import names
        from nats.js.errors import NotFoundError

        bucket = names(prefix)[2]

        async def work(nc, js):
            try:
                info = await js.stream_info("KV_" + bucket, f"$KV.{bucket}.s.{client_id}.>")
            except NotFoundError:
                return False
            return bool(info.state.subjects)

        return self._run(work)

    def stream(self, topic: str, prefix: str) -> tuple[int, str]:
        from mip.net.msip_nats import names, subject_of

        subject, stream, _ = names(prefix)

        async def work(nc, js):
            info = await js.stream_info(stream, subject_of(subject, topic))
            count = (info.state.subjects or {}).get(subject_of(subject, topic), 0)
            if not count:
                return 0, ""
            return count, "%d-0" % (await js.get_last_msg(stream, subject_of(subject, topic))).seq

        return self._run(work)

    def stored(self, prefix: str) -> bool:
        from mip.net.msip_nats import names

        async def work(nc, js):
            return bool(set(names(prefix)[1:]) & {s.config.name.removeprefix("KV_")
                                                  for s in await js.streams_info()})

        return self._run(work)

    def clear(self) -> None:
        """Delete every stream (the events and sessions' records of the test before)."""
        async def work(nc, js):
            for info in await js.streams_info():
                await js.delete_stream(info.config.name)

        self._run(work)


@pytest.fixture(scope="module")
def _nats_server():
    with tempfile.TemporaryDirectory(prefix="mip-nats-") as store:
        plane = NatsPlane(free_port(), free_port(), store)
        plane.restart()
        try:
            yield plane
        finally:
            plane.stop()


@pytest.fixture(params=["redis", "nats"])
def plane(request):
    """The backplane the test runs on: the run's redis-server (its database emptied), or the
    module's nats-server (its streams deleted)."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        return RedisPlane(int(url.rsplit(":", 1)[1].split("/")[0]))
    nats_plane = request.getfixturevalue("_nats_server")
    pytest.importorskip("nats")
    nats_plane.clear()
    return nats_plane


@contextlib.contextmanager
def private_plane(name: str):
    """A server of its own for a test that stops and starts it (``plane.restart()``)."""
    with tempfile.TemporaryDirectory(prefix="mip-plane-") as store:
        made = (RedisPlane(free_port()) if name == "redis"
                else NatsPlane(free_port(), free_port(), store))
        made.restart()
        try:
            yield made
        finally:
            made.stop()


async def until(predicate, timeout: float = 5.0) -> None:
    """Wait (bounded) until ``predicate()`` holds; predicates may block briefly (Redis)."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def caught_up(broker: Broker, client_id: int, topic: str, timeout: float = 10.0) -> None:
    """Wait (bounded) until ``broker`` has read the session's recorded subscription ``topic``
    to the end of its stream: its events are live from then on, no longer a catch-up's
    (which is bounded as an away backlog is)."""
    deadline = time.monotonic() + timeout
    while not any(cid == client_id and topic in topics
                  for cid, topics in broker.core.stream_sessions()):
        assert time.monotonic() < deadline, "catch-up not done in time"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def brokers(n: int, url: str, **options):
    started = [Broker(cluster=url, **options) for _ in range(n)]
    try:
        for b in started:
            await b.start("tcp://127.0.0.1:0")
            assert b.stats.cluster_connected
        yield started
    finally:
        for b in started:
            await b.stop(grace=1.0)


def _url(b: Broker) -> str:
    return f"tcp://127.0.0.1:{b.port}"


async def _collect(sub, count: int, timeout: float = 5.0) -> list[bytes]:
    return [bytes((await sub.get(timeout)).data) for _ in range(count)]


async def _nothing_more(*subs, wait: float = 0.2) -> None:
    await asyncio.sleep(wait)
    for s in subs:
        with pytest.raises(asyncio.TimeoutError):
            await s.get(0.01)


def test_publish_on_one_broker_reaches_the_others_once_in_order(plane):
    async def main():
        url = plane.url
        async with brokers(3, url) as (a, b, c):
            clients = [AsyncClient(_url(x), reconnect=False) for x in (a, b, c, a)]
            local, on_b, on_c, pub = clients
            for cl in clients:
                await cl.connect()
            subs = [await cl.subscribe("orders") for cl in (local, on_b, on_c)]
            await until(lambda: plane.numsub("orders") == 3)
            sent = [b"order %d" % i for i in range(300)]
            if plane.name == "nats":
                before = await asyncio.to_thread(plane.sent_to, a)
            for data in sent:
                await pub.publish("orders", data)
            for s in subs:  # the publishing broker's own subscriber too: once, not twice
                assert await _collect(s, len(sent)) == sent
            await _nothing_more(*subs)
            if plane.name == "nats":  # no_echo: NATS sent A none of its own
                assert await asyncio.to_thread(plane.sent_to, a) == before
            assert a.stats.cluster_published == 300 and a.stats.cluster_received == 0
            assert b.stats.cluster_received == c.stats.cluster_received == 300
            assert b.stats.cluster_published == c.stats.cluster_published == 0
            assert a.stats.cluster_dropped == 0
            # and from the other side: B publishes, A and C receive
            await on_b.publish("orders", b"from b")
            for s in subs:
                assert bytes((await s.get(5)).data) == b"from b"
            await _nothing_more(*subs)
            for cl in clients:
                await cl.close()

    w.run(main(), 30)


def test_any_topic_crosses_the_engine_unchanged(plane):
    """Topics are literal strings: empty tokens, wildcard characters, spaces, the escape
    character and non-ASCII text all reach the other broker's subscribers as they were."""
    topics = ["a..b", ".", "", "temp>30", "s.*x", "x=y", "=41", "é ü.\u2603", "a/b-c_d", "~!@#"]

    async def main():
        async with brokers(2, plane.url) as (a, b):
            pub, sub = AsyncClient(_url(a), reconnect=False), AsyncClient(_url(b), reconnect=False)
            await pub.connect()
            await sub.connect()
            subs = [await sub.subscribe(t) for t in topics]
            await until(lambda: all(plane.numsub(t) == 1 for t in topics))
            for t in topics:
                await pub.publish(t, t.encode("utf-8") + b"!")
            for t, s in zip(topics, subs):
                event = await s.get(5)
                assert (event.topic, bytes(event.data)) == (t, t.encode("utf-8") + b"!")
            await _nothing_more(*subs)
            assert b.stats.cluster_received == len(topics) and b.stats.cluster_invalid == 0
            await sub.close()
            await pub.close()

    w.run(main(), 30)


def test_nats_subjects_are_valid_and_give_the_topic_back():
    from mip.net.msip_nats import names, subject_of, topic_of

    for topic in ["orders", "a..b", ".x.", "", "*", ">", "a.>", "temp>30", "x=y", "é ü", "\x00"]:
        subject = subject_of("msip", topic)
        tokens = subject.split(".")
        assert all(tokens) and not any(c.isspace() for c in subject)
        assert "*" not in tokens and ">" not in tokens
        assert topic_of("msip", subject) == topic
    assert subject_of("msip", "s.*.x y.>", pattern=True) == "msip.s.*.x=20y.>"
    assert subject_of("msip", "temp>30", pattern=True) == "msip.temp=3E30"  # not a pattern
    for bad in ["other.x", "msip.=4", "msip.=zz", "msip.a b", "msip.=FF"]:
        assert topic_of("msip", bad) is None
    assert names("msip:") == ("msip", "msip_events", "msip_sessions")
    assert names("my app.") [0] == "my=20app"


def test_nats_without_jetstream_keeps_at_least_once_sessions_in_memory(tmp_path):
    """A nats-server without JetStream: the brokers join all the same; an at-least-once
    session is served from its broker's memory (as with ``cluster_stream_max=0``)."""
    pytest.importorskip("nats")
    binary = shutil.which("nats-server")
    if binary is None:
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    plane = NatsPlane(free_port(), free_port(), str(tmp_path))
    proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(plane.port), "-m",
                             str(plane.monitor)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def main():
        await until(lambda: _answers(plane), 10)
        async with brokers(2, plane.url) as (a, b):
            assert not a._cluster.streams and not b._cluster.streams
            pub, sub = AsyncClient(_url(a), reconnect=False), AsyncClient(_url(b), reconnect=False)
            await pub.connect()
            await sub.connect()
            s = await sub.subscribe("t", reliable=True)
            await until(lambda: plane.numsub("t") == 1)
            for i in range(20):
                await pub.publish("t", b"%d" % i)
            assert await _collect(s, 20) == [b"%d" % i for i in range(20)]
            await sub.close()
            await pub.close()

    try:
        w.run(main(), 30)
    finally:
        stop_process(proc)


def test_nats_stream_is_bounded_per_topic(_nats_server):
    """JetStream keeps the last ``cluster_stream_max`` events of every topic (Redis keeps
    streams only for topics wanted at least once, trimmed about: ``MAXLEN ~``)."""
    pytest.importorskip("nats")
    plane = _nats_server
    plane.clear()

    async def main():
        async with brokers(2, plane.url, cluster_prefix="cap:", cluster_stream_max=50) as (a, b):
            pub = AsyncClient(_url(a), reconnect=False)
            await pub.connect()
            for topic in ("t", "u"):
                for i in range(120):
                    await pub.publish(topic, b"%d" % i)
            await pub.publish("t", b"last", wait=True)
            await until(lambda: plane.stream("t", "cap:")[0] == 50)
            assert (await asyncio.to_thread(plane.stream, "u", "cap:"))[0] == 50
            await pub.close()

    w.run(main(), 30)


def _answers(plane: NatsPlane) -> bool:
    try:
        plane.numsub("-")
        return True
    except OSError:
        return False


def test_unsubscribing_stops_cluster_traffic(plane):
    async def main():
        url = plane.url
        async with brokers(2, url) as (a, b):
            pub, sub = AsyncClient(_url(a), reconnect=False), AsyncClient(_url(b), reconnect=False)
            await pub.connect()
            await sub.connect()
            await sub.subscribe("quiet")
            marker = await sub.subscribe("marker")
            await until(lambda: plane.numsub("quiet") == 1)
            await sub.unsubscribe("quiet")
            await until(lambda: plane.numsub("quiet") == 0)
            for i in range(20):
                await pub.publish("quiet", b"%d" % i)
            await until(lambda: plane.numsub("marker") == 1)
            await pub.publish("marker", b"m")
            # the engine keeps one connection's order: the marker comes after the quiet publishes
            assert bytes((await marker.get(5)).data) == b"m"
            assert b.stats.cluster_received == 1  # nothing of "quiet" came to B
            assert a.stats.cluster_published == 21
            await sub.close()
            await pub.close()

    w.run(main(), 30)


def test_foreign_messages_on_a_channel_are_counted_not_delivered(plane):
    from mip.net.msip_cluster import ENVELOPE

    async def main():
        url = plane.url
        async with brokers(2, url) as (a, b):
            sub = AsyncClient(_url(b), reconnect=False)
            await sub.connect()
            s = await sub.subscribe("t")
            await until(lambda: plane.numsub("t") == 1)
            env = ENVELOPE.pack(1, 1, 0, 42, 7)
            bad = [b"", b"junk", b"\x09" + env[1:] + b"\x00\x01t",  # unknown version
                   env, env + b"\x00", env + b"\x00\x09t",  # topic length past the end
                   env + b"\x00\x02\xff\xfe"]  # topic not UTF-8

            def send():
                for data in bad:
                    plane.raw_publish("t", data)
                plane.raw_publish("t", env + b"\x00\x01tok")  # a well-formed one from "broker 42"

            await asyncio.to_thread(send)
            event = await s.get(5)
            assert (event.topic, bytes(event.data), event.msg_id) == ("t", b"ok", 7)
            assert b.stats.cluster_invalid == len(bad) and b.stats.cluster_received == 1
            await _nothing_more(s)
            await sub.close()

    w.run(main(), 30)


def test_patterns_map_to_wildcard_subscriptions_and_deliver_once(plane):
    async def main():
        url = plane.url
        async with brokers(2, url, topic_patterns=True) as (a, b):
            pub = AsyncClient(_url(a), reconnect=False)
            await pub.connect()
            subs = {}
            # four sessions; in Redis s.* and s.> share the glob msip:s.*, and an event on s.a
            # comes three times (its channel, msip:s.*, msip:*.a); NATS has a subscription
            # each (s.a comes four times)
            for topic in ("s.*", "s.>", "s.a", "*.a"):
                cl = AsyncClient(_url(b), reconnect=False)
                await cl.connect()
                subs[topic] = await cl.subscribe(topic)
            patterns = 2 if plane.name == "redis" else 3
            await until(lambda: plane.numpat() == patterns and plane.numsub("s.a") == 1)
            await pub.publish("s.a", b"1")
            await pub.publish("s.b.c", b"2")  # the glob of s.* matches it; s.* does not
            await pub.publish("t.x", b"3")  # nobody's
            assert await _collect(subs["s.*"], 1) == [b"1"]
            assert await _collect(subs["s.>"], 2) == [b"1", b"2"]
            assert await _collect(subs["s.a"], 1) == [b"1"]
            assert await _collect(subs["*.a"], 1) == [b"1"]
            await _nothing_more(*subs.values())
            assert b.stats.cluster_received == 2  # once each, whatever matched in the engine
            for s in subs.values():
                await s.client.close()
            await until(lambda: plane.numpat() == 0 and plane.numsub("s.a") == 0)
            await pub.close()

    w.run(main(), 30)


def test_reference_layout_clients_across_brokers(plane):
    url = plane.url
    threads = [w.BrokerThread(cluster=url) for _ in range(3)]
    try:
        a, b, c = threads
        subs = []
        for t in (b, c):
            s = w.RefClient(t.port)
            s.hello()
            s.subscribe("sensors.t")
            subs.append(s)
        assert w.wait_for(lambda: plane.numsub("sensors.t") == 2, 5)
        pub = w.RefClient(a.port)
        pub.hello(msg_id=3)
        for i in range(50):
            payload = w.publish_payload("sensors.t", b"%d" % i)
            pub.send(w.PUBLISH, payload, msg_id=1000 + i, flags=w.URGENT)
            assert pub.recv_raw() == w.frame(w.ACK, b"", 1000 + i, 0, w.K_STATE)
        for s in subs:  # the same EVENT a local publish gives, in order
            for i in range(50):
                payload = w.publish_payload("sensors.t", b"%d" % i)
                assert s.recv_raw() == w.frame(w.EVENT, payload, 1000 + i, 0, w.K_EVENT)
            with pytest.raises(TimeoutError):  # and nothing more
                s.recv_raw(timeout=0.2)
        zstd = pytest.importorskip("zstandard")
        data = zstd.ZstdCompressor().compress(b"x" * 1000)
        payload = w.publish_payload("sensors.t", data)
        pub.send(w.PUBLISH, payload, msg_id=7, flags=w.COMPRESSED)
        for s in subs:
            assert s.recv_raw() == w.frame(w.EVENT, payload, 7, w.COMPRESSED, w.K_EVENT)
    finally:
        for t in threads:
            t.stop()


@pytest.mark.parametrize("engine", ["redis", "nats"])
def test_engine_restart_local_traffic_goes_on_and_cluster_resumes(engine):
    with private_plane(engine) as plane:
        w.run(_restart(plane), 60)


async def _restart(plane):
    url = plane.url
    async with brokers(2, url, cluster_max_pending=4096) as (a, b):
        pub = AsyncClient(_url(a), reconnect=False)
        local = AsyncClient(_url(a), reconnect=False)
        remote = AsyncClient(_url(b), reconnect=False)
        for cl in (pub, local, remote):
            await cl.connect()
        lsub, rsub = await local.subscribe("t"), await remote.subscribe("t")
        await until(lambda: plane.numsub("t") == 2)
        await pub.publish("t", b"before")
        assert bytes((await lsub.get(5)).data) == b"before"
        assert bytes((await rsub.get(5)).data) == b"before"

        await asyncio.to_thread(plane.stop)
        await until(lambda: not a.stats.cluster_connected and not b.stats.cluster_connected)
        for i in range(200):  # 200 * ~40 octets: more than the 4096 octets queued at most
            await pub.publish("t", b"down %03d" % i)
        assert await _collect(lsub, 200) == [b"down %03d" % i for i in range(200)]
        assert 0 < a.stats.cluster_pending_bytes <= 4096
        assert a.stats.cluster_dropped > 0

        await asyncio.to_thread(plane.restart)
        await until(lambda: a.stats.cluster_connected and b.stats.cluster_connected, 15)
        await until(lambda: plane.numsub("t") == 2, 10)
        assert b.stats.cluster_reconnects >= 1
        await until(lambda: a.stats.cluster_pending_bytes == 0, 10)
        await pub.publish("t", b"after")
        assert bytes((await lsub.get(5)).data) == b"after"
        # what was queued (within the bound) while it was down went out when it came
        # back, possibly before B subscribed again: B sees a subset of it, then "after"
        seen = []
        while True:
            data = bytes((await rsub.get(5)).data)
            if data == b"after":
                break
            seen.append(data)
        assert seen == sorted(seen) and all(d.startswith(b"down") for d in seen)
        for cl in (pub, local, remote):
            await cl.close()


@pytest.mark.parametrize("scheme", ["redis", "nats"])
def test_broker_starts_without_its_engine_and_bounds_its_queue(scheme):
    port = free_port()  # nothing listens there
    pytest.importorskip(scheme)

    async def main():
        b = Broker(cluster=f"{scheme}://127.0.0.1:{port}", cluster_max_pending=1000)
        await b.start("tcp://127.0.0.1:0")
        try:
            assert not b.stats.cluster_connected
            cl = AsyncClient(_url(b), reconnect=False)
            await cl.connect()
            sub = await cl.subscribe("x")
            for i in range(100):
                await cl.publish("x", b"%d" % i)
            assert await _collect(sub, 100) == [b"%d" % i for i in range(100)]
            assert b.stats.cluster_pending_bytes <= 1000
            assert b.stats.cluster_dropped > 0
            assert b.stats.cluster_published == 0
            await cl.close()
        finally:
            await b.stop(grace=1.0)

    w.run(main(), 20)


def test_cluster_url_is_checked():
    with pytest.raises(ValueError, match="redis://.*nats://"):
        Broker(cluster="amqp://127.0.0.1:5672")
    with pytest.raises(ValueError, match="max_pending"):
        Broker(cluster="redis://127.0.0.1:1/0", cluster_max_pending=0)
    with pytest.raises(ValueError, match="max_pending"):
        Broker(cluster="nats://127.0.0.1:1", cluster_max_pending=0)
    with pytest.raises(ValueError, match="prefix"):
        Broker(cluster="nats://127.0.0.1:1", cluster_prefix=":")


def test_help_lists_the_cluster_flags():
    out = subprocess.run([sys.executable, "-m", "mip.cli", "broker", "--help"],
                         capture_output=True, text=True, timeout=60, cwd=w.ROOT).stdout
    for flag in ("--cluster URL", "--cluster-prefix TEXT", "--cluster-max-pending OCTETS",
                 "--cluster-max-patterns N"):
        assert flag in out
    assert "(default 8M)" in " ".join(out.split())
    assert "nats://HOST:PORT" in out


@pytest.mark.parametrize("module, package, url", [("redis", "redis", "redis://127.0.0.1:1/0"),
                                                  ("nats", "nats-py", "nats://127.0.0.1:1")])
def test_cluster_without_the_client_package_names_the_extra(module, package, url):
    code = (f"import sys; sys.modules['{module}'] = None; from mip.cli import main; "
            "sys.exit(main(['broker', '--msip', 'tcp://127.0.0.1:0', '--cluster', "
            f"'{url}']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=w.ROOT)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"mip: error: --cluster needs the Python package '{package}', which is not installed: "
        "pip install 'mip-toolkit[broker]'"]


class _Broker(w.BrokerProcess):
    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)

    def __exit__(self, *exc):
        self.stop()


@contextlib.contextmanager
def _broker_processes(*args, n: int = 3):
    """``n`` ``mip broker ARGS`` processes, answering; all stopped at the end."""
    procs = [_Broker(*args) for _ in range(n)]
    try:
        for p in procs:
            p.connect().close()
        yield procs
    finally:
        for p in procs:
            p.stop()


def test_mip_broker_processes_and_a_killed_broker(plane):
    """Three ``mip broker --cluster`` processes; the broker of a subscriber is killed
    mid-stream; the subscriber reconnects to another broker and receives what is published
    from then on. At most once: what was published while it had no subscription anywhere
    (between the kill and its SUBSCRIBE on the other broker) is not delivered to it."""
    url = plane.url
    with _broker_processes("--cluster", url) as (a, b, c):
        async def main():
            pub = AsyncClient(f"tcp://127.0.0.1:{a.port}", reconnect=False)
            sub = AsyncClient(f"tcp://127.0.0.1:{b.port}", reconnect=False)
            other = AsyncClient(f"tcp://127.0.0.1:{c.port}", reconnect=False)
            for cl in (pub, sub, other):
                await cl.connect()
            s_b = await sub.subscribe("stream")
            s_c = await other.subscribe("stream")
            await until(lambda: plane.numsub("stream") == 2, 10)
            got_b, got_c = [], []
            for i in range(100):
                await pub.publish("stream", b"%05d" % i)
            got_b += await _collect(s_b, 100)
            b.stop(signal.SIGKILL)  # mid-stream: A keeps publishing
            for i in range(100, 150):
                await pub.publish("stream", b"%05d" % i)
            with contextlib.suppress(Exception):
                await sub.close()
            got_c += await _collect(s_c, 150)  # all of it reached C before the move
            moved = AsyncClient(f"tcp://127.0.0.1:{c.port}", reconnect=False)
            await moved.connect()
            s_moved = await moved.subscribe("stream")
            await until(lambda: plane.numsub("stream") == 1, 10)  # B's is gone
            for i in range(150, 250):
                await pub.publish("stream", b"%05d" % i)
            got_moved = await _collect(s_moved, 100)
            got_c += await _collect(s_c, 100)
            assert got_b == [b"%05d" % i for i in range(100)]
            assert got_moved == [b"%05d" % i for i in range(150, 250)]
            assert got_c == [b"%05d" % i for i in range(250)]  # C's own subscriber: all
            await _nothing_more(s_moved, s_c)
            for cl in (pub, other, moved):
                await cl.close()

        w.run(main(), 60)


def test_bench_pubsub_across_brokers(plane):
    from mip.bench.pubsub import run_pubsub

    async def main():
        url = plane.url
        async with brokers(2, url) as (a, b):
            doc = await run_pubsub(_url(a), subscribers=4, subscriber_urls=[_url(a), _url(b)],
                                   settle=0.3, duration=0.3, warmup=0.1, ping_duration=0,
                                   max_messages=2000)
            ps = doc["pubsub"]
            assert ps["published"] > 0 and ps["lost"] == 0
            assert ps["delivered"] == 4 * ps["published"]
            assert doc["target"]["subscriber_urls"] == [_url(a), _url(b)]
            assert b.stats.cluster_received == ps["published"]

    w.run(main(), 30)


@pytest.mark.parametrize("wanted", ["feed", "feed.*"])
def test_at_least_once_session_resumes_on_another_broker_after_a_kill(plane, wanted):
    """Three ``mip broker --cluster`` processes: a publisher on A, an at-least-once subscriber
    on B and an at-most-once one on C, to a topic or a pattern. B is killed (SIGKILL)
    mid-stream; the subscriber comes back on C with its client id and gets, from its last
    acknowledged position in the engine, every event: in order, none lost (some again: what B
    delivered and saw no ACK for), none its pattern does not match."""
    url = plane.url
    n, kill_at, sent_before = 1000, 300, 600
    pattern = wanted != "feed"
    topic = "feed.x" if pattern else "feed"
    with _broker_processes("--cluster", url, "--cluster-prefix", "resume:") as (a, b, c):
        async def main():
            pub = AsyncClient(f"tcp://127.0.0.1:{a.port}", reconnect=False)

            async def publish(i: int) -> None:
                await pub.publish(topic, b"%05d" % i)
                if pattern:
                    await pub.publish("feed.x.y", b"no")  # not matched by feed.*
            sub = AsyncClient(f"tcp://127.0.0.1:{b.port}", reconnect=False)
            plain = AsyncClient(f"tcp://127.0.0.1:{c.port}", reconnect=False)
            for cl in (pub, sub, plain):
                await cl.connect()
            s_c = await plain.subscribe(wanted)
            if pattern:
                await until(lambda: plane.numpat("resume:") >= 1, 10)
            s_b = await sub.subscribe(wanted, reliable=True)
            if not pattern:
                await until(lambda: plane.numsub("feed", "resume:") == 2, 10)
            await until(lambda: plane.position(sub.client_id, wanted, "resume:", pattern)
                        is not None, 10)
            for i in range(sent_before):
                await publish(i)
            got_b = await _collect(s_b, kill_at, 10)  # acknowledged as they are taken
            b.stop(signal.SIGKILL)
            for i in range(sent_before, n):
                await publish(i)
            with contextlib.suppress(Exception):
                await sub.close()
            moved = AsyncClient(f"tcp://127.0.0.1:{c.port}", client_id=sub.client_id,
                                reconnect=False)
            s_moved = await moved.subscribe(wanted, reliable=True)  # sent by connect
            await moved.connect()
            assert moved.client_id == sub.client_id
            first = int(bytes((await s_moved.get(10)).data))
            assert first <= kill_at  # nothing acknowledged is skipped
            got_moved = [b"%05d" % first] + await _collect(s_moved, n - 1 - first, 10)
            assert got_b == [b"%05d" % i for i in range(kill_at)]
            assert got_moved == [b"%05d" % i for i in range(first, n)]
            assert await _collect(s_c, n, 10) == [b"%05d" % i for i in range(n)]
            await _nothing_more(s_moved, s_c)
            for cl in (pub, plain, moved):
                await cl.close()
            # a CLOSE ends the session: its record in the engine goes too
            await until(lambda: not plane.record_exists(sub.client_id, "resume:"), 10)

        w.run(main(), 90)


def test_at_least_once_subscriber_gets_local_publishes_from_the_stream_once(plane):
    """An at-least-once subscriber on the publisher's own broker gets each event once, in
    order, through the engine (with its stream id); its position follows its ACKs; at-most-once
    subscribers are not slowed by it; ``--cluster-stream-max 0`` writes no stream."""
    async def main():
        url = plane.url
        async with brokers(2, url, cluster_prefix="own:") as (a, b):
            pub = AsyncClient(_url(a), reconnect=False)
            sub = AsyncClient(_url(a), reconnect=False)
            plain = AsyncClient(_url(a), reconnect=False)
            for cl in (pub, sub, plain):
                await cl.connect()
            reliable = await sub.subscribe("own", reliable=True)
            fast = await plain.subscribe("own")
            cid = sub.client_id
            await until(lambda: plane.position(cid, "own", "own:") is not None)
            sent = [b"%03d" % i for i in range(200)]
            for data in sent:
                await pub.publish("own", data)
            assert await _collect(reliable, 200) == sent
            assert await _collect(fast, 200) == sent
            await _nothing_more(reliable, fast)
            count, last = await asyncio.to_thread(plane.stream, "own", "own:")
            assert count == 200
            # every event acknowledged: the position is just after the last one
            await until(lambda: plane.position(cid, "own", "own:") == "(" + last)
            await sub.close()
            await until(lambda: not plane.record_exists(cid, "own:"))
            for cl in (pub, plain):
                await cl.close()
        async with brokers(1, url, cluster_prefix="off:", cluster_stream_max=0) as (c,):
            cl = AsyncClient(_url(c), reconnect=False)
            await cl.connect()
            s = await cl.subscribe("off", reliable=True)
            await until(lambda: plane.numsub("off", "off:") == 1)
            await cl.publish("off", b"x")
            assert bytes((await s.get(5)).data) == b"x"
            assert not await asyncio.to_thread(plane.stored, "off:")
            await cl.close()

    w.run(main(), 30)


def test_a_resuming_session_gets_its_recorded_subscriptions_back(plane):
    """A session resuming on a broker that never saw it, without subscribing again (a raw
    client relying on the broker to keep its session), has its at-least-once subscriptions
    restored from the engine, and gets what was published since its last ACK."""
    async def main():
        url = plane.url
        async with brokers(2, url, cluster_prefix="back:") as (a, b):
            pub = AsyncClient(_url(a), reconnect=False)
            sub = AsyncClient(_url(a), reconnect=False)
            await pub.connect()
            await sub.connect()
            s = await sub.subscribe("back", reliable=True)
            cid = sub.client_id
            await until(lambda: plane.position(cid, "back", "back:") is not None)
            await pub.publish("back", b"seen")
            assert bytes((await s.get(5)).data) == b"seen"
            await until(lambda: plane.position(cid, "back", "back:").startswith("("))
            sub._proto.transport.abort()  # gone without a CLOSE: the record stays
            await pub.publish("back", b"missed", wait=True)

            def resume():
                rc = w.RefClient(b.port)
                try:
                    assert rc.hello(sub.client_id, flags=w.ACK_REQUIRED) == sub.client_id
                    h, payload = rc.recv_until(w.EVENT, 5)
                    rc.send(w.ACK, msg_id=h["msg_id"])
                    return payload
                finally:
                    rc.close()

            assert await asyncio.to_thread(resume) == w.publish_payload("back", b"missed")
            assert b.session_info(sub.client_id)["subscriptions"] == {"back": True}
            await pub.close()

    w.run(main(), 30)


def _by_topic(events) -> dict[str, list[bytes]]:
    got: dict[str, list[bytes]] = {}
    for e in events:
        got.setdefault(e.topic, []).append(bytes(e.data))
    return got


async def _events(sub, count: int, timeout: float = 10.0) -> list:
    return [await sub.get(timeout) for _ in range(count)]


def test_at_least_once_pattern_session_resumes_on_another_broker(plane):
    """An at-least-once subscription to a pattern on A, its client away (no CLOSE), events
    published on C: on resuming on B with its client id, it gets every event that matched
    while it was away, in order per topic, none that did not match, then the live ones; an
    at-most-once pattern subscriber on B and an at-least-once one that stays on C get
    everything once, in order."""
    async def main():
        async with brokers(3, plane.url, cluster_prefix="pat:") as (a, b, c):
            pub = AsyncClient(_url(c), reconnect=False)
            sub = AsyncClient(_url(a), reconnect=False)
            plain = AsyncClient(_url(b), reconnect=False)
            steady = AsyncClient(_url(c), reconnect=False)
            for cl in (pub, sub, plain, steady):
                await cl.connect()
            s = await sub.subscribe("sensors.*", reliable=True)
            s_plain = await plain.subscribe("sensors.*")
            s_steady = await steady.subscribe("sensors.*", reliable=True)
            cid = sub.client_id
            for cl in (sub, steady):
                await until(lambda cl=cl: plane.position(cl.client_id, "sensors.*", "pat:",
                                                         True) is not None)
            await until(lambda: plane.numpat("pat:") >= 1)
            sent: dict[str, list[bytes]] = {"sensors.t": [], "sensors.u": []}

            async def publish(first: int, last: int) -> None:
                for i in range(first, last):
                    for topic in ("sensors.t", "sensors.u"):
                        sent[topic].append(b"%s %03d" % (topic[-1:].encode(), i))
                        await pub.publish(topic, sent[topic][-1])
                    await pub.publish("sensors.t.deep", b"no")  # not matched by sensors.*
                    await pub.publish("other", b"no")

            await publish(0, 10)
            assert _by_topic(await _events(s, 20)) == sent
            await until(lambda: plane.position(cid, "sensors.*", "pat:", True).startswith("("))
            sub._proto.transport.abort()  # away without a CLOSE: the record stays
            await until(lambda: a.stats.sessions_away == 1)
            await publish(10, 60)
            await pub.publish("sensors.t", b"marker", wait=True)
            sent["sensors.t"].append(b"marker")

            moved = AsyncClient(_url(b), client_id=cid, reconnect=False)
            s_moved = await moved.subscribe("sensors.*", reliable=True)  # sent by connect
            await moved.connect()
            assert moved.client_id == cid
            got = _by_topic(await _events(s_moved, 101))
            assert got == {t: d[10:] for t, d in sent.items()}
            await pub.publish("sensors.u", b"live")
            assert bytes((await s_moved.get(5)).data) == b"live"
            sent["sensors.u"].append(b"live")
            for other in (s_plain, s_steady):
                assert _by_topic(await _events(other, 122)) == sent
            await _nothing_more(s_moved, s_plain, s_steady)
            assert b.stats.dropped_backlog == 0
            for cl in (pub, plain, steady, moved):
                await cl.close()
            # a CLOSE ends the session: its record in the engine goes too
            await until(lambda: not plane.record_exists(cid, "pat:"))

    w.run(main(), 60)


async def _away_pattern_session(a: Broker, b: Broker, c: Broker, pattern: str):
    """A publisher on C, an at-least-once subscriber to ``pattern`` that stays on B, and one on
    A that went away (no CLOSE: its record stays), both caught up before: what is published
    next is missed by the one away, live for the other. Returns (publisher, subscriber on B,
    its subscription, client id of the one away)."""
    pub = AsyncClient(_url(c), reconnect=False)
    sub = AsyncClient(_url(a), reconnect=False)
    steady = AsyncClient(_url(b), reconnect=False)
    for cl in (pub, sub, steady):
        await cl.connect()
    await sub.subscribe(pattern, reliable=True)
    s_steady = await steady.subscribe(pattern, reliable=True)
    # both caught up (the position is recorded before the stream is read from it): what is
    # published next is live for them, not a catch-up bounded as a backlog
    for cl, broker in ((sub, a), (steady, b)):
        await caught_up(broker, cl.client_id, pattern)
    sub._proto.transport.abort()
    await until(lambda: a.stats.sessions_away == 1)
    return pub, steady, s_steady, sub.client_id


@pytest.mark.parametrize("bound", ["messages", "octets"])
def test_pattern_catch_up_is_bounded_as_an_away_backlog(plane, bound):
    """What a resuming pattern session is handed from the engine is bounded as an away
    session's backlog: the newest ``backlog_limit`` events and ``backlog_bytes`` octets, the
    older ones dropped and counted; a subscriber that stayed gets them all."""
    size = 24 + 2 + 3 + 100  # an EVENT frame: header, topic length, topic, data
    limits = ({"backlog_limit": 20} if bound == "messages"
              else {"backlog_limit": 1000, "backlog_bytes": 10 * size + size // 2})
    kept = 20 if bound == "messages" else 10
    prefix = f"bound{bound}:"

    async def main():
        async with brokers(3, plane.url, cluster_prefix=prefix, **limits) as (a, b, c):
            pub, steady, s_steady, cid = await _away_pattern_session(a, b, c, "b.>")
            sent = []
            for i in range(100):
                topic = "b.x" if i % 3 else "b.y"
                sent.append((topic, b"%03d" % i + b"." * 97))
                await pub.publish(topic, sent[-1][1])
                await pub.publish("c.x", b"no")
            await pub.publish("b.x", b"m" * 100)
            sent.append(("b.x", b"m" * 100))
            # all in the engine (the steady subscriber has them from there): then resume
            got = [(e.topic, bytes(e.data)) for e in await _events(s_steady, len(sent))]
            assert got == sent

            moved = AsyncClient(_url(b), client_id=cid, reconnect=False)
            s_moved = await moved.subscribe("b.>", reliable=True)
            await moved.connect()
            got = [(e.topic, bytes(e.data)) for e in await _events(s_moved, kept)]
            assert got == sent[-kept:]
            assert b.stats.dropped_backlog == len(sent) - kept
            await _nothing_more(s_moved, s_steady)
            for cl in (pub, steady, moved):
                await cl.close()

    w.run(main(), 60)


@pytest.mark.parametrize("bound", ["messages", "octets", "total"])
def test_literal_catch_up_is_bounded_as_an_away_backlog(plane, bound):
    """A session that missed 50 times more events of a literal topic than an away backlog
    keeps gets, on resuming on another broker (from the engine's stream), at most what an
    away backlog keeps: the newest ``backlog_limit`` events and ``backlog_bytes`` octets,
    ``max_backlog_bytes`` in total; the older ones are dropped and counted. Its own broker
    keeps as much for it meanwhile. What the resuming session is handed and does not
    acknowledge (in flight) is that many events, however many were missed."""
    size = 24 + 2 + 3 + 100  # an EVENT frame: header, topic length, topic, data
    kept = 20 if bound == "messages" else 10
    limits = {"messages": {"backlog_limit": kept},
              "octets": {"backlog_bytes": kept * size + size // 2},
              "total": {"max_backlog_bytes": kept * size + size // 2}}[bound]
    missed = 50 * kept
    prefix = f"lit{bound}:"

    async def main():
        async with brokers(2, plane.url, cluster_prefix=prefix, **limits) as (a, b):
            pub = AsyncClient(_url(b), reconnect=False)
            sub = AsyncClient(_url(a), reconnect=False)
            for cl in (pub, sub):
                await cl.connect()
            await sub.subscribe("lit", reliable=True)
            cid = sub.client_id
            await caught_up(a, cid, "lit")
            sub._proto.transport.abort()  # away without a CLOSE: the record stays
            await until(lambda: a.stats.sessions_away == 1)
            sent = [b"%04d" % i + b"." * 96 for i in range(missed)]
            for data in sent:
                await pub.publish("lit", data)
            await until(lambda: plane.stream("lit", prefix)[0] == missed)
            await until(lambda: a.stats.dropped_backlog == missed - kept)
            assert a.session_info(cid)["backlog"] == kept
            assert a.stats.backlog_bytes == kept * size

            def resume():  # a client that acknowledges nothing: what it is handed stays
                rc = w.RefClient(b.port)
                assert rc.hello(cid, flags=w.ACK_REQUIRED) == cid
                return rc

            rc = await asyncio.to_thread(resume)
            try:
                await caught_up(b, cid, "lit")  # its recorded subscription came back
                info = b.session_info(cid)
                assert info["subscriptions"] == {"lit": True}
                assert (info["inflight"], info["backlog"]) == (kept, 0)
                assert b.stats.dropped_backlog == missed - kept
                assert b.stats.backlog_bytes == 0

                def read():
                    return [rc.recv_until(w.EVENT, 5)[1] for _ in range(kept)]

                got = await asyncio.to_thread(read)
                assert got == [w.publish_payload("lit", d) for d in sent[-kept:]]
            finally:
                rc.close()
            await pub.close()

    w.run(main(), 60)


def _gated(broker: Broker) -> asyncio.Event:
    """Hold ``broker``'s pattern catch-ups back until the returned event is set (its pattern
    feeds run meanwhile: the live events are held for the resuming sessions)."""
    link = broker._cluster
    catch_up = link._catch_up
    gate = asyncio.Event()

    async def held_back(session, pattern, read):
        await gate.wait()
        await catch_up(session, pattern, read)

    link._catch_up = held_back
    return gate


@pytest.mark.parametrize("overflow", [False, True], ids=["held", "overflowing"])
def test_live_events_of_a_pattern_catch_up_are_never_bounded_as_missed(plane, overflow):
    """Events published while a resuming pattern session is on its new broker (its catch-up
    not read yet) are live, not missed: the missed ones are bounded as an away backlog (the
    newest ``backlog_limit``), then every live one follows, each once, in order, however many:
    more than the read's bound, and (``overflow``) more than the broker holds back for a
    catch-up (``max_inflight``), those being read again from the engine."""
    limit, missed, live = 20, 50, 30
    prefix = f"live{int(overflow)}:"
    options = {"backlog_limit": limit}
    if overflow:
        options["max_inflight"] = 16  # fewer than the live events held back during the read

    async def main():
        async with brokers(3, plane.url, cluster_prefix=prefix, **options) as (a, b, c):
            pub, steady, s_steady, cid = await _away_pattern_session(a, b, c, "g.>")
            sent = [("g.x" if i % 2 else "g.y", b"m%03d" % i) for i in range(missed)]
            for topic, data in sent:
                await pub.publish(topic, data)
            # all in the engine (the steady subscriber on B has them from there)
            assert [(e.topic, bytes(e.data)) for e in await _events(s_steady, missed)] == sent

            gate = _gated(b)
            moved = AsyncClient(_url(b), client_id=cid, reconnect=False)
            s_moved = await moved.subscribe("g.>", reliable=True)
            await moved.connect()
            link = b._cluster
            await until(lambda: any(s.client_id == cid for s, _ in link._held))
            now = [("g.y" if i % 2 else "g.x", b"l%03d" % i) for i in range(live)]
            for topic, data in now:
                await pub.publish(topic, data)
            # B's pattern feed has handed them all over (the steady subscriber got them)
            assert [(e.topic, bytes(e.data)) for e in await _events(s_steady, live)] == now
            gate.set()
            got = [(e.topic, bytes(e.data)) for e in await _events(s_moved, limit + live)]
            assert got == sent[-limit:] + now
            assert b.stats.dropped_backlog == missed - limit
            await _nothing_more(s_moved, s_steady)
            for cl in (pub, steady, moved):
                await cl.close()

    w.run(main(), 60)


def test_recorded_patterns_are_bounded_per_broker(plane):
    """Beyond ``cluster_max_patterns`` distinct recorded patterns, a broker keeps a new
    at-least-once pattern subscription in its memory (as without a cluster): it is served
    all the same, and not recorded in the engine."""
    async def main():
        async with brokers(2, plane.url, cluster_prefix="few:",
                           cluster_max_patterns=1) as (a, b):
            pub = AsyncClient(_url(b), reconnect=False)
            sub = AsyncClient(_url(a), reconnect=False)
            for cl in (pub, sub):
                await cl.connect()
            first = await sub.subscribe("x.*", reliable=True)
            second = await sub.subscribe("y.*", reliable=True)
            cid = sub.client_id
            await until(lambda: plane.position(cid, "x.*", "few:", True) is not None)
            await until(lambda: plane.numpat("few:") == 2)
            for i in range(20):
                await pub.publish("x.a", b"%d" % i)
                await pub.publish("y.a", b"%d" % i)
            assert await _collect(first, 20) == [b"%d" % i for i in range(20)]
            assert await _collect(second, 20) == [b"%d" % i for i in range(20)]
            await _nothing_more(first, second)
            assert await asyncio.to_thread(plane.position, cid, "y.*", "few:", True) is None
            for cl in (pub, sub):
                await cl.close()

    w.run(main(), 30)


def test_pattern_session_resumes_on_its_broker_and_after_its_restart(plane):
    """Away and back on the same broker, a pattern session gets what matched meanwhile from
    that broker's memory; away while that broker restarts (its memory lost), from the engine."""
    async def main():
        url = plane.url
        async with brokers(2, url, cluster_prefix="home:") as (a, c):
            pub = AsyncClient(_url(c), reconnect=False)
            await pub.connect()
            sub = AsyncClient(_url(a), reconnect=False)
            await sub.connect()
            await sub.subscribe("h.>", reliable=True)
            cid = sub.client_id
            await until(lambda: plane.position(cid, "h.>", "home:", True) is not None)
            expected = []
            for round_ in range(2):
                sub._proto.transport.abort()
                await until(lambda a=a: a.stats.sessions_away == 1)
                if round_ == 1:
                    await a.stop(grace=1.0)  # its memory is gone; the record is not
                for i in range(30):
                    topic = "h.%d" % (i % 3)
                    expected.append((topic, b"%d.%02d" % (round_, i)))
                    await pub.publish(topic, expected[-1][1])
                    await pub.publish("g.0", b"no")
                await pub.publish("h.0", b"end", wait=True)
                expected.append(("h.0", b"end"))
                if round_ == 1:
                    a = Broker(cluster=url, cluster_prefix="home:")
                    await a.start("tcp://127.0.0.1:0")
                sub = AsyncClient(_url(a), client_id=cid, reconnect=False)
                s = await sub.subscribe("h.>", reliable=True)
                await sub.connect()
                got = [(e.topic, bytes(e.data)) for e in await _events(s, len(expected))]
                assert got == expected
                await _nothing_more(s)
                await until(lambda: plane.position(cid, "h.>", "home:", True).startswith("("))
                expected = []
            for cl in (pub, sub):
                await cl.close()
            await a.stop(grace=1.0)

    w.run(main(), 60)


def test_recorded_patterns_match_in_the_engine_as_in_the_broker(plane):
    """The engine's matching of recorded patterns (Redis: the publish script's; NATS: its
    wildcards) gives each at-least-once pattern subscriber exactly the topics the broker's
    own matching gives, empty tokens included."""
    from mip.net.msip_topics import topic_matches

    patterns = ["a.*", "a.>", "*.b", "*", ">", "a.*.c", "*.*"]
    topics = ["a", "a.b", "a.b.c", "b", "x.b", "a..c", "a.x.c", "", ".", "a.b.c.d", "é.b"]

    async def main():
        async with brokers(2, plane.url, cluster_prefix="shape:") as (a, b):
            pub = AsyncClient(_url(b), reconnect=False)
            await pub.connect()
            subs = {}
            for p in patterns:
                cl = AsyncClient(_url(a), reconnect=False)
                await cl.connect()
                subs[p] = await cl.subscribe(p, reliable=True)
                await until(lambda cl=cl, p=p: plane.position(cl.client_id, p, "shape:", True)
                            is not None)
            for t in topics:
                await pub.publish(t, t.encode() + b"!")
            for p, s in subs.items():
                want = [t for t in topics if topic_matches(p, t)]
                got = [e.topic for e in await _events(s, len(want))]
                assert got == want, p
            await _nothing_more(*subs.values())
            for s in subs.values():
                await s.client.close()
            await pub.close()

    w.run(main(), 60)
