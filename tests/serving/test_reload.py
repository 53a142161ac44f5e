"""A reload while requests run: the old version finishes its work before it is closed."""

from __future__ import annotations

import asyncio

import numpy as np

from mip.serving.engine import Engine
from mip.serving.repository import ModelRepository

from ._models import add_model, identity_model, run


def test_reload_under_load_drops_and_fails_nothing(repo):
    add_model(repo, "identity", identity_model(), config={
        "max_batch_size": 8, "dynamic_batching": {"max_queue_delay_us": 2000}})

    async def go():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        outcomes = []
        stop = asyncio.Event()

        async def client():
            while not stop.is_set():
                try:
                    out = await engine.infer("identity", {"input": x})
                    outcomes.append("ok" if np.array_equal(out["output"], x) else "wrong")
                except Exception as exc:  # every failure is recorded with its kind
                    outcomes.append(type(exc).__name__)
                    # a refusal comes back at once: let the reload (and everyone else) run
                    await asyncio.sleep(0.001)

        clients = [asyncio.ensure_future(client()) for _ in range(16)]
        try:
            for _ in range(5):
                await asyncio.sleep(0.05)
                await engine.load("identity")  # reload: same version name, new objects
            await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(*clients)
            await engine.stop()
        return outcomes

    outcomes = run(go(), timeout=60)
    assert outcomes.count("ok") > 50
    # between the swap and the new batcher a request may be told to retry (503),
    # but none fails inside the model and none gets a wrong answer
    assert set(outcomes) <= {"ok", "ModelNotReady"}, set(outcomes)
