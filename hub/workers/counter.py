"""A number that every process of one `--workers N` server draws from (trace ids): eight bytes
in a file of the supervisor's private directory, read and advanced under an exclusive flock, so
no two processes, nor a process and its restarted successor, draw the same value. A few
microseconds a draw (3.35 µs uncontended, median of 5 x 20,000 draws, the 2-core AMD EPYC box,
2026-12-07), paid only by a request that is traced."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger("modelhub.frontend")

#: The trace-id counter's file, beside the model process's socket: `socket.with_suffix(TRACE_IDS)`.
TRACE_IDS = ".trace-ids"


class SharedCounter:
    """Calling it returns the next value, from 1, across every process that opens `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._own = 0  # the fallback when the file cannot be used

    def __call__(self) -> int:
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                stored = os.pread(self._fd, 8, 0)
                value = (int.from_bytes(stored, "little") if len(stored) == 8 else 0) + 1
                os.pwrite(self._fd, value.to_bytes(8, "little"), 0)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError as exc:
            # Never fail a request for its trace id: count here, and say that ids may repeat.
            if not self._own:
                log.warning("cannot number traces with the other processes (%s: %s); ids may repeat", self.path, exc)
            self._own += 1
            return self._own
        return value

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
