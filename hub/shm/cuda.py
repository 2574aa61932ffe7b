"""CUDA shared memory: a client's cudaIpcMemHandle_t opened in this process, checked against
the allocation it names, viewed as a torch tensor on the device (no host copy) for inputs and
written with cudaMemcpyAsync on a stream of our own, then synchronised, for outputs.

Three habits keep these calls from disturbing torch's CUDA work on the same thread (the event
loop's, which also wraps requests' inputs, copies them to the host for ONNX Runtime and reads
outputs back, in the context these calls use):
- a failed call's error is cleared (cudaGetLastError), or torch's next kernel-launch check on
  the thread would raise it for another client's request;
- the thread's current device is restored after each call that sets it, or torch's "cuda"
  would follow a region on another device;
- outputs are copied on a non-blocking stream and that stream alone is synchronised: a plain
  cudaMemcpy from pageable memory returns before the DMA lands (the client may read first), and
  it waits on the legacy default stream, torch's, so the batch in flight.

Through ctypes on the CUDA runtime torch loaded (the same library, so the same primary
context), and the driver's cuMemGetAddressRange for the allocation's size, as Triton does.
Only imported when a client registers a CUDA region on a server with a CUDA device.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from hub.datatypes import NUMPY_DTYPES, encode_bytes
from hub.errors import InvalidInput, ModelExecutionError, ModelUnavailable, shorten
from hub.limits import Limits
from hub.shm.regions import CUDA, CUDA_HANDLE_BYTES, Region, _check_output_size, _name, check_cuda_input

log = logging.getLogger("modelhub.shm")

_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from the pointers (unified addressing)
_STREAM_NON_BLOCKING = 1  # cudaStreamNonBlocking: no implicit sync with the legacy default stream


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * CUDA_HANDLE_BYTES)]


def _loaded_runtime() -> str | None:
    """The path of the libcudart this process already mapped (torch's), if any."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1]
                if os.path.basename(path).startswith("libcudart.so"):
                    return path
    except OSError:
        pass
    return None


class CudaIpc:
    """The CUDA runtime and driver entry points CUDA shared memory needs.

    An allocation a client registers under several names (its inputs and outputs in one
    cudaMalloc, say) is opened once and shared, closed when its last region is. (Current CUDA
    counts a handle reopened in one context and returns the same pointer; counting here makes one
    open and one close per allocation whatever the release does.)"""

    def __init__(self, runtime: ctypes.CDLL, driver: ctypes.CDLL, devices: int) -> None:
        self._rt = runtime
        self._driver = driver
        self.devices = devices
        #: Opened handles: (handle, device) -> [pointer, regions using it]. A region may be
        #: closed from a compute thread (the last tensor viewing it freed there).
        self._opened: dict[tuple[bytes, int], list[int]] = {}
        self._lock = threading.Lock()
        self._streams: dict[int, int] = {}  # device -> our non-blocking stream for output copies
        runtime.cudaSetDevice.argtypes = [ctypes.c_int]
        runtime.cudaGetDevice.argtypes = [ctypes.POINTER(ctypes.c_int)]
        runtime.cudaGetLastError.argtypes = []
        runtime.cudaStreamCreateWithFlags.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
        runtime.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        runtime.cudaMemcpyAsync.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        runtime.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _IpcHandle, ctypes.c_uint]
        runtime.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
        runtime.cudaGetErrorString.argtypes = [ctypes.c_int]
        runtime.cudaGetErrorString.restype = ctypes.c_char_p
        driver.cuMemGetAddressRange_v2.argtypes = [
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_uint64,
        ]

    @classmethod
    def load(cls) -> CudaIpc:
        import torch

        if not torch.cuda.is_available():
            raise ModelUnavailable("CUDA shared memory needs a CUDA device, and torch sees none on this server")
        torch.cuda.init()
        names = [p for p in (_loaded_runtime(),) if p] + ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
        runtime = None
        for name in names:
            try:
                runtime = ctypes.CDLL(name)
                break
            except OSError:
                continue
        try:
            driver = ctypes.CDLL("libcuda.so.1")
        except OSError:
            driver = None
        if runtime is None or driver is None:
            raise ModelUnavailable("CUDA shared memory: the CUDA runtime or driver library cannot be loaded here")
        return cls(runtime, driver, torch.cuda.device_count())

    def _error(self, code: int) -> str:
        """A failed call's message; the error is cleared from the thread's runtime state."""
        self._rt.cudaGetLastError()
        text = self._rt.cudaGetErrorString(code)
        return text.decode() if text else f"error {code}"

    @contextlib.contextmanager
    def _on(self, device_id: int) -> Iterator[None]:
        """The device current on this thread for the block, the one before restored after.
        Set even when it is already the current one: cudaSetDevice also makes its primary
        context current, which the driver's calls need and cudaGetDevice does not do."""
        before = ctypes.c_int()
        code = self._rt.cudaGetDevice(ctypes.byref(before))
        if code:
            raise ModelExecutionError(f"cudaGetDevice failed: {self._error(code)}")
        code = self._rt.cudaSetDevice(device_id)
        if code:
            raise ModelExecutionError(f"cudaSetDevice({device_id}) failed: {self._error(code)}")
        try:
            yield
        finally:
            if before.value != device_id:
                code = self._rt.cudaSetDevice(before.value)
                if code:
                    log.warning("restoring CUDA device %d failed: %s", before.value, self._error(code))

    def open(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> CudaRegion:
        label = f"shared memory region '{_name(name)}'"
        if not 0 <= device_id < self.devices:
            raise InvalidInput(
                f"{label}: device_id {device_id} is not a CUDA device of this server (0-{self.devices - 1})"
            )
        key = (bytes(raw_handle), device_id)
        # Both calls work in the calling thread's current context, which must be the device's.
        with self._on(device_id):
            with self._lock:
                opened = self._opened.get(key)
                if opened is None:
                    opened = self._opened[key] = [self._open(name, label, raw_handle, device_id), 0]
                opened[1] += 1
            pointer = opened[0]
            base, size = ctypes.c_uint64(), ctypes.c_size_t()
            result = self._driver.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), pointer)
        available = size.value - (pointer - base.value) if result == 0 else -1
        if available < byte_size:
            self.close(key)
            if result:
                log.warning("CUDA shared memory region %r: cuMemGetAddressRange failed (%d)", shorten(name, 64), result)
            raise InvalidInput(f"{label}: the CUDA allocation behind the handle is smaller than byte_size {byte_size}")
        return CudaRegion(name, device_id, byte_size, pointer, self, key)

    def _open(self, name: str, label: str, raw_handle: bytes, device_id: int) -> int:
        pointer = ctypes.c_void_p()
        code = self._rt.cudaIpcOpenMemHandle(
            ctypes.byref(pointer), _IpcHandle.from_buffer_copy(raw_handle), _LAZY_ENABLE_PEER_ACCESS
        )
        if code or not pointer.value:
            log.warning("CUDA shared memory region %r: cudaIpcOpenMemHandle: %s", shorten(name, 64), self._error(code))
            raise InvalidInput(
                f"{label}: the CUDA IPC handle cannot be opened on device {device_id} (it must come from "
                "cudaIpcGetMemHandle in another process, for memory on that device)"
            )
        return int(pointer.value)

    def close(self, key: tuple[bytes, int]) -> None:
        """A region of the handle `key` is released: close the handle with its last region."""
        with self._lock:
            opened = self._opened[key]
            opened[1] -= 1
            if opened[1]:
                return
            del self._opened[key]
            with self._on(key[1]):
                code = self._rt.cudaIpcCloseMemHandle(opened[0])
                if code:
                    log.warning("cudaIpcCloseMemHandle failed: %s", self._error(code))

    def copy(self, device_id: int, destination: int, source: int, count: int) -> None:
        """`count` bytes from host memory at `source` to `destination` on the device, landed
        when this returns."""
        with self._on(device_id):
            stream = self._stream(device_id)
            code = self._rt.cudaMemcpyAsync(destination, source, count, _MEMCPY_DEFAULT, stream)
            if not code:
                code = self._rt.cudaStreamSynchronize(stream)
            if code:
                raise ModelExecutionError(f"copying into CUDA shared memory failed: {self._error(code)}")

    def _stream(self, device_id: int) -> int:
        """Our stream on the current device, `device_id` (made at its first output)."""
        with self._lock:
            stream = self._streams.get(device_id)
            if stream is None:
                handle = ctypes.c_void_p()
                code = self._rt.cudaStreamCreateWithFlags(ctypes.byref(handle), _STREAM_NON_BLOCKING)
                if code:
                    raise ModelExecutionError(f"cudaStreamCreateWithFlags failed: {self._error(code)}")
                stream = self._streams[device_id] = int(handle.value or 0)
            return stream

    def tensor(self, region: CudaRegion, pointer: int, shape: tuple[int, ...], typestr: str) -> Any:
        """A torch tensor on the region's device viewing `pointer` (no copy); it holds the
        region until it is freed."""
        import torch

        return torch.as_tensor(_DeviceArray(region, pointer, shape, typestr), device=f"cuda:{region.device_id}")


class _DeviceArray:
    """Device memory described by __cuda_array_interface__, for torch.as_tensor. It holds its
    region until the tensor viewing it is freed (a batch may outlive its request).

    Not marked read-only, though no model writes its inputs: torch refuses the flag ("the read
    only flag is not supported, should always be False", a TypeError)."""

    def __init__(self, region: CudaRegion, pointer: int, shape: tuple[int, ...], typestr: str) -> None:
        self.region = region
        region.acquire()
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (pointer, False),
            "version": 2,
            "strides": None,
        }

    def __del__(self) -> None:
        self.region.release()


class CudaRegion(Region):
    """A registered CUDA region: `byte_size` bytes at `pointer` on device `device_id`, from an
    opened IPC handle (which other regions of the same allocation share)."""

    kind = CUDA

    def __init__(
        self, name: str, device_id: int, byte_size: int, pointer: int, ipc: CudaIpc, handle: tuple[bytes, int]
    ) -> None:
        super().__init__(name, byte_size)
        self.device_id = device_id
        self.pointer = pointer
        self._ipc = ipc
        self._handle = handle  # the opened handle it uses (others may share it)
        self._lock = threading.Lock()  # a tensor's deleter may release from a compute thread

    def acquire(self) -> None:
        with self._lock:
            self.users += 1

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            last = self.retired and self.users == 0
        if last:
            self._close()

    def retire(self) -> None:
        with self._lock:
            self.retired = True
            last = self.users == 0
        if last:
            self._close()

    def read(
        self, name: str, datatype: str, shape: tuple[int, ...], offset: int, byte_size: int, limits: Limits
    ) -> Any:
        """The input as a torch tensor on the region's device, viewing the client's memory."""
        check_cuda_input(name, datatype, shape, byte_size, limits)
        import torch

        bf16 = datatype == "BF16"
        typestr = "<u2" if bf16 else NUMPY_DTYPES[datatype].newbyteorder("<").str
        tensor = self._ipc.tensor(self, self.pointer + offset, shape, typestr)
        return tensor.view(torch.bfloat16) if bf16 else tensor

    def write(self, name: str, array: Any, offset: int, byte_size: int) -> None:
        data = encode_bytes(array) if getattr(array, "dtype", None) == np.object_ else np.ascontiguousarray(array)
        host = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data.reshape(-1).view(np.uint8)
        _check_output_size(name, self.name, host.nbytes, byte_size)
        if host.nbytes:
            self._ipc.copy(self.device_id, self.pointer + offset, host.ctypes.data, host.nbytes)

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "device_id": self.device_id, "byte_size": self.byte_size}

    def _close(self) -> None:
        if self.closed:
            return
        super()._close()
        self._ipc.close(self._handle)
