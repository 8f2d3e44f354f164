"""Database errors: which ones may pass, and retrying a call through them."""

from __future__ import annotations

import logging
import time

import optuna

from sweeper.errors import root_cause
from sweeper.redact import redact

log = logging.getLogger("sweeper.study")


def is_db_error(e: BaseException) -> bool:
    """A database or connection failure that may pass (server restart, dropped connection)."""
    import sqlalchemy.exc

    return isinstance(
        e,
        (
            optuna.exceptions.StorageInternalError,
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.InterfaceError,
            sqlalchemy.exc.DisconnectionError,
        ),
    )


def retry_db(fn, *args, within: float, what: str = "database call", **kwargs):
    """Call ``fn``, retrying database errors for up to ``within`` seconds (then re-raise).

    A worker uses it for every storage call of a running trial, so a database blip shorter
    than the grace period neither fails the trial nor kills the worker."""
    deadline = time.monotonic() + within
    delay = 0.5
    warned = False
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            if not is_db_error(e) or time.monotonic() + delay > deadline:
                raise
            if not warned:
                log.warning("%s failed (%s); retrying for up to %.0fs", what, redact(root_cause(e)), within)
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if warned:
            log.info("%s succeeded after the database came back", what)
        return result
