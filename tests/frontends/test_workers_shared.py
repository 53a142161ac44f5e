"""`mip serve --workers 2 --placement shared`: one engine process runs the models for both
workers, tensors pass through the shared arena; requests of both workers batch together; the
engine process killed under a request fails it cleanly and is started again; a request too
large for the arena is refused with 503 / UNAVAILABLE, and the arena is whole again after."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

import mip
from mip.errors import MipError
from mip.net.mip_client import Client
from mip.serving.demo import build_demo_repository

from _oip_server import add_python_model
from _serve_process import start as _start, stop as _stop
from _wait import wait_until
from _workers import (MARKED_MODEL, ROUNDS, WAIT, _grpc_client, _held, _in_thread, _marked,
                          _marks, _metrics, _new_holders, _one_of_each, _read_lines,
                          _repository, _ready_on_each)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="memfd, abstract unix sockets, /proc")

# y = x; each batch it runs appends "PID ROWS" to FOLDER/batches.
RECORDING_MODEL = """
import os
import numpy as np

class Recording:
    inputs = [("x", "FP32", [-1, 1])]
    outputs = [("y", "FP32", [-1, 1])]

    def infer(self, inputs):
        x = inputs["x"]
        with open(os.path.join(FOLDER, "batches"), "a") as log:
            log.write(f"{os.getpid()} {x.shape[0]}\\n")
        return {"y": x + 1}
"""
# BYTES in, the same out: object arrays pass through the arena pickled
ECHO_MODEL = """
class Echo:
    inputs = [("s", "BYTES", [-1, 1])]
    outputs = [("t", "BYTES", [-1, 1])]

    def infer(self, inputs):
        return {"t": inputs["s"]}
"""
# loads for 30 s (leaving FOLDER/loading-PID-0 when it starts)
SLOW_MODEL = """
import os
import time

class Slow:
    inputs = [("x", "FP32", [-1, 1])]
    outputs = [("y", "FP32", [-1, 1])]

    def __init__(self):
        open(os.path.join(FOLDER, f"loading-{os.getpid()}-0"), "w").close()
        time.sleep(30)

    def infer(self, inputs):
        return {"y": inputs["x"]}
"""
#: a batch waits (up to a minute) for a second request: two requests make one batch of 2
RECORDING_CONFIG = {"max_batch_size": 8,
                    "dynamic_batching": {"max_queue_delay_us": 60_000_000,
                                         "preferred_batch_sizes": [2]}}


def _serve(tmp_path, *extra):
    repo = build_demo_repository(tmp_path / "repo")
    (tmp_path / "marks").mkdir()
    folder = repr(str(tmp_path / "marks"))
    add_python_model(repo, "marked", MARKED_MODEL.replace("FOLDER", folder))
    add_python_model(repo, "recording", RECORDING_MODEL.replace("FOLDER", folder),
                     RECORDING_CONFIG)
    add_python_model(repo, "echo", ECHO_MODEL)
    process, out = _start(["--model-repository", str(repo), "--mip", "tcp://127.0.0.1:0",
                           "--mip-model", "identity", "--http", "127.0.0.1:0",
                           "--grpc", "127.0.0.1:0", "--workers", "2", "--placement", "shared",
                           "--log-level", "INFO", *extra], 1,
                          pattern="mip: 2 worker processes serving")
    found = re.search(r"\(pids ([\d, ]+)\) on one engine process \(pid (\d+)\)", out)
    pids = [int(p) for p in found.group(1).split(", ")]
    urls = {"mip": re.search(r"serving MIP on (\S+)", out).group(1),
            "grpc": re.search(r"KServe v2 gRPC on (\S+)", out).group(1),
            "http": re.search(r"REST and /metrics on http://(\S+)", out).group(1)}
    process.output = _read_lines(process)
    process.output.insert(0, out)
    return process, pids, int(found.group(2)), urls


def _arena_used(urls) -> float:
    found = re.search(r"^mip_shared_arena_used_bytes (\S+)$", _metrics(urls["http"]), re.M)
    return float(found.group(1))


def _arena_counter(urls, which: str) -> float:
    """``mip_shared_arena_{which}_bytes_total`` summed over the workers."""
    return sum(float(v) for v in re.findall(rf"^mip_shared_arena_{which}_bytes_total (\S+)$",
                                            _metrics(urls["http"]), re.M))


def _clients_on_each_worker(urls, pids) -> list[Client]:
    """One MIP connection held by each worker."""
    address = urls["mip"].removeprefix("tcp://")
    clients: dict[int, Client] = {}
    for _ in range(ROUNDS):
        before = _held(pids, address)
        client = Client(urls["mip"])
        client.ping()
        (holder,) = _new_holders(pids, address, before)
        if holder in clients:
            client.close()
        else:
            clients[holder] = client
        if len(clients) == len(pids):
            break
    assert set(clients) == set(pids)
    return list(clients.values())


def _recorded(tmp_path) -> list[tuple[int, int]]:
    path = tmp_path / "marks" / "batches"
    if not path.exists():
        return []
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]


def test_one_engine_serves_every_protocol_and_batches_both_workers(tmp_path):
    process, pids, engine, urls = _serve(tmp_path)
    lines = process.output
    clients = []
    try:
        held = {"mip": set(), "grpc": set(), "http": set()}
        for _ in range(ROUNDS):
            for protocol, holders in _one_of_each(urls, pids).items():
                held[protocol] |= holders
            if all(len(h) == 2 for h in held.values()):
                break
        assert held == {"mip": set(pids), "grpc": set(pids), "http": set(pids)}
        # one request from each worker: one batch of 2 rows, in the engine process
        clients = _clients_on_each_worker(urls, pids)
        calls = [_in_thread(lambda c=c, x=x: c.infer([[np.full((1, 1), x, np.float32)]],
                                                     model="recording"))
                 for c, x in zip(clients, (1.0, 2.0))]
        for (thread, outcome), x in zip(calls, (1.0, 2.0)):
            thread.join(WAIT)
            (item,) = outcome[0]
            np.testing.assert_array_equal(item[0], [[x + 1]])
        assert _recorded(tmp_path) == [(engine, 2)]
        # a BYTES tensor (pickled through the arena) and a large one
        body = json.dumps({"inputs": [{"name": "s", "shape": [2, 1], "datatype": "BYTES",
                                       "data": ["ab", "cde"]}]}).encode()
        request = urllib.request.Request(f"http://{urls['http']}/v2/models/echo/infer",
                                         data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=WAIT) as answer:
            (output,) = json.loads(answer.read())["outputs"]
        assert output["datatype"] == "BYTES" and output["data"] == ["ab", "cde"], output
        big = np.arange(64 * 784, dtype=np.float32).reshape(64, 784) / 1e5
        with Client(urls["mip"]) as client:
            (logits,) = client.infer([[big]], model="mlp")
        assert logits[0].shape == (64, 10)
        # its frame was received into the arena: the engine process read it there, and
        # only the small tensors were copied
        assert wait_until(lambda: _arena_counter(urls, "in_place") == big.nbytes, WAIT, 0.1)
        assert 0 < _arena_counter(urls, "copied") < big.nbytes
        # so was a large gRPC request's message: the engine process read its tensor there
        client = _grpc_client(urls["grpc"])
        try:
            tensor = grpcclient.InferInput("input", list(big.shape), "FP32")
            tensor.set_data_from_numpy(big)
            np.testing.assert_allclose(client.infer("mlp", [tensor]).as_numpy("logits"),
                                       logits[0], rtol=1e-5)
        finally:
            client.close()
        assert wait_until(lambda: _arena_counter(urls, "in_place") == 2 * big.nbytes, WAIT,
                          0.1), _metrics(urls["http"])
        assert 0 < _arena_counter(urls, "copied") < big.nbytes
        # the models loaded once: in the engine process
        text = "".join(lines)
        assert text.count("serving mlp version 1") == 1, text
        # every block went back: the gauge of every process's part is 0 (the workers
        # publish theirs within a second)
        assert wait_until(lambda: _arena_used(urls) == 0, WAIT, 0.1), _metrics(urls["http"])
        # the engine process's batches are in the merged /metrics (within a second)
        batches = r'^mip_inference_batch_size_count\{model="recording",version="1"\} 1(\.0)?$'
        assert wait_until(lambda: re.search(batches, _metrics(urls["http"]), re.M), WAIT, 0.1)
    finally:
        for client in clients:
            client.close()
        assert _stop(process) == 0, "".join(lines)


def test_model_changes_are_made_once_and_outlive_the_engine_process(tmp_path):
    process, pids, engine, urls = _serve(tmp_path)
    lines = process.output
    try:
        assert _ready_on_each(urls, pids, "mlp") == dict.fromkeys(pids, 200)
        assert _repository(urls, "mlp", "unload") == (200, {})
        assert 200 not in _ready_on_each(urls, pids, "mlp").values()
        status, body = _repository(urls, "nosuch", "load")
        assert status == 404 and "nosuch" in body["error"], (status, body)
        # a request and a model load in the engine process when it is killed fail at once,
        # cleanly
        add_python_model(tmp_path / "repo", "slow",
                         SLOW_MODEL.replace("FOLDER", repr(str(tmp_path / "marks"))))
        loading, loaded = _in_thread(lambda: _repository(urls, "slow", "load"))
        thread, outcome = _in_thread(_marked(urls["mip"], 30.0))
        assert wait_until(lambda: len(os.listdir(tmp_path / "marks")) == 2, WAIT)
        assert list(_marks(tmp_path)) == [engine]
        shutil.rmtree(tmp_path / "repo" / "slow")  # (not loaded again at the next start)
        os.kill(engine, signal.SIGKILL)
        thread.join(WAIT)
        loading.join(WAIT)
        assert not thread.is_alive() and not loading.is_alive()
        assert isinstance(outcome[0], MipError) and "engine process" in str(outcome[0]), outcome
        status, body = loaded[0]
        assert status == 503 and "engine process" in body["error"], loaded
        assert wait_until(lambda: any("the engine process started again" in line
                                      for line in lines), WAIT)
        # the workers reconnect: every protocol answers again, with the models as they were
        # changed (mlp unloaded), and a load made now reaches both workers
        assert wait_until(lambda: _ready_on_each(urls, pids, "identity")
                          == dict.fromkeys(pids, 200), WAIT, 0.1)
        for holders in _one_of_each(urls, pids).values():
            assert len(holders) == 1
        assert 200 not in _ready_on_each(urls, pids, "mlp").values()
        client = _grpc_client(urls["grpc"])
        try:
            client.load_model("mlp")
        finally:
            client.close()
        assert _ready_on_each(urls, pids, "mlp") == dict.fromkeys(pids, 200)
        text = "".join(lines)
        assert re.search(rf"the engine process \(pid {engine}\) killed by signal 9", text), text
    finally:
        assert _stop(process) == 0, "".join(lines)


def test_a_request_too_large_for_the_arena_is_refused_and_a_dead_worker_leaks_nothing(
        tmp_path):
    # 64 KiB: 32 KiB for the engine's outputs, 16 KiB for each worker's requests
    process, pids, engine, urls = _serve(tmp_path, "--shared-arena-bytes", "64K")
    lines = process.output
    try:
        rows = 300  # 300 x 16 FP32: 19200 octets
        body = json.dumps({"inputs": [{"name": "input", "shape": [rows, 16], "datatype": "FP32",
                                       "data": [0.5] * (rows * 16)}]}).encode()
        request = urllib.request.Request(f"http://{urls['http']}/v2/models/identity/infer",
                                         data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=WAIT)
        assert refused.value.code == 503
        assert "shared arena" in json.loads(refused.value.read())["error"]
        client = _grpc_client(urls["grpc"])
        try:
            tensor = grpcclient.InferInput("input", [rows, 16], "FP32")
            tensor.set_data_from_numpy(np.zeros((rows, 16), np.float32))
            with pytest.raises(InferenceServerException) as failed:
                client.infer("identity", [tensor])
            assert failed.value.status() == "StatusCode.UNAVAILABLE", failed.value
            small = grpcclient.InferInput("input", [64, 16], "FP32")  # 4096 octets: fits
            data = np.ones((64, 16), np.float32)
            small.set_data_from_numpy(data)
            np.testing.assert_array_equal(client.infer("identity", [small]).as_numpy("output"),
                                          data)
        finally:
            client.close()
        # MIP: a frame too large for the slice is received as usual, and refused
        with Client(urls["mip"]) as client:
            with pytest.raises(MipError, match="shared arena"):
                client.infer([[np.zeros((rows, 16), np.float32)]])
        # a frame announced, and never sent whole, holds its block of the slice until its
        # connection is gone
        frame = b"".join(bytes(memoryview(b)) for b in
                         mip.encode_request_buffers([[np.zeros((96, 16), np.float32)]]))
        host, port = urls["mip"].removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=WAIT) as partial:
            sent = [0]

            def held() -> bool:
                # in small pieces (the block is taken at the first read after the header)
                if sent[0] < 3000:
                    partial.sendall(frame[sent[0]:sent[0] + 100])
                    sent[0] += 100
                return _arena_used(urls) >= len(frame)

            assert wait_until(held, WAIT, 0.1)
        assert wait_until(lambda: _arena_used(urls) == 0, WAIT, 0.1)
        # a worker killed with a request in the engine: its blocks are given back
        thread, outcome = _in_thread(_marked(urls["mip"], 3.0))
        assert wait_until(lambda: _marks(tmp_path), WAIT)
        address = urls["mip"].removeprefix("tcp://")
        holders = set(_held(pids, address).values())
        for pid in holders:
            os.kill(pid, signal.SIGKILL)
        thread.join(WAIT)
        assert isinstance(outcome[0], ConnectionError), outcome
        assert wait_until(lambda: all(f"worker {pids.index(p)} started again" in "".join(lines)
                                      for p in holders), WAIT)
        assert wait_until(lambda: _arena_used(urls) == 0, WAIT, 0.2), _metrics(urls["http"])
    finally:
        assert _stop(process) == 0, "".join(lines)


def test_arena_blocks_are_bounded_and_whole_again_when_freed():
    from mip.serving.arena import ALIGN, Arena, ArenaFull, Blocks, leased, read, write

    blocks = Blocks(1024, 4096)
    first, second, third = blocks.alloc(100), blocks.alloc(ALIGN), blocks.alloc(200)
    assert (first, second, third) == (1024, 1024 + 128, 1024 + 192)
    assert blocks.alloc(4096) is None  # never more than the part
    blocks.free(second)
    assert blocks.alloc(ALIGN) == second  # first fit
    for block in (first, second, third):
        blocks.free(block)
    assert blocks.used == 0 and blocks.alloc(4096) == 1024  # joined back into one range
    blocks.free(1024)
    assert blocks.reserve(2048, 100) and not blocks.reserve(2048, 1)
    blocks.free(2048)
    assert blocks.alloc(4096) == 1024

    arena = Arena(1 << 16)
    part = Blocks(0, 1024)
    tensors = {"x": np.arange(6, dtype=np.float32).reshape(2, 3),
               "s": np.array([b"a", b"bc"], dtype=object)}
    block, described = write(arena, part, tensors, "the tensors")
    seen = read(arena, described)
    np.testing.assert_array_equal(seen["x"], tensors["x"])
    assert list(seen["s"]) == [b"a", b"bc"]
    released = []
    views = leased(arena, block, part.size_of(block), described, released.append)
    row = views["x"][1]
    del views
    assert released == []  # a view of the block is alive
    np.testing.assert_array_equal(row, [3, 4, 5])
    del row
    assert released == [block]
    with pytest.raises(ArenaFull, match="--shared-arena-bytes"):
        write(arena, part, {"x": np.zeros(1024, np.uint8)}, "the tensors")


def test_a_frame_received_into_the_arena_is_read_in_place_and_its_block_given_back():
    import mip
    from mip.serving.arena import Arena, Blocks, frame_memory, in_place, read

    arena = Arena(1 << 17)
    part = Blocks(1 << 16, 1 << 16)
    parser = mip.FrameParser()
    parser.frame_memory = frame_memory(arena, part, part.free)

    def receive(x):
        frame = b"".join(bytes(memoryview(b)) for b in mip.encode_request_buffers([[x]]))
        messages, sent = [], 0
        while sent < len(frame):
            buffer = parser.get_buffer(-1)
            n = min(len(buffer), len(frame) - sent)
            buffer[:n] = frame[sent:sent + n]
            del buffer
            sent += n
            messages += parser.buffer_updated(n)
        (message,) = messages
        return message.column(0)

    x = np.arange(2048, dtype=np.float32).reshape(2, 1024)  # 8 KiB: a frame of its own
    tensor = receive(x)
    assert part.used > x.nbytes
    described, rest = in_place(arena, {"x": tensor, "small": np.ones(4)}, part.start,
                               part.start + part.size)
    assert list(rest) == ["small"] and [d[0] for d in described] == ["x"]
    np.testing.assert_array_equal(read(arena, described)["x"], x)  # what the engine reads
    del tensor
    assert part.used == 0  # the frame and its views are gone: the block is free again
    # frames take half of the part at most: past that, the frame is received into the
    # parser's own memory (and copied later)
    held = part.alloc(part.size // 2 - 4096)
    tensor = receive(x)
    np.testing.assert_array_equal(tensor, x)
    assert in_place(arena, {"x": tensor}, part.start, part.start + part.size)[0] == []
    assert part.used == part.size // 2 - 4096
    part.free(held)


def test_sigterm_drains_the_workers_then_the_engine_process(tmp_path):
    process, pids, engine, urls = _serve(tmp_path)
    clients = []
    try:
        clients = _clients_on_each_worker(urls, pids)
        # the model runs one request at a time: one runs, the other waits in the engine's
        # queue when SIGTERM comes, and both are answered
        xs = (1.5, 1.25)
        calls = [_in_thread(_marked(urls["mip"], x, client)) for client, x in zip(clients, xs)]
        assert wait_until(lambda: _marks(tmp_path), WAIT)
        assert list(_marks(tmp_path)) == [engine]
        process.send_signal(signal.SIGTERM)
        for (thread, outcome), x in zip(calls, xs):
            thread.join(WAIT)
            assert outcome == [x]
        assert process.wait(WAIT) == 0
        assert not os.path.exists(f"/proc/{engine}")
    finally:
        for client in clients:
            client.close()
        if process.poll() is None:
            process.kill()


def _shm_infer(urls, pids, x) -> tuple[int, object]:
    """One gRPC inference on a new connection with its input and output in region "io":
    the worker that served it, and the result (or the error)."""
    before = _held(pids, urls["grpc"])
    client = _grpc_client(urls["grpc"])
    try:
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_shared_memory("io", x.nbytes)
        output = grpcclient.InferRequestedOutput("output")
        output.set_shared_memory("io", x.nbytes, offset=x.nbytes)
        try:
            outcome: object = client.infer("identity", [tensor], outputs=[output])
        except InferenceServerException as exc:
            outcome = exc
        (holder,) = _new_holders(pids, urls["grpc"], before)
        return holder, outcome
    finally:
        client.close()


def test_shared_memory_regions_are_registered_on_every_worker(tmp_path):
    import tritonclient.utils.shared_memory as shm_util

    process, pids, engine, urls = _serve(tmp_path)
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    handle = shm_util.create_shared_memory_region("io", f"/mip-workers-{os.getpid()}",
                                                  2 * x.nbytes)
    try:
        shm_util.set_shared_memory_region(handle, [x])
        client = _grpc_client(urls["grpc"])
        try:
            client.register_system_shared_memory("io", f"/mip-workers-{os.getpid()}",
                                                 2 * x.nbytes)
        finally:
            client.close()
        served: set[int] = set()
        for _ in range(ROUNDS):
            shm_util.set_shared_memory_region(handle, [np.zeros_like(x)], offset=x.nbytes)
            holder, outcome = _shm_infer(urls, pids, x)
            assert not isinstance(outcome, Exception), outcome
            np.testing.assert_array_equal(
                shm_util.get_contents_as_numpy(handle, np.float32, [1, 16], offset=x.nbytes), x)
            served.add(holder)
            if served == set(pids):
                break
        assert served == set(pids)
        # unregistered: on every worker
        status, body = _unregister(urls, "io")
        assert status == 200, body
        refused: set[int] = set()
        for _ in range(ROUNDS):
            holder, outcome = _shm_infer(urls, pids, x)
            assert isinstance(outcome, InferenceServerException), outcome
            assert "io" in outcome.message()
            refused.add(holder)
            if refused == set(pids):
                break
        assert refused == set(pids)
    finally:
        shm_util.destroy_shared_memory_region(handle)
        assert _stop(process) == 0, "".join(process.output)


def _unregister(urls, region: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://{urls['http']}/v2/systemsharedmemory/region/{region}/unregister", data=b"",
        method="POST")
    with urllib.request.urlopen(request, timeout=WAIT) as answer:
        return answer.status, answer.read()


def _frame(x: np.ndarray) -> bytes:
    return b"".join(bytes(memoryview(b)) for b in mip.encode_request_buffers([[x]]))


async def _until(condition) -> bool:
    """Whether ``condition()`` came true within :data:`WAIT` seconds (of the event loop)."""
    import asyncio

    for _ in range(int(WAIT / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


def test_a_closed_connection_is_freed_at_once_with_its_block_of_the_arena():
    """A MIP connection of the shared placement receives a large frame into a block of the
    arena: closed with part of the frame in, the connection (and so the block) is freed
    without the garbage collector, once the timeout sweeper has looked at it."""
    import asyncio
    import gc
    import weakref

    from mip.net.mip_server import MipServer
    from mip.serving.arena import Arena, Blocks, frame_memory

    arena = Arena(1 << 20)
    part = Blocks(1 << 19, 1 << 19)
    frame = _frame(np.zeros((64, 784), np.float32))  # 200 KiB: a frame of its own

    async def never(message):
        raise AssertionError("the frame is never whole")

    async def run() -> None:
        server = MipServer(never, idle_timeout=0.1,
                           frame_memory=frame_memory(arena, part, part.free))
        address = await server.start("tcp://127.0.0.1:0")
        try:
            _, writer = await asyncio.open_connection(address.host, address.port)
            writer.write(frame[:100_000])
            assert await _until(lambda: part.used >= len(frame))  # the frame's block
            (connection,) = server._connections
            freed = weakref.ref(connection)
            del connection
            for _ in range(8):  # a few rounds of the sweeper (every 25 ms) while it is open
                await asyncio.sleep(0.025)
            writer.close()
            await writer.wait_closed()
            assert await _until(lambda: server.connections == 0)
            assert freed() is None  # (nothing refers to it: no cycle, no sweeper's variable)
            assert part.used == 0
        finally:
            await server.stop()

    gc.collect()
    gc.disable()
    try:
        asyncio.run(run())
    finally:
        gc.enable()
