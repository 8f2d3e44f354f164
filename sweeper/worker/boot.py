"""A worker's start: ``serve`` is the `worker` command's (a GPU slot, the device, the stop
signal), ``run`` the library's (the device unless bound, the imports training needs, the two
stores), both then run the trial loop."""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
from dataclasses import replace

import torch

from sweeper import device, tracking
from sweeper.errors import SweeperError
from sweeper.redact import redact_url
from sweeper.signals import StopSignal
from sweeper.storage import connect
from sweeper.worker.config import WorkerConfig, stop_signal
from sweeper.worker.loop import run_trials

log = logging.getLogger("sweeper.worker")


def serve(config: WorkerConfig, stop: StopSignal | None = None) -> int:
    """The `worker` command: take a free host:gpu slot (so replicas spread over the GPUs), bind
    the device before the stores are touched (a missing or broken GPU raises device.BadDevice),
    stop on SIGTERM/SIGINT, then run. Returns how many trials ran."""
    gpus: list[str] = []
    if config.device in ("auto", "cuda"):
        from sweeper import slots

        gpus = list(config.gpus) if config.gpus else slots.visible_gpus()
        if gpus:
            slot = slots.claim(gpus, config.workers_per_gpu, config.storage_url)
            config = replace(config, device=slot.device)
            log.info("GPU slot %s:%s:%d -> %s", slot.host, slot.gpu, slot.index, slot.device)
    config = replace(config, processes_per_host=config.workers_per_gpu * max(1, len(gpus)))
    config = bind_device(config)
    stop = stop or stop_signal()
    stop.install()
    return run(config, stop)


def bind_device(config: WorkerConfig) -> WorkerConfig:
    """The config with its engine: the device, precision and compile mode it trains with."""
    if config.engine is not None:
        return config
    engine = device.prepare(
        config.device,
        config.precision,
        config.compile,
        expect_gpu=config.expect_gpu,
        processes_per_host=config.processes_per_host,
    )
    return replace(
        config,
        engine=engine,
        device=str(engine.device),
        precision=engine.precision,
        compile="on" if engine.compile else "off",
    )


def run(config: WorkerConfig, stop: StopSignal | None = None) -> int:
    """Claim and run trials; returns how many ran. Exits when no trial waits (unless forever)."""
    stop = stop or stop_signal()
    # The device first: a missing or broken GPU stops the worker before it claims any trial.
    config = bind_device(config)
    warm_up()
    tracking.configure_http()
    # A server is checked before an embedded store is opened (which creates its file), so an
    # unreachable URL or a refused password leaves nothing behind.
    server = tracking.is_server(config.tracking_uri)
    if server:
        mlflow_client = tracking.client(config.tracking_uri)
        tracking.check_reachable(mlflow_client)
    storage = open_storage(config)
    if not server:  # an embedded store: the client creates its database file
        mlflow_client = tracking.client(config.tracking_uri)
        tracking.check_reachable(mlflow_client)
    log.info(
        "worker %s on %s: storage %s, tracking %s",
        os.getpid(),
        socket.gethostname(),
        redact_url(config.storage_url),
        redact_url(config.tracking_uri),
    )
    # What the worker has loaded by now (torch, MLflow, SQLAlchemy: ~300k objects) lives as long
    # as the process: moved out of the collector's way, each trial's gc.collect() walks only
    # what that trial left behind.
    gc.collect()
    gc.freeze()
    try:
        with tracking.unacknowledged_timeout(config.grace_period / 4):
            return run_trials(config, stop, storage, mlflow_client)
    finally:
        gc.unfreeze()


def open_storage(config: WorkerConfig):
    """The storage; a worker for named studies creates nothing when one of them does not exist
    (a typo must not leave an empty optuna.db and mlflow.db behind)."""
    names = config.study_names
    try:
        storage = connect.open_storage(
            config.storage_url,
            config.heartbeat_interval,
            config.grace_period,
            stall_timeout=config.grace_period,
            create=not names,
        )
    except connect.NoStore as e:
        raise SweeperError(f"no study named {names[0]!r}: {e}") from None
    known = connect.study_names(storage) if names else []
    for name in names:
        if name not in known:
            raise SweeperError(connect.unknown_study(name, known))
    return storage


def warm_up() -> None:
    """What a trial's first step needs, imported once per process before any claim: the first
    torch.optim optimizer imports torch._dynamo (~900 modules, seconds), which would otherwise
    fall between the first trial's claim and its first step."""
    started = time.perf_counter()
    param = torch.zeros(1, requires_grad=True)
    for make in (torch.optim.AdamW, torch.optim.SGD, torch.optim.Adadelta):  # train.make_optimizer's
        param.grad = torch.ones(1)
        make([param], lr=0.1).step()
    log.info("imported what training needs in %.1f s", time.perf_counter() - started)
