"""The engine commands, no study needed: `models`, `train`, `data list/fetch/import`."""

from __future__ import annotations

import click

from sweeper.cli.options import (
    check_dataset,
    check_variant,
    data_dir_option,
    device_option,
    format_option,
    load_spec,
    precision_option,
    verbosity_options,
)
from sweeper.cli.output import print_json, print_table, stderr_console
from sweeper.contract import OPTIMIZERS, Recipe


@click.command()
@click.option("--dataset", callback=check_dataset, help="Only this dataset (default: all).")
@click.option(
    "--study",
    metavar="NAME|PATH.toml",
    help="Also the variants this study spec declares in [variants.NAME]; only its grid's datasets.",
)
@format_option()
def models(dataset, study, fmt):
    """Parameters, MACs per image and Inception modules of every variant."""
    from sweeper import engine_api

    rows = engine_api.variant_rows(dataset, load_spec(study) if study else None)
    if fmt == "json":
        print_json(rows)
    else:
        print_table("GoogLeNet variants (MACs: one forward pass of one image)", rows)


@click.command()
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
def train(variant, dataset, device, precision, use_compile, checkpoint, resume, data_dir, fmt, **overrides):
    """Train one variant on one dataset with the seed's recipe and print its errors."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sweeper import engine_api

    console = stderr_console()
    columns = (TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress = Progress(*columns, console=console, transient=True)
    task = progress.add_task("train", total=None, epoch=1)

    def on_start(facts):
        console.print(
            f"[bold]{variant}[/] on [bold]{dataset}[/]: {facts['params']:,} parameters, {facts['macs']:,} MACs "
            f"per image, {facts['train']:,} train / {facts['test']:,} test images"
        )
        progress.start()

    def on_epoch(m, recipe):
        console.print(
            f"epoch {m.epoch:>3}/{recipe.epochs}  train_loss {m.train_loss:.4f}  "
            f"test_loss {m.test_loss:.4f}  top1_error {m.top1_error:.4f}  "
            f"top5_error {m.top5_error:.4f}  lr {m.lr:.4g}  {m.images_per_s:,.0f} img/s  "
            f"{m.epoch_seconds:.1f}s"
        )
        progress.update(task, completed=0, epoch=m.epoch + 1)

    try:  # the bar starts below the model's line (on_start)
        summary = engine_api.train_one(
            variant,
            dataset,
            overrides,
            device=device,
            precision=precision,
            use_compile=use_compile,
            checkpoint=checkpoint,
            resume=resume,
            data_dir=data_dir,
            on_start=on_start,
            on_epoch=on_epoch,
            on_step=lambda step, total: progress.update(task, completed=step, total=total),
        )
    finally:
        progress.stop()
    if fmt == "json":
        print_json(summary)
    else:
        click.echo(
            f"{variant} on {dataset}: top-1 error {summary['top1_error']:.4f}, top-5 error "
            f"{summary['top5_error']:.4f}, {summary['params']:,} parameters, {summary['train_seconds']:.1f}s "
            f"({summary['device']}, {summary['precision']})"
        )


@click.group()
def data():
    """List, fetch and import datasets."""


@data.command("list")
@data_dir_option
@format_option()
def data_list(data_dir, fmt):
    """Each dataset, where it lives, whether it is present and its size on disk."""
    from sweeper import engine_api

    root = engine_api.data_root(data_dir)
    rows = engine_api.dataset_rows(root)
    if fmt == "json":
        print_json(rows)
    else:
        print_table(f"Datasets in {root}", rows, ["name", "present", "size_bytes", "classes", "shape", "path"])


FETCH_MESSAGES = {
    "built in": "{name}: built in, nothing to fetch",
    "present": "{name}: already present in {root} (--force downloads again)",
    "fetched": "{name}: ready in {root}",
}


@data.command("fetch")
@click.argument("names", nargs=-1, required=True, callback=check_dataset)
@click.option("--force", is_flag=True, help="Download again even when the dataset is already present.")
@data_dir_option
@format_option()
def data_fetch(names, force, data_dir, fmt):
    """Download CIFAR archives, verify their checksums and extract them (once)."""
    from sweeper import engine_api

    root = engine_api.data_root(data_dir)
    rows = []
    for name in names:
        with DownloadBar(name) as bar:
            row = engine_api.fetch_dataset(name, root, force=force, progress=bar.update)
        stderr_console().print(FETCH_MESSAGES[row["state"]].format(name=name, root=root))
        rows.append(row)
    if fmt == "json":
        print_json(rows)


class DownloadBar:
    """A download's progress bar on stderr, shown once the download reports progress."""

    def __init__(self, name: str) -> None:
        self.name, self.progress, self.task = name, None, None

    def update(self, done: int, total: int | None) -> None:
        if self.progress is None:
            from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

            columns = (*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn())
            self.progress = Progress(*columns, console=stderr_console(), transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.name, total=None)
        self.progress.update(self.task, completed=done, total=total)

    def __enter__(self) -> DownloadBar:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


@data.command("import")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@data_dir_option
@format_option()
def data_import(archive, data_dir, fmt):
    """Take a CIFAR archive already on disk (for machines without internet)."""
    from sweeper import engine_api

    root = engine_api.data_root(data_dir)
    row = engine_api.import_dataset(archive, root)
    stderr_console().print(f"{row['name']}: imported into {root}")
    if fmt == "json":
        print_json(row)
