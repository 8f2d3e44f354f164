"""`sweeper ui` in a real browser: the MLflow links it prints open, with no click, on the study's
cells best first with the seed's columns and on two cells side by side; optuna-dashboard shows the
trials with the metric named and the cells as params; stopping the command leaves no process behind.

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
    open_ready,
    runs_table,
    shoot_runs_table,
    start_ui,
    stop_ui,
    sweeper_env,
)

# The issue's `sweeper ui --study quickstart`, on a spec named quickstart with tiny settings.
STUDY = "quickstart"
CELLS = ["short4/digits/s1", "short3/digits/s1", "short2/digits/s1"]
COMPARED = CELLS[:2]
SPEC = textwrap.dedent("""\
    description = "sweeper ui browser test: 3 variants x digits, one short epoch"
    [grid]
    variant = ["short4", "short3", "short2"]
    dataset = ["digits"]
    seed = [1]
    [train]
    epochs = 1
    limit_train = 128
    limit_test = 64
    """)
COLUMNS = ["top1_error", "top5_error", "num_params", "macs", "train_seconds"]

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
    assert f"compare them in the MLflow UI: sweeper ui --study {STUDY}" in done.stderr  # launch's last word

    stderr = open(home / "ui.stderr", "w")
    try:
        proc, urls, ports = start_ui(STUDY, home, home, stderr, compare=",".join(COMPARED))
    except RuntimeError as e:
        pytest.fail(f"{e}; stderr:\n" + (home / "ui.stderr").read_text()[-3000:])
    info = {
        "home": home,
        "proc": proc,
        "mlflow": urls["MLflow UI"],
        "dashboard": urls["optuna-dashboard"],
        "compare": urls["MLflow compare"],
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


def _runs(home: Path) -> tuple[str, dict[str, object]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name(STUDY).experiment_id
    runs = client.search_runs([experiment_id], "tags.`sweeper.role` = 'cell'")
    return experiment_id, {r.info.run_name: r for r in runs}


def _shown(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {row["name"]: row for row in rows}


def test_urls_point_at_the_study(ui):
    experiment_id, _ = _runs(ui["home"])
    port, dashboard_port = ui["ports"]
    assert ui["mlflow"].startswith(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?")
    assert ui["dashboard"].startswith(f"http://127.0.0.1:{dashboard_port}/dashboard/studies/")


def test_printed_link_opens_on_every_cell_best_first(ui, page, tmp_path):
    """The exact URL `sweeper ui` printed, no click: one row per cell (the study's own run
    filtered out), the seed's columns in view, sorted by top1_error, lowest first."""
    _, runs = _runs(ui["home"])
    open_ready(page, ui["mlflow"], CELLS)
    for column in COLUMNS:
        assert page.get_by_role("columnheader", name=column).count() >= 1
        assert page.get_by_role("columnheader", name=column).first.is_visible()
    rows = runs_table(page)
    assert [row["name"] for row in rows] == sorted(CELLS, key=lambda c: runs[c].data.metrics["top1_error"])
    for name, row in _shown(rows).items():
        metrics = runs[name].data.metrics
        assert float(row["metrics.`top1_error`"]) == pytest.approx(metrics["top1_error"], abs=1e-4)
        assert int(row["metrics.`num_params`"]) == metrics["num_params"]
        assert row["params.`variant`"] == name.split("/")[0]
    cell = page.get_by_text(CELLS[0], exact=True).first
    assert cell.is_visible() and page.locator('[col-id="metrics.`top1_error`"]').last.is_visible()
    shot = tmp_path / "mlflow-experiment.png"
    shoot_runs_table(page, CELLS, shot)
    assert shot.stat().st_size > 10_000


def test_compare_link_shows_exactly_those_runs(ui, page, tmp_path):
    """`--compare A,B` (two cells): their runs and no other, both runs' numbers side by side."""
    _, runs = _runs(ui["home"])
    open_ready(page, ui["compare"], COMPARED)
    shown = _shown(runs_table(page))
    assert sorted(shown) == sorted(COMPARED)
    for name in COMPARED:
        for column in COLUMNS:
            assert float(shown[name][f"metrics.`{column}`"]) == pytest.approx(runs[name].data.metrics[column], rel=1e-4)
    shot = tmp_path / "mlflow-compare.png"
    shoot_runs_table(page, COMPARED, shot)
    assert shot.stat().st_size > 10_000


def test_dashboard_api_names_the_metric_and_each_trials_cell(ui):
    """optuna-dashboard's own API: the objective is top1_error, each trial has its cell's variant,
    dataset and seed as params and a link to its MLflow run."""
    import json
    import urllib.request

    study_id = ui["dashboard"].rstrip("/").rsplit("/", 1)[1]
    base = ui["dashboard"].split("/dashboard/")[0]
    with urllib.request.urlopen(f"{base}/api/studies/{study_id}", timeout=60) as response:
        study = json.load(response)
    assert study["objective_names"] == ["top1_error"]
    _, runs = _runs(ui["home"])
    seen = []
    for trial in study["trials"]:
        params = {p["name"]: p["param_external_value"] for p in trial["params"]}
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert params == {"variant": attrs["variant"], "dataset": "digits", "seed": "1"}
        run = runs[attrs["sweeper.key"]]
        assert attrs["mlflow_run_url"].endswith(f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")
        seen.append(params["variant"])
    assert sorted(seen) == sorted(c.split("/")[0] for c in CELLS)


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
    from sweeper.redact import strip_credentials

    assert strip_credentials("https://me:secret@mlflow.example:5000/") == "https://mlflow.example:5000/"
