"""Shared-memory arenas for the hand-off between a frontend and the model process: a POSIX
shared-memory object one process creates and both map, with a ring allocator its creator runs.

Each direction has its own arena, owned by the sender: a frontend's arena carries its
requests' large input tensors to the model process, and the model process keeps one arena per
frontend for that frontend's outputs. Only the owner allocates and frees; the peer views what
a message's header describes (offset, byte size, datatype, shape) and says when it is done:

- inputs: done when the model process answers the request (its batch has run, so the batch's
  concatenation, the one copy the model process makes, is behind it). The frontend frees the
  block when the answer arrives, even for a request its client has cancelled meanwhile.
- outputs: done when the frontend has encoded the response (or failed the request). It sends
  the block's offset back with the next commit message and the model process frees it.

Lifetime of the object: the peer unlinks it as soon as it has mapped it (a mapping outlives
the name), and the creator unlinks it too when the handshake ends either way, so nothing is
left in /dev/shm while both processes run. A process killed between creating and the peer's
mapping leaves its object behind; names carry the supervisor's and the creator's pids
(`modelhub-handoff-<supervisor>-<creator>-<n>`) so that the supervisor removes them
(`remove_leftovers`) when a child dies and when it exits.

A full arena is not an error: the sender falls back to socket frames for that message.
"""

from __future__ import annotations

import collections
import itertools
import logging
import mmap
import os
import re
import stat
from pathlib import Path

log = logging.getLogger("modelhub.arena")

SHM_DIR = Path("/dev/shm")
PREFIX = "modelhub-handoff"
NAME = re.compile(rf"{PREFIX}-\d+-\d+-\d+")
#: Blocks start on cache lines (numpy and the runtimes like aligned buffers).
ALIGN = 64
#: Default size of one arena, each direction, per frontend (`--handoff-arena`).
DEFAULT_SIZE = 32 << 20
#: Tensors this large go through the arena; smaller ones stay in the socket message, where a
#: copy of a few KiB into the one write costs less than allocating and freeing a block
#: (scripts/handoff_bench.py --sizes measures the crossover; docs/benchmarks.md).
THRESHOLD = 8 << 10

_serial = itertools.count()


def _path(name: str) -> Path:
    return SHM_DIR / name


class Arena:
    """One mapped arena. The creator (`create`) allocates with `alloc`/`free`; the peer
    (`attach`) only views it."""

    def __init__(self, name: str, mapping: mmap.mmap, size: int) -> None:
        self.name = name
        self.size = size
        self.map = mapping
        self._head = 0  # where the next block starts, unless it has to wrap to 0
        self._blocks: collections.deque[list[int]] = collections.deque()  # [start, end, freed], oldest first
        self._live: dict[int, list[int]] = {}
        self.used = 0  # bytes in live blocks

    # --- both ends ------------------------------------------------------------------------

    @classmethod
    def create(cls, size: int) -> Arena | None:
        """A new arena of `size` bytes, or None (logged) when /dev/shm cannot hold it: the
        space is reserved now (posix_fallocate), so a full /dev/shm falls back to the socket
        instead of a SIGBUS on first touch."""
        name = f"{PREFIX}-{os.getppid()}-{os.getpid()}-{next(_serial)}"
        path = _path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("no shared-memory hand-off (%s: %s); tensors go over the socket", path, exc.strerror)
            return None
        try:
            os.posix_fallocate(fd, 0, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            path.unlink(missing_ok=True)
            log.warning(
                "no shared-memory hand-off: %d MiB in %s: %s (size /dev/shm for it, or lower --handoff-arena); "
                "tensors go over the socket",
                size >> 20,
                SHM_DIR,
                exc.strerror,
            )
            return None
        finally:
            os.close(fd)
        return cls(name, mapping, size)

    @classmethod
    def attach(cls, name: str, size: int) -> Arena:
        """Map the peer's arena `name` and unlink it (both sides have it now). ValueError or
        OSError when it is not an arena of this user of that size."""
        if not isinstance(name, str) or not NAME.fullmatch(name) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"not a hand-off arena: {str(name)[:80]!r}")
        path = _path(name)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size != size:
                raise ValueError(f"{name} is not a {size}-byte shared-memory object of this user")
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        return cls(name, mapping, size)

    def unlink(self) -> None:
        """Remove the name (the creator does, once the handshake is over, whichever way it went)."""
        _path(self.name).unlink(missing_ok=True)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "size": self.size}

    # --- the owner's allocator --------------------------------------------------------------

    def alloc(self, nbytes: int) -> int | None:
        """The offset of a free block of `nbytes` (rounded up to ALIGN), or None when the
        arena has no contiguous room: the caller sends the tensors over the socket instead.

        A ring: blocks are taken at the head and the tail moves past freed blocks, so blocks
        freed out of order (requests of different batches) are reused once the older ones
        are freed too."""
        size = -(-nbytes // ALIGN) * ALIGN
        if size > self.size or size <= 0:
            return None
        blocks = self._blocks
        if not blocks:
            start = 0
        else:
            tail = blocks[0][0]
            if tail < self._head:  # live blocks are [tail, head): free are [head, size) and [0, tail)
                if self.size - self._head >= size:
                    start = self._head
                elif tail >= size:
                    start = 0
                else:
                    return None
            elif tail - self._head >= size:  # wrapped: free is [head, tail)
                start = self._head
            else:
                return None
        block = [start, start + size, 0]
        blocks.append(block)
        self._live[start] = block
        self._head = start + size
        self.used += size
        return start

    def free(self, offset: int) -> None:
        """Free the block at `offset` (a block freed twice, or never taken, is ignored)."""
        block = self._live.pop(offset, None)
        if block is None:
            return
        block[2] = 1
        self.used -= block[1] - block[0]
        blocks = self._blocks
        while blocks and blocks[0][2]:
            blocks.popleft()
        if not blocks:
            self._head = 0

    def reset(self) -> None:
        """Forget every block (the peer is gone, so no block is in use)."""
        self._blocks.clear()
        self._live.clear()
        self._head = 0
        self.used = 0

    @property
    def blocks(self) -> int:
        return len(self._live)


def remove_leftovers(supervisor: int, creator: int | None = None) -> list[str]:
    """Unlink the arenas a supervisor's children created and left behind (a child killed
    before its peer mapped its arena): those of one `creator` pid, or all of them. Their names."""
    pattern = f"{PREFIX}-{supervisor}-{'' if creator is None else f'{creator}-'}"
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if name.startswith(pattern) and NAME.fullmatch(name):
            try:
                os.unlink(_path(name))
                removed.append(name)
            except OSError:
                pass
    return removed
