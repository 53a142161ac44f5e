"""REST under `mip serve --workers 2 --placement shared`: a binary-extension body is received
into the worker's slice of the shared arena and a large JSON array parsed into it, so the
engine process reads their tensors in place (none copied), while a model of each worker's own
reads its requests where they are; a client that leaves while its body comes, or while the
engine process runs its request, leaves the arena empty."""

from __future__ import annotations

import http.client
import json
import socket
import sys

import numpy as np
import pytest

from _wait import wait_until
from _oip_server import add_python_model
from _workers import MARKED_MODEL, WAIT, _marks, _metrics
from _serve_process import stop as _stop
from test_workers_shared import _arena_counter, _arena_used, _serve

# MARKED_MODEL (runs for x.max() seconds, after leaving a mark) of 1024 values a row
WIDE_MARKED_MODEL = MARKED_MODEL.replace("[-1, 1]", "[-1, 1024]")

# y = x, a model of each worker's own ("placement": "worker")
OWN_MODEL = """
class Own:
    inputs = [("x", "FP32", [-1, 1024])]
    outputs = [("y", "FP32", [-1, 1024])]

    def infer(self, inputs):
        return {"y": inputs["x"]}
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="memfd, abstract unix sockets, /proc")


def _binary_body(name: str, x: np.ndarray, datatype: str = "FP32") -> tuple[bytes, int]:
    header = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype,
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + x.tobytes(), len(header)


def _post(address: str, model: str, body: bytes, headers: dict) -> tuple[int, dict, bytes]:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    try:
        connection.request("POST", f"/v2/models/{model}/infer", body, headers)
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


def _binary_output(headers: dict, reply: bytes, shape) -> np.ndarray:
    length = int(headers["inference-header-content-length"])
    (output,) = json.loads(reply[:length])["outputs"]
    assert output["shape"] == list(shape), output
    return np.frombuffer(reply[length:], np.float32).reshape(shape)


def test_rest_inputs_are_read_in_place_and_their_blocks_given_back(tmp_path):
    add_python_model(tmp_path / "repo", "own", OWN_MODEL, {"placement": "worker"})
    process, pids, engine, urls = _serve(tmp_path)
    lines = process.output
    address = urls["http"]
    try:
        # binary data: the body is received into the arena, the input is a view of it
        x = (np.arange(64 * 16, dtype=np.float32) / 7).reshape(64, 16)  # IN_PLACE_MIN octets
        body, header = _binary_body("input", x)
        for _ in range(3):  # (the second and later: the header's plan is kept)
            status, headers, reply = _post(address, "identity", body, {
                "Inference-Header-Content-Length": str(header),
                "Content-Type": "application/octet-stream"})
            assert status == 200, reply
            np.testing.assert_array_equal(_binary_output(headers, reply, x.shape), x)
        big = (np.arange(64 * 784, dtype=np.float32) % 255 / 255).reshape(64, 784)
        body, header = _binary_body("input", big)
        status, headers, reply = _post(address, "mlp", body,
                                       {"Inference-Header-Content-Length": str(header)})
        assert status == 200, reply
        logits = _binary_output(headers, reply, (64, 10))
        expected = 3 * x.nbytes + big.nbytes
        assert wait_until(lambda: _arena_counter(urls, "in_place") == expected, WAIT, 0.1), \
            _metrics(address)
        # JSON numbers: parsed into a block of the arena, on the event loop (8 KiB of JSON)
        # and in a worker thread (over 128 KiB)
        for model, y in (("identity", x - 100.5), ("mlp", big)):
            text = json.dumps({"inputs": [{"name": "input", "shape": list(y.shape),
                                           "datatype": "FP32", "data": y.ravel().tolist()}]})
            status, _, reply = _post(address, model, text.encode(),
                                     {"Content-Type": "application/json"})
            assert status == 200, reply
            (output,) = json.loads(reply)["outputs"]
            data = np.array(output["data"], np.float32).reshape(output["shape"])
            if model == "identity":
                np.testing.assert_array_equal(data, y)
            else:
                np.testing.assert_allclose(data, logits, rtol=1e-5, atol=1e-6)
            expected += y.nbytes
            assert wait_until(lambda e=expected: _arena_counter(urls, "in_place") == e, WAIT,
                              0.1), _metrics(address)
        assert _arena_counter(urls, "copied") == 0
        # an input too small to be looked for in the arena: copied, as before
        small = np.ones((4, 16), np.float32)
        body, header = _binary_body("input", small)
        status, headers, reply = _post(address, "identity", body,
                                       {"Inference-Header-Content-Length": str(header)})
        assert status == 200, reply
        np.testing.assert_array_equal(_binary_output(headers, reply, small.shape), small)
        assert wait_until(lambda: _arena_counter(urls, "copied") == small.nbytes, WAIT, 0.1)
        assert _arena_counter(urls, "in_place") == expected
        # a model of each worker's own: its requests are read where they are, as before
        wide = np.ones((2, 1024), np.float32)
        body, header = _binary_body("x", wide)
        status, headers, reply = _post(address, "own", body,
                                       {"Inference-Header-Content-Length": str(header)})
        assert status == 200, reply
        (output,) = json.loads(reply[:int(headers["inference-header-content-length"])])["outputs"]
        assert output["name"] == "y" and output["shape"] == [2, 1024]
        # a body whose JSON header does not parse: refused, its block given back
        status, _, reply = _post(address, "identity", b"{not json" + bytes(8192),
                                 {"Inference-Header-Content-Length": "9"})
        assert status == 400, reply
        assert wait_until(lambda: _arena_used(urls) == 0, WAIT, 0.1), _metrics(address)
        assert _arena_counter(urls, "in_place") == expected
        assert _arena_counter(urls, "copied") == small.nbytes
    finally:
        assert _stop(process) == 0, "".join(lines)


def test_a_client_leaving_mid_request_leaks_no_block(tmp_path):
    add_python_model(tmp_path / "repo", "wide", WIDE_MARKED_MODEL.replace(
        "FOLDER", repr(str(tmp_path / "marks"))))
    process, pids, engine, urls = _serve(tmp_path)
    lines = process.output
    address = urls["http"]
    host, port = address.rsplit(":", 1)
    try:
        x = np.full((2, 1024), 2.0, np.float32)
        body, header = _binary_body("x", x)
        head = (f"POST /v2/models/wide/infer HTTP/1.1\r\nHost: {address}\r\n"
                f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: {header}\r\n"
                "\r\n").encode()
        # gone while its body comes: the block it was being received into goes back
        with socket.create_connection((host, int(port)), timeout=WAIT) as client:
            client.sendall(head + body[:len(body) // 2])
            assert wait_until(lambda: _arena_used(urls) >= len(body), WAIT, 0.1), \
                _metrics(address)
        assert wait_until(lambda: _arena_used(urls) == 0, WAIT, 0.1), _metrics(address)
        assert not _marks(tmp_path)
        # gone while the engine process runs it: the block goes back once that is done
        with socket.create_connection((host, int(port)), timeout=WAIT) as client:
            client.sendall(head + body)
            assert wait_until(lambda: _marks(tmp_path), WAIT, 0.1)
        assert wait_until(lambda: _arena_used(urls) == 0, WAIT, 0.1), _metrics(address)
        # (each worker's counters reach /metrics on their own schedule)
        assert wait_until(lambda: _arena_counter(urls, "in_place") == x.nbytes, WAIT, 0.1), \
            _metrics(address)
        assert _arena_counter(urls, "copied") == 0
        # the server goes on
        body, header = _binary_body("input", np.zeros((64, 16), np.float32))
        status, _, reply = _post(address, "identity", body,
                                 {"Inference-Header-Content-Length": str(header)})
        assert status == 200, reply
    finally:
        assert _stop(process) == 0, "".join(lines)


def test_a_body_received_into_the_arena_is_read_in_place_and_every_block_given_back():
    from mip.errors import InvalidInput
    from mip.frontends.oip.rest_infer import InferEndpoint
    from mip.net.http_body import Body
    from mip.serving.arena import Arena, Blocks, frame_memory, in_place

    arena = Arena(1 << 20)
    part = Blocks(1 << 19, 1 << 19)  # a worker's slice
    memory = frame_memory(arena, part, part.free)

    class Plane:
        engine = None

    endpoint = InferEndpoint(Plane(), 1 << 20, None)

    def placed(inputs: dict) -> list[str]:
        described, rest = in_place(arena, inputs, part.start, part.start + part.size)
        assert not rest
        return [name for name, *_ in described]

    x = np.arange(2048, dtype=np.float32).reshape(128, 16)
    body, header = _binary_body("input", x)
    for _ in range(2):  # parsed, then read by the plan its header left
        reader = Body(1 << 20, b"%d" % len(body), None, "", memory)
        for start in range(0, len(body), 1000):
            reader.feed(body[start:start + 1000])
        octets = reader.finish()
        assert part.used >= len(body)
        inputs = endpoint.parse(octets, str(header), memory)[1]
        np.testing.assert_array_equal(inputs["input"], x)
        assert placed(inputs) == ["input"]
        del octets, inputs
        assert part.used == 0  # (the plan holds none of it)
    # a JSON array's numbers: into a block of their own
    text = json.dumps({"inputs": [{"name": "input", "shape": [128, 16], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    inputs = endpoint.parse(text, None, memory)[1]
    np.testing.assert_array_equal(inputs["input"], x)
    assert placed(inputs) == ["input"] and part.used >= x.nbytes
    del inputs
    assert part.used == 0
    # refused after its numbers were parsed: given back too
    text = text.replace(b'"shape": [128, 16]', b'"shape": [128, 17]')
    try:
        endpoint.parse(text, None, memory)
    except InvalidInput as exc:
        assert "2176 elements" in str(exc)
    else:
        raise AssertionError("parsed")
    assert part.used == 0
    # a slice with no room: the body is joined in memory of its own, as for any model
    assert Body(1 << 20, b"%d" % (1 << 19), None, "", memory).memory is None
