"""On its defaults the broker does what the reference does where a reference client can see
it: write order, no idle PING, new ids for a HELLO without one."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time

import _msip_support as w


def test_pipelined_publish_to_own_topic_event_before_ack():
    with w.BrokerThread() as bt:
        c = w.RefClient(bt.port)
        payload = w.publish_payload("self", b"x")
        c.send_raw(w.frame(w.HELLO, b"", 1) + w.frame(w.SUBSCRIBE, b"self", 2, w.ACK_REQUIRED)
                   + w.frame(w.PING, b"", 3) + w.frame(w.PUBLISH, payload, 4))
        got = [c.recv() for _ in range(5)]
        assert [(h["type"], h["msg_id"]) for h, _ in got] == [
            (w.ACK, 1), (w.ACK, 2), (w.PONG, 3), (w.EVENT, 4), (w.ACK, 4)]


def test_pings_answered_whole_split_and_with_payload():
    """PINGs arriving together, one octet at a time, or carrying octets, each get their PONG,
    in order, with an empty payload."""
    with w.BrokerThread() as bt:
        c = w.RefClient(bt.port)
        frames = [w.frame(w.PING, b"", 1), w.frame(w.PING, b"abc", 2), w.frame(w.PING, b"", 3)]
        pings = b"".join(frames)
        c.send_raw(pings)
        for f in frames:
            c.send_raw(f)
        c.send_raw(pings[:30])
        for i in range(30, len(pings)):  # one octet per send
            c.send_raw(pings[i:i + 1])
        got = [c.recv() for _ in range(9)]
        assert [(h["type"], h["msg_id"], h["len"]) for h, _ in got] == [(w.PONG, i, 0)
                                                                         for i in (1, 2, 3) * 3]


def test_receive_time_on_the_timers_clock():
    """The time a connection last sent something (read by the idle timeout) is on
    ``time.monotonic()``'s clock."""
    with w.BrokerThread() as bt:
        c = w.RefClient(bt.port)
        c.send(w.PING, b"", 1)
        assert c.recv()[0]["type"] == w.PONG
        ages = bt.call(lambda: [time.monotonic() - conn.last_rx for conn in bt.broker._conns])
        assert len(ages) == 1 and 0 <= ages[0] < 60, ages


def test_pings_around_an_own_event_keep_order():
    """PINGs in the read of a PUBLISH to the sender's own topic are answered in frame order."""
    with w.BrokerThread() as bt:
        c = w.RefClient(bt.port)
        c.subscribe("self")
        c.send_raw(w.frame(w.PING, b"", 3) + w.frame(w.PUBLISH, w.publish_payload("self", b"x"), 4)
                   + w.frame(w.PING, b"", 5) + w.frame(w.PING, b"", 6))
        got = [c.recv() for _ in range(5)]
        assert [(h["type"], h["msg_id"]) for h, _ in got] == [
            (w.PONG, 3), (w.EVENT, 4), (w.ACK, 4), (w.PONG, 5), (w.PONG, 6)]


def test_ping_after_an_event_not_yet_written():
    """An event queued for a connection (from another broker: written on the loop's next turn)
    leaves before the PONG of a PING that arrives meanwhile."""
    with w.BrokerThread() as bt:
        c = w.RefClient(bt.port)
        c.subscribe("remote")
        bt.call(lambda: bt.broker.core.deliver_remote(w.publish_payload("remote", b"r"), w.K_EVENT, 0,
                                                      41, time.monotonic()))
        c.send(w.PING, b"", 42)
        got = [c.recv() for _ in range(2)]
        assert [(h["type"], h["msg_id"]) for h, _ in got] == [(w.EVENT, 41), (w.PONG, 42)]


def test_pings_before_a_bad_header_answered_then_error():
    with w.BrokerThread() as bt:
        c = w.RefClient(bt.port)
        c.send_raw(w.frame(w.PING, b"", 1) + w.frame(w.PING, b"", 2) + w.frame(w.PING, magic=b"NOPE"))
        seen = c.expect_eof()
        assert [(h["type"], h["msg_id"]) for h, _ in seen] == [(w.PONG, 1), (w.PONG, 2), (w.ERROR, 0)]
        assert b"magic" in seen[-1][1]


def test_replies_do_not_overtake_queued_events():
    """A subscriber behind on reading gets its PONG after the events queued before its PING."""
    with w.BrokerThread(write_buffer_high=16 * 1024, queue_bytes=64 << 20) as bt:
        sub = w.RefClient(bt.port)
        sub.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sub.subscribe("q")
        w.shrink_send_buffers(bt, sub)
        pub = w.RefClient(bt.port)
        n = 100
        pub.send_raw(b"".join(w.frame(w.PUBLISH, w.publish_payload("q", b"\x03" * 8192), i + 1)
                              for i in range(n)))
        pub.send(w.PING, b"", 999)
        pub.recv_until(w.PONG, timeout=5.0)  # every event is queued for the subscriber now
        assert bt.call(lambda: any(c.paused for c in bt.broker._conns))
        sub.send(w.PING, b"", 7)
        order = [sub.recv(timeout=5.0)[0] for _ in range(n + 1)]
        assert [(h["type"], h["msg_id"]) for h in order] == [(w.EVENT, i + 1) for i in range(n)] + [(w.PONG, 7)]


def test_no_idle_ping_nor_timeout_by_default():
    with w.BrokerThread() as bt:
        assert bt.broker.idle_timeout is None
        quiet = w.RefClient(bt.port)
        quiet.hello()
        assert w.wait_for(lambda: len(bt.broker._conns) == 1)

        def silent_for_hours():
            for c in bt.broker._conns:
                c.last_rx -= 10 * 3600

        bt.call(silent_for_hours)
        time.sleep(1.5)  # more than one timer tick
        quiet.send(w.PING, b"", 5)
        h, _ = quiet.recv()
        assert (h["type"], h["msg_id"]) == (w.PONG, 5)  # no PING came first, still open


def test_second_hello_without_id_gets_a_new_id():
    with w.BrokerThread() as bt:
        c = w.RefClient(bt.port)
        assert c.hello(msg_id=1) == 1
        assert c.hello(msg_id=2) == 2  # as on the reference
        c.subscribe("kept")  # the connection keeps working under its new id
        pub = w.RefClient(bt.port)
        pub.send(w.PUBLISH, w.publish_payload("kept", b"v"), 9)
        h, p = c.recv()
        assert h["type"] == w.EVENT and p == w.publish_payload("kept", b"v")
        assert bt.broker.stats.sessions == 1  # the first id was let go


def test_hello_answer_carries_capabilities_only_when_asked():
    with w.BrokerThread() as bt:
        ref = w.RefClient(bt.port)
        ref.send(w.HELLO, b"service-a", 5)  # a reference client's text id, flags 0
        h, p = ref.recv()
        assert (h["type"], h["msg_id"], p) == (w.ACK, 5, b"service-")  # 8 octets, as ever
        ours = w.RefClient(bt.port)
        ours.send(w.HELLO, b"", 6, w.ACK_REQUIRED | w.PATTERNS)
        h, p = ours.recv()
        assert struct.unpack(">QI", p)[1] == w.CAP_AT_LEAST_ONCE | w.CAP_PATTERNS


def _mip(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "mip.cli", *args], cwd=w.ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_broker_help_lists_every_limit_with_default_and_unit():
    out = _mip("broker", "--help").stdout
    for flag, default in [("--max-payload OCTETS", "16M"), ("--max-topic-length OCTETS", "1024"),
                          ("--session-ttl SECONDS", "60"), ("--backlog-messages N", "1000"),
                          ("--backlog-bytes OCTETS", "1M"), ("--max-backlog-bytes OCTETS", "64M"),
                          ("--idle-timeout SECONDS", "never"), ("--topic-patterns", "literal"),
                          ("--session-takeover", "both are served")]:
        assert flag in out, flag
        assert default in " ".join(out.split()), (flag, default)
    bad = _mip("broker", "--max-payload", "0")
    assert bad.returncode == 1 and "max_payload must be positive" in bad.stderr


def test_broker_flags_reach_the_broker():
    with w.BrokerProcess("--max-payload", "1K", "--max-topic-length", "16", "--topic-patterns",
                         "--idle-timeout", "0.3") as broker:
        sub = broker.connect()
        sub.hello()
        sub.subscribe("a.>")
        pub = w.RefClient(broker.port)
        pub.send(w.PUBLISH, w.publish_payload("a.b", b"x"), 1)
        assert sub.recv_until(w.EVENT)[1] == w.publish_payload("a.b", b"x")  # patterns on
        pub.send(w.SUBSCRIBE, b"t" * 17, 2, w.ACK_REQUIRED)
        assert b"too long" in pub.expect_eof()[-1][1]
        big = w.RefClient(broker.port)
        big.send(w.PUBLISH, w.publish_payload("t", b"\0" * 1100), 3)
        assert b"too large" in big.expect_eof()[-1][1]
        h, _ = sub.recv_until(w.PING, timeout=5.0)  # idle PING after 0.3 s of silence
        assert h["type"] == w.PING
