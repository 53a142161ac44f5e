"""One echo service served by either gRPC transport: mip's native one
(mip.net.grpc_server) or grpcio's asyncio server, both configured from one GrpcLimits.

The handlers are written once against the grpc.aio ``ServicerContext`` calls that the
native :class:`~mip.net.grpc_server.Context` also has. Run as a script it serves in its own
process and prints ``PORT <n>`` (the hostile-peer tests measure its RSS)::

    python tests/net/_grpc_echo.py native '{"idle_timeout": 2}'
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
from grpc import aio

from mip.net.grpc_limits import GrpcLimits

SERVICE = "test.Echo"
MAX_MESSAGE = 4 << 20


async def echo(request: bytes, context) -> bytes:
    return request


async def metadata(request: bytes, context) -> bytes:
    """The request's metadata as JSON (``-bin`` values as hex), echoed back as trailers."""
    seen = [(k, v.hex() if isinstance(v, bytes) else v)
            for k, v in context.invocation_metadata() if k.startswith("x-")]
    context.set_trailing_metadata([(k, v) for k, v in context.invocation_metadata()
                                   if k.startswith("x-")])
    return json.dumps(seen).encode()


async def slow(request: bytes, context) -> bytes:
    """Sleeps the seconds in the request, then answers with the time that was left."""
    await asyncio.sleep(float(request or b"0"))
    return repr(context.time_remaining()).encode()


async def big(request: bytes, context) -> bytes:
    """A reply of the octet count in the request."""
    return bytes(int(request)) if request else b""


async def fan(requests, context):
    """Streaming: a reply of the octet count in each request."""
    async for request in requests:
        yield bytes(int(request))


METHODS = {"Echo": echo, "Metadata": metadata, "Slow": slow, "Big": big}
STREAMING = {"Fan": fan}


class Served:
    """A running echo server: ``address`` (``127.0.0.1:PORT``) and :meth:`stop`."""

    def __init__(self, impl: str, server, address: str):
        self.impl, self.server, self.address = impl, server, address

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.server.stop(grace)


async def start(impl: str, limits: GrpcLimits | None = None, port: int = 0) -> Served:
    limits = limits or GrpcLimits()
    if impl == "native":
        from mip.net.grpc_server import GrpcServer, stream_stream, unary

        methods = {f"/{SERVICE}/{name}": unary(handler) for name, handler in METHODS.items()}
        methods.update({f"/{SERVICE}/{name}": stream_stream(handler)
                        for name, handler in STREAMING.items()})
        server = GrpcServer(methods, max_message_size=MAX_MESSAGE, limits=limits)
        _, bound = await server.start("127.0.0.1", port)
        return Served(impl, server, f"127.0.0.1:{bound}")
    server = aio.server(options=[("grpc.so_reuseport", 0),
                                 ("grpc.max_receive_message_length", MAX_MESSAGE),
                                 ("grpc.max_send_message_length", MAX_MESSAGE),
                                 *limits.grpcio_options()])
    handlers = {name: grpc.unary_unary_rpc_method_handler(handler)
                for name, handler in METHODS.items()}
    handlers.update({name: grpc.stream_stream_rpc_method_handler(handler)
                     for name, handler in STREAMING.items()})
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return Served(impl, server, f"127.0.0.1:{bound}")


class Threaded:
    """An echo server on its own event loop in a daemon thread."""

    def __init__(self, impl: str, limits: GrpcLimits):
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.served = self.loop.run_until_complete(start(impl, limits))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(20)
        self.impl, self.address = impl, self.served.address

    def stop(self, grace: float):
        """Start a graceful stop; returns its concurrent future."""
        return asyncio.run_coroutine_threadsafe(self.served.stop(grace), self.loop)

    def close(self) -> None:
        try:
            self.stop(0).result(15)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- the server in its own process ---------------------------------------------------------

class Process:
    """``python _grpc_echo.py IMPL LIMITS`` as a child: ``address``, :meth:`rss` (octets)."""

    def __init__(self, impl: str, **limits):
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        self.proc = subprocess.Popen([sys.executable, __file__, impl, json.dumps(limits)],
                                     stdout=subprocess.PIPE, env=env, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"echo server did not start: {line!r}")
        self.port = int(line.split()[1])
        self.address = f"127.0.0.1:{self.port}"

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def settle_rss(self, seconds: float = 0.5) -> int:
        time.sleep(seconds)
        return self.rss()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


async def _main(impl: str, limits: dict) -> None:
    served = await start(impl, replace(GrpcLimits(), **limits))
    print(f"PORT {served.address.rpartition(':')[2]}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await served.stop(0)


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}))


# -- a raw HTTP/2 peer (the h2 package) -----------------------------------------------------

def message(payload: bytes) -> bytes:
    """One gRPC message: uncompressed, 4-octet length, payload."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class RawH2:
    """A blocking HTTP/2 client speaking frames through the ``h2`` package."""

    def __init__(self, address: str, *, settings: dict | None = None, timeout: float = 10.0):
        import socket

        import h2.config
        import h2.connection

        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False))
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.flush()
        self.closed = False
        self.timeout = timeout

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str = f"/{SERVICE}/Echo", body: bytes | None = b"", *,
                method: bytes = b"POST", content_type: bytes = b"application/grpc",
                extra=(), end: bool = True) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(b":method", method), (b":scheme", b"http"), (b":path", path.encode()),
                   (b":authority", b"127.0.0.1"), (b"content-type", content_type),
                   (b"te", b"trailers"), *extra]
        self.conn.send_headers(stream_id, headers, end_stream=body is None and end)
        if body is not None:
            self.conn.send_data(stream_id, message(body), end_stream=end)
        self.flush()
        return stream_id

    def events(self, until=None, timeout: float | None = None, ack: bool = True) -> list:
        """Read until ``until(event)`` is true for one event, the connection closes or
        ``timeout`` passes; returns the events seen. With ``ack``, received DATA is
        given back to the flow-control windows at once."""
        import socket

        import h2.events

        seen = []
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.closed and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                break
            except OSError:
                data = b""
            if not data:
                self.closed = True
                break
            try:
                events = self.conn.receive_data(data)
            except Exception:  # the server broke the protocol or closed mid-frame
                self.closed = True
                break
            for event in events:
                if ack and isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                        event.stream_id)
            try:
                self.flush()
            except OSError:
                self.closed = True
            seen.extend(events)
            if until is not None and any(until(e) for e in events):
                break
        return seen

    def call(self, path: str = f"/{SERVICE}/Echo", body: bytes = b"", **kw) -> dict:
        """One unary call; returns ``{"headers", "data", "trailers", "reset"}``."""
        import h2.events

        stream_id = self.request(path, body, **kw)
        out = {"headers": {}, "data": b"", "trailers": {}, "reset": None}
        for event in self.events(lambda e: getattr(e, "stream_id", None) == stream_id and (
                isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)))):
            if getattr(event, "stream_id", None) != stream_id:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                out["headers"] = dict(event.headers)
            elif isinstance(event, h2.events.TrailersReceived):
                out["trailers"] = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                out["data"] += event.data
            elif isinstance(event, h2.events.StreamReset):
                out["reset"] = event.error_code
        return out

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def read_frames(sock, until, timeout: float = 5.0, on_frame=None) -> list:
    """Raw HTTP/2 frames (hyperframe) read from ``sock`` until ``until(frame)`` is true for
    one, the connection closes or ``timeout`` passes; ``on_frame(frame)`` may answer."""
    import socket

    from hyperframe.frame import Frame

    frames, buffer = [], b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        while len(buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
            if len(buffer) < 9 + length:
                break
            frame.parse_body(memoryview(buffer[9:9 + length]))
            buffer = buffer[9 + length:]
            frames.append(frame)
            if on_frame is not None:
                on_frame(frame)
            if until(frame):
                return frames
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(1 << 16)
        except socket.timeout:
            break
        except OSError:
            break
        if not data:
            break
        buffer += data
    return frames
