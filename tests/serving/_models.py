"""ONNX models built with onnx.helper for tests, and small test utilities."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

FASHION = Path(__file__).resolve().parents[1] / "data" / "fashion_mnist"


def identity_model(shape=("batch", 16), elem_type=None) -> bytes:
    """An ONNX Identity model ``input`` -> ``output``."""
    from onnx import TensorProto, helper

    elem_type = TensorProto.FLOAT if elem_type is None else elem_type
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])], "identity",
        [helper.make_tensor_value_info("input", elem_type, list(shape))],
        [helper.make_tensor_value_info("output", elem_type, list(shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def two_output_model() -> bytes:
    """``a`` [-1, 4] FP32, ``b`` [-1, 4] FP32 -> ``sum`` = a + b, ``product`` = a * b."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]),
         helper.make_node("Mul", ["a", "b"], ["product"])], "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 4]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 4])
         for n in ("sum", "product")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def add_model(repo: Path, name: str, data: bytes, version: str | None = "1",
              config: dict | None = None, filename: str = "model.onnx") -> Path:
    """Write ``data`` as ``repo/name/[version/]filename`` (and a config.json)."""
    folder = repo / name / version if version else repo / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / filename).write_bytes(data)
    if config is not None:
        (repo / name / "config.json").write_text(json.dumps(config))
    return folder / filename


def run(coroutine, timeout: float = 20.0):
    """Run a coroutine to completion on a fresh event loop, bounded by ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))
