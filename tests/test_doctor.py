"""`sweeper doctor` and `--version`: what the machine offers a worker, read from the machine itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import sweeper, write_spec

from sweeper import doctor

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_cpu_flags_and_class_from_cpuinfo():
    assert doctor.cpu_flags(AVX2_ONLY) == {
        "avx2": True,
        "avx512f": False,
        "avx512_bf16": False,
        "amx_tile": False,
        "amx_bf16": False,
    }
    assert doctor.cpu_class(doctor.cpu_flags(AVX2_ONLY)) == "fp32-only"
    assert doctor.cpu_class(doctor.cpu_flags(SAPPHIRE)) == "AMX"
    assert doctor.cpu_class(doctor.cpu_flags("flags : avx512f avx512_bf16\n")) == "AVX512-BF16"
    assert doctor.cpu_class(doctor.cpu_flags("")) == "fp32-only"


def test_dir_size_counts_the_files_and_human_bytes_reads_well(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"0" * 1500)
    (tmp_path / "y").write_bytes(b"0" * 500)
    assert doctor.dir_size(tmp_path) == 2000 and doctor.dir_size(tmp_path / "missing") == 0
    assert doctor.human_bytes(1_900_000_000) == "1.9 GB" and doctor.human_bytes(2000) == "2.0 kB"


@pytest.mark.slow
def test_doctor_reports_versions_device_threads_disk_and_stores(sweeper_env, tmp_path):
    import mlflow
    import optuna
    import torch

    from sweeper import tracking

    sweeper("launch", "--study", str(write_spec(tmp_path / "doc.toml")), env=sweeper_env)  # the Optuna store
    tracking.client(f"sqlite:///{sweeper_env['SWEEPER_HOME']}/mlflow.db")  # the MLflow one (a worker's first act)
    doc = json.loads(sweeper("doctor", "--format", "json", env=sweeper_env).stdout)
    assert doc["ok"] and doc["checks"] == {"storage": "ok", "tracking": "ok"}
    assert torch.__version__.startswith(doc["versions"]["torch"])
    assert doc["versions"]["mlflow"] == mlflow.__version__ and doc["versions"]["optuna"] == optuna.__version__
    assert set(doc["cpu"]["flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    assert doc["cpu"]["flags"] == doctor.cpu_flags(Path("/proc/cpuinfo").read_text())
    # bf16 is a candidate of precision auto exactly where the CPU has AVX512-BF16 or AMX (or on a bf16 GPU)
    fast = doc["cpu"]["flags"]["avx512_bf16"] or doc["cpu"]["flags"]["amx_bf16"]
    if doc["device_auto"] == "cpu":
        assert ("bf16" in doc["precision_auto_candidates"]) == fast
    assert doc["threads"]["cores"] >= 1 and doc["threads"]["OMP_NUM_THREADS"] == 1
    assert doc["cuda"]["devices"] == [] or doc["cuda"]["devices"][0]["compute_capability"]
    assert doc["disk"]["free_bytes"] > 0 and doc["disk"]["home"] == sweeper_env["SWEEPER_HOME"]
    assert doc["disk"]["home_bytes"] > 0  # the two SQLite files

    text = sweeper("doctor", env=sweeper_env).stdout
    assert f"torch {doc['versions']['torch']}" in text and "precision auto chooses among: " in text
    assert f"class {doc['cpu']['class']}" in text and "storage sqlite:///" in text and ": ok" in text
    assert "free under" in text
    quiet = sweeper("doctor", "--quiet", env=sweeper_env)
    assert quiet.stdout == "" and quiet.returncode == 0

    version = sweeper("--version", env=sweeper_env).stdout
    assert version.startswith("sweeper 0.1.0 (python ") and f"optuna {optuna.__version__}" in version
    assert f"mlflow {mlflow.__version__}" in version and "torch " in version
