"""The engine commands through the real CLI in a subprocess: `sweeper models`, `sweeper train`.

The two slow commands start together when the module's first test needs them (one core each:
OMP_NUM_THREADS=1, as two OpenMP threads per process on a small shared machine make everything
wait on spinning threads), and each test then checks its own finished process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PARAMS  # variant -> (CIFAR-100, CIFAR-10) parameter counts

VARIANTS = ["naive", "standard", "long", "short", "short2", "short3", "short4"]
DATASETS = ["cifar10", "cifar100", "digits", "synthetic"]
MODULES = {"naive": 9, "standard": 9, "long": 12, "short": 7, "short2": 5, "short3": 3, "short4": 2}

# One 3x32x32 image, CIFAR-100 head (torch's flop counter, MACs = FLOPs / 2).
MACS_CIFAR100 = {
    "naive": 11_160_357_696,
    "standard": 1_521_848_320,
    "long": 1_737_723_904,
    "short": 1_270_321_152,
    "short2": 1_040_158_720,
    "short3": 364_810_240,
    "short4": 610_439_168,
}
STEM_RGB_MINUS_GREY = 2 * 9 * 192  # the stem conv reads 3 channels instead of 1


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slow_commands")]  # start them with the first test

TRAIN = ("train", "--variant", "short4", "--dataset", "digits", "--epochs", "3", "--format", "json")
MODELS = ("models", "--format", "json")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("home")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SWEEPER_") and k != "MLFLOW_TRACKING_URI"}
    return {**clean, "SWEEPER_HOME": str(home), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def start(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sweeper", *args],
        env=env,
        cwd=env["SWEEPER_HOME"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 400) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(proc.args[1:])} did not finish in {timeout} s\nstderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def sweeper(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return finish(start(*args, env=env))


@pytest.fixture(scope="module")
def slow_commands(env):
    """`train` and `models`, started at once; each test waits for its own."""
    procs = {"train": start(*TRAIN, env=env), "models": start(*MODELS, env=env)}
    done: dict[str, subprocess.CompletedProcess] = {}

    def result(name: str) -> subprocess.CompletedProcess:
        if name not in done:
            done[name] = finish(procs[name])
        return done[name]

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_help_works(env):
    proc = sweeper("--help", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    for command in ("train", "models"):
        assert re.search(rf"^\s+{command}\s", proc.stdout, re.M), proc.stdout
    proc = sweeper("train", "--help", env=env)
    assert proc.returncode == 0 and "--variant" in proc.stdout and "--format" in proc.stdout
    script = Path(sys.executable).parent / "sweeper"  # the installed console script
    if script.exists():
        proc = subprocess.run([str(script), "--help"], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "Usage: sweeper" in proc.stdout, proc.stderr


def test_models_json_is_the_exact_list(slow_commands):
    proc = slow_commands("models")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)  # the whole of stdout is one document
    assert [(r["dataset"], r["variant"]) for r in rows] == [(d, v) for d in DATASETS for v in VARIANTS]
    assert all(set(r) == {"variant", "dataset", "num_classes", "params", "macs", "inception_modules"} for r in rows)
    by = {(r["dataset"], r["variant"]): r for r in rows}
    for variant, (cifar100, cifar10) in PARAMS.items():
        assert by["cifar100", variant]["params"] == cifar100
        assert by["cifar10", variant]["params"] == cifar10
        assert by["synthetic", variant]["params"] == cifar10  # 10 classes, 3 channels
        assert by["digits", variant]["params"] == cifar10 - STEM_RGB_MINUS_GREY  # 10 classes, 1 channel
        assert by["cifar100", variant]["macs"] == MACS_CIFAR100[variant]
        for dataset in DATASETS:
            row = by[dataset, variant]
            assert row["inception_modules"] == MODULES[variant]
            assert row["num_classes"] == (100 if dataset == "cifar100" else 10)
            assert isinstance(row["macs"], int) and row["macs"] > 0
        # 90 more classes are 90 x (classifier input width) more MACs: b5's 1024 channels, or for the
        # naive blocks, whose pools pass their input through, 4,944.
        width = 4944 if variant == "naive" else 1024
        assert by["cifar100", variant]["macs"] - by["cifar10", variant]["macs"] == 90 * width
        assert by["digits", variant]["macs"] < by["cifar10", variant]["macs"]  # 8x8 images
    for dataset in DATASETS:
        assert by[dataset, "naive"]["macs"] > by[dataset, "standard"]["macs"]


def test_train_json_is_one_document_and_progress_goes_to_stderr(slow_commands):
    proc = slow_commands("train")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["variant"] == "short4" and result["dataset"] == "digits"
    assert result["top1_error"] < 0.1
    assert 0 <= result["top5_error"] <= result["top1_error"]
    assert result["test_loss"] > 0 and result["train_seconds"] > 0
    assert result["params"] == PARAMS["short4"][1] - STEM_RGB_MINUS_GREY
    assert result["macs"] > 0
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert result["history"][-1]["top1_error"] == result["top1_error"]
    assert result["recipe"]["epochs"] == 3
    for epoch in (1, 2, 3):
        assert re.search(
            rf"^epoch\s+{epoch}/3\s+train_loss [0-9.]+\s+test_loss [0-9.]+\s+top1_error", proc.stderr, re.M
        ), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--variant", "tiny", "--dataset", "digits"),
            "unknown variant 'tiny'; choose one of: naive, standard, long, short, short2, short3, short4",
        ),
        (
            ("--variant", "short4", "--dataset", "mnist"),
            "unknown dataset 'mnist'; choose one of: cifar10, cifar100, digits, synthetic",
        ),
    ],
)
def test_unknown_names_exit_2_and_list_the_valid_ones(env, args, message):
    proc = sweeper("train", *args, "--epochs", "1", "--format", "json", env=env)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
