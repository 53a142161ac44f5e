"""The ``/v1`` REST API: asynchronous inference jobs, the model registry, health.

``build_miaas_app(engine, config)`` returns a Starlette app whose routes are relative
(``/health``, ``/inference``, …): mount it as ``Mount("/v1", app=...)`` beside the
``/v2`` routes, and start/stop its :class:`MiaasService` with the listener (a mounted
app's own lifespan is not run by Starlette). :func:`standalone_app` serves it alone.

``model_id`` is ``name`` (the highest ready version) or ``name:version``.
``input_data`` and ``result`` are Open Inference Protocol REST bodies.
Every error is ``{"error": {"code", "message", "details"?}}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from mip.errors import ApiError, ServingError, TooLarge, TooManyAuthFailures, Unauthenticated
from mip.frontends.auth import Authenticator, Guard, Identity, load_api_keys
from mip.frontends.dataplane import DataPlane
from mip.frontends.miaas.openapi import openapi_document
from mip.frontends.miaas.runner import JobRunner, split_model_id
from mip.frontends.miaas.tensors import decode_inputs
from mip.jobs.queue import JobQueue, open_queue
from mip.jobs.worker import JobWorker, error_code, isotime, job_document
from mip.net.http_body import request_body
from mip.net.ratelimit import FailureLimit, RateLimiter, open_rate_limiter

__all__ = [
    "MiaasConfig",
    "MiaasService",
    "build_miaas_app",
    "config_from_args",
    "mount_miaas",
    "standalone_app",
]

log = logging.getLogger("mip.miaas")

_SUBMIT_FIELDS = {"model_id", "input_data", "parameters"}
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mip"'}


@dataclass
class MiaasConfig:
    """Settings of the ``/v1`` API. Sizes in octets, times in seconds.

    Attributes:
        api_keys: SHA-256 hex digests of accepted API keys (see ``auth.load_api_keys``).
        jwt_issuer / jwt_audience / jwt_keys: OAuth2 JWT verification (``jwt_keys``: a
            JWKS file, a JWKS URL or a PEM public key; JWTs are refused when unset).
        open_health: answer ``GET /v1/health`` without credentials (for probes).
        rate_limit: requests per identity, ``"N"`` (per minute) or ``"N/unit"``.
        rate_limit_redis: keep rate-limit and failure-limit state in this Redis (default:
            the queue's Redis when the queue is Redis, else in memory).
        auth_failures: failed authentications per peer address (an IPv4 address or an
            IPv6 /64), ``"N"`` (per minute) or ``"N/unit"``; past them the peer gets 429
            before its credentials are looked at.
        auth_failure_peers: peers whose failures are tracked in memory (the least recently
            failed are forgotten first; about 250 octets each).
        queue: ``redis://…`` or a SQLite file path (``None``: the default state file).
        max_jobs: unfinished jobs the queue holds before answering 503.
        retention: how long finished jobs and results are kept.
        lease: how long a worker holds a job before it is delivered again.
        max_attempts: deliveries before a job that never finishes is failed.
        job_workers: jobs this process runs at once (0: none, workers run elsewhere).
        msip_push: MSIP broker URL to publish outcomes on ``jobs.{request_id}``.
        max_body: largest request body accepted, before and after its Content-Encoding
            (gzip, deflate) is undone (413 beyond).
        client_ssl: an ``ssl.SSLContext`` for connections to Redis (``rediss://``) and
            the MSIP broker.
    """

    api_keys: list[str] = field(default_factory=list)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_keys: str | None = None
    open_health: bool = False
    rate_limit: str = "1000/min"
    rate_limit_redis: str | None = None
    auth_failures: str = "10/min"
    auth_failure_peers: int = 100_000
    queue: str | None = None
    #: HOST:PORT of the server the default queue belongs to (mip serve's HTTP listener):
    #: with no ``queue``, that server's own SQLite file, held exclusively
    queue_owner: str | None = None
    max_jobs: int = 10_000
    retention: float = 86_400.0
    lease: float = 30.0
    max_attempts: int = 5
    job_workers: int = 4
    msip_push: str | None = None
    max_body: int = 64 << 20
    client_ssl: object = None


def error_response(status: int, code: str, message: str, details: dict | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """The error body every failure of this API answers with."""
    error: dict[str, object] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status, headers=headers)


class MiaasService:
    """The API's state: credentials, rate limiter, job queue, in-process workers and the
    outcome publisher. :meth:`start` / :meth:`stop` open and close them.

    ``guard``: the server's :class:`~mip.frontends.auth.Guard`, shared with its other
    frontends (its credentials and failure budgets then come from it, not from
    ``config``); ``None`` makes one from ``config`` for this API alone.
    """

    def __init__(self, engine, config: MiaasConfig | None = None, metrics=None,
                 guard: Guard | None = None, access_log=None):
        self.engine = engine
        self.metrics = metrics  # the server's, so jobs are counted with the other protocols
        self.access_log = access_log  # ... and logged with them
        self.dataplane = DataPlane(engine, metrics)
        self.config = config or MiaasConfig()
        c = self.config
        self.queue: JobQueue = open_queue(c.queue, owner=c.queue_owner, max_jobs=c.max_jobs,
                                          retention=c.retention,
                                          lease=c.lease, max_attempts=c.max_attempts,
                                          ssl_context=c.client_ssl)
        limiter_redis = c.rate_limit_redis or (
            c.queue if c.queue and c.queue.startswith(("redis://", "rediss://")) else None)
        self.limiter: RateLimiter = open_rate_limiter(c.rate_limit, limiter_redis, c.client_ssl)
        self._own_guard = guard is None
        if guard is None:
            guard = Guard(Authenticator(c.api_keys, jwt_issuer=c.jwt_issuer,
                                        jwt_audience=c.jwt_audience, jwt_keys=c.jwt_keys),
                          failures=FailureLimit(c.auth_failures, limiter_redis, c.client_ssl,
                                                logger=log, max_peers=c.auth_failure_peers))
        self.guard = guard
        self.auth = guard.authenticator
        self.failures = guard.failures
        self.publisher = None
        if c.msip_push:
            from mip.jobs.push import OutcomePublisher

            self.publisher = OutcomePublisher(c.msip_push, ssl=c.client_ssl)
        self.worker: JobWorker | None = None
        self._collector: Any = None
        self._openapi = openapi_document(open_health=c.open_health, rate=c.rate_limit,
                                         auth_failures=c.auth_failures)
        self.started = False

    async def start(self) -> None:
        """Open the queue and start the in-process workers (if ``job_workers`` > 0)."""
        if self.started:
            return
        await self.queue.open()
        if self.metrics is not None:  # the queue's depth in /metrics
            from mip.frontends.oip.metrics import JobQueueCollector

            self._collector = JobQueueCollector(self.queue)
            self.metrics.add_collector(self._collector)
        if self.config.job_workers > 0:
            run_job = JobRunner(self.engine, self.metrics, access_log=self.access_log)
            self.worker = JobWorker(self.queue, run_job, concurrency=self.config.job_workers,
                                    publisher=self.publisher)
            self.worker.start()
        self.started = True

    async def stop(self, grace: float = 10.0) -> None:
        """Stop the workers (running jobs get ``grace`` seconds), close the queue, the
        limiter and the publisher."""
        if not self.started:
            return
        self.started = False
        if self.worker is not None:
            await self.worker.stop(grace)
            self.worker = None
        if self._collector is not None:
            self.metrics.remove_collector(self._collector)
            self._collector = None
        await self.queue.close()
        await self.limiter.close()
        if self._own_guard:
            await self.guard.close()
        if self.publisher is not None:
            await self.publisher.close()

    # -- the request path ------------------------------------------------------------

    async def _guard(self, request: Request, handler, *, public: bool = False) -> Response:
        headers: dict[str, str] = {}
        try:
            if not public:
                identity = await self._authenticate(request)
                decision = await self.limiter.check(identity.id)
                headers = decision.headers()
                if not decision.allowed:
                    raise ApiError(429, "rate_limited",
                                   f"more than {self.limiter.limit} requests in "
                                   f"{self.limiter.period:g} s; retry after "
                                   f"{headers['Retry-After']} s", headers=headers)
            response = await handler(request)
        except ApiError as exc:
            return error_response(exc.http_status, exc.code, str(exc), exc.details,
                                  exc.headers or headers)
        except ServingError as exc:
            return error_response(exc.http_status, error_code(exc), str(exc), headers=headers)
        except Exception as exc:  # a bug: answer in the API's shape, log the traceback
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}",
                                  headers=headers)
        response.headers.update(headers)
        return response

    async def _authenticate(self, request: Request) -> Identity:
        """The request's identity (see :meth:`Guard.authenticate`), or the API's 401 or
        429 error."""
        try:
            return await self.guard.authenticate(request.headers,
                                                 request.client.host if request.client else None)
        except Unauthenticated as exc:
            raise ApiError(401, "unauthorized", str(exc), headers=_CHALLENGE) from None
        except TooManyAuthFailures as exc:
            raise ApiError(429, "too_many_auth_failures", str(exc),
                           headers={"Retry-After": str(exc.retry_after)}) from None

    async def _read_json(self, request: Request):
        """The body (see :func:`~mip.net.http_body.request_body`), parsed as JSON."""
        try:
            body = await request_body(request.scope, request.receive, self.config.max_body)
        except TooLarge as exc:
            raise ApiError(413, "payload_too_large", str(exc)) from None
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None

    # -- handlers ----------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "healthy", "timestamp": isotime(time.time())})

    async def submit(self, request: Request) -> Response:
        body = await self._read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_request", "the body must be a JSON object")
        unknown = sorted(set(body) - _SUBMIT_FIELDS)
        if unknown:
            raise ApiError(400, "invalid_request", f"unknown fields: {', '.join(unknown)}",
                           {"allowed": sorted(_SUBMIT_FIELDS)})
        model_id = body.get("model_id")
        if not isinstance(model_id, str) or not model_id.strip(":"):
            raise ApiError(400, "invalid_request",
                           "'model_id' must be a string: 'name' or 'name:version'")
        if "input_data" not in body:
            raise ApiError(400, "invalid_request", "'input_data' is required")
        parameters = body.get("parameters")
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise ApiError(400, "invalid_request", "'parameters' must be an object")
        timeout = parameters.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, (int, float)) or timeout <= 0):
            raise ApiError(400, "invalid_request",
                           "'parameters.timeout' must be a positive number of seconds")
        name, version = split_model_id(model_id)
        chosen = self.dataplane.resolve(name, version)  # 404 / 503 for unknown/unready
        tensors, outputs = decode_inputs(body["input_data"])
        self.dataplane.validate(chosen, tensors, outputs)  # the engine's checks, now
        job = await self.queue.submit(model_id, body["input_data"], parameters)
        return JSONResponse({"request_id": job.request_id, "status": job.status},
                            status_code=202,
                            headers={"Location": f"/v1/inference/{job.request_id}"})

    async def job(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        job = await self.queue.get(request_id)
        if job is None:
            raise ApiError(404, "job_not_found", f"no job {request_id!r} (finished jobs are "
                           f"kept {self.config.retention:g} s)")
        return JSONResponse(job_document(job))

    def _versions(self):
        """(name, version, state, active) for every index entry."""
        active = {}
        for entry in self.engine.index():
            if entry.name not in active:
                try:
                    active[entry.name] = self.engine.resolve(entry.name).version
                except ServingError:
                    active[entry.name] = None
        return [(e.name, e.version, str(e.state), active[e.name] == e.version and bool(
            e.version)) for e in self.engine.index()]

    async def models(self, request: Request) -> Response:
        models = [{"id": f"{name}:{version}" if version else name, "name": name,
                   "version": version, "status": "active" if is_active else "deprecated",
                   "state": state, "ready": state == "READY"}
                  for name, version, state, is_active in self._versions()]
        return JSONResponse({"models": models})

    async def model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        name, version = split_model_id(model_id)
        metadata = self.engine.model_metadata(name, version)
        served = self.engine.resolve(name, version).version
        try:
            active = self.engine.resolve(name).version == served
        except ServingError:
            active = False

        def specs(items):
            return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                    for s in items]

        return JSONResponse({
            "id": f"{name}:{served}", "name": name, "version": served,
            "versions": list(metadata.versions), "status": "active" if active else "deprecated",
            "framework": metadata.platform, "input_schema": {"inputs": specs(metadata.inputs)},
            "output_schema": {"outputs": specs(metadata.outputs)}})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self._openapi)

    def routes(self) -> list[Route]:
        """The routes, relative to the ``/v1`` mount point."""

        def guarded(handler, public: bool = False):
            async def endpoint(request: Request) -> Response:
                return await self._guard(request, handler, public=public)
            endpoint.__name__ = handler.__name__
            return endpoint

        return [
            Route("/health", guarded(self.health, self.config.open_health), methods=["GET"]),
            Route("/inference", guarded(self.submit), methods=["POST"]),
            Route("/inference/{request_id}", guarded(self.job), methods=["GET"]),
            Route("/models", guarded(self.models), methods=["GET"]),
            Route("/models/{model_id}", guarded(self.model), methods=["GET"]),
            Route("/openapi.json", guarded(self.openapi), methods=["GET"]),
        ]


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's :class:`HTTPException` (404, 405) in the API's error shape."""
    if not isinstance(exc, HTTPException):
        raise exc
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(exc.status_code, codes.get(exc.status_code, "http_error"),
                          str(exc.detail), headers=getattr(exc, "headers", None))


def _lifespan(service: MiaasService):
    """A Starlette lifespan that starts ``service`` with the app and stops it after."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    return lifespan


def build_miaas_app(engine, config: MiaasConfig | None = None, *,
                    service: MiaasService | None = None, metrics=None,
                    access_log=None) -> Starlette:
    """The ``/v1`` app (routes relative to its mount point). ``app.state.service`` is its
    :class:`MiaasService`; its lifespan starts and stops the service when the app is run
    directly, and a parent that mounts it must call ``service.start()`` / ``stop()``."""
    service = service or MiaasService(engine, config, metrics, access_log=access_log)
    app = Starlette(routes=service.routes(), lifespan=_lifespan(service),
                    exception_handlers={HTTPException: _http_error})
    app.state.service = service
    return app


def standalone_app(engine, config: MiaasConfig | None = None) -> Starlette:
    """An app serving only ``/v1/…`` (for tests, benchmarks and embedding)."""
    miaas = build_miaas_app(engine, config)
    service = miaas.state.service
    app = Starlette(routes=[Mount("/v1", app=miaas)], lifespan=_lifespan(service),
                    exception_handlers={HTTPException: _http_error})
    app.state.service = service
    return app


def config_from_args(args) -> MiaasConfig:
    """A :class:`MiaasConfig` from ``mip serve`` options (missing options keep defaults)."""
    def get(name, default=None):
        return getattr(args, name, default)

    config = MiaasConfig(api_keys=load_api_keys(get("api_keys")))
    for name in ("jwt_issuer", "jwt_audience", "jwt_keys", "msip_push", "queue"):
        setattr(config, name, get(name))
    if config.queue is None:
        config.queue_owner = get("http")
    config.open_health = bool(get("open_health", False))
    for name in ("rate_limit", "auth_failures", "max_jobs", "retention", "lease",
                 "job_workers"):
        value = get(name)
        if value is not None:
            setattr(config, name, value)
    return config


def mount_miaas(engine, args, metrics=None,
                guard: Guard | None = None,
                access_log=None) -> tuple[list[Mount], MiaasService]:
    """The ``/v1`` routes for ``mip serve`` and the service to start with the listener::

        routes, service = mount_miaas(engine, args, guard=guard)
        app = build_app(engine, extra_routes=routes)      # the /v2 app
        await service.start() ... serve ... await service.stop()

    ``guard``: the server's credentials (:func:`~mip.frontends.auth.guard_from_args`),
    shared with its other listeners. Without one, the API's own come from ``args``; when
    no API key, ``MIP_API_KEYS`` or JWT key set is configured, a random API key is made
    for this run and printed once, so the API is never open by accident.
    """
    config = config_from_args(args)
    if guard is None:
        from mip.frontends.auth import guard_from_args

        config.api_keys = guard_from_args(args).authenticator.digests
    service = MiaasService(engine, config, metrics, guard, access_log=access_log)
    app = build_miaas_app(engine, config, service=service)
    return [Mount("/v1", app=app)], service
