"""The engine's service, without a study: the variants' sizes, training one variant on one
dataset, and the datasets on this machine, as functions returning plain data (what `sweeper
models`, `sweeper train` and `sweeper data` print). Heavy imports stay inside the functions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sweeper.contract import DATASETS, VARIANTS


def variant_rows(dataset: str | None = None, spec=None) -> list[dict[str, Any]]:
    """Parameters, MACs per image and Inception modules of every variant on each dataset (only
    ``dataset``; with a study ``spec``, also its declared variants, on its grid's datasets)."""
    import torch

    from sweeper.models import build_model, count_macs, count_params
    from sweeper.spec import variant_cfgs

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
                    "macs": count_macs(cfg, info.shape, info.num_classes),
                    "inception_modules": cfg.inception_modules,
                    **({"declared_in": "spec" if variant in spec.variants else "built-in"} if spec else {}),
                }
            )
    return rows


def train_one(
    variant: str,
    dataset: str,
    overrides: dict[str, Any],
    *,
    device: str = "auto",
    precision: str = "auto",
    use_compile: bool = False,
    checkpoint: str | None = None,
    resume: str | None = None,
    data_dir: str | None = None,
    on_start: Callable[[dict[str, Any]], None] = lambda facts: None,
    on_epoch: Callable[[Any, Any], None] = lambda metrics, recipe: None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train ``variant`` on ``dataset`` with the seed's recipe changed by ``overrides`` (its keys
    ``seed``, ``epochs``, ... ``limit_test``; None leaves a value as it is); a checkpoint after each
    epoch when ``checkpoint`` names a file. ``on_start`` gets the model's size and the images'
    counts, ``on_epoch`` each epoch's metrics (then the checkpoint is written). Returns the summary
    `sweeper train --format json` prints."""
    from sweeper import checkpoint as ckpt
    from sweeper import data as datasets
    from sweeper.models import build_model, count_macs, count_params
    from sweeper.train import Recipe, fit, seed_everything

    recipe = Recipe.from_dict({k: v for k, v in overrides.items() if v is not None})
    splits = datasets.load(dataset, Path(data_dir) if data_dir else None)
    splits = splits.limit(overrides.get("limit_train"), overrides.get("limit_test"))
    seed_everything(recipe.seed)
    model = build_model(variant, splits.num_classes, splits.in_channels)
    params, macs = count_params(model), count_macs(VARIANTS[variant], splits.info.shape, splits.num_classes)
    meta = {"variant": variant, "dataset": dataset}
    state = ckpt.load(resume, expect=meta) if resume else None
    on_start({**meta, "params": params, "macs": macs, "train": len(splits.train_y), "test": len(splits.test_y)})

    def epoch_done(metrics, get_state):
        on_epoch(metrics, recipe)
        if checkpoint:
            ckpt.save(checkpoint, {**get_state(), **meta})

    result = fit(
        model,
        splits,
        recipe,
        device=device,
        precision=precision,
        compile=use_compile,
        resume=state,
        on_epoch=epoch_done,
        on_step=on_step,
    )
    final = result.final
    return {
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


def data_root(data_dir: str | None) -> Path:
    """Where datasets live: ``data_dir``, else ``$SWEEPER_DATA_DIR`` (default under SWEEPER_HOME)."""
    from sweeper import settings

    return Path(data_dir) if data_dir else settings.data_dir()


def dataset_rows(root: Path) -> list[dict[str, Any]]:
    """Each dataset, where it lives under ``root``, whether it is present and its size on disk."""
    from sweeper.data import cifar

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
    return rows


def fetch_dataset(
    name: str, root: Path, *, force: bool = False, progress: Callable[[int, int | None], None] | None = None
) -> dict[str, Any]:
    """Download a CIFAR archive into ``root``, verify its checksum, extract it and build its cache
    (once; ``force``: again). Returns ``{"name", "state", "path"}``, ``state`` one of built in,
    present, fetched."""
    from sweeper.data import cifar, load

    if name not in cifar.INFOS:
        return {"name": name, "state": "built in", "path": None}
    if cifar.status(name, root)["present"] and not force:
        load(name, root)  # verifies the files on disk and builds the cache if it is missing
        return {"name": name, "state": "present", "path": cifar.status(name, root)["path"]}
    cifar.fetch(name, root, progress=progress)
    load(name, root)  # builds the uint8 cache so the first trial starts at once
    return {"name": name, "state": "fetched", "path": cifar.status(name, root)["path"]}


def import_dataset(archive: str, root: Path) -> dict[str, Any]:
    """Take a CIFAR archive already on disk into ``root``; returns ``{"name", "state", "path"}``."""
    from sweeper.data import cifar, load

    name = cifar.import_archive(Path(archive), root)
    load(name, root)
    return {"name": name, "state": "imported", "path": cifar.status(name, root)["path"]}
