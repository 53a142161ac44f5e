"""The shared engine placement: one engine process serves the shared models for every worker
of ``mip serve --workers N`` (``--placement shared``, or a model whose configuration says
``placement: shared``).

The engine process (:func:`serve_engine`) loads the shared models and runs their
:class:`~mip.serving.engine.Engine` (batch queues, providers) once. Each worker holds a
:class:`RemoteEngine` for them beside its own engine (:class:`PlacedEngine` sends each call
to the one serving its model): the same calls the data plane and the
frontends make (``submit``, ``resolve``, metadata, readiness, ``load``/``unload``), answered
from a copy of the engine's model catalogue (pushed by the engine process whenever it
changes) or sent to the engine process over a unix socket.

Tensors do not travel on that socket. A worker's MIP and gRPC connections receive each large
frame or request message into a block of its slice of the shared arena
(:mod:`mip.serving.arena`), and its REST endpoint each binary-extension body and the numbers
of each large JSON array (:mod:`mip.frontends.oip.rest_infer`), so that a request's tensors
are there already; it copies the others (small ones, those received when the slice was
full) into its slice, and sends their offsets; the engine process queues numpy views of
them, in place, in the model's batch queue, where requests of every worker batch together;
it copies the outputs into its own part of the arena (once: see :meth:`EngineHost._answer`)
and sends their offsets back; the worker's reply is encoded from views of them, and the
block is given back when the last view is gone. Messages are length-prefixed pickles
between the processes of one server (the engine's socket is in the abstract namespace, and
accepts only processes whose parent is its own: the supervisor's workers).

When the engine process dies, the requests it held fail at once (``ModelNotReady``, 503 /
``UNAVAILABLE``), every worker reports not ready and connects again until the supervisor
has started it again; the blocks the workers still read are kept by the new one. When a
worker dies, the engine process drops its queued requests and gives back its blocks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import logging
import os
import pickle
import socket
import struct
import threading
from pathlib import Path
from typing import Any

from mip.errors import ModelLoadError, ModelNotReady, ServingError
from mip.model_relay import rebuild_error
from mip.serving import arena as shm
from mip.serving.config import placement_of
from mip.serving.engine import Engine, ModelStats, _Served
from mip.serving.repository import ModelRepository

__all__ = ["PlacedEngine", "RemoteEngine", "SharedRole", "place", "serve_engine"]

log = logging.getLogger("mip.workers")

_HEADER = struct.Struct("<I")
#: octets of the largest control message (descriptions and model configurations, never
#: tensors)
MAX_MESSAGE = 16 << 20
#: seconds between two attempts of a worker to reach the engine process
RECONNECT_EVERY = 0.2
#: seconds, at most, before a worker gives back an output block it no longer reads, when no
#: request carries it back sooner
FREE_AFTER = 0.005


class SharedRole:
    """What every process of the shared placement knows: the arena, its parts, the engine
    process's socket (made by the supervisor before it forks), and the models each kind of
    process loads at start.

    Attributes:
        worker_models: the models every worker loads at start (their placement:
            ``worker``).
        shared_models: the models the engine process loads at start.
    """

    def __init__(self, arena_bytes: int, workers: int, worker_models: list[str],
                 shared_models: list[str]):
        self.arena = shm.Arena(arena_bytes)
        self.engine_part, self.slices = self.arena.parts(workers)
        self.address = f"\0mip-engine-{os.getpid()}-{os.urandom(6).hex()}"
        self.worker_models = worker_models
        self.shared_models = shared_models


def place(root: str | Path, names: list[str], default: str) -> tuple[list[str], list[str]]:
    """The models ``names`` of the repository at ``root``, as they run with ``mip serve
    --workers``: ``(per worker, shared)``, each model by its configuration's placement,
    else ``default`` (``--placement``)."""
    placed: dict[str, list[str]] = {"worker": [], "shared": []}
    for name in names:
        placed[placement_of(Path(root) / name, default)].append(name)
    return placed["worker"], placed["shared"]


def _encode(message) -> bytes:
    data = pickle.dumps(message, protocol=5)
    return _HEADER.pack(len(data)) + data


def _failure(exc: BaseException) -> tuple[str, str, str]:
    if isinstance(exc, asyncio.CancelledError):
        return ("mip.errors", "Cancelled", "the request was cancelled")
    return (type(exc).__module__, type(exc).__qualname__, str(exc))


class _Link(asyncio.Protocol):
    """One socket between a worker and the engine process: messages in, messages out."""

    def __init__(self, handle):
        self.handle = handle
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()
        self._out: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, message) -> None:
        """Queue ``message``; what one step of the event loop sends goes in one write."""
        if not self._out:
            self._loop.call_soon(self._write)
        self._out.append(_encode(message))

    def _write(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= 4:
            (size,) = _HEADER.unpack_from(buffer, start)
            if size > MAX_MESSAGE:
                log.error("a message of %d octets between engine and worker: closing", size)
                if self.transport is not None:
                    self.transport.close()
                return
            if len(buffer) - start - 4 < size:
                break
            message = pickle.loads(buffer[start + 4:start + 4 + size])
            start += 4 + size
            try:
                self.handle(self, message)
            except Exception:
                log.exception("message %r could not be handled", message[0])
        del buffer[:start]

    def connection_lost(self, exc) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        self.handle(self, ("closed",))


# -- the engine process -----------------------------------------------------------------

def _stripped(version):
    """A copy of a model version without its runner (what a worker needs to know)."""
    copied = copy.copy(version)
    copied.runner = None
    return copied


def catalogue(engine: Engine) -> dict:
    """The engine's models as the workers see them (sent whenever they change)."""
    repository = engine.repository
    with repository._lock:
        loaded = {name: [_stripped(v) for v in versions]
                  for name, versions in repository._loaded.items()}
        errors = dict(repository._errors)
    return {"loaded": loaded, "errors": errors, "index": engine.index(),
            "default": engine.default_model(), "ready": engine.ready()}


class _Worker:
    """The engine process's view of one connected worker."""

    def __init__(self, link: _Link):
        self.link = link
        self.slot = -1
        self.pending: dict[int, asyncio.Future] = {}
        self.held: set[int] = set()  # output blocks it has not given back


class EngineHost:
    """Serves ``engine`` to the workers connecting to ``role.address``.

    Args:
        engine: the started engine.
        role: the arena and address (:class:`SharedRole`).
        record: called with each model change made over the API (for the supervisor to
            replay on an engine process started again).
    """

    def __init__(self, engine: Engine, role: SharedRole, record):
        self.engine = engine
        self.role = role
        self.arena = role.arena
        self.blocks = shm.Blocks(*role.engine_part)
        self.record = record
        self.workers: set[_Worker] = set()
        self._by_link: dict[_Link, _Worker] = {}
        self._server: asyncio.AbstractServer | None = None
        self._parent = os.getppid()
        self._changing: set[asyncio.Task] = set()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.role.address)
        sock.listen(128)
        self._server = await asyncio.get_running_loop().create_unix_server(
            self._accept, sock=sock)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for worker in list(self.workers):
            if worker.link.transport is not None:
                worker.link.transport.close()

    def _accept(self) -> _Link:
        link = _Link(self._on_message)
        return link

    def _sibling(self, link: _Link) -> bool:
        """Whether the peer of ``link`` is a process of this server (a child of the
        supervisor, run by the same user)."""
        if link.transport is None:
            return False
        sock = link.transport.get_extra_info("socket")
        try:
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            with open(f"/proc/{pid}/stat") as stat:
                parent = int(stat.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError):
            return False
        return uid == os.getuid() and parent == self._parent

    def _on_message(self, link: _Link, message: tuple) -> None:
        kind = message[0]
        worker = self._by_link.get(link)
        if worker is None:
            if kind == "hello" and self._sibling(link):
                self._hello(link, message)
            elif link.transport is not None:
                link.transport.close()
            return
        if kind == "infer":
            self._infer(worker, message)
        elif kind == "free":
            self._free(worker, message[1])
        elif kind == "cancel":
            future = worker.pending.get(message[1])
            if future is not None:
                future.cancel()
        elif kind in ("load", "unload"):
            task = asyncio.get_running_loop().create_task(self._change(worker, message))
            self._changing.add(task)  # (a task only the loop refers to may be collected)
            task.add_done_callback(self._changing.discard)
        elif kind == "sync":
            link.send(("synced", message[1]))
        elif kind == "closed":
            self._gone(worker)

    def _free(self, worker: _Worker, blocks: list[int]) -> None:
        for block in blocks:
            if block in worker.held:
                worker.held.discard(block)
                self.blocks.free(block)

    def _hello(self, link: _Link, message: tuple) -> None:
        _, slot, held = message
        worker = _Worker(link)
        worker.slot = slot
        for block, size in held:  # blocks of an engine process before this one
            if self.blocks.reserve(block, size):
                worker.held.add(block)
        self.workers.add(worker)
        self._by_link[link] = worker
        link.send(("catalogue", catalogue(self.engine)))

    def _gone(self, worker: _Worker) -> None:
        self.workers.discard(worker)
        self._by_link.pop(worker.link, None)
        for future in list(worker.pending.values()):
            future.cancel()
        worker.pending.clear()
        for block in worker.held:
            self.blocks.free(block)
        worker.held.clear()

    def _infer(self, worker: _Worker, message: tuple) -> None:
        _, number, model, version, deadline, source, split, request_id, described, freed = message
        if freed:
            self._free(worker, freed)
        try:
            inputs = shm.read(self.arena, described)
            future = self.engine.submit(model, inputs, version, deadline, source, None,
                                        split, request_id)
        except Exception as exc:
            worker.link.send(("error", number, _failure(exc)))
            return
        worker.pending[number] = future
        future.add_done_callback(lambda done: self._answer(worker, number, done))

    def _answer(self, worker: _Worker, number: int, future: asyncio.Future) -> None:
        if worker.pending.pop(number, None) is None:  # the worker is gone
            return
        if future.cancelled():
            worker.link.send(("error", number, _failure(asyncio.CancelledError())))
            return
        failure = future.exception()
        if failure is not None:
            worker.link.send(("error", number, _failure(failure)))
            return
        # The one copy of a reply's tensors: the request's rows of the batch's outputs into
        # a block of the engine's part (the worker encodes its reply from views of it). They
        # are not written into the arena in the first place because: ONNX Runtime's
        # ``InferenceSession.run`` (and a Python model) allocates its outputs itself; an
        # IOBinding could bind them to a block, but only with every output's shape known
        # before the run (not so for a dynamic dimension other than the batch's); and such a
        # block would hold the outputs of a whole batch, of several workers' requests, until
        # the last of them is given back (blocks are one a request now, given back by the
        # worker that read it), so that one slow reader would hold the others' memory; the
        # runners and the batcher would also have to take an output allocator.
        try:
            block, described = shm.write(self.arena, self.blocks, future.result(),
                                         "the model's outputs")
        except Exception as exc:
            worker.link.send(("error", number, _failure(exc)))
            return
        worker.held.add(block)
        worker.link.send(("done", number, block, self.blocks.size_of(block), described))

    async def _change(self, worker: _Worker, message: tuple) -> None:
        kind, number, model, config = message
        error = None
        try:
            if kind == "load":
                await self.engine.load(model, config)
            else:
                await self.engine.unload(model)
        except Exception as exc:
            error = _failure(exc)
        self.record((kind, model, config, "shared") if kind == "load"
                    else (kind, model, "shared"))
        self.broadcast()
        worker.link.send(("changed", number, error))

    def broadcast(self) -> None:
        """Send the catalogue to every worker (after a model change)."""
        current = catalogue(self.engine)
        for worker in self.workers:
            worker.link.send(("catalogue", current))

    def used(self) -> int:
        return self.blocks.used


class ArenaCollector:
    """``mip_shared_arena_used_bytes``: the octets of the shared arena held by this process's
    part (summed over the live processes by the merged ``/metrics``); for a worker
    (``remote``: its :class:`RemoteEngine`), the octets of request tensors it copied into
    the arena and those the engine process read where they were received
    (``mip_shared_arena_copied_bytes_total``, ``mip_shared_arena_in_place_bytes_total``)."""

    def __init__(self, used, remote: RemoteEngine | None = None):
        self.used = used
        self.remote = remote

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        family = GaugeMetricFamily("mip_shared_arena_used_bytes",
                                   "Octets of the shared tensor arena in use")
        family.add_metric((), self.used())
        yield family
        if self.remote is not None:
            yield CounterMetricFamily("mip_shared_arena_copied_bytes",
                                      "Octets of request tensors copied into the shared arena",
                                      value=self.remote.copied)
            yield CounterMetricFamily("mip_shared_arena_in_place_bytes",
                                      "Octets of request tensors the engine process read "
                                      "where they were received", value=self.remote.in_place)


async def serve_engine(args, role, make_engine, wait_for_signal) -> int:
    """The engine process: load the repository, serve the workers until SIGTERM.

    Args:
        args: ``mip serve``'s arguments.
        role: its :class:`~mip.workers.WorkerRole` (``role.shared``: the arena).
        make_engine: a coroutine function: the engine of ``args`` serving the models it is
            given, started.
        wait_for_signal: a coroutine function returning at SIGTERM or SIGINT.
    """
    from mip.model_relay import WorkerModels

    engine = await make_engine(args, role.shared.shared_models)
    replaying = WorkerModels(engine, role.control, role.index, placement="shared")
    await replaying.replay(role.changes)

    def record(change: tuple) -> None:
        with contextlib.suppress(OSError):
            role.control.send(pickle.dumps({"kind": "record", "change": change}))

    host = EngineHost(engine, role.shared, record)
    await host.start()
    publisher = None
    if args.http.lower() != "none":  # where /metrics is served
        from mip.frontends.oip.metrics import Metrics
        from mip.frontends.oip.worker_metrics import WorkerMetrics

        metrics = Metrics(engine)  # the batches of every worker's requests
        metrics.add_collector(ArenaCollector(host.used))
        publisher = WorkerMetrics(metrics, role.metrics_dir)
        publisher.start()
    role.ready()
    await wait_for_signal()
    await host.stop()
    await engine.stop()
    if publisher is not None:
        publisher.stop()
    return 0


# -- a worker ---------------------------------------------------------------------------

class RemoteEngine:
    """The engine of a worker of the shared placement: the calls of
    :class:`~mip.serving.engine.Engine` the frontends make, served by the engine process.

    Args:
        root: the model repository's folder (for the messages naming it).
        shared: the arena and the engine's address (:class:`SharedRole`).
        slot: this worker's slot (its slice of the arena).
    """

    def __init__(self, root, shared: SharedRole, slot: int):
        self.repository = ModelRepository(root)
        self.shared = shared
        self.arena = shared.arena
        self.blocks = shm.Blocks(*shared.slices[slot])
        self._slice = (self.blocks.start, self.blocks.start + self.blocks.size)
        self.slot = slot
        #: octets of request tensors copied into the arena, and read by the engine process
        #: where they were received (:func:`~mip.serving.arena.in_place`)
        self.copied = self.in_place = 0
        self._link: _Link | None = None
        self._catalogue: dict = {"index": [], "default": None, "ready": False}
        self._served: dict[tuple[str, str], _Served] = {}
        # request -> its future, its block of copied inputs (or None), and its inputs when
        # some are read in place (their frame's block is given back once they are gone)
        self._pending: dict[int, tuple[asyncio.Future, int | None, Any]] = {}
        self._changes: dict[int, asyncio.Future] = {}
        self._next = 0
        self._held: dict[int, int] = {}  # output blocks read by views here -> octets
        self._freed: collections.deque = collections.deque()
        self._flush_soon = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._task: asyncio.Task | None = None
        self._connected: asyncio.Event | None = None
        self._stopping = False
        self._memory = shm.frame_memory(self.arena, self.blocks, self._received)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, timeout: float = 60.0) -> None:
        """Connect to the engine process and take its catalogue; after ``timeout`` seconds
        without it (the engine process is being started again), go on not ready, and
        connect as soon as it serves."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._connected = asyncio.Event()
        self._task = self._loop.create_task(self._stay_connected())
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("worker %d: the engine process did not answer within %.0f s; not "
                        "ready until it does", self.slot, timeout)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._link is not None and self._link.transport is not None:
            self._link.transport.close()
        self._lost("the server is stopping")

    async def _stay_connected(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.shared.address)  # local: at once, or refused
                sock.setblocking(False)
                _, link = await loop.create_unix_connection(
                    lambda: _Link(self._on_message), sock=sock)
            except OSError:
                sock.close()
                await asyncio.sleep(RECONNECT_EVERY)
                continue
            link.send(("hello", self.slot, list(self._held.items())))
            await link.closed
            if not self._stopping:
                await asyncio.sleep(RECONNECT_EVERY)

    def _lost(self, why: str) -> None:
        self._link = None
        self._catalogue = dict(self._catalogue, ready=False)
        if self._connected is not None:
            self._connected.clear()
        pending, self._pending = self._pending, {}
        for future, block, _ in pending.values():
            self._free_inputs(block)  # the engine process that read it is gone
            if not future.done():
                future.set_exception(ModelNotReady(why))
        changes, self._changes = self._changes, {}
        for future in changes.values():
            if not future.done():
                future.set_exception(ModelNotReady(why))

    # -- messages from the engine process ---------------------------------------------

    def _on_message(self, link: _Link, message: tuple) -> None:
        kind = message[0]
        if kind == "done":
            _, number, block, size, described = message
            entry = self._pending.pop(number, None)
            self._held[block] = size
            outputs = shm.leased(self.arena, block, size, described, self._release)
            if entry is None:
                return
            future, inputs, _ = entry
            self._free_inputs(inputs)
            if not future.done():
                future.set_result(outputs)
        elif kind == "error":
            entry = self._pending.pop(message[1], None)
            if entry is not None:
                future, inputs, _ = entry
                self._free_inputs(inputs)
                if not future.done():
                    future.set_exception(rebuild_error(message[2]))
        elif kind == "catalogue":
            self._take(message[1])
            self._link = link
            if self._connected is not None:
                self._connected.set()
        elif kind in ("changed", "synced"):
            waiting = self._changes.pop(message[1], None)
            if waiting is not None and not waiting.done():
                waiting.set_result(message[2] if kind == "changed" else None)
        elif kind == "closed":
            if self._link is link or self._link is None:
                self._lost("the engine process stopped; it is being started again")

    def _take(self, current: dict) -> None:
        self._catalogue = current
        repository = self.repository
        with repository._lock:
            repository._loaded = current["loaded"]
            repository._errors = current["errors"]
        self._served = {(v.name, v.version): _Served(v, None, None)  # type: ignore[arg-type]
                        for versions in current["loaded"].values() for v in versions
                        if v.ready}

    def _free_inputs(self, block: int | None) -> None:
        if block is not None:
            self.blocks.free(block)

    @property
    def frame_memory(self):
        """Receive memory for a MIP frame parser's large frames, a REST request's body and
        the arrays of its JSON numbers: blocks of this worker's slice
        (:func:`~mip.serving.arena.frame_memory`; called on the event loop's thread)."""
        return self._memory

    def _received(self, block: int) -> None:
        """A frame's block is no longer read (from any thread): free again."""
        if threading.get_ident() == self._thread:
            self.blocks.free(block)
        elif self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._loop.call_soon_threadsafe(self.blocks.free, block)

    def _release(self, block: int) -> None:
        """The last view of output ``block`` is gone (from any thread): the block goes back
        with the next request, or on its own within :data:`FREE_AFTER` seconds."""
        self._freed.append(block)
        if not self._flush_soon and self._loop is not None:
            self._flush_soon = True
            if threading.get_ident() == self._thread:
                self._loop.call_later(FREE_AFTER, self._flush)
            else:
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    self._loop.call_soon_threadsafe(self._loop.call_later, FREE_AFTER,
                                                    self._flush)

    def _given_back(self) -> list[int]:
        """The output blocks released since the last call."""
        blocks = []
        freed, held = self._freed, self._held
        while freed:
            block = freed.popleft()
            if held.pop(block, None) is not None:
                blocks.append(block)
        return blocks

    def _flush(self) -> None:
        self._flush_soon = False
        blocks = self._given_back()
        if blocks and self._link is not None:
            self._link.send(("free", blocks))

    # -- the engine's calls ------------------------------------------------------------

    def submit(self, model: str, inputs: dict, version: str | None = None,
               deadline: float | None = None, source=None, chosen=None,
               split: bool = False, request_id: str | None = None) -> asyncio.Future:
        """:meth:`Engine.submit <mip.serving.engine.Engine.submit>`, run by the engine
        process (the inputs are checked here first, then copied into the arena unless
        they were received there)."""
        link = self._link
        if link is None:
            raise ModelNotReady("the engine process is not reachable (it is being started "
                                "again)")
        if chosen is None:
            chosen = self.repository.get(model, version or None)
        served = self._served.get((chosen.name, chosen.version))
        if served is None or served.version is not chosen:
            raise ModelNotReady(f"model {chosen.name!r} version {chosen.version} is not serving")
        Engine._check_inputs(served, inputs)
        described, copy = shm.in_place(self.arena, inputs, *self._slice)
        block = None
        if described:
            self.in_place += sum(d[4] for d in described)
        if copy:
            block, copied = shm.write(self.arena, self.blocks, copy, "the request's tensors")
            self.copied += sum(d[4] for d in copied)
            described += copied
        self._next += 1
        number = self._next
        future = self._loop.create_future()  # type: ignore[union-attr]
        self._pending[number] = (future, block, inputs if len(described) > len(copy) else None)
        if source is not None and type(source) is not str:
            # a peer without an address (a unix socket connection's token, which does not
            # pickle as itself): its share of the queue, named for the engine process
            source = ("worker", self.slot, id(source))
        link.send(("infer", number, model, chosen.version, deadline, source, split,
                   request_id, described, self._given_back() if self._freed else None))
        future.add_done_callback(lambda done: self._cancelled(number, done))
        return future

    def _cancelled(self, number: int, future: asyncio.Future) -> None:
        if future.cancelled() and number in self._pending and self._link is not None:
            self._link.send(("cancel", number))  # its inputs are freed on the answer

    async def infer(self, model: str, inputs: dict, *, version: str | None = None,
                    outputs: list[str] | None = None, deadline: float | None = None) -> dict:
        """:meth:`Engine.infer <mip.serving.engine.Engine.infer>`."""
        wanted = self.check_outputs(self.resolve(model, version), outputs) if outputs else None
        result = await self.submit(model, inputs, version, deadline)
        return result if wanted is None else {name: result[name] for name in wanted}

    async def _ask(self, message: tuple) -> Any:
        link = self._link
        if link is None:
            raise ModelNotReady("the engine process is not reachable (it is being started "
                                "again)")
        self._next += 1
        future = self._loop.create_future()  # type: ignore[union-attr]
        self._changes[self._next] = future
        link.send((message[0], self._next, *message[1:]))
        return await future

    async def load(self, model: str, config=None) -> None:
        """:meth:`Engine.load <mip.serving.engine.Engine.load>`, made once, by the engine
        process, for every worker."""
        error = await self._ask(("load", model, config))
        if error is not None:
            raise rebuild_error(error)

    async def unload(self, model: str) -> None:
        """:meth:`Engine.unload <mip.serving.engine.Engine.unload>`, for every worker."""
        error = await self._ask(("unload", model, None))
        if error is not None:
            raise rebuild_error(error)

    async def sync(self) -> None:
        """Until every message the engine process sent before now has been handled."""
        await self._ask(("sync",))

    def resolve(self, model: str, version: str | None = None):
        return self.repository.get(model, version or None)

    def validate(self, chosen, inputs: dict) -> int:
        served = self._served.get((chosen.name, chosen.version))
        if served is None or served.version is not chosen:
            raise ModelNotReady(f"model {chosen.name!r} version {chosen.version} is not serving")
        return Engine._check_inputs(served, inputs)

    check_outputs = staticmethod(Engine._check_outputs)

    def model_metadata(self, model: str, version: str | None = None):
        return self.repository.metadata(model, version or None)

    def model_ready(self, model: str, version: str | None = None) -> bool:
        if self._link is None:
            return False
        try:
            chosen = self.repository.get(model, version or None)
        except ServingError:
            return False
        return (chosen.name, chosen.version) in self._served

    def ready(self) -> bool:
        return self._link is not None and bool(self._catalogue["ready"])

    def default_model(self) -> str | None:
        return self._catalogue["default"]

    def index(self) -> list:
        return list(self._catalogue["index"])

    def stats(self) -> dict[tuple[str, str], ModelStats]:
        """The versions served, with no counts: the engine process publishes the batches'
        series and the queue depths to the merged ``/metrics``."""
        return {key: ModelStats() for key in self._served}

    def add_batch_hook(self, hook) -> None:
        """Batches run in the engine process, whose own metrics count them."""

    def used(self) -> int:
        """Octets of this worker's slice of the arena in use."""
        return self.blocks.used


# -- a worker's models, of both placements -----------------------------------------------

class PlacedEngine:
    """The engine of a worker of ``mip serve --workers N``: the calls of
    :class:`~mip.serving.engine.Engine` the frontends make, each for the engine that serves
    its model: ``local`` (this worker's own) for the models whose placement is ``worker``,
    ``remote`` (the engine process) for those whose placement is ``shared``.

    A model is served where it is loaded now (both engines know: the engine process sends
    its catalogue whenever it changes); one loaded nowhere belongs where its configuration
    says (``placement``), else where ``--placement`` says. A load goes to the placement of
    the configuration it loads with; a model loaded with another placement before is
    unloaded there once the new load has succeeded (its requests finish first).

    Args:
        local: this worker's :class:`~mip.serving.engine.Engine` (started), whose ``load``
            and ``unload`` reach every worker (:class:`~mip.model_relay.WorkerModels`).
        remote: the engine process's models (:class:`RemoteEngine`, started), or ``None``
            when the server runs no engine process: a model whose placement is ``shared``
            then fails to load, saying so.
        root: the model repository's folder.
        default: ``--placement``.
    """

    check_outputs = staticmethod(Engine._check_outputs)

    def __init__(self, local: Engine, remote: RemoteEngine | None, root: str | Path,
                 default: str):
        self.local, self.remote = local, remote
        self.repository = local.repository
        self.root = Path(root)
        self.default = default
        if remote is None:  # every model is this worker's: its calls, as they are
            for name in ("resolve", "submit", "infer", "validate", "model_metadata",
                         "model_ready", "ready", "index", "stats"):
                setattr(self, name, getattr(local, name))

    def _placement(self, name: str, config=None) -> str:
        if "/" in name or name.startswith((".", "_")) or not name:
            return self.default
        return placement_of(self.root / name, self.default, config)

    def _side(self, name: str) -> Any:
        """The engine serving ``name``."""
        remote = self.remote
        if remote is not None and name in remote.repository._loaded:
            return remote
        if name in self.local.repository._loaded or remote is None:
            return self.local
        return remote if self._placement(name) == "shared" else self.local

    # -- lifecycle ---------------------------------------------------------------------

    async def stop(self) -> None:
        await self.local.stop()
        if self.remote is not None:
            await self.remote.stop()

    async def load(self, model: str, config=None) -> None:
        """:meth:`Engine.load <mip.serving.engine.Engine.load>` where the model's placement
        says (see the class)."""
        shared = self._placement(model, config) == "shared"
        if shared and self.remote is None:
            raise ModelLoadError(
                f"failed to load {model}: its placement is 'shared', and this server runs "
                "no engine process (no model it started with was shared): start it with "
                "--placement shared, or with the model in its repository")
        target: Any = self.remote if shared else self.local
        other: Any = self.local if shared else self.remote
        await target.load(model, config)
        if other is not None and model in other.repository._loaded:
            await other.unload(model)  # moved from the other placement

    async def unload(self, model: str) -> None:
        """:meth:`Engine.unload <mip.serving.engine.Engine.unload>`, wherever it is loaded."""
        sides = [side for side in (self.remote, self.local)
                 if side is not None and model in side.repository._loaded]
        for side in sides or [self._side(model)]:
            await side.unload(model)

    # -- the engine's calls ------------------------------------------------------------

    def resolve(self, model: str, version: str | None = None):
        return self._side(model).resolve(model, version)

    def submit(self, model: str, inputs: dict, version: str | None = None,
               deadline: float | None = None, source=None, chosen=None,
               split: bool = False, request_id: str | None = None) -> asyncio.Future:
        return self._side(model).submit(model, inputs, version, deadline, source, chosen,
                                        split, request_id)

    async def infer(self, model: str, inputs: dict, *, version: str | None = None,
                    outputs: list[str] | None = None, deadline: float | None = None) -> dict:
        return await self._side(model).infer(model, inputs, version=version, outputs=outputs,
                                             deadline=deadline)

    def validate(self, chosen, inputs: dict) -> int:
        return self._side(chosen.name).validate(chosen, inputs)

    def model_metadata(self, model: str, version: str | None = None):
        return self._side(model).model_metadata(model, version)

    def model_ready(self, model: str, version: str | None = None) -> bool:
        return self._side(model).model_ready(model, version)

    def ready(self) -> bool:
        return self.local.ready() and (self.remote is None or self.remote.ready())

    def default_model(self) -> str | None:
        return self.local.default_model()

    def index(self) -> list:
        """Every model of the repository with the states its own engine gives."""
        local: dict[str, list] = {}
        remote: dict[str, list] = {}
        for side, grouped in ((self.local, local), (self.remote, remote)):
            for entry in side.index():  # type: ignore[union-attr]
                grouped.setdefault(entry.name, []).append(entry)
        entries = []
        for name in sorted(local.keys() | remote.keys()):
            own, other = (remote, local) if self._side(name) is self.remote else (local, remote)
            entries += own.get(name) or other[name]  # (no catalogue yet: the worker's entry)
        return entries

    def stats(self) -> dict[tuple[str, str], ModelStats]:
        remote = self.remote.stats() if self.remote is not None else {}
        return {**remote, **self.local.stats()}

    def add_batch_hook(self, hook) -> None:
        self.local.add_batch_hook(hook)

    def used(self) -> int:
        """Octets of this worker's slice of the shared arena in use."""
        return self.remote.used() if self.remote is not None else 0

    @property
    def frame_memory(self):
        """Receive memory for the large frames of MIP connections: blocks of the shared
        arena (``None`` without an engine process)."""
        return self.remote.frame_memory if self.remote is not None else None

    def arena_memory(self, model: str):
        """Where a request for ``model`` may be received: the engine process's
        :attr:`frame_memory` when it serves the model, else ``None`` (this worker's own
        models read their inputs where they are)."""
        remote = self.remote
        return remote.frame_memory if remote is not None and self._side(model) is remote else None
