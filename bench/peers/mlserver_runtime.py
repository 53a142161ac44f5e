"""MLServer custom runtime serving an ONNX model with onnxruntime.InferenceSession.

Used by ``bench/serve_compare.py``: each model folder holds ``model.onnx`` and a
``model-settings.json`` with ``"implementation": "mlserver_runtime.OnnxRuntimeModel"`` and
``"parameters": {"uri": "./model.onnx"}``.  Runs inside MLServer's own venv.
"""

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    """One ONNX model on ONNX Runtime's CPU provider; inputs by name, every output returned."""

    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        options = ort.SessionOptions()
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {inp.name: NumpyCodec.decode_input(inp).astype(np.float32, copy=False)
                 for inp in payload.inputs}
        outputs = self.session.run(None, feeds)
        return InferenceResponse(
            model_name=self.name, id=payload.id,
            outputs=[NumpyCodec.encode_output(name, arr)
                     for name, arr in zip(self.output_names, outputs)])
