"""KubeMo-compatible modules: a KubeMo model file runs here once its imports say
``mip.kubemo`` where they said ``kubemo``.

The layout mirrors the ``kubemo`` package: ``mip.kubemo.serialize`` (values),
``mip.kubemo.inference`` (the lifecycle), ``mip.kubemo.adaptor.onnx`` and ``.arith``,
``mip.kubemo.algorithm``, ``mip.kubemo.protocol`` and ``mip.kubemo.errors``.
``mip.kubemo.Client`` speaks to any MIP server with KubeMo's client interface.
"""

from mip.kubemo.inference import Inference, Tensor
from mip.kubemo.protocol import IMAGE, JSON, TEXT
from mip.kubemo.serialize import (Dynamic, Image, Input, Json, JsonEncoder, Output, Serial,
                                  Text, register)

__all__ = ["Inference", "Tensor", "Serial", "Input", "Output", "Dynamic", "Text", "Json",
           "Image", "JsonEncoder", "register", "IMAGE", "JSON", "TEXT", "Client"]


def __getattr__(name: str):
    # The client pulls in sockets and URL parsing; model files never need it.
    if name == "Client":
        from mip.kubemo.client import Client

        return Client
    raise AttributeError(f"module 'mip.kubemo' has no attribute {name!r}")
