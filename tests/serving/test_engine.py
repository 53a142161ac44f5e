"""The Engine: the API frontends call, over real ONNX Runtime models."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import onnxruntime as ort
import pytest

from mip.errors import DeadlineExceeded, InvalidInput, ModelLoadError, ModelNotFound, ModelNotReady
from mip.serving.demo import build_demo_repository
from mip.serving.engine import Engine
from mip.serving.repository import ModelRepository, ModelState

from ._models import add_model, identity_model, run, two_output_model


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_repository(tmp_path_factory.mktemp("demo"))


def test_many_concurrent_requests_batch_and_match_onnxruntime(demo, rng):
    direct = ort.InferenceSession(str(demo / "mlp" / "1" / "model.onnx"))
    x = rng.standard_normal((40, 784)).astype(np.float32)
    expected = direct.run(None, {"input": x})[0]
    sizes = [1, 2, 3, 1, 5, 1, 4, 2, 1, 1, 3, 2, 1, 4, 2, 1, 3, 1, 1, 1]
    bounds = np.cumsum([0] + sizes)
    records = []

    async def scenario():
        engine = Engine(ModelRepository(demo))
        engine.add_batch_hook(lambda model, version, record: records.append((model, record)))
        await engine.start()
        results = await asyncio.gather(*(
            engine.infer("mlp", {"input": x[a:b]}) for a, b in zip(bounds, bounds[1:])))
        stats = engine.stats()[("mlp", "1")]
        await engine.stop()
        return results, stats

    results, stats = run(scenario())
    for (a, b), result in zip(zip(bounds, bounds[1:]), results):
        np.testing.assert_allclose(result["logits"], expected[a:b], rtol=1e-5, atol=1e-6)
    assert stats.requests == stats.successes == len(sizes)
    assert stats.rows == sum(sizes)
    assert max(stats.batch_sizes) > 1  # requests were joined
    assert all(model == "mlp" for model, _ in records)


def test_metadata_readiness_default_and_index(demo):
    async def scenario():
        engine = Engine(ModelRepository(demo), models=["identity"])
        assert not engine.ready()
        await engine.start()
        assert engine.ready()
        meta = engine.model_metadata("identity")
        assert (meta.inputs[0].name, meta.inputs[0].datatype, meta.inputs[0].shape) == (
            "input", "FP32", (-1, 16))
        assert engine.model_ready("identity") and engine.model_ready("identity", "1")
        assert not engine.model_ready("identity", "2")
        assert not engine.model_ready("mlp")  # in the folder, not loaded
        assert engine.default_model() is None  # two models, none named
        index = {(e.name, e.version): e.state for e in engine.index()}
        assert index == {("identity", "1"): ModelState.READY, ("mlp", ""): ModelState.UNAVAILABLE}
        with pytest.raises(ModelNotReady):
            await engine.infer("mlp", {"input": np.zeros((1, 784), np.float32)})
        await engine.load("mlp")
        out = await engine.infer("mlp", {"input": np.zeros((1, 784), np.float32)})
        assert out["logits"].shape == (1, 10)
        await engine.unload("mlp")
        assert not engine.model_ready("mlp")
        with pytest.raises(ModelNotFound):
            await engine.infer("nope", {})
        await engine.stop()

    run(scenario())
    assert Engine(ModelRepository(demo), default_model="mlp").default_model() == "mlp"


def test_only_model_is_the_default(repo):
    add_model(repo, "only", identity_model())
    assert Engine(ModelRepository(repo)).default_model() == "only"


@pytest.mark.parametrize("inputs, message", [
    ({}, "missing"),
    ({"input": np.zeros((1, 16), np.float32), "extra": np.zeros(1)}, "unknown"),
    ({"input": np.zeros((1, 16), np.float64)}, "datatype"),
    ({"input": np.zeros((1, 15), np.float32)}, "shape"),
    ({"input": np.zeros(16, np.float32)}, "shape"),
    ({"input": np.zeros((), np.float32)}, "shape"),
    ({"input": np.zeros((1, 16, 1), np.float32)}, "shape"),
    ({"input": np.zeros((1, 16), ">f4")}, "datatype"),
    ({"input": [[0.0] * 16]}, "numpy array"),
])
def test_invalid_inputs(demo, inputs, message):
    async def scenario():
        engine = Engine(ModelRepository(demo), models=["identity"])
        await engine.start()
        try:
            with pytest.raises(InvalidInput, match=message):
                await engine.infer("identity", inputs)
            with pytest.raises(InvalidInput, match="no output"):
                await engine.infer("identity", {"input": np.zeros((1, 16), np.float32)},
                                   outputs=["nope"])
        finally:
            await engine.stop()

    run(scenario())


def test_inputs_must_agree_on_rows_and_outputs_can_be_chosen(repo):
    add_model(repo, "two", two_output_model())

    async def scenario():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        a = np.ones((2, 4), np.float32)
        with pytest.raises(InvalidInput, match="batch size"):
            await engine.infer("two", {"a": a, "b": np.ones((3, 4), np.float32)})
        out = await engine.infer("two", {"a": a, "b": a * 3}, outputs=["product"])
        await engine.stop()
        return out

    out = run(scenario())
    assert list(out) == ["product"]
    np.testing.assert_array_equal(out["product"], np.full((2, 4), 3, np.float32))


def test_versions_and_reload(repo):
    add_model(repo, "m", identity_model(("n", 4)), version="1",
              config={"version_policy": {"all": {}}})

    async def scenario():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        x = np.ones((1, 4), np.float32)
        assert (await engine.infer("m", {"input": x}))["output"].shape == (1, 4)
        add_model(repo, "m", identity_model(("n", 8)), version="2")
        await engine.load("m")
        assert engine.model_metadata("m").versions == ("1", "2")
        y = np.ones((1, 8), np.float32)
        assert (await engine.infer("m", {"input": y}))["output"].shape == (1, 8)
        assert (await engine.infer("m", {"input": x}, version="1"))["output"].shape == (1, 4)
        assert (await engine.infer("m", {"input": y}, version=""))["output"].shape == (1, 8)
        with pytest.raises(ModelNotFound):
            await engine.infer("m", {"input": x}, version="7")
        await engine.stop()

    run(scenario())


def test_failed_model_does_not_stop_start(repo):
    add_model(repo, "good", identity_model())
    add_model(repo, "bad", b"\x00garbage")

    async def scenario():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        assert engine.model_ready("good") and not engine.model_ready("bad")
        reasons = {e.name: e.reason for e in engine.index()}
        with pytest.raises(ModelLoadError):
            await engine.load("bad")
        await engine.stop()
        return reasons

    reasons = run(scenario())
    assert reasons["good"] == "" and reasons["bad"]


def test_deadline_already_passed(demo):
    async def scenario():
        engine = Engine(ModelRepository(demo), models=["identity"])
        await engine.start()
        with pytest.raises(DeadlineExceeded):
            await engine.infer("identity", {"input": np.zeros((1, 16), np.float32)},
                               deadline=time.monotonic() - 0.001)
        stats = engine.stats()[("identity", "1")]
        await engine.stop()
        return stats

    stats = run(scenario())
    assert stats.failures == 1


def test_refused_and_cancelled_requests_count_as_failures(demo):
    async def scenario():
        engine = Engine(ModelRepository(demo), models=["identity"])
        await engine.start()
        with pytest.raises(InvalidInput):
            engine.submit("identity", {"input": np.zeros((1, 3), np.float32)})
        gone = engine.submit("identity", {"input": np.zeros((1, 16), np.float32)})
        gone.cancel()
        await engine.infer("identity", {"input": np.ones((2, 16), np.float32)})
        stats = engine.stats()[("identity", "1")]
        await engine.stop()
        return stats

    stats = run(scenario())
    assert (stats.requests, stats.successes, stats.failures) == (3, 1, 2)
    assert stats.batch_sizes == {2: 1}  # the cancelled request never ran


def test_demo_models_are_deterministic(tmp_path):
    first = build_demo_repository(tmp_path / "a")
    second = build_demo_repository(tmp_path / "b")
    for name in ("identity", "mlp"):
        assert (first / name / "1" / "model.onnx").read_bytes() == (
            second / name / "1" / "model.onnx").read_bytes()


def test_demo_cache_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = build_demo_repository()
    assert path.is_relative_to(tmp_path)
    assert build_demo_repository() == path
    assert sorted(ModelRepository(path).names()) == ["identity", "mlp"]


def test_strict_readiness_counts_every_model_meant_to_be_served(tmp_path):
    repo = tmp_path / "repo"
    add_model(repo, "good", identity_model())
    add_model(repo, "broken", b"not an onnx model")

    async def scenario(strict):
        engine = Engine(ModelRepository(repo), strict_readiness=strict)
        await engine.start()
        try:
            assert engine.model_ready("good") and not engine.model_ready("broken")
            first = engine.ready()
            await engine.unload("good")  # unloaded on purpose: no longer expected
            after_unload = engine.ready()
            await engine.load("good")
            return first, after_unload, engine.ready()
        finally:
            await engine.stop()

    assert run(scenario(True)) == (False, False, False)  # "broken" is meant to be served
    assert run(scenario(False)) == (True, True, True)

    async def only_good():
        engine = Engine(ModelRepository(repo), models=["good"])
        assert not engine.ready()  # not started
        await engine.start()
        try:
            ready = engine.ready()
            await engine.unload("good")
            return ready, engine.ready()
        finally:
            await engine.stop()

    assert run(only_good()) == (True, True)
