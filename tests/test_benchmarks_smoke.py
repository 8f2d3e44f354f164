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


@pytest.mark.slow
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


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu_writes_its_json_after_every_phase_and_the_table_last(tmp_path):
    logdir = tmp_path / "dry"
    out = logdir / "gpu_check.json"
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "gpu_check.py"), "--dry-run-cpu", "--logdir", str(logdir)],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    snapshots: list[list[str]] = []  # the phases in the JSON, each time it changed, while the check ran
    try:
        while proc.poll() is None:
            if out.exists():
                phases = list(json.loads(out.read_text())["phases"])  # never half-written
                if not snapshots or phases != snapshots[-1]:
                    snapshots.append(phases)
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    results = json.loads(out.read_text())
    phases = list(results["phases"])
    assert phases == [
        "seed", "worker", "worker_other", "full", "packed@2", "seed_big", "worker_big", "worker_big_other"
    ]  # fmt: skip
    assert all(snap == phases[: len(snap)] for snap in snapshots), "each write adds the phase just done"
    assert len(snapshots) >= len(phases) // 2, f"the JSON grew phase by phase, not once at the end: {snapshots}"
    assert results["complete"] and results["env"]["optuna_or_mlflow_imported"] == []
    assert results["env"]["engine"] == {
        "device": "cpu",
        "precision": results["env"]["engine"]["precision"],
        "compile": False,
    }
    failed = {k: v["error"] for k, v in results["phases"].items() if "error" in v}
    assert not failed, failed
    full = results["phases"]["full"]
    assert full["finished"] and full["epochs_done"] == 2 and full["checkpoint_mb"] > 0
    assert results["phases"]["worker_other"]["skipped"].startswith("dry run")
    assert results["sweep_projection"]["projected_min"] > 0
    lines = stdout.strip().splitlines()
    table = "\n".join(lines[next(i for i, line in enumerate(lines) if line.startswith("phase ")) :])
    for expected in ("seed ", "worker ", "full ", "packed@2 ", "checkpoint ", "target worker path at batch 4"):
        assert expected in table, f"{expected!r} missing from the table:\n{table}"
    assert lines[-1].startswith("target "), "the targets close the output"


def _load(name: str):
    if str(BENCH) not in sys.path:  # benchmarks import their shared modules as siblings
        sys.path.insert(0, str(BENCH))
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_train_throughput_precision_table_row(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "train_throughput.py"), "--precision-table", "--variants", "short4"]
        + ["--datasets", "digits", "--batch-size", "8", "--steps", "1", "--json"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)["rows"]
    assert (row["variant"], row["dataset"], row["batch_size"]) == ("short4", "digits", 8)
    assert row["auto"] in row["modes"] and 0 < row["auto_vs_fastest"] <= 1
    for mode in row["modes"].values():
        assert mode["cold_first_step_s"] > 0 and mode["images_per_s"] > 0


@pytest.mark.slow
def test_train_throughput_reports_the_worst_repeat(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "train_throughput.py"), "--variant", "short4", "--batch-size", "8"]
        + ["--steps", "1", "--warmup", "1", "--num-workers", "0", "--repeats", "2", "--json"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["ratios"]) == 2 and report["ratio"] == min(report["ratios"]) > 0
    assert report["best_ratio"] >= report["ratio"]


@pytest.mark.slow
def test_server_cost_counts_what_a_trial_asks_of_postgresql_and_the_mlflow_server(tmp_path, postgres_available):
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "server_cost.py"),
            "--trials",
            "2",
            "--epochs",
            "1",
            "--cadences",
            "default",
            "--check-workers",
            "",
            "--upload-mb",
            "1",
            "--json",
        ],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    (run,) = result["runs"]
    assert run["workers_saw"]["trials"] == 2 and run["worker_exits"] == [0] and run["workers_saw"]["errors"] == 0
    per_trial = run["per_trial"]
    assert per_trial["optuna_statements"] > 0 and per_trial["optuna_xacts"] > 0
    assert per_trial["mlflow_db_statements"] > 0 and per_trial["mlflow_db_xacts"] > 0
    assert per_trial["http_requests"] > 0 and per_trial["mlflow_server_cpu_s"] > 0
    assert all(p["workers"] >= 0 and p["bound_by"] for p in result["projection"])


def test_server_cost_model_splits_per_trial_and_per_epoch_and_takes_the_tightest_bound():
    server_cost = _load("server_cost")
    costs = server_cost.solve({2: {"q": 10 + 2 * 3.0}, 6: {"q": 10 + 6 * 3.0}})
    assert costs["q"]["per_trial"] == pytest.approx(10) and costs["q"]["per_epoch"] == pytest.approx(3)

    def per(trial: float, epoch: float = 0.0) -> dict[str, float]:
        return {"per_trial": trial, "per_epoch": epoch}

    plain = {
        "optuna_statements": per(100, 10),
        "optuna_xacts": per(60, 8),
        "mlflow_db_xacts": per(100),
        "http_requests": per(40),
        "postgres_cpu_s": per(0.1),
        "mlflow_server_cpu_s": per(0.5),
        "worker_outside_training_s": per(2.0),
    }
    inputs = {
        "heartbeat": {"statements_per_beat": 4, "xacts_per_beat": 2, "postgres_cpu_s_per_beat": 0.001},
        "upload": {"server_cpu_s_per_mb": 0.0},
        "checkpoint_mb": 0,
        "model_mb": 0,
        "epoch_s": 30.0,
        "rho_max": 0.7,
        "mlflow_server_workers": 4,
        "connections": {"max_connections": 10_000, "reserved": 0, "mlflow_server": 0, "per_worker": 2},
    }
    one = server_cost.project({"default": plain}, inputs, 60.0, cores=1)
    assert one["bound_by"] == "mlflow_cpu" and one["workers"] == int(0.7 * 62.0 / 0.5)  # rho * cycle / cpu
    doubled = server_cost.project({"default": {**plain, "mlflow_server_cpu_s": per(1.0)}}, inputs, 60.0, cores=1)
    assert doubled["workers"] == int(0.7 * 62.0 / 1.0)
    inputs["connections"]["max_connections"] = 41
    assert server_cost.project({"default": plain}, inputs, 60.0, cores=1)["bound_by"] == "postgres_connections"


# --- the profile tables: sweep_scale (c) times a trial by the worker's public phases --------------

PHASES = ("claim", "trial", "prepare", "train", "epoch", "finish", "model")  # what every completed trial meets


def test_phase_times_make_one_row_per_phase_per_trial_in_a_trials_order():
    harness = _load("harness")
    phases = harness.PhaseTimes()
    for _ in range(2):  # two trials, as the worker reports them (inner phases end first)
        phases("claim", 0.01)
        phases("prepare", 0.1)
        phases("epoch", 0.02)
        phases("epoch", 0.02)
        phases("train", 0.05)
        phases("finish", 0.03)
        phases("trial", 0.2)
        phases("model", 0.5)
    rows = phases.rows(trials=2)
    assert [r["phase"] for r in rows] == ["claim", "trial", "prepare", "train", "epoch", "finish", "model"]
    epoch = next(r for r in rows if r["phase"] == "epoch")
    assert epoch == {"phase": "epoch", "calls_per_trial": 2.0, "ms_per_trial": 40.0}
    assert len(phases.intervals) == 2 and all(end - start == pytest.approx(0.2) for start, end in phases.intervals)


@pytest.mark.slow  # starts workers (and their model helper processes): about a minute on 2 busy cores
def test_sweep_scale_part_c_prints_a_profile_table_by_phase(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "sweep_scale.py"), "--part", "c", "--c-trials", "1", "--c-rounds", "1"]
        + ["--c-epochs", "2", "--no-profile"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line.split() for line in proc.stdout.splitlines() if line.startswith("    ")]
    assert [row[0] for row in table] == list(PHASES), proc.stdout
    for row in table:
        assert float(row[1]) > 0 and row[2] == "calls" and float(row[3]) >= 0 and row[4] == "ms/trial", row
    assert "model export" in proc.stdout


def _sweeper_names(tree) -> set[str]:
    """The names a benchmark binds to sweeper or one of its modules (import sweeper.x as y, from sweeper import x)."""
    import ast

    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] == "sweeper"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sweeper":
            names |= {a.asname or a.name for a in node.names}
    return names


def test_benchmarks_assign_nothing_inside_sweeper():
    """They use the worker's public hooks (WorkerConfig.fit, build_model, on_phase), never patch it."""
    import ast

    patched = []
    for path in sorted(BENCH.glob("*.py")):
        tree = ast.parse(path.read_text())
        names = _sweeper_names(tree)
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                root = target
                while isinstance(root, ast.Attribute):
                    root = root.value
                if target is not root and isinstance(root, ast.Name) and root.id in names:
                    patched.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
                patched.append(f"{path.name}:{node.lineno} setattr")
    assert not patched, patched


@pytest.mark.slow  # a PgBouncer, an mlflow server, a pool of light workers: about two minutes on 2 busy cores
def test_fleet_runs_every_trial_once_through_pgbouncer_and_the_mlflow_server(tmp_path, pgbouncer):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "fleet.py"), "--workers", "3", "--trials", "4", "--trial-seconds", "1", "--json"]
        + ["--workers-per-process", "2"]  # two processes: threads and forks both
        + ["--mlflow-server", "gunicorn"],  # its access log counted too (server_cost's test runs uvicorn)
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    keys = {"workers", "trials_done", "lost", "duplicated", "efficiency", "pg_connections_max"}
    keys |= {"sql_transactions_per_trial", "http_requests_per_trial", "mlflow_server_cpu_ms_per_trial"}
    assert keys | {"claim_p50_ms", "claim_p99_ms"} <= set(result)
    assert result["workers"] == 3 and result["processes"] == 2 and result["mlflow_server"] == "gunicorn"
    assert result["trials_done"] == 4 and result["lost"] == 0 and result["duplicated"] == 0
    assert result["outcome"]["runs_checked"] == 4 and result["error_lines"] == 0 and not result["errors"]
    assert 0 < result["efficiency"] <= 1 and 0 < result["pg_connections_max"] <= 30
    assert 0 < result["efficiency_cpu_bound"] <= 1 and result["cpu_s_per_trial"] > 0
    assert result["http_requests_per_trial"] > 0 and result["sql_transactions_per_trial"] > 0
    assert 0 < result["claim_p50_ms"] <= result["claim_p99_ms"]
    assert all(row["first_bottleneck"] for row in result["projection"])
