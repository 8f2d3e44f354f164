"""Why trials fail: one table of causes (code, wording, fix, whether a retry follows), the one
decision whether a failed trial is retried, and the grouping of failures that `sweeper status`
and the launch board show.

A trial that fails stores its cause's code (``sweeper.fail_cause``) beside the message for
people (``sweeper.fail_reason``); trials stored before codes existed are placed by patterns over
their message. The standard library only: trials are read by their attributes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sweeper.names import FAIL_CAUSE_ATTR, FAIL_REASON_ATTR, NO_RETRY_ATTR, RETRY_HISTORY_ATTR


@dataclass(frozen=True)
class Cause:
    code: str  # stored on the trial: never renamed
    label: str | None  # the group's name in `status`; None: the message's first words name it
    fix: str | None
    retried: bool  # a retry follows by itself (while the policy's max_retries allows)
    stop: bool = False  # the worker stopped the trial after a checkpoint: nothing broke
    pattern: str | None = None  # finds the cause in the message of a trial stored without a code


NON_FINITE_LOSS = "non_finite_loss"
OUT_OF_MEMORY = "out_of_memory"
WORKER_LOST = "worker_lost"
TRACKING_OUTAGE = "tracking_outage"
TRIAL_TIMEOUT = "trial_timeout"
WORKER_STOPPED = "worker_stopped"
STUDY_CANCELLED = "study_cancelled"
BAD_SPEC = "bad_spec"
ERROR = "error"

CAUSES = {
    c.code: c
    for c in (
        Cause(
            NON_FINITE_LOSS,
            "non-finite loss",
            "lower [train] lr (or use another optimizer), then `sweeper retry`",
            retried=False,
            pattern=r"loss became (nan|inf)",
        ),
        Cause(
            OUT_OF_MEMORY,
            "out of memory",
            "lower [train] batch_size or use a larger GPU, then `sweeper retry`",
            retried=False,
            pattern=r"out of memory",
        ),
        Cause(
            WORKER_LOST,
            "worker lost",
            "a worker was killed or lost its host (look for the OOM killer in `dmesg`); the trial is retried by itself",
            retried=True,
            pattern=r"no heartbeat",
        ),
        Cause(
            TRACKING_OUTAGE,
            "tracking outage",
            "check the MLflow server (`sweeper doctor`); the trial is retried",
            retried=True,
            pattern=r"MLflow .* unreachable",
        ),
        Cause(
            TRIAL_TIMEOUT,
            "trial timeout",
            "raise [policy] trial_timeout or lower [train] epochs",
            retried=True,
            stop=True,
            pattern=r"trial_timeout",
        ),
        Cause(WORKER_STOPPED, "worker stopped", None, retried=True, stop=True, pattern=r"stopped by a signal"),
        # Handed back, not failed: its continuation waits for `sweeper resume`, no retry counted.
        Cause(
            STUDY_CANCELLED,
            "study cancelled",
            "`sweeper resume` continues the handed-back trials",
            retried=False,
            stop=True,
            pattern=r"study cancelled",
        ),
        Cause(BAD_SPEC, None, None, retried=False),  # the stored spec or recipe is refused
        Cause(ERROR, None, None, retried=True),  # anything else: named by its message
    )
}


def cause_of(code: str | None, reason: str | None) -> Cause:
    """The cause of a failed trial: its stored code, else (stored before codes) its message's."""
    if code in CAUSES:
        return CAUSES[code]
    for cause in CAUSES.values():
        if cause.pattern and re.search(cause.pattern, reason or ""):
            return cause
    return CAUSES[ERROR]


def name(code: str | None, reason: str | None) -> tuple[str, str | None]:
    """(cause, fix) as `status` shows them; a cause without a label is named by the message's
    first words (numbers as N, so one group holds every epoch and size)."""
    cause = cause_of(code, reason)
    if cause.label is not None:
        return cause.label, cause.fix
    text = reason or "no reason recorded"
    head = re.split(r"[:;(]", text, maxsplit=1)[0].strip()
    return re.sub(r"\d+", "N", head)[:80], None


def of_trial(trial) -> tuple[str, str | None]:
    """(cause, fix) of a failed trial."""
    attrs = trial.system_attrs
    return name(attrs.get(FAIL_CAUSE_ATTR), attrs.get(FAIL_REASON_ATTR))


def retries_used(system_attrs: dict[str, Any]) -> int:
    return len(system_attrs.get(RETRY_HISTORY_ATTR, []))


def will_retry(code: str, system_attrs: dict[str, Any], max_retries: int) -> bool:
    """Whether a trial failing now for ``code`` is retried: its cause allows it and the policy's
    max_retries is not used up (the retry callback enqueues the retry by the same count)."""
    return CAUSES[code].retried and retries_used(system_attrs) < max_retries


def failed_for_good(trial, max_retries: int) -> bool:
    """A FAILed trial that no retry follows: a cause retrying cannot fix, or retries used up."""
    if trial.state.name != "FAIL":
        return False
    attrs = trial.system_attrs
    return bool(attrs.get(NO_RETRY_ATTR)) or retries_used(attrs) >= max_retries


def groups(trials: list, latest: list, max_retries: int) -> list[dict[str, Any]]:
    """FAILed ``trials`` grouped by cause: how many trials, how many cells failed for good (of
    ``latest``, each cell's latest trial), the fix; most cells, then most trials, first."""
    for_good = {t.number for t in latest if failed_for_good(t, max_retries)}
    found: dict[str, dict[str, Any]] = {}
    for t in trials:
        if t.state.name != "FAIL":
            continue
        reason = t.system_attrs.get(FAIL_REASON_ATTR)
        if cause_of(t.system_attrs.get(FAIL_CAUSE_ATTR), reason).code == STUDY_CANCELLED:
            continue  # handed back, continued by its copy: nothing failed
        label, fix = of_trial(t)
        group = found.setdefault(
            label, {"cause": label, "trials": 0, "cells_failed_for_good": 0, "fix": fix, "example": reason}
        )
        group["trials"] += 1
        group["cells_failed_for_good"] += t.number in for_good
    return sorted(found.values(), key=lambda g: (-g["cells_failed_for_good"], -g["trials"]))
