"""Clients that came and went cost the broker nothing: sessions end with their connection
unless they asked for at-least-once, and what an away session keeps is bounded."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

import _msip_support as w

DEPARTED = 10_000


async def _come_and_go(port: int, n: int, topic: bytes, concurrency: int = 64) -> None:
    """``n`` reference-style clients: HELLO (no id, or a clock value as text as the reference
    clients send on reconnect, so many share their first 8 octets), SUBSCRIBE with
    ACK_REQUIRED, then the connection drops without CLOSE."""
    todo = iter(range(n))

    async def worker():
        for i in todo:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            hello = b"" if i % 2 else str(1_733_000_000_000 + i).encode()
            writer.write(w.frame(w.HELLO, hello, i + 1) + w.frame(w.SUBSCRIBE, topic, i + 2,
                                                                 w.ACK_REQUIRED))
            for _ in range(2):  # the two ACKs
                head = await reader.readexactly(24)
                await reader.readexactly(struct.unpack_from(">I", head, 12)[0])
                assert struct.unpack_from(">H", head, 6)[0] == w.ACK
            writer.transport.abort()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def _publish_all(pub: w.RefClient, topic: str, n: int, size: int, batch: int = 100) -> None:
    data = b"\x01" * size
    for start in range(0, n, batch):
        pub.send_raw(b"".join(w.frame(w.PUBLISH, w.publish_payload(topic, data), i + 1)
                              for i in range(start, min(n, start + batch))))
        for _ in range(start, min(n, start + batch)):
            assert pub.recv_until(w.ACK, timeout=10.0) is not None


def test_departed_reference_clients_leave_no_session_and_no_publish_cost():
    with w.BrokerThread() as bt:
        live = w.RefClient(bt.port)
        live.hello()
        live.subscribe("load")
        asyncio.run(_come_and_go(bt.port, DEPARTED, b"load"))
        b = bt.broker
        assert w.wait_for(lambda: bt.call(lambda: len(b._conns)) == 1, timeout=10.0)
        # gone from the session table and from the routing table
        assert bt.call(lambda: (b.stats.sessions, b.stats.sessions_away, len(b._sessions))) == (1, 0, 1)
        assert bt.call(lambda: len(b._exact["load"])) == 1
        delivered = b.stats.delivered
        pub = w.RefClient(bt.port)
        _publish_all(pub, "load", 500, 1024)
        # every publish reached the one live subscriber and nothing else
        assert b.stats.delivered - delivered == 500 and b.stats.backlog_bytes == 0
        assert [live.recv(timeout=5.0)[0]["msg_id"] for _ in range(500)] == list(range(1, 501))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_broker_rss_flat_after_departed_clients_and_publishes():
    """`mip broker` on its defaults: 10,000 clients come and go, then 5,000 publishes of
    1 KiB: the broker's memory stays flat (it grew by gigaoctets when every departed client
    left a session that buffered every event for an hour)."""
    with w.BrokerProcess() as broker:
        live = broker.connect()
        live.hello()
        live.subscribe("load")
        pub = w.RefClient(broker.port)
        _publish_all(pub, "load", 500, 1024)  # warm up allocators and caches
        for _ in range(500):
            live.recv(timeout=5.0)
        before = broker.rss_kib()
        asyncio.run(_come_and_go(broker.port, DEPARTED, b"load"))
        _publish_all(pub, "load", 5000, 1024)
        got = 0
        for _ in range(5000):
            h, _ = live.recv(timeout=10.0)
            got += h["type"] == w.EVENT
        assert got == 5000
        after = broker.rss_kib()
        # 10,000 sessions each keeping 5,000 events would be gigaoctets; allow 48 MiB of
        # allocator noise (connection objects freed in bulk, read buffers)
        assert after - before < 48 * 1024, (before, after)


@pytest.fixture
def durable():
    b = w.BrokerThread(session_ttl=0.5, backlog_limit=100, backlog_bytes=3 * 1100,
                       max_backlog_bytes=5 * 1100)
    yield b
    b.stop()


def _away(bt, cid) -> bool:
    return bt.call(lambda: (bt.broker.session_info(cid) or {}).get("connected") is False)


def test_at_least_once_session_kept_for_ttl_then_forgotten(durable):
    bt = durable
    sub = w.RefClient(bt.port)
    cid = sub.hello(flags=w.ACK_REQUIRED)
    sub.subscribe("t")
    sub.close()
    assert w.wait_for(lambda: _away(bt, cid))
    assert bt.broker.stats.sessions_away == 1
    assert w.wait_for(lambda: bt.call(lambda: bt.broker.session_info(cid)) is None, timeout=5.0)
    st = bt.broker.stats
    assert (st.sessions, st.sessions_away, st.sessions_expired) == (0, 0, 1)
    assert bt.call(lambda: "t" not in bt.broker._exact)


def test_close_ends_an_at_least_once_session_at_once(durable):
    bt = durable
    sub = w.RefClient(bt.port)
    cid = sub.hello(flags=w.ACK_REQUIRED)
    sub.subscribe("t")
    sub.send(w.CLOSE, b"", 9)
    assert sub.expect_eof() == []
    assert w.wait_for(lambda: bt.call(lambda: bt.broker.session_info(cid)) is None)
    assert bt.broker.stats.sessions_expired == 0  # ended, not expired


def test_backlog_bounded_in_octets_per_session_and_in_total(durable):
    bt = durable
    cids = []
    for _ in range(3):
        sub = w.RefClient(bt.port)
        cids.append(sub.hello(flags=w.ACK_REQUIRED))
        sub.subscribe("t")
        sub.close()
    assert w.wait_for(lambda: all(_away(bt, c) for c in cids))
    pub = w.RefClient(bt.port)
    event = 24 + 2 + 1 + 1000  # octets of one EVENT frame
    for i in range(4):
        pub.send(w.PUBLISH, w.publish_payload("t", bytes([i]) * 1000), i + 1)
        pub.recv_until(w.ACK)
    st = bt.broker.stats

    def kept():
        return [bt.broker.session_info(c)["backlog"] for c in cids]

    # per session: 3 * 1100 octets hold 3 events; in total 5 * 1100 octets hold 5 events
    assert st.backlog_bytes <= 5 * 1100 and st.backlog_bytes == sum(kept()) * event
    assert bt.call(kept) == [1, 2, 2]  # the broker's oldest events went first
    assert st.dropped_backlog == 3 * 4 - 5
    sub = w.RefClient(bt.port)
    sub.hello(cids[2], flags=w.ACK_REQUIRED)
    got = [sub.recv()[1][3:4] for _ in range(2)]
    assert got == [b"\x02", b"\x03"]  # the newest two, in order
    assert w.wait_for(lambda: st.backlog_bytes == 3 * event)
