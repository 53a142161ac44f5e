"""The Open Inference Protocol over HTTP/1.1: the ASGI app (:func:`build_app`), its routes
and who may call them; served by :class:`mip.net.http_server.HttpServer`.

Endpoints (``{v}`` parts optional)::

    GET  /v2/health/live                     200 {"live": true}
    GET  /v2/health/ready                    200 {"ready": true}, 503 while not ready
    GET  /v2                                 server metadata
    GET  /v2/models/{name}[/versions/{v}]    model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready   200, 503 when not ready, 404 unknown
    POST /v2/models/{name}[/versions/{v}]/infer   JSON tensors and binary tensor data
    GET  /v2/models/{name}[/versions/{v}]/config  the configuration (Triton's ModelConfig)
    GET  /v2/models[/{name}[/versions/{v}]]/stats  statistics: {"model_stats": [...]}
    POST /v2/repository/index                [{"name", "version", "state", "reason"}]
    POST /v2/repository/models/{name}/load
    POST /v2/repository/models/{name}/unload
    POST /v2/systemsharedmemory/region/{region}/register   {"key", "offset", "byte_size"}
    POST /v2/systemsharedmemory[/region/{region}]/unregister
    GET  /v2/systemsharedmemory[/region/{region}]/status   [{"name", "key", "offset", "byte_size"}]
    *    /v2/cudasharedmemory/...            400: CUDA shared memory is not supported
    GET  /metrics                            Prometheus text format

Inference (binary tensor data included) is answered by ``rest_infer.py``, the other
endpoints by ``rest_handlers.py``, both through one :class:`~mip.net.http_router.Router`.

Errors answer ``{"error": "..."}`` with the ``http_status`` of the
:class:`~mip.errors.ServingError`. With a :class:`~mip.frontends.auth.Guard`, the areas it
protects (:func:`area_of`) answer 401 (``WWW-Authenticate: Bearer``) without credentials
that verify, and 429 (``Retry-After``) to an address past its failure budget; health
endpoints never ask.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from mip.errors import ServingError, TooManyAuthFailures, Unauthenticated
from mip.frontends.dataplane import DataPlane
from mip.frontends.oip import shm
from mip.frontends.oip.rest_handlers import RestHandlers
from mip.frontends.oip.rest_infer import InferCall, InferEndpoint
from mip.net.http_router import Reply, Route, Router, endpoint, error_response, send_reply

if TYPE_CHECKING:
    from mip.frontends.auth import Guard

__all__ = ["DEFAULT_MAX_BODY_SIZE", "RestApp", "area_of", "build_app"]

#: largest request body, in octets (after decompression), unless configured.
DEFAULT_MAX_BODY_SIZE = 64 << 20

_GET, _POST = ("GET",), ("POST",)
_MODEL, _VERSION = "/v2/models/{name}", "/v2/models/{name}/versions/{version}"
_SHM = "/v2/systemsharedmemory"


def _per_model(suffix: str, handler: str, methods: tuple[str, ...], area: str | None):
    """A model's endpoint, and the same for one version of it."""
    return [(f"{_MODEL}{suffix}", handler, methods, area),
            (f"{_VERSION}{suffix}", handler, methods, area)]


#: (path, handler: a RestHandlers method or "infer", methods, area of
#: mip.frontends.auth.AREAS or None for none), matched first to last.
_ROUTES: list[tuple[str, str, tuple[str, ...], str | None]] = [
    *_per_model("/infer", "infer", _POST, "inference"),
    ("/v2/health/live", "live", _GET, None),
    ("/v2/health/ready", "ready", _GET, None),
    ("/v2", "server_metadata", _GET, "metadata"),
    ("/v2/models/stats", "model_stats", _GET, "metrics"),
    *_per_model("/config", "model_config", _GET, "metadata"),
    *_per_model("/stats", "model_stats", _GET, "metrics"),
    *_per_model("", "model_metadata", _GET, "metadata"),
    *_per_model("/ready", "model_ready", _GET, None),
    ("/v2/repository/index", "repository_index", _POST, "control"),
    ("/v2/repository/models/{name}/load", "repository_load", _POST, "control"),
    ("/v2/repository/models/{name}/unload", "repository_unload", _POST, "control"),
    # what inference through shared memory needs
    (f"{_SHM}/region/{{region}}/register", "shm_register", _POST, "inference"),
    (f"{_SHM}/region/{{region}}/unregister", "shm_unregister", _POST, "inference"),
    (f"{_SHM}/unregister", "shm_unregister", _POST, "inference"),
    (f"{_SHM}/region/{{region}}/status", "shm_status", _GET, "inference"),
    (f"{_SHM}/status", "shm_status", _GET, "inference"),
    ("/v2/cudasharedmemory/{rest:path}", "cuda_shm", ("GET", "POST"), "inference"),
    ("/metrics", "metrics_text", _GET, "metrics"),
]
#: the area of a path under /v2 that no route takes, by its first segment
_UNROUTED = {"health": None, "repository": "control", "systemsharedmemory": "inference",
             "cudasharedmemory": "inference"}
_AREAS = Router([Route.of(path, handler, methods, area)
                 for path, handler, methods, area in _ROUTES])


def area_of(path: str) -> str | None:
    """The area of :data:`mip.frontends.auth.AREAS` a REST path is in (``None``: health,
    and ``/v1``, which checks its own credentials). Paths under ``/v2`` that no endpoint
    serves are ``metadata``."""
    route, _ = _AREAS.match(path)
    return route.area if route is not None else _unrouted_area(path)


def _unrouted_area(path: str) -> str | None:
    if path != "/v2" and not path.startswith("/v2/"):
        return None
    return _UNROUTED.get(path.split("/", 3)[2] if path != "/v2" else "", "metadata")


class RestApp:
    """The ASGI app: one :class:`~mip.net.http_router.Router` for every endpoint, behind
    ``guard`` for the areas it protects. Inference requests may also be answered without
    ASGI, straight from :class:`~mip.net.http_server.HttpServer`'s listener
    (:meth:`direct`).

    Attributes:
        router: the routes (the ``/v2`` ones, then ``extra_routes``).
        dataplane: the :class:`~mip.frontends.dataplane.DataPlane` every endpoint uses.
        metrics: what ``/metrics`` renders.
        engine: the engine served.
        infer: the inference endpoint.
    """

    def __init__(self, router: Router, dataplane: DataPlane, metrics: Any,
                 guard: Guard | None = None, infer: InferEndpoint | None = None):
        self.router = router
        self.dataplane = dataplane
        self.engine = dataplane.engine
        self.metrics = metrics
        self.guard = guard
        self.infer = infer
        self._guarded = None if infer is None or guard is None else _Guarded(guard, infer)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no lifespan, no websockets
            return
        route, params = self.router.match(scope["path"])
        guard = self.guard
        if guard is not None and guard.protects(
                route.area if route is not None else _unrouted_area(scope["path"])):
            headers, host = _credentials(scope["headers"]), _host(scope.get("client"))
            try:
                if guard.immediate:
                    guard.authenticate_now(headers, host)
                else:
                    await guard.authenticate(headers, host)
            except (Unauthenticated, TooManyAuthFailures) as exc:
                await send_reply(send, _refusal(exc))
                return
        await self.router.endpoint_of(route, params, scope)(scope, receive, send)

    def direct(self, method: str, path: str) -> tuple[Any, dict[str, str]] | None:
        """What answers a request without ASGI (see :mod:`mip.net.http_direct`): for an
        inference request, an object whose ``open(params, headers, client)`` gives an
        :class:`~mip.frontends.oip.rest_infer.InferCall` (or a refusal's reply), and the
        path parameters; ``None`` for every other request, and for inference behind a
        guard that must wait for its authenticator (those go through ASGI)."""
        if method != "POST" or self.infer is None:
            return None
        route, params = self.router.match(path)
        if route is None or route.endpoint is not self.infer:
            return None
        guard = self.guard
        if guard is None or not guard.protects(route.area):
            return self.infer, params
        return (self._guarded, params) if guard.immediate else None


class _Guarded:
    """The inference endpoint behind a guard that decides at once."""

    __slots__ = ("guard", "endpoint")

    def __init__(self, guard: Guard, endpoint: InferEndpoint):
        self.guard, self.endpoint = guard, endpoint

    def open(self, params: dict[str, str], headers: list[tuple[bytes, bytes]],
             client: tuple[str, int] | None) -> InferCall | Reply:
        try:
            self.guard.authenticate_now(_credentials(headers), _host(client))
        except (Unauthenticated, TooManyAuthFailures) as exc:
            return _refusal(exc)
        return self.endpoint.open(params, headers, client)


def _credentials(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The headers a guard reads."""
    found = {}
    for key, value in headers:
        if key == b"authorization" or key == b"x-api-key":
            found[key.decode("latin-1")] = value.decode("latin-1")
    return found


def _host(client: tuple[str, int] | None) -> str | None:
    return client[0] if client else None


def _refusal(exc: ServingError) -> Reply:
    """The reply to a request the guard refused: 401 with a challenge, or 429 with
    ``Retry-After``."""
    retry_after = getattr(exc, "retry_after", None)
    return error_response(exc, (_CHALLENGE,) if retry_after is None
                          else ((b"retry-after", str(retry_after).encode()),))


_CHALLENGE = (b"www-authenticate", b'Bearer realm="mip"')


def build_app(engine, *, extra_routes: Sequence[BaseRoute] = (),
              metrics: Any = None, max_body_size: int = DEFAULT_MAX_BODY_SIZE,
              request_timeout: float | None = None, guard: Guard | None = None,
              access_log: Any = None,
              shared_memory: shm.SystemSharedMemory | None = None) -> RestApp:
    """The ASGI app of the protocol's REST form, for uvicorn or any ASGI server.

    Args:
        engine: the :class:`~mip.serving.engine.Engine` every frontend shares.
        extra_routes: more Starlette routes or ``Mount`` s served by the same app, e.g.
            ``[Mount("/v1", app=other)]``; they are matched after the ``/v2`` routes.
        metrics: a :class:`~mip.frontends.oip.metrics.Metrics` (shared with the gRPC
            frontend); ``None`` creates one for this app. ``/metrics`` renders it.
        max_body_size: largest request body, in octets (after decompression).
        request_timeout: seconds a request may take, queueing included (``None``: no
            limit beyond the request's ``timeout`` parameter).
        guard: a :class:`~mip.frontends.auth.Guard` whose protected areas need
            credentials (``None``: every ``/v2`` endpoint and ``/metrics`` are open).
        access_log: an :class:`~mip.frontends.access.AccessLog` for the inference
            requests, or ``None``.
        shared_memory: the :class:`~mip.frontends.oip.shm.SystemSharedMemory` regions
            (``None``: those every frontend of ``engine`` shares, see
            :func:`~mip.frontends.oip.shm.registry_of`).
    """
    if metrics is None:
        from mip.frontends.oip.metrics import Metrics

        metrics = Metrics(engine)
    dataplane = DataPlane(engine, metrics, request_timeout, access_log)
    regions = shm.registry_of(engine, shared_memory)
    handlers = RestHandlers(dataplane, max_body_size, metrics, regions)
    infer = InferEndpoint(dataplane, max_body_size, regions)
    routes = [Route.of(path, infer if name == "infer" else endpoint(getattr(handlers, name)),
                       methods, area)
              for path, name, methods, area in _ROUTES]
    return RestApp(Router(routes, extra_routes), dataplane, metrics, guard, infer)
