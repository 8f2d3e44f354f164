"""The last workers of a fleet do not leave while another worker's trial may still come back.

A worker that stops answering (SIGSTOP: alive, silent, its heartbeat stopped, as on a host cut
off from the database) holds a RUNNING trial. A worker started without --forever used to find
"no trial waiting" and exit at once, leaving that trial to nobody until a person looked. Now it
exits only when no trial of a claimable study is WAITING or RUNNING: it waits, fails the stale
trial after the grace period, takes the retry over from the checkpoint and finishes it; the
silent worker, resumed, finds it lost the trial and stands down."""

from __future__ import annotations

import signal

import pytest
from fault_helpers import FAST, enqueue, trials_of
from helpers import write_spec
from optuna.trial import TrialState

pytestmark = pytest.mark.slow  # worker processes: the full suite's, not the inner loop's


def test_a_worker_without_forever_waits_for_a_running_trial_and_takes_it_over_when_it_goes_stale(
    tmp_path, sweeper_env, spawn
):
    enqueue(write_spec(tmp_path / "silent.toml", epochs=8))
    url = f"sqlite:///{sweeper_env['SWEEPER_HOME']}/optuna.db"
    common = [*FAST, "--grace-period", "4", "--poll-interval", "0.5"]

    silent = spawn("worker", "--study", "silent", *common, env=sweeper_env, name="silent")
    silent.wait_for(r"epoch 1/8")
    last = spawn("worker", "--study", "silent", *common, env=sweeper_env, name="last")
    last.wait_for(r"waiting for 1 running trial")  # it used to exit here: "no trial waiting; 0 run"
    silent.wait_for(r"checkpoint of epoch \d+ sent")
    silent.send(signal.SIGSTOP)
    try:
        last.wait_for(r"resumes after epoch \d+ ")
        assert last.wait(180) == 0, last.text()
        assert "no trial waiting; 1 run by this worker" in last.text()
    finally:
        silent.send(signal.SIGCONT)
    silent.wait_for(r"stands down")
    assert silent.wait(120) == 0, silent.text()

    failed, retry = trials_of(url, "silent")
    assert (failed.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert "no heartbeat for over 4s" in failed.system_attrs["sweeper.fail_reason"]
