"""A KubeMo model file ports by changing the import prefix, and runs the same both ways."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

import mip
from mip.kubemo import Client, Image, Json, Text
from mip.kubemo.adaptor.arith import Inference as ArithInference

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fashion_mnist" / "model_repository" / "fashion_mnist" / "1"
FASHION = ROOT / "tests" / "data" / "fashion_mnist"


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fashion_mnist_port_matches_kubemo(tmp_path):
    pytest.importorskip("kubemo")
    pytest.importorskip("PIL")
    source = (EXAMPLE / "model.py").read_text()
    assert "kubemo" in source
    original = tmp_path / "fashion_mnist_kubemo.py"
    original.write_text(source.replace("mip.kubemo", "kubemo"))  # back to KubeMo's imports
    ported = load_module(EXAMPLE / "model.py", "ported_fashion_mnist")
    reference = load_module(original, "kubemo_fashion_mnist")
    import kubemo

    photos = [FASHION / "t-shirt.jpg", FASHION / "ankle-boot.jpg"]
    ours = ported.FashionMNIST(path=str(FASHION / "fashion_mnist.onnx"), input_names=("x",))
    theirs = reference.FashionMNIST(path=str(FASHION / "fashion_mnist.onnx"),
                                    input_names=("x",))
    got = ours(*((Image(p),) for p in photos))
    want = theirs(*((kubemo.Image(str(p)),) for p in photos))
    assert [item[0].encode() for item in got] == [item[0].encode() for item in want]


class Shout(ArithInference):
    """Upper-cases TEXT, counts letters into JSON."""

    def preprocess(self, inputs):
        return np.array([[len(inputs[0].decode())]]),

    def forward(self, inputs):
        return inputs[0],

    def postprocess(self, outputs):
        return Json({"letters": int(outputs[0][0])}), Text("done")


def test_client_against_kubemo_server(kubemo_server):
    client = Client(timeout=10)
    assert client.ping(kubemo_server) > 0
    outputs = client.inference(kubemo_server, ((Text("four"),), (mip.Text("sixsix"),)))
    assert [item[0].decode() for item in outputs] == [{"letters": 4}, {"letters": 6}]


def test_lifecycle_runs_locally_on_codec_values():
    model = Shout()
    outputs = model((mip.Text("abc"),), (Text("de"),), ("f",))
    assert [item[0].decode() for item in outputs] == [{"letters": n} for n in (3, 2, 1)]


def test_kubemo_client_against_our_server(tmp_path):
    kubemo = pytest.importorskip("kubemo")
    from mip.kubemo import InferenceHandler, Server

    path = str(tmp_path / "kubemo.sock")
    server = Server("unix", path)
    server.handle(InferenceHandler(Shout()))

    def serve():
        try:
            server.serve()
        except OSError:
            pass  # the socket was closed to stop the server

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = kubemo.Client()
        url = f"unix://{path}"
        assert client.ping(url) > 0
        outputs = client.inference(url, ((kubemo.Text("four"),), (kubemo.Text("xy"),)))
        assert [item[0].decode() for item in outputs] == [{"letters": 4}, {"letters": 2}]
        assert [item[1].decode() for item in outputs] == ["done", "done"]
        # A routed request (kind 3) is a method this single-model server does not serve.
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(5)
            raw.connect(path)
            raw.sendall(mip.encode_request([(mip.Text("x"),)], model="m"))
            reply = mip.decode(raw.recv(8))
        assert reply.error_code == mip.ErrorCode.METHOD
    finally:
        server.close()
        thread.join(5)


@pytest.fixture
def kubemo_server():
    """KubeMo's own server (it closes the connection after every reply) on a loopback port."""
    kubemo = pytest.importorskip("kubemo")
    pytest.importorskip("kubemo.server")
    from kubemo.adaptor.arith import Inference as TheirArith

    class TheirEcho(TheirArith):
        def preprocess(self, inputs):
            return np.array([[len(inputs[0].decode())]]),

        def forward(self, inputs):
            return inputs[0],

        def postprocess(self, outputs):
            # KubeMo's server insists on as many outputs as inputs per item.
            return kubemo.Json({"letters": int(outputs[0][0])}),

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = kubemo.Server("tcp", ("127.0.0.1", port))
    server.handle(kubemo.InferenceHandler(TheirEcho()))

    def serve():
        try:
            server.serve()
        except OSError:
            pass  # the socket was closed to stop the server

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{port}"
    server.socket.close()
    thread.join(5)


async def test_async_client_back_to_back_and_concurrent_against_kubemo_server(kubemo_server):
    """KubeMo's server closes after each reply: 100 calls in a row and 10 at once all succeed
    (a request the closing connection never answered goes again on a new connection, and
    the client stops pipelining to such a server)."""
    from mip.net.mip_client import AsyncClient

    async with AsyncClient(kubemo_server, timeout=10) as client:
        for i in range(100):
            (reply,), = await client.infer([(mip.Text("x" * (i % 7 + 1)),)])
            assert reply.value == {"letters": i % 7 + 1}
        assert await client.ping() > 0
        words = [mip.Text("y" * n) for n in range(1, 11)]
        results = await asyncio.gather(*(client.infer([(w,)]) for w in words))
        assert [r[0][0].value for r in results] == [{"letters": n} for n in range(1, 11)]
