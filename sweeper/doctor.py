"""`sweeper doctor`: what this machine offers a worker, and whether the stores answer.

Versions come from the installed distributions (no import); the device facts import torch. The
CPU flags listed are those that decide what ``--precision auto`` may pick: bf16 is only a
candidate on a CPU with AVX512-BF16 or AMX (sweeper.precision.cpu_has_fast_bf16).
"""

from __future__ import annotations

import os
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "mlflow", "optuna")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def versions() -> dict[str, str | None]:
    """sweeper, Python and the libraries that decide results and storage formats."""
    found: dict[str, str | None] = {"sweeper": _version("sweeper"), "python": platform.python_version()}
    for name in LIBRARIES:
        found[name] = _version(name)
    return found


def _version(name: str) -> str | None:
    if name == "sweeper":
        from sweeper import __version__

        return __version__
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_line() -> str:
    """`sweeper --version`: sweeper's version and its libraries', on one line."""
    v = versions()
    libs = ", ".join(f"{k} {v[k] or 'not installed'}" for k in ("python", *LIBRARIES))
    return f"sweeper {v['sweeper']} ({libs})"


def cpu_flags(cpuinfo: str | None = None) -> dict[str, bool]:
    """The relevant instruction-set flags of /proc/cpuinfo (all False where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    return {f: f in flags for f in CPU_FLAGS}


def cpu_class(flags: dict[str, bool]) -> str:
    """The CPU classes docs/BENCHMARKS.md times the quickstart on."""
    if flags.get("amx_bf16"):
        return "AMX"
    if flags.get("avx512_bf16"):
        return "AVX512-BF16"
    return "fp32-only"


def device_facts() -> dict[str, Any]:
    """The device `--device auto` picks, the modes `--precision auto` chooses among, CUDA GPUs, threads."""
    import torch

    from sweeper import cores, precision, settings
    from sweeper.train import resolve_device

    auto = resolve_device("auto")
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": props.name,
                    "compute_capability": f"{props.major}.{props.minor}",
                    "memory_bytes": props.total_memory,
                    "bf16": (props.major, props.minor) >= (8, 0),
                }
            )
    flags = cpu_flags()
    return {
        "device_auto": str(auto),
        "precision_auto_candidates": sorted({m.precision for m in precision.candidates(auto)}),
        "cpu": {
            "model": _cpu_model(),
            "class": cpu_class(flags),
            "flags": flags,
            "bf16_fast": precision.cpu_has_fast_bf16(),
        },
        "cuda": {"torch_built_for": torch.version.cuda, "devices": gpus},
        "threads": {
            "cores": cores.host_cores(),
            "torch": torch.get_num_threads(),
            "OMP_NUM_THREADS": settings.env_int("OMP_NUM_THREADS", 0) or None,
            "SWEEPER_THREADS": settings.env_int("SWEEPER_THREADS", 0) or None,
        },
    }


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")


def dir_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 when it does not exist); links are not followed."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed while walking (a checkpoint being replaced)
                pass
    return total


def disk(home: Path) -> dict[str, Any]:
    """Free space where SWEEPER_HOME lives (or would), and what the home holds."""
    probe = home
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {"home": str(home), "home_bytes": dir_size(home), "free_bytes": usage.free, "total_bytes": usage.total}


def human_bytes(n: int | float) -> str:
    """>>> human_bytes(1_900_000_000), human_bytes(512)
    ('1.9 GB', '512 B')
    """
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def render(doc: dict[str, Any]) -> str:
    """The text form of `sweeper doctor`'s document."""
    v = doc["versions"]
    lines = ["versions: " + ", ".join(f"{k} {v[k] or 'not installed'}" for k in v)]
    if "device_auto" in doc:
        c = doc["cpu"]
        flags = " ".join(f"{f}{'+' if on else '-'}" for f, on in c["flags"].items())
        lines += [
            f"device (auto): {doc['device_auto']}; precision auto chooses among: "
            + ", ".join(doc["precision_auto_candidates"]),
            f"cpu: {c['model'] or 'unknown'}; class {c['class']} ({flags})",
        ]
        gpus = doc["cuda"]["devices"]
        lines.append(
            "cuda: "
            + (
                "; ".join(
                    f"cuda:{g['index']} {g['name']} (compute capability {g['compute_capability']}, "
                    f"{human_bytes(g['memory_bytes'])}{', bf16' if g['bf16'] else ''})"
                    for g in gpus
                )
                or f"no GPU visible (torch built for CUDA {doc['cuda']['torch_built_for'] or 'none'})"
            )
        )
        t = doc["threads"]
        lines.append(
            f"threads: {t['cores']} core(s) usable, torch {t['torch']}, OMP_NUM_THREADS "
            f"{t['OMP_NUM_THREADS'] or 'unset'}, SWEEPER_THREADS {t['SWEEPER_THREADS'] or 'unset'}"
        )
    d = doc["disk"]
    lines.append(
        f"disk: {human_bytes(d['free_bytes'])} free under {d['home']} (the home holds {human_bytes(d['home_bytes'])})"
    )
    lines.append(f"storage {doc['storage']}: {doc['checks']['storage']}")
    lines.append(f"tracking {doc['tracking_uri']}: {doc['checks']['tracking']}")
    return "\n".join(lines)
