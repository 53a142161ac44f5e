"""Triton Python-backend model (``TritonPythonModel``) running ``model.onnx`` with onnxruntime.

Used by ``bench/serve_compare.py``, which copies it to ``NAME/1/model.py`` of a Triton model
repository beside ``NAME/1/model.onnx`` and a ``config.pbtxt`` (``backend: "python"``,
``max_batch_size``, ``dynamic_batching { }``, ``instance_group``).  Runs inside Triton's
Python backend stub, with the packages of PyTriton's venv on ``PYTHONPATH``.

Triton's dynamic batcher hands ``execute`` every request of a batch; they are concatenated
into one array, run through one ``InferenceSession.run`` (CPU provider, ONNX Runtime's
default options, as every server of the comparison) and split back by rows.
"""

import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, ort.SessionOptions(),
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        columns = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
                   for name in self.input_names]
        rows = [a.shape[0] for a in columns[0]]
        feeds = {name: (arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
                 for name, arrays in zip(self.input_names, columns)}
        outputs = self.session.run(self.output_names, feeds)
        responses = []
        start = 0
        for n in rows:
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, out[start:start + n])
                for name, out in zip(self.output_names, outputs)]))
            start += n
        return responses
