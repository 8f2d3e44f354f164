"""`sweeper report`: reads the study, registers the best model when asked, brings the study's page
in MLflow up to date (sweeper.report.publish), writes the plots and prints the report."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from sweeper import tracking
from sweeper.errors import BadInput, SweeperError
from sweeper.report.formats import FORMATS, render, render_compare, write_atomic
from sweeper.report.plots import write_plots
from sweeper.report.publish import ARTIFACT_DIR, REPORT_HTML, publish
from sweeper.report.read import DONE, Collected, collect, note
from sweeper.report.table import compare, lineage_warnings


def log_to_parent(collected: Collected, plots: dict[str, Path], markdown: str) -> None:
    """Plots and the markdown table become artifacts of the study's parent run (MLflow UI)."""
    if collected.parent_run_id is None:
        note(f"study {collected.study!r} has no parent run in MLflow; plots not logged as artifacts")
        return
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "report.md"
        table.write_text(markdown, encoding="utf-8")
        for path in [*plots.values(), table]:
            collected.client.log_artifact(collected.parent_run_id, str(path), ARTIFACT_DIR)


def register_best(collected: Collected, model_name: str) -> dict[str, Any]:
    """Register the model of the study's best finished cell (the best Optuna value: the decision
    metric, ``frame.attrs["decided_by"]``) as a new version of ``model_name`` in the MLflow Model
    Registry, tagged with the study and the cell's key. Returns what was registered."""
    import mlflow

    study, client = collected.study, collected.client
    frame = collected.frame
    done = [r for r in frame["mlflow_run_id"] if r in collected.finished]  # the report's rows, in order
    if not done:
        raise SweeperError(
            f"study {study!r} has no finished cell, so no model to register; "
            f"`sweeper status --study {study}` shows where its cells are"
        )
    pick = max if frame.attrs.get("direction") == "maximize" else min
    run_id = pick(done, key=lambda r: collected.finished[r][1])
    key, value = collected.finished[run_id]
    metric = frame.attrs.get("decided_by", "top1_error")
    model = tracking.logged_model(client, collected.experiment_id, run_id)
    if not tracking.is_usable_model(model):
        raise SweeperError(
            f"the best finished cell of study {study!r}, {key} ({metric} {value:.4f}, run {run_id}), has no "
            f"usable MLflow model ({tracking.model_name(key)}); cells finished by a sweeper older "
            "than the one that logs models have none"
        )
    tags = {"sweeper.study": study, tracking.KEY_TAG: key, "sweeper.metric": metric, "sweeper.value": str(value)}
    with tracking.fluent_uri(collected.tracking_uri):
        version = mlflow.register_model(f"models:/{model.model_id}", model_name, tags=tags)
    return {
        "name": model_name,
        "version": int(version.version),
        "model_uri": f"models:/{model_name}/{version.version}",
        "study": study,
        "cell": key,
        "run_id": run_id,
        "model_id": model.model_id,
        "metric": metric,
        "value": value,
    }


def print_report(
    study_name: str,
    storage: str | None,
    tracking_uri: str | None,
    fmt: str = "table",
    output: str | None = None,
    plots_dir: str | None = None,
    against_seed: bool = False,
    recipe: str = "current",
    compare_variants: str | None = None,
    register_best_as: str | None = None,
) -> None:
    """Write the report to stdout (or ``output``, atomically); logs go to stderr. With
    ``register_best_as``, the best finished cell's model is registered first (see register_best)
    and, in json and csv, every row gains ``registered``: what was registered on the best cell's
    row, null on the others. The json document is a list of rows whatever the options."""
    if fmt not in FORMATS:
        raise BadInput(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if compare_variants is not None:
        check_compare(compare_variants, fmt)
    started = time.monotonic()
    uri = tracking.resolve_tracking_uri(tracking_uri)
    with tracking.read_errors(uri, f"the runs of study {study_name!r}"):
        collected = collect(study_name, storage, tracking_uri, recipe)
    frame = collected.frame
    note(
        f"report: {len(frame)} cell(s) of study {study_name!r}, "
        f"{int((frame['state'] == DONE).sum())} complete ({time.monotonic() - started:.1f}s)"
    )
    for warning in lineage_warnings(frame):
        note(f"warning: {warning}")
    registered = None
    if register_best_as is not None:
        with tracking.read_errors(uri, f"the model registry for study {study_name!r}"):
            registered = register_best(collected, register_best_as)
        note(
            f"registered {registered['model_uri']}: cell {registered['cell']} of study {study_name} "
            f"({registered['metric']} {registered['value']:.4f}, run {registered['run_id']})"
        )
    if compare_variants is not None:
        a, b = _compare_pair(compare_variants, frame)
        document = render_compare(compare(frame, a, b), fmt)
        if output:
            write_atomic(output, document)
        else:
            sys.stdout.write(document)
        return
    plots: dict[str, Path] = {}
    if plots_dir:
        with tracking.read_errors(uri, f"the metric history of study {study_name!r}"):
            plots = write_plots(collected, plots_dir, against_seed)
            markdown = render(frame, "markdown", collected.epochs, study_name, against_seed)
            log_to_parent(collected, plots, markdown)
        note(
            f"plots in {plots_dir}: {', '.join(p.name for p in plots.values())}"
            + (
                f" (also artifacts of MLflow run {collected.parent_run_id}, folder {ARTIFACT_DIR}/)"
                if collected.parent_run_id
                else ""
            )
        )
    if publish(collected, plots or None, against_seed):
        note(f"report page: {ARTIFACT_DIR}/{REPORT_HTML} of MLflow run {collected.parent_run_id} (the study's run)")
    width = None
    if fmt == "table" and output is None:
        from rich.console import Console

        console = Console()
        width = console.width if console.is_terminal else 220  # piped: never truncate numbers
    if registered is not None and fmt in ("json", "csv"):  # a column: the document keeps its shape
        frame = frame.copy()
        frame["registered"] = [registered if r == registered["run_id"] else None for r in frame["mlflow_run_id"]]
        if fmt == "csv":
            frame["registered"] = frame["registered"].map(lambda r: r["model_uri"] if r else None)
    document = render(frame, fmt, collected.epochs, study_name, against_seed, plots, width=width)
    if output:
        write_atomic(output, document)
        note(f"report written to {output}")
    else:
        sys.stdout.write(document)
        sys.stdout.flush()


COMPARE_FORMATS = ("table", "markdown", "csv", "json")


def check_compare(text: str, fmt: str) -> tuple[str, str]:
    """``--compare A,B`` as written (before anything is read); raises BadInput (exit 2)."""
    names = [part.strip() for part in text.split(",")]
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        raise BadInput(f"--compare takes two different variants as A,B (e.g. standard,short4), got {text!r}")
    if fmt not in COMPARE_FORMATS:
        raise BadInput(f"--compare prints {', '.join(COMPARE_FORMATS)}, not --format {fmt}")
    return names[0], names[1]


def _compare_pair(text: str, frame: pd.DataFrame) -> tuple[str, str]:
    names = check_compare(text, "table")
    known = sorted(set(frame["variant"].dropna()))
    for name in names:
        if name not in known:
            raise BadInput(f"--compare: variant {name!r} is not in this study; its variants: {', '.join(known)}")
    return names
