"""The data plane over an engine of this process: the batcher answers the frontend's reply
itself (encoder, error mapping, metrics and access log in that one step)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from mip.errors import InvalidInput
from mip.frontends.access import AccessLog
from mip.frontends.dataplane import DataPlane
from mip.frontends.oip.metrics import Metrics
from mip.serving.batching import Request
from mip.serving.demo import build_demo_repository
from mip.serving.engine import Engine
from mip.serving.repository import ModelRepository


class Mapped(Exception):
    """What the frontend's error mapping turns a failure into."""


def _encode(result):
    if float(result.outputs["output"][0, 0]) < 0:
        raise ValueError("cannot encode a negative row")
    return ("encoded", result.model, result.version, result.outputs["output"].copy())


def test_replies_are_answered_mapped_counted_and_logged(tmp_path, caplog):
    repository = build_demo_repository(tmp_path / "repo")

    async def scenario():
        engine = Engine(ModelRepository(repository), models=["identity"])
        await engine.start()
        logger = logging.getLogger("mip.access")
        plane = DataPlane(engine, Metrics(engine), access_log=AccessLog(logger))

        def submit(first: float, rows: int = 1, **options):
            x = np.full((rows, 16), first, np.float32)
            return plane.submit("mip", "identity", None, {"input": x}, then=_encode,
                                error=lambda exc: Mapped(type(exc).__name__), **options)

        answered = submit(1.0)
        unencodable = submit(-1.0)
        cancelled = submit(2.0)
        whole = submit(3.0, rows=70, split=True)  # more rows than max_batch_size (64)
        assert isinstance(answered, Request)  # the reply is the queued request itself
        cancelled.cancel()
        with pytest.raises(InvalidInput):
            submit(4.0, rows=70)  # without split: refused at once
        results = await asyncio.gather(answered, unencodable, whole, return_exceptions=True)
        statistics = plane.statistics("identity")["model_stats"][0]
        stats = engine.stats()[("identity", "1")]
        await engine.stop()
        return results, cancelled, statistics, stats

    with caplog.at_level(logging.INFO, logger="mip.access"):
        (answered, unencodable, whole), cancelled, statistics, stats = asyncio.run(scenario())
    assert answered[:3] == ("encoded", "identity", "1")
    np.testing.assert_array_equal(answered[3], np.ones((1, 16), np.float32))
    assert isinstance(unencodable, Mapped) and str(unencodable) == "ValueError"
    assert whole[3].shape == (70, 16) and float(whole[3][69, 0]) == 3.0
    assert cancelled.cancelled()
    inference = statistics["inference_stats"]
    # answered and split succeed; the encoding failure and the cancelled one fail; the
    # refused one was raised before the data plane gave it a reply (counted as failed).
    assert (inference["success"]["count"], inference["fail"]["count"]) == (2, 3)
    assert statistics["inference_count"] == 1 + 70
    assert (stats.requests, stats.successes, stats.failures) == (5, 3, 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "mip.access"]
    assert len(lines) == 4  # the refused request is the frontend's to record
