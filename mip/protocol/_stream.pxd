# Receive buffers shared by the MIP and MSIP streaming parsers.

cdef class Chunk:
    """A fixed-size, 64-octet-aligned block of receive memory.

    Frames decoded from a chunk keep it alive (numpy views name it as their
    base); the parser reuses a chunk only when it holds the sole reference.
    """
    cdef void *raw
    cdef unsigned char *mem
    cdef Py_ssize_t size
    cdef Py_ssize_t exports
    cdef object owner            # the object whose memory this is (raw is then NULL)


cdef class StreamParser:
    cdef Chunk chunk
    cdef Py_ssize_t start        # first octet not yet consumed
    cdef Py_ssize_t end          # one past the last octet received
    cdef Py_ssize_t want         # total length of the frame at `start`, 0 if unknown
    cdef Py_ssize_t chunk_size   # largest receive buffer for several frames (the setting)
    cdef Py_ssize_t limit        # largest frame, header included: no chunk is larger
    cdef Py_ssize_t cap          # min(chunk_size, limit): largest chunk shared by frames
    cdef Py_ssize_t idle_size    # what a parser with nothing pending holds
    cdef Py_ssize_t recv_size    # current receive size, idle_size..cap: grows while reads fill it
    cdef Py_ssize_t offered      # octets handed out by the last get_buffer()
    cdef Py_ssize_t min_free
    cdef object error            # the error to raise on the next call, once broken
    cdef bint align_frames       # decode every frame from 8-aligned memory
    cdef public object frame_memory  # size -> writable buffer for a frame's own chunk, or None

    cdef Chunk frame_chunk(self, Py_ssize_t size)

    cdef int set_sizes(self, Py_ssize_t chunk_size, Py_ssize_t limit) except -1
    cdef Py_ssize_t frame_length(self, const unsigned char *p, Py_ssize_t avail) except -2
    cdef object decode_frame(self, Chunk chunk, Py_ssize_t offset, Py_ssize_t length)
    cdef int ensure_space(self) except -1
    cdef void _grow(self)
    cdef void _settle(self, Py_ssize_t nbytes, bint filled)
    cdef list parse(self)
    cdef int reserve(self) except -1
    cdef list take(self, Py_ssize_t nbytes)


cdef int raise_wire_error(int code, Py_ssize_t offset, str detail) except -1
cdef Chunk new_chunk(Py_ssize_t size)
