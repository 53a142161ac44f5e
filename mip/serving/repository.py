"""A folder of models, laid out like a Triton model repository.

::

    REPOSITORY/
      NAME/config.pbtxt           optional: Triton's text format (see mip.serving.triton),
      NAME/config.json              or mip's JSON form (see mip.serving.config)
      NAME/1/model.onnx           versions are folders with integer names
      NAME/2/model.onnx
      OTHER/model.onnx            a bare model file is version "1"
      PYMODEL/model.py            Python models (see mip.serving.providers.python)

Each model name is loaded and unloaded as a unit (the versions its version policy
names: by default the highest one, as in Triton); every version has its own state. A
version that fails to load is marked ``UNAVAILABLE`` with the reason, and the other
models and versions load regardless.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mip.errors import ConfigError, ModelLoadError, ModelNotFound, ModelNotReady, ServingError
from mip.protocol.dtypes import numpy_dtype
from mip.serving.config import (DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_BATCH_SIZE, PLATFORM_ONNX,
                                PLATFORM_PYTHON, DynamicBatching, ModelConfig, TensorSpec,
                                read_config)
from mip.serving.triton import read_labels

__all__ = ["ModelRepository", "ModelVersion", "ModelState", "ModelMetadata", "IndexEntry",
           "TensorSpec"]

_MODEL_FILES = {"model.onnx": PLATFORM_ONNX, "model.py": PLATFORM_PYTHON}


class ModelState(str, enum.Enum):
    """The state of one model version, named as in Triton's repository index."""

    UNAVAILABLE = "UNAVAILABLE"  #: not loaded, unloaded, or failed (see the reason)
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"

    def __str__(self) -> str:
        return self.value  # logs and JSON bodies show "READY", not "ModelState.READY"


_READY = ModelState.READY  # read once: enum attribute access is slow on a hot path


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One row of the repository index: ``reason`` says why a version is not ready."""

    name: str
    version: str
    state: ModelState
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """A model's metadata as the Open Inference Protocol reports it.

    ``inputs``/``outputs`` shapes use -1 for dynamic dims, the batch axis included.
    """

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


class ModelVersion:
    """One version of a model: its files, configuration, state and loaded runner.

    Attributes:
        max_batch_size: rows per batch (0 = no batch axis), after defaults are applied.
        dynamic_batching: the batching settings in force, or ``None``.
        row_values: whether its ``BYTES`` inputs and outputs hold one value a row (a
            KubeMo-lifecycle model: ``str`` text, bytes-like images, decoded JSON), rather
            than tensors' elements.
    """

    def __init__(self, name: str, version: str, path: Path, platform: str, config: ModelConfig):
        self.name = name
        self.version = version
        self.path = path
        self.platform = platform
        self.config = config
        self.state = ModelState.UNAVAILABLE
        self.reason = "not loaded"
        self.runner: Any = None
        self.inputs: tuple[TensorSpec, ...] = ()
        self.outputs: tuple[TensorSpec, ...] = ()
        self.max_batch_size = 0
        self.dynamic_batching: DynamicBatching | None = None
        self.labels: dict[str, list[str]] = {}  # output name -> class labels
        self.row_values = False

    def __repr__(self) -> str:
        return f"<ModelVersion {self.name}/{self.version} {self.state.value}>"

    @property
    def ready(self) -> bool:
        """Whether the version serves requests."""
        return self.state is _READY

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch through the loaded runner (blocking; call from a worker thread)."""
        return self.runner.run(inputs)

    def load(self) -> None:
        """Load the runner, apply batching defaults, warm up; sets the state and reason."""
        self.state, self.reason = ModelState.LOADING, ""
        try:
            self.runner = _open_runner(self)
            self.inputs = tuple(self.runner.inputs)
            self.outputs = tuple(self.runner.outputs)
            self.row_values = bool(getattr(self.runner, "lifecycle", False))
            self._settle_batching()
            self._check_declared()
            self.labels = {name: read_labels(self._model_folder(), filename)
                           for name, filename in self.config.labels.items()}
            for rows in self.config.warmup:
                self.run(_warmup_inputs(self.inputs, rows, self.max_batch_size > 0))
        except Exception as exc:  # every failure becomes the version's reason
            self.close()
            self.state = ModelState.UNAVAILABLE
            self.reason = f"{type(exc).__name__}: {exc}" if not isinstance(
                exc, (ConfigError, ServingError)) else str(exc)
            return
        self.state, self.reason = ModelState.READY, ""

    def close(self, reason: str = "unloaded") -> None:
        """Release the runner; the version becomes ``UNAVAILABLE`` with ``reason``."""
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.close()
        self.state, self.reason = ModelState.UNAVAILABLE, reason

    def _model_folder(self) -> Path:
        folder = self.path.parent
        return folder.parent if folder.name == self.version and folder.name.isdigit() else folder

    def _check_declared(self) -> None:
        """The config's inputs and outputs (Triton's data_type and dims) against the model's."""
        actual = {spec.name: spec for spec in self.inputs + self.outputs}
        for spec in self.config.declared:
            found = actual.get(spec.name)
            if found is None:
                raise ConfigError(f"the config names {spec.name!r}, which the model does not "
                                  f"have (it has {', '.join(sorted(actual))})")
            if found.datatype != spec.datatype:
                raise ConfigError(f"{spec.name!r}: the config says {spec.datatype}, the model "
                                  f"has {found.datatype}")
            if len(found.shape) != len(spec.shape) or any(
                    a != b and -1 not in (a, b) for a, b in zip(found.shape, spec.shape)):
                raise ConfigError(f"{spec.name!r}: the config's shape {list(spec.shape)} (batch "
                                  f"axis included) does not fit the model's {list(found.shape)}")
        if self.config.declared:
            # the declared dims are the served ones (a dynamic model dim may be fixed)
            declared = {spec.name: spec for spec in self.config.declared}
            self.inputs = tuple(declared.get(s.name, s) for s in self.inputs)
            self.outputs = tuple(declared.get(s.name, s) for s in self.outputs)
        for name in self.config.labels:
            if name not in {spec.name for spec in self.outputs}:
                raise ConfigError(f"label_filename is given for {name!r}, which is not an output")

    def _settle_batching(self) -> None:
        specs = self.inputs + self.outputs
        batchable = bool(specs) and all(s.shape and s.shape[0] == -1 for s in specs)
        configured = self.config.max_batch_size
        if configured is None:
            self.max_batch_size = DEFAULT_MAX_BATCH_SIZE if batchable else 0
        elif configured > 0 and not batchable:
            fixed = [s.name for s in specs if not s.shape or s.shape[0] != -1]
            raise ConfigError(f"max_batch_size {configured} needs a dynamic first dimension, "
                              f"which {', '.join(fixed)} lack")
        else:
            self.max_batch_size = configured
        if self.config.batching_configured:
            self.dynamic_batching = self.config.dynamic_batching
        else:
            # as in Triton: each request runs alone unless dynamic batching is configured
            self.dynamic_batching = None
        if self.dynamic_batching is not None and not self.max_batch_size:
            raise ConfigError("dynamic_batching needs max_batch_size > 0")
        if self.dynamic_batching is not None and self.dynamic_batching.max_batch_bytes is None:
            # unset: the default cap for ONNX Runtime on the CPU, none on a GPU or for
            # Python models (which may use one)
            on_cpu = self.platform == PLATFORM_ONNX and self.config.device == "cpu"
            self.dynamic_batching = dataclasses.replace(
                self.dynamic_batching, max_batch_bytes=DEFAULT_MAX_BATCH_BYTES if on_cpu else 0)


def _open_runner(version: ModelVersion) -> Any:
    config = version.config
    if version.platform == PLATFORM_ONNX:
        from mip.serving.providers.onnx import OnnxRunner

        return OnnxRunner(version.path, device=config.device, options=config.session_options,
                          input_names=tuple(config.inputs), output_names=tuple(config.outputs))
    from mip.serving.providers.python import load_python_model

    return load_python_model(version.path, config, name=version.name)


def _warmup_inputs(specs: tuple[TensorSpec, ...], rows: int, batching: bool) -> dict:
    inputs = {}
    for spec in specs:
        if spec.datatype == "BYTES":
            raise ConfigError(f"warmup needs numeric inputs; {spec.name} is BYTES")
        shape = [1 if d < 0 else d for d in spec.shape]
        if batching:
            shape[0] = rows
        inputs[spec.name] = np.zeros(shape, dtype=numpy_dtype(spec.datatype))
    return inputs


def _apply_policy(versions: list[ModelVersion], policy: tuple, name: str) -> list[ModelVersion]:
    """The versions a Triton version policy serves (``versions`` lowest first)."""
    if policy[0] == "all":
        return versions
    if policy[0] == "specific":
        chosen = [v for v in versions if v.version.isdigit() and int(v.version) in policy[1]]
        if not chosen:
            raise ConfigError(f"model {name!r}: version_policy.specific names "
                              f"{', '.join(map(str, policy[1]))}; the folder has "
                              f"{', '.join(v.version for v in versions)}")
        return chosen
    return versions[-policy[1]:]


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


class ModelRepository:
    """The models found under a folder, and the state of each loaded version.

    Args:
        root: the repository folder.

    Loading runs the model's runner in the calling thread; the engine calls these methods
    from worker threads so the event loop is never blocked by a load.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._loaded: dict[str, list[ModelVersion]] = {}
        self._errors: dict[str, str] = {}  # model -> why it has no versions at all
        # Versions in flux, shown by index(): being loaded (not yet installed), and taken
        # out of service but still finishing their requests (until closed).
        self._loading: dict[str, list[ModelVersion]] = {}
        self._unloading: dict[str, list[ModelVersion]] = {}

    def names(self) -> list[str]:
        """Model names present in the folder (sorted), loaded or not."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith((".", "_")))

    def discover(self, name: str, config: ModelConfig | None = None) -> list[ModelVersion]:
        """Read ``name``'s folder: its configuration (``config``: this one instead of the
        folder's file) and versions, none loaded.

        Raises:
            ModelNotFound: no folder of that name.
            ConfigError: the folder holds no model file, or its config.json is invalid.
        """
        directory = self.root / name
        if not directory.is_dir() or name.startswith((".", "_")) or "/" in name:
            raise ModelNotFound(f"no model named {name!r} in {self.root}")
        if config is None:
            config = read_config(directory)
        files = dict(_MODEL_FILES)
        if config.default_model_filename:
            filename = config.default_model_filename
            files = {filename: config.platform or (
                PLATFORM_PYTHON if filename.endswith(".py") else PLATFORM_ONNX)}
        versions: list[ModelVersion] = []
        candidates = [(p.name, p) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
        candidates.append(("1", directory))  # the bare layout counts when no version folder does
        seen = set()
        for version, folder in sorted(candidates, key=lambda c: _version_key(c[0])):
            if version in seen:
                continue
            for filename, platform in files.items():
                path = folder / filename
                if path.is_file():
                    if config.platform and config.platform != platform:
                        platform = config.platform
                    versions.append(ModelVersion(name, version, path, platform, config))
                    seen.add(version)
                    break
        if not versions:
            raise ConfigError(f"model {name!r} has no {' or '.join(files)} (in {directory} or "
                              f"in a version folder such as {directory / '1'})")
        return _apply_policy(versions, config.version_policy, name)

    def load(self, name: str, config: ModelConfig | None = None,
             ) -> tuple[list[ModelVersion], list[ModelVersion]]:
        """Load (or reload) every version of ``name`` (``config``: with this configuration
        instead of the folder's, until the next load): :meth:`prepare`, then
        :meth:`install`.

        Returns ``(new, old)``: the versions now installed (each READY or UNAVAILABLE with
        a reason) and the ones they replace, still open so in-flight work can finish; the
        caller closes the old ones.

        Raises:
            ModelNotFound: no folder of that name.
            ModelLoadError: no version could be loaded (the old versions stay installed).
        """
        versions = self.prepare(name, config)
        return versions, self.install(name, versions)

    def prepare(self, name: str, config: ModelConfig | None = None) -> list[ModelVersion]:
        """Load every version of ``name`` without installing them: the versions in service
        (if any) keep serving meanwhile. Returns the new versions (each READY or
        UNAVAILABLE with a reason), for :meth:`install`.

        Raises:
            ModelNotFound: no folder of that name.
            ModelLoadError: no version could be loaded (nothing changes).
        """
        try:
            versions = self.discover(name, config)
        except ConfigError as exc:
            with self._lock:
                self._errors[name] = str(exc)
            raise ModelLoadError(f"failed to load {name}: {exc}") from None
        with self._lock:
            self._loading[name] = versions
        try:
            for version in versions:
                version.load()
        finally:
            with self._lock:
                self._loading.pop(name, None)
        if not any(v.ready for v in versions):
            reasons = "; ".join(f"version {v.version}: {v.reason}" for v in versions)
            with self._lock:
                if name not in self._loaded:
                    self._errors[name] = reasons
            raise ModelLoadError(f"failed to load {name}: {reasons}")
        return versions

    def install(self, name: str, versions: list[ModelVersion]) -> list[ModelVersion]:
        """Put ``versions`` (from :meth:`prepare`) in service in place of ``name``'s
        current ones, in one step; returns those (still open: the caller closes them)."""
        with self._lock:
            old = self._loaded.get(name, [])
            self._loaded[name] = versions
            self._errors.pop(name, None)
        self._retiring(name, old)
        return old

    def _retiring(self, name: str, versions: list[ModelVersion]) -> None:
        """``versions`` left service and finish their requests: UNLOADING in the index
        until they are closed."""
        retiring = [v for v in versions if v.ready]
        for version in retiring:
            version.state, version.reason = ModelState.UNLOADING, "finishing its requests"
        if retiring:
            with self._lock:
                # Closed ones leave the list here too, not only when the index is read: a
                # server reloaded again and again without anyone reading the index keeps none.
                held = [v for v in self._unloading.get(name, ()) if v.state is ModelState.UNLOADING]
                self._unloading[name] = held + retiring

    def unload(self, name: str) -> list[ModelVersion]:
        """Remove ``name`` from service; returns its versions (the caller closes them).

        Raises:
            ModelNotFound: the model is not loaded.
        """
        with self._lock:
            versions = self._loaded.pop(name, None)
        if versions is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        self._retiring(name, versions)
        return versions

    def versions(self, name: str) -> list[ModelVersion]:
        """The installed versions of ``name`` (ready or not), lowest version first."""
        with self._lock:
            versions = self._loaded.get(name)
        if versions is None:
            raise ModelNotFound(f"model {name!r} is not loaded") if (
                self.root / name).is_dir() else ModelNotFound(f"no model named {name!r}")
        return versions

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """The version that serves ``name`` (``None`` or ``""``: the highest ready one).

        Raises:
            ModelNotFound: unknown model or version.
            ModelNotReady: the model or version exists but does not serve now.
        """
        versions = self._loaded.get(name)  # one dict read: atomic, no lock needed
        if versions is None:
            if (self.root / name).is_dir():
                reason = self._errors.get(name, "not loaded")
                raise ModelNotReady(f"model {name!r} is not ready: {reason}")
            raise ModelNotFound(f"no model named {name!r}")
        if version:
            for candidate in versions:
                if candidate.version == version:
                    if not candidate.ready:
                        raise ModelNotReady(f"model {name!r} version {version} is not ready: "
                                            f"{candidate.reason or candidate.state.value}")
                    return candidate
            raise ModelNotFound(f"model {name!r} has no version {version!r}")
        # The usual answer, read at once (reversed() alone costs ~600 instructions).
        if versions and versions[-1].state is _READY:
            return versions[-1]
        for candidate in reversed(versions):  # highest first
            if candidate.state is _READY:
                return candidate
        raise ModelNotReady(f"model {name!r} has no ready version")

    def metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        """Metadata of the version that would serve ``name`` / ``version``."""
        served = self.get(name, version)
        return ModelMetadata(name=name, versions=tuple(v.version for v in self.versions(name)),
                             platform=served.platform, inputs=served.inputs,
                             outputs=served.outputs)

    def index(self) -> list[IndexEntry]:
        """Every model in the folder and every known version, with state and reason."""
        with self._lock:
            loaded = {name: list(v) for name, v in self._loaded.items()}
            errors = dict(self._errors)
            loading = {name: list(v) for name, v in self._loading.items()}
            for name, versions in list(self._unloading.items()):
                versions[:] = [v for v in versions if v.state is ModelState.UNLOADING]
                if not versions:
                    del self._unloading[name]
            unloading = {name: list(v) for name, v in self._unloading.items()}
        entries = []
        for name in sorted(set(self.names()) | set(loaded) | set(loading) | set(unloading)):
            # A reload: the versions in service keep serving (and say so) while the new
            # ones load; a first load shows the versions loading.
            for v in loaded.get(name, ()):
                reason = "serving while a reload loads" if name in loading and v.ready else v.reason
                entries.append(IndexEntry(name, v.version, v.state, reason))
            if name in loading and name not in loaded:
                for v in loading[name]:
                    waiting = v.state is ModelState.UNAVAILABLE and v.runner is None \
                        and v.reason == "not loaded"  # next in line: loading too
                    entries.append(IndexEntry(name, v.version,
                                              ModelState.LOADING if waiting else v.state,
                                              "" if waiting else v.reason))
            entries.extend(IndexEntry(name, v.version, v.state, v.reason)
                           for v in unloading.get(name, ()))
            if name not in loaded and name not in loading and name not in unloading:
                entries.append(IndexEntry(name, "", ModelState.UNAVAILABLE,
                                          errors.get(name, "not loaded")))
        return entries
