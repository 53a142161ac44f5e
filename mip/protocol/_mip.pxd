# MIP codec declarations, for Cython projects that embed the codec:
#     from mip.protocol._mip cimport Message, FrameParser, decode_frame_at
from libc.stdint cimport uint64_t
from mip.protocol._stream cimport Chunk, StreamParser


cdef class Message:
    cdef readonly int kind
    cdef readonly int subtype
    cdef readonly int n_input
    cdef readonly int n_output
    cdef readonly list batch
    cdef readonly object error_code
    cdef readonly object model
    cdef readonly object version


cdef class FrameParser(StreamParser):
    cdef uint64_t max_frame


# Decode the frame of exactly `length` octets at `base`; `owner` keeps that memory
# alive (it becomes the base of every tensor view) and `origin` is the frame's
# offset inside the owner's buffer.
cdef Message decode_frame_at(object owner, const unsigned char *base, Py_ssize_t length,
                             bint writable, Py_ssize_t origin)
