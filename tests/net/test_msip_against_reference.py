"""mip's MSIP client, on its defaults, against a broker that behaves as the reference does
(``ReferenceBroker``: ERROR + close on a SUBSCRIBE without ACK_REQUIRED, on any ACK frame from
a client, ...), and ``mip bench pubsub`` against it and against ``mip broker``."""

from __future__ import annotations

import asyncio

import pytest

from mip import msip
from mip.bench import pubsub
from mip.net import AsyncClient, Broker

import _msip_support as w

run = w.run


async def _until(predicate, tries: int = 300) -> bool:
    for _ in range(tries):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def test_the_stand_in_refuses_what_the_reference_refuses():
    async def main():
        ref = w.ReferenceBroker()
        url = await ref.start()
        for frames in ([w.frame(w.SUBSCRIBE, b"t", 1)],  # no ACK_REQUIRED
                       [w.frame(w.HELLO, b"", 1), w.frame(w.ACK, b"", 5)]):  # a client ACK
            reader, writer = await asyncio.open_connection("127.0.0.1", ref.port)
            writer.write(b"".join(frames))
            data = await asyncio.wait_for(reader.read(), 5)
            assert w.ReferenceBroker.UNSUPPORTED in data
            writer.close()
        assert len(ref.errors) == 2 and url
        await ref.stop()

    run(main())


def test_client_defaults_work_against_the_reference():
    async def main():
        ref = w.ReferenceBroker()
        url = await ref.start()
        seen = []
        async with AsyncClient(url) as sub, AsyncClient(url) as pub:
            assert sub.capabilities == msip.Capability.NONE  # 8-octet HELLO answer
            await sub.subscribe("a.x", seen.append)
            tail = await sub.subscribe("alerts.>")  # literal here: no PATTERNS granted
            reliable = await sub.subscribe("jobs", reliable=True)  # at-most-once here
            mid = await pub.publish("a.x", b"hello", wait=True)
            await pub.publish("alerts.x", b"not for the literal topic", wait=True)
            await pub.publish("alerts.>", b"literal", wait=True)
            for i in range(3):
                await pub.publish("jobs", b"%d" % i, wait=True)
            e = await tail.get(timeout=2)
            assert (e.topic, bytes(e.data)) == ("alerts.>", b"literal")
            # the reference flags every EVENT COMPRESSED: plain data is not decompressed
            assert [bytes(x.data) for x in seen] == [b"hello"] and seen[0].msg_id == mid
            jobs = [await reliable.get(timeout=2) for _ in range(3)]
            assert [bytes(j.data) for j in jobs] == [b"0", b"1", b"2"]
            assert not any(j.reliable for j in jobs)  # so no ACK frame is ever sent
            sub.ack(jobs[0].msg_id)  # not sent: the reference would close on it
            assert await pub.ping() < 5
            await sub.unsubscribe("jobs")
            await pub.publish("jobs", b"after", wait=True)
            assert await sub.ping() < 5  # still connected: nothing refused
            with pytest.raises(asyncio.TimeoutError):
                await tail.get(timeout=0.1)
        assert ref.errors == []
        await ref.stop()

    run(main())


def test_client_reconnects_to_the_reference_with_a_new_session():
    async def main():
        ref = w.ReferenceBroker()
        url = await ref.start()
        got = []
        sub = AsyncClient(url, reconnect_delay=0.05)
        first = await sub.connect()
        await sub.subscribe("news", got.append, reliable=True)
        async with AsyncClient(url, reconnect=False) as pub:
            await pub.publish("news", b"1", wait=True)
            assert await _until(lambda: len(got) == 1)
        ref.drop_all()
        assert await _until(lambda: sub.reconnects == 1 and sub.connected)
        # no resume where none was granted: a new id, the subscription sent again
        assert sub.client_id != first
        async with AsyncClient(url) as pub2:
            await pub2.publish("news", b"2", wait=True)
            assert await _until(lambda: len(got) == 2)
        assert [bytes(e.data) for e in got] == [b"1", b"2"] and ref.errors == []
        await sub.close()
        await ref.stop()

    run(main())


def test_client_uses_what_mip_broker_grants():
    async def main():
        b = Broker()
        url = str(await b.start("tcp://127.0.0.1:0"))
        async with AsyncClient(url) as c:
            assert c.capabilities == msip.Capability.AT_LEAST_ONCE | msip.Capability.PATTERNS
            info = b.session_info(c.client_id)
            assert info["at_least_once"] and info["connected"]
            cid = c.client_id
        # close() sends CLOSE: the session is gone at once, nothing left behind
        assert await _until(lambda: b.session_info(cid) is None)
        assert b.stats.sessions == 0
        await b.stop()

    run(main())


@pytest.mark.parametrize("target", ["reference", "mip"])
def test_bench_pubsub_against_both(target):
    async def main():
        if target == "reference":
            ref = w.ReferenceBroker()
            url = await ref.start()
        else:
            ref = Broker()
            url = str(await ref.start("tcp://127.0.0.1:0"))
        doc = await pubsub.run_pubsub(url, publishers=1, subscribers=2, size=64, rate=300.0,
                                      duration=0.4, warmup=0.1, ping_duration=0.1)
        p = doc["pubsub"]
        assert p["published"] > 0 and p["lost"] == 0
        assert p["delivered"] == 2 * p["published"]
        assert doc["ping"]["count"] > 0
        if target == "reference":
            assert ref.errors == []
        else:
            assert await _until(lambda: ref.stats.sessions == 0)  # the bench left nothing
        await ref.stop()

    run(main())
