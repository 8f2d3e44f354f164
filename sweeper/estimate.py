"""How long a cell takes: from finished runs of the same variant, dataset and device when MLflow
has them (this host's first), otherwise from the variant's MACs and a few-step probe of this machine.

One model for both: an epoch trains ``n_train`` images at ``rate`` images/s and evaluates
``n_test`` images, a forward pass only (a third of a training step's work), and a trial pays a
fixed ``overhead`` outside its epochs (the data, the model, the MLflow run, fit's set-up, the
model's export at the end):

    seconds per trial = epochs * (n_train + n_test / 3) / rate + overhead

``rate`` is the median ``images_per_s`` of matching finished runs (source ``history``), else
``probe_macs_per_s / macs(variant)`` where the probe trains a mid-size variant for a few steps
on random images of the dataset's shape on the device (source ``probe``; on a CPU on one thread,
scaled to the cores, and the fastest step counts: robust to the load of a shared machine).
``overhead`` is the median of those runs' wall time minus their ``train_seconds``, else
``OVERHEAD_S`` plus the export's share of the parameters.

A trial's estimate is for one worker with the whole device. ``pack()`` turns the estimates into
what N workers take: the trials claimed longest first (as launch enqueues them), and on a CPU
the cores shared by the trials running at once (sweeper.cores), each of k trials at
``share(k)`` of its full speed. A history rate is taken as a trial's speed alone although its run
may have shared the CPU (runs do not record with how many trials): after a study run by N
workers on a CPU, estimates for N workers err long.

    >>> cell_seconds(epochs=3, n_train=512, n_test=359, rate=1000.0)
    1.895
    >>> pack([100.0, 10.0, 10.0], workers=2, device="cuda")
    (120.0, 100.0)
"""

from __future__ import annotations

import socket
import statistics
import time
from dataclasses import dataclass
from typing import Any

from sweeper.cores import host_cores
from sweeper.data.synthetic import DEFAULT_TEST, DEFAULT_TRAIN

TRAIN_TEST_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "digits": (1438, 359)}
PROBE_VARIANT = "short"  # mid-size: its cost is mostly convolutions, like the variants it stands for
PROBE_STEPS = 3  # timed steps at most, after one warm-up step
PROBE_MAX_BATCH = 256  # images per probe step: the rate per image hardly grows past it
PROBE_SECONDS = 2.0  # no more steps after this long (a slow machine still answers in seconds)
HISTORY_RUNS = 20  # finished runs looked at per (variant, dataset, device)
# Seconds a trial spends outside its epochs when no finished run tells (0.7-7 s per cell on a quiet
# AVX512-BF16 machine, ~7 s per tiny cell on a loaded fp32-only one: docs/BENCHMARKS.md) ...
OVERHEAD_S = 6.0
EXPORT_S_PER_MPARAM = 0.2  # ... plus the model's export, which grows with its parameters (naive: ~13 s)
# On a CPU, k trials at once each train on cores/k threads; a convolution's speed grows less than
# linearly with threads, so each runs at (1/k) ** SHARE_EXPONENT of its speed alone (2 trials: 0.62).
SHARE_EXPONENT = 0.7


@dataclass
class Rate:
    images_per_s: float
    source: str  # "history (N runs)" or "probe"
    overhead_s: float = OVERHEAD_S  # per trial, outside its epochs


def split_sizes(dataset: str, train: dict[str, Any]) -> tuple[int, int]:
    full_train, full_test = TRAIN_TEST_SIZES.get(dataset) or (DEFAULT_TRAIN, DEFAULT_TEST)
    limit_train, limit_test = train.get("limit_train"), train.get("limit_test")
    return min(full_train, limit_train or full_train), min(full_test, limit_test or full_test)


def cell_seconds(epochs: int, n_train: int, n_test: int, rate: float, overhead: float = 0.0) -> float:
    return round(epochs * (n_train + n_test / 3) / rate + overhead, 3)


def share(running: int, device: str) -> float:
    """The speed of each of ``running`` trials on one device, as a share of a trial alone."""
    if device != "cpu" or running <= 1:
        return 1.0  # GPUs: a worker per GPU slot
    return (1 / running) ** SHARE_EXPONENT


def pack(seconds: list[float], workers: int, device: str = "cpu") -> tuple[float, float]:
    """(summed, wall): the trials' run times added up and the study's wall time when ``workers``
    claim them longest first; ``seconds`` are each trial's time alone on the whole device."""
    queue = sorted(seconds, reverse=True)
    running: list[list[float]] = []  # [work left, elapsed]
    summed = wall = 0.0
    while queue or running:
        while queue and len(running) < max(1, workers):
            running.append([queue.pop(0), 0.0])
        speed = share(len(running), device)
        step = min(left for left, _ in running) / speed
        wall += step
        for r in running:
            r[0] -= step * speed
            r[1] += step
        summed += sum(r[1] for r in running if r[0] <= 1e-9)
        running = [r for r in running if r[0] > 1e-9]
    return round(summed, 1), round(wall, 1)


def device_type(device: str) -> str:
    """cpu, cuda or mps: what a finished run's ``sweeper.device`` tag is compared on."""
    if device.split(":")[0] in ("cpu", "cuda", "mps"):
        return device.split(":")[0]
    from sweeper.train import resolve_device

    return resolve_device(device).type


class Estimator:
    """Rates per (variant, dataset) on one device, looked up once each."""

    def __init__(
        self,
        device: str = "auto",
        mlflow_client=None,
        probe: bool = True,
        batch_size: int = 64,
        variants: dict[str, Any] | None = None,
    ):
        from sweeper.contract import VARIANTS

        self.device = device_type(device)
        self.client, self.probe, self.batch_size = mlflow_client, probe, min(batch_size, PROBE_MAX_BATCH)
        self.variants = VARIANTS if variants is None else variants  # the study's table: built-ins and its own
        self._rates: dict[tuple[str, str, str], Rate | None] = {}
        self._probes: dict[str, float] = {}  # dataset -> MACs per second
        self._experiments: list[str] | None = None

    def rate(self, variant: str, dataset: str) -> Rate | None:
        key = (variant, dataset, self.device)
        if key not in self._rates:
            self._rates[key] = self._from_history(variant, dataset) or (
                self._from_probe(variant, dataset) if self.probe else None
            )
        return self._rates[key]

    def cell(self, variant: str, dataset: str, train: dict[str, Any]) -> dict[str, Any]:
        """``estimate_s`` and ``estimate_source`` of one cell (None when nothing to go on)."""
        rate = self.rate(variant, dataset)
        if rate is None:
            return {"estimate_s": None, "estimate_source": None}
        n_train, n_test = split_sizes(dataset, train)
        epochs = int(train.get("epochs", 14))
        seconds = cell_seconds(epochs, n_train, n_test, rate.images_per_s, rate.overhead_s)
        return {"estimate_s": seconds, "estimate_source": rate.source}

    def _from_history(self, variant: str, dataset: str) -> Rate | None:
        if self.client is None:
            return None
        try:
            if self._experiments is None:
                self._experiments = [e.experiment_id for e in self.client.search_experiments()]
            if not self._experiments:
                return None
            runs = self.client.search_runs(
                self._experiments,
                filter_string=f"params.variant = '{variant}' and params.dataset = '{dataset}' "
                "and tags.`sweeper.role` = 'cell' and attributes.status = 'FINISHED'",
                max_results=HISTORY_RUNS,
                order_by=["attributes.start_time DESC"],
            )
        except Exception:  # no store yet, or it is down: fall back to the probe
            return None
        runs = [
            r
            for r in runs
            if "images_per_s" in r.data.metrics
            and str(r.data.tags.get("sweeper.device", "")).split(":")[0] == self.device
        ]
        mine = [r for r in runs if r.data.tags.get("sweeper.host") == socket.gethostname()]
        runs = mine or runs  # this machine's runs, when it has any
        if not runs:
            return None
        overheads = [
            (r.info.end_time - r.info.start_time) / 1000 - r.data.metrics["train_seconds"]
            for r in runs
            if r.info.end_time and "train_seconds" in r.data.metrics
        ]
        return Rate(
            statistics.median(r.data.metrics["images_per_s"] for r in runs),
            f"history ({len(runs)} run{'s' if len(runs) > 1 else ''}{' of this host' if mine else ''})",
            max(0.0, statistics.median(overheads)) if overheads else OVERHEAD_S,
        )

    def _from_probe(self, variant: str, dataset: str) -> Rate:
        from sweeper.contract import count_macs
        from sweeper.data import DATASETS

        info = DATASETS[dataset]
        if dataset not in self._probes:
            self._probes[dataset] = probe_macs_per_s(info, self.device, self.batch_size)
        macs = count_macs(self.variants[variant], info.shape, info.num_classes)  # from the table: no model built
        # one thread probed; a trial alone on the CPU trains on every core (share() undoes this)
        scale = host_cores() ** SHARE_EXPONENT if self.device == "cpu" else 1.0
        overhead = OVERHEAD_S + EXPORT_S_PER_MPARAM * self._mparams(variant, info)
        return Rate(self._probes[dataset] * scale / macs, "probe", overhead)

    def _mparams(self, variant: str, info) -> float:
        """Millions of parameters, counted on the meta device (no weights allocated)."""
        import torch

        from sweeper.models import build_model, count_params

        with torch.device("meta"):
            return count_params(build_model(variant, info.num_classes, info.shape[0], self.variants)) / 1e6


def probe_macs_per_s(info, device: str, batch_size: int = 64) -> float:
    """Train PROBE_VARIANT on random images of the dataset's shape for a few steps; its MACs per
    image times the images per second it trained (its fastest step). On a CPU the probe trains on
    one thread: with the cores busy, a multi-threaded step waits for its slowest thread (on the
    2-core fp32-only machine at load 12: 0.11-0.15 GMAC/s on 2 threads, 1.2-1.6 on one), so one
    thread is what load distorts least; ``Estimator`` scales it to the trial's threads."""
    import torch

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        return _probe(info, device, batch_size)
    finally:
        torch.set_num_threads(threads)


def _probe(info, device: str, batch_size: int) -> float:
    import torch

    from sweeper.models import VARIANTS, build_model, count_macs
    from sweeper.precision import Mode, Stepper

    torch.manual_seed(0)
    model = build_model(PROBE_VARIANT, info.num_classes, info.shape[0]).to(device)
    macs = count_macs(VARIANTS[PROBE_VARIANT], info.shape, info.num_classes)
    x = torch.randn(batch_size, *info.shape, device=device)
    y = torch.randint(0, info.num_classes, (batch_size,), device=device)
    stepper = Stepper(model, x, y, torch.device(device), Mode("fp32", channels_last=False), torch.optim.Adadelta)
    stepper.step()  # warm-up: allocations, kernels chosen
    started = time.perf_counter()
    fastest = float("inf")
    steps = 0
    while steps < PROBE_STEPS and (steps == 0 or time.perf_counter() - started < PROBE_SECONDS):
        fastest = min(fastest, stepper.step())
        steps += 1
    return macs * batch_size / fastest
