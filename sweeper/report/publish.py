"""The report inside MLflow: the study's parent run holds the seed's table as one HTML page (the
plots inline, so MLflow's artifact viewer shows it all), the recipe as its params and summary
metrics (cells complete, the best values), so studies and recipes compare at the study level.

Workers call ``refresh`` after each cell that finishes, `sweeper report` calls ``publish``;
neither ever fails its caller (a read-only MLflow account, an outage: a warning)."""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from pathlib import Path

from sweeper.errors import first_line
from sweeper.redact import redact
from sweeper.report.formats import render
from sweeper.report.plots import write_plots
from sweeper.report.read import DONE, Collected, collect
from sweeper.spec import decision_metric, resolve_recipe

log = logging.getLogger("sweeper.report")

ARTIFACT_DIR = "report"  # in the study's parent run: report.html, and with --plots the PNGs and report.md
REPORT_HTML = "report.html"
PER_EPOCH_MAX_RUNS = 100  # above this many rows the page leaves out the per-epoch plot (a request per run)


def publish(collected: Collected, plots: dict[str, Path] | None = None, against_seed: bool = False) -> bool:
    """Log the HTML report, the recipe params and the summary metrics to the study's parent run.
    ``plots``: PNGs already drawn (report --plots); else they are drawn here. False when the
    study has no parent run yet or MLflow refused."""
    if collected.parent_run_id is None:
        return False
    try:
        with tempfile.TemporaryDirectory(prefix="sweeper-report-") as tmp:
            if plots is None:
                per_epoch = len(collected.frame) <= PER_EPOCH_MAX_RUNS
                plots = write_plots(collected, tmp, against_seed, per_epoch=per_epoch)
            page = Path(tmp) / REPORT_HTML
            page.write_text(
                render(collected.frame, "html", collected.epochs, collected.study, against_seed, plots),
                encoding="utf-8",
            )
            collected.client.log_artifact(collected.parent_run_id, str(page), ARTIFACT_DIR)
        _log_summary(collected)
    except Exception as e:
        log.warning(
            "could not update the report of study %s in MLflow run %s: %s",
            collected.study,
            collected.parent_run_id,
            redact(first_line(e)),
        )
        return False
    return True


def summary_metrics(collected: Collected) -> dict[str, float]:
    """cells_total, cells_complete and the best final value of top1_error and of the study's
    metric among the complete cells (lowest, or highest with direction = "maximize")."""
    frame = collected.frame
    done = frame[frame["state"] == DONE]
    metrics = {"cells_total": float(len(frame)), "cells_complete": float(len(done))}
    maximize = collected.spec.get("direction") == "maximize"
    decided_by = decision_metric(
        collected.spec.get("metric", "top1_error"), (collected.spec.get("train") or {}).get("val_fraction", 0)
    )
    for metric in dict.fromkeys(["top1_error", decided_by]):
        values = [v for v in done.get(metric, []) if v is not None and not math.isnan(v)]
        if values:
            metrics[f"best_{metric}"] = float(max(values) if maximize and metric == decided_by else min(values))
    return metrics


def _log_summary(collected: Collected) -> None:
    from mlflow.entities import Metric, Param

    client, run_id = collected.client, collected.parent_run_id
    spec = collected.spec
    wanted = {
        **resolve_recipe(spec.get("train") or {}),
        "metric": spec.get("metric", "top1_error"),
        "direction": spec.get("direction", "minimize"),
    }
    have = client.get_run(run_id).data.params
    # Params never change in MLflow: a recipe changed by --force-update keeps the first one's
    # (the run's sweeper.recipe_digest tag names the current one).
    params = [Param(k, str(v)) for k, v in wanted.items() if k not in have]
    metrics = summary_metrics(collected)
    now = int(time.time() * 1000)
    step = int(metrics["cells_complete"])
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()], params=params)
    digest = next((r for r in collected.frame["recipe"] if isinstance(r, str)), None)
    if digest:
        client.set_tag(run_id, "sweeper.recipe_digest", digest)


def refresh(study_name: str, storage_url: str, tracking_uri: str) -> None:
    """A worker, after a cell finished: the study's page and numbers in MLflow brought up to date."""
    started = time.monotonic()
    try:
        collected = collect(study_name, storage_url, tracking_uri)
    except Exception as e:
        log.warning("could not read study %s to update its report: %s", study_name, redact(first_line(e)))
        return
    if publish(collected):
        log.info("study %s: report updated in MLflow (%.1fs)", study_name, time.monotonic() - started)


class Refresher:
    """A worker's report updates, off its trials' path: one background thread refreshes the
    studies asked for, one at a time; a study asked for again while it waits is refreshed once."""

    def __init__(self, storage_url: str, tracking_uri: str):
        self.storage_url, self.tracking_uri = storage_url, tracking_uri
        self.pending: dict[str, None] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def request(self, study_name: str) -> None:
        with self.lock:
            self.pending[study_name] = None
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="report-refresh", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        while True:
            with self.lock:
                if not self.pending:
                    self.thread = None
                    return
                name = next(iter(self.pending))
                del self.pending[name]
            try:
                refresh(name, self.storage_url, self.tracking_uri)
            except Exception as e:  # never let a report take the worker down
                log.warning("could not update the report of study %s: %s", name, redact(first_line(e)))

    def close(self, timeout: float = 120.0) -> None:
        """Wait (up to ``timeout`` seconds) for the refreshes asked for so far."""
        with self.lock:
            thread = self.thread
        if thread is not None:
            thread.join(timeout)
