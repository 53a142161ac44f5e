# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Large numeric arrays in JSON bodies, parsed straight into numpy memory.

A JSON tensor of a million numbers costs a general JSON parser a Python object per number.
:func:`split_numeric_arrays` finds the arrays made only of numbers (nested or flat) that are
longer than a threshold, outside strings, and returns the document with each replaced by a
placeholder string (``"\\u0000mip:K"``) plus the arrays' spans, so the rest parses as usual.
:func:`parse_numbers` then reads one span into a typed numpy array, every number checked:
JSON syntax, integers for integer types, the type's range. Numbers of up to 19 digits are
read 8 digits at a time and made doubles by Clinger's fast path or the Eisel-Lemire algorithm
(csrc/mip_jsonnum.h); longer ones by C's ``strtod`` and ``strtoll``.
"""

import numpy as np

cimport numpy as cnp
from libc cimport errno as cerrno
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc, strtod, strtoll
from libc.string cimport memcpy

cnp.import_array()


cdef extern from "mip_jsonnum.h" nogil:
    uint64_t mip_jsonnum_load8(const unsigned char *p)
    bint mip_jsonnum_plain8(uint64_t v)
    enum: MIP_JSONNUM_RUN
    bint mip_jsonnum_plain_run(const unsigned char *p)
    bint mip_jsonnum_digits8(uint64_t v)
    uint32_t mip_jsonnum_value8(uint64_t v)
    double mip_jsonnum_to_double(uint64_t w, int q, const uint64_t *pow5)
    bint mip_jsonnum_fp32_settled(double a)
    ctypedef struct _Number "mip_jsonnum_number":
        uint64_t mantissa  # the first 19 significant digits
        int digits  # significant digits seen (more than 19: inexact)
        int exp10  # value = mantissa * 10**exp10
        bint negative
        bint integral
    Py_ssize_t mip_jsonnum_scan_short(const unsigned char *p, Py_ssize_t i, Py_ssize_t end,
                                      _Number *out)

PLACEHOLDER = "\x00mip:"


# What each octet is, one table read an octet in the scans below.
cdef enum:
    C_OTHER = 0
    C_NUMBER = 1  # digits, '-', '+', '.', 'e', 'E'
    C_SEPARATOR = 2  # ',' and JSON's spaces
    C_OPEN = 3  # [
    C_CLOSE = 4  # ]
    C_QUOTE = 5  # "
    C_BACKSLASH = 6

cdef unsigned char _CLASS[256]
for _c in range(256):
    _CLASS[_c] = C_OTHER
for _c in list(b"0123456789-+.eE"):
    _CLASS[_c] = C_NUMBER
for _c in list(b", \n\r\t"):
    _CLASS[_c] = C_SEPARATOR
_CLASS[91] = C_OPEN
_CLASS[93] = C_CLOSE
_CLASS[34] = C_QUOTE
_CLASS[92] = C_BACKSLASH


cdef inline bint _number_char(unsigned char c) noexcept nogil:
    return _CLASS[c] == C_NUMBER


cdef inline bint _space(unsigned char c) noexcept nogil:
    return c == 32 or c == 10 or c == 13 or c == 9


cdef Py_ssize_t _numeric_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """From the '[' at ``i``: the index after its matching ']' when everything inside is
    numbers, commas, spaces and brackets; -1 otherwise."""
    cdef Py_ssize_t depth = 0, stop
    cdef unsigned char kind
    while i < n:
        # runs of numbers, commas and spaces: MIP_JSONNUM_RUN (16 or 8) octets a step
        if i + MIP_JSONNUM_RUN <= n and mip_jsonnum_plain_run(p + i):
            i += MIP_JSONNUM_RUN
            continue
        stop = i + 8 if i + 8 <= n else n  # else the next 8 octets one by one
        while i < stop:
            kind = _CLASS[p[i]]
            if kind > C_SEPARATOR:
                if kind == C_OPEN:
                    depth += 1
                elif kind == C_CLOSE:
                    depth -= 1
                    if depth == 0:
                        return i + 1
                else:
                    return -1
            elif kind == C_OTHER:
                return -1
            i += 1
    return -1


def split_numeric_arrays(data, Py_ssize_t min_length=4096):
    """``(document, spans)``: ``body`` with every all-number array of at least
    ``min_length`` octets replaced by ``"\\u0000mip:K"``, and ``spans[K] = (start, end)`` of
    that array in ``body``. Without such arrays, ``document`` is ``body`` itself."""
    cdef const unsigned char[::1] body = data
    cdef const unsigned char *p = &body[0] if body.shape[0] else NULL
    cdef Py_ssize_t n = body.shape[0], found = 0, room = 16
    cdef Py_ssize_t *found_spans = <Py_ssize_t *>malloc(2 * room * sizeof(Py_ssize_t))
    if found_spans == NULL:
        raise MemoryError()
    try:
        with nogil:
            found = _find_spans(p, n, min_length, &found_spans, &room)
        if found < 0:
            raise MemoryError()
        spans = [(found_spans[2 * k], found_spans[2 * k + 1]) for k in range(found)]
    finally:
        free(found_spans)
    if not spans:
        return data, spans
    parts = []
    copied = 0
    for k, (start, end) in enumerate(spans):
        parts.append(bytes(body[copied:start]))
        parts.append(b'"\\u0000mip:%d"' % k)
        copied = end
    parts.append(bytes(body[copied:n]))
    return b"".join(parts), spans


cdef Py_ssize_t _find_spans(const unsigned char *p, Py_ssize_t n, Py_ssize_t min_length,
                            Py_ssize_t **spans, Py_ssize_t *room) noexcept nogil:
    """(start, end) pairs into ``*spans`` (grown as needed); how many, or -1."""
    cdef Py_ssize_t i = 0, end, found = 0
    cdef Py_ssize_t *grown
    cdef bint in_string = False
    cdef unsigned char c
    while i < n:
        c = p[i]
        if _CLASS[c] < C_OPEN:  # nothing that opens or closes an array or a string
            i += 1
            continue
        if in_string:
            if c == 92:  # backslash: skip the escaped octet
                i += 2
                continue
            if c == 34:
                in_string = False
        elif c == 34:
            in_string = True
        elif c == 91:
            end = _numeric_end(p, i, n)
            if end > 0 and end - i >= min_length:
                if found == room[0]:
                    grown = <Py_ssize_t *>realloc(spans[0], 4 * room[0] * sizeof(Py_ssize_t))
                    if grown == NULL:
                        return -1
                    spans[0] = grown
                    room[0] *= 2
                spans[0][2 * found] = i
                spans[0][2 * found + 1] = end
                found += 1
                i = end
                continue
            if end > 0:
                i = end  # a short all-number array: nothing inside needs a look
                continue
        i += 1
    return found


def parse_numbers(const unsigned char[::1] body, Py_ssize_t start, Py_ssize_t end, dtype,
                  bint exact=False, out=None):
    """The numbers of ``body[start:end]`` (a span from :func:`split_numeric_arrays`), in
    order, as a flat array of ``dtype`` (a numpy integer or floating type). ``exact``:
    FP32 and FP16 too are rounded from correctly rounded doubles, as from Python floats
    (as FP64 always is); without it, they are within an ulp of those. ``out``: a flat
    array of ``dtype`` that the numbers are written into (and that is given back) when
    they are as many as its elements; else a new array is given back, as without it.

    Raises:
        ValueError: a malformed number, a non-integer for an integer type, or a value out
            of the type's range (the message says which element).
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "iuf":
        raise TypeError(f"parse_numbers reads integer and floating types, not {dtype}")
    if end > body.shape[0] or start < 0 or start > end:
        raise ValueError("span outside the body")
    cdef const unsigned char *p = &body[0]
    cdef Py_ssize_t i
    # Room for the most elements the span can hold (one digit and one separator each):
    # proportional to what was received, no counting pass.
    cdef Py_ssize_t count = (end - start) // 2 + 1
    cdef bint is_float = dtype.kind == "f"
    # FP64, and with exact FP32 and FP16 too, from correctly rounded doubles (as Python
    # floats); else FP32 and FP16 round once more from a double within an ulp
    cdef bint rounded = dtype.itemsize == 8 or exact
    cdef bint single = is_float and dtype.itemsize == 4 and dtype.isnative  # FP32 directly
    cdef cnp.ndarray wide = np.empty(count, dtype=np.float32 if single else (
        np.float64 if is_float else np.int64))
    cdef double *dout = <double *>cnp.PyArray_DATA(wide)
    cdef int64_t *iout = <int64_t *>cnp.PyArray_DATA(wide)
    cdef Py_ssize_t k = 0, at = 0
    cdef int error
    with nogil:
        error = _parse_span(p, start, end, is_float, rounded, single, dout, iout, &k, &at)
    if error == E_NO_MEMORY:
        raise MemoryError()
    if error:
        raise ValueError(_message(error, body, start, end, at, k))
    wide = wide[:k]
    if not is_float and dtype != np.int64:
        info = np.iinfo(dtype)
        if k and (wide.min() < info.min or wide.max() > info.max):
            raise ValueError(f"a value does not fit {dtype}")
    if out is not None and out.dtype == dtype and out.size == k:
        if single:
            np.copyto(out, wide)
            return out
        with np.errstate(over="ignore"):
            np.copyto(out, wide, casting="unsafe")
        return out
    if k < count // 2:
        wide = wide.copy()  # do not keep the room that was not used
    if single or dtype == np.float64 or dtype == np.int64:
        return wide
    with np.errstate(over="ignore"):
        return wide.astype(dtype)


cdef enum:
    E_LIST_NEEDS_COMMA = 1
    E_VALUE_BEFORE_CLOSE
    E_UNBALANCED_CLOSE
    E_VALUE_BEFORE_COMMA
    E_UNEXPECTED
    E_NUMBER_NEEDS_COMMA
    E_NOT_NUMBER
    E_NOT_INTEGER
    E_OUT_OF_RANGE
    E_UNBALANCED_OPEN
    E_NO_MEMORY
    E_VALUE_AFTER_COMMA


# What each error says: {offset} is where, in octets from the list's start, {k} the element's
# index, {text} its first octets and {char} the one found (E_UNEXPECTED).
cdef dict _MESSAGES = {
    E_LIST_NEEDS_COMMA: "a ',' is missing before the list at octet {offset}",
    E_VALUE_BEFORE_CLOSE: "a value is missing before ']' at octet {offset}",
    E_UNBALANCED_CLOSE: "unbalanced ']'",
    E_VALUE_BEFORE_COMMA: "a value is missing before ',' at octet {offset}",
    E_UNEXPECTED: "unexpected {char!r} at octet {offset}",
    E_NUMBER_NEEDS_COMMA: "a ',' is missing before element {k}",
    E_NOT_NUMBER: "element {k} is not a JSON number: {text!r}",
    E_NOT_INTEGER: "element {k} is not an integer: {text!r}",
    E_OUT_OF_RANGE: "element {k} is out of range: {text!r}",
    E_VALUE_AFTER_COMMA: "a value is missing after the last ','",
}


cdef str _message(int error, const unsigned char[::1] body, Py_ssize_t start, Py_ssize_t end,
                  Py_ssize_t at, Py_ssize_t k):
    cdef Py_ssize_t j = at
    while j < end and _number_char(body[j]):
        j += 1
    text = bytes(body[at:min(j, at + 32)])
    char = chr(body[at]) if error == E_UNEXPECTED else ""
    return _MESSAGES.get(error, "unbalanced '['").format(offset=at - start, k=k, text=text, char=char)


cdef int _parse_span(const unsigned char *p, Py_ssize_t start, Py_ssize_t end, bint is_float,
                     bint rounded, bint single, double *dout, int64_t *iout, Py_ssize_t *count,
                     Py_ssize_t *at) noexcept nogil:
    """Numbers of ``p[start:end]`` into ``dout`` (floats: correctly rounded when
    ``rounded``, else within an ulp; ``single``: FP32 values, ``dout`` is a ``float *``)
    or ``iout``; 0, or an E_ code with ``at`` (octet) and ``count`` (element) where it
    went wrong."""
    cdef char *stop
    cdef char *text
    cdef char small[SHORT_NUMBER]
    cdef Py_ssize_t i = start, j, k = 0
    cdef _Number num
    cdef int depth = 0
    cdef bint want_value = True  # after '[' or ',': a number or '['; else ',' or ']'
    cdef bint just_opened = False  # the last token was '[' (spaces aside): ']' may follow
    cdef bint after_comma = False  # the last token was ','
    cdef unsigned char c
    cdef int error = 0
    cdef double value
    while i < end:
        c = p[i]
        if not _number_char(c):
            if c == 91:  # [
                if not want_value:
                    error = E_LIST_NEEDS_COMMA
                    break
                depth += 1
                just_opened = True
            elif c == 93:  # ]
                if want_value and not just_opened:
                    error = E_VALUE_BEFORE_CLOSE
                    break
                depth -= 1
                want_value = False
                just_opened = False
                if depth < 0:
                    error = E_UNBALANCED_CLOSE
                    break
            elif c == 44:  # ,
                if want_value:
                    error = E_VALUE_BEFORE_COMMA
                    break
                want_value = True
                just_opened = False
                after_comma = True
            elif not _space(c):
                error = E_UNEXPECTED
                break
            if c != 44 and not _space(c):
                after_comma = False
            i += 1
            continue
        if not want_value:
            error = E_NUMBER_NEEDS_COMMA
            break
        want_value = False
        just_opened = False
        after_comma = False
        j = mip_jsonnum_scan_short(p, i, end, &num)
        if j < 0 or (j < end and _number_char(p[j])):
            j = _scan(p, i, end, &num)  # the careful way: long numbers, and errors
        if j < 0:
            error = E_NOT_NUMBER
            break
        if is_float:
            if num.digits <= 19:
                if -22 <= num.exp10 <= 22:
                    # exact for a mantissa of at most 53 bits (Clinger's fast path), else
                    # within 2 ulps: enough when not rounded, or for FP32 far from a tie
                    if num.exp10 >= 0:
                        value = <double>num.mantissa * _POW10[num.exp10]
                    else:
                        value = <double>num.mantissa / _POW10[-num.exp10]
                    if rounded and num.mantissa > (1ULL << 53) and not (
                            single and mip_jsonnum_fp32_settled(value)):
                        value = mip_jsonnum_to_double(num.mantissa, num.exp10, _POW5)
                else:
                    value = mip_jsonnum_to_double(num.mantissa, num.exp10, _POW5)
                if num.negative and not (num.integral and num.mantissa == 0):
                    value = -value  # ("-0" is the integer 0, as a Python number is)
            else:  # more than 19 digits: the mantissa kept is not the number's
                text = _terminated(p + i, j - i, small)
                if text == NULL:
                    error = E_NO_MEMORY
                    break
                value = strtod(text, &stop)
                if text != small:
                    free(text)
            if single:
                (<float *>dout)[k] = <float>value  # (as numpy casts: out of range is inf)
            else:
                dout[k] = value
        else:
            if not num.integral:
                error = E_NOT_INTEGER
                break
            if num.digits > 18:
                text = _terminated(p + i, j - i, small)
                if text == NULL:
                    error = E_NO_MEMORY
                    break
                cerrno.errno = 0
                iout[k] = strtoll(text, &stop, 10)
                if text != small:
                    free(text)
                if cerrno.errno == cerrno.ERANGE:
                    error = E_OUT_OF_RANGE
                    break
            else:
                iout[k] = -<int64_t>num.mantissa if num.negative else <int64_t>num.mantissa
        k += 1
        i = j
        if i < end and p[i] == 44:  # the usual ',' right after a number
            want_value = True
            after_comma = True
            i += 1
    if error:  # (where: the octet and element it stopped at)
        at[0] = i
        count[0] = k
        return error
    count[0] = k
    if depth != 0:
        return E_UNBALANCED_OPEN
    if after_comma:
        at[0] = end
        return E_VALUE_AFTER_COMMA
    return 0


cdef enum:
    SHORT_NUMBER = 64  # numbers of fewer octets are copied to the stack for strtod


cdef char *_terminated(const unsigned char *p, Py_ssize_t n, char *small) noexcept nogil:
    """``p[:n]`` with a NUL after it, for strtod/strtoll, which read until a character
    that cannot continue the number: without it they could read past the span and past
    the end of a buffer that is not NUL-terminated. In ``small`` when it fits, else in
    memory the caller frees; NULL when there is none."""
    cdef char *s = small if n < SHORT_NUMBER else <char *>malloc(n + 1)
    if s != NULL:
        memcpy(s, p, n)
        s[n] = 0
    return s


cdef double _POW10[23]
for _k in range(23):
    _POW10[_k] = 10.0 ** _k


cdef uint64_t _POW5[2 * 651]


def _fill_pow5():
    """mip_jsonnum_to_double's table (csrc/mip_jsonnum.h): for q from -342 to 308, the 128
    leading bits of 5**q, truncated; for q from -27 to -1, of 2**b // 5**-q + 1."""
    for q in range(-342, 309):
        if q >= 0:
            bits = 5 ** q
        else:
            power = 5 ** -q
            z = (power - 1).bit_length()  # the least z with 2**z >= power
            bits = 2 ** (z + 127 if q >= -27 else 2 * z + 128) // power + 1
        bits = bits << max(0, 128 - bits.bit_length()) >> max(0, bits.bit_length() - 128)
        _POW5[2 * (q + 342)] = bits >> 64
        _POW5[2 * (q + 342) + 1] = bits & 0xFFFFFFFFFFFFFFFF


_fill_pow5()


cdef Py_ssize_t _scan(const unsigned char *p, Py_ssize_t i, Py_ssize_t end,
                      _Number *out) noexcept nogil:
    """One number by JSON's grammar, -?(0|[1-9]d*)(.d+)?([eE][+-]?d+)?, from ``p[i]``:
    the index after it (followed by a non-number character), or -1."""
    cdef unsigned long long m = 0
    cdef unsigned char d
    cdef int digits = 0, exp10 = 0, e = 0, esign = 1
    out.negative = False
    out.integral = True
    if i < end and p[i] == 45:
        out.negative = True
        i += 1
    if i >= end or not (48 <= p[i] <= 57):
        return -1
    if p[i] == 48:
        i += 1
    else:
        while digits <= 11 and i + 8 <= end and mip_jsonnum_digits8(mip_jsonnum_load8(p + i)):
            m = m * 100000000 + mip_jsonnum_value8(mip_jsonnum_load8(p + i))
            digits += 8
            i += 8
        while i < end and digits < 19:
            d = p[i] - 48
            if d > 9:
                break
            m = m * 10 + d
            digits += 1
            i += 1
        while i < end and <unsigned char>(p[i] - 48) <= 9:  # past 19 digits: the scale
            exp10 += 1
            digits += 1
            i += 1
    if i < end and p[i] == 46:
        out.integral = False
        i += 1
        if i >= end or not (48 <= p[i] <= 57):
            return -1
        if m == 0:
            while i < end and p[i] == 48:
                exp10 -= 1  # leading zeros of 0.000ddd are not significant
                i += 1
        while digits <= 11 and i + 8 <= end and mip_jsonnum_digits8(mip_jsonnum_load8(p + i)):
            m = m * 100000000 + mip_jsonnum_value8(mip_jsonnum_load8(p + i))
            exp10 -= 8
            digits += 8
            i += 8
        while i < end and digits < 19:
            d = p[i] - 48
            if d > 9:
                break
            m = m * 10 + d
            exp10 -= 1
            digits += 1
            i += 1
        while i < end and <unsigned char>(p[i] - 48) <= 9:  # past 19 digits: not kept
            digits += 1
            i += 1
    if i < end and (p[i] == 101 or p[i] == 69):
        out.integral = False
        i += 1
        if i < end and (p[i] == 43 or p[i] == 45):
            if p[i] == 45:
                esign = -1
            i += 1
        if i >= end or not (48 <= p[i] <= 57):
            return -1
        while i < end and 48 <= p[i] <= 57:
            if e < 100000:
                e = e * 10 + (p[i] - 48)
            i += 1
        exp10 += esign * e
    if i < end and _number_char(p[i]):
        return -1  # e.g. "1-2", "01"
    out.mantissa = m
    out.digits = digits
    out.exp10 = exp10
    return i
