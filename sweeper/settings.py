"""The one place that reads environment variables.

Command-line options override these (click reads the same names through ``envvar=``, named
here). Writes for child processes and libraries (a worker's environment, MLflow's HTTP settings)
stay where they are made.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "SWEEPER_HOME"
ENV_STORAGE = "SWEEPER_STORAGE"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_DATA_DIR = "SWEEPER_DATA_DIR"
ENV_HEARTBEAT_INTERVAL = "SWEEPER_HEARTBEAT_INTERVAL"
ENV_GRACE_PERIOD = "SWEEPER_GRACE_PERIOD"
ENV_WORKERS_PER_GPU = "SWEEPER_WORKERS_PER_GPU"
ENV_DEVICE = "SWEEPER_DEVICE"
ENV_COMPILE = "SWEEPER_COMPILE"
# Set by a deployment that gives the worker a GPU (the compose GPU service, the k8s job): with
# --device auto, a worker that finds no usable GPU then says so loudly instead of quietly using the CPU.
ENV_EXPECT_GPU = "SWEEPER_EXPECT_GPU"
ENV_CACHE_DIR = "SWEEPER_CACHE_DIR"
ENV_NOTIFY_URL = "SWEEPER_NOTIFY_URL"
# Set by containers (compose, k8s) to the physical host: a container's hostname is its own.
ENV_HOST_ID = "SWEEPER_HOST_ID"
# Read by click only (``envvar=`` of the option of the same name).
ENV_STUDY = "SWEEPER_STUDY"
ENV_YES = "SWEEPER_YES"
ENV_THREADS = "SWEEPER_THREADS"
ENV_TRACKING_OUTAGE_LIMIT = "SWEEPER_TRACKING_OUTAGE_LIMIT"
ENV_GPUS = "SWEEPER_GPUS"
# Other programs' variables sweeper reads.
ENV_TRACKING_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
ENV_OMP_THREADS = "OMP_NUM_THREADS"
ENV_CUDA_VISIBLE = "CUDA_VISIBLE_DEVICES"
ENV_C_COMPILER = "CC"
ENV_XDG_CACHE = "XDG_CACHE_HOME"


def home() -> Path:
    """Where the embedded stores live: ``$SWEEPER_HOME``, default ``./.sweeper``."""
    return Path(os.environ.get(ENV_HOME) or Path.cwd() / ".sweeper").expanduser().absolute()


def data_dir() -> Path:
    value = os.environ.get(ENV_DATA_DIR)
    return Path(value).expanduser().absolute() if value else home() / "data"


def cache_dir() -> Path:
    """Per-machine caches (measured precision choices): ``$SWEEPER_CACHE_DIR``, else the XDG cache."""
    value = os.environ.get(ENV_CACHE_DIR)
    if value:
        return Path(value).expanduser().absolute()
    return Path(os.environ.get(ENV_XDG_CACHE) or Path.home() / ".cache").expanduser() / "sweeper"


def storage_url() -> str | None:
    return os.environ.get(ENV_STORAGE) or None


def tracking_uri() -> str | None:
    return os.environ.get(ENV_TRACKING_URI) or None


def tracking_uri_variable() -> str | None:
    """``$MLFLOW_TRACKING_URI`` exactly as set (None: unset), to put back after a change."""
    return os.environ.get(ENV_TRACKING_URI)


def tracking_password() -> str:
    """The password MLflow sends as basic auth (``$MLFLOW_TRACKING_PASSWORD``), "" if unset."""
    return os.environ.get(ENV_TRACKING_PASSWORD, "")


def omp_threads() -> int | None:
    """``$OMP_NUM_THREADS`` when set to a count (None: not set)."""
    return env_int(ENV_OMP_THREADS, 0) or None


def cuda_visible_devices() -> str | None:
    """``$CUDA_VISIBLE_DEVICES`` as set (None: unset, every GPU is visible)."""
    return os.environ.get(ENV_CUDA_VISIBLE)


def c_compiler() -> str | None:
    """``$CC``: the C compiler torch.compile is told to use, if set."""
    return os.environ.get(ENV_C_COMPILER) or None


def expect_gpu() -> bool:
    return os.environ.get(ENV_EXPECT_GPU, "").strip().lower() in ("1", "true", "yes")


def notify_url() -> str | None:
    return os.environ.get(ENV_NOTIFY_URL) or None


def host_id() -> str:
    """The physical host GPU slots are counted on: ``$SWEEPER_HOST_ID``, else the hostname."""
    import socket

    return os.environ.get(ENV_HOST_ID) or socket.gethostname()


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default
