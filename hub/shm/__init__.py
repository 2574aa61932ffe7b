"""Triton's shared-memory extension: regions a client registers (system shared memory, POSIX
objects under /dev/shm; CUDA shared memory, CUDA IPC handles), checked views of them for a
request's inputs and outputs, and their release. Protocol-neutral: the frontends parse the
RPCs and the tensor parameters, and call here.

- hub/shm/regions.py: the registry, the regions and the per-request holds.
- hub/shm/cuda.py: CUDA IPC through the CUDA runtime that torch loaded (ctypes).
"""

from hub.shm.regions import (
    CUDA,
    KINDS,
    SYSTEM,
    Holds,
    OutputTarget,
    Region,
    SharedMemoryRegistry,
    parse_kinds,
)

__all__ = [
    "CUDA",
    "KINDS",
    "SYSTEM",
    "Holds",
    "OutputTarget",
    "Region",
    "SharedMemoryRegistry",
    "parse_kinds",
]
