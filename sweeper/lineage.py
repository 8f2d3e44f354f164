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
import json
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


def dataset_digest(splits) -> str:
    """sha256 over the arrays a trial trains, validates and tests on (shapes included)."""
    h = hashlib.sha256()
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        tensor = getattr(splits, name)
        if tensor is None:
            continue
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def dataset_profile(splits, val_fraction: float) -> dict[str, Any]:
    return {
        "train": len(splits.train_y),
        "val": 0 if splits.val_y is None else len(splits.val_y),
        "test": len(splits.test_y),
        "val_fraction": val_fraction,
        "num_classes": splits.num_classes,
        "shape": list(splits.info.shape),
    }


def dataset_input(splits, val_fraction: float, digest: str):
    """The MLflow dataset input of a cell run (what ``mlflow.log_input`` logs)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(
        name=splits.info.name,
        digest=digest,
        source_type="sweeper",
        source=json.dumps({"dataset": splits.info.name}),
        profile=json.dumps(dataset_profile(splits, val_fraction)),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])
