"""sweeper from Python: what the CLI does, as functions returning plain data.

Every function takes the study's name and, optionally, the Optuna storage URL and the MLflow
tracking URI (default: ``SWEEPER_STORAGE`` / ``MLFLOW_TRACKING_URI``, else the embedded SQLite
stores under ``SWEEPER_HOME``), so the same call works against SQLite, PostgreSQL and an MLflow
server. The CLI commands call these functions.

    >>> import sweeper.api as sw                                   # doctest: +SKIP
    >>> sw.launch("quickstart")                                    # doctest: +SKIP
    >>> sw.status("quickstart")["counts"]                          # doctest: +SKIP
    >>> sw.results("quickstart")[["variant", "top1_error"]]        # doctest: +SKIP
    >>> model = sw.load_model("quickstart", "short4/digits/s1")    # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper import names, study_state, tracking
from sweeper.contract import DEFAULT_GRACE_PERIOD, DEFAULT_HEARTBEAT_INTERVAL
from sweeper.redact import redact, redact_url
from sweeper.storage import connect, stale
from sweeper.trials import claims, outcomes, summary
from sweeper.trials.enqueue import EnqueueResult, enqueue_study

if TYPE_CHECKING:
    import pandas as pd

    from sweeper.spec import StudySpec

__all__ = ["doctor", "history", "launch", "load_model", "plan", "results", "retry", "set_state", "status"]

# What `sweeper stop/pause/resume/cancel` store, and what a worker does about it.
ACTIONS = {
    "stop": ("stopped", "running trials finish; no new trial is claimed"),
    "pause": ("paused", "running trials finish; no new trial is claimed until `sweeper resume`"),
    "resume": ("running", "workers claim trials again"),
    "cancel": (
        "cancelled",
        "running trials checkpoint and are handed back after their epoch; `sweeper resume` continues",
    ),
}


def set_state(study: str, action: str, storage: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """Stop, pause, resume or cancel a study for every worker on every host.

    Returns ``{"study", "state", "previous", "changed", "effect"}``. The state lives in the Optuna
    storage, which every worker reads before claiming a trial and after each epoch. A finished
    or failed study (no cell waits or runs) is left as it is: ``changed`` False, and ``effect`` says so.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    state, effect = ACTIONS[action]
    loaded = connect.open_study(study, storage)
    rules = stale.policy(loaded.user_attrs.get(names.SPEC_ATTR) or {})
    latest = outcomes.latest_trials(loaded.get_trials(deepcopy=False), outcomes.by_key)
    outcome = outcomes.outcome(latest, rules["max_retries"])
    if outcome in study_state.DONE:  # nothing waits or runs: a lifecycle change would mean nothing
        done, why = study_state.word({}, outcome, summary.counts(list(latest.values())))
        hint = "`sweeper retry` re-enqueues its failed cells" if done == "failed" else "new cells need `launch`"
        return {
            "study": loaded.study_name,
            "state": done,
            "previous": done,
            "changed": False,
            "effect": f"nothing: the study is {done} ({why}); {hint}",
        }
    previous = outcomes.set_lifecycle(loaded, state, reason or f"`sweeper {action}`")
    return {
        "study": loaded.study_name,
        "state": state,
        "previous": previous["state"],
        "changed": True,
        "effect": effect,
    }


def retry(study: str, storage: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Re-enqueue the study's failed cells on purpose (after fixing the cause of a NaN or out of
    memory); a finished study runs again, and so does its MLflow run. Returns ``{"study", "retried"}``."""
    from sweeper.errors import SweeperError

    loaded = connect.open_study(study, storage)
    n = claims.retry_failed(loaded)
    if n and outcomes.mark_running(loaded):  # the study runs again: so does its MLflow run
        try:
            client = tracking.client(tracking_uri, create=False)
        except SweeperError:  # no embedded store yet: no run to mark
            client = None
        if client is not None:
            tracking.set_study_run_status(client, loaded.study_name, "running")
    return {"study": loaded.study_name, "retried": n}


def doctor(storage: str | None = None, tracking_uri: str | None = None, facts: bool = True) -> dict[str, Any]:
    """Whether the Optuna storage and the MLflow tracking store answer (``ok``, ``checks``: "ok" or
    the error of each), with ``facts``: versions, the device and its capabilities, free disk
    under SWEEPER_HOME and the stores' URLs, redacted."""
    from sweeper import doctor as doctoring
    from sweeper import settings
    from sweeper.errors import SweeperError

    url, uri = connect.resolve_storage_url(storage), tracking.resolve_tracking_uri(tracking_uri)
    checks = {}
    for name, probe in (
        ("storage", lambda: connect.open_storage(url, create=False)),
        ("tracking", lambda: tracking.check_reachable(tracking.client(uri, create=False))),
    ):
        try:
            probe()
            checks[name] = "ok"
        except SweeperError as e:
            checks[name] = str(e)
    ok = all(v == "ok" for v in checks.values())
    if not facts:
        return {"ok": ok, "checks": checks}
    return {
        "ok": ok,
        "versions": doctoring.versions(),
        **doctoring.device_facts(),
        "disk": doctoring.disk(settings.home()),
        "storage": redact_url(url),
        "tracking_uri": redact_url(uri),
        "checks": checks,
    }


def status(study: str, storage: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """The study's lifecycle state, trial counts, failures grouped by cause and one row per trial.

    Keys: ``study``, ``state`` (one word: running, paused, stopped, cancelled, finished, failed;
    see sweeper.study_state), ``state_reason``, ``lifecycle`` (running, paused, stopped,
    cancelled: what the workers are told), ``outcome`` (running, finished, failed), ``storage``,
    ``tracking_uri``, ``counts`` (trials by Optuna state), ``cells`` (latest trial of each cell by
    state), ``failures`` (``cause``, ``trials``, ``cells_failed_for_good``, ``fix``, ``example``),
    ``eta_s`` and ``eta_source`` (None, and why, for a study that is not running or that no
    worker runs), ``home_bytes`` (the embedded stores' SWEEPER_HOME, else None) and ``trials``.
    """
    url = connect.resolve_storage_url(storage)
    loaded = connect.open_study(study, url)
    trials = loaded.get_trials(deepcopy=False)
    attrs = loaded.user_attrs
    rules = stale.policy(attrs.get(names.SPEC_ATTR) or {})
    latest = outcomes.latest_trials(trials, outcomes.by_key)
    life = outcomes.lifecycle(loaded)
    outcome = outcomes.outcome(latest, rules["max_retries"])
    cells = summary.counts(list(latest.values()))
    state, reason = study_state.word(life, outcome, cells)
    withheld = study_state.eta_withheld(state, cells["RUNNING"])
    return {
        "study": loaded.study_name,
        "state": state,
        "state_reason": reason,
        "lifecycle": life["state"],
        "outcome": outcome,
        "storage": redact(url),
        "tracking_uri": redact(tracking.resolve_tracking_uri(tracking_uri)),
        "policy": rules,
        "counts": summary.counts(trials),
        "cells": cells,
        "failures": summary.failure_groups(trials, rules["max_retries"]),
        **(
            {"eta_s": None, "eta_source": withheld}
            if withheld
            else eta(latest, attrs.get(names.SPEC_ATTR) or {}, tracking.resolve_tracking_uri(tracking_uri))
        ),
        **home_size(url, tracking.resolve_tracking_uri(tracking_uri)),
        "trials": summary.trial_rows(trials),
    }


def home_size(url: str, uri: str) -> dict[str, Any]:
    """``home_bytes``: what SWEEPER_HOME holds, when an embedded store of the study lives there."""
    from sweeper import doctor, settings

    if url != connect.default_storage_url() and uri != tracking.default_tracking_uri():
        return {"home_bytes": None}
    return {"home_bytes": doctor.dir_size(settings.home())}


def eta(latest: dict[str, Any], spec: dict[str, Any], uri: str) -> dict[str, Any]:
    """``eta_s``: the work left (waiting cells whole, running ones for their epochs left), at the
    rates of finished runs on this device kind (sweeper.estimate), shared by the running workers."""
    from sweeper import estimate

    pending = [t for t in latest.values() if t.state.name in ("WAITING", "RUNNING")]
    if not pending:
        return {"eta_s": 0.0, "eta_source": "nothing left"}
    if not _store_exists(uri):
        return {"eta_s": None, "eta_source": None}
    train = spec.get("train") or {}
    epochs = int(train.get("epochs", 14))
    estimator = estimate.Estimator("cpu", tracking.client(uri, create=False), probe=False)
    devices = {}
    left: list[float] = []
    for t in pending:
        ua = t.user_attrs
        cell = None
        for kind in ("cuda", "mps", "cpu"):  # the device kind finished runs of this cell's variant used
            estimator.device = kind
            cell = estimator.cell(ua.get(names.VARIANT_ATTR), ua.get(names.DATASET_ATTR), train)
            if cell["estimate_s"] is not None:
                devices[kind] = True
                break
        if cell is None or cell["estimate_s"] is None:
            return {"eta_s": None, "eta_source": None}
        done = (summary.last_epoch(t) or 0) / epochs if t.state.name == "RUNNING" else 0.0
        left.append(cell["estimate_s"] * (1 - done))
    running = sum(t.state.name == "RUNNING" for t in pending)
    # the work left packed onto the workers running now, as `launch --dry-run --workers N` packs it
    _summed, wall = estimate.pack(left, running, next(iter(devices)))
    return {"eta_s": wall, "eta_source": f"history on {', '.join(devices)}, {running} worker(s)"}


def results(study: str, storage: str | None = None, tracking_uri: str | None = None) -> pd.DataFrame:
    """The report's rows: one per grid cell, the columns of ``sweeper report --format csv``
    (``variant``, ``dataset``, ``seed``, ``state``, ``top1_error``, ``top5_error``, ``params``,
    ``macs``, ``train_seconds``, ``images_per_s``, ``mlflow_run_id``), in the report's order."""
    from sweeper import report

    return report.build_frame(study, storage, tracking_uri)


HISTORY_METRICS = names.EPOCH_METRICS


def history(
    study: str,
    storage: str | None = None,
    tracking_uri: str | None = None,
    metrics: str | tuple[str, ...] = HISTORY_METRICS,
) -> pd.DataFrame:
    """One row per cell per epoch: ``variant``, ``dataset``, ``seed``, ``mlflow_run_id``,
    ``epoch`` and each of ``metrics`` (one name or several) as logged (a retried epoch: its
    latest value)."""
    import pandas as pd

    from sweeper import report

    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)  # not its letters, one by one

    collected = report.collect(study, storage, tracking_uri)
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for order, cell in enumerate(collected.frame.to_dict("records")):
        run_id = cell["mlflow_run_id"]
        if not isinstance(run_id, str):
            continue
        for metric in metrics:
            for m in sorted(collected.client.get_metric_history(run_id, metric), key=lambda m: m.timestamp):
                row = rows.setdefault(
                    (run_id, m.step),
                    {k: cell[k] for k in ("variant", "dataset", "seed", "mlflow_run_id")}
                    | {"epoch": m.step, "_order": order},
                )
                row[metric] = m.value
    columns = ["variant", "dataset", "seed", "mlflow_run_id", "epoch", *metrics]
    frame = pd.DataFrame(list(rows.values()), columns=[*columns, "_order"])
    frame = frame.sort_values(["_order", "epoch"], kind="stable", ignore_index=True)  # the report's cell order
    return frame[columns]


def load_model(study: str, cell: str, storage: str | None = None, tracking_uri: str | None = None):
    """A COMPLETE cell's trained model as the variant's ``nn.Module``, on the CPU, in train mode:
    ready to evaluate or fine-tune. ``cell`` is the cell's key (``short4/digits/s1``) or its
    model's name (``short4-digits-s1``). The weights come from the cell's logged MLflow model
    (``extra_files/weights.pt``); the variant is rebuilt from what that file records, so neither
    the study's spec nor its data are needed."""
    import tempfile

    import mlflow

    from sweeper import cellmodel
    from sweeper.errors import SweeperError

    loaded = connect.load_study(connect.open_storage(connect.resolve_storage_url(storage), create=False), study)
    latest = outcomes.latest_trials(loaded.get_trials(deepcopy=False), outcomes.by_key)
    trial = next((t for key, t in latest.items() if cell in (key, tracking.model_name(key))), None)
    if trial is None:
        raise SweeperError(f"study {study!r} has no cell {cell!r}; its cells: {', '.join(latest)}")
    if trial.state.name != "COMPLETE":
        raise SweeperError(f"cell {cell} of study {study!r} is {trial.state.name}, not COMPLETE: it has no model yet")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = tracking.client(uri, create=False)
    run_id = trial.user_attrs[names.RUN_ID_ATTR]
    with tracking.read_errors(uri, f"the model of cell {cell}"):
        experiment_id = client.get_run(run_id).info.experiment_id
        model = tracking.logged_model(client, experiment_id, run_id)
        if not tracking.is_usable_model(model):
            raise SweeperError(f"cell {cell} of study {study!r} (run {run_id}) has no usable MLflow model")
        listed = {f.path for f in client.list_logged_model_artifacts(model.model_id, "extra_files")}
        if f"extra_files/{cellmodel.WEIGHTS_FILE}" not in listed:
            raise SweeperError(
                f"the model of cell {cell} ({model.model_id}) has no weights file: it was logged by a sweeper "
                f"older than the one that saves them; mlflow.pytorch.load_model('models:/{model.model_id}') "
                "loads its exported graph, for inference"
            )
        weights = f"{model.artifact_location.rstrip('/')}/extra_files/{cellmodel.WEIGHTS_FILE}"
        with tempfile.TemporaryDirectory(prefix="sweeper-weights-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=weights, dst_path=tmp, tracking_uri=uri)
            return cellmodel.load_weights(local)


def load_spec(spec: str | Path | dict[str, Any]):
    """A StudySpec from a name in experiments/, a path to a .toml file, or a dict with a ``name``."""
    from sweeper import spec as specs

    if isinstance(spec, dict):
        raw = dict(spec)
        name = raw.pop("name", None)
        if not name:
            raise specs.SpecError("a spec given as a dict needs a 'name'")
        return specs.parse(raw, name=name, path=f"<dict {name}>")
    return specs.load(str(spec))


def launch(
    spec: str | Path | dict[str, Any],
    storage: str | None = None,
    tracking_uri: str | None = None,
    *,
    force_update: bool = False,
    dry_run: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Enqueue every trial of ``spec`` that the study does not hold yet (workers then run them).

    Returns ``{"study", "storage", "tracking_uri", "enqueued", "already_enqueued", "spec_hash"}``;
    with ``dry_run=True`` nothing is written and the document is :func:`plan`'s.
    """
    parsed = load_spec(spec)
    if dry_run:
        return plan(parsed, storage, tracking_uri, device=device)
    url, uri = connect.resolve_storage_url(storage), tracking.resolve_tracking_uri(tracking_uri)
    result = enqueue(parsed, url, uri, force_update=force_update)
    return {
        "study": parsed.name,
        "storage": redact(url),
        "tracking_uri": redact(uri),
        "enqueued": result.added,
        "already_enqueued": result.existing,
        "spec_hash": parsed.hash,
    }


def enqueue(
    spec: StudySpec,
    url: str,
    uri: str,
    force_update: bool = False,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int = DEFAULT_GRACE_PERIOD,
) -> EnqueueResult:
    """Enqueue the study's missing trials.

    Enqueueing writes only the Optuna queue: the first worker creates the study's MLflow
    experiment and parent run (so launch never imports MLflow for an embedded store). A server
    is probed first, so a bad URL or password is refused before anything is written."""
    if tracking.is_server(uri):
        tracking.check_reachable(tracking.client(uri))
    storage = connect.open_storage(url, heartbeat_interval, grace_period)
    result = enqueue_study(storage, spec, force_update=force_update)
    if result.added and outcomes.mark_running(result.study):  # a finished study got new cells: it runs again
        tracking.set_study_run_status(tracking.client(uri), spec.name, "running")
    return result


def plan(
    spec,
    storage: str | None = None,
    tracking_uri: str | None = None,
    device: str = "auto",
    probe: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """What ``launch`` would do, writing nothing: every trial with ``present`` (already in the
    study) and its ``state``, a time estimate per trial on ``device`` (see sweeper.estimate),
    ``estimate_total_s`` for the trials not finished yet (their estimates added: one worker with
    the whole device), and for ``workers`` workers ``estimate_summed_s`` (the trials' run times
    added up) and ``estimate_wall_s`` (the study's wall time)."""
    from sweeper import estimate
    from sweeper.spec import variant_cfgs

    parsed = spec if not isinstance(spec, (str, Path, dict)) else load_spec(spec)
    url, uri = connect.resolve_storage_url(storage), tracking.resolve_tracking_uri(tracking_uri)
    existing: dict[str, str] = {}
    spec_changed = False
    try:
        storage_ = connect.open_storage(url, create=False)  # a dry run creates no store
    except connect.NoStore:
        storage_ = None
    if storage_ is not None and parsed.name in connect.study_names(storage_):
        loaded = connect.load_study(storage_, parsed.name)
        old_hash = loaded.user_attrs.get(names.SPEC_HASH_ATTR)
        spec_changed = old_hash is not None and old_hash != parsed.hash
        existing = {
            k: t.state.name
            for k, t in outcomes.latest_trials(loaded.get_trials(deepcopy=False), outcomes.by_key).items()
        }
    client = tracking.client(uri, create=False) if _store_exists(uri) else None
    estimator = estimate.Estimator(
        device,
        client,
        probe=probe,
        batch_size=int(parsed.train.get("batch_size", 64)),
        variants=variant_cfgs(parsed),
    )
    trials = []
    for cell, key in parsed.trial_keys():
        state = existing.get(key)
        trials.append(
            {
                "trial": key,
                "variant": cell.variant,
                "dataset": cell.dataset,
                "seed": cell.seed,
                "present": state is not None,
                "state": state,
                **estimator.cell(cell.variant, cell.dataset, parsed.train),
            }
        )
    todo = [t for t in trials if t["state"] not in ("COMPLETE", "PRUNED")]
    known = [t["estimate_s"] for t in todo if t["estimate_s"] is not None]
    summed, wall = estimate.pack(known, workers, estimator.device) if len(known) == len(todo) else (None, None)
    return {
        "study": parsed.name,
        "dry_run": True,
        "storage": redact(url),
        "tracking_uri": redact(uri),
        "device": estimator.device,
        "spec_hash": parsed.hash,
        "spec_changed": spec_changed,
        "to_enqueue": sum(not t["present"] for t in trials),
        "already_enqueued": sum(t["present"] for t in trials),
        "estimate_total_s": round(sum(known), 1) if len(known) == len(todo) else None,
        "workers": workers,
        "estimate_summed_s": summed,
        "estimate_wall_s": wall,
        "trials": trials,
    }


def _store_exists(url: str) -> bool:
    """An embedded SQLite store is only looked at when its file is there (a dry run creates nothing)."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///")).is_file()
    return True
