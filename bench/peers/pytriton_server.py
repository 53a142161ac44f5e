"""Triton Inference Server (through PyTriton) serving every ``NAME/model.onnx`` of a folder.

Used by ``bench/serve_compare.py``; runs inside PyTriton's own venv::

    python pytriton_server.py --model_dir DIR --http_port P --grpc_port Q --metrics_port R

Each model is a PyTriton Python-function model: ``@batch`` around one
``onnxruntime.InferenceSession`` (CPU provider), with Triton's dynamic batcher on
(``max_batch_size`` 64, no queue delay), like ``mip serve`` with batching.  Triton's
KServe v2 endpoints listen on 127.0.0.1 (HTTP with the binary tensor extension, gRPC);
metrics are off.  SIGTERM or SIGINT stops Triton and removes its workspace.

The PyTriton wheel bundles the ``tritonserver`` binary; its Python backend stub links
``libpython``, which is looked for in the Python installation's ``lib`` folder (added to
``LD_LIBRARY_PATH`` here, before Triton is started).
"""

import argparse
import logging
import os
import shutil
import signal
import sysconfig
import tempfile

import numpy as np
import onnxruntime as ort

_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
           "tensor(bool)": np.bool_}
MAX_BATCH_SIZE = 64


def _libpython_on_path() -> None:
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and os.path.isdir(libdir):
        paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        if libdir not in paths:
            os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *paths])


def _row_shape(dims) -> tuple:
    """The tensor shape without the batch dimension (Triton adds it when batching)."""
    return tuple(d if isinstance(d, int) else -1 for d in dims[1:])


def _infer_fn(session: ort.InferenceSession):
    from pytriton.decorators import batch

    output_names = [o.name for o in session.get_outputs()]

    @batch
    def infer(**inputs):
        results = session.run(output_names, inputs)
        return dict(zip(output_names, results))

    return infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--http_port", type=int, required=True)
    parser.add_argument("--grpc_port", type=int, required=True)
    parser.add_argument("--metrics_port", type=int, required=True)
    parser.add_argument("--log_level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    _libpython_on_path()

    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    def _stop(signum, frame):
        raise KeyboardInterrupt  # Triton.serve() stops on it

    signal.signal(signal.SIGTERM, _stop)
    config = TritonConfig(
        http_address="127.0.0.1", http_port=args.http_port,
        grpc_address="127.0.0.1", grpc_port=args.grpc_port,
        metrics_address="127.0.0.1", metrics_port=args.metrics_port,
        allow_metrics=False, allow_gpu_metrics=False, allow_cpu_metrics=False, log_verbose=0)
    scratch = tempfile.mkdtemp(prefix="mip-bench-pytriton-")
    workspace = os.path.join(scratch, "workspace")  # PyTriton creates it (and removes it)
    try:
        with Triton(config=config, workspace=workspace,
                    security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
            for name in sorted(os.listdir(args.model_dir)):
                path = os.path.join(args.model_dir, name, "model.onnx")
                if not os.path.isfile(path):
                    continue
                session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                triton.bind(
                    model_name=name,
                    infer_func=_infer_fn(session),
                    inputs=[Tensor(name=i.name, dtype=_DTYPES.get(i.type, np.float32),
                                   shape=_row_shape(i.shape)) for i in session.get_inputs()],
                    outputs=[Tensor(name=o.name, dtype=_DTYPES.get(o.type, np.float32),
                                    shape=_row_shape(o.shape)) for o in session.get_outputs()],
                    config=ModelConfig(max_batch_size=MAX_BATCH_SIZE,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=0)),
                    strict=False,
                )
            triton.serve()
    except KeyboardInterrupt:
        pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
