"""Building the report's tables from the frame: the seed post's table per dataset, the seed's
published numbers beside the measured ones, the seed-paired comparison of two variants, and the
warnings about rows that came from different code or data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from sweeper import seed_results
from sweeper.report.read import DEFAULT_EPOCHS, DONE, sort_frame

SEED_COLUMNS = ["seed_top1_error", "seed_top5_error", "seed_params", "seed_time", "seed_train_seconds"]


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
