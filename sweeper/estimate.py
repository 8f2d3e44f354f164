"""How long a cell takes: from finished runs of the same variant, dataset and device when MLflow
has them, otherwise from the variant's MACs and a few-step probe of this machine.

One model for both: an epoch trains ``n_train`` images at ``rate`` images/s and evaluates
``n_test`` images, a forward pass only (a third of a training step's work):

    seconds per epoch = (n_train + n_test / 3) / rate

``rate`` is the median ``images_per_s`` of matching finished runs (source ``history``), else
``probe_macs_per_s / macs(variant)`` where the probe trains a mid-size variant for a few steps
on random images of the dataset's shape on the device (source ``probe``). Startup (data, model
build, MLflow) is not counted.

    >>> cell_seconds(epochs=3, n_train=512, n_test=359, rate=1000.0)
    1.895
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from sweeper.data.synthetic import DEFAULT_TEST, DEFAULT_TRAIN

TRAIN_TEST_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "digits": (1438, 359)}
PROBE_VARIANT = "short"  # mid-size: its cost is mostly convolutions, like the variants it stands for
PROBE_STEPS = 3  # timed steps at most, after one warm-up step
PROBE_MAX_BATCH = 256  # images per probe step: the rate per image hardly grows past it
PROBE_SECONDS = 2.0  # no more steps after this long (a slow machine still answers in seconds)
HISTORY_RUNS = 20  # finished runs looked at per (variant, dataset, device)


@dataclass
class Rate:
    images_per_s: float
    source: str  # "history (N runs)" or "probe"


def split_sizes(dataset: str, train: dict[str, Any]) -> tuple[int, int]:
    full_train, full_test = TRAIN_TEST_SIZES.get(dataset) or (DEFAULT_TRAIN, DEFAULT_TEST)
    limit_train, limit_test = train.get("limit_train"), train.get("limit_test")
    return min(full_train, limit_train or full_train), min(full_test, limit_test or full_test)


def cell_seconds(epochs: int, n_train: int, n_test: int, rate: float) -> float:
    return round(epochs * (n_train + n_test / 3) / rate, 3)


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
        return {"estimate_s": cell_seconds(epochs, n_train, n_test, rate.images_per_s), "estimate_source": rate.source}

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
        rates = [
            r.data.metrics["images_per_s"]
            for r in runs
            if "images_per_s" in r.data.metrics
            and str(r.data.tags.get("sweeper.device", "")).split(":")[0] == self.device
        ]
        if not rates:
            return None
        return Rate(statistics.median(rates), f"history ({len(rates)} run{'s' if len(rates) > 1 else ''})")

    def _from_probe(self, variant: str, dataset: str) -> Rate:
        from sweeper.contract import count_macs
        from sweeper.data import DATASETS

        info = DATASETS[dataset]
        if dataset not in self._probes:
            self._probes[dataset] = probe_macs_per_s(info, self.device, self.batch_size)
        macs = count_macs(self.variants[variant], info.shape, info.num_classes)  # from the table: no model built
        return Rate(self._probes[dataset] / macs, "probe")


def probe_macs_per_s(info, device: str, batch_size: int = 64) -> float:
    """Train PROBE_VARIANT on random images of the dataset's shape for a few steps; its MACs per
    image times the images per second it trained."""
    import torch
    import torch.nn.functional as F

    from sweeper.models import build_model, count_macs

    torch.manual_seed(0)
    model = build_model(PROBE_VARIANT, info.num_classes, info.shape[0]).to(device)
    macs = count_macs(model, info.shape)
    optimizer = torch.optim.Adadelta(model.parameters())
    x = torch.randn(batch_size, *info.shape, device=device)
    y = torch.randint(0, info.num_classes, (batch_size,), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    step()  # warm-up: allocations, kernels chosen
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    steps = 0
    while steps < PROBE_STEPS and (steps == 0 or time.perf_counter() - started < PROBE_SECONDS):
        step()
        steps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return macs * batch_size * steps / (time.perf_counter() - started)
