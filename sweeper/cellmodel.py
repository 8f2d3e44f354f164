"""A cell's trained model: its weights file, logged to MLflow by a helper process, loaded back.

The worker logs a finished trial's model while it already trains the next trial, but not on a
thread: ``torch.export`` (MLflow's pt2 format) switches oneDNN off process-wide while it traces
(``torch.export._trace._ignore_backend_decomps``), which would change the kernels, the speed and
the numbers of the training beside it. So each worker has one helper process (spawned when the
worker starts, its imports paid once, beside the first trial) that rebuilds the model from the
weights file and logs it.

A weights file holds the state_dict and what rebuilds the variant's ``nn.Module`` without the
study: the variant's name and table entry, the classes and the input channels. It is logged
with the model (``extra_files/weights.pt``), so every COMPLETE cell's weights come back as a
trainable module (``sweeper.api.load_model``), whatever its length.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sweeper.errors import SweeperError, first_line
from sweeper.redact import redact

log = logging.getLogger("sweeper.cellmodel")

WEIGHTS_FILE = "weights.pt"  # its name in the model's extra_files/
POLL_SECONDS = 0.5  # how often the waiting worker looks at its stop signal and the helper's health


def save_weights(path: Path, model, variant: str, cfg, num_classes: int, in_channels: int) -> Path:
    import torch

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "variant": variant,
        "cfg": dataclasses.asdict(cfg),
        "num_classes": num_classes,
        "in_channels": in_channels,
        "state_dict": state,
    }
    torch.save(payload, path)
    return path


def load_weights(path: Path, build_model: Callable[..., Any] | None = None):
    """The variant's nn.Module with the file's weights, on the CPU, in train mode."""
    import torch

    from sweeper.contract import VariantCfg

    if build_model is None:
        from sweeper.models import build_model

    saved = torch.load(path, map_location="cpu", weights_only=True)
    cfg = saved["cfg"]
    cfg = VariantCfg(tuple(tuple(stage) for stage in cfg["stages"]), cfg["block"], cfg.get("description", ""))
    model = build_model(saved["variant"], saved["num_classes"], saved["in_channels"], {saved["variant"]: cfg})
    model.load_state_dict(saved["state_dict"])
    return model.train()


class ExportFailed(SweeperError):
    """The helper process could not log the model (an error MLflow answered, or it died)."""


class Exporter:
    """The worker's helper process that logs models; one model at a time."""

    def __init__(
        self,
        tracking_uri: str,
        build_model: Callable[..., Any] | None = None,
        unacknowledged_timeout: float | None = None,
        start_method: str = "spawn",
    ):
        self.tracking_uri = tracking_uri
        self.build_model = build_model  # None: sweeper.models' (a benchmark's stand-in otherwise)
        self.unacknowledged_timeout = unacknowledged_timeout  # tracking.configure_http's, as in the worker
        # spawn: a fresh process, no fork of a threaded one. A benchmark's light workers fork theirs
        # from a warmed-up process that has no threads yet (pages shared: ~140 MB each, not ~500).
        self.start_method = start_method
        self.process = None
        self.lock = threading.RLock()  # workers sharing one helper (WorkerConfig.exporter) take turns

    def start(self) -> None:
        """Spawn the helper now (its imports, seconds, overlap the worker's first trial)."""
        with self.lock:
            if self.process is None or not self.process.is_alive():
                self._spawn()

    def _spawn(self) -> None:
        context = multiprocessing.get_context(self.start_method)
        self.stop = context.Event()
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve,
            args=(child, self.tracking_uri, self.stop, self.build_model, self.unacknowledged_timeout),
            name="sweeper-model-export",
            daemon=True,
        )
        self.process.start()
        child.close()

    def log_model(self, request: dict[str, Any], should_stop: Callable[[], bool]) -> str:
        """Log the model of ``request`` (``tracking.log_model``'s arguments, the weights file for the
        model); the logged model's id. Raises TrackingUnreachable like ``tracking.log_model``
        (``should_stop()`` ends its retries), ExportFailed otherwise."""
        from sweeper import tracking

        with self.lock:
            self.start()
            self.stop.clear()
            self.conn.send(request)
            while not self.conn.poll(POLL_SECONDS):
                if should_stop():
                    self.stop.set()
                if not self.process.is_alive():
                    code = self.process.exitcode
                    self.process = None
                    raise ExportFailed(f"the model export process died (exit code {code}) before logging the model")
            kind, value = self.conn.recv()
        if kind == "ok":
            return value
        if kind == "unreachable":
            raise tracking.TrackingUnreachable(value)
        raise ExportFailed(f"logging the model failed: {value}")

    def close(self) -> None:
        """Stop the helper at once. Once the lock is ours no model is in flight (``log_model`` holds
        it until the helper answers), so it holds nothing worth waiting for; one still importing
        at the worker's end would see the pipe close only seconds later (6 s of a worker's exit)."""
        with self.lock:
            if self.process is None:
                return
            self.conn.close()
            self.process.kill()
            self.process.join()
            self.process = None


def _serve(
    conn, tracking_uri: str, stop, build_model: Callable[..., Any] | None = None, unacknowledged_timeout=None
) -> None:
    """(The helper process.) Log each model asked for until the worker closes the pipe."""
    # Ctrl-C reaches the whole process group: the worker decides, the helper finishes its model.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # it copies the weights file "from a URI"
    import torch

    from sweeper import tracking

    torch.set_num_threads(1)  # tracing is Python; the cores are the training's
    client = tracking.client(tracking_uri)
    with tracking.unacknowledged_timeout(unacknowledged_timeout):
        _log_models(conn, client, stop, build_model)


def _log_models(conn, client, stop, build_model) -> None:
    from sweeper import tracking

    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        try:
            weights = Path(request.pop("weights"))
            model = load_weights(weights, build_model).eval()
            model_id = tracking.log_model(client, model=model, weights=weights, should_stop=stop.is_set, **request)
            conn.send(("ok", model_id))
        except tracking.TrackingUnreachable as e:
            conn.send(("unreachable", str(e)))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {redact(first_line(e))}"))
