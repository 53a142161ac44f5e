"""What running a ``/v1`` job means: its Open Inference Protocol body decoded, the engine
called through the data plane every frontend shares (counted and logged with
``protocol="jobs"``), the outputs encoded as the job's result document.

:class:`JobRunner` is the ``run_job`` of a :class:`~mip.jobs.worker.JobWorker`, in
``mip serve`` and in ``mip worker`` alike.
"""

from __future__ import annotations

import time

from mip.frontends.dataplane import DataPlane
from mip.frontends.miaas.tensors import decode_inputs, encode_outputs
from mip.jobs.queue import JobRecord

__all__ = ["JobRunner", "split_model_id"]


def split_model_id(model_id: str) -> tuple[str, str | None]:
    """``"name"`` -> (name, None: the highest ready version); ``"name:version"`` ->
    (name, version)."""
    name, sep, version = model_id.partition(":")
    return name, (version or None) if sep else None


class JobRunner:
    """Runs one job through an engine.

    Args:
        engine: a started ``mip.serving.engine.Engine``.
        metrics: a :class:`~mip.frontends.oip.metrics.Metrics` to count jobs in.
        access_log: an :class:`~mip.frontends.access.AccessLog` to record every job run
            in (its request id: the job's), or ``None``.
    """

    def __init__(self, engine, metrics=None, access_log=None):
        self.dataplane = DataPlane(engine, metrics, access_log=access_log)

    async def __call__(self, job: JobRecord) -> dict:
        """The result document of ``job`` (raises what the decoder or the engine raise)."""
        started = time.perf_counter()
        name, version = split_model_id(job.model_id)
        timeout = (job.parameters or {}).get("timeout")
        timeout_seconds = float(timeout) if isinstance(
            timeout, (int, float)) and timeout > 0 else None
        try:
            inputs, outputs = decode_inputs(job.input_data)
            work = self.dataplane.submit("jobs", name, version, inputs, outputs,
                                         timeout_seconds, request_id=job.request_id,
                                         started=started)
        except Exception as exc:
            self.dataplane.refused("jobs", name, version, exc, request_id=job.request_id,
                                   started=started)
            raise
        done = await work
        return encode_outputs(done.outputs, name, done.version)
