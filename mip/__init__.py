"""mip: a Cython-accelerated wire-protocol toolkit for model inference.

The codec core (``mip.decode``, ``mip.encode_request``, ``mip.FrameParser``,
``mip.msip``) parses and writes MIP and MSIP frames with tensors as numpy
views of the received memory; ``mip.Client`` and ``mip.AsyncClient`` are the MIP
clients.  Servers, clients, the batching engine and the
standard frontends are built on it in ``mip.net``, ``mip.serving`` and
``mip.frontends``.
"""

from mip.errors import *  # noqa: F401,F403  (the exception tree, as listed in mip.errors.__all__)
from mip.errors import __all__ as _errors_all
from mip.protocol import *  # noqa: F401,F403  (the codec, as listed in mip.protocol.__all__)
from mip.protocol import __all__ as _protocol_all

from mip import msip as msip  # the public namespace: the codec, Broker, Client, AsyncClient

__version__ = "0.1.0.dev0"


def get_include() -> str:
    """The folder of the C headers that the codec's ``.pxd`` files include.

    A Cython extension that ``cimport``s the codec (``from mip.protocol.wire cimport ...``,
    ``from mip.protocol._mip cimport ...``) compiles with ``include_dirs=[mip.get_include(),
    numpy.get_include()]``, as extensions built on numpy do with ``numpy.get_include()``.
    """
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(here, "include")
    if os.path.isdir(installed):
        return installed
    return os.path.join(os.path.dirname(here), "csrc")  # a source checkout (editable install)


#: names of mip.net reached from the top level, imported on first use
_NET = {"Client": "mip.net.mip_client", "AsyncClient": "mip.net.mip_client"}


def __getattr__(name):
    module = _NET.get(name)
    if module is None:
        raise AttributeError(f"module 'mip' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = sorted({*_errors_all, *_protocol_all, *_NET, "msip", "get_include", "__version__"})
