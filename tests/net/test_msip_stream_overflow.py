"""The core's side of a cluster stream being read for an at-least-once subscription: live
events arriving meanwhile are held back, at most ``max_inflight`` of them; past that the held
ones are dropped and the stream is read again from the last event delivered, so the session
still gets every event once, in stream order.

The backplane here only records what the core asks of it (the core does no I/O: the Redis
side, ``mip.net.msip_cluster``, reads the stream and calls ``stream_replay`` with its pages, as
below). Which live events arrive while a read is in progress cannot be arranged through a real
Redis, so they are handed to the core as the cluster hands them: ``deliver_remote`` with their
stream ids."""

from __future__ import annotations

import _msip_support as w
from test_msip_core import Plane, Wire, events, hello


def _payload(i: int) -> bytes:
    return w.publish_payload("feed", b"%03d" % i)


def test_live_events_past_max_inflight_while_reading_are_read_again_from_the_stream():
    wire = Wire(max_inflight=3)
    bp = wire.core.backplane = Plane(wire.core)
    sub = wire.open()
    cid = hello(wire, sub, flags=w.ACK_REQUIRED)
    wire.send(sub, w.SUBSCRIBE, b"feed", 2, w.ACK_REQUIRED | w.AT_LEAST_ONCE)
    wire.frames(sub)  # the SUBSCRIBE's ACK
    [(session, topic)] = bp.begun
    assert topic == "feed" and session.client_id == cid
    stream = [((1, i), _payload(i), i + 1) for i in range(12)]  # (stream id, payload, msg_id)

    # the stream holds 0..1 from before; 2..9 arrive live while it is read: more than
    # max_inflight (3), so the ones held back are dropped and the read goes on past 1
    for sid, payload, msg_id in stream[2:10]:
        wire.core.deliver_remote(payload, 1, 0, msg_id, wire.now, sid)
    wire.write_out()
    assert events(wire.frames(sub)) == []  # held back: the stream comes first
    on = wire.core.stream_replay(session, "feed", [(sid, p, 0, m) for sid, p, m in stream[:2]],
                                 True, wire.now)
    assert on == (1, 1)  # read again from after the last delivered
    on = wire.core.stream_replay(session, "feed", [(sid, p, 0, m) for sid, p, m in stream[2:10]],
                                 True, wire.now)
    assert on is None  # caught up: live from now on
    # live again: a new event, and one the stream read already (skipped)
    for sid, payload, msg_id in (stream[10], stream[9], stream[11]):
        wire.core.deliver_remote(payload, 1, 0, msg_id, wire.now, sid)
    wire.write_out()
    got = events(wire.frames(sub))
    assert got == [(m, p) for _, p, m in stream]  # each once, in stream order
    # acknowledged in order: the recorded position follows to after the last one
    for _, _, msg_id in stream:
        wire.send(sub, w.ACK, b"", msg_id)
    assert bp.positions[(cid, "feed")] == "(1-11"


def test_live_events_within_max_inflight_follow_the_stream_without_a_second_read():
    wire = Wire(max_inflight=10)
    bp = wire.core.backplane = Plane(wire.core)
    sub = wire.open()
    hello(wire, sub, flags=w.ACK_REQUIRED)
    wire.send(sub, w.SUBSCRIBE, b"feed", 2, w.ACK_REQUIRED | w.AT_LEAST_ONCE)
    wire.frames(sub)
    [(session, _)] = bp.begun
    stream = [((5, i), _payload(i), i + 1) for i in range(6)]
    for sid, payload, msg_id in stream[2:]:  # 4 held back, within the bound
        wire.core.deliver_remote(payload, 1, 0, msg_id, wire.now, sid)
    # the read sees 0..3 (2 and 3 were also held back: delivered once)
    on = wire.core.stream_replay(session, "feed", [(sid, p, 0, m) for sid, p, m in stream[:4]],
                                 True, wire.now)
    assert on is None
    wire.write_out()
    assert events(wire.frames(sub)) == [(m, p) for _, p, m in stream]
