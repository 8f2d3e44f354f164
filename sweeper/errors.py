"""Turning known failures into one clear message (exit 1) instead of a traceback."""

from __future__ import annotations

import contextlib
import re
import sys

import click

SECRET_IN_URL = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]*)@")


def redact(text: str) -> str:
    """Hide passwords in URLs (postgresql://user:secret@host -> postgresql://user:***@host)."""
    return SECRET_IN_URL.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))


class SweeperError(Exception):
    """A runtime failure the user can act on; the message says what, where and how to fix it."""


def _known_errors() -> tuple[type[BaseException], ...]:
    from sweeper.checkpoint import CheckpointError
    from sweeper.data.base import DatasetError
    from sweeper.train import NonFiniteLoss

    return SweeperError, DatasetError, CheckpointError, NonFiniteLoss


@contextlib.contextmanager
def friendly_errors():
    try:
        yield
    except click.exceptions.Exit:
        raise
    except Exception as e:  # only the known kinds are caught; anything else is a bug worth a traceback
        # SweeperError first: the other known kinds live in modules that import torch (seconds).
        if not isinstance(e, SweeperError) and not isinstance(e, _known_errors()):
            raise
        click.echo(f"Error: {redact(str(e))}", err=True)
        sys.exit(1)
