"""Python models in the repository: KubeMo's lifecycle and tensor models, through the Engine."""

from __future__ import annotations

import asyncio
import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import mip
from mip.errors import InternalError, ModelLoadError
from mip.serving.config import DEFAULT_MAX_BATCH_BYTES
from mip.serving.engine import Engine
from mip.serving.repository import ModelRepository, ModelState

from ._models import FASHION, add_model, identity_model, run

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fashion_mnist" / "model_repository"

LENGTH_MODEL = """
from typing import Tuple
import numpy
from {prefix}.adaptor.arith import Inference
from {prefix}.serialize import Json, Text

class TextLength(Inference):
    def preprocess(self, inputs):
        return numpy.array([[len(inputs[0].decode())]], dtype=numpy.float32),

    def forward(self, inputs):
        return inputs[0] * 2,

    def postprocess(self, outputs):
        return Json({{"double": outputs[0][0]}}), Text("ok")
"""

TENSOR_MODEL = """
import numpy as np

class Scale:
    inputs = [("x", "FP32", [-1, 3])]
    outputs = [("y", "FP32", [-1, 3])]

    def __init__(self, factor=2.0):
        self.factor = factor

    def infer(self, inputs):
        return {"y": inputs["x"] * np.float32(self.factor)}
"""


def write_model(repo: Path, name: str, source: str, config: dict | None = None) -> None:
    folder = repo / name / "1"
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(textwrap.dedent(source))
    if config is not None:
        (repo / name / "config.json").write_text(json.dumps(config))


def texts(*values: str) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = list(values)
    return column


@pytest.mark.parametrize("prefix", ["mip.kubemo", "kubemo"])
def test_kubemo_lifecycle_batches_values(repo, prefix):
    if prefix == "kubemo":
        pytest.importorskip("kubemo")
    write_model(repo, "length", LENGTH_MODEL.format(prefix=prefix),
                {"inputs": ["text"], "outputs": ["double", "status"],
                 "dynamic_batching": {"max_queue_delay_us": 20_000}})
    words = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]

    async def scenario():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        meta = engine.model_metadata("length")
        results = await asyncio.gather(
            engine.infer("length", {"text": texts(*words[:2])}),
            *(engine.infer("length", {"text": texts(w)}) for w in words[2:]))
        stats = engine.stats()[("length", "1")]
        await engine.stop()
        return meta, results, stats

    meta, results, stats = run(scenario())
    assert [(s.name, s.datatype, s.shape) for s in meta.inputs] == [("text", "BYTES", (-1,))]
    assert [s.name for s in meta.outputs] == ["double", "status"]
    assert meta.platform == "python"
    assert max(stats.batch_sizes) > 1
    # The outputs are engine values (JSON decoded, TEXT as str), not MIP values: each
    # frontend makes its own protocol's values of them.
    doubles = [v for r in results for v in r["double"]]
    assert doubles == [{"double": 2.0 * len(w)} for w in words]
    assert [v for r in results for v in r["status"]] == ["ok"] * len(words)


def test_plain_str_and_bytes_values_reach_the_model(repo):
    write_model(repo, "length", LENGTH_MODEL.format(prefix="mip.kubemo"),
                {"outputs": ["double", "status"]})

    async def scenario():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        out = await engine.infer("length", {"input_0": np.array(["four", "sixsix"])})
        await engine.stop()
        return out

    out = run(scenario())
    assert [v["double"] for v in out["double"]] == [8.0, 12.0]


SEES = """
from mip.kubemo.adaptor.arith import Inference
from mip.kubemo.serialize import Dynamic, Json

class Sees(Inference):
    def preprocess(self, inputs):
        value = inputs[0]
        assert isinstance(value, Dynamic), type(value)
        return [(value.kind, type(value.serial).__name__, value.encode())],

    def concat(self, batch):
        return tuple(sum(column, []) for column in zip(*batch))

    def forward(self, inputs):
        return inputs

    def postprocess(self, outputs):
        kind, cls, octets = outputs[0]
        return Json([kind, cls, octets.decode("latin-1")]),
"""


def test_a_lifecycle_model_sees_what_kubemos_server_gives_it(repo):
    """Engine values (str, bytes-like, decoded JSON, mip.Value) reach preprocess as
    Dynamic values of their kind and octets, as KubeMo's server builds them."""
    write_model(repo, "sees", SEES)
    values = ["tö", b"\x89PNG", memoryview(b"raw"), {"a": [1, 2]}, mip.Value(7, b"\x01\x02")]

    async def scenario():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        column = np.empty(len(values), dtype=object)
        column[:] = values
        out = await engine.infer("sees", {"input_0": column})
        await engine.stop()
        return out

    out = run(scenario())
    assert list(out["output_0"]) == [
        [1, "Text", "tö".encode().decode("latin-1")], [3, "Image", "\x89PNG"],
        [3, "Image", "raw"], [2, "Json", '{"a": [1, 2]}'], [7, "Input", "\x01\x02"]]


def test_tensor_python_model(repo, rng):
    write_model(repo, "scale", TENSOR_MODEL, {"python": {"kwargs": {"factor": 3.0}}})
    x = rng.standard_normal((4, 3)).astype(np.float32)

    async def scenario():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        meta = engine.model_metadata("scale")
        out = await engine.infer("scale", {"x": x})
        await engine.stop()
        return meta, out

    meta, out = run(scenario())
    assert (meta.inputs[0].datatype, meta.inputs[0].shape) == ("FP32", (-1, 3))
    np.testing.assert_allclose(out["y"], x * 3, rtol=1e-6)


def test_output_count_mismatch_is_an_internal_error(repo):
    write_model(repo, "length", LENGTH_MODEL.format(prefix="mip.kubemo"))  # declares 1 output

    async def scenario():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        try:
            with pytest.raises(InternalError, match="declares 1 outputs"):
                await engine.infer("length", {"input_0": texts("x")})
        finally:
            await engine.stop()

    run(scenario())


def test_load_failures_have_reasons(repo):
    write_model(repo, "two", TENSOR_MODEL + "\n\nclass Other(Scale):\n    pass\n")
    write_model(repo, "raises", "raise RuntimeError('cannot import this')\n")
    write_model(repo, "nocuda", TENSOR_MODEL, {"device": "cuda:0"})
    repository = ModelRepository(repo)
    for name in ("two", "raises", "nocuda"):
        with pytest.raises(ModelLoadError):
            repository.load(name)
    reasons = {e.name: e.reason for e in repository.index()}
    assert "exactly one model class" in reasons["two"]
    assert "cannot import this" in reasons["raises"]
    assert "device_id" in reasons["nocuda"]
    (repo / "two" / "config.json").write_text(json.dumps({"python": {"class": "Other"}}))
    repository.load("two")
    assert [e.state for e in repository.index() if e.name == "two"] == [ModelState.READY]


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this ONNX Runtime has a CUDA provider")
def test_kubemo_onnx_adaptor_on_cuda_without_provider(repo):
    shutil.copytree(EXAMPLE / "fashion_mnist", repo / "fashion_mnist")
    (repo / "fashion_mnist" / "1" / "fashion_mnist.onnx").symlink_to(
        (FASHION / "fashion_mnist.onnx").resolve())
    config = json.loads((repo / "fashion_mnist" / "config.json").read_text())
    (repo / "fashion_mnist" / "config.json").write_text(json.dumps({**config, "device": "cuda"}))
    repository = ModelRepository(repo)
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider"):
        repository.load("fashion_mnist")


def test_fashion_mnist_example_equals_a_direct_onnxruntime_run(repo):
    pil = pytest.importorskip("PIL.Image")
    shutil.copytree(EXAMPLE / "fashion_mnist", repo / "fashion_mnist")
    (repo / "fashion_mnist" / "1" / "fashion_mnist.onnx").symlink_to(
        (FASHION / "fashion_mnist.onnx").resolve())
    photos = [FASHION / "t-shirt.jpg", FASHION / "ankle-boot.jpg"]

    session = ort.InferenceSession(str(FASHION / "fashion_mnist.onnx"))
    expected = []
    for photo in photos:
        x = np.array(pil.open(photo).resize((28, 28)).convert("L"),
                     dtype=np.float32).reshape(1, 28, 28) / 255.0
        logits = session.run(None, {"x": x})[0][0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        expected.append(np.sort(p)[::-1][:3])

    async def scenario():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        column = np.empty(1, dtype=object)
        requests = []
        for photo in photos * 3:
            column = np.empty(1, dtype=object)
            column[0] = photo.read_bytes()
            requests.append(engine.infer("fashion_mnist", {"image": column}))
        results = await asyncio.gather(*requests)
        await engine.stop()
        return results

    results = run(scenario())
    for i, result in enumerate(results):
        top = result["labels"][0]
        assert len(top) == 3
        np.testing.assert_allclose(sorted(top.values(), reverse=True), expected[i % 2],
                                   rtol=1e-5)


def test_reload_python_model_keeps_the_new_module(repo, rng):
    write_model(repo, "scale", TENSOR_MODEL, {"python": {"kwargs": {"factor": 2.0}}})
    x = rng.standard_normal((2, 3)).astype(np.float32)

    async def scenario():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        (repo / "scale" / "config.json").write_text(
            json.dumps({"python": {"kwargs": {"factor": 5.0}}}))
        await engine.load("scale")
        runner = engine.repository.get("scale").runner
        module_loaded = type(runner.model).__module__ in __import__("sys").modules
        out = await engine.infer("scale", {"x": x})
        await engine.stop()
        return module_loaded, out

    module_loaded, out = run(scenario())
    assert module_loaded
    np.testing.assert_allclose(out["y"], x * 5, rtol=1e-6)


def test_batch_byte_cap_defaults_to_none_for_python_and_4mib_for_onnx_on_cpu(repo):
    write_model(repo, "scale", TENSOR_MODEL, {"max_batch_size": 8, "dynamic_batching": {}})
    add_model(repo, "onnx", identity_model(), config={"max_batch_size": 8,
                                                      "dynamic_batching": {}})
    add_model(repo, "capped", identity_model(), config={
        "max_batch_size": 8, "dynamic_batching": {"max_batch_bytes": 1024}})
    add_model(repo, "uncapped", identity_model(), config={
        "max_batch_size": 8, "dynamic_batching": {"max_batch_bytes": 0}})

    async def scenario():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        caps = {name: engine._served[(name, "1")].batcher.max_batch_bytes
                for name in ("scale", "onnx", "capped", "uncapped")}
        await engine.stop()
        return caps

    assert run(scenario()) == {"scale": float("inf"), "onnx": DEFAULT_MAX_BATCH_BYTES,
                               "capped": 1024, "uncapped": float("inf")}
