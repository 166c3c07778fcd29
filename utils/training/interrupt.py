"""Ctrl-C and SIGTERM as a request to stop cleanly: the training loop finishes the step it is in,
saves a checkpoint and exits 0. A second signal acts as it always does (Ctrl-C: KeyboardInterrupt at once).
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """requested: the name of the signal that asked the run to stop ("" = none yet)."""

    def __init__(self):
        self.requested = ""
        self._previous = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread only
            return self
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        self.restore()  # the next signal stops at once
        print(f"\n[stopping] {self.requested}: finishing this step, then saving a checkpoint "
              "(press Ctrl-C again to stop at once, without saving)", flush=True)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def stop_on_signals() -> StopRequest:
    """Catch SIGINT/SIGTERM until .restore(); the caller checks .requested between steps."""
    return StopRequest().install()
