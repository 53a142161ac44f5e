"""Triton's system shared-memory extension, for the gRPC and REST frontends alike.

A client on the same host creates a POSIX shared-memory object (``shm_open``: a file in
``/dev/shm``, as ``tritonclient.utils.shared_memory`` does), registers a part of it under a
name (``key``, ``offset``, ``byte_size``), and then names that region in an input's or
output's parameters (``shared_memory_region``, ``shared_memory_offset``,
``shared_memory_byte_size``) instead of sending the tensor through the socket:

* an input is a numpy **view** of the mapping (read-only, never copied), checked against
  the region's bounds and against the tensor's shape and datatype;
* an output is written into the region when the request completes, and the reply carries
  only its name, datatype, shape and those parameters, as Triton answers.

Lifetime: :meth:`SystemSharedMemory.unregister` forgets the region and closes its mapping
at once when no request uses it. A request in flight holds numpy views of the mapping
(its inputs, and the slices its outputs go to); Python's buffer protocol keeps a mapping
that has views alive (``mmap.close`` refuses while they exist), so such a region stays
mapped until the last of those requests finishes and is unmapped then. Its octets stop
counting against ``max_bytes`` when it is unregistered.

Shared memory is the client's to change: a region whose object was truncated below what
was registered is refused when a request uses it (the size is checked each time) rather
than read past its end; one shrunk while a request reads it is the client's error and can
still end the server (SIGBUS), as in Triton, so only trusted local clients should be given
the extension. Registrations are accepted from this host only (a loopback address or a
Unix socket), unless ``any_peer``: a remote client cannot share memory with the server,
and would otherwise have outputs written into any object in ``/dev/shm`` the server may
open. CUDA shared memory is refused (:func:`cuda_unsupported`).
"""

from __future__ import annotations

import ipaddress
import mmap
import os
import stat
import threading
import weakref
from collections.abc import Awaitable
from dataclasses import dataclass

import numpy as np

from mip.errors import InvalidInput, RegionExists, RegionNotFound, TooManyRegions, Unsupported
from mip.frontends.oip import codec

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_REGIONS",
    "OutputTarget",
    "Region",
    "SystemSharedMemory",
    "cuda_unsupported",
    "registry_of",
]

#: regions registered at once, unless configured (``mip serve --max-shm-regions``).
DEFAULT_MAX_REGIONS = 64
#: octets of every registered region together, unless configured (``--max-shm-bytes``).
DEFAULT_MAX_BYTES = 1 << 30
#: where ``shm_open`` keeps its objects on Linux.
SHM_DIRECTORY = "/dev/shm"


def cuda_unsupported() -> Unsupported:
    """The answer to every CUDA shared-memory call: this server has no GPU memory to share."""
    return Unsupported("CUDA shared memory is not supported on this server: it has no CUDA "
                       "support; use system shared memory (/v2/systemsharedmemory)")


@dataclass(eq=False)
class Region:
    """One registered region: ``byte_size`` octets from ``offset`` of the object ``key``."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    mapping: mmap.mmap
    start: int  # where the region begins in the mapping (mappings start on a page)

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset,
                "byte_size": self.byte_size}

    def view(self, offset: int, size: int, what: str) -> memoryview:
        """``size`` octets from ``offset`` in the region, as a view of the mapping.

        Raises:
            InvalidInput: the span is not inside the region, or the object has shrunk.
        """
        if offset + size > self.byte_size:
            raise InvalidInput(f"{what}: offset {offset} + byte size {size} is out of bounds "
                               f"of shared memory region {self.name!r} ({self.byte_size} "
                               "octets)")
        try:
            present = os.fstat(self.fd).st_size
        except (OSError, ValueError):
            present = -1
        if present < self.offset + self.byte_size:
            raise InvalidInput(f"{what}: shared memory region {self.name!r} is no longer "
                               f"{self.byte_size} octets (its object {self.key!r} was truncated "
                               "or removed): register it again")
        begin = self.start + offset
        return memoryview(self.mapping)[begin:begin + size]

    def close(self) -> None:
        """Unmap now, or (views of it in use) when the last view is released; close the
        object's descriptor. Called again (or on collection), it does nothing more."""
        try:
            self.mapping.close()
        except BufferError:  # exported: the views keep it mapped, munmap on release
            pass
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    __del__ = close  # a server that stops with regions registered


def _unsigned(value, what: str, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{what} must be a non-negative integer, not {value!r}")
    return value


class OutputTarget:
    """Where one output goes: a writable view of its span and the parameters to echo."""

    __slots__ = ("view", "parameters")

    def __init__(self, view: memoryview, parameters: dict):
        self.view = view
        self.parameters = parameters


class SystemSharedMemory:
    """The registered regions of one server (every frontend of an engine shares them).

    Args:
        max_regions: regions registered at once.
        max_bytes: octets of every registered region together.
        refused: when set, every registration is refused with this reason (e.g. the
            server runs several worker processes, each with its own registrations).
        any_peer: accept registrations from any address, not only from this host's.
    """

    def __init__(self, max_regions: int = DEFAULT_MAX_REGIONS,
                 max_bytes: int = DEFAULT_MAX_BYTES, refused: str | None = None,
                 any_peer: bool = False):
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.refused = refused
        self.any_peer = any_peer
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()  # the frontends may run on threads of their own

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def mapped_bytes(self) -> int:
        return sum(r.byte_size for r in self._regions.values())

    # -- the control calls --------------------------------------------------------------

    def register(self, name, key, offset=0, byte_size=None,
                 peer: str | None = None) -> Awaitable[None] | None:
        """Map ``byte_size`` octets from ``offset`` of the shared-memory object ``key``, for
        a client at the IP address ``peer`` (``None``: a Unix socket, or not known).

        Raises:
            InvalidInput: a bad argument, or no such object (or too small), or a client
            on another host; RegionExists; TooManyRegions: over ``max_regions`` /
            ``max_bytes``.
        """
        if self.refused:
            raise InvalidInput(f"failed to register shared memory region {name!r}: "
                               f"{self.refused}")
        if peer is not None and not self.any_peer and not _loopback(peer):
            raise InvalidInput(f"failed to register shared memory region {name!r}: the client "
                               f"({peer}) is not on this host, and shared memory is shared "
                               "with clients on this host only (--shm-any-peer allows it)")
        if not isinstance(name, str) or not name:
            raise InvalidInput("a shared memory region needs a name")
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"shared memory region {name!r} needs a key")
        offset = _unsigned(offset, f"shared memory region {name!r}: offset", 0)
        byte_size = _unsigned(byte_size, f"shared memory region {name!r}: byte_size")
        if byte_size == 0:
            raise InvalidInput(f"shared memory region {name!r}: byte_size must be positive")
        plain = key[1:] if key.startswith("/") else key
        if not plain or "/" in plain or plain in (".", "..") or "\0" in plain:
            raise InvalidInput(f"shared memory region {name!r}: key {key!r} is not the name "
                               "of a shared memory object (as given to shm_open)")
        with self._lock:
            if name in self._regions:
                raise RegionExists(f"shared memory region {name!r} already in manager")
            if len(self._regions) >= self.max_regions:
                raise TooManyRegions(f"failed to register shared memory region {name!r}: "
                                     f"{len(self._regions)} regions are registered, the limit "
                                     f"is {self.max_regions} (--max-shm-regions)")
            if self.mapped_bytes + byte_size > self.max_bytes:
                raise TooManyRegions(f"failed to register shared memory region {name!r}: "
                                     f"{byte_size} more octets would exceed the "
                                     f"{self.max_bytes} octets registered regions may map "
                                     "(--max-shm-bytes)")
            self._regions[name] = _map(name, key, plain, offset, byte_size)
        return None  # (a coroutine where the registration is relayed to other processes)

    def unregister(self, name: str | None = None) -> Awaitable[None] | None:
        """Forget the region ``name`` (``None`` or empty: every region) and unmap it (see
        the module's notes on requests in flight). An unknown name is not an error, as in
        Triton."""
        with self._lock:
            if name:
                gone = [self._regions.pop(name)] if name in self._regions else []
            else:
                gone, self._regions = list(self._regions.values()), {}
        for region in gone:
            region.close()
        return None

    def status(self, name: str | None = None) -> list[dict]:
        """``[{"name", "key", "offset", "byte_size"}]`` of every region, or of ``name``.

        Raises:
            RegionNotFound: no region ``name``.
        """
        if name:
            return [self._region(name, "").status()]
        return [r.status() for r in list(self._regions.values())]

    def _region(self, name, what: str) -> Region:
        region = self._regions.get(name) if isinstance(name, str) else None
        if region is None:
            raise RegionNotFound(f"{what}Unable to find system shared memory region: {name!r}")
        return region

    # -- tensors ------------------------------------------------------------------------

    def _span(self, kind: str, tensor: str, parameters: dict) -> tuple[Region, int, int, str]:
        what = f"{kind} {tensor!r}"
        region = self._region(parameters.get("shared_memory_region"), f"{what}: ")
        offset = _unsigned(parameters.get("shared_memory_offset"),
                           f"{what}: shared_memory_offset", 0)
        size = parameters.get("shared_memory_byte_size")
        if size is None:
            raise InvalidInput(f"{what}: shared_memory_byte_size is required with "
                               "shared_memory_region")
        size = _unsigned(size, f"{what}: shared_memory_byte_size")
        return region, offset, size, what

    def input(self, name: str, datatype: str, shape, parameters: dict) -> np.ndarray:
        """The input ``name`` read from the region its parameters name: a read-only numpy
        view of the mapping (BYTES: decoded from it).

        Raises:
            InvalidInput; RegionNotFound.
        """
        region, offset, size, what = self._span("input", name, parameters)
        array = codec.from_raw(name, datatype, shape, region.view(offset, size, what))
        if array.base is not None and array.dtype != object:
            array.flags.writeable = False
        return array

    def output(self, name: str, parameters: dict) -> OutputTarget:
        """Where the output ``name`` goes (its span checked now, written by :meth:`write`).

        Raises:
            InvalidInput; RegionNotFound.
        """
        region, offset, size, what = self._span("output", name, parameters)
        echo = {"shared_memory_region": region.name, "shared_memory_byte_size": size}
        if offset:
            echo["shared_memory_offset"] = offset
        return OutputTarget(region.view(offset, size, what), echo)

    @staticmethod
    def write(targets: dict[str, OutputTarget], outputs: dict[str, np.ndarray]) -> dict:
        """Write each output that has a target into it; returns output name -> the
        parameters its reply entry carries (its data is not sent).

        Raises:
            InvalidInput: an output larger than its span.
        """
        written = {}
        for name, target in targets.items():
            array = outputs.get(name)
            if array is None:
                continue
            raw = codec.to_raw(array, name)
            size = len(raw) if isinstance(raw, bytes) else raw.nbytes
            if size > len(target.view):
                raise InvalidInput(f"shared memory size specified with the request for output "
                                   f"{name!r} ({len(target.view)} octets) should be at least "
                                   f"{size} octets to hold the results")
            target.view[:size] = raw
            written[name] = target.parameters
        return written


def _map(name: str, key: str, plain: str, offset: int, byte_size: int) -> Region:
    try:
        # O_NONBLOCK: a FIFO of that name must not hold the event loop in open()
        fd = os.open(os.path.join(SHM_DIRECTORY, plain),
                     os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise InvalidInput(f"Unable to open shared memory region: {key!r} "
                           f"({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        size = info.st_size
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInput(f"failed to register shared memory region {name!r}: {key!r} is "
                               "not a shared memory object")
        if offset + byte_size > size:
            raise InvalidInput(f"failed to register shared memory region {name!r}: offset "
                               f"{offset} + byte_size {byte_size} is past the end of {key!r} "
                               f"({size} octets)")
        start = offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, start + byte_size, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE, offset=offset - start)
    except InvalidInput:
        os.close(fd)
        raise
    except (OSError, ValueError) as exc:
        os.close(fd)
        raise InvalidInput(f"failed to map shared memory region {name!r} ({key!r}): "
                           f"{exc}") from None
    return Region(name, key, offset, byte_size, fd, mapping, start)


def _loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


_REGISTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def registry_of(engine, registry: SystemSharedMemory | None = None) -> SystemSharedMemory:
    """The regions every frontend of ``engine`` shares: ``registry`` when given (it
    replaces the engine's), else the engine's own (created with the defaults)."""
    if registry is not None:
        _REGISTRIES[engine] = registry
        return registry
    found = _REGISTRIES.get(engine)
    if found is None:
        found = _REGISTRIES[engine] = SystemSharedMemory()
    return found
