"""Steps shared by tests/test_ui_browser.py and docs/images/refresh.py: start `sweeper ui` on free
ports and stop it, and drive MLflow's runs table and compare page in headless Chromium.

The functions wait for what they click and raise on what is missing; the callers assert the rest.
"""

from __future__ import annotations

import contextlib
import json
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
# The runs table's columns: off the defaults that say nothing here, on the numbers the seed's table compares.
TOGGLED_COLUMNS = ["Dataset", "Source", "Models", "top1_error", "top5_error", "num_params", "macs", "train_seconds"]


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


def start_ui(study: str, home: Path, cwd: Path, stderr) -> tuple[subprocess.Popen, dict[str, str], tuple[int, int]]:
    """`sweeper ui --study STUDY` on two free ports in its own session; returns it with the URLs it
    printed ({"MLflow UI": ..., "optuna-dashboard": ...}) once both are there. Raises RuntimeError,
    after killing it, when they do not come."""
    port, dashboard_port = free_port(), free_port()
    command = ["ui", "--study", study, "--port", str(port), "--dashboard-port", str(dashboard_port)]
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
    deadline = time.monotonic() + READY_TIMEOUT
    while len(urls) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if len(urls) < 2:
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
    """MLflow 3's assistant panel takes a third of the page; close it when it is there."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def open_runs_table(page, mlflow_url: str, cells: list[str]) -> None:
    """The study's runs table at the URL `sweeper ui` printed, its parent run unfolded so that the
    run of every cell in ``cells`` shows."""
    page.goto(mlflow_url)
    page.get_by_text("matching runs").first.wait_for()
    close_assistant(page)
    # The cells are nested under the study's parent run: expand it.
    page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()
    for cell in cells:
        page.get_by_text(cell, exact=True).first.wait_for()


def show_seed_columns(page) -> None:
    """Columns: hide Dataset, Source and Models, show the metrics the seed's table compares."""
    page.get_by_test_id("column-selection-dropdown").first.click()
    for name in TOGGLED_COLUMNS:
        node = page.locator(f'[class*="tree-treenode"]:has(span[title="{name}"])').first
        node.scroll_into_view_if_needed()
        node.locator('[class*="tree-checkbox"]').first.click()
    page.keyboard.press("Escape")
    page.get_by_role("columnheader", name="top1_error").first.wait_for()
    time.sleep(0.5)  # let the grid settle before the picture


def shoot_runs_table(page, cells: list[str], path: Path) -> None:
    """The top of the page down to just below the lowest of the ``cells``' rows."""
    bottom = max(_bottom(page.get_by_text(cell, exact=True).first) for cell in cells)
    page.screenshot(path=path, clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": bottom + 30})


def open_compare(page, mlflow_url: str, experiment_id: str, run_ids: list[str], names: list[str]) -> None:
    """MLflow's compare page for ``run_ids`` (run names ``names``): Visualizations collapsed, the
    assistant closed, parameters and metrics showing only the rows that differ."""
    base = mlflow_url.split("#")[0]
    page.goto(
        f"{base}#/compare-runs?runs={json.dumps(run_ids)}&experiments={json.dumps([experiment_id])}"
        "&workflowType=machine_learning"
    )
    page.get_by_text(f"Comparing {len(run_ids)} Runs").first.wait_for()
    for text in ["num_params", *names]:
        page.get_by_text(text, exact=True).first.wait_for()
    page.get_by_text("Visualizations", exact=True).first.click()
    close_assistant(page)
    page.get_by_role("switch").nth(0).click()  # parameters: show diff only
    page.get_by_role("switch").nth(1).click()  # metrics: show diff only
    # The metric table scrolls in a box of a fixed height and draws only the rows in view:
    # top1_error sorts below the fold once a run has more metrics.
    page.evaluate(UNFOLD_TABLES)
    page.get_by_text("top1_error", exact=True).first.wait_for()
    time.sleep(0.5)


def shoot_compare(page, path: Path) -> None:
    """The compare page from its top down to the Artifacts section, every metric row in it: the
    tables, which scroll inside boxes of a fixed height, are made as tall as their rows first, and
    the viewport as tall as the picture."""
    page.evaluate(UNFOLD_TABLES)
    time.sleep(0.5)  # the grids re-render at their new height
    bottom = page.get_by_text("Artifacts", exact=True).first.bounding_box()["y"]
    if bottom > VIEWPORT["height"]:
        page.set_viewport_size({"width": VIEWPORT["width"], "height": int(bottom) + 100})
        time.sleep(0.5)
        bottom = page.get_by_text("Artifacts", exact=True).first.bounding_box()["y"]
    page.screenshot(path=path, clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": bottom - 10})


# Each of MLflow's virtualized grids (react-virtualized) renders all its rows in an inner container
# but shows them through a box of fixed height; set that box, and the ancestors exactly as tall as
# it, to the rows' height.
UNFOLD_TABLES = """() => {
  for (const grid of document.querySelectorAll('.ReactVirtualized__Grid')) {
    const rows = grid.querySelector('.ReactVirtualized__Grid__innerScrollContainer');
    if (!rows || rows.offsetHeight <= grid.offsetHeight) continue;
    const box = grid.offsetHeight;
    for (let e = grid; e && (e === grid || e.offsetHeight === box || e.offsetHeight === 0); e = e.parentElement) {
      e.style.setProperty('height', rows.offsetHeight + 'px', 'important');
    }
  }
}"""


def _bottom(locator) -> float:
    box = locator.bounding_box()
    return box["y"] + box["height"]
