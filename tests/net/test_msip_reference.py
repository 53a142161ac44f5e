"""Byte-exact checks of the broker against the reference broker's layout, with a struct client."""

from __future__ import annotations

import socket
import struct

import pytest

import _msip_support as w


@pytest.fixture
def broker():
    b = w.BrokerThread(idle_timeout=None)
    yield b
    b.stop()


def test_hello_new_session_bytes(broker):
    c = w.RefClient(broker.port)
    c.send(w.HELLO, b"", msg_id=0x0102030405060708)
    raw = c.recv_raw()
    assert raw == b"MSIP\x01\x00\x00\x06\x00\x03\x00\x00\x00\x00\x00\x08" \
                  b"\x01\x02\x03\x04\x05\x06\x07\x08" + struct.pack(">Q", 1)
    c2 = w.RefClient(broker.port)
    assert c2.hello(msg_id=9) == 2  # new ids count up from 1


def test_hello_resume_echoes_id(broker):
    c = w.RefClient(broker.port)
    c.send(w.HELLO, struct.pack(">Q", 4242), msg_id=77)
    assert c.recv_raw() == w.frame(w.ACK, struct.pack(">Q", 4242), 77, 0, w.K_STATE)


def test_subscribe_unsubscribe_ack_bytes(broker):
    c = w.RefClient(broker.port)
    c.hello()
    c.send(w.SUBSCRIBE, b"news", msg_id=0xAABB, flags=w.ACK_REQUIRED)
    assert c.recv_raw() == w.frame(w.ACK, b"", 0xAABB, 0, w.K_STATE)
    c.send(w.UNSUBSCRIBE, b"news", msg_id=0xAABC, flags=w.ACK_REQUIRED)
    assert c.recv_raw() == w.frame(w.ACK, b"", 0xAABC, 0, w.K_STATE)


def test_publish_event_and_ack_bytes(broker):
    sub = w.RefClient(broker.port)
    sub.hello()
    sub.subscribe("sensors.t")
    pub = w.RefClient(broker.port)
    pub.hello(msg_id=3)
    payload = w.publish_payload("sensors.t", b"21.5")
    # the reference client sets COMPRESSED/URGENT as it likes; the EVENT must not claim zstd
    pub.send(w.PUBLISH, payload, msg_id=555, flags=w.COMPRESSED)
    assert pub.recv_raw() == w.frame(w.ACK, b"", 555, 0, w.K_STATE)
    # the reference sends flags COMPRESSED here; ours says 0 since the data is not zstd
    assert sub.recv_raw() == w.frame(w.EVENT, payload, 555, 0, w.K_EVENT)


def test_event_compressed_only_for_zstd(broker):
    zstd = pytest.importorskip("zstandard")
    sub = w.RefClient(broker.port)
    sub.subscribe("z")
    pub = w.RefClient(broker.port)
    data = zstd.ZstdCompressor().compress(b"x" * 1000)
    payload = w.publish_payload("z", data)
    pub.send(w.PUBLISH, payload, msg_id=1, flags=w.COMPRESSED)
    assert sub.recv_raw() == w.frame(w.EVENT, payload, 1, w.COMPRESSED, w.K_EVENT)
    # zstd octets without the flag: the broker does not set it on its own
    pub.send(w.PUBLISH, payload, msg_id=2)
    assert sub.recv_raw() == w.frame(w.EVENT, payload, 2, 0, w.K_EVENT)


def test_ping_pong_bytes(broker):
    c = w.RefClient(broker.port)
    c.send(w.PING, b"", msg_id=0xDEADBEEF)
    assert c.recv_raw() == w.frame(w.PONG, b"", 0xDEADBEEF, 0, w.K_EVENT)


def test_close_closes(broker):
    c = w.RefClient(broker.port)
    c.hello()
    c.send(w.CLOSE, b"", msg_id=5)
    assert c.expect_eof() == []


def test_error_frame_layout(broker):
    c = w.RefClient(broker.port)
    c.send(w.EVENT, b"", msg_id=5)  # a frame only the broker sends
    frames = c.expect_eof()
    assert len(frames) == 1
    h, p = frames[0]
    assert (h["type"], h["kind"], h["msg_id"], h["flags"], h["reserved"]) == (w.ERROR, w.K_EVENT, 0, 0, 0)
    assert p.decode("utf-8").startswith("Invalid frame or unsupported operation")


def test_tcp_nodelay_on_accepted_socket(broker):
    c = w.RefClient(broker.port)
    c.hello()

    def nodelay():
        conns = list(broker.broker._conns)
        return [cn.transport.get_extra_info("socket").getsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY) for cn in conns]

    assert all(v != 0 for v in broker.call(nodelay))


def test_frame_burst_written_whole(broker):
    """Header and payload of each EVENT arrive together (one write per frame or burst)."""
    sub = w.RefClient(broker.port)
    sub.subscribe("big")
    pub = w.RefClient(broker.port)
    payload = w.publish_payload("big", b"\x07" * 40_000)
    pub.send(w.PUBLISH, payload, msg_id=1)
    assert sub.recv_raw() == w.frame(w.EVENT, payload, 1, 0, w.K_EVENT)


def test_large_payloads_fanned_out_intact(broker):
    """Large events are sent from the broker's receive memory: later reads must not alter them."""
    sub = w.RefClient(broker.port)
    sub.subscribe("big")
    w.shrink_send_buffers(broker, sub)
    pub = w.RefClient(broker.port)
    payloads = [w.publish_payload("big", bytes([i]) * (20_000 + i)) for i in range(60)]
    pub.send_raw(b"".join(w.frame(w.PUBLISH, p, i + 1) for i, p in enumerate(payloads)))
    pub.send(w.PING, b"", 999)
    pub.recv_until(w.PONG)
    for i, p in enumerate(payloads):
        assert sub.recv_raw() == w.frame(w.EVENT, p, i + 1, 0, w.K_EVENT)
