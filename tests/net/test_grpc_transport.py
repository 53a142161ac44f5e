"""mip's own gRPC transport (mip.net.grpc_server / grpc_client on mip.protocol._h2), over
real sockets on 127.0.0.1, against grpcio's client and server as the reference."""

from __future__ import annotations

import asyncio

import pytest

_h2 = pytest.importorskip("mip.protocol._h2", reason="mip.protocol._h2 not built (no libnghttp2)")

import grpc  # noqa: E402

from mip.errors import GrpcStatus, RpcError  # noqa: E402
from mip.net.grpc_client import GrpcChannel  # noqa: E402
from mip.net.grpc_server import GrpcServer, stream_stream, unary, unary_future  # noqa: E402

LIMIT = 1 << 20


@pytest.fixture
async def served():
    """An echo service: unary, future-returning, failing, slow and streaming methods."""
    events = {"cancelled": asyncio.Event()}

    async def echo(request, context):
        return request

    def echo_future(request, context):
        future = asyncio.get_running_loop().create_future()
        future.set_result(request[::-1])
        return future

    async def fail(request, context):
        await context.abort(GrpcStatus.INVALID_ARGUMENT, "bad input: \u00e9t\u00e9 100%")

    async def slow(request, context):
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            events["cancelled"].set()
            raise
        return b""

    async def metadata(request, context):
        return repr(sorted(context.invocation_metadata())).encode()

    async def peer(request, context):
        return context.peer().encode()

    async def floats(request, context):
        import numpy as np

        return np.arange(8, dtype=np.float32)  # a buffer of 4-octet items

    async def chat(requests, context):
        async for request in requests:
            yield request.upper()
            yield request.lower()

    server = GrpcServer({
        "/test.Echo/Echo": unary(echo),
        "/test.Echo/Reverse": unary_future(echo_future),
        "/test.Echo/Fail": unary(fail),
        "/test.Echo/Slow": unary(slow),
        "/test.Echo/Metadata": unary(metadata),
        "/test.Echo/Peer": unary(peer),
        "/test.Echo/Floats": unary(floats),
        "/test.Echo/Chat": stream_stream(chat),
    }, max_message_size=LIMIT)
    host, port = await server.start("127.0.0.1", 0)
    yield f"{host}:{port}", events
    await server.stop(0.5)


async def test_unary_round_trips_with_our_client(served):
    address, _ = served
    async with GrpcChannel(address) as channel:
        assert await channel.unary("/test.Echo/Echo", b"hello") == b"hello"
        assert await channel.unary("/test.Echo/Reverse", b"abc") == b"cba"
        assert await channel.unary("/test.Echo/Echo", b"") == b""
        # many calls multiplexed on the one connection
        replies = await asyncio.gather(*(channel.unary("/test.Echo/Echo", b"%d" % i)
                                         for i in range(200)))
        assert replies == [b"%d" % i for i in range(200)]


async def test_large_messages_both_ways(served):
    address, _ = served
    payload = bytes(range(256)) * (LIMIT // 256)  # exactly the limit
    async with GrpcChannel(address) as channel:
        assert await channel.unary("/test.Echo/Echo", payload) == payload


async def test_grpcio_client_talks_to_our_server(served):
    address, _ = served
    async with grpc.aio.insecure_channel(address) as channel:
        assert await channel.unary_unary("/test.Echo/Echo")(b"x" * 100_000) == b"x" * 100_000
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await channel.unary_unary("/test.Echo/Fail")(b"")
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert excinfo.value.details() == "bad input: \u00e9t\u00e9 100%"
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await channel.unary_unary("/test.Echo/Nope")(b"")
        assert excinfo.value.code() == grpc.StatusCode.UNIMPLEMENTED
        call = channel.stream_stream("/test.Echo/Chat")()
        for word in (b"One", b"Two"):
            await call.write(word)
        await call.done_writing()
        assert [m async for m in call] == [b"ONE", b"one", b"TWO", b"two"]
        assert await call.code() == grpc.StatusCode.OK
        reply = await channel.unary_unary("/test.Echo/Metadata")(
            b"", metadata=(("x-tenant", "blue"), ("x-trace", "7")))
        assert b"('x-tenant', 'blue')" in reply and b"('x-trace', '7')" in reply


async def test_statuses_reach_our_client(served):
    address, _ = served
    async with GrpcChannel(address) as channel:
        with pytest.raises(RpcError) as excinfo:
            await channel.unary("/test.Echo/Fail", b"")
        assert excinfo.value.code == GrpcStatus.INVALID_ARGUMENT
        assert excinfo.value.details == "bad input: \u00e9t\u00e9 100%"
        with pytest.raises(RpcError) as excinfo:
            await channel.unary("/test.Echo/Missing", b"")
        assert excinfo.value.code == GrpcStatus.UNIMPLEMENTED


async def test_message_over_the_limit_is_refused_before_it_is_buffered(served):
    address, _ = served
    async with grpc.aio.insecure_channel(address, options=[
            ("grpc.max_send_message_length", -1)]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await channel.unary_unary("/test.Echo/Echo")(b"y" * (LIMIT + 1))
        assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(LIMIT) in excinfo.value.details()
        # the connection goes on serving
        assert await channel.unary_unary("/test.Echo/Echo")(b"ok") == b"ok"


async def test_a_message_announcing_4_gib_allocates_nothing():
    """The 5-octet gRPC prefix is checked against the limit before memory is taken."""
    conn = _h2.GrpcConnection(max_message_size=LIMIT)
    client = _h2.GrpcConnection(client=True)
    call = client.start_call(b"/test.Echo/Echo", b"x", None, end=False)
    for data in client.data_to_send():
        conn.receive(data)
    # a DATA frame by hand: length 5, type 0, no flags, the call's stream
    frame = (5).to_bytes(3, "big") + b"\x00\x00" + call.stream_id.to_bytes(4, "big")
    events = conn.receive(frame + b"\x00\xff\xff\xff\xff")
    too_large = [e for e in events if isinstance(e, _h2.MessageTooLarge)]
    assert [(e.length, e.over_buffered) for e in too_large] == [(0xFFFFFFFF, False)]
    assert conn.buffered == 0


async def test_deadline_ends_the_call_and_cancels_the_handler(served):
    address, events = served
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await channel.unary_unary("/test.Echo/Slow")(b"", timeout=0.2)
        assert excinfo.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(events["cancelled"].wait(), 5)


async def test_cancelled_call_cancels_the_handler(served):
    address, events = served
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary("/test.Echo/Slow")(b"")
        await asyncio.sleep(0.2)
        call.cancel()
        await asyncio.wait_for(events["cancelled"].wait(), 5)
        assert await channel.unary_unary("/test.Echo/Echo")(b"after") == b"after"


async def test_garbage_closes_the_connection_and_the_server_goes_on(served):
    address, _ = served
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)  # returns at EOF: the server closed
    assert data[3] == 0x04  # what it sent first was its HTTP/2 SETTINGS frame
    writer.close()
    async with GrpcChannel(address) as channel:
        assert await channel.unary("/test.Echo/Echo", b"still") == b"still"


async def test_connection_lost_mid_call_cancels_the_handler(served):
    address, events = served
    channel = GrpcChannel(address)
    await channel.connect()
    pending = channel.unary("/test.Echo/Slow", b"")
    await asyncio.sleep(0.2)
    await channel.close()
    await asyncio.wait_for(events["cancelled"].wait(), 5)
    with pytest.raises((ConnectionError, RpcError)):
        await asyncio.wait_for(pending, 5)


@pytest.mark.parametrize("impl", ["native", "grpcio"])
async def test_channel_over_tls(tmp_path, impl):
    """GrpcChannel over TLS (ALPN h2 from mip.net.tls, :scheme https) against both servers;
    grpcio's refuses a TLS connection that did not negotiate h2."""
    trustme = pytest.importorskip("trustme")
    from mip.net import tls

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    ca_path, cert_path, key_path = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    issued.cert_chain_pems[0].write_to_path(str(cert_path))
    issued.private_key_pem.write_to_path(str(key_path))

    async def echo(request, context):
        return request

    if impl == "native":
        server = GrpcServer({"/test.Echo/Echo": unary(echo)},
                            ssl=tls.server_context(str(cert_path), str(key_path), alpn=["h2"]))
        _, port = await server.start("127.0.0.1", 0)
    else:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(key_path.read_bytes(), cert_path.read_bytes())]))
        await server.start()
    try:
        context = tls.client_context(ca=str(ca_path), alpn=["h2"])
        async with GrpcChannel(f"127.0.0.1:{port}", ssl=context) as channel:
            assert await channel.unary("/test.Echo/Echo", b"over tls") == b"over tls"
    finally:
        await server.stop(0)


def test_buffered_request_octets_per_connection():
    """A message that would take the connection's unfinished request octets over
    max_buffered is refused with a status that names that limit; the connection goes on."""
    pytest.importorskip("h2")
    import _grpc_echo as echo

    from mip.net.grpc_limits import GrpcLimits

    server = echo.Threaded("native", GrpcLimits(max_buffered=1000))
    raw = echo.RawH2(server.address)
    try:
        first = raw.request(body=None, end=False)
        raw.conn.send_data(first, echo.message(b"a" * 800)[:100])  # 800 announced, 95 sent
        refused = raw.call(body=b"b" * 400)
        raw.conn.send_data(first, echo.message(b"a" * 800)[100:], end_stream=True)
        raw.flush()
        events = raw.events(lambda e: getattr(e, "stream_id", 0) == first
                            and type(e).__name__ == "StreamEnded")
    finally:
        raw.close()
        server.close()
    status = refused["headers"].get(b"grpc-status") or refused["trailers"].get(b"grpc-status")
    assert status == b"8"  # RESOURCE_EXHAUSTED
    assert b"max_buffered" in (refused["headers"].get(b"grpc-message") or b"")
    data = b"".join(e.data for e in events if type(e).__name__ == "DataReceived")
    assert data == echo.message(b"a" * 800)


async def test_our_channel_through_a_graceful_shutdown():
    """The call in flight completes; a call after the GOAWAY is UNAVAILABLE."""
    async def slow(request, context):
        await asyncio.sleep(0.5)
        return b"done"

    server = GrpcServer({"/test.Echo/Slow": unary(slow)})
    _, port = await server.start("127.0.0.1", 0)
    async with GrpcChannel(f"127.0.0.1:{port}") as channel:
        pending = channel.unary("/test.Echo/Slow", b"")
        await asyncio.sleep(0.1)
        stopping = asyncio.ensure_future(server.stop(5))
        assert await pending == b"done"
        await stopping
        with pytest.raises((RpcError, ConnectionError)) as info:
            await channel.unary("/test.Echo/Slow", b"")
        if isinstance(info.value, RpcError):
            assert info.value.code == GrpcStatus.UNAVAILABLE


async def test_context_names_the_peer_as_grpcio_does(served):
    from mip.net.peers import grpc_peer_host

    address, _ = served
    async with GrpcChannel(address) as channel:
        peer = (await channel.unary("/test.Echo/Peer", b"")).decode()
    assert peer.startswith("ipv4:127.0.0.1:") and grpc_peer_host(peer) == "127.0.0.1"
    assert grpc_peer_host("ipv6:[::1]:5000") == grpc_peer_host("ipv6:%5B::1%5D:5000") == "::1"
    assert grpc_peer_host("unix:/tmp/s") is None and grpc_peer_host("") is None


async def test_a_reply_of_multi_octet_items_is_sent_whole(served):
    import numpy as np

    address, _ = served
    async with GrpcChannel(address) as channel:
        reply = await channel.unary("/test.Echo/Floats", b"")
    assert np.frombuffer(reply, np.float32).tolist() == list(range(8))


def test_header_fields_that_are_not_bytes_are_refused_before_any_memory_is_taken():
    from mip.protocol import _h2

    client = _h2.GrpcConnection(client=True, max_message_size=1024)
    for bad in ([("k", 5)], [("k", None)], [(None, "v")]):
        with pytest.raises((TypeError, AttributeError)):
            client.start_call(b"/test.Echo/Echo", b"localhost", b"x", metadata=bad)
    call = client.start_call(b"/test.Echo/Echo", b"localhost", b"x", metadata=[("k", "v")])
    assert call.stream_id == 1  # the connection is still usable


def _exchange(client, server) -> list:
    """Move octets between two in-memory connections until neither has any to send;
    returns the client's events."""
    events = []
    moved = True
    while moved:
        moved = False
        for source, sink in ((client, server), (server, client)):
            for data in source.data_to_send():
                moved = True
                got = sink.receive(data)
                if sink is client:
                    events += got
    return events


@pytest.mark.parametrize("joined", [False, True], ids=["parts", "one bytes"])
@pytest.mark.parametrize("window", [3, 5, 105, 305, 16384])
def test_a_reply_is_whole_when_the_window_ends_at_one_of_its_pieces(window, joined):
    """The stream ends only after every queued octet, also when the peer's window ends
    exactly where one queued piece does (after the 5-octet prefix, after the first part),
    or inside the piece a short reply makes with its prefix."""
    server = _h2.GrpcConnection()
    client = _h2.GrpcConnection(client=True, window_size=window)
    _exchange(client, server)
    call = client.start_call(b"/test.Echo/Echo", b"localhost", b"request")
    server_events = []
    for data in client.data_to_send():
        server_events += server.receive(data)
    served = next(e.call for e in server_events if isinstance(e, _h2.RequestReceived))
    server.unary(served, b"a" * 100 + b"b" * 200 if joined else [b"a" * 100, b"b" * 200])
    events = _exchange(client, server)
    assert [e.data for e in events if isinstance(e, _h2.MessageReceived)] == [
        b"a" * 100 + b"b" * 200]
    assert call.grpc_status == 0


async def test_our_channel_refuses_a_reply_cut_inside_its_message():
    """A server that ends the stream with status OK after part of its message: INTERNAL,
    not a short reply."""
    import h2.config
    import h2.connection
    import h2.events

    async def handle(reader, writer):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.StreamEnded):
                    sid = event.stream_id
                    conn.send_headers(sid, [(":status", "200"),
                                            ("content-type", "application/grpc")])
                    conn.send_data(sid, b"\x00\x00\x00\x00\x0a" + b"abc")  # 3 of 10 octets
                    conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
            writer.write(conn.data_to_send())

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with GrpcChannel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(RpcError) as excinfo:
                await asyncio.wait_for(channel.unary("/test.Echo/Echo", b"x"), 10)
        assert excinfo.value.code == GrpcStatus.INTERNAL
        assert "inside a message" in excinfo.value.details
    finally:
        server.close()
        await server.wait_closed()


def _server_events(client, server, feed_bytewise: bool = False) -> list:
    events = []
    for data in client.data_to_send():
        pieces = [data[i:i + 1] for i in range(len(data))] if feed_bytewise else [data]
        for piece in pieces:
            events += server.receive(piece)
    return [type(e).__name__ for e in events], events


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "byte by byte"])
def test_a_plain_unary_call_comes_as_one_event(bytewise):
    """On a unary path, a POST with one uncompressed message and no deadline is one
    UnaryReceived once the request has ended; every other call gets the usual events."""
    server = _h2.GrpcConnection(unary_paths={"/test.Echo/Echo"})
    client = _h2.GrpcConnection(client=True)
    _exchange(client, server)

    def events(path=b"/test.Echo/Echo", **options):
        client.start_call(path, b"localhost", **options)
        return _server_events(client, server, bytewise)

    names, got = events(message=b"request")
    assert names == ["UnaryReceived"]
    assert got[0].data == b"request" and got[0].call.path == "/test.Echo/Echo"
    assert events(b"/test.Echo/Chat", message=b"x")[0] == [
        "RequestReceived", "MessageReceived", "StreamEnded"]
    assert events(message=b"x", timeout=5)[0] == [
        "RequestReceived", "MessageReceived", "StreamEnded"]
    assert events(message=None)[0] == ["RequestReceived", "StreamEnded"]
    call = client.start_call(b"/test.Echo/Echo", b"localhost", b"one", end=False)
    client.send_message(call, b"two")
    client.end_call(call)
    names, got = _server_events(client, server, bytewise)
    assert names == ["RequestReceived", "MessageReceived", "MessageReceived", "StreamEnded"]
    assert [e.data for e in got if isinstance(e, _h2.MessageReceived)] == [b"one", b"two"]
    # a reset before the request ends: the call was never seen, and is closed
    call = client.start_call(b"/test.Echo/Echo", b"localhost", b"x", end=False)
    assert _server_events(client, server, bytewise)[0] == []
    client.reset(call)
    assert _server_events(client, server, bytewise)[0] == ["StreamClosed"]


def test_a_plain_unary_call_over_the_limits_is_refused_as_any_other():
    seen = []
    for paths in ({"/test.Echo/Echo"}, ()):
        server = _h2.GrpcConnection(unary_paths=paths, max_message_size=10)
        client = _h2.GrpcConnection(client=True)
        _exchange(client, server)
        client.start_call(b"/test.Echo/Echo", b"localhost", b"x" * 11)
        seen.append(_server_events(client, server)[0])
    assert seen[0] == seen[1] == ["RequestReceived", "MessageTooLarge", "StreamEnded"]


def test_a_large_message_is_received_into_the_memory_given_and_let_go_with_the_connection():
    """``message_memory`` (the shared arena of ``--placement shared``) takes each large
    uncompressed message, counted against the limits as any other; a partial one is let go
    when the transport is gone, not when the connection object is."""
    import weakref

    import numpy as np

    given: list = []

    def memory(size):
        if size == 5000:
            return None  # none free: a bytes object, as without message_memory
        given.append(weakref.ref(owner := np.empty(size, np.uint8)))
        return owner

    server = _h2.GrpcConnection(unary_paths={"/test.Echo/Echo"}, message_memory=memory,
                                message_memory_min=1024)
    client = _h2.GrpcConnection(client=True)
    _exchange(client, server)
    large = bytes(range(256)) * 64
    client.start_call(b"/test.Echo/Echo", b"localhost", message=large)
    names, got = _server_events(client, server)
    assert names == ["UnaryReceived"]
    data = got[0].data
    assert type(data) is memoryview and data.obj is given[0]() and data == large
    client.start_call(b"/test.Echo/Echo", b"localhost", message=b"small")
    names, got = _server_events(client, server)
    assert got[0].data == b"small" and type(got[0].data) is bytes and len(given) == 1
    client.start_call(b"/test.Echo/Echo", b"localhost", message=large[:5000])
    names, got = _server_events(client, server)
    assert got[0].data == large[:5000] and type(got[0].data) is bytes and len(given) == 1
    del data, got
    assert given[0]() is None  # the message's memory went with its last view
    # part of a message: held by the connection (and counted), until let go
    client.start_call(b"/test.Echo/Echo", b"localhost", message=large)
    sent = b"".join(bytes(piece) for piece in client.data_to_send())
    assert server.receive(sent[:-100]) == []
    assert server.buffered == len(large) and given[1]() is not None
    server.let_go()
    assert server.buffered == 0 and given[1]() is None
