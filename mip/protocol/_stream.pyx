# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Receive buffers shared by the MIP and MSIP streaming parsers.

A parser owns a *chunk* of memory.  ``get_buffer()`` hands out the free tail
of the chunk so that a socket receives straight into it; complete frames are
decoded in place and the values they contain (numpy views, image views) keep
the chunk alive.  A chunk is reused only when no decoded value refers to it;
otherwise the unconsumed tail moves to a fresh chunk.  A frame that does not
fit gets a chunk of exactly its size, so large tensors land in their final
memory straight from the socket and no chunk is ever larger than the
configured maximum frame (header included).

Receive memory follows the traffic: a parser with nothing pending holds at
most a small chunk (``IDLE_SIZE`` octets, or the maximum frame when that is
smaller); while reads fill what was handed out and leave part of a frame, the
next chunk doubles, up to ``chunk_size``; once a read leaves no partial frame
behind, the parser lets a larger chunk go at once (the values decoded from it
keep it alive as long as they need it) and sizes the next read by this one (at
least twice what it brought): a busy connection keeps reading in large pieces,
a quiet one is back at the small size after one small read.

A frame's own chunk may come from elsewhere: ``frame_memory``, when set, is called with the
frame's size and returns an object exporting that much writable memory (or ``None``: the
parser allocates it as usual). ``mip serve --placement shared`` gives blocks of its shared
arena this way, so that a large request's tensors are received where the engine process
reads them.
"""

from cpython.buffer cimport (PyBuffer_FillInfo, PyObject_GetBuffer, PyBuffer_Release,
                            PyBUF_SIMPLE, PyBUF_WRITABLE)
from cpython.mem cimport PyMem_RawMalloc, PyMem_RawFree
from cpython.ref cimport PyObject
from libc.string cimport memcpy, memmove
from libc.stdint cimport uintptr_t

from mip.protocol.wire cimport *

from mip import errors as _errors

cdef extern from "Python.h":
    Py_ssize_t Py_REFCNT(object o)

# the exception of each status code of csrc/mip_wire.h (another code: ProtocolError)
cdef dict _WIRE_ERRORS = {
    MIP_E_TRUNCATED: _errors.TruncatedFrame, MIP_E_TOO_LARGE: _errors.FrameTooLarge,
    MIP_E_VERSION: _errors.UnsupportedVersion, MIP_E_KIND: _errors.UnknownKind,
    MIP_E_SUBTYPE: _errors.BadSubtype, MIP_E_COUNTS: _errors.InconsistentCounts,
    MIP_E_VALUE: _errors.InvalidValue, MIP_E_VALUE_TYPE: _errors.UnknownValueType,
    MIP_E_MAGIC: _errors.BadMagic, MIP_E_FRAME_TYPE: _errors.UnknownFrameType,
    MIP_E_MSG_KIND: _errors.UnknownMessageKind,
}

cdef enum:
    ALIGN = 64  # chunk memory alignment, in octets

#: Receive memory of a parser with no partial frame, in octets (at most the maximum frame).
IDLE_SIZE = 4096
cdef Py_ssize_t _IDLE_SIZE = IDLE_SIZE


cdef int raise_wire_error(int code, Py_ssize_t offset, str detail) except -1:
    """Map a status code of csrc/mip_wire.h to its exception: the one place it happens."""
    raise _WIRE_ERRORS.get(code, _errors.ProtocolError)(detail, offset)


cdef class Chunk:

    def __cinit__(self):
        self.raw = NULL
        self.mem = NULL
        self.size = 0
        self.exports = 0

    def __dealloc__(self):
        if self.raw != NULL:
            PyMem_RawFree(self.raw)
            self.raw = NULL

    def __len__(self):
        return self.size

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.mem, self.size, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1


cdef Chunk new_chunk(Py_ssize_t size):
    """Allocate a chunk of `size` octets whose memory starts on a 64-octet boundary."""
    cdef Chunk c = Chunk.__new__(Chunk)
    if size < 1:
        size = 1
    c.raw = PyMem_RawMalloc(<size_t>size + ALIGN)
    if c.raw == NULL:
        raise MemoryError(f"cannot allocate a receive buffer of {size} octets")
    c.mem = <unsigned char *>((<uintptr_t>c.raw + ALIGN - 1) & ~(<uintptr_t>(ALIGN - 1)))
    c.size = size
    return c


cdef Chunk borrowed_chunk(object owner, Py_ssize_t size):
    """A chunk of the first `size` octets of `owner`'s writable buffer (which it keeps), or
    ``None`` when that buffer is smaller or not 8-aligned."""
    cdef Py_buffer view
    PyObject_GetBuffer(owner, &view, PyBUF_WRITABLE)
    cdef unsigned char *mem = <unsigned char *>view.buf
    cdef Py_ssize_t length = view.len
    PyBuffer_Release(&view)  # `owner`, kept by the chunk, pins the memory
    if length < size or (<uintptr_t>mem) % 8:
        return None
    cdef Chunk c = Chunk.__new__(Chunk)
    c.mem = mem
    c.size = size
    c.owner = owner
    return c


cdef class StreamParser:
    """Base of the streaming parsers: chunk management, feed/get_buffer/buffer_updated.

    Subclasses implement ``frame_length`` (validate a header, return the total
    frame length or -1 when the header is incomplete) and ``decode_frame``.
    """

    def __cinit__(self, *args, **kwargs):
        self.chunk = None
        self.start = 0
        self.end = 0
        self.want = 0
        self.chunk_size = 65536
        self.limit = 65536
        self.cap = 65536
        self.idle_size = _IDLE_SIZE
        self.recv_size = _IDLE_SIZE
        self.offered = 0
        self.min_free = _IDLE_SIZE // 4
        self.error = None
        self.align_frames = False
        self.frame_memory = None

    cdef int set_sizes(self, Py_ssize_t chunk_size, Py_ssize_t limit) except -1:
        """Receive memory comes in chunks of at most `chunk_size` octets, and never more than
        `limit` (the largest frame, header included); a frame larger than `chunk_size` gets
        a chunk of exactly its size."""
        if chunk_size < 256:
            raise ValueError("chunk_size must be at least 256 octets")
        self.chunk_size = chunk_size
        self.limit = limit
        self.cap = min(chunk_size, limit)
        self.idle_size = min(_IDLE_SIZE, self.cap)
        self.recv_size = self.idle_size
        self.min_free = max(1, self.idle_size // 4)
        return 0

    cdef void _grow(self):
        """A read filled what it was given: more is queued, offer more next time."""
        self.recv_size = min(2 * self.recv_size, self.cap)

    cdef void _settle(self, Py_ssize_t nbytes, bint filled):
        """After the frames of a read (of `nbytes`; `filled`: all that was handed out) were
        taken. With nothing partial left, a chunk larger than the idle size is let go now
        (the values decoded from it keep it alive as long as they need it; the transport
        asks for memory again only when the next octets arrive), and the next read is
        sized by this one: at least twice what it brought, from the idle size up to
        ``cap``, so a busy connection keeps reading in large pieces and a quiet one is back
        at the idle size after one small read. A read into a frame's own chunk says
        nothing of the traffic (the next read gets the idle size). A read that filled its
        buffer and left part of a frame means more is queued (grow)."""
        cdef Py_ssize_t size
        if self.end == self.start:
            if self.chunk is not None and self.chunk.size > self.idle_size:
                if self.chunk.size > self.recv_size:
                    nbytes = 0  # a frame's own chunk
                self.chunk = None
                self.start = self.end = 0
            size = self.idle_size
            while size < 2 * nbytes and size < self.cap:
                size *= 2
            self.recv_size = min(size, self.cap)
        elif filled:
            self._grow()

    cdef Py_ssize_t frame_length(self, const unsigned char *p, Py_ssize_t avail) except -2:
        raise NotImplementedError

    cdef object decode_frame(self, Chunk chunk, Py_ssize_t offset, Py_ssize_t length):
        raise NotImplementedError

    cdef int ensure_space(self) except -1:
        """Make room after `end` for the next receive, keeping [start, end)."""
        cdef Py_ssize_t pending = self.end - self.start
        cdef Py_ssize_t need, shift
        cdef Chunk c = self.chunk
        cdef bint reusable
        if c is None:
            self.chunk = (self.frame_chunk(self.want) if self.want > self.recv_size
                          else new_chunk(self.recv_size))
            self.start = self.end = 0
            return 0
        # Only the parser refers to the chunk: its memory can be rewritten.
        reusable = Py_REFCNT(c) == 2 and c.exports == 0  # self.chunk + local `c`
        if pending == 0:
            if c.size > self.recv_size or (reusable and c.size < self.recv_size):
                # Nothing pending and the chunk is not the size wanted now (a large frame's
                # own, or the end of a burst): the parser lets it go.
                c = None
                self.chunk = new_chunk(self.recv_size)
                self.start = self.end = 0
                return 0
            if reusable:
                self.start = self.end = 0
            elif self.start % 8:
                # Next frame starts on an 8-octet boundary: tensors stay aligned.
                self.start = self.end = self.start + (8 - self.start % 8)
                if self.start > c.size:
                    self.start = self.end = c.size
        elif self.start % 8 and self.end + (8 - self.start % 8) <= c.size:
            # Only a partial frame is pending (complete ones were consumed):
            # slide it to an 8-octet boundary before the rest arrives, so its
            # tensors are aligned.  The octets before `start` are not touched.
            shift = 8 - self.start % 8
            memmove(c.mem + self.start + shift, c.mem + self.start, pending)
            self.start += shift
            self.end += shift
        need = self.want if self.want > pending else min(pending + self.min_free, self.limit)
        if self.start + need <= c.size and c.size - self.end >= min(self.min_free, need - pending):
            return 0
        if reusable and need <= c.size and c.size >= self.recv_size:
            # (a chunk smaller than the receive size the traffic asks for is replaced below)
            if self.start:
                memmove(c.mem, c.mem + self.start, pending)
            self.start = 0
            self.end = pending
            return 0
        cdef Chunk fresh
        if self.want > self.recv_size:
            # a frame larger than the receive size gets memory of exactly its size
            fresh = self.frame_chunk(self.want)
        else:
            fresh = new_chunk(min(max(self.recv_size, need), self.limit))
        if pending:
            memcpy(fresh.mem, c.mem + self.start, pending)
        self.chunk = fresh
        self.start = 0
        self.end = pending
        return 0

    cdef Chunk frame_chunk(self, Py_ssize_t size):
        """The chunk of a frame of `size` octets alone: from ``frame_memory`` when it gives
        one, else allocated."""
        cdef Chunk c = None
        if self.frame_memory is not None:
            owner = self.frame_memory(size)
            if owner is not None:
                c = borrowed_chunk(owner, size)
        return new_chunk(size) if c is None else c

    cdef list parse(self):
        cdef list out = []
        cdef Py_ssize_t n
        cdef Chunk c, fresh
        while True:
            c = self.chunk
            if c is None:
                break
            try:
                n = self.frame_length(c.mem + self.start, self.end - self.start)
            except BaseException as exc:
                self.error = exc
                if out:
                    return out
                raise
            if n < 0 or n > self.end - self.start:
                self.want = n if n > 0 else 0
                break
            try:
                if self.align_frames and self.start % 8:
                    # Several frames arrived in one read and this one starts off an
                    # 8-octet boundary: give it aligned memory of its own, so its
                    # tensors are aligned views.
                    fresh = new_chunk(n)
                    memcpy(fresh.mem, c.mem + self.start, n)
                    msg = self.decode_frame(fresh, 0, n)
                else:
                    msg = self.decode_frame(c, self.start, n)
            except BaseException as exc:
                self.error = exc
                if out:
                    return out
                raise
            self.start += n
            self.want = 0
            out.append(msg)
        return out

    cdef int reserve(self) except -1:
        """``get_buffer`` without its memoryview: the next receive goes to ``chunk`` from ``end``."""
        if self.error is not None:
            raise self.error
        self.ensure_space()
        self.offered = self.chunk.size - self.end
        return 0

    cdef list take(self, Py_ssize_t nbytes):
        """``buffer_updated``, for compiled callers."""
        if self.error is not None:
            raise self.error
        if self.chunk is None or nbytes < 0 or nbytes > self.chunk.size - self.end:
            raise ValueError(f"buffer_updated({nbytes}) does not match the buffer handed out")
        self.end += nbytes
        out = self.parse()
        self._settle(nbytes, nbytes == self.offered)
        return out

    def get_buffer(self, Py_ssize_t sizehint=-1):
        """Return writable memory for the next receive (``asyncio.BufferedProtocol``)."""
        self.reserve()
        return memoryview(self.chunk)[self.end:]

    def buffer_updated(self, Py_ssize_t nbytes):
        """Account for `nbytes` written into the last ``get_buffer()``; return complete frames."""
        return self.take(nbytes)

    def feed(self, data):
        """Append received octets (any bytes-like object); return the complete frames."""
        cdef Py_buffer view
        cdef Py_ssize_t pos = 0, n, room
        cdef list out = None, more
        if self.error is not None:
            raise self.error
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            while True:
                self.ensure_space()
                room = self.chunk.size - self.end
                n = min(view.len - pos, room)
                if n:
                    memcpy(self.chunk.mem + self.end, <unsigned char *>view.buf + pos, n)
                    pos += n
                    self.end += n
                try:
                    more = self.parse()
                except BaseException:
                    if out:  # frames of earlier rounds first; the error comes on the next call
                        return out
                    raise
                if out is None:
                    out = more
                else:
                    out.extend(more)
                if pos >= view.len or self.error is not None:
                    self._settle(n, n == room)
                    break
                self._grow()
        finally:
            PyBuffer_Release(&view)
        return out

    @property
    def buffered(self):
        """Octets received but not yet part of a complete frame."""
        return self.end - self.start

    @property
    def buffer_size(self):
        """Octets of receive memory the parser holds (0 before the first receive); never more
        than the largest frame allowed, header included."""
        return 0 if self.chunk is None else self.chunk.size
