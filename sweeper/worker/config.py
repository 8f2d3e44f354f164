"""What a worker is told: its WorkerConfig, and the stop signal that ends it."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper import train
from sweeper.cellmodel import Exporter
from sweeper.contract import DEFAULT_GRACE_PERIOD, DEFAULT_HEARTBEAT_INTERVAL
from sweeper.device import Engine
from sweeper.signals import StopSignal
from sweeper.train import FitResult

log = logging.getLogger("sweeper.worker")


@dataclass
class WorkerConfig:
    storage_url: str
    tracking_uri: str
    study_names: tuple[str, ...] = ()  # empty: every study in the storage
    device: str = "auto"
    precision: str = "auto"
    compile: str = "auto"  # auto (on CUDA), on, off
    expect_gpu: bool = False  # this worker was deployed to train on a GPU (SWEEPER_EXPECT_GPU)
    processes_per_host: int = 1  # workers sharing this host's CPUs (bounds inductor's compile pool)
    engine: Engine | None = None  # the bound device; None: run() binds it
    # The `worker` command's GPU slots (serve()): the GPU indices this host's workers share (None:
    # every visible one) and how many workers each takes.
    gpus: tuple[str, ...] | None = None
    workers_per_gpu: int = 1
    data_dir: Path | None = None
    max_trials: int | None = None
    forever: bool = False
    poll_interval: float = 5.0  # seconds between looks at an empty queue (--forever)
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL
    grace_period: int = DEFAULT_GRACE_PERIOD
    tracking_outage_limit: float = 300.0  # seconds MLflow may stay down before a trial fails
    system_metrics: bool = True
    threads: int | None = None  # CPU threads per trial; None: share the host's cores by running trials
    notify_url: str | None = None  # JSON POST when a study completes or a cell fails for good
    fit: Callable[..., FitResult] = train.fit  # the training function (a benchmark passes a stand-in)
    # The variant's network, build_model(variant, num_classes, in_channels, variant_cfgs); None:
    # sweeper.models'. A stand-in must be a module-level function: the model helper process calls it too.
    build_model: Callable[..., Any] | None = None
    # Called with the study's name after each cell that completes (the CLI refreshes the study's
    # report page in MLflow with it: sweeper.report.publish.Refresher); must return at once.
    on_cell_complete: Callable[[str], None] | None = None
    # Called with (phase, seconds) as each phase of a trial ends (benchmarks time the worker with
    # it): "claim" (looking for a waiting trial and claiming it), "trial" (a claimed trial on the
    # training thread, until trained), within it "prepare", "train" (the fit, its epochs' reports
    # included) and "finish" (the run's metrics after training); "epoch" (each epoch's report:
    # Optuna, pruning, the checkpoint handed off), "checkpoint" (one saved and sent, on a background
    # thread) and "model" (the model logged, on the finishing thread). Must return at once.
    on_phase: Callable[[str, float], None] | None = None
    # A model-export helper shared by several workers of one process (a benchmark's fleet of light
    # workers: each helper is a ~400 MB process); they leave it running. None: the worker starts its own.
    exporter: Exporter | None = None


def timed(config: WorkerConfig, phase: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its seconds given to ``config.on_phase`` as ``phase``."""
    if config.on_phase is None:
        return fn(*args, **kwargs)
    started = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        config.on_phase(phase, time.perf_counter() - started)


def stop_signal() -> StopSignal:
    """The worker's: first SIGTERM/SIGINT: finish the current batch, checkpoint, requeue, exit.
    Second: exit now. Handled once ``install()`` is called."""
    return StopSignal(on_signal=_on_signal)


def _on_signal(signum: int, count: int) -> None:
    name = signal.Signals(signum).name
    if count > 1:
        log.warning("second %s: exiting now", name)
        os._exit(128 + signum)
    log.warning("%s received: stopping after this batch (send again to exit at once)", name)
