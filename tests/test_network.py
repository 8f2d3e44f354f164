"""Workers on other hosts: a network namespace per host (tests/hosts.py), PostgreSQL and a real
`mlflow server` reached only across the host's veth link, and partitions that drop packets.

SWEEPER_REQUIRE_NETNS=1 (CI) fails instead of skipping where namespaces cannot be made."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from helpers import sweeper, write_spec
from hosts import Network, network_unavailable

pytestmark = pytest.mark.slow

REQUIRE_NETNS = os.environ.get("SWEEPER_REQUIRE_NETNS") == "1"

CONNECT = """
import socket, sys, time
t = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except socket.timeout:
    print("timeout")
except OSError as e:
    print("refused" if isinstance(e, ConnectionRefusedError) else type(e).__name__)
"""


@pytest.fixture
def network():
    why = network_unavailable()
    if why:
        if REQUIRE_NETNS:
            pytest.fail(f"extra hosts are required (SWEEPER_REQUIRE_NETNS=1) but {why}")
        pytest.skip(f"no extra hosts: {why}")
    with Network() as net:
        yield net


def connect(host, address: str, port: int, timeout: float = 2.0) -> str:
    return host.run([sys.executable, "-c", CONNECT, address, str(port), str(timeout)]).stdout.strip()


def test_a_host_reaches_this_machine_only_across_its_link_and_a_partition_drops_packets(network):
    b = network.host()
    port = b.forward(5432)
    assert connect(b, "127.0.0.1", 5432) == "refused"  # its own loopback: nothing of this machine's
    assert connect(b, b.gateway, port) == "connected"
    b.partition()
    started = time.monotonic()
    assert connect(b, b.gateway, port, timeout=2) == "timeout"  # dropped, not reset: the connect hangs
    assert time.monotonic() - started >= 1.5
    b.heal()
    assert connect(b, b.gateway, port) == "connected"


def test_a_partition_of_one_port_leaves_the_other_server_reachable(network):
    b = network.host()
    pg, other = b.forward(5432), b.forward(5432)
    b.partition(port=pg)
    assert connect(b, b.gateway, pg, timeout=1) == "timeout"
    assert connect(b, b.gateway, other) == "connected"


def test_a_worker_on_another_host_trains_a_cell_across_the_link(
    network, pg_database, mlflow_server, sweeper_env, tmp_path
):
    storage = pg_database()
    server = mlflow_server()
    env = {**sweeper_env, "SWEEPER_STORAGE": storage, "MLFLOW_TRACKING_URI": server.url}
    spec = write_spec(tmp_path / "netcell.toml", epochs=2, limit_train=64, limit_test=64)
    sweeper("launch", "--study", str(spec), env=env)

    b = network.host()
    remote_storage = storage.replace("127.0.0.1:5432", f"{b.gateway}:{b.forward(5432)}")
    remote_tracking = f"http://{b.gateway}:{b.forward(server.port)}"
    home = tmp_path / "home-b"
    home.mkdir()
    worker_env = {
        **sweeper_env,
        "SWEEPER_HOME": str(home),
        "SWEEPER_STORAGE": remote_storage,
        "MLFLOW_TRACKING_URI": remote_tracking,
        "SWEEPER_HOST_ID": "host-b",
    }
    log = tmp_path / "worker-b.log"
    proc = b.popen(
        [sys.executable, "-m", "sweeper", "worker", "--study", "netcell", "--no-system-metrics"],
        log=log,
        env=worker_env,
    )
    assert proc.wait(timeout=300) == 0, log.read_text()

    status = json.loads(sweeper("status", "--study", "netcell", "--format", "json", env=env).stdout)
    assert status["counts"].get("COMPLETE") == 1, status
    sweeper("verify", "--study", "netcell", env=env)  # MLflow and Optuna agree; exit 1 on any drift
