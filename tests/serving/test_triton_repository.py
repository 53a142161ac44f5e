"""Triton model repositories: config.pbtxt read as Triton reads it, version policies, the
no-config batching rule, Triton's names in config.json, and refusals that name the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mip.serving.engine import Engine
from mip.errors import ModelLoadError
from mip.serving.repository import ModelRepository
from mip.serving.triton import message_to_json, to_triton
from ._models import add_model, identity_model, run, two_output_model

CLASSIFIER_PBTXT = """
name: "classifier"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { latest: { num_versions: 2 } }
input [ { name: "a" data_type: TYPE_FP32 dims: [ 4 ] },
        { name: "b" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "sum" data_type: TYPE_FP32 dims: [ 4 ] label_filename: "labels.txt" },
         { name: "product" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching {
  preferred_batch_size: [ 2, 4 ]
  max_queue_delay_microseconds: 300
  default_queue_policy { max_queue_size: 16 default_timeout_microseconds: 5000000
                         allow_timeout_override: true }
}
instance_group [ { count: 2 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
optimization { graph { level: 1 } }
model_warmup [ { name: "zeros" batch_size: 2 count: 2
                 inputs { key: "a" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } }
                 inputs { key: "b" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } }
               } ]
"""


def write_pbtxt(repo, name, text, versions=("1",), data=None):
    for version in versions:
        add_model(repo, name, data or identity_model(), version=version)
    (repo / name / "config.pbtxt").write_text(text)


def test_pbtxt_fields_map_to_what_is_served(repo):
    write_pbtxt(repo, "classifier", CLASSIFIER_PBTXT, versions=("1", "2", "3"),
                data=two_output_model())
    (repo / "classifier" / "labels.txt").write_text("w\nx\ny\nz\n")
    repository = ModelRepository(repo)
    repository.load("classifier")
    # latest 2 of versions 1, 2, 3
    assert [v.version for v in repository.versions("classifier")] == ["2", "3"]
    version = repository.get("classifier")
    assert version.max_batch_size == 8
    batching = version.dynamic_batching
    assert batching.preferred_batch_sizes == (2, 4) and batching.max_queue_delay_us == 300
    assert batching.max_queue_size == 16 and batching.default_timeout_us == 5_000_000
    assert batching.deadline(None, 10.0) == 15.0 and batching.deadline(11.0, 10.0) == 11.0
    assert version.config.instance_count == 2 and version.config.device == "cpu"
    assert version.config.session_options == {"intra_op_threads": 1,
                                              "graph_optimization_level": "extended"}
    assert version.config.warmup == (2, 2)
    assert version.labels == {"sum": ["w", "x", "y", "z"]}
    # the ModelConfig message says the same, in Triton's terms
    config = message_to_json(to_triton(version))
    assert config["max_batch_size"] == 8 and config["platform"] == "onnxruntime_onnx"
    assert config["input"][0] == {"name": "a", "data_type": "TYPE_FP32", "dims": [4]}
    assert config["output"][0]["label_filename"] == "labels.txt"
    assert config["dynamic_batching"]["preferred_batch_size"] == [2, 4]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 300
    assert config["dynamic_batching"]["default_queue_policy"] == {
        "default_timeout_microseconds": 5000000, "allow_timeout_override": True,
        "max_queue_size": 16}
    assert config["instance_group"] == [{"name": "classifier_0", "count": 2,
                                         "kind": "KIND_CPU"}]
    assert config["version_policy"] == {"latest": {"num_versions": 2}}
    assert config["parameters"] == {"intra_op_thread_count": {"string_value": "1"}}
    assert [w["batch_size"] for w in config["model_warmup"]] == [2, 2]


def test_max_batch_size_zero_means_no_batch_axis(repo):
    write_pbtxt(repo, "plain", 'max_batch_size: 0\ninput [{name: "input" data_type: TYPE_FP32 '
                'dims: [-1, 16]}]\noutput [{name: "output" data_type: TYPE_FP32 dims: [-1, 16]}]')
    repository = ModelRepository(repo)
    repository.load("plain")
    version = repository.get("plain")
    assert version.max_batch_size == 0 and version.dynamic_batching is None

    async def scenario():
        engine = Engine(repository=ModelRepository(repo))
        await engine.start()
        try:
            x = np.ones((3, 16), np.float32)
            out = await engine.infer("plain", {"input": x})
            np.testing.assert_array_equal(out["output"], x)
            stats = engine.stats()[("plain", "1")]
            assert stats.batches == 1 and stats.rows == 1  # one request, no batch axis
        finally:
            await engine.stop()

    run(scenario())


def test_batching_without_dynamic_batching_runs_requests_alone(repo):
    write_pbtxt(repo, "alone", 'max_batch_size: 8')  # Triton: no dynamic_batching, no batching
    add_model(repo, "noconfig", identity_model())
    repository = ModelRepository(repo)
    for name in ("alone", "noconfig"):
        repository.load(name)
        version = repository.get(name)
        assert version.max_batch_size > 0 and version.dynamic_batching is None


def test_version_policies(repo):
    for name, policy, expected in (
            ("latest", "", ["3"]),  # Triton's default: latest 1
            ("all", "version_policy: { all: {} }", ["1", "2", "3"]),
            ("specific", "version_policy: { specific: { versions: [1, 3] } }", ["1", "3"])):
        write_pbtxt(repo, name, policy, versions=("1", "2", "3"))
        repository = ModelRepository(repo)
        repository.load(name)
        assert [v.version for v in repository.versions(name)] == expected, name


@pytest.mark.parametrize("text, field", [
    ("sequence_batching { max_sequence_idle_microseconds: 5000000 }", "sequence_batching"),
    ("dynamic_batching { priority_levels: 2 }", "dynamic_batching.priority_levels"),
    ("instance_group [ { count: 1 kind: KIND_CPU rate_limiter { priority: 2 } } ]",
     "instance_group.rate_limiter"),
    ('input [ { name: "input" data_type: TYPE_FP32 dims: [16] optional: true } ]',
     "input.optional"),
    ('backend: "tensorrt"', "backend 'tensorrt'"),
    ('parameters { key: "cudnn_conv_algo_search" value: { string_value: "1" } }',
     "parameters 'cudnn_conv_algo_search'"),
    ("response_cache { enable: true }", "response_cache.enable"),
    ("dynamic_batching { default_queue_policy { timeout_action: DELAY } }",
     "dynamic_batching.default_queue_policy.timeout_action"),
    ('max_batch_size: 4\ninput [ { name: "input" data_type: TYPE_FP32 dims: [16] '
     'reshape: { shape: [4, 4] } } ]', "reshape"),
    ("max_batch_size: 4\ninput [ { name: \"input\" data_type: TYPE_INT64 dims: [16] } ]",
     "the config says INT64"),
    ("model_warmup [ { batch_size: 1 inputs { key: \"input\" value: { data_type: TYPE_FP32 "
     "dims: [16] random_data: true } } } ]", "random_data"),
    ("max_batch_sise: 4", 'no field named "max_batch_sise"'),
])
def test_unsupported_fields_fail_the_load_naming_them(repo, text, field):
    write_pbtxt(repo, "m", text)
    with pytest.raises(ModelLoadError) as info:
        ModelRepository(repo).load("m")
    assert field in str(info.value)


def test_config_json_takes_triton_names(repo):
    add_model(repo, "m", identity_model(), version="1", config={
        "max_batch_size": 8,
        "dynamic_batching": {"max_queue_delay_microseconds": 100, "preferred_batch_size": [4],
                             "default_queue_policy": {"max_queue_size": 5}},
        "instance_group": [{"count": 3, "kind": "KIND_CPU"}],
        "version_policy": {"all": {}},
        "output": [{"name": "output", "data_type": "TYPE_FP32", "dims": [16],
                    "label_filename": "labels.txt"}]})
    add_model(repo, "m", identity_model(), version="2")
    (repo / "m" / "labels.txt").write_text("only\n")
    repository = ModelRepository(repo)
    repository.load("m")
    assert [v.version for v in repository.versions("m")] == ["1", "2"]
    version = repository.get("m")
    assert version.dynamic_batching.max_queue_delay_us == 100
    assert version.dynamic_batching.preferred_batch_sizes == (4,)
    assert version.dynamic_batching.max_queue_size == 5
    assert version.config.instance_count == 3
    assert version.outputs[0].shape == (-1, 16)  # dims without the batch axis
    assert version.labels == {"output": ["only"]}


@pytest.mark.parametrize("config, message", [
    ({"max_batch_sise": 4}, "'max_batch_sise'"),
    ({"sequence_batching": {}}, "'sequence_batching' is not supported"),
    ({"dynamic_batching": {"priority_levels": 2}}, "'priority_levels'"),
    ({"instance_group": [{"count": 1}], "instance_count": 2}, "instance_group and instance_count"),
])
def test_config_json_errors_name_the_key(repo, config, message):
    add_model(repo, "m", identity_model(), config=config)
    with pytest.raises(ModelLoadError) as info:
        ModelRepository(repo).load("m")
    assert message in str(info.value)


def test_both_config_files_are_refused(repo):
    write_pbtxt(repo, "m", "max_batch_size: 4")
    (repo / "m" / "config.json").write_text(json.dumps({"max_batch_size": 4}))
    with pytest.raises(ModelLoadError, match="both config.pbtxt and config.json"):
        ModelRepository(repo).load("m")


def test_label_file_stays_in_the_model_folder(repo):
    write_pbtxt(repo, "m", 'max_batch_size: 4\noutput [{name: "output" data_type: TYPE_FP32 '
                'dims: [16] label_filename: "../secret"}]')
    with pytest.raises(ModelLoadError, match="label_filename"):
        ModelRepository(repo).load("m")


SLEEPY = '''
import time
import numpy as np

class Sleepy:
    inputs = [("x", "FP32", [-1, 1])]
    outputs = [("y", "FP32", [-1, 1])]

    def infer(self, inputs):
        time.sleep(float(inputs["x"].max()))
        return {"y": np.array(inputs["x"], copy=True)}
'''


def test_python_model_and_queue_policy_timeout(repo):
    from mip.errors import DeadlineExceeded

    (repo / "sleepy" / "1").mkdir(parents=True)
    (repo / "sleepy" / "1" / "model.py").write_text(SLEEPY)
    (repo / "sleepy" / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 4\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'dynamic_batching { default_queue_policy { default_timeout_microseconds: 50000 } }\n'
        'instance_group [ { count: 2 kind: KIND_CPU } ]\n')

    async def scenario():
        engine = Engine(ModelRepository(repo))
        await engine.start()
        try:
            # the first batch runs in a worker thread (no compute time is known yet)
            with pytest.raises(DeadlineExceeded):
                await engine.infer("sleepy", {"x": np.full((1, 1), 0.5, np.float32)})
            # a second instance answers while the first still sleeps
            fast = await engine.infer("sleepy", {"x": np.zeros((2, 1), np.float32)})
            assert fast["y"].shape == (2, 1)
        finally:
            await engine.stop()

    run(scenario())
