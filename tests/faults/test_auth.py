"""Wrong MLflow credentials (a real `mlflow server --app-name basic-auth`, SQLite backend):
refused before any trial is claimed, with a clear message and without echoing the password."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fault_helpers import AuthMlflowServer, enqueue, trials_of
from helpers import write_spec
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

pytestmark = pytest.mark.slow  # worker processes, servers or a browser: the full suite's, not the inner loop's


def test_wrong_credentials_are_refused_before_any_trial_is_claimed(tmp_path, sweeper_env, auth_server, monkeypatch):
    url = f"sqlite:///{sweeper_env['SWEEPER_HOME']}/optuna.db"
    enqueue(write_spec(tmp_path / "guarded.toml"))
    wrong = "not-the-Passw0rd"
    env = {
        **sweeper_env,
        "MLFLOW_TRACKING_URI": auth_server.url,
        "MLFLOW_TRACKING_USERNAME": AuthMlflowServer.ADMIN,
        "MLFLOW_TRACKING_PASSWORD": wrong,
    }

    commands = (["worker", "--device", "cpu"], ["launch", "--study", str(tmp_path / "guarded.toml")], ["doctor"])
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sweeper", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for args in commands
    ]
    for args, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=300)
        said = f"sweeper {args[0]} exited {proc.returncode}\nstdout: {out}\nstderr: {err}"
        assert proc.returncode == 1, said
        assert (
            f"the MLflow tracking server {auth_server.url} refused the credentials (HTTP 401); set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        ) in out + err, said
        assert "Traceback" not in err and wrong not in out + err, said
    (trial,) = trials_of(url, "guarded")
    assert trial.state == TrialState.WAITING  # nothing was claimed

    # The same server with the right password works (basic-auth with the SQLite backend).
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", AuthMlflowServer.ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", AuthMlflowServer.PASSWORD)
    assert MlflowClient(auth_server.url).search_experiments(max_results=1) is not None
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", wrong)
    from sweeper import tracking

    with pytest.raises(tracking.TrackingAuthError):
        tracking.check_reachable(tracking.client(auth_server.url))
