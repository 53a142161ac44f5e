"""What a model's ``config.json`` says, parsed and checked.

A model folder may hold a ``config.json`` (all keys optional)::

    {
      "platform": "onnxruntime_onnx",          # or "python"; default: from the model file
      "max_batch_size": 64,                    # ROWS per batch; 0 = the model takes no batch axis
      "dynamic_batching": {                    # omit or null: one request per run
        "max_queue_delay_us": 500,             # microseconds, from the oldest queued request
        "preferred_batch_sizes": [8, 16],      # rows
        "max_queue_size": 1024,                # requests waiting; more are rejected (QueueFull)
        "max_batch_bytes": 4194304             # input octets a batch grows to (0 = no limit;
                                               # default: 4 MiB for ONNX on CPU, else none)
      },
      "instance_count": 1,                     # batches of this model run at the same time
      "device": "cpu",                         # "cpu", "cuda" or "cuda:N"
      "inputs": ["x"],                         # names, or {"name", "datatype", "shape"} objects
      "outputs": ["y"],
      "session_options": {                     # ONNX Runtime
        "intra_op_threads": 0, "inter_op_threads": 0,     # 0 = ONNX Runtime's default
        "graph_optimization_level": "all",                # disable | basic | extended | all
        "spin_wait": true                                 # pool threads spin between runs
      },
      "warmup": [1, 8],                        # batch sizes (rows) run before the model is ready
      "python": {"class": "Name", "kwargs": {}},          # Python models (see providers/python.py)
      "default_model_filename": "model.onnx"
    }

Unknown keys are an error, so that a typo never silently changes behaviour.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mip.serving.datatypes import DATATYPES

__all__ = ["TensorSpec", "DynamicBatching", "ModelConfig", "ConfigError", "read_config",
           "PLATFORM_ONNX", "PLATFORM_PYTHON", "DEFAULT_MAX_BATCH_SIZE", "DEFAULT_MAX_BATCH_BYTES"]

PLATFORM_ONNX = "onnxruntime_onnx"
PLATFORM_PYTHON = "python"

#: rows per batch for a model whose every input and output has a dynamic first axis
#: and whose config does not say otherwise.
DEFAULT_MAX_BATCH_SIZE = 64
#: requests a model's queue holds before new ones are rejected, when the config is silent.
DEFAULT_MAX_QUEUE_SIZE = 1024

_KEYS = {
    "name", "platform", "backend", "max_batch_size", "dynamic_batching", "instance_count",
    "device", "inputs", "outputs", "input", "output", "session_options", "warmup", "python",
    "default_model_filename",
}
_BATCHING_KEYS = {"max_queue_delay_us", "preferred_batch_sizes", "max_queue_size",
                  "max_batch_bytes"}
#: input octets a batch of an ONNX model on the CPU grows to when the config is silent:
#: joining requests is a copy of their tensors, which pays off for small requests (one
#: model call instead of many) and not for large ones, whose CPU compute is already per
#: octet. On a GPU, or for Python models (which may use one), batches have no such limit.
DEFAULT_MAX_BATCH_BYTES = 4 << 20
_SESSION_KEYS = {"intra_op_threads", "inter_op_threads", "graph_optimization_level", "spin_wait"}


class ConfigError(ValueError):
    """A ``config.json`` that cannot be used; the message says which key and why."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model.

    Attributes:
        name: the tensor's name.
        datatype: the Open Inference Protocol type name, e.g. ``"FP32"`` or ``"BYTES"``.
        shape: dimensions, ``-1`` for a dynamic one (the first is the batch axis of a
            batching model).
    """

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DynamicBatching:
    """Dynamic batching settings, as Triton defines them.

    Attributes:
        max_queue_delay_us: the longest a request waits for others to join its batch,
            in microseconds, counted from the oldest request in the queue.
        preferred_batch_sizes: batch sizes, in rows, the batcher tries to form.
        max_queue_size: requests that may wait in the queue; one more raises ``QueueFull``.
        max_batch_bytes: a batch takes no more requests once their input tensors reach
            this many octets (a request larger than that runs alone); 0 = no limit;
            ``None`` = the repository decides (:data:`DEFAULT_MAX_BATCH_BYTES`
            for ONNX Runtime on the CPU, no limit otherwise).
    """

    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    max_batch_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A model's configuration (see the module docstring for the JSON form).

    ``max_batch_size`` is ``None`` when the config is silent: the repository then decides
    from the model's shapes. ``inputs``/``outputs`` hold names (select and order) or full
    :class:`TensorSpec` objects (Python models).
    """

    platform: str | None = None
    max_batch_size: int | None = None
    dynamic_batching: DynamicBatching | None = None
    batching_configured: bool = False
    instance_count: int = 1
    device: str = "cpu"
    inputs: tuple[str | TensorSpec, ...] = ()
    outputs: tuple[str | TensorSpec, ...] = ()
    session_options: dict[str, Any] = field(default_factory=dict)
    warmup: tuple[int, ...] = ()
    python: dict[str, Any] = field(default_factory=dict)
    default_model_filename: str | None = None


def _int(value: Any, key: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, not {value!r}")
    return value


def _specs(value: Any, key: str) -> tuple[str | TensorSpec, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key} must be a list of names or {{name, datatype, shape}} objects")
    specs: list[str | TensorSpec] = []
    for item in value:
        if isinstance(item, str):
            specs.append(item)
            continue
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"each of {key} must be a name or an object with a name")
        datatype = item.get("datatype", item.get("data_type", "BYTES"))
        datatype = datatype.removeprefix("TYPE_").replace("STRING", "BYTES")
        if datatype not in DATATYPES:
            raise ConfigError(f"{key} {item['name']!r}: unknown datatype {datatype!r}")
        shape = item.get("shape", item.get("dims", [-1]))
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= -1 for d in shape):
            raise ConfigError(f"{key} {item['name']!r}: shape must be a list of ints (-1 = dynamic)")
        specs.append(TensorSpec(item["name"], datatype, tuple(shape)))
    return tuple(specs)


def parse_config(data: Any) -> ModelConfig:
    """Check a decoded ``config.json`` object and build a :class:`ModelConfig`."""
    if not isinstance(data, dict):
        raise ConfigError("config.json must hold a JSON object")
    unknown = set(data) - _KEYS
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    platform = data.get("platform", data.get("backend"))
    if platform is not None:
        platform = {"onnxruntime": PLATFORM_ONNX, "onnx": PLATFORM_ONNX}.get(platform, platform)
        if platform not in (PLATFORM_ONNX, PLATFORM_PYTHON):
            raise ConfigError(f"platform must be {PLATFORM_ONNX!r} or {PLATFORM_PYTHON!r}")
        kwargs["platform"] = platform
    if "max_batch_size" in data:
        kwargs["max_batch_size"] = _int(data["max_batch_size"], "max_batch_size")
    batching = data.get("dynamic_batching")
    if "dynamic_batching" in data:
        kwargs["batching_configured"] = True
    if batching is not None and batching is not False:
        if batching is True:
            batching = {}
        if not isinstance(batching, dict) or set(batching) - _BATCHING_KEYS:
            raise ConfigError(f"dynamic_batching takes only {', '.join(sorted(_BATCHING_KEYS))}")
        preferred = batching.get("preferred_batch_sizes", [])
        if not isinstance(preferred, list):
            raise ConfigError("preferred_batch_sizes must be a list of integers")
        kwargs["dynamic_batching"] = DynamicBatching(
            max_queue_delay_us=_int(batching.get("max_queue_delay_us", 0), "max_queue_delay_us"),
            preferred_batch_sizes=tuple(
                sorted({_int(p, "preferred_batch_sizes", 1) for p in preferred})),
            max_queue_size=_int(batching.get("max_queue_size", DEFAULT_MAX_QUEUE_SIZE),
                                "max_queue_size", 1),
            max_batch_bytes=(_int(batching["max_batch_bytes"], "max_batch_bytes")
                             if "max_batch_bytes" in batching else None),
        )
    if "instance_count" in data:
        kwargs["instance_count"] = _int(data["instance_count"], "instance_count", 1)
    if "device" in data:
        if not isinstance(data["device"], str):
            raise ConfigError("device must be a string: cpu, cuda or cuda:N")
        kwargs["device"] = data["device"]
    for key, plural in (("input", "inputs"), ("output", "outputs")):
        value = data.get(plural, data.get(key))
        if value is not None:
            kwargs[plural] = _specs(value, plural)
    session = data.get("session_options", {})
    if not isinstance(session, dict) or set(session) - _SESSION_KEYS:
        raise ConfigError(f"session_options takes only {', '.join(sorted(_SESSION_KEYS))}")
    kwargs["session_options"] = dict(session)
    warmup = data.get("warmup", [])
    if warmup is True:
        warmup = [1]
    elif warmup is False or warmup is None:
        warmup = []
    if not isinstance(warmup, list):
        raise ConfigError("warmup must be true, false or a list of batch sizes (rows)")
    kwargs["warmup"] = tuple(_int(w, "warmup", 1) for w in warmup)
    python = data.get("python", {})
    if not isinstance(python, dict) or set(python) - {"class", "kwargs"}:
        raise ConfigError("python takes only 'class' and 'kwargs'")
    kwargs["python"] = dict(python)
    if "default_model_filename" in data:
        kwargs["default_model_filename"] = str(data["default_model_filename"])
    return ModelConfig(**kwargs)


def read_config(directory: Path) -> ModelConfig:
    """Read ``directory/config.json``; an absent file gives the default configuration."""
    path = directory / "config.json"
    if not path.is_file():
        return ModelConfig()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path.name}: {exc}") from exc
    return parse_config(data)
