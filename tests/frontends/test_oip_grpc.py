"""KServe v2 over gRPC, driven by the official tritonclient against a real engine."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from _oip_server import (
    DATATYPES,
    FASHION_MNIST,
    OipServer,
    add_model,
    build_repository,
    grpc_implementations,
    identity,
    sample,
)
from _wait import wait_until
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

LIMIT = 4 << 20  # octets: the server's gRPC message limit in these tests


@pytest.fixture(scope="module", params=grpc_implementations())
def server(request, tmp_path_factory):
    """Every test runs against both transports: mip's own HTTP/2 and grpcio's."""
    repo = build_repository(tmp_path_factory.mktemp("oip_grpc"))
    with OipServer(repo, grpc_max_message_size=LIMIT,
                   grpc_implementation=request.param) as served:
        assert served.grpc.implementation == request.param
        yield served


@pytest.fixture
def client(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        yield c


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _input(name, array, datatype):
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _status(excinfo) -> str:
    return excinfo.value.status()


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "mip"
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])


def test_model_ready_and_metadata(client):
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("versioned", "2")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_model_metadata("mlp", as_json=True)
    assert meta["name"] == "mlp" and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "784"]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert client.get_model_metadata("versioned", as_json=True)["versions"] == ["1", "2"]


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_raw_round_trip(client, datatype):
    x = sample(datatype, (3, 4))
    result = client.infer(f"id_{datatype.lower()}", [_input("input", x, datatype)],
                          request_id=f"raw-{datatype}")
    response = result.get_response()
    assert response.id == f"raw-{datatype}"
    assert response.model_version == "1"
    assert response.raw_output_contents  # answered raw, like the request
    out = result.as_numpy("output")
    assert out.shape == (3, 4)
    if datatype == "BYTES":
        assert list(out.ravel()) == list(x.ravel())
    else:
        np.testing.assert_array_equal(out, x)


_TYPED_FIELDS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


@pytest.mark.parametrize("datatype", sorted(_TYPED_FIELDS))
def test_every_datatype_typed_contents_round_trip(stub, datatype):
    x = sample(datatype, (2, 4), seed=3)
    request = service_pb2.ModelInferRequest(model_name=f"id_{datatype.lower()}", id="typed")
    tensor = request.inputs.add(name="input", datatype=datatype, shape=[2, 4])
    field = _TYPED_FIELDS[datatype]
    getattr(tensor.contents, field).extend(x.ravel().tolist())
    response = stub.ModelInfer(request, timeout=10)
    assert response.id == "typed" and not response.raw_output_contents
    (output,) = response.outputs
    assert output.datatype == datatype and list(output.shape) == [2, 4]
    assert list(getattr(output.contents, field)) == x.ravel().tolist()


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_floats_need_raw_contents(stub, datatype):
    request = service_pb2.ModelInferRequest(model_name=f"id_{datatype.lower()}")
    request.inputs.add(name="input", datatype=datatype, shape=[1, 4]).contents.fp32_contents \
        .extend([1, 2, 3, 4])
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.ModelInfer(request, timeout=10)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in excinfo.value.details()


def test_fp16_raw_is_exact(client):
    x = np.array([[65504.0, -0.0, 6.1e-05, 1 / 3]], dtype=np.float16)
    out = client.infer("id_fp16", [_input("input", np.repeat(x, 1, 0)[:, :4], "FP16")])
    assert out.as_numpy("output").tobytes() == x.tobytes()


def test_requested_outputs_in_requested_order(client, rng):
    a = rng.standard_normal((2, 4)).astype(np.float32)
    b = rng.standard_normal((2, 4)).astype(np.float32)
    result = client.infer("two", [_input("a", a, "FP32"), _input("b", b, "FP32")],
                          outputs=[grpcclient.InferRequestedOutput("product")])
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["product"]
    np.testing.assert_array_equal(result.as_numpy("product"), a * b)
    both = client.infer("two", [_input("a", a, "FP32"), _input("b", b, "FP32")],
                        outputs=[grpcclient.InferRequestedOutput("product"),
                                 grpcclient.InferRequestedOutput("sum")])
    assert [o.name for o in both.get_response().outputs] == ["product", "sum"]
    np.testing.assert_array_equal(both.as_numpy("sum"), a + b)


def test_model_versions(client):
    x = np.ones((1, 2), dtype=np.float32)
    for version, factor in (("1", 1.0), ("2", 2.0), ("", 2.0)):
        result = client.infer("versioned", [_input("x", x, "FP32")], model_version=version)
        np.testing.assert_array_equal(result.as_numpy("y"), x * factor)
        assert result.get_response().model_version == (version or "2")
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("versioned", [_input("x", x, "FP32")], model_version="7")
    assert _status(excinfo) == "StatusCode.NOT_FOUND"


def test_parameters_timeout_and_custom(client):
    x = np.ones((1, 2), dtype=np.float32)
    result = client.infer("versioned", [_input("x", x, "FP32")], timeout=5_000_000,
                          parameters={"note": "kept out of the model", "flag": True})
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2)


def test_fashion_mnist_matches_onnxruntime(client, rng):
    x = rng.random((5, 28, 28), dtype=np.float32)
    expected = ort.InferenceSession(str(FASHION_MNIST)).run(None, {"x": x})[0]
    result = client.infer("fashion_mnist", [_input("x", x, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("12"), expected)


def test_error_codes(client, server):
    x = np.ones((1, 16), dtype=np.float32)
    cases = [
        (lambda: client.infer("nope", [_input("input", x, "FP32")]), "NOT_FOUND", "nope"),
        (lambda: client.infer("identity", [_input("input", x[:, :3], "FP32")]),
         "INVALID_ARGUMENT", "shape"),
        (lambda: client.infer("identity", [_input("input", x.astype(np.float64), "FP64")]),
         "INVALID_ARGUMENT", "datatype"),
        (lambda: client.infer("identity", [_input("wrong", x, "FP32")]),
         "INVALID_ARGUMENT", "wrong"),
        (lambda: client.get_model_metadata("nope"), "NOT_FOUND", "nope"),
        (lambda: client.unload_model("nope"), "NOT_FOUND", "nope"),
    ]
    for call, code, word in cases:
        with pytest.raises(InferenceServerException) as excinfo:
            call()
        assert _status(excinfo) == f"StatusCode.{code}", excinfo.value
        assert word in excinfo.value.message()


def test_message_size_limit_names_the_setting(client):
    x = np.zeros((LIMIT // 4 // 16 + 100, 16), dtype=np.float32)  # just over the limit
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("identity", [_input("input", x, "FP32")])
    assert _status(excinfo) == "StatusCode.RESOURCE_EXHAUSTED"
    assert "--grpc-max-message-size" in excinfo.value.message()


def test_queue_full_is_resource_exhausted_and_unloaded_is_unavailable(server):
    x_slow = np.full((1, 1), 0.6, dtype=np.float32)
    x_fast = np.zeros((1, 1), dtype=np.float32)

    async def scenario():
        async with aioclient.InferenceServerClient(server.grpc_url) as c:
            def call(x):
                tensor = aioclient.InferInput("x", [1, 1], "FP32")
                tensor.set_data_from_numpy(x)
                return asyncio.ensure_future(c.infer("sleepy", [tensor]))

            running = call(x_slow)
            await asyncio.sleep(0.2)  # the slow one runs; the queue (1 place) is free
            queued = call(x_fast)
            await asyncio.sleep(0.1)
            with pytest.raises(InferenceServerException) as excinfo:
                await call(x_fast)
            assert _status(excinfo) == "StatusCode.RESOURCE_EXHAUSTED"
            await asyncio.wait_for(asyncio.gather(running, queued), 10)

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_cancelled_call_leaves_the_batch_queue(server):
    def depth():
        return server.call(_depth(server.engine, "sleepy"))

    async def scenario():
        async with aioclient.InferenceServerClient(server.grpc_url) as c:
            def call(x):
                tensor = aioclient.InferInput("x", [1, 1], "FP32")
                tensor.set_data_from_numpy(np.full((1, 1), x, dtype=np.float32))
                return asyncio.ensure_future(c.infer("sleepy", [tensor]))

            running = call(0.8)
            await asyncio.sleep(0.2)
            queued = call(0.0)
            for _ in range(100):
                if depth() == 1:
                    break
                await asyncio.sleep(0.01)
            assert depth() == 1
            queued.cancel()
            for _ in range(100):
                if depth() == 0:
                    break
                await asyncio.sleep(0.01)
            assert depth() == 0  # gone before the slow request finished
            assert not running.done()
            await asyncio.wait_for(running, 10)

    asyncio.run(asyncio.wait_for(scenario(), 20))


async def _depth(engine, model):
    return sum(s.queue_depth for (name, _), s in engine.stats().items() if name == model)


def test_aio_client_concurrent_requests(server, rng):
    x = rng.standard_normal((16, 784)).astype(np.float32)
    direct = ort.InferenceSession(str(server.repo / "mlp" / "1" / "model.onnx"))
    expected = direct.run(None, {"input": x})[0]

    async def scenario():
        async with aioclient.InferenceServerClient(server.grpc_url) as c:
            async def one(i):
                tensor = aioclient.InferInput("input", [1, 784], "FP32")
                tensor.set_data_from_numpy(x[i:i + 1])
                result = await c.infer("mlp", [tensor], request_id=str(i))
                assert result.get_response().id == str(i)
                return result.as_numpy("logits")

            assert await c.is_server_ready()
            return await asyncio.gather(*(one(i) for i in range(16)))

    outputs = asyncio.run(asyncio.wait_for(scenario(), 20))
    np.testing.assert_allclose(np.concatenate(outputs), expected, rtol=1e-5, atol=1e-6)


def test_model_stream_infer(client, rng):
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        sent = {}
        for i in range(8):
            x = rng.standard_normal((1, 16)).astype(np.float32)
            sent[str(i)] = x
            client.async_stream_infer("identity", [_input("input", x, "FP32")],
                                      request_id=str(i))
        client.async_stream_infer("nope", [_input("input", x, "FP32")], request_id="bad")
        got, errors = {}, []
        for _ in range(9):
            result, error = replies.get(timeout=10)
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = result.as_numpy("output")
    finally:
        client.stop_stream()
    assert got.keys() == sent.keys()
    for key, x in sent.items():
        np.testing.assert_array_equal(got[key], x)
    assert len(errors) == 1 and "nope" in errors[0].message()


def test_repository_index_load_unload_while_requests_run(server, client):
    names = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    assert names[("mlp", "1")] == "READY" and names[("versioned", "2")] == "READY"
    x = np.ones((1, 16), dtype=np.float32)
    stop = threading.Event()
    outcomes: list = []

    def load_generator():
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            for _ in range(2000):  # bounded
                if stop.is_set():
                    break
                try:
                    out = c.infer("identity", [_input("input", x, "FP32")])
                    np.testing.assert_array_equal(out.as_numpy("output"), x)
                    outcomes.append("ok")
                except InferenceServerException as exc:
                    outcomes.append(exc.status())

    thread = threading.Thread(target=load_generator)
    thread.start()
    try:
        assert wait_until(lambda: len(outcomes) > 5)
        client.load_model("identity")  # reload: requests keep being served
        assert client.is_model_ready("identity")
        client.unload_model("identity")
        assert not client.is_model_ready("identity")
        assert wait_until(lambda: outcomes[-1] != "ok")
        client.load_model("identity")
        assert wait_until(lambda: outcomes[-1] == "ok")
    finally:
        stop.set()
        thread.join(20)
    assert set(outcomes) <= {"ok", "StatusCode.UNAVAILABLE"}
    assert "StatusCode.UNAVAILABLE" in outcomes
    state = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    assert state[("identity", "1")] == "READY"
    with pytest.raises(InferenceServerException) as excinfo:
        client.load_model("no_such_model")
    assert _status(excinfo) == "StatusCode.NOT_FOUND"


def test_client_deadline_is_deadline_exceeded(client):
    tensor = _input("x", np.full((1, 1), 0.5, dtype=np.float32), "FP32")
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("sleepy", [tensor], client_timeout=0.1)
    assert _status(excinfo) == "StatusCode.DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 2


@pytest.fixture
def rng():
    return np.random.default_rng(11)


@pytest.mark.parametrize("impl", grpc_implementations())
@pytest.mark.parametrize("client_kind", ["native", "tritonclient"])
def test_32_concurrent_1mib_calls_on_one_connection(tmp_path, impl, client_kind):
    """What ``mip bench infer --model identity_1m --concurrency 32`` does: 32 calls of a
    1 MiB FP32 tensor in flight on one HTTP/2 connection, dynamic batching on; every one
    answered whole (a few rounds, bounded)."""
    from onnx import TensorProto

    from mip.frontends.oip import inference_pb2
    from mip.net.grpc_client import GrpcChannel

    add_model(tmp_path, "identity_1m", identity(TensorProto.FLOAT, ("batch", 262144)),
              config={"max_batch_size": 64,
                      "dynamic_batching": {"max_queue_delay_us": 0, "max_queue_size": 1024}})
    data = np.arange(262144, dtype=np.float32).reshape(1, 262144)
    workers, calls_each = 32, 4

    async def run(server) -> list:
        if client_kind == "native":
            request = inference_pb2.ModelInferRequest(model_name="identity_1m")
            request.inputs.add(name="input", datatype="FP32", shape=[1, 262144])
            request.raw_input_contents.append(data.tobytes())
            payload = request.SerializeToString()
            async with GrpcChannel(server.grpc_url) as channel:
                async def call():
                    reply = inference_pb2.ModelInferResponse.FromString(await channel.unary(
                        "/inference.GRPCInferenceService/ModelInfer", payload))
                    return reply.raw_output_contents[0] == data.tobytes()
                return await rounds(call)
        async with aioclient.InferenceServerClient(server.grpc_url) as client:
            tensor = aioclient.InferInput("input", [1, 262144], "FP32")
            tensor.set_data_from_numpy(data)

            async def call():
                result = await client.infer("identity_1m", [tensor], client_timeout=60)
                return np.array_equal(result.as_numpy("output"), data)
            return await rounds(call)

    async def rounds(call) -> list:
        await call()  # the connection and its windows are set up

        async def worker():
            return [await call() for _ in range(calls_each)]
        results = await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(workers))), 60)
        return [ok for result in results for ok in result]

    with OipServer(tmp_path, models=["identity_1m"], grpc_implementation=impl) as server:
        results = asyncio.run(run(server))
    assert results == [True] * (workers * calls_each)
