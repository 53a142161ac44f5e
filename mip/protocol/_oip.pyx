# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""KServe v2 ``ModelInfer`` messages in protobuf wire form, for the common case only.

:func:`read_infer_request` reads a serialized ``ModelInferRequest`` whose tensors all
travel in ``raw_input_contents`` and which sets no parameters: its inputs come back as
numpy arrays that are views of the message (no octet copied); any other request (typed
contents, parameters, BYTES tensors, a field it does not know, anything malformed) gives
``None``, and is read with protobuf, which also words its errors.
:func:`write_infer_reply` writes the ``ModelInferResponse`` answering such a request,
octet for octet what protobuf writes (fields in number order, shapes packed, the raw
contents after the rest). No I/O, no protobuf runtime.
"""

cimport numpy as cnp
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_C_CONTIGUOUS
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from cpython.object cimport PyTypeObject
from cpython.ref cimport Py_INCREF, PyObject
from libc.stdint cimport int64_t, uint8_t, uint64_t, uintptr_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

from mip.protocol.dtypes import TABLE

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    ctypedef struct PyArrayDescrStruct "PyArray_Descr"
    object PyArray_NewFromDescr(PyTypeObject *subtype, PyArrayDescrStruct *descr, int nd,
                                cnp.npy_intp *dims, cnp.npy_intp *strides,
                                void *data, int flags, PyObject *obj)

cdef enum:
    MAX_DIMS = 32          # as mip.frontends.oip.codec.MAX_DIMS: more goes the slow way
    VIEW_FROM = 16384      # raw outputs from this size are sent as views, not copied
    RAW_INPUT = 7          # ModelInferRequest.raw_input_contents
    RAW_OUTPUT_TAG = 0x32  # ModelInferResponse.raw_output_contents: field 6, length-delimited

# datatype name <-> numpy dtype, for the fixed-size datatypes numpy exports as buffers
# (BYTES and BF16 go the slow way)
cdef dict _DTYPES = {d.name: d.numpy for d in TABLE if d.itemsize and d.name != "BF16"}
cdef dict _NAMES = {d.numpy: d.name.encode() for d in TABLE if d.itemsize and d.name != "BF16"}


cdef object _view(object data, const char *at, object dtype, tuple shape):
    """A read-only array of ``dtype`` and ``shape`` over the octets at ``at`` (checked by
    the caller), of ``data``, its base."""
    cdef cnp.npy_intp dims[MAX_DIMS]
    cdef int ndim = len(shape), i
    for i in range(ndim):
        dims[i] = shape[i]
    cdef int flags = cnp.NPY_ARRAY_C_CONTIGUOUS
    if (<uintptr_t>at) % (<cnp.dtype>dtype).alignment == 0:
        flags |= cnp.NPY_ARRAY_ALIGNED  # else an unaligned view: numpy and ONNX Runtime cope
    Py_INCREF(dtype)  # PyArray_NewFromDescr steals it
    array = PyArray_NewFromDescr(<PyTypeObject *>cnp.ndarray, <PyArrayDescrStruct *>dtype, ndim,
                                 dims, NULL, <void *>at, flags, NULL)
    Py_INCREF(data)
    cnp.PyArray_SetBaseObject(<cnp.ndarray>array, data)  # steals the reference
    return array


cdef inline Py_ssize_t _varint(const uint8_t *p, Py_ssize_t pos, Py_ssize_t end,
                               uint64_t *out) noexcept:
    """Read a varint at ``pos``; the position after it, or -1 if it is malformed."""
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef uint8_t byte
    while pos < end and shift < 64:
        byte = p[pos]
        pos += 1
        value |= <uint64_t>(byte & 0x7F) << shift
        if byte < 0x80:
            out[0] = value
            return pos
        shift += 7
    return -1


cdef inline Py_ssize_t _skip_field(const uint8_t *p, Py_ssize_t pos, Py_ssize_t end,
                                   int wire, Py_ssize_t *start, Py_ssize_t *length) noexcept:
    """Step over a field's value of wire type ``wire`` (0 or 2; others: -1); for 2 its
    octets are at ``start``, ``length`` long."""
    cdef uint64_t n
    if wire == 0:
        return _varint(p, pos, end, &n)
    if wire != 2:
        return -1
    pos = _varint(p, pos, end, &n)
    if pos < 0 or n > <uint64_t>(end - pos):
        return -1
    start[0] = pos
    length[0] = <Py_ssize_t>n
    return pos + <Py_ssize_t>n


cdef object _text(const uint8_t *p, Py_ssize_t start, Py_ssize_t length):
    """A string field as str; UnicodeDecodeError for invalid UTF-8 (as protobuf refuses)."""
    return PyUnicode_DecodeUTF8(<const char *>p + start, length, NULL)


cdef object _input(const uint8_t *p, Py_ssize_t pos, Py_ssize_t end):
    """An InferInputTensor without parameters or contents as ``(name, datatype, shape)``,
    or None."""
    cdef uint64_t key, dim
    cdef Py_ssize_t start = 0, length = 0, at, stop
    cdef int field
    name = datatype = ""
    cdef list shape = []
    while pos < end:
        pos = _varint(p, pos, end, &key)
        if pos < 0 or key >> 32:  # a field number over 2^29 is no field of protobuf's
            return None
        field = <int>(key >> 3)
        if field == 3 and (key & 7) == 0:  # one dimension, not packed
            pos = _varint(p, pos, end, &dim)
            if pos < 0 or <int64_t>dim < 0:
                return None
            shape.append(<int64_t>dim)
            continue
        pos = _skip_field(p, pos, end, key & 7, &start, &length)
        if pos < 0 or (key & 7) != 2:
            return None
        if field == 1:
            name = _text(p, start, length)
        elif field == 2:
            datatype = _text(p, start, length)
        elif field == 3:  # packed dimensions
            at, stop = start, start + length
            while at < stop:
                at = _varint(p, at, stop, &dim)
                if at < 0 or <int64_t>dim < 0:
                    return None
                shape.append(<int64_t>dim)
        else:  # parameters, typed contents, or a field this does not know
            return None
    if len(shape) > MAX_DIMS:
        return None
    return name, datatype, tuple(shape)


cdef object _output(const uint8_t *p, Py_ssize_t pos, Py_ssize_t end):
    """An InferRequestedOutputTensor's name, or None if it has parameters (or anything
    else)."""
    cdef uint64_t key
    cdef Py_ssize_t start = 0, length = 0
    name = ""
    while pos < end:
        pos = _varint(p, pos, end, &key)
        if pos < 0:
            return None
        pos = _skip_field(p, pos, end, key & 7, &start, &length)
        if pos < 0 or key != 0x0A:  # only field 1, length-delimited
            return None
        name = _text(p, start, length)
    return name


def read_infer_request(data):
    """A serialized ModelInferRequest as ``(model_name, model_version, id, inputs,
    outputs)``, or ``None`` when it is not of the common form.

    ``data``: ``bytes``, or a ``memoryview`` of octets (a gRPC message received into the
    shared arena). ``inputs`` maps each input's name to a numpy array viewing its octets in
    ``data``;
    ``outputs`` lists the output names asked for (``None``: none named). The common form:
    every input in ``raw_input_contents`` (one entry each, of the size its datatype and
    shape make), each of a fixed-size datatype other than BF16, at most 32 dimensions; no
    parameters anywhere; no input named twice; only the fields above, valid UTF-8.
    """
    cdef const uint8_t *p
    cdef Py_ssize_t end, pos = 0, start = 0, length = 0
    cdef Py_buffer buffer
    if type(data) is bytes:
        p = <const uint8_t *>PyBytes_AS_STRING(data)
        end = PyBytes_GET_SIZE(data)
    else:
        # A memoryview of our own is the inputs' base: it holds the export of the octets
        # for as long as they are viewed (a bytearray cannot be resized under them, and a
        # caller's own memoryview may be released), so the pointer stays valid.
        data = memoryview(data)
        PyObject_GetBuffer(data, &buffer, PyBUF_C_CONTIGUOUS)
        p = <const uint8_t *>buffer.buf
        end = buffer.len
        PyBuffer_Release(&buffer)
    cdef uint64_t key
    cdef int field
    model = version = request_id = ""
    cdef list tensors = []
    cdef list raws = []
    cdef list outputs = None
    try:
        while pos < end:
            pos = _varint(p, pos, end, &key)
            if pos < 0 or key >> 32:
                return None
            pos = _skip_field(p, pos, end, key & 7, &start, &length)
            if pos < 0 or (key & 7) != 2:
                return None
            field = <int>(key >> 3)
            if field == RAW_INPUT:
                raws.append((start, length))
            elif field == 5:
                tensor = _input(p, start, start + length)
                if tensor is None:
                    return None
                tensors.append(tensor)
            elif field == 6:
                name = _output(p, start, start + length)
                if name is None:
                    return None
                if outputs is None:
                    outputs = []
                outputs.append(name)
            elif field == 1:
                model = _text(p, start, length)
            elif field == 2:
                version = _text(p, start, length)
            elif field == 3:
                request_id = _text(p, start, length)
            else:  # parameters, or a field this does not know
                return None
    except UnicodeDecodeError:
        return None
    cdef Py_ssize_t n = len(tensors), i
    if n == 0 or len(raws) != n:
        return None
    cdef dict inputs = {}
    cdef Py_ssize_t count, itemsize
    for i in range(n):
        name, datatype, shape = tensors[i]
        dtype = _DTYPES.get(datatype)
        if dtype is None or name in inputs:
            return None
        start, length = raws[i]
        itemsize = dtype.itemsize
        count = 1
        for dim in shape:
            if dim > length:  # also keeps the product from overflowing
                count = -1
                break
            count *= <Py_ssize_t>dim
            if count > length:
                break
        if count * itemsize != length:
            return None
        inputs[name] = _view(data, <const char *>p + start, dtype, shape)
    return model, version, request_id, inputs, outputs


# -- writing -------------------------------------------------------------------------------

cdef struct Out:  # a growing buffer
    char *data
    Py_ssize_t size, capacity


cdef int _reserve(Out *out, Py_ssize_t more) except -1:
    cdef Py_ssize_t want = out.size + more
    cdef char *grown
    if want > out.capacity:
        want = max(want, 2 * out.capacity, 256)
        grown = <char *>realloc(out.data, want)
        if grown == NULL:
            raise MemoryError()
        out.data = grown
        out.capacity = want
    return 0


cdef inline int _put_varint(Out *out, uint64_t value) except -1:
    _reserve(out, 10)
    while value > 0x7F:
        out.data[out.size] = <char>((value & 0x7F) | 0x80)
        out.size += 1
        value >>= 7
    out.data[out.size] = <char>value
    out.size += 1
    return 0


cdef inline int _varint_size(uint64_t value) noexcept:
    cdef int n = 1
    while value > 0x7F:
        value >>= 7
        n += 1
    return n


cdef int _put_field(Out *out, int tag, const char *data, Py_ssize_t length) except -1:
    """A length-delimited field (omitted when empty, as proto3 does)."""
    if length == 0:
        return 0
    _put_varint(out, tag)
    _put_varint(out, length)
    _reserve(out, length)
    memcpy(out.data + out.size, data, length)
    out.size += length
    return 0


cdef int _put_text(Out *out, int tag, str text) except -1:
    cdef bytes raw = text.encode()
    return _put_field(out, tag, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))


def write_infer_reply(str model, str version, str request_id, dict outputs):
    """The serialized ModelInferResponse with ``outputs`` (name -> numpy array) in
    ``raw_output_contents``: bytes, or a list of buffers whose concatenation it is when a
    tensor of 16 KiB or more is sent as a view of its array (not copied). ``None`` when an
    output is not C-contiguous or has a datatype this does not write (BYTES, BF16, a
    non-native byte order): protobuf writes that reply.
    """
    cdef Out out
    out.data = NULL
    out.size = out.capacity = 0
    cdef list views = []   # (array, its buffer) of every output, in order
    cdef Py_buffer view
    cdef bytes name_raw, datatype_raw
    cdef Py_ssize_t tensor_size, shape_size, i
    cdef list parts = None
    cdef tuple shape
    try:
        _put_text(&out, 0x0A, model)
        _put_text(&out, 0x12, version)
        _put_text(&out, 0x1A, request_id)
        for name, array in outputs.items():
            datatype_raw = _NAMES.get(getattr(array, "dtype", None))
            if datatype_raw is None:
                return None
            try:
                PyObject_GetBuffer(array, &view, PyBUF_C_CONTIGUOUS)
            except (BufferError, ValueError):  # numpy: "ndarray is not C-contiguous"
                return None
            views.append((array, view.len))
            PyBuffer_Release(&view)
            name_raw = (<str>name).encode()
            shape = array.shape
            shape_size = 0
            for dim in shape:
                shape_size += _varint_size(<uint64_t><int64_t>dim)
            tensor_size = 0
            if PyBytes_GET_SIZE(name_raw):
                tensor_size += 1 + _varint_size(PyBytes_GET_SIZE(name_raw)) + PyBytes_GET_SIZE(name_raw)
            tensor_size += 1 + _varint_size(PyBytes_GET_SIZE(datatype_raw)) + PyBytes_GET_SIZE(datatype_raw)
            if shape_size:
                tensor_size += 1 + _varint_size(shape_size) + shape_size
            _put_varint(&out, 0x2A)  # outputs: field 5
            _put_varint(&out, tensor_size)
            _put_field(&out, 0x0A, PyBytes_AS_STRING(name_raw), PyBytes_GET_SIZE(name_raw))
            _put_field(&out, 0x12, PyBytes_AS_STRING(datatype_raw), PyBytes_GET_SIZE(datatype_raw))
            if shape_size:
                _put_varint(&out, 0x1A)
                _put_varint(&out, shape_size)
                for dim in shape:
                    _put_varint(&out, <uint64_t><int64_t>dim)
        for i in range(len(views)):
            array, size = views[i]
            _put_varint(&out, RAW_OUTPUT_TAG)
            _put_varint(&out, size)
            if size < VIEW_FROM:
                PyObject_GetBuffer(array, &view, PyBUF_C_CONTIGUOUS)
                try:
                    _reserve(&out, view.len)
                    memcpy(out.data + out.size, view.buf, view.len)
                    out.size += view.len
                finally:
                    PyBuffer_Release(&view)
            else:
                if parts is None:
                    parts = []
                parts.append(PyBytes_FromStringAndSize(out.data, out.size))
                parts.append(memoryview(array).cast("B"))
                out.size = 0
        head = PyBytes_FromStringAndSize(out.data, out.size)
    finally:
        free(out.data)
    if parts is None:
        return head
    if PyBytes_GET_SIZE(head):
        parts.append(head)
    return parts
