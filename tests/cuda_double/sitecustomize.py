"""A stand-in for the CUDA runtime and driver, so that CUDA shared memory runs through the
real server on a machine without a GPU (the tests' only way to reach that path on CI).

What it replaces, and nothing more: the library calls hub.shm.cuda.CudaIpc makes through
ctypes, and the one line that wraps a device pointer in a CUDA tensor. A "device allocation"
is a POSIX shared-memory object, and its "IPC handle" is the object's name, NUL-padded to
the 64 bytes of a cudaIpcMemHandle_t (`handle_for`). Everything else is the server's own code:
the registry, the checks of handles, offsets and sizes, the holds, the hand-over between the
processes of --workers N, and the writes of outputs. The replaced line itself runs for real as
far as torch without CUDA goes, in tests/test_shared_memory_cuda_double.py (torch parses the
__cuda_array_interface__ there).

Where CUDA's behaviour could hide a bug, the stand-in keeps it:
- a failed call leaves its error on the calling thread until cudaGetLastError reads it
  (`last_error` shows it to a test);
- the current device is the thread's, set by cudaSetDevice (`current_device`);
- cudaMemcpyAsync takes the host bytes at once (pageable memory is staged) but they land in the
  "device" only when the stream is synchronised, so an output the server forgets to wait for
  is missing when the client reads it;
- an input "on the device" is a tensor that, like a CUDA tensor, numpy cannot read without
  `.cpu()` (`DeviceTensor`).
It refuses a second open of an opened handle ("already mapped"), which current CUDA counts
instead: stricter, so the server's one open per allocation is checked.

Installed in a server process by putting this folder first on PYTHONPATH (Python imports
`sitecustomize` at start-up), or in the test process with `install(monkeypatch.setattr)`.
The real calls are tested on a GPU by tests/test_shared_memory_cuda.py's gpu-marked test.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import threading
import types
from collections.abc import Callable
from typing import Any

HANDLE_BYTES = 64
_INVALID_HANDLE = 400  # cudaErrorInvalidResourceHandle
_ALREADY_MAPPED = 208  # cudaErrorAlreadyMapped (what the stand-in answers a second open)

#: Per thread, as in the CUDA runtime: `device` (current) and `error` (the last, until read).
_thread = threading.local()


def last_error() -> int:
    """The calling thread's pending CUDA error, without clearing it (0: none)."""
    return int(getattr(_thread, "error", 0))


def current_device() -> int:
    return int(getattr(_thread, "device", 0))


def _failed(code: int) -> int:
    _thread.error = code
    return code


def handle_for(key: str) -> bytes:
    """The 64-byte "IPC handle" of the shared-memory object `key`."""
    raw = key.lstrip("/").encode()
    assert 0 < len(raw) < HANDLE_BYTES
    return raw.ljust(HANDLE_BYTES, b"\0")


def _libraries() -> tuple[Any, Any]:
    """Objects with the runtime's and the driver's functions that CudaIpc calls."""
    maps: dict[int, mmap.mmap] = {}  # base address -> mapping of an opened "handle"
    opened: dict[str, int] = {}  # handle -> base address, while it is open

    streams: dict[int, list[tuple[int, bytes]]] = {}  # stream -> copies not yet landed
    stream_ids = itertools.count(0x5000)
    lock = threading.Lock()

    def set_device(device: int) -> int:
        _thread.device = device
        return 0

    def get_device(device: Any) -> int:
        device._obj.value = current_device()
        return 0

    def get_last_error() -> int:
        code = last_error()
        _thread.error = 0
        return code

    def open_handle(pointer: Any, handle: Any, flags: int) -> int:
        name = bytes(handle.reserved).rstrip(b"\0").decode(errors="replace")
        if name in opened:
            return _failed(_ALREADY_MAPPED)
        try:
            fd = os.open(os.path.join("/dev/shm", name), os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            return _failed(_INVALID_HANDLE)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return _failed(_INVALID_HANDLE)
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
            return _failed(_INVALID_HANDLE)
        del opened[next(name for name, address in opened.items() if address == pointer)]
        mapping.close()
        return 0

    def create_stream(stream: Any, flags: int) -> int:
        with lock:
            stream._obj.value = handle = next(stream_ids)
            streams[handle] = []
        return 0

    def memcpy_async(destination: int, source: int, count: int, kind: int, stream: int) -> int:
        with lock:
            if stream not in streams:
                return _failed(_INVALID_HANDLE)
            streams[stream].append((destination, ctypes.string_at(source, count)))
        return 0

    def synchronize(stream: int) -> int:
        with lock:
            if stream not in streams:
                return _failed(_INVALID_HANDLE)
            for destination, data in streams[stream]:
                ctypes.memmove(destination, data, len(data))
            streams[stream].clear()
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
        cudaGetDevice=get_device,
        cudaGetLastError=get_last_error,
        cudaIpcOpenMemHandle=open_handle,
        cudaIpcCloseMemHandle=close_handle,
        cudaStreamCreateWithFlags=create_stream,
        cudaMemcpyAsync=memcpy_async,
        cudaStreamSynchronize=synchronize,
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

    class DeviceTensor(torch.Tensor):
        """A host tensor that numpy cannot read without `.cpu()`, as a CUDA tensor; torch's
        operations on it give plain tensors."""

        __torch_function__ = torch._C._disabled_torch_function_impl

        def __array__(self, *args: Any, **kwargs: Any) -> Any:
            raise TypeError("can't convert cuda:0 device type tensor to numpy (the CUDA stand-in)")

        def numpy(self, *args: Any, **kwargs: Any) -> Any:
            return self.__array__()

        def cpu(self, *args: Any, **kwargs: Any) -> Any:
            return self.as_subclass(torch.Tensor).clone()

    class HostIpc(CudaIpc):
        def tensor(self, region: Any, pointer: int, shape: tuple[int, ...], typestr: str) -> Any:
            array = np.asarray(_HostArray(region, pointer, shape, typestr))
            return torch.from_numpy(array).as_subclass(DeviceTensor)

    def load(cls: type[CudaIpc]) -> CudaIpc:
        runtime, driver = _libraries()
        return HostIpc(runtime, driver, 1)

    patch(CudaIpc, "load", classmethod(load))
    patch(SharedMemoryRegistry, "cuda_device", property(lambda self: True))


if os.environ.get("MODELHUB_CUDA_DOUBLE") == "1":
    install()
