"""Keeping passwords out of every message, log record and traceback sweeper prints.

>>> redact("cannot open postgresql://me:pa/ss123@db:5432/x: refused")
'cannot open postgresql://me:***@db:5432/x: refused'
>>> redact_url("postgresql://me:pa ss@db:5432/x")
'postgresql://me:***@db:5432/x'
>>> strip_credentials("https://me:secret@mlflow.example:5000/")
'https://mlflow.example:5000/'
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from urllib.parse import unquote, urlsplit, urlunsplit

from sweeper import settings

# scheme://user:password@ in free text: the password runs to the last "@" of the URL, so a "/"
# (base64 passwords) or an "@" inside it stays hidden. A space inside it is covered by remember().
SECRET_IN_URL = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^:/@\s]*):(?P<password>\S*)@")
MIN_REMEMBERED = 6  # shorter passwords are hidden only where they appear inside a URL
_secrets: set[str] = set()  # passwords of the URLs this process was given (see remember)


_tails: set[str] = set()  # what follows a raw "@" in a password: a parser may show it as a host


def remember(url: str | None) -> str | None:
    """Note the password of a URL this process uses, so that it is hidden wherever it shows up
    later (decoded in a driver's message, in a library's log line); returns ``url``."""
    if url and "://" in url:
        userinfo = url.split("://", 1)[1].rpartition("@")[0]
        if ":" in userinfo:
            password = userinfo.split(":", 1)[1]
            _secrets.update(s for s in (password, unquote(password)) if len(s) >= MIN_REMEMBERED)
            # "user:abc@TAIL@host": a parser that ends the password at the first "@" shows
            # "TAIL@host" as the host, in messages that hold no URL to redact.
            for raw in (password, unquote(password)):
                _tails.update(raw.split("@", 1)[1:])
    return url


def quote_password(url: str) -> str:
    """The URL with each raw "@" of its password written %40, as SQLAlchemy reads it (it ends a
    password at its first "@" and takes the rest for the host).

    >>> quote_password("postgresql://me:a@b@db:5432/x")
    'postgresql://me:a%40b@db:5432/x'
    """
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not (sep and at and colon) or "@" not in password or "/" in user or "?" in userinfo:
        return url
    return f"{scheme}://{user}:{password.replace('@', '%40')}@{host}"


def redact(text: object) -> str:
    """Hide the password of every URL in ``text`` (postgresql://user:secret@host -> user:***@host)
    and every password remembered from this process's URLs."""
    text = str(text)
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    for tail in sorted(_tails, key=len, reverse=True):
        text = text.replace(f"{tail}@", "***@")
    return SECRET_IN_URL.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def redact_url(url: str) -> str:
    """One URL to show, with everything between "user:" and its last "@" masked: SQLAlchemy and
    urllib would end the password at the first "@" or "/", showing the rest of a password that
    holds one."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not (sep and at):
        return redact(url)
    user, colon, _ = userinfo.partition(":")
    if "/" in user:  # no credentials: an "@" in a path (sqlite:////data/a@b.db)
        return url
    return f"{scheme}://{user}:***@{host}" if colon else f"{scheme}://***@{host}"


def strip_credentials(url: str) -> str:
    """http://user:secret@host:5000 -> http://host:5000 (a URL to print and click, not to log in with)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


# --- every log record, traceback and thread crash of the process, redacted ---------------------


def install_redaction() -> None:
    """Redact every log record (message, arguments, exception and stack text) of sweeper and of
    the libraries it calls (MLflow's system-metrics thread, urllib3, SQLAlchemy), and the
    tracebacks of uncaught exceptions in any thread. Called once by each entry point."""
    remember(f"x://u:{settings.tracking_password()}@")
    if getattr(logging.getLogRecordFactory(), "_sweeper_redacts", False):
        return
    make_record = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: logging reports it later, as it would
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return record

    factory._sweeper_redacts = True
    logging.setLogRecordFactory(factory)

    def excepthook(kind, value, tb) -> None:
        import traceback

        sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))

    def thread_excepthook(args) -> None:
        import traceback

        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread else "?"
        text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        sys.stderr.write(redact(f"Exception in thread {name}:\n{text}"))

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
