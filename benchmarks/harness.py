"""What the benchmark scripts share: throwaway databases, the light workers (a sleeping fit and a
one-layer model passed through ``WorkerConfig``), phase timings and output (forked pools of light
workers: ``pool.py``).

The scripts run as ``python benchmarks/NAME.py``: Python puts benchmarks/ first on the path, so
they ``import harness`` as a sibling, and importing it puts this checkout's root on the path (the
one place that does), so that they run from a checkout without installing it. Import it before
anything from sweeper.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's sweeper, installed or not

PG_ADMIN_URL = os.environ.get("SWEEPER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(result: dict[str, Any], as_json: bool, summary) -> None:
    """One JSON document on stdout (``--json``), else ``summary(result)``'s lines for people."""
    if as_json:
        print(json.dumps(result, indent=1, default=str))
    else:
        summary(result)


# --- databases ---------------------------------------------------------------------------------


class Databases:
    """Fresh SQLite files and PostgreSQL databases; the PostgreSQL ones are dropped at close()."""

    def __init__(self, root: Path):
        self.root = root
        self.pg_created: list[str] = []

    def new(self, kind: str, tag: str) -> str:
        if kind == "sqlite":
            path = self.root / f"{tag}-{uuid.uuid4().hex[:6]}.db"
            return f"sqlite:///{path}"
        if kind == "postgresql":
            name = f"sweeper_bench_{tag.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
            conn = self._admin()
            conn.cursor().execute(f'CREATE DATABASE "{name}"')
            conn.close()
            self.pg_created.append(name)
            return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        raise ValueError(f"unknown backend {kind!r}; choose sqlite or postgresql")

    @staticmethod
    def _admin():
        import psycopg2

        conn = psycopg2.connect(PG_ADMIN_URL, connect_timeout=5)
        conn.autocommit = True
        return conn

    @classmethod
    def postgres_reachable(cls) -> str | None:
        try:
            cls._admin().close()
            return None
        except Exception as e:
            return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"

    def close(self) -> None:
        if not self.pg_created:
            return
        conn = self._admin()
        for name in self.pg_created:
            conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()
        self.pg_created.clear()


def grid_spec(name: str, cells: int, epochs: int = 2, **train: Any):
    from sweeper import spec

    return spec.parse(
        {
            "description": "sweep_scale benchmark",
            "grid": {"variant": ["standard"], "dataset": ["synthetic"], "seed": list(range(cells))},
            "train": {"epochs": epochs, **train},
        },
        name=name,
    )


def dispose(storage) -> None:
    with contextlib.suppress(Exception):
        storage.engine.dispose()


# --- the light workers: the real worker, its training replaced through WorkerConfig -------------


def tiny_model(variant: str, num_classes: int, in_channels: int = 3, variant_cfgs=None):
    """WorkerConfig.build_model: a one-layer module stands in for GoogLeNet."""
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.linear(x.flatten(1)[:, :4].float())

    return Tiny()


def sleep_fit(
    model,
    data,
    recipe=None,
    *,
    epoch_sleep: float = 0.0,
    device="auto",
    precision="auto",
    compile=False,
    resume=None,
    on_epoch=None,
    should_stop=None,
    on_step=None,
):
    """WorkerConfig.fit: fit()'s signature and callbacks, each epoch's training replaced by a
    sleep of ``epoch_sleep`` seconds (bound with functools.partial: ``light_config``)."""
    from dataclasses import asdict

    import torch

    from sweeper.train import EpochMetrics, FitResult, Interrupted, Recipe

    recipe = recipe or Recipe()
    history = [EpochMetrics(**m) for m in resume["history"]] if resume else []
    n = len(data.train_y)
    for epoch in range(len(history) + 1, recipe.epochs + 1):
        if should_stop is not None and should_stop():
            raise Interrupted(epoch - 1)
        started = time.perf_counter()
        if epoch_sleep:
            time.sleep(epoch_sleep)
        seconds = max(time.perf_counter() - started, 1e-6)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=2.0 / epoch,
            test_loss=2.1 / epoch,
            top1_error=0.9 / epoch,
            top5_error=0.5 / epoch,
            lr=recipe.lr * recipe.lr_gamma ** (epoch - 1),
            epoch_seconds=seconds,
            images_per_s=n / seconds,
        )
        history.append(metrics)

        def state(history=history):  # the epochs so far, as fit's state() returns them
            return {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "epoch": len(history),
                "recipe": recipe.to_dict(),
                "history": [asdict(m) for m in history],
                "rng": {"torch": torch.get_rng_state()},
            }

        if on_epoch is not None and on_epoch(metrics, state):
            break
    return FitResult(history=history, device="cpu", precision="fp32")


def light_config(storage_url: str, tracking_uri: str, study: str | None = None, epoch_sleep: float = 0.0, **more):
    """A WorkerConfig on the CPU in fp32, without system metrics, training with sleep_fit and
    tiny_model; ``more`` sets any other field (on_phase, max_trials...)."""
    from sweeper.worker import WorkerConfig

    return WorkerConfig(
        storage_url=storage_url,
        tracking_uri=tracking_uri,
        study_names=(study,) if study else (),
        device="cpu",
        precision="fp32",
        system_metrics=False,
        fit=functools.partial(sleep_fit, epoch_sleep=epoch_sleep),
        build_model=tiny_model,
        **more,
    )


class PhaseTimes:
    """A WorkerConfig.on_phase that adds up each phase's calls and seconds (any thread), and keeps
    when each trial ran (the "trial" phase) as (start, end) wall-clock pairs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.intervals: list[tuple[float, float]] = []

    def __call__(self, phase: str, seconds: float) -> None:
        now = time.time()
        with self.lock:
            self.calls[phase] = self.calls.get(phase, 0) + 1
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
            if phase == "trial":
                self.intervals.append((now - seconds, now))

    def rows(self, trials: int) -> list[dict[str, Any]]:
        """The profile table: one row per phase, per trial, in the order a trial meets them."""
        order = ("claim", "trial", "prepare", "train", "epoch", "checkpoint", "finish", "model")
        phases = sorted(self.calls, key=lambda p: (order.index(p) if p in order else len(order), p))
        return [
            {
                "phase": p,
                "calls_per_trial": round(self.calls[p] / trials, 2),
                "ms_per_trial": round(self.seconds[p] / trials * 1000, 2),
            }
            for p in phases
        ]
