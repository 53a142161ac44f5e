"""A private redis-server for the tests: on 127.0.0.1, a free port, nothing saved."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time

import pytest
from _serve_process import free_port, stop_process


def _reachable(host: str, port: int) -> None:
    """Returns once a TCP connection to host:port opens (raises OSError otherwise)."""
    socket.create_connection((host, port), 0.2).close()


def start_redis(port: int, *options: str, bind: str = "127.0.0.1", prefix=(),
                reachable=_reachable) -> subprocess.Popen:
    """redis-server listening on ``port`` (plain TCP), or with ``"tls"`` as the first option
    on TLS only (the ``--tls-*`` options follow); returns once it accepts connections.
    Skips the test when the binary is missing. Elsewhere than 127.0.0.1: ``bind`` (the
    address), ``prefix`` (the command that runs it, such as ``ip netns exec NS``) and
    ``reachable`` (``reachable(bind, port)`` raises OSError until the server accepts
    connections)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    ports = (["--port", "0", "--tls-port", str(port), *options[1:]] if options[:1] == ("tls",)
             else ["--port", str(port), *options])
    proc = subprocess.Popen([*prefix, binary, *ports, "--bind", bind, "--save", "",
                             "--appendonly", "no", "--protected-mode", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with contextlib.suppress(OSError):
            reachable(bind, port)
            return proc
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError("redis-server did not start")


@contextlib.contextmanager
def redis_server(*options: str, **where):
    """:func:`start_redis` (``where``: its keyword options) on a free port for the ``with``
    block; yields the port."""
    port = free_port()
    proc = start_redis(port, *options, **where)
    try:
        yield port
    finally:
        stop_process(proc)
