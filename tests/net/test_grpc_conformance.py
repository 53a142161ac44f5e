"""gRPC and HTTP/2 behaviour of both gRPC transports (``--grpc-impl native`` and
``grpcio``) side by side: grpcio's own client for what applications see, the ``h2``
package and raw frames for what the wire carries.

Where grpcio's server does something other than what grpc-core documents, and it is not
ours to change, the test says what each transport does and why.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

pytest.importorskip("mip.protocol._h2", reason="mip.protocol._h2 not built (no libnghttp2)")
h2events = pytest.importorskip("h2.events")

import grpc  # noqa: E402
from hyperframe.frame import GoAwayFrame, HeadersFrame, PingFrame  # noqa: E402

from mip.net.grpc_limits import GrpcLimits  # noqa: E402

import _grpc_echo as echo  # noqa: E402

IMPLS = ["native", "grpcio"]
ENHANCE_YOUR_CALM = 11
REFUSED_STREAM = 7


@pytest.fixture(params=IMPLS)
def serve(request):
    """``serve(**limits)`` starts the echo server of the parametrized transport."""
    started = []

    def start(**limits):
        server = echo.Threaded(request.param, replace(GrpcLimits(), **limits))
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def _stub(channel, name):
    return channel.unary_unary(f"/{echo.SERVICE}/{name}")


def test_metadata_including_binary_both_ways(serve):
    server = serve()
    with grpc.insecure_channel(server.address) as channel:
        blob = bytes([0, 1, 2, 0xFE, 0xFF])
        reply, call = _stub(channel, "Metadata").with_call(
            b"", metadata=[("x-text", "hello world"), ("x-blob-bin", blob)], timeout=10)
    # -bin values reach the handler decoded ...
    assert sorted(map(tuple, json.loads(reply))) == [("x-blob-bin", blob.hex()),
                                                     ("x-text", "hello world")]
    # ... and the handler's -bin trailers reach the client as the same octets
    trailers = dict(call.trailing_metadata())
    assert trailers["x-blob-bin"] == blob
    assert trailers["x-text"] == "hello world"


def test_binary_metadata_is_base64_on_the_wire(serve):
    server = serve()
    raw = echo.RawH2(server.address)
    try:
        # unpadded base64, as gRPC sends it: b"\xff\x00" -> "/wA"
        out = raw.call(f"/{echo.SERVICE}/Metadata", b"", extra=[(b"x-k-bin", b"/wA")])
    finally:
        raw.close()
    assert out["trailers"][b"grpc-status"] == b"0"
    assert json.loads(out["data"][5:]) == [["x-k-bin", "ff00"]]
    assert out["trailers"][b"x-k-bin"].rstrip(b"=") == b"/wA"


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
def test_compressed_requests(serve, compression):
    server = serve()
    payload = bytes(range(256)) * 512
    with grpc.insecure_channel(server.address, compression=compression) as channel:
        assert _stub(channel, "Echo")(payload, timeout=10) == payload


def test_deadlines(serve):
    server = serve()
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _stub(channel, "Slow")(b"3", timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the handler sees the client's deadline
        remaining = float(_stub(channel, "Slow")(b"0", timeout=30))
        assert 0 < remaining <= 31  # grpcio's client rounds the timeout it sends up


def test_graceful_shutdown_lets_calls_in_flight_finish(serve):
    server = serve()
    with grpc.insecure_channel(server.address) as channel:
        slow = _stub(channel, "Slow").future(b"1.0", timeout=20)
        time.sleep(0.3)  # the call is in the handler
        stopping = server.stop(10)
        assert slow.result() is not None  # the call in flight completes
        stopping.result(20)
        with pytest.raises(grpc.RpcError) as info:
            _stub(channel, "Echo")(b"x", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_two_phase_goaway(serve):
    server = serve()
    raw = echo.RawH2(server.address)
    try:
        raw.events(timeout=0.3)  # SETTINGS both ways
        stream_id = raw.request(f"/{echo.SERVICE}/Slow", b"1.0")
        time.sleep(0.3)
        stopping = server.stop(10)

        def answer(frame):
            if isinstance(frame, PingFrame) and "ACK" not in frame.flags:
                ack = PingFrame(0, frame.opaque_data)
                ack.flags.add("ACK")
                raw.sock.sendall(ack.serialize())

        frames = echo.read_frames(
            raw.sock, lambda f: "END_STREAM" in f.flags and f.stream_id == stream_id,
            timeout=10, on_frame=answer)
        stopping.result(20)
    finally:
        raw.close()
    goaways = [f.last_stream_id for f in frames if isinstance(f, GoAwayFrame)]
    # first GOAWAY: no new streams wanted, but any in flight may still arrive ...
    assert goaways[0] == (1 << 31) - 1
    # ... a PING to learn when they have, then the final GOAWAY naming the last one
    assert any(isinstance(f, PingFrame) for f in frames)
    assert goaways[-1] == stream_id
    # the call in flight completed after both
    assert isinstance(frames[-1], HeadersFrame) and "END_STREAM" in frames[-1].flags


def test_server_keepalive_pings(serve):
    server = serve(keepalive_interval=0.3, keepalive_timeout=5)
    raw = echo.RawH2(server.address)
    try:
        # as grpc-core, keepalive PINGs go out while calls are open
        raw.request(f"/{echo.SERVICE}/Slow", b"3")
        events = raw.events(lambda e: isinstance(e, h2events.PingReceived), timeout=10)
    finally:
        raw.close()
    assert any(isinstance(e, h2events.PingReceived) for e in events)


def test_too_many_pings_get_goaway_enhance_your_calm(serve):
    server = serve()
    raw = echo.RawH2(server.address)
    try:
        raw.events(timeout=0.2)
        for i in range(6):  # no calls: grpc-core allows one PING in two hours, 2 strikes
            try:
                raw.conn.ping(b"%08d" % i)
                raw.flush()
            except OSError:
                break
            time.sleep(0.02)
        events = raw.events(lambda e: isinstance(e, h2events.ConnectionTerminated), timeout=5)
    finally:
        raw.close()
    ended = [e for e in events if isinstance(e, h2events.ConnectionTerminated)]
    assert ended and ended[0].error_code == ENHANCE_YOUR_CALM
    assert ended[0].additional_data == b"too_many_pings"


def test_pings_within_the_policy_are_answered(serve):
    server = serve(min_ping_interval=0.05)
    raw = echo.RawH2(server.address)
    try:
        for i in range(5):  # a call open: pings 0.2 s apart are fine
            stream_id = raw.request(f"/{echo.SERVICE}/Slow", b"0.3")
            raw.conn.ping(b"%08d" % i)
            raw.flush()
            raw.events(lambda e: isinstance(e, h2events.StreamEnded), timeout=5)
        assert not raw.closed
        assert raw.call(body=b"still here")["data"] == echo.message(b"still here")
    finally:
        raw.close()
    assert stream_id == 9


def test_slow_reader_gets_the_whole_reply(serve):
    """A client with a 1 KiB window that acknowledges slowly still gets every octet."""
    server = serve()
    raw = echo.RawH2(server.address, settings={4: 1024})  # INITIAL_WINDOW_SIZE
    size = 256 << 10
    try:
        stream_id = raw.request(f"/{echo.SERVICE}/Big", str(size).encode())
        data = b""
        ended = False
        while not ended:
            events = raw.events(lambda e: True, timeout=10, ack=False)
            assert events, "the server stopped sending"
            for e in events:
                if isinstance(e, h2events.DataReceived) and e.stream_id == stream_id:
                    data += e.data
                    time.sleep(0.001)
                    raw.conn.acknowledge_received_data(e.flow_controlled_length, stream_id)
                ended |= isinstance(e, h2events.StreamEnded) and e.stream_id == stream_id
            raw.flush()
    finally:
        raw.close()
    assert data == echo.message(bytes(size))


def test_max_concurrent_streams(serve):
    server = serve(max_concurrent_streams=2)
    raw = echo.RawH2(server.address)
    try:
        events = raw.events(lambda e: isinstance(e, h2events.RemoteSettingsChanged), timeout=5)
        changed = next(e for e in events if isinstance(e, h2events.RemoteSettingsChanged))
        assert changed.changed_settings[3].new_value == 2  # MAX_CONCURRENT_STREAMS
        raw.events(timeout=0.3)  # our ACK of it has gone
        # open a third stream anyway (h2 would refuse to)
        raw.conn.remote_settings.max_concurrent_streams = 100
        raw.conn.remote_settings.acknowledge()
        ids = [raw.request(f"/{echo.SERVICE}/Slow", b"0.5") for _ in range(3)]
        events = raw.events(lambda e: isinstance(e, (h2events.StreamReset,
                                                     h2events.ConnectionTerminated)), timeout=5)
    finally:
        raw.close()
    if server.impl == "grpcio":
        # grpc-core refuses the stream over the limit (RST_STREAM REFUSED_STREAM)
        resets = [e for e in events if isinstance(e, h2events.StreamReset)]
        assert [(e.stream_id, e.error_code) for e in resets] == [(ids[2], REFUSED_STREAM)]
    else:
        # nghttp2 treats a stream over the acknowledged limit as a connection error
        # (RFC 9113 5.1.2 allows either); before the ACK it refuses the stream
        ended = [e for e in events if isinstance(e, h2events.ConnectionTerminated)]
        assert ended and ended[0].error_code == 1  # PROTOCOL_ERROR


def test_wrong_content_type_and_method(serve):
    server = serve()
    raw = echo.RawH2(server.address)
    try:
        text = raw.call(body=b"hi", content_type=b"text/plain")
        get = raw.call(body=None, method=b"GET")
    finally:
        raw.close()
    if server.impl == "native":
        # as grpc-core documents: 415 for a content type other than application/grpc*,
        # 405 for a method other than POST, each with a grpc-status that says why
        assert text["headers"][b":status"] == b"415"
        assert b"text/plain" in text["headers"][b"grpc-message"]
        assert get["headers"][b":status"] == b"405"
        assert b"GET" in get["headers"][b"grpc-message"]
    else:
        # grpcio's server (grpc-core's current transport) serves the call whatever the
        # content type says, and resets a GET with INTERNAL_ERROR
        assert text["trailers"][b"grpc-status"] == b"0"
        assert get["reset"] == 2


def test_header_list_over_the_limit(serve):
    server = serve()
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _stub(channel, "Echo")(b"x", metadata=[("x-big", "a" * 30000)], timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the connection goes on
        assert _stub(channel, "Echo")(b"ok", timeout=10) == b"ok"


@pytest.mark.parametrize("client", ["native", "grpcio"])
def test_32_large_calls_at_once_on_one_connection(serve, client):
    """32 calls of 1 MiB each way in flight on one HTTP/2 connection, in a closed loop:
    both ends are writing at once (requests one way, replies the other), so neither may
    stop reading while its own writes wait, or each waits for the other for ever; and
    every reply arrives whole whatever the client's flow-control windows (grpcio's
    change with its bandwidth estimate)."""
    import asyncio

    server = serve()
    path = f"/{echo.SERVICE}/Echo"
    payload = bytes(range(256)) * 4096  # 1 MiB
    workers, calls_each = 32, 6

    async def run(call) -> list:
        await call(b"warm-up")  # the server's SETTINGS (its 16 MiB windows) have arrived

        async def worker():
            return [await call(payload) == payload for _ in range(calls_each)]

        results = await asyncio.wait_for(
            asyncio.gather(*(worker() for _ in range(workers))), 60)
        return [ok for result in results for ok in result]

    async def native() -> list:
        from mip.net.grpc_client import GrpcChannel

        async with GrpcChannel(server.address) as channel:
            return await run(lambda message: channel.unary(path, message))

    async def grpcio() -> list:
        options = [("grpc.max_receive_message_length", echo.MAX_MESSAGE),
                   ("grpc.max_send_message_length", echo.MAX_MESSAGE)]
        async with grpc.aio.insecure_channel(server.address, options=options) as channel:
            stub = channel.unary_unary(path)
            return await run(lambda message: stub(message, timeout=60))

    results = asyncio.run(native() if client == "native" else grpcio())
    assert results == [True] * (workers * calls_each)
