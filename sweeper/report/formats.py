"""Rendering the report: a terminal table, markdown, csv, json or a self-contained html page,
and writing a document atomically."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from sweeper import seed_results
from sweeper.report.plots import PLOT_TITLES
from sweeper.report.read import DEFAULT_EPOCHS
from sweeper.report.table import Table, tables, with_seed

FORMATS = ("table", "markdown", "csv", "json", "html")


def render(
    collected_frame: pd.DataFrame,
    fmt: str,
    epochs: int = DEFAULT_EPOCHS,
    study: str | None = None,
    against_seed: bool = False,
    plots: dict[str, Path] | None = None,
    width: int | None = None,
) -> str:
    """The report document in ``fmt`` (one of FORMATS) as text."""
    frame = with_seed(collected_frame) if against_seed else collected_frame
    if fmt == "json":
        return json.dumps(records(frame), indent=2) + "\n"
    if fmt == "csv":
        return frame.to_csv(index=False)
    built = tables(frame, epochs, against_seed, study)
    if fmt == "markdown":
        return render_markdown(built, study, against_seed)
    if fmt == "html":
        return render_html(built, study, against_seed, plots or {})
    if fmt == "table":
        return render_rich(built, width=width)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Plain JSON-able dicts: NaN/NA -> None, numpy numbers -> Python numbers."""
    out = []
    for row in frame.to_dict("records"):
        out.append({k: _plain(v) for k, v in row.items()})
    return out


def _plain(value):
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
        return None if isinstance(value, float) and math.isnan(value) else value
    return value


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A GitHub pipe table (pandas.to_markdown needs tabulate, which sweeper does not require)."""

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    widths = [max([len(cell(c))] + [len(cell(r[i])) for r in rows]) for i, c in enumerate(columns)]
    right = [i > 0 for i in range(len(columns))]  # numbers right-aligned, the variant name left
    lines = [
        "| " + " | ".join(cell(c).ljust(w) for c, w in zip(columns, widths)) + " |",
        "|" + "|".join(("-" * (w + 1) + ":") if r else (":" + "-" * (w + 1)) for w, r in zip(widths, right)) + "|",
    ]
    for row in rows:
        lines.append(
            "| " + " | ".join(cell(v).rjust(w) if r else cell(v).ljust(w) for v, w, r in zip(row, widths, right)) + " |"
        )
    return "\n".join(lines)


def render_markdown(built: list[Table], study: str | None = None, against_seed: bool = False) -> str:
    parts = [f"# Study {study}" if study else "# sweeper report", ""]
    if not built:
        parts += ["No cells yet.", ""]
    for t in built:
        parts += [f"**{t.title}**", "", markdown_table(t.columns, t.rows), ""]
    if against_seed:
        parts += [f"Seed columns: {seed_results.SEED_SOURCE} ({seed_results.SEED_EPOCHS} epochs).", ""]
    return "\n".join(parts)


def render_rich(built: list[Table], width: int | None = None) -> str:
    from rich.console import Console
    from rich.table import Table as RichTable
    from rich.text import Text

    buffer = io.StringIO()
    console = Console(file=buffer, width=width or 220, color_system=None, soft_wrap=True)
    if not built:
        console.print("no cells yet")
    for t in built:
        table = RichTable(title=Text(t.title) if t.title else None, title_justify="left")
        for i, col in enumerate(t.columns):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in t.rows:
            table.add_row(*(Text(str(c)) for c in row))
        console.print(table)
    return buffer.getvalue()


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.7rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0 1.5rem; }
"""


def render_html(built: list[Table], study: str | None, against_seed: bool, plots: dict[str, Path]) -> str:
    title = html.escape(f"sweeper report: {study}" if study else "sweeper report")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{title}</title>",
        f"<style>{HTML_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{title}</h1>",
    ]
    if not built:
        parts.append("<p>No cells yet.</p>")
    for t in built:
        parts.append(f"<h2>{html.escape(t.title)}</h2>")
        parts.append("<table>")
        parts.append("<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in t.columns) + "</tr></thead>")
        parts.append("<tbody>")
        for row in t.rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>")
        parts.append("</tbody></table>")
    if against_seed:
        parts.append(f"<p>Seed columns: {html.escape(seed_results.SEED_SOURCE)}.</p>")
    for name, path in plots.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f"<h2>{html.escape(PLOT_TITLES.get(name, name))}</h2>")
        parts.append(f'<img alt="{html.escape(PLOT_TITLES.get(name, name))}" src="data:image/png;base64,{data}">')
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def render_compare(results: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(results, indent=2) + "\n"
    if fmt == "csv":  # the json rows, seeds space-separated
        rows = [{**r, "seeds": " ".join(map(str, r["seeds"]))} for r in results]
        return pd.DataFrame(rows, columns=list(results[0]) if results else None).to_csv(index=False)
    columns = ["Dataset", "A - B", "Mean diff", "95% CI", "Pairs", "Verdict"]
    rows = []
    for r in results:
        ci = "—" if r["ci_low"] is None else f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        mean = "—" if r["diff_mean"] is None else f"{r['diff_mean']:+.4f}"
        rows.append([r["dataset"], f"{r['a']} - {r['b']}", mean, ci, str(r["n_pairs"]), r["verdict"]])
    title = f"Seed-paired {results[0]['metric'] if results else 'top1_error'} difference"
    if fmt == "markdown":
        return f"**{title}**\n\n" + markdown_table(columns, rows) + "\n"
    return render_rich([Table("", title, columns, rows)])


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a report is an ordinary file
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
