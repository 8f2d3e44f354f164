"""sweeper behind a real PgBouncer in transaction pooling mode (docs/DEPLOY.md, "Connections"):
the real launch, workers, status and report through the pooler while its server connections
stay within the pool; the locks sweeper takes (schema, study), heartbeats and stale-trial
failing; the workers' stall timeout, which may not travel as a startup parameter; psycopg 3's
prepared statements. Server connections are counted on PgBouncer's admin console and on the
server (pg_stat_activity)."""

from __future__ import annotations

import json
import threading
import time

import optuna
import pytest
import sqlalchemy
from fault_helpers import FAST, cli, enqueue, storage_of, trials_of
from helpers import pg_admin, write_spec
from optuna.trial import TrialState

from sweeper.storage import connect, internals, locks
from sweeper.trials import claims

pytestmark = pytest.mark.slow  # worker processes, servers or a browser: the full suite's, not the inner loop's


class ConnectionWatch:
    """Samples, every 50 ms in a thread, how many server connections the pooler holds to one
    database (its console) and how many the server sees (pg_stat_activity); keeps the peaks."""

    def __init__(self, bouncer, database: str):
        self.bouncer, self.database = bouncer, database
        self.pooler_peak = self.server_peak = self.clients_peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConnectionWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        admin = pg_admin()
        try:
            cur = admin.cursor()
            while not self._done.wait(0.05):
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.database,))
                self.server_peak = max(self.server_peak, cur.fetchone()[0])
                pools = [p for p in self.bouncer.show("POOLS") if p["database"] == self.database]
                self.clients_peak = max(self.clients_peak, sum(p["cl_active"] + p["cl_waiting"] for p in pools))
                self.pooler_peak = max(self.pooler_peak, self.bouncer.server_connections(self.database))
        finally:
            admin.close()


def test_launch_six_workers_status_and_report_through_transaction_pooling(
    tmp_path, sweeper_env, spawn, tracking, pg_database, pgbouncer
):
    direct = pg_database()
    database = direct.rsplit("/", 1)[1]
    bouncer = pgbouncer(pool_size=3)
    url = bouncer.url(direct, "+psycopg2")
    env = {**sweeper_env, "SWEEPER_STORAGE": url, "MLFLOW_TRACKING_URI": tracking.url}
    spec = write_spec(tmp_path / "pooled.toml", seeds=(1, 2, 3, 4, 5, 6), epochs=1)

    with ConnectionWatch(bouncer, database) as watch:
        cli("launch", "--study", str(spec), env=env)
        workers = [spawn("worker", "--study", "pooled", *FAST, "--grace-period", "30", env=env) for _ in range(6)]
        for worker in workers:
            assert worker.wait(900) == 0, worker.text()
        status = json.loads(cli("status", "--study", "pooled", "--format", "json", env=env).stdout)
        report = cli("report", "--study", "pooled", "--format", "json", env=env).stdout

    trials = trials_of(direct, "pooled")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert sum(int(t.text().split(" run by this worker")[0].rsplit(" ", 1)[1]) for t in workers) == 6
    assert status["state"] == "finished", status
    rows = json.loads(report)
    assert sorted(r["seed"] for r in rows) == [1, 2, 3, 4, 5, 6] and {r["state"] for r in rows} == {"COMPLETE"}, rows
    print(
        f"\nPgBouncer pool_size=3, 6 workers: peak {watch.clients_peak} clients, {watch.pooler_peak} server "
        f"connections (console), {watch.server_peak} in pg_stat_activity"
    )
    assert watch.clients_peak > 3, "the workers never used more clients than the pool: nothing was pooled"
    assert watch.pooler_peak <= 3 and watch.server_peak <= 3, vars(watch)
    assert "unsupported startup parameter" not in bouncer.log()


def test_study_lock_waiters_hold_no_server_connection_with_a_pool_smaller_than_the_waiters(
    tmp_path, pg_database, pgbouncer
):
    """Three holders-to-be of one study lock at once, through a pool of three server connections:
    the holder needs two (the lock's transaction and its work), so waiters that kept a server
    connection while they wait (blocked in pg_advisory_lock) would take the connection it needs:
    a deadlock until the pooler's query_wait_timeout. One holder at a time, nobody errors.
    """
    direct = pg_database()
    url = pgbouncer(pool_size=3, query_wait_timeout=15).url(direct)
    enqueue(write_spec(tmp_path / "race.toml", variants=("short4", "short3"), seeds=(1, 2, 3)), url)
    storages = [connect.open_storage(url) for _ in range(3)]
    inside, overlap, errors = [], [], []
    start = threading.Barrier(len(storages))

    def hold(storage) -> None:
        try:
            start.wait()
            with locks.study_lock(storage, "race"):
                inside.append(1)
                overlap.append(len(inside))
                connect.study_names(storage)  # work on another connection while holding the lock
                time.sleep(0.3)
                inside.pop()
        except Exception as e:  # reported below, with the thread's error
            errors.append(e)

    threads = [threading.Thread(target=hold, args=(s,)) for s in storages]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(overlap) == 3 and max(overlap) == 1, overlap  # each held it, one holder at a time
    keys = [t.user_attrs["sweeper.key"] for t in trials_of(direct, "race")]
    assert len(keys) == 6 and len(set(keys)) == 6, keys


def test_heartbeats_and_racing_stale_trial_checks_through_the_pooler(tmp_path, pg_database, pgbouncer):
    direct = pg_database()
    url = pgbouncer(pool_size=3).url(direct)
    enqueue(write_spec(tmp_path / "stale.toml"), url)
    study = optuna.load_study(study_name="stale", storage=storage_of(url))
    trial_id = claims.claim(study)  # heartbeat first, then the compare-and-set
    storage = storage_of(direct)
    with storage.engine.begin() as conn:  # the worker died an hour ago
        conn.execute(
            sqlalchemy.text(
                "UPDATE trial_heartbeats SET heartbeat = heartbeat - interval '1 hour' WHERE trial_id = :t"
            ),
            {"t": trial_id},
        )
    racers = [optuna.load_study(study_name="stale", storage=storage_of(url, grace_period=5)) for _ in range(4)]
    barrier = threading.Barrier(len(racers))
    failed: list[list[int]] = []

    def race(s):
        barrier.wait()
        failed.append(claims.fail_stale_trials(s))

    threads = [threading.Thread(target=race, args=(s,)) for s in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(map(len, failed)) == [0, 0, 0, 1], failed  # exactly one racer failed it
    assert [t.state for t in trials_of(direct, "stale")] == [TrialState.FAIL, TrialState.WAITING]


def test_worker_stall_timeout_works_through_the_pooler_and_leaks_to_no_other_client(pg_database, pgbouncer):
    """PgBouncer refuses the `options` startup parameter; the stall timeout still ends a
    transaction that sits idle, and stays out of the server connection other clients reuse."""
    bouncer = pgbouncer(pool_size=3)
    url = bouncer.url(pg_database())
    storage = connect.open_storage(url, heartbeat_interval=1, grace_period=2, stall_timeout=2)
    with storage.engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT 1"))  # a transaction, left open
        time.sleep(4)
        with pytest.raises(sqlalchemy.exc.DBAPIError):
            conn.execute(sqlalchemy.text("SELECT 1"))
    assert connect.study_names(storage) == []  # the pool replaces the dead connection
    other = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    for _ in range(3):  # the server connections the worker used, as other clients get them
        with other.connect() as conn:
            assert conn.execute(sqlalchemy.text("SHOW idle_in_transaction_session_timeout")).scalar() == "0"
    other.dispose()


@pytest.mark.parametrize("driver", ["+psycopg", ""])  # plain postgresql:// is psycopg 3 on SQLAlchemy 2.1
def test_psycopg3_prepared_statements_do_not_clash_between_clients(tmp_path, pg_database, pgbouncer, driver):
    """psycopg 3 prepares a query server-side after five runs; through transaction pooling two
    clients then meet each other's (or miss their own) prepared statements on one server
    connection."""
    pytest.importorskip("psycopg")
    direct = pg_database()
    url = pgbouncer(pool_size=3).url(direct, driver)
    enqueue(write_spec(tmp_path / "prep.toml", seeds=(1, 2)), url)
    first, second = (optuna.load_study(study_name="prep", storage=storage_of(url)) for _ in range(2))
    for _ in range(8):
        for study in (first, second):
            assert len(internals.waiting_trial_ids(study)) == 2
            assert internals.unfinished_count(study) == 2


def test_many_storages_opened_at_one_instant_through_a_pool_of_three(tmp_path, pg_database, pgbouncer):
    """Optuna's schema check holds a server connection in a transaction while it asks for another:
    eight openers at one instant on a pool of three each held one and waited for a second, until
    the pooler gave up on them (200 workers starting at once in benchmarks/fleet.py never
    claimed a trial). A made schema is now checked one connection at a time."""
    import threading

    direct = pg_database()
    enqueue(write_spec(tmp_path / "crowd.toml"), direct)  # the schema made, as by `sweeper launch`
    url = pgbouncer(pool_size=3, query_wait_timeout=15).url(direct)
    start, errors, opened = threading.Barrier(8), [], []

    def open_one() -> None:
        start.wait()
        try:
            opened.append(connect.open_storage(url))
        except Exception as e:  # the test reports every failure
            errors.append(repr(e))

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(opened) == 8, errors
    assert connect.study_names(opened[0]) == ["crowd"]
