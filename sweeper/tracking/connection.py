"""The MLflow client: the tracking URI, the embedded store created once, bounded HTTP waits,
and what an outage means (``TrackingUnreachable``, the one retry loop ``retry_while_unreachable``)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from sweeper import settings
from sweeper.errors import SweeperError, first_line
from sweeper.redact import quote_password, redact, redact_url, remember

log = logging.getLogger("sweeper.tracking")
T = TypeVar("T")


def default_tracking_uri() -> str:
    return f"sqlite:///{settings.home() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI to give MLflow. Credentials written into an http(s) URI move to
    MLFLOW_TRACKING_USERNAME/PASSWORD (what MLflow sends as basic auth), because MLflow prints
    the URI it was given ("View run ... at: URI") on stdout, where no logging filter reaches."""
    uri = remember(uri or settings.tracking_uri() or default_tracking_uri())
    if not is_server(uri):
        return quote_password(uri)  # a database URL, read by SQLAlchemy
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def configure_http(request_timeout: int = 20, max_retries: int = 2) -> None:
    """Fail an HTTP call in seconds, not minutes (MLflow's default retries back off for ~2
    minutes); sweeper buffers what could not be sent and retries it itself."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(request_timeout))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    # MLflow's "View run ... at: URL" line, which ending a run reads the run again to print on stdout.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


@contextlib.contextmanager
def unacknowledged_timeout(seconds: float | None) -> Iterator[None]:
    """While inside: this process's HTTP connections give up on bytes the server has not
    acknowledged for ``seconds`` (TCP user timeout), so a request sent into a partition cannot be
    delivered once the network heals, after another worker took the trial over (a worker's lease,
    claims.Heartbeat). urllib3's default socket options, restored on the way out. None: as they are."""
    if seconds is None:
        yield
        return
    import socket

    from urllib3.connection import HTTPConnection

    option = (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(max(seconds, 1) * 1000))
    options = HTTPConnection.default_socket_options  # changed in place: urllib3 binds this list as a default
    before = list(options)
    options[:] = [o for o in options if o[:2] != option[:2]] + [option]
    try:
        yield
    finally:
        options[:] = before


def client(uri: str | None = None, create: bool = True):
    """An MlflowClient whose HTTP calls give up in seconds (every command gets bounded waits).

    An embedded (SQLite) store is created here, one process at a time (a file lock next to the
    database: MLflow's schema creation fails when two processes run it at once), or, with
    ``create=False`` (commands that only read), refused when its file does not exist."""
    from mlflow.tracking import MlflowClient

    from sweeper.storage.connect import check_sqlite_file, sqlite_path
    from sweeper.storage.locks import file_lock

    configure_http()
    uri = resolve_tracking_uri(uri)
    path = sqlite_path(uri) if uri.startswith("sqlite") else None
    check_sqlite_file(path, "MLflow tracking store", "--tracking-uri / MLFLOW_TRACKING_URI", create)
    if path is None or not create:
        return MlflowClient(tracking_uri=uri)
    with file_lock(Path(f"{path}.lock")):  # the client creates (or checks) the store's schema
        return _create_embedded(uri)


STORE_CREATE_WAIT = 60.0  # seconds another process may take to create the embedded store
SCHEMA_QUIET = 1.0  # seconds a store's schema must stay unchanged before it counts as created


def _wait_while_migrating(path: Path) -> None:
    """An embedded store written in the last seconds may be one that another MLflow client is
    creating right now: opening it then would start a second schema migration beside the first
    (both fail, or leave the schema half made). Wait until its tables and alembic revision stay
    unchanged for SCHEMA_QUIET seconds."""
    import sqlite3

    if not path.exists() or time.time() - path.stat().st_mtime > 5:
        return
    deadline = time.monotonic() + STORE_CREATE_WAIT
    last, quiet_since = None, time.monotonic()
    while time.monotonic() < deadline:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
                now = db.execute("SELECT group_concat(name) FROM sqlite_master").fetchone()
                if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'alembic_version'").fetchone():
                    now += tuple(db.execute("SELECT version_num FROM alembic_version").fetchall())
        except sqlite3.Error as e:
            now = ("error", str(e))
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= SCHEMA_QUIET:
            return
        time.sleep(0.1)


def _create_embedded(uri: str):
    """The client of an embedded store, created or checked. Another MLflow client (a notebook, a
    script) may be creating the same store at this moment without sweeper's lock: its half-made
    schema fails ours (alembic's "Online migration expected to match one row", SQLAlchemy's
    "Circular dependency detected"). It finishes in seconds: wait for it and try again."""
    from mlflow.tracking import MlflowClient

    from sweeper.storage.connect import sqlite_path

    _wait_while_migrating(sqlite_path(uri))
    deadline = time.monotonic() + STORE_CREATE_WAIT
    while True:
        try:
            mlflow_client = MlflowClient(tracking_uri=uri)
            mlflow_client.search_experiments(max_results=1)  # the schema is whole
            return mlflow_client
        except Exception as e:
            if time.monotonic() > deadline:
                raise SweeperError(
                    f"cannot create the MLflow tracking store {redact_url(uri)}: {redact(first_line(e))}; another "
                    f"process kept changing its schema for over {STORE_CREATE_WAIT:.0f}s"
                ) from None
            log.info("the MLflow tracking store is being created by another process (%s); waiting", first_line(e))
            time.sleep(1.0)


class TrackingUnreachable(SweeperError):
    """The tracking store did not answer (down, network); it may come back."""


class TrackingAuthError(SweeperError):
    """The tracking server refused the credentials (401/403); waiting will not help."""


RETRY_SECONDS = 2  # between attempts while MLflow is unreachable


def retry_while_unreachable(attempt: Callable[[], T], deadline: float | None, should_stop, failed) -> T:
    """``attempt()`` until it returns, for the writes that outlive an outage (RunLogger.flush,
    log_model). After each failure ``failed(error)`` runs: it warns, or raises when the failure is
    not an outage. Past ``deadline`` (at once without one) or once ``should_stop()`` is true, the
    outage becomes TrackingUnreachable; until then the attempt is repeated every RETRY_SECONDS."""
    while True:
        try:
            return attempt()
        except Exception as e:
            failed(e)
            if deadline is None or time.monotonic() >= deadline or (should_stop is not None and should_stop()):
                raise TrackingUnreachable(f"MLflow stayed unreachable: {redact(first_line(e))}") from None
            time.sleep(RETRY_SECONDS)


@contextlib.contextmanager
def _resends() -> Iterator[Callable[[], int]]:
    """While inside: how many requests urllib3 sent again from this thread (its "Retrying ..."
    warning, whatever broke the first: a read timeout, a connection closed under the answer)."""
    thread, seen = threading.get_ident(), []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if threading.get_ident() == thread and str(record.msg).startswith("Retrying"):
                seen.append(record.created)

    counter, logger = Count(logging.WARNING), logging.getLogger("urllib3.connectionpool")
    logger.addHandler(counter)
    try:
        yield lambda: len(seen)
    finally:
        logger.removeHandler(counter)


def create_once(create: Callable[[], T], made: Callable[[], list[T]], ident, droppable, drop, look: bool = False) -> T:
    """What ``create()`` made, made once even where its POST was sent twice: MLflow's HTTP session
    re-sends a POST whose answer was lost (past its read timeout, or its connection closed), and
    the server makes the thing again (an overloaded one does: a copy beside the real one for
    ever). A create that was sent again, took past the read timeout, failed on the
    way, or ``look``, looks at what it ``made()`` (oldest first): the one answered, else the
    first made, is kept, and each other copy that is ``droppable`` is ``drop``-ped by ``ident``;
    a thing made whose answer never came is kept rather than failing. A create answered at once
    adds no request."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_TIMEOUT

    started, answered, error = time.monotonic(), None, None
    try:
        with _resends() as resent:
            answered = create()
    except Exception as e:
        if not is_transport_error(e):
            raise
        error = e
    else:
        # The elapsed time too: a program that silences urllib3's warnings hides its re-sends.
        sent_once = not resent() and time.monotonic() - started < MLFLOW_HTTP_REQUEST_TIMEOUT.get()
        if sent_once and not look:
            return answered
    found = made()
    if not found:
        if answered is None:
            raise error
        return answered
    keep = answered if answered is not None and ident(answered) in {ident(f) for f in found} else found[0]
    for copy in found:
        if ident(copy) != ident(keep) and droppable(copy):
            drop(ident(copy))
            log.info(
                "MLflow made %s twice (an answer lost, the request sent again): copy %s deleted",
                ident(keep),
                ident(copy),
            )
    return keep


def check_reachable(mlflow_client) -> None:
    """Raise a clear SweeperError when the tracking store cannot be used (down, 401/403)."""
    from mlflow.exceptions import MlflowException

    uri = (
        mlflow_client.tracking_uri
        if hasattr(mlflow_client, "tracking_uri")
        else mlflow_client._tracking_client.tracking_uri
    )
    try:
        mlflow_client.search_experiments(max_results=1)
    except Exception as e:
        if isinstance(e, MlflowException):
            text = str(e)
            code = getattr(e, "get_http_status_code", lambda: None)()
            if code not in (401, 403):
                code = next((c for c in (401, 403) if f"error code {c}" in text or f" {c} " in text), None)
            if code is not None:
                raise TrackingAuthError(
                    f"the MLflow tracking server {redact_url(uri)} refused the credentials (HTTP {code}); "
                    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a valid account "
                    "(MLFLOW_TRACKING_TOKEN for a bearer token)"
                ) from None
        raise TrackingUnreachable(
            f"cannot reach the MLflow tracking store {redact_url(uri)}: {redact(first_line(e))}"
        ) from None


@contextlib.contextmanager
def read_errors(uri: str, what: str) -> Iterator[None]:
    """MLflow failing in the middle of a command's reads (a server that went away, a dropped
    connection) becomes one clear TrackingUnreachable, never a traceback with the URL in it."""
    try:
        yield
    except SweeperError:
        raise
    except Exception as e:
        module = type(e).__module__.split(".")[0]
        if module not in ("mlflow", "requests", "urllib3") and not isinstance(e, OSError):
            raise
        raise TrackingUnreachable(
            f"cannot reach the MLflow tracking store {redact_url(uri)} while reading {what}: {redact(first_line(e))}"
        ) from None


def is_transport_error(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from: MLflow wraps the requests error it caught)
    is a failure to reach the server at all: refused, reset, timed out, no route."""
    import requests

    transport = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, transport):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def outage_or_raise(mlflow_client, what: str):
    """A ``failed`` callback for retry_while_unreachable: warns once while the store is
    unreachable, raises the error as it is when the store answers (not an outage)."""
    warned = False

    def failed(error: Exception) -> None:
        nonlocal warned
        try:
            if is_transport_error(error):  # whatever the store says now: it may have just come back
                raise TrackingUnreachable(str(error))
            check_reachable(mlflow_client)
        except TrackingUnreachable:
            if not warned:
                warned = True
                log.warning("MLflow is unreachable (%s); retrying to %s", redact(first_line(error)), what)
            return
        raise error

    return failed
