"""The seed post's published numbers (the blog post "GoogleNet 簡介與小實驗", 2020-10-23), kept as data.

Both tables of the post: GoogLeNet variants trained 14 epochs on CIFAR-100 and CIFAR-10 with
the same recipe (Adadelta, lr 1.0, StepLR gamma 0.7, batch size 64). ``sweeper report
--against-seed`` puts them beside what a study measured.

    >>> SEED_RESULTS["cifar100"]["standard"].params
    6258500
    >>> SEED_RESULTS["cifar10"]["short4"].seconds
    1530
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEED_EPOCHS = 14
SEED_SOURCE = 'the blog post "GoogleNet 簡介與小實驗" (2020-10-23)'


@dataclass(frozen=True)
class SeedResult:
    top1_error: float
    top5_error: float
    params: int
    time: str  # as printed in the post, e.g. "29m8s" for 14 epochs

    @property
    def seconds(self) -> int:
        return parse_duration(self.time)


def parse_duration(text: str) -> int:
    """``"29m8s"`` -> 1748 seconds (also ``"1h2m3s"``, ``"45s"``)."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text.strip())
    if not match or not any(match.groups()):
        raise ValueError(f"not a duration like 29m8s: {text!r}")
    h, m, s = (int(g or 0) for g in match.groups())
    return h * 3600 + m * 60 + s


# dataset -> variant -> numbers, rows in the post's order
SEED_RESULTS: dict[str, dict[str, SeedResult]] = {
    "cifar100": {
        "naive": SeedResult(0.36, 0.09, 65736148, "52m38s"),
        "standard": SeedResult(0.34, 0.10, 6258500, "29m8s"),
        "long": SeedResult(0.35, 0.10, 9641924, "36m41s"),
        "short": SeedResult(0.32, 0.09, 5271652, "23m11s"),
        "short2": SeedResult(0.32, 0.09, 3523556, "16m29s"),
        "short3": SeedResult(0.36, 0.11, 1985220, "9m3s"),
        "short4": SeedResult(0.44, 0.15, 1650084, "8m56s"),
    },
    "cifar10": {
        "naive": SeedResult(0.15, 0.01, 65291098, "52m51s"),
        "standard": SeedResult(0.10, 0.00, 6166250, "28m45s"),
        "long": SeedResult(0.11, 0.00, 9549674, "40m12s"),
        "short": SeedResult(0.10, 0.00, 5179402, "27m30s"),
        "short2": SeedResult(0.10, 0.00, 3431306, "31m57s"),
        "short3": SeedResult(0.11, 0.00, 1892970, "26m31s"),
        "short4": SeedResult(0.15, 0.01, 1557834, "25m30s"),
    },
}


def lookup(dataset: str, variant: str) -> SeedResult | None:
    return SEED_RESULTS.get(dataset, {}).get(variant)


def records() -> list[dict]:
    """One flat dict per (dataset, variant), e.g. for a pandas DataFrame."""
    return [
        {
            "dataset": dataset,
            "variant": variant,
            "top1_error": r.top1_error,
            "top5_error": r.top5_error,
            "params": r.params,
            "time": r.time,
            "train_seconds": r.seconds,
            "epochs": SEED_EPOCHS,
        }
        for dataset, rows in SEED_RESULTS.items()
        for variant, r in rows.items()
    ]
