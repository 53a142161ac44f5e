"""A reload while requests run: the old version serves (and stays ready) until the new one is
loaded, the switch is one step, and the old version finishes its work before it is closed."""

from __future__ import annotations

import asyncio

import numpy as np

from mip.serving.engine import Engine
from mip.serving.repository import ModelRepository

from ._models import add_model, identity_model, run

#: an identity whose construction (the load) takes 0.2 s
SLOW_TO_LOAD = '''
import time


class Identity:
    inputs = [("input", "FP32", [-1, 16])]
    outputs = [("output", "FP32", [-1, 16])]

    def __init__(self):
        time.sleep(0.2)

    def infer(self, inputs):
        return {"output": inputs["input"]}
'''


async def _under_load(engine: Engine, reload, clients: int = 16) -> tuple[list, list]:
    """Run ``reload()`` while ``clients`` tasks send requests and one watches readiness;
    returns every request's outcome and every readiness seen."""
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    outcomes, readiness = [], []
    stop = asyncio.Event()

    async def client():
        while not stop.is_set():
            try:
                out = await engine.infer("identity", {"input": x})
                outcomes.append("ok" if np.array_equal(out["output"], x) else "wrong")
            except Exception as exc:  # every failure is recorded with its kind
                outcomes.append(type(exc).__name__)
                await asyncio.sleep(0.001)  # a refusal comes back at once: let others run

    async def watch():
        while not stop.is_set():
            readiness.append((engine.model_ready("identity"), engine.ready()))
            await asyncio.sleep(0.001)

    tasks = [asyncio.ensure_future(client()) for _ in range(clients)]
    tasks.append(asyncio.ensure_future(watch()))
    try:
        await asyncio.sleep(0.05)
        await reload()
        await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return outcomes, readiness


def test_reload_under_load_drops_and_fails_nothing(repo):
    add_model(repo, "identity", identity_model(), config={
        "max_batch_size": 8, "dynamic_batching": {"max_queue_delay_us": 2000}})

    async def go():
        engine = Engine(ModelRepository(repo))
        await engine.start()

        async def reload():
            for _ in range(20):
                await engine.load("identity")  # reload: same version name, new objects
                await asyncio.sleep(0.01)
        try:
            return await _under_load(engine, reload)
        finally:
            await engine.stop()

    outcomes, readiness = run(go(), timeout=60)
    assert outcomes.count("ok") > 50
    assert set(outcomes) == {"ok"}, set(outcomes)
    assert set(readiness) == {(True, True)}


def test_a_slow_reload_keeps_the_old_version_serving(repo):
    """While the new version takes 0.2 s to load, the old one answers and is ready."""
    add_model(repo, "identity", SLOW_TO_LOAD.encode(), filename="model.py", config={
        "max_batch_size": 8, "dynamic_batching": {"max_queue_delay_us": 1000}})

    async def go():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        before = engine.resolve("identity")
        try:
            outcomes, readiness = await _under_load(engine, lambda: engine.load("identity"))
        finally:
            after = engine.resolve("identity")
            await engine.stop()
        return outcomes, readiness, before, after

    outcomes, readiness, before, after = run(go(), timeout=60)
    assert after is not before and not before.ready  # replaced, and the old one closed
    assert set(outcomes) == {"ok"}, set(outcomes)
    assert outcomes.count("ok") > 50  # answered during the load, by the old version
    assert len(readiness) > 50 and set(readiness) == {(True, True)}


def test_a_failed_reload_keeps_the_old_version(repo):
    path = add_model(repo, "identity", identity_model())

    async def go():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        path.write_bytes(b"not an ONNX model")

        async def reload():
            try:
                await engine.load("identity")
            except Exception as exc:
                return exc
            raise AssertionError("a broken model loaded")
        try:
            outcomes, readiness = await _under_load(engine, reload)
            index = engine.index()
        finally:
            await engine.stop()
        return outcomes, readiness, index

    outcomes, readiness, index = run(go(), timeout=60)
    assert set(outcomes) == {"ok"}, set(outcomes)
    assert set(readiness) == {(True, True)}
    assert [(e.name, str(e.state)) for e in index] == [("identity", "READY")]


#: an identity that takes 0.3 s to answer
SLOW_TO_ANSWER = '''
import time


class Identity:
    inputs = [("input", "FP32", [-1, 16])]
    outputs = [("output", "FP32", [-1, 16])]

    def infer(self, inputs):
        time.sleep(0.3)
        return {"output": inputs["input"]}
'''


def _states(engine: Engine, name: str) -> list[tuple[str, str, str]]:
    return [(e.version, e.state.value, e.reason) for e in engine.index() if e.name == name]


def test_the_index_shows_loads_reloads_and_unloads_in_progress(repo):
    """Triton's repository index states: LOADING while a model loads, the version in
    service still READY (saying so) while a reload loads, UNLOADING while an unloaded
    version finishes its requests."""
    add_model(repo, "identity", SLOW_TO_LOAD.encode(), filename="model.py")
    add_model(repo, "slow", SLOW_TO_ANSWER.encode(), filename="model.py")

    async def go():
        engine = Engine(ModelRepository(repo), models=["slow"])
        await engine.start()
        seen = {}
        try:
            load = asyncio.ensure_future(engine.load("identity"))
            await asyncio.sleep(0.1)
            seen["first load"] = _states(engine, "identity")
            await load
            seen["loaded"] = _states(engine, "identity")
            reload = asyncio.ensure_future(engine.load("identity"))
            await asyncio.sleep(0.1)
            seen["reload"] = _states(engine, "identity")
            await reload
            seen["reloaded"] = _states(engine, "identity")
            request = engine.infer("slow", {"input": np.zeros((1, 16), np.float32)})
            request = asyncio.ensure_future(request)
            await asyncio.sleep(0.05)  # running
            unload = asyncio.ensure_future(engine.unload("slow"))
            await asyncio.sleep(0.05)
            seen["unload"] = _states(engine, "slow")
            await request
            await unload
            seen["unloaded"] = _states(engine, "slow")
        finally:
            await engine.stop()
        return seen

    seen = run(go(), timeout=30)
    assert seen["first load"] == [("1", "LOADING", "")]
    assert seen["loaded"] == [("1", "READY", "")]
    assert seen["reload"] == [("1", "READY", "serving while a reload loads")]
    assert seen["reloaded"] == [("1", "READY", "")]
    assert seen["unload"] == [("1", "UNLOADING", "finishing its requests")]
    assert seen["unloaded"] == [("", "UNAVAILABLE", "not loaded")]
