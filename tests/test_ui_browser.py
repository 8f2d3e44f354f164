"""`sweeper ui` in a real browser: the MLflow UI lists and compares a study's cells, optuna-dashboard
shows its trials, and stopping the command leaves no process behind.

Needs Chromium at /usr/bin/chromium (Debian's `chromium` package) and the playwright Python
package; without them the module is skipped with the reason, unless SWEEPER_REQUIRE_BROWSER=1
(CI), where it fails instead. The browser steps live in tests/browser_steps.py, which
docs/images/refresh.py uses too for the screenshots in docs/images/.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from browser_steps import (
    CHROMIUM,
    alive,
    descendants,
    launch_chromium,
    new_page,
    open_compare,
    open_runs_table,
    shoot_compare,
    shoot_runs_table,
    show_seed_columns,
    start_ui,
    stop_ui,
    sweeper_env,
)

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

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]


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


@pytest.fixture(scope="module")
def ui(require_browser, tmp_path_factory):
    """A trained tiny study served by `sweeper ui` on free ports."""
    home = tmp_path_factory.mktemp("ui-home")
    spec = home / f"{STUDY}.toml"
    spec.write_text(SPEC)
    done = subprocess.run(
        [sys.executable, "-m", "sweeper", "launch", "--study", str(spec), "--workers", "2", "--format", "json"],
        env=sweeper_env(home),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    stderr = open(home / "ui.stderr", "w")
    try:
        proc, urls, ports = start_ui(STUDY, home, home, stderr)
    except RuntimeError as e:
        pytest.fail(f"{e}; stderr:\n" + (home / "ui.stderr").read_text()[-3000:])
    info = {
        "home": home,
        "proc": proc,
        "mlflow": urls["MLflow UI"],
        "dashboard": urls["optuna-dashboard"],
        "ports": ports,
        "children": descendants(proc.pid),
    }
    yield info
    stop_ui(proc, info["children"])  # a no-op after the stop test, unless a test failed before it
    stderr.close()


@pytest.fixture(scope="module")
def browser(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = launch_chromium(p)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    page = new_page(browser)
    yield page
    page.context.close()


def _runs(home: Path) -> tuple[str, dict[str, str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name(STUDY).experiment_id
    runs = client.search_runs([experiment_id], "tags.`sweeper.role` = 'cell'")
    return experiment_id, {r.info.run_name: r.info.run_id for r in runs}


def test_urls_point_at_the_study(ui):
    experiment_id, _ = _runs(ui["home"])
    port, dashboard_port = ui["ports"]
    assert ui["mlflow"].startswith(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}")
    assert ui["dashboard"].startswith(f"http://127.0.0.1:{dashboard_port}/dashboard/studies/")


def test_experiment_page_shows_one_run_per_cell(ui, page, tmp_path):
    open_runs_table(page, ui["mlflow"], CELLS)
    assert page.get_by_text(f"{len(CELLS) + 1} matching runs").count() == 1  # the parent + one run per cell

    # Show the numbers the seed's table compares, instead of dataset/source/models.
    show_seed_columns(page)
    for column in ["top1_error", "top5_error", "num_params", "macs", "train_seconds"]:
        assert page.get_by_role("columnheader", name=column).count() >= 1
    assert page.get_by_role("columnheader", name="Source").count() == 0
    shot = tmp_path / "mlflow-experiment.png"
    shoot_runs_table(page, CELLS, shot)
    assert shot.stat().st_size > 10_000


def test_compare_two_runs(ui, page, tmp_path):
    experiment_id, runs = _runs(ui["home"])
    assert sorted(runs) == sorted(CELLS)
    names = list(reversed(CELLS))  # short3, then short4
    open_compare(page, ui["mlflow"], experiment_id, [runs[name] for name in names], names)
    # Show diff only keeps `variant` among the parameters and the numbers among the metrics.
    assert page.get_by_text("variant", exact=True).count() >= 1
    assert page.get_by_text("epochs", exact=True).count() == 0
    assert page.get_by_text("num_params", exact=True).count() >= 1
    shot = tmp_path / "mlflow-compare.png"
    shoot_compare(page, shot)
    assert shot.stat().st_size > 10_000


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
    assert all(alive(pid) for pid in children)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    stopped_in = time.monotonic() - started
    left = {pid for pid in children if alive(pid)}
    deadline = time.monotonic() + 5  # a grandchild's exit may still be in flight
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = {pid for pid in left if alive(pid)}
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
