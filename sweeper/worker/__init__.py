"""A worker: claim a trial -> build model and data -> fit -> log -> tell, until the queue is empty.

Per epoch the worker checkpoints (uploaded as an artifact of the cell's MLflow run, so a retry
on any machine resumes), logs the epoch's metrics with ``step`` = epoch, and reports to Optuna.

Modules, each importing only those before it: ``config`` (WorkerConfig, the stop signal),
``outcome`` (how a trial ended, as a value, and the one place that records it), ``epochs``
(after each epoch), ``prepare`` (before the first), ``trial`` (TrialRun: one trial), ``loop``
(claim, run, until the queue is empty) and ``boot`` (the worker's start: ``run``, ``serve``).
"""

from sweeper.worker.boot import run, serve
from sweeper.worker.config import WorkerConfig, stop_signal
from sweeper.worker.prepare import load_data

__all__ = ["WorkerConfig", "load_data", "run", "serve", "stop_signal"]
