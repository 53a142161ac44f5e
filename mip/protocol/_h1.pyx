# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The head of an HTTP/1.1 request read in one call: the fast path of the HTTP listener's
direct endpoints (:mod:`mip.net.http_protocol`).

:func:`parse_head` takes only the most common and plainest form of a request (RFC 9112):
``POST`` of an origin-form target, ``HTTP/1.1``, header fields of token names and visible
values, a single ``Content-Length`` and a persistent connection; it gives back ``None`` for
every other octet sequence (a head not complete yet among them), which the listener's
general parser (llhttp, through httptools) then reads as it reads every request. Refusing
is always safe: what it accepts, llhttp reads the same way (the same target, header fields
and body length), which the property and fuzz tests check.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcmp

cdef enum:
    HEAD_MAX = 8192
    FIELDS_MAX = 64
    DIGITS_MAX = 18  # of a Content-Length

#: octets of a head looked at; a longer one is left to the general parser
MAX_HEAD = HEAD_MAX
#: header fields of a head; more are left to the general parser
MAX_FIELDS = FIELDS_MAX

# What each octet may be: a bit per place.
cdef enum:
    TOKEN = 1  # tchar (RFC 9110 5.6.2)
    TARGET = 2  # of an origin-form target: pchar, "/" and "?" (RFC 3986), no fragment
    VALUE = 4  # of a field value: VCHAR, SP, HTAB (obs-text is left to the general parser)

cdef unsigned char _CLASS[256]
for _c in range(256):
    _CLASS[_c] = 0
for _c in list(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"):
    _CLASS[_c] |= TOKEN
for _c in list(b"-._~!$&'()*+,;=:@/?%0123456789abcdefghijklmnopqrstuvwxyz"
               b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"):
    _CLASS[_c] |= TARGET
for _c in range(0x21, 0x7F):
    _CLASS[_c] |= VALUE
_CLASS[0x20] |= VALUE
_CLASS[0x09] |= VALUE

# Names of the fields the endpoints read, lowercase: each is made once (a request of them
# allocates no name), and the endpoints' comparisons with them are by identity first.
cdef enum:
    KNOWN = 11
    NAME_BUFFER = 40  # octets of a name lowercased on the stack
_KNOWN_NAMES = (b"host", b"content-length", b"content-type", b"inference-header-content-length",
                b"content-encoding", b"accept", b"accept-encoding", b"user-agent",
                b"connection", b"x-request-id", b"authorization")
cdef tuple _known_names = _KNOWN_NAMES
cdef const char *_known_text[KNOWN]
cdef Py_ssize_t _known_size[KNOWN]
for _c in range(KNOWN):
    _known_text[_c] = <const char *>_KNOWN_NAMES[_c]
    _known_size[_c] = len(_KNOWN_NAMES[_c])
cdef const char *_KEEP_ALIVE = b"keep-alive"


cdef inline bint _is(const unsigned char *name, Py_ssize_t size, const char *lower,
                     Py_ssize_t lower_size) noexcept nogil:
    return size == lower_size and memcmp(name, lower, size) == 0


cdef object _name(const unsigned char *low, Py_ssize_t size):
    """The bytes of the lowercase name ``low``: the one made before, for a known name."""
    cdef Py_ssize_t k
    for k in range(KNOWN):
        if _known_size[k] == size and memcmp(low, _known_text[k], size) == 0:
            return _known_names[k]
    return PyBytes_FromStringAndSize(<const char *>low, size)


def parse_head(bytes data not None, Py_ssize_t start=0):
    """The head of a request at ``data[start:]``, or ``None`` when it is not of the form
    read here (see the module), is longer than :data:`MAX_HEAD` or not all there yet.

    Returns ``(end, target, content_length, fields)``: the index after the head's empty
    line, the request target (octets), the body's length, and the header fields as
    ``(lowercase name, value)`` pairs in their order (values without their surrounding
    whitespace), as llhttp reports them.
    """
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t limit = n if n - start <= HEAD_MAX else start + HEAD_MAX
    cdef Py_ssize_t i = start, target_start, target_end, name_start, name_size
    cdef Py_ssize_t value_start, value_end, k
    cdef long long length = -1
    cdef unsigned char c
    cdef unsigned char *low
    cdef unsigned char buffer[NAME_BUFFER]
    cdef list fields
    cdef bytes name
    if start < 0 or limit - i < 18 or memcmp(p + i, b"POST /", 6) != 0:
        return None
    i += 5
    target_start = i
    while i < limit and _CLASS[p[i]] & TARGET:
        i += 1
    target_end = i
    if limit - i < 11 or memcmp(p + i, b" HTTP/1.1\r\n", 11) != 0:
        return None
    i += 11
    fields = []
    while True:
        if limit - i < 2:
            return None
        if p[i] == 13:  # the empty line
            if p[i + 1] != 10:
                return None
            i += 2
            break
        name_start = i
        while i < limit and _CLASS[p[i]] & TOKEN:
            i += 1
        name_size = i - name_start
        if name_size == 0 or i >= limit or p[i] != 58:  # ':' (obs-fold starts with a space)
            return None
        i += 1
        while i < limit and (p[i] == 32 or p[i] == 9):
            i += 1
        value_start = i
        while i < limit and _CLASS[p[i]] & VALUE:
            i += 1
        value_end = i
        if limit - i < 2 or p[i] != 13 or p[i + 1] != 10:
            return None
        i += 2
        if value_end > value_start and (p[value_end - 1] == 32 or p[value_end - 1] == 9):
            return None  # trailing whitespace: left to the general parser
        if len(fields) >= FIELDS_MAX:
            return None
        if name_size <= NAME_BUFFER:
            low = buffer
        else:  # (no field read here has a name this long)
            name = PyBytes_FromStringAndSize(NULL, name_size)
            low = <unsigned char *>PyBytes_AS_STRING(name)
        for k in range(name_size):
            c = p[name_start + k]
            low[k] = c + 32 if 65 <= c <= 90 else c
        if _is(low, name_size, b"content-length", 14):
            if length >= 0 or value_end == value_start or value_end - value_start > DIGITS_MAX:
                return None
            length = 0
            for k in range(value_start, value_end):
                c = p[k]
                if c < 48 or c > 57:
                    return None
                length = length * 10 + (c - 48)
        elif _is(low, name_size, b"connection", 10):
            # only "keep-alive" (the default): close, upgrade and lists take the general path
            if value_end - value_start != 10:
                return None
            for k in range(10):
                c = p[value_start + k]
                if (c + 32 if 65 <= c <= 90 else c) != <unsigned char>_KEEP_ALIVE[k]:
                    return None
        elif (_is(low, name_size, b"transfer-encoding", 17) or _is(low, name_size, b"expect", 6)
              or _is(low, name_size, b"upgrade", 7)):
            return None
        if name_size <= NAME_BUFFER:
            name = _name(low, name_size)
        fields.append((name,
                       PyBytes_FromStringAndSize(<const char *>p + value_start,
                                                 value_end - value_start)))
    if length < 0:
        return None
    return (i, PyBytes_FromStringAndSize(<const char *>p + target_start,
                                         target_end - target_start), length, fields)
