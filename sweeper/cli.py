"""The `sweeper` command line. Heavy imports live inside the commands so --help is instant.

Each option shared by several commands is defined once here, with its environment variable.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from sweeper import __version__, settings

FORMAT_CHOICES = ("table", "json")


# --- options defined once ------------------------------------------------------------------

def format_option(*choices: str, default: str = "table"):
    return click.option(
        "--format", "fmt", type=click.Choice(choices or FORMAT_CHOICES), default=default, show_default=True,
        help="Output format. json prints one document on stdout; logs and progress go to stderr.",
    )


study_option = click.option(
    "--study", "study", required=True, metavar="NAME|PATH.toml", envvar="SWEEPER_STUDY",
    help="Study spec: a name from experiments/ (see `sweeper studies`) or a path to a .toml file.",
)
storage_option = click.option(
    "--storage", envvar=settings.ENV_STORAGE, metavar="URL",
    help=f"Optuna storage URL (postgresql://... for several machines). [env: {settings.ENV_STORAGE}; "
    "default: SQLite under $SWEEPER_HOME]",
)
tracking_option = click.option(
    "--tracking-uri", envvar=settings.ENV_TRACKING_URI, metavar="URI",
    help=f"MLflow tracking URI (http://host:5000 for a server). [env: {settings.ENV_TRACKING_URI}; "
    "default: SQLite under $SWEEPER_HOME]",
)
device_option = click.option(
    "--device", default="auto", envvar=settings.ENV_DEVICE, show_default=True,
    help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.",
)
precision_option = click.option(
    "--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
    help="auto: bf16 autocast + channels_last where bf16 is fast (CUDA, CPUs with AMX/AVX512-BF16).",
)
data_dir_option = click.option(
    "--data-dir", envvar=settings.ENV_DATA_DIR, type=click.Path(file_okay=False), metavar="DIR",
    help=f"Where datasets live. [env: {settings.ENV_DATA_DIR}; default: $SWEEPER_HOME/data]",
)


def check_variant(ctx, param, value):
    from sweeper.models import VARIANTS

    if value is not None and value not in VARIANTS:
        raise click.BadParameter(f"unknown variant {value!r}; choose one of: {', '.join(VARIANTS)}")
    return value


def check_dataset(ctx, param, value):
    from sweeper.data import DATASETS

    names = value if isinstance(value, tuple) else (value,)
    for name in names:
        if name is not None and name not in DATASETS:
            raise click.BadParameter(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return value


# --- output --------------------------------------------------------------------------------

def stderr_console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def print_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, default=str))


def print_table(title: str | None, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped: never truncate numbers to fit 80 columns
        console.width = 220
    columns = columns or (list(rows[0]) if rows else [])
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="right" if rows and isinstance(rows[0].get(col), (int, float)) else "left")
    for row in rows:
        table.add_row(*(_cell(row.get(col)) for col in columns))
    console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


# --- commands ------------------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sweeper")
def cli():
    """Sweep GoogLeNet variants across datasets, tracked in MLflow.

    \b
    Quick start (offline, a few minutes on a laptop):
      sweeper launch --study quickstart --workers 2
      sweeper report --study quickstart
      sweeper ui --study quickstart
    """


@cli.command()
@click.option("--dataset", callback=check_dataset, help="Only this dataset (default: all).")
@format_option()
def models(dataset, fmt):
    """Parameters, MACs per image and Inception modules of every variant."""
    from sweeper.data import DATASETS
    from sweeper.models import VARIANTS, build_model, count_macs, count_params

    rows = []
    for name in ([dataset] if dataset else list(DATASETS)):
        info = DATASETS[name]
        for variant, cfg in VARIANTS.items():
            model = build_model(variant, info.num_classes, info.shape[0])
            rows.append({
                "variant": variant, "dataset": name, "num_classes": info.num_classes,
                "params": count_params(model), "macs": count_macs(model, info.shape),
                "inception_modules": cfg.inception_modules,
            })
    if fmt == "json":
        print_json(rows)
    else:
        print_table("GoogLeNet variants (MACs: one forward pass of one image)", rows)


@cli.command()
@click.option("--variant", required=True, callback=check_variant, help="Model variant (see `sweeper models`).")
@click.option("--dataset", required=True, callback=check_dataset, help="cifar10, cifar100, digits or synthetic.")
@click.option("--epochs", type=click.IntRange(1), help="Epochs. [default: 14]")
@click.option("--batch-size", type=click.IntRange(1), help="Training batch size. [default: 64]")
@click.option("--optimizer", type=click.Choice(["adadelta", "sgd", "adamw"]), help="[default: adadelta]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate. [default: 1.0]")
@click.option("--lr-gamma", type=click.FloatRange(min=0, min_open=True), help="StepLR decay per epoch. [default: 0.7]")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--limit-train", type=click.IntRange(1), help="Train on the first N images only.")
@click.option("--limit-test", type=click.IntRange(1), help="Evaluate on the first N images only.")
@device_option
@precision_option
@click.option("--compile/--no-compile", "use_compile", default=False, help="torch.compile the model.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Save the full state here after every epoch.")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), help="Continue from this checkpoint.")
@data_dir_option
@format_option("text", "json", default="text")
def train(variant, dataset, epochs, batch_size, optimizer, lr, lr_gamma, seed, limit_train, limit_test,
          device, precision, use_compile, checkpoint, resume, data_dir, fmt):
    """Train one variant on one dataset with the seed's recipe and print its errors."""
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sweeper import checkpoint as ckpt
    from sweeper import data as datasets
    from sweeper.models import build_model, count_macs, count_params
    from sweeper.train import Recipe, fit, seed_everything

    overrides = dict(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, lr_gamma=lr_gamma,
                     limit_train=limit_train, limit_test=limit_test)
    recipe = Recipe.from_dict({"seed": seed, **{k: v for k, v in overrides.items() if v is not None}})
    splits = datasets.load(dataset, Path(data_dir) if data_dir else None).limit(limit_train, limit_test)
    seed_everything(seed)
    model = build_model(variant, splits.num_classes, splits.in_channels)
    params, macs = count_params(model), count_macs(model, splits.info.shape)
    meta = {"variant": variant, "dataset": dataset}
    state = ckpt.load(resume, expect=meta) if resume else None
    console = stderr_console()
    console.print(f"[bold]{variant}[/] on [bold]{dataset}[/]: {params:,} parameters, {macs:,} MACs per image, "
                  f"{len(splits.train_y):,} train / {len(splits.test_y):,} test images")

    with Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("train", total=None, epoch=1)

        def on_step(step, total):
            progress.update(task, completed=step, total=total)

        def on_epoch(m, get_state):
            console.print(f"epoch {m.epoch:>3}/{recipe.epochs}  train_loss {m.train_loss:.4f}  "
                          f"test_loss {m.test_loss:.4f}  top1_error {m.top1_error:.4f}  "
                          f"top5_error {m.top5_error:.4f}  lr {m.lr:.4g}  {m.images_per_s:,.0f} img/s  "
                          f"{m.epoch_seconds:.1f}s")
            if checkpoint:
                ckpt.save(checkpoint, {**get_state(), **meta})
            progress.update(task, completed=0, epoch=m.epoch + 1)

        result = fit(model, splits, recipe, device=device, precision=precision, compile=use_compile,
                     resume=state, on_epoch=on_epoch, on_step=on_step)

    final = result.final
    summary = {
        "variant": variant, "dataset": dataset, "device": result.device, "precision": result.precision,
        "top1_error": final.top1_error, "top5_error": final.top5_error, "test_loss": final.test_loss,
        "params": params, "macs": macs, "train_seconds": result.train_seconds,
        "recipe": recipe.to_dict(), "history": [vars(m) for m in result.history],
    }
    if fmt == "json":
        print_json(summary)
    else:
        click.echo(f"{variant} on {dataset}: top-1 error {final.top1_error:.4f}, top-5 error "
                   f"{final.top5_error:.4f}, {params:,} parameters, {result.train_seconds:.1f}s "
                   f"({result.device}, {result.precision})")


@cli.group()
def data():
    """List, fetch and import datasets."""


@data.command("list")
@data_dir_option
@format_option()
def data_list(data_dir, fmt):
    """Each dataset, where it lives, whether it is present and its size on disk."""
    from pathlib import Path

    from sweeper.data import DATASETS, cifar

    root = Path(data_dir) if data_dir else settings.data_dir()
    rows = []
    for name, info in DATASETS.items():
        if name in cifar.INFOS:
            row = cifar.status(name, root)
        else:
            row = {"name": name, "path": "(built in)", "present": True, "size_bytes": 0}
        rows.append({**row, "classes": info.num_classes, "shape": "x".join(map(str, info.shape)),
                     "description": info.description})
    if fmt == "json":
        print_json(rows)
    else:
        print_table(f"Datasets in {root}", rows, ["name", "present", "size_bytes", "classes", "shape", "path"])


@data.command("fetch")
@click.argument("names", nargs=-1, required=True, callback=check_dataset)
@data_dir_option
def data_fetch(names, data_dir):
    """Download CIFAR archives, verify their checksums and extract them."""
    from pathlib import Path

    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    from sweeper.data import cifar, load

    root = Path(data_dir) if data_dir else settings.data_dir()
    for name in names:
        if name not in cifar.INFOS:
            stderr_console().print(f"{name}: built in, nothing to fetch")
            continue
        with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(),
                      console=stderr_console(), transient=True) as progress:
            task = progress.add_task(f"{name}", total=None)
            cifar.fetch(name, root, progress=lambda done, total: progress.update(task, completed=done, total=total))
        load(name, root)  # builds the uint8 cache so the first trial starts at once
        stderr_console().print(f"{name}: ready in {root}")


@data.command("import")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@data_dir_option
def data_import(archive, data_dir):
    """Take a CIFAR archive already on disk (for machines without internet)."""
    from pathlib import Path

    from sweeper.data import cifar, load

    root = Path(data_dir) if data_dir else settings.data_dir()
    name = cifar.import_archive(Path(archive), root)
    load(name, root)
    stderr_console().print(f"{name}: imported into {root}")


# --- entry point ---------------------------------------------------------------------------

def main() -> None:
    """Run the CLI; known failures become one clear message and exit code 1, never a traceback."""
    from sweeper.errors import friendly_errors

    with friendly_errors():
        cli(standalone_mode=True)


if __name__ == "__main__":
    main()
