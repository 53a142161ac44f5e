"""Server memory per idle connection, measured as RSS of a server subprocess.

After a request, a connection that stays open must not keep the receive memory
of that request: the parser lets a large frame's buffer go as soon as a read
leaves nothing pending (docs/protocol.md, "Receive memory").
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import numpy as np

import mip

_SERVER = """
import asyncio
import mip
from mip.net.mip_server import MipServer

async def echo(message):
    return mip.encode_response_buffers([tuple(message.batch[0])], n_input=message.n_input)

async def main():
    server = MipServer(echo, max_connections=4096)
    print(await server.start("tcp://127.0.0.1:0"), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _exchange(sock: socket.socket, frame: bytes) -> None:
    sock.sendall(frame)
    head = b""
    while len(head) < 8:
        head += sock.recv(8 - len(head))
    left = struct.unpack(">I", head[4:8])[0]
    while left:
        left -= len(sock.recv(min(left, 1 << 16)))


def test_idle_connections_keep_no_request_memory():
    # A fixed mmap threshold: glibc gives freed 195 KiB buffers back to the kernel, so RSS
    # shows what the server holds rather than what the allocator keeps for reuse.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    server = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True, env=env)
    socks = []
    try:
        host, port = server.stdout.readline().strip().removeprefix("tcp://").rsplit(":", 1)
        frame = mip.encode_request([[np.ones(50_000, np.float32)]])  # 195 KiB
        warm = socket.create_connection((host, int(port)), timeout=10)
        socks.append(warm)
        _exchange(warm, frame)
        time.sleep(0.3)
        before = _rss_kib(server.pid)
        for _ in range(300):
            s = socket.create_connection((host, int(port)), timeout=10)
            socks.append(s)
            _exchange(s, frame)
        time.sleep(0.5)
        per_connection = (_rss_kib(server.pid) - before) / 300
    finally:
        for s in socks:
            s.close()
        server.kill()
        server.wait()
    # about 1 KiB each (transport and parser objects); keeping the request would be 195 KiB
    assert per_connection < 32, per_connection
