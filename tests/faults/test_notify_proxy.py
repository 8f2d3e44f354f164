"""Notifications through the proxy the environment names (``HTTP_PROXY``, ``HTTPS_PROXY``,
``NO_PROXY`` and their lower-case forms), as curl, pip and MLflow's own client honour them: a
worker on a network whose only way out is a proxy reached its hook directly, and every
notification failed. A real ``tinyproxy`` (Debian's tinyproxy-bin) stands between ``notify.send``
and a local hook: plain HTTP forwarded, HTTPS tunnelled with CONNECT, proxy credentials sent as
``Proxy-Authorization`` and never logged."""

from __future__ import annotations

import http.server
import json
import logging
import os
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import free_port, sweeper

PROXY_USER, PROXY_PASSWORD = "puser", "pass-S3CRET"  # tinyproxy's BasicAuth takes [-a-z0-9._] only
REQUIRE = os.environ.get("SWEEPER_REQUIRE_PROXY") == "1"


class TinyProxy:
    """A real ``tinyproxy`` on a free 127.0.0.1 port, in the foreground, logging each request."""

    def __init__(self, root: Path, basic_auth: bool = False):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 30", "MaxClients 20", "Allow 127.0.0.1"]
        lines += [f'LogFile "{root / "tinyproxy.log"}"', "LogLevel Info"]
        lines += [f"BasicAuth {PROXY_USER} {PROXY_PASSWORD}"] if basic_auth else []
        (root / "tinyproxy.conf").write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [shutil.which("tinyproxy"), "-d", "-c", str(root / "tinyproxy.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while "listening on" not in self.log().lower() and "bound to" not in self.log().lower():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tinyproxy did not start:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        path = self.root / "tinyproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Hook:
    """A local hook (HTTP, or HTTPS with ``cert``) that records each document and its headers."""

    def __init__(self, cert: tuple[Path, Path] | None = None):
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                document = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append((document, dict(self.headers)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*cert)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_port}/hooks/s3cr3t-token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy_env(monkeypatch):
    """No proxy setting from the machine: each test names its own."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


@pytest.fixture
def tinyproxy(tmp_path):
    if shutil.which("tinyproxy") is None:
        message = "tinyproxy is not installed (apt-get install tinyproxy-bin)"
        if REQUIRE:
            pytest.fail(f"{message}: SWEEPER_REQUIRE_PROXY=1 needs it for the notification proxy tests")
        pytest.skip(message)
    started: list[TinyProxy] = []

    def start(basic_auth: bool = False) -> TinyProxy:
        root = tmp_path / f"tinyproxy-{len(started)}"
        root.mkdir()
        root.chmod(0o777)  # tinyproxy started as root writes its log as nobody
        started.append(TinyProxy(root, basic_auth))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def hooks():
    made: list[Hook] = []

    def make(cert=None) -> Hook:
        made.append(Hook(cert))
        return made[-1]

    yield make
    for hook in made:
        hook.close()


def test_a_notification_goes_through_the_proxy_the_environment_names_unless_no_proxy_covers_the_hook(
    tinyproxy, hooks, proxy_env
):
    from sweeper import notify

    proxy, hook = tinyproxy(), hooks()
    proxy_env.setenv("HTTP_PROXY", proxy.url)
    assert notify.send(hook.url, {"event": "study_complete", "study": "x"}) is True
    ((document, headers),) = hook.received
    assert document["event"] == "study_complete"
    assert "tinyproxy" in headers.get("Via", ""), f"the hook was reached directly, not through the proxy: {headers}"
    assert f"POST {hook.url}" in proxy.log()

    proxy_env.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert notify.send(hook.url, {"event": "study_complete", "study": "y"}) is True
    assert "Via" not in hook.received[-1][1], "NO_PROXY names the hook's host: it is reached directly"


def test_no_proxy_networks_and_ports_are_read_as_mlflows_client_reads_them(tinyproxy, hooks, proxy_env):
    """MLflow's client (requests) takes NO_PROXY entries in CIDR form and ``host:port``; urllib's
    rules took neither, so a hook NO_PROXY exempted by network went through the proxy anyway."""
    from sweeper import notify

    proxy, hook = tinyproxy(), hooks()
    proxy_env.setenv("HTTP_PROXY", proxy.url)
    by_name = hook.url.replace("127.0.0.1", "localhost")
    port = hook.server.server_port
    for url, no_proxy in ((hook.url, "10.0.0.0/8,127.0.0.0/8"), (by_name, f"example.org,localhost:{port}")):
        proxy_env.setenv("NO_PROXY", no_proxy)
        assert notify.send(url, {"event": "study_complete", "study": no_proxy}) is True
        assert "Via" not in hook.received[-1][1], f"NO_PROXY={no_proxy} covers {url}: it is reached directly"
    proxy_env.setenv("NO_PROXY", f"10.0.0.0/8,localhost:{port + 1}")
    assert notify.send(hook.url, {"event": "study_complete", "study": "proxied"}) is True
    assert "tinyproxy" in hook.received[-1][1].get("Via", ""), "a network or port the hook is not in: proxied"


def test_an_https_hook_is_reached_through_a_connect_tunnel_with_the_proxys_credentials(
    tinyproxy, hooks, proxy_env, tmp_path, caplog
):
    from sweeper import notify

    cert, key = tmp_path / "hook.crt", tmp_path / "hook.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    proxy_env.setenv("SSL_CERT_FILE", str(cert))  # the hook's self-signed certificate, trusted
    proxy, hook = tinyproxy(basic_auth=True), hooks((cert, key))
    port = proxy.port

    proxy_env.setenv("HTTPS_PROXY", f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{port}")
    with caplog.at_level(logging.INFO, logger="sweeper.notify"):
        assert notify.send(hook.url, {"event": "study_complete", "study": "x"}) is True
    assert [d["study"] for d, _ in hook.received] == ["x"]
    assert f"CONNECT 127.0.0.1:{hook.server.server_port}" in proxy.log()

    # The proxy refuses a wrong password: the notification fails, logged without any secret.
    proxy_env.setenv("HTTPS_PROXY", f"http://{PROXY_USER}:wrong-S3CRET@127.0.0.1:{port}")
    with caplog.at_level(logging.INFO, logger="sweeper.notify"):
        assert notify.send(hook.url, {"event": "study_complete", "study": "y"}) is False
    assert len(hook.received) == 1
    failed = f"https://127.0.0.1:{hook.server.server_port} through the proxy http://127.0.0.1:{port} failed"
    assert f"{failed} (Tunnel connection failed: 401 Unauthorized)" in caplog.text, caplog.text
    assert "S3CRET" not in caplog.text and "s3cr3t" not in caplog.text


def test_a_proxy_setting_notify_cannot_use_is_refused_at_start(sweeper_env, tmp_path):
    env = {**sweeper_env, "HTTPS_PROXY": "socks5://user:S3CRET@127.0.0.1:1080"}
    result = sweeper("worker", "--device", "cpu", "--notify", "https://hooks.example/T0K3N", env=env, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    assert "HTTPS_PROXY" in output and "http://" in output and "S3CRET" not in output, output
    assert not any(Path(sweeper_env["SWEEPER_HOME"]).iterdir()), "nothing is written"
