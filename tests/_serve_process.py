"""`mip serve` / `mip broker` as a subprocess, and what the tests measure of it."""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start(args, pattern_count: int, timeout: float = 30.0, command: str = "serve",
          pattern: str = "mip: serving", prefix=(), env=None):
    """Run ``mip COMMAND ARGS`` until `pattern_count` lines starting with `pattern` are
    printed; returns the process and its output so far. `prefix`: a command that runs it
    (``ip netns exec NS``); `env`: more environment variables."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **(env or {}))
    process = subprocess.Popen([*prefix, sys.executable, "-m", "mip.cli", "--log-level",
                                "WARNING", command, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.monotonic() + timeout
    while len([x for x in lines if x.startswith(pattern)]) < pattern_count:
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise AssertionError(f"mip {command} did not start:\n" + "".join(lines)
                                 + (process.stdout.read() if process.stdout else ""))
        lines.append(process.stdout.readline())
    return process, "".join(lines)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen) -> None:
    """Clean-up: SIGTERM, then SIGKILL after 10 s; reaped either way (see :func:`stop` for
    a test that the process stops)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def stop(process) -> int:
    """SIGTERM; the exit status, or ``TimeoutExpired`` after 20 s (the process killed)."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(20)
    finally:
        if process.poll() is None:
            process.kill()


def address(output: str, label: str) -> tuple[str, int]:
    """``(host, port)`` printed after `label` (e.g. "serving MIP on") by the server."""
    found = re.search(re.escape(label) + r" (?:\w+://)?([\d.]+):(\d+)", output)
    assert found, output
    return found.group(1), int(found.group(2))


def rss(pid: int) -> int:
    """Resident memory of process `pid`, in octets."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def connect(host: str, port: int, source: str = "127.0.0.1", timeout: float = 10.0,
            rcvbuf: int | None = None) -> socket.socket:
    """A TCP connection from the loopback address `source` (127.0.0.x: another peer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"",
                  every: float = 0.5) -> tuple[bool, bytes]:
    """Send `trickle` one octet every `every` seconds (nothing if empty) until the peer
    closes or `seconds` pass; returns (closed, what the peer sent)."""
    received = []
    deadline = time.monotonic() + seconds
    position = 0
    sock.settimeout(min(every, seconds))
    while time.monotonic() < deadline:
        if position < len(trickle):
            try:
                sock.send(trickle[position:position + 1])
            except OSError:
                return True, b"".join(received)
            position += 1
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            return True, b"".join(received)
        if not data:
            return True, b"".join(received)
        received.append(data)
    return False, b"".join(received)


class Steady:
    """Calls ``call()`` over and over in a thread (a well-behaved client) until the block
    ends; ``call`` returns whether the answer was right. Counts both outcomes."""

    def __init__(self, call):
        self.call = call
        self.ok = 0
        self.failures: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.call():
                    self.ok += 1
                else:
                    self.failures.append("wrong answer")
            except Exception as exc:  # a failure to report, whatever it is
                self.failures.append(exc)
            time.sleep(0.01)

    def __enter__(self) -> "Steady":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def answered(self, count: int = 2, timeout: float = 30.0) -> None:
        """Wait until `count` more calls were answered right (or one failed): the client's
        connection has been used since. Given to :func:`idle_flood` as ``between``, so the
        flood's first connections, not the client's, are the longest idle when the listener
        makes room, however slow the machine is."""
        answered = self.ok
        deadline = time.monotonic() + timeout
        while self.ok < answered + count and not self.failures:
            assert time.monotonic() < deadline, f"no answer in {timeout} s"
            time.sleep(0.01)

    def check(self) -> None:
        """Every call was answered right, and there were some."""
        assert self.ok > 0 and not self.failures, (self.ok, self.failures[:3])


def flood(sockets: list, chunk: bytes, stop: threading.Event) -> list[threading.Thread]:
    """Threads that send `chunk` on each socket again and again, never reading, until
    `stop` is set."""
    def send(sock):
        sock.settimeout(0.5)
        while not stop.is_set():
            try:
                sock.sendall(chunk)
            except socket.timeout:
                continue
            except OSError:
                return

    threads = [threading.Thread(target=send, args=(s,), daemon=True) for s in sockets]
    for thread in threads:
        thread.start()
    return threads


def in_parallel(function, items) -> list:
    """``function(item)`` for every item, each in a thread of its own; the results."""
    with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(function, items))


# -- the hostile peers that tests/net/test_hostile_*.py and tests/frontends/ send ---------

def idle_flood(host: str, port: int, per_peer: int,
               between=None) -> tuple[bytes, list[socket.socket]]:
    """`per_peer` idle connections from 127.0.0.2, one more from there (what the listener
    answers it is returned), ``between()`` if given, then `per_peer` from 127.0.0.3; returns
    that answer and every socket (the caller closes them)."""
    first = [connect(host, port, "127.0.0.2") for _ in range(per_peer)]
    extra = connect(host, port, "127.0.0.2")
    closed, refusal = closed_within(extra, 10)
    assert closed, "a connection over max_connections_per_peer stayed open"
    if between is not None:
        between()
    second = [connect(host, port, "127.0.0.3") for _ in range(per_peer)]
    return refusal, [extra, *first, *second]


def count_closed(sockets: list[socket.socket]) -> int:
    """How many of `sockets` the listener has closed."""
    return sum(closed_within(s, 0.05)[0] for s in sockets)


def garbage(host: str, port: int, count: int = 10) -> list[tuple[bool, bytes]]:
    """`count` connections that each send 4 KiB of random octets; what came back."""
    rng = random.Random(7)
    results = []
    for _ in range(count):
        sock = connect(host, port, "127.0.0.2")
        sock.sendall(rng.randbytes(4096))
        results.append(closed_within(sock, 10))
        sock.close()
    return results


def liars(process, host: str, port: int, start: bytes, seconds: float,
          count: int = 30) -> tuple[int, list[tuple[bool, bytes]]]:
    """`count` connections from 127.0.0.3 that send `start` (a header claiming far more
    than follows) and stop: the server's growth in RSS and what each got before it was
    closed (within `seconds`)."""
    before = rss(process.pid)
    sockets = [connect(host, port, "127.0.0.3") for _ in range(count)]
    for sock in sockets:
        sock.sendall(start)
    grown = rss(process.pid) - before
    results = in_parallel(lambda s: closed_within(s, seconds), sockets)
    for sock in sockets:
        sock.close()
    return grown, results


def peak_rss_under_flood(process, host: str, port: int, chunk: bytes, connections: int = 10,
                         seconds: float = 8.0) -> int:
    """The server's peak growth in RSS while `connections` clients from 127.0.0.2 send
    `chunk` over and over and never read."""
    before = peak = rss(process.pid)
    hogs = [connect(host, port, "127.0.0.2", rcvbuf=4096) for _ in range(connections)]
    stop_flag = threading.Event()
    threads = flood(hogs, chunk, stop_flag)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        peak = max(peak, rss(process.pid))
    stop_flag.set()
    for thread in threads:
        thread.join(10)
    for sock in hogs:
        sock.close()
    return peak - before


def slowloris(host: str, port: int, trickle: bytes, seconds: float, count: int = 20,
              source: str = "127.0.0.2", first: bytes = b"") -> list[tuple[bool, bytes]]:
    """`count` connections that send `first`, then `trickle` one octet every 0.5 s, in
    parallel: whether the listener closed each within `seconds`, and what it sent."""
    sockets = [connect(host, port, source) for _ in range(count)]
    for sock in sockets:
        if first:
            sock.sendall(first)
    results = in_parallel(lambda s: closed_within(s, seconds, trickle), sockets)
    for sock in sockets:
        sock.close()
    return results


def exchange(host: str, port: int, data: bytes, seconds: float = 10.0) -> tuple[bool, bytes]:
    """Send `data` from 127.0.0.2; whether the listener closed within `seconds`, and what it
    sent."""
    sock = connect(host, port, "127.0.0.2")
    try:
        sock.sendall(data)
        return closed_within(sock, seconds)
    finally:
        sock.close()
