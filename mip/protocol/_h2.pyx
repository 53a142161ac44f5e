# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""gRPC over HTTP/2, sans-I/O: octets in, calls and messages out.

:class:`GrpcConnection` is one HTTP/2 connection, server or client side, on libnghttp2
(HPACK, flow control, SETTINGS, PING and stream states are nghttp2's). It adds gRPC's
framing: every DATA stream is split into length-prefixed messages, each checked against
the configured maximum *before* its memory is taken, and each landing in one ``bytes``
object of exactly its size (one copy from the receive buffer), or, on a server given
``message_memory``, a large uncompressed one in memory that callable gives (a
``memoryview`` of it: the shared arena of ``mip serve --placement shared``, where the
engine process reads the tensors the socket's octets were copied into). Outgoing messages are
not copied: large ones leave as memoryviews of the caller's buffer behind the frame
headers (nghttp2's NO_COPY mode).

The transport calls :meth:`GrpcConnection.receive` with what the socket read and gets a
list of events back, each an :class:`Event` naming its call (:class:`RequestReceived`,
:class:`MessageReceived`, :class:`StreamEnded`, :class:`StreamClosed`,
:class:`MessageTooLarge`; on the client side also :class:`ResponseReceived` and
:class:`TrailersReceived`); whatever the connection wants to send is collected by
:meth:`GrpcConnection.data_to_send` as a list of buffers for ``writelines``.

A server told which paths are unary (``unary_paths``) gives a plain unary call (a POST of
``application/grpc`` without ``grpc-timeout``, one uncompressed message) as one
:class:`UnaryReceived` event once its request has ended, instead of three; any other call
on those paths gets the events above. A unary reply (:meth:`GrpcConnection.unary`) sends
its headers and trailers from constants: its HEADERS, DATA and trailers leave in the same
buffer as the other replies of that flush.
"""

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize,
                            PyBytes_GET_SIZE)
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.stdint cimport uint8_t, int32_t, uint32_t, int64_t, uint64_t, UINT64_MAX
from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.string cimport memcmp, memcpy
from libc.stdlib cimport malloc, free, realloc
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from mip.protocol._nghttp2 cimport *

import binascii

from mip.errors import H2Error

#: what :meth:`GrpcConnection.receive` raises for a peer that broke one of the
#: connection's limits (a GOAWAY ENHANCE_YOUR_CALM with this debug data is queued)
TOO_MANY_PINGS = "too_many_pings"
TOO_MANY_RESETS = "too_many_resets"
TOO_MANY_SETTINGS = "too_many_settings"
HEADER_LIST_TOO_LARGE = "header_list_too_large"

cdef enum:
    SETTINGS_BURST = 100   # SETTINGS frames taken at once ...
    SETTINGS_RATE = 10     # ... and per second after that
    HARD_HEADER_FACTOR = 4  # a header list this many times over the limit ends the connection
    MAX_OUTBOUND_ACK = 1000  # SETTINGS / PING ACKs queued before nghttp2 ends the connection
    PREFIX = 5             # a gRPC message's prefix: compressed flag, u32 length
    VIEW_BELOW = 16384     # outgoing payload pieces shorter than this are copied into one write
    SMALL_MIN = 4096       # the first size of the buffer they are copied into ...
    SMALL_KEEP = 262144    # ... and the largest kept from one flush to the next

cdef bytes _POST = b"POST"

# A unary reply's headers and its OK trailers, as nghttp2 takes them (not copied by it: the
# bytes live as long as the module).
cdef bytes _STATUS, _200, _CONTENT_TYPE, _GRPC, _ACCEPT, _ENCODINGS, _GRPC_STATUS, _ZERO
_STATUS, _200, _CONTENT_TYPE, _GRPC = b":status", b"200", b"content-type", b"application/grpc"
_ACCEPT, _ENCODINGS = b"grpc-accept-encoding", b"identity,deflate,gzip"
_GRPC_STATUS, _ZERO = b"grpc-status", b"0"
cdef nghttp2_nv _REPLY_HEADERS[3]
cdef nghttp2_nv _OK_TRAILERS[1]
#: Call.trailers of a call that ends OK with no trailing metadata
cdef list _OK = [(_GRPC_STATUS, _ZERO)]


cdef void _constant(nghttp2_nv *nv, bytes name, bytes value) noexcept:
    nv.name = <uint8_t *>PyBytes_AS_STRING(name)
    nv.namelen = PyBytes_GET_SIZE(name)
    nv.value = <uint8_t *>PyBytes_AS_STRING(value)
    nv.valuelen = PyBytes_GET_SIZE(value)
    nv.flags = NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE


_constant(&_REPLY_HEADERS[0], _STATUS, _200)
_constant(&_REPLY_HEADERS[1], _CONTENT_TYPE, _GRPC)
_constant(&_REPLY_HEADERS[2], _ACCEPT, _ENCODINGS)
_constant(&_OK_TRAILERS[0], _GRPC_STATUS, _ZERO)

# Request headers kept out of Call.metadata: HTTP/2 and gRPC's own.
cdef frozenset _TRANSPORT_HEADERS = frozenset([
    b"content-type", b"te", b"user-agent", b"grpc-timeout", b"grpc-encoding",
    b"grpc-accept-encoding", b"grpc-message-type", b"accept-encoding", b"content-length"])


cdef class Call:
    """One gRPC call: one HTTP/2 stream.

    Attributes:
        stream_id: the HTTP/2 stream.
        method: ``:method`` (server side).
        path: ``:path``, e.g. ``/inference.GRPCInferenceService/ModelInfer`` (server side).
        content_type: the request's ``content-type`` (server side).
        timeout: seconds from ``grpc-timeout``, or ``None``.
        encoding: ``grpc-encoding`` of incoming messages (``None``: identity).
        metadata: other headers, ``[(name, value)]`` as ``str``.
        http_status: the response's ``:status`` (client side).
        grpc_status / grpc_message: from the trailers (client side; ``None`` until then).
        tag / data: any objects the application attaches.
    """

    cdef readonly int32_t stream_id
    cdef public object method, path, content_type, timeout, encoding, metadata
    cdef public object http_status, grpc_status, grpc_message, tag, data
    # incoming message assembly
    cdef uint8_t prefix[PREFIX]
    cdef int prefix_have
    cdef object message         # bytes, or a memoryview of message_memory's
    cdef uint8_t *message_at    # its first octet
    cdef Py_ssize_t message_len, message_have
    cdef int compressed
    cdef bint discard           # a message was over the limit: drop the rest of the stream
    # outgoing
    cdef list out               # buffers still to send, each a bytes-like
    cdef Py_ssize_t out_offset  # into out[0]
    cdef Py_ssize_t pending     # length of the DATA frame prepared for NO_COPY
    cdef object trailers        # list of (bytes, bytes) to send once out is empty, or None
    cdef bint headers_sent, ended, deferred
    cdef bint live              # in its connection's calls: its stream is open
    cdef Py_ssize_t buffered    # incoming octets held for this call
    cdef Py_ssize_t header_octets  # of the request's header list, as HTTP/2 counts them
    cdef Py_ssize_t out_octets  # queued in out, not yet handed to the socket
    cdef Py_ssize_t unconsumed  # DATA octets received but not yet given back to the window
    cdef bint oversize          # the request's header list went over the limit
    cdef bint unary             # a plain unary call: its events wait for the request's end
    cdef object held            # ... and its one message, until then

    def __cinit__(self, int32_t stream_id):
        self.stream_id = stream_id
        self.out = []
        self.metadata = []

    @property
    def finished(self) -> bool:
        """The application has ended the call (trailers submitted or reset)."""
        return self.ended

    @property
    def incomplete(self) -> bool:
        """Part of an incoming message has arrived and not the rest (at the stream's end:
        the peer ended it inside a message)."""
        return self.prefix_have > 0 and not self.discard

    def __repr__(self):
        return f"Call(stream_id={self.stream_id}, path={self.path!r})"


# -- events: what receive() found, one object a thing the peer did to one call -------------

cdef class Event:
    """Something the peer did to one call.

    Attributes:
        call: the :class:`Call`.
    """

    cdef readonly Call call

    def __repr__(self):
        return f"{type(self).__name__}({self.call!r})"


@cython.final
cdef class RequestReceived(Event):
    """Server: a call's request headers arrived (its path, method, metadata are on the call)."""


@cython.final
cdef class MessageReceived(Event):
    """One whole gRPC message.

    Attributes:
        data: the message, exactly its size (``bytes``, or a ``memoryview`` of octets
            ``message_memory`` gave).
        compressed: its prefix's compressed flag (the call's ``encoding`` says how).
    """

    cdef readonly object data
    cdef readonly bint compressed

    def __repr__(self):
        return f"MessageReceived({self.call!r}, {len(self.data)} octets)"


@cython.final
cdef class UnaryReceived(Event):
    """Server: the whole request of a plain unary call (on a path of ``unary_paths``, a
    POST of ``application/grpc`` without ``grpc-timeout``, one uncompressed message, the
    client's side ended): stands for its RequestReceived, MessageReceived and StreamEnded.

    Attributes:
        data: the message, exactly its size (``bytes``, or a ``memoryview`` of octets
            ``message_memory`` gave).
    """

    cdef readonly object data

    def __repr__(self):
        return f"UnaryReceived({self.call!r}, {len(self.data)} octets)"


@cython.final
cdef class StreamEnded(Event):
    """The peer ended its side of the call (END_STREAM)."""


@cython.final
cdef class StreamClosed(Event):
    """The stream is gone.

    Attributes:
        error_code: its HTTP/2 error code (0: it ended normally).
    """

    cdef readonly uint32_t error_code

    def __repr__(self):
        return f"StreamClosed({self.call!r}, error_code={self.error_code})"


@cython.final
cdef class MessageTooLarge(Event):
    """A message announced more octets than may be taken; the rest of its stream is
    dropped.

    Attributes:
        length: the octets it announced.
        over_buffered: it is within ``max_message_size``, but would take the connection's
            held octets over ``max_buffered``.
    """

    cdef readonly Py_ssize_t length
    cdef readonly bint over_buffered

    def __repr__(self):
        return (f"MessageTooLarge({self.call!r}, length={self.length}, "
                f"over_buffered={self.over_buffered})")


@cython.final
cdef class ResponseReceived(Event):
    """Client: the response headers arrived (``call.http_status`` is set)."""


@cython.final
cdef class TrailersReceived(Event):
    """Client: the trailers, or a trailers-only response, arrived (``call.grpc_status``)."""


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef struct Bucket:  # a token bucket: burst tokens, refilled at rate per second
    double tokens, burst, rate, stamp


cdef inline bint _take(Bucket *b, double now) noexcept nogil:
    """Take one token; False when none is left."""
    if b.rate <= 0:
        return True
    b.tokens = min(b.burst, b.tokens + (now - b.stamp) * b.rate)
    b.stamp = now
    if b.tokens < 1:
        return False
    b.tokens -= 1
    return True


cdef inline void _fill(Bucket *b, double burst, double rate) noexcept nogil:
    b.tokens = burst
    b.burst = burst
    b.rate = rate
    b.stamp = _now()


cdef inline int _check(int rv) except -1:
    if rv < 0:
        raise H2Error(nghttp2_strerror(rv).decode())
    return 0


cdef inline bint _is(const uint8_t *octets, size_t n, bytes text) noexcept:
    """Whether the ``n`` octets at ``octets`` are ``text``."""
    return (n == <size_t>PyBytes_GET_SIZE(text)
            and memcmp(octets, PyBytes_AS_STRING(text), n) == 0)


cdef inline str _latin1(const uint8_t *octets, size_t n):
    return PyUnicode_DecodeLatin1(<const char *>octets, n, NULL)


cdef object _parse_timeout(const uint8_t *value, size_t n):
    """``grpc-timeout``: up to 8 digits and a unit (H M S m u n), in seconds; None if bad."""
    if n < 2 or n > 9:
        return None
    cdef int64_t amount = 0
    cdef size_t i
    for i in range(n - 1):
        if value[i] < 48 or value[i] > 57:
            return None
        amount = amount * 10 + (value[i] - 48)
    cdef uint8_t unit = value[n - 1]
    if unit == 72:   # H
        return amount * 3600.0
    if unit == 77:   # M
        return amount * 60.0
    if unit == 83:   # S
        return <double>amount
    if unit == 109:  # m
        return amount / 1e3
    if unit == 117:  # u
        return amount / 1e6
    if unit == 110:  # n
        return amount / 1e9
    return None


cdef class GrpcConnection:
    """One HTTP/2 connection carrying gRPC calls.

    Args:
        client: ``True`` for the client side (the connection preface is sent first).
        max_message_size: largest incoming message, in octets; a longer one gives an
            :class:`MessageTooLarge` event and the rest of its stream is dropped.
        max_concurrent_streams: SETTINGS_MAX_CONCURRENT_STREAMS announced to the peer;
            nghttp2 refuses streams over it (REFUSED_STREAM), from the first one.
        window_size: the receive window per stream and for the connection, in octets.
        max_header_list_size: SETTINGS_MAX_HEADER_LIST_SIZE announced to the peer, and
            enforced on what arrives: a request whose header list (name + value + 32 per
            field) is over it is answered RESOURCE_EXHAUSTED without reaching the
            application; one over four times it ends the connection (GOAWAY
            ENHANCE_YOUR_CALM ``header_list_too_large``).
        header_table_size: the HPACK dynamic table, in octets, for each direction
            (SETTINGS_HEADER_TABLE_SIZE).
        max_buffered: incoming octets held in unfinished messages on this connection at
            once; a message that would go over it is treated as too large (its
            :class:`MessageTooLarge` event has ``over_buffered`` set).
        max_pending_out: server: reply octets queued on this connection and not yet
            written; over it, received DATA is not given back to the peer's flow-control
            window until the replies drain, so a peer that does not read its replies
            stops being able to send requests.
        min_ping_interval / max_ping_strikes: server: a PING sooner than
            ``min_ping_interval`` seconds after the previous one, with no HEADERS or DATA
            sent in between, is a strike (with no call open the interval is two hours);
            more than ``max_ping_strikes`` strikes end the connection with GOAWAY
            ENHANCE_YOUR_CALM ``too_many_pings`` (grpc-core's policy; 0 strikes: no limit).
        reset_burst / reset_rate: streams the peer may reset (RST_STREAM) at once and per
            second after that; more end the connection with GOAWAY ENHANCE_YOUR_CALM
            ``too_many_resets`` (0 rate: no limit). nghttp2's own limiter of resets, where
            the library has one, is set never to trigger: this one decides.
        scheme: client: ``:scheme`` of requests (``b"https"`` over TLS).
        unary_paths: server: the ``:path`` of every unary method; their plain calls come
            as one :class:`UnaryReceived` event each.
        message_memory: server: where an uncompressed message of at least
            ``message_memory_min`` octets is received, once its length prefix has come and
            passed the limits above (which count it as they count any other):
            ``message_memory(size)`` gives an object exporting ``size`` writable octets, or
            ``None`` (then, as without it, a ``bytes`` object of that size). The message's
            event carries a ``memoryview`` of the object (kept alive by it).
    """

    cdef nghttp2_session *session
    cdef readonly bint client
    cdef readonly Py_ssize_t max_message_size, max_buffered, buffered
    cdef readonly Py_ssize_t max_pending_out, pending_out, max_header_list_size
    cdef readonly bint handshaken   # the peer's preface and first SETTINGS arrived
    cdef readonly uint64_t streams_started
    cdef readonly bint ping_pending  # a PING of ours waits for its ACK
    cdef readonly int shutdown_state  # 0, 1: shutdown notice sent, 2: final GOAWAY sent
    cdef bint manual_window, window_held
    cdef double min_ping_interval, last_ping_recv
    cdef int max_ping_strikes, ping_strikes
    cdef Bucket resets, settings
    cdef bytes scheme
    cdef frozenset unary_paths
    cdef bytes last_path_raw    # the last :path received, and it as str
    cdef str last_path
    cdef dict calls
    cdef Call recent            # the call _live found last (most callbacks are for it again)
    cdef list events
    cdef list out
    cdef char *small            # frames copied for the next buffer of out: small_len
    cdef Py_ssize_t small_len, small_cap  # octets of small_cap (kept from flush to flush)
    cdef object error  # an exception raised inside a callback, re-raised after it
    cdef readonly object message_memory
    cdef readonly Py_ssize_t message_memory_min

    def __cinit__(self):
        self.session = NULL
        self.small = NULL

    def __init__(self, *, bint client=False, Py_ssize_t max_message_size=4 << 20,
                 uint32_t max_concurrent_streams=1024, int32_t window_size=(1 << 24),
                 uint32_t max_header_list_size=16384, uint32_t header_table_size=4096,
                 Py_ssize_t max_buffered=0, Py_ssize_t max_pending_out=0,
                 double min_ping_interval=300.0, int max_ping_strikes=2,
                 double reset_burst=1000, double reset_rate=33, bytes scheme=b"http",
                 unary_paths=(), message_memory=None, Py_ssize_t message_memory_min=65536):
        if max_message_size < 0:
            raise ValueError("max_message_size must not be negative")
        self.client = client
        self.max_message_size = max_message_size
        self.max_buffered = max_buffered if max_buffered > 0 else max(4 * max_message_size, 256 << 20)
        self.max_pending_out = max_pending_out if max_pending_out > 0 else PY_SSIZE_T_MAX
        self.max_header_list_size = max_header_list_size
        self.manual_window = not client and max_pending_out > 0
        self.buffered = 0
        self.min_ping_interval = min_ping_interval
        self.max_ping_strikes = max_ping_strikes
        self.last_ping_recv = -1e300
        _fill(&self.resets, reset_burst, reset_rate)
        _fill(&self.settings, SETTINGS_BURST, SETTINGS_RATE)
        self.scheme = scheme
        self.unary_paths = frozenset(unary_paths)
        self.message_memory = None if client else message_memory
        self.message_memory_min = message_memory_min
        self.last_path_raw = b""
        self.last_path = ""
        self.calls = {}
        self.events = []
        self.out = []
        cdef nghttp2_session_callbacks *cb
        cdef nghttp2_option *opt
        _check(nghttp2_session_callbacks_new(&cb))
        nghttp2_session_callbacks_set_on_begin_headers_callback(cb, _on_begin_headers)
        nghttp2_session_callbacks_set_on_header_callback(cb, _on_header)
        nghttp2_session_callbacks_set_on_frame_recv_callback(cb, _on_frame_recv)
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, _on_data_chunk)
        nghttp2_session_callbacks_set_on_stream_close_callback(cb, _on_stream_close)
        nghttp2_session_callbacks_set_send_data_callback(cb, _send_data)
        if not client:
            nghttp2_session_callbacks_set_on_frame_send_callback(cb, _on_frame_send)
        _check(nghttp2_option_new(&opt))
        nghttp2_option_set_max_send_header_block_length(opt, 1 << 20)
        nghttp2_option_set_max_deflate_dynamic_table_size(opt, header_table_size)
        nghttp2_option_set_max_outbound_ack(opt, MAX_OUTBOUND_ACK)
        nghttp2_option_set_max_settings(opt, 32)
        if self.manual_window:
            nghttp2_option_set_no_auto_window_update(opt, 1)
        if not client:
            # one limiter of streams reset by the peer decides, reset_burst / reset_rate
            # (GOAWAY ENHANCE_YOUR_CALM too_many_resets): nghttp2's own, where the library
            # has one, is set so that it never triggers
            mip_h2_set_stream_reset_rate_limit(opt, UINT64_MAX, UINT64_MAX)
        cdef int rv
        if client:
            rv = nghttp2_session_client_new2(&self.session, cb, <void *>self, opt)
        else:
            rv = nghttp2_session_server_new2(&self.session, cb, <void *>self, opt)
        nghttp2_session_callbacks_del(cb)
        nghttp2_option_del(opt)
        _check(rv)
        cdef nghttp2_settings_entry iv[5]
        iv[0].settings_id = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
        iv[0].value = max_concurrent_streams
        iv[1].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
        iv[1].value = <uint32_t>window_size
        iv[2].settings_id = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE
        iv[2].value = max_header_list_size
        iv[3].settings_id = NGHTTP2_SETTINGS_ENABLE_PUSH
        iv[3].value = 0
        iv[4].settings_id = NGHTTP2_SETTINGS_HEADER_TABLE_SIZE
        iv[4].value = header_table_size
        _check(nghttp2_submit_settings(self.session, NGHTTP2_FLAG_NONE, iv, 5))
        _check(nghttp2_session_set_local_window_size(self.session, NGHTTP2_FLAG_NONE, 0,
                                                     window_size))

    def __dealloc__(self):
        if self.session != NULL:
            nghttp2_session_del(self.session)
            self.session = NULL
        free(self.small)
        self.small = NULL

    # -- input -------------------------------------------------------------------------

    def receive(self, data) -> list:
        """Feed octets read from the peer; returns the events they completed.

        Raises:
            H2Error: the peer broke the protocol; send :meth:`data_to_send` (a GOAWAY)
                and close the connection.
        """
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        cdef mip_h2_ssize rv
        try:
            rv = mip_h2_mem_recv(self.session, <const uint8_t *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        events = self.events
        self.events = []
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        if rv < 0:
            reason = nghttp2_strerror(<int>rv).decode()
            # nghttp2 stops without a GOAWAY on its fatal errors: say why before closing
            try:
                self.goaway(NGHTTP2_ENHANCE_YOUR_CALM if rv == NGHTTP2_ERR_FLOODED
                            or "CONTINUATION" in reason else NGHTTP2_PROTOCOL_ERROR,
                            reason.encode())
            except H2Error:
                pass
            raise H2Error(reason)
        return events

    # -- output ------------------------------------------------------------------------

    def data_to_send(self) -> list:
        """Everything the connection has to send now, as a list of buffers (maybe empty)."""
        cdef const uint8_t *data
        cdef mip_h2_ssize n
        while True:
            n = mip_h2_mem_send(self.session, &data)
            if n < 0:
                raise H2Error(nghttp2_strerror(<int>n).decode())
            if n == 0:
                if self.window_held and self.pending_out <= self.max_pending_out // 2:
                    self._release_window()  # WINDOW_UPDATEs to send
                    continue
                break
            self._add(<const char *>data, n)
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        if self.small_len:
            self._take_small()
        out = self.out
        self.out = []
        return out

    @property
    def want_read(self) -> bool:
        return nghttp2_session_want_read(self.session) != 0

    @property
    def want_write(self) -> bool:
        return nghttp2_session_want_write(self.session) != 0

    @property
    def open_calls(self) -> int:
        return len(self.calls)

    def live_calls(self) -> list:
        """The calls whose streams are open."""
        return list(self.calls.values())

    @property
    def reading_held(self) -> bool:
        """Received DATA is kept from the peer's window: too many reply octets wait."""
        return self.window_held

    def let_go(self) -> None:
        """The transport is gone: the parts of messages being received are let go now
        (their memory may be ``message_memory``'s), not when this object is."""
        cdef Call call
        for call in self.calls.values():
            call.message = None
            call.held = None
            call.prefix_have = 0
            self.buffered -= call.buffered
            call.buffered = 0

    cdef void _release_window(self) except *:
        """Give the DATA held back (see ``max_pending_out``) to the peer's window."""
        cdef Call call
        self.window_held = False
        for call in self.calls.values():
            if call.unconsumed:
                _check(nghttp2_session_consume(self.session, call.stream_id, call.unconsumed))
                call.unconsumed = 0

    cdef int _add(self, const char *data, Py_ssize_t n) except -1:
        """Copy ``n`` octets onto the end of ``small`` (grown by doubling: one buffer
        from flush to flush, not a reallocation a frame)."""
        cdef Py_ssize_t need = self.small_len + n
        cdef Py_ssize_t cap = self.small_cap
        cdef char *grown
        if need > cap:
            cap = max(cap * 2, need, SMALL_MIN)
            grown = <char *>realloc(self.small, cap)
            if grown == NULL:
                raise MemoryError()
            self.small, self.small_cap = grown, cap
        memcpy(self.small + self.small_len, data, n)
        self.small_len = need
        return 0

    cdef int _take_small(self) except -1:
        """What ``small`` holds, as one bytes object onto the end of ``out``; a buffer
        grown past ``SMALL_KEEP`` octets is let go."""
        self.out.append(PyBytes_FromStringAndSize(self.small, self.small_len))
        self.small_len = 0
        if self.small_cap > SMALL_KEEP:
            free(self.small)
            self.small, self.small_cap = NULL, 0
        return 0

    cdef Call _live(self, int32_t stream_id):
        cdef Call call = self.recent
        if call is not None and call.stream_id == stream_id:
            return call
        call = self.calls.get(stream_id)
        if call is not None:
            self.recent = call
        return call

    cdef void _register(self, Call call) except *:
        self.calls[call.stream_id] = call
        call.live = True
        self.recent = call

    cdef int kept(self, object error) noexcept:
        """Keep ``error``, raised inside an nghttp2 callback, for receive() or
        data_to_send() to raise; nghttp2 is told the callback failed."""
        self.error = error
        return NGHTTP2_ERR_CALLBACK_FAILURE

    cdef int _emit(self, Event event, Call call) except -1:
        event.call = call
        self.events.append(event)
        return 0

    cdef int _ended(self, Call call) except -1:
        """The peer ended its side of ``call``."""
        cdef UnaryReceived whole
        if call.unary:
            if call.held is not None and call.prefix_have == 0:
                call.unary = False
                whole = UnaryReceived.__new__(UnaryReceived)
                whole.data = call.held
                call.held = None
                return self._emit(whole, call)
            self._unfold(call)
        return self._emit(StreamEnded.__new__(StreamEnded), call)

    cdef int _unfold(self, Call call) except -1:
        """A call held as plain unary is not one: the events it has had so far."""
        cdef MessageReceived message
        call.unary = False
        self._emit(RequestReceived.__new__(RequestReceived), call)
        if call.held is not None:
            message = MessageReceived.__new__(MessageReceived)
            message.data = call.held
            call.held = None
            self._emit(message, call)
        return 0

    cdef void _queue(self, Call call, object message) except *:
        """A gRPC message (prefix + payload) onto ``call``'s outgoing buffers; ``message``
        is a bytes-like object or a list of them (sent one after the other, not joined;
        a short bytes object is copied behind its prefix, into one)."""
        cdef Py_buffer view
        cdef Py_ssize_t n = 0, size
        cdef bytes joined
        cdef uint8_t *to
        if PyBytes_CheckExact(message) and PyBytes_GET_SIZE(message) < VIEW_BELOW:
            n = PyBytes_GET_SIZE(message)
            joined = PyBytes_FromStringAndSize(NULL, n + PREFIX)
            to = <uint8_t *>PyBytes_AS_STRING(joined)
            to[0] = 0
            to[1] = (n >> 24) & 0xFF
            to[2] = (n >> 16) & 0xFF
            to[3] = (n >> 8) & 0xFF
            to[4] = n & 0xFF
            memcpy(to + PREFIX, PyBytes_AS_STRING(message), n)
            call.out.append(joined)
            call.out_octets += n + PREFIX
            self.pending_out += n + PREFIX
            return
        cdef list octets = []  # the parts as octets: len() and slices count octets, not items
        for part in (message if isinstance(message, list) else (message,)):
            PyObject_GetBuffer(part, &view, PyBUF_SIMPLE)
            size = view.len
            PyBuffer_Release(&view)
            if size:
                octets.append(part if PyBytes_CheckExact(part) else memoryview(part).cast("B"))
            n += size
        if n > 0xFFFFFFFF:
            raise ValueError("a gRPC message is at most 4 GiB")
        cdef uint8_t prefix[PREFIX]
        prefix[0] = 0
        prefix[1] = (n >> 24) & 0xFF
        prefix[2] = (n >> 16) & 0xFF
        prefix[3] = (n >> 8) & 0xFF
        prefix[4] = n & 0xFF
        call.out.append((<char *>prefix)[:PREFIX])
        call.out.extend(octets)
        call.out_octets += n + PREFIX
        self.pending_out += n + PREFIX

    def send_message(self, Call call, message) -> None:
        """Send one message on ``call`` (the response headers go first, once)."""
        if call.ended:
            return
        self._queue(call, message)
        self._start_or_resume(call)

    def finish(self, Call call, int status, str message="", trailers=()) -> None:
        """Server: end ``call`` with ``grpc-status`` (and ``grpc-message``), after every
        message already sent; a call that sent none gets a trailers-only response."""
        if call.ended or self.client:
            return
        call.ended = True
        fields = [(b"grpc-status", str(status).encode())]
        if message:
            fields.append((b"grpc-message", _percent_encode(message)))
        for name, value in trailers:
            fields.append(_field(name, value))
        if not call.live:
            return  # the peer reset it already
        if not call.headers_sent:
            if not call.out:
                # trailers-only: one HEADERS frame with END_STREAM
                call.headers_sent = True
                _submit_response(self.session, call.stream_id,
                                 [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                  *fields], False)
                return
        call.trailers = fields
        self._start_or_resume(call)

    def refuse(self, Call call, int http_status, int status, str message) -> None:
        """Server: answer ``call`` at once with HTTP ``http_status`` and ``grpc-status``
        (a trailers-only response), as for a request that is not a gRPC call."""
        if call.ended or self.client:
            return
        call.ended = True
        call.discard = True
        if not call.live or call.headers_sent:
            return
        call.headers_sent = True
        _submit_response(self.session, call.stream_id,
                         [(b":status", str(http_status).encode()),
                          (b"content-type", b"application/grpc"),
                          (b"grpc-status", str(status).encode()),
                          (b"grpc-message", _percent_encode(message))], False)

    def unary(self, Call call, message) -> None:
        """Server: the whole reply of a unary call, status OK, in one go."""
        if call.ended or self.client:
            return
        call.ended = True
        if not call.live:
            return
        self._queue(call, message)
        call.trailers = _OK
        self._start_or_resume(call)

    cdef void _start_or_resume(self, Call call) except *:
        if not call.live:
            return
        cdef mip_h2_data_provider provider
        if not call.headers_sent:
            call.headers_sent = True
            provider.source.ptr = NULL
            provider.read_callback = _read_data
            _check(mip_h2_submit_response(self.session, call.stream_id, _REPLY_HEADERS, 3,
                                           &provider))
        else:
            self._resume(call)

    cdef void _resume(self, Call call) except *:
        """Let nghttp2 ask for ``call``'s data again after it found none (DEFERRED)."""
        if call.deferred:
            call.deferred = False
            _check(nghttp2_session_resume_data(self.session, call.stream_id))

    def reset(self, Call call, uint32_t error_code=NGHTTP2_CANCEL) -> None:
        """Abort ``call`` with RST_STREAM (the default code is CANCEL)."""
        call.ended = True
        if call.live:
            _check(nghttp2_submit_rst_stream(self.session, NGHTTP2_FLAG_NONE, call.stream_id,
                                             error_code))

    def goaway(self, uint32_t error_code=NGHTTP2_NO_ERROR, bytes debug=b"") -> None:
        """Tell the peer that no new calls will be taken (streams already open go on):
        the final GOAWAY, naming the last stream this side processed."""
        if self.shutdown_state == 2:
            return
        self.shutdown_state = 2
        _check(nghttp2_submit_goaway(self.session, NGHTTP2_FLAG_NONE,
                                     nghttp2_session_get_last_proc_stream_id(self.session),
                                     error_code, <const uint8_t *>PyBytes_AS_STRING(debug),
                                     len(debug)))

    def shutdown_notice(self) -> None:
        """Server: the first GOAWAY of a graceful shutdown (last stream 2^31-1) and a PING;
        its ACK sends the final :meth:`goaway` (call that yourself if it does not come)."""
        if self.shutdown_state or self.client:
            return
        self.shutdown_state = 1
        _check(nghttp2_submit_shutdown_notice(self.session))
        self.ping()

    def ping(self) -> None:
        """Send a PING; :attr:`ping_pending` is true until its ACK arrives."""
        _check(nghttp2_submit_ping(self.session, NGHTTP2_FLAG_NONE, NULL))
        self.ping_pending = True

    cdef int _calm(self, str reason) except -1:
        """End the connection for a misbehaving peer: GOAWAY ENHANCE_YOUR_CALM with
        ``reason`` as debug data; receive() raises H2Error(reason)."""
        self.goaway(NGHTTP2_ENHANCE_YOUR_CALM, reason.encode())
        self.error = H2Error(reason)
        return NGHTTP2_ERR_CALLBACK_FAILURE

    # -- client ------------------------------------------------------------------------

    def start_call(self, bytes path, bytes authority, message=None, metadata=(),
                   timeout=None, bint end=True) -> Call:
        """Client: open a call to ``path``; with ``message`` (and ``end``) it is sent and
        the client's side closed, as a unary call does."""
        if not self.client:
            raise RuntimeError("start_call is for the client side")
        fields = [(b":method", _POST), (b":scheme", self.scheme), (b":path", path),
                  (b":authority", authority), (b"content-type", b"application/grpc"),
                  (b"te", b"trailers")]
        if timeout is not None:
            fields.append((b"grpc-timeout", b"%dm" % max(1, int(timeout * 1000))))
        for name, value in metadata:
            fields.append(_field(name, value))
        call = Call(0)
        if message is not None:
            self._queue(call, message)
        call.trailers = [] if end else None  # empty: END_STREAM after the data
        call.headers_sent = True
        cdef int32_t stream_id = _submit_request(self.session, fields, call)
        call.stream_id = stream_id
        self._register(call)
        return call

    def end_call(self, Call call) -> None:
        """Client: close the client's side of ``call`` after what is queued."""
        if call.trailers is None:
            call.trailers = []
            self._resume(call)

    # -- callbacks (called by nghttp2 inside receive / data_to_send) ---------------------

    cdef int begin_headers(self, const nghttp2_frame *frame):
        cdef Call call
        if frame.hd.type == NGHTTP2_HEADERS and frame.headers.cat == NGHTTP2_HCAT_REQUEST:
            call = Call(frame.hd.stream_id)
            self._register(call)
            self.streams_started += 1
        return 0

    cdef int header(self, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                    const uint8_t *value, size_t valuelen):
        cdef Call call = self._live(frame.hd.stream_id)
        if call is None:
            return 0
        call.header_octets += namelen + valuelen + 32
        if call.header_octets > self.max_header_list_size:
            if call.header_octets > HARD_HEADER_FACTOR * self.max_header_list_size:
                return self._calm(HEADER_LIST_TOO_LARGE)
            call.oversize = True
        if call.oversize:
            return 0
        if not self.client:  # the headers of every call, without a bytes object for each
            if namelen and name[0] == 58:  # ':'
                if _is(name, namelen, b":path"):
                    call.path = self._path(value, valuelen)
                elif _is(name, namelen, b":method"):
                    call.method = "POST" if _is(value, valuelen, _POST) else _latin1(value, valuelen)
                return 0
            if _is(name, namelen, _CONTENT_TYPE):
                call.content_type = ("application/grpc" if _is(value, valuelen, _GRPC)
                                     else _latin1(value, valuelen))
                return 0
            if _is(name, namelen, b"te") or _is(name, namelen, b"user-agent"):
                return 0
        cdef bytes key = (<const char *>name)[:namelen]
        if namelen > 4 and key.endswith(b"-bin"):
            call.metadata.append((key.decode("latin-1"),
                                  _unbase64((<const char *>value)[:valuelen])))
            return 0
        if self.client:
            if key == b":status":
                call.http_status = int((<const char *>value)[:valuelen])
            elif key == b"grpc-status":
                try:
                    call.grpc_status = int((<const char *>value)[:valuelen])
                except ValueError:
                    call.grpc_status = 2
            elif key == b"grpc-message":
                call.grpc_message = _percent_decode((<const char *>value)[:valuelen])
            elif key[0] != 58:
                call.metadata.append((key.decode("latin-1"),
                                      (<const char *>value)[:valuelen].decode("latin-1")))
            return 0
        if namelen and name[0] == 58:  # ':'
            if key == b":path":
                call.path = (<const char *>value)[:valuelen].decode("latin-1")
            elif key == b":method":
                call.method = (<const char *>value)[:valuelen].decode("latin-1")
            return 0
        if key == b"content-type":
            call.content_type = (<const char *>value)[:valuelen].decode("latin-1")
        elif key == b"grpc-timeout":
            call.timeout = _parse_timeout(value, valuelen)
        elif key == b"grpc-encoding":
            encoding = (<const char *>value)[:valuelen].decode("latin-1")
            call.encoding = None if encoding == "identity" else encoding
        elif key not in _TRANSPORT_HEADERS:
            call.metadata.append((key.decode("latin-1"),
                                  (<const char *>value)[:valuelen].decode("latin-1")))
        return 0

    cdef str _path(self, const uint8_t *value, size_t n):
        """``:path`` as str: the previous call's object when it is the same (its hash is
        kept, for the lookups that follow)."""
        if not _is(value, n, self.last_path_raw):
            self.last_path_raw = (<const char *>value)[:n]
            self.last_path = self.last_path_raw.decode("latin-1")
        return self.last_path

    cdef int frame_recv(self, const nghttp2_frame *frame):
        cdef Call call
        cdef double now, interval
        if frame.hd.type == NGHTTP2_HEADERS:
            call = self._live(frame.hd.stream_id)
            if call is None:
                return 0
            if call.oversize and not self.client:
                if not call.ended:
                    self.refuse(call, 200, 8,  # RESOURCE_EXHAUSTED
                                f"request header list of over {call.header_octets} octets is "
                                f"over the limit of {self.max_header_list_size} octets")
                return 0
            if self.client:
                if frame.headers.cat == NGHTTP2_HCAT_RESPONSE:
                    self._emit(ResponseReceived.__new__(ResponseReceived), call)
                if frame.hd.flags & NGHTTP2_FLAG_END_STREAM:
                    self._emit(TrailersReceived.__new__(TrailersReceived), call)
                    self._emit(StreamEnded.__new__(StreamEnded), call)
            else:
                if frame.headers.cat == NGHTTP2_HCAT_REQUEST:
                    if (call.timeout is None and call.path in self.unary_paths
                            and call.method == "POST" and call.content_type == "application/grpc"):
                        call.unary = True  # its events wait for the request's end
                    else:
                        self._emit(RequestReceived.__new__(RequestReceived), call)
                if frame.hd.flags & NGHTTP2_FLAG_END_STREAM:
                    self._ended(call)
        elif frame.hd.type == NGHTTP2_DATA and frame.hd.flags & NGHTTP2_FLAG_END_STREAM:
            call = self._live(frame.hd.stream_id)
            if call is not None:
                self._ended(call)
        elif frame.hd.type == NGHTTP2_SETTINGS:
            if not frame.hd.flags & NGHTTP2_FLAG_ACK:
                self.handshaken = True
                if not _take(&self.settings, _now()):
                    return self._calm(TOO_MANY_SETTINGS)
        elif frame.hd.type == NGHTTP2_PING:
            if frame.hd.flags & NGHTTP2_FLAG_ACK:
                self.ping_pending = False
                if self.shutdown_state == 1:
                    self.goaway()
            elif not self.client and self.max_ping_strikes > 0:
                # grpc-core's ping policy: strikes are reset when HEADERS or DATA leave
                now = _now()
                interval = self.min_ping_interval if self.calls else 7200.0
                if now < self.last_ping_recv + interval:
                    self.ping_strikes += 1
                self.last_ping_recv = now
                if self.ping_strikes > self.max_ping_strikes:
                    return self._calm(TOO_MANY_PINGS)
        elif frame.hd.type == NGHTTP2_RST_STREAM:
            if not self.client and not _take(&self.resets, _now()):
                return self._calm(TOO_MANY_RESETS)
        return 0

    cdef int data_chunk(self, int32_t stream_id, const uint8_t *data, size_t length):
        cdef Call call = self._live(stream_id)
        if self.manual_window:
            if call is None or call.discard:
                _check(nghttp2_session_consume(self.session, stream_id, length))
            elif self.window_held or self.pending_out > self.max_pending_out:
                # replies are not being read: keep this DATA from the peer's window
                self.window_held = True
                call.unconsumed += length
            else:
                _check(nghttp2_session_consume(self.session, stream_id, length))
        if call is None or call.discard:
            return 0
        cdef size_t take
        cdef Py_ssize_t size
        cdef MessageReceived message
        cdef MessageTooLarge too_large
        while length:
            if call.prefix_have < PREFIX:
                take = min(<size_t>(PREFIX - call.prefix_have), length)
                memcpy(&call.prefix[call.prefix_have], data, take)
                call.prefix_have += take
                data += take
                length -= take
                if call.prefix_have < PREFIX:
                    return 0
                call.compressed = call.prefix[0] & 1
                size = ((<Py_ssize_t>call.prefix[1] << 24) | (<Py_ssize_t>call.prefix[2] << 16)
                        | (<Py_ssize_t>call.prefix[3] << 8) | call.prefix[4])
                if size > self.max_message_size or self.buffered + size > self.max_buffered:
                    if call.unary:
                        self._unfold(call)
                    call.discard = True
                    too_large = MessageTooLarge.__new__(MessageTooLarge)
                    too_large.length = size
                    too_large.over_buffered = size <= self.max_message_size
                    self._emit(too_large, call)
                    return 0
                call.message = None
                if (self.message_memory is not None and size >= self.message_memory_min
                        and not call.compressed):
                    self._memory(call, size)
                if call.message is None:
                    call.message = PyBytes_FromStringAndSize(NULL, size)
                    call.message_at = <uint8_t *>PyBytes_AS_STRING(call.message)
                call.message_len = size
                call.message_have = 0
                call.buffered = size
                self.buffered += size
            take = min(<size_t>(call.message_len - call.message_have), length)
            if take:
                memcpy(call.message_at + call.message_have, data, take)
                call.message_have += take
                data += take
                length -= take
            if call.message_have == call.message_len:
                if call.unary and (call.held is not None or call.compressed):
                    self._unfold(call)  # not a plain unary call after all
                if call.unary:
                    call.held = call.message
                else:
                    message = MessageReceived.__new__(MessageReceived)
                    message.data = call.message
                    message.compressed = call.compressed
                    self._emit(message, call)
                call.message = None
                call.prefix_have = 0
                self.buffered -= call.buffered
                call.buffered = 0
        return 0

    cdef int _memory(self, Call call, Py_ssize_t size) except -1:
        """``call``'s next message into ``size`` octets of ``message_memory``'s, when it
        gives them (else ``call.message`` stays ``None``)."""
        owner = self.message_memory(size)
        if owner is None:
            return 0
        cdef object octets = memoryview(owner).cast("B")
        cdef Py_buffer view
        PyObject_GetBuffer(octets, &view, PyBUF_WRITABLE)
        call.message_at = <uint8_t *>view.buf  # (the memoryview keeps the memory)
        PyBuffer_Release(&view)
        if view.len != size:
            raise ValueError(f"message_memory gave {view.len} octets, not {size}")
        call.message = octets
        return 0

    cdef int stream_close(self, int32_t stream_id, uint32_t error_code):
        cdef Call call = self.calls.pop(stream_id, None)
        cdef StreamClosed closed
        if call is not None:
            call.live = False
            if self.recent is call:
                self.recent = None
            self.pending_out -= call.out_octets
            call.out_octets = 0
            if call.unconsumed:
                _check(nghttp2_session_consume(self.session, stream_id, call.unconsumed))
                call.unconsumed = 0
            self.buffered -= call.buffered
            call.buffered = 0
            call.message = None
            call.held = None
            call.out = []
            closed = StreamClosed.__new__(StreamClosed)
            closed.error_code = error_code
            self._emit(closed, call)
        return 0

    cdef ssize_t read_data(self, int32_t stream_id, size_t length, uint32_t *flags):
        cdef Call call = self._live(stream_id)
        if call is None:
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
        # every octet queued and not yet sent (call.out past out_offset): the stream may
        # end in this frame only if all of it fits, not merely the pieces up to `length`
        cdef Py_ssize_t have = call.out_octets
        if have == 0:
            if call.trailers is None:
                call.deferred = True
                return NGHTTP2_ERR_DEFERRED
            flags[0] |= NGHTTP2_DATA_FLAG_EOF
            if call.trailers:
                flags[0] |= NGHTTP2_DATA_FLAG_NO_END_STREAM
                _submit_trailer(self.session, stream_id, call.trailers)
            return 0
        cdef size_t n = min(<size_t>have, length)
        flags[0] |= NGHTTP2_DATA_FLAG_NO_COPY
        call.pending = n
        if <size_t>have == n and call.trailers is not None:
            # everything queued fits this frame: end here
            flags[0] |= NGHTTP2_DATA_FLAG_EOF
            if call.trailers:
                flags[0] |= NGHTTP2_DATA_FLAG_NO_END_STREAM
                _submit_trailer(self.session, stream_id, call.trailers)
        return n

    cdef int send_data(self, nghttp2_frame *frame, const uint8_t *framehd, size_t length):
        cdef Call call = self._live(frame.hd.stream_id)
        if call is None:
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
        self._add(<const char *>framehd, 9)
        if frame.data.padlen > 0:
            return NGHTTP2_ERR_CALLBACK_FAILURE  # we never ask for padding
        cdef Py_ssize_t left = length
        cdef Py_ssize_t piece, available
        cdef Py_buffer view
        while left:
            item = call.out[0]
            available = len(item) - call.out_offset
            piece = min(available, left)
            if piece < VIEW_BELOW:
                if PyBytes_CheckExact(item):
                    self._add(PyBytes_AS_STRING(item) + call.out_offset, piece)
                else:
                    PyObject_GetBuffer(item, &view, PyBUF_SIMPLE)
                    try:
                        self._add(<const char *>view.buf + call.out_offset, piece)
                    finally:
                        PyBuffer_Release(&view)
            else:
                if self.small_len:
                    self._take_small()
                self.out.append(memoryview(item)[call.out_offset:call.out_offset + piece])
            left -= piece
            if piece == available:
                call.out.pop(0)
                call.out_offset = 0
            else:
                call.out_offset += piece
        call.pending = 0
        call.out_octets -= length
        self.pending_out -= length
        return 0


cdef bytes _percent_encode(str message):
    """grpc-message: UTF-8 with octets outside 0x20-0x7E (and '%') percent-encoded."""
    raw = message.encode("utf-8", "replace")
    cdef bytearray out = bytearray()
    cdef unsigned char c
    for c in raw:
        if 0x20 <= c <= 0x7E and c != 0x25:
            out.append(c)
        else:
            out += b"%%%02X" % c
    return bytes(out)


cdef bytes _unbase64(bytes value):
    """A ``-bin`` header's value: base64, padded or not (as gRPC sends it)."""
    try:
        return binascii.a2b_base64(value + b"=" * ((4 - len(value) % 4) % 4))
    except binascii.Error:
        return value


cdef tuple _field(name, value):
    """A header field as bytes; values of ``-bin`` names are base64-encoded (unpadded)."""
    if isinstance(name, str):
        name = name.encode()
    if isinstance(value, str):
        value = value.encode()
    if name.endswith(b"-bin"):
        value = binascii.b2a_base64(value, newline=False).rstrip(b"=")
    return name, value


cdef str _percent_decode(bytes value):
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(value).decode("utf-8", "replace")


cdef nghttp2_nv *_nva(list fields) except NULL:
    """The header fields (``(bytes, bytes)`` pairs, checked before any memory is taken) as
    nghttp2's array, which the caller frees; the pointers borrow the list's bytes."""
    cdef Py_ssize_t i, n = len(fields)
    for i in range(n):
        field = fields[i]
        if (not isinstance(field, tuple) or len(<tuple>field) != 2
                or not PyBytes_CheckExact((<tuple>field)[0])
                or not PyBytes_CheckExact((<tuple>field)[1])):
            raise TypeError(f"header field {i} must be a (bytes, bytes) pair, not {field!r}")
    cdef nghttp2_nv *nva = <nghttp2_nv *>malloc(sizeof(nghttp2_nv) * max(1, n))
    if nva == NULL:
        raise MemoryError()
    cdef bytes name, value
    for i in range(n):
        name, value = fields[i]
        nva[i].name = <uint8_t *>PyBytes_AS_STRING(name)
        nva[i].namelen = PyBytes_GET_SIZE(name)
        nva[i].value = <uint8_t *>PyBytes_AS_STRING(value)
        nva[i].valuelen = PyBytes_GET_SIZE(value)
        nva[i].flags = NGHTTP2_NV_FLAG_NONE
    return nva


cdef int _submit_response(nghttp2_session *session, int32_t stream_id, list fields,
                          bint with_data) except -1:
    cdef nghttp2_nv *nva = _nva(fields)  # nghttp2 copies the fields
    cdef mip_h2_data_provider provider
    provider.source.ptr = NULL
    provider.read_callback = _read_data
    try:
        _check(mip_h2_submit_response(session, stream_id, nva, len(fields),
                                       &provider if with_data else NULL))
    finally:
        free(nva)
    return 0


cdef int32_t _submit_request(nghttp2_session *session, list fields, Call call) except -1:
    cdef nghttp2_nv *nva = _nva(fields)
    cdef mip_h2_data_provider provider
    provider.source.ptr = NULL
    provider.read_callback = _read_data
    cdef int32_t rv
    try:
        rv = mip_h2_submit_request(session, NULL, nva, len(fields), &provider, NULL)
        _check(rv)
    finally:
        free(nva)
    return rv


cdef int _submit_trailer(nghttp2_session *session, int32_t stream_id, list fields) except -1:
    if fields is _OK:
        _check(nghttp2_submit_trailer(session, stream_id, _OK_TRAILERS, 1))
        return 0
    cdef nghttp2_nv *nva = _nva(fields)
    try:
        _check(nghttp2_submit_trailer(session, stream_id, nva, len(fields)))
    finally:
        free(nva)
    return 0


# nghttp2 calls these with the connection as user_data; exceptions are kept on the
# connection (GrpcConnection.kept) and re-raised when receive() or data_to_send() returns.

cdef int _on_begin_headers(nghttp2_session *s, const nghttp2_frame *frame, void *user) noexcept:
    try:
        return (<GrpcConnection>user).begin_headers(frame)
    except BaseException as exc:
        return (<GrpcConnection>user).kept(exc)


cdef int _on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name,
                    size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                    void *user) noexcept:
    try:
        return (<GrpcConnection>user).header(frame, name, namelen, value, valuelen)
    except BaseException as exc:
        return (<GrpcConnection>user).kept(exc)


cdef int _on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *user) noexcept:
    try:
        return (<GrpcConnection>user).frame_recv(frame)
    except BaseException as exc:
        return (<GrpcConnection>user).kept(exc)


cdef int _on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t stream_id,
                        const uint8_t *data, size_t length, void *user) noexcept:
    try:
        return (<GrpcConnection>user).data_chunk(stream_id, data, length)
    except BaseException as exc:
        return (<GrpcConnection>user).kept(exc)


cdef int _on_stream_close(nghttp2_session *s, int32_t stream_id, uint32_t error_code,
                          void *user) noexcept:
    try:
        return (<GrpcConnection>user).stream_close(stream_id, error_code)
    except BaseException as exc:
        return (<GrpcConnection>user).kept(exc)


cdef mip_h2_ssize _read_data(nghttp2_session *s, int32_t stream_id, uint8_t *buf, size_t length,
                        uint32_t *flags, nghttp2_data_source *source, void *user) noexcept:
    try:
        return (<GrpcConnection>user).read_data(stream_id, length, flags)
    except BaseException as exc:
        return (<GrpcConnection>user).kept(exc)


cdef int _send_data(nghttp2_session *s, nghttp2_frame *frame, const uint8_t *framehd,
                    size_t length, nghttp2_data_source *source, void *user) noexcept:
    try:
        return (<GrpcConnection>user).send_data(frame, framehd, length)
    except BaseException as exc:
        return (<GrpcConnection>user).kept(exc)


cdef int _on_frame_send(nghttp2_session *s, const nghttp2_frame *frame, void *user) noexcept:
    cdef GrpcConnection conn = <GrpcConnection>user
    if frame.hd.type == NGHTTP2_DATA or frame.hd.type == NGHTTP2_HEADERS:
        conn.ping_strikes = 0
        conn.last_ping_recv = -1e300
    return 0
