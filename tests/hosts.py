"""Extra hosts for tests: Linux network namespaces joined to this machine by veth links.

Each `Host` is a network namespace with one veth link to the root namespace (a /30 of its own
in 10.231.0.0/16, used nowhere else) and its loopback. Processes started with `Host.popen`
see nothing of this machine's network but that link: they reach PostgreSQL and the MLflow
server only through a `Forwarder` listening on the link's root-side address, so the machine's
servers keep their configuration. `Host.partition()` drops packets inside the namespace with
iptables (DROP, not REJECT: connections hang as they do when a real network fails), `heal()`
lets them through again.

    with Network() as net:
        b = net.host()
        pg = b.forward(5432)           # port on b.gateway that leads to 127.0.0.1:5432
        proc = b.popen(["psql", f"postgresql://postgres@{b.gateway}:{pg}/postgres", "-c", "select 1"])
        b.partition()                  # every packet between b and this machine dropped
        b.heal()

Needs root and iproute2/iptables; `network_unavailable()` says why not, for a skip message.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import random
import re
import socket
import subprocess
import threading
from pathlib import Path

SUBNET = ipaddress.ip_network("10.231.0.0/16")
_NETWORKS = itertools.count()  # this process's Networks, for their interface names


def _run(cmd: list[str], netns: str | None = None) -> str:
    cmd = cmd if netns is None else ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _ip(*args: str, netns: str | None = None) -> str:
    return _run(["ip", *args], netns)


def network_unavailable() -> str | None:
    """Why extra hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"`{tool}` is not installed (Debian: iproute2, iptables)"
    probe = f"swp-probe-{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, text=True)
        subprocess.run(["ip", "netns", "exec", probe, "iptables", "-L"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        return f"cannot make a network namespace with iptables here: {(e.stderr or '').strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Forwarder:
    """A TCP forwarder: accepts on (address, port) and pipes each connection to `target`.

    ``cut_when`` is a tripwire for a cut at one exact statement: what a client sends is matched
    message by message, and once a connection has sent its patterns in order the forwarder stops
    passing anything, either way, on every connection (they hang, as on a dropped link)."""

    def __init__(self, address: str, target: tuple[str, int]):
        self.target = target
        self.server = socket.create_server((address, 0))
        self.port = self.server.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.cut = threading.Event()
        self._wire: tuple[list[re.Pattern[bytes]], bool] | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_when(self, *patterns: bytes, deliver_last: bool) -> threading.Event:
        """Cut once one connection's client has sent messages matching ``patterns`` (regular
        expressions, ``.`` matching any byte), in order; the message matching the last one reaches
        the server first when ``deliver_last`` (its answer never comes back: the ambiguous commit)
        or never when not. Returns the cut's Event."""
        self._wire = ([re.compile(p, re.DOTALL) for p in patterns], deliver_last)
        return self.cut

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self.connections += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        seen = 0  # of the tripwire's patterns, on this connection (one message may match several)
        try:
            while data := src.recv(65536):
                if self.cut.is_set():
                    continue  # dropped: the peer waits, as on a real network
                wire, at = self._wire, 0
                while from_client and wire and seen < len(wire[0]) and (match := wire[0][seen].search(data, at)):
                    seen, at = seen + 1, match.end()
                if wire and seen == len(wire[0]):
                    if wire[1]:
                        dst.sendall(data)
                    self.cut.set()
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def mend(self, reset: bool = False) -> None:
        """After a tripwire's cut: the connections it cut are closed (their clients gave up on them
        long ago, as their TCP timeouts said; with ``reset`` the clients still waiting see theirs
        closed now, as when a server restarts), new ones pass again."""
        if self.cut.is_set():
            connections, self.connections, self._wire = self.connections, [], None
            for s in connections:
                if reset:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.cut.clear()

    def close(self) -> None:
        self.server.close()
        for s in self.connections:
            s.close()


class Host:
    """One extra host: a network namespace and its veth link (see the module's docstring)."""

    def __init__(self, name: str, link: ipaddress.IPv4Network):
        self.name = name
        self.gateway, self.address = (str(a) for a in list(link.hosts())[:2])  # this machine's end, the host's
        self.forwarders: list[Forwarder] = []
        self.procs: list[subprocess.Popen] = []
        _ip("netns", "add", name)
        try:
            self._link(link)
        except subprocess.CalledProcessError:
            self.close()
            raise

    def _link(self, link: ipaddress.IPv4Network) -> None:
        name = self.name
        outside, inside = f"{name}a", f"{name}b"  # interface names: at most 15 characters
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", name)
        _ip("addr", "add", f"{self.gateway}/{link.prefixlen}", "dev", outside)
        _ip("link", "set", outside, "up")
        _ip("addr", "add", f"{self.address}/{link.prefixlen}", "dev", inside, netns=name)
        _ip("link", "set", inside, "up", netns=name)
        _ip("link", "set", "lo", "up", netns=name)

    def forward(self, port: int) -> int:
        """A port on this host's gateway address that leads to 127.0.0.1:`port` of this machine."""
        forwarder = Forwarder(self.gateway, ("127.0.0.1", port))
        self.forwarders.append(forwarder)
        return forwarder.port

    def popen(self, cmd: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `cmd` inside this host (stdout and stderr to `log` when given)."""
        out = open(log, "ab") if log else subprocess.DEVNULL
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        return proc

    def run(self, cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], capture_output=True, text=True, timeout=timeout)

    def limit_rate(self, rate: str) -> None:
        """What this host sends goes out at ``rate`` (tc's token bucket, e.g. "40mbit"): a
        checkpoint upload then takes seconds, long enough to cut the link in the middle of it."""
        _run(
            [
                "tc",
                "qdisc",
                "add",
                "dev",
                f"{self.name}b",
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "64kb",
                "latency",
                "400ms",
            ],
            netns=self.name,
        )

    def _iptables(self, *rule: str) -> None:
        _run(["iptables", *rule], netns=self.name)

    def partition(self, port: int | None = None) -> None:
        """Drop every packet between this host and this machine, or only those of one forwarded
        `port` (an asymmetric cut: PostgreSQL unreachable, MLflow still answering, or the reverse)."""
        match = ["-p", "tcp", "--dport", str(port)] if port else []
        back = ["-p", "tcp", "--sport", str(port)] if port else []
        self._iptables("-A", "OUTPUT", "-d", self.gateway, *match, "-j", "DROP")
        self._iptables("-A", "INPUT", "-s", self.gateway, *back, "-j", "DROP")

    def heal(self) -> None:
        self._iptables("-F", "OUTPUT")
        self._iptables("-F", "INPUT")
        for forwarder in self.forwarders:
            forwarder.mend()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout.split()
        for pid in pids:  # grandchildren a test left behind
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        for forwarder in self.forwarders:
            forwarder.close()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)  # takes the veth pair with it


class Network:
    """The extra hosts of one test; every host is removed on exit, whatever happened."""

    def __init__(self):
        self.hosts: list[Host] = []
        # One name per Network, not per process: the kernel takes a deleted namespace's veth pair
        # down after `ip netns del` returns, so the next test's same name could still exist.
        self.tag = f"sw{os.getpid() % 100000}n{next(_NETWORKS)}"

    def _free_link(self) -> ipaddress.IPv4Network:
        used = _ip("-o", "-4", "addr", "show")
        links = list(SUBNET.subnets(new_prefix=30))
        for link in random.sample(links, 64):
            if not any(str(a) in used for a in link):
                return link
        raise RuntimeError(f"no free /30 in {SUBNET}")

    def host(self) -> Host:
        host = Host(f"{self.tag}h{len(self.hosts)}", self._free_link())
        self.hosts.append(host)
        return host

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc) -> None:
        for host in self.hosts:
            host.close()
