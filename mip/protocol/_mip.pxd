# MIP codec declarations, for Cython projects that embed the codec:
#     from mip.protocol._mip cimport Message, FrameParser, decode_frame_at
from libc.stdint cimport uint64_t
from mip.protocol._stream cimport Chunk, StreamParser


cdef class Message:
    cdef readonly int kind
    cdef readonly int subtype
    cdef readonly int n_input
    cdef readonly int n_output
    cdef readonly object error_code
    cdef readonly object error_message
    cdef readonly object model
    cdef readonly object version
    # The frame stays referenced: values are made from it on first access.
    cdef list _batch
    cdef object _owner
    cdef const unsigned char *_base
    cdef Py_ssize_t _length
    cdef Py_ssize_t _origin
    cdef Py_ssize_t _values_at      # offset of the first TLV in the frame
    cdef Py_ssize_t _bsize
    cdef Py_ssize_t _per_item
    cdef bint _writable


cdef class FrameParser(StreamParser):
    cdef uint64_t max_frame


# Decode the frame of exactly `length` octets at `base`; `owner` keeps that memory
# alive (it becomes the base of every tensor view) and `origin` is the frame's
# offset inside the owner's buffer.
cdef Message decode_frame_at(object owner, const unsigned char *base, Py_ssize_t length,
                             bint writable, Py_ssize_t origin)
