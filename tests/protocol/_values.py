"""Value descriptions shared by the protocol tests.

A *description* names a value independently of both encoders:
``("text", str)``, ``("json", obj)``, ``("image", octets)``, ``("raw", type, octets)``
or ``("tensor", ndarray)``. ``to_mip`` turns it into an argument for ``mip``'s
encoders, ``to_ref`` into one for the struct-only reference builder, and
``expected`` / ``observed`` reduce a description and a decoded value to the same
comparable form: ``(type, octets)`` or ``("T", dtype name, shape, contents)``.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mip

from . import _wire

FAST = settings(deadline=None, max_examples=60, suppress_health_check=list(HealthCheck))
QUICK = settings(deadline=None, max_examples=25, suppress_health_check=list(HealthCheck))

ALL_DTYPES = list(_wire.DTYPE_CODES)


def to_mip(desc):
    tag = desc[0]
    if tag == "text":
        return mip.Text(desc[1])
    if tag == "json":
        return mip.Json(desc[1])
    if tag == "image":
        return mip.Image(desc[1])
    if tag == "raw":
        return mip.Value(desc[1], desc[2])
    if tag == "tensor":
        return desc[1]
    raise ValueError(tag)


def to_ref(desc):
    tag = desc[0]
    if tag == "text":
        return (_wire.TEXT, desc[1].encode("utf-8"))
    if tag == "json":
        return (_wire.JSON, _wire.json_bytes(desc[1]))
    if tag == "image":
        return (_wire.IMAGE, bytes(desc[1]))
    if tag == "raw":
        return (desc[1], bytes(desc[2]))
    if tag == "tensor":
        return np.asarray(desc[1])
    raise ValueError(tag)


def tensor_contents(arr: np.ndarray):
    name = _wire.dtype_name(arr.dtype)
    if name == "BYTES":
        return ("T", name, tuple(arr.shape), tuple(bytes(x) for x in arr.ravel(order="C")))
    return ("T", name, tuple(arr.shape), _wire.le_bytes(arr))


def expected(desc):
    if desc[0] == "tensor":
        return tensor_contents(np.asarray(desc[1]))
    return to_ref(desc)


def observed(value):
    if isinstance(value, np.ndarray):
        return tensor_contents(value)
    return (value.type, bytes(value.data))


def expected_batch(items):
    return [[expected(d) for d in item] for item in items]


def observed_batch(message):
    return [[observed(v) for v in item] for item in message.batch]


def mip_batch(items):
    return [[to_mip(d) for d in item] for item in items]


def ref_batch(items):
    return [[to_ref(d) for d in item] for item in items]


def tensors_in(message):
    return [v for item in message.batch for v in item if isinstance(v, np.ndarray)]


# -- hypothesis strategies ---------------------------------------------------

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)


@st.composite
def plain_arrays(draw, name=None, shape=None):
    if name is None:
        name = draw(st.sampled_from(ALL_DTYPES))
    if shape is None:
        shape = draw(shapes)
    if name == "BYTES":
        count = int(np.prod(shape, dtype=np.int64))
        elems = draw(st.lists(st.binary(max_size=12), min_size=count, max_size=count))
        arr = np.empty(count, dtype=object)
        arr[:] = elems
        return arr.reshape(shape)
    if name == "BF16":
        raw = draw(hnp.arrays(np.uint16, shape))
        return raw.view(_wire.NUMPY_DTYPES["BF16"])
    return draw(hnp.arrays(_wire.NUMPY_DTYPES[name], shape))


@st.composite
def arrays(draw):
    """Arrays of every dtype, sometimes non-contiguous, Fortran-ordered or big-endian."""
    name = draw(st.sampled_from(ALL_DTYPES))
    layout = draw(st.sampled_from(["plain", "strided", "fortran", "transposed", "big"]))
    if layout == "strided":
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4))
        base = draw(plain_arrays(name, (shape[0] * 2,) + shape[1:]))
        return base[::2]
    arr = draw(plain_arrays(name))
    if layout == "fortran" and arr.ndim >= 2 and name != "BYTES":
        return np.asfortranarray(arr)
    if layout == "transposed":
        return arr.T
    if layout == "big" and name not in ("BYTES", "BF16", "BOOL", "UINT8", "INT8"):
        return arr.astype(arr.dtype.newbyteorder(">"))
    return arr


json_objects = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=10,
)

descs = st.one_of(
    st.builds(lambda s: ("text", s), st.text(max_size=20)),
    st.builds(lambda o: ("json", o), json_objects),
    st.builds(lambda b: ("image", b), st.binary(max_size=40)),
    st.builds(lambda t, b: ("raw", t, b), st.integers(256, 2**32 - 1), st.binary(max_size=20)),
    st.builds(lambda a: ("tensor", a), arrays()),
)


@st.composite
def batches(draw, max_items=5, max_width=4):
    """A batch description: items of the same width, each value any type."""
    n_items = draw(st.integers(1, max_items))
    width = draw(st.integers(1, max_width))
    return [[draw(descs) for _ in range(width)] for _ in range(n_items)]
