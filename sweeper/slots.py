"""GPU slots: each worker on a host claims one free ``host:gpu:slot`` so replicas spread over GPUs.

``docker compose up --scale worker=N`` gives every replica the same GPU reservation (all GPUs), so
the workers themselves agree who takes which GPU: a PostgreSQL advisory lock per slot when the
storage is PostgreSQL (it works across containers and dies with the worker's connection), a file
lock under ``$SWEEPER_HOME/slots`` otherwise (one machine), and also when the storage goes through
a connection pooler such as PgBouncer: a session's advisory lock would stay on a server connection
that the pooler hands to other clients (replicas then share that folder, as compose's do). Slots are filled GPU by GPU first, so
K workers per GPU (``--workers-per-gpu``) only double up once every GPU has one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sweeper import settings
from sweeper.errors import SweeperError
from sweeper.storage import locks


@dataclass
class Slot:
    host: str
    gpu: str
    index: int
    _hold: Any  # the open connection or file that holds the lock: released when the worker exits

    @property
    def device(self) -> str:
        return f"cuda:{self.gpu}"


def visible_gpus() -> list[str]:
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def claim(gpus: list[str], workers_per_gpu: int, storage_url: str | None = None) -> Slot:
    host = settings.host_id()
    order = [(gpu, k) for k in range(workers_per_gpu) for gpu in gpus]
    for gpu, k in order:
        hold = _try_lock(storage_url, f"{host}:{gpu}:{k}")
        if hold is not None:
            return Slot(host, gpu, k, hold)
    raise SweeperError(
        f"all {len(order)} GPU slots on {host} are taken ({len(gpus)} GPU(s) x {workers_per_gpu} per GPU); "
        "run fewer workers or raise --workers-per-gpu / SWEEPER_WORKERS_PER_GPU"
    )


def _try_lock(storage_url: str | None, name: str):
    if storage_url and storage_url.startswith("postgresql"):
        if not locks.behind_pooler(storage_url):
            return locks.try_advisory_lock(storage_url, f"sweeper.slot:{name}")
        logging.getLogger("sweeper.worker").info(
            "the storage goes through a connection pooler: GPU slot %s is a file lock in %s",
            name,
            settings.home() / "slots",
        )
    folder = settings.home() / "slots"
    folder.mkdir(parents=True, exist_ok=True)
    return locks.hold_file_lock(folder / f"{name.replace(':', '_')}.lock", wait=False)
