"""CIFAR-10/100 loading, against small archives built here in the published layout.

The batches are written the way the published ones were (Python 2 pickles, protocol 2:
byte strings as ``str`` opcodes, numpy arrays via ``numpy.core.multiarray._reconstruct``),
so the restricted unpickler is tested against the real format, not Python 3's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import multiprocessing
import os
import pickle
import shutil
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from sweeper.data import cifar, cifar_files
from sweeper.data.base import DatasetError

N_PER_BATCH = 4  # images per batch file in the test archives
N_TEST = 5
FOLDER = {name: src.folder for name, src in cifar.SOURCES.items()}
EXTRACTED = {name: {src.folder, *(f"{src.folder}/{m}" for m in src.members)} for name, src in cifar.SOURCES.items()}


# --------------------------------------------------------------------------- building archives


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, so its dispatch table can be changed
    """Pickles ``bytes`` and ``str`` (numpy's dtype codes) as Python 2 ``str``
    (SHORT_BINSTRING/BINSTRING), as cPickle did; ``encoding="bytes"`` reads both back as bytes."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self.save_bytes(obj.encode("ascii"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def py2_pickle(obj: object, numpy1_names: bool = True) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    data = buf.getvalue()
    assert b"_codecs" not in data
    if numpy1_names:  # the published files were written by numpy 1
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return data


@dataclass
class Built:
    name: str
    path: Path
    members: dict[str, bytes]  # relative to the folder
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def _batch(name: str, rows: np.ndarray, labels: np.ndarray, label: bytes, numpy1: bool) -> bytes:
    filenames = [b"img_%d.png" % i for i in range(len(rows))]
    if name == "cifar10":
        d = {b"batch_label": label, b"labels": [int(v) for v in labels], b"data": rows, b"filenames": filenames}
    else:
        d = {
            b"filenames": filenames,
            b"batch_label": label,
            b"fine_labels": [int(v) for v in labels],
            b"coarse_labels": [int(v) // 5 for v in labels],
            b"data": rows,
        }
    return py2_pickle(d, numpy1)


def build_members(name: str, seed: int = 0, numpy1: bool = True) -> Built:
    """The batch files of a small ``name`` archive, and the arrays loading them must give."""
    src = cifar.SOURCES[name]
    classes = cifar.INFOS[name].num_classes
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    out = {}
    for split, files, n in (("train", src.train, N_PER_BATCH), ("test", src.test, N_TEST)):
        xs, ys = [], []
        for i, f in enumerate(files):
            count = n * (5 if name == "cifar100" and split == "train" else 1)  # cifar100 has one big train file
            rows = rng.integers(0, 256, size=(count, cifar_files.IMAGE_BYTES), dtype=np.uint8)
            labels = rng.integers(0, classes, size=count)
            labels[0] = classes - 1  # the top class (99 for cifar100: a fine label, not a coarse one)
            members[f] = _batch(name, rows, labels, b"%s batch %d" % (split.encode(), i + 1), numpy1)
            xs.append(rows.reshape(-1, 3, 32, 32))
            ys.append(labels)
        out[f"{split}_x"], out[f"{split}_y"] = np.concatenate(xs), np.concatenate(ys)
    if name == "cifar10":
        meta = {
            b"num_cases_per_batch": N_PER_BATCH,
            b"label_names": [b"class%d" % i for i in range(10)],
            b"num_vis": 3072,
        }
    else:
        meta = {
            b"fine_label_names": [b"f%d" % i for i in range(100)],
            b"coarse_label_names": [b"c%d" % i for i in range(20)],
        }
    members[src.meta] = py2_pickle(meta, numpy1)
    members["readme.html" if name == "cifar10" else "file.txt~"] = b"<html>not needed</html>"
    return Built(name, Path(), members, **out)


def write_archive(
    path: Path, folder: str, members: dict[str, bytes], extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        d = tarfile.TarInfo(folder)
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(d)
        for rel, data in members.items():
            info = tarfile.TarInfo(f"{folder}/{rel}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def build_archive(path: Path, name: str = "cifar10", **kw) -> Built:
    built = build_members(name, **kw)
    built.path = write_archive(path, FOLDER[name], built.members)
    return built


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def small_source(name: str, archive: Path | None = None, url: str | None = None) -> cifar.Source:
    """``name``'s table row for the test archives: their md5 and sizes (and a URL)."""
    changes: dict = {"num_train": 5 * N_PER_BATCH, "num_test": N_TEST}
    if archive is not None:
        changes["md5"] = md5(archive)
    if url is not None:
        changes["url"] = url
    return dataclasses.replace(cifar.SOURCES[name], **changes)


@pytest.fixture
def register(monkeypatch):
    """Make ``cifar`` accept a test archive as the published one."""

    def register(built_or_path, name: str = "cifar10", url: str | None = None) -> None:
        path = built_or_path.path if isinstance(built_or_path, Built) else built_or_path
        name = built_or_path.name if isinstance(built_or_path, Built) else name
        monkeypatch.setitem(cifar.SOURCES, name, small_source(name, path, url))

    return register


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "deep" / "er" / "data"


def files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")} if path.exists() else set()


def assert_loaded(splits, built: Built) -> None:
    n_train = 5 * N_PER_BATCH
    assert splits.info is cifar.INFOS[built.name]
    assert splits.train_x.dtype == torch.uint8 and tuple(splits.train_x.shape) == (n_train, 3, 32, 32)
    assert splits.test_x.dtype == torch.uint8 and tuple(splits.test_x.shape) == (N_TEST, 3, 32, 32)
    assert splits.train_y.dtype == torch.int64 and tuple(splits.train_y.shape) == (n_train,)
    assert splits.test_y.dtype == torch.int64 and tuple(splits.test_y.shape) == (N_TEST,)
    assert np.array_equal(splits.train_x.numpy(), built.train_x)
    assert np.array_equal(splits.test_x.numpy(), built.test_x)
    assert np.array_equal(splits.train_y.numpy(), built.train_y)
    assert np.array_equal(splits.test_y.numpy(), built.test_y)


# --------------------------------------------------------------------------- good archives


@pytest.mark.parametrize("numpy1", [True, False], ids=["numpy.core", "numpy._core"])
def test_import_and_load_cifar10(tmp_path, data_dir, register, numpy1):
    built = build_archive(tmp_path / "dl" / "cifar-10-python.tar.gz", numpy1=numpy1)
    register(built)
    assert cifar.import_archive(built.path, data_dir) == "cifar10"
    assert files_under(data_dir) - {".cifar10.lock"} == EXTRACTED["cifar10"]  # no readme.html, no temp dirs
    splits = cifar.load("cifar10", data_dir, download=False)
    assert_loaded(splits, built)
    assert (data_dir / "cifar10.npz").is_file()


def test_pixels_land_in_the_right_channel_and_place(tmp_path, data_dir, register):
    built = build_members("cifar10")
    rows = np.zeros((N_PER_BATCH, cifar_files.IMAGE_BYTES), dtype=np.uint8)
    rows[1, 0 * 1024 + 5 * 32 + 7] = 11  # red, row 5, column 7
    rows[1, 1 * 1024 + 0 * 32 + 31] = 22  # green, row 0, column 31
    rows[1, 2 * 1024 + 31 * 32 + 0] = 33  # blue, row 31, column 0
    built.members["data_batch_1"] = _batch("cifar10", rows, np.array([0, 7, 0, 0]), b"training batch 1 of 5", True)
    archive = write_archive(tmp_path / "c.tar.gz", FOLDER["cifar10"], built.members)
    register(archive, "cifar10")
    cifar.import_archive(archive, data_dir)
    splits = cifar.load("cifar10", data_dir, download=False)
    x, y = splits.train_x, splits.train_y
    assert (x[1, 0, 5, 7], x[1, 1, 0, 31], x[1, 2, 31, 0]) == (11, 22, 33)
    assert int(x[1].sum()) == 66 and int(x[0].sum()) == 0
    assert y[:4].tolist() == [0, 7, 0, 0]


def test_import_and_load_cifar100_uses_fine_labels(tmp_path, data_dir, register):
    built = build_archive(tmp_path / "cifar-100-python.tar.gz", "cifar100")
    register(built)
    assert cifar.import_archive(built.path, data_dir) == "cifar100"
    splits = cifar.load("cifar100", data_dir, download=False)
    assert_loaded(splits, built)
    assert int(splits.train_y.max()) == 99  # a coarse label would be < 20
    assert not (data_dir / FOLDER["cifar100"] / "file.txt~").exists()


def test_load_extracts_an_archive_put_in_data_dir(tmp_path, data_dir, register):
    built = build_archive(data_dir / "cifar-10-python.tar.gz")
    register(built)
    assert cifar.status("cifar10", data_dir)["present"]
    assert_loaded(cifar.load("cifar10", data_dir, download=False), built)
    assert built.path.exists()  # a file the user put there is left alone


def test_load_without_data_and_download_off_says_how_to_get_it(data_dir):
    with pytest.raises(DatasetError) as e:
        cifar.load("cifar10", data_dir, download=False)
    msg = str(e.value)
    assert "sweeper data fetch cifar10" in msg and "sweeper data import" in msg and str(data_dir) in msg


def test_status(tmp_path, data_dir, register):
    before = cifar.status("cifar100", data_dir)
    assert before == {"name": "cifar100", "path": str(data_dir / FOLDER["cifar100"]), "present": False, "size_bytes": 0}
    built = build_archive(tmp_path / "a.tar.gz", "cifar100")
    register(built)
    cifar.import_archive(built.path, data_dir)
    cifar.load("cifar100", data_dir)
    after = cifar.status("cifar100", data_dir)
    assert after["present"] and after["path"] == str(data_dir / "cifar100.npz")
    cache_size = (data_dir / "cifar100.npz").stat().st_size
    batch_size = sum(len(built.members[m]) for m in cifar.SOURCES["cifar100"].members)
    assert after["size_bytes"] == cache_size + batch_size


# --------------------------------------------------------------------------- refused archives


def test_tampered_archive_is_refused_before_extraction(tmp_path, data_dir, register):
    good = build_archive(tmp_path / "good" / "cifar-10-python.tar.gz")
    register(good)
    bad = build_archive(tmp_path / "bad" / "cifar-10-python.tar.gz", seed=1)  # same layout, other bytes
    with pytest.raises(DatasetError, match="md5") as e:
        cifar.import_archive(bad.path, data_dir)
    assert str(bad.path) in str(e.value) and "nothing was extracted" in str(e.value)
    assert files_under(data_dir) == set()
    data_dir.mkdir(parents=True)
    shutil.copy(bad.path, data_dir / "cifar-10-python.tar.gz")  # also when load finds it in data_dir
    with pytest.raises(DatasetError, match="md5"):
        cifar.load("cifar10", data_dir, download=False)
    assert files_under(data_dir) == {"cifar-10-python.tar.gz", ".cifar10.lock"}


def test_unknown_archive_is_refused(tmp_path, data_dir):
    path = write_archive(tmp_path / "other.tar.gz", "photos", {"a.jpg": b"x"})
    with pytest.raises(DatasetError, match="not a known CIFAR archive"):
        cifar.import_archive(path, data_dir)
    with pytest.raises(DatasetError, match="does not exist"):
        cifar.import_archive(tmp_path / "missing.tar.gz", data_dir)


def test_truncated_archive(tmp_path, data_dir, register):
    built = build_archive(tmp_path / "cifar-10-python.tar.gz")
    register(built)
    data = built.path.read_bytes()
    cut = tmp_path / "cut" / "cifar-10-python.tar.gz"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="md5"):  # the usual case: the checksum catches it
        cifar.import_archive(cut, data_dir)
    register(cut)  # and if the checksum were of the truncated file, the tar reader catches it
    with pytest.raises(DatasetError, match="truncated or damaged") as e:
        cifar.import_archive(cut, data_dir)
    assert str(cut) in str(e.value)
    assert files_under(data_dir) == {".cifar10.lock"}


def _info(name: str, kind: bytes, linkname: str = "", size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mode = kind, linkname, size, 0o644
    return info


UNSAFE = {
    "dotdot": lambda root: (_info("cifar-10-batches-py/../../escaped", tarfile.REGTYPE, size=4), b"evil"),
    "absolute": lambda root: (_info(str(root / "escaped_abs"), tarfile.REGTYPE, size=4), b"evil"),
    "symlink": lambda root: (
        _info("cifar-10-batches-py/escaped_link", tarfile.SYMTYPE, str(root / "escaped_target")),
        None,
    ),
    "symlink_as_batch": lambda root: (_info("cifar-10-batches-py/data_batch_1", tarfile.SYMTYPE, "/etc/passwd"), None),
    "hardlink": lambda root: (_info("cifar-10-batches-py/escaped_hard", tarfile.LNKTYPE, "/etc/passwd"), None),
    "device": lambda root: (_info("cifar-10-batches-py/escaped_dev", tarfile.CHRTYPE), None),
    "fifo": lambda root: (_info("cifar-10-batches-py/escaped_fifo", tarfile.FIFOTYPE), None),
}


@pytest.mark.parametrize("kind", list(UNSAFE))
def test_unsafe_members_are_refused(tmp_path, data_dir, register, kind):
    info, payload = UNSAFE[kind](tmp_path)
    built = build_members("cifar10")
    archive = write_archive(
        tmp_path / "in" / "cifar-10-python.tar.gz", FOLDER["cifar10"], built.members, [(info, payload)]
    )
    register(archive, "cifar10")
    with pytest.raises(DatasetError) as e:
        cifar.import_archive(archive, data_dir)
    assert str(archive) in str(e.value) and info.name in str(e.value)
    assert files_under(data_dir) == {".cifar10.lock"}
    assert not [p for p in tmp_path.rglob("escaped*")], "something was written outside"


def test_malicious_pickle_refused_without_running(tmp_path, data_dir, register):
    marker = tmp_path / "marker"

    class Evil:
        def __init__(self, path: Path):
            self.path = path

        def __reduce__(self):
            return (os.system, (f"touch {self.path}",))

    control = tmp_path / "control"  # the payload does run under a plain unpickler
    pickle.loads(py2_pickle(Evil(control)))
    assert control.exists()

    built = build_members("cifar10")
    built.members["data_batch_3"] = py2_pickle({b"batch_label": b"x", b"labels": [0], b"data": Evil(marker)})
    archive = write_archive(tmp_path / "cifar-10-python.tar.gz", FOLDER["cifar10"], built.members)
    register(archive, "cifar10")
    cifar.import_archive(archive, data_dir)  # the archive itself is well-formed
    with pytest.raises(DatasetError) as e:
        cifar.load("cifar10", data_dir, download=False)
    assert "system" in str(e.value) and "data_batch_3" in str(e.value)
    assert not marker.exists()
    assert not (data_dir / "cifar10.npz").exists()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda: pickle.dumps(exec), id="builtins.exec"),
        pytest.param(lambda: b"cnumpy\nload\n(S'x'\ntR.", id="numpy.load"),
        pytest.param(lambda: pickle.dumps({b"data": np.zeros(3)}, protocol=2), id="py3-codecs"),
    ],
)
def test_unpickler_allows_only_numpy_array_globals(tmp_path, payload):
    path = tmp_path / "batch"
    path.write_bytes(payload())
    with pytest.raises(DatasetError, match="which a CIFAR batch never does"):
        cifar_files.read_batch("cifar10", path)


BAD_BATCHES = {
    "not a dict": lambda: py2_pickle([1, 2, 3]),
    "wrong row size": lambda: py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
    "float data": lambda: py2_pickle({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}),
    "label out of range": lambda: py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
    "label count": lambda: py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
    "no labels": lambda: py2_pickle({b"data": np.zeros((2, 3072), np.uint8)}),
    "text labels": lambda: py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"a", b"b"]}),
    "truncated": lambda: py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:500],
    "garbage": lambda: b"\x00not a pickle at all",
}


@pytest.mark.parametrize("kind", list(BAD_BATCHES))
def test_invalid_batch_is_a_clear_error(tmp_path, kind):
    path = tmp_path / FOLDER["cifar10"] / "data_batch_2"
    path.parent.mkdir()
    path.write_bytes(BAD_BATCHES[kind]())
    with pytest.raises(DatasetError) as e:
        cifar_files.read_batch("cifar10", path)
    assert str(path) in str(e.value) and "sweeper data fetch cifar10" in str(e.value)


def test_damaged_batch_in_extracted_folder(tmp_path, data_dir, register):
    built = build_archive(tmp_path / "a.tar.gz")
    register(built)
    cifar.import_archive(built.path, data_dir)
    batch = data_dir / FOLDER["cifar10"] / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(DatasetError) as e:
        cifar.load("cifar10", data_dir, download=False)
    assert str(batch) in str(e.value) and "sweeper data fetch cifar10" in str(e.value)


# --------------------------------------------------------------------------- cache


def test_second_load_uses_the_cache(tmp_path, data_dir, register):
    built = build_archive(tmp_path / "a.tar.gz")
    register(built)
    cifar.import_archive(built.path, data_dir)
    cifar.load("cifar10", data_dir, download=False)
    shutil.rmtree(data_dir / FOLDER["cifar10"])
    assert_loaded(cifar.load("cifar10", data_dir, download=False), built)
    assert cifar.status("cifar10", data_dir)["present"]
    with np.load(data_dir / "cifar10.npz", allow_pickle=False) as npz:
        assert npz["train_x"].dtype == np.uint8 and npz["train_x"].shape == (20, 3, 32, 32)


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _savez(path: Path, **changes) -> None:
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(changes)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


CORRUPT_CACHE = {
    "flipped byte": _flip_middle,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 100),
    "labels out of range": lambda p: _savez(p, test_y=np.full(N_TEST, 10, np.uint8)),
    "wrong shape": lambda p: _savez(p, train_x=np.zeros((20, 3, 32, 31), np.uint8)),
    "wrong count": lambda p: _savez(p, train_x=np.zeros((19, 3, 32, 32), np.uint8)),
    "object array": lambda p: _savez(p, train_y=np.array([object()] * 20)),
    "other arrays": lambda p: np.savez(p, train_x=np.zeros(1)),
}


@pytest.mark.parametrize("kind", list(CORRUPT_CACHE))
def test_damaged_cache_is_a_clear_error(tmp_path, data_dir, register, kind):
    built = build_archive(tmp_path / "a.tar.gz")
    register(built)
    cifar.import_archive(built.path, data_dir)
    cifar.load("cifar10", data_dir)
    cache = data_dir / "cifar10.npz"
    CORRUPT_CACHE[kind](cache)
    with pytest.raises(DatasetError) as e:
        cifar.load("cifar10", data_dir, download=False)
    msg = str(e.value)
    assert f"delete {cache} and run `sweeper data fetch cifar10`" in msg
    cache.unlink()  # the fix works
    assert_loaded(cifar.load("cifar10", data_dir, download=False), built)


# --------------------------------------------------------------------------- fetch


def test_fetch_from_file_url_reports_progress(tmp_path, data_dir, register):
    built = build_archive(tmp_path / "mirror" / "cifar-10-python.tar.gz")
    register(built)
    calls = []
    folder = cifar.fetch(
        "cifar10", data_dir, url=built.path.as_uri(), progress=lambda done, total: calls.append((done, total))
    )
    assert folder == data_dir / FOLDER["cifar10"] and folder.is_dir()
    size = built.path.stat().st_size
    assert calls and calls[-1] == (size, size) and all(t == size for _, t in calls)
    assert_loaded(cifar.load("cifar10", data_dir, download=False), built)
    # again, from the mirror folder: the old batches are replaced and the stale cache dropped
    assert cifar.fetch("cifar10", data_dir, url=built.path.parent.as_uri() + "/") == folder
    assert files_under(data_dir) - {".cifar10.lock"} == EXTRACTED["cifar10"]


def test_load_downloads_when_allowed(tmp_path, data_dir, register):
    built = build_archive(tmp_path / "mirror" / "cifar-10-python.tar.gz")
    register(built, url=built.path.as_uri())
    assert_loaded(cifar.load("cifar10", data_dir), built)
    assert not (data_dir / "cifar-10-python.tar.gz").exists()


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/cifar-10-python.tar.gz", "file:///nonexistent/cifar.tar.gz", "nonsense"]
)
def test_fetch_failure_says_what_and_how_to_fix(data_dir, url):
    with pytest.raises(DatasetError) as e:
        cifar.fetch("cifar10", data_dir, url=url)
    msg = str(e.value)
    assert "could not download cifar10" in msg and url in msg
    assert "sweeper data import" in msg and str(data_dir) in msg
    assert files_under(data_dir) == {".cifar10.lock"}  # no partial download left


def test_fetch_of_a_wrong_file_is_refused(tmp_path, data_dir, register):
    built = build_archive(tmp_path / "a.tar.gz")
    register(built)
    other = build_archive(tmp_path / "b.tar.gz", seed=3)
    with pytest.raises(DatasetError, match="md5") as e:
        cifar.fetch("cifar10", data_dir, url=other.path.as_uri())
    assert f"the download from {other.path.as_uri()}" in str(e.value) and "try again" in str(e.value)
    assert files_under(data_dir) == {".cifar10.lock"}


# --------------------------------------------------------------------------- concurrency


def _load_in_child(source: cifar.Source, data_dir: Path, barrier, queue) -> None:
    cifar.SOURCES["cifar10"] = source  # spawned: the parent's monkeypatch is not here
    barrier.wait()
    try:
        s = cifar.load("cifar10", data_dir)
        digest = hashlib.sha256()
        for t in (s.train_x, s.train_y, s.test_x, s.test_y):
            digest.update(t.numpy().tobytes())
        queue.put(("ok", digest.hexdigest()))
    except BaseException as e:  # reported to the parent
        queue.put(("error", repr(e)))


@pytest.mark.slow
def test_concurrent_first_load(tmp_path, data_dir):
    archive = build_archive(tmp_path / "mirror" / "cifar-10-python.tar.gz")
    source = small_source("cifar10", archive.path, url=archive.path.as_uri())  # each downloads unless another did
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(source, data_dir, barrier, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(status == "ok" for status, _ in results), results
    expected = hashlib.sha256()
    for a in (archive.train_x, archive.train_y.astype(np.int64), archive.test_x, archive.test_y.astype(np.int64)):
        expected.update(a.tobytes())
    assert {digest for _, digest in results} == {expected.hexdigest()}
    assert files_under(data_dir) - {".cifar10.lock", "cifar10.npz"} == EXTRACTED["cifar10"]


def test_data_import_and_fetch_print_one_json_document(tmp_path, data_dir, register):
    import json

    from click.testing import CliRunner

    from sweeper.cli import cli

    built = build_archive(tmp_path / "dl" / "cifar-10-python.tar.gz")
    register(built)
    runner = CliRunner()
    imported = runner.invoke(cli, ["data", "import", str(built.path), "--data-dir", str(data_dir), "--format", "json"])
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout) == {
        "name": "cifar10",
        "state": "imported",
        "path": str(data_dir / "cifar10.npz"),
    }
    assert "imported into" in imported.stderr
    fetched = runner.invoke(
        cli, ["data", "fetch", "cifar10", "digits", "--data-dir", str(data_dir), "--format", "json"]
    )
    assert fetched.exit_code == 0, fetched.output
    rows = json.loads(fetched.stdout)
    assert [(r["name"], r["state"]) for r in rows] == [("cifar10", "present"), ("digits", "built in")]
