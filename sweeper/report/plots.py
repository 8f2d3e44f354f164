"""The report's plots: top-1 error against parameters and against training time (one point per
variant and dataset, the seed post's points beside them with --against-seed), and the test
top-1 error per epoch. Figures are made without pyplot, so no matplotlib backend is chosen and
matplotlib's global state is left alone."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from sweeper import seed_results
from sweeper.report.read import DONE, VARIANT_ORDER, Collected, epoch_histories, sort_frame

PLOT_FILES = {
    "params": "top1_vs_params.png",
    "time": "top1_vs_time.png",
    "epochs": "top1_per_epoch.png",
}
PLOT_TITLES = {
    "params": "Top-1 error vs parameters",
    "time": "Top-1 error vs training time",
    "epochs": "Test top-1 error per epoch",
}
MARKERS = {"naive": "s", "standard": "o", "long": "D", "short": "^", "short2": "v", "short3": "<", "short4": ">"}


def write_plots(
    collected: Collected, plots_dir: str | Path, against_seed: bool = False, per_epoch: bool = True
) -> dict[str, Path]:
    """The three PNGs in ``plots_dir``: {"params": path, "time": path, "epochs": path}; without
    ``per_epoch``, the first two (they need no metric history: no request per run)."""
    from matplotlib import colormaps

    out_dir = Path(plots_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = sort_frame(collected.frame, collected.datasets)
    datasets = list(dict.fromkeys(frame["dataset"])) or ["(none)"]
    colors = {d: colormaps["tab10"](i % 10) for i, d in enumerate(datasets)}
    means = _means_over_seeds(frame)
    paths = {}
    for name, x_col, x_label, log_x in (
        ("params", "params", "parameters", True),
        ("time", "train_seconds", f"training time, {collected.epochs} epochs (s)", False),
    ):
        fig = _error_against(means, x_col, x_label, log_x, colors, against_seed)
        fig.axes[0].set_title(f"{PLOT_TITLES[name]} — study {collected.study}")
        fig.tight_layout()
        paths[name] = _save(fig, out_dir / PLOT_FILES[name])
    if not per_epoch:
        return paths
    fig = _error_per_epoch(frame, epoch_histories(collected.client, frame), datasets)
    fig.suptitle(f"{PLOT_TITLES['epochs']} (mean over seeds) — study {collected.study}")
    fig.tight_layout()
    paths["epochs"] = _save(fig, out_dir / PLOT_FILES["epochs"])
    return paths


def _means_over_seeds(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, variant): the mean top-1 error, parameters and training time of its
    finished seeds."""
    done = frame[frame["state"] == DONE]
    if done.empty:
        return pd.DataFrame(columns=["dataset", "variant", "top1_error", "params", "train_seconds", "n"])
    return (
        done.groupby(["dataset", "variant"], sort=False)
        .agg(
            top1_error=("top1_error", "mean"),
            params=("params", "mean"),
            train_seconds=("train_seconds", "mean"),
            n=("seed", "size"),
        )
        .reset_index()
    )


def _scatter(ax, x, y, variant: str | None, color, hollow: bool = False, zorder: int = 3, label: str | None = None):
    """Every marker of the plots: the variant's shape (a circle for none) in the dataset's colour;
    hollow for the seed post's numbers. A ``label`` with no points makes a legend entry, drawn at
    matplotlib's default size."""
    paint = {"facecolors": "none", "edgecolors": color} if hollow else {"color": color}
    size = None if label else 70
    ax.scatter(x, y, marker=MARKERS.get(variant, "o"), s=size, zorder=zorder, label=label, **paint)


def _error_against(means: pd.DataFrame, x_col: str, x_label: str, log_x: bool, colors: dict, against_seed: bool):
    """Top-1 error against ``x_col`` (params or train_seconds): a point per variant and dataset."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(8, 5.5), dpi=110)
    ax = fig.subplots()
    xs = []
    points = means.assign(_x=means[x_col].astype(float)).sort_values("_x") if not means.empty else means
    for i, (_, row) in enumerate(points.iterrows()):
        x, y = float(row[x_col]), float(row["top1_error"])
        if math.isnan(x) or math.isnan(y):
            continue
        xs.append(x)
        _scatter(ax, x, y, row["variant"], colors[row["dataset"]])
        # Neighbours along x get their labels above and below in turn, so close points stay legible.
        ax.annotate(
            row["variant"], (x, y), textcoords="offset points", xytext=(6, 6 if i % 2 == 0 else -13), fontsize=8
        )
    seeded = False
    if against_seed:
        for dataset in colors:
            for variant, r in seed_results.SEED_RESULTS.get(dataset, {}).items():
                x = r.params if x_col == "params" else r.seconds
                seeded = True
                _scatter(ax, x, r.top1_error, variant, colors[dataset], hollow=True, zorder=2)
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
    for dataset, color in colors.items():
        _scatter(ax, [], [], None, color, label=dataset)
    for variant in [v for v in VARIANT_ORDER if v in set(means["variant"])]:
        _scatter(ax, [], [], variant, "#555", label=variant)
    if seeded:
        _scatter(ax, [], [], None, "#555", hollow=True, label=f"seed post ({seed_results.SEED_EPOCHS} epochs)")
    if means.empty:
        ax.text(0.5, 0.5, "no finished cell yet", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel(x_label)
    ax.set_ylabel("top-1 error")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def _error_per_epoch(frame: pd.DataFrame, histories: dict[str, list[tuple[int, float]]], datasets: list[str]):
    """Test top-1 error per epoch, one panel per dataset, a line per variant (mean over its seeds)."""
    from matplotlib.figure import Figure

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
    return fig


def _si(x: float, _pos=None) -> str:
    """Tick labels like 1.5M, 650k."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{suffix}"
    return f"{x:.3g}"


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
