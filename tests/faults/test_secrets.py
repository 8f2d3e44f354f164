"""No password on a command line, in a log, a traceback or an error message (issue #15, items 1-3).

The passwords hold a "/" (generated base64 passwords do), which the first redaction missed.
PostgreSQL here trusts local connections, so any password works; MLflow's plain server ignores
credentials: both then carry a password through every real code path without an account.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from fault_helpers import FAST
from helpers import free_port, write_spec

pytestmark = pytest.mark.slow  # worker processes, servers or a browser: the full suite's, not the inner loop's

PG_PASSWORD = "pg/Secret+9z"
MLFLOW_PASSWORD = "mlSecret+4q="  # an http URL takes no "/" in a password (it ends the host)


def with_password(url: str, user: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest.rpartition('@')[2]}"


def command_lines_with(*secrets: str) -> list[str]:
    """Every process's command line (what any local user reads with `ps`) that holds a secret."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if any(s in line for s in secrets):
            found.append(f"{proc.info['pid']}: {line}")
    return found


def assert_no_secret(text: str, where: str) -> None:
    for secret in (PG_PASSWORD, MLFLOW_PASSWORD, "Secret+"):
        assert secret not in text, f"{where} shows a password:\n{text}"


def test_launch_workers_and_ui_keep_passwords_off_command_lines(tmp_path, sweeper_env, spawn, pg_database, tracking):
    """Item 1: `launch --workers N` passed --storage URL to its workers, `ui` gave optuna-dashboard
    the URL as an argument."""
    pg = pg_database()
    storage = with_password(pg, "postgres", PG_PASSWORD)
    env = {
        **sweeper_env,
        "SWEEPER_STORAGE": storage,
        "MLFLOW_TRACKING_URI": with_password(tracking.url, "sweeper", MLFLOW_PASSWORD),
    }
    spec = write_spec(tmp_path / "secret.toml", epochs=30)
    launcher = spawn("launch", "--study", str(spec), "--workers", "1", "--heartbeat-interval", "1", env=env)
    log = tmp_path / "home" / "logs" / "worker-1.log"
    deadline = time.monotonic() + 240
    while not (log.exists() and "epoch 1/30" in log.read_text()):
        assert time.monotonic() < deadline and launcher.popen.poll() is None, launcher.text()
        time.sleep(0.2)
    assert command_lines_with(PG_PASSWORD, MLFLOW_PASSWORD) == []
    launcher.send(signal.SIGINT)
    assert launcher.wait(120) == 130, launcher.text()
    assert_no_secret(launcher.text(), "launch")
    assert_no_secret(log.read_text(), "the worker's log")

    ui = spawn("ui", "--study", "secret", "--dashboard-port", str(free_port()), env=env)
    ui.wait_for(r"optuna-dashboard  http://127\.0\.0\.1:\d+/dashboard/studies/\d+", timeout=240)
    assert command_lines_with(PG_PASSWORD, MLFLOW_PASSWORD) == []
    ui.send(signal.SIGINT)
    assert ui.wait(60) == 0, ui.text()
    assert_no_secret(ui.text(), "ui")


def test_mlflow_going_away_shows_no_password_in_logs_or_report(tmp_path, sweeper_env, spawn, mlflow_server):
    """Item 3: a worker whose MLflow server goes away (its system-metrics thread on), and
    `sweeper report` against that server, print no password and no traceback."""
    server = mlflow_server()
    env = {**sweeper_env, "MLFLOW_TRACKING_URI": with_password(server.url, "sweeper", MLFLOW_PASSWORD)}
    spec = write_spec(tmp_path / "away.toml", epochs=30)
    subprocess.run([sys.executable, "-m", "sweeper", "launch", "--study", str(spec)], env=env, check=True)
    fast = [a for a in FAST if a != "--no-system-metrics"]
    worker = spawn("worker", "--study", "away", *fast, "--tracking-outage-limit", "2", env=env)
    worker.wait_for(r"epoch 1/30")
    server.stop()
    assert worker.wait(180) == 1, worker.text()
    text = worker.text()
    # the credentials travel as MLFLOW_TRACKING_USERNAME/PASSWORD: the URL shown has none
    assert "Error: cannot reach the MLflow tracking store http://127.0.0.1:" in text, text
    assert_no_secret(text, "the worker's log")

    report = subprocess.run(
        [sys.executable, "-m", "sweeper", "report", "--study", "away"], env=env, capture_output=True, text=True
    )
    assert report.returncode == 1, report.stderr
    assert "Traceback" not in report.stderr, report.stderr
    assert re.search(r"^Error: .*MLflow tracking store http://127\.0\.0\.1:", report.stderr, re.M)
    assert_no_secret(report.stdout + report.stderr, "report")


def test_redaction_hides_passwords_with_slashes_spaces_and_at_signs():
    """Item 2: the redaction stopped at "/" and whitespace; SQLAlchemy accepts both in a password."""
    from sweeper.redact import redact, redact_url, remember

    for password in ("pa/ss123", "pa@ss/1=", "p:a/s+s"):
        url = f"postgresql://user:{password}@127.0.0.1:1/db"
        assert redact_url(url) == "postgresql://user:***@127.0.0.1:1/db"
        assert redact(f"cannot open {url}: refused") == "cannot open postgresql://user:***@127.0.0.1:1/db: refused"
        assert redact(f"http://user:{password}@host:5000/api") == "http://user:***@host:5000/api"
    spaced = "postgresql://user:pa ss/word@127.0.0.1:1/db"
    assert redact_url(spaced) == "postgresql://user:***@127.0.0.1:1/db"
    remember(spaced)  # the process's own URLs: their passwords are hidden wherever they appear
    assert redact(f"{spaced} said: password 'pa ss/word' refused") == (
        "postgresql://user:***@127.0.0.1:1/db said: password '***' refused"
    )
