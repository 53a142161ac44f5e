"""The built-in demo repository: small ONNX models the package builds itself.

``mip serve`` with no repository serves this, so a first run needs no download:

* ``identity``: FP32 ``input`` [-1, 16] -> ``output`` [-1, 16], the input unchanged.
* ``mlp``: FP32 ``input`` [-1, 784] -> ``logits`` [-1, 10]; 784 -> 128 (ReLU) -> 10,
  weights drawn from a fixed seed, so every build gives the same model.

Both batch dynamically (``max_batch_size`` 64 rows).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["build_demo_repository", "demo_models", "DEMO_VERSION"]

#: bumped whenever the demo models change, so a stale cached copy is rebuilt.
DEMO_VERSION = "1"
_SEED = 20240229
_CONFIG = {"max_batch_size": 64, "dynamic_batching": {"max_queue_delay_us": 0,
                                                     "max_queue_size": 1024}}


def demo_models() -> dict[str, bytes]:
    """The demo models as serialized ONNX (name -> bytes); needs the ``onnx`` package."""
    from onnx import TensorProto, helper, numpy_helper

    def model(graph):
        built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                  producer_name="mip")
        built.ir_version = 8  # readable by every ONNX Runtime since 1.10
        return built.SerializeToString()

    identity = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])], "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 16])])

    rng = np.random.default_rng(_SEED)
    w1 = (rng.standard_normal((784, 128)) / np.sqrt(784)).astype(np.float32)
    b1 = np.zeros(128, dtype=np.float32)
    w2 = (rng.standard_normal((128, 10)) / np.sqrt(128)).astype(np.float32)
    b2 = (rng.standard_normal(10) * 0.01).astype(np.float32)
    mlp = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w1", "b1"], ["hidden"]),
         helper.make_node("Relu", ["hidden"], ["activated"]),
         helper.make_node("Gemm", ["activated", "w2", "b2"], ["logits"])], "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 784])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(a, n)
                     for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    return {"identity": model(identity), "mlp": model(mlp)}


def _default_directory() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mip" / f"demo-repository-v{DEMO_VERSION}"


def _write(directory: Path) -> None:
    for name, data in demo_models().items():
        version_dir = directory / name / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        (version_dir / "model.onnx").write_bytes(data)
        (directory / name / "config.json").write_text(json.dumps(_CONFIG, indent=2) + "\n")


def build_demo_repository(directory: str | os.PathLike | None = None) -> Path:
    """Write the demo repository and return its path.

    Args:
        directory: where to write it. ``None``: a cache folder
            (``$XDG_CACHE_HOME/mip/demo-repository-v1``, else ``~/.cache/...``), reused
            when already complete; when that is not writable, a new temporary folder.
    """
    if directory is not None:
        target = Path(directory)
        _write(target)
        return target
    target = _default_directory()
    if all((target / name / "1" / "model.onnx").is_file() for name in ("identity", "mlp")):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built beside the target and renamed, so concurrent builders never see half a repo.
        staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
        _write(staging)
        try:
            staging.rename(target)
        except OSError:  # another process won the race: its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
        return target
    except OSError:
        fallback = Path(tempfile.mkdtemp(prefix="mip-demo-"))
        _write(fallback)
        return fallback
