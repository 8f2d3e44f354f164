"""The worker's device, bound before anything is claimed, and its GPU's system metrics.

There is no GPU here: the CLI cases run the real `sweeper worker` on this CPU host; the cases
that need a GPU present fake the few torch.cuda queries (or NVML) they depend on.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from sweeper import device, system_metrics
from sweeper.errors import SweeperError


def run_worker(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SWEEPER_", "MLFLOW_", "CUDA_VISIBLE"))}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sweeper",
            "worker",
            "--storage",
            f"sqlite:///{tmp_path}/optuna.db",
            "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
            *args,
        ],
        env={**base, "SWEEPER_HOME": str(tmp_path / "home"), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_worker_asked_for_a_gpu_on_a_host_without_one_exits_2_before_touching_the_stores(tmp_path):
    proc = run_worker(tmp_path, "--device", "cuda:2")
    assert proc.returncode == 2, proc.stderr
    assert "--device cuda:2: no CUDA GPU is visible to this process" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists(), "nothing claimed"


@pytest.mark.slow
def test_worker_with_a_device_that_does_not_exist_exits_2(tmp_path):
    proc = run_worker(tmp_path, "--device", "gpu0")
    assert proc.returncode == 2, proc.stderr
    assert "--device 'gpu0' is not a device; use auto, cpu, cuda, cuda:N or mps" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "optuna.db").exists()


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as it looks with CUDA_VISIBLE_DEVICES=2,3 on a four-GPU host."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_an_index_past_the_visible_gpus_names_the_renumbering(two_gpus):
    # SWEEPER_GPUS=2,3 with CUDA_VISIBLE_DEVICES=2,3 used to give cuda:2 and fail every trial
    with pytest.raises(device.BadDevice) as e:
        device.bind("cuda:2")
    assert str(e.value) == (
        "--device cuda:2: there is no GPU cuda:2; this process sees 2 (cuda:0 to cuda:1); "
        "CUDA_VISIBLE_DEVICES=2,3 renumbers the GPUs it lists from 0, so --device and SWEEPER_GPUS take those numbers"
    )


def test_a_broken_gpu_stops_the_worker_with_the_runtime_error(two_gpus, monkeypatch):
    def broken(dev):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered\nmore lines")

    monkeypatch.setattr(torch.cuda, "set_device", broken)
    with pytest.raises(SweeperError, match=r"GPU cuda:1 is not usable \(AcceleratorError: CUDA error: an illegal") as e:
        device.bind("cuda:1")
    assert not isinstance(e.value, device.BadDevice), "a broken GPU is not bad input"
    assert "more lines" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("expect_gpu", [True, False])
def test_auto_falls_back_to_the_cpu_loudly_only_where_a_gpu_was_asked_for(caplog, expect_gpu):
    with caplog.at_level(logging.WARNING, logger="sweeper.device"):
        assert device.bind("auto", expect_gpu=expect_gpu) == torch.device("cpu")
    loud = [r.getMessage() for r in caplog.records if "TRAINS ON THE CPU" in r.getMessage()]
    assert len(loud) == (1 if expect_gpu else 0)


def test_compile_auto_is_on_for_cuda_only_and_needs_a_c_compiler(monkeypatch):
    assert device.resolve_compile("auto", torch.device("cpu")) is False
    assert device.resolve_compile("on", torch.device("cpu")) is True
    assert device.resolve_compile("off", torch.device("cuda:0")) is False
    assert device.resolve_compile("auto", torch.device("cuda:0")) is True
    monkeypatch.setattr(device.shutil, "which", lambda name: None)
    monkeypatch.delenv("CC", raising=False)
    assert device.resolve_compile("auto", torch.device("cuda:0")) is False, "no compiler: eager, with a warning"
    with pytest.raises(device.BadDevice, match="needs a C compiler"):
        device.resolve_compile("on", torch.device("cuda:0"))


# --- the worker's own GPU in NVML --------------------------------------------------------------


class FakeNVML:
    """nvidia-ml-py's calls that sweeper makes, for a host with four GPUs."""

    class NVMLError(Exception):
        pass

    def __init__(self, uuids: list[str]):
        self.uuids = uuids

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return self.uuids[h].encode() if h % 2 else self.uuids[h]  # old versions return bytes

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=(h + 1) * 10**9, total=100 * 10**9)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=10 * (h + 1))

    def nvmlDeviceGetPowerUsage(self, h):
        return 100_000 * (h + 1)

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000


UUIDS = [f"GPU-{i}{i}{i}{i}aaaa-0000-1111-2222-33334444555{i}" for i in range(4)]


def test_the_workers_gpu_is_found_by_uuid_and_its_metrics_carry_the_hosts_index():
    nvml = FakeNVML(UUIDS)
    # CUDA_VISIBLE_DEVICES=2,3 and cuda:1: NVML's GPU 3, whose UUID torch gives without "GPU-"
    torch_uuid = UUIDS[3].removeprefix("GPU-").upper()
    index, handle = system_metrics.nvml_index(nvml, torch_uuid)
    assert index == 3
    monitor = system_metrics.gpu_monitor(torch_uuid, nvml)
    monitor.collect_metrics()
    assert monitor.aggregate_metrics() == {
        "gpu_3_memory_usage_percentage": 4.0,
        "gpu_3_memory_usage_megabytes": 4000.0,
        "gpu_3_utilization_percentage": 40,
        "gpu_3_power_usage_watts": 400.0,
        "gpu_3_power_usage_percentage": 57.1,
    }
    assert system_metrics.gpu_monitor("ffffffff-0000-1111-2222-333344445555", nvml) is None


def test_system_metrics_keep_only_the_workers_gpu(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(UUIDS))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a run-less file store: no database to set up
    monitor = system_metrics.start("0" * 32, f"file://{tmp_path}/mlruns", UUIDS[2].removeprefix("GPU-"))
    try:
        gpu = [m for m in monitor.monitors if "gpu" in type(m).__name__.lower()]
        assert [type(m).__name__ for m in gpu] == ["OneGPUMonitor"] and gpu[0].prefix == "gpu_2_"
    finally:
        monitor.finish()
    cpu_worker = system_metrics.start("0" * 32, f"file://{tmp_path}/mlruns", None)
    try:
        assert not [m for m in cpu_worker.monitors if "gpu" in type(m).__name__.lower()]
    finally:
        cpu_worker.finish()


@pytest.mark.parametrize("processes, threads", [(1, 8), (4, 4), (32, 1)])
def test_each_compiling_worker_gets_its_share_of_the_hosts_cores(monkeypatch, processes, threads):
    """inductor's default is one compile process per core in every worker: K packed workers on a
    16-core host would start 16 K of them."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(device.os, "cpu_count", lambda: 16)
    monkeypatch.setenv("CC", "cc")
    with inductor.patch(compile_threads=inductor.compile_threads):  # restored afterwards
        engine = device.prepare("cpu", "fp32", "on", processes_per_host=processes)
        assert engine.compile and inductor.compile_threads == threads
    assert engine.fit_options() == {"device": "cpu", "precision": "fp32", "compile": True}
