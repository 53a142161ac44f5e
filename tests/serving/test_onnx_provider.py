"""ONNX Runtime provider: results, devices (no silent CPU fallback), session options."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest

from mip.errors import DeviceUnavailable
from mip.serving.providers.onnx import OnnxRunner, parse_device
from mip.serving.repository import ModelRepository, ModelState

from ._models import add_model, two_output_model

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_results_equal_a_direct_onnxruntime_run(rng):
    data = two_output_model()
    a = rng.standard_normal((5, 4)).astype(np.float32)
    b = rng.standard_normal((5, 4)).astype(np.float32)
    direct = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    expected = direct.run(None, {"a": a, "b": b})
    runner = OnnxRunner(data)
    got = runner.run({"a": a, "b": b})
    np.testing.assert_array_equal(got["sum"], expected[0])
    np.testing.assert_array_equal(got["product"], expected[1])
    assert list(runner.run({"a": a, "b": b}, ["product"])) == ["product"]


def test_read_only_views_are_accepted(rng):
    runner = OnnxRunner(two_output_model())
    buffer = rng.standard_normal((2, 8)).astype(np.float32)
    buffer.setflags(write=False)
    got = runner.run({"a": buffer[:, :4], "b": buffer[:, 4:]})
    np.testing.assert_array_equal(got["sum"], buffer[:, :4] + buffer[:, 4:])


@pytest.mark.parametrize("device, expected", [
    ("cpu", ("cpu", None)), ("cuda", ("cuda", 0)), ("cuda:1", ("cuda", 1)),
    ("CUDA:0", ("cuda", 0))])
def test_parse_device(device, expected):
    assert parse_device(device) == expected


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cpu:0", ""])
def test_parse_device_rejects(device):
    with pytest.raises(ValueError):
        parse_device(device)


@pytest.mark.skipif(HAS_CUDA, reason="this ONNX Runtime has a CUDA provider")
def test_cuda_without_cuda_provider_is_a_clear_error(repo):
    with pytest.raises(DeviceUnavailable, match="CUDAExecutionProvider"):
        OnnxRunner(two_output_model(), device="cuda:0")
    add_model(repo, "gpu", two_output_model(), config={"device": "cuda"})
    repository = ModelRepository(repo)
    with pytest.raises(Exception, match="CUDAExecutionProvider"):
        repository.load("gpu")
    [entry] = repository.index()
    assert entry.state is ModelState.UNAVAILABLE
    assert "onnxruntime-gpu" in entry.reason


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDAExecutionProvider in this ONNX Runtime")
def test_cuda_results_equal_cpu(rng):
    data = two_output_model()
    a = rng.standard_normal((3, 4)).astype(np.float32)
    cpu = OnnxRunner(data).run({"a": a, "b": a})
    gpu = OnnxRunner(data, device="cuda:0")
    assert "CUDAExecutionProvider" in gpu.session.get_providers()
    np.testing.assert_allclose(gpu.run({"a": a, "b": a})["sum"], cpu["sum"], rtol=1e-6)


def test_session_options_are_applied():
    runner = OnnxRunner(two_output_model(), options={
        "intra_op_threads": 1, "inter_op_threads": 1, "graph_optimization_level": "disable"})
    options = runner.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with pytest.raises(ValueError, match="graph_optimization_level"):
        OnnxRunner(two_output_model(), options={"graph_optimization_level": "max"})


def test_spin_wait_sets_both_pools_and_is_checked():
    quiet = OnnxRunner(two_output_model(), options={"spin_wait": False}).session
    entries = quiet.get_session_options().get_session_config_entry
    assert entries("session.intra_op.allow_spinning") == "0"
    assert entries("session.inter_op.allow_spinning") == "0"
    spinning = OnnxRunner(two_output_model()).session.get_session_options()
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert OnnxRunner(two_output_model(), options={"spin_wait": False}).run(
        {"a": a, "b": a})["sum"].tolist() == (2 * a).tolist()
    with pytest.raises(ValueError, match="spin_wait"):
        OnnxRunner(two_output_model(), options={"spin_wait": "no"})


def test_unknown_output_name_in_config(repo):
    add_model(repo, "m", two_output_model(), config={"outputs": ["difference"]})
    repository = ModelRepository(repo)
    with pytest.raises(Exception, match="difference"):
        repository.load("m")


def test_intra_op_threads_default_to_the_usable_cores_but_one():
    from mip.serving.providers.onnx import default_intra_op_threads, session_options

    cores = len(os.sched_getaffinity(0))
    assert default_intra_op_threads() == max(1, cores - 1)
    assert session_options().intra_op_num_threads == max(1, cores - 1)
    assert session_options(intra_op_threads=0).intra_op_num_threads == 0  # ONNX Runtime's
    assert session_options(intra_op_threads=3).intra_op_num_threads == 3
