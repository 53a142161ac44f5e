"""gRPC's standard health checking (``grpc.health.v1.Health``) and server reflection
(``grpc.reflection.v1`` and ``v1alpha``) beside the KServe v2 service, on both transports.

Health answers for the whole server (``""``) and for ``inference.GRPCInferenceService``:
SERVING while the engine is ready (:meth:`~mip.serving.engine.Engine.ready`: with strict
readiness, every model meant to be served is ready), NOT_SERVING otherwise and from the moment
the server starts shutting down. ``Watch`` sends the status, then every change of it (looked
at every :attr:`Health.poll` seconds). Kubernetes' gRPC probes and ``grpc_health_probe`` use
``Check``.

Reflection serves the descriptors of every service the listener has, so ``grpcurl`` and other
reflection clients need no ``.proto`` file (the package ships them too: ``mip proto``).
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

__all__ = ["HEALTH_SERVICE", "REFLECTION_SERVICES", "Health", "reflection"]

HEALTH_SERVICE = "grpc.health.v1.Health"
#: v1 is v1alpha under a new package name: the same messages on the wire
REFLECTION_SERVICES = ("grpc.reflection.v1.ServerReflection",
                       "grpc.reflection.v1alpha.ServerReflection")

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health:
    """The ``grpc.health.v1.Health`` service of one listener.

    Args:
        engine: what "ready" means (``engine.ready()``).
        services: the service names answered besides ``""`` (the whole server).
        poll: seconds between two looks at readiness for ``Watch``.
    """

    def __init__(self, engine, services, poll: float = 1.0):
        self.engine = engine
        self.services = frozenset({"", *services})
        self.poll = poll
        self.closing = False
        self._closed = asyncio.Event()

    def close(self) -> None:
        """The server is shutting down: NOT_SERVING from now on; watchers are told at once."""
        self.closing = True
        self._closed.set()

    def status(self, service: str):
        """The service's status, or None for a service this listener does not have."""
        if service not in self.services:
            return None
        return _SERVING if not self.closing and self.engine.ready() else _NOT_SERVING

    async def check(self, request, context):
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def watch(self, request, context):
        """The status now, then each change; ends NOT_SERVING when the server shuts down."""
        last = None
        while True:
            status = self.status(request.service)
            status = _UNKNOWN if status is None else status
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self.closing:
                return
            try:
                await asyncio.wait_for(self._closed.wait(), self.poll)
            except asyncio.TimeoutError:
                pass


def reflection(pool, services) -> ReflectionServicer:
    """grpcio-reflection's servicer over ``pool`` (the pool of the KServe v2 protocol), with
    the descriptors of health and reflection added to it, listing ``services``."""
    for module in (health_pb2, reflection_pb2):
        try:
            pool.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return ReflectionServicer(list(services), pool=pool)
