"""Local trials share the host's CPU cores by what is running, not by how many workers started.

Each running trial holds an exclusive ``flock`` on its own file in ``$SWEEPER_HOME/cores``
(named by host and process id: worker containers on one machine share that folder through a
volume, and each of them is process 1 or so in its own namespace); a
trial counts the files whose lock is held (a crashed worker's lock is released by the kernel,
and its file is swept) and trains on ``cores // running`` threads. Trials re-count every few
seconds, so the last long trial of a study takes the cores the others leave behind.

>>> import tempfile
>>> with CoreShare(tempfile.mkdtemp(), cores=4) as share:
...     share.threads()
4
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from sweeper.storage import locks


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class CoreShare:
    """This process's claim on a share of the host's cores while one trial runs."""

    def __init__(self, directory: str | Path, cores: int | None = None, recount_every: float = 2.0):
        self.dir = Path(directory)
        self.cores = cores or host_cores()
        self.recount_every = recount_every
        self.path = self.dir / f"{socket.gethostname()}-{os.getpid()}"
        self._file = None
        self._counted_at = float("-inf")
        self._threads = self.cores

    def __enter__(self) -> CoreShare:
        self.dir.mkdir(parents=True, exist_ok=True)
        # Locked under a temporary name, then renamed into place: a counter never sees it unlocked.
        tmp = self.dir / f".{self.path.name}.tmp"
        self._file = locks.hold_file_lock(tmp)
        os.replace(tmp, self.path)
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
        if self._file is not None:
            self._file.close()
            self._file = None

    def running(self) -> int:
        """Trials running on this host now (this one included)."""
        count = 0
        for path in self.dir.iterdir():
            if path.name.startswith("."):
                continue
            if path == self.path:
                count += 1
                continue
            try:
                held = locks.hold_file_lock(path, wait=False, create=False)
            except FileNotFoundError:
                continue  # finished while we looked
            if held is None:
                count += 1  # held: that trial runs
                continue
            with held:
                path.unlink(missing_ok=True)  # its worker died without cleaning up
        return max(1, count)

    def threads(self) -> int:
        """Threads for this trial now: the host's cores split between the running trials."""
        now = time.monotonic()
        if now - self._counted_at >= self.recount_every:
            self._counted_at = now
            self._threads = max(1, self.cores // self.running())
        return self._threads
