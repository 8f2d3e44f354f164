"""Commands racing each other on one study (issue #15, items 5 and 6): real processes released
at the same instant (`run_together`), on PostgreSQL and on a fresh SQLite home."""

from __future__ import annotations

import re
from collections import Counter

import optuna
import pytest
from fault_helpers import enqueue, run_together, storage_of, trials_of
from helpers import write_spec
from optuna.trial import TrialState

from sweeper.names import KEY_ATTR

pytestmark = pytest.mark.slow  # worker processes, servers or a browser: the full suite's, not the inner loop's


def test_two_retries_at_once_re_enqueue_each_failed_cell_once(tmp_path, sweeper_env, pg_database):
    """Item 5: two `sweeper retry` at once re-enqueued 12-16 of 30 failed cells twice, both
    copies with the cell's mlflow_run_id (two workers would then train one cell into one run)."""
    url = pg_database()
    enqueue(write_spec(tmp_path / "again.toml", seeds=tuple(range(1, 31))), url)
    study = optuna.load_study(study_name="again", storage=storage_of(url))
    for trial in study.get_trials(deepcopy=False):  # every cell failed once, with its MLflow run
        study._storage.set_trial_user_attr(trial._trial_id, "mlflow_run_id", f"run-{trial.number}")
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING)
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)

    env = {**sweeper_env, "SWEEPER_STORAGE": url}
    done = run_together(tmp_path, env, ["retry", "--study", "again"], ["retry", "--study", "again"])
    for proc in done:
        assert proc.returncode == 0, proc.stderr
    said = sorted(int(m[1]) if m else 0 for m in (re.search(r"(\d+) failed cell", p.stderr) for p in done))
    assert said == [0, 30], [p.stderr for p in done]

    trials = trials_of(url, "again")
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    keys = Counter(t.user_attrs[KEY_ATTR] for t in waiting)
    assert len(keys) == 30 and set(keys.values()) == {1}, [k for k, n in keys.items() if n > 1]
    runs = Counter(t.user_attrs["mlflow_run_id"] for t in waiting)
    assert set(runs.values()) == {1}


def test_two_launches_at_once_on_a_fresh_sqlite_home_both_succeed(tmp_path, sweeper_env):
    """Item 6: on a fresh embedded home, one of two launches failed (3 of 3 tries), with a
    misleading "cannot open the Optuna storage ... UNIQUE constraint failed: alembic_version" or
    MLflow's alembic traceback: both stores' schemas were created by both processes at once."""
    spec = write_spec(tmp_path / "fresh.toml", variants=("short4", "short3"), seeds=(1, 2, 3))
    done = run_together(tmp_path, sweeper_env, ["launch", "--study", str(spec)], ["launch", "--study", str(spec)])
    for proc in done:
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
    added = sorted(int(m[1]) if m else 0 for m in (re.search(r"enqueued (\d+) trial", p.stderr) for p in done))
    assert added == [0, 6], [p.stderr for p in done]
    keys = [t.user_attrs[KEY_ATTR] for t in trials_of(f"sqlite:///{tmp_path}/home/optuna.db", "fresh")]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 6


def test_workers_claiming_at_once_take_different_trials_each_in_one_write(tmp_path, pg_database):
    """Issue #26 (benchmarks/fleet.py): every claimer went after the same first waiting trial and
    each loser wrote a heartbeat on the winner's trial before its compare-and-set failed (673
    transactions per trial and a 111 s median claim with 200 workers). Now 12 workers released
    at once on 24 waiting trials take 24 different trials, writing one heartbeat each: their own."""
    import threading

    from sqlalchemy import event

    from sweeper.storage import connect
    from sweeper.trials import claims

    url = pg_database()
    enqueue(write_spec(tmp_path / "crowd.toml", seeds=tuple(range(1, 25))), url)
    studies = [optuna.load_study(study_name="crowd", storage=connect.open_storage(url)) for _ in range(12)]
    heartbeat_writes = Counter()
    for i, study in enumerate(studies):
        engine = study._storage._backend.engine

        @event.listens_for(engine, "before_cursor_execute")
        def count(conn, cursor, statement, parameters, context, executemany, i=i):
            if statement.lstrip().upper().startswith(("INSERT", "UPDATE")) and "trial_heartbeats" in statement:
                heartbeat_writes[i] += 1

    start, claimed = threading.Barrier(len(studies)), [[] for _ in studies]

    def claim_twice(i: int) -> None:
        start.wait()
        for _ in range(2):
            claimed[i].append(claims.claim(studies[i]))

    threads = [threading.Thread(target=claim_twice, args=(i,)) for i in range(len(studies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = [trial_id for mine in claimed for trial_id in mine]
    assert None not in ids and len(set(ids)) == 24, claimed
    assert dict(heartbeat_writes) == {i: 2 for i in range(len(studies))}, heartbeat_writes
    assert {t.state for t in trials_of(url, "crowd")} == {TrialState.RUNNING}
