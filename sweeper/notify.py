"""Notifications: a JSON POST when a study completes and when a cell fails for good.

The URL comes from ``--notify`` or ``SWEEPER_NOTIFY_URL`` (a chat webhook, an alerting hook).
A webhook's path is often its secret, so logs name only its host. A POST that fails is logged
and never stops a worker. It goes through the proxy that ``HTTPS_PROXY`` or ``HTTP_PROXY`` names
(an http:// proxy; HTTPS through a CONNECT tunnel), unless ``NO_PROXY`` covers the hook, read as
MLflow's client (requests) reads it: names and their subdomains, ``host:port``, IPv4 networks in
CIDR form.

    >>> event("study_complete", "quickstart", None, outcome="finished")["event"]
    'study_complete'
    >>> send(None, {"event": "study_complete"})  # no URL: nothing to do
    False
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import json
import logging
import socket
import threading
import urllib.parse
import urllib.request
from typing import Any

from sweeper.errors import first_line
from sweeper.redact import redact, remember

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


def check_url(url: str | None) -> str | None:
    """The URL if a notification can be sent to it, else ValueError saying why (``launch`` and
    ``worker`` refuse it at start: a bad hook found mid-study would go unnoticed)."""
    if not url:
        return None
    remember(url)  # its password is hidden wherever it shows up
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a port out of range)
    except ValueError as e:
        raise ValueError(f"{redact(url)} is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{redact(url)} must be an http:// or https:// URL with a host, like https://hooks.example/T0K3N"
        )
    proxy_for(parts)
    return url


def proxy_for(parts: urllib.parse.SplitResult) -> urllib.parse.SplitResult | None:
    """The proxy the environment names for the hook's scheme (``HTTPS_PROXY``, ``HTTP_PROXY`` or
    their lower-case forms), None where there is none or ``NO_PROXY`` covers the hook;
    ValueError for one that is not an http:// URL with a host."""
    from requests.utils import should_bypass_proxies  # MLflow's client's NO_PROXY rules: CIDR, host:port

    proxy = urllib.request.getproxies_environment().get(parts.scheme)
    if not proxy or should_bypass_proxies(parts.geturl(), no_proxy=None):
        return None
    found = urllib.parse.urlsplit(remember(proxy if "://" in proxy else f"http://{proxy}"))  # host:port too, as curl
    try:
        found.port  # noqa: B018  (raises ValueError on a port out of range)
    except ValueError:
        found = found._replace(netloc="")
    if found.scheme != "http" or not found.hostname:
        variable = f"{parts.scheme.upper()}_PROXY"
        raise ValueError(
            f"{variable}={redact(proxy)}: notifications go through an http:// proxy with a host, like "
            f"http://proxy.example:3128; set {variable} to one, or NO_PROXY={parts.hostname} to reach the hook directly"
        )
    return found


def send(url: str | None, document: dict[str, Any]) -> bool:
    """POST ``document`` as JSON to ``url``; True when the hook answered 2xx. Never raises; the
    whole request (connect, send, headers, body) takes at most TIMEOUT seconds."""
    if not url:
        return False
    where = "the notification URL"
    try:
        where = _host(url)
        check_url(url)
        proxy = proxy_for(urllib.parse.urlsplit(url))
        where += f" through the proxy {_host(proxy.geturl())}" if proxy else ""
        status = _post(url, json.dumps(document, default=str).encode(), proxy)
        if not 200 <= status < 300:
            raise OSError(f"HTTP {status}")
        log.info("notified %s: %s of study %s", where, document.get("event"), document.get("study"))
        return True
    except Exception as e:
        log.warning("notification to %s failed (%s); the worker goes on", where, redact(first_line(e)))
        return False


def _post(url: str, body: bytes, proxy: urllib.parse.SplitResult | None) -> int:
    """POST ``body``, through ``proxy`` (``proxy_for``'s) if any; the answer's status. Credentials in the URL go as basic auth (urllib
    would take ``user:password@`` for part of the host), a proxy's as proxy basic auth. A timer
    shuts the socket down at TIMEOUT: a socket timeout bounds each read only, and a hook
    trickling its answer a byte at a time would hold the worker for ever."""
    parts = urllib.parse.urlsplit(url)
    https = parts.scheme == "https"
    connection_class = http.client.HTTPSConnection if https else http.client.HTTPConnection
    headers = {"Content-Type": "application/json", "User-Agent": "sweeper", **_basic_auth("Authorization", parts)}
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    if proxy is None:
        connection = connection_class(parts.hostname, parts.port, timeout=TIMEOUT)
    else:
        connection = connection_class(proxy.hostname, proxy.port or 80, timeout=TIMEOUT)
        if https:  # a CONNECT tunnel through the proxy; TLS with the hook inside it
            connection.set_tunnel(parts.hostname, parts.port, headers=_basic_auth("Proxy-Authorization", proxy))
        else:  # the proxy forwards the request: it gets the hook's whole URL
            headers.update(_basic_auth("Proxy-Authorization", proxy))
            netloc = parts.netloc.rpartition("@")[2]
            path = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        with contextlib.suppress(OSError, AttributeError):
            connection.sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(TIMEOUT, expire)
    timer.daemon = True
    timer.start()
    try:
        connection.connect()
        if expired.is_set():
            raise TimeoutError(f"no answer within {TIMEOUT:g}s")
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        if expired.is_set():
            raise TimeoutError(f"no whole answer within {TIMEOUT:g}s")
        return response.status
    except (OSError, http.client.HTTPException):
        if expired.is_set():
            raise TimeoutError(f"no whole answer within {TIMEOUT:g}s") from None
        raise
    finally:
        timer.cancel()
        connection.close()


def _basic_auth(header: str, parts: urllib.parse.SplitResult) -> dict[str, str]:
    if parts.username is None:
        return {}
    pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    return {header: "Basic " + base64.b64encode(pair.encode()).decode()}


def _host(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}" + (f":{parts.port}" if parts.port else "")
