"""What the CIFAR files are and how they are read: the published archives (``SOURCES``), the
pickled batches (an unpickler that can build numpy arrays and nothing else) and the uint8
``.npz`` cache built from them. ``sweeper.data.cifar`` loads, fetches and imports with these."""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sweeper.contract import DATASETS
from sweeper.data.base import DatasetError, Splits
from sweeper.errors import first_line

log = logging.getLogger("sweeper.data.cifar")

INFOS = {name: DATASETS[name] for name in ("cifar10", "cifar100")}


@dataclass(frozen=True)
class Source:
    """Where a CIFAR archive comes from and what it must contain."""

    url: str
    filename: str
    md5: str
    folder: str  # the archive's top-level folder, extracted as data_dir/folder
    train: tuple[str, ...]  # batch files inside ``folder``
    test: tuple[str, ...]
    meta: str
    label_key: bytes
    num_train: int
    num_test: int

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.train, *self.test, self.meta)


SOURCES: dict[str, Source] = {
    "cifar10": Source(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        filename="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        label_key=b"labels",
        num_train=50_000,
        num_test=10_000,
    ),
    "cifar100": Source(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        filename="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train=("train",),
        test=("test",),
        meta="meta",
        label_key=b"fine_labels",
        num_train=50_000,
        num_test=10_000,
    ),
}

IMAGE_BYTES = 3 * 32 * 32
CACHE_KEYS = ("train_x", "train_y", "test_x", "test_y")


# --------------------------------------------------------------------------- reading batches


try:
    from numpy._core.multiarray import _reconstruct as _RECONSTRUCT  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _RECONSTRUCT

# Exactly what a pickled numpy array refers to; the batches hold nothing else that needs a global.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # how the published files (numpy 1) name it
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _unpickle(path: Path):
    with open(path, "rb") as f:
        return _SafeUnpickler(f, encoding="bytes").load()


def read_batch(name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    src, info = SOURCES[name], INFOS[name]
    fix = f"delete {path.parent} and run `sweeper data fetch {name}`"
    try:
        batch = _unpickle(path)
    except _RefusedGlobal as e:
        raise DatasetError(
            f"{path} refers to {e}, which a CIFAR batch never does; it was not loaded (nothing in it ran). {fix[0].upper()}{fix[1:]}."
        ) from None
    except FileNotFoundError:
        raise DatasetError(f"{path} is missing; {fix}.") from None
    except Exception as e:  # whatever a damaged pickle raises
        raise DatasetError(f"{path} is not a readable CIFAR batch ({reason(e)}); {fix}.") from None
    problem = None
    data = labels = None
    if not isinstance(batch, dict):
        problem = f"it holds a {type(batch).__name__}, not a dict"
    else:
        data, labels = batch.get(b"data"), batch.get(src.label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
            shape = getattr(data, "shape", None)
            problem = f"b'data' is not a uint8 array of rows of {IMAGE_BYTES} bytes (got {type(data).__name__} {shape})"
        elif labels is None:
            problem = f"it has no {src.label_key!r}"
        else:
            try:
                labels = np.asarray(labels)
                ok = labels.ndim == 1 and labels.dtype.kind in "iu"
            except Exception:
                ok = False
            if not ok:
                problem = f"{src.label_key!r} is not a list of integers"
            elif len(labels) != len(data):
                problem = f"it has {len(data)} images but {len(labels)} labels"
            elif len(labels) and (labels.min() < 0 or labels.max() >= info.num_classes):
                problem = f"its labels are outside 0..{info.num_classes - 1}"
    if problem:
        raise DatasetError(f"{path} is not a valid {name} batch: {problem}; {fix}.")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.uint8)


def read_folder(name: str, folder: Path) -> dict[str, np.ndarray]:
    src = SOURCES[name]
    parts = {}
    for split, files in (("train", src.train), ("test", src.test)):
        xs, ys = zip(*(read_batch(name, folder / f) for f in files))
        parts[f"{split}_x"] = np.concatenate(xs) if len(xs) > 1 else xs[0]
        parts[f"{split}_y"] = np.concatenate(ys) if len(ys) > 1 else ys[0]
    problem = _check_arrays(name, parts)
    if problem:
        raise DatasetError(
            f"the batches in {folder} are not {name}: {problem}; delete {folder} and run `sweeper data fetch {name}`."
        )
    return parts


# --------------------------------------------------------------------------- cache


def cache_path(name: str, data_dir: Path) -> Path:
    return data_dir / f"{name}.npz"


def write_cache(cache: Path, arrays: dict[str, np.ndarray]) -> None:
    """A failure here costs only speed, so it is logged, not raised."""
    tmp = None
    try:
        fd, tmp_name = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.stem}-cache-", suffix=".npz")
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.ascontiguousarray(arrays[k]) for k in CACHE_KEYS})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache)
        tmp = None
    except OSError as e:
        log.warning("could not write the cache %s (%s); the next load reads the batches again", cache, e)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def read_cache(name: str, cache: Path) -> dict[str, np.ndarray]:
    fix = f"delete {cache} and run `sweeper data fetch {name}`"
    try:
        with np.load(cache, allow_pickle=False) as npz:
            if sorted(npz.files) != sorted(CACHE_KEYS):
                raise DatasetError(f"the cache {cache} holds {sorted(npz.files)}, not {name}'s arrays; {fix}.")
            arrays = {k: npz[k] for k in CACHE_KEYS}
    except DatasetError:
        raise
    except Exception as e:  # BadZipFile, ValueError, OSError, EOFError... all mean "damaged"
        raise DatasetError(f"the cache {cache} is damaged ({reason(e)}); {fix}.") from None
    problem = _check_arrays(name, arrays)
    if problem:
        raise DatasetError(f"the cache {cache} is not valid {name} data: {problem}; {fix}.")
    return arrays


def _check_arrays(name: str, arrays: dict[str, np.ndarray]) -> str | None:
    src, info = SOURCES[name], INFOS[name]
    for split, count in (("train", src.num_train), ("test", src.num_test)):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.dtype != np.uint8 or x.shape != (count, *info.shape):
            return f"{split}_x is {x.dtype} {x.shape}, expected uint8 {(count, *info.shape)}"
        if y.dtype.kind not in "iu" or y.shape != (count,):
            return f"{split}_y is {y.dtype} {y.shape}, expected {count} integer labels"
        if count and (int(y.min()) < 0 or int(y.max()) >= info.num_classes):
            return f"{split}_y has labels outside 0..{info.num_classes - 1}"
    return None


def to_splits(name: str, arrays: dict[str, np.ndarray]) -> Splits:
    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else np.ascontiguousarray(a).copy())

    return Splits(
        INFOS[name],
        train_x=images(arrays["train_x"]),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=images(arrays["test_x"]),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
    )


# --------------------------------------------------------------------------- helpers


def reason(e: BaseException) -> str:
    """One short line saying why ``e`` happened (a URLError says its underlying reason)."""
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    text = first_line(e)
    return text if len(text) < 200 else text[:200] + "..."
