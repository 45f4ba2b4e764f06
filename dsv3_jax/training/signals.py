"""Graceful stop on SIGTERM / Ctrl-C: finish the current step, checkpoint, exit cleanly.

The handler only records the request; the training loop polls `requested` after each step.
A second signal while the first is being handled stops at once (KeyboardInterrupt), for a user
who does not want to wait for the save.
"""

from __future__ import annotations

import signal


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now")
        self.signal_name = signal.Signals(signum).name
