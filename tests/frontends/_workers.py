"""What the tests of ``mip serve --workers N`` share (test_workers*.py): the marked model,
which worker holds a connection (read from /proc), one request per protocol on a new
connection, the merged /metrics, the repository calls."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import threading
import urllib.error
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient

from mip.net.mip_client import Client

X = np.arange(16, dtype=np.float32).reshape(1, 16)
WAIT = 20.0  # seconds, at most, for what the server does on its own
ROUNDS = 40  # connections opened, at most, until each worker has held one (where no worker is steered)
START = 120.0  # seconds, at most, for two workers to load their models on a loaded machine

# y = x after sleeping x seconds; first leaves a file started-PID-X in FOLDER, so that a test
# knows the request is in a worker (and which one).
MARKED_MODEL = """
import os
import time
import numpy as np

class Marked:
    inputs = [("x", "FP32", [-1, 1])]
    outputs = [("y", "FP32", [-1, 1])]

    def infer(self, inputs):
        x = inputs["x"]
        open(os.path.join(FOLDER, f"started-{os.getpid()}-{float(x.max())}"), "w").close()
        time.sleep(min(float(x.max()), 30.0))
        return {"y": np.array(x, copy=True)}
"""


def _socket_inodes(pid) -> set[str]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:  # a worker that was killed
        return inodes
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def _held(pids, address: str) -> dict[int, int]:
    """Client port -> the worker holding the other end, of each of this process's open
    connections to ``address`` (HOST:PORT), read from /proc."""
    server_port = int(address.rsplit(":", 1)[1])
    mine = _socket_inodes("self")
    rows = []
    for name in ("tcp", "tcp6"):  # gRPC's client sockets are IPv6 ones, v4-mapped
        with open(f"/proc/net/{name}") as table:
            rows += [line.split() for line in table.readlines()[1:]]

    def port(field):
        return int(field.split(":")[1], 16)

    client_ports = {port(r[1]) for r in rows if r[9] in mine and port(r[2]) == server_port}
    server_ends = {r[9]: port(r[2]) for r in rows
                   if port(r[1]) == server_port and port(r[2]) in client_ports}
    held = {}
    for pid in pids:
        for inode in _socket_inodes(pid) & set(server_ends):
            held[server_ends[inode]] = pid
    return held


@contextlib.contextmanager
def _only(pids, pid: int):
    """The block's new connections are accepted by worker ``pid``: the others are stopped
    (SIGSTOP) meanwhile, so only it takes them from the shared listening sockets. (Which
    worker accepts a connection is otherwise up to the kernel and the scheduler.)"""
    others = [p for p in pids if p != pid]
    try:
        for other in others:
            os.kill(other, signal.SIGSTOP)
        yield
    finally:
        for other in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(other, signal.SIGCONT)


def _rest_request(address):
    """One inference over a new connection, left open (the caller closes it)."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                                   "data": X.ravel().tolist()}]})
    connection.request("POST", "/v2/models/identity/infer", body,
                       {"Content-Type": "application/json"})
    answer = connection.getresponse()
    assert answer.status == 200, answer.read()
    assert json.loads(answer.read())["outputs"][0]["data"] == X.ravel().tolist()
    return connection


def _grpc_client(address):
    # a subchannel pool of its own: a new connection, not one shared with earlier clients
    return grpcclient.InferenceServerClient(
        address, channel_args=[("grpc.use_local_subchannel_pool", 1)])


def _grpc_request(client):
    tensor = grpcclient.InferInput("input", [1, 16], "FP32")
    tensor.set_data_from_numpy(X)
    np.testing.assert_array_equal(client.infer("identity", [tensor]).as_numpy("output"), X)


def _new_holders(pids, address: str, before: dict[int, int]) -> set[int]:
    """The workers holding this process's connections to ``address`` opened since
    ``before`` (a :func:`_held`): one closed earlier may take a moment to go."""
    return {pid for port, pid in _held(pids, address).items() if port not in before}


def _one_of_each(urls, pids) -> dict[str, set[int]]:
    """One request per protocol, each on a new connection: which worker held each."""
    held = {}
    address = urls["mip"].removeprefix("tcp://")
    before = _held(pids, address)
    with Client(urls["mip"]) as client:
        (item,) = client.infer([[X]])
        np.testing.assert_array_equal(item[0], X)
        held["mip"] = _new_holders(pids, address, before)
    before = _held(pids, urls["http"])
    connection = _rest_request(urls["http"])
    try:
        held["http"] = _new_holders(pids, urls["http"], before)
    finally:
        connection.close()
    before = _held(pids, urls["grpc"])
    client = _grpc_client(urls["grpc"])
    try:
        _grpc_request(client)
        held["grpc"] = _new_holders(pids, urls["grpc"], before)
    finally:
        client.close()
    return held


def _metrics(address) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        return answer.read().decode()


def _marks(tmp_path) -> dict[int, list[str]]:
    """pid -> the x of each marked request that started in it."""
    found: dict[int, list[str]] = {}
    for name in os.listdir(tmp_path / "marks"):
        _, pid, x = name.split("-", 2)
        found.setdefault(int(pid), []).append(x)
    return found


def _in_thread(fn):
    """Run ``fn`` in a thread; returns (thread, outcome list: [result] or [exception])."""
    outcome = []

    def run():
        try:
            outcome.append(fn())
        except BaseException as exc:  # the test looks at it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _marked(url, x: float, client=None):
    def call():
        own = client is None
        c = Client(url) if own else client
        try:
            (item,) = c.infer([[np.full((1, 1), x, np.float32)]], model="marked")
            return float(item[0][0, 0])
        finally:
            if own:
                c.close()
    return call


def _read_lines(process) -> list[str]:
    lines: list[str] = []

    def read():
        for line in process.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _ready_on_each(urls, pids, model: str) -> dict[int, int]:
    """Worker pid -> the status of GET /v2/models/{model}/ready it answers, over a new
    connection to each worker."""
    host, port = urls["http"].rsplit(":", 1)
    statuses: dict[int, int] = {}
    for pid in pids:
        with _only(pids, pid):
            before = _held(pids, urls["http"])
            connection = http.client.HTTPConnection(host, int(port), timeout=10)
            try:
                connection.request("GET", f"/v2/models/{model}/ready")
                answer = connection.getresponse()
                answer.read()
                assert _new_holders(pids, urls["http"], before) == {pid}
                statuses[pid] = answer.status
            finally:
                connection.close()
    return statuses


def _repository(urls, model: str, action: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://{urls['http']}/v2/repository/models/{model}/{action}", data=b"{}",
        method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, {}
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())
