"""A stand-in for the CUDA runtime and driver, so that CUDA shared memory runs through the
real server on a machine without a GPU (the tests' only way to reach that path on CI).

What it replaces, and nothing more: the library calls hub.shm.cuda.CudaIpc makes through
ctypes, and the one line that wraps a device pointer in a CUDA tensor. A "device allocation"
is a POSIX shared-memory object, and its "IPC handle" is the object's name, NUL-padded to
the 64 bytes of a cudaIpcMemHandle_t (`handle_for`). Everything else is the server's own code:
the registry, the checks of handles, offsets and sizes, the holds, the hand-over between the
processes of --workers N, and the writes of outputs through cudaMemcpy (here a memmove). The
replaced line itself runs for real as far as torch without CUDA goes, in
tests/test_shared_memory_cuda_double.py (torch parses the __cuda_array_interface__ there).

Installed in a server process by putting this folder first on PYTHONPATH (Python imports
`sitecustomize` at start-up), or in the test process with `install(monkeypatch.setattr)`.
The real calls are tested on a GPU by tests/test_shared_memory_cuda.py's gpu-marked test.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import types
from collections.abc import Callable
from typing import Any

HANDLE_BYTES = 64
_INVALID_HANDLE = 400  # cudaErrorInvalidResourceHandle
_ALREADY_MAPPED = 208  # cudaErrorAlreadyMapped: CUDA opens a handle once per process and device


def handle_for(key: str) -> bytes:
    """The 64-byte "IPC handle" of the shared-memory object `key`."""
    raw = key.lstrip("/").encode()
    assert 0 < len(raw) < HANDLE_BYTES
    return raw.ljust(HANDLE_BYTES, b"\0")


def _libraries() -> tuple[Any, Any]:
    """Objects with the runtime's and the driver's functions that CudaIpc calls."""
    maps: dict[int, mmap.mmap] = {}  # base address -> mapping of an opened "handle"
    opened: dict[str, int] = {}  # handle -> base address, while it is open

    def set_device(device: int) -> int:
        return 0

    def open_handle(pointer: Any, handle: Any, flags: int) -> int:
        name = bytes(handle.reserved).rstrip(b"\0").decode(errors="replace")
        if name in opened:
            return _ALREADY_MAPPED
        try:
            fd = os.open(os.path.join("/dev/shm", name), os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            return _INVALID_HANDLE
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return _INVALID_HANDLE
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        probe = ctypes.c_char.from_buffer(mapping)
        address = ctypes.addressof(probe)
        del probe  # (an export would keep the mapping from closing)
        maps[address] = mapping
        opened[name] = address
        pointer._obj.value = address
        return 0

    def close_handle(pointer: int) -> int:
        mapping = maps.pop(pointer, None)
        if mapping is None:
            return _INVALID_HANDLE
        del opened[next(name for name, address in opened.items() if address == pointer)]
        mapping.close()
        return 0

    def memcpy(destination: int, source: int, count: int, kind: int) -> int:
        ctypes.memmove(destination, source, count)
        return 0

    def error_string(code: int) -> bytes:
        return {_INVALID_HANDLE: b"invalid resource handle", _ALREADY_MAPPED: b"resource already mapped"}.get(
            code, b"unknown error"
        )

    def address_range(base: Any, size: Any, pointer: int) -> int:
        for start, mapping in maps.items():
            if start <= pointer < start + len(mapping):
                base._obj.value, size._obj.value = start, len(mapping)
                return 0
        return 1  # CUDA_ERROR_INVALID_VALUE

    runtime = types.SimpleNamespace(
        cudaSetDevice=set_device,
        cudaIpcOpenMemHandle=open_handle,
        cudaIpcCloseMemHandle=close_handle,
        cudaMemcpy=memcpy,
        cudaGetErrorString=error_string,
    )
    driver = types.SimpleNamespace(cuMemGetAddressRange_v2=address_range)
    return runtime, driver


class _HostArray:
    """Host memory described by __array_interface__; holds its region as _DeviceArray does."""

    def __init__(self, region: Any, pointer: int, shape: tuple[int, ...], typestr: str) -> None:
        self.region = region
        region.acquire()
        self.__array_interface__ = {"shape": shape, "typestr": typestr, "data": (pointer, False), "version": 3}

    def __del__(self) -> None:
        self.region.release()


def install(patch: Callable[[Any, str, Any], None] = setattr) -> None:
    """Make every shared-memory registry of this process see a CUDA device, and open CUDA
    regions through the stand-in libraries."""
    import numpy as np
    import torch

    from hub.shm.cuda import CudaIpc
    from hub.shm.regions import SharedMemoryRegistry

    class HostIpc(CudaIpc):
        def tensor(self, region: Any, pointer: int, shape: tuple[int, ...], typestr: str) -> Any:
            return torch.from_numpy(np.asarray(_HostArray(region, pointer, shape, typestr)))

    def load(cls: type[CudaIpc]) -> CudaIpc:
        runtime, driver = _libraries()
        return HostIpc(runtime, driver, 1)

    patch(CudaIpc, "load", classmethod(load))
    patch(SharedMemoryRegistry, "cuda_device", property(lambda self: True))


if os.environ.get("MODELHUB_CUDA_DOUBLE") == "1":
    install()
