"""Write the seed corpora of the harnesses: valid input made by the encoders.

    python tests/fuzz/make_corpus.py     # rewrites tests/fuzz/corpus/<harness>/

Each file is named by the SHA-1 of its content, as libFuzzer names what it adds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct

import ml_dtypes
import numpy as np

import mip
from mip import msip

HERE = os.path.dirname(os.path.abspath(__file__))


def _mip_frames() -> list[bytes]:
    tensors = [
        np.array([True, False]), np.arange(3, dtype=np.uint8), np.arange(2, dtype=np.uint16),
        np.arange(2, dtype=np.uint32).reshape(1, 2), np.arange(2, dtype=np.int64),
        np.ones(3, dtype=np.float16), np.ones((1, 2), dtype=np.float32), np.zeros((0, 3)),
        np.array([[b"ab", b""], [b"c", b"\xff" * 5]], dtype=object), np.array(5, dtype=np.int32),
        np.ones(2, dtype=ml_dtypes.bfloat16), np.zeros((300, 0), np.int8),
    ]
    values = ["héllo", mip.Json({"a": [1, 2]}), mip.Json.from_bytes(b"{bad"), mip.Image(b"\x89PNG\r\n"),
              mip.Value(4096, b"app")]
    return [
        mip.encode_ping(), mip.encode_pong(), mip.encode_error(3),
        mip.encode_request([tensors]),
        mip.encode_request([[t] for t in tensors[:4]]),
        mip.encode_request([values, values]),
        mip.encode_request([[np.ones((1, 4), np.float32), "a"]] * 3, model="resnet", version="2"),
        mip.encode_request([[np.ones((1, 4), np.float32)]], model="m"),
        mip.encode_response([[np.arange(6, dtype=np.float64).reshape(2, 3)], [np.ones((1, 3))]], n_input=1),
        mip.encode_response([], n_input=2, n_output=3),
        mip.encode_response([[mip.Text("ok"), np.array([1], np.int16)]], n_input=1, kind=mip.KIND_ROUTED),
        mip.encode_request([]),
    ]


def _msip_frames() -> list[bytes]:
    T, K = msip.FrameType, msip.MsgKind
    return [
        msip.encode(T.HELLO, K.COMMAND, msip.encode_hello_payload(7, b"token")),
        msip.encode(T.HELLO, K.COMMAND),
        msip.encode(T.SUBSCRIBE, K.COMMAND, b"sensors/#", msg_id=2),
        msip.encode(T.PUBLISH, K.EVENT, msip.encode_publish_payload("t/1", b"\x00" * 40), msg_id=3, flags=1),
        msip.encode(T.EVENT, K.METRIC, msip.encode_publish_payload("m", b'{"v": 1}'), msg_id=2 ** 63),
        msip.encode(T.ACK, K.STATE, msg_id=3),
        msip.encode(T.ERROR, K.LOG, b"bad topic"),
        msip.encode(T.PING, K.COMMAND), msip.encode(T.PONG, K.COMMAND), msip.encode(T.CLOSE, K.COMMAND),
    ]


def _grpc_bodies() -> list[bytes]:
    def message(payload: bytes, compressed: int = 0) -> bytes:
        return bytes([compressed]) + struct.pack(">I", len(payload)) + payload

    return [
        message(b""), message(b"x" * 10), message(b"a" * 100) + message(b"b", 1) + message(b"c" * 7),
        message(b"y" * 2000), message(b"z" * 50)[:30],
    ]


def _json_bodies() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [
        json.dumps({"inputs": [{"name": "x", "data": rng.integers(-99, 99, 40).tolist()}]}).encode(),
        json.dumps({"data": rng.normal(size=(4, 6)).round(4).tolist()}).encode(),
        b'{"data": [1.5e300, -0.0, 12345678901234567890123, 1e-320, 7]}',
        b'{"s": "[1, 2, \\"]", "a": [ [ ], [1 ,2] ], "b": [1,2,]}',
        b"[[[1]], [[2, 3]], 4]",
    ]


def _infer_requests() -> list[bytes]:
    from mip.frontends.oip import inference_pb2 as pb

    plain = pb.ModelInferRequest(model_name="mlp", model_version="1", id="r")
    plain.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    plain.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    plain.outputs.add(name="y")
    two = pb.ModelInferRequest(model_name="m")
    for name, array in (("a", np.array([[1, 2]], np.int64)), ("b", np.ones(3, np.bool_))):
        two.inputs.add(name=name, datatype="INT64" if array.dtype == np.int64 else "BOOL",
                       shape=array.shape)
        two.raw_input_contents.append(array.tobytes())
    with_parameter = pb.ModelInferRequest()
    with_parameter.CopyFrom(plain)
    with_parameter.parameters["timeout"].int64_param = 5
    return [plain.SerializeToString(), two.SerializeToString(),
            with_parameter.SerializeToString()]


#: request heads as clients send them: tritonclient (geventhttpclient), the KServe SDK
#: (httpx), aiohttp, mip bench's own client
HTTP_HEADS = [
    b"POST /v2/models/identity/infer HTTP/1.1\r\nUser-Agent: python/gevent-http-client-2.3.1"
    b"\r\nHost: 127.0.0.1:8000\r\nContent-Length: 237\r\nInference-Header-Content-Length: 173"
    b"\r\n\r\n",
    b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAccept: */*\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\nConnection: keep-alive\r\n"
    b"User-Agent: python-httpx/0.28.1\r\nContent-Length: 120\r\n"
    b"Content-Type: application/json\r\n\r\n",
    b"POST /v2/models/identity/versions/1/infer HTTP/1.1\r\nHost: localhost:8000\r\n"
    b"Accept: */*\r\nAccept-Encoding: gzip, deflate\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Length: 0\r\n"
    b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: 0\r\n\r\n",
]


def corpora() -> dict[str, list[bytes]]:
    frames = _mip_frames()
    mframes = _msip_frames()
    return {
        "mip_decode": frames,
        "mip_stream": [bytes([sel, seed]) + b"".join(frames[i:i + 4])
                       for sel, seed, i in ((3, 1, 0), (4, 2, 3), (6, 3, 6), (0x85, 4, 8), (7, 5, 0))],
        "msip_decode": mframes,
        "msip_stream": [bytes([sel, seed]) + b"".join(mframes[i:i + 5])
                        for sel, seed, i in ((4, 1, 0), (5, 2, 3), (0x86, 3, 5), (2, 4, 0))],
        "grpc_messages": [bytes([0, limit, seed]) + body
                          for limit, seed, body in zip((5, 3, 4, 2, 5), range(5), _grpc_bodies())]
                         + [bytes([1, 5, 0]) + struct.pack(">I", 9)[1:] + b"\x00\x00\x00\x00\x00\x01"
                            + _grpc_bodies()[1][:9]],
        "jsonnum": [bytes([dt, ml]) + body
                    for dt, ml, body in zip((3, 10, 10, 2, 9), (8, 16, 0, 1, 4), _json_bodies())],
        "oip_request": _infer_requests(),
        "http_head": HTTP_HEADS + [b"POST /a?b=c HTTP/1.1\r\nx-request-id: r\r\n"
                                   b"Content-Length: 3\r\n\r\n{}\n"],
    }


def main() -> None:
    for name, seeds in corpora().items():
        folder = os.path.join(HERE, "corpus", name)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for seed in seeds:
            with open(os.path.join(folder, hashlib.sha1(seed).hexdigest()), "wb") as f:
                f.write(seed)


if __name__ == "__main__":
    main()
