# Incomplete: every name of the extension module reads as Any until its stub is written out.
from typing import Any

def __getattr__(name: str) -> Any: ...
