"""What `sweeper launch` does: enqueue a study, then optionally run local workers under a live board
(the command prints the report and exits with `Launched.exit_code`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from sweeper import api, settings, tracking
from sweeper.names import SPEC_ATTR
from sweeper.redact import redact_url
from sweeper.signals import StopSignal
from sweeper.spec import StudySpec
from sweeper.storage import connect, stale
from sweeper.trials import outcomes, summary
from sweeper.trials.enqueue import EnqueueResult

SHOW_TOTAL_ABOVE = 5_000  # trials: launch says how many before it enqueues more
LOCAL_POLL_INTERVAL = 1.0  # seconds: a launched worker's look at the queue while other workers finish (start_workers)


@dataclass
class Launched:
    """What `supervise` did: the stores it used, the enqueue summary, and how the workers ended."""

    storage_url: str
    tracking_uri: str
    summary: dict[str, Any]  # study, storage, tracking_uri, enqueued, already_enqueued, spec_hash
    interrupted: bool = False
    failed_workers: int = 0

    @property
    def exit_code(self) -> int:
        """130 when the user interrupted the workers, 1 when one failed, else 0."""
        return 130 if self.interrupted else 1 if self.failed_workers else 0


def supervise(
    spec: StudySpec,
    storage_url: str | None,
    tracking_uri: str | None,
    *,
    workers: int,
    device: str,
    precision: str,
    force_update: bool,
    heartbeat_interval: int,
    grace_period: int,
    data_dir: str | None,
    workers_per_gpu: int = 1,
    notify_url: str | None = None,
) -> Launched:
    """Enqueue the study's missing trials, then run ``workers`` local workers under a live board
    on stderr until they exit (0: only enqueue, and say how to start workers)."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, soft_wrap=True)
    url = connect.resolve_storage_url(storage_url)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    result = enqueue_and_say(spec, url, uri, force_update, heartbeat_interval, grace_period, console)
    launched = Launched(url, uri, _summary(spec, url, uri, result))
    if workers == 0:
        console.print(
            "start workers with:\n"
            f"  sweeper worker --study {spec.name}"
            + ("" if url == connect.default_storage_url() else " --storage $SWEEPER_STORAGE")
            + ("" if uri == tracking.default_tracking_uri() else " --tracking-uri $MLFLOW_TRACKING_URI")
            + "\nor run them here with --workers N"
        )
        return launched

    with StopSignal() as stop:  # before the workers start: no Ctrl-C from here on is lost
        procs = start_workers(
            spec.name,
            url,
            uri,
            workers,
            device,
            precision,
            heartbeat_interval,
            grace_period,
            data_dir,
            workers_per_gpu,
            notify_url,
        )
        log_dir = settings.home() / "logs"
        console.print(f"{workers} worker(s) started; their logs are in {log_dir}", markup=False)
        launched.interrupted = watch(Board(result.study, uri), procs, console, stop)
    if launched.interrupted:
        console.print(
            f"stopped. Finished epochs are checkpointed; resume with:\n"
            f"  sweeper launch --study {spec.name} --workers {workers}"
        )
        return launched
    launched.failed_workers = sum(p.returncode not in (0, None) for p in procs)
    if launched.failed_workers:
        console.print(f"[red]{launched.failed_workers} worker(s) exited with an error; see {escape(str(log_dir))}[/]")
    return launched


def enqueue_and_say(
    spec: StudySpec, url: str, uri: str, force_update: bool, heartbeat_interval: int, grace_period: int, console
) -> EnqueueResult:
    """`enqueue`, telling the user on ``console`` where the stores are and what was enqueued."""
    from rich.markup import escape

    if url == connect.default_storage_url() or uri == tracking.default_tracking_uri():
        console.print(f"embedded stores in [bold]{escape(str(settings.home()))}[/] (set SWEEPER_HOME to move them)")
    console.print(f"storage {redact_url(url)}\ntracking {redact_url(uri)}", markup=False)

    total = len(spec.cells) * spec.trials_per_cell
    if total > SHOW_TOTAL_ABOVE:
        console.print(f"study {spec.name}: {len(spec.cells):,} cell(s) x {spec.trials_per_cell:,} = {total:,} trials")
    result = api.enqueue(spec, url, uri, force_update, heartbeat_interval, grace_period)
    state = outcomes.lifecycle(result.study)
    if state["state"] != "running":
        console.print(
            f"[yellow]study {spec.name} is {state['state']} ({escape(str(state['reason']))}): workers claim nothing "
            f"until `sweeper resume --study {spec.name}`[/]"
        )
    if result.added:
        console.print(
            f"study [bold]{spec.name}[/]: enqueued {result.added} trial(s)"
            + (f", {result.existing} already there" if result.existing else "")
        )
    else:
        console.print(f"study [bold]{spec.name}[/]: all {result.existing} trial(s) already enqueued; nothing to add")
    return result


def comparison_hint(spec: StudySpec, uri: str) -> str:
    """Where the study's comparison opens: its link on an MLflow server, else `sweeper ui`."""
    command = f"sweeper ui --study {spec.name}"
    if not tracking.is_server(uri):
        return command
    from sweeper import views
    from sweeper.redact import strip_credentials

    try:
        client = tracking.client(uri)
        experiment = client.get_experiment_by_name(spec.name)
    except Exception:
        return command
    if experiment is None:
        return command
    return views.study_link(client, strip_credentials(uri), experiment, spec.to_dict(), spec.recipe_digest)


def _summary(spec: StudySpec, url: str, uri: str, result: EnqueueResult) -> dict[str, Any]:
    return {
        "study": spec.name,
        "storage": redact_url(url),
        "tracking_uri": redact_url(uri),
        "enqueued": result.added,
        "already_enqueued": result.existing,
        "spec_hash": spec.hash,
    }


def start_workers(
    name: str,
    url: str,
    uri: str,
    n: int,
    device: str,
    precision: str,
    heartbeat_interval: int,
    grace_period: int,
    data_dir: str | None,
    workers_per_gpu: int = 1,
    notify_url: str | None = None,
) -> list[subprocess.Popen]:
    """N worker processes; on the CPU each trial takes the cores left to it by the trials running
    (sweeper.cores), on GPUs each worker claims a slot."""
    log_dir = settings.home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        # The URLs go through the environment: a command line (with its password) is public in `ps`.
        env = {
            **os.environ,
            settings.ENV_HOME: str(settings.home()),
            settings.ENV_STORAGE: url,
            settings.ENV_TRACKING_URI: uri,
        }
        if notify_url:  # by environment, never on a command line: a webhook URL is a secret
            env[settings.ENV_NOTIFY_URL] = notify_url
        cmd = [
            sys.executable,
            "-m",
            "sweeper",
            "worker",
            "--study",
            name,
            "--device",
            device,
            "--precision",
            precision,
            "--heartbeat-interval",
            str(heartbeat_interval),
            "--grace-period",
            str(grace_period),
            "--workers-per-gpu",
            str(workers_per_gpu),
            # Waiting for the last trials of other workers, a local worker looks every second (its
            # store is on this host), so the launch ends a second, not up to 5, after the last trial.
            "--poll-interval",
            str(LOCAL_POLL_INTERVAL),
        ]
        if data_dir:
            cmd += ["--data-dir", data_dir]
        log = open(log_dir / f"worker-{i + 1}.log", "ab")
        # Own process group: Ctrl-C reaches the launcher alone, which then stops workers in order.
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def watch(board, procs: list[subprocess.Popen], console, stop: StopSignal) -> bool:
    """A live board until every worker exits; True when the user interrupted (the workers are
    then stopped in order: SIGTERM, each checkpoints and re-queues its trial; a second Ctrl-C
    kills them)."""
    from rich.live import Live

    with Live(board(), console=console, refresh_per_second=1, transient=False) as live:
        while not stop.is_set() and any(p.poll() is None for p in procs):
            stop.event.wait(1.0)
            if not stop.is_set():
                live.update(board())
        if not stop.is_set():
            live.update(board())
    if not stop.is_set():
        return False
    console.print("stopping workers (they checkpoint and re-queue their trial; Ctrl-C again kills them)...")
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 120
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline and stop.count < 2:
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return True


class Board:
    """The live board: the study's one state word and ETA in the title (sweeper.study_state, the
    same as `status`), a row per running or finished cell, and the failed cells grouped by cause."""

    ETA_EVERY = 10.0  # seconds between two ETA reads of MLflow (the board itself redraws each second)

    def __init__(self, study, tracking_uri: str | None = None):
        self.study, self.uri = study, tracking_uri
        self._eta: dict[str, Any] = {"eta_s": None, "eta_source": None}
        self._eta_at = float("-inf")

    def eta(self, state: str, latest: dict[str, Any], cells: dict[str, int]) -> str:
        from sweeper import study_state

        if state in study_state.DONE:
            return ""
        withheld = study_state.eta_withheld(state, cells["RUNNING"])
        if withheld:
            return f"; eta: none ({withheld})"
        if self.uri is not None and time.monotonic() - self._eta_at > self.ETA_EVERY:
            self._eta_at = time.monotonic()
            try:
                self._eta = api.eta(latest, self.study.user_attrs.get(SPEC_ATTR) or {}, self.uri)
            except Exception:  # MLflow down for a moment: the board keeps the last ETA
                pass
        from sweeper.humanize import duration

        if self._eta["eta_s"] is None:
            return "; eta: none yet (no finished run to estimate from)"
        return f"; eta {duration(self._eta['eta_s'])}"

    def __call__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        from sweeper import causes, study_state

        trials = self.study.get_trials(deepcopy=False)
        latest = outcomes.latest_trials(trials, outcomes.by_key)
        cells = summary.counts(list(latest.values()))
        rules = stale.policy(self.study.user_attrs.get(SPEC_ATTR) or {})
        life = outcomes.lifecycle(self.study)
        state, _reason = study_state.word(life, outcomes.outcome(latest, rules["max_retries"]), cells)
        title = Text(  # above the table, not its title: a title wraps at the table's width
            f"{self.study.study_name} ({state}): {cells['COMPLETE']} done, {cells['RUNNING']} running, "
            f"{cells['WAITING']} waiting, {cells['PRUNED']} pruned, {cells['FAIL']} failed"
            + self.eta(state, latest, cells)
        )
        table = Table()
        for col in ("cell", "state", "epoch", "top1_error", "host"):
            table.add_column(col)
        rows = summary.trial_rows(list(latest.values()))
        named = {t.number: causes.of_trial(t)[0] for t in latest.values() if t.state.name == "FAIL"}
        failed = sorted((r for r in rows if r["state"] == "FAIL"), key=lambda r: named[r["number"]])
        for row in [r for r in rows if r["state"] in ("RUNNING", "COMPLETE")] + failed:
            err = row["top1_error"]
            cause = named.get(row["number"])
            values = (
                row["cell"],
                row["state"] if cause is None else f"FAIL: {cause}",
                f"{row['epoch'] or 0}/{row['epochs'] or '?'}",
                "" if err is None else f"{err:.4f}",
                row["host"] or "",
            )
            table.add_row(*(Text(str(c)) for c in values))
        groups = summary.failure_groups(trials, rules["max_retries"])
        lines = [
            f"failed: {g['cause']}: {g['trials']} trial(s), {g['cells_failed_for_good']} cell(s) for good"
            + (f"; fix: {g['fix']}" if g["fix"] else "")
            for g in groups
        ]
        return Group(title, table, *([Text("\n".join(lines))] if lines else []))
