"""Type stubs of the compiled batch joiner (mip/protocol/_batch.pyx)."""

from typing import Any

import numpy as np

def join(requests: list[Any], name: str, rows: int) -> np.ndarray | None: ...
