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
        "intra_op_threads": 1,     # absent: usable cores - 1; 0 = ONNX Runtime's (every core)
        "inter_op_threads": 0,                            # 0 = ONNX Runtime's default
        "graph_optimization_level": "all",                # disable | basic | extended | all
        "spin_wait": true                                 # pool threads spin between runs
      },
      "warmup": [1, 8],                        # batch sizes (rows) run before the model is ready
      "python": {"class": "Name", "kwargs": {}},          # Python models (see providers/python.py)
      "default_model_filename": "model.onnx",
      "placement": "shared"                    # with mip serve --workers: "worker" (a copy in
                                               # every worker) or "shared" (one engine process);
                                               # default: --placement
    }

Triton's names are read too, with Triton's meaning: ``dynamic_batching`` may say
``max_queue_delay_microseconds``, ``preferred_batch_size``, ``preserve_ordering`` and
``default_queue_policy`` (``max_queue_size``, ``default_timeout_microseconds``,
``allow_timeout_override``), and the top level ``version_policy``, ``instance_group``,
``parameters``, ``model_warmup`` and ``optimization`` (see :mod:`mip.serving.triton`);
``parameters`` may say ``placement`` (``worker`` or ``shared``, as the top-level key; a
``config.pbtxt`` says it there too); an ``input``/``output`` object's ``dims`` leave out the batch axis when
``max_batch_size`` > 0 (``shape`` includes it), and an output may name a
``label_filename``.

A ``config.pbtxt`` (Triton's text format) is read instead when the folder has one (a
folder with both is refused). Without either, the model takes a batch axis when every
input and output has a dynamic first dimension (up to :data:`DEFAULT_MAX_BATCH_SIZE`
rows a request), runs each request alone (dynamic batching is off unless configured,
as in Triton) and serves its highest version only (Triton's default version policy).

Unknown keys are an error naming the key, so that a typo never silently changes
behaviour; a Triton key that mip cannot honour is an error naming it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mip.errors import ConfigError
from mip.protocol.dtypes import DATATYPES

__all__ = ["TensorSpec", "DynamicBatching", "ModelConfig", "read_config", "check_placement",
           "placement_of", "PLACEMENTS", "PLATFORM_ONNX", "PLATFORM_PYTHON",
           "DEFAULT_MAX_BATCH_SIZE", "DEFAULT_MAX_BATCH_BYTES"]

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
    "default_model_filename", "placement",
}
_BATCHING_KEYS = {"max_queue_delay_us", "preferred_batch_sizes", "max_queue_size",
                  "max_batch_bytes"}
#: Triton's names in dynamic_batching -> mip's
_TRITON_BATCHING_KEYS = {"max_queue_delay_microseconds": "max_queue_delay_us",
                         "preferred_batch_size": "preferred_batch_sizes",
                         "preserve_ordering": None, "default_queue_policy": None}
_QUEUE_POLICY_KEYS = {"max_queue_size", "default_timeout_microseconds", "allow_timeout_override"}
#: top-level keys read through Triton's ModelConfig message (mip.serving.triton)
_TRITON_KEYS = {"version_policy", "instance_group", "parameters", "model_warmup",
                "optimization"}
#: input octets a batch of an ONNX model on the CPU grows to when the config is silent:
#: joining requests is a copy of their tensors, which pays off for small requests (one
#: model call instead of many) and not for large ones, whose CPU compute is already per
#: octet. On a GPU, or for Python models (which may use one), batches have no such limit.
DEFAULT_MAX_BATCH_BYTES = 4 << 20
_SESSION_KEYS = {"intra_op_threads", "inter_op_threads", "graph_optimization_level", "spin_wait"}
#: where a model runs with ``mip serve --workers N``: in every worker, or in the one engine
#: process of the server (see docs/workers.md)
PLACEMENTS = ("worker", "shared")


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
        default_timeout_us / allow_timeout_override: Triton's default queue policy: the
            microseconds a request may take (0 = no limit; mip counts the whole request,
            not only its wait in the queue; a request's own, shorter timeout applies
            whether or not ``allow_timeout_override`` is set).
        max_batch_bytes: a batch takes no more requests once their input tensors reach
            this many octets (a request larger than that runs alone); 0 = no limit;
            ``None`` = the repository decides (:data:`DEFAULT_MAX_BATCH_BYTES`
            for ONNX Runtime on the CPU, no limit otherwise).
    """

    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    max_batch_bytes: int | None = None
    default_timeout_us: int = 0
    allow_timeout_override: bool = False

    def deadline(self, deadline: float | None, now: float) -> float | None:
        """A request's ``time.monotonic()`` deadline after the queue policy's
        ``default_timeout_us`` (``now``: the request's arrival): the earlier of the two."""
        if not self.default_timeout_us:
            return deadline
        default = now + self.default_timeout_us / 1e6
        return default if deadline is None else min(deadline, default)


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
    #: ``("latest", N)``, ``("all",)`` or ``("specific", (versions...))``
    version_policy: tuple = ("latest", 1)
    #: output name -> label file (in the model's folder), for classification
    labels: dict[str, str] = field(default_factory=dict)
    #: inputs and outputs as the config declares them, checked against the model's
    declared: tuple[TensorSpec, ...] = ()
    #: Triton ``parameters`` as given (reported back by the ModelConfig call)
    parameters: dict[str, str] = field(default_factory=dict)
    #: ``"worker"`` or ``"shared"`` (:data:`PLACEMENTS`); ``None``: the server's
    #: ``--placement``
    placement: str | None = None


def check_placement(value: Any, source: str) -> str:
    """``value`` if it is one of :data:`PLACEMENTS`; else a :class:`ConfigError` naming
    ``source``."""
    if value not in PLACEMENTS:
        raise ConfigError(f"{source}: placement must be {' or '.join(map(repr, PLACEMENTS))}, "
                          f"not {value!r}")
    return value


def placement_of(directory: Path, default: str, config: ModelConfig | None = None) -> str:
    """Where the model of ``directory`` runs: ``config``'s placement (a load's own
    configuration) or its folder's, else ``default``. A folder whose configuration cannot
    be read gets ``default`` (its load says why it fails)."""
    if config is None:
        try:
            config = read_config(directory)
        except (ConfigError, OSError):
            return default
    return config.placement or default


def _int(value: Any, key: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, not {value!r}")
    return value


def _specs(value: Any, key: str, batch_axis: bool = False,
           labels: dict | None = None) -> tuple[str | TensorSpec, ...]:
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
        if not isinstance(datatype, str):
            raise ConfigError(f"{key} {item['name']!r}: datatype must be a name, not {datatype!r}")
        datatype = datatype.removeprefix("TYPE_").replace("STRING", "BYTES")
        if datatype not in DATATYPES:
            raise ConfigError(f"{key} {item['name']!r}: unknown datatype {datatype!r}")
        unknown = set(item) - {"name", "datatype", "data_type", "shape", "dims", "label_filename"}
        if unknown:
            raise ConfigError(f"{key} {item['name']!r}: unknown key {', '.join(sorted(unknown))}")
        shape = item.get("shape", item.get("dims", [-1]))
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= -1 for d in shape):
            raise ConfigError(f"{key} {item['name']!r}: shape must be a list of ints (-1 = dynamic)")
        if "shape" not in item and "dims" in item and batch_axis:
            shape = [-1, *shape]  # Triton's dims leave out the batch axis
        if "label_filename" in item and labels is not None:
            labels[item["name"]] = str(item["label_filename"])
        specs.append(TensorSpec(item["name"], datatype, tuple(shape)))
    return tuple(specs)


def parse_config(data: Any) -> ModelConfig:
    """Check a decoded ``config.json`` object and build a :class:`ModelConfig`."""
    if not isinstance(data, dict):
        raise ConfigError("config.json must hold a JSON object")
    unknown = set(data) - _KEYS - _TRITON_KEYS
    if unknown:
        from mip.serving import model_config_pb2

        triton = set(model_config_pb2.ModelConfig.DESCRIPTOR.fields_by_name)
        refused = sorted(unknown & triton)
        if refused:
            raise ConfigError(f"config key {', '.join(map(repr, refused))} is not supported by mip")
        raise ConfigError(f"unknown config key {', '.join(map(repr, sorted(unknown)))} "
                          f"(known: {', '.join(sorted(_KEYS | _TRITON_KEYS))})")
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
        batching, queue = _batching_names(batching)
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
            default_timeout_us=_int(queue.get("default_timeout_microseconds", 0),
                                    "default_timeout_microseconds"),
            allow_timeout_override=bool(queue.get("allow_timeout_override", False)),
        )
    if "instance_count" in data:
        kwargs["instance_count"] = _int(data["instance_count"], "instance_count", 1)
    if "device" in data:
        if not isinstance(data["device"], str):
            raise ConfigError("device must be a string: cpu, cuda or cuda:N")
        kwargs["device"] = data["device"]
    labels: dict[str, str] = {}
    for key, plural in (("input", "inputs"), ("output", "outputs")):
        value = data.get(plural, data.get(key))
        if value is not None:
            kwargs[plural] = _specs(value, plural, bool(kwargs.get("max_batch_size")), labels)
    kwargs["labels"] = labels
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
    if "placement" in data:
        kwargs["placement"] = check_placement(data["placement"], "config.json")
    _triton_keys(data, kwargs)
    return ModelConfig(**kwargs)


def _batching_names(batching: dict) -> tuple[dict, dict]:
    """``dynamic_batching`` with Triton's names turned into mip's, and its queue policy."""
    if not isinstance(batching, dict):
        raise ConfigError("dynamic_batching must be an object, true or false")
    unknown = set(batching) - _BATCHING_KEYS - set(_TRITON_BATCHING_KEYS)
    if unknown:
        raise ConfigError(f"dynamic_batching key {', '.join(map(repr, sorted(unknown)))} is not "
                          f"supported (known: "
                          f"{', '.join(sorted(_BATCHING_KEYS | set(_TRITON_BATCHING_KEYS)))})")
    queue = batching.get("default_queue_policy") or {}
    if not isinstance(queue, dict) or set(queue) - _QUEUE_POLICY_KEYS:
        extra = sorted(set(queue) - _QUEUE_POLICY_KEYS) if isinstance(queue, dict) else []
        raise ConfigError(f"dynamic_batching.default_queue_policy key "
                          f"{', '.join(map(repr, extra)) or '(not an object)'} is not supported "
                          f"(known: {', '.join(sorted(_QUEUE_POLICY_KEYS))})")
    renamed = {}
    for key, value in batching.items():
        target = _TRITON_BATCHING_KEYS.get(key, key)
        if target is not None:
            if target in renamed:
                raise ConfigError(f"dynamic_batching gives {target} twice (as {key} too)")
            renamed[target] = value
    if "max_queue_size" in queue:
        if "max_queue_size" in renamed:
            raise ConfigError("dynamic_batching gives max_queue_size twice")
        # Triton's 0 (no limit) is mip's default bound: memory stays bounded
        renamed["max_queue_size"] = queue["max_queue_size"] or DEFAULT_MAX_QUEUE_SIZE
    return renamed, queue


def _triton_keys(data: dict, kwargs: dict) -> None:
    """Read the top-level Triton keys of a config.json through Triton's message."""
    given = {key: data[key] for key in _TRITON_KEYS if key in data}
    if not given:
        return
    from google.protobuf import json_format

    from mip.serving import model_config_pb2
    from mip.serving.triton import from_triton

    try:
        proto = json_format.ParseDict(given, model_config_pb2.ModelConfig())
    except json_format.ParseError as exc:
        raise ConfigError(f"config.json: {exc}") from None
    if kwargs.get("max_batch_size") is not None:
        proto.max_batch_size = kwargs["max_batch_size"]
    if kwargs.get("platform"):
        proto.backend = {PLATFORM_ONNX: "onnxruntime"}.get(kwargs["platform"], kwargs["platform"])
    triton = from_triton(proto, source="config.json")
    for key, mine in (("instance_group", "instance_count"), ("instance_group", "device"),
                      ("model_warmup", "warmup")):
        if key in given:
            if mine in data:
                raise ConfigError(f"config.json gives both {key} and {mine}")
            kwargs[mine] = getattr(triton, mine)
    if "version_policy" in given:
        kwargs["version_policy"] = triton.version_policy
    if "parameters" in given or "optimization" in given:
        overlap = set(triton.session_options) & set(kwargs["session_options"])
        if overlap:
            raise ConfigError(f"config.json sets {', '.join(sorted(overlap))} twice "
                              "(parameters/optimization and session_options)")
        kwargs["session_options"] = {**kwargs["session_options"], **triton.session_options}
        kwargs["parameters"] = triton.parameters
        if triton.placement is not None:
            if "placement" in kwargs:
                raise ConfigError("config.json gives placement twice (parameters and "
                                  "placement)")
            kwargs["placement"] = triton.placement


def read_config(directory: Path) -> ModelConfig:
    """Read ``directory/config.pbtxt`` or ``directory/config.json``; without either, the
    default configuration."""
    path = directory / "config.json"
    pbtxt = directory / "config.pbtxt"
    if pbtxt.is_file():
        if path.is_file():
            raise ConfigError("the folder holds both config.pbtxt and config.json: keep one")
        from mip.serving.triton import from_triton, read_pbtxt

        return from_triton(read_pbtxt(pbtxt), directory.name)
    if not path.is_file():
        return ModelConfig()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path.name}: {exc}") from exc
    return parse_config(data)
