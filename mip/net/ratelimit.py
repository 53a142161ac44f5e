"""Per-identity rate limits with GCRA (the generic cell rate algorithm).

A limit of ``N`` requests per ``period`` seconds admits one request every
``period / N`` seconds on average and bursts of up to ``N``; unlike a fixed window it
never lets ``2N`` through across a window boundary. The state per identity is one
number, the theoretical arrival time (TAT).

:class:`MemoryRateLimiter` keeps it in this process; :class:`RedisRateLimiter` keeps it in
Redis (one Lua script, the server's clock), so the limit holds across replicas.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import logging
import math
import socket
import time
from dataclasses import dataclass

from mip.net.redis_client import open_redis

__all__ = [
    "Decision",
    "FailureLimit",
    "MemoryRateLimiter",
    "RateLimiter",
    "RedisRateLimiter",
    "peer_of",
    "open_rate_limiter",
    "parse_rate",
]


@dataclass(frozen=True)
class Decision:
    """The outcome of one check.

    Attributes:
        allowed: whether the request may proceed.
        limit: requests per period.
        remaining: requests that may still be made right now.
        reset: seconds until the full limit is available again.
        retry_after: seconds until a request is admitted (0 when allowed).
    """

    allowed: bool
    limit: int
    remaining: int
    reset: float
    retry_after: float

    def headers(self) -> dict[str, str]:
        """``X-RateLimit-Limit``/``-Remaining``/``-Reset`` (whole seconds, rounded up), and
        ``Retry-After`` when refused."""
        headers = {"X-RateLimit-Limit": str(self.limit),
                   "X-RateLimit-Remaining": str(max(self.remaining, 0)),
                   "X-RateLimit-Reset": str(math.ceil(self.reset))}
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


def parse_rate(text: str | int) -> tuple[int, float]:
    """``"1000"``, ``"1000/min"``, ``"5/s"``, ``"100/hour"`` or ``"10/30s"`` ->
    (requests, period in seconds). A bare number is per minute."""
    if isinstance(text, int):
        return text, 60.0
    count, _, unit = str(text).strip().partition("/")
    unit = unit.strip().lower() or "min"
    units = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
             "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
    digits = unit.rstrip("abcdefghijklmnopqrstuvwxyz")
    name = unit[len(digits):]
    if name not in units:
        raise ValueError(f"rate {text!r}: the unit must be s, min, hour or day")
    try:
        requests = int(count)
    except ValueError:
        raise ValueError(f"rate {text!r}: expected N or N/UNIT, e.g. 10/min") from None
    period = (float(digits) if digits else 1.0) * units[name]
    if requests < 1 or period <= 0:
        raise ValueError(f"rate {text!r}: need at least 1 request per positive period")
    return requests, period


class RateLimiter(abc.ABC):
    """``limit`` requests per ``period`` seconds per identity."""

    def __init__(self, limit: int = 1000, period: float = 60.0):
        self.limit = limit
        self.period = period
        self.interval = period / limit  # seconds between requests at the steady rate

    @abc.abstractmethod
    async def check(self, identity: str, *, count: bool = True) -> Decision:
        """Count one request of ``identity`` and say whether it is admitted; with
        ``count=False``, only say whether one would be admitted now."""

    async def close(self) -> None:
        """Release connections."""

    def _decide(self, now: float, tat: float | None) -> tuple[Decision, float | None]:
        tat = now if tat is None or tat < now else tat
        new_tat = tat + self.interval
        allow_at = new_tat - self.period
        if now < allow_at:
            remaining = 0
            return Decision(False, self.limit, remaining, tat - now, allow_at - now), None
        remaining = int((self.period - (new_tat - now)) / self.interval + 1e-9)
        return Decision(True, self.limit, remaining, new_tat - now, 0.0), new_tat


class MemoryRateLimiter(RateLimiter):
    """GCRA state in this process for at most ``max_identities`` identities: when the table
    is full, the identity counted least recently is forgotten (about 250 octets each)."""

    def __init__(self, limit: int = 1000, period: float = 60.0, *, max_identities: int = 100_000):
        super().__init__(limit, period)
        self._tat: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.max_identities = max_identities

    def __len__(self) -> int:
        return len(self._tat)

    async def check(self, identity: str, *, count: bool = True) -> Decision:
        return self.decide(identity, count=count)

    def decide(self, identity: str, *, count: bool = True) -> Decision:
        """:meth:`check` without a coroutine: this limiter never waits."""
        now = time.monotonic()
        tat = self._tat.get(identity)
        decision, new_tat = self._decide(now, tat)
        if new_tat is not None and count:
            if tat is None:
                while len(self._tat) >= self.max_identities:
                    self._tat.popitem(last=False)
            else:
                self._tat.move_to_end(identity)
            self._tat[identity] = new_tat
        return decision


# KEYS: the identity's key. ARGV: limit, period ms, count (0: only look). Returns allowed,
# remaining, reset ms, retry ms. Uses the server's clock so every replica agrees.
_GCRA = """
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local interval = period / limit
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - period
if now < allow_at then
  return {0, 0, math.ceil(tat - now), math.ceil(allow_at - now)}
end
if ARGV[3] ~= '0' then
  redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now))
end
return {1, math.floor((period - (new_tat - now)) / interval + 1e-9), math.ceil(new_tat - now), 0}
"""


class RedisRateLimiter(RateLimiter):
    """GCRA state in Redis keys ``{prefix}:{identity}`` (expiring when caught up)."""

    def __init__(self, url: str, limit: int = 1000, period: float = 60.0, *,
                 prefix: str = "mip:ratelimit", ssl_context=None):
        super().__init__(limit, period)
        self.redis = open_redis(url, ssl_context)
        self.prefix = prefix
        self._script = self.redis.register_script(_GCRA)

    async def check(self, identity: str, *, count: bool = True) -> Decision:
        allowed, remaining, reset_ms, retry_ms = await self._script(
            keys=[f"{self.prefix}:{identity}"],
            args=[self.limit, int(self.period * 1000), int(count)])
        return Decision(bool(allowed), self.limit, int(remaining), reset_ms / 1000,
                        retry_ms / 1000)

    async def close(self) -> None:
        await self.redis.aclose()


def open_rate_limiter(rate: str | int, redis_url: str | None = None, ssl_context=None, *,
                      prefix: str = "mip:ratelimit",
                      max_identities: int = 100_000) -> RateLimiter:
    """A limiter for ``rate`` (see :func:`parse_rate`): in Redis under ``prefix`` when
    ``redis_url`` is given, else in memory for at most ``max_identities`` identities."""
    limit, period = parse_rate(rate)
    if redis_url:
        return RedisRateLimiter(redis_url, limit, period, prefix=prefix,
                                ssl_context=ssl_context)
    return MemoryRateLimiter(limit, period, max_identities=max_identities)


_V4_MAPPED = bytes(10) + b"\xff\xff"


def peer_of(host: str | None) -> str:
    """The address whose failed authentications are counted together: the IPv4 address,
    or the /64 network of an IPv6 address (the block one host usually holds)."""
    if not host:
        return "unknown"
    if ":" not in host:
        return host
    try:  # inet_pton: a fraction of the ipaddress module's cost, on every request
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except OSError:
        return host
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


def _printable(text: str, limit: int = 200) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class FailureLimit:
    """Failed authentications per peer, with GCRA (:mod:`~mip.net.ratelimit`):
    bursts of up to N failures, then one every period/N; a peer past its budget is refused
    (429) without its credentials being looked at. Successes neither count nor reset.

    Every failure is logged at WARNING with the peer and the reason (never the credential),
    at most one line per peer per ``log_interval`` seconds and, in all, a burst of
    ``log_lines`` lines then one per ``log_interval / log_lines`` seconds; what is left out
    is summed up in one line ``log_interval`` seconds after the first thing left out (and
    at :meth:`close`).

    Args:
        rate: failures per peer, ``"N"`` (per minute) or ``"N/unit"``.
        redis_url: share the budgets through this Redis (keys ``mip:authfail:{peer}``,
            expiring when a peer's budget is whole again); else they live in this process.
        ssl_context: TLS for ``rediss://``.
        max_peers: peers tracked in this process (the least recently failed are forgotten
            first; about 250 octets each). The log remembers at most 10,000 peers.
        log_interval / log_lines: the log's limits (seconds, lines).
        logger: where failures are logged (default ``mip.auth``).

    :meth:`refuse` and :meth:`failed` are coroutines (a Redis limiter waits for Redis);
    :meth:`refuse_now` and :meth:`failed_now` are their forms for protocol callbacks, with
    the budgets in this process.
    """

    def __init__(self, rate: str | int = "10/min", redis_url: str | None = None,
                 ssl_context=None, *, max_peers: int = 100_000, log_interval: float = 60.0,
                 log_lines: int = 10, logger: logging.Logger | None = None):
        self.log = logger or logging.getLogger("mip.auth")
        self.limiter = open_rate_limiter(rate, redis_url, ssl_context, prefix="mip:authfail",
                                         max_identities=max_peers)
        self.log_interval = log_interval
        self._log_peer = MemoryRateLimiter(1, log_interval,
                                           max_identities=min(max_peers, 10_000))
        self._log_all = MemoryRateLimiter(log_lines, log_interval)
        self._unlogged = 0  # failures left out of the log since _since
        self._refused = 0  # requests refused unexamined since _since
        self._since = 0.0
        self._summary: asyncio.TimerHandle | None = None

    async def refuse(self, peer: str) -> Decision | None:
        """The refusal (with ``retry_after``) when ``peer`` has spent its failure budget,
        else ``None``. Counts nothing."""
        return self._refusal(await self.limiter.check(peer, count=False))

    async def failed(self, peer: str, reason: str) -> Decision:
        """Count one failed authentication of ``peer`` and log it (within the log's
        limits). A refused decision means the failure was past the budget: requests racing
        the budget's end are answered 429 too, so no more than N are ever answered 401."""
        decision = await self.limiter.check(peer)
        self._log_failure(peer, reason)
        return decision

    @property
    def in_process(self) -> bool:
        """Whether the budgets live in this process (so :meth:`refuse_now` and
        :meth:`failed_now` may be used)."""
        return isinstance(self.limiter, MemoryRateLimiter)

    def refuse_now(self, peer: str) -> Decision | None:
        """:meth:`refuse` for budgets kept in this process."""
        return self._refusal(self._memory().decide(peer, count=False))

    def failed_now(self, peer: str, reason: str) -> Decision:
        """:meth:`failed` for budgets kept in this process."""
        decision = self._memory().decide(peer)
        self._log_failure(peer, reason)
        return decision

    def _memory(self) -> MemoryRateLimiter:
        if not isinstance(self.limiter, MemoryRateLimiter):
            raise TypeError("refuse_now/failed_now need the budgets in this process (no Redis)")
        return self.limiter

    def _refusal(self, decision: Decision) -> Decision | None:
        if decision.allowed:
            return None
        self._refused += 1
        self._left_out()
        return decision

    def _log_failure(self, peer: str, reason: str) -> None:
        if self._log_peer.decide(peer).allowed and self._log_all.decide("").allowed:
            self.log.warning("failed authentication from %s: %s", peer, _printable(reason))
        else:
            self._unlogged += 1
            self._left_out()

    def _left_out(self) -> None:
        if self._summary is None:  # the first thing left out: sum up one interval from now
            self._since = time.monotonic()
            self._summary = asyncio.get_running_loop().call_later(self.log_interval,
                                                                  self._summarize)

    def _summarize(self) -> None:
        self._summary = None
        if self._unlogged or self._refused:
            self.log.warning("failed authentications in the last %.0f s: %d more not logged; "
                        "refused for too many failures: %d", time.monotonic() - self._since,
                        self._unlogged, self._refused)
            self._unlogged = self._refused = 0

    async def close(self) -> None:
        """Log what is left to sum up and release the limiter's connections."""
        if self._summary is not None:
            self._summary.cancel()
            self._summarize()
        await self.limiter.close()
