"""`sweeper report`: the seed post's tables, rebuilt from what a study logged.

One row per grid cell (variant x dataset x seed): the cell's state comes from Optuna (its latest
trial), its numbers from the cell's MLflow run. Runs are read with paged ``search_runs`` calls
(a thousand per page, latest metric values included), never one request per run; the per-epoch
history is read only when the per-epoch plot is asked for.

    >>> frame = build_frame("quickstart")                         # doctest: +SKIP
    >>> frame[["variant", "seed", "state", "top1_error"]]          # doctest: +SKIP
    >>> print_report("quickstart", None, None, fmt="markdown")     # doctest: +SKIP
"""

from __future__ import annotations

import base64
import contextlib
import gc
import html
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sweeper import seed_results, tracking
from sweeper import study as studies
from sweeper.errors import SweeperError, redact, redact_url
from sweeper.spec import decision_metric

VARIANT_ORDER = ("naive", "standard", "long", "short", "short2", "short3", "short4")  # the seed's row order
DATASET_ORDER = ("cifar100", "cifar10", "digits", "synthetic")  # the seed's table order, then ours
FRAME_COLUMNS = [
    "variant",
    "dataset",
    "seed",
    "state",
    "top1_error",
    "top5_error",
    "val_top1_error",
    "val_top5_error",
    "params",
    "macs",
    "train_seconds",
    "images_per_s",
    "mlflow_run_id",
    "n_seeds",
    "top1_error_mean",
    "top1_error_std",
    "recipe",
    "code_digest",
    "dataset_digest",
]
SEED_COLUMNS = ["seed_top1_error", "seed_top5_error", "seed_params", "seed_time", "seed_train_seconds"]
FORMATS = ("table", "markdown", "csv", "json", "html")
PLOT_FILES = {
    "params": "top1_vs_params.png",
    "time": "top1_vs_time.png",
    "epochs": "top1_per_epoch.png",
}
ARTIFACT_DIR = "report"  # where plots and the markdown table go in the study's parent run
DEFAULT_EPOCHS = 14
CELL_FILTER = f"tags.`{tracking.ROLE_TAG}` = 'cell'"
PAGE_SIZE = 1000
DONE = "COMPLETE"


@dataclass
class Collected:
    """A study's cells and where they came from."""

    study: str
    frame: pd.DataFrame
    epochs: int
    tracking_uri: str
    experiment_id: str | None = None
    parent_run_id: str | None = None
    datasets: list[str] = field(default_factory=list)
    client: Any = None
    finished: dict[str, tuple[str, float]] = field(default_factory=dict)  # run id -> (cell key, Optuna value)


# --- reading -------------------------------------------------------------------------------


def build_frame(study_name: str, storage_url: str | None = None, tracking_uri: str | None = None) -> pd.DataFrame:
    """One row per grid cell of the study, columns ``FRAME_COLUMNS``.

    ``frame.attrs`` carries ``study``, ``epochs`` (from the stored spec, default 14),
    ``experiment_id`` and ``parent_run_id``. Raises SweeperError for an unknown study.
    """
    return collect(study_name, storage_url, tracking_uri).frame


@contextlib.contextmanager
def _gc_paused():
    """Reading thousands of runs builds hundreds of thousands of short-lived ORM objects; the
    cyclic collector's passes over them cost more than the read itself (2-3x on 1,000 runs)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def collect(
    study_name: str, storage_url: str | None = None, tracking_uri: str | None = None, recipe: str = "current"
) -> Collected:
    """The study's cells (see build_frame) plus the MLflow client and ids the plots need.

    ``recipe``: "current" (the rows of the recipe the study was last launched with), "all" (a
    row per cell and recipe), or a recipe digest (or its first characters)."""
    with _gc_paused():
        return _collect(study_name, storage_url, tracking_uri, recipe)


def _collect(study_name: str, storage_url: str | None, tracking_uri: str | None, recipe: str = "current") -> Collected:
    url = studies.resolve_storage_url(storage_url)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.configure_http()
    study = studies.load_study(studies.open_storage(url, create=False), study_name)
    spec = study.user_attrs.get(studies.SPEC_ATTR) or {}
    epochs = int((spec.get("train") or {}).get("epochs") or DEFAULT_EPOCHS)
    trials = _cell_trials(study.get_trials(deepcopy=False), spec)
    trials = _of_recipe(trials, recipe, study.user_attrs.get(studies.RECIPE_DIGEST_ATTR))

    client = tracking.client(uri, create=False)
    experiment = _experiment(client, study_name, uri)
    runs_by_id: dict[str, Any] = {}
    runs_by_key: dict[str, Any] = {}
    parent_run_id = None
    if experiment is not None:
        for run in search_cell_runs(client, experiment.experiment_id):
            runs_by_id[run.info.run_id] = run
            tags = run.data.tags
            runs_by_key.setdefault((tags.get(tracking.KEY_TAG), tags.get(tracking.RECIPE_TAG)), run)
        parent = tracking.find_run(client, experiment.experiment_id, {tracking.ROLE_TAG: "study"})
        parent_run_id = parent.info.run_id if parent else None
    elif trials:
        _note(f"no MLflow experiment named {study_name!r} in {redact_url(uri)}: no cell has logged anything yet")

    rows = []
    finished = {}
    for trial in trials:
        ua = trial.user_attrs
        digest = ua.get(studies.RECIPE_DIGEST_ATTR)
        run = runs_by_id.get(ua.get("mlflow_run_id")) or runs_by_key.get((ua.get(studies.KEY_ATTR), digest))
        if run is not None and trial.state.name == DONE and trial.value is not None:
            finished[run.info.run_id] = (ua.get(studies.KEY_ATTR), trial.value)
        metrics = run.data.metrics if run is not None else {}
        tags = run.data.tags if run is not None else {}
        rows.append(
            {
                "variant": ua.get("variant"),
                "dataset": ua.get("dataset"),
                "seed": _int(ua.get("seed")),
                "state": trial.state.name,
                "top1_error": metrics.get("top1_error"),
                "top5_error": metrics.get("top5_error"),
                "val_top1_error": metrics.get("val_top1_error"),
                "val_top5_error": metrics.get("val_top5_error"),
                "params": _int(metrics.get("num_params")),
                "macs": _int(metrics.get("macs")),
                "train_seconds": metrics.get("train_seconds"),
                "images_per_s": metrics.get("images_per_s"),
                "mlflow_run_id": run.info.run_id if run is not None else ua.get("mlflow_run_id"),
                "recipe": digest,
                "code_digest": tags.get(tracking.CODE_DIGEST_TAG),
                "dataset_digest": tags.get(tracking.DATASET_DIGEST_TAG),
            }
        )
    frame = with_seed_stats(_typed(pd.DataFrame(rows, columns=FRAME_COLUMNS)))
    datasets = list((spec.get("grid") or {}).get("dataset") or [])
    frame = sort_frame(frame, datasets)
    frame.attrs.update(
        study=study_name,
        epochs=epochs,
        decided_by=decision_metric(spec.get("metric", "top1_error"), (spec.get("train") or {}).get("val_fraction", 0)),
        direction=spec.get("direction", "minimize"),
        experiment_id=experiment.experiment_id if experiment else None,
        parent_run_id=parent_run_id,
    )
    return Collected(
        study_name,
        frame,
        epochs,
        uri,
        experiment.experiment_id if experiment else None,
        parent_run_id,
        datasets,
        client,
        finished,
    )


def search_cell_runs(client, experiment_id: str) -> list[Any]:
    """Every cell run of an experiment, a page of ``PAGE_SIZE`` at a time (latest metrics included)."""
    from mlflow.entities import ViewType

    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=CELL_FILTER,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=PAGE_SIZE,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment(client, name: str, uri: str):
    try:
        return client.get_experiment_by_name(name)
    except Exception as e:  # a down server or bad credentials: say which store
        tracking.check_reachable(client)  # raises the clear message when the store is the problem
        raise SweeperError(f"cannot read the MLflow experiment {name!r} from {redact_url(uri)}: {redact(e)}") from None


def _of_recipe(trials: list, recipe: str, current: str | None) -> list:
    """The trials of one recipe ("current": the study's latest; "all": every recipe)."""
    if recipe == "all":
        return trials
    want = current if recipe == "current" else recipe
    if want is None:  # a study launched before recipes had digests
        return trials
    kept = [t for t in trials if (t.user_attrs.get(studies.RECIPE_DIGEST_ATTR) or "").startswith(want)]
    if recipe != "current" and not kept:
        digests = sorted({t.user_attrs.get(studies.RECIPE_DIGEST_ATTR) or "none" for t in trials})
        raise SweeperError(f"no trial with recipe {recipe!r}; this study's recipes: {', '.join(digests)}")
    hidden = {t.user_attrs.get(studies.RECIPE_DIGEST_ATTR) for t in trials} - {want}
    if recipe == "current" and len(kept) < len(trials):
        _note(
            f"{len(trials) - len(kept)} row(s) of {len(hidden)} earlier recipe(s) not shown "
            "(--recipe all shows every recipe as its own rows)"
        )
    return kept


def _cell_trials(trials, spec: dict[str, Any]) -> list:
    """The trial that speaks for each grid cell and recipe: the latest trial of each trial key
    (a retry replaces the trial it retries); in a search study, the best finished trial."""
    latest: dict[tuple, Any] = {}
    for t in sorted(trials, key=lambda t: t.number):
        key = t.user_attrs.get(studies.KEY_ATTR)
        if key is not None:
            latest[(key, t.user_attrs.get(studies.RECIPE_DIGEST_ATTR))] = t
    by_cell: dict[tuple, list] = {}
    for t in latest.values():
        ua = t.user_attrs
        cell = (ua.get("variant"), ua.get("dataset"), _int(ua.get("seed")), ua.get(studies.RECIPE_DIGEST_ATTR))
        by_cell.setdefault(cell, []).append(t)
    maximize = spec.get("direction") == "maximize"
    chosen = []
    for group in by_cell.values():
        done = [t for t in group if t.state.name == DONE and t.value is not None]
        if len(group) == 1 or not done:
            chosen.append(max(group, key=lambda t: t.number))
        else:
            chosen.append((max if maximize else min)(done, key=lambda t: t.value))
    return chosen


def _int(value) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for col in ("seed", "params", "macs"):
        frame[col] = frame[col].astype("Int64")
    for col in ("top1_error", "top5_error", "val_top1_error", "val_top5_error", "train_seconds", "images_per_s"):
        frame[col] = frame[col].astype("float64")
    for col in ("variant", "dataset", "state", "mlflow_run_id", "recipe", "code_digest", "dataset_digest"):
        frame[col] = frame[col].astype(object)
    return frame


def with_seed_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """Each row gets its cell's statistics over the finished seeds of the same variant, dataset
    and recipe: ``n_seeds``, ``top1_error_mean`` and ``top1_error_std`` (sample std; None for one seed)."""
    frame = frame.copy()
    frame["n_seeds"], frame["top1_error_mean"], frame["top1_error_std"] = 0, math.nan, math.nan
    keys = [frame["dataset"], frame["variant"], frame["recipe"].fillna("")]
    for _, index in frame.groupby(keys, sort=False).groups.items():
        group = frame.loc[index]
        done = group.loc[group["state"] == DONE, "top1_error"].dropna()
        frame.loc[index, "n_seeds"] = len(done)
        if len(done):
            frame.loc[index, "top1_error_mean"] = done.mean()
        if len(done) > 1:
            frame.loc[index, "top1_error_std"] = done.std(ddof=1)
    frame["n_seeds"] = frame["n_seeds"].astype("Int64")
    return frame


def compare(frame: pd.DataFrame, a: str, b: str, metric: str = "top1_error") -> list[dict[str, Any]]:
    """The seed-paired difference ``a - b`` of ``metric`` on each dataset, with a 95% Student's t
    confidence interval over the pairs (seeds where both variants finished).

    verdict: "indistinguishable" when the interval covers 0, else which variant has the lower
    error; with fewer than two pairs there is no interval and the verdict says so."""
    from scipy import stats

    out = []
    done = frame[frame["state"] == DONE]
    for dataset in dict.fromkeys(frame["dataset"]):
        rows = done[done["dataset"] == dataset]
        left = rows[rows["variant"] == a].set_index("seed")[metric].dropna()
        right = rows[rows["variant"] == b].set_index("seed")[metric].dropna()
        seeds = sorted(set(left.index) & set(right.index))
        diffs = pd.Series([float(left[s] - right[s]) for s in seeds], dtype="float64")
        n = len(diffs)
        mean = float(diffs.mean()) if n else None
        low = high = None
        if n < 2:
            verdict = f"too few paired seeds ({n}); run both variants with at least two common seeds"
        else:
            half = float(stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
            low, high = mean - half, mean + half
            if low <= 0 <= high:
                verdict = "indistinguishable"
            else:
                verdict = f"{a} lower {metric}" if mean < 0 else f"{b} lower {metric}"
        out.append(
            {
                "dataset": dataset,
                "a": a,
                "b": b,
                "metric": metric,
                "diff_mean": mean,
                "ci_low": low,
                "ci_high": high,
                "n_pairs": n,
                "seeds": [int(s) for s in seeds],
                "verdict": verdict,
            }
        )
    return out


def render_compare(results: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(results, indent=2) + "\n"
    columns = ["Dataset", "A - B", "Mean diff", "95% CI", "Pairs", "Verdict"]
    rows = []
    for r in results:
        ci = "—" if r["ci_low"] is None else f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        mean = "—" if r["diff_mean"] is None else f"{r['diff_mean']:+.4f}"
        rows.append([r["dataset"], f"{r['a']} - {r['b']}", mean, ci, str(r["n_pairs"]), r["verdict"]])
    title = f"Seed-paired {results[0]['metric'] if results else 'top1_error'} difference"
    if fmt == "markdown":
        return f"**{title}**\n\n" + markdown_table(columns, rows) + "\n"
    return render_rich([Table("", title, columns, rows)])


def _rank(values, order) -> dict[str, int]:
    ranks = {v: i for i, v in enumerate(order)}
    return {v: ranks.get(v, len(ranks)) for v in values}


def sort_frame(frame: pd.DataFrame, datasets: list[str] | None = None) -> pd.DataFrame:
    """Datasets in spec order (else the seed's), variants in the seed's order, then seeds."""
    if frame.empty:
        return frame.reset_index(drop=True)
    dataset_order = list(datasets or []) + [d for d in DATASET_ORDER if d not in (datasets or [])]
    d_rank = _rank(frame["dataset"].unique(), dataset_order)
    v_rank = _rank(frame["variant"].unique(), VARIANT_ORDER)
    keys = pd.DataFrame(
        {
            "d": frame["dataset"].map(d_rank),
            "dn": frame["dataset"].astype(str),
            "v": frame["variant"].map(v_rank),
            "vn": frame["variant"].astype(str),
            "s": frame["seed"].fillna(-1).astype("int64"),
            "r": frame["recipe"].fillna("").astype(str) if "recipe" in frame.columns else "",
        }
    )
    order = keys.sort_values(["d", "dn", "v", "vn", "r", "s"], kind="stable").index
    return frame.loc[order].reset_index(drop=True)


def with_seed(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with the seed post's numbers for each row's (dataset, variant) beside it
    (``SEED_COLUMNS``; empty where the post has no such row, e.g. digits)."""
    seed = pd.DataFrame(seed_results.records()).rename(
        columns={
            "top1_error": "seed_top1_error",
            "top5_error": "seed_top5_error",
            "params": "seed_params",
            "time": "seed_time",
            "train_seconds": "seed_train_seconds",
        }
    )[["dataset", "variant", *SEED_COLUMNS]]
    merged = frame.merge(seed, on=["dataset", "variant"], how="left")
    merged["seed_params"] = merged["seed_params"].astype("Int64")
    merged["seed_train_seconds"] = merged["seed_train_seconds"].astype("Int64")
    merged.attrs.update(frame.attrs)
    return merged


# --- the seed's table -----------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """Like the seed post: ``1748`` -> ``29m8s``; ``3725`` -> ``1h2m5s``; under 10 s one decimal."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return ""
    if seconds < 10:
        return f"{seconds:.1f}s"
    total = int(round(seconds))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    return f"{m}m{s}s" if m else f"{s}s"


@dataclass
class Table:
    dataset: str
    title: str
    columns: list[str]
    rows: list[list[str]]


def _stat(values: pd.Series, fmt, collapse_equal: bool = False) -> str:
    """One value, or mean ± std (sample std) over several seeds; equal values stay one value
    with ``collapse_equal`` (parameters and MACs do not vary with the seed)."""
    values = values.dropna().astype(float)
    if values.empty:
        return "—"
    if len(values) == 1 or (collapse_equal and values.nunique() == 1):
        return fmt(values.iloc[0])
    return f"{fmt(values.mean())} ± {fmt(values.std(ddof=1))}"


def _error(x: float) -> str:
    return f"{x:.4f}"


def _count(x: float) -> str:
    return f"{int(round(x))}"


def _states(group: pd.DataFrame) -> str:
    counts = group["state"].value_counts()
    if len(counts) == 1:
        return str(counts.index[0])
    return ", ".join(f"{state} {n}" for state, n in counts.items())


def tables(
    frame: pd.DataFrame, epochs: int = DEFAULT_EPOCHS, against_seed: bool = False, study: str | None = None
) -> list[Table]:
    """The seed's table for each dataset: a row per variant in the seed's order.

    With several seeds per cell the numbers are mean ± std over the finished seeds and a Seeds
    column counts them; a variant with no finished seed shows its state (WAITING, RUNNING,
    FAIL, PRUNED) instead of numbers.
    """
    if against_seed and "seed_top1_error" not in frame.columns:
        frame = with_seed(frame)
    frame = sort_frame(frame)
    time_col = f"Time({epochs} epoch)"
    seed_time_col = f"Seed Time({seed_results.SEED_EPOCHS} epoch)"
    # Rows of an earlier recipe (report --recipe all) are rows of their own, never pooled.
    multi_recipe = "recipe" in frame.columns and frame["recipe"].nunique(dropna=False) > 1
    row_keys = ["variant", "recipe"] if multi_recipe else ["variant"]
    many_seeds = bool(len(frame)) and frame.groupby(["dataset", *row_keys], sort=False, dropna=False).size().max() > 1
    validated = "val_top1_error" in frame.columns and frame["val_top1_error"].notna().any()
    out = []
    for dataset, by_dataset in frame.groupby("dataset", sort=False):
        seeded = against_seed and dataset in seed_results.SEED_RESULTS
        columns = (
            ["Variant", "Top 1 Error"]
            + (["Seed Top 1 Error"] if seeded else [])
            + (["Val Top 1 Error"] if validated else [])
            + ["Top 5 Error"]
            + (["Seed Top 5 Error"] if seeded else [])
            + ["Parameters"]
            + (["Seed Parameters"] if seeded else [])
            + [time_col]
            + ([seed_time_col] if seeded else [])
            + ["MACs"]
            + (["Seeds"] if many_seeds else [])
        )
        rows = []
        for keys, group in by_dataset.groupby(row_keys, sort=False, dropna=False):
            variant = keys[0]
            label = f"{variant} (recipe {keys[1]})" if multi_recipe else str(variant)
            done = group[group["state"] == DONE]
            if done.empty:
                state = _states(group)
                measured = {
                    "Top 1 Error": state,
                    "Val Top 1 Error": state,
                    "Top 5 Error": state,
                    "Parameters": "—",
                    time_col: "—",
                    "MACs": "—",
                }
            else:
                measured = {
                    "Top 1 Error": _stat(done["top1_error"], _error),
                    "Val Top 1 Error": _stat(done["val_top1_error"], _error) if validated else "",
                    "Top 5 Error": _stat(done["top5_error"], _error),
                    "Parameters": _stat(done["params"], _count, collapse_equal=True),
                    time_col: _stat(done["train_seconds"], format_duration),
                    "MACs": _stat(done["macs"], _count, collapse_equal=True),
                }
            if many_seeds:
                pending = group[group["state"] != DONE]
                measured["Seeds"] = (
                    str(len(done)) if pending.empty else f"{len(done)}/{len(group)} ({_states(pending)})"
                )
            if seeded:
                first = group.iloc[0]
                measured.update(
                    {
                        "Seed Top 1 Error": _seed_value(first["seed_top1_error"], "{:.2f}"),
                        "Seed Top 5 Error": _seed_value(first["seed_top5_error"], "{:.2f}"),
                        "Seed Parameters": _seed_value(first["seed_params"], "{}"),
                        seed_time_col: "" if pd.isna(first["seed_time"]) else str(first["seed_time"]),
                    }
                )
            rows.append([label] + [measured[c] for c in columns[1:]])
        title = f"GoogLeNet on {dataset}" + (f" (study {study})" if study else "")
        if validated:
            title += f"; decided on {frame.attrs.get('decided_by', 'val_top1_error')}, the test split never chose"
        out.append(Table(str(dataset), title, columns, rows))
    return out


def _seed_value(value, fmt: str) -> str:
    return "" if value is None or pd.isna(value) else fmt.format(value)


# --- rendering -------------------------------------------------------------------------------


def render(
    collected_frame: pd.DataFrame,
    fmt: str,
    epochs: int = DEFAULT_EPOCHS,
    study: str | None = None,
    against_seed: bool = False,
    plots: dict[str, Path] | None = None,
    width: int | None = None,
) -> str:
    """The report document in ``fmt`` (one of FORMATS) as text."""
    frame = with_seed(collected_frame) if against_seed else collected_frame
    if fmt == "json":
        return json.dumps(records(frame), indent=2) + "\n"
    if fmt == "csv":
        return frame.to_csv(index=False)
    built = tables(frame, epochs, against_seed, study)
    if fmt == "markdown":
        return render_markdown(built, study, against_seed)
    if fmt == "html":
        return render_html(built, study, against_seed, plots or {})
    if fmt == "table":
        return render_rich(built, width=width)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Plain JSON-able dicts: NaN/NA -> None, numpy numbers -> Python numbers."""
    out = []
    for row in frame.to_dict("records"):
        out.append({k: _plain(v) for k, v in row.items()})
    return out


def _plain(value):
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
        return None if isinstance(value, float) and math.isnan(value) else value
    return value


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A GitHub pipe table (pandas.to_markdown needs tabulate, which sweeper does not require)."""

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    widths = [max([len(cell(c))] + [len(cell(r[i])) for r in rows]) for i, c in enumerate(columns)]
    right = [i > 0 for i in range(len(columns))]  # numbers right-aligned, the variant name left
    lines = [
        "| " + " | ".join(cell(c).ljust(w) for c, w in zip(columns, widths)) + " |",
        "|" + "|".join(("-" * (w + 1) + ":") if r else (":" + "-" * (w + 1)) for w, r in zip(widths, right)) + "|",
    ]
    for row in rows:
        lines.append(
            "| " + " | ".join(cell(v).rjust(w) if r else cell(v).ljust(w) for v, w, r in zip(row, widths, right)) + " |"
        )
    return "\n".join(lines)


def render_markdown(built: list[Table], study: str | None = None, against_seed: bool = False) -> str:
    parts = [f"# Study {study}" if study else "# sweeper report", ""]
    if not built:
        parts += ["No cells yet.", ""]
    for t in built:
        parts += [f"**{t.title}**", "", markdown_table(t.columns, t.rows), ""]
    if against_seed:
        parts += [f"Seed columns: {seed_results.SEED_SOURCE} ({seed_results.SEED_EPOCHS} epochs).", ""]
    return "\n".join(parts)


def render_rich(built: list[Table], width: int | None = None) -> str:
    from rich.console import Console
    from rich.table import Table as RichTable
    from rich.text import Text

    buffer = io.StringIO()
    console = Console(file=buffer, width=width or 220, color_system=None, soft_wrap=True)
    if not built:
        console.print("no cells yet")
    for t in built:
        table = RichTable(title=Text(t.title) if t.title else None, title_justify="left")
        for i, col in enumerate(t.columns):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in t.rows:
            table.add_row(*(Text(str(c)) for c in row))
        console.print(table)
    return buffer.getvalue()


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.7rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0 1.5rem; }
"""


def render_html(built: list[Table], study: str | None, against_seed: bool, plots: dict[str, Path]) -> str:
    title = html.escape(f"sweeper report: {study}" if study else "sweeper report")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{title}</title>",
        f"<style>{HTML_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{title}</h1>",
    ]
    if not built:
        parts.append("<p>No cells yet.</p>")
    for t in built:
        parts.append(f"<h2>{html.escape(t.title)}</h2>")
        parts.append("<table>")
        parts.append("<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in t.columns) + "</tr></thead>")
        parts.append("<tbody>")
        for row in t.rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>")
        parts.append("</tbody></table>")
    if against_seed:
        parts.append(f"<p>Seed columns: {html.escape(seed_results.SEED_SOURCE)}.</p>")
    for name, path in plots.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f"<h2>{html.escape(PLOT_TITLES.get(name, name))}</h2>")
        parts.append(f'<img alt="{html.escape(PLOT_TITLES.get(name, name))}" src="data:image/png;base64,{data}">')
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


# --- plots -----------------------------------------------------------------------------------

PLOT_TITLES = {
    "params": "Top-1 error vs parameters",
    "time": "Top-1 error vs training time",
    "epochs": "Test top-1 error per epoch",
}
MARKERS = {"naive": "s", "standard": "o", "long": "D", "short": "^", "short2": "v", "short3": "<", "short4": ">"}


def write_plots(collected: Collected, plots_dir: str | Path, against_seed: bool = False) -> dict[str, Path]:
    """The three PNGs in ``plots_dir``: {"params": path, "time": path, "epochs": path}."""
    # Figures made without pyplot need no backend and leave matplotlib's global state alone.
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    out_dir = Path(plots_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = sort_frame(collected.frame, collected.datasets)
    done = frame[frame["state"] == DONE]
    summary = (
        (
            done.groupby(["dataset", "variant"], sort=False)
            .agg(
                top1_error=("top1_error", "mean"),
                params=("params", "mean"),
                train_seconds=("train_seconds", "mean"),
                n=("seed", "size"),
            )
            .reset_index()
        )
        if not done.empty
        else pd.DataFrame(columns=["dataset", "variant", "top1_error", "params", "train_seconds", "n"])
    )
    datasets = list(dict.fromkeys(frame["dataset"])) or ["(none)"]
    colors = {d: colormaps["tab10"](i % 10) for i, d in enumerate(datasets)}
    paths = {}

    for name, x_col, x_label, log_x in (
        ("params", "params", "parameters", True),
        ("time", "train_seconds", f"training time, {collected.epochs} epochs (s)", False),
    ):
        fig = Figure(figsize=(8, 5.5), dpi=110)
        ax = fig.subplots()
        xs = []
        points = summary.assign(_x=summary[x_col].astype(float)).sort_values("_x") if not summary.empty else summary
        for i, (_, row) in enumerate(points.iterrows()):
            x, y = float(row[x_col]), float(row["top1_error"])
            if math.isnan(x) or math.isnan(y):
                continue
            xs.append(x)
            ax.scatter(x, y, marker=MARKERS.get(row["variant"], "o"), color=colors[row["dataset"]], s=70, zorder=3)
            # Neighbours along x get their labels above and below in turn, so close points stay legible.
            ax.annotate(
                row["variant"], (x, y), textcoords="offset points", xytext=(6, 6 if i % 2 == 0 else -13), fontsize=8
            )
        seeded = False
        if against_seed:
            for dataset in datasets:
                for variant, r in seed_results.SEED_RESULTS.get(dataset, {}).items():
                    x = r.params if x_col == "params" else r.seconds
                    seeded = True
                    ax.scatter(
                        x,
                        r.top1_error,
                        marker=MARKERS.get(variant, "o"),
                        facecolors="none",
                        edgecolors=colors[dataset],
                        s=70,
                        zorder=2,
                    )
                    ax.annotate(
                        f"{variant} (seed)",
                        (x, r.top1_error),
                        textcoords="offset points",
                        xytext=(6, -10),
                        fontsize=7,
                        color="#666",
                    )
        if log_x and xs:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(_si))
            # Label the 2..9 ticks only when the points span less than a decade; else they collide.
            ax.xaxis.set_minor_formatter(FuncFormatter(_si) if max(xs) / min(xs) < 10 else NullFormatter())
        ax.margins(0.12)
        for dataset in datasets:
            ax.scatter([], [], color=colors[dataset], label=dataset)
        for variant in [v for v in VARIANT_ORDER if v in set(summary["variant"])]:
            ax.scatter([], [], marker=MARKERS[variant], color="#555", label=variant)
        if seeded:
            ax.scatter(
                [],
                [],
                marker="o",
                facecolors="none",
                edgecolors="#555",
                label=f"seed post ({seed_results.SEED_EPOCHS} epochs)",
            )
        if summary.empty:
            ax.text(0.5, 0.5, "no finished cell yet", transform=ax.transAxes, ha="center", va="center")
        ax.set_xlabel(x_label)
        ax.set_ylabel("top-1 error")
        ax.set_title(f"{PLOT_TITLES[name]} — study {collected.study}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        paths[name] = _save(fig, out_dir / PLOT_FILES[name])

    histories = epoch_histories(collected.client, frame)
    fig = Figure(figsize=(6.5 * len(datasets), 5), dpi=110)
    axes = fig.subplots(1, len(datasets), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rows = frame[frame["dataset"] == dataset]
        for variant, group in rows.groupby("variant", sort=False):
            per_step: dict[int, list[float]] = {}
            for run_id in group["mlflow_run_id"].dropna():
                for step, value in histories.get(run_id, []):
                    per_step.setdefault(step, []).append(value)
            if not per_step:
                continue
            steps = sorted(per_step)
            means = [sum(per_step[s]) / len(per_step[s]) for s in steps]
            ax.plot(steps, means, marker=MARKERS.get(variant, "o"), label=f"{variant} (n={len(group)})")
        ax.set_title(f"{dataset}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 error")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no epoch logged yet", transform=ax.transAxes, ha="center", va="center")
    fig.suptitle(f"{PLOT_TITLES['epochs']} (mean over seeds) — study {collected.study}")
    fig.tight_layout()
    paths["epochs"] = _save(fig, out_dir / PLOT_FILES["epochs"])
    return paths


def _si(x: float, _pos=None) -> str:
    """Tick labels like 1.5M, 650k."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{suffix}"
    return f"{x:.3g}"


def epoch_histories(client, frame: pd.DataFrame, metric: str = "top1_error") -> dict[str, list[tuple[int, float]]]:
    """run id -> [(epoch, value)] for the per-epoch plot (one history request per run)."""
    out = {}
    for run_id in frame["mlflow_run_id"].dropna().unique():
        try:
            history = client.get_metric_history(run_id, metric)
        except Exception as e:  # a run deleted meanwhile: leave it out of the plot
            _note(f"no {metric} history for run {run_id}: {redact(e)}")
            continue
        latest: dict[int, tuple[int, float]] = {}
        for m in history:  # a retried epoch may be logged twice: keep its latest value
            if m.step not in latest or m.timestamp >= latest[m.step][0]:
                latest[m.step] = (m.timestamp, m.value)
        out[run_id] = sorted((step, v) for step, (_, v) in latest.items())
    return out


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def log_to_parent(collected: Collected, plots: dict[str, Path], markdown: str) -> None:
    """Plots and the markdown table become artifacts of the study's parent run (MLflow UI)."""
    if collected.parent_run_id is None:
        _note(f"study {collected.study!r} has no parent run in MLflow; plots not logged as artifacts")
        return
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "report.md"
        table.write_text(markdown, encoding="utf-8")
        for path in [*plots.values(), table]:
            collected.client.log_artifact(collected.parent_run_id, str(path), ARTIFACT_DIR)


# --- the model registry ----------------------------------------------------------------------


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
    if model is None or model.status.name != "READY":
        raise SweeperError(
            f"the best finished cell of study {study!r}, {key} ({metric} {value:.4f}, run {run_id}), has no "
            f"usable MLflow model (runs:/{run_id}/{tracking.MODEL_NAME}); cells finished by a sweeper older "
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


# --- the command -----------------------------------------------------------------------------


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
    and, in json, the document becomes ``{"cells": [...], "registered": {...}}``."""
    if fmt not in FORMATS:
        raise SweeperError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    started = time.monotonic()
    uri = tracking.resolve_tracking_uri(tracking_uri)
    with tracking.read_errors(uri, f"the runs of study {study_name!r}"):
        collected = collect(study_name, storage, tracking_uri, recipe)
    frame = collected.frame
    _note(
        f"report: {len(frame)} cell(s) of study {study_name!r}, "
        f"{int((frame['state'] == DONE).sum())} complete ({time.monotonic() - started:.1f}s)"
    )
    for warning in lineage_warnings(frame):
        _note(f"warning: {warning}")
    registered = None
    if register_best_as is not None:
        with tracking.read_errors(uri, f"the model registry for study {study_name!r}"):
            registered = register_best(collected, register_best_as)
        _note(
            f"registered {registered['model_uri']}: cell {registered['cell']} of study {study_name} "
            f"({registered['metric']} {registered['value']:.4f}, run {registered['run_id']})"
        )
    if compare_variants is not None:
        a, b = _compare_pair(compare_variants, frame)
        document = render_compare(compare(frame, a, b), "json" if fmt in ("json", "csv") else fmt)
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
        _note(
            f"plots in {plots_dir}: {', '.join(p.name for p in plots.values())}"
            + (
                f" (also artifacts of MLflow run {collected.parent_run_id}, folder {ARTIFACT_DIR}/)"
                if collected.parent_run_id
                else ""
            )
        )
    width = None
    if fmt == "table" and output is None:
        from rich.console import Console

        console = Console()
        width = console.width if console.is_terminal else 220  # piped: never truncate numbers
    document = render(frame, fmt, collected.epochs, study_name, against_seed, plots, width=width)
    if fmt == "json" and registered is not None:
        document = json.dumps({"cells": json.loads(document), "registered": registered}, indent=2) + "\n"
    if output:
        write_atomic(output, document)
        _note(f"report written to {output}")
    else:
        sys.stdout.write(document)
        sys.stdout.flush()


def _compare_pair(text: str, frame: pd.DataFrame) -> tuple[str, str]:
    names = [part.strip() for part in text.split(",")]
    known = sorted(set(frame["variant"].dropna()))
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        raise SweeperError(f"--compare takes two different variants as A,B (e.g. standard,short4), got {text!r}")
    for name in names:
        if name not in known:
            raise SweeperError(f"--compare: variant {name!r} is not in this study; its variants: {', '.join(known)}")
    return names[0], names[1]


def lineage_warnings(frame: pd.DataFrame) -> list[str]:
    """One warning per table whose rows came from different code or different data."""
    out = []
    for dataset, rows in frame[frame["state"] == DONE].groupby("dataset", sort=False):
        for column, what in (("code_digest", "sweeper code"), ("dataset_digest", "dataset arrays")):
            values = sorted(set(rows[column].dropna()))
            if len(values) > 1:
                out.append(
                    f"the {dataset} rows were trained with {len(values)} different {what} ({column}: "
                    f"{', '.join(values)}); compare them with care, or relaunch the study under a new name"
                )
    return out


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a report is an ordinary file
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
