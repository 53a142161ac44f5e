"""KServe ModelServer serving every ``NAME/model.onnx`` of a folder with onnxruntime.

Used by ``bench/serve_compare.py``; runs inside KServe's own venv::

    python kserve_server.py --model_dir DIR --http_port P --grpc_port Q \\
        --enable_latency_logging false --log_config_file quiet.json

KServe's own flags (parsed by ``kserve.model_server`` at import) are passed through.
"""

import argparse
import os

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

_DATATYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64",
              "tensor(int32)": "INT32", "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL"}


def _shape(dims):
    return [d if isinstance(d, int) else -1 for d in dims]


class OnnxModel(Model):
    """One ONNX model on ONNX Runtime's CPU provider."""

    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.inputs = self.session.get_inputs()
        self.outputs = self.session.get_outputs()
        self.ready = True
        return True

    def get_input_types(self):
        return [{"name": i.name, "datatype": _DATATYPES.get(i.type, "FP32"),
                 "shape": _shape(i.shape)} for i in self.inputs]

    def get_output_types(self):
        return [{"name": o.name, "datatype": _DATATYPES.get(o.type, "FP32"),
                 "shape": _shape(o.shape)} for o in self.outputs]

    async def predict(self, payload: InferRequest, headers=None, response_headers=None):
        feeds = {inp.name: inp.as_numpy() for inp in payload.inputs}
        results = self.session.run(None, feeds)
        outputs = []
        for meta, arr in zip(self.outputs, results):
            out = InferOutput(name=meta.name, shape=list(arr.shape), datatype="FP32")
            out.set_data_from_numpy(np.ascontiguousarray(arr), binary_data=True)
            outputs.append(out)
        # REST answers 500 when neither the request nor the model gives a response id
        return InferResponse(response_id=payload.id or "kserve", model_name=self.name,
                             infer_outputs=outputs, use_binary_outputs=True)


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)  # kserve.model_server reads the rest
    parser.add_argument("--model_dir", required=True)
    args, _ = parser.parse_known_args()
    models = []
    for name in sorted(os.listdir(args.model_dir)):
        path = os.path.join(args.model_dir, name, "model.onnx")
        if os.path.isfile(path):
            models.append(OnnxModel(name, path))
    ModelServer().start(models)


if __name__ == "__main__":
    main()
