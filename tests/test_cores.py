"""Local trials share the host's cores by what runs: real processes holding real locks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from sweeper.cores import CoreShare

pytestmark = pytest.mark.slow  # worker processes, servers or a browser: the full suite's, not the inner loop's

HOLD = (
    "import sys, time\n"
    "from sweeper.cores import CoreShare\n"
    "with CoreShare(sys.argv[1]):\n"
    "    print('holding', flush=True)\n"
    "    time.sleep(60)\n"
)


def hold(directory) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_trial_alone_takes_every_core_and_shares_them_with_others(tmp_path):
    others = [hold(tmp_path), hold(tmp_path)]
    try:
        with CoreShare(tmp_path, cores=8, recount_every=0) as share:
            assert share.running() == 3
            assert share.threads() == 2  # 8 cores // 3 trials
            others[0].send_signal(signal.SIGTERM)  # finished: its lock goes with it
            others[0].wait(10)
            assert share.threads() == 4
            os.kill(others[1].pid, signal.SIGKILL)  # crashed without cleaning up: swept
            others[1].wait(10)
            assert share.threads() == 8
            assert [p.name for p in tmp_path.iterdir()] == [f"{socket.gethostname()}-{os.getpid()}"]
        assert list(tmp_path.iterdir()) == []
    finally:
        for p in others:
            p.kill()


def test_threads_are_recounted_at_most_every_few_seconds(tmp_path):
    with CoreShare(tmp_path, cores=4, recount_every=3600) as share:
        assert share.threads() == 4
        other = hold(tmp_path)
        try:
            assert share.threads() == 4  # the cached count: no directory scan per training step
            share._counted_at = time.monotonic() - 3601
            assert share.threads() == 2
        finally:
            other.kill()
