"""Redraw the PNGs in docs/images/ from the quickstart study.

    python docs/images/refresh.py              # trains the quickstart in a temporary SWEEPER_HOME (minutes)
    python docs/images/refresh.py --home DIR   # reuses (or trains) the study in DIR

It runs `sweeper launch --study quickstart --workers 2`, copies the two plots of
`sweeper report --study quickstart --plots DIR`, then serves the study with
`sweeper ui --compare standard/digits/s1,short4/digits/s1` on free ports and takes the two MLflow
screenshots in headless Chromium of the pages its links open on, as they open (no click), with the
steps of tests/test_ui_browser.py (tests/browser_steps.py). Needs the test extras (playwright) and
/usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "docs" / "images"
sys.path.insert(0, str(ROOT / "tests"))

import browser_steps as steps  # noqa: E402

STUDY = "quickstart"
COMPARED = ["standard/digits/s1", "short4/digits/s1"]  # ~4x fewer parameters, about the same error
PLOTS = {"top1_vs_params.png": "report-top1-vs-params.png", "top1_per_epoch.png": "report-top1-per-epoch.png"}


def sweeper(home: Path, *args: str, capture: bool = False) -> str:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sweeper", *args],
        env=steps.sweeper_env(home),
        cwd=ROOT,  # ./experiments holds the quickstart spec in a checkout
        stdout=subprocess.PIPE if capture else None,
        text=True,
    )
    try:
        out, _ = proc.communicate()
    except BaseException:
        proc.terminate()  # `sweeper launch` then stops its workers (their own sessions) before it exits
        proc.wait()
        raise
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, ["sweeper", *args])
    return out


def screenshots(home: Path, rows: list[dict]) -> None:
    """The two links `sweeper ui --compare` prints, as they open: no click."""
    from playwright.sync_api import sync_playwright

    cells = [f"{r['variant']}/{r['dataset']}/s{r['seed']}" for r in rows]
    with open(home / "ui.stderr", "w") as stderr:
        proc, urls, _ = steps.start_ui(STUDY, home, ROOT, stderr, compare=",".join(COMPARED))
        children = steps.descendants(proc.pid)
        try:
            with sync_playwright() as p:
                browser = steps.launch_chromium(p)
                page = steps.new_page(browser)
                steps.open_ready(page, urls["MLflow UI"], cells)
                steps.shoot_runs_table(page, cells, IMAGES / "mlflow-experiment.png")
                steps.open_ready(page, urls["MLflow compare"], COMPARED)
                steps.shoot_runs_table(page, COMPARED, IMAGES / "mlflow-compare.png")
                browser.close()
        finally:
            steps.stop_ui(proc, children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="SWEEPER_HOME to train in or reuse (default: a temporary one)")
    args = parser.parse_args()
    temporary = None if args.home else tempfile.TemporaryDirectory(prefix="sweeper-images-")
    home = (args.home or Path(temporary.name)).resolve()
    try:
        sweeper(home, "launch", "--study", STUDY, "--workers", "2")
        sweeper(home, "report", "--study", STUDY, "--plots", str(home / "plots"))
        for name, image in PLOTS.items():
            shutil.copyfile(home / "plots" / name, IMAGES / image)
        rows = json.loads(sweeper(home, "report", "--study", STUDY, "--format", "json", capture=True))
        above = [f"{r['variant']} {r['top1_error']}" for r in rows if r["top1_error"] is None or r["top1_error"] > 0.10]
        screenshots(home, rows)
    finally:
        if temporary:
            temporary.cleanup()
    print(f"wrote {', '.join([*PLOTS.values(), 'mlflow-experiment.png', 'mlflow-compare.png'])} in {IMAGES}")
    if above:
        sys.exit(f"warning: top-1 error above 0.10, not the converged quickstart: {', '.join(above)}")


if __name__ == "__main__":
    main()
