"""`sweeper ui` in a real browser: the MLflow UI lists and compares a study's cells, optuna-dashboard
shows its trials, and stopping the command leaves no process behind.

Needs Chromium at /usr/bin/chromium (Debian's `chromium` package) and the playwright Python
package; without them the module is skipped with the reason, unless SWEEPER_REQUIRE_BROWSER=1
(CI), where it fails instead. SWEEPER_UPDATE_SCREENSHOTS=1 copies the experiment-page and
compare screenshots to docs/images/ for docs/COMPARING.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
STUDY = "ui-tiny"
CELLS = ["short4/digits/s1", "short3/digits/s1"]
SPEC = textwrap.dedent("""\
    description = "sweeper ui browser test: 2 variants x digits"
    [grid]
    variant = ["short4", "short3"]
    dataset = ["digits"]
    seed = [1]
    [train]
    epochs = 2
    limit_train = 256
    limit_test = 128
    """)
DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"
READY_TIMEOUT = 180  # seconds for `sweeper ui` to print its URLs (MLflow's server is slow to start on 2 CPUs)
VIEWPORT = {"width": 1600, "height": 1250}

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _missing_browser() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is absent (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def require_browser():
    """Before the study is trained: skip (or, with SWEEPER_REQUIRE_BROWSER=1, fail) at once."""
    reason = _missing_browser()
    if reason:
        if os.environ.get("SWEEPER_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SWEEPER_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
        pytest.skip(f"browser test skipped: {reason}")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI", "SWEEPER_STUDY")}
    return {**env, "SWEEPER_HOME": str(home), "SWEEPER_DATA_DIR": str(home / "data")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(root: int) -> set[int]:
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


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def ui(require_browser, tmp_path_factory):
    """A trained tiny study served by `sweeper ui` on free ports."""
    home = tmp_path_factory.mktemp("ui-home")
    spec = home / f"{STUDY}.toml"
    spec.write_text(SPEC)
    done = subprocess.run(
        [sys.executable, "-m", "sweeper", "launch", "--study", str(spec), "--workers", "2", "--format", "json"],
        env=_env(home),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    port, dashboard_port = _free_port(), _free_port()
    stderr = open(home / "ui.stderr", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sweeper",
            "ui",
            "--study",
            STUDY,
            "--port",
            str(port),
            "--dashboard-port",
            str(dashboard_port),
        ],
        env=_env(home),
        cwd=home,
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

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + READY_TIMEOUT
    while len(urls) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if len(urls) < 2:
        proc.kill()
        pytest.fail(
            f"`sweeper ui` printed {urls} (exit {proc.poll()}); stderr:\n" + (home / "ui.stderr").read_text()[-3000:]
        )
    info = {
        "home": home,
        "proc": proc,
        "mlflow": urls["MLflow UI"],
        "dashboard": urls["optuna-dashboard"],
        "ports": (port, dashboard_port),
        "children": _descendants(proc.pid),
    }
    yield info
    if proc.poll() is None:  # a test failed before the stop test: clean up what this module started
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    for pid in info["children"]:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    stderr.close()


@pytest.fixture(scope="module")
def browser(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def _runs(home: Path) -> tuple[str, dict[str, str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name(STUDY).experiment_id
    runs = client.search_runs([experiment_id], "tags.`sweeper.role` = 'cell'")
    return experiment_id, {r.info.run_name: r.info.run_id for r in runs}


def _close_assistant(page) -> None:
    """MLflow 3's assistant panel takes a third of the page; close it when it is there."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def _keep(path: Path, name: str) -> None:
    if os.environ.get("SWEEPER_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMAGES / name)


def test_urls_point_at_the_study(ui):
    experiment_id, _ = _runs(ui["home"])
    port, dashboard_port = ui["ports"]
    assert ui["mlflow"].startswith(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}")
    assert ui["dashboard"].startswith(f"http://127.0.0.1:{dashboard_port}/dashboard/studies/")


def test_experiment_page_shows_one_run_per_cell(ui, page, tmp_path):
    page.goto(ui["mlflow"])
    page.get_by_text("matching runs").first.wait_for()
    _close_assistant(page)
    # The cells are nested under the study's parent run: expand it.
    page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()
    for cell in CELLS:
        page.get_by_text(cell, exact=True).first.wait_for()
    assert page.get_by_text(f"{len(CELLS) + 1} matching runs").count() == 1  # the parent + one run per cell

    # Show the numbers the seed's table compares, instead of dataset/source/models.
    page.get_by_test_id("column-selection-dropdown").first.click()
    for name in ["Dataset", "Source", "Models", "top1_error", "top5_error", "num_params", "macs", "train_seconds"]:
        node = page.locator(f'[class*="tree-treenode"]:has(span[title="{name}"])').first
        node.scroll_into_view_if_needed()
        node.locator('[class*="tree-checkbox"]').first.click()
    page.keyboard.press("Escape")
    page.get_by_role("columnheader", name="top1_error").first.wait_for()
    time.sleep(0.5)  # let the grid settle before the picture
    shot = tmp_path / "mlflow-experiment.png"
    page.screenshot(path=shot, clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": 470})
    assert shot.stat().st_size > 10_000
    _keep(shot, "mlflow-experiment.png")


def test_compare_two_runs(ui, page, tmp_path):
    experiment_id, runs = _runs(ui["home"])
    assert sorted(runs) == sorted(CELLS)
    ids = [runs[cell] for cell in reversed(CELLS)]  # short3, then short4
    base = ui["mlflow"].split("#")[0]
    page.goto(
        f"{base}#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([experiment_id])}"
        "&workflowType=machine_learning"
    )
    page.get_by_text("Comparing 2 Runs").first.wait_for()
    for text in ["top1_error", "num_params", *CELLS]:
        page.get_by_text(text, exact=True).first.wait_for()
    # Tables first: collapse the plots, close the assistant, keep only what differs.
    page.get_by_text("Visualizations", exact=True).first.click()
    _close_assistant(page)
    page.get_by_role("switch").nth(0).click()  # parameters: show diff only (variant)
    page.get_by_role("switch").nth(1).click()  # metrics: show diff only
    page.get_by_text("top1_error", exact=True).first.wait_for()
    assert page.get_by_text("num_params", exact=True).count() >= 1
    time.sleep(0.5)
    bottom = page.get_by_text("Artifacts", exact=True).first.bounding_box()
    shot = tmp_path / "mlflow-compare.png"
    page.screenshot(
        path=shot,
        clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": min(VIEWPORT["height"], bottom["y"] - 10)},
    )
    assert shot.stat().st_size > 10_000
    _keep(shot, "mlflow-compare.png")


def test_dashboard_shows_the_study_and_its_trials(ui, page, tmp_path):
    page.goto(ui["dashboard"])
    page.get_by_text(STUDY).first.wait_for()
    page.goto(ui["dashboard"].rstrip("/") + "/trials")
    page.get_by_text(f"{len(CELLS)} Trials").first.wait_for()
    for number in range(len(CELLS)):
        page.get_by_text(f"Trial {number}", exact=True).first.wait_for()
    page.get_by_text("Complete").first.wait_for()
    page.screenshot(path=tmp_path / "optuna-dashboard.png")


def test_stopping_leaves_no_process_behind(ui):
    proc, children = ui["proc"], ui["children"]
    assert len(children) >= 2  # the MLflow server and optuna-dashboard (and their workers)
    assert all(_alive(pid) for pid in children)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    stopped_in = time.monotonic() - started
    left = {pid for pid in children if _alive(pid)}
    deadline = time.monotonic() + 5  # a grandchild's exit may still be in flight
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = {pid for pid in left if _alive(pid)}
    assert not left, f"still running after `sweeper ui` exited: {left}"
    for port in ui["ports"]:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
    assert stopped_in < 30
    assert "stopped" in (ui["home"] / "ui.stderr").read_text()


# --- no browser needed ------------------------------------------------------------------------


def test_a_taken_port_is_a_clear_error():
    from sweeper import ui as uis
    from sweeper.errors import SweeperError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SweeperError, match=f"port {port} on 127.0.0.1 is already in use.*--port N"):
            uis.check_port_free(port, "MLflow UI", "--port")


def test_a_server_that_dies_is_a_clear_error(tmp_path):
    from sweeper import ui as uis
    from sweeper.errors import SweeperError

    server = uis.Server(
        "MLflow UI",
        [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
        "http://127.0.0.1:9/",
        tmp_path / "server.log",
    )
    server.start()
    with pytest.raises(SweeperError, match=r"(?s)MLflow UI exited before it answered \(exit code 3\).*boom"):
        uis.wait_ready([server], timeout=30)
    uis.stop_all([server])


def test_printed_urls_carry_no_credentials():
    from sweeper.errors import strip_credentials

    assert strip_credentials("https://me:secret@mlflow.example:5000/") == "https://mlflow.example:5000/"
