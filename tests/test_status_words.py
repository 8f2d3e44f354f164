"""One state word for a study (running, paused, stopped, cancelled, finished, failed) in `status`,
on the launch board and from the lifecycle commands; numbers formatted per column; a worker that
claims nothing says why."""

from __future__ import annotations

import json
import re

import pytest
from helpers import sweeper, write_spec
from optuna.trial import TrialState
from rich.console import Console

from sweeper import spec as specs
from sweeper.launcher import Board
from sweeper.names import FAIL_CAUSE_ATTR, FAIL_REASON_ATTR, NO_RETRY_ATTR
from sweeper.storage import connect
from sweeper.trials import claims, enqueue, summary

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) \S+\[\d+\]: ")


def render(board: Board) -> str:
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(board())
    return console.export_text()


def test_the_board_names_the_state_groups_failures_and_ends_finished_or_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEPER_HOME", str(tmp_path))
    storage = connect.open_storage(f"sqlite:///{tmp_path}/optuna.db")
    spec = specs.load(str(write_spec(tmp_path / "board.toml", seeds=(1, 2, 3), epochs=1)))
    study = enqueue.enqueue_study(storage, spec).study
    board = Board(study)
    text = render(board)
    assert "board (running): 0 done, 0 running, 3 waiting" in text and "eta: none (no worker running)" in text

    first = claims.claim(study)
    study._storage.set_trial_system_attr(first, FAIL_REASON_ATTR, "training loss became nan at epoch 1")
    study._storage.set_trial_system_attr(first, NO_RETRY_ATTR, True)
    study._storage.set_trial_state_values(first, TrialState.FAIL)
    second = claims.claim(study)
    text = render(board)
    assert "board (running): 0 done, 1 running, 1 waiting, 0 pruned, 1 failed" in text
    assert "eta: none yet" in text  # a worker runs, but no finished run tells the rate yet
    assert re.search(r"short4/digits/s1 +│ FAIL: non-finite loss", text), text
    assert "failed: non-finite loss: 1 trial(s), 1 cell(s) for good; fix: lower [train] lr" in text

    study._storage.set_trial_state_values(second, TrialState.COMPLETE, values=[0.25])
    third = claims.claim(study)
    study._storage.set_trial_state_values(third, TrialState.COMPLETE, values=[0.5])
    text = render(board)
    assert "board (failed): 2 done, 0 running, 0 waiting" in text and "eta" not in text
    assert "(running)" not in text


def test_failures_group_by_their_stored_cause_code_whatever_their_words(tmp_path, monkeypatch):
    """A failed trial stores its cause as a code (sweeper.fail_cause): `status` and the board group
    by it, so a reworded message stays in its group; a trial stored before codes existed is
    still grouped by its message."""
    from sweeper import causes

    monkeypatch.setenv("SWEEPER_HOME", str(tmp_path))
    storage = connect.open_storage(f"sqlite:///{tmp_path}/optuna.db")
    spec = specs.load(str(write_spec(tmp_path / "codes.toml", seeds=(1, 2, 3), epochs=1)))
    study = enqueue.enqueue_study(storage, spec).study
    reworded, legacy, outage = (claims.claim(study) for _ in range(3))
    for trial_id, reason, code in (
        (reworded, "the loss went to NaN at step 7 (reworded)", causes.NON_FINITE_LOSS),
        (legacy, "training loss became nan at epoch 1", None),  # stored before codes existed
    ):
        study._storage.set_trial_system_attr(trial_id, FAIL_REASON_ATTR, reason)
        if code is not None:
            study._storage.set_trial_system_attr(trial_id, FAIL_CAUSE_ATTR, code)
        study._storage.set_trial_system_attr(trial_id, NO_RETRY_ATTR, True)
        study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
    claims.requeue(study, outage, "the tracking server went away for 301s", causes.TRACKING_OUTAGE)
    assert study._storage.get_trial(outage).system_attrs[FAIL_CAUSE_ATTR] == "tracking_outage"

    groups = {g["cause"]: g for g in summary.failure_groups(study.get_trials(deepcopy=False), max_retries=3)}
    assert set(groups) == {"non-finite loss", "tracking outage"}, groups
    assert groups["non-finite loss"]["trials"] == 2 and groups["non-finite loss"]["cells_failed_for_good"] == 2
    assert groups["non-finite loss"]["fix"].startswith("lower [train] lr")
    assert groups["tracking outage"]["trials"] == 1 and groups["tracking outage"]["cells_failed_for_good"] == 0
    assert summary.failure_cause("the loss went to NaN", causes.NON_FINITE_LOSS)[0] == "non-finite loss"
    assert summary.failure_cause("training loss became inf at epoch 2")[0] == "non-finite loss"
    text = render(Board(study))
    assert re.search(r"short4/digits/s1 +│ FAIL: non-finite loss", text), text
    assert "failed: non-finite loss: 2 trial(s), 2 cell(s) for good" in text


def test_float_columns_have_their_own_places():
    from sweeper.cli.output import _cell

    assert _cell(428.7, "elapsed_s") == "428.7" and _cell(0.0512345, "top1_error") == "0.0512"
    assert _cell(1234.5678, "images_per_s") == "1234.6" and _cell(0.123456, "test_loss") == "0.1235"


@pytest.mark.slow
def test_status_and_lifecycle_commands_say_one_state_and_a_worker_says_why_it_claims_nothing(sweeper_env, tmp_path):
    env = sweeper_env
    fast = ["--device", "cpu", "--precision", "fp32", "--no-system-metrics"]
    sweeper(
        "launch", "--study", str(write_spec(tmp_path / "words.toml", seeds=(1, 2), epochs=1, limit_train=64)), env=env
    )

    sweeper("pause", "--study", "words", env=env)
    held = sweeper("worker", "--study", "words", *fast, env=env)
    assert (
        "study words is paused (`sweeper pause`): its waiting trials are not claimed until "
        "`sweeper resume --study words`" in held.stderr
    )
    assert "no trial claimed; 0 run by this worker" in held.stderr and "no trial waiting" not in held.stderr
    # one line format for sweeper's lines and MLflow's (this worker created the MLflow store); no library warning
    lines = held.stderr.splitlines()
    assert any(" INFO mlflow." in line for line in lines), held.stderr
    assert all(LINE.match(line) for line in lines), held.stderr
    assert "Warning" not in held.stderr
    paused = json.loads(sweeper("status", "--study", "words", "--format", "json", env=env).stdout)
    assert paused["state"] == "paused" and paused["lifecycle"] == "paused" and paused["outcome"] == "running"
    assert paused["eta_s"] is None and paused["eta_source"] == "study paused"

    sweeper("resume", "--study", "words", env=env)
    idle = json.loads(sweeper("status", "--study", "words", "--format", "json", env=env).stdout)
    assert idle["state"] == "running" and idle["eta_s"] is None and idle["eta_source"] == "no worker running"
    assert "eta: none (no worker running)" in sweeper("status", "--study", "words", env=env).stdout

    sweeper("worker", "--study", "words", *fast, env=env)
    done = json.loads(sweeper("status", "--study", "words", "--format", "json", env=env).stdout)
    assert done["state"] == "finished" and done["state_reason"] == "every cell is done: 2 complete"
    text = sweeper("status", "--study", "words", env=env).stdout
    first_line = text.splitlines()[0]
    assert first_line == "study words: finished (every cell is done: 2 complete)", text
    assert "running" not in text and "eta" not in text
    # per column: seconds to 0.1, errors to 4 places
    row = next(line for line in text.splitlines() if "short4/digits/s1" in line)
    assert re.search(r"│ +0\.\d{4} +│", row) and re.search(r"│ +\d+\.\d +│", row), row

    quiet = sweeper("worker", "--study", "words", "--quiet", *fast, env=env)
    assert quiet.stderr == "", "--quiet: no INFO line"

    for action in ("pause", "stop", "resume", "cancel"):
        said = sweeper(action, "--study", "words", env=env).stdout
        assert said.startswith(f"study words: `sweeper {action}` changes nothing: the study is finished"), said
        document = json.loads(sweeper(action, "--study", "words", "--format", "json", env=env).stdout)
        assert document["changed"] is False and document["state"] == "finished"
    after = json.loads(sweeper("status", "--study", "words", "--format", "json", env=env).stdout)
    assert after["lifecycle"] == "running" and after["state"] == "finished", "nothing was changed"
