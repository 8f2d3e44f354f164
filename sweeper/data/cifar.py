"""CIFAR-10 and CIFAR-100 from the official python-pickle archives.

Layout under ``data_dir``::

    cifar-10-python.tar.gz     optional: an archive put here by hand (never deleted)
    cifar-10-batches-py/       the extracted batches (renamed into place whole)
    cifar10.npz                uint8 cache built on first load (replaced atomically)
    .cifar10.lock              flock'ed around fetch/extract/cache-build

Nothing here runs code from the data: archives are checked against a published md5
before anything is extracted, only the expected regular files are extracted, and
batches are read with an unpickler that can build numpy arrays and nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from sweeper.contract import DATASETS
from sweeper.data.base import DatasetError, Splits
from sweeper.errors import first_line

log = logging.getLogger(__name__)

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
MAX_MEMBER_BYTES = 1 << 30  # the largest real member (cifar-100 train) is ~155 MB
_CHUNK = 1 << 20
_CACHE_KEYS = ("train_x", "train_y", "test_x", "test_y")

Progress = Callable[[int, "int | None"], None]


# --------------------------------------------------------------------------- public API


def load(name: str, data_dir: Path, download: bool = True) -> Splits:
    """Load ``name``: from the cache, else the extracted batches, else an archive in
    ``data_dir``, else (``download``) the published URL. Builds the cache on the way."""
    src = _source(name)
    data_dir = Path(data_dir)
    cache = _cache_path(name, data_dir)
    if cache.exists():  # fast path: the cache is only ever replaced atomically
        return _splits(name, _read_cache(name, cache))
    _make_dir(data_dir)
    with _lock(name, data_dir):
        if cache.exists():  # another process built it while we waited
            return _splits(name, _read_cache(name, cache))
        folder = data_dir / src.folder
        if not _complete(src, folder):
            archive = data_dir / src.filename
            if archive.exists():
                _verify_and_extract(name, archive, data_dir)
            elif download:
                _fetch_locked(name, data_dir, None, None)
            else:
                raise DatasetError(_missing_message(name, data_dir, folder))
        arrays = _read_folder(name, folder)
        _write_cache(cache, arrays)
    return _splits(name, arrays)


def fetch(name: str, data_dir: Path, *, url: str | None = None, progress: Progress | None = None) -> Path:
    """Download ``name``'s archive, verify its md5, extract it; returns the extracted folder.

    ``url`` replaces the published URL (a mirror); one ending in ``/`` is a folder
    that holds the archive under its usual file name. ``progress(done, total)`` is
    called as bytes arrive (``total`` is None when the server does not say).
    Always downloads; what was extracted before is replaced and the cache dropped.
    """
    _source(name)
    data_dir = Path(data_dir)
    _make_dir(data_dir)
    with _lock(name, data_dir):
        return _fetch_locked(name, data_dir, url, progress)


def import_archive(archive_path: Path, data_dir: Path) -> str:
    """Verify and extract a CIFAR archive downloaded elsewhere; returns the dataset name.

    The archive is recognised by its md5; one that looks like a CIFAR archive but
    has another md5 is damaged or modified and refused before anything is extracted.
    """
    archive = Path(archive_path)
    if not archive.is_file():
        raise DatasetError(f"archive {archive} does not exist or is not a file.")
    digest = _md5(archive)
    name = next((n for n, s in SOURCES.items() if s.md5 == digest), None)
    if name is None:
        guess = _guess_by_members(archive)
        if guess is None:
            known = " or ".join(f"{s.filename} ({s.url})" for s in SOURCES.values())
            raise DatasetError(f"{archive} is not a known CIFAR archive (md5 {digest}); expected {known}.")
        src = SOURCES[guess]
        raise DatasetError(
            f"{archive} looks like {src.filename} but its md5 is {digest}, not {src.md5}: it is damaged or "
            f"modified, so nothing was extracted; download it again from {src.url}."
        )
    data_dir = Path(data_dir)
    _make_dir(data_dir)
    with _lock(name, data_dir):
        _verify_and_extract(name, archive, data_dir, digest=digest)
    return name


def status(name: str, data_dir: Path) -> dict:
    """For ``sweeper data list``: whether ``name`` can be loaded without a download,
    the path it would be loaded from, and the bytes it takes on disk (cache, batches,
    any archive in ``data_dir``)."""
    src = _source(name)
    data_dir = Path(data_dir)
    cache, folder, archive = _cache_path(name, data_dir), data_dir / src.folder, data_dir / src.filename
    size = 0
    for path in (cache, archive):
        with contextlib.suppress(OSError):
            size += path.stat().st_size if path.is_file() else 0
    if folder.is_dir():
        for child in folder.rglob("*"):
            with contextlib.suppress(OSError):
                size += child.stat().st_size if child.is_file() else 0
    if cache.is_file():
        path, present = cache, True
    elif _complete(src, folder):
        path, present = folder, True
    elif archive.is_file():
        path, present = archive, True
    else:
        path, present = folder, False
    return {"name": name, "path": str(path), "present": present, "size_bytes": size}


# --------------------------------------------------------------------------- fetch / extract


def _fetch_locked(name: str, data_dir: Path, url: str | None, progress: Progress | None) -> Path:
    src = SOURCES[name]
    if not url:
        url = src.url
    elif url.endswith("/"):
        url += src.filename
    fd, tmp_name = tempfile.mkstemp(dir=data_dir, prefix=f".{name}-download-", suffix=".part")
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                done = 0
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            if total is not None and done != total:
                raise OSError(f"connection closed after {done} of {total} bytes")
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
            raise DatasetError(
                f"could not download {name} from {url} ({_reason(e)}). Check the network or the URL; "
                f"on a machine without internet, get {src.filename} from {src.url} elsewhere and run "
                f"`sweeper data import PATH` (or copy it into {data_dir})."
            ) from None
        return _verify_and_extract(
            name, tmp, data_dir, label=f"the download from {url}", fix=f"try again, or use another mirror of {src.url}"
        )
    finally:
        tmp.unlink(missing_ok=True)


def _verify_and_extract(
    name: str,
    archive: Path,
    data_dir: Path,
    *,
    digest: str | None = None,
    label: str | None = None,
    fix: str | None = None,
) -> Path:
    """md5 first, then member checks, then extract into a temp dir renamed into place."""
    src = SOURCES[name]
    label = label or str(archive)
    fix = fix or f"delete it and run `sweeper data fetch {name}`"
    digest = digest or _md5(archive)
    if digest != src.md5:
        raise DatasetError(
            f"{label} has md5 {digest}, expected {src.md5} for {src.filename}: it is damaged or modified, "
            f"so nothing was extracted; {fix}."
        )
    wanted = {f"{src.folder}/{m}" for m in src.members}
    tmp = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{name}-extract-"))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                chosen = _check_members(label, members, wanted)
                for member in chosen:
                    tar.extract(member, tmp, filter="data")
        except DatasetError:
            raise
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            raise DatasetError(
                f"cannot extract {label} ({_reason(e)}): the archive is truncated or damaged; {fix}."
            ) from None
        for rel in wanted:
            path = tmp / rel
            if path.is_symlink() or not path.is_file():
                raise DatasetError(f"{label} did not extract {rel} as a regular file; {fix}.")
        final = data_dir / src.folder
        _replace_dir(tmp / src.folder, final, tmp)
        _cache_path(name, data_dir).unlink(missing_ok=True)  # built from the old batches
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_members(label: str, members: list[tarfile.TarInfo], wanted: set[str]) -> list[tarfile.TarInfo]:
    """The expected regular files; anything unsafe anywhere in the archive is an error."""
    chosen: dict[str, tarfile.TarInfo] = {}
    for m in members:
        raw = m.name
        path = PurePosixPath(raw)
        if raw.startswith(("/", "\\")) or path.is_absolute() or ".." in path.parts or "\\" in raw or "\x00" in raw:
            raise DatasetError(f"{label} contains a member outside its folder ({raw!r}); refusing to extract it.")
        if not (m.isfile() or m.isdir()):
            kind = "link" if (m.issym() or m.islnk()) else "special file"
            raise DatasetError(
                f"{label} contains a {kind} ({raw!r}); CIFAR archives hold only regular files, refusing to extract it."
            )
        rel = path.as_posix()
        if m.isdir():
            continue  # folders are created as the files in them are extracted
        if rel not in wanted:
            continue  # e.g. readme.html, file.txt~: safe names, not needed
        if rel in chosen:
            raise DatasetError(f"{label} contains {raw!r} twice; refusing to extract it.")
        if m.size > MAX_MEMBER_BYTES:
            raise DatasetError(
                f"{label} member {raw!r} is {m.size} bytes, far larger than any CIFAR batch; refusing to extract it."
            )
        chosen[rel] = m
    missing = sorted(wanted - chosen.keys())
    if missing:
        raise DatasetError(f"{label} lacks {', '.join(missing)}: it is not a complete CIFAR archive.")
    return list(chosen.values())


def _replace_dir(new: Path, final: Path, scratch: Path) -> None:
    """Move ``new`` to ``final`` so that readers see the old folder or the new one, whole."""
    if final.exists() or final.is_symlink():
        old = scratch / ".old"
        os.replace(final, old)  # scratch is on the same file system; removed by the caller
    os.replace(new, final)


def _guess_by_members(archive: Path) -> str | None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            for _ in range(16):
                member = tar.next()
                if member is None:
                    break
                top = PurePosixPath(member.name).parts[:1]
                for name, src in SOURCES.items():
                    if top == (src.folder,):
                        return name
    except (tarfile.TarError, OSError, EOFError, ValueError):
        pass
    return next((n for n, s in SOURCES.items() if archive.name == s.filename), None)


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


def _read_batch(name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
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
        raise DatasetError(f"{path} is not a readable CIFAR batch ({_reason(e)}); {fix}.") from None
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


def _read_folder(name: str, folder: Path) -> dict[str, np.ndarray]:
    src = SOURCES[name]
    parts = {}
    for split, files in (("train", src.train), ("test", src.test)):
        xs, ys = zip(*(_read_batch(name, folder / f) for f in files))
        parts[f"{split}_x"] = np.concatenate(xs) if len(xs) > 1 else xs[0]
        parts[f"{split}_y"] = np.concatenate(ys) if len(ys) > 1 else ys[0]
    problem = _check_arrays(name, parts)
    if problem:
        raise DatasetError(
            f"the batches in {folder} are not {name}: {problem}; delete {folder} and run `sweeper data fetch {name}`."
        )
    return parts


# --------------------------------------------------------------------------- cache


def _cache_path(name: str, data_dir: Path) -> Path:
    return data_dir / f"{name}.npz"


def _write_cache(cache: Path, arrays: dict[str, np.ndarray]) -> None:
    """A failure here costs only speed, so it is logged, not raised."""
    tmp = None
    try:
        fd, tmp_name = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.stem}-cache-", suffix=".npz")
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.ascontiguousarray(arrays[k]) for k in _CACHE_KEYS})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache)
        tmp = None
    except OSError as e:
        log.warning("could not write the cache %s (%s); the next load reads the batches again", cache, e)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _read_cache(name: str, cache: Path) -> dict[str, np.ndarray]:
    fix = f"delete {cache} and run `sweeper data fetch {name}`"
    try:
        with np.load(cache, allow_pickle=False) as npz:
            if sorted(npz.files) != sorted(_CACHE_KEYS):
                raise DatasetError(f"the cache {cache} holds {sorted(npz.files)}, not {name}'s arrays; {fix}.")
            arrays = {k: npz[k] for k in _CACHE_KEYS}
    except DatasetError:
        raise
    except Exception as e:  # BadZipFile, ValueError, OSError, EOFError... all mean "damaged"
        raise DatasetError(f"the cache {cache} is damaged ({_reason(e)}); {fix}.") from None
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


def _splits(name: str, arrays: dict[str, np.ndarray]) -> Splits:
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


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise DatasetError(f"{name!r} is not a CIFAR dataset; choose one of: {', '.join(SOURCES)}.")
    return SOURCES[name]


def _complete(src: Source, folder: Path) -> bool:
    return folder.is_dir() and all((folder / m).is_file() for m in src.members)


def _missing_message(name: str, data_dir: Path, folder: Path) -> str:
    src = SOURCES[name]
    what = f"{folder} is incomplete" if folder.exists() else f"{name} is not in {data_dir}"
    return (
        f"{what} and downloading is off. Run `sweeper data fetch {name}`, or on a machine without internet "
        f"get {src.filename} from {src.url} and run `sweeper data import PATH` (or copy it into {data_dir})."
    )


def _make_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(
            f"cannot create the data directory {data_dir} ({_reason(e)}); set SWEEPER_DATA_DIR to a writable folder."
        ) from None


@contextlib.contextmanager
def _lock(name: str, data_dir: Path) -> Iterator[None]:
    """Exclusive across processes; also clears temp files a crashed holder left behind."""
    path = data_dir / f".{name}.lock"
    try:
        f = open(path, "a+b")  # held for the whole block
    except OSError as e:
        raise DatasetError(
            f"cannot create the lock file {path} ({_reason(e)}); set SWEEPER_DATA_DIR to a writable folder."
        ) from None
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            for stale in data_dir.glob(f".{name}-*"):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise DatasetError(f"cannot read {path} ({_reason(e)}).") from None
    return digest.hexdigest()


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    text = first_line(e)
    return text if len(text) < 200 else text[:200] + "..."


__all__ = ["INFOS", "SOURCES", "Source", "fetch", "import_archive", "load", "status"]
