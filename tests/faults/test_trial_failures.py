"""Trials that fail for a reason retrying cannot fix: a NaN loss (a real worker process) and a
CUDA out-of-memory (in process: there is no GPU here, so the model is made to raise
torch.OutOfMemoryError). Each FAILs with its reason, is not retried, and the worker goes on;
`sweeper retry` re-enqueues such a cell on purpose."""

from __future__ import annotations

import gc
import json
import weakref

import optuna
import pytest
import torch
from fault_helpers import FAST, cli, enqueue, storage_of, trials_of
from helpers import write_spec
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

pytestmark = pytest.mark.slow  # worker processes, servers or a browser: the full suite's, not the inner loop's


def test_nan_loss_fails_the_trial_without_retry_and_the_worker_goes_on(tmp_path, sweeper_env, spawn, tracking):
    env = {**sweeper_env, "MLFLOW_TRACKING_URI": tracking.url}
    url = f"sqlite:///{sweeper_env['SWEEPER_HOME']}/optuna.db"
    enqueue(write_spec(tmp_path / "diverges.toml", epochs=2, extra="lr = 1e30\n"))
    enqueue(write_spec(tmp_path / "converges.toml", epochs=2))
    worker = spawn("worker", *FAST, "--grace-period", "60", env=env)  # every study in the storage
    assert worker.wait(180) == 0, worker.text()
    assert "2 run by this worker" in worker.text()

    (nan,) = trials_of(url, "diverges")  # not retried
    assert nan.state == TrialState.FAIL
    reason = nan.system_attrs["sweeper.fail_reason"]
    assert reason.startswith("training loss became nan at epoch 1") and "lower the learning rate" in reason
    assert nan.system_attrs["sweeper.fail_cause"] == "non_finite_loss"  # `status` groups by the code
    client = MlflowClient(tracking.url)
    run = client.get_run(nan.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["sweeper.reason"] == reason
    (ok,) = trials_of(url, "converges")
    assert ok.state == TrialState.COMPLETE

    # The reason shows in `sweeper status`; `sweeper retry` re-enqueues the cell on purpose.
    assert "training loss became nan" in cli("status", "--study", "diverges").stdout
    retried = cli("retry", "--study", "diverges", "--format", "json")
    assert "1 failed cell(s) of diverges re-enqueued" in retried.stderr
    assert json.loads(retried.stdout) == {"study": "diverges", "retried": 1}
    status = json.loads(cli("status", "--study", "diverges", "--format", "json").stdout)
    assert status["counts"] == {"WAITING": 1, "RUNNING": 0, "COMPLETE": 0, "PRUNED": 0, "FAIL": 1}
    waiting = status["trials"][1]
    # A retry on purpose starts a fresh retry budget (issue #21, item 2).
    assert waiting["state"] == "WAITING" and waiting["retry_of"] == 0 and waiting["retry_history"] == []
    assert waiting["mlflow_run_id"] == nan.user_attrs["mlflow_run_id"]  # the retry continues the cell's run
    assert "no failed cell" in cli("retry", "--study", "converges").output


def test_out_of_memory_fails_the_trial_frees_memory_and_the_worker_goes_on(
    tmp_path, sweeper_env, tracking, monkeypatch, caplog
):
    """No GPU here: the first model raises torch.OutOfMemoryError in its forward pass, as CUDA
    would; the worker's handling path (reason, no retry, memory freed, next trial) is the real one."""
    import sweeper.models
    from sweeper import worker

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    enqueue(write_spec(tmp_path / "oom.toml", seeds=(1, 2), epochs=1), url)
    real_build = sweeper.models.build_model
    built: list[weakref.ref] = []
    freed_before_next: list[bool] = []

    def build_model(*args, **kwargs):
        model = real_build(*args, **kwargs)
        if built:
            gc.collect()
            freed_before_next.append(built[0]() is None)
        else:

            def forward(*_a, **_k):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 80.00 GiB total)")

            model.forward = forward
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(sweeper.models, "build_model", build_model)
    config = worker.WorkerConfig(
        storage_url=url,
        tracking_uri=tracking.url,
        device="cpu",
        precision="fp32",
        heartbeat_interval=1,
        grace_period=60,
    )
    assert worker.run(config) == 2

    study = optuna.load_study(study_name="oom", storage=storage_of(url))
    oom, ok = study.get_trials(deepcopy=False)
    assert (oom.state, ok.state) == (TrialState.FAIL, TrialState.COMPLETE) and len(study.trials) == 2
    reason = oom.system_attrs["sweeper.fail_reason"]
    assert (
        reason.startswith("out of memory on cpu at batch size 64: CUDA out of memory") and "lower batch_size" in reason
    )
    assert oom.system_attrs["sweeper.fail_cause"] == "out_of_memory"
    run = MlflowClient(tracking.url).get_run(oom.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["sweeper.reason"] == reason
    # The failed trial's model was gone before the next one was built.
    assert freed_before_next == [True]
