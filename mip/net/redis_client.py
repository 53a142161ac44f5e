"""An asyncio Redis client from a ``redis://`` / ``rediss://`` URL, with TLS from an
``ssl.SSLContext`` (the job queue, the rate limiter and the failure budgets share it)."""

from __future__ import annotations

from typing import Any

__all__ = ["open_redis"]


def open_redis(url: str, ssl_context=None):
    """An asyncio Redis client for ``url`` (replies decoded as text). For ``rediss://``,
    ``ssl_context`` (an ``ssl.SSLContext``: the CAs to trust, a client certificate) is
    the TLS set-up; without it redis-py builds one from the URL's ``ssl_*`` query options
    (``?ssl_ca_certs=FILE``, ``ssl_certfile``, ``ssl_keyfile``) or the system CAs."""
    import redis.asyncio as aioredis

    if ssl_context is None or not url.startswith("rediss://"):
        return aioredis.from_url(url, decode_responses=True)
    from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection, parse_url

    class ContextSSLConnection(SSLConnection):
        # redis-py's asyncio connections take TLS settings only as file names: hand the
        # context to asyncio.open_connection() directly.
        def _connection_arguments(self):
            return {**Connection._connection_arguments(self), "ssl": ssl_context}

    options: dict[str, Any] = {**parse_url(url), "connection_class": ContextSSLConnection,
                               "decode_responses": True}
    return aioredis.Redis.from_pool(ConnectionPool(**options))
