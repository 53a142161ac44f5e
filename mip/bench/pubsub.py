"""MSIP pub/sub load generator: delivery throughput, publish-to-delivery latency, PING.

Publishers and subscribers are ``mip.net.msip_client.AsyncClient`` connections in this one
process, so the publish time written into each message (``time.perf_counter()``, 8 octets,
then a sequence number, padded to ``size``) is read by the subscriber on the same clock.

* ``rate`` given (messages/s, all publishers together): open loop, each message stamped with
  its *scheduled* time, so latency includes any delay the generator or broker adds.
* ``rate`` omitted: as fast as the broker delivers, with at most ``window`` messages per
  subscriber published but not yet delivered (so the figure is delivery, not buffering).

Then ``ping_duration`` seconds of sequential PING round trips on one connection.  Every loop
is bounded in time and in count.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import time

import numpy as np

__all__ = ["run_pubsub", "SCHEMA"]

#: the ``schema`` field of every JSON document ``mip bench pubsub`` writes
SCHEMA = "mip-bench/pubsub/1"

_STAMP = struct.Struct("<dQ")  # publish time (perf_counter seconds), sequence number


@dataclasses.dataclass
class _Counts:
    """Messages published and delivered (all, and inside the measured window)."""

    delivered: int = 0
    measured_delivered: int = 0
    published: int = 0
    measured_published: int = 0
    last_delivery: float | None = None  # perf_counter time of the last measured delivery


def _percentiles(latencies) -> dict:
    if len(latencies) == 0:
        return {k: None for k in ("min", "mean", "p50", "p90", "p99", "max")}
    a = np.asarray(latencies) * 1e3
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"min": float(a.min()), "mean": float(a.mean()), "p50": float(p50),
            "p90": float(p90), "p99": float(p99), "max": float(a.max())}


async def run_pubsub(url: str, *, publishers: int = 1, subscribers: int = 1, size: int = 64,
                     rate: float | None = None, duration: float = 3.0, warmup: float = 0.5,
                     topic: str = "mip.bench", ping_duration: float = 1.0,
                     window: int = 1000, max_messages: int = 10_000_000,
                     drain_timeout: float = 2.0, label: str | None = None,
                     subscriber_urls: list[str] | None = None, settle: float = 0.0,
                     progress=None) -> dict:
    """Run the pub/sub and PING measurements and return the JSON document.

    Args:
        url: the broker, ``tcp://HOST:PORT`` or ``unix:///PATH``.
        publishers / subscribers: connections of each kind.
        size: octets of data per message (at least 16: the stamp).
        rate: messages per second over all publishers (None: as fast as delivered).
        duration / warmup: seconds measured / seconds run before measuring.
        window: messages per subscriber in flight when ``rate`` is None.
        max_messages: most messages published in one run.
        drain_timeout: seconds to wait, after publishing stops, for the last deliveries.
        ping_duration: seconds of PING round trips (0: none).
        subscriber_urls: brokers the subscribers connect to, in turn (default: ``url``; the
            publishers always use ``url``): for brokers joined with ``--cluster``.
        settle: seconds to wait after subscribing before publishing (a cluster's brokers
            subscribe in Redis asynchronously).
    """
    import mip
    from mip.bench.infer import machine_info
    from mip.net.msip_client import AsyncClient

    if publishers < 1 or subscribers < 0 or duration <= 0:
        raise ValueError("need publishers >= 1, subscribers >= 0 and duration > 0 s")
    size = max(int(size), _STAMP.size)
    pad = b"\0" * (size - _STAMP.size)
    pc = time.perf_counter
    state = _Counts()
    latencies: list[float] = []
    room = asyncio.Event()
    room.set()
    t_warm = t_end = float("inf")

    def on_event(event) -> None:
        now = pc()
        t_pub = _STAMP.unpack_from(event.data)[0]
        state.delivered += 1
        if t_pub >= t_warm:
            state.measured_delivered += 1
            latencies.append(now - t_pub)
            state.last_delivery = now
        if not room.is_set() and _in_flight() <= window // 2:
            room.set()

    def _in_flight() -> int:
        return state.published - state.delivered // max(subscribers, 1)

    sub_urls = list(subscriber_urls or [url])
    subs = [AsyncClient(sub_urls[k % len(sub_urls)], reconnect=False) for k in range(subscribers)]
    pubs = [AsyncClient(url, reconnect=False) for _ in range(publishers)]
    clients = subs + pubs
    cpu0 = time.process_time()
    wall0 = pc()
    try:
        for c in clients:
            await c.connect()
        for c in subs:
            await c.subscribe(topic, on_event)
        if settle > 0:
            await asyncio.sleep(settle)
        t_start = pc()
        t_warm = t_start + warmup
        t_end = t_warm + duration
        ticker = (asyncio.get_running_loop().create_task(progress.follow_pubsub(state, t_start, t_end))
                  if progress is not None else None)

        async def publish_paced(client, rate_each: float, offset: float) -> None:
            interval = 1.0 / rate_each
            i = 0
            while state.published < max_messages:
                t_sched = t_start + offset + i * interval
                if t_sched >= t_end:
                    return
                now = pc()
                if t_sched > now:
                    await asyncio.sleep(t_sched - now)
                client.publish_nowait(topic, _STAMP.pack(t_sched, i) + pad)
                _count(t_sched)
                i += 1

        async def publish_windowed(client) -> None:
            i = 0
            while state.published < max_messages:
                now = pc()
                if now >= t_end:
                    return
                if subscribers and _in_flight() >= window:
                    room.clear()
                    try:
                        await asyncio.wait_for(room.wait(), max(0.0, t_end - now))
                    except asyncio.TimeoutError:
                        return
                    continue
                await client.publish(topic, _STAMP.pack(pc(), i) + pad)
                _count(now)
                i += 1
                if i % 64 == 0:
                    await asyncio.sleep(0)  # let deliveries in

        def _count(t: float) -> None:
            state.published += 1
            if t_warm <= t < t_end:
                state.measured_published += 1

        if rate:
            tasks = [publish_paced(c, rate / publishers, k / rate) for k, c in enumerate(pubs)]
        else:
            tasks = [publish_windowed(c) for c in pubs]
        await asyncio.wait_for(asyncio.gather(*tasks), duration + warmup + drain_timeout + 5.0)
        t_published = pc()
        expected = state.published * subscribers
        deadline = pc() + drain_timeout
        while state.delivered < expected and pc() < deadline:
            await asyncio.sleep(0.01)
        t_drained = pc()
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)

        ping_lat: list[float] = []
        if ping_duration > 0:
            pinger = pubs[0]
            p_end = pc() + ping_duration
            while pc() < p_end and len(ping_lat) < 1_000_000:
                ping_lat.append(await pinger.ping())
        cpu = time.process_time() - cpu0
        wall = pc() - wall0
    finally:
        for c in clients:
            try:
                await c.close()
            except Exception:  # pragma: no cover - closing a broken connection
                pass
    lost = max(0, state.published * subscribers - state.delivered)
    last = state.last_delivery if state.last_delivery is not None else t_drained
    measured_window = max(last - t_warm, 1e-9)
    return {
        "schema": SCHEMA,
        "tool": "mip bench pubsub",
        "mip_version": mip.__version__,
        "label": label or f"msip {url}",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target": {"url": url, "subscriber_urls": sub_urls},
        "config": {"publishers": publishers, "subscribers": subscribers, "size": size,
                   "rate": rate, "duration_s": duration, "warmup_s": warmup, "topic": topic,
                   "window": window, "max_messages": max_messages,
                   "ping_duration_s": ping_duration},
        "machine": machine_info(),
        "pubsub": {
            "published": state.published,
            "delivered": state.delivered,
            "lost": lost,
            "measured_published": state.measured_published,
            "measured_delivered": state.measured_delivered,
            "published_per_s": state.measured_published / duration,
            "delivered_per_s": state.measured_delivered / measured_window,
            "publish_phase_s": t_published - t_start,
            "latency_ms": _percentiles(latencies),
        },
        "ping": {"count": len(ping_lat),
                 "per_s": len(ping_lat) / ping_duration if ping_duration > 0 else 0.0,
                 "latency_ms": _percentiles(ping_lat)},
        "client_cpu_s": cpu,
        "client_cpu_percent": 100.0 * cpu / wall if wall > 0 else 0.0,
    }
