"""Model repository: layouts, configuration, load/unload/reload, states and reasons."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mip.errors import ModelLoadError, ModelNotFound, ModelNotReady
from mip.serving.repository import ModelRepository, ModelState
from ._models import add_model, identity_model, two_output_model


def test_bare_and_versioned_layouts(repo):
    add_model(repo, "bare", identity_model(), version=None)
    add_model(repo, "multi", identity_model(), version="1",
              config={"version_policy": {"all": {}}})
    add_model(repo, "multi", identity_model(("n", 8)), version="3")
    repository = ModelRepository(repo)
    assert repository.names() == ["bare", "multi"]
    new, old = repository.load("bare")
    assert [v.version for v in new] == ["1"] and old == []
    repository.load("multi")
    assert [v.version for v in repository.versions("multi")] == ["1", "3"]
    # No version asked: the highest ready one serves.
    assert repository.get("multi").version == "3"
    assert repository.metadata("multi").inputs[0].shape == (-1, 8)
    assert repository.metadata("multi", "1").inputs[0].shape == (-1, 16)
    assert repository.metadata("multi").versions == ("1", "3")


def test_metadata_from_onnx_graph(repo):
    add_model(repo, "two", two_output_model())
    repository = ModelRepository(repo)
    repository.load("two")
    meta = repository.metadata("two")
    assert meta.platform == "onnxruntime_onnx"
    assert [(s.name, s.datatype, s.shape) for s in meta.inputs] == [
        ("a", "FP32", (-1, 4)), ("b", "FP32", (-1, 4))]
    assert [s.name for s in meta.outputs] == ["sum", "product"]
    version = repository.get("two")
    # without a config: a batch axis, but each request runs alone (Triton's default)
    assert version.max_batch_size == 64 and version.dynamic_batching is None


def test_config_selects_outputs_and_batching(repo):
    add_model(repo, "two", two_output_model(), config={
        "max_batch_size": 8, "outputs": ["product"],
        "dynamic_batching": {"max_queue_delay_us": 250, "preferred_batch_sizes": [4, 2],
                             "max_queue_size": 3, "max_batch_bytes": 1 << 20},
        "session_options": {"intra_op_threads": 1, "graph_optimization_level": "basic",
                            "spin_wait": False}})
    repository = ModelRepository(repo)
    repository.load("two")
    version = repository.get("two")
    assert [s.name for s in version.outputs] == ["product"]
    assert version.max_batch_size == 8
    assert version.dynamic_batching.preferred_batch_sizes == (2, 4)
    assert version.dynamic_batching.max_queue_delay_us == 250
    assert version.dynamic_batching.max_queue_size == 3
    assert version.dynamic_batching.max_batch_bytes == 1 << 20


def test_fixed_first_dim_means_no_batching(repo):
    add_model(repo, "fixed", identity_model((2, 3)))
    repository = ModelRepository(repo)
    repository.load("fixed")
    version = repository.get("fixed")
    assert version.max_batch_size == 0 and version.dynamic_batching is None


def test_failures_are_reported_and_do_not_stop_others(repo):
    add_model(repo, "good", identity_model())
    add_model(repo, "broken", b"not an onnx model")
    (repo / "empty").mkdir()
    add_model(repo, "typo", identity_model(), config={"max_batch_sise": 4})
    add_model(repo, "badbatch", identity_model((2, 3)), config={"max_batch_size": 4})
    repository = ModelRepository(repo)
    for name in repository.names():
        if name == "good":
            repository.load(name)
        else:
            with pytest.raises(ModelLoadError):
                repository.load(name)
    index = {entry.name: entry for entry in repository.index()}
    assert index["good"].state is ModelState.READY and index["good"].reason == ""
    for name in ("broken", "empty", "typo", "badbatch"):
        assert index[name].state is ModelState.UNAVAILABLE
    assert "max_batch_sise" in index["typo"].reason
    assert "no model.onnx" in index["empty"].reason
    assert "dynamic first dimension" in index["badbatch"].reason
    assert index["broken"].reason
    with pytest.raises(ModelNotReady, match="not ready"):
        repository.get("broken")
    with pytest.raises(ModelNotFound):
        repository.get("absent")


def test_one_failing_version_leaves_the_other_serving(repo):
    add_model(repo, "m", identity_model(), version="1", config={"version_policy": {"all": {}}})
    add_model(repo, "m", b"garbage", version="2")
    repository = ModelRepository(repo)
    repository.load("m")
    states = {e.version: e.state for e in repository.index() if e.name == "m"}
    assert states == {"1": ModelState.READY, "2": ModelState.UNAVAILABLE}
    assert repository.get("m").version == "1"
    with pytest.raises(ModelNotReady):
        repository.get("m", "2")
    with pytest.raises(ModelNotFound):
        repository.get("m", "9")


def test_unload_and_reload(repo):
    add_model(repo, "m", identity_model())
    repository = ModelRepository(repo)
    first, _ = repository.load("m")
    add_model(repo, "m", identity_model(("n", 4)), version="2")
    second, old = repository.load("m")
    assert old == first
    assert repository.get("m").version == "2"
    for version in old:
        version.close()
    for version in repository.unload("m"):
        version.close()
    with pytest.raises(ModelNotReady, match="not loaded"):
        repository.get("m")
    assert [e.reason for e in repository.index()] == ["not loaded"]
    with pytest.raises(ModelNotFound):
        repository.unload("m")


def test_warmup_runs_before_ready(repo):
    add_model(repo, "m", identity_model(), config={"warmup": [1, 4]})
    repository = ModelRepository(repo)
    repository.load("m")
    assert repository.get("m").ready
    version = repository.get("m")
    out = version.run({"input": np.ones((2, 16), np.float32)})
    assert out["output"].shape == (2, 16)


def test_invalid_json_config_is_a_reason(repo):
    add_model(repo, "m", identity_model())
    (repo / "m" / "config.json").write_text("{not json")
    repository = ModelRepository(repo)
    with pytest.raises(ModelLoadError, match="config.json"):
        repository.load("m")
    assert json.dumps([e.reason for e in repository.index()])


@pytest.mark.parametrize("datatype", [5, None, ["FP32"]])
def test_a_datatype_that_is_not_a_name_is_a_config_error(datatype):
    from mip.errors import ConfigError
    from mip.serving.config import parse_config

    with pytest.raises(ConfigError, match="inputs 'x': datatype must be a name"):
        parse_config({"inputs": [{"name": "x", "datatype": datatype, "shape": [1]}]})
