"""MSIP, the Micro-Service Interface Protocol.

The codec (``encode``, ``decode``, ``FrameParser``, the enums and payload
helpers) comes from ``mip.protocol.msip``; the asyncio ``Broker``, ``Client``
and ``AsyncClient`` from ``mip.net`` are reachable here too, imported on first use.
"""

from mip.protocol.msip import *  # noqa: F401,F403
from mip.protocol.msip import __all__ as _codec_all

__all__ = [*_codec_all, "Broker", "Client", "AsyncClient"]

_NET = {
    "Broker": "mip.net.msip_broker",
    "Client": "mip.net.msip_client",
    "AsyncClient": "mip.net.msip_client",
}


def __getattr__(name):
    module = _NET.get(name)
    if module is None:
        raise AttributeError(f"module 'mip.msip' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
