"""KubeMo-compatible modules: a KubeMo model file runs here once its imports say
``mip.kubemo`` where they said ``kubemo``.

The layout mirrors the ``kubemo`` package: ``mip.kubemo.serialize`` (values),
``mip.kubemo.inference`` (the lifecycle), ``mip.kubemo.adaptor.onnx`` and ``.arith``,
``mip.kubemo.algorithm``, ``mip.kubemo.protocol`` and ``mip.kubemo.errors``.
``mip.kubemo.Client`` and ``mip.kubemo.Server`` keep KubeMo's blocking client and
server interfaces.
"""

from mip.kubemo.inference import Inference, Tensor
from mip.kubemo.protocol import IMAGE, JSON, TEXT
from mip.kubemo.serialize import (Dynamic, Image, Input, Json, JsonEncoder, Output, Serial,
                                  Text, register)

__all__ = ["Inference", "Tensor", "Serial", "Input", "Output", "Dynamic", "Text", "Json",
           "Image", "JsonEncoder", "register", "IMAGE", "JSON", "TEXT", "Client",
           "Server", "InferenceHandler"]


def __getattr__(name: str):
    # Client and server pull in sockets and URL parsing; model files never need them.
    if name == "Client":
        from mip.kubemo.client import Client

        return Client
    if name in ("Server", "InferenceHandler"):
        from mip.kubemo import server

        return getattr(server, name)
    raise AttributeError(f"module 'mip.kubemo' has no attribute {name!r}")
