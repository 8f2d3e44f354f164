"""Hardening, round 3 (issue #21): bad hooks and typos refused up front, stores never created
by commands that only read, passwords with a raw "@", value drift seen by `verify`, and a
worker that waits out another MLflow client creating the embedded store. Real servers where a
test needs one: a local HTTP server for the webhooks, PostgreSQL for the empty database."""

from __future__ import annotations

import base64
import http.server
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fault_helpers import FAST, enqueue
from helpers import sweeper, write_spec

SPEC = """[grid]
variant = ["short4"]
dataset = ["digits"]
[train]
epochs = 1
"""


def spec_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / "specs" / f"{name}.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.fixture
def main(monkeypatch, capsys):
    """main(*args, env=..., code=...): the real entry point, `sweeper.cli.main()`, in this process
    (its known errors become one `Error:` line and exit 1); ``env`` adds to the test's."""
    from types import SimpleNamespace

    from sweeper import cli

    def run(*args: str, env: dict[str, str] | None = None, code: int | None = 0):
        with monkeypatch.context() as m:
            for k, v in (env or {}).items():
                m.setenv(k, v)
            m.setattr(sys, "argv", ["sweeper", *args])
            capsys.readouterr()
            try:
                cli.main()
                rc = 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        assert code is None or rc == code, f"sweeper {' '.join(args)} exited {rc}:\n{out}{err}"
        return SimpleNamespace(exit_code=rc, stdout=out, output=out + err)

    return run


def dump(db: Path) -> list[str]:
    """A SQLite database's content as SQL (its file changes when a reader checkpoints the WAL)."""
    with sqlite3.connect(db) as conn:
        return list(conn.iterdump())


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# --- item 3: notifications --------------------------------------------------------------------


class SlowHook:
    """A local HTTP server: answers 200 with a JSON body, optionally trickling it (headers
    first, then a byte every ``trickle`` seconds); records each request's Authorization header."""

    def __init__(self, trickle: float | None = None):
        seen = self.authorizations = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                seen.append(self.headers.get("Authorization"))
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for byte in body:
                    if trickle:
                        self.wfile.flush()
                        time.sleep(trickle)
                    self.wfile.write(bytes([byte]))

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("command", ["launch", "worker"])
def test_a_malformed_notify_url_is_refused_at_start(main, tmp_path, sweeper_env, command):
    """`http://[::1/hook` crashed the worker mid-study (ValueError outside the try, exit 1)."""
    home = Path(sweeper_env["SWEEPER_HOME"])
    args = ["--study", spec_file(tmp_path, "hooked", SPEC)] if command == "launch" else ["--device", "cpu"]
    for bad in ("http://[::1/hook", "ftp://127.0.0.1/hook", "http:///hook", "http://127.0.0.1:99999/hook"):
        result = main(command, *args, "--notify", bad, code=2)
        assert "--notify" in result.output and "Traceback" not in result.output, result.output
    assert files_under(home) == [], "nothing is written"


def test_send_never_raises_bounds_the_whole_request_and_sends_credentials_as_basic_auth(monkeypatch, caplog):
    from sweeper import notify

    for bad in ("http://[::1/hook", "http://127.0.0.1:99999/x", "not a url", "http://"):
        assert notify.send(bad, {"event": "study_complete"}) is False

    # A hook that answers its headers, then a byte every 3 s: the whole request is bounded.
    monkeypatch.setattr(notify, "TIMEOUT", 1.0)
    slow = SlowHook(trickle=3.0)
    try:
        started = time.monotonic()
        assert notify.send(f"http://127.0.0.1:{slow.port}/hook", {"event": "study_complete"}) is False
        assert time.monotonic() - started < 2.5, "the timeout bounds the request, not each read"
    finally:
        slow.close()

    # user:password@ in the URL: sent as basic auth (urllib took them for part of the host), never logged.
    hook = SlowHook()
    try:
        url = f"http://hook-user:p%40ss-S3CRET@127.0.0.1:{hook.port}/hooks/token"
        with caplog.at_level(logging.INFO, logger="sweeper.notify"):
            assert notify.send(url, {"event": "study_complete", "study": "x"}) is True
        (auth,) = hook.authorizations
        assert auth == "Basic " + base64.b64encode(b"hook-user:p@ss-S3CRET").decode()
        assert "S3CRET" not in caplog.text and "notified http://127.0.0.1" in caplog.text
    finally:
        hook.close()


# --- item 4: launch --dry-run -------------------------------------------------------------------


def test_dry_run_estimates_a_spec_variant_and_refuses_absurd_batch_sizes(main, tmp_path, sweeper_env):
    home = Path(sweeper_env["SWEEPER_HOME"])
    own = SPEC.replace('"short4"', '"mine"') + '[variants.mine]\nstages = [["a3"], ["b5"]]\n'
    result = main(
        "launch", "--study", spec_file(tmp_path, "own", own), "--dry-run", "--device", "cpu", "--format", "json"
    )
    (trial,) = json.loads(result.stdout)["trials"]
    assert trial["variant"] == "mine" and trial["estimate_source"] == "probe" and trial["estimate_s"] > 0

    for key in ("batch_size", "eval_batch_size"):
        huge = spec_file(tmp_path, "huge", SPEC + f"{key} = 1000000000000\n")
        result = main("launch", "--study", huge, "--dry-run", "--device", "cpu", code=2)
        assert f"train.{key}: must be an integer >= 1 and <=" in result.output, result.output
    assert files_under(home) == [], "a dry run creates no store"


# --- item 5: a missing or misspelt study --------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "pause", "resume", "cancel", "stop", "retry", "verify", "report"])
def test_commands_on_a_missing_study_write_nothing_and_name_the_existing_ones(main, tmp_path, sweeper_env, command):
    home = Path(sweeper_env["SWEEPER_HOME"])
    home.rmdir()  # an empty home: not even its folder exists
    result = main(command, "--study", "tiny", code=None)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert not home.exists(), files_under(home)

    enqueue(write_spec(tmp_path / "tiny.toml"))
    enqueue(write_spec(tmp_path / "other.toml"))
    before = files_under(home), dump(home / "optuna.db")
    result = main(command, "--study", "tinny", code=1)
    assert "no study named 'tinny'" in result.output and "known studies: tiny, other" in result.output, result.output
    assert "sweeper launch --study tinny" not in result.output
    assert (files_under(home), dump(home / "optuna.db")) == before, "nothing written"


def test_set_state_on_an_empty_home_writes_nothing(sweeper_env):
    from sweeper import api
    from sweeper.errors import SweeperError

    home = Path(sweeper_env["SWEEPER_HOME"])
    home.rmdir()
    with pytest.raises(SweeperError, match="no Optuna storage at"):
        api.set_state("tiny", "pause")
    assert not home.exists()


def test_commands_on_an_empty_postgresql_database_create_no_tables(main, tmp_path, sweeper_env, pg_database):
    from helpers import pg_admin

    url = pg_database()
    env = {"SWEEPER_STORAGE": url}
    for args in (["status", "--study", "tiny"], ["pause", "--study", "tiny"]):
        result = main(*args, env=env, code=1)
        assert "no study named 'tiny'" in result.output and "holds no study" in result.output, result.output
    main("launch", "--study", spec_file(tmp_path, "tiny", SPEC), "--dry-run", "--device", "cpu", env=env)
    admin = pg_admin()
    cur = admin.cursor()
    cur.execute(f"SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")  # noqa: F541
    tables = cur.fetchone()[0]
    admin.close()
    assert tables == 0, "Optuna's tables were created"
    assert files_under(Path(sweeper_env["SWEEPER_HOME"])) == []


@pytest.mark.slow
def test_a_worker_for_a_misspelt_study_creates_no_store(tmp_path, sweeper_env):
    home = Path(sweeper_env["SWEEPER_HOME"])
    done = sweeper("worker", "--study", "typo", *FAST, env=sweeper_env, check=False)
    assert done.returncode == 1 and "no study named 'typo'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and files_under(home) == [], files_under(home)

    enqueue(write_spec(tmp_path / "tiny.toml"))
    done = sweeper("worker", "--study", "tinyy", *FAST, env=sweeper_env, check=False)
    assert done.returncode == 1 and "no study named 'tinyy'" in done.stderr and "known studies: tiny" in done.stderr
    assert "mlflow.db" not in files_under(home), files_under(home)


# --- item 6: a raw "@" in a password -------------------------------------------------------------


def test_a_password_with_a_raw_at_sign_never_shows(main, sweeper_env):
    url = "postgresql://postgres:abc@TAILSECRET99@127.0.0.1:1/x"
    result = main("status", "--study", "tiny", env={"SWEEPER_STORAGE": url}, code=1)
    assert "cannot open the Optuna storage postgresql://postgres:***@127.0.0.1:1/x" in result.output, result.output
    assert "TAILSECRET99" not in result.output and "abc" not in result.output, result.output

    from sweeper.redact import redact, redact_url

    assert redact_url(url) == "postgresql://postgres:***@127.0.0.1:1/x"
    assert "TAILSECRET99" not in redact(f"failed to resolve host 'TAILSECRET99@127.0.0.1' of {url}")


# --- item 9: smaller ones -----------------------------------------------------------------------


def test_splits_that_leave_a_side_empty_and_fractional_integer_steps_are_refused(main, tmp_path, sweeper_env):
    empty = spec_file(tmp_path, "empty", SPEC + "val_fraction = 0.99\nlimit_train = 64\n")
    result = main("launch", "--study", empty, code=2)
    assert "train.val_fraction: 0.99 of 64 training images leaves no training image" in result.output, result.output

    stepped = SPEC + "[search]\ntrials_per_cell = 2\n[search.space]\nbatch_size = { low = 16, high = 64, step = 0.5 }\n"
    result = main("launch", "--study", spec_file(tmp_path, "stepped", stepped), code=2)
    assert "search.space.batch_size: step must be an integer > 0, got 0.5" in result.output, result.output
    assert files_under(Path(sweeper_env["SWEEPER_HOME"])) == []


# --- item 8: another MLflow client creating the embedded store ---------------------------------

OTHER_CLIENT = """
import sys
from mlflow.tracking import MlflowClient
open(sys.argv[2], "w").close()
MlflowClient(sys.argv[1]).search_experiments()
"""


@pytest.mark.slow
def test_the_embedded_store_created_by_another_client_at_the_same_moment(tmp_path):
    """A notebook's MlflowClient on the same mlflow.db, creating its schema while a worker opens
    it: the worker died (alembic's "Online migration expected to match one row", or SQLAlchemy's
    "Circular dependency detected") in 2 of 2 tries before the fix."""
    import mlflow.tracking  # noqa: F401  (imported before the race: an import takes seconds here)

    from sweeper import tracking

    db, started = tmp_path / "mlflow.db", tmp_path / "started"
    uri = f"sqlite:///{db}"
    other = subprocess.Popen([sys.executable, "-c", OTHER_CLIENT, uri, str(started)])
    try:
        deadline = time.monotonic() + 300
        while not db.exists():  # the other client is migrating the schema now
            assert other.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        client = tracking.client(uri)  # what a worker does first
        tracking.check_reachable(client)
        assert client.get_experiment_by_name("Default") is not None
    finally:
        assert other.wait(300) == 0, "the other client too"
    assert os.path.exists(f"{db}.lock")


TRIAL_TABLES = (  # Optuna's rows of a trial, besides its row in trials
    "trial_values",
    "trial_params",
    "trial_user_attributes",
    "trial_system_attributes",
    "trial_intermediate_values",
    "trial_heartbeats",
)

# --- item 7: verify sees value drift; item 9: api.history with one metric name ----------------


@pytest.mark.slow
def test_verify_sees_value_drift_extra_steps_and_state_drift_and_keeps_data(tmp_path, sweeper_env):
    import optuna
    from fault_helpers import trials_of

    from sweeper import api
    from sweeper import verify as verifying

    home = Path(sweeper_env["SWEEPER_HOME"])
    enqueue(write_spec(tmp_path / "drift.toml", seeds=(1, 2), epochs=1))
    done = subprocess.run(
        [sys.executable, "-m", "sweeper", "worker", "--study", "drift", *FAST],
        env=sweeper_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert verifying.verify("drift")["ok"]
    frame = api.history("drift", metrics="top1_error")  # one name, not its letters
    assert list(frame.columns)[-1] == "top1_error" and len(frame) == 2 and frame["top1_error"].notna().all()

    url = f"sqlite:///{home}/optuna.db"
    s1, s2 = trials_of(url, "drift")
    run1, run2 = s1.user_attrs["mlflow_run_id"], s2.user_attrs["mlflow_run_id"]
    with sqlite3.connect(home / "mlflow.db") as db:  # s1's result edited in MLflow
        for table in ("metrics", "latest_metrics"):
            db.execute(f"UPDATE {table} SET value = 0.5 WHERE run_uuid = ? AND key = 'top1_error'", (run1,))
    with sqlite3.connect(home / "optuna.db") as db:  # s2's result edited in Optuna
        db.execute("UPDATE trial_values SET value = 0.25 WHERE trial_id = ?", (s2._trial_id,))
    from sweeper import tracking

    tracking.client(f"sqlite:///{home}/mlflow.db").log_metric(run2, "top1_error", 0.1, step=2)

    result = verifying.verify("drift")
    found = {(p["check"], p["trial"]) for p in result["problems"]}
    assert ("value_differs", s1.number) in found and ("value_differs", s2.number) in found, result["problems"]
    assert ("metric_extra_steps", s2.number) in found, result["problems"]

    # s1 moved back to RUNNING, s2's trial deleted: the counts by state differ, and the repair
    # offered for s2's run keeps it (it is the only record of s2's result).
    with sqlite3.connect(home / "optuna.db") as db:
        db.execute("UPDATE trials SET state = 'RUNNING', datetime_complete = NULL WHERE trial_id = ?", (s1._trial_id,))
        for table in TRIAL_TABLES:
            db.execute(f"DELETE FROM {table} WHERE trial_id = ?", (s2._trial_id,))
        db.execute("DELETE FROM trials WHERE trial_id = ?", (s2._trial_id,))
    assert len(optuna.load_study(study_name="drift", storage=url).trials) == 1
    result = verifying.verify("drift")
    by_check = {p["check"]: p for p in result["problems"]}
    assert by_check["state_differs"]["trial"] == s1.number, result["problems"]
    orphan = by_check["run_without_trial"]
    assert orphan["run_id"] == run2 and "runs delete" not in orphan["repair"] and "sweeper launch" in orphan["repair"]
    assert result["cells"]["RUNNING"] == 1 and result["runs"] == {"FINISHED": 2}
    assert not result["ok"]
