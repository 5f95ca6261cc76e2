"""A second SIGTERM or SIGINT ends the process at once, even while its main thread waits in a collective (the first
one already, outside training).

The first SIGTERM asks the run to save a checkpoint and stop after the current step (`SignalCheckpoint`); the
first SIGINT (Ctrl-C) makes Lightning shut down gracefully. Both are Python-level handlers, and Python runs
those only when the main thread comes back to the interpreter: a process whose main thread waits in a
distributed collective (a DDP rank whose peer died or took another path) never runs them and stays until the
collective's timeout (30 minutes by default). So a watcher thread reads the signal numbers that Python's C-level
handler writes to a wake-up socket (`signal.set_wakeup_fd`), which happens at once whatever the main thread is
doing, and on the second SIGTERM or SIGINT kills the local DDP processes this one started and exits with status
128 + the signal number, as the default handlers would.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

_TERMINATING = (signal.SIGTERM, signal.SIGINT)
# (weak reference to an owner, how to find its processes): weak, because this list lives as long as the process and
# a strong reference to a trainer kept every CLI's trainer and model alive (a notebook or test process that built
# several CLIs grew by a model each).
_children: list[tuple[weakref.ref, Callable[[object], Iterable[object]]]] = []
_wakeup_sockets: tuple[socket.socket, socket.socket] | None = None  # kept open for the life of the process
_signals_to_exit = 2


def exit_after_signals(count: int) -> None:
    """How many SIGTERM/SIGINT signals end the process at once: 2 for training (the first saves a checkpoint and
    stops after the step), 1 for predict / validate / test, which have nothing to save (predict's files are
    written one by one, atomically) and whose Lightning loops do not stop on a SIGTERM by themselves."""
    global _signals_to_exit
    _signals_to_exit = max(1, int(count))


def register_children(owner: object, get_processes: Callable[[object], Iterable[object]]) -> None:
    """Processes (with `.kill()`, e.g. `subprocess.Popen`) to kill before a forced exit: `get_processes(owner)`, e.g.
    the DDP ranks that a trainer's launcher started from this process. `owner` is held weakly: once it is gone, so
    is its entry."""
    _children[:] = [(ref, get) for ref, get in _children if ref() is not None]
    _children.append((weakref.ref(owner), get_processes))


# Held while a file is written to a temporary name and renamed into place (src/images.py save_png): a forced exit
# waits for it (at most FILE_WRITE_WAIT seconds), so that it leaves neither a half-written file nor the temporary one.
_file_write = threading.Lock()
FILE_WRITE_WAIT = 5.0


@contextmanager
def finish_before_exit() -> Iterator[None]:
    """A block (an atomic file write) that a forced exit on a signal lets finish before the process ends."""
    with _file_write:
        yield


def _force_exit(signum: int) -> None:
    which = "a second termination signal" if _signals_to_exit > 1 else "a termination signal"
    sys.stderr.write(f"\nReceived {which} ({signal.Signals(signum).name}): exiting now\n")
    sys.stderr.flush()
    for owner_ref, get_processes in list(_children):
        owner = owner_ref()
        for process in get_processes(owner) if owner is not None else ():
            try:
                process.kill()
            except Exception:  # already gone
                pass
    _file_write.acquire(timeout=FILE_WRITE_WAIT)  # an atomic write under way ends first (its rename included)
    os._exit(128 + signum)


def _watch(reader: socket.socket) -> None:
    received = 0
    while True:
        try:
            data = reader.recv(64)
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if signum in _TERMINATING:
                received += 1
                if received >= _signals_to_exit:
                    _force_exit(signum)


def exit_on_second_signal() -> bool:
    """Install the watcher (once per process, from the main thread); False where that is not possible."""
    global _wakeup_sockets
    if _wakeup_sockets is not None:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except ValueError:
        reader.close()
        writer.close()
        return False
    threading.Thread(target=_watch, args=(reader,), name="second-signal-exit", daemon=True).start()
    _wakeup_sockets = (reader, writer)
    return True
