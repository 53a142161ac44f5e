"""Hosts without a cluster: Linux network namespaces, one a "host", each with one veth
interface on a bridge of their own (in a namespace of its own too, so nothing of it is on
the machine's network), made by the tests and always removed.

Needs root and iproute2's ``ip``; :func:`require` skips a test, saying which is missing.
Addresses are 198.18.0.N/24, from the range RFC 2544 sets aside for benchmark networks.
A program runs on a host with :meth:`Network.popen` (``ip netns exec``, which also puts
``/etc/netns/NAME/hosts`` over ``/etc/hosts``: :meth:`Network.names` fills it), and a
Python function with :meth:`Network.call` (in a thread moved into the host's namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

SUBNET = "198.18.0"
_CLONE_NEWNET = 0x40000000


def require() -> None:
    """Skip unless this process can make network namespaces."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed (apt-get install iproute2)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add); run the tests as root, "
                    "as CI does")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Network:
    """Hosts named by the caller, on one bridge; a context manager that removes every
    namespace, the processes it started and the files it wrote."""

    def __init__(self, *hosts: str):
        token = f"{os.getpid()}-{secrets.token_hex(3)}"  # unique per run and per network
        self.namespaces = {host: f"mip-{token}-{host}" for host in hosts}
        self.switch = f"mip-{token}-switch"
        self.addresses = {host: f"{SUBNET}.{i + 1}" for i, host in enumerate(hosts)}
        self.processes: list[subprocess.Popen] = []
        self._made: list[str] = []

    def __enter__(self) -> "Network":
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def _make(self) -> None:
        for ns in (self.switch, *self.namespaces.values()):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (host, ns) in enumerate(self.namespaces.items()):
            port = f"p{i}"
            _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[host]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def names(self, host: str, names: dict[str, list[str]]) -> None:
        """What `host` resolves names to (its /etc/hosts under ``ip netns exec``):
        name -> addresses, every one of them returned for the name."""
        folder = Path("/etc/netns") / self.namespaces[host]
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"]
        lines += [f"{address} {name}" for name, addresses in names.items()
                  for address in addresses]
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    def command(self, host: str, args: list[str]) -> list[str]:
        """`args` as run on `host`."""
        return ["ip", "netns", "exec", self.namespaces[host], *args]

    def popen(self, host: str, args: list[str], **kwargs) -> subprocess.Popen:
        """Start `args` on `host` (stopped by :meth:`close` at the latest). ``ip netns exec``
        execs the program: the process's pid is the program's."""
        process = subprocess.Popen(self.command(host, args), **kwargs)
        self.processes.append(process)
        return process

    def call(self, host: str, function, *args, timeout: float = 60.0):
        """``function(*args)`` in a thread moved into `host`'s network namespace (its
        sockets are that host's); its result, or its exception raised here."""
        outcome: dict = {}

        def run():
            try:
                with open(f"/run/netns/{self.namespaces[host]}") as ns:
                    libc = ctypes.CDLL(None, use_errno=True)
                    if libc.setns(ns.fileno(), _CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                outcome["value"] = function(*args)
            except BaseException as exc:  # handed to the caller
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"{function} on {host} did not return in {timeout} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        for ns in reversed(self._made):
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", ns)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self._made = []

    def __exit__(self, *exc) -> None:
        self.close()
