# MSIP codec declarations, for Cython projects that embed the codec.
from libc.stdint cimport uint64_t
from mip.protocol._stream cimport Chunk, StreamParser


cdef class Frame:
    cdef readonly int frame_type
    cdef readonly int msg_kind
    cdef readonly int flags
    cdef readonly uint64_t msg_id
    cdef readonly Py_ssize_t payload_len
    cdef object _owner
    cdef Py_ssize_t _offset
    cdef object _payload


cdef class FrameParser(StreamParser):
    cdef uint64_t max_payload
