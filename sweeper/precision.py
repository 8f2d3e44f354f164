"""``precision="auto"``: the fastest mode for this model, input and batch size.

A mode is a precision (fp32, bf16, and TF32 on CUDA) and a memory layout (contiguous NCHW or
channels_last). Which is fastest depends on the shapes, not only on the hardware: on a CPU with
AMX, bf16 wins by a wide margin for CIFAR-sized images and loses to fp32 for 8x8 digits, where
each convolution is too small to amortize the conversions. So where the candidates differ in
precision (a CPU with fast bf16, a GPU), ``choose()`` times a few training steps of each mode on
a copy of the model and keeps the fastest; the answer is cached on disk per machine, torch
version and thread count, so each shape is probed once per machine. The probe's warm-up also
builds the kernels the trial then reuses. A probe costs a few steps of every mode; a trial too
short to earn that back (under PAYBACK times the probe's steps) trains in the rule's mode
instead, unless the cache already knows the answer. Counting steps assumes a probe's step costs
what a trial's does; cold kernels and a contended CPU break that, so the probe also stops before
its time would pass 1/PAYBACK of the trial's training at the fastest warm step it has seen, and
the trial trains in the rule's mode. A probe taken on an overloaded CPU (load over OVERLOAD per core) picks
the trial's mode but is not cached.

On a CPU without fast bf16 the only choice is between two fp32 layouts, which differ by less
than a probe costs (its cold steps are seconds for the big variants): ``rule()`` decides
(channels_last, as fast or faster in every row measured, digits and CIFAR shapes alike; see
docs/BENCHMARKS.md), never a probe on a trial's critical path.

>>> from sweeper.models import build_model
>>> import torch
>>> cpu = torch.device("cpu")
>>> choose(build_model("short4", 10, 1), (1, 8, 8), 4, cpu, cache=None, modes=candidates(cpu)).precision in KINDS
True
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sweeper.storage import locks

log = logging.getLogger(__name__)

KINDS = ("fp32", "tf32", "bf16")
WARMUP_STEPS = 1  # untimed: builds the kernels (oneDNN primitives, cuDNN plans) for the shapes
TIMED_STEPS = 2  # the fastest of these counts: robust to a neighbour's burst of load
# A probe only pays for itself on a trial of at least this many times its own steps: at best it
# saves the trial the gap between the rule's mode and the fastest (rarely over 2x), and it costs
# every mode's warm-up and timed steps, the cold first steps of oneDNN or cuDNN included.
PAYBACK = 10
# Load average per core above which a CPU probe is not cached: with the cores oversubscribed, a
# step's time says more about who got the cores than about the mode, and one unlucky probe would
# decide every later trial of the shape on this machine. Such a probe still picks this trial's
# mode; the next trial of the shape long enough to pay for a probe measures again.
OVERLOAD = 2.0


@dataclass(frozen=True)
class Mode:
    precision: str  # fp32 | tf32 (CUDA) | bf16 (autocast)
    channels_last: bool

    @property
    def label(self) -> str:
        return f"{self.precision}/{'channels_last' if self.channels_last else 'contiguous'}"


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run several times faster than fp32 on such CPUs."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cuda_has_native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores on this very GPU (compute capability 8.0+). torch's is_bf16_supported()
    looks at the current device and also accepts the emulated bf16 of older GPUs (V100, T4)."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def candidates(device: torch.device) -> list[Mode]:
    """The modes worth timing on this device."""
    if device.type == "cuda":
        precisions = ["fp32", "tf32"] + (["bf16"] if cuda_has_native_bf16(device) else [])
    elif device.type == "cpu":
        precisions = ["fp32"] + (["bf16"] if cpu_has_fast_bf16() else [])
    else:
        return [Mode("fp32", False)]
    return [Mode(p, cl) for p in precisions for cl in (False, True)]


def rule(device: torch.device) -> Mode:
    """The mode without measuring. On a CPU without fast bf16, fp32 channels_last: 1.0-1.8x
    contiguous in the 6 digits rows and 1.2-2x in the 6 CIFAR rows measured on such a CPU."""
    if device.type == "cuda":
        return Mode("bf16" if cuda_has_native_bf16(device) else "fp32", True)
    if device.type == "cpu" and cpu_has_fast_bf16():
        return Mode("bf16", True)
    if device.type == "cpu":
        return Mode("fp32", True)
    return Mode("fp32", False)


def worth_probing(modes: list[Mode]) -> bool:
    """Only precisions differ by more than a probe costs: two layouts of one precision do not."""
    return len({m.precision for m in modes}) > 1


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def cache_path() -> Path:
    from sweeper import settings

    return settings.cache_dir() / f"precision-torch{torch.__version__}.json"


def cache_key(model: nn.Module, shape: tuple[int, ...], batch_size: int, device: torch.device) -> str:
    arch = hashlib.sha256(repr(model).encode()).hexdigest()[:16]
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return f"{machine()}|{device.type}|threads={threads}|{arch}|{tuple(shape)}|batch={batch_size}"


def choose(
    model: nn.Module,
    shape: tuple[int, ...],
    batch_size: int,
    device: torch.device,
    cache: Path | None | str = "default",
    total_steps: int | None = None,
    modes: list[Mode] | None = None,
) -> Mode:
    """The fastest mode for training ``model`` on ``batch_size`` images of ``shape`` on ``device``;
    ``total_steps``, the steps the trial will train, skips a probe too long to pay for itself.
    ``modes`` (default: the device's candidates, probed only where their precisions differ)
    makes it time those, fp32 layouts included (the benchmarks' tables)."""
    probe_anyway = modes is not None
    modes = modes or candidates(device)
    if len(modes) == 1:
        return modes[0]
    path = cache_path() if cache == "default" else cache
    key = cache_key(model, shape, batch_size, device)
    if path is not None and (hit := _read(path).get(key)) is not None:
        return Mode(hit["precision"], hit["channels_last"])
    if not probe_anyway and not worth_probing(modes):
        return rule(device)
    if total_steps is not None and total_steps < PAYBACK * probe_steps(modes):
        return rule(device)
    load = load_per_core(device)
    try:
        timings = probe(model, shape, batch_size, device, modes, total_steps)
    except OverBudget as stopped:
        log.info("%s; training in %s", stopped, rule(device).label)
        return rule(device)
    best = min(timings, key=timings.get)
    load = max(load, load_per_core(device))
    if path is not None and load <= OVERLOAD:
        entry = {**asdict(best), "seconds_per_step": {m.label: t for m, t in timings.items()}, "load_per_core": load}
        _write(path, key, entry)
    return best


def load_per_core(device: torch.device) -> float:
    """The CPU's 1-minute load average per core (0 for a GPU, whose steps other CPU jobs barely slow)."""
    if device.type != "cpu":
        return 0.0
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # pragma: no cover - no load average on this platform
        return 0.0


def probe_steps(modes: list[Mode]) -> int:
    return len(modes) * (WARMUP_STEPS + TIMED_STEPS)


class OverBudget(Exception):
    """The probe stopped: it would cost more than 1/PAYBACK of the trial it was choosing for."""


def probe(
    model: nn.Module,
    shape: tuple[int, ...],
    batch_size: int,
    device: torch.device,
    modes: list[Mode],
    total_steps: int | None = None,
) -> dict[Mode, float]:
    """Seconds per training step of each mode: the fastest of a few, after a warm-up. The modes
    take turns step by step, so a burst of load from other jobs falls on all of them alike.

    With ``total_steps`` (the trial's), the rule's mode steps first, cold then warm, which sets the
    budget: 1/PAYBACK of the trial's training at the fastest warm step seen. Before each further
    step the probe predicts its cost (that mode's last step, or the first cold step for a mode not
    yet run) and raises OverBudget rather than pass the budget: cold kernels and a contended CPU
    make a probe's steps cost far more than their count says."""
    started = time.perf_counter()
    first = rule(device) if rule(device) in modes else modes[0]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        x = torch.randn(batch_size, *shape, device=device)
        classes = model.linear.out_features if hasattr(model, "linear") else 10
        y = torch.randint(classes, (batch_size,), device=device)
        runs = [Stepper(copy.deepcopy(model), x, y, device, m) for m in [first, *(m for m in modes if m != first)]]
        lead, others = runs[0], runs[1:]
        schedule = [(lead, False)] * WARMUP_STEPS + [(lead, True)]  # the budget after these
        schedule += [(run, False) for _ in range(WARMUP_STEPS) for run in others]
        schedule += [(run, True) for _ in range(TIMED_STEPS) for run in runs]
        best = {run.mode: float("inf") for run in runs}
        last: dict[Mode, float] = {}
        for run, timed in schedule:
            warm = min(best.values())
            predicted = last.get(run.mode, max(last.values(), default=0.0))
            spent = time.perf_counter() - started
            if total_steps is not None and (spent + predicted) * PAYBACK > total_steps * warm:
                raise OverBudget(
                    f"precision probe stopped after {spent:.1f} s: its next step would pass 1/{PAYBACK} "
                    f"of the trial's {total_steps} steps at {warm:.3f} s each"
                )
            last[run.mode] = run.step()
            if timed:
                best[run.mode] = min(best[run.mode], last[run.mode])
    return best


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-3)


class Stepper:
    """``net`` training on one batch in one mode, a ``train_step`` at a time; ``step()`` returns the
    step's seconds, the device waited for: what the probes here and in ``estimate`` and the
    benchmarks time (``fit`` runs the same step over its batches)."""

    def __init__(
        self,
        net: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        device: torch.device,
        mode: Mode,
        optimizer: Callable[..., torch.optim.Optimizer] = sgd,
    ):
        fmt = torch.channels_last if mode.channels_last else torch.contiguous_format
        self.net = net.to(device, memory_format=fmt).train()
        self.x, self.y, self.device, self.mode = x.contiguous(memory_format=fmt), y, device, mode
        self.optimizer = optimizer(self.net.parameters())

    def step(self) -> float:
        started = time.perf_counter()
        with tf32(self.device, self.mode.precision == "tf32"):
            loss = train_step(self.net, self.optimizer, self.x, self.y, autocast(self.device, self.mode.precision))
        loss.item()  # waits for the device
        return time.perf_counter() - started


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, autocast):
    """One training step, fit's and the probes': the forward under ``autocast`` (a context), the
    cross-entropy in fp32, backward, update. Returns the loss, not waited for."""
    with autocast:
        loss = F.cross_entropy(net(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class tf32:
    """TF32 matmuls and convolutions on CUDA while the block runs (restored after)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled and device.type == "cuda"

    def __enter__(self):
        if self.enabled:
            self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return self

    def __exit__(self, *exc):
        if self.enabled:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, key: str, value: dict) -> None:
    """Merge one entry into the cache file under a lock; a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with locks.file_lock(path.with_suffix(".lock")):
            entries = _read(path)
            entries[key] = value
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
            os.replace(tmp, path)
    except OSError:
        pass
