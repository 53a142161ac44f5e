"""Golden MIP byte vectors, written from the specification (not from our encoder).

The simplest frames are spelled out as hex; the rest come from the struct-only
reference builder in ``_wire``. Every vector is checked both ways: our encoder
must produce exactly these octets and our decoder must read them back.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import threading

import numpy as np
import pytest

import mip
from mip.errors import ErrorCode

from . import _wire
from ._values import expected_batch, mip_batch, observed_batch, ref_batch

PING = bytes.fromhex("00 01 00 00 00000000")
PONG = bytes.fromhex("00 01 01 00 00000000")


# -- constants ---------------------------------------------------------------


def test_constants_match_the_wire():
    assert (mip.KIND_ERROR, mip.KIND_PING, mip.KIND_INFERENCE, mip.KIND_ROUTED) == (0, 1, 2, 3)
    assert (mip.REQUEST, mip.RESPONSE) == (0, 1)
    assert (mip.TEXT, mip.JSON, mip.IMAGE, mip.TENSOR) == (1, 2, 3, 16)
    assert mip.ErrorCode is ErrorCode
    assert [int(c) for c in ErrorCode] == [0, 1, 2, 3, 4, 5]
    assert [c.name for c in ErrorCode] == ["PROTOCOL", "SUBTYPE", "METHOD", "MEMORY", "SHAPE", "INTERNAL"]


# -- ping, pong, error -------------------------------------------------------


def test_ping_bytes():
    assert mip.encode_ping() == PING
    assert mip.encode_ping() == _wire.ping()


def test_pong_bytes():
    assert mip.encode_pong() == PONG
    assert mip.encode_pong() == _wire.pong()


def test_decode_ping_and_pong():
    m = mip.decode(PING)
    assert (m.kind, m.subtype) == (mip.KIND_PING, mip.REQUEST)
    assert m.is_request and not m.is_response
    assert m.error_code is None
    assert m.model is None and m.version is None
    assert list(m.batch) == []
    m = mip.decode(PONG)
    assert (m.kind, m.subtype) == (mip.KIND_PING, mip.RESPONSE)
    assert m.is_response and not m.is_request
    assert m.error_code is None


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_frame_bytes(code):
    golden = bytes([0, 0, int(code), 0, 0, 0, 0, 0])
    assert golden == _wire.error(code)
    assert mip.encode_error(code) == golden
    assert mip.encode_error(int(code)) == golden


@pytest.mark.parametrize("code", list(ErrorCode))
def test_decode_error_frame(code):
    m = mip.decode(bytes([0, 0, int(code), 0, 0, 0, 0, 0]))
    assert m.kind == mip.KIND_ERROR
    assert m.error_code == code
    assert isinstance(m.error_code, int)
    assert m.subtype == code
    assert list(m.batch) == []


# -- inference frames spelled out in hex -------------------------------------


def test_text_request_hex():
    golden = bytes.fromhex(
        "00 02 00 00 0000000e"  # version 0, kind 2, request, reserved, remaining 14
        "01 00 0001"  # n_input 1, n_output 0, batch 1
        "00000001 00000002 6869"  # TEXT, size 2, "hi"
    )
    assert mip.encode_request([[mip.Text("hi")]]) == golden
    assert mip.encode_request([["hi"]]) == golden  # a str is taken as Text
    assert mip.encode_request([[mip.Value(mip.TEXT, b"hi")]]) == golden
    m = mip.decode(golden)
    assert (m.kind, m.subtype, m.n_input, m.n_output) == (2, 0, 1, 0)
    assert m.model is None and m.version is None
    (item,) = m.batch
    (value,) = item
    assert isinstance(value, mip.Text)
    assert value.type == mip.TEXT
    assert value.value == "hi"
    assert bytes(value.data) == b"hi"


def test_two_item_two_input_request_is_item_major():
    golden = bytes.fromhex(
        "00 02 00 00 0000002c"  # remaining 44 = 4 + 4 * (8 + 2)
        "02 00 0002"
        "00000001 00000002 6130"  # item 0 input 0: "a0"
        "00000003 00000002 ffd8"  # item 0 input 1: image octets
        "00000001 00000002 6131"  # item 1 input 0: "a1"
        "00000003 00000002 ffd9"  # item 1 input 1
    )
    batch = [
        [mip.Text("a0"), mip.Image(b"\xff\xd8")],
        [mip.Text("a1"), mip.Image(b"\xff\xd9")],
    ]
    assert mip.encode_request(batch) == golden
    m = mip.decode(golden)
    assert (m.n_input, m.n_output, len(m.batch)) == (2, 0, 2)
    assert [v.value for v in (m.batch[0][0], m.batch[1][0])] == ["a0", "a1"]
    assert isinstance(m.batch[0][1], mip.Image)
    assert bytes(m.batch[1][1].data) == b"\xff\xd9"


def test_json_request_hex():
    golden = bytes.fromhex(
        "00 02 00 00 00000014"  # remaining 20 = 4 + 8 + 8
        "01 00 0001"
        "00000002 00000008" + b'{"a": 1}'.hex()
    )
    assert mip.encode_request([[mip.Json({"a": 1})]]) == golden
    (item,) = mip.decode(golden).batch
    assert isinstance(item[0], mip.Json)
    assert item[0].type == mip.JSON
    assert item[0].value == {"a": 1}
    assert bytes(item[0].data) == b'{"a": 1}'


def test_text_response_hex():
    golden = bytes.fromhex(
        "00 02 01 00 00000018"  # response, remaining 24 = 4 + 2 * 10
        "01 02 0001"  # n_input 1 (the request's), n_output 2, batch 1
        "00000001 00000002 6f6b"  # "ok"
        "00000002 00000002 5b5d"  # JSON "[]"
    )
    assert mip.encode_response([[mip.Text("ok"), mip.Json([])]], n_input=1) == golden
    m = mip.decode(golden)
    assert (m.kind, m.subtype, m.n_input, m.n_output) == (2, 1, 1, 2)
    assert m.is_response
    assert m.batch[0][0].value == "ok"
    assert m.batch[0][1].value == []


def test_fp32_tensor_request_hex():
    # TLV value starts at 20; header 4 + one dim 4 = 28; pad 4 puts the data at 32.
    golden = bytes.fromhex(
        "00 02 00 00 00000020"  # remaining 32
        "01 00 0001"
        "00000010 00000014"  # TENSOR, size 20 = 4 + 4 + 4 + 8
        "0b 01 04 00"  # FP32, ndim 1, pad 4, flags 0
        "00000002"  # dims, big-endian
        "00000000"  # pad
        "0000803f 00000040"  # 1.0, 2.0 little-endian
    )
    arr = np.array([1.0, 2.0], dtype=np.float32)
    assert mip.encode_request([[arr]]) == golden
    (item,) = mip.decode(golden).batch
    out = item[0]
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32 and out.shape == (2,)
    assert out.tolist() == [1.0, 2.0]


def test_int64_matrix_response_hex():
    # value at 20; header 4 + 2 dims 8 = 32, already aligned: pad 0.
    arr = np.arange(6, dtype=np.int64).reshape(2, 3)
    golden = bytes.fromhex(
        "00 02 01 00 00000048"  # remaining 72 = 4 + 8 + 60
        "03 01 0001"  # n_input 3, n_output 1, batch 1
        "00000010 0000003c"  # TENSOR, size 60 = 4 + 8 + 0 + 48
        "09 02 00 00"  # INT64, ndim 2, pad 0
        "00000002 00000003"
    ) + b"".join(struct.pack("<q", i) for i in range(6))
    assert mip.encode_response([[arr]], n_input=3) == golden
    (item,) = mip.decode(golden).batch
    assert item[0].dtype == np.int64
    assert item[0].tolist() == arr.tolist()


def test_bytes_tensor_hex():
    # value at 20; header 4 + 4 = 28; pad 4; elements are u32 LE length + octets.
    arr = np.array([b"ab", b"", b"xyz"], dtype=object)
    golden = bytes.fromhex(
        "00 02 00 00 00000029"  # remaining 41 = 4 + 8 + 29
        "01 00 0001"
        "00000010 0000001d"  # size 29 = 4 + 4 + 4 + (6 + 4 + 7)
        "0d 01 04 00"  # BYTES, ndim 1, pad 4
        "00000003"
        "00000000"
        "02000000 6162"
        "00000000"
        "03000000 78797a"
    )
    assert mip.encode_request([[arr]]) == golden
    (item,) = mip.decode(golden).batch
    assert item[0].shape == (3,)
    assert [bytes(x) for x in item[0]] == [b"ab", b"", b"xyz"]


def test_bytes_elements_of_decoded_json_are_json_text():
    # What a Python model's JSON outputs are in the engine, on every wire's BYTES.
    arr = np.array([{"a": [1, None]}, ["x", 1.5], "text", b"raw"], dtype=object)
    assert mip.protocol.bytes_elements(arr) == [b'{"a": [1, null]}', b'["x", 1.5]', b"text",
                                                b"raw"]


def test_routed_request_hex():
    # Route block: u8 len "resnet", u8 len "1" (9 octets), then the inference payload.
    # The TLV value starts at 8 + 9 + 4 + 8 = 29; header 8 -> 37; pad 3 -> data at 40.
    golden = bytes.fromhex(
        "00 03 00 00 00000024"  # kind 3, remaining 36 = 9 + 4 + 8 + 15
        "06" + b"resnet".hex() + "01" + b"1".hex() + "01 00 0001"
        "00000010 0000000f"  # size 15 = 4 + 4 + 3 + 4
        "04 01 03 00"  # UINT32, ndim 1, pad 3
        "00000001"
        "000000"
        "78563412"  # 0x12345678 little-endian
    )
    arr = np.array([0x12345678], dtype=np.uint32)
    assert mip.encode_request([[arr]], model="resnet", version="1") == golden
    m = mip.decode(golden)
    assert (m.kind, m.subtype, m.n_input, m.n_output) == (3, 0, 1, 0)
    assert m.model == "resnet" and m.version == "1"
    assert m.batch[0][0].tolist() == [0x12345678]
    # The data octets sit at offset 40 of the frame.
    assert golden[40:44] == bytes.fromhex("78563412")


def test_routed_request_without_version():
    golden = bytes.fromhex("00 03 00 00 00000012" "03" + b"cls".hex() + "00" "01 00 0001" "00000001 00000001 78")
    assert mip.encode_request([["x"]], model="cls") == golden
    assert mip.encode_request([["x"]], model="cls", version="") == golden
    m = mip.decode(golden)
    assert m.model == "cls"
    assert m.version in (None, "")
    assert m.batch[0][0].value == "x"


def test_routed_response_has_no_route_block():
    golden = bytes.fromhex("00 03 01 00 0000000d" "01 01 0001" "00000001 00000001 79")
    assert mip.encode_response([["y"]], n_input=1, kind=3) == golden
    m = mip.decode(golden)
    assert (m.kind, m.subtype) == (3, 1)
    assert m.model is None and m.version is None
    assert m.batch[0][0].value == "y"


def test_application_defined_value_type():
    golden = bytes.fromhex("00 02 00 00 0000000f" "01 00 0001" "0000012c 00000003 010203")
    assert mip.encode_request([[mip.Value(300, b"\x01\x02\x03")]]) == golden
    (item,) = mip.decode(golden).batch
    assert isinstance(item[0], mip.Value)
    assert item[0].type == 300
    assert isinstance(item[0].data, memoryview)
    assert bytes(item[0].data) == b"\x01\x02\x03"


# -- reference-built frames -------------------------------------------------

PNG = bytes.fromhex("89504e470d0a1a0a") + bytes(range(40))

CASES = {
    "one text": [[("text", "hello")]],
    "unicode text": [[("text", "héllo wörld ✓")]],
    "empty text": [[("text", "")]],
    "json dict": [[("json", {"b": [1, 2.5, None, True], "a": "x"})]],
    "json non-ascii": [[("json", "é✓")]],
    "json numpy": [[("json", {"f": np.float32(0.5), "i": np.int64(7), "a": np.arange(3)})]],
    "image": [[("image", PNG)]],
    "mixed item": [[("text", "t"), ("json", [1]), ("image", b"\x00\x01")]],
    "three items": [[("text", str(i)), ("image", bytes([i]) * i)] for i in range(3)],
    "app types": [[("raw", 256, b""), ("raw", 0xFFFFFFFF, b"z")]],
    "tensor and text": [[("tensor", np.arange(5, dtype=np.uint8)), ("text", "abc")]],
    "varying pads": [
        [
            ("tensor", np.arange(3, dtype=np.uint8)),
            ("tensor", np.array([1.5, -2.0], dtype=np.float32)),
            ("tensor", np.ones((1, 1, 1), dtype=np.int16)),
            ("text", "odd"),
            ("tensor", np.array(3.25, dtype=np.float64)),
        ]
    ],
    "two items of tensors": [
        [("tensor", np.full((1, 3), i, dtype=np.float32)), ("tensor", np.array([b"x" * i], dtype=object))]
        for i in range(2)
    ],
}


@pytest.mark.parametrize("name", list(CASES))
def test_request_matches_reference(name):
    items = CASES[name]
    golden = _wire.request(ref_batch(items))
    assert mip.encode_request(mip_batch(items)) == golden
    m = mip.decode(golden)
    assert (m.kind, m.subtype, m.n_input, m.n_output) == (2, 0, len(items[0]), 0)
    assert observed_batch(m) == expected_batch(items)


@pytest.mark.parametrize("name", list(CASES))
def test_response_matches_reference(name):
    items = CASES[name]
    golden = _wire.response(ref_batch(items), n_input=7)
    assert mip.encode_response(mip_batch(items), n_input=7) == golden
    m = mip.decode(golden)
    assert (m.kind, m.subtype, m.n_input, m.n_output) == (2, 1, 7, len(items[0]))
    assert observed_batch(m) == expected_batch(items)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("route", [("m", ""), ("model-x", "2"), ("ü", "v10.3")])
def test_routed_request_matches_reference(name, route):
    items = CASES[name]
    golden = _wire.request(ref_batch(items), kind=3, route=route)
    assert mip.encode_request(mip_batch(items), model=route[0], version=route[1]) == golden
    m = mip.decode(golden)
    assert m.kind == 3 and m.model == route[0]
    assert (m.version or "") == route[1]
    assert observed_batch(m) == expected_batch(items)


@pytest.mark.parametrize("name", ["one text", "varying pads", "two items of tensors"])
def test_routed_response_matches_reference(name):
    items = CASES[name]
    golden = _wire.response(ref_batch(items), n_input=1, kind=3)
    assert mip.encode_response(mip_batch(items), n_input=1, kind=3) == golden
    m = mip.decode(golden)
    assert (m.kind, m.subtype, m.model) == (3, 1, None)
    assert observed_batch(m) == expected_batch(items)


def test_value_objects():
    assert mip.Text("é").data == "é".encode()
    assert mip.Text("é").value == "é"
    assert mip.Text("x").type == mip.TEXT
    assert mip.Json({"a": [1, 2]}).data == b'{"a": [1, 2]}'
    assert mip.Json(None).type == mip.JSON
    assert bytes(mip.Image(b"\x89PNG").data) == b"\x89PNG"
    assert mip.Image(b"").type == mip.IMAGE
    assert mip.Value(999, b"q").type == 999


@pytest.mark.parametrize(
    "obj",
    [
        {"a": 1, "b": [1, 2.5, "x"]},
        [np.float32(0.1), np.float64(1e300), np.int8(-3), np.uint64(2**63)],
        {"arr": np.arange(4).reshape(2, 2), "f16": np.float16(1.5)},
        "ünïcode ✓",
        None,
        1.0,
    ],
)
def test_json_bytes_match_kubemo_encoder(obj):
    assert bytes(mip.Json(obj).data) == _wire.json_bytes(obj)
    serialize = pytest.importorskip("kubemo.serialize")
    assert bytes(mip.Json(obj).data) == json.dumps(obj, cls=serialize.JsonEncoder).encode()


# -- byte identity with the real kubemo package -----------------------------


def _recv_exact(conn, n):
    out = bytearray()
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ConnectionError("peer closed")
        out += chunk
    return bytes(out)


def _capture_kubemo_client(batch, n_items):
    """Run ``kubemo.Client().inference`` against a one-shot server on 127.0.0.1 and
    return the octets it sent."""
    kubemo = pytest.importorskip("kubemo")
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.settimeout(10)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    captured = {}
    reply = _wire.response([[(_wire.TEXT, b"ok")]] * n_items, n_input=len(batch[0]))

    def serve():
        try:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(10)
                head = _recv_exact(conn, 8)
                remaining = struct.unpack("!BBBBI", head)[4]
                captured["frame"] = head + _recv_exact(conn, remaining)
                conn.sendall(reply)
        except Exception as exc:  # pragma: no cover - reported below
            captured["error"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        outputs = kubemo.Client().inference(f"tcp://127.0.0.1:{port}", batch)
    finally:
        thread.join(10)
        srv.close()
    assert "error" not in captured, captured.get("error")
    assert [[o.decode() for o in item] for item in outputs] == [["ok"]] * n_items
    return captured["frame"]


def _png(color) -> bytes:
    pil = pytest.importorskip("PIL.Image")
    buf = io.BytesIO()
    pil.new("RGB", (3, 2), color).save(buf, format="PNG")
    return buf.getvalue()


def test_kubemo_client_text_bytes_identical():
    kubemo = pytest.importorskip("kubemo")
    texts = [["hello", "wörld"], ["", "✓ third"]]
    sent = _capture_kubemo_client(tuple(tuple(kubemo.Text(s) for s in item) for item in texts), 2)
    assert sent == mip.encode_request([[mip.Text(s) for s in item] for item in texts])
    assert sent == _wire.request([[(_wire.TEXT, s.encode()) for s in item] for item in texts])


def test_kubemo_client_image_and_text_bytes_identical():
    kubemo = pytest.importorskip("kubemo")
    images = [_png((255, 0, 0)), _png((0, 9, 200))]
    batch = tuple((kubemo.Image(io.BytesIO(img)), kubemo.Text(f"caption {i}")) for i, img in enumerate(images))
    sent = _capture_kubemo_client(batch, 2)
    ours = mip.encode_request([[mip.Image(img), mip.Text(f"caption {i}")] for i, img in enumerate(images)])
    assert sent == ours
    m = mip.decode(sent)
    assert [bytes(item[0].data) for item in m.batch] == images


def _kubemo_echo_server():
    kubemo = pytest.importorskip("kubemo")

    class Upper(kubemo.Inference):
        def preprocess(self, inputs):
            return tuple(x.decode() for x in inputs)

        def concat(self, batch):
            return tuple(zip(*batch))

        def forward(self, inputs):
            return tuple(tuple(s.upper() for s in column) for column in inputs)

        def postprocess(self, outputs):
            return tuple(kubemo.Text(s) for s in outputs)

    server = kubemo.Server("tcp", ("127.0.0.1", 0))
    server.handle(kubemo.InferenceHandler(Upper()))
    return server


def _kubemo_exchange(server, frame: bytes) -> bytes:
    from kubemo.socket import Socket

    ours, theirs = socket.socketpair()
    with ours:
        ours.settimeout(10)
        ours.sendall(frame)
        server.dispatch(Socket(theirs))
        theirs.setblocking(False)
        try:  # drain what the server left unread, so closing does not reset
            while theirs.recv(65536):
                pass
        except BlockingIOError:
            pass
        theirs.close()
        out = bytearray()
        while chunk := ours.recv(65536):
            out += chunk
    return bytes(out)


def test_kubemo_server_answers_our_frames():
    server = _kubemo_echo_server()
    try:
        assert _kubemo_exchange(server, mip.encode_ping()) == mip.encode_pong() == PONG

        request = mip.encode_request([["ab", "cd"], ["ef", "gh"]])
        reply = _kubemo_exchange(server, request)
        golden = _wire.response(
            [[(1, b"AB"), (1, b"CD")], [(1, b"EF"), (1, b"GH")]], n_input=2
        )
        assert reply == golden
        m = mip.decode(reply)
        assert (m.kind, m.subtype, m.n_input, m.n_output) == (2, 1, 2, 2)
        assert [[v.value for v in item] for item in m.batch] == [["AB", "CD"], ["EF", "GH"]]

        # A KubeMo server does not know kind 3: it answers ERROR/METHOD.
        reply = _kubemo_exchange(server, mip.encode_request([["ab"]], model="m"))
        assert reply == mip.encode_error(ErrorCode.METHOD)
        assert mip.decode(reply).error_code == ErrorCode.METHOD
    finally:
        server.close()
