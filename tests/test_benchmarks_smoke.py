"""Smoke tests of the benchmark scripts: they run, on a CPU, in well under a minute together.

The figures are not checked (the machine may be busy): only that every code path runs and the
output has the shape people and scripts read.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI")}
    env.update(
        SWEEPER_HOME=str(tmp_path / "home"),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        PYTHON=sys.executable,
        TMPDIR=str(tmp_path),
    )
    return env


def _gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(_gpu_present(), reason="a GPU is present: gpu_check.sh would run for real")
def test_gpu_check_sh_without_a_gpu_exits_2_and_says_why(tmp_path):
    logdir = tmp_path / "gpu-log"
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), str(logdir)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA GPU is visible" in proc.stderr and "--dry-run-cpu" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no CUDA GPU is visible" in (logdir / "gpu_check.log").read_text(), "the log keeps the reason"


def test_gpu_check_sh_needs_a_logdir(tmp_path):
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh")], env=_env(tmp_path), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 64 and "usage:" in proc.stderr


def test_gpu_check_dry_run_on_cpu_prints_the_table_last(tmp_path):
    logdir = tmp_path / "dry"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu_check.py"),
            "--dry-run-cpu",
            "--variants",
            "standard,short4",
            "--logdir",
            str(logdir),
        ],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("phase "))
    table = "\n".join(lines[header:])
    for expected in (
        "seed loop fp32 PIL DataLoader",
        "fit bf16+CL+GPU data",
        "fit, no compile",
        "packed x2 (aggregate)",
        "2-epoch standard run",
        "seed's 14-cell sweep projected",
        "target fit >= 20x seed loop",
    ):
        assert expected in table, f"{expected!r} missing from the table:\n{table}"
    assert lines[-1].startswith("target "), "the targets close the output"
    results = json.loads((logdir / "gpu_check.json").read_text())
    assert results["env"]["optuna_or_mlflow_imported"] == [], "the training layers import neither"
    failed = {k: v["error"] for k, v in results["phases"].items() if "error" in v}
    assert not failed, failed
    assert {"seed_standard_4", "fit_standard_4", "full_standard", "packed_2", "eager_short4_16"} <= set(
        results["phases"]
    )
    assert results["phases"]["full_standard"]["finished"] and results["phases"]["full_standard"]["epochs_done"] == 2
    assert results["sweep_projection"]["projected_min"] > 0


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_gpu_check_time_bound_stops_a_stuck_phase():
    gpu_check = _load("gpu_check")
    started = time.monotonic()
    with pytest.raises(gpu_check.PhaseTimeout):
        with gpu_check.time_bound(0.2):
            time.sleep(5)
    assert time.monotonic() - started < 2


def test_sweep_scale_part_a_on_sqlite(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "sweep_scale.py"),
            "--part",
            "a",
            "--backends",
            "sqlite",
            "--cells",
            "40",
            "--baseline-cells",
            "12",
            "--repeats",
            "1",
            "--json",
        ],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    (a,) = result["a"]
    assert a["backend"] == "sqlite" and a["cells"] == 40 and a["baseline_cells"] == 12
    assert a["sweeper_launch_s"] > 0 and a["sweeper_relaunch_s"] > 0 and a["baseline_enqueue_s"] > 0
    assert a["baseline_projected_enqueue_s"] > 0 and set(a["targets"]) == {"enqueue_lt_10s", "relaunch_lt_5s"}


def test_sweep_scale_fit_quadratic_recovers_the_coefficients():
    sweep_scale = _load("sweep_scale")
    a, b = sweep_scale.fit_quadratic([(n, 0.02 * n + 0.0001 * n * n) for n in (50, 100, 150, 200, 250, 300)])
    assert a == pytest.approx(0.02, rel=1e-6) and b == pytest.approx(0.0001, rel=1e-6)
