"""Numbers as people read them."""

from __future__ import annotations


def duration(seconds: float | None) -> str:
    """A run time to show: 2m05s, 1h07m, or "unknown".

    >>> duration(125), duration(4020), duration(None)
    ('2m05s', '1h07m', 'unknown')
    """
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
