"""An HTTP/1.1 listener: uvicorn serving an ASGI app on the running event loop, through
:class:`~mip.net.http_protocol.LimitedHttpProtocol` (the limits of :class:`HttpLimits`);
an app with a ``direct(method, path)`` method answers the requests it names without ASGI
(:mod:`mip.net.http_direct`).

The frontends build the ASGI app (``mip.frontends.oip.rest.build_app``); this module owns
the socket: bind, TLS, start and graceful stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from typing import Any

from mip.net import tls
from mip.net.http_protocol import HttpLimits, Listener
from mip.net.urls import tcp_address

__all__ = ["HttpLimits", "HttpServer"]


class HttpServer:
    """Serve an ASGI app with uvicorn on the running loop.

    Args:
        app: the ASGI application (its ``direct``, when it has one, is the listener's: see
            :mod:`mip.net.http_direct`).
        timeout_keep_alive: seconds an idle keep-alive connection (or a new one that has
            sent nothing) stays open.
        graceful_timeout: seconds :meth:`stop` waits for requests in progress.
        limits: connection, backpressure and timeout limits (:class:`HttpLimits`; its
            ``idle_timeout`` is ``timeout_keep_alive``).
        ssl_certfile / ssl_keyfile: serve HTTPS with this PEM certificate and key.
        ssl_ca_certs: require client certificates signed by these CAs (mutual TLS).
    """

    def __init__(self, app, *, timeout_keep_alive: float = 5.0, graceful_timeout: float = 5.0,
                 ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                 ssl_ca_certs: str | None = None, limits: HttpLimits | None = None):
        self.app = app
        limits = dataclasses.replace(limits or HttpLimits(), idle_timeout=timeout_keep_alive)
        self.listener = Listener(limits, getattr(app, "direct", None))
        #: (certificate, key, client CA) of HTTPS, or None
        self.tls = (ssl_certfile, ssl_keyfile, ssl_ca_certs) if ssl_certfile else None
        self.timeout_keep_alive = timeout_keep_alive
        self.graceful_timeout = graceful_timeout
        self.address: str | None = None
        self._server: Any = None
        self._ticker: asyncio.Future | None = None

    async def start(self, address: str, sock: socket.socket | None = None) -> str:
        """Listen on ``HOST:PORT`` (port 0: a free port), or accept on ``sock``, a listening
        socket bound to it elsewhere; returns the bound ``HOST:PORT``."""
        import uvicorn

        parsed = tcp_address(address, "HTTP address")
        # uvicorn takes fractions of seconds, although its annotations say int
        seconds: dict[str, Any] = {"timeout_keep_alive": self.timeout_keep_alive,
                                   "timeout_graceful_shutdown": self.graceful_timeout}
        config = uvicorn.Config(self.app, host=parsed.host, port=parsed.port,
                                http=self.listener.protocol_class(), ws="none",
                                lifespan="off", log_level="warning", access_log=False,
                                log_config=None,  # the process's logging stays as it is
                                proxy_headers=False, server_header=False, **seconds)
        config.load()
        if self.tls is not None:  # made by mip.net.tls, as every other listener's context
            cert, key, client_ca = self.tls
            config.ssl = tls.server_context(cert, key, client_ca=client_ca)
        server = uvicorn.Server(config)
        # startup/main_loop/shutdown rather than serve(): serve() installs signal handlers,
        # and the process that embeds this server owns those.
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=None if sock is None else [sock])
        except SystemExit:  # uvicorn exits when it cannot bind
            raise OSError(f"cannot listen for HTTP on {address}") from None
        if not server.started:
            raise OSError(f"cannot listen for HTTP on {address}")
        self._server = server
        self.listener.start()
        self._ticker = asyncio.ensure_future(server.main_loop())  # keeps the Date header fresh
        bound = server.servers[0].sockets[0].getsockname()[1]
        self.address = f"{parsed.host}:{bound}"
        return self.address

    async def stop(self) -> None:
        """Stop listening, let requests in progress finish (up to ``graceful_timeout``)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        self.listener.stop()
        if self._ticker is not None:
            await asyncio.gather(self._ticker, return_exceptions=True)
        await server.shutdown()
