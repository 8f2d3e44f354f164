"""The `sweeper` command line. Heavy imports live inside the commands so --help is instant.

Each option shared by several commands is defined once here, with its environment variable.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from sweeper import settings
from sweeper.contract import (
    DATASETS,
    DEFAULT_GRACE_PERIOD,
    DEFAULT_HEARTBEAT_INTERVAL,
    OPTIMIZERS,
    PRECISIONS,
    VARIANTS,
    Recipe,
)

FORMAT_CHOICES = ("table", "json")
SEARCH_LIMIT = 10_000  # trials per cell that `launch` enqueues without --yes
HOME_SIZE_SHOWN_ABOVE = 1_000_000_000  # bytes: `status` says how much SWEEPER_HOME holds past this


# --- options defined once ------------------------------------------------------------------


def format_option(*choices: str, default: str = "table"):
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(choices or FORMAT_CHOICES),
        default=default,
        show_default=True,
        help="Output format. json prints one document on stdout; logs and progress go to stderr.",
    )


study_option = click.option(
    "--study",
    "study",
    required=True,
    metavar="NAME|PATH.toml",
    envvar="SWEEPER_STUDY",
    help="Study spec: a name from experiments/ (see `sweeper studies`) or a path to a .toml file.",
)
storage_option = click.option(
    "--storage",
    envvar=settings.ENV_STORAGE,
    metavar="URL",
    help=f"Optuna storage URL (postgresql://... for several machines). [env: {settings.ENV_STORAGE}; "
    "default: SQLite under $SWEEPER_HOME]",
)
tracking_option = click.option(
    "--tracking-uri",
    envvar=settings.ENV_TRACKING_URI,
    metavar="URI",
    help=f"MLflow tracking URI (http://host:5000 for a server). [env: {settings.ENV_TRACKING_URI}; "
    "default: SQLite under $SWEEPER_HOME]",
)
device_option = click.option(
    "--device",
    default="auto",
    envvar=settings.ENV_DEVICE,
    show_default=True,
    help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.",
)
precision_option = click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="auto: bf16 autocast + channels_last where bf16 is fast (CUDA, CPUs with AMX/AVX512-BF16).",
)


def check_notify_url(ctx, param, value):
    from sweeper import notify

    try:
        return notify.check_url(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


notify_option = click.option(
    "--notify",
    "notify_url",
    envvar=settings.ENV_NOTIFY_URL,
    callback=check_notify_url,
    metavar="URL",
    help="POST a JSON document here when the study completes and when a cell fails for good. "
    f"[env: {settings.ENV_NOTIFY_URL}]",
)
data_dir_option = click.option(
    "--data-dir",
    envvar=settings.ENV_DATA_DIR,
    type=click.Path(file_okay=False),
    metavar="DIR",
    help=f"Where datasets live. [env: {settings.ENV_DATA_DIR}; default: $SWEEPER_HOME/data]",
)


def _verbosity(ctx, param, value):
    if ctx.resilient_parsing:
        return
    if value:
        if ctx.meta.get("sweeper.verbosity"):
            raise click.BadParameter("--verbose and --quiet do not go together")
        ctx.meta["sweeper.verbosity"] = 1 if param.name == "verbose" else -1
    from sweeper import logs

    logs.configure(ctx.meta.get("sweeper.verbosity"))


def verbosity_options(f):
    """--verbose / --quiet on a command that logs (see sweeper.logs)."""
    f = click.option(
        "--quiet",
        "-q",
        "quiet",
        is_flag=True,
        expose_value=False,
        callback=_verbosity,
        help="Only warnings and errors on stderr.",
    )(f)
    return click.option(
        "--verbose",
        "-v",
        "verbose",
        is_flag=True,
        expose_value=False,
        callback=_verbosity,
        help="Debug lines, and the libraries' own warnings, on stderr.",
    )(f)


def check_variant(ctx, param, value):
    if value is not None and value not in VARIANTS:
        raise click.BadParameter(f"unknown variant {value!r}; choose one of: {', '.join(VARIANTS)}")
    return value


def check_dataset(ctx, param, value):
    names = value if isinstance(value, tuple) else (value,)
    for name in names:
        if name is not None and name not in DATASETS:
            raise click.BadParameter(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return value


def check_model_name(ctx, param, value):
    if value is not None and (not value.strip() or "/" in value or ":" in value or value.strip() in (".", "..")):
        raise click.BadParameter(f"{value!r} is not a registered model name (not empty, no '/' or ':')")
    return value


# --- output --------------------------------------------------------------------------------


def check_compare(ctx, param, value):
    """`ui --compare`: two or more different names, A,B."""
    if value is None:
        return None
    names = [part.strip() for part in value.split(",")]
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise click.BadParameter(
            f"takes two or more different variants or cells as A,B (e.g. standard,short4 or "
            f"short4/digits/s1,short3/digits/s1), got {value!r}"
        )
    return ",".join(names)


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def print_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, default=str))


def print_table(title: str | None, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not console.is_terminal:  # piped: never truncate numbers to fit 80 columns
        console.width = 220
    columns = columns or (list(rows[0]) if rows else [])
    table = Table(title=Text(title) if title else None, title_justify="left")
    for col in columns:
        table.add_column(col, justify="right" if rows and isinstance(rows[0].get(col), (int, float)) else "left")
    for row in rows:  # Text: user text ("[/x]" in a description) is shown as written, never as markup
        table.add_row(*(Text(_cell(row.get(col), col)) for col in columns))
    console.print(table)


def _cell(value: Any, column: str = "") -> str:
    if isinstance(value, float):
        return f"{value:.{decimals(column)}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def print_version(ctx, value) -> None:
    if value and not ctx.resilient_parsing:
        from sweeper.doctor import version_line

        click.echo(version_line())
        ctx.exit()


def decimals(column: str) -> int:
    """Places a float column is shown with: seconds to 0.1, errors and losses to 4, else 2.

    >>> decimals("elapsed_s"), decimals("top1_error"), decimals("images_per_s")
    (1, 4, 1)
    """
    if column.endswith(("_s", "seconds")):
        return 1
    if column.endswith(("error", "loss", "value")) or column in ("lr", "lr_gamma"):
        return 4
    return 2


# --- commands ------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, param, value: print_version(ctx, value),
    help="Show sweeper's version and those of Python, torch, MLflow and Optuna, then exit.",
)
def cli():
    """Sweep GoogLeNet variants across datasets, tracked in MLflow.

    \b
    Quick start (offline, 2 to 8 minutes on a CPU: `sweeper doctor` names its class):
      sweeper launch --study quickstart --workers 2
      sweeper report --study quickstart
      sweeper ui --study quickstart
    """


@cli.command()
@click.option("--dataset", callback=check_dataset, help="Only this dataset (default: all).")
@click.option(
    "--study",
    metavar="NAME|PATH.toml",
    help="Also the variants this study spec declares in [variants.NAME]; only its grid's datasets.",
)
@format_option()
def models(dataset, study, fmt):
    """Parameters, MACs per image and Inception modules of every variant."""
    import torch

    from sweeper.models import build_model, count_macs, count_params
    from sweeper.spec import variant_cfgs

    spec = load_spec(study) if study else None
    table = variant_cfgs(spec) if spec else VARIANTS
    datasets = [dataset] if dataset else (spec.grid["dataset"] if spec else list(DATASETS))
    rows = []
    for name in datasets:
        info = DATASETS[name]
        for variant, cfg in table.items():
            with torch.device("meta"):  # shapes only: counting needs no real weights
                model = build_model(variant, info.num_classes, info.shape[0], table)
            rows.append(
                {
                    "variant": variant,
                    "dataset": name,
                    "num_classes": info.num_classes,
                    "params": count_params(model),
                    "macs": count_macs(model, info.shape),
                    "inception_modules": cfg.inception_modules,
                    **({"declared_in": "spec" if variant in spec.variants else "built-in"} if spec else {}),
                }
            )
    if fmt == "json":
        print_json(rows)
    else:
        print_table("GoogLeNet variants (MACs: one forward pass of one image)", rows)


@cli.command()
@click.option("--variant", required=True, callback=check_variant, help="Model variant (see `sweeper models`).")
@click.option("--dataset", required=True, callback=check_dataset, help="cifar10, cifar100, digits or synthetic.")
@click.option("--epochs", type=click.IntRange(1), help=f"Epochs. [default: {Recipe.epochs}]")
@click.option("--batch-size", type=click.IntRange(1), help=f"Training batch size. [default: {Recipe.batch_size}]")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), help=f"[default: {Recipe.optimizer}]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help=f"Learning rate. [default: {Recipe.lr}]")
@click.option(
    "--lr-gamma",
    type=click.FloatRange(min=0, min_open=True),
    help=f"StepLR decay per epoch. [default: {Recipe.lr_gamma}]",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--limit-train", type=click.IntRange(1), help="Train on the first N images only.")
@click.option("--limit-test", type=click.IntRange(1), help="Evaluate on the first N images only.")
@device_option
@precision_option
@click.option("--compile/--no-compile", "use_compile", default=False, help="torch.compile the model.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Save the full state here after every epoch.")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), help="Continue from this checkpoint.")
@data_dir_option
@format_option()
@verbosity_options
def train(
    variant,
    dataset,
    epochs,
    batch_size,
    optimizer,
    lr,
    lr_gamma,
    seed,
    limit_train,
    limit_test,
    device,
    precision,
    use_compile,
    checkpoint,
    resume,
    data_dir,
    fmt,
):
    """Train one variant on one dataset with the seed's recipe and print its errors."""
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sweeper import checkpoint as ckpt
    from sweeper import data as datasets
    from sweeper.models import build_model, count_macs, count_params
    from sweeper.train import Recipe, fit, seed_everything

    overrides = dict(
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        lr_gamma=lr_gamma,
        limit_train=limit_train,
        limit_test=limit_test,
    )
    recipe = Recipe.from_dict({"seed": seed, **{k: v for k, v in overrides.items() if v is not None}})
    splits = datasets.load(dataset, Path(data_dir) if data_dir else None).limit(limit_train, limit_test)
    seed_everything(seed)
    model = build_model(variant, splits.num_classes, splits.in_channels)
    params, macs = count_params(model), count_macs(model, splits.info.shape)
    meta = {"variant": variant, "dataset": dataset}
    state = ckpt.load(resume, expect=meta) if resume else None
    console = stderr_console()
    console.print(
        f"[bold]{variant}[/] on [bold]{dataset}[/]: {params:,} parameters, {macs:,} MACs per image, "
        f"{len(splits.train_y):,} train / {len(splits.test_y):,} test images"
    )

    with Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("train", total=None, epoch=1)

        def on_step(step, total):
            progress.update(task, completed=step, total=total)

        def on_epoch(m, get_state):
            console.print(
                f"epoch {m.epoch:>3}/{recipe.epochs}  train_loss {m.train_loss:.4f}  "
                f"test_loss {m.test_loss:.4f}  top1_error {m.top1_error:.4f}  "
                f"top5_error {m.top5_error:.4f}  lr {m.lr:.4g}  {m.images_per_s:,.0f} img/s  "
                f"{m.epoch_seconds:.1f}s"
            )
            if checkpoint:
                ckpt.save(checkpoint, {**get_state(), **meta})
            progress.update(task, completed=0, epoch=m.epoch + 1)

        result = fit(
            model,
            splits,
            recipe,
            device=device,
            precision=precision,
            compile=use_compile,
            resume=state,
            on_epoch=on_epoch,
            on_step=on_step,
        )

    final = result.final
    summary = {
        "variant": variant,
        "dataset": dataset,
        "device": result.device,
        "precision": result.precision,
        "top1_error": final.top1_error,
        "top5_error": final.top5_error,
        "test_loss": final.test_loss,
        "params": params,
        "macs": macs,
        "train_seconds": result.train_seconds,
        "recipe": recipe.to_dict(),
        "history": [vars(m) for m in result.history],
    }
    if fmt == "json":
        print_json(summary)
    else:
        click.echo(
            f"{variant} on {dataset}: top-1 error {final.top1_error:.4f}, top-5 error "
            f"{final.top5_error:.4f}, {params:,} parameters, {result.train_seconds:.1f}s "
            f"({result.device}, {result.precision})"
        )


@cli.group()
def data():
    """List, fetch and import datasets."""


@data.command("list")
@data_dir_option
@format_option()
def data_list(data_dir, fmt):
    """Each dataset, where it lives, whether it is present and its size on disk."""
    from pathlib import Path

    from sweeper.data import cifar

    root = Path(data_dir) if data_dir else settings.data_dir()
    rows = []
    for name, info in DATASETS.items():
        if name in cifar.INFOS:
            row = cifar.status(name, root)
        else:
            row = {"name": name, "path": "(built in)", "present": True, "size_bytes": 0}
        rows.append(
            {
                **row,
                "classes": info.num_classes,
                "shape": "x".join(map(str, info.shape)),
                "description": info.description,
            }
        )
    if fmt == "json":
        print_json(rows)
    else:
        print_table(f"Datasets in {root}", rows, ["name", "present", "size_bytes", "classes", "shape", "path"])


@data.command("fetch")
@click.argument("names", nargs=-1, required=True, callback=check_dataset)
@click.option("--force", is_flag=True, help="Download again even when the dataset is already present.")
@data_dir_option
@format_option()
def data_fetch(names, force, data_dir, fmt):
    """Download CIFAR archives, verify their checksums and extract them (once)."""
    from pathlib import Path

    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    from sweeper.data import cifar, load

    root = Path(data_dir) if data_dir else settings.data_dir()
    rows = []
    for name in names:
        if name not in cifar.INFOS:
            rows.append({"name": name, "state": "built in", "path": None})
            stderr_console().print(f"{name}: built in, nothing to fetch")
            continue
        if cifar.status(name, root)["present"] and not force:
            load(name, root)  # verifies the files on disk and builds the cache if it is missing
            stderr_console().print(f"{name}: already present in {root} (--force downloads again)")
            rows.append({"name": name, "state": "present", "path": cifar.status(name, root)["path"]})
            continue
        with Progress(
            *Progress.get_default_columns(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=stderr_console(),
            transient=True,
        ) as progress:
            task = progress.add_task(f"{name}", total=None)
            cifar.fetch(name, root, progress=lambda done, total: progress.update(task, completed=done, total=total))
        load(name, root)  # builds the uint8 cache so the first trial starts at once
        stderr_console().print(f"{name}: ready in {root}")
        rows.append({"name": name, "state": "fetched", "path": cifar.status(name, root)["path"]})
    if fmt == "json":
        print_json(rows)


@data.command("import")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@data_dir_option
@format_option()
def data_import(archive, data_dir, fmt):
    """Take a CIFAR archive already on disk (for machines without internet)."""
    from pathlib import Path

    from sweeper.data import cifar, load

    root = Path(data_dir) if data_dir else settings.data_dir()
    name = cifar.import_archive(Path(archive), root)
    load(name, root)
    stderr_console().print(f"{name}: imported into {root}")
    if fmt == "json":
        print_json({"name": name, "state": "imported", "path": cifar.status(name, root)["path"]})


# --- sweeps --------------------------------------------------------------------------------

heartbeat_option = click.option(
    "--heartbeat-interval",
    type=click.IntRange(1),
    envvar=settings.ENV_HEARTBEAT_INTERVAL,
    default=DEFAULT_HEARTBEAT_INTERVAL,
    show_default=True,
    help=f"Seconds between a running trial's heartbeats. [env: {settings.ENV_HEARTBEAT_INTERVAL}]",
)
workers_per_gpu_option = click.option(
    "--workers-per-gpu",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    envvar=settings.ENV_WORKERS_PER_GPU,
    help=f"Workers that may share one GPU (small trials leave a large GPU idle). [env: {settings.ENV_WORKERS_PER_GPU}]",
)
grace_option = click.option(
    "--grace-period",
    type=click.IntRange(1),
    envvar=settings.ENV_GRACE_PERIOD,
    default=DEFAULT_GRACE_PERIOD,
    show_default=True,
    help=f"Seconds without a heartbeat before a trial's worker counts as dead and the trial is retried. "
    f"[env: {settings.ENV_GRACE_PERIOD}]",
)


def check_grace(heartbeat_interval: int, grace_period: int) -> None:
    """A grace period close to the heartbeat interval makes healthy workers take each other's trials."""
    if grace_period < 2 * heartbeat_interval:
        raise click.UsageError(
            f"--grace-period {grace_period} must be at least twice --heartbeat-interval ({heartbeat_interval}): "
            f"a live trial whose heartbeat is merely late would be taken over by another worker and trained twice. "
            f"Use --grace-period {max(2 * heartbeat_interval, 60)} or more "
            f"(env {settings.ENV_GRACE_PERIOD} / {settings.ENV_HEARTBEAT_INTERVAL})."
        )


def study_layer():
    """sweeper.study, with Optuna set up for the whole process as every command wants it: its log
    at WARNING (not a line per trial), and quiet about the experimental heartbeat API that sweeper
    relies on knowingly. Library modules leave such process-wide settings to the commands."""
    import warnings

    import optuna

    from sweeper import study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return study


def load_spec(study: str):
    from sweeper.spec import SpecError, load

    try:
        return load(study)
    except SpecError as e:
        raise click.UsageError(str(e)) from None


def study_name(study: str) -> str:
    """A stored study's name: the spec file's stem, or the name itself when no spec is at hand."""
    from pathlib import Path

    return Path(study).stem if study.endswith(".toml") else study


@cli.command()
@format_option()
def studies(fmt):
    """The study specs in experiments/ with their description and cell count."""
    from sweeper import spec

    rows = []
    for path in spec.available():
        s = load_spec(str(path))
        rows.append(
            {
                "study": s.name,
                "cells": len(s.cells),
                "trials": len(s.trial_keys()),
                "description": s.description,
                "path": str(path),
            }
        )
    if fmt == "json":
        print_json(rows)
    else:
        print_table("Study specs", rows, ["study", "cells", "trials", "description"])


@cli.command()
@study_option
@storage_option
@tracking_option
@click.option(
    "--workers",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Start N local worker processes and watch them; 0 only enqueues.",
)
@device_option
@precision_option
@click.option(
    "--force-update",
    is_flag=True,
    help="Accept a changed spec: enqueue its new cells, and every cell anew when the recipe changed.",
)
@workers_per_gpu_option
@heartbeat_option
@grace_option
@data_dir_option
@click.option(
    "--yes",
    is_flag=True,
    envvar="SWEEPER_YES",
    help=f"Enqueue a search of more than {SEARCH_LIMIT:,} trials per cell without refusing.",
)
@notify_option
@click.option(
    "--dry-run",
    is_flag=True,
    help="Enqueue nothing: list the trials that would be enqueued (and those present) with a time "
    "estimate per trial on --device, and the summed and wall time for --workers N (default 1).",
)
@format_option()
@verbosity_options
def launch(
    study,
    storage,
    tracking_uri,
    workers,
    device,
    precision,
    force_update,
    workers_per_gpu,
    heartbeat_interval,
    grace_period,
    data_dir,
    yes,
    notify_url,
    dry_run,
    fmt,
):
    """Enqueue every grid cell of a study once, and optionally run it with local workers."""
    check_grace(heartbeat_interval, grace_period)
    spec = load_spec(study)  # a bad spec is refused before the heavy imports below
    if spec.trials_per_cell > SEARCH_LIMIT and not yes:
        raise click.UsageError(
            f"{spec.path}: search.trials_per_cell: {spec.trials_per_cell:,} is over {SEARCH_LIMIT:,} trials per cell "
            f"({len(spec.cells) * spec.trials_per_cell:,} trials in all); lower it, or pass --yes to enqueue them anyway"
        )

    study_layer()
    if dry_run:
        from sweeper import api

        print_plan(api.plan(spec, storage, tracking_uri, device=device, workers=max(1, workers)), fmt)
        return

    from sweeper import launcher

    launcher.launch(
        spec,
        storage,
        tracking_uri,
        workers=workers,
        device=device,
        precision=precision,
        force_update=force_update,
        workers_per_gpu=workers_per_gpu,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        data_dir=data_dir,
        fmt=fmt,
        notify_url=notify_url,
    )


@cli.command()
@click.option(
    "--study",
    "studies_",
    multiple=True,
    metavar="NAME",
    envvar="SWEEPER_STUDY",
    help="Serve only this study (repeatable). Default: every study in the storage.",
)
@storage_option
@tracking_option
@device_option
@precision_option
@click.option(
    "--compile",
    "compile_",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    envvar=settings.ENV_COMPILE,
    help=f"torch.compile the model (CUDA graphs on a GPU). auto: on CUDA, off elsewhere. [env: {settings.ENV_COMPILE}]",
)
@click.option("--max-trials", type=click.IntRange(1), help="Exit after running K trials.")
@click.option("--forever", is_flag=True, help="Keep polling for new trials instead of exiting when none wait.")
@click.option(
    "--poll-interval",
    type=click.FloatRange(0.1),
    default=5.0,
    show_default=True,
    help="Seconds between looks at an empty queue with --forever.",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    envvar="SWEEPER_THREADS",
    help="CPU threads per trial. Default: $OMP_NUM_THREADS if set, else the host's cores split "
    "between the trials running on it, re-counted as trials start and finish.",
)
@click.option(
    "--tracking-outage-limit",
    type=click.FloatRange(1),
    default=300.0,
    show_default=True,
    envvar="SWEEPER_TRACKING_OUTAGE_LIMIT",
    help="Seconds MLflow may be unreachable before the trial fails (it is retried later).",
)
@click.option(
    "--system-metrics/--no-system-metrics",
    default=True,
    show_default=True,
    help="Log CPU, memory and GPU use through MLflow's system metrics.",
)
@workers_per_gpu_option
@click.option(
    "--gpus",
    envvar="SWEEPER_GPUS",
    metavar="0,1,...",
    help="GPU indices this host's workers share. [env: SWEEPER_GPUS; default: all visible]",
)
@heartbeat_option
@grace_option
@data_dir_option
@notify_option
@verbosity_options
def worker(
    studies_,
    storage,
    tracking_uri,
    device,
    precision,
    compile_,
    max_trials,
    forever,
    poll_interval,
    threads,
    tracking_outage_limit,
    system_metrics,
    workers_per_gpu,
    gpus,
    heartbeat_interval,
    grace_period,
    data_dir,
    notify_url,
):
    """Claim waiting trials, train them and log to MLflow until the queue is empty."""
    import gc
    import logging

    check_grace(heartbeat_interval, grace_period)
    from pathlib import Path

    from sweeper import device as devices
    from sweeper import tracking
    from sweeper.worker import StopSignal, WorkerConfig, run

    gpu_list: list[str] = []
    if device in ("auto", "cuda"):
        from sweeper import slots
        from sweeper.study import resolve_storage_url

        gpu_list = gpus.split(",") if gpus else slots.visible_gpus()
        if gpu_list:  # take a free host:gpu slot so replicas spread over the GPUs
            slot = slots.claim(gpu_list, workers_per_gpu, resolve_storage_url(storage))
            device = slot.device
            logging.getLogger("sweeper.worker").info("GPU slot %s:%s:%d -> %s", slot.host, slot.gpu, slot.index, device)
    try:  # before the stores are touched and anything is claimed
        engine = devices.prepare(
            device,
            precision,
            compile_,
            expect_gpu=settings.expect_gpu(),
            processes_per_host=workers_per_gpu * max(1, len(gpu_list)),
        )
    except devices.BadDevice as e:
        raise click.UsageError(str(e)) from None

    st = study_layer()
    stop = StopSignal()
    stop.install()
    from sweeper.report.publish import Refresher

    storage_url, uri = st.resolve_storage_url(storage), tracking.resolve_tracking_uri(tracking_uri)
    reports = Refresher(storage_url, uri)  # the study's report page in MLflow, after each cell
    config = WorkerConfig(
        storage_url=storage_url,
        tracking_uri=uri,
        study_names=tuple(study_name(s) for s in studies_),
        device=str(engine.device),
        precision=engine.precision,
        compile="on" if engine.compile else "off",
        engine=engine,
        data_dir=Path(data_dir) if data_dir else None,
        max_trials=max_trials,
        forever=forever,
        poll_interval=poll_interval,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        tracking_outage_limit=tracking_outage_limit,
        system_metrics=system_metrics,
        # OMP_NUM_THREADS set by the user fixes the count too (as it does for torch itself).
        threads=threads or settings.env_int("OMP_NUM_THREADS", 0) or None,
        notify_url=notify_url,
        on_cell_complete=reports.request,
    )
    # What is imported by now lives as long as the worker: keep it out of every later collection
    # (the worker's per-trial gc.collect() then costs a fraction: ~45% of a trial's orchestration
    # time before this, in benchmarks/sweep_scale.py --part c).
    gc.collect()
    gc.freeze()
    try:
        run(config, stop)
    finally:
        reports.close(10.0 if stop.is_set() else 120.0)  # told to stop: a refresh in flight gets seconds


@cli.command()
@study_option
@storage_option
@tracking_option
@format_option()
def status(study, storage, tracking_uri, fmt):
    """The study's state, trial counts, failures by cause and one row per trial."""
    from sweeper import api

    study_layer()

    document = api.status(study_name(study), storage, tracking_uri)
    if fmt == "json":
        print_json(document)
        return
    from sweeper.doctor import human_bytes

    counts = ", ".join(f"{k} {v}" for k, v in document["counts"].items())
    state = document["state"] + (f" ({document['state_reason']})" if document["state_reason"] else "")
    click.echo(
        f"study {document['study']}: {state}\ntrials: {counts}\n"
        f"storage {document['storage']}\ntracking {document['tracking_uri']}"
    )
    if document["state"] not in ("finished", "failed"):
        eta = document["eta_s"]
        click.echo(
            f"eta {duration(eta)} ({document['eta_source']})"
            if eta is not None
            else f"eta: none ({document['eta_source'] or 'no finished run to estimate from'})"
        )
    if (document["home_bytes"] or 0) > HOME_SIZE_SHOWN_ABOVE:
        click.echo(
            f"SWEEPER_HOME {settings.home()} holds {human_bytes(document['home_bytes'])} "
            "(docs/RELIABILITY.md: what is kept, and what can be deleted)"
        )
    for group in document["failures"]:
        click.echo(
            f"failed: {group['cause']}: {group['trials']} trial(s), {group['cells_failed_for_good']} cell(s) for good"
            + (f"; fix: {group['fix']}" if group["fix"] else "")
        )
    rows = [
        {
            **r,
            "epoch": f"{r['epoch'] or 0}/{r['epochs'] or '?'}",
            "retry_of": "" if r["retry_of"] is None else f"#{r['retry_of']}",
        }
        for r in document["trials"]
    ]
    print_table(
        None, rows, ["number", "cell", "state", "epoch", "top1_error", "host", "elapsed_s", "retry_of", "fail_reason"]
    )


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def print_plan(plan: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        print_json(plan)
        return
    rows = [
        {
            "trial": t["trial"],
            "action": "present" if t["present"] else "enqueue",
            "state": t["state"] or "",
            "estimate": duration(t["estimate_s"]),
            "source": t["estimate_source"] or "",
        }
        for t in plan["trials"]
    ]
    print_table(f"dry run of {plan['study']}: nothing is enqueued", rows)
    click.echo(
        f"{plan['to_enqueue']} trial(s) would be enqueued, {plan['already_enqueued']} already present; "
        f"the unfinished ones on {plan['device']} with {plan['workers']} worker(s): "
        f"{duration(plan['estimate_wall_s'])} wall, {duration(plan['estimate_summed_s'])} summed over the trials "
        f"(one worker with the whole device: {duration(plan['estimate_total_s'])})"
    )
    if plan["spec_changed"]:
        click.echo("the stored spec differs: launch refuses it without --force-update", err=True)


def lifecycle_command(action: str, summary: str):
    @cli.command(action, help=summary)
    @study_option
    @storage_option
    @format_option()
    def command(study, storage, fmt):
        from sweeper import api

        study_layer()

        document = api.set_state(study_name(study), action, storage)
        if fmt == "json":
            print_json(document)
        elif not document["changed"]:
            click.echo(f"study {document['study']}: `sweeper {action}` changes {document['effect']}")
        else:
            click.echo(
                f"study {document['study']}: {document['previous']} -> {document['state']}; {document['effect']}"
            )

    return command


lifecycle_command("stop", "Stop a study: running trials finish, no new trial is claimed by any worker.")
lifecycle_command("pause", "Pause a study: like stop, and `sweeper resume` lets workers claim again.")
lifecycle_command("resume", "Let workers claim a stopped, paused or cancelled study's trials again.")
lifecycle_command(
    "cancel", "Cancel a study: running trials checkpoint and are handed back after their epoch, until `resume`."
)


@cli.command()
@study_option
@storage_option
@tracking_option
@format_option()
def retry(study, storage, tracking_uri, fmt):
    """Re-enqueue failed cells on purpose (e.g. after fixing the cause of a NaN or out of memory)."""
    st = study_layer()

    loaded = st.open_study(study_name(study), storage)
    n = st.retry_failed(loaded)
    if n and st.mark_running(loaded):  # the study runs again: so does its MLflow run
        from sweeper import tracking
        from sweeper.errors import SweeperError

        try:
            client = tracking.client(tracking_uri, create=False)
        except SweeperError:  # no embedded store yet: no run to mark
            client = None
        if client is not None:
            tracking.set_study_run_status(client, loaded.study_name, "running")
    click.echo(f"{n} failed cell(s) of {loaded.study_name} re-enqueued" if n else "no failed cell to retry", err=True)
    if fmt == "json":
        print_json({"study": loaded.study_name, "retried": n})


@cli.command()
@study_option
@storage_option
@tracking_option
@format_option()
@verbosity_options
def verify(study, storage, tracking_uri, fmt):
    """Check that MLflow matches Optuna: one finished run per finished trial, each epoch logged once,
    params equal to the recipe, the model present, no run without a trial. Exits 1 on any drift."""
    from sweeper import verify as verifying

    result = verifying.verify(study_name(study), storage, tracking_uri)
    if fmt == "json":
        print_json(result)
    else:
        if result["ok"]:
            click.echo(
                f"study {result['study']}: OK ({result['trials_checked']} finished trial(s), "
                f"{result['runs_checked']} run(s) checked against {result['tracking_uri']})"
            )
        else:
            click.echo(f"study {result['study']}: {len(result['problems'])} problem(s)")
            for p in result["problems"]:
                where = ", ".join(f"{k} {p[k]}" for k in ("cell", "trial", "run_id") if p[k] is not None)
                click.echo(f"- {p['check']}: {p['message']} [{where}]")
                click.echo(f"  repair: {p['repair']}" if p["repair"] else "  repair: no command repairs this")
    if not result["ok"]:
        raise SystemExit(1)


@cli.command()
@storage_option
@tracking_option
@click.option(
    "--quiet", is_flag=True, help="Check the stores only and print nothing; the exit code tells (healthchecks)."
)
@format_option()
def doctor(storage, tracking_uri, quiet, fmt):
    """Versions, the device and its capabilities (CPU flags, CUDA GPUs), threads, free disk under
    SWEEPER_HOME, and whether the Optuna storage and the MLflow tracking store answer. Exits 1
    when a store does not."""
    st = study_layer()
    from sweeper import doctor as doctoring
    from sweeper import tracking
    from sweeper.errors import SweeperError, redact_url

    url, uri = st.resolve_storage_url(storage), tracking.resolve_tracking_uri(tracking_uri)
    checks = {}
    for name, probe in (
        ("storage", lambda: st.open_storage(url, create=False)),
        ("tracking", lambda: tracking.check_reachable(tracking.client(uri, create=False))),
    ):
        try:
            probe()
            checks[name] = "ok"
        except SweeperError as e:
            checks[name] = str(e)
    ok = all(v == "ok" for v in checks.values())
    if not quiet:
        document = {
            "ok": ok,
            "versions": doctoring.versions(),
            **doctoring.device_facts(),
            "disk": doctoring.disk(settings.home()),
            "storage": redact_url(url),
            "tracking_uri": redact_url(uri),
            "checks": checks,
        }
        print_json(document) if fmt == "json" else click.echo(doctoring.render(document))
    sys.exit(0 if ok else 1)


@cli.command()
@study_option
@storage_option
@tracking_option
@format_option("table", "markdown", "csv", "json", "html")
@click.option("--output", type=click.Path(dir_okay=False), help="Write the report to FILE instead of stdout.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False), help="Write PNG plots into DIR.")
@click.option("--against-seed", is_flag=True, help="Put the seed post's published numbers beside the measured ones.")
@click.option(
    "--recipe",
    default="current",
    show_default=True,
    help="Rows of which recipe: current (the last launched), all (each recipe its own rows), or a digest.",
)
@click.option(
    "--compare",
    "compare_variants",
    metavar="A,B",
    help="Print the seed-paired difference A - B of two variants on each dataset with a 95% CI.",
)
@click.option(
    "--register-best",
    "register_best",
    metavar="MODEL_NAME",
    callback=check_model_name,
    help="Register the model of the best finished cell (by the study's metric) as a new version of "
    "MODEL_NAME in the MLflow Model Registry; json and csv rows gain a 'registered' column (what was "
    "registered, on the best cell's row).",
)
@verbosity_options
def report(study, storage, tracking_uri, fmt, output, plots_dir, against_seed, recipe, compare_variants, register_best):
    """The seed post's tables (Top-1/Top-5 error, parameters, time) from what the study logged."""
    if register_best is not None and compare_variants is not None:
        raise click.UsageError("--register-best and --compare do not go together; run them one at a time")
    study_layer()
    from sweeper import report as reporting

    reporting.print_report(
        study_name(study),
        storage,
        tracking_uri,
        fmt=fmt,
        output=output,
        plots_dir=plots_dir,
        against_seed=against_seed,
        recipe=recipe,
        compare_variants=compare_variants,
        register_best_as=register_best,
    )


@cli.command()
@study_option
@storage_option
@tracking_option
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True, help="MLflow UI port.")
@click.option(
    "--dashboard-port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="optuna-dashboard port."
)
@click.option(
    "--compare",
    metavar="A,B",
    callback=check_compare,
    help="Also print a link to exactly these variants' or cells' runs side by side (variant, or variant/dataset/sSEED).",
)
def ui(study, storage, tracking_uri, port, dashboard_port, compare):
    """Serve the MLflow UI and optuna-dashboard for a study on 127.0.0.1 until Ctrl-C."""
    study_layer()
    from sweeper import ui as uis

    uis.serve(study_name(study), storage, tracking_uri, port=port, dashboard_port=dashboard_port, compare=compare)


# --- entry point ---------------------------------------------------------------------------


def main() -> None:
    """Run the CLI; known failures become one clear message and exit code 1, never a traceback."""
    from sweeper.errors import friendly_errors, install_redaction

    install_redaction()
    with friendly_errors():
        cli(standalone_mode=True)


if __name__ == "__main__":
    main()
