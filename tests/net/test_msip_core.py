"""The MSIP broker core without sockets: unit tests, and a state machine (Hypothesis) that
drives the core and a small reference model of the broker side by side and compares every
frame each connection receives, the counters and the sessions.

Frames are built and read with ``struct`` (the reference layout), not with our codec."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mip.net.msip_core import ABORT, CLOSE, BrokerCore
from mip.net.msip_topics import topic_matches

import _msip_support as w


# -- a socket-less transport ----------------------------------------------------------------
class Wire:
    """Drives a core as the asyncio broker does: feeds frames, writes out what is queued to
    writable connections (and to closing ones), closes what the core ends."""

    def __init__(self, **limits):
        self.core = BrokerCore(**limits)
        self.now = 0.0
        self.received: dict = {}  # peer -> list of raw frames written to it
        self.closed: dict = {}  # peer -> close mode

    def open(self):
        peer = self.core.open(self.now)
        self.received[peer] = []
        return peer

    def send(self, peer, frame_type, payload=b"", msg_id=0, flags=0):
        self.core.feed(peer, w.frame(frame_type, payload, msg_id, flags), self.now)
        self.write_out()

    def publish(self, peer, topic, data, msg_id, flags=0):
        self.send(peer, w.PUBLISH, w.publish_payload(topic, data), msg_id, flags)

    def tick(self, dt=0.0):
        self.now += dt
        self.core.tick(self.now)
        self.write_out()

    def set_writable(self, peer, writable):
        self.core.set_writable(peer, writable)  # writable again: dirty if anything is queued
        self.write_out()

    def _take_all(self, peer):
        out = b"".join(bytes(c) for c in peer.take(1 << 62)[0])
        frames = self.received[peer]
        while out:
            n = struct.unpack_from(">I", out, 12)[0]
            frames.append(out[:24 + n])
            out = out[24 + n:]

    def write_out(self):
        core = self.core
        while core.closing or core.dirty:
            closing, core.closing = core.closing, []
            for peer in closing:
                core.dirty.pop(peer, None)
                if peer.close_mode == CLOSE:
                    self._take_all(peer)
                self.closed[peer] = peer.close_mode
                core.lost(peer, self.now)  # the transport reports the closed connection
            dirty, core.dirty = core.dirty, {}
            for peer in dirty:
                if not peer.paused:
                    self._take_all(peer)

    def lose(self, peer):
        """The connection drops (what is queued for it is lost)."""
        self.core.lost(peer, self.now)
        self.closed[peer] = "lost"

    def frames(self, peer):
        """(type, msg_id, flags, payload) of what ``peer`` received since the last call."""
        got = [(struct.unpack_from(">H", f, 6)[0], struct.unpack_from(">Q", f, 16)[0], f[5], f[24:])
               for f in self.received[peer]]
        self.received[peer].clear()
        return got


def hello(wire, peer, client_id=None, flags=0, msg_id=1):
    """HELLO; returns the client id (the frames after its ACK stay to be read)."""
    payload = b"" if client_id is None else struct.pack(">Q", client_id)
    wire.send(peer, w.HELLO, payload, msg_id, flags)
    reply = wire.received[peer].pop(0)
    assert struct.unpack_from(">HHHIQ", reply, 6)[::4] == (w.ACK, msg_id)
    return struct.unpack_from(">Q", reply, 24)[0]


def events(got):
    return [(mid, p) for ft, mid, _, p in got if ft == w.EVENT]


# -- unit tests -----------------------------------------------------------------------------
def test_fan_out_queues_one_shared_entry():
    wire = Wire()
    subs = [wire.open() for _ in range(10)]
    for s in subs:
        wire.send(s, w.SUBSCRIBE, b"t", 1)
    pub = wire.open()
    # fed without writing out, to look at the queues
    wire.core.feed(pub, w.frame(w.PUBLISH, w.publish_payload("t", b"x" * 100), 7), wire.now)
    entries = [s.queue[0] for s in subs]
    assert all(e is entries[0] for e in entries)  # one EVENT, encoded once, for all ten
    assert wire.core.stats.delivered == 10
    assert list(wire.core.dirty) == subs + [pub]
    wire.write_out()
    assert all(events(wire.frames(s)) == [(7, w.publish_payload("t", b"x" * 100))] for s in subs)


def test_open_connections_are_counted():
    wire = Wire()
    peers = [wire.open() for _ in range(3)]
    assert wire.core.stats.connections == 3
    wire.core.lost(peers[0], wire.now)
    wire.core.lost(peers[0], wire.now)  # told twice: counted once
    assert wire.core.stats.connections == 2


def test_large_event_shares_the_received_payload():
    wire = Wire()
    a, b = wire.open(), wire.open()
    wire.send(a, w.SUBSCRIBE, b"big")
    wire.send(b, w.SUBSCRIBE, b"big")
    pub = wire.open()
    data = bytes(range(256)) * 256
    wire.core.feed(pub, w.frame(w.PUBLISH, w.publish_payload("big", data), 3), wire.now)
    item = a.queue[0][0]
    assert type(item) is tuple and item is b.queue[0][0]  # (header, view of the read buffer)
    wire.write_out()
    assert events(wire.frames(a)) == events(wire.frames(b)) == [(3, w.publish_payload("big", data))]


def test_reply_never_overtakes_queued_events():
    wire = Wire()
    sub, pub = wire.open(), wire.open()
    wire.send(sub, w.SUBSCRIBE, b"t")
    wire.set_writable(sub, False)
    for i in range(5):
        wire.publish(pub, "t", b"e", i + 1)
    wire.send(sub, w.PING, b"", 99)
    wire.send(sub, w.SUBSCRIBE, b"u", 100, w.ACK_REQUIRED)
    assert wire.frames(sub) == []
    wire.set_writable(sub, True)
    assert [(ft, mid) for ft, mid, _, _ in wire.frames(sub)] == (
        [(w.EVENT, i + 1) for i in range(5)] + [(w.PONG, 99), (w.ACK, 100)])


def test_urgent_overtakes_only_events_held_back():
    wire = Wire()
    sub, pub = wire.open(), wire.open()
    wire.send(sub, w.SUBSCRIBE, b"t")
    wire.publish(pub, "t", b"a", 1, w.URGENT)  # writable: in order
    wire.set_writable(sub, False)
    wire.publish(pub, "t", b"b", 2)
    wire.send(sub, w.PING, b"", 50)
    wire.publish(pub, "t", b"c", 3, w.URGENT)
    wire.set_writable(sub, True)
    assert [(ft, mid) for ft, mid, _, _ in wire.frames(sub)] == [
        (w.EVENT, 1), (w.EVENT, 3), (w.EVENT, 2), (w.PONG, 50)]


def test_overflow_drops_oldest_events_keeps_replies():
    wire = Wire(queue_limit=3)
    sub, pub = wire.open(), wire.open()
    wire.send(sub, w.SUBSCRIBE, b"t")
    wire.set_writable(sub, False)
    wire.send(sub, w.PING, b"", 9)
    for i in range(5):
        wire.publish(pub, "t", b"e", i + 1)
    # the reply is kept and counts against the limit: 3 frames stay queued
    assert sub.dropped == 3
    assert len(sub.urgent) + len(sub.queue) == 3
    wire.set_writable(sub, True)
    assert [(ft, mid) for ft, mid, _, _ in wire.frames(sub)] == [
        (w.PONG, 9), (w.EVENT, 4), (w.EVENT, 5)]
    assert wire.core.stats.dropped_overflow == 3


def test_overflow_disconnect_aborts():
    wire = Wire(queue_limit=2, overflow="disconnect")
    sub, pub = wire.open(), wire.open()
    wire.send(sub, w.SUBSCRIBE, b"t")
    wire.set_writable(sub, False)
    for i in range(3):
        wire.publish(pub, "t", b"e", i + 1)
    assert wire.closed[sub] == ABORT and wire.frames(sub) == []
    assert sub.close_reason == "outgoing queue full"
    assert wire.core.stats.slow_disconnects == 1
    wire.publish(pub, "t", b"e", 4)  # the route no longer names it
    assert wire.core.stats.delivered == 3


def test_route_follows_writability_and_subscriptions():
    wire = Wire()
    sub, pub = wire.open(), wire.open()
    wire.send(sub, w.SUBSCRIBE, b"t")
    wire.publish(pub, "t", b"1", 1)
    wire.set_writable(sub, False)
    wire.publish(pub, "t", b"2", 2, w.URGENT)
    wire.set_writable(sub, True)
    wire.send(sub, w.UNSUBSCRIBE, b"t")
    wire.publish(pub, "t", b"3", 3)
    assert [mid for mid, _ in events(wire.frames(sub))] == [1, 2]


def test_away_session_leaves_the_fast_path():
    """An at-least-once session's plain subscription is served from the cached route while
    connected; once its connection drops, what is published is kept for it instead."""
    wire = Wire()
    sub, pub = wire.open(), wire.open()
    cid = hello(wire, sub, flags=w.ACK_REQUIRED)
    wire.send(sub, w.SUBSCRIBE, b"t")
    wire.publish(pub, "t", b"1", 1)
    assert [mid for mid, _ in events(wire.frames(sub))] == [1]
    wire.lose(sub)
    wire.publish(pub, "t", b"2", 2)
    assert wire.core.session_info(cid)["backlog"] == 1 and wire.received[sub] == []
    back = wire.open()
    hello(wire, back, cid, w.ACK_REQUIRED)
    assert [mid for mid, _ in events(wire.frames(back))] == [2]


def test_malformed_frames_end_the_connection_with_a_reason():
    wire = Wire(max_payload=64)
    c = wire.open()
    wire.core.feed(c, w.frame(w.PUBLISH, b"", 1, length=65), wire.now)
    wire.write_out()
    (ft, _, _, reason), = wire.frames(c)
    assert ft == w.ERROR and reason.startswith(b"frame too large")
    assert wire.closed[c] == CLOSE and c.close_reason == reason.decode()
    c2 = wire.open()
    wire.send(c2, w.PUBLISH, b"\x00\x09abc", 1)
    (ft, _, _, reason), = wire.frames(c2)
    assert ft == w.ERROR and b"topic length runs past the payload" in reason


def test_partial_frame_read_timeout_and_idle_ping():
    wire = Wire(read_timeout=5.0, idle_timeout=10.0)
    c = wire.open()
    wire.core.feed(c, w.frame(w.PING, b"", 1)[:10], wire.now)
    wire.tick(4.0)
    assert wire.frames(c) == []
    wire.tick(2.0)
    (ft, _, _, reason), = wire.frames(c)
    assert ft == w.ERROR and reason.startswith(b"read timeout")
    quiet = wire.open()
    wire.tick(10.5)
    assert [ft for ft, *_ in wire.frames(quiet)] == [w.PING]
    wire.tick(10.0)
    assert [ft for ft, *_ in wire.frames(quiet)] == [w.ERROR]


def test_authentication_callback():
    seen = []

    def authenticate(host, token):
        seen.append((host, token))
        return None if token == b"good" else "authentication failed: missing or unknown token"

    wire = Wire(authenticate=authenticate)
    c = wire.core.open(0.0, host="10.0.0.1")
    wire.received[c] = []
    wire.send(c, w.SUBSCRIBE, b"t")
    assert wire.frames(c)[0][3].startswith(b"authentication required")
    c = wire.core.open(0.0, host="10.0.0.2")
    wire.received[c] = []
    wire.send(c, w.HELLO, struct.pack(">Q", 5) + b"good", 1)
    assert [ft for ft, *_ in wire.frames(c)] == [w.ACK]
    wire.send(c, w.SUBSCRIBE, b"t", 2, w.ACK_REQUIRED)
    assert [ft for ft, *_ in wire.frames(c)] == [w.ACK]
    assert seen == [("10.0.0.2", b"good")]


def test_global_backlog_bound_drops_the_broker_oldest():
    size = 24 + 2 + 1 + 10
    wire = Wire(max_backlog_bytes=3 * size)
    a, b, pub = wire.open(), wire.open(), wire.open()
    ids = []
    for peer, topic in ((a, "a"), (b, "b")):
        ids.append(hello(wire, peer, flags=w.ACK_REQUIRED))
        wire.send(peer, w.SUBSCRIBE, topic.encode(), 2, w.AT_LEAST_ONCE)
        wire.lose(peer)
    for i, topic in enumerate("abab"):
        wire.publish(pub, topic, b"0123456789", i + 1)
    info = [wire.core.session_info(i) for i in ids]
    assert [(x["backlog"], x["backlog_bytes"]) for x in info] == [(1, size), (2, 2 * size)]
    assert wire.core.stats.dropped_backlog == 1 and wire.core.stats.backlog_bytes == 3 * size
    back = wire.open()
    hello(wire, back, ids[0], w.ACK_REQUIRED)  # the oldest (msg 1, on "a") is the one dropped
    assert events(wire.frames(back)) == [(3, w.publish_payload("a", b"0123456789"))]


def test_redelivery_until_acknowledged_with_the_clock_passed_in():
    wire = Wire(redelivery_timeout=4.0, max_redeliveries=2)
    sub, pub = wire.open(), wire.open()
    hello(wire, sub, flags=w.ACK_REQUIRED)
    wire.send(sub, w.SUBSCRIBE, b"t", 2, w.AT_LEAST_ONCE)
    wire.publish(pub, "t", b"x", 41)
    wire.publish(pub, "t", b"y", 42)
    wire.send(sub, w.ACK, b"", 42)
    assert [mid for mid, _ in events(wire.frames(sub))] == [41, 42]
    wire.tick(3.5)
    assert wire.frames(sub) == []
    for _ in range(2):
        wire.tick(0.5)
        assert [mid for mid, _ in events(wire.frames(sub))] == [41]
        wire.tick(3.5)
    wire.tick(0.5)  # two resends made: given up
    assert wire.frames(sub) == [] and wire.core.stats.dropped_inflight == 1


class Plane:
    """A backplane that records at-least-once subscriptions (``streams``; at most
    ``max_patterns`` of them, declining the others) and keeps what the core tells it; a test
    plays its reads of the streams (``core.stream_replay``)."""

    streams = True

    def __init__(self, core, max_patterns: int | None = None):
        self.core = core
        self.max_patterns = max_patterns
        self.begun: list = []  # (session, topic) whose record began
        self.declined: list[str] = []
        self.positions: dict = {}

    def interest(self, topic, pattern, wanted):
        pass

    def publish(self, topic, payload, kind, flags, msg_id):
        pass

    def begin(self, session, topic):
        if self.max_patterns is not None and len(self.begun) >= self.max_patterns:
            self.declined.append(topic)
            self.core.stream_declined(session, topic)
            return
        self.begun.append((session, topic))

    def position(self, client_id, topic, pos):
        self.positions[(client_id, topic)] = pos

    def unstream(self, client_id, topic):
        self.positions.pop((client_id, topic), None)

    def restore(self, session):
        pass

    def drop(self, client_id):
        pass


def _stream_entry(i: int, topic: str = "t", size: int = 10):
    """A stream entry (stream id, PUBLISH payload, EVENT flags, msg_id) numbered ``i``."""
    return (i, 0), memoryview(w.publish_payload(topic, b"%0*d" % (size, i))), 0, i


def _recorded(limits: dict):
    wire = Wire(**limits)
    plane = wire.core.backplane = Plane(wire.core)
    sub = wire.open()
    cid = hello(wire, sub, flags=w.ACK_REQUIRED)
    wire.send(sub, w.SUBSCRIBE, b"t", 2, w.AT_LEAST_ONCE)
    (session, topic), = plane.begun
    assert topic == "t" and session.client_id == cid
    return wire, sub, cid, session


EVENT_SIZE = 24 + 2 + 1 + 10  # an EVENT of _stream_entry: header, topic length, topic, data


@pytest.mark.parametrize("limits,kept", [
    (dict(backlog_limit=3), 3),
    (dict(backlog_bytes=4 * EVENT_SIZE + 5), 4),
    (dict(max_backlog_bytes=2 * EVENT_SIZE + 5), 2),
])
def test_stream_catch_up_is_bounded_as_an_away_backlog(limits, kept):
    """What a recorded subscription's catch-up reads that the session missed (however many)
    is kept as an away session's backlog is, the oldest dropped and counted, and handed over,
    oldest first, once the stream is read up to the live events held back meanwhile; those
    follow (each once), then events are delivered at once."""
    wire, sub, cid, session = _recorded(limits)
    core = wire.core
    wire.frames(sub)
    missed = 1000
    for first in range(1, missed + 1, 100):  # pages, as a backplane reads them
        on = core.stream_replay(session, "t", [_stream_entry(i) for i in range(first, first + 100)],
                                False, wire.now)
        assert on == (first + 99, 0)
        info = core.session_info(cid)
        assert info["backlog"] == kept and info["backlog_bytes"] == kept * EVENT_SIZE
        assert info["inflight"] == 0 and core.stats.backlog_bytes == kept * EVENT_SIZE
    assert core.stats.dropped_backlog == missed - kept
    # a live event meanwhile (the backplane's own publish coming back, with its stream id)
    # is held back; the stream's read covers it too: it is handed over once
    live = _stream_entry(missed + 1)
    core.deliver_remote(live[1], w.K_EVENT, 0, live[3], wire.now, live[0], own=True)
    wire.write_out()
    assert wire.frames(sub) == []
    assert core.stream_replay(session, "t", [live], True, wire.now) is None
    wire.write_out()
    got = [mid for mid, _ in events(wire.frames(sub))]  # the newest missed, then the live one
    assert got == list(range(missed - kept + 1, missed + 2))
    info = core.session_info(cid)
    assert (info["backlog"], info["inflight"]) == (0, kept + 1) and core.stats.backlog_bytes == 0
    assert core.stats.dropped_backlog == missed - kept
    after = _stream_entry(missed + 2)
    core.deliver_remote(after[1], w.K_EVENT, 0, after[3], wire.now, after[0], own=True)
    wire.write_out()
    assert [mid for mid, _ in events(wire.frames(sub))] == [missed + 2]


def test_live_events_during_a_catch_up_are_not_bounded_as_missed_ones():
    """Events published while the session is here (held back during its catch-up, and read
    from the stream too) are each delivered once, however many: only what it missed before
    the first of them is bounded as an away backlog."""
    wire, sub, cid, session = _recorded(dict(backlog_limit=3))
    core = wire.core
    wire.frames(sub)
    live = [_stream_entry(i) for i in range(11, 31)]  # more than backlog_limit
    for sid, payload, flags, msg_id in live:
        core.deliver_remote(payload, w.K_EVENT, flags, msg_id, wire.now, sid, own=True)
    missed = [_stream_entry(i) for i in range(1, 11)]
    assert core.stream_replay(session, "t", missed + live[:5], False, wire.now) == (15, 0)
    assert core.stream_replay(session, "t", live[5:], True, wire.now) is None
    wire.write_out()
    assert [mid for mid, _ in events(wire.frames(sub))] == list(range(8, 31))
    assert core.stats.dropped_backlog == 7 and core.session_info(cid)["inflight"] == 23
    # a backplane holding the live events itself (a pattern's) says where they start
    wire, sub, cid, session = _recorded(dict(backlog_limit=3))
    wire.frames(sub)
    wire.core.stream_replay(session, "t", missed + live, False, wire.now, live[0][0])
    wire.core.stream_replay(session, "t", live, True, wire.now, live[0][0])
    wire.write_out()
    assert [mid for mid, _ in events(wire.frames(sub))] == list(range(8, 31))


def test_stream_catch_up_of_an_away_session_stays_in_its_backlog():
    """A session that went away during its catch-up keeps what was read, bounded, and gets
    it on resuming; an unsubscribed topic's entries are not handed over."""
    wire, sub, cid, session = _recorded(dict(backlog_limit=5))
    core = wire.core
    wire.lose(sub)
    assert core.stream_replay(session, "t", [_stream_entry(i) for i in range(1, 21)], True,
                              wire.now) is None
    assert core.session_info(cid)["backlog"] == 5 and core.stats.dropped_backlog == 15
    back = wire.open()
    hello(wire, back, cid, w.ACK_REQUIRED)
    assert [mid for mid, _ in events(wire.frames(back))] == list(range(16, 21))
    # a catch-up cut short by an UNSUBSCRIBE: what it kept goes with the subscription
    wire.send(back, w.SUBSCRIBE, b"u", 3, w.AT_LEAST_ONCE)
    second = [s for s, t in core.backplane.begun if t == "u"]
    assert second == [session]
    core.stream_replay(session, "u", [_stream_entry(i, "u") for i in range(1, 4)], False,
                       wire.now)
    assert core.session_info(cid)["backlog"] == 3
    wire.send(back, w.UNSUBSCRIBE, b"u", 4)
    assert core.session_info(cid)["backlog"] == 0 and core.stats.backlog_bytes == 0
    assert core.stream_replay(session, "u", [_stream_entry(4, "u")], True, wire.now) is None
    wire.frames(back)
    assert events(wire.frames(back)) == []


def test_stream_declined_serves_the_subscription_from_memory():
    """A subscription the backplane does not record after all (too many patterns) is
    routed by this broker, as without a backplane, and no catch-up is waited for."""
    wire = Wire(topic_patterns=True)
    plane = wire.core.backplane = Plane(wire.core, max_patterns=1)
    sub, pub = wire.open(), wire.open()
    cid = hello(wire, sub, flags=w.ACK_REQUIRED)
    wire.send(sub, w.SUBSCRIBE, b"a.*", 2, w.AT_LEAST_ONCE)
    wire.send(sub, w.SUBSCRIBE, b"b.*", 3, w.AT_LEAST_ONCE)
    assert [t for _, t in plane.begun] == ["a.*"] and plane.declined == ["b.*"]
    assert wire.core.stream_sessions() == []  # "a.*" is still catching up
    wire.publish(pub, "b.x", b"local", 9)
    assert [mid for mid, _ in events(wire.frames(sub))] == [9]
    assert wire.core.session_info(cid)["inflight"] == 1
    wire.publish(pub, "a.x", b"recorded", 10)  # comes back from the backplane, not at once
    assert events(wire.frames(sub)) == []


# -- the reference model ----------------------------------------------------------------------
HDR = struct.Struct(">4sBBHHHIQ")


def wire_frame(ft, payload=b"", msg_id=0, flags=0, kind=w.K_EVENT):
    return HDR.pack(b"MSIP", 1, flags, ft, kind, 0, len(payload), msg_id) + payload


class MSession:
    def __init__(self, cid=None):
        self.cid = cid
        self.subs: dict[str, bool] = {}
        self.conn = None
        self.durable = False
        self.patterns = False
        self.inflight: list[list] = []  # [msg_id, frame, deadline, attempts]
        self.backlog: list[list] = []  # [order, msg_id, frame, urgent, reliable]
        self.away_since = None


class MConn:
    def __init__(self):
        self.session = MSession()
        self.session.conn = self
        self.paused = False
        self.urgent: list = []  # frames held while paused (URGENT events)
        self.queue: list = []  # frames held while paused
        self.out: list = []  # frames written
        self.open = True


class Model:
    """What the broker does, written as plainly as possible: no indexes, no caches; routing
    scans every session; backlogs and in-flight events are lists."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.registry: dict[int, MSession] = {}
        self.away: list[MSession] = []  # oldest first
        self.next_id = 1
        self.order = 0
        self.now = 0.0
        self.stats = dict(published=0, delivered=0, redelivered=0, acked=0, dropped_backlog=0,
                          dropped_inflight=0, sessions_expired=0, takeovers=0, errors=0)
        self.conns: list[MConn] = []

    # output
    def write(self, conn, frame, event=False, urgent=False):
        if not conn.open:
            return
        if not conn.paused:
            conn.out.append(frame)
        elif event and urgent:
            conn.urgent.append(frame)
        else:
            conn.queue.append(frame)

    def fail(self, conn, reason):
        self.stats["errors"] += 1
        self.write(conn, wire_frame(w.ERROR, reason.encode()))
        self.close(conn)

    def close(self, conn):
        conn.out += conn.urgent + conn.queue
        conn.urgent, conn.queue = [], []
        self.lost(conn)

    def lost(self, conn):
        conn.open = False
        conn.urgent, conn.queue = [], []
        s = conn.session
        if s.conn is not conn:
            return
        s.conn = None
        if s.durable:
            s.away_since = self.now
            self.away.append(s)
            while len(self.away) > self.cfg["max_sessions"]:
                self.forget(self.away[0])
                self.stats["sessions_expired"] += 1
        else:
            self.forget(s)

    def forget(self, s):
        s.subs.clear()
        if self.registry.get(s.cid) is s:
            del self.registry[s.cid]
        if s in self.away:
            self.away.remove(s)
        s.backlog.clear()
        s.inflight.clear()
        s.durable = False

    def sessions(self):
        seen = [c.session for c in self.conns if c.open]
        return seen + [s for s in self.away if s not in seen]

    # frames
    def hello(self, conn, cid, flags, msg_id):
        cur = conn.session
        durable = self.cfg["at_least_once"] and bool(flags & w.ACK_REQUIRED)
        takeover = self.cfg.get("session_takeover", False) or bool(flags & w.TAKEOVER)
        took = resumed = False
        s = None
        if not cid:
            if cur.durable:
                s = cur
            else:
                while self.next_id in self.registry:
                    self.next_id += 1
                cid, self.next_id = self.next_id, self.next_id + 1
        if s is None and self.registry.get(cid) is cur:
            s = cur
        if s is None:
            ex = self.registry.get(cid)
            if ex is not None and ex.conn is not None:
                if not takeover:
                    ex = None
                else:
                    took = True
                    self.stats["takeovers"] += 1
                    old = ex.conn
                    ex.conn = None
                    old.session = MSession()
                    old.session.conn = old
                    self.fail(old, f"session {cid} taken over by a newer connection")
                    if not (durable and ex.durable):
                        self.forget(ex)
                        ex = None
            if ex is not None and not durable:
                ex = None
            if ex is not None:
                if ex in self.away:  # (not when it was taken over from a connection)
                    self.away.remove(ex)
                self.leave(cur, ex)
                s = ex
                resumed = True
            else:
                if cur.durable:
                    self.leave(cur, None)
                    s = MSession()
                else:
                    s = cur
                    if self.registry.get(cur.cid) is cur:
                        del self.registry[cur.cid]
                s.cid = cid
                if cid not in self.registry:
                    self.registry[cid] = s
                    s.durable = durable
                else:
                    s.durable = False
            s.conn = conn
            conn.session = s
        s.patterns = bool(flags & w.PATTERNS)
        reply = struct.pack(">Q", s.cid)
        if flags & (w.ACK_REQUIRED | w.PATTERNS | w.TAKEOVER):
            patterns = s.patterns or self.cfg.get("topic_patterns", False)
            reply += struct.pack(">I", (1 if s.durable else 0) | (2 if patterns else 0)
                                 | (4 if took else 0))
        self.write(conn, wire_frame(w.ACK, reply, msg_id, kind=w.K_STATE))
        if resumed:
            for p in s.inflight:
                p[2] = self.now + self.cfg["redelivery_timeout"]
                self.stats["redelivered"] += 1
                self.stats["delivered"] += 1
                self.write(conn, p[1], True, p[4])
            kept, s.backlog = s.backlog, []
            for _, mid, frame, urgent, reliable in kept:
                self.deliver(s, mid, frame, urgent, reliable)

    def leave(self, cur, into):
        if cur.durable:
            cur.conn = None
            cur.away_since = self.now
            self.away.append(cur)
            while len(self.away) > self.cfg["max_sessions"]:
                self.forget(self.away[0])
                self.stats["sessions_expired"] += 1
            return
        if into is not None:
            for topic, reliable in cur.subs.items():
                if topic not in into.subs or reliable:
                    into.subs[topic] = reliable
        self.forget(cur)

    def subscribe(self, conn, topic, flags, msg_id, on):
        s = conn.session
        if on:
            if topic not in s.subs and len(s.subs) >= self.cfg["max_subscriptions"]:
                self.fail(conn, f"too many subscriptions (limit {self.cfg['max_subscriptions']} a session)")
                return
            s.subs[topic] = s.durable and bool(flags & w.AT_LEAST_ONCE)
        else:
            s.subs.pop(topic, None)
        if flags & w.ACK_REQUIRED:
            self.write(conn, wire_frame(w.ACK, b"", msg_id, kind=w.K_STATE))

    def publish(self, conn, topic, data, flags, msg_id):
        self.stats["published"] += 1
        payload = w.publish_payload(topic, data)
        frame = wire_frame(w.EVENT, payload, msg_id)
        urgent = bool(flags & w.URGENT)
        for s in self.sessions():
            patterns = s.patterns or self.cfg.get("topic_patterns", False)
            matched = [r for t, r in s.subs.items() if topic_matches(t, topic, patterns)]
            if matched:
                self.deliver(s, msg_id, frame, urgent, any(matched))
        self.write(conn, wire_frame(w.ACK, b"", msg_id, kind=w.K_STATE))

    def deliver(self, s, msg_id, frame, urgent, reliable):
        cfg = self.cfg
        if s.conn is not None:
            if reliable:
                s.inflight.append([msg_id, frame, self.now + cfg["redelivery_timeout"], 1, urgent])
                while len(s.inflight) > 1 and (
                        len(s.inflight) > cfg["max_inflight"]
                        or sum(len(p[1]) for p in s.inflight) > cfg["max_inflight_bytes"]):
                    s.inflight.pop(0)
                    self.stats["dropped_inflight"] += 1
            self.stats["delivered"] += 1
            self.write(s.conn, frame, True, urgent)
        elif s.durable:
            size = len(frame)
            if size > cfg["backlog_bytes"] or size > cfg["max_backlog_bytes"]:
                self.stats["dropped_backlog"] += 1
                return
            while s.backlog and (len(s.backlog) >= cfg["backlog_limit"]
                                 or self.backlog_bytes(s) + size > cfg["backlog_bytes"]):
                s.backlog.pop(0)
                self.stats["dropped_backlog"] += 1
            self.order += 1
            s.backlog.append([self.order, msg_id, frame, urgent, reliable])
            while self.backlog_bytes() > cfg["max_backlog_bytes"]:
                owner = min((o for o in self.away if o.backlog), key=lambda o: o.backlog[0][0])
                owner.backlog.pop(0)
                self.stats["dropped_backlog"] += 1

    def backlog_bytes(self, s=None):
        sessions = [s] if s is not None else self.away
        return sum(len(k[2]) for o in sessions for k in o.backlog)

    def ack(self, conn, msg_id):
        s = conn.session
        for i, p in enumerate(s.inflight):
            if p[0] == msg_id:
                del s.inflight[i]
                self.stats["acked"] += 1
                return

    def tick(self):
        cfg = self.cfg
        for s in list(self.registry.values()):
            if s.conn is None:
                continue
            for p in list(s.inflight):
                if p[2] > self.now:
                    continue
                if p[3] > cfg["max_redeliveries"]:
                    s.inflight.remove(p)
                    self.stats["dropped_inflight"] += 1
                    continue
                p[3] += 1
                p[2] = self.now + cfg["redelivery_timeout"]
                self.stats["redelivered"] += 1
                self.stats["delivered"] += 1
                self.write(s.conn, p[1], True, p[4])
        for s in list(self.away):
            if self.now - s.away_since > cfg["session_ttl"]:
                self.forget(s)
                self.stats["sessions_expired"] += 1

    def resume_writing(self, conn):
        conn.paused = False
        conn.out += conn.urgent + conn.queue
        conn.urgent, conn.queue = [], []


TOPICS = ["a", "b", "a.x", "a.*", "a.>"]
CONFIGS = {
    # per-session bounds, TTL, the number of away sessions (the total bound never reached)
    "sessions": dict(max_sessions=3, backlog_limit=3, backlog_bytes=130, max_backlog_bytes=1 << 30,
                     session_ttl=10.0, redelivery_timeout=4.0, max_redeliveries=2, max_inflight=3,
                     max_inflight_bytes=140, max_subscriptions=3, at_least_once=True),
    # one away session at a time, whose backlog the total bound cuts; patterns and takeover
    # for every session
    "total": dict(max_sessions=1, backlog_limit=4, backlog_bytes=1000, max_backlog_bytes=100,
                  session_ttl=10.0, redelivery_timeout=4.0, max_redeliveries=1, max_inflight=10,
                  max_inflight_bytes=1000, max_subscriptions=4, at_least_once=True,
                  topic_patterns=True, session_takeover=True),
}


class BrokerMachine(RuleBasedStateMachine):
    cfg: dict = {}

    def __init__(self):
        super().__init__()
        self.wire = Wire(queue_limit=10_000, read_timeout=None, **self.cfg)
        self.model = Model(self.cfg)
        self.peers: list = []
        self.msg_id = 0

    def _next_id(self):
        self.msg_id += 1
        return self.msg_id

    def _open_pairs(self):
        return [(p, m) for p, m in zip(self.peers, self.model.conns) if m.open]

    @initialize()
    def start(self):
        self.connect()
        self.connect()

    @rule()
    def connect(self):
        if len(self.peers) < 5:
            self.peers.append(self.wire.open())
            self.model.conns.append(MConn())

    @precondition(lambda self: any(m.open for m in self.model.conns))
    @rule(data=st.data(), cid=st.sampled_from([0, 0, 1, 2, 3]),
          flags=st.sampled_from([0, w.ACK_REQUIRED, w.ACK_REQUIRED | w.PATTERNS, w.PATTERNS,
                                 w.ACK_REQUIRED | w.TAKEOVER, w.TAKEOVER]))
    def hello(self, data, cid, flags):
        peer, conn = data.draw(st.sampled_from(self._open_pairs()))
        mid = self._next_id()
        self.wire.send(peer, w.HELLO, b"" if cid == 0 else struct.pack(">Q", cid), mid, flags)
        self.model.hello(conn, cid, flags, mid)

    @precondition(lambda self: any(m.open for m in self.model.conns))
    @rule(data=st.data(), topic=st.sampled_from(TOPICS), on=st.booleans(),
          flags=st.sampled_from([0, w.ACK_REQUIRED, w.AT_LEAST_ONCE, w.AT_LEAST_ONCE | w.ACK_REQUIRED]))
    def subscribe(self, data, topic, on, flags):
        peer, conn = data.draw(st.sampled_from(self._open_pairs()))
        mid = self._next_id()
        self.wire.send(peer, w.SUBSCRIBE if on else w.UNSUBSCRIBE, topic.encode(), mid, flags)
        self.model.subscribe(conn, topic, flags, mid, on)

    @precondition(lambda self: any(m.open for m in self.model.conns))
    @rule(data=st.data(), topic=st.sampled_from(["a", "b", "a.x", "a.y.z", "a.*"]),
          size=st.integers(0, 40), urgent=st.booleans())
    def publish(self, data, topic, size, urgent):
        peer, conn = data.draw(st.sampled_from(self._open_pairs()))
        mid = self._next_id()
        flags = w.URGENT if urgent else 0
        body = bytes([mid % 256]) * size
        self.wire.publish(peer, topic, body, mid, flags)
        self.model.publish(conn, topic, body, flags, mid)

    @precondition(lambda self: any(m.open and m.session.subs for m in self.model.conns))
    @rule(data=st.data(), size=st.integers(0, 40), urgent=st.booleans())
    def publish_where_subscribed(self, data, size, urgent):
        subs = sorted({t for m in self.model.conns if m.open for t in m.session.subs})
        topic = data.draw(st.sampled_from(subs))
        if topic.endswith(("*", ">")):
            topic = topic[:-1] + "x"
        self.publish(data, topic, size, urgent)

    @precondition(lambda self: any(m.open and m.session.inflight for m in self.model.conns))
    @rule(data=st.data(), which=st.integers(0, 20))
    def ack(self, data, which):
        peer, conn = data.draw(st.sampled_from(
            [(p, m) for p, m in self._open_pairs() if m.session.inflight]))
        mid = conn.session.inflight[which % len(conn.session.inflight)][0]
        self.wire.send(peer, w.ACK, b"", mid)
        self.model.ack(conn, mid)

    @precondition(lambda self: any(m.open for m in self.model.conns))
    @rule(data=st.data())
    def close(self, data):
        peer, conn = data.draw(st.sampled_from(self._open_pairs()))
        self.wire.send(peer, w.CLOSE)
        s = conn.session
        if s.conn is conn:
            self.model.forget(s)
        self.model.close(conn)

    @precondition(lambda self: any(m.open for m in self.model.conns))
    @rule(data=st.data())
    def disconnect(self, data):
        peer, conn = data.draw(st.sampled_from(self._open_pairs()))
        self.wire.lose(peer)
        self.model.lost(conn)

    @precondition(lambda self: any(m.open and not m.paused for m in self.model.conns))
    @rule(data=st.data())
    def pause(self, data):
        peer, conn = data.draw(st.sampled_from([(p, m) for p, m in self._open_pairs() if not m.paused]))
        self.wire.set_writable(peer, False)
        conn.paused = True

    @precondition(lambda self: any(m.open and m.paused for m in self.model.conns))
    @rule(data=st.data())
    def resume(self, data):
        peer, conn = data.draw(st.sampled_from([(p, m) for p, m in self._open_pairs() if m.paused]))
        self.wire.set_writable(peer, True)
        self.model.resume_writing(conn)

    @rule(dt=st.sampled_from([0.5, 2.0, 4.0, 6.0]))
    def advance(self, dt):
        self.wire.tick(dt)
        self.model.now += dt
        self.model.tick()

    @invariant()
    def same_frames(self):
        for peer, conn in zip(self.peers, self.model.conns):
            assert self.wire.received[peer] == conn.out, (peer, conn.out)

    @invariant()
    def routes_never_stale(self):
        core = self.wire.core
        cached = core._routes
        for topic, route in list(cached.items()):
            core._routes = {}
            assert core._route(topic) == route, topic
        core._routes = cached

    @invariant()
    def same_counters_and_sessions(self):
        core, model = self.wire.core, self.model
        st_ = core.stats
        assert {k: getattr(st_, k) for k in model.stats} == model.stats
        assert st_.sessions == len(model.registry)
        assert st_.sessions_away == len(model.away)
        assert st_.backlog_bytes == model.backlog_bytes()
        for cid, s in model.registry.items():
            info = core.session_info(cid)
            assert info == {"client_id": cid, "connected": s.conn is not None,
                            "subscriptions": info["subscriptions"], "inflight": len(s.inflight),
                            "backlog": len(s.backlog), "backlog_bytes": self.model.backlog_bytes(s),
                            "at_least_once": s.durable}
            assert sorted(info["subscriptions"].items()) == sorted(s.subs.items())


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_core_against_reference_model(config):
    machine = type(f"BrokerMachine_{config}", (BrokerMachine,), {"cfg": CONFIGS[config]})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=100, stateful_step_count=40, deadline=None, derandomize=True,
        database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
