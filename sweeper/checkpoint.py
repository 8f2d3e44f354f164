"""Atomic save and safe load of the full training state.

A checkpoint is a plain dict of tensors and primitives, so it loads with ``weights_only=True``
(no code from the file ever runs). It is written to a temporary file, fsynced and renamed over
the old one, so a crash or a full disk never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from sweeper.errors import first_line

FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be written or used; the message names the file and the fix."""


def cell_path(root: str | Path, study: str, cell: str) -> Path:
    """``root/<study>/<cell>/last.pt`` built from safe slugs, each with a digest of the full name
    (distinct names never share a folder), and checked to stay inside ``root`` whatever the names
    hold (a study named ``../../x`` written into the storage by hand)."""
    root = Path(root).absolute()
    path = root / _slug(study) / _slug(cell) / "last.pt"
    if not path.resolve().is_relative_to(root.resolve()):
        raise CheckpointError(f"checkpoint path {path} would leave {root}; refusing it")
    return path


def _slug(name: str) -> str:
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:60]
    return f"{safe}-{digest}" if safe else digest


def save(path: str | Path, state: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({**state, "format_version": FORMAT_VERSION}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except Exception as e:  # OSError, or torch's RuntimeError ("unexpected pos") on a full disk
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        try:
            free = shutil.disk_usage(path.parent).free
            reason += f"; {free:,} bytes free on that disk"
        except OSError:
            pass
        raise CheckpointError(
            f"could not write checkpoint {path} ({reason}); the previous checkpoint is kept. "
            "Free disk space or point SWEEPER_HOME at a larger disk."
        ) from None
    return path


def load(path: str | Path, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint; ``expect`` maps keys (e.g. ``variant``) to the values they must have."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # truncated, tampered or not a checkpoint at all
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}); delete it to start the trial afresh"
        ) from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a sweeper checkpoint; delete it to start the trial afresh")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} was written by a newer sweeper (format {state['format_version']}, "
            f"this one reads {FORMAT_VERSION}); upgrade sweeper with `pip install -U sweeper`"
        )
    for key, value in (expect or {}).items():
        if state.get(key) != value:
            raise CheckpointError(
                f"checkpoint {path} belongs to {key}={state.get(key)!r}, not {value!r}; it is not used for this trial"
            )
    return state
