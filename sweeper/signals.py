"""SIGINT/SIGTERM as a flag that a loop checks between steps: the worker's, the launcher's and
`sweeper ui`'s. A KeyboardInterrupt raised wherever the main thread happens to be (a storage
query, rich's refresh, a finalizer) can be swallowed as "Exception ignored"; a flag cannot be lost."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignal:
    """``event`` is set by the first SIGINT/SIGTERM; ``count`` says how many came;
    ``on_signal(signum, count)`` runs after each (the worker exits at the second)."""

    def __init__(
        self, event: threading.Event | None = None, on_signal: Callable[[int, int], None] | None = None
    ) -> None:
        self.event = event if event is not None else threading.Event()
        self.on_signal = on_signal
        self.count = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignal:
        """Handle the signals from now on; a thread other than the main one cannot, and does not."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def restore(self) -> None:
        """The handlers from before ``install``."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopSignal:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, _frame) -> None:
        self.count += 1
        self.event.set()
        if self.on_signal is not None:
            self.on_signal(signum, self.count)

    def is_set(self) -> bool:
        return self.event.is_set()
