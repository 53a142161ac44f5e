"""Brokers of one cluster on different hosts: network namespaces the test makes (one for the
engine, one for each of three ``mip broker --cluster`` processes, one for the clients), on
either engine. The broker of an at-least-once subscriber is killed mid-stream; the subscriber
resumes on a broker of another host and loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from mip.net import AsyncClient

import _msip_support as w
from _netns import Network, require
from _redis import redis_server
from test_msip_cluster import NatsPlane, RedisPlane, start_nats

_PORT = 7000


@contextlib.contextmanager
def _engine(net: Network, name: str):
    """The engine on the host "engine": its plane (looked up from the host "client")."""
    host = net.addresses["engine"]

    def reachable(h, port):
        net.call("client", lambda: socket.create_connection((h, port), 0.2).close())

    if name == "redis":
        with redis_server(bind=host, prefix=net.command("engine", []),
                          reachable=reachable) as port:
            yield RedisPlane(port, host)
        return
    pytest.importorskip("nats")
    with tempfile.TemporaryDirectory(prefix="mip-nats-") as store:
        plane = NatsPlane(4222, 8222, store, host)
        proc = start_nats(4222, 8222, store, host, prefix=net.command("engine", []),
                          call=lambda f: net.call("client", f))
        net.processes.append(proc)
        yield plane


def _broker(net: Network, host: str, url: str) -> subprocess.Popen:
    proc = net.popen(host, [sys.executable, "-m", "mip.cli", "--log-level", "WARNING", "broker",
                            "--msip", f"tcp://0.0.0.0:{_PORT}", "--cluster", url,
                            "--cluster-prefix", "hosts:"],
                     cwd=w.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 30
    while True:
        try:
            net.call("client", lambda: socket.create_connection(
                (net.addresses[host], _PORT), 0.2).close())
            return proc
        except OSError:
            assert time.monotonic() < end, f"the broker on {host} did not start"
            time.sleep(0.1)


@pytest.mark.parametrize("engine", ["redis", "nats"])
def test_at_least_once_session_moves_to_another_host_after_a_kill(engine):
    require()
    n, kill_at, sent_before = 1000, 300, 600
    with Network("engine", "a", "b", "c", "client") as net, _engine(net, engine) as plane:
        brokers = {h: _broker(net, h, plane.url) for h in ("a", "b", "c")}
        url = {h: f"tcp://{net.addresses[h]}:{_PORT}" for h in brokers}

        async def until(predicate, timeout: float = 10.0) -> None:
            deadline = time.monotonic() + timeout
            while not await asyncio.to_thread(predicate):
                assert time.monotonic() < deadline, "condition not reached in time"
                await asyncio.sleep(0.05)

        async def collect(sub, count: int) -> list[bytes]:
            return [bytes((await sub.get(10)).data) for _ in range(count)]

        async def main():  # on the host "client"
            pub = AsyncClient(url["a"], reconnect=False)
            sub = AsyncClient(url["b"], reconnect=False)
            plain = AsyncClient(url["c"], reconnect=False)
            for cl in (pub, sub, plain):
                await cl.connect()
            s_b = await sub.subscribe("feed", reliable=True)
            s_c = await plain.subscribe("feed")
            await until(lambda: plane.numsub("feed", "hosts:") == 2)
            await until(lambda: plane.recorded(sub.client_id, "feed", "hosts:"))
            for i in range(sent_before):
                await pub.publish("feed", b"%05d" % i)
            got_b = await collect(s_b, kill_at)
            brokers["b"].send_signal(signal.SIGKILL)
            brokers["b"].wait(10)
            for i in range(sent_before, n):
                await pub.publish("feed", b"%05d" % i)
            with contextlib.suppress(Exception):
                await sub.close()
            moved = AsyncClient(url["c"], client_id=sub.client_id, reconnect=False)
            s_moved = await moved.subscribe("feed", reliable=True)  # sent by connect
            await moved.connect()
            first = int(bytes((await s_moved.get(10)).data))
            assert first <= kill_at  # nothing acknowledged is skipped
            got_moved = [b"%05d" % first] + await collect(s_moved, n - 1 - first)
            assert got_b == [b"%05d" % i for i in range(kill_at)]
            assert got_moved == [b"%05d" % i for i in range(first, n)]
            assert await collect(s_c, n) == [b"%05d" % i for i in range(n)]
            for cl in (pub, plain, moved):
                await cl.close()

        net.call("client", asyncio.run, main(), timeout=120)
        for proc in brokers.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
