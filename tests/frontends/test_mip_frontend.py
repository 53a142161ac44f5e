"""MIP end to end: the MIP server with the MIP frontend on a real engine and real ONNX Runtime."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import mip
from mip.errors import ErrorCode, RemoteError
from mip.frontends.mip_handler import MipHandler
from mip.net.mip_client import AsyncClient, Client
from mip.net.mip_server import MipServer
from mip.serving.demo import build_demo_repository
from mip.serving.engine import Engine
from mip.serving.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[2]
FASHION = ROOT / "tests" / "data" / "fashion_mnist"
EXAMPLE = ROOT / "examples" / "fashion_mnist" / "model_repository"


class Served:
    def __init__(self, engine: Engine, server: MipServer, url: str):
        self.engine, self.server, self.url = engine, server, url

    async def close(self):
        await self.server.stop()
        await self.engine.stop()


@contextlib.asynccontextmanager
async def _serving(root: Path, default_model: str | None = None, **server_options):
    """An engine on ``root`` behind a MIP server on 127.0.0.1, for the ``async with`` block."""
    engine = Engine(ModelRepository(root), default_model=default_model)
    await engine.start()
    server = MipServer(MipHandler(engine), **server_options)
    address = await server.start("tcp://127.0.0.1:0")
    served = Served(engine, server, str(address))
    try:
        yield served
    finally:
        await served.close()


def _python_repo(tmp_path: Path, name: str, body: str, config: str | None = None) -> Path:
    """A repository of one KubeMo-style Python model ``name`` (version 1): ``body`` after
    the imports of ``Inference`` and ``Text``, and ``config`` as its config.json."""
    folder = tmp_path / "repo" / name
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.py").write_text("from mip.kubemo.inference import Inference\n"
                                           "from mip.kubemo.serialize import Text\n" + body)
    if config is not None:
        (folder / "config.json").write_text(config)
    return tmp_path / "repo"


@pytest.fixture
def demo_repo(tmp_path) -> Path:
    return build_demo_repository(tmp_path / "demo")


def _direct(repo: Path, model: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


async def test_demo_models_answer_as_onnxruntime_does(demo_repo):
    async with _serving(demo_repo) as served:
        rng = np.random.default_rng(7)
        x = rng.standard_normal((3, 784)).astype(np.float32)
        async with AsyncClient(served.url) as client:
            items = await client.infer([[x[:1]], [x[1:]]], model="mlp")
            ident = await client.infer([[x[:2, :16]]], model="identity", version="1")
        expected = _direct(demo_repo, "mlp", x)
        np.testing.assert_allclose(np.concatenate([items[0][0], items[1][0]]), expected, rtol=1e-5)
        assert items[0][0].shape == (1, 10) and items[1][0].shape == (2, 10)
        np.testing.assert_array_equal(ident[0][0], x[:2, :16])


async def test_a_batch_of_one_row_items_runs_as_one_strided_input(demo_repo):
    async with _serving(demo_repo) as served:
        x = np.random.default_rng(11).standard_normal((32, 784)).astype(np.float32)
        async with AsyncClient(served.url) as client:
            items = await client.infer([[row[None, :]] for row in x], model="mlp")
        assert [item[0].shape for item in items] == [(1, 10)] * 32
        np.testing.assert_allclose(np.concatenate([i[0] for i in items]), _direct(demo_repo, "mlp", x),
                                   rtol=1e-5)
        assert served.engine.stats()[("mlp", "1")].batch_sizes == {32: 1}


async def test_concurrent_clients_are_batched_together(demo_repo):
    async with _serving(demo_repo) as served:
        rng = np.random.default_rng(3)
        inputs = [rng.standard_normal((1, 784)).astype(np.float32) for _ in range(64)]
        clients = [AsyncClient(served.url) for _ in range(16)]
        try:
            results = await asyncio.gather(*(
                clients[i % 16].infer([[x]], model="mlp") for i, x in enumerate(inputs)))
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        expected = _direct(demo_repo, "mlp", np.concatenate(inputs))
        got = np.concatenate([r[0][0] for r in results])
        np.testing.assert_allclose(got, expected, rtol=1e-5)  # every reply is its own request's
        stats = served.engine.stats()[("mlp", "1")]
        assert stats.rows == 64
        assert max(stats.batch_sizes) > 1, stats.batch_sizes


async def test_a_request_over_max_batch_size_runs_as_batches_and_is_answered_as_one(demo_repo):
    """KubeMo's server takes batches of any size: items of 1 and 3 rows, 250 rows in all,
    against max_batch_size 64 (parts end inside items too)."""
    async with _serving(demo_repo) as served:
        rng = np.random.default_rng(5)
        counts = [1, 3] * 62 + [1, 1]
        x = rng.standard_normal((sum(counts), 784)).astype(np.float32)
        bounds = np.cumsum([0] + counts)
        items = [[x[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]
        async with AsyncClient(served.url) as client:
            replies = await client.infer(items, model="mlp")
            one_row = await client.infer([[row[None]] for row in x[:65]], model="mlp")
        assert [r[0].shape[0] for r in replies] == counts
        expected = _direct(demo_repo, "mlp", x)
        np.testing.assert_allclose(np.concatenate([r[0] for r in replies]), expected, rtol=1e-5)
        np.testing.assert_allclose(np.concatenate([r[0] for r in one_row]), expected[:65],
                                   rtol=1e-5)
        stats = served.engine.stats()[("mlp", "1")]
        assert max(stats.batch_sizes) <= 64 and stats.rows == 250 + 65
        assert stats.requests == stats.successes == 2  # each answered as one request


async def test_a_failing_part_fails_the_whole_request_with_one_error(tmp_path):
    repo = _python_repo(tmp_path, "picky", (
        "class Picky(Inference):\n"
        "    def preprocess(self, inputs):\n"
        "        if inputs[0].decode() == 'boom':\n"
        "            raise ValueError('item boom is refused')\n"
        "        return (inputs[0].decode(),)\n"
        "    def concat(self, batch):\n"
        "        return tuple(zip(*batch))\n"
        "    def forward(self, inputs):\n"
        "        return inputs\n"
        "    def postprocess(self, outputs):\n"
        "        return tuple(Text(x) for x in outputs)\n"), '{"max_batch_size": 4}')
    async with _serving(repo) as served:
        async with AsyncClient(served.url) as client:
            words = [f"w{i}" for i in range(10)]
            assert await client.infer([[w] for w in words], model="picky") == [
                (mip.Text(w),) for w in words]
            with pytest.raises(RemoteError) as info:
                await client.infer([[w] for w in words[:6] + ["boom"] + words[7:]],
                                   model="picky")
            assert info.value.error_code == ErrorCode.INTERNAL
            assert "item boom is refused" in info.value.detail
            assert await client.ping() > 0  # one ERROR frame, and the connection goes on
        assert served.engine.stats()[("picky", "1")].batch_sizes.keys() <= {1, 2, 3, 4}


async def test_a_model_without_batching_runs_any_number_of_items_a_few_at_a_time(tmp_path):
    """max_batch_size 0: each item runs on its own, instance_count + 1 at a time, so more
    items than the model's queue holds (1,024) are answered, in order."""
    repo = _python_repo(tmp_path, "single", (
        "class Single(Inference):\n"
        "    def preprocess(self, inputs):\n"
        "        return (inputs[0].decode(),)\n"
        "    def concat(self, batch):\n"
        "        assert len(batch) == 1\n"
        "        return tuple(zip(*batch))\n"
        "    def forward(self, inputs):\n"
        "        return inputs\n"
        "    def postprocess(self, outputs):\n"
        "        return tuple(Text(x.upper()) for x in outputs)\n"), '{"max_batch_size": 0}')
    async with _serving(repo) as served:
        async with AsyncClient(served.url, timeout=60) as client:
            words = [f"w{i}" for i in range(1100)]
            replies = await client.infer([[w] for w in words])
            assert replies == [(mip.Text(w.upper()),) for w in words]
            with pytest.raises(RemoteError) as info:  # one bad item fails the request
                await client.infer([["a"], [np.ones((1, 2), np.float32)], ["b"]])
            assert info.value.error_code == ErrorCode.SHAPE
        stats = served.engine.stats()[("single", "1")]
        assert set(stats.batch_sizes) == {1} and stats.batch_sizes[1] >= 1100


async def test_onnx_models_refuse_application_values_naming_them(demo_repo):
    async with _serving(demo_repo) as served:
        async with AsyncClient(served.url) as client:
            for value_type in (7, 300):
                with pytest.raises(RemoteError) as info:
                    await client.infer([[mip.Value(value_type, b"ab")]], model="identity")
                assert info.value.error_code == ErrorCode.SHAPE
                assert f"application-defined value (type {value_type})" in info.value.detail
                assert "Python models only" in info.value.detail


async def test_statistics_count_queue_time_per_request_as_triton_does(demo_repo):
    """Ten requests read at once run as one batch: the queue is counted ten times (each
    request's wait from its arrival to the batch's start), not once per batch."""
    from mip.frontends.oip.metrics import Metrics

    engine = Engine(ModelRepository(demo_repo))
    await engine.start()
    handler = MipHandler(engine, metrics=Metrics(engine))
    server = MipServer(handler)
    address = await server.start("tcp://127.0.0.1:0")
    try:
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        frames = b"".join(mip.encode_request([[x + i]], model="identity") for i in range(10))
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(frames)  # one write: one read on the server, one batch
        parser, replies = mip.FrameParser(), []
        while len(replies) < 10:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data
            replies += parser.feed(data)
        writer.close()
        assert [r.batch[0][0][0, 0] for r in replies] == list(range(10))
        (entry,) = handler.dataplane.statistics("identity")["model_stats"]
        stats = entry["inference_stats"]
        assert entry["execution_count"] == 1 and entry["batch_stats"][0]["batch_size"] == 10
        assert stats["queue"]["count"] == stats["success"]["count"] == 10
        assert 0 < stats["queue"]["ns"] <= stats["success"]["ns"]
        text = handler.dataplane.metrics.render().decode()
        queue_us = float(next(line.split()[-1] for line in text.splitlines() if line.startswith(
            'nv_inference_queue_duration_us{model="identity"')))
        assert abs(queue_us * 1000 - stats["queue"]["ns"]) <= 1000
    finally:
        await server.stop()
        await engine.stop()


async def test_plain_requests_reach_the_default_model(demo_repo):
    async with _serving(demo_repo, default_model="identity") as served:
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        out = await asyncio.to_thread(lambda: Client(served.url).infer([[x]]))
        np.testing.assert_array_equal(out[0][0], x)


async def test_plain_request_without_default_model_is_a_clear_error(demo_repo):
    async with _serving(demo_repo) as served:  # two models, no default
        async with AsyncClient(served.url) as client:
            with pytest.raises(RemoteError) as info:
                await client.infer([[np.ones((1, 16), np.float32)]])
            assert info.value.error_code == ErrorCode.METHOD
            assert "--mip-model" in info.value.detail  # the reason travels with the code


async def test_error_codes_for_what_the_engine_refuses(demo_repo):
    async with _serving(demo_repo) as served:
        async with AsyncClient(served.url) as client:
            with pytest.raises(RemoteError) as unknown:
                await client.infer([[np.ones((1, 16), np.float32)]], model="nope")
            with pytest.raises(RemoteError) as wrong_shape:
                await client.infer([[np.ones((1, 15), np.float32)]], model="identity")
            with pytest.raises(RemoteError) as wrong_count:
                await client.infer([[np.ones((1, 16), np.float32)] * 2], model="identity")
            with pytest.raises(RemoteError) as wrong_dtype:
                await client.infer([[np.ones((1, 16), np.float64)]], model="identity")
            assert await client.ping() > 0
        assert unknown.value.error_code == ErrorCode.METHOD
        assert wrong_shape.value.error_code == ErrorCode.SHAPE
        assert wrong_count.value.error_code == ErrorCode.SHAPE
        assert wrong_dtype.value.error_code == ErrorCode.SHAPE
        # each says why, in the protocol's terms
        assert "nope" in unknown.value.detail
        assert "15" in wrong_shape.value.detail and "16" in wrong_shape.value.detail
        assert "2 inputs" in wrong_count.value.detail or "inputs" in wrong_count.value.detail
        assert "FP64" in wrong_dtype.value.detail and "FP32" in wrong_dtype.value.detail
        assert "float64" not in wrong_dtype.value.detail
        assert str(wrong_dtype.value).startswith("peer answered with MIP error SHAPE (4): ")


async def test_a_failing_python_model_answers_internal(tmp_path):
    repo = _python_repo(tmp_path, "broken", (
        "class Broken(Inference):\n"
        "    def preprocess(self, inputs):\n"
        "        raise RuntimeError('model failure')\n"
        "    def forward(self, inputs):\n"
        "        return inputs\n"
        "    def postprocess(self, outputs):\n"
        "        return outputs\n"))
    async with _serving(repo) as served:
        async with AsyncClient(served.url) as client:
            with pytest.raises(RemoteError) as info:
                await client.infer([["hello"]], model="broken")
        assert info.value.error_code == ErrorCode.INTERNAL
        assert "model failure" in info.value.detail


async def test_every_value_kind_travels_through_a_python_model_and_back(tmp_path):
    """TEXT, JSON, IMAGE and an application's kind reach a lifecycle model as KubeMo's
    server gives them (Dynamic values of their kind and octets) and come back as the same
    MIP values; the engine between holds plain values."""
    repo = _python_repo(tmp_path, "echo", (
        "from mip.kubemo.serialize import Dynamic\n"
        "class Echo(Inference):\n"
        "    def preprocess(self, inputs):\n"
        "        assert all(isinstance(v, Dynamic) for v in inputs), inputs\n"
        "        return ([inputs],)\n"
        "    def concat(self, batch):\n"
        "        return (sum((b[0] for b in batch), []),)\n"
        "    def forward(self, inputs):\n"
        "        return inputs\n"
        "    def postprocess(self, outputs):\n"
        "        return tuple(v.serial for v in outputs[0])\n"),
        '{"max_batch_size": 8, "inputs": ["text", "json", "image", "point"], '
        '"outputs": ["text", "json", "image", "point"]}')
    items = [[mip.Text(f"t{i}"), mip.Json({"i": i, "l": [1.5, None]}), mip.Image(b"\x89PNG%d" % i),
              mip.Value(7, b"\x00\x01%d" % i)] for i in range(3)]
    async with _serving(repo) as served:
        async with AsyncClient(served.url) as client:
            replies = await client.infer(items, model="echo")
            single = await client.infer(items[:1], model="echo")
            with pytest.raises(RemoteError) as info:  # refused before any model runs
                await client.infer([[items[0][0], mip.Json.from_bytes(b"{not json"),
                                     *items[0][2:]]], model="echo")
            assert info.value.error_code == ErrorCode.SHAPE
            assert "not valid JSON" in info.value.detail
    assert replies == [tuple(item) for item in items]
    assert single == [tuple(items[0])]
    assert [type(v) for v in replies[0]] == [mip.Text, mip.Json, mip.Image, mip.Value]


async def test_kubemo_client_reads_errors_that_say_why(demo_repo):
    """KubeMo's unmodified client against error frames with text: it discards the text and
    raises its own error with the code, as it always did, and the connection stays usable."""
    import threading

    kubemo = pytest.importorskip("kubemo")
    from kubemo.errors import InvocationError

    async with _serving(demo_repo) as served:  # two models, no default: a plain request is METHOD
        outcome = {}

        def call():
            client = kubemo.Client()
            try:
                client.inference(served.url, ((kubemo.Text("x"),),))
            except InvocationError as exc:
                outcome["error"] = str(exc)
            outcome["ping"] = client.ping(served.url)

        thread = threading.Thread(target=call)
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.05)
        thread.join()
        assert outcome["error"] == f"responded with error code: {int(ErrorCode.METHOD)}"
        assert outcome["ping"] > 0


@pytest.fixture
def fashion_repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    (repo / "fashion_mnist" / "1" / "fashion_mnist.onnx").symlink_to(FASHION / "fashion_mnist.onnx")
    return repo


def _expected_top3(image_path: Path) -> dict:
    from PIL import Image as PILImage
    session = ort.InferenceSession(str(FASHION / "fashion_mnist.onnx"),
                                   providers=["CPUExecutionProvider"])
    img = PILImage.open(image_path).resize((28, 28)).convert("L")
    x = np.array(img, dtype=np.float32).reshape(1, 28, 28) / 255.0
    logits = session.run(None, {"x": x})[0][0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    labels = ("T-Shirt", "Trouser", "Pullover", "Dress", "Coat",
              "Sandal", "Shirt", "Sneaker", "Bag", "Ankle Boot")
    return {labels[i]: float(p[i]) for i in p.argsort()[-3:][::-1]}


async def test_kubemo_client_unchanged_against_the_ported_fashion_mnist(fashion_repo):
    kubemo = pytest.importorskip("kubemo")
    async with _serving(fashion_repo) as served:
        photos = [FASHION / "t-shirt.jpg", FASHION / "ankle-boot.jpg"]

        def call():
            return kubemo.Client().inference(served.url, tuple((kubemo.Image(str(p)),) for p in photos))

        out = await asyncio.to_thread(call)
        for item, photo in zip(out, photos):
            got = item[0].decode()
            expected = _expected_top3(photo)
            assert list(got) == list(expected)
            np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=1e-5)
        # and our own client, routed by name, gets the same through the same engine
        async with AsyncClient(served.url) as client:
            ours = await client.infer([[mip.Image.open(photos[0])]], model="fashion_mnist")
        assert ours[0][0].value.keys() == _expected_top3(photos[0]).keys()


async def test_a_request_whose_client_left_is_dropped_from_the_queue(tmp_path):
    repo = _python_repo(tmp_path, "slow", (
        "import time\n"
        "class Slow(Inference):\n"
        "    def preprocess(self, inputs):\n"
        "        return tuple(x.decode() for x in inputs)\n"
        "    def concat(self, batch):\n"
        "        return tuple(zip(*batch))\n"
        "    def forward(self, inputs):\n"
        "        time.sleep(0.4)\n"
        "        return inputs\n"
        "    def postprocess(self, outputs):\n"
        "        return tuple(Text(x) for x in outputs)\n"), '{"max_batch_size": 1}')
    async with _serving(repo) as served:
        stats = served.engine.stats()[("slow", "1")]
        first, gone = AsyncClient(served.url), AsyncClient(served.url)
        running = asyncio.ensure_future(first.infer([["a"]], model="slow"))
        for _ in range(100):  # wait until the first request runs
            if stats.requests and served.engine.stats()[("slow", "1")].queue_depth == 0:
                break
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(gone.infer([["b"]], model="slow"))
        for _ in range(100):
            if stats.requests == 2:
                break
            await asyncio.sleep(0.01)
        assert served.engine.stats()[("slow", "1")].queue_depth == 1
        await gone.close()  # the second client leaves while its request waits
        for _ in range(100):
            if served.engine.stats()[("slow", "1")].queue_depth == 0:
                break
            await asyncio.sleep(0.01)
        assert served.engine.stats()[("slow", "1")].queue_depth == 0
        assert (await asyncio.wait_for(running, 5))[0][0] == mip.Text("a")
        assert stats.rows == 1  # the abandoned request never ran
        with pytest.raises(ConnectionError):
            await queued
        await first.close()


def test_clients_at_the_top_level():
    from mip.net import mip_client

    assert mip.Client is mip_client.Client and mip.AsyncClient is mip_client.AsyncClient
    assert {"Client", "AsyncClient"} <= set(mip.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        mip.Nope  # noqa: B018
