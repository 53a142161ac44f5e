"""Type stubs of the compiled JSON number-array reader (mip/protocol/_jsonnum.pyx)."""

from typing import Any

import numpy as np

PLACEHOLDER: str

def split_numeric_arrays(data: Any, min_length: int = ...) -> tuple[Any, list[tuple[int, int]]]: ...
def parse_numbers(body: Any, start: int, end: int, dtype: Any,
                  exact: bool = ..., out: np.ndarray | None = ...) -> np.ndarray: ...
