"""What the listeners share to bound connections: counts per peer address, and the
connection to close first when a listener is full."""

from __future__ import annotations

import asyncio
import functools
import urllib.parse
from typing import Any, Collection, Iterable

from mip.net.urls import TcpAddress, parse_url

__all__ = ["PeerCounts", "grpc_peer_host", "longest_idle", "sweep_timeouts"]


class PeerCounts:
    """Open connections per peer address (``None``, a Unix-socket peer, is not counted)."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def full(self, host: str | None, limit: int) -> bool:
        """Whether `host` already holds `limit` connections."""
        return host is not None and self._counts.get(host, 0) >= limit

    def add(self, host: str | None) -> None:
        if host is not None:
            self._counts[host] = self._counts.get(host, 0) + 1

    def remove(self, host: str | None) -> None:
        if host is not None:
            left = self._counts[host] - 1
            if left:
                self._counts[host] = left
            else:
                del self._counts[host]

    def __len__(self) -> int:
        return len(self._counts)


def longest_idle(connections: Iterable):
    """The connection whose ``idle`` is true with the oldest ``last_activity``, or None."""
    oldest = None
    for conn in connections:
        if conn.idle and (oldest is None or conn.last_activity < oldest.last_activity):
            oldest = conn
    return oldest


async def sweep_timeouts(connections: Collection[Any], interval: float) -> None:
    """Every ``interval`` seconds, ``check_timeouts(now)`` on each of a listener's
    ``connections`` (the live collection, read afresh each round; ``now`` is the loop's
    clock), until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        _check_timeouts(connections, loop.time())


def _check_timeouts(connections: Collection[Any], now: float) -> None:
    """One round of :func:`sweep_timeouts`: a function of its own, so that no connection
    stays referred to by the sweeper between rounds (a loop variable of the coroutine kept
    the last one checked, closed or not, and whatever it held, until the next round
    checked another)."""
    for conn in list(connections):
        conn.check_timeouts(now)


@functools.lru_cache(maxsize=4096)  # asked once a request, for a few peers at a time
def grpc_peer_host(peer: str) -> str | None:
    """The client's IP address in a gRPC peer string (``ipv4:HOST:PORT``,
    ``ipv6:[HOST]:PORT``, ``ipv6:%5B..%5D:PORT`` as grpcio writes it), None for a Unix socket
    or an empty string."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    try:
        address = parse_url(urllib.parse.unquote(rest))
    except ValueError:
        return None
    return address.host if isinstance(address, TcpAddress) else None

