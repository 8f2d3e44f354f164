"""Steps shared by tests/test_ui_browser.py and docs/images/refresh.py: start `sweeper ui` on free
ports and stop it, open the links it prints in headless Chromium (no click: they open ready to
compare) and read MLflow's runs table as shown.

The functions wait for what should show and raise on what is missing; the callers assert the rest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
VIEWPORT = {"width": 1600, "height": 1250}
READY_TIMEOUT = 180  # seconds for `sweeper ui` to print its URLs (MLflow's server is slow to start on 2 CPUs)


def sweeper_env(home: Path) -> dict[str, str]:
    """This environment with the embedded stores of ``home``, whatever the caller's variables say."""
    env = {k: v for k, v in os.environ.items() if k not in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI", "SWEEPER_STUDY")}
    return {**env, "SWEEPER_HOME": str(home), "SWEEPER_DATA_DIR": str(home / "data")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(root: int) -> set[int]:
    """Every live process below ``root``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_ui(
    study: str, home: Path, cwd: Path, stderr, compare: str | None = None
) -> tuple[subprocess.Popen, dict[str, str], tuple[int, int]]:
    """`sweeper ui --study STUDY [--compare A,B]` on two free ports in its own session; returns it
    with the URLs it printed ({"MLflow UI": ..., "optuna-dashboard": ..., "MLflow compare": ...})
    once all are there. Raises RuntimeError, after killing it, when they do not come."""
    port, dashboard_port = free_port(), free_port()
    command = ["ui", "--study", study, "--port", str(port), "--dashboard-port", str(dashboard_port)]
    command += ["--compare", compare] if compare else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "sweeper", *command],
        env=sweeper_env(home),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )
    urls: dict[str, str] = {}

    def read():
        for line in proc.stdout:
            name, _, url = line.strip().rpartition(" ")
            urls[name.strip()] = url

    threading.Thread(target=read, daemon=True).start()
    expected = 3 if compare else 2
    deadline = time.monotonic() + READY_TIMEOUT
    while len(urls) < expected and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if len(urls) < expected:
        stop_ui(proc)
        raise RuntimeError(f"`sweeper ui` printed {urls} (exit {proc.poll()})")
    return proc, urls, (port, dashboard_port)


def stop_ui(proc: subprocess.Popen, children: set[int] = frozenset()) -> None:
    """SIGTERM `sweeper ui`'s process group (it stops its servers), SIGKILL it after 60 s, then any
    of ``children`` (its processes, from descendants()) still alive."""
    with_children = set(children) | descendants(proc.pid)
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    for pid in with_children:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def new_page(browser):
    """A page of VIEWPORT size in a context of its own; close it with ``page.context.close()``."""
    page = browser.new_context(viewport=VIEWPORT).new_page()
    page.set_default_timeout(60_000)
    return page


def close_assistant(page) -> None:
    """MLflow 3's assistant panel takes a third of the page; close it when it is there (the e2e
    stack's page, which clicks its way to the cells)."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def open_ready(page, url: str, cells: list[str], tries: int = 2) -> None:
    """Open ``url`` and wait, without a click, until the run of every cell in ``cells`` shows.
    A page still without them after the page's timeout is loaded once more, as a person would:
    under a loaded CI machine MLflow's UI once sat 60 s without its runs (a fetch lost in its
    JavaScript, not a wrong link: the same link showed them alone and in every other run)."""
    from playwright.sync_api import TimeoutError as PageTimeout

    for attempt in range(1, tries + 1):
        page.goto(url)
        try:
            for cell in cells:
                page.get_by_text(cell, exact=True).first.wait_for()
            page.get_by_role("columnheader", name="top1_error").first.wait_for()
            break
        except PageTimeout:
            shown = page.locator("body").inner_text()[:1500]
            if attempt == tries:
                raise AssertionError(f"{url} did not show the runs of {cells}; the page said:\n{shown}") from None
            print(f"{url}: no runs of {cells} after the page's timeout; loading it again. The page said:\n{shown}")
    time.sleep(0.5)  # let the grid settle


def runs_table(page) -> list[dict[str, str]]:
    """The rows of MLflow's runs table as shown, top to bottom: {column id: text}, with the run
    name under "name" (the grid draws a row in two parts, the pinned name and the rest)."""
    rows = page.evaluate(ROWS)
    return [{**cells, "name": cells.get("attributes.`Run Name`", "").split("\n")[-1]} for cells in rows]


# ag-grid rows carry the run's id (row-id) and their position (row-index); cells their column (col-id).
ROWS = """() => {
  const rows = new Map();
  for (const row of document.querySelectorAll('[role=row][row-id]')) {
    const index = Number(row.getAttribute('row-index'));
    const cells = rows.get(index) || {};
    for (const cell of row.querySelectorAll('[col-id]')) cells[cell.getAttribute('col-id')] = cell.innerText.trim();
    rows.set(index, cells);
  }
  return [...rows.keys()].sort((a, b) => a - b).map(k => rows.get(k));
}"""


def shoot_runs_table(page, cells: list[str], path: Path) -> None:
    """The top of the page down to just below the lowest of the ``cells``' rows."""
    bottom = max(_bottom(page.get_by_text(cell, exact=True).first) for cell in cells)
    page.screenshot(path=path, clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": bottom + 30})


def _bottom(locator) -> float:
    box = locator.bounding_box()
    return box["y"] + box["height"]
