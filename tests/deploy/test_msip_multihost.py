"""MSIP brokers joined through Redis across hosts: network namespaces on one bridge
(tests/deploy/_netns.py; as root, as CI runs), Redis, three ``mip broker --cluster`` processes,
the publisher and the subscriber each on a host of their own.

The at-least-once subscriber's broker is killed (SIGKILL) in the middle of a stream; the
subscriber connects to another broker with its client id and gets, from its last acknowledged
position in Redis, every event: in order, none lost (some again: what the killed broker
delivered and saw no ACK for)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from _netns import Network
from _redis import redis_server
from test_multihost import _root_and_ip, _until  # noqa: F401  (_root_and_ip: autouse)

from mip.msip import Client

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]
redis = pytest.importorskip("redis")

ROOT = Path(__file__).resolve().parents[2]
PORT = 7171


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), 0.5).close()
        return True
    except OSError:
        return False


def test_at_least_once_subscriber_moves_to_another_host_after_its_broker_is_killed():
    n, kill_at, sent_before = 600, 200, 400
    hosts = ("redis", "a", "b", "c", "pub", "sub")
    with Network(*hosts) as net:
        def reachable(host, port):
            net.call("redis", lambda: socket.create_connection((host, port), 0.2).close())

        with redis_server(bind=net.addresses["redis"], prefix=net.command("redis", []),
                          reachable=reachable) as redis_port:
            url = f"redis://{net.addresses['redis']}:{redis_port}/0"
            brokers = {h: net.popen(h, [sys.executable, "-m", "mip.cli", "--log-level", "WARNING",
                                        "broker", "--msip", f"tcp://0.0.0.0:{PORT}",
                                        "--cluster", url, "--cluster-prefix", "hosts:"],
                                    cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
                       for h in "abc"}
            at = {h: f"tcp://{net.addresses[h]}:{PORT}" for h in "abc"}
            for h in "abc":
                _until(lambda h=h: net.call("sub", _listening, net.addresses[h], PORT), 60,
                       f"broker {h} listening")

            def ask(command):  # a Redis command, from the subscriber's host
                def run():
                    with contextlib.closing(redis.Redis(host=net.addresses["redis"],
                                                        port=redis_port,
                                                        socket_timeout=5)) as r:
                        return command(r)
                return net.call("sub", run)

            pub = net.call("pub", lambda: Client(at["a"], reconnect=False))
            sub = net.call("sub", lambda: Client(at["b"], reconnect=False))
            moved = None
            try:
                pub.connect()
                sub.connect()
                feed = sub.subscribe("feed", reliable=True)
                record = "hosts:session:%d" % sub.client_id
                _until(lambda: ask(lambda r: r.exists("hosts:want:feed")
                                   and r.hexists(record, "feed")), 30,
                       "the subscription recorded in Redis")
                for i in range(sent_before):
                    pub.publish("feed", b"%05d" % i)
                got = [bytes(feed.get(10).data) for _ in range(kill_at)]  # acknowledged
                brokers["b"].send_signal(signal.SIGKILL)
                brokers["b"].wait(10)
                for i in range(sent_before, n):
                    pub.publish("feed", b"%05d" % i)
                with contextlib.suppress(Exception):
                    sub.close()
                moved = net.call("sub", lambda: Client(at["c"], client_id=sub.client_id,
                                                       reconnect=False))
                again = moved.subscribe("feed", reliable=True)  # sent by connect
                moved.connect()
                assert moved.client_id == sub.client_id
                first = int(bytes(again.get(10).data))
                assert first <= kill_at  # nothing acknowledged is skipped
                rest = [bytes(again.get(10).data) for _ in range(n - 1 - first)]
                assert got == [b"%05d" % i for i in range(kill_at)]
                assert [b"%05d" % first, *rest] == [b"%05d" % i for i in range(first, n)]
                with pytest.raises(TimeoutError):
                    again.get(0.3)  # nothing more, nothing twice
            finally:
                for client in (pub, moved):
                    if client is not None:
                        client.close()
