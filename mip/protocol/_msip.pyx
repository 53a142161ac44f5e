# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""MSIP codec: 24-octet-header frames of the Micro-Service Interface Protocol."""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_CheckExact
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memcmp, memcpy
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from mip.protocol.wire cimport *
from mip.protocol._stream cimport Chunk, StreamParser, raise_wire_error

import time

from mip import errors as _errors

HEADER_SIZE = MSIP_HEADER_SIZE
MAGIC = b"MSIP"
VERSION = MSIP_VERSION
#: Default bound of one frame's payload for streaming parsers, in octets.
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024

cdef bytes _EMPTY = b""
cdef object _EMPTY_VIEW = memoryview(b"")
cdef Py_ssize_t MAX_U32 = 0xFFFFFFFF


cdef class Frame:
    """One decoded MSIP frame.

    ``frame_type``, ``msg_kind``, ``flags`` and ``msg_id`` are ints (compare
    them with ``FrameType``, ``MsgKind`` and ``Flags``); ``payload`` is a
    read-only memoryview of the received octets, made on first access.
    """

    def __init__(self, int frame_type, int msg_kind, payload=b"", uint64_t msg_id=0, int flags=0):
        self.frame_type = frame_type
        self.msg_kind = msg_kind
        self.flags = flags
        self.msg_id = msg_id
        self._payload = memoryview(payload).toreadonly().cast("B")
        self.payload_len = len(self._payload)
        self._owner = None

    @property
    def payload(self):
        if self._payload is None:
            if self.payload_len == 0:
                self._payload = _EMPTY_VIEW
            else:
                self._payload = memoryview(self._owner).toreadonly()[
                    self._offset:self._offset + self.payload_len]
        return self._payload

    def encode(self):
        """The frame's octets."""
        return encode(self.frame_type, self.msg_kind, self.payload, self.msg_id, self.flags)

    def __eq__(self, other):
        if not isinstance(other, Frame):
            return NotImplemented
        cdef Frame o = <Frame>other
        return (self.frame_type == o.frame_type and self.msg_kind == o.msg_kind
                and self.flags == o.flags and self.msg_id == o.msg_id
                and self.payload == o.payload)

    __hash__ = None

    def __repr__(self):
        return (f"Frame(frame_type={self.frame_type}, msg_kind={self.msg_kind}, "
                f"flags={self.flags}, msg_id={self.msg_id}, payload=<{self.payload_len} octets>)")


cdef str _header_problem(int rc, const unsigned char *p, msip_header *h, uint64_t limit):
    if rc == MIP_E_MAGIC:
        return f"MSIP magic is {bytes(p[:4])!r}, expected b'MSIP'"
    if rc == MIP_E_VERSION:
        return f"unsupported MSIP version {h.version}"
    if rc == MIP_E_FRAME_TYPE:
        return f"unknown MSIP frame type {h.frame_type}"
    if rc == MIP_E_MSG_KIND:
        return f"unknown MSIP msg_kind {h.msg_kind}"
    if rc == MIP_E_TOO_LARGE:
        return f"payload of {h.payload_len} octets exceeds max_payload={limit}"
    return "bad MSIP header"


cdef inline Frame _new_frame(msip_header *h, object owner, Py_ssize_t offset):
    cdef Frame f = Frame.__new__(Frame)
    f.frame_type = h.frame_type
    f.msg_kind = h.msg_kind
    f.flags = h.flags
    f.msg_id = h.msg_id
    f.payload_len = h.payload_len
    f._owner = owner
    f._offset = offset
    f._payload = None
    return f


cdef inline int _check_header_fields(int frame_type, int msg_kind, int flags) except -1:
    # The encoder never writes a header its own decoder would refuse.
    if not 1 <= frame_type <= MSIP_FRAME_TYPE_MAX:
        raise ValueError(f"frame_type {frame_type} is not an MSIP frame type (1..10)")
    if not 1 <= msg_kind <= MSIP_MSG_KIND_MAX:
        raise ValueError(f"msg_kind {msg_kind} is not an MSIP message kind (1..5)")
    if not 0 <= flags <= 0xFF:
        raise ValueError(f"flags {flags} do not fit in one octet")
    return 0


def encode(int frame_type, int msg_kind, payload=_EMPTY, uint64_t msg_id=0, int flags=0):
    """Encode one frame: 24-octet header + `payload` (any bytes-like), as ``bytes``."""
    cdef Py_buffer view
    cdef const unsigned char *src
    cdef Py_ssize_t n
    cdef bint release = False
    _check_header_fields(frame_type, msg_kind, flags)
    if PyBytes_CheckExact(payload):
        src = <const unsigned char *>PyBytes_AS_STRING(payload)
        n = PyBytes_GET_SIZE(payload)
    else:
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        src = <const unsigned char *>view.buf
        n = view.len
        release = True
    try:
        if n > MAX_U32:
            raise ValueError(f"payload of {n} octets exceeds the 4 GiB - 1 limit of MSIP")
        res = PyBytes_FromStringAndSize(NULL, MSIP_HEADER_SIZE + n)
        msip_write_header(<unsigned char *>PyBytes_AS_STRING(res), <uint8_t>flags,
                          <uint16_t>frame_type, <uint16_t>msg_kind, <uint32_t>n, msg_id)
        if n:
            memcpy(<unsigned char *>PyBytes_AS_STRING(res) + MSIP_HEADER_SIZE, src, n)
    finally:
        if release:
            PyBuffer_Release(&view)
    return res


def encode_header(int frame_type, int msg_kind, Py_ssize_t payload_len, uint64_t msg_id=0,
                  int flags=0):
    """Encode only the 24-octet header, for sending the payload from its own memory."""
    _check_header_fields(frame_type, msg_kind, flags)
    if not 0 <= payload_len <= MAX_U32:
        raise ValueError("payload_len must be in 0..2**32-1")
    res = PyBytes_FromStringAndSize(NULL, MSIP_HEADER_SIZE)
    msip_write_header(<unsigned char *>PyBytes_AS_STRING(res), <uint8_t>flags,
                      <uint16_t>frame_type, <uint16_t>msg_kind, <uint32_t>payload_len, msg_id)
    return res


def decode(buffer, max_payload=None):
    """Decode exactly one frame from any bytes-like object.

    Raises ``BadMagic``, ``UnsupportedVersion``, ``UnknownFrameType``,
    ``UnknownMessageKind``, ``FrameTooLarge`` (payload over `max_payload`
    octets), ``TruncatedFrame`` or ``InconsistentCounts`` (trailing octets).
    """
    cdef Py_buffer view
    cdef const unsigned char *p
    cdef Py_ssize_t n
    cdef msip_header h
    cdef size_t err_off = 0
    cdef uint64_t limit = <uint64_t>-1 if max_payload is None else <uint64_t>max_payload
    cdef int rc
    if PyBytes_CheckExact(buffer):
        p = <const unsigned char *>PyBytes_AS_STRING(buffer)
        n = PyBytes_GET_SIZE(buffer)
    else:
        PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
        p = <const unsigned char *>view.buf
        n = view.len
        PyBuffer_Release(&view)
    rc = msip_parse_header(p, n, limit, &h, &err_off)
    if rc == MIP_NEED_MORE:
        raise_wire_error(MIP_E_TRUNCATED, 0, f"{n} octets cannot hold the 24-octet MSIP header")
    if rc != MIP_OK:
        raise_wire_error(rc, err_off, _header_problem(rc, p, &h, limit))
    if <uint64_t>h.payload_len + MSIP_HEADER_SIZE > <uint64_t>n:
        raise_wire_error(MIP_E_TRUNCATED, 12, f"header declares {h.payload_len} payload octets, "
                                              f"{n - MSIP_HEADER_SIZE} present")
    if <uint64_t>h.payload_len + MSIP_HEADER_SIZE < <uint64_t>n:
        raise_wire_error(MIP_E_COUNTS, MSIP_HEADER_SIZE + h.payload_len,
                         f"{n - MSIP_HEADER_SIZE - h.payload_len} octets follow the frame")
    return _new_frame(&h, buffer, MSIP_HEADER_SIZE)


def decode_header(buffer, max_payload=None):
    """Validate a 24-octet header: return (frame_type, msg_kind, flags, msg_id, payload_len)."""
    cdef Py_buffer view
    cdef msip_header h
    cdef size_t err_off = 0
    cdef uint64_t limit = <uint64_t>-1 if max_payload is None else <uint64_t>max_payload
    cdef int rc
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        rc = msip_parse_header(<const unsigned char *>view.buf, view.len, limit, &h, &err_off)
        if rc == MIP_NEED_MORE:
            raise_wire_error(MIP_E_TRUNCATED, 0, f"{view.len} octets cannot hold the 24-octet MSIP header")
        if rc != MIP_OK:
            raise_wire_error(rc, err_off, _header_problem(rc, <const unsigned char *>view.buf, &h, limit))
    finally:
        PyBuffer_Release(&view)
    return (h.frame_type, h.msg_kind, h.flags, h.msg_id, h.payload_len)


cdef class FrameParser(StreamParser):
    """Streaming MSIP parser: octets in, complete ``Frame`` objects out.

    Same shape as ``mip.FrameParser``: ``feed(data)``, or ``get_buffer()`` /
    ``buffer_updated(n)`` for ``asyncio.BufferedProtocol``.  A header
    declaring more than `max_payload` octets raises ``FrameTooLarge`` before
    anything is reserved for it; after an error the parser stays broken.
    """

    def __init__(self, Py_ssize_t max_payload=DEFAULT_MAX_PAYLOAD, Py_ssize_t chunk_size=65536):
        if max_payload < 0:
            raise ValueError("max_payload must be >= 0")
        self.set_sizes(chunk_size, min(max_payload, MAX_U32) + MSIP_HEADER_SIZE)
        self.max_payload = max_payload

    @property
    def max_payload_size(self):
        return self.max_payload

    cdef Py_ssize_t frame_length(self, const unsigned char *p, Py_ssize_t avail) except -2:
        cdef msip_header h
        cdef size_t err_off = 0
        cdef int rc = msip_parse_header(p, avail, self.max_payload, &h, &err_off)
        if rc == MIP_NEED_MORE:
            return -1
        if rc != MIP_OK:
            raise_wire_error(rc, err_off, _header_problem(rc, p, &h, self.max_payload))
        return <Py_ssize_t>h.payload_len + MSIP_HEADER_SIZE

    cdef object decode_frame(self, Chunk chunk, Py_ssize_t offset, Py_ssize_t length):
        cdef msip_header h
        cdef size_t err_off = 0
        msip_parse_header(chunk.mem + offset, length, self.max_payload, &h, &err_off)
        return _new_frame(&h, chunk, offset + MSIP_HEADER_SIZE)


# ---- payload helpers -------------------------------------------------------
def encode_publish_payload(str topic, data=b""):
    """A PUBLISH payload: u16 topic length, the topic in UTF-8, then `data`."""
    t = topic.encode("utf-8")
    if len(t) > 0xFFFF:
        raise ValueError("a topic is at most 65535 UTF-8 octets")
    return len(t).to_bytes(2, "big") + t + bytes(data)


def decode_publish_payload(payload):
    """Split a PUBLISH/EVENT payload into (topic, data memoryview).

    Raises ``TruncatedFrame`` when the topic runs past the payload and
    ``InvalidValue`` when it is not UTF-8.
    """
    cdef Py_buffer view
    cdef Py_ssize_t tlen
    mv = memoryview(payload).toreadonly().cast("B")
    if len(mv) < 2:
        raise_wire_error(MIP_E_TRUNCATED, MSIP_HEADER_SIZE, "PUBLISH payload has no topic length")
    tlen = (mv[0] << 8) | mv[1]
    if tlen > len(mv) - 2:
        raise_wire_error(MIP_E_TRUNCATED, MSIP_HEADER_SIZE,
                         f"topic of {tlen} octets runs past the {len(mv)}-octet payload")
    try:
        topic = bytes(mv[2:2 + tlen]).decode("utf-8")
    except UnicodeDecodeError:
        raise_wire_error(MIP_E_VALUE, MSIP_HEADER_SIZE + 2, "topic is not valid UTF-8")
    return topic, mv[2 + tlen:]


def encode_hello_payload(client_id=None, token=None):
    """A HELLO payload: the 8-octet big-endian client id to resume (0 asks for a new
    session when a token follows), then the optional token."""
    if client_id is None and token is None:
        return b""
    cid = 0 if client_id is None else int(client_id)
    if not 0 <= cid < 2 ** 64:
        raise ValueError("a client id is a u64")
    return cid.to_bytes(8, "big") + (bytes(token) if token is not None else b"")


def decode_hello_payload(payload):
    """Split a HELLO payload into (client_id or None, token or None).

    A payload shorter than 8 octets asks for a new session (as the reference
    broker reads it); a client id of 0 also means "new session".
    """
    mv = memoryview(payload).cast("B")
    if len(mv) < 8:
        return None, None
    cid = int.from_bytes(mv[:8], "big")
    token = bytes(mv[8:]) if len(mv) > 8 else None
    return (cid or None), token


# ---- the broker's hot path (mip.net.msip_core, mip.net.msip_broker) --------
# Each connection's outgoing queue is a deque of (item, size, is_event) entries, ``item``
# being bytes or a (header, payload) tuple. These functions do, without the interpreter's
# per-message work, what the core does for the frames most connections send: PING and the
# PUBLISH of a topic whose route is known and has only connected, writable, at-most-once
# subscribers. Everything else goes to the core's Python code. ``BrokerProtocol`` is the
# broker's per-read work around them: receive memory, then the frames, then the writes.

cdef class PeerState:
    """The fields of one broker connection (``mip.net.msip_core.Peer`` adds the methods),
    kept as C fields for the functions below."""

    cdef public object core
    cdef public FrameParser parser
    cdef public object session
    cdef public object host
    cdef public bint authenticated
    cdef public bint closing
    cdef public object close_mode
    cdef public object close_reason
    cdef public bint paused
    cdef public object urgent
    cdef public object queue
    cdef public Py_ssize_t qbytes
    cdef public Py_ssize_t dropped
    cdef public double last_rx
    cdef public bint pinged
    cdef public Py_ssize_t rx_total
    cdef public Py_ssize_t consumed
    cdef public object partial_since
    cdef public bint reading_paused
    cdef public object handle


cdef class CoreState:
    """The fields of the broker's core that the functions below read (``BrokerCore`` of
    ``mip.net.msip_core`` adds the rest, and the methods)."""

    cdef public dict dirty
    cdef public list closing
    cdef public dict _broutes
    cdef public Py_ssize_t max_topic_length
    cdef public object backplane
    cdef public object stats


cdef enum:
    _PUBLISH = 4
    _EVENT = 5
    _ACK = 6
    _PING = 8
    _PONG = 9
    _K_EVENT = 1
    _K_STATE = 3
    _F_COMPRESSED = 2
    _INLINE_MAX = 16 * 1024  # as msip_core: larger events are sent from the received octets
    _BURST = 256 * 1024  # octets handed to one write at most

cdef bytes _ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
cdef str _ABORT = "abort"  # msip_core.ABORT: a close_mode


cdef inline bytes _header(int frame_type, int msg_kind, uint32_t n, uint64_t msg_id, int flags):
    res = PyBytes_FromStringAndSize(NULL, MSIP_HEADER_SIZE)
    msip_write_header(<unsigned char *>PyBytes_AS_STRING(res), <uint8_t>flags,
                      <uint16_t>frame_type, <uint16_t>msg_kind, n, msg_id)
    return <bytes>res


cdef inline void _reply(dict dirty, PeerState peer, bytes data) except *:
    # Peer.send: a control frame after what is queued
    peer.queue.append((data, MSIP_HEADER_SIZE, False))
    if peer.paused:
        peer.qbytes += MSIP_HEADER_SIZE
    dirty[peer] = None


cdef class _Batch:
    """What ``_dispatch_frames`` reads of the core once per batch of frames, and the counts
    it adds to the core's statistics at its end."""
    cdef dict dirty
    cdef dict routes
    cdef Py_ssize_t max_topic_length
    cdef bint alone  # no backplane: a local publish is delivered here only
    cdef Py_ssize_t published
    cdef Py_ssize_t delivered


cdef bint _fast_publish(_Batch b, PeerState peer, Frame f) except -1:
    """Route a PUBLISH whose topic has a cached route with only fast subscribers; False
    when the core's Python code must handle it."""
    cdef Py_ssize_t n = f.payload_len, tlen, size
    cdef const unsigned char *p
    cdef int compressed = 0
    cdef unsigned char *out
    cdef list route
    cdef dict dirty = b.dirty
    if n < 2 or n > _INLINE_MAX or type(f._owner) is not Chunk or not b.alone:
        return False
    p = (<Chunk>f._owner).mem + f._offset
    tlen = (p[0] << 8) | p[1]
    if n < 2 + tlen or tlen > b.max_topic_length:
        return False
    found = b.routes.get(PyBytes_FromStringAndSize(<const char *>p + 2, tlen))
    if found is None:
        return False  # not known yet
    route = <list>found  # [appends, their peers, whether there are other subscribers, memo]
    if route[2]:
        return False  # subscribers that are not plain fast ones
    appends = <tuple>route[0]
    b.published += 1
    if appends:
        if f.flags & _F_COMPRESSED and n >= 6 + tlen and memcmp(p + 2 + tlen,
                                                                PyBytes_AS_STRING(_ZSTD_MAGIC), 4) == 0:
            compressed = _F_COMPRESSED
        size = MSIP_HEADER_SIZE + n
        item = PyBytes_FromStringAndSize(NULL, size)
        out = <unsigned char *>PyBytes_AS_STRING(item)
        msip_write_header(out, <uint8_t>compressed, _EVENT, _K_EVENT, <uint32_t>n, f.msg_id)
        memcpy(out + MSIP_HEADER_SIZE, p, n)
        entry = (item, size, True)  # one entry shared by every queue
        for append in appends:
            append(entry)
        b.delivered += len(appends)
        # Peers leave ``dirty`` only when it is replaced by a new dict (written out) or when
        # they close (and routes are forgotten): merged into this dict once is enough.
        if route[3] is not dirty:
            dirty.update(<dict>route[1])
            route[3] = dirty
    # after the events it produced, as on the reference
    _reply(dirty, peer, _header(_ACK, _K_STATE, 0, f.msg_id, 0))
    return True


cdef int _dispatch_frames(CoreState core, PeerState peer, list frames, double now) except -1:
    """Handle ``frames`` received on ``peer`` as ``BrokerCore._dispatch`` does, frame by
    frame (counting each in ``peer.consumed``, stopping once the peer is closing)."""
    cdef Frame f
    cdef int ft
    cdef _Batch b = _Batch.__new__(_Batch)
    b.dirty = core.dirty
    dispatch = None
    try:
        for frame in frames:
            f = <Frame?>frame
            peer.consumed += MSIP_HEADER_SIZE + f.payload_len
            if peer.closing:
                break
            ft = f.frame_type
            if ft == _PING:
                _reply(b.dirty, peer, _header(_PONG, _K_EVENT, 0, f.msg_id, 0))
                continue
            if ft == _PUBLISH and peer.authenticated:
                if b.routes is None:  # the first PUBLISH of the batch
                    b.routes = core._broutes
                    b.max_topic_length = core.max_topic_length
                    b.alone = core.backplane is None
                if _fast_publish(b, peer, f):
                    continue
            if dispatch is None:
                dispatch = core._dispatch
            dispatch(peer, f, now)
            b.dirty = core.dirty
    finally:
        if b.published:
            stats = core.stats
            stats.published += b.published
            stats.delivered += b.delivered
    return 0


cdef bytes _ping_batch(FrameParser parser, Py_ssize_t nbytes, Py_ssize_t *consumed):
    """``parser.take(nbytes)`` when what it holds, with the ``nbytes`` received, is PING frames
    only (each whole, its header valid): the PONGs that answer them, the octets taken in
    ``consumed``. None, having changed nothing, for anything else (the frames go through
    ``take`` then)."""
    cdef Chunk c = parser.chunk
    cdef msip_header h
    cdef size_t err_off = 0
    cdef Py_ssize_t at, end, n = 0, i
    cdef unsigned char *out
    if parser.error is not None or c is None or nbytes <= 0 or nbytes > c.size - parser.end:
        return None
    end = parser.end + nbytes
    at = parser.start
    while at < end:
        if (msip_parse_header(c.mem + at, end - at, parser.max_payload, &h, &err_off) != MIP_OK
                or h.frame_type != _PING or <uint64_t>h.payload_len > <uint64_t>(end - at - MSIP_HEADER_SIZE)):
            return None
        at += MSIP_HEADER_SIZE + <Py_ssize_t>h.payload_len
        n += 1
    pongs = PyBytes_FromStringAndSize(NULL, n * MSIP_HEADER_SIZE)
    out = <unsigned char *>PyBytes_AS_STRING(pongs)
    at = parser.start
    for i in range(n):
        msip_parse_header(c.mem + at, end - at, parser.max_payload, &h, &err_off)
        msip_write_header(out + i * MSIP_HEADER_SIZE, 0, _PONG, _K_EVENT, 0, h.msg_id)
        at += MSIP_HEADER_SIZE + <Py_ssize_t>h.payload_len
    consumed[0] = end - parser.start
    parser.start = parser.end = end
    parser.want = 0
    parser._settle(nbytes, nbytes == parser.offered)
    return <bytes>pongs


cdef int _received(CoreState core, PeerState peer, Py_ssize_t nbytes, data, double now,
                   write) except -1:
    """``receive``; with ``write`` (the ``write`` of the peer's transport, which accepts writes
    when ``peer.paused`` is false) a read of PINGs only is answered at once (``_ping_batch``)."""
    cdef FrameParser parser = peer.parser
    cdef Py_ssize_t consumed_before, consumed, taken = 0
    cdef list frames
    peer.last_rx = now
    peer.pinged = False
    peer.rx_total += nbytes
    consumed_before = peer.consumed
    try:
        pongs = None
        if (write is not None and data is None and not peer.closing and not peer.paused
                and not peer.urgent and not peer.queue):
            # nothing is queued: PONGs written now overtake no EVENT
            pongs = _ping_batch(parser, nbytes, &taken)
        if pongs is not None:
            peer.consumed += taken
            write(pongs)
        else:
            frames = parser.take(nbytes) if data is None else parser.feed(data)
            if frames:
                _dispatch_frames(core, peer, frames, now)
                if not peer.closing and parser.error is not None:
                    # an error found after complete frames, which the parser keeps for its
                    # next call: answered now, after those frames
                    raise parser.error
    except _errors.FrameTooLarge as exc:
        core.fail(peer, f"frame too large: {exc}")
    except _errors.ProtocolError as exc:
        core.fail(peer, f"malformed frame: {exc}")
    consumed = peer.consumed
    if peer.rx_total > consumed:
        # a frame has started arriving: it must be complete within read_timeout
        if consumed != consumed_before or peer.partial_since is None:
            peer.partial_since = now
    elif peer.partial_since is not None:
        peer.partial_since = None
    return 0


def receive(CoreState core, PeerState peer, Py_ssize_t nbytes, data, double now):
    """``BrokerCore._received``: ``nbytes`` octets arrived for ``peer`` (``data``: a copy to
    feed, or None when they were written into ``peer.parser.get_buffer()``)."""
    _received(core, peer, nbytes, data, now, None)


cdef int _write_queued(PeerState peer, transport) except -1:
    """Write ``peer``'s queued frames (urgent first) to ``transport`` in writes of about
    ``_BURST`` octets while it accepts them (``peer.paused`` false)."""
    cdef list chunks
    cdef object urgent = peer.urgent, queue = peer.queue
    cdef object item
    while not peer.paused and (urgent or queue):
        if not urgent and len(queue) == 1:  # one frame (a reply, or one event)
            item = (<tuple>queue.popleft())[0]
            if PyBytes_CheckExact(item):
                transport.write(item)
            else:
                transport.writelines(item)
            continue
        chunks = <list>(_take(urgent, queue, _BURST)[0])
        if len(chunks) == 1:
            transport.write(chunks[0])
        else:
            transport.writelines(chunks)
    return 0


def write_out(CoreState core):
    """Write the frames ``core`` queued (``core.dirty``) and close the connections it ended
    (``core.closing``), each peer's connection being its ``handle`` (a ``BrokerProtocol``)."""
    _write_out(core)


cdef int _write_out(CoreState core) except -1:
    cdef PeerState peer
    cdef BrokerProtocol conn
    cdef list closing
    cdef dict dirty
    while True:
        closing = core.closing
        if closing:
            core.closing = []
            for p in closing:
                peer = <PeerState?>p
                conn = <BrokerProtocol?>peer.handle
                t = conn._transport
                if t is None:
                    continue
                core.dirty.pop(peer, None)
                if peer.close_mode == _ABORT:
                    t.abort()
                else:  # what is queued (the ERROR last) leaves first, ignoring backpressure
                    peer.paused = False
                    conn.flush()
                    t.close()
        dirty = core.dirty
        if dirty:
            core.dirty = {}
            for p in dirty:
                peer = <PeerState?>p
                conn = <BrokerProtocol?>peer.handle
                if peer.reading_paused:
                    conn.flush()  # (which reads it again once its queue drained)
                elif conn._transport is not None:
                    _write_queued(peer, conn._transport)
        elif not core.closing:
            return 0


cdef extern from *:
    """
    #include <time.h>
    /* time.monotonic() without the call: on Linux, Python reads the same clock */
    static double mip_monotonic(void) {
    #if defined(__linux__)
        struct timespec ts;
        if (clock_gettime(CLOCK_MONOTONIC, &ts) == 0)
            return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    #endif
        return -1.0;
    }
    """
    double mip_monotonic()

cdef object _time_monotonic = time.monotonic


cdef inline double _monotonic() except? -1.0:
    """``time.monotonic()``, in seconds."""
    cdef double now = mip_monotonic()
    return now if now >= 0 else _time_monotonic()


cdef class BrokerProtocol:
    """What a broker connection (``mip.net.msip_broker``'s ``asyncio.BufferedProtocol``) does
    on every read, compiled: hand the parser's memory to the transport, handle the frames
    received, write out what the core queued. ``state`` is the core's ``Peer`` of the
    connection (its ``handle`` is this object), ``transport`` None once the connection is lost;
    ``whole_chunk``: the transport takes any writable buffer (a plain socket: ``get_buffer``
    may hand out the parser's chunk itself rather than a view of it)."""

    cdef public object broker
    cdef public CoreState core
    cdef public PeerState state
    cdef public FrameParser parser
    cdef object _transport
    cdef object _write  # _transport.write, looked up once
    cdef public object peer
    cdef public object host
    cdef public bint whole_chunk

    @property
    def transport(self):
        return self._transport

    @transport.setter
    def transport(self, t):
        self._transport = t
        self._write = None if t is None else t.write

    def get_buffer(self, Py_ssize_t sizehint):
        cdef FrameParser parser = self.parser
        parser.reserve()
        if parser.end == 0 and self.whole_chunk:
            return parser.chunk  # (one object less than a view of it, on most reads)
        return memoryview(parser.chunk)[parser.end:]

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef PeerState p = self.state
        cdef CoreState core = self.core
        if not p.closing:
            _received(core, p, nbytes, None, _monotonic(), self._write)
        _write_out(core)
        if p.paused and self._transport is not None and p.backed_up():
            # The client does not read its replies: read no more of its requests until
            # it does.
            p.reading_paused = True
            self._transport.pause_reading()

    def flush(self):
        """Write queued frames (urgent first) in bursts while the transport accepts them."""
        cdef PeerState p = self.state
        t = self._transport
        if t is None:
            return
        _write_queued(p, t)  # (one write per burst; not counted in qbytes: writable)
        if p.reading_paused and not p.paused and not p.closing:
            p.reading_paused = False
            if p.partial_since is not None:
                p.partial_since = _monotonic()  # the wait was the broker's own
            t.resume_reading()


def take_queued(first, second, Py_ssize_t limit):
    """Take entries from the front of the deques ``first`` then ``second`` while fewer than
    ``limit`` octets are taken: (chunks, octets), consecutive bytes items joined into one."""
    return _take(first, second, limit)


cdef tuple _take(first, second, Py_ssize_t limit):
    cdef list chunks = []
    cdef list run = []
    cdef Py_ssize_t n = 0, run_len = 0, k, size
    for q in (first, second):
        if n >= limit or not q:
            continue
        k = 0
        for entry in q:
            if n >= limit:
                break
            item = (<tuple>entry)[0]
            size = (<tuple>entry)[1]
            n += size
            k += 1
            if PyBytes_CheckExact(item):
                run.append(item)
                run_len += PyBytes_GET_SIZE(item)
            else:
                if run:
                    chunks.append(_joined(run, run_len))
                    run = []
                    run_len = 0
                chunks.extend(<tuple>item)
        if k == len(q):
            q.clear()
        else:
            popleft = q.popleft
            for _ in range(k):
                popleft()
    if run:
        chunks.append(_joined(run, run_len))
    return chunks, n


cdef bytes _joined(list parts, Py_ssize_t total):
    cdef Py_ssize_t i, at = 0, m
    if len(parts) == 1:
        return <bytes>parts[0]
    res = PyBytes_FromStringAndSize(NULL, total)
    cdef char *out = PyBytes_AS_STRING(res)
    for i in range(len(parts)):
        m = PyBytes_GET_SIZE(parts[i])
        memcpy(out + at, PyBytes_AS_STRING(parts[i]), m)
        at += m
    return <bytes>res
