"""Graceful stop on SIGTERM / Ctrl-C: finish what is running, checkpoint, exit 128 + signal.

The first signal only records the request (`requested`, `signal_name`, `exit_status`: 130 for
SIGINT, 143 for SIGTERM); train.py polls it after each step and at each stage of start-up, so no
exception is ever raised inside a compile or under orbax's background saves (a
KeyboardInterrupt there used to end in a segfault at interpreter shutdown).

A second signal exits at once with `os._exit(128 + signal)` after flushing stdout/stderr: the
latest complete checkpoint is kept (orbax only marks a step complete after its last file). It is
seen by a watcher thread reading the signal wakeup fd, not by the Python-level handler, so it
works even while the main thread is blocked in a long XLA compile (Python handlers only run
between bytecodes of the main thread).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signum: int) -> int:
    """The shell's status for a process stopped by `signum` (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


def _exit_now(signum: int, message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
    except Exception:  # a closed or broken stream must not keep the process alive
        pass
    os._exit(exit_status(signum))


class StopRequest:
    """Records SIGTERM / SIGINT; `install()` from the main thread, `uninstall()` to restore.

    Args:
      second_message: what to print (stderr) when a second signal exits at once; gets the
        signal's name.
    """

    def __init__(self, second_message: Callable[[str], str] | None = None):
        self.signal_name: str | None = None
        self.signum: int | None = None
        self._second_message = second_message or (
            lambda name: f"second {name}: stopping now without saving")
        self._count = 0
        self._lock = threading.Lock()
        self._previous = {}
        self._previous_fd = None
        self._pipe = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def exit_status(self) -> int:
        """128 + the first signal (the status a signal-stopped run exits with); 0 if none."""
        return exit_status(self.signum) if self.signum is not None else 0

    def install(self) -> StopRequest:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        # The C-level handler writes each signal's number to this fd as it arrives, whatever
        # the main thread is doing; the watcher counts them.
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._pipe = (read_fd, write_fd)
        threading.Thread(target=self._watch, args=(read_fd,), name="StopRequest",
                         daemon=True).start()
        return self

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
            os.close(self._pipe[1])  # the watcher reads EOF and ends (and closes its end)
            self._pipe = None

    def record(self, signum: int) -> None:
        """Counts one signal: the first is a request, the second exits the process."""
        with self._lock:
            self._count += 1
            first = self._count == 1
            if first:
                self.signum, self.signal_name = int(signum), signal.Signals(signum).name
        if not first:
            _exit_now(signum, self._second_message(signal.Signals(signum).name))

    @staticmethod
    def _handle(signum, frame):
        """The Python-level handler: nothing to do (the watcher counts), but installing it
        keeps SIGINT from raising KeyboardInterrupt and SIGTERM from killing the process."""

    def _watch(self, read_fd: int):
        try:
            while True:
                data = os.read(read_fd, 64)
                if not data:
                    return
                for signum in data:
                    if signum in SIGNALS:
                        self.record(signum)
        finally:
            os.close(read_fd)
