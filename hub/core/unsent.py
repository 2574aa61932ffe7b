"""The bytes of answers computed and handed to the transport that their clients have not taken.

An answer is held by the server (grpc's buffers and Python's: about 3-4x its size, measured)
until its client reads it. A gRPC client that answers pings but grants no flow-control window
reads nothing and keeps what it asked for: 200 calls of 30 bytes each for 4 MiB answers, on
one connection, took a server from 255 MB to 1.6 GB in 6 s and on; REST clients that send a
request and read nothing, 100 connections, 440 MB. So the server counts what it holds, and
an answer that would take it past its budget is not handed over: its request is answered
RESOURCE_EXHAUSTED (its computing is lost; the client may retry once it reads).

Two bounds. The server's (`Limits.unsent_bytes`), so that clients together cannot take the
memory; and a quarter of it per connection, so that one client that reads nothing (or
slowly) cannot take it all from the others (REST has one request at a time per connection,
which needs no bound of its own). An answer always goes when nothing is held (by the server,
or by its connection for the per-connection bound): one answer is bounded by what one
request may ask for.

Answers under `COUNTED` bytes are not counted: what grpc keeps for such a call, its request
and its bookkeeping, is of the same order, and counting would put a callback on every call of
the hot path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

from hub.errors import LimitReached
from hub.logs import Throttle

log = logging.getLogger("modelhub.dataplane")

#: Answers smaller than this are not counted (see the module's docstring).
COUNTED = 4 << 10
#: The share of the server's bound one connection may hold.
CONNECTION_SHARE = 4


class UnsentAnswers:
    """Counts the bytes of answers held for clients (see the module); one per process that
    serves clients, owned by its data plane. Event-loop only."""

    def __init__(self, budget: int, flag: str = "--max-unsent-bytes") -> None:
        self.budget = budget
        self.per_connection = max(1, budget // CONNECTION_SHARE)
        self.held = 0
        self._flag = flag
        self._connections: dict[Hashable, int] = {}
        self._log = Throttle()  # what a client can make us log at will

    def take(self, size: int, connection: Hashable | None) -> Callable[[], None]:
        """Count an answer of `size` bytes for `connection` (None: a protocol whose connections
        carry one request at a time) and return what gives it back, to be called once when
        its client has taken it or gone. Raises LimitReached, counting nothing, when it would
        take the server or its connection past their bounds."""
        held_there = self._connections.get(connection, 0) if connection is not None else 0
        if self.held and self.held + size > self.budget:
            self._log(
                log,
                logging.WARNING,
                "dropped an answer of %d bytes: clients have not read %d bytes of answers (%s %d)",
                size,
                self.held,
                self._flag,
                self.budget,
            )
            raise LimitReached(
                f"the server holds {self.held} bytes of answers its clients have not read, and this one of "
                f"{size} bytes would take it past {self.budget} bytes ({self._flag}); try again "
                "once they are read"
            )
        if held_there and held_there + size > self.per_connection:
            self._log(
                log,
                logging.WARNING,
                "dropped an answer of %d bytes for %s: it has not read %d bytes of answers (a quarter of %s)",
                size,
                connection,
                held_there,
                self._flag,
            )
            raise LimitReached(
                f"this connection holds {held_there} bytes of answers it has not read, and this one of "
                f"{size} bytes would take it past {self.per_connection} bytes (a quarter of "
                f"{self._flag}): read the answers before asking for more"
            )
        self.held += size
        if connection is not None:
            self._connections[connection] = held_there + size

        def give_back() -> None:
            self.held -= size
            if connection is not None:
                left = self._connections[connection] - size
                if left:
                    self._connections[connection] = left
                else:
                    del self._connections[connection]

        return give_back
