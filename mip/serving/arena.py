"""The shared arena of ``mip serve --workers N --placement shared``: tensors in one memory
mapping shared by the engine process and every worker, so that a request's tensors reach the
engine, and its outputs come back, without passing through a socket.

The supervisor makes the arena once (a ``memfd``, mapped shared before any process is
forked: every process has it at the same offsets) and cuts it in parts, each with one owner
that allocates from it (:class:`Blocks`), so that no lock is shared between processes:

* the first half: the engine process's, for outputs;
* the second half, cut in N equal slices: worker *k*'s, for its requests' inputs.

A request's tensors go in one block (:func:`write`): raw octets for numbers and fixed-width
strings, a pickle for numpy object arrays (``BYTES``); the control message carries only the
descriptions (name, dtype, shape, offset). The reader makes numpy views of the mapping in
place (:func:`read`, :func:`leased`).

A tensor that is in the arena already is not copied (:func:`in_place`): the MIP frame parser
of a worker receives each large frame into a block of the worker's slice
(:func:`frame_memory`), its gRPC connections each large request message, and its REST
endpoint each binary-extension body (and the numbers of each large JSON array), so a
request's tensors, views of that frame, message or body, are described where they were
received and the engine process reads the octets the socket wrote. A model's outputs are copied into the
engine's part once (:meth:`mip.serving.remote.EngineHost._answer` says why).

The arena is bounded: a block that does not fit fails the request with :class:`ArenaFull`
(503, gRPC ``UNAVAILABLE``), never a larger allocation. Pages are the kernel's only once
written, and stay so (shared memory) until the server exits.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import pickle
from typing import Any, Callable

import numpy as np

from mip.errors import ErrorCode, GrpcStatus, ServingError

__all__ = ["ALIGN", "Arena", "ArenaFull", "Blocks", "frame_memory", "in_place", "leased", "read",
           "write"]

#: every block starts on, and takes a multiple of, this many octets (a cache line).
ALIGN = 64
#: the smallest arena (``--shared-arena-bytes``) that gives each part a page.
MIN_BYTES = 1 << 16
#: octets from which a tensor is looked for in the arena before it is copied there (smaller
#: ones come in frames received into the parser's own memory)
IN_PLACE_MIN = 1 << 12


class ArenaFull(ServingError):
    """A request's tensors (or a model's outputs) do not fit in the free part of the shared
    arena (``--shared-arena-bytes``): answered as a server that is busy (503,
    ``UNAVAILABLE``), to be tried again."""

    http_status = 503
    grpc_status = GrpcStatus.UNAVAILABLE
    error_code = ErrorCode.MEMORY


def _aligned(size: int) -> int:
    return max(ALIGN, -(-size // ALIGN) * ALIGN)


class Blocks:
    """A first-fit allocator of ``[start, start + size)`` of the arena, for one process.

    Free ranges are kept sorted by offset and joined with their neighbours when freed, so
    that a range once free is whole again when its blocks are.
    """

    def __init__(self, start: int, size: int):
        self.start, self.size = start, size
        self.used = 0
        self._free: list[tuple[int, int]] = [(start, size)] if size > 0 else []
        self._sizes: dict[int, int] = {}

    def alloc(self, size: int) -> int | None:
        """The offset of a block of ``size`` octets, or ``None`` when none is free."""
        size = _aligned(size)
        free = self._free
        for i, (offset, length) in enumerate(free):
            if length >= size:
                if length == size:
                    del free[i]
                else:
                    free[i] = (offset + size, length - size)
                self._sizes[offset] = size
                self.used += size
                return offset
        return None

    def free(self, offset: int) -> None:
        """Give back the block at ``offset`` (one not allocated is ignored)."""
        size = self._sizes.pop(offset, None)
        if size is None:
            return
        self.used -= size
        free = self._free
        i = bisect.bisect_left(free, (offset, 0))
        end = offset + size
        if i < len(free) and free[i][0] == end:  # joins the range after it
            end += free[i][1]
            del free[i]
        if i and free[i - 1][0] + free[i - 1][1] == offset:  # and the one before
            offset = free[i - 1][0]
            i -= 1
            del free[i]
        free.insert(i, (offset, end - offset))

    def reserve(self, offset: int, size: int) -> bool:
        """Mark ``[offset, offset + size)`` allocated (a block another process still reads,
        made by this allocator's predecessor); False when it is not free whole."""
        size = _aligned(size)
        for i, (start, length) in enumerate(self._free):
            if start <= offset and offset + size <= start + length:
                del self._free[i]
                pieces = [(start, offset - start), (offset + size, start + length - offset - size)]
                for piece in reversed(pieces):
                    if piece[1] > 0:
                        self._free.insert(i, piece)
                self._sizes[offset] = size
                self.used += size
                return True
        return False

    def size_of(self, offset: int) -> int:
        """Octets of the block at ``offset`` (0: none is allocated there)."""
        return self._sizes.get(offset, 0)


class Arena:
    """``size`` octets of memory shared by the processes forked after it was made."""

    def __init__(self, size: int):
        if size < MIN_BYTES:
            raise ValueError(f"the shared arena needs at least {MIN_BYTES} octets, not {size}")
        self.size = size
        fd = os.memfd_create("mip-arena", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)  # the mapping keeps the memory
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        #: every octet, as one numpy array (a slice of it is cheaper than a new view of
        #: the mapping)
        self.octets = np.frombuffer(self.map, np.uint8)

    def parts(self, workers: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """``(start, size)`` of the engine's part and of each worker's slice."""
        half = self.size // 2 // ALIGN * ALIGN
        each = (self.size - half) // workers // ALIGN * ALIGN
        return (0, half), [(half + k * each, each) for k in range(workers)]

    def array(self, offset: int, dtype, shape, size: int) -> np.ndarray:
        """A numpy view of the ``size`` octets of the arena at ``offset``."""
        return self.octets[offset:offset + size].view(dtype).reshape(shape)


#: one tensor as messages describe it: name, dtype (its ``str`` for numpy's own types; ``None``:
#: a pickled object array), shape, offset in the arena, and octets (of the pickle, for an
#: object array).
Description = tuple[str, Any, tuple, int, int]


def _dtype(dtype: np.dtype) -> Any:
    """A dtype as a description carries it: by name when numpy has it built in (a dtype
    object pickles 5x slower)."""
    return dtype.str if dtype.isbuiltin == 1 or dtype.kind in "SU" else dtype


def write(arena: Arena, blocks: Blocks, tensors: dict[str, np.ndarray], what: str
          ) -> tuple[int, list[Description]]:
    """Copy ``tensors`` into one block of ``blocks``: its offset and their descriptions.

    Raises:
        ArenaFull: the block does not fit (``what`` names them in the message).
    """
    parts = []
    total = 0
    for name, array in tensors.items():
        if not isinstance(array, np.ndarray):
            array = np.asarray(array)
        data = pickle.dumps(array, protocol=5) if array.dtype.hasobject else None
        size = array.nbytes if data is None else len(data)
        parts.append((name, array, data, total, size))
        total += _aligned(size)
    block = blocks.alloc(total)
    if block is None:
        raise ArenaFull(f"{what} ({total} octets) do not fit in the shared arena now "
                        f"({blocks.size - blocks.used} of {blocks.size} octets free in this "
                        "part; --shared-arena-bytes sets its size): try again")
    described: list[Description] = []
    for name, array, data, where, size in parts:
        offset = block + where
        if data is None:
            if size:
                np.copyto(arena.array(offset, array.dtype, array.shape, size), array,
                          casting="no")
            described.append((name, _dtype(array.dtype), array.shape, offset, size))
        else:
            arena.map[offset:offset + size] = data
            described.append((name, None, array.shape, offset, size))
    return block, described


def read(arena: Arena, described: list[Description]) -> dict[str, np.ndarray]:
    """The tensors of :func:`write`, as views of the arena (object arrays unpickled)."""
    tensors = {}
    for name, dtype, shape, offset, size in described:
        if dtype is None:
            tensors[name] = pickle.loads(arena.map[offset:offset + size])
        else:
            tensors[name] = arena.array(offset, dtype, shape, size)
    return tensors


class _Lease:
    """Holds one block while numpy views of it live: numpy keeps this object as the views'
    base (it exports the memory through ``__array_interface__``), and its end gives the
    block back."""

    __slots__ = ("__array_interface__", "block", "release")
    __array_interface__: dict
    block: int
    release: Callable[[int], None]

    def __del__(self):
        try:
            self.release(self.block)
        except Exception:  # the interpreter is ending
            pass


def _octets(arena: Arena, block: int, size: int, release: Callable[[int], None]
            ) -> np.ndarray:
    """The ``size`` octets at ``block`` as one array that calls ``release(block)`` once the
    last view of it is gone (from the thread that drops it)."""
    lease = _Lease()
    lease.block, lease.release = block, release
    lease.__array_interface__ = {"data": (arena.address + block, False), "shape": (size,),
                                 "typestr": "|u1", "version": 3}
    return np.asarray(lease)


def leased(arena: Arena, block: int, size: int, described: list[Description],
           release: Callable[[int], None]) -> dict[str, np.ndarray]:
    """The tensors of :func:`write` in ``[block, block + size)``, as views of the arena that
    call ``release(block)`` once the last of them is gone (from the thread that drops it)."""
    octets = _octets(arena, block, size, release)
    tensors = {}
    for name, dtype, shape, offset, length in described:
        if dtype is None:
            tensors[name] = pickle.loads(arena.map[offset:offset + length])
        else:
            start = offset - block
            tensors[name] = octets[start:start + length].view(dtype).reshape(shape)
    return tensors


def frame_memory(arena: Arena, blocks: Blocks, release: Callable[[int], None]
                 ) -> Callable[[int], np.ndarray | None]:
    """A frame parser's ``frame_memory``: a block of ``blocks`` for each frame received alone
    (given back with ``release(block)`` once the frame and every view of it are gone).

    Frames take at most half of the part, so that clients slow to send what they announced
    cannot fill it: past that, and when no block is free, ``None`` (the parser then uses
    memory of its own, and the request is copied into the arena, or refused with
    :class:`ArenaFull`)."""
    half = blocks.size // 2

    def allocate(size: int) -> np.ndarray | None:
        if blocks.used + _aligned(size) > half:
            return None
        block = blocks.alloc(size)
        return None if block is None else _octets(arena, block, size, release)

    return allocate


def in_place(arena: Arena, tensors: dict[str, np.ndarray], start: int, end: int
             ) -> tuple[list[Description], dict[str, np.ndarray]]:
    """The descriptions of the ``tensors`` whose octets lie in ``[start, end)`` of the arena
    already (C-contiguous, numbers or fixed-width strings), and the others (to copy)."""
    placed: list[Description] = []
    low, high = arena.address + start, arena.address + end
    for name, array in tensors.items():
        if (type(array) is np.ndarray and array.nbytes >= IN_PLACE_MIN
                and array.flags.c_contiguous and not array.dtype.hasobject):
            address = array.__array_interface__["data"][0]
            if low <= address and address + array.nbytes <= high:
                placed.append((name, _dtype(array.dtype), array.shape,
                               address - arena.address, array.nbytes))
    if not placed:
        return placed, tensors
    names = {description[0] for description in placed}
    return placed, {name: array for name, array in tensors.items() if name not in names}
