"""Ctrl-C and SIGTERM during training: the step under way finishes, the run is saved, then it stops.

An interrupt that lands inside an optimizer step would leave weights half-updated, so while training
runs the two signals only set a flag that the loop reads between steps. A second signal interrupts at once.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """A context: `requested` is None, or the name of the first signal received ("SIGTERM")."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
