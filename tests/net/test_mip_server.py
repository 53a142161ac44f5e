"""The MIP server and clients over real sockets on 127.0.0.1 (and a Unix socket)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import random
import socket
import struct
import weakref

import numpy as np
import pytest

import mip
from mip.errors import ErrorCode, RemoteError
from mip.net.mip_client import AsyncClient, Client
from mip.net.mip_server import MipServer


async def _double(message: mip.Message):
    """A handler that doubles every tensor; model 'missing' is not found; 'slow' sleeps."""
    if message.model == "missing":
        raise mip.ModelNotFound("no model 'missing'")
    if message.model == "slow":
        await asyncio.sleep(float(message.version or 0.2))
    if message.model == "jitter":
        await asyncio.sleep(random.random() * 0.01)
    items = [tuple(v * 2 if isinstance(v, np.ndarray) else v for v in item) for item in message.batch]
    return mip.encode_response_buffers(items, n_input=message.n_input, kind=message.kind)


async def _start(handler=_double, url="tcp://127.0.0.1:0", **kwargs) -> tuple[MipServer, str]:
    server = MipServer(handler, **kwargs)
    address = await server.start(url)
    return server, str(address)


@contextlib.asynccontextmanager
async def _serving(handler=_double, url="tcp://127.0.0.1:0", **kwargs):
    """:func:`_start` for the ``async with`` block: ``(server, url)``, stopped after it."""
    server, url = await _start(handler, url, **kwargs)
    try:
        yield server, url
    finally:
        await server.stop()


def _hanging():
    """A handler that never answers, and the events it sets: ``started`` when a request
    reaches it, ``cancelled`` when that request is cancelled."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(message):
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return [mip.encode_error(0)]

    return handler, started, cancelled


def _error_code(reply: bytes) -> int:
    """The code of the one ERROR frame `reply` holds, which must also say why."""
    message = mip.decode(reply)
    assert message.kind == mip.KIND_ERROR and message.error_message, message
    return message.error_code


def _raw_exchange(url: str, payload: bytes, timeout: float = 5.0, half_close: bool = False) -> bytes:
    """Send raw octets (then, with ``half_close``, shut the sending side as `nc -N` does),
    read until the server closes (each read bounded by `timeout`)."""
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


async def test_ping_and_infer_over_tcp_with_both_clients():
    async with _serving() as (server, url):
        async with AsyncClient(url) as client:
            assert await client.ping() > 0
            out = await client.infer([[np.arange(16, dtype=np.float32).reshape(1, 16)]])
            np.testing.assert_array_equal(out[0][0], 2 * np.arange(16, dtype=np.float32).reshape(1, 16))

        def blocking():
            with Client(url) as c:
                c.ping()
                reply = c.infer_message([[np.ones((2, 3), np.int64)], [np.zeros((1, 3), np.int64)]],
                                        model="m", version="7")
                assert reply.kind == mip.KIND_ROUTED and reply.n_output == 1
                assert [item[0].tolist() for item in reply.batch] == [[[2] * 3] * 2, [[0] * 3]]
                return c.infer([["text stays text"]])
        assert (await asyncio.to_thread(blocking)) == [(mip.Text("text stays text"),)]


async def test_unix_socket(tmp_path):
    path = tmp_path / "mip.sock"
    async with _serving(url=f"unix://{path}") as (server, url):
        assert url == f"unix://{path}"
        async with AsyncClient(url) as client:
            out = await client.infer([[np.full((1, 4), 3, np.float64)]])
            assert out[0][0].tolist() == [[6.0] * 4]
    assert not path.exists()


class _Starts:
    """A handler of the callback form, ``start`` taking `arity` arguments: a request for
    model 'bad' is refused at once, 'late' fails later, any other is answered (doubled)
    after a pass of the loop; with ``done``, the handler calls it itself."""

    def __init__(self, arity: int):
        self.sources: list = []
        self.start = {1: lambda m: self._start(m), 2: lambda m, source: self._start(m, source),
                      3: self._start}[arity]

    def _start(self, message, source=None, done=None):
        if message.model == "bad":
            raise mip.ModelNotFound("no model 'bad'")
        self.sources.append(source)
        loop = asyncio.get_running_loop()
        reply = loop.create_future()

        def settle():
            if message.model == "late":
                reply.set_exception(mip.ModelNotReady("'late' failed"))
            else:
                items = [(item[0] * 2,) for item in message.batch]
                reply.set_result(mip.encode_response_buffers(items, n_input=1,
                                                             kind=message.kind))
            if done is not None:
                done(reply)
        loop.call_soon(settle)
        return reply


@pytest.mark.parametrize("arity", [1, 2, 3])
async def test_handler_start_forms(arity):
    handler = _Starts(arity)
    async with _serving(handler) as (server, url):
        async with AsyncClient(url, connections=1) as client:
            async def one(i):
                model = ("bad", "late", "m")[i % 3]
                try:
                    return (await client.infer([[np.full((1, 2), i, np.int32)]], model=model))[0][0]
                except RemoteError as exc:
                    return exc.error_code
            results = await asyncio.gather(*(one(i) for i in range(30)))
    for i, result in enumerate(results):
        if i % 3 == 2:
            assert result.tolist() == [[2 * i] * 2]
        else:
            assert result == (ErrorCode.METHOD if i % 3 == 0 else ErrorCode.INTERNAL)
    assert handler.sources == [None if arity == 1 else "127.0.0.1"] * 20


@pytest.mark.parametrize("max_pipeline", [128, 4])
async def test_pipelined_replies_come_back_in_request_order(max_pipeline):
    async with _serving(max_pipeline=max_pipeline) as (server, url):
        async with AsyncClient(url, connections=1) as client:
            results = await asyncio.gather(*(
                client.infer([[np.full((1, 2), i, np.int32)]], model="jitter") for i in range(200)))
        assert [r[0][0][0, 0] for r in results] == [2 * i for i in range(200)]
        # all in one write: what is over max_pipeline waits in the backlog, in order
        frames = b"".join(b"".join(bytes(part) for part in mip.encode_request_buffers(
            [[np.full((1, 2), i, np.int32)]], model="jitter")) for i in range(100))
        host, port = url.removeprefix("tcp://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(frames + mip.encode_ping())
        parser, replies = mip.FrameParser(), []
        while len(replies) < 101:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data
            replies += parser.feed(data)
        writer.close()
        assert [m.batch[0][0][0, 0] for m in replies[:100]] == [2 * i for i in range(100)]
        assert replies[100].kind == mip.KIND_PING and not replies[100].is_request


async def test_large_tensor_round_trip_is_intact_and_aligned():
    async with _serving() as (server, url):
        big = np.random.default_rng(1).standard_normal((256, 1024)).astype(np.float32)  # 1 MiB
        async with AsyncClient(url) as client:
            out = (await client.infer([[big]]))[0][0]
        np.testing.assert_array_equal(out, big * 2)
        assert out.ctypes.data % 8 == 0


async def test_serving_error_becomes_an_error_frame_and_connection_stays_usable():
    async with _serving() as (server, url):
        async with AsyncClient(url) as client:
            with pytest.raises(RemoteError) as info:
                await client.infer([[np.ones(1)]], model="missing")
            assert info.value.error_code == ErrorCode.METHOD
            assert await client.ping() > 0  # same connection, still in step


@pytest.mark.parametrize("frame, code", [
    (bytes([1, 1, 0, 0, 0, 0, 0, 0]), ErrorCode.PROTOCOL),        # version 1
    (bytes([0, 9, 0, 0, 0, 0, 0, 0]), ErrorCode.METHOD),          # unknown kind
    (bytes([0, 1, 1, 0, 0, 0, 0, 0]), ErrorCode.SUBTYPE),         # a PING response sent to a server
    (bytes([0, 2, 7, 0, 0, 0, 0, 0]), ErrorCode.SUBTYPE),         # subtype 7
    (bytes([0, 2, 0, 0, 0, 0, 0, 4, 1, 0, 0, 1]), ErrorCode.SHAPE),  # 1 item of 1 value, no TLV
    (bytes([0, 2, 0, 0]) + struct.pack("!I", 12) + bytes([1, 0, 0, 1])
     + struct.pack("!II", 0, 0), ErrorCode.SHAPE),                # reserved TLV type 0
])
async def test_protocol_errors_get_the_specified_error_frame_then_close(frame, code):
    async with _serving() as (server, url):
        reply = await asyncio.to_thread(_raw_exchange, url, frame)
        assert _error_code(reply) == code


async def test_oversized_frame_is_refused_from_its_header_alone():
    async with _serving(max_frame_size=1024) as (server, url):
        # Only the header is sent: it claims 4 GiB - 1, nothing is allocated for it.
        reply = await asyncio.to_thread(_raw_exchange, url, bytes([0, 2, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]))
        assert _error_code(reply) == ErrorCode.MEMORY
        assert "1024" in mip.decode(reply).error_message


async def test_max_connections_refuses_when_none_is_idle_and_closes_an_idle_one():
    async with _serving(max_connections=1) as (server, url):
        async with AsyncClient(url) as first:
            await first.ping()
            busy = asyncio.ensure_future(first.infer([[np.ones((1, 2), np.float32)]],
                                                     model="slow", version="1"))
            while not server._connections or next(iter(server._connections)).idle:
                await asyncio.sleep(0.01)
            reply = await asyncio.to_thread(_raw_exchange, url, mip.encode_ping())
            assert _error_code(reply) == ErrorCode.MEMORY
            (item,) = await busy
            np.testing.assert_array_equal(item[0], np.full((1, 2), 2, np.float32))
            # now the first connection is idle: it makes room for a new client
            async with AsyncClient(url) as second:
                assert await second.ping() > 0
                assert server.connections == 1


@pytest.mark.parametrize("over", ["tcp", "unix"])
async def test_a_closed_connection_is_freed_without_the_collector(monkeypatch, tmp_path, over):
    # the connection's done-callback refers to it: dropped when it closes, so that its
    # memory (the parser's receive buffer) goes with it, not at the next full collection
    # (a unix socket's peer has no address: its share of the queue is not the connection)
    from mip.net import mip_server

    made = []
    init = mip_server._Connection.__init__

    def record(self, server):
        init(self, server)
        made.append(weakref.ref(self))
    monkeypatch.setattr(mip_server._Connection, "__init__", record)
    listen = f"unix://{tmp_path / 'mip.sock'}" if over == "unix" else "tcp://127.0.0.1:0"
    async with _serving(_Starts(3), url=listen) as (server, url):
        gc.disable()
        try:
            async with AsyncClient(url) as client:
                await client.infer([[np.ones((1, 2), np.int32)]], model="m")
            for _ in range(200):
                if server.connections == 0:
                    break
                await asyncio.sleep(0.01)
            assert server.connections == 0 and made
            await asyncio.sleep(0)
            assert [ref() for ref in made] == [None] * len(made)
        finally:
            gc.enable()


async def test_idle_and_read_timeouts_close_connections():
    server, url = await _start(idle_timeout=0.2, frame_timeout=0.2)
    server.linger = 0.05
    try:
        host, port = url.removeprefix("tcp://").rsplit(":", 1)
        loop = asyncio.get_running_loop()
        # idle: connect and say nothing
        reader, writer = await asyncio.open_connection(host, int(port))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # read: half a header, then silence
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"\x00\x02\x00")
        start = loop.time()
        assert _error_code(await asyncio.wait_for(reader.read(), 5)) == ErrorCode.PROTOCOL
        assert loop.time() - start < 3
        writer.close()
        for _ in range(100):
            if server.connections == 0:
                break
            await asyncio.sleep(0.02)
        assert server.connections == 0
    finally:
        await server.stop()


async def test_graceful_stop_finishes_requests_in_flight():
    server, url = await _start()
    client = AsyncClient(url)
    try:
        pending = asyncio.ensure_future(client.infer([[np.ones((1, 2))]], model="slow", version="0.3"))
        await asyncio.sleep(0.1)
        await server.stop(grace=5)
        out = await asyncio.wait_for(pending, 5)
        assert out[0][0].tolist() == [[2.0, 2.0]]
    finally:
        await client.close()


async def test_client_gone_cancels_its_work():
    handler, started, cancelled = _hanging()
    async with _serving(handler) as (server, url):
        client = AsyncClient(url, timeout=None)
        task = asyncio.ensure_future(client.infer([[np.ones(1)]]))
        await asyncio.wait_for(started.wait(), 5)
        await client.close()
        await asyncio.wait_for(cancelled.wait(), 5)
        task.cancel()


#: send, shut the sending side, read until the server closes
_half_closed_exchange = functools.partial(_raw_exchange, timeout=10.0, half_close=True)


def _request(i: int, model: str | None = "jitter") -> bytes:
    return b"".join(bytes(part) for part in mip.encode_request_buffers(
        [[np.full((1, 2), i, np.int32)]], model=model))


@pytest.mark.parametrize("max_pipeline", [128, 2])
async def test_a_half_closed_client_gets_every_reply_then_the_close(max_pipeline):
    async with _serving(max_pipeline=max_pipeline) as (server, url):
        # one request, then the sending side shut: answered, then closed
        reply = await asyncio.to_thread(_half_closed_exchange, url, _request(3, model=None))
        (message,) = mip.FrameParser().feed(reply)
        assert message.batch[0][0].tolist() == [[6, 6]]
        # pipelined ones (more than max_pipeline: some wait in the backlog) and a PING
        payload = b"".join(_request(i) for i in range(20)) + mip.encode_ping()
        replies = mip.FrameParser().feed(await asyncio.to_thread(_half_closed_exchange, url,
                                                                 payload))
        assert [m.batch[0][0][0, 0] for m in replies[:20]] == [2 * i for i in range(20)]
        assert replies[20].kind == mip.KIND_PING and len(replies) == 21
        # nothing sent, or only part of a frame: closed at once (the part cannot complete)
        assert await asyncio.to_thread(_half_closed_exchange, url, b"") == b""
        partial = _request(1)[:-3]
        assert await asyncio.to_thread(_half_closed_exchange, url, partial) == b""
        replies = mip.FrameParser().feed(await asyncio.to_thread(
            _half_closed_exchange, url, _request(5) + partial))
        assert [m.batch[0][0][0, 0] for m in replies] == [10]
        for _ in range(100):
            if server.connections == 0:
                break
            await asyncio.sleep(0.02)
        assert server.connections == 0


async def test_a_half_closed_client_that_never_reads_is_dropped():
    """Its replies fill the socket buffers; without progress for idle_timeout the
    connection is dropped, so such a peer cannot hold the replies' memory forever."""
    big = np.zeros((1, 1 << 20), np.float32)  # 4 MiB a reply: more than the socket buffers

    answered = []

    async def large(message):
        answered.append(message)
        return mip.encode_response_buffers([(big,)], n_input=message.n_input, kind=message.kind)

    server, url = await _start(large, idle_timeout=0.3, frame_timeout=0.3)
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(_request(1, model=None) * 4)
        sock.shutdown(socket.SHUT_WR)  # and never read
        for _ in range(500):
            if len(answered) == 4:
                break
            await asyncio.sleep(0.02)
        assert len(answered) == 4 and server.connections == 1
        for _ in range(500):
            if server.connections == 0:
                break
            await asyncio.sleep(0.02)
        assert server.connections == 0
    finally:
        sock.close()
        await server.stop()


async def test_a_reset_connection_drops_its_work():
    """A client that resets (mip's AsyncClient closing with calls outstanding, or
    SO_LINGER 0) drops its work at once, unlike a half-close, which is answered."""
    handler, started, cancelled = _hanging()
    async with _serving(handler) as (server, url):
        host, port = url.removeprefix("tcp://").rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        sock.sendall(_request(1, model=None))
        await asyncio.wait_for(started.wait(), 5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        await asyncio.wait_for(cancelled.wait(), 5)


async def test_kubemo_client_against_our_server():
    kubemo = pytest.importorskip("kubemo")
    async with _serving() as (server, url):
        def call():
            client = kubemo.Client()
            assert client.ping(url) > 0
            return client.inference(url, ((kubemo.Text("hello"),), (kubemo.Text("world"),)))
        out = await asyncio.to_thread(call)
        assert [item[0].decode() for item in out] == ["hello", "world"]


def _kubemo_server(tmp_path):
    """A real KubeMo server (one request per connection, then close) doubling TEXT values."""
    kubemo = pytest.importorskip("kubemo")
    from kubemo.server import InferenceHandler, Server

    class Echo(kubemo.Inference):
        def preprocess(self, inputs):
            return tuple(x.decode() for x in inputs)

        def concat(self, batch):
            return tuple(zip(*batch))  # per input: the items' values

        def forward(self, inputs):
            return tuple([s * 2 for s in column] for column in inputs)

        def postprocess(self, outputs):
            return tuple(kubemo.Text(s) for s in outputs)

    path = str(tmp_path / "kubemo.sock")
    server = Server("unix", path)
    server.handle(InferenceHandler(Echo()))
    return server, f"unix://{path}"


def test_our_blocking_client_against_kubemo_server(tmp_path):
    import threading

    server, url = _kubemo_server(tmp_path)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        with Client(url, timeout=5) as client:
            assert client.ping() > 0
            for word in ("ab", "xyz"):  # each call needs a new connection: the old one was closed
                assert client.infer([[mip.Text(word)]]) == [(mip.Text(word * 2),)]
            with pytest.raises(RemoteError) as info:
                client.infer([[mip.Text("a")]], model="routed")  # a KubeMo server knows no kind 3
            assert info.value.error_code == ErrorCode.METHOD
    finally:
        server.close()
