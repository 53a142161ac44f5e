"""KubeMo's unmodified client (the `kubemo` package) against `mip serve`, in its own process:
batches of any size, requests from clients that half-close, and the value kinds KubeMo's
applications register."""

from __future__ import annotations

import io
import json
import re
import socket
import struct
import urllib.request

import pytest

import mip

from _serve_process import start, stop

kubemo = pytest.importorskip("kubemo")
from kubemo.serialize import Serial  # noqa: E402

MAX_BATCH_SIZE = 32

LETTERS = '''
import numpy as np

from mip.kubemo.adaptor.arith import Inference
from mip.kubemo.serialize import Json


class Double(Inference):
    """TEXT "17" -> JSON {"double": 34, "batch": rows in the batch that ran it}."""

    def preprocess(self, inputs):
        return np.array([int(inputs[0].decode())]),

    def forward(self, inputs):
        x = inputs[0]
        return x * 2, np.full(len(x), len(x))

    def postprocess(self, outputs):
        return Json({"double": int(outputs[0]), "batch": int(outputs[1])}),
'''

# A model that registers an application kind (7: two FP64 numbers), ported (mip.kubemo) or
# written for the kubemo package itself; it answers with the point doubled, as kind 7.
POINT = '''
import io
import struct

import numpy as np

from {package}.adaptor.arith import Inference
from {package}.serialize import Serial, register


class Point(Serial):
    kind = 7

    def __init__(self, reader):
        super().__init__(7, reader)

    def decode(self):
        return struct.unpack("!2d", self.reader.read())


register(Point)


class Double(Inference):
    def preprocess(self, inputs):
        point = inputs[0].decode()  # the registered class decodes it (once: a reader)
        assert isinstance(point, tuple)
        return np.array([point]),

    def forward(self, inputs):
        return inputs[0] * 2,

    def postprocess(self, outputs):
        return Point(io.BytesIO(struct.pack("!2d", *outputs[0]))),
'''


class Point(Serial):
    """The client's side of kind 7, registered with KubeMo's own registry."""

    kind = 7

    def __init__(self, reader):
        super().__init__(7, reader)

    def decode(self):
        return struct.unpack("!2d", self.reader.read())


kubemo.serialize.register(Point)


def _repository(root, name: str, source: str, config: dict):
    folder = root / name / "1"
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(source)
    (root / name / "config.json").write_text(json.dumps({"platform": "python", **config}))
    return root


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    """`mip serve` with a batching KubeMo-lifecycle model (max_batch_size 32): MIP and REST
    URLs."""
    repo = _repository(tmp_path_factory.mktemp("letters"), "letters", LETTERS, {
        "max_batch_size": MAX_BATCH_SIZE, "dynamic_batching": {"max_queue_delay_us": 1000}})
    process, out = start(["--model-repository", str(repo), "--mip", "tcp://127.0.0.1:0",
                          "--http", "127.0.0.1:0", "--grpc", "none"], 2)
    try:
        mip_url = re.search(r"serving MIP on (\S+)", out).group(1)
        http_url = "http://" + re.search(r"REST and /metrics on http://(\S+)", out).group(1)
        yield mip_url, http_url
    finally:
        assert stop(process) == 0


def _stats(http_url: str) -> dict:
    with urllib.request.urlopen(f"{http_url}/v2/models/letters/stats", timeout=10) as answer:
        (entry,) = json.load(answer)["model_stats"]
    return entry


@pytest.mark.parametrize("size", [1, 65, 1000])
def test_kubemo_client_batches_of_every_size(letters, size):
    """More items than max_batch_size run as batches of at most that many rows, answered
    as one reply in item order, and counted as one request of `size` inferences."""
    mip_url, http_url = letters
    before = _stats(http_url)
    batch = tuple((kubemo.Text(str(i)),) for i in range(size))
    out = kubemo.Client().inference(mip_url, batch)
    assert len(out) == size
    answers = [item[0].decode() for item in out]
    assert [a["double"] for a in answers] == [2 * i for i in range(size)]
    assert max(a["batch"] for a in answers) <= MAX_BATCH_SIZE
    after = _stats(http_url)
    success = (int(after["inference_stats"]["success"]["count"])
               - int(before["inference_stats"]["success"]["count"]))
    assert success == 1
    assert int(after["inference_count"]) - int(before["inference_count"]) == size
    assert all(int(b["batch_size"]) <= MAX_BATCH_SIZE for b in after["batch_stats"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert executions >= -(-size // MAX_BATCH_SIZE)


def _half_closed(mip_url: str, payload: bytes) -> list[mip.Message]:
    """As `nc -N` does: send, shut the sending side, read every reply until the close."""
    host, port = mip_url.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        parser, replies = mip.FrameParser(), []
        while data := sock.recv(1 << 16):
            replies += parser.feed(data)
    return replies


def _kubemo_request(values: list[str]) -> bytes:
    """The octets KubeMo's client sends: kind 2, n-output 0, one TEXT value an item."""
    payload = struct.pack("!2BH", 1, 0, len(values)) + b"".join(
        struct.pack("!2L", 1, len(v)) + v.encode() for v in values)
    return struct.pack("!4BL", 0, 2, 0, 0, len(payload)) + payload


def test_half_closed_requests_are_answered(letters):
    mip_url, _ = letters
    (reply,) = _half_closed(mip_url, _kubemo_request(["21"]))
    assert reply.batch[0][0].value == {"double": 42, "batch": 1}
    # pipelined, one of them larger than max_batch_size, then a PING
    sizes = [3, 100, 1]
    payload = b"".join(_kubemo_request([str(i) for i in range(n)]) for n in sizes)
    replies = _half_closed(mip_url, payload + mip.encode_ping())
    assert [len(r) for r in replies[:3]] == sizes
    for reply, n in zip(replies, sizes):
        assert [item[0].value["double"] for item in reply.batch] == [2 * i for i in range(n)]
    assert replies[3].kind == mip.KIND_PING and len(replies) == 4


@pytest.mark.parametrize("package", ["mip.kubemo", "kubemo"])
def test_registered_kinds_reach_a_python_model(tmp_path, package):
    """Kind 7, registered by the client and by the model (ported, or written for the
    kubemo package itself), travels both ways, in batches split at max_batch_size."""
    repo = _repository(tmp_path, "point", POINT.format(package=package),
                       {"max_batch_size": 4, "dynamic_batching": {}})
    process, out = start(["--model-repository", str(repo), "--mip", "tcp://127.0.0.1:0",
                          "--http", "none", "--grpc", "none"], 1)
    try:
        mip_url = re.search(r"serving MIP on (\S+)", out).group(1)
        points = tuple((Point(io.BytesIO(struct.pack("!2d", i, -i))),) for i in range(10))
        out = kubemo.Client().inference(mip_url, points)
        assert [item[0].decode() for item in out] == [(2.0 * i, -2.0 * i) for i in range(10)]
        # mip's own client sees the same kind as mip.Value
        with mip.Client(mip_url) as client:
            (item,) = client.infer([[mip.Value(7, struct.pack("!2d", 1.5, 2))]])
        assert item[0] == mip.Value(7, struct.pack("!2d", 3, 4))
    finally:
        assert stop(process) == 0
