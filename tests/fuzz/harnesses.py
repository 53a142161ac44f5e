"""Fuzz harnesses of the codec: one function per entry point, octets in.

Each harness takes any ``bytes`` and either returns or raises. Allowed outcomes
are a result or the entry point's documented error (``mip.ProtocolError``
subclasses for the MIP and MSIP codecs, ``H2Error`` for the HTTP/2 connection,
``ValueError`` for ``_jsonnum.parse_numbers``); every other exception, a failed
check (``AssertionError``) or a crash is a finding. Where a harness can, it
checks the result against a second reading of the same octets (whole-frame
decoding against the streaming parser, a Python splitter against the gRPC
one, ``json.loads`` against ``parse_numbers``) and the memory the parsers hold
against their configured limits.

The same functions run under libFuzzer (``tests/fuzz/run.py``, Atheris) and in
the normal test run, which replays the committed corpus and every crash
reproducer (``test_fuzz_regressions.py``). Only the standard library, numpy and
mip are imported here.
"""

from __future__ import annotations

import json
import random
import struct

import numpy as np

import mip
from mip import msip
from mip.errors import H2Error, ProtocolError, TruncatedFrame

try:
    from mip.protocol import _h2
except ImportError:  # built without libnghttp2
    _h2 = None

from mip.protocol import _jsonnum


# ---- MIP: whole-frame decoding ----------------------------------------------------------
def _touch(value) -> object:
    """Read every octet a decoded value refers to; a summary to compare decodings by."""
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return ("bytes-tensor", value.shape, [bytes(x) for x in value.reshape(-1)])
        return ("tensor", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, mip.Json):
        repr(value)
        return ("json", bytes(value.data))
    if isinstance(value, mip.Text):
        repr(value)
        return ("text", value.value)
    if isinstance(value, mip.Image):
        repr(value)
        return ("image", bytes(value))
    assert isinstance(value, mip.Value), type(value)
    repr(value)
    return ("value", value.type, bytes(value))


def summary(m) -> tuple:
    """Everything a decoded MIP message says, with every value read."""
    repr(m)
    if m.kind in (mip.KIND_ERROR, mip.KIND_PING):
        return (m.kind, m.subtype, m.error_code)
    batch = m.batch
    assert len(batch) == len(m)
    return (m.kind, m.subtype, m.n_input, m.n_output, m.model, m.version,
            [[_touch(v) for v in item] for item in batch])


def _check_columns(m) -> None:
    """rows() and column() agree with the per-item values."""
    batch = m.batch
    per_item = len(batch[0]) if batch else 0
    for j in range(per_item):
        rows = m.rows(j)
        want = []
        for item in batch:
            v = item[j]
            want.append((v.shape[0] if v.ndim else -1) if isinstance(v, np.ndarray) else 1)
        assert rows == want, (rows, want)
        try:
            col = m.column(j)
        except ValueError:
            continue  # 0-d tensors, or tensors whose shapes do not stack
        if all(isinstance(item[j], np.ndarray) and item[j].dtype != object for item in batch):
            assert col.shape[0] == sum(want), (col.shape, want)
            np.asarray(col).tobytes()


def mip_decode(data: bytes) -> None:
    """``mip.decode`` of the octets as bytes and as a writable bytearray; a decoded frame's
    values are all read, its columns checked, and it is encoded again and decoded to the
    same values."""
    try:
        m = mip.decode(data)
    except ProtocolError:
        with_writable = None
    else:
        with_writable = True
        first = summary(m)
        _check_columns(m)
        if m.kind in (mip.KIND_INFERENCE, mip.KIND_ROUTED):
            if m.is_request:
                again = mip.encode_request(m.batch, model=m.model, version=m.version)
            else:
                again = mip.encode_response(m.batch, n_input=m.n_input, kind=m.kind, n_output=m.n_output)
            m2 = mip.decode(again)
            s1, s2 = list(first), list(summary(m2))
            if m.is_request:
                s1[3] = s2[3] = None  # n_output of a request is not carried by encode_request
                if not len(m):
                    s1[2] = s2[2] = None  # nor n_input of an empty one
            assert s1 == s2, "encoding a decoded frame changed its values"
    buf = bytearray(data)
    try:
        m = mip.decode(buf)
    except ProtocolError:
        assert with_writable is None, "a frame decoded from bytes was refused from a bytearray"
        return
    assert with_writable, "a frame refused from bytes decoded from a bytearray"
    summary(m)


# ---- streaming parsers --------------------------------------------------------------------
_SIZES = (1, 2, 3, 5, 8, 13, 64, 255, 1000, 4096, 70000)


def _cuts(rnd: random.Random, n: int) -> list[int]:
    """Random receive sizes that add up to n: mostly small, sometimes large."""
    out = []
    while n > 0:
        k = min(n, rnd.choice(_SIZES))
        out.append(k)
        n -= k
    return out


def _deliver(parser, data: bytes, rnd: random.Random, limit: int):
    """Feed `data` in random pieces, by feed() or get_buffer()/buffer_updated(); yield what
    each call returns, or the exception that ended it. The buffer never exceeds `limit`."""
    pos = 0
    while pos < len(data):
        k = min(len(data) - pos, rnd.choice(_SIZES))
        try:
            if rnd.random() < 0.5:
                got = parser.feed(data[pos:pos + k])
            else:
                buf = parser.get_buffer(-1)
                n = min(k, len(buf))
                buf[:n] = data[pos:pos + n]
                k = n
                got = parser.buffer_updated(n)
        except ProtocolError as exc:
            yield exc
            return
        finally:
            assert parser.buffer_size <= limit, (parser.buffer_size, limit)
        pos += k
        yield got


def _parse_all(parser, stream: bytes, rnd: random.Random, limit: int, read) -> tuple[list, object]:
    """What a streaming parser returns for `stream` (each message read) and its error."""
    got: list = []
    for out in _deliver(parser, stream, rnd, limit):
        if isinstance(out, ProtocolError):
            return got, out
        got += [read(m) for m in out]
    try:
        parser.feed(b"")  # an error found after the last good frame comes on the next call
    except ProtocolError as exc:
        return got, exc
    assert parser.buffer_size <= limit
    return got, None


def _chunk_size(data: bytes) -> int:
    return 256 if data[0] & 0x80 else 65536


def _agree(parser, data: bytes, limit: int, read, header: int, length_of, decode) -> None:
    """The streaming parser fed ``data[2:]`` in pieces cut by ``data[1]`` and whole-frame
    decoding read the same frames and stop at the same error; a parser that failed stays
    failed."""
    stream = data[2:]
    got, error = _parse_all(parser, stream, random.Random(data[1]), limit, read)
    want, want_error = _decode_each(stream, header, length_of, decode)
    assert got == want, "the streaming parser and whole-frame decoding read different frames"
    assert type(error) is type(want_error), (error, want_error)
    if error is not None:
        for call in (lambda: parser.feed(b"\0"), lambda: parser.get_buffer(-1)):
            try:
                call()
            except ProtocolError as again:
                assert type(again) is type(error)
            else:
                raise AssertionError("a failed parser took more input")


def _decode_each(stream: bytes, header: int, length_of, decode) -> tuple[list, object]:
    """The frames of `stream` decoded one at a time: (results, the error that ends them).
    A frame whose octets have not all arrived is decoded too: a header the parser refuses
    is refused here, any other frame is only truncated (the parser waits for the rest)."""
    out, pos = [], 0
    while pos < len(stream):
        n = length_of(stream, pos) if len(stream) - pos >= header else None
        whole = n is not None and pos + n <= len(stream)
        try:
            out.append(decode(stream[pos:pos + n] if whole else stream[pos:]))
        except TruncatedFrame as exc:
            if whole:
                return out, exc
            return out, None
        except ProtocolError as exc:
            return out, exc
        if not whole:
            raise AssertionError("an incomplete frame decoded")
        pos += n
    return out, None


_MIP_LIMITS = (8, 16, 64, 300, 1024, 4096, 65536, mip.DEFAULT_MAX_FRAME_SIZE)


def _mip_length(data: bytes, pos: int) -> int:
    return 8 + struct.unpack_from(">I", data, pos + 4)[0]


def mip_stream(data: bytes) -> None:
    """``mip.FrameParser`` fed in random pieces (octet 0: max_frame_size, octet 1: how the
    stream is cut) agrees with ``mip.decode`` of each frame, and its receive buffer stays
    within max_frame_size."""
    if len(data) < 2:
        return
    limit = _MIP_LIMITS[data[0] % len(_MIP_LIMITS)]
    parser = mip.FrameParser(max_frame_size=limit, chunk_size=_chunk_size(data))
    _agree(parser, data, limit, summary, 8, _mip_length,
           lambda b: summary(mip.decode(b, max_frame_size=limit)))


_MSIP_LIMITS = (0, 1, 24, 100, 1000, 65536, msip.DEFAULT_MAX_PAYLOAD)


def _msip_length(data: bytes, pos: int) -> int:
    return 24 + struct.unpack_from(">I", data, pos + 12)[0]


def _frame_summary(f) -> tuple:
    repr(f)
    payload = bytes(f.payload)
    assert len(payload) == f.payload_len
    extra = None
    if f.frame_type in (msip.FrameType.PUBLISH, msip.FrameType.EVENT):
        try:
            topic, rest = msip.decode_publish_payload(f.payload)
            extra = (topic, bytes(rest))
        except ProtocolError as exc:
            extra = type(exc)
    elif f.frame_type == msip.FrameType.HELLO:
        extra = msip.decode_hello_payload(f.payload)
    return (f.frame_type, f.msg_kind, f.flags, f.msg_id, payload, extra)


def msip_stream(data: bytes) -> None:
    """``msip.FrameParser`` fed in random pieces (octet 0: max_payload, octet 1: how the
    stream is cut) agrees with ``msip.decode`` of each frame; its buffer stays within
    max_payload + the 24-octet header. Payloads are split as PUBLISH/HELLO payloads."""
    if len(data) < 2:
        return
    max_payload = _MSIP_LIMITS[data[0] % len(_MSIP_LIMITS)]
    parser = msip.FrameParser(max_payload=max_payload, chunk_size=_chunk_size(data))
    _agree(parser, data, max_payload + msip.HEADER_SIZE, _frame_summary, 24, _msip_length,
           lambda b: _frame_summary(msip.decode(b, max_payload=max_payload)))


def msip_decode(data: bytes) -> None:
    """``msip.decode`` and ``msip.decode_header`` of the octets; a frame decoded is encoded
    again to the same octets."""
    try:
        f = msip.decode(data)
    except ProtocolError:
        return
    s = _frame_summary(f)
    assert _frame_summary(msip.decode(f.encode())) == s, "re-encoding changed the frame"
    header = msip.decode_header(data[:24])
    assert header == (s[0], s[1], s[2], s[3], len(s[4]))


# ---- gRPC messages over HTTP/2 -----------------------------------------------------------
_GRPC_LIMITS = (0, 1, 16, 100, 1000, 4 << 20)
_PATH = b"/inference.GRPCInferenceService/ModelInfer"


def _client_preface() -> tuple[bytes, int]:
    """What a gRPC client sends before the first DATA frame of a call, and its stream id."""
    client = _h2.GrpcConnection(client=True)
    call = client.start_call(_PATH, b"localhost", end=False)
    return b"".join(bytes(b) for b in client.data_to_send()), call.stream_id


def _data_frame(stream_id: int, payload: bytes, end: bool = False) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([0, 1 if end else 0]) + struct.pack(">I", stream_id) + payload


def _split_grpc(body: bytes, limit: int) -> tuple[list, int | None, int]:
    """Reference reading of a gRPC stream: (messages, length over the limit or None,
    octets of the unfinished message held)."""
    messages, pos = [], 0
    while len(body) - pos >= 5:
        flag, size = body[pos], struct.unpack_from(">I", body, pos + 1)[0]
        if size > limit:
            return messages, size, 0
        if len(body) - pos - 5 < size:
            return messages, None, size
        messages.append((flag & 1, body[pos + 5:pos + 5 + size]))
        pos += 5 + size
    return messages, None, 0


def grpc_messages(data: bytes) -> None:
    """The server side of ``_h2.GrpcConnection``, after a real client's preface and request
    headers. Octet 0 chooses: even, the rest is the call's gRPC body (length-prefixed
    messages) cut into DATA frames at random and the messages must be what a Python
    splitter finds, the octets held must be those of the unfinished message; odd, the rest
    is raw HTTP/2 from the peer. Octet 1 chooses max_message_size. Only ``H2Error`` may
    escape; the octets held never exceed max_buffered."""
    if _h2 is None or len(data) < 3:
        return
    limit = _GRPC_LIMITS[data[1] % len(_GRPC_LIMITS)]
    server = _h2.GrpcConnection(max_message_size=limit, window_size=1 << 24)
    preface, stream_id = _client_preface()
    events = server.receive(preface)
    server.data_to_send()
    assert [type(e) for e in events] == [_h2.RequestReceived]
    body = data[3:]
    if data[0] % 2:
        wire = body
    else:
        rnd = random.Random(data[2])
        wire, pos = b"", 0
        for k in _cuts(rnd, len(body)):
            k = min(k, 16384)  # SETTINGS_MAX_FRAME_SIZE of a new connection
            wire += _data_frame(stream_id, body[pos:pos + k])
            pos += k
    messages, too_large = [], None
    try:
        pos = 0
        rnd = random.Random(len(data))
        while pos < len(wire):
            k = rnd.choice((1, 9, 100, 5000, 1 << 20))
            for event in server.receive(wire[pos:pos + k]):
                assert isinstance(event, (_h2.RequestReceived, _h2.MessageReceived,
                                          _h2.StreamEnded, _h2.StreamClosed,
                                          _h2.MessageTooLarge)), event
                if isinstance(event, _h2.MessageReceived) and event.call.stream_id == stream_id:
                    payload = event.data
                    assert isinstance(payload, bytes) and len(payload) <= limit
                    messages.append((int(event.compressed), payload))
                elif isinstance(event, _h2.MessageTooLarge):
                    size = event.length
                    assert event.over_buffered == (size <= limit)
                    assert size > limit or server.buffered + size > server.max_buffered
                    too_large = size
            assert 0 <= server.buffered <= server.max_buffered
            pos += k
            for piece in server.data_to_send():
                bytes(piece)
    except H2Error:
        return
    if data[0] % 2 == 0:
        want, want_too_large, held = _split_grpc(body, limit)
        assert messages == want, "the gRPC splitter and the reference split differ"
        assert too_large == want_too_large, (too_large, want_too_large)
        assert server.buffered == held, (server.buffered, held)


# ---- numeric arrays of JSON bodies -----------------------------------------------------------
_DTYPES = [np.dtype(t) for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                                 "uint64", "float16", "float32", "float64")]


def _flatten(obj, out: list) -> None:
    if isinstance(obj, list):
        for x in obj:
            _flatten(x, out)
    else:
        out.append(obj)


def jsonnum(data: bytes) -> None:
    """``split_numeric_arrays`` then ``parse_numbers`` of every span (octet 0: the dtype,
    octet 1: min_length), the body in memory of exactly its size. Only ``ValueError`` may
    come from parse_numbers; an array it reads must be what ``json.loads`` reads."""
    if len(data) < 2:
        return
    dtype = _DTYPES[data[0] % len(_DTYPES)]
    min_length = data[1] % 64
    body = data[2:]
    doc, spans = _jsonnum.split_numeric_arrays(body, min_length)
    if not spans:
        assert doc is body
    exact = np.frombuffer(body, dtype=np.uint8).copy()  # no NUL after the last octet
    for start, end in spans:
        assert 0 <= start < end <= len(body) and body[start] == 0x5B and body[end - 1] == 0x5D
        check_span(exact, start, end, dtype)
    # spans chosen by the input, not by the splitter: all of it, and a cut anywhere
    check_span(exact, 0, len(body), dtype)
    if len(body) >= 2:
        start, end = sorted((body[0] % (len(body) + 1), body[-1] % (len(body) + 1)))
        check_span(exact, start, end, dtype)


def _tokens(text: bytes):
    """The numbers of a span as JSON reads them, each ("i"|"f", its text); None when the span
    is not a list of numbers and lists; "deep" when it nests deeper than json can read."""
    if not text.strip(b" \t\n\r"):  # JSON's white space
        return []
    try:
        ref = json.loads(b"[" + text + b"]", parse_int=lambda t: ("i", t),
                         parse_float=lambda t: ("f", t), parse_constant=lambda t: None)
    except RecursionError:
        return "deep"
    except ValueError:
        return None
    flat: list = []
    _flatten(ref, flat)
    if not all(isinstance(x, tuple) for x in flat):
        return None  # strings, objects, true/false/null, NaN: not a numeric array
    return flat


def check_span(body: np.ndarray, start: int, end: int, dtype: np.dtype) -> None:
    try:
        got = _jsonnum.parse_numbers(body, start, end, dtype)
    except ValueError:
        got = None
    text = body[start:end].tobytes()
    ref = _tokens(text)
    if ref == "deep":
        return
    if dtype.kind in "iu" and ref is not None:
        info = np.iinfo(dtype)
        if not all(kind == "i" and len(t) < 30 and info.min <= int(t) <= info.max for kind, t in ref):
            if got is not None:
                raise AssertionError(f"parse_numbers read a non-integer or out of range {dtype}: {text[:80]!r}")
            return  # refused as documented
    if got is None:
        if ref is None:
            return
        raise AssertionError(f"parse_numbers refused a valid numeric array: {text[:80]!r}")
    assert got.dtype == dtype and got.ndim == 1
    assert ref is not None, f"parse_numbers read what JSON refuses: {text[:80]!r}"
    assert len(got) == len(ref), (len(got), len(ref))
    out = np.empty(len(got), dtype)  # the same numbers, into an array given
    assert _jsonnum.parse_numbers(body, start, end, dtype, False, out) is out
    assert out.tobytes() == got.tobytes(), f"parsed into out, {dtype} values differ"
    if dtype == np.float64:
        want = np.array([float(t) for _, t in ref], dtype=np.float64)
        assert np.array_equal(got, want), "FP64 values differ from Python's float()"
    elif dtype.kind in "iu":
        assert got.tolist() == [int(t) for _, t in ref], "integers differ from json.loads"
    if dtype.kind == "f":  # exact: as numpy makes of the numbers json.loads reads
        exact = _jsonnum.parse_numbers(body, start, end, dtype, True)
        want = np.array([float(int(t)) if kind == "i" and len(t) < 300 else float(t)
                         for kind, t in ref], dtype=np.float64)
        with np.errstate(over="ignore"):
            want = want.astype(dtype)
        assert exact.tobytes() == want.tobytes(), f"exact {dtype} values differ: {text[:80]!r}"


# ---- KServe v2: the common ModelInferRequest, without protobuf -------------------------

def oip_request(data: bytes) -> None:
    """``_oip.read_infer_request`` of the octets: ``None``, or what protobuf reads of the
    same octets (the oracle: they must parse), every input a view of exactly its
    ``raw_input_contents`` entry; a request read is answered with its inputs as outputs,
    and protobuf reads that reply back."""
    from mip.frontends.oip import inference_pb2 as pb
    from mip.protocol import _oip
    from mip.protocol.dtypes import DATATYPES

    got = _oip.read_infer_request(data)
    if got is None:
        return
    request = pb.ModelInferRequest.FromString(data)
    model, version, request_id, inputs, outputs = got
    assert (model, version, request_id) == (request.model_name, request.model_version,
                                            request.id)
    assert not request.parameters and not any(t.parameters or t.HasField("contents")
                                              for t in request.inputs)
    assert list(inputs) == [t.name for t in request.inputs]
    assert len(request.raw_input_contents) == len(request.inputs)
    for tensor, raw in zip(request.inputs, request.raw_input_contents):
        array = inputs[tensor.name]
        assert list(array.shape) == list(tensor.shape) and array.dtype == DATATYPES[tensor.datatype]
        assert array.tobytes() == raw and array.base is data
    assert outputs == ([o.name for o in request.outputs] or None)
    reply = _oip.write_infer_reply(model, version, request_id, inputs)
    assert reply is not None
    parsed = pb.ModelInferResponse.FromString(b"".join(reply) if isinstance(reply, list) else reply)
    assert [o.name for o in parsed.outputs] == list(inputs)
    assert list(parsed.raw_output_contents) == list(request.raw_input_contents)


# ---- HTTP/1.1: the listener's one-call request head reader ------------------------------

class _LlhttpReading:
    """What httptools (llhttp, set as uvicorn sets it) reports of a request."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.headers_done = self.done = False
        self.body = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value))  # as uvicorn lowercases them

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


def http_head(data: bytes) -> None:
    """``_h1.parse_head`` of the octets: ``None``, or what llhttp reads of the same octets
    (the oracle: it must read them without error): the same target, header fields and body
    length, the head complete at exactly the same octet, ``POST``, HTTP/1.1, keep-alive,
    no upgrade. The head is read the same at any offset, and not at all when cut short."""
    from mip.protocol._h1 import MAX_HEAD, parse_head

    got = parse_head(data)
    assert parse_head(b"\r\nGET " + data, 6) == (
        None if got is None else (got[0] + 6, *got[1:])), "offset"
    if got is None:
        return
    end, target, length, fields = got
    assert 0 < end <= min(len(data), MAX_HEAD)
    assert parse_head(data[:end]) == got and parse_head(data[:end - 1]) is None
    reading = _LlhttpReading()
    parser = reading.parser
    parser.feed_data(data[:end - 1])
    assert not reading.headers_done, "llhttp: the head ends later"
    parser.feed_data(data[end - 1:end])
    assert reading.headers_done, "llhttp: the head is not complete"
    assert parser.get_method() == b"POST" and parser.get_http_version() == "1.1"
    assert parser.should_keep_alive() and not parser.should_upgrade()
    assert reading.url == target, (reading.url, target)
    import httptools

    httptools.parse_url(target)  # (the listener routes by it)
    assert reading.fields == fields, (reading.fields, fields)
    assert [v for k, v in fields if k == b"content-length"] == [b"%d" % length] or (
        [int(v) for k, v in fields if k == b"content-length"] == [length])
    if length <= 4096:
        body = data[end:end + length].ljust(length, b"x")
        parser.feed_data(body)
        assert reading.done and reading.body == body, "llhttp: another body"


HARNESSES = {
    "mip_decode": mip_decode,
    "mip_stream": mip_stream,
    "msip_stream": msip_stream,
    "msip_decode": msip_decode,
    "grpc_messages": grpc_messages,
    "jsonnum": jsonnum,
    "oip_request": oip_request,
    "http_head": http_head,
}
