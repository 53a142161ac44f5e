"""BYTES and BF16 inputs of ONNX models, as ONNX Runtime's Python API needs them."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from mip.errors import InvalidInput
from mip.serving.engine import Engine
from mip.serving.repository import ModelRepository

from ._models import add_model, identity_model, run


def test_bytes_elements_reach_a_string_model_as_text(repo):
    add_model(repo, "strings", identity_model(("batch",), TensorProto.STRING))

    async def go():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        try:
            out = await engine.infer("strings", {"input": np.array([b"ab", b"\xc3\xa9"], dtype=object)})
            with pytest.raises(InvalidInput, match="UTF-8"):
                await engine.infer("strings", {"input": np.array([b"\xff"], dtype=object)})
            return out
        finally:
            await engine.stop()

    out = run(go())
    assert [str(x) for x in out["output"]] == ["ab", "é"]


def test_bf16_input_is_a_clear_error(repo):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    add_model(repo, "half", identity_model(("batch", 2), TensorProto.BFLOAT16))

    async def go():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        try:
            with pytest.raises(InvalidInput, match="BF16"):
                await engine.infer("half", {"input": np.ones((1, 2), ml_dtypes.bfloat16)})
        finally:
            await engine.stop()

    run(go())
