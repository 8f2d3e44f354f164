"""What the commands print: JSON documents and tables on stdout, progress on stderr."""

from __future__ import annotations

import json
from typing import Any

import click


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def print_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, default=str))


def print_table(title: str | None, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not console.is_terminal:  # piped: never truncate numbers to fit 80 columns
        console.width = 220
    columns = columns or (list(rows[0]) if rows else [])
    table = Table(title=Text(title) if title else None, title_justify="left")
    for col in columns:
        table.add_column(col, justify="right" if rows and isinstance(rows[0].get(col), (int, float)) else "left")
    for row in rows:  # Text: user text ("[/x]" in a description) is shown as written, never as markup
        table.add_row(*(Text(_cell(row.get(col), col)) for col in columns))
    console.print(table)


def _cell(value: Any, column: str = "") -> str:
    if isinstance(value, float):
        return f"{value:.{decimals(column)}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def decimals(column: str) -> int:
    """Places a float column is shown with: seconds to 0.1, errors and losses to 4, else 2.

    >>> decimals("elapsed_s"), decimals("top1_error"), decimals("images_per_s")
    (1, 4, 1)
    """
    if column.endswith(("_s", "seconds")):
        return 1
    if column.endswith(("error", "loss", "value")) or column in ("lr", "lr_gamma"):
        return 4
    return 2
