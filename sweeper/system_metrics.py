"""MLflow system metrics on a trial's run: CPU, memory, disk, network, and the worker's own GPU.

MLflow's GPU monitor reports every GPU NVML sees, as ``gpu_0``, ``gpu_1``... in NVML's order,
which ignores ``CUDA_VISIBLE_DEVICES``: a worker on the host's GPU 3 (its ``cuda:0``) would log
GPU 0's figures. Here the worker's GPU is found by UUID and its metrics are named after the
host's index of it (``system/gpu_3_utilization_percentage``, as ``nvidia-smi`` numbers it).
GPU metrics need ``nvidia-ml-py`` (``pip install 'sweeper[gpu]'``, in the GPU image).
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor

from sweeper.device import normalize_uuid
from sweeper.redact import redact

log = logging.getLogger("sweeper.worker")


def nvml_index(nvml: ModuleType, uuid: str) -> tuple[int, Any] | None:
    """The host's (NVML's) index and handle of the GPU with this UUID; None when NVML lacks it."""
    want = normalize_uuid(uuid)
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        if normalize_uuid(nvml.nvmlDeviceGetUUID(handle)) == want:
            return index, handle
    return None


class OneGPUMonitor(BaseMetricsMonitor):
    """MLflow's GPU figures (memory, utilization, power) for one GPU, named by its host index."""

    def __init__(self, nvml: ModuleType, index: int, handle: Any):
        super().__init__()
        self.nvml, self.handle, self.prefix = nvml, handle, f"gpu_{index}_"

    def collect_metrics(self) -> None:
        nvml, h, m = self.nvml, self.handle, self._metrics
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(h)
            m[self.prefix + "memory_usage_percentage"].append(round(memory.used / memory.total * 100, 1))
            m[self.prefix + "memory_usage_megabytes"].append(memory.used / 1e6)
            m[self.prefix + "utilization_percentage"].append(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            power = nvml.nvmlDeviceGetPowerUsage(h)
            m[self.prefix + "power_usage_watts"].append(power / 1000)
            m[self.prefix + "power_usage_percentage"].append(power / nvml.nvmlDeviceGetEnforcedPowerLimit(h) * 100)
        except nvml.NVMLError as e:  # one missed sample; the next may work
            log.debug("GPU metrics sample failed: %s", e)

    def aggregate_metrics(self) -> dict[str, float]:
        return {k: round(sum(v) / len(v), 1) for k, v in self._metrics.items() if v}


def gpu_monitor(uuid: str, nvml: ModuleType | None = None) -> OneGPUMonitor | None:
    """A monitor of the GPU with this UUID, or None (with the reason logged) when there is none."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
        found = nvml_index(nvml, uuid)
    except ImportError:
        log.warning("no GPU system metrics: nvidia-ml-py is not installed (pip install 'sweeper[gpu]')")
        return None
    except Exception as e:
        log.warning("no GPU system metrics: NVML failed (%s)", e)
        return None
    if found is None:
        log.warning("no GPU system metrics: NVML lists no GPU with UUID %s", uuid)
        return None
    return OneGPUMonitor(nvml, *found)


def start(run_id: str, tracking_uri: str, gpu_uuid: str | None = None):
    """MLflow's sampler on the trial's run, with this worker's GPU only (none on a CPU worker);
    None when it cannot start."""
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True, tracking_uri=tracking_uri)
        monitor.monitors = [m for m in monitor.monitors if not isinstance(m, (GPUMonitor, ROCMMonitor))]
        if gpu_uuid is not None and (gpu := gpu_monitor(gpu_uuid)) is not None:
            monitor.monitors.append(gpu)
        monitor.start()
        return monitor
    except Exception as e:  # system metrics are a nicety: never fail a trial over them
        log.warning("system metrics are off for run %s: %s", run_id, redact(e))
        return None
