"""Bounded fuzzing inside the normal suite.

Every outcome of decoding hostile input must be a ``Message``/``Frame`` or a
``ProtocolError`` subclass: any other exception (IndexError, struct.error,
UnicodeDecodeError, OverflowError, ...) is a bug, and so is a crash. The random
mutation run is seeded, so a failure names a reproducible input.
"""

from __future__ import annotations

import random
import struct

import ml_dtypes
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import mip
from mip import msip
from mip.errors import ProtocolError

from . import _wire
from ._values import FAST

INTERESTING32 = [0, 1, 2, 3, 4, 7, 8, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
INTERESTING8 = [0, 1, 2, 3, 4, 7, 8, 13, 14, 15, 16, 17, 31, 32, 33, 0x7F, 0x80, 0xFE, 0xFF]


def mip_corpus() -> list[bytes]:
    tensors = [
        np.array([True, False]),
        np.arange(3, dtype=np.uint8),
        np.arange(2, dtype=np.uint16),
        np.arange(2, dtype=np.uint32),
        np.arange(2, dtype=np.uint64).reshape(1, 2),
        np.arange(3, dtype=np.int8),
        np.arange(4, dtype=np.int16).reshape(2, 2),
        np.array(5, dtype=np.int32),
        np.arange(2, dtype=np.int64),
        np.ones(3, dtype=np.float16),
        np.ones((1, 2), dtype=np.float32),
        np.zeros((0, 3), dtype=np.float64),
        np.array([[b"ab", b""], [b"c", b"\xff" * 5]], dtype=object),
        np.ones(2, dtype=ml_dtypes.bfloat16),
    ]
    items = [
        [(1, "héllo".encode()), tensors[0], (2, b'{"a": [1]}'), (3, b"\x89PNG"), (4096, b"app")],
        [(1, b""), tensors[1], (2, b"[]"), (3, b""), (4096, b"")],
    ]
    frames = [
        _wire.ping(),
        _wire.pong(),
        _wire.error(2),
        _wire.request(items),
        _wire.response(items, n_input=3),
        _wire.request(items, kind=3, route=("resnet-50", "3")),
        _wire.response(items, n_input=1, kind=3),
        _wire.request([tensors]),
        _wire.request([[t] for t in tensors[:2]]),
        _wire.response([[t] for t in tensors[10:12]], n_input=1),
    ]
    return frames


def msip_corpus() -> list[bytes]:
    return [
        _wire.msip(1, 3, struct.pack("!Q", 42), 1, 1),
        _wire.msip(2, 2, b"topic/a", 2, 1),
        _wire.msip(4, 1, b"\x00\x05topicdata", 3, 7),
        _wire.msip(8, 1, b"", 4),
        _wire.msip(7, 4, "erreur ✓".encode(), 5),
    ]


def mutate(rnd: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.choice((1, 1, 1, 2, 3))):
        op = rnd.randrange(9)
        n = len(buf)
        if op == 0 and n:  # flip a bit
            i = rnd.randrange(n)
            buf[i] ^= 1 << rnd.randrange(8)
        elif op == 1 and n:  # random octet
            buf[rnd.randrange(n)] = rnd.randrange(256)
        elif op == 2 and n:  # interesting octet
            buf[rnd.randrange(n)] = rnd.choice(INTERESTING8)
        elif op == 3 and n >= 4:  # interesting 32-bit big-endian field
            i = rnd.randrange(n - 3)
            buf[i : i + 4] = struct.pack("!I", rnd.choice(INTERESTING32 + [n, max(n - 8, 0), n + 1]))
        elif op == 4:  # truncate
            del buf[rnd.randrange(n + 1) :]
        elif op == 5:  # insert random octets
            i = rnd.randrange(n + 1)
            buf[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 9)))
        elif op == 6 and n:  # delete a span
            i = rnd.randrange(n)
            del buf[i : i + rnd.randrange(1, 9)]
        elif op == 7 and n:  # duplicate a span
            i = rnd.randrange(n)
            j = min(n, i + rnd.randrange(1, 17))
            buf[i:i] = buf[i:j]
        elif op == 8:  # splice with another frame
            other = rnd.choice(corpus)
            cut = rnd.randrange(len(buf) + 1)
            buf = buf[:cut] + other[rnd.randrange(len(other) + 1) :]
    return bytes(buf)


def touch_message(m) -> None:
    """Read everything a decoded message exposes, so a bad view would be noticed."""
    _ = (m.kind, m.subtype, m.n_input, m.n_output, m.error_code, m.model, m.version, repr(m))
    for item in m.batch:
        for v in item:
            if isinstance(v, np.ndarray):
                if v.dtype == object:
                    for x in v.ravel():
                        bytes(x)
                else:
                    v.tobytes()
            else:
                bytes(v.data)
                if isinstance(v, mip.Text):
                    _ = v.value


def touch_frame(f) -> None:
    _ = (f.frame_type, f.msg_kind, f.flags, f.msg_id, repr(f))
    bytes(f.payload)


def run_decoder(decode, touch, data: bytes) -> str:
    try:
        result = decode(data)
    except ProtocolError:
        return "error"
    except Exception as exc:  # noqa: BLE001 - that is the point of the test
        raise AssertionError(f"{type(exc).__name__}: {exc} for input {data.hex()}") from exc
    touch(result)
    return "ok"


def run_parser(parser_cls, touch, data: bytes, rnd: random.Random) -> None:
    parser = parser_cls()
    cut = rnd.randrange(len(data) + 1)
    try:
        for part in (data[:cut], data[cut:], b""):
            for result in parser.feed(part):
                touch(result)
    except ProtocolError:
        pass
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"{type(exc).__name__}: {exc} for stream {data.hex()} cut at {cut}") from exc


def test_mip_random_mutations():
    rnd = random.Random(0x4D4950)
    corpus = mip_corpus()
    for frame in corpus:
        touch_message(mip.decode(frame))
    outcomes = {"ok": 0, "error": 0}
    for i in range(60000):
        data = mutate(rnd, rnd.choice(corpus), corpus)
        outcomes[run_decoder(mip.decode, touch_message, data)] += 1
        if i % 8 == 0:
            run_parser(mip.FrameParser, touch_message, data, rnd)
    # The mutations must reach both outcomes, or the run proves little.
    assert outcomes["ok"] > 500 and outcomes["error"] > 5000, outcomes


def test_msip_random_mutations():
    rnd = random.Random(0x4D534950)
    corpus = msip_corpus()
    outcomes = {"ok": 0, "error": 0}
    for i in range(30000):
        data = mutate(rnd, rnd.choice(corpus), corpus)
        outcomes[run_decoder(msip.decode, touch_frame, data)] += 1
        if i % 8 == 0:
            run_parser(msip.FrameParser, touch_frame, data, rnd)
        if data[:4] == b"MSIP" and len(data) >= 24:
            payload = data[24:]
            for helper in (msip.decode_publish_payload, msip.decode_hello_payload):
                try:
                    helper(payload)
                except ProtocolError:
                    pass
    assert outcomes["ok"] > 500 and outcomes["error"] > 2000, outcomes


def feed_stream(parser, touch, stream: bytes, rnd: random.Random) -> int:
    """Deliver ``stream`` in random chunks, by ``feed`` or through ``get_buffer``."""
    seen = 0
    pos = 0
    try:
        while pos < len(stream):
            n = min(rnd.randrange(1, 200), len(stream) - pos)
            if rnd.random() < 0.5:
                got = parser.feed(stream[pos : pos + n])
            else:
                buf = parser.get_buffer(rnd.choice((-1, n)))
                n = min(n, len(buf))
                buf[:n] = stream[pos : pos + n]
                got = parser.buffer_updated(n)
            pos += n
            for result in got:
                touch(result)
                seen += 1
        for result in parser.feed(b""):
            touch(result)
            seen += 1
    except ProtocolError:
        pass
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"{type(exc).__name__}: {exc} for stream {stream.hex()}") from exc
    return seen


def test_parsers_on_streams_with_one_bad_frame():
    rnd = random.Random(0x5354)
    for parser_cls, corpus, touch in (
        (mip.FrameParser, mip_corpus(), touch_message),
        (msip.FrameParser, msip_corpus(), touch_frame),
    ):
        for _ in range(1500):
            frames = [rnd.choice(corpus) for _ in range(4)]
            bad = rnd.randrange(4)
            frames[bad] = mutate(rnd, frames[bad], corpus)
            seen = feed_stream(parser_cls(), touch, b"".join(frames), rnd)
            assert seen >= bad  # every good frame before the bad one is delivered


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_mip(data):
    run_decoder(mip.decode, touch_message, data)
    run_parser(mip.FrameParser, touch_message, data, random.Random(len(data)))


@FAST
@given(st.sampled_from([2, 3]), st.sampled_from([0, 1]), st.binary(max_size=300))
def test_arbitrary_payloads_behind_a_valid_mip_header(kind, subtype, payload):
    data = _wire.header(kind, subtype, len(payload)) + payload
    run_decoder(mip.decode, touch_message, data)


@FAST
@given(st.binary(max_size=64), st.integers(0, 8))
def test_arbitrary_tensor_values(value, n_items):
    data = _wire.request([[(16, value)]] * max(n_items, 1))
    run_decoder(mip.decode, touch_message, data)


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bytes_msip(data):
    run_decoder(msip.decode, touch_frame, data)
    run_decoder(msip.decode, touch_frame, b"MSIP\x01" + data)
    run_parser(msip.FrameParser, touch_frame, b"MSIP\x01" + data, random.Random(len(data)))
