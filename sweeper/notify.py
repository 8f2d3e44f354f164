"""Notifications: a JSON POST when a study completes and when a cell fails for good.

The URL comes from ``--notify`` or ``SWEEPER_NOTIFY_URL`` (a chat webhook, an alerting hook).
A webhook's path is often its secret, so logs name only its host. A POST that fails is logged
and never stops a worker.

    >>> event("study_complete", "quickstart", None, outcome="finished")["event"]
    'study_complete'
    >>> send(None, {"event": "study_complete"})  # no URL: nothing to do
    False
"""

from __future__ import annotations

import datetime
import json
import logging
import urllib.parse
import urllib.request
from typing import Any

from sweeper.errors import redact

log = logging.getLogger("sweeper.notify")

TIMEOUT = 5.0  # seconds; a slow hook must not hold a worker up


def event(kind: str, study: str, tracking_uri: str | None, run_id: str | None = None, **fields: Any) -> dict[str, Any]:
    """The JSON document sent: ``event``, ``study``, ``at`` and, for a cell, its ``cell``,
    ``reason``, ``mlflow_run_id`` and ``mlflow_url``."""
    from sweeper import tracking

    experiment_id = None
    if run_id and tracking_uri and tracking.is_server(tracking_uri):
        try:
            experiment_id = tracking.client(tracking_uri).get_run(run_id).info.experiment_id
        except Exception:  # the link is a convenience; MLflow down must not stop the notification
            experiment_id = None
    document = {
        "event": kind,
        "study": study,
        "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }
    if run_id:
        document["mlflow_run_id"] = run_id
        link = tracking.run_link(tracking_uri, experiment_id, run_id)
        document["mlflow_url"] = redact(link) if link else None
    return document


def send(url: str | None, document: dict[str, Any]) -> bool:
    """POST ``document`` as JSON to ``url``; True when the hook answered 2xx. Never raises."""
    if not url:
        return False
    where = _host(url)
    try:
        request = urllib.request.Request(
            url,
            data=json.dumps(document, default=str).encode(),
            headers={"Content-Type": "application/json", "User-Agent": "sweeper"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            response.read()
        log.info("notified %s: %s of study %s", where, document.get("event"), document.get("study"))
        return True
    except Exception as e:
        reason = getattr(e, "reason", None) or getattr(e, "code", None) or type(e).__name__
        log.warning("notification to %s failed (%s); the worker goes on", where, reason)
        return False


def _host(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}" + (f":{parts.port}" if parts.port else "")
