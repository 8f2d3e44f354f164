"""Layering contracts: library modules leave process-wide settings alone; the bulk enqueue
path makes the same trials as Optuna's public API."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # worker processes, servers or a browser: the full suite's, not the inner loop's


def test_library_modules_leave_process_wide_settings_to_the_commands(tmp_path):
    """Importing sweeper's modules and calling them changes no logging level, warning filter,
    garbage-collector state or matplotlib backend of the program that uses them."""
    code = textwrap.dedent(f"""
        import gc, logging, sys, warnings
        import optuna, matplotlib

        def quiet_about_experimental():
            return any(f[2] is optuna.exceptions.ExperimentalWarning for f in warnings.filters)

        before = (
            optuna.logging.get_verbosity(), quiet_about_experimental(), gc.get_freeze_count(),
            logging.getLogger("urllib3.connectionpool").level, matplotlib.get_backend(),
        )
        from sweeper import launcher, report, spec, worker
        from sweeper.storage import connect
        from sweeper.trials import enqueue
        url, uri = "sqlite:///{tmp_path}/optuna.db", "sqlite:///{tmp_path}/mlflow.db"
        enqueue.enqueue_study(connect.open_storage(url), spec.load("quickstart"))
        worker.run(worker.WorkerConfig(url, uri, max_trials=0, system_metrics=False))
        report.print_report("quickstart", url, uri, fmt="json", plots_dir="{tmp_path}/plots")
        after = (
            optuna.logging.get_verbosity(), quiet_about_experimental(), gc.get_freeze_count(),
            logging.getLogger("urllib3.connectionpool").level, matplotlib.get_backend(),
        )
        names = ("optuna verbosity", "filter of ExperimentalWarning", "gc freeze count", "urllib3 level", "matplotlib backend")
        changed = [name for name, b, a in zip(names, before, after) if b != a]
        print(changed)
        sys.exit(1 if changed else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_claim_reads_only_the_claimed_trial_and_optuna_then_records_it(tmp_path):
    """``claim`` puts the one trial it won, read in the claim's own transaction, into Optuna's
    trial cache (internals: the cache would otherwise read all of a grid's waiting trials per
    claim), and ``internals.tell`` is Optuna's tell from the trial as the worker holds it, neither
    read first nor read back. An Optuna upgrade that changes either must fail here: a suggested
    parameter and the final state must still reach the store, the claim in one transaction and
    the tell in one, and a second tell (the trial finished meanwhile) must be refused where it is
    written, as UpdateFinishedTrialError."""
    import optuna
    from sqlalchemy import event

    from sweeper.storage import connect, internals
    from sweeper.trials import claims

    url = f"sqlite:///{tmp_path}/optuna.db"
    owner = optuna.create_study(study_name="s", storage=connect.open_storage(url))
    internals.enqueue_many(owner, [{"sweeper.key": f"k{i}"} for i in range(5)])
    worker = optuna.load_study(study_name="s", storage=connect.open_storage(url))

    transactions = []
    event.listen(worker._storage._backend.engine, "begin", transactions.append)
    trial_id = claims.claim(worker)
    claimed = len(transactions)
    cached = worker._storage._studies[worker._study_id].trials
    assert [t._trial_id for t in cached.values()] == [trial_id]  # one trial read, not five
    assert cached[0].state == optuna.trial.TrialState.RUNNING
    trial = internals.trial_of_claim(worker, trial_id)  # Optuna's Trial, less its read of the trial
    assert len(transactions) == claimed
    read = optuna.Trial(worker, trial_id)
    assert vars(trial).keys() == vars(read).keys()
    assert {k: v for k, v in vars(trial).items() if k != "_cached_frozen_trial"} == {
        k: v for k, v in vars(read).items() if k != "_cached_frozen_trial"
    }
    assert trial._cached_frozen_trial == read._cached_frozen_trial
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    before_tell = len(transactions)
    internals.tell(worker, trial, 0.25)
    assert (claimed, len(transactions) - before_tell) == (1, 1)  # the tell: its state, checked under the row lock
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        internals.tell(worker, trial, 0.5)
    pruned = optuna.Trial(worker, claims.claim(worker))
    for _ in range(3):
        claims.claim(worker)
    unfinished, before_look = {}, len(transactions)
    assert claims.claim(worker, unfinished) is None  # an empty look, as the last workers of a fleet make
    assert (len(transactions) - before_look, unfinished) == (1, {"s": 4})  # its count of running trials with it
    lease = claims.Heartbeat(worker._storage, pruned._trial_id, interval=10, grace=60)
    before_reports = len(transactions)
    lease.report(pruned, 1, 0.75)  # an epoch's report renews the lease: one transaction for both
    lease.report(pruned, 2, 0.5)
    assert len(transactions) - before_reports == 2 and lease.held()
    internals.tell(worker, pruned, state=optuna.trial.TrialState.PRUNED)  # as Optuna: its last report is its value

    for study in (worker, optuna.load_study(study_name="s", storage=connect.open_storage(url))):
        first = study.get_trials(deepcopy=False)[0]
        assert (first._trial_id, first.state, first.value, list(first.params)) == (
            trial_id,
            optuna.trial.TrialState.COMPLETE,
            0.25,
            ["lr"],
        )
        second = study.get_trials(deepcopy=False)[1]
        assert (second.state, second.value) == (optuna.trial.TrialState.PRUNED, 0.5)
        assert second.intermediate_values == {1: 0.75, 2: 0.5}
        assert [t.state for t in study.get_trials(deepcopy=False)[2:]] == [optuna.trial.TrialState.RUNNING] * 3


def test_settle_after_a_completed_trial_reads_nothing_until_the_last_one(tmp_path, monkeypatch):
    """A worker settles the study after every trial; while cells remain and the completed one was
    not failed for good, it must not read all trials (under the lock every worker waits on), and
    the last trial must still turn the outcome to finished, exactly once."""
    import optuna

    from sweeper.storage import connect, internals
    from sweeper.trials import claims, outcomes

    url = f"sqlite:///{tmp_path}/optuna.db"
    owner = optuna.create_study(study_name="s", storage=connect.open_storage(url))
    internals.enqueue_many(owner, [{"sweeper.key": f"k{i}"} for i in range(3)])
    worker = optuna.load_study(study_name="s", storage=connect.open_storage(url))
    backend = worker._storage._backend
    reads = []
    read_all = backend.get_all_trials
    monkeypatch.setattr(backend, "get_all_trials", lambda *a, **k: reads.append(1) or read_all(*a, **k))

    settled = []
    for i in range(3):
        trial_id = claims.claim(worker)
        worker.tell(optuna.Trial(worker, trial_id), 0.1)
        settled.append((outcomes.settle(worker, completed=f"k{i}"), len(reads)))
    assert [(s.outcome, s.outcome_changed, n) for s, n in settled] == [
        ("running", False, 0),
        ("running", False, 0),
        ("finished", True, 1),
    ]
    assert not outcomes.settle(worker, completed="k2").outcome_changed  # settled once


def test_bulk_enqueue_makes_the_trials_optunas_public_api_makes(tmp_path):
    """``enqueue_many`` writes rows through Optuna's internal table models; an Optuna upgrade that
    moves them must fail here, not in a user's launch."""
    import optuna

    from sweeper.storage import connect, internals

    storage = connect.open_storage(f"sqlite:///{tmp_path}/optuna.db")
    attrs = [{"sweeper.key": f"short4/digits/s{seed}", "variant": "short4", "seed": seed} for seed in (1, 2, 3)]
    public = optuna.create_study(study_name="public", storage=storage)
    public.enqueue_trial({}, user_attrs=attrs[0])
    bulk = optuna.create_study(study_name="bulk", storage=storage)
    internals.enqueue_many(bulk, attrs[:1])
    internals.enqueue_many(bulk, attrs[1:])  # numbering continues across calls
    for attr in attrs[1:]:
        public.enqueue_trial({}, user_attrs=attr)

    def seen(study: optuna.Study) -> list[tuple]:
        return [
            (
                t.number,
                t.state,
                t.params,
                t.distributions,
                t.user_attrs,
                t.system_attrs,
                t.values,
                t.intermediate_values,
                t.datetime_start,
                t.datetime_complete,
            )
            for t in study.get_trials(deepcopy=False)
        ]

    assert seen(bulk) == seen(public)
    assert internals.trial_keys(bulk) == {(a["sweeper.key"], None) for a in attrs}
    # A claimed bulk trial is an ordinary trial to Optuna: asked, suggested, told.
    trial = bulk.ask()
    assert trial.number == 0 and trial.user_attrs == attrs[0]
    assert trial.suggest_float("lr", 0.1, 1.0) > 0
    bulk.tell(trial, 0.5)
    assert bulk.best_trial.number == 0


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_renewed_heartbeat_keeps_its_trial_and_a_failed_trial_renews_no_lease(database, tmp_path, request):
    """The takeover judges the heartbeat again under the trial's row lock (a worker that renewed
    after the staleness was read keeps its trial), and a worker back from a partition cannot renew
    a trial that was failed meanwhile (Optuna's record_heartbeat would: its lease would look fresh)."""
    import time

    import optuna
    from optuna.trial import TrialState

    from sweeper.errors import TrialLost
    from sweeper.names import LIFECYCLE_ATTR
    from sweeper.storage import connect, internals, leases
    from sweeper.trials import claims, outcomes

    url = f"sqlite:///{tmp_path}/optuna.db" if database == "sqlite" else request.getfixturevalue("pg_database")()
    storage = connect.open_storage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage, study_name="lease")
    study.enqueue_trial({})
    trial_id = claims.claim(study)
    reason = {"sweeper.fail_reason": "no heartbeat"}
    time.sleep(3.5)  # SQLite keeps whole seconds
    assert (
        leases.stale_trial_ids(study) == [trial_id] == storage._get_stale_trial_ids(study._study_id)
    )  # as Optuna judges it
    assert leases.renew_lease(storage, trial_id).held  # its worker, between that look and the fail
    # a renewal reads the study's lifecycle in its own transaction: running trials need no look of their own
    assert leases.renew_lease(storage, trial_id, LIFECYCLE_ATTR).study_attrs == {LIFECYCLE_ATTR: None}
    outcomes.set_lifecycle(study, "cancelled", "by a test")
    assert leases.renew_lease(storage, trial_id, LIFECYCLE_ATTR).study_attrs[LIFECYCLE_ATTR]["state"] == "cancelled"
    outcomes.set_lifecycle(study, "running")
    assert not leases.fail_if_stale(storage, trial_id, 2, reason)
    assert internals.trial_state(storage, trial_id) == TrialState.RUNNING

    time.sleep(3.5)  # SQLite keeps whole seconds
    assert claims.fail_stale_trials(study) == [trial_id]
    failed = storage.get_trial(trial_id)
    assert failed.state == TrialState.FAIL and "no heartbeat" in failed.system_attrs["sweeper.fail_reason"]
    assert not leases.renew_lease(storage, trial_id).held
    heartbeat = claims.Heartbeat(storage, trial_id, interval=1, grace=2)
    with pytest.raises(TrialLost):
        heartbeat.renew()
    with pytest.raises(TrialLost):
        heartbeat.check()  # every later write of that worker is refused without asking the database
    with pytest.raises(TrialLost):
        heartbeat.report(optuna.Trial(study, trial_id), 3, 0.5)  # an epoch's report is refused too
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]  # one retry
    assert storage.get_trial(trial_id).intermediate_values == {}

    # The claim looks for stale trials in its own transaction and fails them (the retry is claimed next).
    retry_id = claims.claim(study)
    time.sleep(3.5)
    on_stale = []
    assert claims.claim(study, look_for_stale=True, on_stale=on_stale.append) is None
    assert on_stale == [study] and storage.get_trial(retry_id).state == TrialState.FAIL
    assert [t.state for t in study.get_trials()][-1] == TrialState.WAITING
