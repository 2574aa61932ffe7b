"""The shared-memory registry: regions by client-given name, their bounds-checked views, and
the holds that keep a region mapped while a request uses it.

Safety rules (Triton had out-of-bounds CVEs here):
- A key names an object directly in /dev/shm: one path component, opened without following
  links and only if it is a regular file; a region must lie inside the object as it is now.
- Every read and write is checked against the registered region (offset and size, no
  overflow) and against the object's current size, before it happens.
- Inputs are read with pread and outputs written with pwrite, not through the mapping: the
  client may truncate its object at any moment, and through a mapping that is a SIGBUS,
  which ends the process. With pread a truncated object fails that one request
  (INVALID_ARGUMENT). The mapping serves only to tell where an output the model process of
  --workers N wrote already lies.
- Unregistering retires a region: new requests cannot name it, requests holding it keep
  their mapping until they are answered, and the last of them unmaps it.
- Error messages name the client's region name (shortened), never its key: the key is the
  client's business (it is in the status the protocol defines, and nowhere else).
"""

from __future__ import annotations

import errno
import mmap
import os
import resource
import stat
from collections.abc import Mapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hub.datatypes import NUMPY_DTYPES, element_count, encode_bytes, from_buffer
from hub.errors import (
    AlreadyExists,
    InvalidInput,
    LimitReached,
    ModelUnavailable,
    RegionNotFound,
    Unsupported,
    shorten,
)
from hub.limits import DEFAULT_LIMITS, Limits
from hub.workers.arena import NAME as HANDOFF_ARENA

if TYPE_CHECKING:
    from hub.shm.cuda import CudaIpc

SYSTEM = "system"
CUDA = "cuda"
KINDS = (SYSTEM, CUDA)
#: Where POSIX shared-memory objects live (glibc's shm_open opens the key's file here).
SHM_DIR = Path("/dev/shm")
#: The most regions registered at once (each holds two file descriptors and a mapping), where
#: the process's open-file limit allows as many (`region_limit`).
MAX_REGIONS = 1024
#: Longest region name and key accepted (a key is one file name: NAME_MAX).
NAME_MAX = 256
KEY_MAX = 255
#: The errors of opening or mapping an object that say the process is out of something
#: (memory or address space, file descriptors), not that the client's object is wrong.
_OUT_OF_RESOURCES = frozenset({errno.ENOMEM, errno.EMFILE, errno.ENFILE})
#: What a CUDA IPC handle is on the wire (sizeof(cudaIpcMemHandle_t)).
CUDA_HANDLE_BYTES = 64

_OFF = {
    SYSTEM: "system shared memory is off on this server; start it with --shared-memory system "
    "(env MODELHUB_SHARED_MEMORY=system)",
    CUDA: "CUDA shared memory is off on this server; start it with --shared-memory cuda "
    "(env MODELHUB_SHARED_MEMORY=cuda; 'system,cuda' for both)",
}
_LABEL = {SYSTEM: "system", CUDA: "CUDA"}


def parse_kinds(value: str) -> frozenset[str]:
    """`--shared-memory` as a set of kinds: off (or empty), system, cuda, a comma list, or all."""
    words = {w.strip().lower() for w in value.split(",") if w.strip()}
    if not words or words <= {"off", "none", "0", "false", "no"}:
        return frozenset()
    if "all" in words:
        return frozenset(KINDS)
    unknown = words - set(KINDS)
    if unknown:
        raise ValueError(f"--shared-memory takes off, system, cuda, system,cuda or all; got {value!r}")
    return frozenset(words)


def _name(name: str) -> str:
    return shorten(name, 64)


class Region:
    """A registered region. `users` requests hold it; once retired (unregistered, or the
    server stopping) the last of them closes it."""

    kind = SYSTEM

    def __init__(self, name: str, byte_size: int) -> None:
        self.name = name
        self.byte_size = byte_size
        #: With --workers N: the model process's number for this registration, the same in
        #: every process, so that a request names exactly the registration it decoded with.
        self.id = 0
        self.users = 0
        self.retired = False
        self.closed = False

    def acquire(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.retired and self.users == 0:
            self._close()

    def retire(self) -> None:
        self.retired = True
        if self.users == 0:
            self._close()

    def check(self, offset: int, byte_size: int, what: str) -> None:
        """Refuse (InvalidInput) a tensor's [offset, offset + byte_size) outside the region."""
        label = f"{what}: shared memory region '{_name(self.name)}'"
        if offset < 0 or byte_size < 0:
            raise InvalidInput(f"{label}: offset and byte size must not be negative, got {offset} and {byte_size}")
        if offset >= self.byte_size:
            raise InvalidInput(f"{label}: offset {offset} is outside the region's {self.byte_size} bytes")
        if byte_size > self.byte_size - offset:
            raise InvalidInput(
                f"{label}: offset {offset} + byte size {byte_size} runs past the region's {self.byte_size} bytes"
            )

    def status(self) -> dict[str, Any]:
        raise NotImplementedError

    def _close(self) -> None:
        self.closed = True


class SystemRegion(Region):
    """A POSIX shared-memory object (its key's file in /dev/shm), mapped from `offset` for
    `byte_size` bytes. The file descriptor stays open, so that each use can check the
    object still holds the region."""

    kind = SYSTEM

    def __init__(self, name: str, key: str, offset: int, byte_size: int, fd: int, mapping: mmap.mmap, delta: int):
        super().__init__(name, byte_size)
        self.key = key
        self.offset = offset
        self._fd = fd
        self._map = mapping
        self._delta = delta  # where the region starts in the mapping (mmap offsets are page-aligned)
        probe = np.frombuffer(mapping, np.uint8, 1)
        #: Where the region starts in this process's memory (to tell a tensor that lies in it).
        self.address = int(probe.__array_interface__["data"][0]) + delta
        del probe  # an export of the mapping would keep it from closing

    @classmethod
    def open(cls, name: str, key: str, offset: int, byte_size: int) -> SystemRegion:
        label = f"shared memory region '{_name(name)}'"
        path = SHM_DIR / _key_file(key, label)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise InvalidInput(f"{label}: its key names no shared memory object on this host") from None
        except PermissionError:
            raise InvalidInput(f"{label}: the server may not open the object its key names (permissions)") from None
        except OSError as exc:
            if exc.errno in _OUT_OF_RESOURCES:
                raise LimitReached(f"{label}: the server cannot open another file ({exc.strerror})") from None
            # ELOOP: a link, which is never followed. Name the errno only, not the path.
            raise InvalidInput(f"{label}: the object its key names cannot be opened ({exc.strerror})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(f"{label}: its key does not name a shared memory object")
            if offset + byte_size > info.st_size:
                raise InvalidInput(
                    f"{label}: offset {offset} + byte size {byte_size} is larger than the shared memory "
                    f"object ({info.st_size} bytes)"
                )
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            delta = offset - start
            try:
                mapping = mmap.mmap(
                    fd, delta + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=start
                )
            except OSError as exc:
                # A sparse object can be far larger than memory: mapping 2^46 bytes of one twice
                # ran out of address space (ENOMEM), and with a file descriptor per mapping the
                # process's open-file limit runs out too (EMFILE). Either is a limit the request
                # ran into, not a fault of the server: answered as one, naming the size asked for,
                # where grpc answered UNKNOWN with the OSError's text and REST a bare 500.
                if exc.errno in _OUT_OF_RESOURCES:
                    raise LimitReached(
                        f"{label}: the server cannot map byte_size {byte_size} of the object ({exc.strerror})"
                    ) from None
                raise InvalidInput(f"{label}: the object its key names cannot be mapped ({exc.strerror})") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(name, key, offset, byte_size, fd, mapping, delta)

    def view(self, offset: int, byte_size: int, what: str, *, writable: bool = False) -> memoryview:
        """Bytes [offset, offset + byte_size) of the region, without a copy; read-only unless
        `writable`. InvalidInput when they lie outside it or the object has shrunk."""
        self.check(offset, byte_size, what)
        if os.fstat(self._fd).st_size < self.offset + self.byte_size:
            raise InvalidInput(self._truncated(what))
        start = self._delta + offset
        view = memoryview(self._map)[start : start + byte_size]
        return view if writable else view.toreadonly()

    def read(
        self, name: str, datatype: str, shape: tuple[int, ...], offset: int, byte_size: int, limits: Limits
    ) -> np.ndarray:
        """An input tensor read from the region (BYTES elements are split out, as from raw
        contents): one copy, by pread, not a view of the mapping. The client owns the object
        and may truncate it while the model reads: through the mapping that is a SIGBUS, which
        kills the process and every request in it; pread just comes up short."""
        what = f"input '{shorten(name)}'"
        _check_input_size(name, datatype, shape, byte_size, limits)
        self.check(offset, byte_size, what)
        data = bytearray(byte_size)
        if byte_size and os.preadv(self._fd, [data], self.offset + offset) != byte_size:
            raise InvalidInput(self._truncated(what))
        return from_buffer(name, datatype, shape, memoryview(data), limits)

    def write(self, name: str, array: np.ndarray, offset: int, byte_size: int) -> None:
        """Output `name` into the region, by pwrite (see `read`): a client that truncates the
        object meanwhile loses its answer, not the server."""
        data: Any = encode_bytes(array) if array.dtype == np.object_ else np.ascontiguousarray(array)
        size = len(data) if isinstance(data, bytes) else data.nbytes
        _check_output_size(name, self.name, size, byte_size)
        if size == 0:
            return
        what = f"output '{shorten(name)}'"
        self.check(offset, size, what)
        if not isinstance(data, bytes) and data.__array_interface__["data"][0] == self.address + offset:
            return  # already there: the model process of --workers N wrote it into the region itself
        if os.fstat(self._fd).st_size < self.offset + self.byte_size:
            raise InvalidInput(self._truncated(what))
        payload = memoryview(data if isinstance(data, bytes) else data.reshape(-1).view(np.uint8))
        position = self.offset + offset
        while payload:  # (a regular file takes it whole; the loop is for the letter of pwrite's contract)
            written = os.pwrite(self._fd, payload, position)
            payload, position = payload[written:], position + written

    def _truncated(self, what: str) -> str:
        return (
            f"{what}: shared memory region '{_name(self.name)}' was truncated below its registered "
            f"{self.byte_size} bytes; unregister it and register it again"
        )

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def _close(self) -> None:
        if self.closed:
            return
        super()._close()
        try:
            self._map.close()
        except BufferError:
            pass  # a view outlived its request (a cancelled batch still computing): freed with it
        os.close(self._fd)


def _key_file(key: str, label: str) -> str:
    """The file in /dev/shm that a key names, as shm_open takes it: leading slashes dropped,
    then one path component."""
    name = key.lstrip("/")
    if not name or len(name) > KEY_MAX or "/" in name or "\0" in name or name in (".", ".."):
        raise InvalidInput(
            f"{label}: the key must name a shared memory object: one name of 1 to {KEY_MAX} characters "
            "after an optional leading '/', without '/' or NUL"
        )
    if HANDOFF_ARENA.fullmatch(name):
        # The hand-off arenas of --workers N are named in /dev/shm while a frontend and the model
        # process shake hands (and after a process died in between), under names a client can
        # guess; a region is a mapping that outlives the name, so one registered then would
        # read and write every other client's tensors through that frontend for good.
        raise InvalidInput(f"{label}: the key names one of the server's own hand-off arenas, which no client may map")
    return name


def _check_input_size(name: str, datatype: str, shape: tuple[int, ...], byte_size: int, limits: Limits) -> None:
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None or datatype == "BYTES":
        return  # from_buffer names the datatype; BYTES is checked element by element
    needed = element_count(name, shape, limits) * dtype.itemsize
    if byte_size != needed:
        raise InvalidInput(
            f"input '{shorten(name)}': shared_memory_byte_size is {byte_size}, but {datatype} shape "
            f"{list(shape)[:16]} needs {needed} bytes"
        )


def check_cuda_input(name: str, datatype: str, shape: tuple[int, ...], byte_size: int, limits: Limits) -> None:
    """What an input in CUDA shared memory must be: not BYTES, and exactly its shape's size."""
    if datatype == "BYTES":
        raise InvalidInput(
            f"input '{shorten(name)}': BYTES inputs are not taken from CUDA shared memory; use system "
            "shared memory or raw contents"
        )
    _check_input_size(name, datatype, shape, byte_size, limits)


def _check_output_size(name: str, region: str, needed: int, byte_size: int) -> None:
    if needed > byte_size:
        raise InvalidInput(
            f"output '{shorten(name)}' needs {needed} bytes, but the shared memory it was given in region "
            f"'{_name(region)}' is {byte_size} bytes (shared_memory_byte_size)"
        )


@dataclass(frozen=True)
class OutputTarget:
    """Where a requested output goes: `byte_size` bytes at `offset` of a region the request holds."""

    region: Any  # SystemRegion or hub.shm.cuda.CudaRegion
    offset: int
    byte_size: int

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the output (BYTES length-prefixed); InvalidInput when it does not fit."""
        self.region.write(name, array, self.offset, self.byte_size)


class SharedMemoryRegistry:
    """The regions of one server, by name (one namespace for both kinds, as in Triton).
    `kinds` are the kinds this server takes (--shared-memory); `device` where its models run."""

    def __init__(self, kinds: frozenset[str] = frozenset(), *, device: str = "cpu") -> None:
        self.kinds = kinds
        self.device = device
        self._regions: dict[str, Region] = {}
        self._cuda: CudaIpc | None = None

    # --- what is on -----------------------------------------------------------------------

    def extensions(self) -> list[str]:
        out = []
        if SYSTEM in self.kinds:
            out.append("system_shared_memory")
        if CUDA in self.kinds and self.cuda_device:
            out.append("cuda_shared_memory")
        return out

    @property
    def cuda_device(self) -> bool:
        """Whether the models here run on a CUDA device, which CUDA shared memory needs."""
        return self.device == "cuda"

    def extension_kinds(self) -> set[str]:
        """The kinds clients can use here: on, and (CUDA) with a CUDA device."""
        return {k for k in self.kinds if k != CUDA or self.cuda_device}

    def require(self, kind: str) -> None:
        """Unsupported when `kind` is off; for CUDA on a server without a CUDA device, ModelUnavailable."""
        if kind not in self.kinds:
            raise Unsupported(_OFF[kind])
        if kind == CUDA and not self.cuda_device:
            raise ModelUnavailable(
                "CUDA shared memory needs a CUDA device, and this server runs on CPU only (--device cpu, "
                "or torch sees no GPU)"
            )

    def _cuda_ipc(self) -> CudaIpc:
        if self._cuda is None:
            from hub.shm.cuda import CudaIpc

            self._cuda = CudaIpc.load()
        return self._cuda

    # --- register, unregister, status -------------------------------------------------------

    def _check_new(self, name: str) -> None:
        if not name:
            raise InvalidInput("a shared memory region needs a name")
        check_region_name(name)
        if name in self._regions:
            raise AlreadyExists(f"shared memory region '{_name(name)}' is already registered")
        limit, why = region_limit()
        if len(self._regions) >= limit:
            raise LimitReached(
                f"this server holds {limit} shared memory regions, its limit{why}; unregister some first"
            )

    def register_system(self, name: str, key: str, offset: int, byte_size: int) -> SystemRegion:
        self.require(SYSTEM)
        self._check_new(name)
        _check_extent(name, offset, byte_size)
        region = SystemRegion.open(name, key, offset, byte_size)
        self._regions[name] = region
        return region

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> Region:
        self.require(CUDA)
        ipc = self._cuda_ipc()
        self._check_new(name)
        _check_extent(name, 0, byte_size)
        _check_handle(name, raw_handle)
        region = ipc.open(name, raw_handle, device_id, byte_size)
        self._regions[name] = region
        return region

    def add(self, kind: str, name: str, arguments: dict[str, Any]) -> Region:
        """Register a region of `kind`. `arguments`: key, offset, byte_size (system) or
        raw_handle, device_id, byte_size (CUDA)."""
        if kind == SYSTEM:
            return self.register_system(name, arguments["key"], arguments["offset"], arguments["byte_size"])
        return self.register_cuda(name, arguments["raw_handle"], arguments["device_id"], arguments["byte_size"])

    async def register(self, kind: str, name: str, arguments: dict[str, Any]) -> None:
        """Register a region (the data plane's entry point; with --workers N the frontends'
        registry forwards it to the model process, which `add`s it)."""
        self.add(kind, name, arguments)

    async def remove(self, kind: str, name: str = "") -> None:
        """`unregister`, as the data plane calls it (forwarded with --workers N)."""
        self.unregister(kind, name)

    def unregister(self, kind: str, name: str = "") -> None:
        """Unregister one region of `kind` (an unknown name is not an error, as in Triton), or
        every region of it when `name` is empty. Requests holding a region keep it until answered.

        Unregistering all of a kind this server does not take is a no-op, not an error, while
        the other kind is on: perf_analyzer --shared-memory system unregisters both kinds when
        it ends (Triton's CPU build answers OK too, having none)."""
        if not name and self.kinds and kind not in self.extension_kinds():
            return
        self.require(kind)
        check_region_name(name)  # (as register does: no region has a longer name)
        names = [n for n, r in self._regions.items() if r.kind == kind] if not name else [name]
        for region_name in names:
            region = self._regions.get(region_name)
            if region is not None and region.kind == kind:
                del self._regions[region_name]
                region.retire()

    def status(self, kind: str, name: str = "") -> list[dict[str, Any]]:
        self.require(kind)
        if not name:
            return [r.status() for r in self._regions.values() if r.kind == kind]
        region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"no {_LABEL[kind]} shared memory region '{_name(name)}' is registered")
        if region.kind != kind:
            raise RegionNotFound(
                f"shared memory region '{_name(name)}' is registered as {_LABEL[region.kind]} shared memory, "
                f"not {_LABEL[kind]}"
            )
        return [region.status()]

    def regions(self) -> list[Region]:
        return list(self._regions.values())

    def find(self, name: str, what: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            if not self.kinds:
                raise Unsupported(f"{what} names a shared memory region, but {_OFF[SYSTEM]}")
            raise InvalidInput(f"{what}: shared memory region '{_name(name)}' is not registered")
        return region

    def close(self) -> None:
        """Unregister everything (the server is stopping)."""
        for region in self._regions.values():
            region.retire()
        self._regions.clear()


def region_limit() -> tuple[int, str]:
    """The most regions this process may hold, and why it is less than MAX_REGIONS where it is.
    A system region holds two file descriptors (ours, for pread, and the one mmap duplicates),
    so regions may take at most half the process's open-file limit and leave the rest to
    connections, model files and the log: under the soft limit of 1,024 that many hosts set, the
    500th region took the last descriptor, and the server could no longer accept a connection
    or load a model. Read at each registration (a cheap call), so a raised limit counts."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft // 4 >= MAX_REGIONS:
        return MAX_REGIONS, ""
    return max(1, soft // 4), f" (a quarter of its open-file limit of {soft}, for each region holds two)"


def check_region_name(name: str) -> None:
    """Refuse a region name longer than any registration may have (NAME_MAX)."""
    if len(name) > NAME_MAX:
        raise InvalidInput(f"shared memory region name '{_name(name)}' is longer than {NAME_MAX} characters")


def check_registration(kind: str, name: str, arguments: Mapping[str, Any]) -> None:
    """The checks of a registration that need neither the registry nor the system: its name,
    extent, and key (system) or handle (CUDA), with the messages `add` gives. With --workers N
    a frontend runs them before it forwards a registration to the model process (which runs
    every check again), so that what it forwards is bounded."""
    if not name:
        raise InvalidInput("a shared memory region needs a name")
    check_region_name(name)
    if kind == SYSTEM:
        _check_extent(name, arguments["offset"], arguments["byte_size"])
        _key_file(arguments["key"], f"shared memory region '{_name(name)}'")
    else:
        _check_extent(name, 0, arguments["byte_size"])
        _check_handle(name, arguments["raw_handle"])


def _check_handle(name: str, raw_handle: bytes) -> None:
    if len(raw_handle) != CUDA_HANDLE_BYTES:
        raise InvalidInput(
            f"shared memory region '{_name(name)}': raw_handle must be the {CUDA_HANDLE_BYTES}-byte "
            f"cudaIpcMemHandle_t, got {len(raw_handle)} bytes"
        )


def _check_extent(name: str, offset: int, byte_size: int) -> None:
    if byte_size <= 0:
        raise InvalidInput(f"shared memory region '{_name(name)}': byte_size must be positive, got {byte_size}")
    if offset < 0:
        raise InvalidInput(f"shared memory region '{_name(name)}': offset must not be negative, got {offset}")
    if offset + byte_size > 1 << 62:
        raise InvalidInput(f"shared memory region '{_name(name)}': offset + byte_size is out of range")


_CURRENT: ContextVar[Holds | None] = ContextVar("modelhub_holds", default=None)


def current_holds() -> Holds | None:
    """The holds of the request this task is answering (inside `with Holds(...)`): with
    --workers N the frontend reads its output targets here, to have the model process write
    the outputs into the client's regions itself."""
    return _CURRENT.get()


class Holds:
    """The regions one request uses. Each is held from the moment the request names it until
    `release()` (the request answered, failed or cancelled), so an unregister meanwhile does
    not unmap it. Use as a context manager around the whole request."""

    __slots__ = ("_held", "_token", "registry", "targets")

    def __init__(self, registry: SharedMemoryRegistry | None) -> None:
        self.registry = registry
        self._held: list[Region] = []
        self._token: Token[Holds | None] | None = None
        #: The outputs the request asked to have written into shared memory, by name.
        self.targets: dict[str, OutputTarget] = {}

    def __enter__(self) -> Holds:
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None
        self.release()

    def release(self) -> None:
        held, self._held = self._held, []
        for region in held:
            region.release()

    def _hold(self, region_name: str, what: str) -> Region:
        if self.registry is None:
            raise Unsupported(f"{what} names a shared memory region, but {_OFF[SYSTEM]}")
        region = self.registry.find(region_name, what)
        region.acquire()
        self._held.append(region)
        return region

    def read(
        self,
        name: str,
        datatype: str,
        shape: Sequence[int],
        region_name: str,
        offset: int,
        byte_size: int,
        limits: Limits = DEFAULT_LIMITS,
    ) -> Any:
        """Input `name` from a region: a numpy view of system shared memory (no copy), or a
        tensor on the device for CUDA shared memory."""
        what = f"input '{shorten(name)}'"
        region = self._hold(region_name, what)
        region.check(offset, byte_size, what)
        return region.read(name, datatype, tuple(shape), offset, byte_size, limits)  # type: ignore[attr-defined]

    def output(self, name: str, region_name: str, offset: int, byte_size: int) -> OutputTarget:
        """Where output `name` goes, checked against its region now (before the request runs)."""
        what = f"output '{shorten(name)}'"
        region = self._hold(region_name, what)
        region.check(offset, byte_size, what)
        target = self.targets[name] = OutputTarget(region, offset, byte_size)
        return target
