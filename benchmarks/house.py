"""The house's measurable targets (issue #22) in one run: the shape checks of tests/test_house.py
(no import circle inside sweeper/, module/class/function sizes, click only in the CLI, errors.py on
the standard library) and the wall time of the fast tier (`python -m pytest -m "not slow"`, target
under 2 minutes), as pytest runs it by default (pyproject's addopts: two processes).

    python benchmarks/house.py          # a line per check
    python benchmarks/house.py --json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST_TIER_TARGET_S = 120.0


def run_pytest(*args: str) -> tuple[int, float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", *args], cwd=ROOT, capture_output=True, text=True)
    summary = next((line for line in reversed(done.stdout.splitlines()) if " in " in line), done.stdout[-200:])
    return done.returncode, time.perf_counter() - started, summary.strip("= ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()

    shape_code, _, shape_summary = run_pytest("-n", "0", "tests/test_house.py")
    fast_code, fast_seconds, fast_summary = run_pytest("-m", "not slow")
    result = {
        "shape_ok": shape_code == 0,
        "shape_summary": shape_summary,
        "fast_tier_ok": fast_code == 0,
        "fast_tier_seconds": round(fast_seconds, 1),
        "fast_tier_target_seconds": FAST_TIER_TARGET_S,
        "fast_tier_summary": fast_summary,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"shape checks: {'ok' if result['shape_ok'] else 'FAILED'} ({shape_summary})")
        print(f"fast tier: {fast_seconds:.0f} s (target < {FAST_TIER_TARGET_S:.0f} s): {fast_summary}")
    met = result["shape_ok"] and result["fast_tier_ok"] and fast_seconds < FAST_TIER_TARGET_S
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
