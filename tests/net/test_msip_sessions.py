"""Sessions, patterns, takeover and at-least-once delivery (all opt-in), shown by killing and
resuming clients."""

from __future__ import annotations

import struct

import pytest

import _msip_support as w


def _pub(c, topic, data, msg_id, flags=0):
    c.send(w.PUBLISH, w.publish_payload(topic, data), msg_id, flags)
    h, _ = c.recv_until(w.ACK)
    assert h["msg_id"] == msg_id


def _event_data(got):
    h, p = got
    assert h["type"] == w.EVENT, got
    n = struct.unpack_from(">H", p)[0]
    return p[2:2 + n].decode(), p[2 + n:]


@pytest.fixture
def broker():
    b = w.BrokerThread(idle_timeout=None, redelivery_timeout=0.3, backlog_limit=5)
    yield b
    b.stop()


def test_subscribe_before_hello_is_delivered(broker):
    sub = w.RefClient(broker.port)
    sub.subscribe("early")  # before HELLO: an anonymous session
    pub = w.RefClient(broker.port)
    _pub(pub, "early", b"1", 10)
    assert _event_data(sub.recv()) == ("early", b"1")
    sub.hello()  # HELLO keeps the subscription
    _pub(pub, "early", b"2", 11)
    assert _event_data(sub.recv()) == ("early", b"2")


def test_resume_restores_subscriptions_and_delivers_missed(broker):
    sub = w.RefClient(broker.port)
    cid = sub.hello(flags=w.ACK_REQUIRED)  # an at-least-once session: kept while away
    assert sub.caps == w.CAP_AT_LEAST_ONCE
    sub.subscribe("a.b")
    sub.close()
    pub = w.RefClient(broker.port)
    assert w.wait_for(lambda: broker.call(lambda: not broker.broker.session_info(cid)["connected"]))
    for i in range(3):
        _pub(pub, "a.b", b"m%d" % i, 100 + i)
    sub2 = w.RefClient(broker.port)
    assert sub2.hello(cid, flags=w.ACK_REQUIRED) == cid
    got = [_event_data(sub2.recv()) for _ in range(3)]
    assert got == [("a.b", b"m0"), ("a.b", b"m1"), ("a.b", b"m2")]
    _pub(pub, "a.b", b"live", 200)  # subscriptions restored without SUBSCRIBE
    assert _event_data(sub2.recv()) == ("a.b", b"live")


def test_backlog_bounded_oldest_dropped_and_counted(broker):
    sub = w.RefClient(broker.port)
    cid = sub.hello(flags=w.ACK_REQUIRED)
    sub.subscribe("t")
    sub.close()
    assert w.wait_for(lambda: broker.call(lambda: not broker.broker.session_info(cid)["connected"]))
    pub = w.RefClient(broker.port)
    for i in range(8):
        _pub(pub, "t", b"%d" % i, i + 1)
    assert broker.call(lambda: broker.broker.stats.dropped_backlog) == 3
    sub2 = w.RefClient(broker.port)
    sub2.hello(cid, flags=w.ACK_REQUIRED)
    assert [_event_data(sub2.recv())[1] for _ in range(5)] == [b"3", b"4", b"5", b"6", b"7"]


def test_redelivery_after_subscriber_dies_without_ack(broker):
    sub = w.RefClient(broker.port)
    cid = sub.hello(flags=w.ACK_REQUIRED)  # this client acknowledges events
    sub.subscribe("jobs", flags=w.ACK_REQUIRED | w.AT_LEAST_ONCE)  # at-least-once subscription
    pub = w.RefClient(broker.port)
    _pub(pub, "jobs", b"job-1", 41)
    _pub(pub, "jobs", b"job-2", 42)
    h, _ = sub.recv()
    assert h["msg_id"] == 41
    sub.send(w.ACK, b"", 41)  # acknowledge the first only
    sub.recv()  # got job-2 but dies before acknowledging it
    sub.close()
    sub2 = w.RefClient(broker.port)
    sub2.hello(cid, flags=w.ACK_REQUIRED)
    h, p = sub2.recv()
    assert h["msg_id"] == 42 and _event_data((h, p)) == ("jobs", b"job-2")
    sub2.send(w.ACK, b"", 42)
    assert w.wait_for(lambda: broker.call(lambda: broker.broker.session_info(cid)["inflight"]) == 0)


def test_redelivery_after_timeout(broker):
    sub = w.RefClient(broker.port)
    sub.hello(flags=w.ACK_REQUIRED)
    sub.subscribe("r", flags=w.ACK_REQUIRED | w.AT_LEAST_ONCE)
    pub = w.RefClient(broker.port)
    _pub(pub, "r", b"x", 7)
    first = sub.recv()
    again = sub.recv(timeout=3.0)  # not acknowledged: sent again after 0.3 s
    assert again[0]["msg_id"] == first[0]["msg_id"] == 7 and again[1] == first[1]
    sub.send(w.ACK, b"", 7)
    stats = broker.broker.stats
    assert w.wait_for(lambda: stats.acked == 1)
    redelivered = stats.redelivered
    _pub(pub, "r", b"y", 8)
    sub.recv()
    sub.send(w.ACK, b"", 8)
    assert w.wait_for(lambda: stats.acked == 2)
    import time
    time.sleep(0.8)
    assert stats.redelivered == redelivered  # acknowledged events are not resent


def test_plain_subscription_is_not_redelivered(broker):
    sub = w.RefClient(broker.port)
    sub.subscribe("p", flags=0)  # no ACK_REQUIRED: no reply, at-most-once
    sub.send(w.PING, b"", 3)
    assert sub.recv()[0]["type"] == w.PONG
    pub = w.RefClient(broker.port)
    _pub(pub, "p", b"once", 1)
    assert _event_data(sub.recv()) == ("p", b"once")
    with pytest.raises(TimeoutError):
        sub.recv(timeout=0.8)


def test_same_client_id_on_two_connections_both_served(broker):
    """As on the reference: no one is disconnected; each connection gets its own events."""
    first = w.RefClient(broker.port)
    cid = first.hello(0x7365727669636500)  # b"service\0"
    first.subscribe("x")
    second = w.RefClient(broker.port)
    assert second.hello(cid, msg_id=99) == cid
    second.subscribe("y")
    pub = w.RefClient(broker.port)
    _pub(pub, "x", b"to-first", 5)
    _pub(pub, "y", b"to-second", 6)
    assert _event_data(first.recv()) == ("x", b"to-first")
    assert _event_data(second.recv()) == ("y", b"to-second")
    for c in (first, second):
        c.send(w.PING, b"", 7)
        assert c.recv()[0]["type"] == w.PONG
    assert broker.call(lambda: broker.broker.stats.takeovers) == 0


@pytest.mark.parametrize("per", ["session", "broker"])
def test_session_takeover_opt_in(per):
    options = {"session_takeover": True} if per == "broker" else {}
    with w.BrokerThread(**options) as b:
        old = w.RefClient(b.port)
        cid = old.hello(flags=w.ACK_REQUIRED)
        old.subscribe("x")
        new = w.RefClient(b.port)
        assert new.hello(cid, msg_id=99, flags=w.ACK_REQUIRED | w.TAKEOVER) == cid
        assert new.caps == w.CAP_AT_LEAST_ONCE | w.CAP_TAKEOVER
        frames = old.expect_eof()
        assert frames[-1][0]["type"] == w.ERROR and b"taken over" in frames[-1][1]
        pub = w.RefClient(b.port)
        _pub(pub, "x", b"to-new", 5)  # the subscription came with the session
        assert _event_data(new.recv()) == ("x", b"to-new")
        if per == "broker":  # plain sessions too: the newer connection wins, nothing resumed
            p1 = w.RefClient(b.port)
            p1.hello(4242)
            p2 = w.RefClient(b.port)
            assert p2.hello(4242) == 4242
            assert p1.expect_eof()[-1][0]["type"] == w.ERROR
        assert b.broker.stats.takeovers == (2 if per == "broker" else 1)


def test_topics_are_literal_by_default(broker):
    tail = w.RefClient(broker.port)
    tail.hello()
    tail.subscribe("alerts.>")
    odd = w.RefClient(broker.port)
    odd.subscribe("temp>30")  # answered with an ACK, as on the reference
    pub = w.RefClient(broker.port)
    _pub(pub, "alerts.x", b"1", 1)
    _pub(pub, "alerts.>", b"2", 2)
    _pub(pub, "temp>30", b"3", 3)
    assert _event_data(tail.recv()) == ("alerts.>", b"2")
    assert _event_data(odd.recv()) == ("temp>30", b"3")
    for c in (tail, odd):
        with pytest.raises(TimeoutError):
            c.recv(timeout=0.2)


@pytest.mark.parametrize("per", ["session", "broker"])
def test_patterns_opt_in(per):
    options = {"topic_patterns": True} if per == "broker" else {}
    flags = w.PATTERNS if per == "session" else 0
    with w.BrokerThread(**options) as b:
        star, tail, exact, odd = (w.RefClient(b.port) for _ in range(4))
        for c in (star, tail, exact, odd):
            c.hello(flags=flags)
            if per == "session":
                assert c.caps == w.CAP_PATTERNS
        star.subscribe("sensors.*")
        tail.subscribe("sensors.>")
        exact.subscribe("sensors.a.b")
        odd.subscribe("temp>30")  # not whole tokens: a literal topic even here
        plain = w.RefClient(b.port)  # a session that did not ask
        plain.hello()
        plain.subscribe("sensors.>")
        pub = w.RefClient(b.port)
        _pub(pub, "sensors.a", b"1", 1)
        _pub(pub, "sensors.a.b", b"2", 2)
        _pub(pub, "sensors", b"3", 3)
        _pub(pub, "other.a", b"4", 4)
        _pub(pub, "temp>30", b"5", 5)
        assert _event_data(star.recv()) == ("sensors.a", b"1")
        assert [_event_data(tail.recv()) for _ in range(2)] == [("sensors.a", b"1"),
                                                                 ("sensors.a.b", b"2")]
        assert _event_data(exact.recv()) == ("sensors.a.b", b"2")
        assert _event_data(odd.recv()) == ("temp>30", b"5")
        if per == "broker":
            assert [_event_data(plain.recv()) for _ in range(2)] == [("sensors.a", b"1"),
                                                                      ("sensors.a.b", b"2")]
        for c in (star, tail, exact, odd, plain):
            with pytest.raises(TimeoutError):
                c.recv(timeout=0.2)


def test_unsubscribe_stops_delivery(broker):
    sub = w.RefClient(broker.port)
    sub.subscribe("u")
    sub.send(w.UNSUBSCRIBE, b"u", 3, w.ACK_REQUIRED)
    assert sub.recv()[0]["type"] == w.ACK
    pub = w.RefClient(broker.port)
    _pub(pub, "u", b"gone", 1)
    with pytest.raises(TimeoutError):
        sub.recv(timeout=0.3)


def test_at_least_once_can_be_turned_off():
    with w.BrokerThread(idle_timeout=None, redelivery_timeout=0.1, at_least_once=False) as b:
        sub = w.RefClient(b.port)
        assert sub.hello(flags=w.ACK_REQUIRED) and sub.caps == 0  # not granted
        sub.subscribe("r", flags=w.ACK_REQUIRED | w.AT_LEAST_ONCE)  # still answered with an ACK
        pub = w.RefClient(b.port)
        _pub(pub, "r", b"x", 7)
        assert sub.recv()[0]["msg_id"] == 7
        with pytest.raises(TimeoutError):
            sub.recv(timeout=0.5)
        assert b.broker.stats.redelivered == 0


def test_reference_clients_that_never_ack_are_not_redelivered(broker):
    """Reference clients set ACK_REQUIRED on every SUBSCRIBE only to get the ACK reply:
    without ACK_REQUIRED on their HELLO they keep at-most-once delivery."""
    sub = w.RefClient(broker.port)
    sub.hello()
    sub.subscribe("ref", flags=w.ACK_REQUIRED)
    pub = w.RefClient(broker.port)
    _pub(pub, "ref", b"once", 5)
    assert _event_data(sub.recv()) == ("ref", b"once")
    with pytest.raises(TimeoutError):
        sub.recv(timeout=0.8)  # the broker's redelivery timeout in these tests is 0.3 s
    assert broker.broker.stats.redelivered == 0


def test_unacknowledged_events_bounded_in_octets():
    with w.BrokerThread(redelivery_timeout=30, max_inflight_bytes=3 * 1100) as b:
        sub = w.RefClient(b.port)
        cid = sub.hello(flags=w.ACK_REQUIRED)
        sub.subscribe("big", flags=w.ACK_REQUIRED | w.AT_LEAST_ONCE)
        pub = w.RefClient(b.port)
        for i in range(5):
            _pub(pub, "big", b"\x05" * 1000, i + 1)
        assert [sub.recv()[0]["msg_id"] for _ in range(5)] == [1, 2, 3, 4, 5]
        assert b.call(lambda: b.broker.session_info(cid)["inflight"]) == 3  # the newest three
        assert b.broker.stats.dropped_inflight == 2
