"""The engine a worker trains with: its device bound and checked once, its precision and compile.

A worker binds its device before it claims anything, so a missing, invalid or broken GPU stops
it with one message instead of failing every trial it claims (each four times, within minutes).
``benchmarks/gpu_check.py`` measures the same engine, through the same :func:`prepare`.

Imports torch, never Optuna or MLflow.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch

from sweeper import settings
from sweeper.errors import SweeperError
from sweeper.train import resolve_device, resolve_precision

log = logging.getLogger("sweeper.device")

COMPILE_CHOICES = ("auto", "on", "off")
# Inductor starts a pool of compile processes per process (16 on a 16-core host); K packed
# workers x that pool oversubscribe the host for minutes. Each worker gets its share, at most this.
MAX_COMPILE_THREADS = 8


class BadDevice(SweeperError):
    """A device that does not exist on this host: bad input (the CLI exits 2)."""


@dataclass(frozen=True)
class Engine:
    """How this process trains: what ``sweeper worker`` passes to every fit()."""

    device: torch.device
    precision: str  # fp32 or bf16, or auto: fit() measures the fastest mode per model and shape
    compile: bool
    gpu_uuid: str | None = None  # the bound GPU's, to find it in NVML (system metrics)

    def fit_options(self) -> dict[str, Any]:
        return {"device": str(self.device), "precision": self.precision, "compile": self.compile}


def prepare(
    device: str = "auto",
    precision: str = "auto",
    compile: str = "auto",
    *,
    expect_gpu: bool = False,
    processes_per_host: int = 1,
) -> Engine:
    """Bind the device (fail fast), resolve precision and compile, bound inductor's compile pool."""
    if compile not in COMPILE_CHOICES:
        raise BadDevice(f"--compile {compile!r} is not one of {', '.join(COMPILE_CHOICES)}")
    dev = bind(device, expect_gpu=expect_gpu)
    try:
        prec = resolve_precision(precision, dev)  # checks an explicit one on this device
    except ValueError as e:
        raise BadDevice(str(e)) from None
    if precision == "auto":
        prec = "auto"  # measured per trial (sweeper.precision): the fastest mode depends on the shapes
    compiled = resolve_compile(compile, dev)
    if compiled:
        import torch._inductor.config as inductor

        inductor.compile_threads = max(1, min(MAX_COMPILE_THREADS, (os.cpu_count() or 1) // processes_per_host))
    log.info("engine: %s, %s, compile %s", describe(dev), prec, "on" if compiled else "off")
    return Engine(dev, prec, compiled, cuda_uuid(dev) if dev.type == "cuda" else None)


def bind(spec: str = "auto", *, expect_gpu: bool = False) -> torch.device:
    """The device ``spec`` names, checked: it exists, and a GPU is made current and touched."""
    if spec == "auto":
        dev = resolve_device("auto")
        if dev.type != "cuda" and expect_gpu:
            log.warning(
                "!!! --device auto found no usable CUDA GPU (torch %s, built for CUDA %s, "
                "CUDA_VISIBLE_DEVICES=%s), but this worker was started to train on one: it TRAINS ON "
                "THE %s, many times slower. Check `nvidia-smi` in the container and the NVIDIA "
                "container toolkit, or set SWEEPER_DEVICE=cpu if the CPU is intended. !!!",
                torch.__version__,
                torch.version.cuda or "none",
                "(unset)" if settings.cuda_visible_devices() is None else settings.cuda_visible_devices(),
                dev.type.upper(),
            )
    else:
        try:
            dev = torch.device(spec)
        except (RuntimeError, ValueError):
            raise BadDevice(f"--device {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        return _bind_cuda(spec, dev)
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BadDevice(f"--device {spec}: Apple's MPS is not available on this host; use auto or cpu")
    if dev.type not in ("cpu", "mps"):
        raise BadDevice(f"--device {spec}: sweeper trains on cpu, cuda, cuda:N or mps, not {dev.type}")
    return dev


def _bind_cuda(spec: str, dev: torch.device) -> torch.device:
    visible = settings.cuda_visible_devices()
    if not torch.cuda.is_available():
        raise BadDevice(
            f"--device {spec}: no CUDA GPU is visible to this process (torch {torch.__version__}, built for "
            f"CUDA {torch.version.cuda or 'none'}; CUDA_VISIBLE_DEVICES={visible if visible is not None else '(unset)'})."
            " Check `nvidia-smi`, or use --device auto or cpu on a host without a GPU."
        )
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        hint = (
            f"; CUDA_VISIBLE_DEVICES={visible} renumbers the GPUs it lists from 0, so --device and "
            "SWEEPER_GPUS take those numbers"
            if visible
            else ""
        )
        raise BadDevice(
            f"--device {spec}: there is no GPU cuda:{index}; this process sees {count} "
            f"(cuda:0 to cuda:{count - 1}){hint}"
        )
    dev = torch.device("cuda", index)
    try:
        torch.cuda.set_device(dev)
        torch.ones(1, device=dev).add_(1).item()  # a sticky runtime error shows here, not in a trial
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SweeperError(
            f"GPU {dev} is not usable ({type(e).__name__}: {first}); this worker claims no trial. Check "
            "`nvidia-smi` on the host (a GPU in an error state needs a reset), or give the worker another GPU."
        ) from None
    return dev


def resolve_compile(choice: str, device: torch.device) -> bool:
    """``auto``: compile on CUDA (a batch-64 step is launch-bound there; CUDA graphs remove that),
    eager elsewhere. Compiling needs a C compiler (Triton's launchers, inductor's C++ kernels)."""
    if choice == "off" or (choice == "auto" and device.type != "cuda"):
        return False
    if not (settings.c_compiler() or shutil.which("cc") or shutil.which("gcc")):
        message = "torch.compile needs a C compiler (cc or gcc on PATH, or $CC) and this host has none"
        if choice == "on":
            raise BadDevice(f"--compile on: {message}; install gcc, or use --compile off")
        log.warning("%s: training eagerly (install gcc for compiled training, --compile off to silence this)", message)
        return False
    return True


def describe(dev: torch.device) -> str:
    if dev.type != "cuda":
        return str(dev)
    major, minor = torch.cuda.get_device_capability(dev)
    return f"{dev} ({torch.cuda.get_device_name(dev)}, compute capability {major}.{minor})"


def cuda_uuid(dev: torch.device) -> str:
    """The GPU's UUID as NVML spells it without the ``GPU-`` prefix, lower case."""
    return normalize_uuid(str(torch.cuda.get_device_properties(dev).uuid))


def normalize_uuid(uuid: str | bytes) -> str:
    if isinstance(uuid, bytes):  # older nvidia-ml-py returns bytes
        uuid = uuid.decode()
    uuid = uuid.strip().lower()
    return uuid[4:] if uuid.startswith("gpu-") else uuid
