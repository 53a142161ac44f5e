"""A bare uvloop echo server for MIP frames: the ceiling of any MIP server on this machine.

It reads frames by their 8-octet header (no decoding), and sends each one back with the
subtype set to RESPONSE and the input/output counts swapped, so that ``mip bench infer``
(plain kind-2 requests) reads it as a reply carrying the same tensor.  Nothing else is done.

    python echo_server.py --port PORT
"""

import argparse
import asyncio
import sys


class EchoProtocol(asyncio.Protocol):
    """Frames out as they came in, with three octets changed."""

    def __init__(self):
        self.buf = bytearray()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        buf = self.buf
        buf += data
        n = len(buf)
        pos = 0
        out = []
        while n - pos >= 8:
            total = 8 + int.from_bytes(buf[pos + 4:pos + 8], "big")
            if n - pos < total:
                break
            frame = buf[pos:pos + total]
            frame[2] = 1  # RESPONSE (a PING becomes its PONG)
            if total >= 12:  # inference: the request's inputs come back as outputs
                frame[8], frame[9] = frame[9], frame[8]
            out.append(frame)
            pos += total
        if pos:
            del buf[:pos]
        if out:
            self.transport.writelines(out)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, host, port, reuse_address=True, backlog=1024)
    print(f"echo: serving on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    try:
        import uvloop
        uvloop.run(serve(args.host, args.port))
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
