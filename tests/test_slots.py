"""GPU slot claims: worker processes on one host spread over its GPUs, on fake device lists."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # worker processes, servers or a browser: the full suite's, not the inner loop's

CLAIM = """
import sys, time
from sweeper import slots
slot = slots.claim(sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3] or None)
print(slot.device, slot.index, flush=True)
time.sleep(float(sys.argv[4]))
"""


def claim_in_processes(n: int, gpus: str, per_gpu: int, storage: str, env) -> list[str]:
    """Start n processes that each claim a slot and hold it; return what each got."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM, gpus, str(per_gpu), storage, "6"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        results.append(out.strip() or err.strip().splitlines()[-1])
    return results


@pytest.mark.parametrize("backend", ["file", "postgresql", "pgbouncer"])
def test_workers_spread_over_gpus_then_pack(backend, sweeper_env, request):
    # Only the PostgreSQL cases ask for the database: the file backend must run where there is none.
    storage = request.getfixturevalue("pg_database")() if backend != "file" else ""
    if backend == "pgbouncer":  # transaction pooling, one server connection that every claim shares
        storage = request.getfixturevalue("pgbouncer")(pool_size=1).url(storage)
    got = claim_in_processes(4, "0,1", 2, storage, sweeper_env)
    devices = sorted(g.split()[0] for g in got)
    assert devices == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"], got


def test_full_host_is_a_clear_error(sweeper_env):
    got = claim_in_processes(3, "0", 2, "", sweeper_env)
    assert sorted(got)[:2] == ["cuda:0 0", "cuda:0 1"]
    assert "all 2 GPU slots" in sorted(got)[2] and "--workers-per-gpu" in sorted(got)[2]


def test_slot_is_freed_when_its_worker_dies(sweeper_env):
    first = subprocess.Popen(
        [sys.executable, "-c", CLAIM, "0", "1", "", "60"], env=sweeper_env, stdout=subprocess.PIPE, text=True
    )
    assert first.stdout.readline().split()[0] == "cuda:0"
    assert "all 1 GPU slots" in claim_in_processes(1, "0", 1, "", sweeper_env)[0]
    first.kill()
    first.wait()
    time.sleep(0.2)
    assert claim_in_processes(1, "0", 1, "", sweeper_env)[0] == "cuda:0 0"
