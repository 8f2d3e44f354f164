"""Getting a CIFAR archive onto disk: the download, the md5 check, the member checks and the
extraction into a temporary folder renamed into place. Callers hold the dataset's lock
(``sweeper.data.cifar``)."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from sweeper.data.base import DatasetError
from sweeper.data.cifar_files import SOURCES, cache_path, reason

MAX_MEMBER_BYTES = 1 << 30  # the largest real member (cifar-100 train) is ~155 MB
CHUNK = 1 << 20

Progress = Callable[[int, "int | None"], None]


def download(name: str, data_dir: Path, url: str | None, progress: Progress | None) -> Path:
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
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            if total is not None and done != total:
                raise OSError(f"connection closed after {done} of {total} bytes")
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
            raise DatasetError(
                f"could not download {name} from {url} ({reason(e)}). Check the network or the URL; "
                f"on a machine without internet, get {src.filename} from {src.url} elsewhere and run "
                f"`sweeper data import PATH` (or copy it into {data_dir})."
            ) from None
        return verify_and_extract(
            name, tmp, data_dir, label=f"the download from {url}", fix=f"try again, or use another mirror of {src.url}"
        )
    finally:
        tmp.unlink(missing_ok=True)


def verify_and_extract(
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
    digest = digest or md5(archive)
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
                f"cannot extract {label} ({reason(e)}): the archive is truncated or damaged; {fix}."
            ) from None
        for rel in wanted:
            path = tmp / rel
            if path.is_symlink() or not path.is_file():
                raise DatasetError(f"{label} did not extract {rel} as a regular file; {fix}.")
        final = data_dir / src.folder
        _replace_dir(tmp / src.folder, final, tmp)
        cache_path(name, data_dir).unlink(missing_ok=True)  # built from the old batches
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


def guess_by_members(archive: Path) -> str | None:
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


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise DatasetError(f"cannot read {path} ({reason(e)}).") from None
    return digest.hexdigest()
