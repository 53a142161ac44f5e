"""The router of an HTTP/1.1 ASGI app, and its one way of answering errors.

Routes are path templates (``/v2/models/{name}/infer``; ``{rest:path}`` takes the rest of
the path, slashes included) matched by one regular expression of all of them, first
listed first. Every endpoint is a plain ASGI callable; :func:`endpoint` makes one of an
``async def handler(request) -> Response``. A matched route's parameters are in
``scope["path_params"]``.

A whole response can be made first and sent after (:data:`Reply`, :func:`send_reply`), so
the same response goes out through ASGI or straight from a listener.

Errors are answered ``{"error": "..."}`` (:func:`send_error`, :func:`error_response`) with the HTTP status of
:mod:`mip.errors`' tree: :class:`~mip.errors.NoSuchEndpoint` (404) for a path no route
takes, :class:`~mip.errors.MethodNotAllowed` (405, with ``Allow``) for a method its route
does not take, the ``http_status`` of any other :class:`~mip.errors.ServingError` an
endpoint raises, 400 for a body that is not JSON and 500 (logged) for anything else.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from mip.errors import MethodNotAllowed, NoSuchEndpoint, ServingError

__all__ = ["Reply", "Route", "Router", "endpoint", "error_body", "error_reply",
           "error_response", "send_error", "send_reply"]

log = logging.getLogger("mip.net.http")

_JSON = (b"content-type", b"application/json")

#: A whole response: ``(status, headers, body parts)``; header names in lowercase, a
#: ``content-length`` header among them, the parts sent one after the other. A plain
#: tuple: one is made a request.
Reply = tuple[int, list[tuple[bytes, bytes]], list[bytes]]
_PARAMETER = re.compile(r"\{(\w+)(:path)?\}")


@dataclasses.dataclass(frozen=True)
class Route:
    """One endpoint of a :class:`Router`.

    Attributes:
        path: the path template.
        endpoint: the ASGI callable that answers it.
        methods: the methods it takes (``GET`` brings ``HEAD``).
        area: what the application groups it in (e.g. to decide who may call it).
    """

    path: str
    endpoint: Any
    methods: frozenset[str] = frozenset({"GET", "HEAD"})
    area: str | None = None

    @classmethod
    def of(cls, path: str, endpoint: Any, methods: Iterable[str] = ("GET",),
           area: str | None = None) -> Route:
        named = frozenset(methods)
        return cls(path, endpoint, named | {"HEAD"} if "GET" in named else named, area)


class Router:
    """Answers each request with the endpoint of the first route whose template matches
    its path, else with the first of ``mounts`` (Starlette routes, e.g. a ``Mount``) that
    takes it, else 404.

    Attributes:
        routes: the routes, in matching order.
    """

    def __init__(self, routes: Sequence[Route], mounts: Sequence[BaseRoute] = ()):
        self.routes = list(routes)
        self.mounts = list(mounts)
        parts: list[str] = []
        #: the number of a route's group -> (route, its parameters' names, their first group)
        self._groups: dict[int, tuple[Route, tuple[str, ...], int]] = {}
        group = 1
        for route in self.routes:
            names, pattern, position = [], [], 0
            for parameter in _PARAMETER.finditer(route.path):
                pattern.append(re.escape(route.path[position:parameter.start()]))
                pattern.append("(.*)" if parameter.group(2) else "([^/]+)")
                names.append(parameter.group(1))
                position = parameter.end()
            pattern.append(re.escape(route.path[position:]))
            parts.append(f"({''.join(pattern)})")
            self._groups[group] = (route, tuple(names), group + 1)
            group += 1 + len(names)
        self._pattern = re.compile("|".join(parts))

    def match(self, path: str) -> tuple[Route | None, dict[str, str]]:
        """The route that takes ``path`` and its parameters (``None, {}``: none)."""
        found = self._pattern.fullmatch(path)
        if found is None:
            return None, {}
        route, names, first = self._groups[found.lastindex or 0]
        if len(names) == 1:  # the most frequent (inference): no more than this
            return route, {names[0]: found[first]}
        if not names:
            return route, {}
        return route, dict(zip(names, found.groups()[first - 1:first - 1 + len(names)]))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route, params = self.match(scope["path"])
        await self.endpoint_of(route, params, scope)(scope, receive, send)

    def endpoint_of(self, route: Route | None, params: dict[str, str],
                    scope: Scope) -> ASGIApp:
        """What answers a request whose path :meth:`match` found ``route, params`` for:
        the route's endpoint (``params`` are then the scope's ``path_params``), else a
        mount's, else an error reply."""
        if route is not None and scope["method"] in route.methods:
            scope["path_params"] = params
            return route.endpoint
        return self._unrouted

    async def _unrouted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A request no route takes: a mount's, else 404, or 405 for a route's path."""
        route, _ = self.match(scope["path"])
        if route is None:
            for mount in self.mounts:
                matched, child = mount.matches(scope)
                if matched is Match.FULL:
                    scope.update(child)
                    await mount.handle(scope, receive, send)
                    return
            await send_error(send, NoSuchEndpoint(f"no endpoint at {scope['path']}"))
            return
        allowed = ", ".join(sorted(route.methods))
        await send_error(send, MethodNotAllowed(
            f"{route.path} does not take {scope['method']} (only {allowed})"),
            headers=((b"allow", allowed.encode()),))


def endpoint(handler: Callable[[Request], Awaitable[Response]]) -> ASGIApp:
    """An ASGI endpoint of ``async def handler(request) -> Response``; what it raises is
    answered by :func:`send_error`."""
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await handler(Request(scope, receive))
        except Exception as exc:
            await send_error(send, exc, scope=scope)
            return
        await response(scope, receive, send)

    app.__name__ = getattr(handler, "__name__", "endpoint")
    return app


def error_reply(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and message an exception is answered with."""
    if isinstance(exc, ServingError):
        return exc.http_status, str(exc)
    if isinstance(exc, orjson.JSONDecodeError):
        return 400, f"the request body is not valid JSON: {exc}"
    return 500, f"internal error: {type(exc).__name__}: {exc}"


def error_body(message: str) -> bytes:
    """The JSON body of an error reply."""
    return orjson.dumps({"error": message})


def error_response(exc: BaseException, headers: Sequence[tuple[bytes, bytes]] = (),
                   where: str | None = None) -> Reply:
    """The :data:`Reply` of ``exc`` (see :func:`error_reply`) with ``headers``; an
    exception outside the error tree (a bug) is logged, naming the request (``where``:
    its method and path)."""
    status, message = error_reply(exc)
    if status == 500 and not isinstance(exc, ServingError):
        log.error("%s failed", where or "a request", exc_info=exc)
    body = error_body(message)
    return status, [_JSON, (b"content-length", b"%d" % len(body)), *headers], [body]


async def send_reply(send: Send, reply: Reply) -> None:
    """Send ``reply`` through ASGI."""
    status, headers, parts = reply
    await send({"type": "http.response.start", "status": status, "headers": headers})
    last = len(parts) - 1
    for index, part in enumerate(parts):
        await send({"type": "http.response.body", "body": part, "more_body": index < last})


async def send_error(send: Send, exc: BaseException,
                     headers: Sequence[tuple[bytes, bytes]] = (), scope: Scope | None = None) -> None:
    """Answer with ``exc`` (see :func:`error_response`) and ``headers``; an exception
    outside the error tree (a bug) is logged with the request's method and path (from
    ``scope``)."""
    where = f"{scope.get('method')} {scope.get('path')}" if scope else None
    await send_reply(send, error_response(exc, headers, where))
