"""What ``mip serve --access-log`` costs a request, in one process (no sockets).

    PYTHONPATH=. python bench/access_log_cost.py [text|json]

MIP (``MipHandler.start``), KServe v2 gRPC (``InferenceService.model_infer``) and REST
(``fast_infer`` on ASGI events) serve waves of 32 requests for the demo repository's
``identity`` model, with the access log switched on and off every 50 waves; prints the
event-loop thread's CPU per request (best of 5) each way, and what one line costs alone.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

import mip
from mip import logs
from mip.frontends.access import AccessLog
from mip.frontends.mip_handler import MipHandler
from mip.frontends.oip import inference_pb2 as pb
from mip.frontends.oip.grpc import GrpcServer
from mip.frontends.oip.grpc_service import InferenceService
from mip.frontends.oip.metrics import Metrics
from mip.frontends.oip.rest import build_app
from mip.serving.demo import build_demo_repository
from mip.serving.engine import Engine
from mip.serving.repository import ModelRepository

X = np.ones((1, 16), np.float32)
WAVE = 32


class _Context:
    """What the gRPC service asks of a call's context."""

    def peer(self):
        return "ipv4:127.0.0.1:50000"

    def invocation_metadata(self):
        return (("user-agent", "grpc-c/1"),)

    def time_remaining(self):
        return None

    def set_trailing_metadata(self, metadata):
        pass


async def main(log_format: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="mip-access-cost-"))
    logs.configure("WARNING", log_format, str(work / "access.log"))
    access = AccessLog()
    engine = Engine(ModelRepository(build_demo_repository(work / "repo")), models=["identity"])
    await engine.start()
    metrics = Metrics(engine)
    handler = MipHandler(engine, metrics=metrics)
    service = InferenceService(GrpcServer(engine, metrics=metrics).dataplane, 64 << 20)
    app = build_app(engine, metrics=metrics)
    planes = [handler.dataplane, service.dataplane, app.dataplane]
    message = mip.decode(mip.encode_request([[X]], model="identity"))
    request = pb.ModelInferRequest(model_name="identity")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(X.tobytes())
    grpc_data = request.SerializeToString()
    body = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                                     "data": X.ravel().tolist()}]})
    scope = {"type": "http", "method": "POST", "path": "/v2/models/identity/infer",
             "headers": [(b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 50001)}
    never = asyncio.Event()
    context = _Context()

    def receiver():
        sent = []

        async def receive():
            if sent:  # the client stays: no disconnect
                await never.wait()
            sent.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        return receive

    async def send(event):
        pass

    async def wave(protocol: str) -> None:
        if protocol == "mip":
            await asyncio.gather(*(handler.start(message, "127.0.0.1") for _ in range(WAVE)))
        elif protocol == "grpc":
            await asyncio.gather(*(service.model_infer(grpc_data, context)
                                   for _ in range(WAVE)))
        else:
            await asyncio.gather(*(app(dict(scope), receiver(), send) for _ in range(WAVE)))

    for protocol in ("mip", "grpc", "http"):
        for _ in range(50):
            await wave(protocol)
        best = {False: float("inf"), True: float("inf")}
        for round_ in range(10):
            on = bool(round_ % 2)
            for plane in planes:
                plane.access_log = access if on else None
            started = time.thread_time()
            for _ in range(50):
                await wave(protocol)
            best[on] = min(best[on], (time.thread_time() - started) / (50 * WAVE) * 1e6)
        print(f"{protocol}: {best[False]:.1f} µs a request off, {best[True]:.1f} µs on")
    alone = float("inf")
    for _ in range(5):
        started = time.thread_time()
        for _ in range(3200):
            access.request("http", ("127.0.0.1", 50001), "identity", "1", None, 0.001, "id-1")
        alone = min(alone, (time.thread_time() - started) / 3200 * 1e6)
        await asyncio.sleep(0)
    print(f"one {log_format} line alone: {alone:.1f} µs")
    await engine.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "text"))
