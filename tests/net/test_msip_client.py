"""Our MSIP clients (async and blocking) and the third-party mip-client-python, over real sockets."""

from __future__ import annotations

import asyncio
import os
import tempfile

import numpy as np
import pytest

from mip.net import AsyncClient, Broker, BrokerError, Client

import _msip_support as w

run = w.run


async def _broker(**options) -> tuple[Broker, str]:
    options.setdefault("idle_timeout", None)
    b = Broker(**options)
    addr = await b.start("tcp://127.0.0.1:0")
    return b, str(addr)


def test_subscribe_iterator_callback_publish_ack():
    async def main():
        b, url = await _broker()
        seen = []
        async with AsyncClient(url) as sub, AsyncClient(url) as pub:
            assert sub.client_id != pub.client_id
            it = await sub.subscribe("a.*")
            await sub.subscribe("a.x", seen.append)
            mid = await pub.publish("a.x", b"hello", wait=True)
            e = await it.get(timeout=2)
            assert (e.topic, bytes(e.data), e.msg_id, e.reliable) == ("a.x", b"hello", mid, False)
            await pub.publish("a.y", "text")  # fire-and-forget
            assert (await it.get(timeout=2)).text() == "text"
            assert [bytes(x.data) for x in seen] == [b"hello"]
            assert await pub.ping() < 1.0
            await it.close()
            await pub.publish("a.x", b"after", wait=True)
            await asyncio.sleep(0.05)
            assert len(seen) == 2
        await b.stop()

    run(main())


def test_publish_arrays_subscriber_gets_numpy_views():
    async def main():
        b, url = await _broker()
        async with AsyncClient(url) as sub, AsyncClient(url) as pub:
            # 24 (header) + 2 + 6 (topic) = 32: the MIP message starts 8-aligned in the frame,
            # so its tensor data is aligned and decoded in place
            it = await sub.subscribe("tensor")
            odd = await sub.subscribe("odd")
            x = np.arange(12, dtype=np.float32).reshape(3, 4)
            y = np.array([1, 2, 3], dtype=np.int64)
            big = np.random.default_rng(0).random((256, 64))  # 128 KiB: sent from its own memory
            await pub.publish_arrays("tensor", x, y, big, wait=True)
            e = await it.get(timeout=2)
            got = e.arrays()
            for a, want in zip(got, (x, y, big)):
                np.testing.assert_array_equal(a, want)
                assert a.dtype == want.dtype
            assert np.shares_memory(got[2], np.frombuffer(e.data, dtype=np.uint8))
            assert not got[2].flags.writeable
            # any topic length works; misaligned data is decoded as aligned copies
            await pub.publish_arrays("odd", x, wait=True)
            np.testing.assert_array_equal((await odd.get(timeout=2)).arrays()[0], x)
        await b.stop()

    run(main())


def test_compression_threshold():
    pytest.importorskip("zstandard")

    async def main():
        b, url = await _broker()
        async with AsyncClient(url) as sub, AsyncClient(url, compress_threshold=1000) as pub:
            it = await sub.subscribe("z")
            await pub.publish("z", b"small", wait=True)
            await pub.publish("z", b"A" * 100_000, wait=True)
            e1, e2 = await it.get(timeout=2), await it.get(timeout=2)
            assert bytes(e1.data) == b"small" and not e1.flags & w.COMPRESSED
            assert bytes(e2.data) == b"A" * 100_000 and e2.flags & w.COMPRESSED
        await b.stop()

    run(main())


def test_reliable_auto_ack_no_redelivery():
    async def main():
        b, url = await _broker(redelivery_timeout=0.2)
        got = []
        async with AsyncClient(url) as sub, AsyncClient(url) as pub:
            await sub.subscribe("r", got.append, reliable=True)
            it = await sub.subscribe("r.>", reliable=True)
            for i in range(5):
                await pub.publish("r", b"%d" % i, wait=True)
            await pub.publish("r.q", b"it", wait=True)
            assert bytes((await it.get(timeout=2)).data) == b"it"
            await asyncio.sleep(0.7)
            assert [bytes(e.data) for e in got] == [b"0", b"1", b"2", b"3", b"4"]
            assert b.stats.acked == 6 and b.stats.redelivered == 0
        await b.stop()

    run(main())


def test_auto_reconnect_resumes_session_and_gets_missed_events():
    async def main():
        b, url = await _broker()
        got = []
        sub = AsyncClient(url, reconnect_delay=0.05)
        cid = await sub.connect()
        await sub.subscribe("news", got.append, reliable=True)
        async with AsyncClient(url) as pub:
            await pub.publish("news", b"before", wait=True)
            await asyncio.sleep(0.05)
            for conn in list(b._conns):  # cut the subscriber's connection
                if conn.session.client_id == cid:
                    conn.transport.abort()
            await asyncio.sleep(0)
            await pub.publish("news", b"while-away-1", wait=True)
            await pub.publish("news", b"while-away-2", wait=True)
            for _ in range(200):
                if sub.connected and len(got) >= 3:
                    break
                await asyncio.sleep(0.01)
            assert sub.reconnects == 1 and sub.client_id == cid
            await pub.publish("news", b"after", wait=True)
            await asyncio.sleep(0.05)
        assert [bytes(e.data) for e in got] == [b"before", b"while-away-1", b"while-away-2", b"after"]
        await sub.close()
        await b.stop()

    run(main())


def test_redelivery_to_a_new_client_after_the_old_died_unacked():
    async def main():
        b, url = await _broker(redelivery_timeout=30)
        sub = AsyncClient(url, auto_ack=False, reconnect=False)
        cid = await sub.connect()
        it = await sub.subscribe("jobs", reliable=True)
        async with AsyncClient(url) as pub:
            await pub.publish("jobs", b"j1", wait=True)
            e = await it.get(timeout=2)
            sub.ack(e.msg_id)
            await pub.publish("jobs", b"j2", wait=True)
            await it.get(timeout=2)  # received, then the process "dies" before acking
            sub._proto.transport.abort()
            await asyncio.sleep(0.05)
            again = AsyncClient(url, client_id=cid)
            it2 = await again.subscribe("jobs", reliable=True)  # registered, sent by connect
            assert await again.connect() == cid
            e2 = await it2.get(timeout=2)
            assert bytes(e2.data) == b"j2" and e2.reliable
            await asyncio.sleep(0.05)
            assert b.session_info(cid)["inflight"] == 0
            await again.close()
        await b.stop()

    run(main())


def test_token_auth_client():
    async def main():
        b = Broker(idle_timeout=None, tokens=[b"tok"])
        url = str(await b.start("tcp://127.0.0.1:0"))
        async with AsyncClient(url, token=b"tok") as ok:
            assert ok.client_id >= 1
            await ok.subscribe("x")
        bad = AsyncClient(url, token=b"bad")
        with pytest.raises(BrokerError, match="authentication"):
            await bad.connect()
        await bad.close()
        await b.stop()

    run(main())


def test_unix_socket():
    async def main():
        path = os.path.join(tempfile.mkdtemp(), "msip.sock")
        b = Broker(idle_timeout=None)
        await b.start(f"unix://{path}")
        async with AsyncClient(f"unix://{path}") as c:
            it = await c.subscribe("u")
            await c.publish("u", b"over unix", wait=True)
            assert bytes((await it.get(timeout=2)).data) == b"over unix"
        await b.stop()

    run(main())


def test_blocking_client():
    with w.BrokerThread(idle_timeout=None) as bt:
        url = f"tcp://127.0.0.1:{bt.port}"
        with Client(url) as sub, Client(url) as pub:
            it = sub.subscribe("b")
            pub.publish("b", b"1", wait=True)
            pub.publish_arrays("b", np.ones((2, 2), np.float32), wait=True)
            assert bytes(it.get(timeout=2).data) == b"1"
            np.testing.assert_array_equal(it.get(timeout=2).arrays()[0], np.ones((2, 2)))
            with pytest.raises(TimeoutError):
                it.get(timeout=0.1)
            assert pub.ping() < 1.0


def test_broker_restart_client_resubscribes():
    async def main():
        b = Broker(idle_timeout=None)
        addr = await b.start("tcp://127.0.0.1:0")
        got = []
        sub = AsyncClient(str(addr), reconnect_delay=0.05)
        await sub.connect()
        await sub.subscribe("s", got.append)
        await b.stop()  # sends CLOSE, forgets sessions
        b2 = Broker(idle_timeout=None)
        await b2.start(f"tcp://127.0.0.1:{addr.port}")
        for _ in range(300):
            if sub.connected:
                break
            await asyncio.sleep(0.01)
        assert sub.connected
        async with AsyncClient(str(addr)) as pub:
            await pub.publish("s", b"again", wait=True)
            await asyncio.sleep(0.05)
        assert [bytes(e.data) for e in got] == [b"again"]
        await sub.close()
        await b2.stop()

    run(main())


# -- the third-party client written for the reference broker ------------------------------

def test_mip_client_python_interop():
    mc = pytest.importorskip("mip_client")

    async def main():
        b, url = await _broker()
        port = b.port
        messages, acks, pongs, errors = [], [], [], []
        third = mc.MIPClient(host="127.0.0.1", port=port, auto_reconnect=False)
        third.on_message(messages.append).on_ack(acks.append).on_error(errors.append)
        third.on_pong(lambda: pongs.append(1))
        # it subscribes in on_connect, i.e. before its HELLO: the reference never delivers that
        third.on_connect(lambda: third.subscribe("chat.room"))
        await third.connect()
        async with AsyncClient(url) as ours:
            for _ in range(100):
                if len(acks) >= 2:  # SUBSCRIBE ack + HELLO ack
                    break
                await asyncio.sleep(0.01)
            await ours.publish("chat.room", "héllo from mip", wait=True)
            it = await ours.subscribe("chat.>")
            pub_id = third.publish("chat.other", "from the third-party client")
            e = await it.get(timeout=2)
            assert (e.topic, e.text(), e.msg_id) == ("chat.other", "from the third-party client", pub_id)
            third.ping()
            for _ in range(200):
                if messages and pongs and pub_id in acks:
                    break
                await asyncio.sleep(0.01)
        assert [(m.topic, m.message) for m in messages] == [("chat.room", "héllo from mip")]
        assert pongs and pub_id in acks and not errors
        third._options.auto_reconnect = False
        third._running = False
        if third._writer:
            third._writer.close()
        await asyncio.sleep(0.05)
        await b.stop()

    run(main())


def test_mip_client_python_reconnect_hello_payload():
    """It resends its last msg_id as ASCII digits in HELLO when it reconnects: the broker
    reads the first 8 octets as the client id (as the reference does) and answers."""
    mc = pytest.importorskip("mip_client")

    async def main():
        b, url = await _broker()
        acks = []
        third = mc.MIPClient(host="127.0.0.1", port=b.port, auto_reconnect=False)
        third.on_ack(acks.append)
        await third.connect()
        for _ in range(100):
            if acks:
                break
            await asyncio.sleep(0.01)
        third._writer.close()
        third._connected = False
        await asyncio.sleep(0.05)
        await third.connect()  # HELLO payload: str(previous msg_id).encode()
        for _ in range(100):
            if len(acks) >= 2:
                break
            await asyncio.sleep(0.01)
        assert len(acks) == 2
        third._running = False
        third._writer.close()
        await asyncio.sleep(0.05)
        await b.stop()

    run(main())


def test_tls(tmp_path):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=30)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def main():
        b = Broker(idle_timeout=None, ssl=server_ctx)
        url = str(await b.start("tcp://127.0.0.1:0"))
        async with AsyncClient(url, ssl=client_ctx) as c:
            it = await c.subscribe("s")
            await c.publish("s", b"secret", wait=True)
            assert bytes((await it.get(timeout=2)).data) == b"secret"
        await b.stop()

    run(main())
