"""Push job outcomes to an MSIP broker: topic ``jobs.{request_id}``.

The event's data is the same JSON document ``GET /v1/inference/{request_id}`` answers
once the job is finished, so a client may subscribe instead of polling. Publishing is
best effort: the outcome is stored in the queue first, and a broker that is down only
costs a log line (the client connection reconnects on its own).
"""

from __future__ import annotations

import json
import logging

__all__ = ["OutcomePublisher", "topic_for"]

log = logging.getLogger("mip.miaas")


def topic_for(request_id: str) -> str:
    """The MSIP topic a job's outcome is published on."""
    return f"jobs.{request_id}"


class OutcomePublisher:
    """Publishes outcomes over one MSIP connection (HELLO once, then PUBLISH per job).

    Args:
        url: the broker, ``tcp://HOST:PORT`` or ``unix:///PATH``.
        ssl: an ``ssl.SSLContext`` to connect with TLS, or ``None``.
        timeout: seconds to wait for the connection and the HELLO reply.
    """

    def __init__(self, url: str, *, ssl=None, timeout: float = 5.0):
        self.url = url
        self.ssl = ssl
        self.timeout = timeout
        self._client = None
        self.published = 0  #: outcomes handed to the broker

    async def _connected(self):
        if self._client is None:
            from mip.net.msip_client import AsyncClient

            client = AsyncClient(self.url, ssl=self.ssl, request_timeout=self.timeout,
                                 reconnect=True, max_reconnect_attempts=None)
            await client.connect()
            self._client = client
        return self._client

    async def publish(self, request_id: str, document: dict) -> bool:
        """Publish ``document`` (JSON) on :func:`topic_for` ``(request_id)``; ``False`` when
        the broker could not be reached (logged, never raised)."""
        try:
            client = await self._connected()
            await client.publish(topic_for(request_id), json.dumps(document).encode())
        except Exception as exc:  # best effort: the outcome is already stored
            log.warning("could not publish the outcome of job %s to %s: %s", request_id,
                        self.url, exc)
            if self._client is not None and not self._client.connected:
                await self.close()
            return False
        self.published += 1
        return True

    async def close(self) -> None:
        """Close the broker connection."""
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # closing a dead connection: nothing left to do
                pass
