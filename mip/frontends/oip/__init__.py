"""The Open Inference Protocol (KServe v2) frontends: gRPC and REST on one engine.

* :class:`GrpcServer` (``mip.frontends.oip.grpc``): ``inference.GRPCInferenceService``
  with the protocol's nine RPCs and Triton's ``ModelStreamInfer``.
* :func:`build_app` (``mip.frontends.oip.rest``): the REST endpoints as an ASGI app
  that other routes can be mounted on; :class:`HttpServer` (``mip.net.http_server``)
  serves it with uvicorn.
* :class:`Metrics` (``mip.frontends.oip.metrics``): Triton-named Prometheus metrics,
  shared by both, at ``GET /metrics``.

The names are imported on first use, so the REST side works without grpcio and the
gRPC side without Starlette.
"""

from __future__ import annotations

__all__ = ["GrpcServer", "HttpServer", "Metrics", "build_app"]

_WHERE = {"GrpcServer": "mip.frontends.oip.grpc", "build_app": "mip.frontends.oip.rest",
          "HttpServer": "mip.net.http_server", "Metrics": "mip.frontends.oip.metrics"}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
