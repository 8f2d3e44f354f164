"""One word for where a study stands, with its reason: what `status`, the launch board and the
lifecycle commands say.

A study has two stored facts: its lifecycle (running, paused, stopped, cancelled: what the user
or the failure policy asked of the workers) and its outcome (running, finished, failed: what its
trials add up to). A user wants one answer; a study whose every cell is done is finished (or
failed) whatever its lifecycle says, and otherwise the lifecycle tells.

>>> word({"state": "running"}, "finished", {"COMPLETE": 6, "PRUNED": 1, "FAIL": 0, "WAITING": 0, "RUNNING": 0})
('finished', 'every cell is done: 6 complete, 1 pruned')
>>> word({"state": "paused", "reason": "`sweeper pause`"}, "running", {"WAITING": 2, "RUNNING": 0})
('paused', '`sweeper pause`')
"""

from __future__ import annotations

from typing import Any

WORDS = ("running", "paused", "stopped", "cancelled", "finished", "failed")
DONE = ("finished", "failed")


def word(life: dict[str, Any], outcome: str, cells: dict[str, int]) -> tuple[str, str | None]:
    """(state, reason) from the stored lifecycle, the outcome and the latest trial of each cell by state."""
    if outcome == "finished":
        done = f"{cells.get('COMPLETE', 0)} complete" + (f", {cells['PRUNED']} pruned" if cells.get("PRUNED") else "")
        return "finished", f"every cell is done: {done}"
    if outcome == "failed":
        return "failed", (
            f"{cells.get('FAIL', 0)} cell(s) failed for good, {cells.get('COMPLETE', 0)} complete; "
            "fix the cause, then `sweeper retry`"
        )
    state = life.get("state", "running")
    if state != "running":
        return state, life.get("reason")
    return "running", f"{cells.get('RUNNING', 0)} cell(s) running, {cells.get('WAITING', 0)} waiting"


def eta_withheld(state: str, running: int) -> str | None:
    """Why no ETA is shown, or None when one is: a study that is not running, or that no worker runs."""
    if state in DONE:
        return None
    if state != "running":
        return f"study {state}"
    if running == 0:
        return "no worker running"
    return None
