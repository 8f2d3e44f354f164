"""Where a number came from: the code that trained it and the data it saw.

Every cell run carries ``sweeper.code_digest`` (a digest of the installed sweeper package's
source, so a container without ``.git`` has it too), the git commit when the package runs from
a checkout, and the dataset as an MLflow input whose digest covers the arrays themselves.

>>> len(code_digest())
16
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over the package's Python sources (path and content, in path order)."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the sweeper checkout this process runs from, when it runs from one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def dataset_digest(
    splits, names: tuple[str, ...] = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
) -> str:
    """sha256 over the arrays a trial trains, validates and tests on (shapes included), or over
    the ``names`` of them."""
    h = hashlib.sha256()
    for name in names:
        tensor = getattr(splits, name)
        if tensor is None:
            continue
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# The MLflow input contexts of the splits: (context, split, name suffix).
SPLIT_INPUTS = (("training", "train", "train"), ("validation", "val", "val"), ("evaluation", "test", "test"))


def dataset_inputs(splits) -> list[Any]:
    """The MLflow dataset inputs of a cell run, built with ``mlflow.data``: one per split, with
    context ``training``, ``evaluation`` (the test split) and, when the recipe holds one out,
    ``validation``. Each is named DATASET-SPLIT, with the digest of that split's arrays and, in
    its profile, their shapes and sizes."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.entities import DatasetInput, InputTag

    name = splits.info.name
    inputs = []
    for context, split, suffix in SPLIT_INPUTS:
        x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
        if x is None or len(y) == 0:
            continue
        dataset = from_numpy(
            x.numpy(),
            targets=y.numpy(),
            name=f"{name}-{suffix}",
            digest=dataset_digest(splits, (f"{split}_x", f"{split}_y")),
            source=CodeDatasetSource(tags={"sweeper.dataset": name, "sweeper.split": split}),
        )
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    return inputs
