"""``mip serve --workers N``: N processes serve the same listeners.

The parent binds every listener once (MIP TCP or unix socket, gRPC, REST) and forks the
workers, which inherit the listening sockets: each worker runs the whole of ``mip serve``
(its own engine, models and event loop) and accepts connections from the shared sockets.
One listening queue per listener outlives any worker, so a worker that dies loses only the
connections it had accepted (their clients see the connection reset), never the ones still
waiting to be accepted; port 0 and unix sockets work as with one process, and there is no
moment, while a worker restarts, when the port is unbound. (``SO_REUSEPORT``, one socket per
worker, would balance by a hash of the client's address instead, but the kernel resets the
connections queued on the socket of a worker that dies.)

The parent serves no request: it starts the workers, starts again (after a back-off) one
that dies, relays the model changes made over the API to every worker
(:mod:`mip.model_relay`), forwards SIGTERM and SIGINT so that every worker drains, and
removes what it made (the metrics folder, a unix socket's path) when they are all gone.
When ``--placement shared`` or a model's own placement asks for it (:mod:`mip.serving.remote`)
it also starts one engine process, before the workers, which runs the shared models for all
of them; it is started again the same way when it dies, and stopped after the last worker.
docs/workers.md says what is per worker.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import logging
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from mip.model_relay import MAX_MESSAGE, ModelRelay

__all__ = ["WorkerRole", "Supervisor", "parse_workers", "usable_cores"]

log = logging.getLogger("mip.workers")

#: seconds a worker must have run for its exit to count as a crash of a healthy worker
#: (started again at once) rather than part of a crash loop (started again after a back-off).
HEALTHY_AFTER = 10.0
#: back-off after the first quick exit, doubled for each further one, up to MAX_BACKOFF
#: (seconds).
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: seconds the workers get to drain after SIGTERM before they are killed (beyond their
#: own grace periods, which are shorter).
DRAIN_LIMIT = 60.0
#: queued connections of each shared listening socket.
BACKLOG = 1024
#: the signals the supervisor handles (its workers, their own)
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity calls on this platform
        return max(1, os.cpu_count() or 1)


def parse_workers(text: str) -> int:
    """``--workers``: a positive number of processes, or ``auto`` (one per usable core)."""
    if text.strip().lower() == "auto":
        return usable_cores()
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(
            f"expected a number of worker processes of at least 1, or 'auto', not {text!r}")
    return count


@dataclasses.dataclass
class WorkerRole:
    """What a forked worker knows of its place (given to ``mip serve``'s body).

    Attributes:
        index: 0 … count-1, the slot this worker fills (kept across restarts).
        count: the number of workers.
        sockets: the listening sockets, by listener (``mip``, ``grpc``, ``http``).
        announce: print the listeners' lines (the first start of worker 0 only).
        metrics_dir: where every worker publishes its metrics for the others to merge.
        guard: the credentials made once by the parent (one API key for every worker).
        ready: called once every listener serves.
        control: this worker's end of the socket pair of model changes
            (:class:`~mip.model_relay.WorkerModels`).
        changes: the model changes made over the API before this worker started.
        kind: ``"worker"``, or ``"engine"`` for the engine process of the shared placement.
        shared: the arena, engine address and startup models of the shared placement
            (:class:`~mip.serving.remote.SharedRole`), or ``None`` (no model is shared:
            each worker has every model in its own engine).
    """

    index: int
    count: int
    sockets: dict[str, socket.socket]
    announce: bool
    metrics_dir: str
    guard: object
    ready: Callable[[], None]
    control: socket.socket
    changes: list
    kind: str = "worker"
    shared: Any = None


def bind_listeners(args) -> dict[str, socket.socket]:
    """One listening socket for each listener of ``args`` that is not ``none``."""
    from mip.net.urls import UnixAddress, parse_url, tcp_address

    sockets = {}
    try:
        if args.mip.lower() != "none":
            address = parse_url(args.mip)
            if isinstance(address, UnixAddress):
                sockets["mip"] = _bind_unix(address.path)
            else:
                sockets["mip"] = _bind_tcp(address.host, address.port)
        for name in ("grpc", "http"):
            value = getattr(args, name)
            if value.lower() == "none":
                continue
            tcp = tcp_address(value, f"--{name}")
            sockets[name] = _bind_tcp(tcp.host, tcp.port)
    except BaseException:
        close_listeners(sockets)
        raise
    return sockets


def _bind_tcp(host: str, port: int) -> socket.socket:
    # The first address the name resolves to, as a server with one process binds it.
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _bind_unix(path: str) -> socket.socket:
    from mip.net.mip_server import _remove_stale_socket

    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def close_listeners(sockets: dict[str, socket.socket]) -> None:
    """Close the listening sockets (and remove a unix socket's path)."""
    for sock in sockets.values():
        path = sock.getsockname() if sock.family == socket.AF_UNIX else None
        sock.close()
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)


def describe_exit(status: int) -> str:
    """``exited with status N`` / ``killed by signal NAME`` of a ``waitpid`` status."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return f"killed by signal {number} ({signal.Signals(number).name})"
        return f"killed by signal {number}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


@dataclasses.dataclass
class _Slot:
    index: int
    pid: int = 0
    ready_fd: int = -1  # the read end of the worker's readiness pipe
    ready: bool = False
    started: float = 0.0
    quick_exits: int = 0
    restart_at: float | None = None
    status: int | None = None
    control: socket.socket | None = None  # the supervisor's end of the model-change pair
    last_pid: int = 0  # the pid of the slot's latest worker, for the line of its exit

    @property
    def name(self) -> str:
        return "the engine process" if self.index < 0 else f"worker {self.index}"


class Supervisor:
    """Starts ``count`` workers, each running ``serve(role)`` in a forked process (its
    return value is the worker's exit status), and keeps them running until SIGTERM or
    SIGINT.

    Args:
        count: worker processes.
        sockets: the listening sockets (:func:`bind_listeners`), closed by :meth:`run`.
        serve: runs one worker; called in the child with its :class:`WorkerRole`.
        guard: the credentials shared by every worker (made once, before the workers).
        shared: the arena, address and startup models of the shared placement
            (:class:`~mip.serving.remote.SharedRole`): one engine process, started first
            and stopped last, also runs ``serve`` (with ``role.kind == "engine"``); or
            ``None``: each worker has every model in its own engine.
    """

    def __init__(self, count: int, sockets: dict[str, socket.socket],
                 serve: Callable[[WorkerRole], int], guard=None, shared=None):
        self.count = count
        self.sockets = sockets
        self.serve = serve
        self.guard = guard
        self.shared = shared
        self.slots = [_Slot(i) for i in range(count)]
        #: the engine process's slot (index -1), with the shared placement
        self.engine = _Slot(-1) if shared is not None else None
        self.relay = ModelRelay()
        self.metrics_dir = ""
        self._selector = selectors.DefaultSelector()
        self._stopping = False
        self._serving = False  # every worker started once: from now on, restart
        self._wake_r = self._wake_w = -1

    # -- the parent -------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; the exit status of ``mip serve``: 0 when every
        worker drained and exited 0, else non-zero (a worker could not start: its own
        message says why, printed once)."""
        self.metrics_dir = tempfile.mkdtemp(prefix="mip-metrics-")
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _HANDLED}
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        try:
            return self._supervise()
        finally:
            self._kill_all()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            close_listeners(self.sockets)
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _on_signal(self, number, frame) -> None:
        if number != signal.SIGCHLD and not self._stopping:
            self._stopping = True
            for slot in self.slots:
                if slot.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.pid, signal.SIGTERM)

    def _supervise(self) -> int:
        # The first worker alone: an error every worker would meet (the model repository,
        # a model that does not load) is reported once, by it, and stops the server.
        if self.engine is not None:  # the models load there, once, before any worker
            self._start(self.engine, announce=False)
            if not self._wait_ready([self.engine]):
                return self._drain() if self._stopping else self._failed_start()
        first = self.slots[0]
        self._start(first, announce=True)
        if not self._wait_ready([first]):
            return self._drain() if self._stopping else self._failed_start()
        for slot in self.slots[1:]:
            self._start(slot, announce=False)
        if not self._wait_ready(self.slots[1:]):
            return self._drain() if self._stopping else self._failed_start()
        print(f"mip: {self.count} worker processes serving (pids "
              f"{', '.join(str(s.pid) for s in self.slots)})"
              + (f" on one engine process (pid {self.engine.pid})" if self.engine else ""),
              flush=True)
        self._serving = True
        while not self._stopping:
            self._step(self._next_timeout())
            now = time.monotonic()
            for slot in self._every():
                if not slot.pid and slot.restart_at is not None and now >= slot.restart_at:
                    slot.restart_at = None
                    self._start(slot, announce=False)
        return self._drain()

    def _every(self) -> list[_Slot]:
        """The workers' slots, and the engine process's (last) if there is one."""
        return self.slots + ([self.engine] if self.engine is not None else [])

    def _failed_start(self) -> int:
        self._stopping = True
        statuses = [s.status for s in self._every() if s.status]
        self._drain()
        code = next((os.waitstatus_to_exitcode(s) for s in statuses if os.WIFEXITED(s)), 1)
        return code or 1

    def _wait_ready(self, slots: list[_Slot]) -> bool:
        """Until every slot's worker is ready (True) or one exits first or a stop
        signal comes (False)."""
        while not self._stopping:
            if any(not s.pid for s in slots):
                return False
            if all(s.ready for s in slots):
                return True
            self._step(None)
        return False

    def _next_timeout(self) -> float | None:
        times = [s.restart_at for s in self._every() if s.restart_at is not None]
        return None if not times else max(0.0, min(times) - time.monotonic())

    def _step(self, timeout: float | None) -> None:
        """Wait for a signal, a readiness message or ``timeout`` seconds; then reap."""
        for key, _ in self._selector.select(timeout):
            if key.fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 512):
                        pass
                continue
            slot, channel = key.data
            if channel == "control":
                self._on_control(slot)
                continue
            data = b""
            with contextlib.suppress(OSError):
                data = os.read(key.fd, 16)
            if data:
                slot.ready = True
                if self._serving:
                    log.info("%s started again (pid %d)", slot.name, slot.pid)
            self._selector.unregister(key.fd)  # one message, or the end of the worker
            os.close(key.fd)
            slot.ready_fd = -1
        self._reap()

    def _controls(self) -> dict[int, socket.socket]:
        return {s.index: s.control for s in self.slots if s.pid and s.control is not None}

    def _on_control(self, slot: _Slot) -> None:
        if slot.control is None:
            return
        try:
            data = slot.control.recv(MAX_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the worker is exiting: its exit is reaped
            self._close_control(slot)
            return
        try:
            self.relay.on_message(slot.index, data, self._controls())
        except Exception:
            log.exception("%s sent a model change that could not be handled", slot.name)

    def _close_control(self, slot: _Slot) -> None:
        if slot.control is not None:
            self._selector.unregister(slot.control)
            slot.control.close()
            slot.control = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self._every() if s.pid == pid), None)
            if slot is None:
                continue
            self._exited(slot, status)

    def _exited(self, slot: _Slot, status: int) -> None:
        slot.pid, slot.status = 0, status
        was_ready, slot.ready = slot.ready, False
        if slot.ready_fd >= 0:
            self._selector.unregister(slot.ready_fd)
            os.close(slot.ready_fd)
            slot.ready_fd = -1
        self._close_control(slot)
        if slot is not self.engine:
            self.relay.forget(slot.index, self._controls())
        _retire_metrics(self.metrics_dir, slot)
        if (self._stopping and not was_ready and os.WIFSIGNALED(status)
                and os.WTERMSIG(status) == signal.SIGTERM):
            slot.status = 0  # stopped while it was starting, before it could drain: no error
        if self._stopping or not self._serving:
            return
        lived = time.monotonic() - slot.started
        slot.quick_exits = slot.quick_exits + 1 if lived < HEALTHY_AFTER else 0
        delay = (0.0 if not slot.quick_exits
                 else min(FIRST_BACKOFF * 2 ** (slot.quick_exits - 1), MAX_BACKOFF))
        log.warning("%s (pid %d) %s%s; starting it again in %.1f s", slot.name,
                    slot.last_pid, describe_exit(status),
                    "" if was_ready else " before it was ready", delay)
        slot.restart_at = time.monotonic() + delay

    def _drain(self) -> int:
        # The listeners close once the last worker has closed its copy too: new
        # connections are refused from then on instead of waiting for the end.
        close_listeners(self.sockets)
        self.sockets = {}
        for slot in self.slots:
            if not slot.pid:  # its exit was reported already
                slot.status = None
        deadline = time.monotonic() + DRAIN_LIMIT
        while any(s.pid for s in self.slots):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for slot in self.slots:
                    if slot.pid:
                        log.error("worker %d (pid %d) still draining after %.0f s: killed",
                                  slot.index, slot.pid, DRAIN_LIMIT)
                self._kill_all()
                break
            self._step(min(remaining, 1.0))
        self._stop_engine(deadline)
        failed = [s for s in self._every() if s.status]
        return 1 if failed else 0

    def _stop_engine(self, deadline: float) -> None:
        """Once every worker is gone: SIGTERM to the engine process, and wait for it."""
        engine = self.engine
        if engine is None:
            return
        engine.restart_at = None
        if not engine.pid:
            engine.status = None  # its exit was reported already
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine.pid, signal.SIGTERM)
        while engine.pid:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error("the engine process (pid %d) still stopping after %.0f s: killed",
                          engine.pid, DRAIN_LIMIT)
                self._kill_all()
                break
            self._step(min(remaining, 1.0))

    def _kill_all(self) -> None:
        for slot in self._every():
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    _, status = os.waitpid(slot.pid, 0)
                    self._exited(slot, status)

    def _start(self, slot: _Slot, announce: bool) -> None:
        read_fd, write_fd = os.pipe()
        control, worker_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        # Signals wait until the worker has its own handlers (not the supervisor's).
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(read_fd)
            control.close()
            code = 1
            try:
                code = self._child(slot, announce, write_fd, worker_control)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
        os.close(write_fd)
        worker_control.close()
        slot.pid = slot.last_pid = pid
        slot.ready, slot.status, slot.started = False, None, time.monotonic()
        slot.ready_fd = read_fd
        self._selector.register(read_fd, selectors.EVENT_READ, (slot, "ready"))
        control.setblocking(False)
        slot.control = control
        self._selector.register(control, selectors.EVENT_READ, (slot, "control"))

    def _child(self, slot: _Slot, announce: bool, ready_fd: int,
               control: socket.socket) -> int:
        signal.set_wakeup_fd(-1)
        for sig in _HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
        _die_with_parent()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for other in self._every():
            if other.ready_fd >= 0:
                os.close(other.ready_fd)
            if other.control is not None:
                other.control.close()

        def ready() -> None:
            os.write(ready_fd, b"r")
            os.close(ready_fd)

        if slot is self.engine:  # it serves no listener
            close_listeners_of_child(self.sockets)
        role = WorkerRole(index=slot.index, count=self.count,
                          sockets={} if slot is self.engine else self.sockets,
                          announce=announce, metrics_dir=self.metrics_dir, guard=self.guard,
                          ready=ready, control=control, changes=list(self.relay.changes),
                          kind="engine" if slot is self.engine else "worker",
                          shared=self.shared)
        return self.serve(role)


def close_listeners_of_child(sockets: dict[str, socket.socket]) -> None:
    """Close a forked process's copies of the listening sockets (the paths stay)."""
    for sock in sockets.values():
        sock.close()


def _retire_metrics(folder: str, slot: _Slot) -> None:
    from mip.frontends.oip.worker_metrics import retire

    retire(folder, slot.last_pid)


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (no orphaned workers
    serving after the supervisor was killed)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the request
        os.kill(os.getpid(), signal.SIGTERM)
