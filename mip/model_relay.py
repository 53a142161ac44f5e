"""Model load and unload over the API, for every worker of ``mip serve --workers N``.

A load or unload call (KServe v2 repository API, REST or gRPC) reaches the one worker that
holds its connection. That worker does not change its own engine: it asks the supervisor,
which sends the change to every worker, in the order the calls came; each worker applies it
with its engine's ``load``/``unload`` and says how it went; the supervisor answers the asking
worker once every worker has (a worker that dies meanwhile is not waited for), and the call
returns as on one process: ``ModelNotFound``, ``ModelLoadError`` … when the asking worker's own
change failed, ``ModelLoadError`` naming the workers whose change failed when only some did.
The supervisor keeps the changes, and a worker started again applies them, in order, before it
is ready: every worker serves the same models.

Messages are pickled dicts on a ``SOCK_SEQPACKET`` pair per worker (one message a packet,
between the processes of one server only).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import pickle
import socket

from mip.frontends.oip.shm import SystemSharedMemory

__all__ = ["ModelRelay", "RelayedSharedMemory", "WorkerModels", "rebuild_error"]

log = logging.getLogger("mip.workers")

#: octets of the largest message (a model configuration is a few hundred)
MAX_MESSAGE = 1 << 20


def _send(sock: socket.socket, message: dict) -> bool:
    try:
        sock.send(pickle.dumps(message))
        return True
    except OSError:  # the worker is gone or stuck: it is not waited for
        return False


class ModelRelay:
    """The supervisor's side: passes each change on to every worker and answers the asking
    worker with every worker's outcome. ``changes`` are the changes so far, in order (given
    to each worker that starts)."""

    def __init__(self):
        self.changes: list[tuple] = []
        self._pending: dict[int, dict] = {}
        self._next = 0

    def on_message(self, index: int, data: bytes, workers: dict[int, socket.socket]) -> None:
        """Handle a message of worker ``index``; ``workers``: the control socket of every
        live worker, by index."""
        message = pickle.loads(data)
        if message["kind"] == "request":
            self._next += 1
            change = message["change"]
            self._keep(change)
            waiting = set()
            for other, sock in workers.items():
                if _send(sock, {"kind": "apply", "id": self._next, "change": change}):
                    waiting.add(other)
            self._pending[self._next] = {"origin": (index, message["id"]),
                                         "waiting": waiting, "outcomes": {}}
            self._answer_if_complete(self._next, workers)
        elif message["kind"] == "record":  # made by the engine process (shared placement)
            self._keep(message["change"])
        elif message["kind"] == "applied":
            pending = self._pending.get(message["id"])
            if pending is not None:
                pending["outcomes"][index] = message["error"]
                pending["waiting"].discard(index)
                self._answer_if_complete(message["id"], workers)

    def _keep(self, change: tuple) -> None:
        """Keep ``change`` for the workers started later; an unregistered shared-memory
        region takes its registration away (so the list does not grow with them)."""
        if change[0] == "shm_unregister":
            self.changes = [c for c in self.changes if c[0] != "shm_register"
                            or (change[1] and c[1] != change[1])]
        else:
            self.changes.append(change)

    def forget(self, index: int, workers: dict[int, socket.socket]) -> None:
        """Worker ``index`` has exited: stop waiting for it (its successor applies every
        change before it is ready)."""
        for number in list(self._pending):
            self._pending[number]["waiting"].discard(index)
            self._answer_if_complete(number, workers)

    def _answer_if_complete(self, number: int, workers: dict[int, socket.socket]) -> None:
        pending = self._pending[number]
        if pending["waiting"]:
            return
        del self._pending[number]
        index, request = pending["origin"]
        if index in workers:  # else the asking worker died, and its client with it
            _send(workers[index], {"kind": "answer", "id": request,
                                   "outcomes": pending["outcomes"]})


def rebuild_error(outcome: tuple) -> Exception:
    """The exception a worker's change raised, from ``(module, class name, message)``."""
    from mip.errors import InternalError

    module, name, message = outcome
    if module.split(".")[0] == "mip":
        with contextlib.suppress(Exception):
            cls = getattr(importlib.import_module(module), name)
            if isinstance(cls, type) and issubclass(cls, Exception):
                return cls(message)
    return InternalError(message)


class WorkerModels:
    """A worker's side: its engine's ``load`` and ``unload`` go through the supervisor
    (:class:`ModelRelay`), which applies them here too, with the engine's own methods; so
    do the registrations of Triton's system shared memory (:class:`RelayedSharedMemory`,
    once :meth:`attach` gives it).

    Args:
        engine: the worker's :class:`~mip.serving.engine.Engine` (started).
        control: this worker's end of the socket pair to the supervisor.
        index: this worker's slot.
        placement: the model changes this process makes: those of its ``placement``
            (``"worker"``: relayed to every worker; ``"shared"``: the engine process's,
            which makes them once, for every worker).
    """

    def __init__(self, engine, control: socket.socket, index: int, placement: str = "worker"):
        self.engine = engine
        self.control = control
        self.index = index
        self.placement = placement
        self.shm: RelayedSharedMemory | None = None  # once attached
        self._shm_pending: list[tuple] = []  # registrations replayed before it was
        self._load, self._unload = engine.load, engine.unload
        self._waiting: dict[int, asyncio.Future] = {}
        self._next = 0
        self._tasks: list[asyncio.Task] = []

    async def replay(self, changes: list[tuple]) -> None:
        """Apply the changes made before this worker started (failures are logged: the
        workers that were running reported them)."""
        for change in changes:
            try:
                await self._apply(change)
            except Exception as exc:
                log.warning("worker %d: %s %r again: %s", self.index, change[0], change[1],
                            exc)

    def start(self) -> None:
        """From now on, the engine's load and unload reach every worker."""
        self.control.setblocking(False)
        self.engine.load, self.engine.unload = self.load, self.unload
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._tasks = [loop.create_task(self._receive(queue)),
                       loop.create_task(self._apply_in_order(queue))]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._fail_waiting()

    async def load(self, model: str, config=None) -> None:
        """:meth:`Engine.load <mip.serving.engine.Engine.load>`, on every worker."""
        await self._request(("load", model, config, self.placement))

    async def unload(self, model: str) -> None:
        """:meth:`Engine.unload <mip.serving.engine.Engine.unload>`, on every worker."""
        await self._request(("unload", model, self.placement))

    async def _request(self, change: tuple) -> None:
        from mip.errors import ModelLoadError

        self._next += 1
        number = self._next
        future = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        data = pickle.dumps({"kind": "request", "id": number, "change": change})
        try:
            await asyncio.get_running_loop().sock_sendall(self.control, data)
            outcomes = await future
        finally:
            self._waiting.pop(number, None)
        own = outcomes.get(self.index)
        if own is not None:
            raise rebuild_error(own)
        failed = sorted((i, o) for i, o in outcomes.items() if o is not None)
        if failed:
            reasons = "; ".join(f"worker {i}: {o[2]}" for i, o in failed)
            raise ModelLoadError(f"{change[0]} of {change[1]!r} failed on {len(failed)} of "
                                 f"{len(outcomes)} workers: {reasons}")

    def attach(self, registry: RelayedSharedMemory) -> None:
        """From now on, ``registry``'s registrations reach every worker; the ones made
        before this worker started are applied now."""
        self.shm, registry.relay = registry, self
        pending, self._shm_pending = self._shm_pending, []
        for change in pending:
            try:
                registry.apply(change)
            except Exception as exc:
                log.warning("worker %d: shared memory region %r again: %s", self.index,
                            change[1], exc)

    async def request(self, change: tuple) -> None:
        """Make ``change`` on every worker (see :class:`ModelRelay`)."""
        await self._request(change)

    async def _apply(self, change: tuple) -> None:
        kind = change[0]
        if kind.startswith("shm_"):
            if self.shm is None:
                self._shm_pending.append(change)
            else:
                self.shm.apply(change)
        elif change[-1] != self.placement:  # the other placement's process made it
            return
        elif kind == "load":
            await self._load(change[1], change[2])
        else:
            await self._unload(change[1])

    async def _receive(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(self.control, MAX_MESSAGE)
                if not data:
                    break
                message = pickle.loads(data)
                if message["kind"] == "apply":
                    queue.put_nowait(message)
                elif message["kind"] == "answer":
                    future = self._waiting.get(message["id"])
                    if future is not None and not future.done():
                        future.set_result(message["outcomes"])
        except OSError:
            pass
        self._fail_waiting()  # the supervisor is gone: no answer will come

    def _fail_waiting(self) -> None:
        from mip.errors import ModelNotReady

        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ModelNotReady("the server is stopping"))

    async def _apply_in_order(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await queue.get()
            error = None
            try:
                await self._apply(message["change"])
            except Exception as exc:
                error = (type(exc).__module__, type(exc).__qualname__, str(exc))
            data = pickle.dumps({"kind": "applied", "id": message["id"], "error": error})
            with contextlib.suppress(OSError):
                await loop.sock_sendall(self.control, data)


class RelayedSharedMemory(SystemSharedMemory):
    """Triton's system shared-memory regions of a worker of ``mip serve --workers N``: a
    registration (or its end) made over the API is made on every worker, through the
    supervisor, before the call returns, so that any worker can serve the requests that name
    the region; a worker started again registers the regions registered before. The calls
    are then coroutines (the frontends await them)."""

    relay: WorkerModels | None = None

    def register(self, name, key, offset=0, byte_size=None, peer: str | None = None):
        if self.relay is None:
            return super().register(name, key, offset, byte_size, peer)
        return self.relay.request(("shm_register", name, key, offset, byte_size, peer))

    def unregister(self, name: str | None = None):
        if self.relay is None:
            return super().unregister(name)
        return self.relay.request(("shm_unregister", name))

    def apply(self, change: tuple) -> None:
        """Make one relayed change here."""
        if change[0] == "shm_register":
            SystemSharedMemory.register(self, *change[1:])
        else:
            SystemSharedMemory.unregister(self, change[1])
