"""Triton's system shared-memory extension against mip: tritonclient's shm utilities create
regions in /dev/shm, register them over HTTP and gRPC (both transports), and infer with
inputs and outputs in them; bounds, unknown regions, the region caps and CUDA shared
memory are refused clearly."""

from __future__ import annotations

import os
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm_util
from _oip_server import OipServer, add_model, grpc_implementations, identity, onnx_model
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from mip.errors import InvalidInput, TooManyRegions
from mip.frontends.oip import shm

X = np.arange(8, dtype=np.float32).reshape(2, 4)
SIZE = X.nbytes  # 32


@pytest.fixture(scope="module", params=grpc_implementations())
def server(request, tmp_path_factory):
    repo = tmp_path_factory.mktemp("shm")
    add_model(repo, "identity", identity(TensorProto.FLOAT))
    add_model(repo, "pair", onnx_model(  # output = input, negated = -input
        [helper.make_node("Identity", ["input"], ["output"]),
         helper.make_node("Neg", ["input"], ["negated"])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 4])
         for name in ("output", "negated")]))
    with OipServer(repo, grpc_implementation=request.param) as srv:
        yield srv


def _key(name: str) -> str:
    return f"/mip-test-{os.getpid()}-{name}"


@pytest.fixture
def regions():
    """tritonclient's regions made by a test, destroyed after it."""
    made = []

    def create(name: str, size: int):
        handle = shm_util.create_shared_memory_region(name, _key(name), size)
        made.append(handle)
        return handle

    yield create
    for handle in made:
        shm_util.destroy_shared_memory_region(handle)


def _clients(server):
    return ((httpclient.InferenceServerClient(server.http_url), httpclient),
            (grpcclient.InferenceServerClient(server.grpc_url), grpcclient))


def _status(client) -> dict:
    status = client.get_system_shared_memory_status()
    if isinstance(status, list):  # HTTP: the JSON list
        return {r["name"]: (r["key"], int(r["offset"]), int(r["byte_size"])) for r in status}
    return {name: (r.key, r.offset, r.byte_size) for name, r in status.regions.items()}


def test_extension_is_listed(server):
    http, grpc = (c for c, _ in _clients(server))
    assert "system_shared_memory" in http.get_server_metadata()["extensions"]
    assert "system_shared_memory" in grpc.get_server_metadata().extensions


def test_infer_with_inputs_and_outputs_in_shared_memory(server, regions):
    for client, module in _clients(server):
        kind = module.__name__.rsplit(".", 1)[-1]
        source = regions(f"in-{kind}", SIZE)
        target = regions(f"out-{kind}", 2 * SIZE)
        shm_util.set_shared_memory_region(source, [X])
        client.register_system_shared_memory(f"in-{kind}", _key(f"in-{kind}"), SIZE)
        client.register_system_shared_memory(f"out-{kind}", _key(f"out-{kind}"), SIZE,
                                             offset=SIZE)
        assert _status(client) == {f"in-{kind}": (_key(f"in-{kind}"), 0, SIZE),
                                   f"out-{kind}": (_key(f"out-{kind}"), SIZE, SIZE)}

        tensor = module.InferInput("input", [2, 4], "FP32")
        tensor.set_shared_memory(f"in-{kind}", SIZE)
        output = module.InferRequestedOutput("output")
        output.set_shared_memory(f"out-{kind}", SIZE)
        result = client.infer("identity", [tensor], outputs=[output])
        reply = result.get_output("output")
        parameters = (reply["parameters"] if isinstance(reply, dict) else
                      {k: v.string_param or v.int64_param for k, v in reply.parameters.items()})
        assert parameters["shared_memory_region"] == f"out-{kind}"
        assert parameters["shared_memory_byte_size"] == SIZE
        # the output went to the registered span: SIZE octets into the object
        written = shm_util.get_contents_as_numpy(target, np.float32, [2, 4], offset=SIZE)
        np.testing.assert_array_equal(written, X)

        # an input in shared memory, the output in the reply
        shm_util.set_shared_memory_region(source, [X * 2])
        result = client.infer("identity", [tensor])
        np.testing.assert_array_equal(result.as_numpy("output"), X * 2)

        client.unregister_system_shared_memory(f"in-{kind}")
        assert list(_status(client)) == [f"out-{kind}"]
        with pytest.raises(InferenceServerException, match=f"in-{kind}"):
            client.infer("identity", [tensor])
        client.unregister_system_shared_memory()  # every region
        assert _status(client) == {}
        client.close()


def test_bad_regions_are_refused(server, regions):
    regions("small", SIZE)
    for client, module in _clients(server):
        with pytest.raises(InferenceServerException, match="Unable to open shared memory"):
            client.register_system_shared_memory("missing", _key("no-such-object"), SIZE)
        with pytest.raises(InferenceServerException, match="past the end"):
            client.register_system_shared_memory("big", _key("small"), 2 * SIZE)
        client.register_system_shared_memory("small", _key("small"), SIZE)
        with pytest.raises(InferenceServerException, match="already in manager"):
            client.register_system_shared_memory("small", _key("small"), SIZE)
        with pytest.raises(InferenceServerException, match="'nowhere'"):
            client.get_system_shared_memory_status("nowhere")

        tensor = module.InferInput("input", [2, 4], "FP32")
        tensor.set_shared_memory("small", SIZE, offset=16)
        with pytest.raises(InferenceServerException, match="out of bounds.*'small'"):
            client.infer("identity", [tensor])
        tensor.set_shared_memory("small", 16)
        with pytest.raises(InferenceServerException, match="takes 32 octets, 16 were sent"):
            client.infer("identity", [tensor])
        tensor.set_shared_memory("nowhere", SIZE)
        with pytest.raises(InferenceServerException, match="region: 'nowhere'"):
            client.infer("identity", [tensor])

        plain = module.InferInput("input", [2, 4], "FP32")
        plain.set_data_from_numpy(X)
        output = module.InferRequestedOutput("output")
        output.set_shared_memory("small", 16)
        with pytest.raises(InferenceServerException, match="should be at least 32 octets"):
            client.infer("identity", [plain], outputs=[output])
        client.unregister_system_shared_memory("small")
        client.unregister_system_shared_memory("small")  # unknown: not an error, as Triton
        client.close()


def test_grpc_status_codes(server, regions):
    regions("codes", SIZE)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        client.get_system_shared_memory_status("nowhere")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    tensor = grpcclient.InferInput("input", [2, 4], "FP32")
    client.register_system_shared_memory("codes", _key("codes"), SIZE)
    tensor.set_shared_memory("codes", SIZE, offset=8)
    with pytest.raises(InferenceServerException) as info:
        client.infer("identity", [tensor])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    client.unregister_system_shared_memory()
    client.close()


def test_cuda_shared_memory_is_refused(server):
    for client, _ in _clients(server):
        with pytest.raises(InferenceServerException,
                           match="CUDA shared memory is not supported on this server"):
            client.register_cuda_shared_memory("gpu", b"\0" * 64, 0, 64)
        with pytest.raises(InferenceServerException, match="CUDA shared memory"):
            client.get_cuda_shared_memory_status()
        with pytest.raises(InferenceServerException, match="CUDA shared memory"):
            client.unregister_cuda_shared_memory()
        client.close()
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/cudasharedmemory/region/gpu/register", method="POST",
        data=b'{"raw_handle": {"b64": ""}, "device_id": 0, "byte_size": 64}')
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400 and b"not supported" in info.value.read()


def test_region_cap_over_the_api(server, regions):
    regions("cap", SIZE)
    registry = shm.registry_of(server.engine)
    saved = registry.max_regions
    registry.max_regions = 1
    try:
        client = httpclient.InferenceServerClient(server.http_url)
        client.register_system_shared_memory("one", _key("cap"), SIZE)
        with pytest.raises(InferenceServerException, match="--max-shm-regions"):
            client.register_system_shared_memory("two", _key("cap"), SIZE)
        client.unregister_system_shared_memory("one")
        client.register_system_shared_memory("two", _key("cap"), SIZE)  # room again
        client.unregister_system_shared_memory()
        client.close()
    finally:
        registry.max_regions = saved


def test_registry_bounds_and_lifetime(regions):
    regions("unit", 3 * SIZE)
    registry = shm.SystemSharedMemory(max_regions=4, max_bytes=2 * SIZE)
    registry.register("a", _key("unit"), 0, SIZE)
    with pytest.raises(TooManyRegions, match="--max-shm-bytes"):
        registry.register("b", _key("unit"), SIZE, 2 * SIZE)
    registry.register("b", _key("unit"), 4097 % SIZE, SIZE)  # an offset not on a page
    assert registry.mapped_bytes == 2 * SIZE and len(registry) == 2
    for bad in ("../etc/passwd", "/a/b", "", "/"):
        with pytest.raises(InvalidInput):
            registry.register("c", bad, 0, SIZE)
    fifo = f"mip-test-{os.getpid()}-fifo"
    os.mkfifo(os.path.join(shm.SHM_DIRECTORY, fifo))
    try:  # refused, not waited on
        with pytest.raises(InvalidInput, match="not a shared memory object"):
            shm.SystemSharedMemory().register("c", fifo, 0, SIZE)
    finally:
        os.unlink(os.path.join(shm.SHM_DIRECTORY, fifo))

    # an input is a read-only view of the mapping, not a copy
    view = registry.input("input", "FP32", [2, 4],
                          {"shared_memory_region": "a", "shared_memory_byte_size": SIZE})
    assert not view.flags.writeable and not view.flags.owndata
    region = registry._regions["a"]
    region.mapping[:SIZE] = X.tobytes()
    np.testing.assert_array_equal(view, X)  # the client's later writes show through
    # unregistered while a request holds a view: stays mapped until the view goes
    registry.unregister("a")
    assert "a" not in registry._regions and not region.mapping.closed
    np.testing.assert_array_equal(view, X)
    del view
    region.close()
    assert region.mapping.closed and region.fd == -1
    region.close()  # again: nothing more to do
    # unregistered while unused: unmapped at once
    other = registry._regions["b"]
    registry.unregister()
    assert other.mapping.closed and registry.mapped_bytes == 0

    refused = shm.SystemSharedMemory(refused="several workers")
    with pytest.raises(InvalidInput, match="several workers"):
        refused.register("a", _key("unit"), 0, SIZE)


def test_registration_from_another_host_is_refused(regions):
    regions("remote", SIZE)
    registry = shm.SystemSharedMemory()
    for peer in ("127.0.0.1", "::1", "::ffff:127.0.0.1", None):
        registry.register("local", _key("remote"), 0, SIZE, peer)
        registry.unregister("local")
    for peer in ("10.1.2.3", "2001:db8::1", "not-an-address"):
        with pytest.raises(InvalidInput, match="--shm-any-peer"):
            registry.register("remote", _key("remote"), 0, SIZE, peer)
    assert len(registry) == 0
    anywhere = shm.SystemSharedMemory(any_peer=True)
    anywhere.register("remote", _key("remote"), 0, SIZE, "10.1.2.3")
    anywhere.unregister()


def test_serve_flags():
    from mip.cli import _parser, _shared_memory

    args = _parser().parse_args(["serve", "--max-shm-regions", "3", "--max-shm-bytes", "2M",
                                 "--shm-any-peer"])
    registry = _shared_memory(args)
    assert (registry.max_regions, registry.max_bytes, registry.any_peer) == (3, 2 << 20, True)
    assert registry.refused is None
    defaults = _shared_memory(_parser().parse_args(["serve"]))
    assert (defaults.max_regions, defaults.max_bytes, defaults.any_peer) == (
        shm.DEFAULT_MAX_REGIONS, shm.DEFAULT_MAX_BYTES, False)


def test_one_output_in_shared_memory_the_other_in_the_reply(server, regions):
    for client, module in _clients(server):
        kind = module.__name__.rsplit(".", 1)[-1]
        target = regions(f"pair-{kind}", SIZE)
        client.register_system_shared_memory(f"pair-{kind}", _key(f"pair-{kind}"), SIZE)
        plain = module.InferInput("input", [2, 4], "FP32")
        plain.set_data_from_numpy(X)
        first = module.InferRequestedOutput("output")
        first.set_shared_memory(f"pair-{kind}", SIZE)
        second = module.InferRequestedOutput("negated")
        result = client.infer("pair", [plain], outputs=[first, second])
        np.testing.assert_array_equal(result.as_numpy("negated"), -X)
        np.testing.assert_array_equal(
            shm_util.get_contents_as_numpy(target, np.float32, [2, 4]), X)
        client.unregister_system_shared_memory()
        client.close()


def test_shared_memory_calls_are_in_the_inference_area():
    from mip.frontends.oip.grpc import RPC_AREAS
    from mip.frontends.oip.rest import area_of

    for path in ("/v2/systemsharedmemory/status", "/v2/systemsharedmemory/region/a/register",
                 "/v2/cudasharedmemory/region/a/unregister"):
        assert area_of(path) == "inference"
    for call in ("SystemSharedMemoryRegister", "SystemSharedMemoryStatus",
                 "CudaSharedMemoryUnregister"):
        assert RPC_AREAS[call] == "inference"


def test_streaming_infer_with_shared_memory(server, regions):
    import queue

    source = regions("stream-in", SIZE)
    target = regions("stream-out", SIZE)
    shm_util.set_shared_memory_region(source, [X + 1])
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.register_system_shared_memory("stream-in", _key("stream-in"), SIZE)
    client.register_system_shared_memory("stream-out", _key("stream-out"), SIZE)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    tensor = grpcclient.InferInput("input", [2, 4], "FP32")
    tensor.set_shared_memory("stream-in", SIZE)
    output = grpcclient.InferRequestedOutput("output")
    output.set_shared_memory("stream-out", SIZE)
    client.async_stream_infer("identity", [tensor], outputs=[output], request_id="1")
    result, error = answers.get(timeout=20)
    assert error is None and result.get_response().id == "1"
    np.testing.assert_array_equal(
        shm_util.get_contents_as_numpy(target, np.float32, [2, 4]), X + 1)
    tensor.set_shared_memory("nowhere", SIZE)
    client.async_stream_infer("identity", [tensor], request_id="2")
    result, error = answers.get(timeout=20)
    assert result is None and "nowhere" in str(error)
    client.stop_stream()
    client.unregister_system_shared_memory()
    client.close()
