"""KubeMo's values (``kubemo.serialize``) built on the codec's values.

``Text``, ``Json`` and ``Image`` are the codec's ``mip.Text``, ``mip.Json`` and
``mip.Image`` with KubeMo's interface on top (``kind``, ``reader``, ``encode()``,
``decode()``), so a value a KubeMo model returns goes onto the wire as it is.
``Input``, ``Output`` and ``Dynamic`` keep KubeMo's ``(kind, reader)`` constructor.

Unlike KubeMo, reading a value twice gives the same octets (KubeMo's readers are
consumed by the first ``encode()``/``decode()``), and Pillow is imported only when an
image is decoded or a Pillow image is wrapped.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import IO, TYPE_CHECKING, Any, Callable, Dict, Generic, Protocol, TypeVar

import numpy

import mip as _codec
from mip.kubemo.protocol import IMAGE, JSON, TEXT
from mip.protocol import JsonEncoder

if TYPE_CHECKING:
    from mip.protocol._stream import Buffer

__all__ = ["Serial", "Input", "Output", "Dynamic", "Text", "Json", "Image", "JsonEncoder",
           "register", "as_input", "wire_form"]

T = TypeVar("T")


class Serial(Generic[T]):
    """A value with a type code (``kind``) and its octets behind ``reader``.

    Attributes ``type`` and ``data`` give the same as ``kind`` and ``encode()`` under
    the codec's names.
    """

    kind: int
    reader: IO[Any]

    def __init__(self, kind: int, reader: IO[Any]) -> None:
        self.kind = kind
        self.reader = reader

    def encode(self) -> bytes:
        """The value's octets (read once from ``reader``, then kept)."""
        octets = self.__dict__.get("_octets")
        if octets is None:
            octets = self.reader.read()
            if isinstance(octets, str):
                octets = octets.encode()
            self._octets = octets = bytes(octets)
        return octets

    def decode(self) -> T:
        """The value as a Python object; each subclass says which."""
        raise NotImplementedError

    @property
    def type(self) -> int:
        """The MIP value type (1 TEXT, 2 JSON, 3 IMAGE, ...)."""
        return self.kind

    @property
    def data(self) -> Buffer:
        """The octets on the wire (``bytes``, or for an ``Image`` the buffer it holds)."""
        return self.encode()


class SerialClass(Protocol):
    """What :func:`register` takes: a class built from a reader alone, with its kind as a
    class attribute (``class Point(Serial): kind = 7``)."""

    kind: int

    def __call__(self, reader: IO[Any], /) -> Serial: ...


def _decode_registered(value: Serial) -> Any:
    factory = _default_serializations.get(value.kind)
    if factory is None:
        raise TypeError(f"no serialization is registered for kind {value.kind}: register "
                        "one with mip.kubemo.serialize.register")
    return factory(io.BytesIO(value.encode())).decode()


class Input(Serial):
    """A model input of any kind: ``Input(IMAGE, open("photo.jpg", "rb"))``; ``decode()``
    uses the class registered for its kind."""

    def decode(self) -> Any:
        return _decode_registered(self)


class Output(Serial):
    """A model output of any kind; ``decode()`` uses the class registered for its kind."""

    def decode(self) -> Any:
        return _decode_registered(self)


class _CodecSerial(Serial[T]):
    """KubeMo's interface over a codec value, which carries ``type`` and ``data``: a
    subclass names the codec class first, so that its ``type`` and ``data`` are the ones
    used. The value is fixed: ``kind`` and ``reader`` cannot be assigned."""

    @property
    def kind(self) -> int:
        return self.type

    @kind.setter
    def kind(self, kind: int) -> None:
        raise AttributeError(f"cannot assign {type(self).__name__}.kind: the value is fixed")

    @property
    def reader(self) -> IO[Any]:
        """A fresh reader over the value's octets."""
        return io.BytesIO(bytes(self.data))

    @reader.setter
    def reader(self, reader: IO[Any]) -> None:
        raise AttributeError(f"cannot assign {type(self).__name__}.reader: the value is fixed")

    def encode(self) -> bytes:
        return bytes(self.data)


class Text(_codec.Text, _CodecSerial[str]):
    """A TEXT value from a ``str`` or a text/binary reader."""

    def __init__(self, s: Any) -> None:
        if not isinstance(s, str):
            if not hasattr(s, "read"):
                raise TypeError(f"expected str or IO-like object, not {type(s)}")
            s = s.read()
            s = s if isinstance(s, str) else bytes(s).decode()
        _codec.Text.__init__(self, s)

    def __repr__(self) -> str:
        return self.value  # KubeMo shows a text value as the text itself

    def decode(self) -> str:
        """The text."""
        return self.value


class Json(_codec.Json, _CodecSerial[object]):
    """A JSON value from any object ``json`` can encode (numpy numbers and arrays
    included), or from a reader of JSON text."""

    def __init__(self, obj: Any) -> None:
        if hasattr(obj, "read"):
            obj = json.loads(obj.read())
        _codec.Json.__init__(self, obj)

    def __repr__(self) -> str:
        return repr(self.decode())

    def decode(self) -> object:
        """The object the JSON text decodes to (numpy numbers come back as Python ones)."""
        return json.loads(self.data)


def _pil_image_class() -> Any:
    module = sys.modules.get("PIL.Image")  # a Pillow image exists only if Pillow is loaded
    return None if module is None else module.Image


class Image(_codec.Image, _CodecSerial[Any]):
    """An IMAGE value (an encoded image file) from a path, a binary reader, bytes or a
    Pillow image."""

    def __init__(self, fp: Any) -> None:
        pil_image = _pil_image_class()
        data: Buffer
        if isinstance(fp, (str, os.PathLike)):
            with open(fp, "rb") as f:
                data = f.read()
        elif isinstance(fp, (bytes, bytearray, memoryview)):
            data = fp
        elif hasattr(fp, "read"):
            data = fp.read()
        elif pil_image is not None and isinstance(fp, pil_image):
            buffer = io.BytesIO()
            fp.save(buffer, format=fp.format or "PNG")
            data = buffer.getvalue()
        else:
            raise TypeError(f"expected str, IO-like object or PIL image, not {type(fp)}")
        _codec.Image.__init__(self, data)

    def decode(self) -> Any:
        """The image as a ``PIL.Image.Image`` (needs Pillow)."""
        from PIL import Image as PIL_Image

        return PIL_Image.open(io.BytesIO(bytes(self.data)))


class Dynamic(Serial):
    """A value whose class is chosen by its kind, as KubeMo's server builds inputs."""

    def __init__(self, kind: int, reader: IO[Any]) -> None:
        factory = _default_serializations.get(kind)
        self.serial = factory(reader) if factory is not None else Input(kind, reader)

    def __repr__(self) -> str:
        return repr(self.decode())

    @property
    def kind(self) -> int:
        """The kind of the value it holds (``serial``)."""
        return self.serial.kind

    @kind.setter
    def kind(self, kind: int) -> None:
        self.serial.kind = kind

    @property
    def reader(self) -> IO[Any]:
        """The reader of the value it holds (``serial``)."""
        return self.serial.reader

    @reader.setter
    def reader(self, reader: IO[Any]) -> None:
        self.serial.reader = reader

    def decode(self) -> Any:
        return self.serial.decode()

    def encode(self) -> bytes:
        return self.serial.encode()


_default_serializations: Dict[int, Callable[[IO[Any]], Serial]] = {TEXT: Text, JSON: Json,
                                                                   IMAGE: Image}


def register(s: SerialClass) -> None:
    """Make ``Dynamic`` build values of ``s.kind`` with ``s`` (called as ``s(reader)``).

    An application's kinds are 4-15 and 17 and up (the codec's ``mip.Value`` types); a
    server gives a model's ``preprocess`` such a value as ``Dynamic``, whose ``decode()``
    is ``s``'s.
    """
    _default_serializations[s.kind] = s


def wire_form(value: Any) -> tuple[int, bytes] | None:
    """The MIP kind and octets of one value a server received, as KubeMo's server reads
    them off the wire: ``str`` is TEXT (UTF-8), bytes-like objects IMAGE (KubeMo's binary
    type), codec values (anything with ``type`` and ``data``) their own kind, and other
    objects (decoded JSON: ``dict``, ``list``, numbers, ``None``) JSON; ``None`` for
    KubeMo values and numpy arrays, which a model takes as they are."""
    if isinstance(value, (Serial, numpy.ndarray)):
        return None
    if isinstance(value, str):
        return TEXT, value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return IMAGE, bytes(value)
    if isinstance(value, _codec.Text):
        return TEXT, value.value.encode()
    kind, data = getattr(value, "type", None), getattr(value, "data", None)
    if isinstance(kind, int) and data is not None:
        return kind, bytes(data)
    try:
        return JSON, json.dumps(value, cls=JsonEncoder).encode()
    except (TypeError, ValueError):
        raise TypeError(f"cannot give a {type(value).__name__} to a KubeMo model") from None


def as_input(value: Any) -> Any:
    """The KubeMo view of one value a server received: a :class:`Dynamic` of its kind and
    octets (see :func:`wire_form`), as KubeMo's server gives it. KubeMo values and numpy
    arrays pass through unchanged."""
    wire = wire_form(value)
    return value if wire is None else Dynamic(wire[0], io.BytesIO(wire[1]))
