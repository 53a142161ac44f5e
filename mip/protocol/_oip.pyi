"""Type stubs of the compiled KServe v2 ModelInfer messages (mip/protocol/_oip.pyx)."""

import numpy as np

def read_infer_request(data: bytes | memoryview) -> tuple[str, str, str, dict[str, np.ndarray],
                                             list[str] | None] | None: ...
def write_infer_reply(model: str, version: str, request_id: str,
                      outputs: dict[str, np.ndarray]) -> bytes | list | None: ...
