"""The REST frontend's endpoints other than inference (``rest_infer.py``): health,
metadata, the model repository, Triton's shared-memory extensions and ``/metrics``, each an
``async def handler(request) -> Response`` (see :func:`mip.net.http_router.endpoint`).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from mip.errors import ModelNotFound, NoSuchEndpoint, ServingError
from mip.frontends.dataplane import DataPlane
from mip.frontends.oip import shm
from mip.frontends.oip.rest_infer import BODY_SIZE_SETTING, json_object
from mip.net.http_body import request_body

__all__ = ["RestHandlers"]

_JSON_TYPE = "application/json"


class _Json(Response):
    media_type = _JSON_TYPE

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class RestHandlers:
    """The handlers, on one engine.

    Args:
        dataplane: the frontend's :class:`~mip.frontends.dataplane.DataPlane`.
        max_body_size: largest request body, in octets (after decompression).
        metrics: what ``/metrics`` renders (``None``: 404).
        shared_memory: the shared-memory regions.
    """

    def __init__(self, dataplane: DataPlane, max_body_size: int, metrics: Any,
                 shared_memory: shm.SystemSharedMemory):
        self.dataplane = dataplane
        self.engine = dataplane.engine
        self.max_body_size = max_body_size
        self.metrics = metrics
        self.shm = shared_memory

    async def _body(self, request: Request) -> bytes:
        """The body, decompressed (gzip, deflate), at most ``max_body_size`` octets."""
        return await request_body(request.scope, request.receive, self.max_body_size,
                                  BODY_SIZE_SETTING)

    async def _options(self, request: Request) -> dict:
        """The body, a JSON object (an empty body: an empty one)."""
        body = await self._body(request)
        return json_object(orjson.loads(body) if body.strip() else None, "the request body")

    # -- health and metadata ------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return _Json({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.engine.ready()
        return _Json({"ready": ready}, status_code=200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return _Json(self.dataplane.server_metadata())

    async def model_metadata(self, request: Request) -> Response:
        params = request.path_params
        meta = self.engine.model_metadata(params["name"], params.get("version"))
        return _Json({
            "name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
            "inputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                       for s in meta.inputs],
            "outputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                        for s in meta.outputs],
        })

    async def model_ready(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")
        if self.engine.model_ready(name, version):
            return _Json({"name": name, "ready": True})
        try:
            self.engine.resolve(name, version)
        except ModelNotFound:
            raise
        except ServingError:
            pass
        return _Json({"name": name, "ready": False}, status_code=503)

    async def model_config(self, request: Request) -> Response:
        from mip.serving.triton import message_to_json

        params = request.path_params
        return _Json(message_to_json(self.dataplane.model_config(params["name"],
                                                                 params.get("version"))))

    async def model_stats(self, request: Request) -> Response:
        params = request.path_params
        return _Json(self.dataplane.statistics(params.get("name"), params.get("version")))

    async def metrics_text(self, request: Request) -> Response:
        from mip.frontends.oip.metrics import CONTENT_TYPE

        if self.metrics is None:
            raise NoSuchEndpoint("metrics are off")
        await self.metrics.sample()  # what is read from elsewhere (the job queue's depth)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # -- repository ---------------------------------------------------------------------

    async def repository_index(self, request: Request) -> Response:
        options = await self._options(request)
        ready_only = bool(options.get("ready", False))
        return _Json([{"name": e.name, "version": e.version, "state": str(e.state),
                       "reason": e.reason}
                      for e in self.engine.index()
                      if not ready_only or str(e.state) == "READY"])

    async def repository_load(self, request: Request) -> Response:
        options = await self._options(request)
        parameters = json_object(options.get("parameters"), "parameters")
        await self.dataplane.load(request.path_params["name"], parameters)
        return Response(b"", media_type=_JSON_TYPE)

    async def repository_unload(self, request: Request) -> Response:
        await self._body(request)
        await self.engine.unload(request.path_params["name"])
        return Response(b"", media_type=_JSON_TYPE)

    # -- Triton's shared-memory extensions ----------------------------------------------

    async def shm_register(self, request: Request) -> Response:
        options = await self._options(request)
        relayed = self.shm.register(request.path_params["region"], options.get("key"),
                                    options.get("offset", 0), options.get("byte_size"),
                                    request.client.host if request.client else None)
        if relayed is not None:  # --workers N: made on every worker
            await relayed
        return Response(b"", media_type=_JSON_TYPE)

    async def shm_unregister(self, request: Request) -> Response:
        await self._body(request)
        relayed = self.shm.unregister(request.path_params.get("region"))
        if relayed is not None:  # --workers N: made on every worker
            await relayed
        return Response(b"", media_type=_JSON_TYPE)

    async def shm_status(self, request: Request) -> Response:
        return _Json(self.shm.status(request.path_params.get("region")))

    async def cuda_shm(self, request: Request) -> Response:
        raise shm.cuda_unsupported()
