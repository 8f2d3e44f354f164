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
import shutil
from collections.abc import Iterator
from pathlib import Path

from sweeper.data import cifar_archive, cifar_files
from sweeper.data.base import DatasetError, Splits
from sweeper.data.cifar_archive import Progress
from sweeper.data.cifar_files import INFOS, SOURCES, Source, reason
from sweeper.storage import locks

# --------------------------------------------------------------------------- public API


def load(name: str, data_dir: Path, download: bool = True) -> Splits:
    """Load ``name``: from the cache, else the extracted batches, else an archive in
    ``data_dir``, else (``download``) the published URL. Builds the cache on the way."""
    src = _source(name)
    data_dir = Path(data_dir)
    cache = cifar_files.cache_path(name, data_dir)
    if cache.exists():  # fast path: the cache is only ever replaced atomically
        return cifar_files.to_splits(name, cifar_files.read_cache(name, cache))
    _make_dir(data_dir)
    with _lock(name, data_dir):
        if cache.exists():  # another process built it while we waited
            return cifar_files.to_splits(name, cifar_files.read_cache(name, cache))
        folder = data_dir / src.folder
        if not _complete(src, folder):
            archive = data_dir / src.filename
            if archive.exists():
                cifar_archive.verify_and_extract(name, archive, data_dir)
            elif download:
                cifar_archive.download(name, data_dir, None, None)
            else:
                raise DatasetError(_missing_message(name, data_dir, folder))
        arrays = cifar_files.read_folder(name, folder)
        cifar_files.write_cache(cache, arrays)
    return cifar_files.to_splits(name, arrays)


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
        return cifar_archive.download(name, data_dir, url, progress)


def import_archive(archive_path: Path, data_dir: Path) -> str:
    """Verify and extract a CIFAR archive downloaded elsewhere; returns the dataset name.

    The archive is recognised by its md5; one that looks like a CIFAR archive but
    has another md5 is damaged or modified and refused before anything is extracted.
    """
    archive = Path(archive_path)
    if not archive.is_file():
        raise DatasetError(f"archive {archive} does not exist or is not a file.")
    digest = cifar_archive.md5(archive)
    name = next((n for n, s in SOURCES.items() if s.md5 == digest), None)
    if name is None:
        guess = cifar_archive.guess_by_members(archive)
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
        cifar_archive.verify_and_extract(name, archive, data_dir, digest=digest)
    return name


def status(name: str, data_dir: Path) -> dict:
    """For ``sweeper data list``: whether ``name`` can be loaded without a download,
    the path it would be loaded from, and the bytes it takes on disk (cache, batches,
    any archive in ``data_dir``)."""
    src = _source(name)
    data_dir = Path(data_dir)
    cache, folder, archive = cifar_files.cache_path(name, data_dir), data_dir / src.folder, data_dir / src.filename
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
            f"cannot create the data directory {data_dir} ({reason(e)}); set SWEEPER_DATA_DIR to a writable folder."
        ) from None


@contextlib.contextmanager
def _lock(name: str, data_dir: Path) -> Iterator[None]:
    """Exclusive across processes; also clears temp files a crashed holder left behind."""
    path = data_dir / f".{name}.lock"
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(locks.file_lock(path))
        except OSError as e:
            raise DatasetError(
                f"cannot create the lock file {path} ({reason(e)}); set SWEEPER_DATA_DIR to a writable folder."
            ) from None
        for stale in data_dir.glob(f".{name}-*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        yield


__all__ = ["INFOS", "SOURCES", "Source", "fetch", "import_archive", "load", "status"]
