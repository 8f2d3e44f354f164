"""`sweeper report`: the seed post's tables, rebuilt from what a study logged.

The parts, each readable alone, in the order the command uses them:

- ``read``: the study's cells from Optuna and MLflow into a frame, one row per grid cell;
- ``table``: the seed post's table per dataset, the seed's numbers beside ours, ``--compare``;
- ``formats``: the document as a terminal table, markdown, csv, json or html;
- ``plots``: the three PNGs;
- ``command``: ``print_report``, which ties them together, and ``register_best``.

    >>> frame = build_frame("quickstart")                         # doctest: +SKIP
    >>> frame[["variant", "seed", "state", "top1_error"]]          # doctest: +SKIP
    >>> print_report("quickstart", None, None, fmt="markdown")     # doctest: +SKIP
"""

from sweeper.report.command import ARTIFACT_DIR, print_report, register_best
from sweeper.report.formats import FORMATS, render
from sweeper.report.plots import PLOT_FILES, write_plots
from sweeper.report.read import FRAME_COLUMNS, VARIANT_ORDER, Collected, _typed, build_frame, collect
from sweeper.report.table import compare, format_duration, tables, with_seed

__all__ = [
    "ARTIFACT_DIR",
    "FORMATS",
    "FRAME_COLUMNS",
    "PLOT_FILES",
    "VARIANT_ORDER",
    "Collected",
    "_typed",
    "build_frame",
    "collect",
    "compare",
    "format_duration",
    "print_report",
    "register_best",
    "render",
    "tables",
    "with_seed",
    "write_plots",
]
