"""The HTTP listener's one-call request head reader (mip.protocol._h1.parse_head) against
llhttp, the parser of every other request: what it reads, llhttp reads the same way
(tests/fuzz/harnesses.py's ``http_head``, which libFuzzer also runs), on heads that clients
send, heads built of odd parts, and random mutations of them."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mip.protocol._h1 import MAX_FIELDS, MAX_HEAD, parse_head

from .harnesses import http_head
from .make_corpus import HTTP_HEADS as CLIENTS

PATH = b"/v2/models/identity/infer"


@pytest.mark.parametrize("head", CLIENTS)
def test_the_heads_clients_send_are_read_as_llhttp_reads_them(head):
    got = parse_head(head)
    assert got is not None and got[1].startswith(b"/v2/models/identity/")
    assert got[0] == head.index(b"\r\n\r\n") + 4
    assert all(name == name.lower() for name, _ in got[3])
    http_head(head)


def test_what_is_left_to_llhttp():
    base = b"POST %s HTTP/1.1\r\nHost: a\r\n%s\r\n\r\n"
    for path, field in [
            (PATH, b"Transfer-Encoding: chunked"),
            (PATH, b"Content-Length: 5\r\nContent-Length: 5"),
            (PATH, b"Content-Length: 5\r\nExpect: 100-continue"),
            (PATH, b"Content-Length: 5\r\nUpgrade: websocket\r\nConnection: upgrade"),
            (PATH, b"Content-Length: 5\r\nConnection: close"),
            (PATH, b"Content-Length: 5\r\nX-A: b\r\n  folded"),  # obs-fold
            (PATH, b"Content-Length: 5 "),
            (PATH, b"Content-Length: +5"),
            (PATH, b"Content-Length: 1234567890123456789"),
            (PATH, b"Content-Length : 5"),
            (PATH, b"Content-Length: 5\r\nX-A: \x01"),
            (PATH, b"Content-Length: 5\r\nX-A: \xff"),
            (PATH, b"X-A: b"),  # no Content-Length
            (b"*", b"Content-Length: 5"),
            (b"http://a/v2", b"Content-Length: 5"),
            (PATH + b"#f", b"Content-Length: 5")]:
        assert parse_head(base % (path, field)) is None, field
    head = base % (PATH, b"Content-Length: 5")
    assert parse_head(head) is not None
    assert parse_head(head.replace(b"POST", b"GET ")) is None
    assert parse_head(head.replace(b"HTTP/1.1", b"HTTP/1.0")) is None
    assert parse_head(head.replace(b"\r\nHost", b"\nHost")) is None
    assert parse_head(b"\r\n" + head) is None
    for cut in range(len(head)):
        assert parse_head(head[:cut]) is None
    many = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_FIELDS))
    assert parse_head(base % (PATH, many + b"Content-Length: 5")) is None
    long = base % (PATH, b"X-A: " + b"v" * MAX_HEAD + b"\r\nContent-Length: 5")
    assert parse_head(long) is None


_TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_VALUES = [b"5", b"0", b"05", b"keep-alive", b"Keep-Alive", b"close", b"chunked",
           b"100-continue", b"application/json", b"gzip", b" 5", b"5 ", b"\t5", b"a\tb", b"",
           b"keep-alive, close", b"-1", b"18446744073709551616"]

def _mostly(common: list[bytes], odd: list[bytes]) -> st.SearchStrategy[bytes]:
    """One of ``common`` most of the time, else one of ``odd``."""
    return st.one_of(st.sampled_from(common), st.sampled_from(common),
                     st.sampled_from(common), st.sampled_from(odd))


_name = st.one_of(
    _mostly([b"Host", b"Content-Type", b"Accept-Encoding", b"Inference-Header-Content-Length",
             b"X-Request-ID", b"Content-Encoding", b"Connection"],
            [b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Transfer-Encoding",
             b"Expect", b"Upgrade"]),
    st.lists(st.sampled_from(list(_TCHAR)), min_size=1, max_size=8).map(bytes),
    st.binary(min_size=0, max_size=6))
_value = st.one_of(st.sampled_from(_VALUES), st.just(b"keep-alive"),
                   st.text(alphabet=" \t!~abc09:,", max_size=8).map(str.encode),
                   st.binary(max_size=8))
_line_end = _mostly([b"\r\n"], [b"\n", b"\r", b"\r\n ", b" \r\n", b"\r\r\n"])
_field = st.tuples(_name, _mostly([b": ", b":"], [b":\t", b" :", b"", b": \t"]), _value,
                   _line_end).map(b"".join)
_target = st.one_of(st.just(PATH), st.sampled_from([b"/", b"/a?b=c", b"/a%20b", b"/a#b", b"*",
                                                    b"//x", b"/\x7f", b"/a b", b"/\xff",
                                                    b"/a?b", b"/a;b=c:d@e", b"/%zz"]),
                    st.binary(max_size=6).map(lambda b: b"/" + b),
                    st.text(alphabet="-._~!$&'()*+,;=:@/?%aZ0#[]{}|^`\"<>", max_size=8)
                    .map(lambda t: b"/" + t.encode()))
_request_line = st.tuples(
    _mostly([b"POST"], [b"post", b"GET", b"PUT", b"POSTS", b" POST"]), _mostly([b" "], [b"  "]),
    _target, _mostly([b" "], [b"  ", b"\t"]),
    _mostly([b"HTTP/1.1"], [b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.10", b"HTTP/1.1 "]),
    _line_end).map(b"".join)
_head = st.tuples(_request_line, st.lists(_field, max_size=6),
                  _mostly([b"Content-Length: 5\r\n", b"content-length: 0\r\n"], [b""]),
                  st.lists(_field, max_size=2),
                  _mostly([b"\r\n"], [b"\n", b"", b"\r"]), st.binary(max_size=8)
                  ).map(lambda parts: parts[0] + b"".join(parts[1]) + parts[2]
                        + b"".join(parts[3]) + b"".join(parts[4:]))


@st.composite
def _mutated(draw) -> bytes:
    """A client's head with a few octets replaced, inserted or removed."""
    data = bytearray(draw(st.sampled_from(CLIENTS)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["replace", "insert", "delete"]))
        if kind == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.sampled_from([b"\r\n", b" ", b"\t", b":", b"\x00", b"\n",
                                                b"\xff", b"Content-Length: 1\r\n"]))
        else:
            del data[at:at + draw(st.integers(1, 3))]
    return bytes(data)


_FUZZ = settings(max_examples=1500, derandomize=True, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


@_FUZZ
@given(_head)
@example(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
def test_built_heads_are_read_as_llhttp_reads_them(data):
    http_head(data)


@_FUZZ
@given(_mutated())
def test_mutated_heads_are_read_as_llhttp_reads_them(data):
    http_head(data)


@settings(max_examples=500, derandomize=True, deadline=None, database=None)
@given(st.binary(max_size=200))
def test_random_octets_are_read_as_llhttp_reads_them(data):
    http_head(b"POST /" + data)


_visible = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                   max_size=4).map(str.encode)
_plain_value = st.lists(st.one_of(_visible, st.sampled_from([b" ", b"\t", b"  "])),
                        max_size=5).map(lambda parts: b"".join(parts).strip(b" \t"))
_plain_field = st.tuples(
    st.lists(st.sampled_from(list(_TCHAR)), min_size=1, max_size=10).map(bytes)
    .filter(lambda name: name.lower() not in (b"content-length", b"connection",
                                              b"transfer-encoding", b"expect", b"upgrade")),
    _mostly([b": "], [b":", b":\t", b":  \t "]), _plain_value).map(lambda f: b"".join(f) + b"\r\n")


@_FUZZ
@given(st.text(alphabet="-._~!$&'()*+,;=:@/?%aZ09", max_size=12),
       st.lists(_plain_field, max_size=8), st.integers(0, 8), st.integers(0, 10 ** 6),
       st.booleans())
def test_heads_read_here_are_read_as_llhttp_reads_them(target, fields, at, length, keep):
    """Heads of the form parse_head reads: always read, the same as llhttp."""
    fields.insert(min(at, len(fields)), b"Content-Length: %d\r\n" % length)
    if keep:
        fields.insert(0, b"Connection: Keep-Alive\r\n")
    data = b"POST /%s HTTP/1.1\r\n%s\r\n" % (target.encode(), b"".join(fields))
    assert parse_head(data) is not None
    http_head(data)
