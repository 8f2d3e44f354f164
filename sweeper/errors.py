"""The failures sweeper knows: each becomes one clear message (exit 1; bad input 2) instead of a
traceback (sweeper.cli turns them into that message; sweeper.redact keeps passwords out of it)."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def root_cause(e: BaseException) -> str:
    """The first line of the innermost exception in the chain that says something (a driver's message)."""
    chain = []
    while e is not None and len(chain) < 20:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in reversed(chain):
        text = str(err).strip()
        if text and text not in ("()", "None"):
            return text.splitlines()[0]
    return type(chain[-1]).__name__


class SweeperError(Exception):
    """A runtime failure the user can act on; the message says what, where and how to fix it."""


class BadInput(SweeperError):
    """Input refused once the data it names was read (a variant not in the study): exit 2, as
    click's own refusals of bad options."""


class TrialLost(Exception):
    """Another worker owns the trial now: this one's heartbeat went stale (a freeze, a partition,
    a long database outage), the trial was failed and its retry enqueued. Stand down, touch nothing."""


class LeaseLapsed(Exception):
    """The worker has not renewed its hold on a trial for too long to write for it (the database
    unreachable): its writes wait until a renewal succeeds, or the trial turns out lost."""
