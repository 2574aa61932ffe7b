"""The signals that stop `modelhub serve`, and how a process that is stopping takes more of them.

SIGTERM or SIGINT stops a server: it refuses new requests, answers the ones it accepted and
exits within --shutdown-grace (`Server.stop`). A second one changes nothing: the drain is
bounded already, and a signal sent to a whole process group (Ctrl-C, systemd's
KillMode=control-group, `kill -- -PGID`) reaches a frontend of --workers N twice, once from
the sender and once from its supervisor. SIGKILL ends a process at once.

The model process of --workers N ignores SIGTERM and SIGINT altogether: the frontends drain
into it, so only its supervisor stops it, with ENGINE_STOP, once they have exited. The kernel
sends the children their stop signals too when the supervisor dies (PR_SET_PDEATHSIG): then
the frontends drain as on SIGTERM, and the model process answers them until they have exited
(hub/workers/engine.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterable

log = logging.getLogger("modelhub.signals")

#: What stops `modelhub serve` and the supervisor of --workers N.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: What stops the model process of --workers N: its supervisor sends it, and the kernel does
#: when the supervisor dies (PR_SET_PDEATHSIG). No terminal or service manager sends it.
ENGINE_STOP = signal.SIGUSR1

#: Why a stop signal to a process already stopping changes nothing, as its log line says.
AGAIN = "the drain ends within --shutdown-grace; SIGKILL stops at once"
#: The same in a frontend of --workers N: Ctrl-C in a terminal (or any signal to the whole
#: process group) reaches it, and its supervisor passes the stop on with SIGTERM as well.
AGAIN_FRONTEND = "the supervisor passes the stop on to its frontends, so a signal to the whole group arrives twice"


def supervisor_gone(supervisor: int | None) -> bool:
    """Whether this child of --workers N has lost the supervisor (pid `supervisor`) that started
    it: the kernel gave it another parent when the supervisor died. None: not such a child."""
    return supervisor is not None and os.getppid() != supervisor


def stop_reason(signum: signal.Signals, supervisor: int | None = None) -> str:
    """What the log says of the first stop signal (the grace follows): `supervisor` is the pid
    of the supervisor of --workers N that started this process, None in a single process."""
    if supervisor_gone(supervisor):  # PR_SET_PDEATHSIG: the kernel sent it as the supervisor died
        if signum == ENGINE_STOP:
            return "the supervisor exited (SIGUSR1): answering what the frontends still hand over, then stopping"
        return f"the supervisor exited ({signum.name}): the server is stopping; draining in-flight requests"
    if signum == ENGINE_STOP and supervisor is not None:
        return "stop requested by the supervisor (SIGUSR1): draining"
    return f"{signum.name} received: draining in-flight requests"


class StopSignals:
    """`signals` call `on_first` with the signal (on the running loop) the first time; later
    ones are logged, in order after it (`again` says why they change nothing), and otherwise
    ignored. `ignored` are ignored from the start. `ignore()` turns all of them to SIG_IGN
    until the process exits.

    Taken with signal.signal, not loop.add_signal_handler: asyncio puts the default action
    back when its loop closes, and a SIGTERM in the ~0.4 s from there to the exit (the
    supervisor's, after the group's; or a second kill) killed a process that had drained
    cleanly (exit -15). Python keeps SIG_IGN through its finalization, which resets a
    handler of its own to the default. The signals are unblocked here: the supervisor starts
    its children with them blocked, so that one sent during the child's start-up waits for
    this handler instead of killing it."""

    def __init__(
        self,
        signals: Iterable[signal.Signals],
        on_first: Callable[[signal.Signals], None],
        ignored: Iterable[signal.Signals] = (),
        *,
        again: str = AGAIN,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._signals = tuple(signals)
        self._ignored = tuple(ignored)
        self._on_first = on_first
        self._again_note = again
        self.received: signal.Signals | None = None
        # Wakes the loop when a signal lands on a thread other than the one the loop's select
        # waits in (as loop.add_signal_handler does): the handler itself runs in the main
        # thread only once that thread runs Python again.
        self._wake, wake = socket.socketpair()
        self._wake.setblocking(False)
        wake.setblocking(False)
        self._wake_writer = wake
        self._previous_wakeup = signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
        self._loop.add_reader(self._wake.fileno(), self._drain_wakeups)
        for signum in self._ignored:
            signal.signal(signum, signal.SIG_IGN)
        for signum in self._signals:
            signal.signal(signum, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {*self._signals, *self._ignored})

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake.recv(512):
                pass

    def _handle(self, signum: int, frame: object) -> None:
        # A Python signal handler runs between two bytecodes of the main thread, possibly in
        # the middle of the loop's own code: hand the work to the loop, in the order the
        # signals came (so the first one's line is logged before a later one's).
        with contextlib.suppress(RuntimeError):  # the loop has closed: the process is exiting
            if self.received is None:
                self.received = signal.Signals(signum)
                self._loop.call_soon_threadsafe(self._on_first, self.received)
            else:
                self._loop.call_soon_threadsafe(self._again, signal.Signals(signum))

    def _again(self, signum: signal.Signals) -> None:
        log.info("%s received while stopping: ignored (%s)", signum.name, self._again_note)

    def ignore(self) -> None:
        """From now until the exit, the signals do nothing. Called once the server has stopped
        and the loop is about to close."""
        for signum in self._signals:
            signal.signal(signum, signal.SIG_IGN)
        self._loop.remove_reader(self._wake.fileno())
        signal.set_wakeup_fd(self._previous_wakeup)
        self._wake.close()
        self._wake_writer.close()
