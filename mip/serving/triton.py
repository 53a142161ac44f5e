"""Triton's model configuration (``config.pbtxt``, the ``ModelConfig`` message) and mip's.

:func:`read_pbtxt` reads a ``config.pbtxt`` with protobuf's text format into Triton's
``ModelConfig`` message (:mod:`mip.serving.model_config_pb2`); :func:`from_triton` turns
it into mip's :class:`~mip.serving.config.ModelConfig`, and :func:`to_triton` turns a
loaded version back into the message that the ``ModelConfig`` RPC and
``GET /v2/models/{m}/config`` answer.

Every field that is set is either honoured or refused: a field mip cannot honour fails
the load with the field's name (:data:`HONOURED` lists the fields read; the
``parameters`` keys and ``model_warmup`` inputs are checked one by one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import FieldDescriptor

from mip.errors import ConfigError
from mip.serving import model_config_pb2 as mc
from mip.serving.config import (DEFAULT_MAX_QUEUE_SIZE, PLATFORM_ONNX, PLATFORM_PYTHON,
                                DynamicBatching, ModelConfig, TensorSpec, check_placement)

__all__ = ["HONOURED", "MAX_CONFIG_SIZE", "config_from_json", "from_triton", "message_to_json", "read_labels",
           "read_pbtxt", "to_triton"]

#: largest config.pbtxt / config.json / label file read, in octets.
MAX_CONFIG_SIZE = 4 << 20

#: the fields of Triton's ModelConfig that mip reads (dotted paths); setting any other
#: field fails the load with its name.
HONOURED = frozenset({
    "name", "platform", "backend", "max_batch_size", "default_model_filename",
    "version_policy", "version_policy.latest", "version_policy.latest.num_versions",
    "version_policy.all", "version_policy.specific", "version_policy.specific.versions",
    "input", "input.name", "input.data_type", "input.dims", "input.format", "input.reshape",
    "input.reshape.shape",
    "output", "output.name", "output.data_type", "output.dims", "output.reshape",
    "output.reshape.shape", "output.label_filename",
    "dynamic_batching", "dynamic_batching.preferred_batch_size",
    "dynamic_batching.max_queue_delay_microseconds", "dynamic_batching.preserve_ordering",
    "dynamic_batching.default_queue_policy",
    "dynamic_batching.default_queue_policy.max_queue_size",
    "dynamic_batching.default_queue_policy.default_timeout_microseconds",
    "dynamic_batching.default_queue_policy.allow_timeout_override",
    "instance_group", "instance_group.name", "instance_group.kind", "instance_group.count",
    "instance_group.gpus",
    "optimization", "optimization.graph", "optimization.graph.level",
    "parameters", "model_warmup", "model_warmup.name", "model_warmup.batch_size",
    "model_warmup.inputs", "model_warmup.count",
    # present but empty (their only fields say "off"): nothing to honour
    "model_transaction_policy", "response_cache",
})

#: ``parameters`` keys (Triton's ONNX Runtime backend) -> mip's session options.
_SESSION_PARAMETERS = {"intra_op_thread_count": "intra_op_threads",
                       "inter_op_thread_count": "inter_op_threads"}
_GRAPH_LEVELS = {-1: "disable", 1: "extended"}  # 0: ONNX Runtime's default (all)


def _datatype(code: int, what: str) -> str:
    name = mc.DataType.Name(code)
    if code == mc.TYPE_INVALID:
        raise ConfigError(f"{what}: data_type is missing")
    return name.removeprefix("TYPE_").replace("STRING", "BYTES")


def _type_code(datatype: str) -> int:
    return mc.DataType.Value("TYPE_" + datatype.replace("BYTES", "STRING"))


def _repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 6.32; label() before
    if repeated is not None:
        return repeated() if callable(repeated) else bool(repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _unhonoured(message, prefix: str = "") -> list[str]:
    found = []
    for field, value in message.ListFields():
        path = prefix + field.name
        if path not in HONOURED:
            found.append(path)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in (value if _repeated(field) else [value]):
                found += _unhonoured(item, path + ".")
    return found


def read_pbtxt(path: Path) -> mc.ModelConfig:
    """Parse ``path`` (a config.pbtxt) into Triton's ``ModelConfig`` message.

    Raises:
        ConfigError: unreadable, larger than :data:`MAX_CONFIG_SIZE`, or not the text
            format of ``ModelConfig`` (the message gives line and column).
    """
    try:
        if path.stat().st_size > MAX_CONFIG_SIZE:
            raise ConfigError(f"{path.name} is larger than {MAX_CONFIG_SIZE} octets")
        text = path.read_text(encoding="utf-8")
        return text_format.Parse(text, mc.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        raise ConfigError(f"cannot read {path.name}: {exc}") from None


def _specs(tensors, max_batch_size: int, what: str) -> tuple[TensorSpec, ...]:
    specs = []
    for tensor in tensors:
        label = f"{what} {tensor.name!r}"
        if not tensor.name:
            raise ConfigError(f"every {what} needs a name")
        if tensor.HasField("reshape") and list(tensor.reshape.shape) != list(tensor.dims):
            raise ConfigError(f"{label}: reshape is not supported (the tensor reaches the "
                              "model in the shape of its dims)")
        if any(d < -1 for d in tensor.dims):
            raise ConfigError(f"{label}: dims must be -1 (dynamic) or positive")
        shape = tuple(tensor.dims)
        specs.append(TensorSpec(tensor.name, _datatype(tensor.data_type, label),
                                (-1, *shape) if max_batch_size > 0 else shape))
    return tuple(specs)


def _instances(groups) -> tuple[int, str]:
    count, devices = 0, set()
    for group in groups:
        kind = mc.ModelInstanceGroup.Kind.Name(group.kind)
        if kind == "KIND_MODEL":
            raise ConfigError("instance_group.kind KIND_MODEL is not supported: name KIND_CPU "
                              "or KIND_GPU")
        if kind == "KIND_CPU" and group.gpus:
            raise ConfigError("instance_group.gpus cannot be given with KIND_CPU")
        if len(group.gpus) > 1:
            raise ConfigError("instance_group.gpus lists several GPUs: mip runs a model on one "
                              "device (list one GPU)")
        if kind == "KIND_GPU" or group.gpus:
            devices.add(f"cuda:{group.gpus[0]}" if group.gpus else "cuda")
        else:
            devices.add("cpu")  # KIND_CPU, and KIND_AUTO without gpus
        if group.count < 0:
            raise ConfigError("instance_group.count must be >= 1")
        count += group.count or 1
    if len(devices) > 1:
        raise ConfigError(f"instance_group places the model on {', '.join(sorted(devices))}: "
                          "mip runs a model on one device")
    return count or 1, devices.pop() if devices else "cpu"


def _version_policy(policy) -> tuple:
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return ("all",)
    if which == "specific":
        if not policy.specific.versions:
            raise ConfigError("version_policy.specific lists no versions")
        return ("specific", tuple(sorted(set(policy.specific.versions))))
    if which == "latest":
        if policy.latest.num_versions < 1:
            raise ConfigError("version_policy.latest.num_versions must be >= 1")
        return ("latest", policy.latest.num_versions)
    return ("latest", 1)


def _warmup(samples, inputs: tuple[TensorSpec, ...], max_batch_size: int) -> tuple[int, ...]:
    rows = []
    for sample in samples:
        label = f"model_warmup {sample.name!r}"
        for name, data in sample.inputs.items():
            source = data.WhichOneof("input_data_type")
            if source != "zero_data":
                raise ConfigError(f"{label} input {name!r}: {source or 'no data source'} is not "
                                  "supported (mip warms up with zero_data)")
        if inputs and set(sample.inputs) != {s.name for s in inputs}:
            raise ConfigError(f"{label}: inputs must be the model's inputs "
                              f"({', '.join(s.name for s in inputs)})")
        batch = sample.batch_size or 1
        if max_batch_size == 0 and batch != 1:
            raise ConfigError(f"{label}: batch_size must be 1 for a model without batching")
        rows += [batch] * max(sample.count, 1)
    return tuple(rows)


def from_triton(proto: mc.ModelConfig, name: str | None = None, *,
                source: str = "config.pbtxt") -> ModelConfig:
    """mip's configuration of model ``name`` (its folder's name) from Triton's message.

    Raises:
        ConfigError: a field mip cannot honour (named), or an invalid value.
    """
    refused = _unhonoured(proto)
    if refused:
        raise ConfigError(f"{source}: {', '.join(refused)} "
                          f"{'is' if len(refused) == 1 else 'are'} not supported by mip")
    if proto.name and name is not None and proto.name != name:
        raise ConfigError(f"{source}: name {proto.name!r} does not match the folder {name!r}")
    kwargs: dict[str, Any] = {}
    platform = proto.platform or proto.backend
    if platform:
        mapped = {"onnxruntime_onnx": PLATFORM_ONNX, "onnxruntime": PLATFORM_ONNX,
                  "python": PLATFORM_PYTHON}.get(platform)
        if mapped is None or (proto.platform and proto.platform != "onnxruntime_onnx"):
            field = "platform" if proto.platform else "backend"
            raise ConfigError(f"{source}: {field} {platform!r} is not supported by mip "
                              "(onnxruntime_onnx / onnxruntime, or python)")
        kwargs["platform"] = mapped
    max_batch_size = None
    if proto.HasField("max_batch_size"):
        if proto.max_batch_size < 0:
            raise ConfigError(f"{source}: max_batch_size must be >= 0")
        max_batch_size = kwargs["max_batch_size"] = proto.max_batch_size
    rows = max_batch_size or 0
    inputs = _specs(proto.input, rows, "input")
    outputs = _specs(proto.output, rows, "output")
    python = kwargs.get("platform") == PLATFORM_PYTHON
    if inputs:
        kwargs["inputs"] = inputs if python else tuple(s.name for s in inputs)
    if outputs:
        kwargs["outputs"] = outputs if python else tuple(s.name for s in outputs)
    if max_batch_size is not None:
        kwargs["declared"] = inputs + outputs
    kwargs["labels"] = {o.name: o.label_filename for o in proto.output if o.label_filename}
    if proto.HasField("dynamic_batching"):
        batching = proto.dynamic_batching
        policy = batching.default_queue_policy
        preferred = tuple(sorted(set(batching.preferred_batch_size)))
        if preferred and (preferred[0] < 1 or (max_batch_size and preferred[-1] > max_batch_size)):
            raise ConfigError(f"{source}: dynamic_batching.preferred_batch_size must be between "
                              f"1 and max_batch_size")
        kwargs["batching_configured"] = True
        kwargs["dynamic_batching"] = DynamicBatching(
            max_queue_delay_us=batching.max_queue_delay_microseconds,
            preferred_batch_sizes=preferred,
            max_queue_size=policy.max_queue_size or DEFAULT_MAX_QUEUE_SIZE,
            default_timeout_us=policy.default_timeout_microseconds,
            allow_timeout_override=policy.allow_timeout_override)
    if proto.instance_group:
        kwargs["instance_count"], kwargs["device"] = _instances(proto.instance_group)
    kwargs["version_policy"] = _version_policy(proto.version_policy)
    session: dict[str, Any] = {}
    parameters = {}
    for key, value in proto.parameters.items():
        if key == "placement":  # mip serve --workers: where the model runs
            kwargs["placement"] = check_placement(value.string_value, source)
            parameters[key] = value.string_value
            continue
        option = _SESSION_PARAMETERS.get(key)
        if option is None or python:
            raise ConfigError(f"{source}: parameters {key!r} is not supported by mip"
                              + (f" (it reads {', '.join(_SESSION_PARAMETERS)} for ONNX models)"
                                 if not python else ""))
        try:
            session[option] = int(value.string_value)
        except ValueError:
            raise ConfigError(f"{source}: parameters {key!r} must be an integer") from None
        parameters[key] = value.string_value
    level = proto.optimization.graph.level
    if level:
        if python:
            raise ConfigError(f"{source}: optimization.graph.level applies to ONNX models only")
        session["graph_optimization_level"] = _GRAPH_LEVELS.get(level, "extended")
    kwargs["session_options"] = session
    kwargs["parameters"] = parameters
    kwargs["warmup"] = _warmup(proto.model_warmup, inputs, rows)
    if proto.default_model_filename:
        kwargs["default_model_filename"] = proto.default_model_filename
    return ModelConfig(**kwargs)


def config_from_json(text: str, name: str) -> ModelConfig:
    """mip's configuration of model ``name`` from Triton's JSON form of ``ModelConfig``
    (the ``config`` parameter of Triton's load call).

    Raises:
        ConfigError: not that JSON, or a field mip cannot honour (named).
    """
    if len(text) > MAX_CONFIG_SIZE:
        raise ConfigError(f"the load's config is larger than {MAX_CONFIG_SIZE} octets")
    try:
        proto = json_format.Parse(text, mc.ModelConfig())
    except json_format.ParseError as exc:
        raise ConfigError(f"the load's config: {exc}") from None
    return from_triton(proto, name, source="the load's config")


def read_labels(folder: Path, filename: str) -> list[str]:
    """The labels of a ``label_filename`` in the model's ``folder``: line N names class N."""
    if not filename or Path(filename).name != filename or filename.startswith("."):
        raise ConfigError(f"label_filename {filename!r} must name a file in the model's folder")
    path = folder / filename
    try:
        if path.stat().st_size > MAX_CONFIG_SIZE:
            raise ConfigError(f"label file {path.name} is larger than {MAX_CONFIG_SIZE} octets")
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read label file {path.name}: {exc}") from None


def to_triton(version) -> mc.ModelConfig:
    """The configuration in force for a loaded :class:`~mip.serving.repository.ModelVersion`,
    as Triton's ``ModelConfig`` message."""
    config = version.config
    rows = version.max_batch_size
    proto = mc.ModelConfig(name=version.name, max_batch_size=rows,
                           default_model_filename=version.path.name)
    if version.platform == PLATFORM_ONNX:
        proto.platform, proto.backend = "onnxruntime_onnx", "onnxruntime"
    else:
        proto.backend = "python"
    policy = config.version_policy
    kind = policy[0]
    if kind == "all":
        proto.version_policy.all.SetInParent()
    elif kind == "specific":
        proto.version_policy.specific.versions.extend(policy[1])
    else:
        proto.version_policy.latest.num_versions = policy[1]
    for specs, target in ((version.inputs, proto.input), (version.outputs, proto.output)):
        for spec in specs:
            tensor = target.add(name=spec.name, data_type=_type_code(spec.datatype),
                                dims=spec.shape[1:] if rows else spec.shape)
            if spec.name in config.labels:
                tensor.label_filename = config.labels[spec.name]
    batching = version.dynamic_batching
    if batching is not None:
        proto.dynamic_batching.SetInParent()
        proto.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
        proto.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
        queue = proto.dynamic_batching.default_queue_policy
        queue.max_queue_size = batching.max_queue_size
        queue.default_timeout_microseconds = batching.default_timeout_us
        queue.allow_timeout_override = batching.allow_timeout_override
    group = proto.instance_group.add(name=f"{version.name}_0", count=config.instance_count)
    if config.device.startswith("cuda"):
        group.kind = mc.ModelInstanceGroup.KIND_GPU
        group.gpus.append(int(config.device.partition(":")[2] or 0))
    else:
        group.kind = mc.ModelInstanceGroup.KIND_CPU
    for key, value in config.parameters.items():
        proto.parameters[key].string_value = value
    for index, batch in enumerate(config.warmup):
        sample = proto.model_warmup.add(name=f"warmup_{index}", batch_size=batch)
        for spec in version.inputs:
            sample.inputs[spec.name].data_type = _type_code(spec.datatype)
            sample.inputs[spec.name].dims.extend(spec.shape[1:] if rows else spec.shape)
            sample.inputs[spec.name].zero_data = True
    return proto


def _json_value(field: FieldDescriptor, value):
    if field.message_type is not None:
        return message_to_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    return value


def message_to_json(message) -> dict:
    """A message as the JSON Triton's HTTP endpoints write: proto field names, set fields,
    64-bit integers as JSON numbers (not strings), enums by name."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {str(k): _json_value(value_field, v) for k, v in value.items()}
        elif _repeated(field):
            out[field.name] = [_json_value(field, v) for v in value]
        else:
            out[field.name] = _json_value(field, value)
    return out
