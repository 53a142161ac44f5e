# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""MIP codec: frames of KubeMo's Model Invocation Protocol, zero-copy into numpy.

Decoding turns one frame into a :class:`Message` whose tensors are numpy views
of the frame's memory; encoding writes a frame into one ``bytes`` object, or
into a list of buffers (headers plus the tensors' own memory) for
``transport.writelines()``.  The layouts are in ``docs/protocol.md``.
"""

cimport numpy as cnp
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBuffer_FillInfo, PyBUF_SIMPLE
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_CheckExact
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.sequence cimport PySequence_Fast_GET_ITEM, PySequence_Fast_GET_SIZE
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject
from cpython.object cimport PyTypeObject
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_Check
from libc.string cimport memcmp, memcpy, memset
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t

from mip.protocol.wire cimport *
from mip.protocol._stream cimport Chunk, StreamParser, raise_wire_error

import json as _json
import numpy as np
import ml_dtypes as _ml_dtypes

from mip import errors as _errors
from mip.protocol import dtypes as _dtypes

cnp.import_array()

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL

cdef extern from "numpy/arrayobject.h":
    ctypedef struct PyArrayDescrStruct "PyArray_Descr"
    object PyArray_NewFromDescr(PyTypeObject *subtype, PyArrayDescrStruct *descr, int nd,
                                cnp.npy_intp *dims, cnp.npy_intp *strides,
                                void *data, int flags, PyObject *obj)

# ---- public constants ------------------------------------------------------
KIND_ERROR = MIP_KIND_ERROR
KIND_PING = MIP_KIND_PING
KIND_INFERENCE = MIP_KIND_INFERENCE
KIND_ROUTED = MIP_KIND_ROUTED
REQUEST = MIP_REQUEST
RESPONSE = MIP_RESPONSE
TEXT = 1
JSON = 2
IMAGE = 3
TENSOR = 16
HEADER_SIZE = MIP_HEADER_SIZE
#: Default bound of one frame (header included) for streaming parsers, in octets.
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
#: Tensors at least this large (in octets) are sent from their own memory by the
#: ``*_buffers`` encoders; smaller ones are copied next to their headers.
DEFAULT_COPY_THRESHOLD = 4096

cdef enum:
    T_TEXT = 1
    T_JSON = 2
    T_IMAGE = 3
    T_TENSOR = 16

cdef Py_ssize_t MAX_U32 = 0xFFFFFFFF

# ---- datatype tables -------------------------------------------------------
# Built from the one table, mip.protocol.dtypes: C arrays indexed by wire code and by
# numpy type number, so a lookup per tensor is an array read.
cdef list _descr_objs = [None] * (MIP_DT_MAX + 1)
cdef PyObject *_descr_ptr[16]
cdef cnp.npy_intp _descr_align[16]
cdef int _typenum_to_code[256]
cdef int _bf16_typenum
cdef str _KNOWN_DATATYPES = ", ".join(_dtypes.BY_NAME)

def _init_tables():
    global _bf16_typenum
    cdef int i
    if len(_dtypes.TABLE) != MIP_DT_MAX:
        raise ImportError("mip.protocol.dtypes and csrc/mip_wire.h disagree on the datatypes")
    for i in range(256):
        _typenum_to_code[i] = 0
    for i in range(MIP_DT_MAX + 1):
        _descr_ptr[i] = NULL
        _descr_align[i] = 1
    for entry in _dtypes.TABLE:
        code = entry.code
        dt = entry.numpy
        if not 0 < code <= MIP_DT_MAX or mip_dtype_size[code] != entry.itemsize:
            raise ImportError(f"mip.protocol.dtypes and csrc/mip_wire.h disagree on {entry.name}")
        _descr_objs[code] = dt
        _descr_ptr[code] = <PyObject *>dt
        _descr_align[code] = dt.alignment
        if code != MIP_DT_BF16:
            _typenum_to_code[dt.num] = code
    _typenum_to_code[np.dtype(np.bytes_).num] = MIP_DT_BYTES
    _typenum_to_code[np.dtype(np.str_).num] = MIP_DT_BYTES
    # numpy's C long long / ulonglong may be distinct type numbers of the same size
    _typenum_to_code[np.dtype(np.longlong).num] = MIP_DT_INT64
    _typenum_to_code[np.dtype(np.ulonglong).num] = MIP_DT_UINT64
    _typenum_to_code[np.dtype(np.intc).num] = MIP_DT_INT32
    _typenum_to_code[np.dtype(np.uintc).num] = MIP_DT_UINT32
    _bf16_typenum = _dtypes.BY_NAME["BF16"].numpy.num

_init_tables()

cdef object _NAMES = _dtypes.DATATYPE_NAMES


cdef inline int _code_of(int typenum):
    """The wire code of a numpy type number, 0 for none."""
    if typenum == _bf16_typenum:
        return MIP_DT_BF16
    if 0 <= typenum < 256:
        return _typenum_to_code[typenum]
    return 0


cdef _no_datatype(dt):
    return TypeError(f"numpy dtype {dt} has no Open Inference Protocol datatype "
                     f"(the datatypes are {_KNOWN_DATATYPES})")


def datatype_of(array):
    """The Open Inference Protocol datatype name (``"FP32"``, ``"BYTES"``, ...) of a numpy
    array or dtype; ``S``/``U`` strings and object arrays are ``"BYTES"``.

    Raises:
        TypeError: the dtype has no datatype (complex, datetime, ...).
    """
    cdef int code
    if cnp.PyArray_Check(array):
        code = _code_of(cnp.PyArray_TYPE(<cnp.ndarray>array))
        if code:
            return _NAMES[code]
        raise _no_datatype(array.dtype)
    dt = array if isinstance(array, np.dtype) else getattr(array, "dtype", None)
    if not isinstance(dt, np.dtype):  # a scalar type (np.float32), a name ("f4"), ...
        dt = np.dtype(array)
    code = _code_of(dt.num)
    if code == 0:
        raise _no_datatype(dt)
    return _NAMES[code]


# ---- values ----------------------------------------------------------------
class JsonEncoder(_json.JSONEncoder):
    """The JSON encoder of :class:`Json` values: it also takes numpy integers, floats and
    arrays (as KubeMo's ``serialize.JsonEncoder``, which is this class)."""

    def default(self, o):
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        return _json.JSONEncoder.default(self, o)


cdef class Text:
    """A TEXT value (TLV type 1): a string sent as UTF-8."""

    cdef readonly str value

    def __init__(self, str value):
        self.value = value

    @property
    def type(self):
        return T_TEXT

    @property
    def data(self):
        """The UTF-8 octets on the wire."""
        return self.value.encode("utf-8")

    def __bytes__(self):
        return self.data

    def __eq__(self, other):
        if isinstance(other, Text):
            return self.value == (<Text>other).value
        return NotImplemented

    def __hash__(self):
        return hash((T_TEXT, self.value))

    def __repr__(self):
        return f"Text({self.value!r})"


cdef class Json:
    """A JSON value (TLV type 2).

    ``Json(obj)`` serialises ``obj`` as ``json.dumps`` does by default (numpy
    scalars and arrays allowed), which is byte-identical to KubeMo.  A decoded
    value keeps its octets and parses them on first access to ``value``.
    """

    cdef object _value
    cdef object _data
    cdef bint _parsed

    def __init__(self, value):
        self._value = value
        self._parsed = True
        self._data = None

    @staticmethod
    def from_bytes(data):
        """A value holding already-encoded JSON octets (parsed lazily)."""
        cdef Json j = Json.__new__(Json)
        j._data = bytes(data)
        j._parsed = False
        return j

    @property
    def type(self):
        return T_JSON

    @property
    def value(self):
        """The parsed object; raises InvalidValue for octets that are not JSON."""
        if not self._parsed:
            try:
                self._value = _json.loads(self._data)
            except (ValueError, RecursionError) as exc:
                raise _errors.InvalidValue(f"JSON value is not valid JSON: {exc}") from None
            self._parsed = True
        return self._value

    @property
    def data(self):
        """The UTF-8 JSON octets on the wire."""
        if self._data is None:
            self._data = _json.dumps(self._value, cls=JsonEncoder).encode("utf-8")
        return self._data

    def __bytes__(self):
        return self.data

    def __eq__(self, other):
        if isinstance(other, Json):
            if self._valid() and (<Json>other)._valid():
                return self.value == (<Json>other).value
            return self.data == (<Json>other).data  # octets that are not JSON: as octets
        return NotImplemented

    __hash__ = None

    cdef int _valid(self) except -1:
        """Whether ``value`` parses (it is then parsed)."""
        if not self._parsed:
            try:
                self.value
            except _errors.InvalidValue:
                return False
        return True

    def __repr__(self):
        if self._valid():
            return f"Json({self._value!r})"
        return f"Json.from_bytes({bytes(self._data[:64])!r}{'...' if len(self._data) > 64 else ''})"


cdef class Image:
    """An IMAGE value (TLV type 3): an encoded image file (JPEG, PNG, ...).

    ``data`` is any bytes-like object; decoded images hold a read-only
    memoryview of the frame (no copy).
    """

    cdef readonly object data

    def __init__(self, data):
        memoryview(data)  # must support the buffer protocol
        self.data = data

    @staticmethod
    def open(path):
        """Read an image file from `path`."""
        with open(path, "rb") as f:
            return Image(f.read())

    @property
    def type(self):
        return T_IMAGE

    def __bytes__(self):
        return bytes(self.data)

    def __eq__(self, other):
        if isinstance(other, Image):
            return bytes(self.data) == bytes((<Image>other).data)
        return NotImplemented

    __hash__ = None

    def __repr__(self):
        return f"Image(<{len(memoryview(self.data).cast('B'))} octets>)"


cdef class Value:
    """A value of an explicit TLV type with raw octets.

    Every type but 0 (reserved), 1 TEXT, 2 JSON, 3 IMAGE and 16 TENSOR is the
    application's (as KubeMo's ``kubemo.serialize.register`` allows: 4-15, 17 and up)
    and decodes as ``Value``.
    """

    cdef readonly unsigned int type
    cdef readonly object data

    def __init__(self, unsigned int type, data):
        if type == 0 or type == T_TENSOR:
            raise ValueError(f"TLV type {type} is reserved by the protocol: use 1 (TEXT), "
                             "2 (JSON), 3 (IMAGE), an application type (4-15, 17 and up), "
                             "or a numpy array for a tensor")
        memoryview(data)
        self.type = type
        self.data = data

    def __bytes__(self):
        return bytes(self.data)

    def __eq__(self, other):
        if isinstance(other, Value):
            return self.type == (<Value>other).type and bytes(self.data) == bytes((<Value>other).data)
        return NotImplemented

    __hash__ = None

    def __repr__(self):
        return f"Value(type={self.type}, <{len(memoryview(self.data).cast('B'))} octets>)"


# ---- messages --------------------------------------------------------------
cdef class Message:
    """One decoded MIP frame.

    Attributes:
        kind: 0 ERROR, 1 PING, 2 INFERENCE, 3 ROUTED INFERENCE.
        subtype: 0 REQUEST, 1 RESPONSE (for ERROR frames: the error code).
        n_input, n_output: the inference header's counts (0 for other kinds).
        batch: list of items, each a tuple of values (numpy arrays for tensors).
        error_code: the error code of an ERROR frame, else None.
        error_message: what an ERROR frame says after its header (an extension of the
            protocol: UTF-8 text, invalid octets replaced), or None when it says nothing.
        model, version: the route of a kind-3 request, else None.

    Decoding checks the whole frame at once; the value objects of ``batch``
    are made on first access (a frame's values stay valid as long as the
    message or any value refers to its memory).  ``column(j)`` gives value
    ``j`` of every item as one array without making per-item objects.
    """

    @property
    def batch(self):
        if self._batch is None:
            self._batch = _walk(self, True)
        return self._batch

    def __len__(self):
        """Number of items in the batch."""
        return self._bsize

    def rows(self, Py_ssize_t j):
        """Leading dimension of value `j` in every item (1 for TEXT/JSON/IMAGE values,
        -1 for a 0-d tensor), as a list of ints."""
        return _rows(self, j)

    def column(self, Py_ssize_t j):
        """Value `j` of every item, stacked on axis 0, as one numpy array.

        When every item carries a tensor of the same datatype and shape with a
        leading dimension of 1 (the common "one row per item" batch), the
        result is a strided view of the frame: no copy and no per-item
        objects.  Otherwise the items' tensors are concatenated (a copy);
        non-tensor values come as a 1-D object array, one row per item.
        """
        return _column(self, j)

    @property
    def is_request(self):
        return self.kind != MIP_KIND_ERROR and self.subtype == MIP_REQUEST

    @property
    def is_response(self):
        return self.kind != MIP_KIND_ERROR and self.subtype == MIP_RESPONSE

    def __repr__(self):
        if self.kind == MIP_KIND_ERROR:
            said = f", error_message={self.error_message!r}" if self.error_message else ""
            return f"Message(kind=ERROR, error_code={self.error_code}{said})"
        names = {0: "ERROR", 1: "PING", 2: "INFERENCE", 3: "ROUTED"}
        sub = "REQUEST" if self.subtype == MIP_REQUEST else "RESPONSE"
        route = f", model={self.model!r}, version={self.version!r}" if self.model is not None else ""
        return (f"Message(kind={names[self.kind]}, subtype={sub}, n_input={self.n_input}, "
                f"n_output={self.n_output}, batch=<{self._bsize} items>{route})")


cdef inline Message _new_message(int kind, int subtype):
    cdef Message m = Message.__new__(Message)
    m.kind = kind
    m.subtype = subtype
    m.n_input = 0
    m.n_output = 0
    m._batch = []
    m._bsize = 0
    m._per_item = 0
    m.error_code = None
    m.error_message = None
    m.model = None
    m.version = None
    return m


# ---- decoding --------------------------------------------------------------
cdef class _FrameView:
    """The frame being decoded: its memory, its owner and a lazily made memoryview."""
    cdef const unsigned char *base
    cdef Py_ssize_t origin        # offset of the frame inside the owner's memory
    cdef object owner
    cdef object view
    cdef bint writable

    cdef object slice(self, Py_ssize_t start, Py_ssize_t stop):
        """A read-only memoryview of frame octets [start, stop)."""
        if self.view is None:
            self.view = memoryview(self.owner).toreadonly()
        return self.view[self.origin + start:self.origin + stop]


cdef str _decode_utf8(const unsigned char *p, Py_ssize_t n, Py_ssize_t offset, str what):
    try:
        return PyUnicode_DecodeUTF8(<const char *>p, n, "strict")
    except UnicodeDecodeError as exc:
        raise_wire_error(MIP_E_VALUE, offset + exc.start, f"{what} is not valid UTF-8")


# The model name read last: requests name the same few models, and the one str object
# (its hash computed once) serves every request that names it again.
cdef unsigned char _name_octets[255]
cdef Py_ssize_t _name_size = 0
cdef str _name = None


cdef str _model_name(const unsigned char *p, Py_ssize_t n, Py_ssize_t offset):
    global _name, _name_size
    if n == _name_size and memcmp(p, _name_octets, n) == 0:
        return _name
    name = _decode_utf8(p, n, offset, "model name")
    memcpy(_name_octets, p, n)
    _name_size = n
    _name = name
    return name


cdef object _make_tensor(mip_tensor_header *t, const unsigned char *data, object owner,
                         bint writable, Py_ssize_t data_offset):
    cdef cnp.npy_intp dims[32]
    cdef int i, flags
    cdef bint aligned
    cdef PyObject *descr
    for i in range(t.ndim):
        dims[i] = t.dims[i]
    if t.dtype == MIP_DT_BYTES:
        return _make_bytes_tensor(t, data, dims, data_offset)
    descr = _descr_ptr[t.dtype]
    aligned = (<uintptr_t>data) % <uintptr_t>_descr_align[t.dtype] == 0
    flags = cnp.NPY_ARRAY_C_CONTIGUOUS
    if aligned:
        flags |= cnp.NPY_ARRAY_ALIGNED
    if writable:
        flags |= cnp.NPY_ARRAY_WRITEABLE
    Py_INCREF(<object>descr)  # PyArray_NewFromDescr steals it
    arr = PyArray_NewFromDescr(<PyTypeObject *>cnp.ndarray, <PyArrayDescrStruct *>descr, t.ndim, dims, NULL,
                               <void *>data, flags, NULL)
    # A frame placed at an odd address by its caller gives an unaligned view
    # (flags.aligned is False): still no copy; numpy and ONNX Runtime cope.
    cnp.set_array_base(<cnp.ndarray>arr, owner)
    return arr


cdef object _make_bytes_tensor(mip_tensor_header *t, const unsigned char *data,
                               cnp.npy_intp *dims, Py_ssize_t data_offset):
    cdef cnp.ndarray arr = cnp.PyArray_SimpleNew(t.ndim, dims, cnp.NPY_OBJECT)
    _bytes_elements(t, data, data_offset, <PyObject **>cnp.PyArray_DATA(arr))
    return arr


cdef int _bytes_elements(mip_tensor_header *t, const unsigned char *data,
                         Py_ssize_t data_offset, PyObject **slots) except -1:
    """Walk the length-prefixed elements of a BYTES tensor, checking each; with `slots`
    (an object array's element pointers) also store each element as ``bytes``."""
    cdef uint64_t i
    cdef size_t pos = 0, ln, total = t.data_len
    for i in range(t.nelem):
        if total - pos < 4:
            raise_wire_error(MIP_E_VALUE, data_offset + pos,
                             f"BYTES element {i} has no room for its length")
        ln = mip_load_le32(data + pos)
        pos += 4
        if ln > total - pos:
            raise_wire_error(MIP_E_VALUE, data_offset + pos - 4,
                             f"BYTES element {i} claims {ln} octets, {total - pos} remain")
        if slots != NULL:
            b = PyBytes_FromStringAndSize(<const char *>(data + pos), ln)
            Py_INCREF(b)
            Py_XDECREF(slots[i])
            slots[i] = <PyObject *>b
        pos += ln
    if pos != total:
        raise_wire_error(MIP_E_VALUE, data_offset + pos,
                         f"BYTES tensor has {total - pos} octets after its {t.nelem} elements")
    return 0


cdef inline int _parse_tensor(const unsigned char *p, Py_ssize_t size, Py_ssize_t off,
                              mip_tensor_header *t) except -1:
    """Parse into ``t`` the header of the tensor value at [off, off+size) of a frame, or raise."""
    cdef size_t err_off = 0
    cdef int rc = mip_parse_tensor_header(p, size, t, &err_off)
    if rc != MIP_OK:
        raise_wire_error(rc, off + err_off, _tensor_header_problem(p, size, t, err_off))
    return 0


cdef object _decode_value(_FrameView fv, uint32_t vtype, Py_ssize_t off, Py_ssize_t size):
    """Decode the value of one TLV whose octets are at [off, off+size) of the frame."""
    cdef const unsigned char *p = fv.base + off
    cdef mip_tensor_header t
    if vtype == T_TENSOR:
        _parse_tensor(p, size, off, &t)
        return _make_tensor(&t, p + t.data_off, fv.owner, fv.writable, off + t.data_off)
    if vtype == T_TEXT:
        text = Text.__new__(Text)
        (<Text>text).value = _decode_utf8(p, size, off, "TEXT value")
        return text
    if vtype == T_JSON:
        j = Json.__new__(Json)
        (<Json>j)._data = PyBytes_FromStringAndSize(<const char *>p, size)
        (<Json>j)._parsed = False
        return j
    if vtype == T_IMAGE:
        img = Image.__new__(Image)
        (<Image>img).data = fv.slice(off, off + size)
        return img
    if vtype != 0:  # an application's type (4-15, 17 and up)
        v = Value.__new__(Value)
        (<Value>v).type = vtype
        (<Value>v).data = fv.slice(off, off + size)
        return v
    raise_wire_error(MIP_E_VALUE_TYPE, off - 8, f"TLV type {vtype} is reserved and not defined")


cdef str _tensor_header_problem(const unsigned char *p, Py_ssize_t size,
                                mip_tensor_header *t, size_t err_off):
    if size < 4:
        return f"tensor value of {size} octets is shorter than its 4-octet header"
    if err_off == 0:
        return f"tensor datatype code {p[0]} is not defined"
    if err_off == 1:
        return f"tensor has {p[1]} dimensions, at most 32 are allowed"
    if err_off == 2:
        return f"tensor padding of {p[2]} octets, at most 7 are allowed"
    if err_off == 3:
        return f"tensor flags are {p[3]}, must be 0"
    if err_off == <size_t>size and <Py_ssize_t>(4 + 4 * t.ndim + t.pad) > size:
        return f"tensor value of {size} octets cannot hold its {t.ndim} dimensions and padding"
    if err_off < <size_t>(4 + 4 * t.ndim):
        return "tensor shape describes more elements than an array can hold"
    if t.dtype == MIP_DT_BYTES:
        return f"BYTES tensor of {t.nelem} elements cannot fit in {t.data_len} octets"
    return (f"tensor data is {t.data_len} octets, its shape and datatype need "
            f"{t.nelem} x {mip_dtype_size[t.dtype]}")


cdef Message decode_frame_at(object owner, const unsigned char *base, Py_ssize_t length,
                             bint writable, Py_ssize_t origin):
    """Decode the frame at `base` (exactly `length` octets, header already validated)."""
    cdef mip_header h
    cdef size_t err_off = 0
    cdef Py_ssize_t pos, per_item, i, j, vsize, name_len, ver_len
    cdef uint32_t vtype
    cdef int rc = mip_parse_header(base, length, <uint64_t>-1, &h, &err_off)
    cdef Message m
    if rc != MIP_OK:
        raise_wire_error(rc if rc < 0 else MIP_E_TRUNCATED, err_off, "bad MIP header")
    m = _new_message(h.kind, h.subtype)
    if h.kind == MIP_KIND_ERROR:
        m.error_code = h.subtype
        if length > MIP_HEADER_SIZE:
            m.error_message = PyUnicode_DecodeUTF8(<const char *>(base + MIP_HEADER_SIZE),
                                                   length - MIP_HEADER_SIZE, "replace")
        return m
    if h.kind == MIP_KIND_PING:
        if length != MIP_HEADER_SIZE:
            raise_wire_error(MIP_E_COUNTS, MIP_HEADER_SIZE,
                             f"PING frame carries {length - MIP_HEADER_SIZE} payload octets, must carry none")
        return m
    pos = MIP_HEADER_SIZE
    if h.kind == MIP_KIND_ROUTED and h.subtype == MIP_REQUEST:
        if length - pos < 1:
            raise_wire_error(MIP_E_TRUNCATED, pos, "routed request ends before its model name length")
        name_len = base[pos]
        if name_len == 0:
            raise_wire_error(MIP_E_VALUE, pos, "routed request has an empty model name")
        if length - pos - 1 < name_len:
            raise_wire_error(MIP_E_TRUNCATED, pos, f"model name of {name_len} octets runs past the frame")
        m.model = _model_name(base + pos + 1, name_len, pos + 1)
        pos += 1 + name_len
        if length - pos < 1:
            raise_wire_error(MIP_E_TRUNCATED, pos, "routed request ends before its version length")
        ver_len = base[pos]
        if length - pos - 1 < ver_len:
            raise_wire_error(MIP_E_TRUNCATED, pos, f"model version of {ver_len} octets runs past the frame")
        m.version = _decode_utf8(base + pos + 1, ver_len, pos + 1, "model version") if ver_len else None
        pos += 1 + ver_len
    if length - pos < MIP_INFERENCE_HEADER_SIZE:
        raise_wire_error(MIP_E_TRUNCATED, pos, "inference frame ends before its 4-octet inference header")
    m.n_input = base[pos]
    m.n_output = base[pos + 1]
    cdef Py_ssize_t bsize = mip_load_be16(base + pos + 2)
    pos += MIP_INFERENCE_HEADER_SIZE
    per_item = m.n_input if h.subtype == MIP_REQUEST else m.n_output
    # Every TLV takes at least 8 octets: refuse counts the frame cannot hold
    # before building anything for them.
    if bsize * per_item * MIP_TLV_HEADER_SIZE > length - pos:
        raise_wire_error(MIP_E_TRUNCATED, pos - MIP_INFERENCE_HEADER_SIZE,
                         f"{bsize} items of {per_item} values cannot fit in {length - pos} octets")
    m._owner = owner
    m._base = base
    m._length = length
    m._origin = origin
    m._writable = writable
    m._values_at = pos
    m._bsize = bsize
    m._per_item = per_item
    if bsize * per_item <= 8:
        m._batch = _walk(m, True)  # few values: make them in the one pass that checks them
    else:
        m._batch = None
        _walk(m, False)
    return m


cdef list _walk(Message m, bint build):
    """Walk every TLV of the frame, checking each against the octets present.

    With `build` false only checks (nothing is allocated); with `build` true
    returns the batch of value objects.  Both passes check everything, so a
    writable buffer changed after decoding cannot lead outside the frame.
    """
    cdef const unsigned char *base = m._base
    cdef Py_ssize_t length = m._length, pos = m._values_at
    cdef Py_ssize_t bsize = m._bsize, per_item = m._per_item, i, j, vsize
    cdef uint32_t vtype
    cdef _FrameView fv = None
    cdef list batch = None
    cdef tuple item = None
    cdef object value
    if build:
        fv = _FrameView.__new__(_FrameView)
        fv.base = base
        fv.owner = m._owner
        fv.origin = m._origin
        fv.writable = m._writable
        fv.view = None
        batch = PyList_New(bsize)
    for i in range(bsize):
        if build:
            item = PyTuple_New(per_item)
            Py_INCREF(item)
            PyList_SET_ITEM(batch, i, item)
        for j in range(per_item):
            if length - pos < MIP_TLV_HEADER_SIZE:
                raise_wire_error(MIP_E_TRUNCATED, pos, f"item {i} value {j} has no room for its TLV header")
            vtype = mip_load_be32(base + pos)
            vsize = mip_load_be32(base + pos + 4)
            pos += MIP_TLV_HEADER_SIZE
            if vsize > length - pos:
                raise_wire_error(MIP_E_TRUNCATED, pos - 4,
                                 f"item {i} value {j} claims {vsize} octets, {length - pos} remain")
            if build:
                value = _decode_value(fv, vtype, pos, vsize)
                Py_INCREF(value)
                PyTuple_SET_ITEM(item, j, value)
            else:
                _check_value(base, vtype, pos, vsize)
            pos += vsize
    if pos != length:
        raise_wire_error(MIP_E_COUNTS, pos,
                         f"{length - pos} octets follow the last of {bsize} x {per_item} values")
    return batch


cdef int _check_value(const unsigned char *base, uint32_t vtype, Py_ssize_t off,
                      Py_ssize_t size) except -1:
    """Check one value without making its object (what _decode_value would refuse)."""
    cdef const unsigned char *p = base + off
    cdef mip_tensor_header t
    if vtype == T_TENSOR:
        _parse_tensor(p, size, off, &t)
        if t.dtype == MIP_DT_BYTES:
            _bytes_elements(&t, p + t.data_off, off + t.data_off, NULL)
        return 0
    if vtype == T_TEXT:
        _decode_utf8(p, size, off, "TEXT value")
        return 0
    if vtype != 0:  # JSON, IMAGE and the application's types are octets as they come
        return 0
    raise_wire_error(MIP_E_VALUE_TYPE, off - 8, f"TLV type {vtype} is reserved and not defined")


cdef Py_ssize_t *_locate(Message m, Py_ssize_t j) except NULL:
    """Offsets, sizes and types of value `j` of every item, in one block the caller frees
    with PyMem_Free: ``n`` offsets, then ``n`` sizes, then ``n`` u32 types."""
    cdef Py_ssize_t n = max(m._bsize, 1)
    if not 0 <= j < m._per_item:
        raise IndexError(f"value index {j} out of range: items hold {m._per_item} values")
    cdef Py_ssize_t *offsets = <Py_ssize_t *>PyMem_Malloc(n * (2 * sizeof(Py_ssize_t) + sizeof(uint32_t)))
    if offsets == NULL:
        raise MemoryError()
    try:
        _find_values(m, j, offsets, offsets + n, <uint32_t *>(offsets + 2 * n))
    except BaseException:
        PyMem_Free(offsets)
        raise
    return offsets


cdef int _find_values(Message m, Py_ssize_t j, Py_ssize_t *offsets, Py_ssize_t *sizes,
                      uint32_t *types) except -1:
    """Fill offsets, sizes and types of value `j` of every item (the frame was checked)."""
    cdef const unsigned char *base = m._base
    cdef Py_ssize_t pos = m._values_at, i, k, vsize
    for i in range(m._bsize):
        for k in range(m._per_item):
            if m._length - pos < MIP_TLV_HEADER_SIZE:
                raise_wire_error(MIP_E_TRUNCATED, pos, "the frame changed after it was decoded")
            vsize = mip_load_be32(base + pos + 4)
            if k == j:
                types[i] = mip_load_be32(base + pos)
                offsets[i] = pos + MIP_TLV_HEADER_SIZE
                sizes[i] = vsize
            pos += MIP_TLV_HEADER_SIZE + vsize
            if pos > m._length:
                raise_wire_error(MIP_E_TRUNCATED, pos, "the frame changed after it was decoded")
    return 0


cdef list _rows(Message m, Py_ssize_t j):
    cdef Py_ssize_t n = m._bsize, i
    cdef mip_tensor_header t
    cdef size_t err_off = 0
    cdef int rc
    cdef Py_ssize_t *offsets = _locate(m, j)
    cdef Py_ssize_t *sizes = offsets + max(n, 1)
    cdef uint32_t *types = <uint32_t *>(offsets + 2 * max(n, 1))
    cdef list out = PyList_New(n)
    # A Python object, declared: PyList_SET_ITEM steals the reference taken by Py_INCREF,
    # which must be the object stored (an inferred C integer would give a temporary).
    cdef object r
    try:
        for i in range(n):
            r = 1
            if types[i] == T_TENSOR:
                rc = mip_parse_tensor_header(m._base + offsets[i], sizes[i], &t, &err_off)
                if rc != MIP_OK:
                    raise_wire_error(rc, offsets[i] + err_off, "the frame changed after it was decoded")
                r = t.dims[0] if t.ndim else -1
            Py_INCREF(r)
            PyList_SET_ITEM(out, i, r)
    finally:
        PyMem_Free(offsets)
    return out


cdef object _column(Message m, Py_ssize_t j):
    cdef Py_ssize_t n = m._bsize, i, stride = 0
    cdef mip_tensor_header t, first
    cdef size_t err_off = 0
    cdef int rc, d, flags
    cdef bint uniform = True
    cdef cnp.npy_intp dims[33]
    cdef cnp.npy_intp strides[33]
    cdef const unsigned char *data0 = NULL
    cdef const unsigned char *data
    cdef Py_ssize_t *offsets = _locate(m, j)
    first.ndim = first.dtype = 0
    first.dims[0] = 0
    if n == 0:
        PyMem_Free(offsets)
        raise ValueError("the batch is empty")
    cdef Py_ssize_t *sizes = offsets + n
    cdef uint32_t *types = <uint32_t *>(offsets + 2 * n)
    try:
        for i in range(n):
            if types[i] != T_TENSOR:
                uniform = False
                break
            rc = mip_parse_tensor_header(m._base + offsets[i], sizes[i], &t, &err_off)
            if rc != MIP_OK:
                raise_wire_error(rc, offsets[i] + err_off, "the frame changed after it was decoded")
            data = m._base + offsets[i] + t.data_off
            if i == 0:
                first = t
                data0 = data
                if t.dtype == MIP_DT_BYTES or t.ndim == 0 or (t.dims[0] != 1 and n > 1):
                    uniform = False
                    break
                continue
            if t.dtype != first.dtype or t.ndim != first.ndim:
                uniform = False
                break
            for d in range(t.ndim):
                if t.dims[d] != first.dims[d]:
                    uniform = False
                    break
            if not uniform:
                break
            if i == 1:
                stride = data - data0
                if stride <= 0:
                    uniform = False
                    break
            elif data - data0 != stride * i:
                uniform = False
                break
        if uniform:
            dims[0] = n if n > 1 else first.dims[0]
            strides[first.ndim - 1] = mip_dtype_size[first.dtype]
            for d in range(first.ndim - 1, 0, -1):
                dims[d] = first.dims[d]
                strides[d - 1] = strides[d] * first.dims[d]
            if n > 1:
                strides[0] = stride
            flags = cnp.NPY_ARRAY_WRITEABLE if m._writable else 0
            descr = _descr_ptr[first.dtype]
            Py_INCREF(<object>descr)
            arr = PyArray_NewFromDescr(<PyTypeObject *>cnp.ndarray, <PyArrayDescrStruct *>descr,
                                       first.ndim, dims, strides,
                                       <void *>data0, flags, NULL)
            cnp.PyArray_UpdateFlags(<cnp.ndarray>arr, cnp.NPY_ARRAY_UPDATE_ALL)
            cnp.set_array_base(<cnp.ndarray>arr, m._owner)
            return arr
    finally:
        PyMem_Free(offsets)
    parts = []
    for item in m.batch:
        value = (<tuple>item)[j]
        if isinstance(value, np.ndarray):
            parts.append(value)
        else:
            rows = np.empty(1, dtype=object)
            rows[0] = value
            parts.append(rows)
    for i, part in enumerate(parts):
        if (<cnp.ndarray>part).ndim == 0:
            raise ValueError(f"item {i} value {j} is a 0-d tensor: it has no leading dimension")
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts, axis=0)


def decode(buffer, max_frame_size=None):
    """Decode one whole MIP frame from any object with the buffer protocol.

    Tensors are numpy views of `buffer` (read-only when the buffer is).
    `max_frame_size` (octets, header included) bounds the size a header may
    declare; by default the limit is the length of `buffer`.

    Raises a ``mip.ProtocolError`` subclass for any malformed input.
    """
    cdef Py_buffer view
    cdef const unsigned char *p
    cdef Py_ssize_t n
    cdef mip_header h
    cdef uint64_t limit
    cdef bint writable = False
    cdef object owner
    if PyBytes_CheckExact(buffer):
        p = <const unsigned char *>PyBytes_AS_STRING(buffer)
        n = PyBytes_GET_SIZE(buffer)
        owner = buffer
    else:
        # The memoryview pins the exporter's memory for the views; the pointer is taken
        # from it, so it is the memory that stays pinned.
        owner = memoryview(buffer)
        PyObject_GetBuffer(owner, &view, PyBUF_SIMPLE)
        p = <const unsigned char *>view.buf
        n = view.len
        writable = not view.readonly
        PyBuffer_Release(&view)
        if not writable:
            owner = owner.toreadonly()
    limit = <uint64_t>-1 if max_frame_size is None else <uint64_t>max_frame_size
    if not _parse_header(p, n, limit, &h):
        raise_wire_error(MIP_E_TRUNCATED, 0, f"{n} octets cannot hold the 8-octet MIP header")
    if <uint64_t>h.remaining + MIP_HEADER_SIZE > <uint64_t>n:
        raise_wire_error(MIP_E_TRUNCATED, 4,
                         f"header declares {h.remaining} payload octets, {n - MIP_HEADER_SIZE} present")
    if h.remaining + MIP_HEADER_SIZE < <uint64_t>n:
        raise_wire_error(MIP_E_COUNTS, MIP_HEADER_SIZE + h.remaining,
                         f"{n - MIP_HEADER_SIZE - h.remaining} octets follow the frame")
    return decode_frame_at(owner, p, n, writable, 0)


cdef inline int _parse_header(const unsigned char *p, Py_ssize_t n, uint64_t limit,
                              mip_header *h) except -1:
    """Parse the MIP header at ``p`` into ``h``: 0 while fewer than 8 octets are present, 1
    for a valid header; a bad one (or one over ``limit``) raises."""
    cdef size_t err_off = 0
    cdef int rc = mip_parse_header(p, n, limit, h, &err_off)
    if rc == MIP_NEED_MORE:
        return 0
    if rc != MIP_OK:
        raise_wire_error(rc, err_off, _header_problem(rc, h, limit))
    return 1


cdef str _header_problem(int rc, mip_header *h, uint64_t limit):
    if rc == MIP_E_VERSION:
        return f"unsupported MIP version {h.version}"
    if rc == MIP_E_KIND:
        return f"unknown MIP kind {h.kind}"
    if rc == MIP_E_SUBTYPE:
        return f"subtype {h.subtype} is neither REQUEST (0) nor RESPONSE (1)"
    if rc == MIP_E_TOO_LARGE:
        return (f"frame of {<uint64_t>h.remaining + MIP_HEADER_SIZE} octets exceeds "
                f"max_frame_size={limit}")
    return "bad MIP header"


cdef class FrameParser(StreamParser):
    """Streaming MIP parser for transports: octets in, complete ``Message`` objects out.

    ``feed(data)`` copies received octets in; ``get_buffer()`` /
    ``buffer_updated(n)`` let an ``asyncio.BufferedProtocol`` receive straight
    into the parser's memory, so tensors are views of the memory the socket
    wrote (no copy).  A frame larger than `max_frame_size` octets (header
    included) raises ``FrameTooLarge`` as soon as its header arrives, before
    any memory is reserved for it.  After an error the parser is broken: every
    later call raises the same error.
    """

    def __init__(self, Py_ssize_t max_frame_size=DEFAULT_MAX_FRAME_SIZE,
                 Py_ssize_t chunk_size=65536):
        if max_frame_size < MIP_HEADER_SIZE:
            raise ValueError("max_frame_size must be at least 8 octets")
        self.set_sizes(chunk_size, max_frame_size)
        self.max_frame = max_frame_size
        self.align_frames = True

    @property
    def max_frame_size(self):
        return self.max_frame

    cdef Py_ssize_t frame_length(self, const unsigned char *p, Py_ssize_t avail) except -2:
        cdef mip_header h
        if not _parse_header(p, avail, self.max_frame, &h):
            return -1
        return <Py_ssize_t>h.remaining + MIP_HEADER_SIZE

    cdef object decode_frame(self, Chunk chunk, Py_ssize_t offset, Py_ssize_t length):
        return decode_frame_at(chunk, chunk.mem + offset, length, True, offset)


# ---- encoding --------------------------------------------------------------
ctypedef struct _Enc:
    uint32_t type
    const unsigned char *data
    Py_ssize_t data_len
    uint8_t dtype
    uint8_t ndim
    uint8_t pad
    cnp.npy_intp *shape
    Py_ssize_t value_len
    PyObject *segment_src        # borrowed from `keep`: the object whose memory is data


cdef class _Plan:
    """The layout of one frame to encode: every value normalised and placed."""
    cdef _Enc *vals
    cdef Py_ssize_t n
    cdef list keep
    cdef Py_ssize_t total
    cdef int kind, subtype, n_input, n_output, bsize
    cdef bytes route

    def __dealloc__(self):
        if self.vals != NULL:
            PyMem_Free(self.vals)


cdef inline int _set_buffer(_Enc *e, object obj, list keep) except -1:
    cdef Py_buffer view
    if PyBytes_CheckExact(obj):
        e.data = <const unsigned char *>PyBytes_AS_STRING(obj)
        e.data_len = PyBytes_GET_SIZE(obj)
        keep.append(obj)
        e.segment_src = <PyObject *>obj
        return 0
    mv = memoryview(obj)
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    PyObject_GetBuffer(mv, &view, PyBUF_SIMPLE)
    e.data = <const unsigned char *>view.buf
    e.data_len = view.len
    PyBuffer_Release(&view)  # `mv` stays in `keep`, which pins the memory
    keep.append(mv)
    e.segment_src = <PyObject *>mv
    return 0


cdef inline bytes _element_bytes(object x):
    """One BYTES element's octets: ``bytes`` as they are, ``str`` as UTF-8, buffers copied,
    ``dict`` and ``list`` (decoded JSON) as JSON text, KubeMo values (``Text``, ``Json``,
    ``Image``, ``Value``) by their ``data``, anything else as the UTF-8 of ``str()`` (what
    Triton's clients do)."""
    if isinstance(x, bytes):
        return x
    if PyUnicode_Check(x):
        return (<str>x).encode("utf-8")
    if isinstance(x, (bytearray, memoryview)):
        return bytes(x)
    if isinstance(x, (dict, list)):
        return Json(x).data
    data = getattr(x, "data", None)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return str(x).encode("utf-8")


def bytes_elements(array):
    """The elements of a BYTES array (object, ``S`` or ``U``) as a list of ``bytes``, in
    row-major order (see :func:`encode_bytes` for what an element may be)."""
    arr = np.asarray(array)
    flat = arr.reshape(-1).tolist() if arr.ndim else [arr.item()]
    return [_element_bytes(x) for x in flat]


def encode_bytes(array):
    """A BYTES tensor's octets on every wire (MIP, KServe v2 raw contents): each element,
    row-major, as a u32 little-endian length and that many octets.

    Elements are ``bytes``, ``str`` (sent as UTF-8), bytes-like objects, ``dict`` and
    ``list`` (as JSON text), KubeMo values (their ``data``) or anything else (the UTF-8 of
    ``str()``).

    Raises:
        ValueError: an element larger than 4 GiB.
    """
    cdef list parts = bytes_elements(array)
    cdef Py_ssize_t total = 0, ln
    cdef unsigned char *out
    for b in parts:
        ln = PyBytes_GET_SIZE(b)
        if ln > MAX_U32:
            raise ValueError("a BYTES element is larger than 4 GiB")
        total += 4 + ln
    res = PyBytes_FromStringAndSize(NULL, total)
    out = <unsigned char *>PyBytes_AS_STRING(res)
    for b in parts:
        ln = PyBytes_GET_SIZE(b)
        mip_store_le32(out, <uint32_t>ln)
        memcpy(out + 4, PyBytes_AS_STRING(b), ln)
        out += 4 + ln
    return res


def decode_bytes(buffer, Py_ssize_t count):
    """``count`` BYTES elements read from ``buffer`` (u32 little-endian length + octets
    each, exactly filling it): a 1-D object array of ``bytes``. Every length is checked
    against the octets present before anything is taken, and a count that cannot fit is
    refused before the array is made.

    Raises:
        InvalidValue: a length runs past the end, or octets are left over (the message
            says which element, and the offset in ``buffer``).
    """
    cdef Py_buffer view
    cdef mip_tensor_header t
    cdef cnp.npy_intp dims[1]
    if count < 0:
        raise ValueError("a negative element count")
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        if count > view.len // 4:
            raise_wire_error(MIP_E_VALUE, 0, f"{count} BYTES elements need at least "
                             f"{count * 4} octets, {view.len} were sent")
        t.ndim = 1
        t.nelem = count
        t.data_len = view.len
        dims[0] = count
        return _make_bytes_tensor(&t, <const unsigned char *>view.buf, dims, 0)
    finally:
        PyBuffer_Release(&view)


cdef int _normalize(_Enc *e, object v, list keep) except -1:
    cdef cnp.ndarray arr
    cdef int typenum, code, i
    cdef const char *s
    cdef Py_ssize_t slen
    if isinstance(v, np.generic):
        v = np.asarray(v)
    if cnp.PyArray_Check(v):
        arr = <cnp.ndarray>v
        code = _code_of(cnp.PyArray_TYPE(arr))
        if code == 0:
            raise _no_datatype(arr.dtype)
        if cnp.PyArray_NDIM(arr) > MIP_TENSOR_MAX_NDIM:
            raise ValueError(f"tensor has {arr.ndim} dimensions, at most 32 are allowed")
        for i in range(cnp.PyArray_NDIM(arr)):
            if cnp.PyArray_DIMS(arr)[i] > MAX_U32:
                raise ValueError(f"tensor dimension {i} is {arr.shape[i]}, at most 2**32-1")
        e.type = T_TENSOR
        e.dtype = code
        e.ndim = cnp.PyArray_NDIM(arr)
        if code == MIP_DT_BYTES:
            keep.append(arr)
            e.shape = cnp.PyArray_DIMS(arr)
            _set_buffer(e, encode_bytes(arr), keep)
            return 0
        if not (cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISNOTSWAPPED(arr)):
            arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
        keep.append(arr)
        e.shape = cnp.PyArray_DIMS(arr)
        e.data = <const unsigned char *>cnp.PyArray_DATA(arr)
        e.data_len = cnp.PyArray_NBYTES(arr)
        e.segment_src = <PyObject *>arr
        return 0
    e.ndim = 0
    e.shape = NULL
    if PyUnicode_Check(v) or isinstance(v, Text):
        s = PyUnicode_AsUTF8AndSize(v if PyUnicode_Check(v) else (<Text>v).value, &slen)
        keep.append(v)
        e.type = T_TEXT
        e.data = <const unsigned char *>s
        e.data_len = slen
        e.segment_src = NULL
        return 0
    if isinstance(v, Json):
        e.type = T_JSON
        return _set_buffer(e, (<Json>v).data, keep)
    if isinstance(v, Image):
        e.type = T_IMAGE
        return _set_buffer(e, (<Image>v).data, keep)
    if isinstance(v, Value):
        e.type = (<Value>v).type
        return _set_buffer(e, (<Value>v).data, keep)
    if isinstance(v, (bytes, bytearray, memoryview)):
        raise TypeError("raw octets need an explicit type: wrap them in mip.Value(type, data), "
                        "mip.Image(data) or mip.Text(str)")
    raise TypeError(f"cannot encode a value of type {type(v).__name__}: expected a numpy array, "
                    "str, mip.Text, mip.Json, mip.Image or mip.Value")


cdef _Plan _plan(object batch, int kind, int subtype, int n_input, object n_output,
                 object model, object version):
    cdef _Plan plan = _Plan.__new__(_Plan)
    cdef Py_ssize_t bsize, per_item, i, j, k, off, hdr
    cdef _Enc *e
    cdef list items = []
    cdef object item, value
    plan.keep = []
    # Lists and tuples are read in place (PySequence_Fast); other sequences are copied once.
    items = [item if type(item) is tuple or type(item) is list else tuple(item) for item in batch]
    bsize = len(items)
    if bsize > 0xFFFF:
        raise ValueError(f"a batch holds at most 65535 items, got {bsize}")
    if bsize:
        per_item = PySequence_Fast_GET_SIZE(items[0])
    elif subtype == MIP_RESPONSE and n_output is not None:
        per_item = n_output
    else:
        per_item = 0
    for i in range(bsize):
        if PySequence_Fast_GET_SIZE(items[i]) != per_item:
            raise ValueError(f"item {i} has {len(items[i])} values, item 0 has {per_item}")
    if per_item > 255:
        raise ValueError(f"an item holds at most 255 values, got {per_item}")
    plan.kind = kind
    plan.subtype = subtype
    plan.bsize = bsize
    if subtype == MIP_REQUEST:
        plan.n_input = per_item
        plan.n_output = 0 if n_output is None else n_output
    else:
        plan.n_input = n_input
        plan.n_output = per_item
    if not (0 <= plan.n_input <= 255 and 0 <= plan.n_output <= 255):
        raise ValueError("n_input and n_output must be in 0..255")
    plan.route = None
    off = MIP_HEADER_SIZE
    if model is not None:
        name = (<str>model).encode("utf-8")
        ver = b"" if version is None else (<str>version).encode("utf-8")
        if not 1 <= len(name) <= 255:
            raise ValueError("a model name is 1 to 255 UTF-8 octets")
        if len(ver) > 255:
            raise ValueError("a model version is at most 255 UTF-8 octets")
        plan.route = bytes([len(name)]) + name + bytes([len(ver)]) + ver
        off += len(plan.route)
    elif version is not None:
        raise ValueError("a version needs a model name")
    off += MIP_INFERENCE_HEADER_SIZE
    plan.n = bsize * per_item
    plan.vals = <_Enc *>PyMem_Malloc(max(plan.n, 1) * sizeof(_Enc))
    if plan.vals == NULL:
        raise MemoryError()
    k = 0
    for i in range(bsize):
        item = items[i]
        for j in range(per_item):
            e = &plan.vals[k]
            e.pad = 0
            e.segment_src = NULL
            if PySequence_Fast_GET_SIZE(item) != per_item:  # a list changed while encoding
                raise ValueError(f"item {i} changed size while it was being encoded")
            # A reference of our own: the item is the caller's list, which code run while
            # normalising (str() of an element of an object array) could change.
            value = <object>PySequence_Fast_GET_ITEM(item, j)
            _normalize(e, value, plan.keep)
            off += MIP_TLV_HEADER_SIZE
            if e.type == T_TENSOR:
                hdr = 4 + 4 * e.ndim
                e.pad = mip_tensor_pad(off + hdr)
                e.value_len = hdr + e.pad + e.data_len
            else:
                e.value_len = e.data_len
            if e.value_len > MAX_U32:
                raise ValueError(f"item {i} value {j} is {e.value_len} octets, a value holds at most 4 GiB - 1")
            off += e.value_len
            k += 1
    if off - MIP_HEADER_SIZE > MAX_U32:
        raise ValueError(f"the frame would carry {off - MIP_HEADER_SIZE} payload octets, at most 4 GiB - 1")
    plan.total = off
    return plan


cdef inline unsigned char *_write_head(_Plan plan, unsigned char *out):
    out[0] = MIP_VERSION
    out[1] = plan.kind
    out[2] = plan.subtype
    out[3] = 0
    mip_store_be32(out + 4, <uint32_t>(plan.total - MIP_HEADER_SIZE))
    out += MIP_HEADER_SIZE
    if plan.route is not None:
        memcpy(out, PyBytes_AS_STRING(plan.route), len(plan.route))
        out += len(plan.route)
    out[0] = plan.n_input
    out[1] = plan.n_output
    mip_store_be16(out + 2, plan.bsize)
    return out + MIP_INFERENCE_HEADER_SIZE


cdef inline unsigned char *_write_value_header(_Enc *e, unsigned char *out):
    cdef int d
    mip_store_be32(out, e.type)
    mip_store_be32(out + 4, <uint32_t>e.value_len)
    out += MIP_TLV_HEADER_SIZE
    if e.type == T_TENSOR:
        out[0] = e.dtype
        out[1] = e.ndim
        out[2] = e.pad
        out[3] = 0
        out += 4
        for d in range(e.ndim):
            mip_store_be32(out, <uint32_t>e.shape[d])
            out += 4
        if e.pad:
            memset(out, 0, e.pad)
            out += e.pad
    return out


cdef bytes _encode_plan(_Plan plan):
    cdef bytes res = PyBytes_FromStringAndSize(NULL, plan.total)
    cdef unsigned char *out = <unsigned char *>PyBytes_AS_STRING(res)
    cdef Py_ssize_t k
    cdef _Enc *e
    out = _write_head(plan, out)
    for k in range(plan.n):
        e = &plan.vals[k]
        out = _write_value_header(e, out)
        if e.data_len:
            memcpy(out, e.data, e.data_len)
            out += e.data_len
    return res


cdef class _Octets:
    """Read-only octets of another object's memory, exported through the buffer protocol;
    holding the owner keeps that memory alive."""
    cdef object owner
    cdef const unsigned char *data
    cdef Py_ssize_t size

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, <void *>self.data, self.size, 1, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass


cdef object _octets(object owner, const unsigned char *data, Py_ssize_t size):
    """A flat, read-only memoryview of `size` octets at `data`, owned by `owner`."""
    cdef _Octets o = _Octets.__new__(_Octets)
    o.owner = owner
    o.data = data
    o.size = size
    return PyMemoryView_FromObject(o)


cdef inline bint _sent_apart(_Enc *e, Py_ssize_t copy_threshold):
    """Whether a value leaves from its own memory rather than copied beside its header."""
    return e.type == T_TENSOR and e.data_len >= copy_threshold and e.segment_src != NULL


cdef list _encode_plan_buffers(_Plan plan, Py_ssize_t copy_threshold):
    cdef Py_ssize_t k, inline_size = plan.total, seg_start = 0, pos
    cdef _Enc *e
    cdef list out = []
    cdef unsigned char *base
    cdef unsigned char *w
    for k in range(plan.n):
        if _sent_apart(&plan.vals[k], copy_threshold):
            inline_size -= plan.vals[k].data_len
    if inline_size == plan.total:
        return [_encode_plan(plan)]  # nothing large: one object
    inline = PyBytes_FromStringAndSize(NULL, inline_size)
    base = <unsigned char *>PyBytes_AS_STRING(inline)
    w = _write_head(plan, base)
    view = memoryview(inline)
    for k in range(plan.n):
        e = &plan.vals[k]
        w = _write_value_header(e, w)
        if _sent_apart(e, copy_threshold):
            pos = w - base
            out.append(view[seg_start:pos])
            seg_start = pos
            out.append(_octets(<object>e.segment_src, e.data, e.data_len))
        elif e.data_len:
            memcpy(w, e.data, e.data_len)
            w += e.data_len
    if w - base > seg_start:
        out.append(view[seg_start:w - base])
    return out


def encode_request(batch, model=None, version=None):
    """Encode an inference request: one ``bytes`` object.

    `batch` is a sequence of items, each a sequence of values (numpy arrays,
    str, Text, Json, Image or Value).  With `model` (and optionally
    `version`) the request is routed (kind 3); without, it is a plain KubeMo
    request (kind 2) for the peer's default model.
    """
    cdef int kind = MIP_KIND_INFERENCE if model is None else MIP_KIND_ROUTED
    return _encode_plan(_plan(batch, kind, MIP_REQUEST, 0, None, model, version))


def encode_response(batch, int n_input=0, int kind=MIP_KIND_INFERENCE, n_output=None):
    """Encode an inference response (kind 2, or 3 to answer a routed request).

    `n_input` echoes the request's input count; `n_output` is taken from the
    items (give it only for an empty batch).
    """
    if kind not in (MIP_KIND_INFERENCE, MIP_KIND_ROUTED):
        raise ValueError("a response is of kind 2 (INFERENCE) or 3 (ROUTED)")
    return _encode_plan(_plan(batch, kind, MIP_RESPONSE, n_input, n_output, None, None))


def encode_request_buffers(batch, model=None, version=None,
                           Py_ssize_t copy_threshold=DEFAULT_COPY_THRESHOLD):
    """Like :func:`encode_request`, as a list of buffers for ``writelines()``.

    Tensors of at least `copy_threshold` octets are not copied: the list holds
    views of their own memory between the header pieces.
    """
    cdef int kind = MIP_KIND_INFERENCE if model is None else MIP_KIND_ROUTED
    return _encode_plan_buffers(_plan(batch, kind, MIP_REQUEST, 0, None, model, version),
                                copy_threshold)


cdef object _one_small_tensor(object batch, int n_input, int kind, Py_ssize_t copy_threshold):
    """The response frame of one item holding one small numeric tensor (what most
    replies are), written at once; ``None`` for any other batch, which :func:`_plan` lays
    out (the octets are the same)."""
    cdef object item, value
    cdef cnp.ndarray arr
    cdef _Enc e
    cdef int code, ndim, d
    cdef Py_ssize_t off, hdr
    cdef unsigned char *out
    if type(batch) is not list or len(<list>batch) != 1 or not 0 <= n_input <= 255:
        return None
    item = (<list>batch)[0]
    if type(item) is not tuple or len(<tuple>item) != 1:
        return None
    value = (<tuple>item)[0]
    if type(value) is not np.ndarray:
        return None
    arr = <cnp.ndarray>value
    code = _code_of(cnp.PyArray_TYPE(arr))
    ndim = cnp.PyArray_NDIM(arr)
    if (code == 0 or code == MIP_DT_BYTES or ndim > MIP_TENSOR_MAX_NDIM
            or not (cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISNOTSWAPPED(arr))
            or cnp.PyArray_NBYTES(arr) >= copy_threshold):
        return None
    for d in range(ndim):
        if cnp.PyArray_DIMS(arr)[d] > MAX_U32:
            return None
    e.type = T_TENSOR
    e.dtype = code
    e.ndim = ndim
    e.shape = cnp.PyArray_DIMS(arr)
    e.data = <const unsigned char *>cnp.PyArray_DATA(arr)
    e.data_len = cnp.PyArray_NBYTES(arr)
    e.segment_src = NULL
    off = MIP_HEADER_SIZE + MIP_INFERENCE_HEADER_SIZE + MIP_TLV_HEADER_SIZE
    hdr = 4 + 4 * ndim
    e.pad = mip_tensor_pad(off + hdr)
    e.value_len = hdr + e.pad + e.data_len
    frame = PyBytes_FromStringAndSize(NULL, off + e.value_len)
    out = <unsigned char *>PyBytes_AS_STRING(frame)
    out[0] = MIP_VERSION
    out[1] = kind
    out[2] = MIP_RESPONSE
    out[3] = 0
    mip_store_be32(out + 4, <uint32_t>(off + e.value_len - MIP_HEADER_SIZE))
    out += MIP_HEADER_SIZE
    out[0] = n_input
    out[1] = 1
    mip_store_be16(out + 2, 1)
    out = _write_value_header(&e, out + MIP_INFERENCE_HEADER_SIZE)
    if e.data_len:
        memcpy(out, e.data, e.data_len)
    return frame


def encode_response_buffers(batch, int n_input=0, int kind=MIP_KIND_INFERENCE, n_output=None,
                            Py_ssize_t copy_threshold=DEFAULT_COPY_THRESHOLD):
    """Like :func:`encode_response`, as a list of buffers for ``writelines()``."""
    if kind not in (MIP_KIND_INFERENCE, MIP_KIND_ROUTED):
        raise ValueError("a response is of kind 2 (INFERENCE) or 3 (ROUTED)")
    frame = _one_small_tensor(batch, n_input, kind, copy_threshold)
    if frame is not None:
        return [frame]
    return _encode_plan_buffers(_plan(batch, kind, MIP_RESPONSE, n_input, n_output, None, None),
                                copy_threshold)


cdef bytes _PING = bytes([MIP_VERSION, MIP_KIND_PING, MIP_REQUEST, 0, 0, 0, 0, 0])
cdef bytes _PONG = bytes([MIP_VERSION, MIP_KIND_PING, MIP_RESPONSE, 0, 0, 0, 0, 0])


def encode_ping():
    """A PING request: 8 octets."""
    return _PING


def encode_pong():
    """The reply to a PING: 8 octets."""
    return _PONG


#: octets of UTF-8 an ERROR frame carries at most after its header
MAX_ERROR_MESSAGE = 1024


def encode_error(int code, message=None):
    """An ERROR frame carrying `code` (a ``mip.ErrorCode``) in its subtype: 8 octets, then,
    with `message`, that text in UTF-8 (at most :data:`MAX_ERROR_MESSAGE` octets, cut at a
    character boundary) counted by ``remaining``. The text is this implementation's
    extension: KubeMo's client reads and discards it, mip's clients raise with it."""
    if not 0 <= code <= 255:
        raise ValueError("an error code is in 0..255")
    if not message:
        return bytes([MIP_VERSION, MIP_KIND_ERROR, code, 0, 0, 0, 0, 0])
    text = str(message).encode("utf-8")
    if len(text) > MAX_ERROR_MESSAGE:
        text = text[:MAX_ERROR_MESSAGE].decode("utf-8", "ignore").encode("utf-8")
    n = len(text)
    return bytes([MIP_VERSION, MIP_KIND_ERROR, code, 0,
                  (n >> 24) & 0xFF, (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF]) + text
