"""How the commands that log (worker, launch, train, report, verify) write their stderr lines:
one format with the level name and one date format for sweeper's lines, MLflow's and Optuna's,
and the libraries' own warnings (Python ``warnings``) only with ``--verbose``.

    2026-12-06 12:00:01 INFO sweeper.worker[4242]: trial 3: short4/digits/s1 claimed

``--quiet`` leaves warnings and errors; ``--verbose`` adds debug lines and library warnings. The
choice reaches the workers `launch` starts through ``SWEEPER_VERBOSITY`` (-1, 0 or 1).
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
ENV = "SWEEPER_VERBOSITY"
# As MLflow sets them when it configures its own logging (which sweeper turns off, so that its
# lines take this format): the database layers only say something when it matters.
QUIET_LIBRARIES = ("sqlalchemy.engine", "alembic", "huey")


def verbosity(flag: int | None = None) -> int:
    """The flag given (-1 quiet, 1 verbose), else what the parent process chose, else 0."""
    from sweeper import settings

    return flag or max(-1, min(1, settings.env_int(ENV, 0)))


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged (a test's capture, a redirect)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


_handler: logging.Handler | None = None


def _no_retry_lines(record: logging.LogRecord) -> bool:
    return record.name != "urllib3.connectionpool" or record.levelno >= logging.ERROR


def configure(flag: int | None = None) -> int:
    """Set up the process's logging for a command; returns the verbosity in force. Called again
    (a second option's callback, another command in one process), it adjusts the levels only."""
    global _handler
    level = verbosity(flag)
    os.environ[ENV] = str(level)
    root = logging.getLogger()
    if _handler is None:
        _handler = _Stderr()
        _handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        root.addHandler(_handler)
    root_level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[level]
    root.setLevel(root_level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    if "mlflow" in sys.modules:  # it gave its loggers a handler with its own date format: ours instead
        for name in ("mlflow", *QUIET_LIBRARIES):
            logging.getLogger(name).handlers = []
            logging.getLogger(name).propagate = True
    else:  # told before it is imported, MLflow leaves its loggers to propagate here
        os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
    logging.getLogger("mlflow").setLevel(logging.DEBUG if level > 0 else root_level)
    # urllib3 logs each HTTP retry during an MLflow outage; the worker logs the outage once itself.
    # Logged still (tracking.create_once counts a create's re-sends), shown only with --verbose.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.DEBUG if level > 0 else logging.WARNING)
    _handler.removeFilter(_no_retry_lines)
    if level <= 0:
        _handler.addFilter(_no_retry_lines)
    import optuna

    optuna.logging.disable_default_handler()  # its "[I 2026-...]" lines: through ours instead
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(logging.INFO if level > 0 else logging.WARNING)
    logging.captureWarnings(True)  # a library's warning is a log line "WARNING py.warnings" ...
    logging.getLogger("py.warnings").setLevel(logging.WARNING if level > 0 else logging.CRITICAL)  # ... with -v only
    return level
