"""``mip.Client`` and ``mip.AsyncClient`` over several servers: requests in turn, a server
that refuses connections or drops one before replying is passed over, and taken back once
it serves again; with ``retry=False`` a request is never sent twice. (A name resolving to
several addresses: tests/deploy/test_multihost.py.)"""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest

import mip
from mip.net.mip_client import AsyncClient, Client
from mip.net.mip_server import MipServer

pytestmark = pytest.mark.timeout(60)

X = np.zeros((1, 1), np.float32)


def _tagging(tag: int):
    """A handler that answers every request with one tensor: ``[[tag]]``."""
    async def handler(message: mip.Message):
        return mip.encode_response_buffers([(np.full((1, 1), tag, np.int32),)],
                                           n_input=message.n_input, kind=message.kind)
    return handler


async def _servers(count: int, port: int = 0) -> list[tuple[MipServer, str]]:
    """`count` servers tagged 1, 2, ... on 127.0.0.1, 127.0.0.2, ... (one port for all
    when `port` is given)."""
    started = []
    for i in range(count):
        server = MipServer(_tagging(i + 1))
        address = await server.start(f"tcp://127.0.0.{i + 1}:{port}")
        started.append((server, str(address)))
    return started


def _tags(client: Client, n: int) -> list[int]:
    return [int(client.infer([[X]])[0][0][0, 0]) for _ in range(n)]


async def _async_tags(client: AsyncClient, n: int) -> list[int]:
    return [int((await client.infer([[X]]))[0][0][0, 0]) for _ in range(n)]


async def test_requests_go_to_the_servers_in_turn():
    servers = await _servers(3)
    urls = [url for _, url in servers]
    try:
        with Client(urls) as client:
            tags = await asyncio.to_thread(_tags, client, 9)
        async with AsyncClient(urls, connections=2) as aclient:
            atags = await _async_tags(aclient, 9)
    finally:
        for server, _ in servers:
            await server.stop()
    for got in (tags, atags):
        assert sorted(got) == [1, 1, 1, 2, 2, 2, 3, 3, 3], got
        assert all(a != b for a, b in zip(got, got[1:])), got  # in turn, never twice running


async def test_a_stopped_server_is_passed_over_and_taken_back_when_it_serves_again():
    (first, first_url), (second, second_url) = await _servers(2)
    port = int(second_url.rsplit(":", 1)[1])
    with Client([first_url, second_url]) as client:
        async with AsyncClient([first_url, second_url]) as aclient:
            assert sorted(await asyncio.to_thread(_tags, client, 4)) == [1, 1, 2, 2]
            assert sorted(await _async_tags(aclient, 4)) == [1, 1, 2, 2]
            await second.stop()  # refuses connections; pooled ones were closed
            assert await asyncio.to_thread(_tags, client, 6) == [1] * 6
            assert await _async_tags(aclient, 6) == [1] * 6
            second = MipServer(_tagging(2))
            await second.start(f"tcp://127.0.0.2:{port}")
            try:
                back, aback = [], []
                deadline = time.monotonic() + 10  # a failed address waits a second
                while not (2 in back and 2 in aback) and time.monotonic() < deadline:
                    back += await asyncio.to_thread(_tags, client, 2)
                    aback += await _async_tags(aclient, 2)
                    await asyncio.sleep(0.05)
            finally:
                await second.stop()
                await first.stop()
    assert 2 in back and 2 in aback, (back, aback)


class _Dropper:
    """A listener that reads a request and closes the connection without a reply, as a
    server killed mid-request does."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.3", 0))
        self.url = f"tcp://127.0.0.3:{self.sock.getsockname()[1]}"
        self.dropped = 0

    async def run(self):
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            with conn:
                await loop.sock_recv(conn, 65536)
                self.dropped += 1


async def test_a_request_dropped_without_a_reply_goes_to_the_next_server():
    [(server, url)] = await _servers(1)
    dropper = _Dropper()
    task = asyncio.get_running_loop().create_task(dropper.run())
    try:
        with Client([dropper.url, url]) as client:
            assert await asyncio.to_thread(_tags, client, 3) == [1, 1, 1]
        async with AsyncClient([dropper.url, url]) as aclient:
            assert await _async_tags(aclient, 3) == [1, 1, 1]
        assert dropper.dropped >= 2  # each client tried it first
        # one address only: the failure is the caller's, as before
        with Client(dropper.url) as client, pytest.raises(ConnectionError):
            await asyncio.to_thread(_tags, client, 1)
    finally:
        task.cancel()
        dropper.sock.close()
        await server.stop()


async def test_without_retry_a_request_dropped_without_a_reply_is_sent_once():
    [(server, url)] = await _servers(1)
    dropper = _Dropper()
    task = asyncio.get_running_loop().create_task(dropper.run())
    try:
        # the dropper first in turn: the request went there, and only there
        with Client([dropper.url, url], retry=False) as client:
            with pytest.raises(ConnectionError):
                await asyncio.to_thread(_tags, client, 1)
        assert dropper.dropped == 1
        async with AsyncClient([dropper.url, url], retry=False) as aclient:
            with pytest.raises(ConnectionError):
                await _async_tags(aclient, 1)
        assert dropper.dropped == 2
        # a pooled connection the server closed while it was idle is seen closed before
        # anything is sent on it: a new connection takes the request, retry or not
        with Client(url, retry=False) as client:
            assert await asyncio.to_thread(_tags, client, 1) == [1]
            await server.stop()
            server = MipServer(_tagging(1))
            await server.start(url)
            assert await asyncio.to_thread(_tags, client, 1) == [1]
    finally:
        task.cancel()
        dropper.sock.close()
        await server.stop()


async def test_no_server_answering_raises_the_connection_error():
    servers = await _servers(2)
    urls = [url for _, url in servers]
    for server, _ in servers:
        await server.stop()
    with Client(urls, timeout=5) as client, pytest.raises(ConnectionRefusedError):
        await asyncio.to_thread(_tags, client, 1)
    async with AsyncClient(urls, timeout=5) as aclient:
        with pytest.raises(ConnectionRefusedError):
            await _async_tags(aclient, 1)
    with pytest.raises(ValueError):
        Client([])
