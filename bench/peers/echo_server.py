"""A bare uvloop echo server for MIP frames: the ceiling of any MIP server on this machine.

It reads frames by their 8-octet header (no decoding), and sends each one back with the
subtype set to RESPONSE and the input/output counts swapped, so that ``mip bench infer``
(plain kind-2 requests) reads it as a reply carrying the same tensor.  Nothing else is done.

    python echo_server.py --port PORT
"""

import argparse
import asyncio
import sys


def _as_response(frame: bytearray) -> bytearray:
    frame[2] = 1  # RESPONSE (a PING becomes its PONG)
    if len(frame) >= 12:  # inference: the request's inputs come back as outputs
        frame[8], frame[9] = frame[9], frame[8]
    return frame


class EchoProtocol(asyncio.BufferedProtocol):
    """Frames out as they came in, with three octets changed.

    Small frames are read into one staging buffer; a frame larger than it is received
    straight into its own buffer (no copy on the way in) and sent back from there.
    """

    STAGING = 1 << 16

    def __init__(self):
        self.staging = bytearray(self.STAGING)
        self.n = 0
        self.frame: bytearray | None = None
        self.frame_view: memoryview | None = None
        self.frame_pos = 0
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        if self.frame is not None:
            return self.frame_view[self.frame_pos:]
        return memoryview(self.staging)[self.n:]

    def buffer_updated(self, nbytes):
        if self.frame is not None:
            self.frame_pos += nbytes
            if self.frame_pos == len(self.frame):
                frame, self.frame, self.frame_view = self.frame, None, None
                self.transport.write(_as_response(frame))
            return
        self.n += nbytes
        buf, n, pos, out = self.staging, self.n, 0, []
        while n - pos >= 8:
            total = 8 + int.from_bytes(buf[pos + 4:pos + 8], "big")
            if n - pos >= total:
                out.append(_as_response(buf[pos:pos + total]))
                pos += total
                continue
            if total > self.STAGING:  # too big to stage: receive the rest in place
                have = n - pos
                self.frame = bytearray(total)
                self.frame[:have] = buf[pos:n]
                self.frame_view = memoryview(self.frame)
                self.frame_pos = have
                pos = n
            break
        if pos:
            buf[:n - pos] = buf[pos:n]
            self.n = n - pos
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
