"""Wall time of whole `sweeper` commands: refusing a bad spec, launching a 1,008-cell grid, re-launching it.

Each measurement is one fresh process (interpreter start, imports, work), as a user types it,
with embedded stores (Optuna and MLflow on SQLite) in a fresh temporary $SWEEPER_HOME. The grid
is 7 variants x 4 datasets x 36 seeds = 1,008 cells. With ``--against DIR`` the same commands
run, interleaved, with the ``sweeper`` package of another checkout (e.g. a ``git worktree`` of
an older commit), so both are measured under the same load.

    python benchmarks/cli_latency.py                          # this tree, best of 3
    python benchmarks/cli_latency.py --against /tmp/old --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
GRID = """description = "1,008 cells"
[grid]
variant = ["naive", "standard", "long", "short", "short2", "short3", "short4"]
dataset = ["cifar10", "cifar100", "digits", "synthetic"]
seed = [{seeds}]
[train]
epochs = 1
"""
BAD = '[grid]\nvariant = ["shot4"]\ndataset = ["digits"]\n'


def timed(tree: Path, home: Path, *args: str, expect: int = 0) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "SWEEPER_HOME": str(home)}
    env.pop("SWEEPER_STORAGE", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sweeper", *args], env=env, cwd=home, capture_output=True, text=True, timeout=600
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != expect:
        sys.exit(f"{tree}: sweeper {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return elapsed


def measure(tree: Path, work: Path, round_: int) -> dict[str, float]:
    home = work / f"{tree.name}-{round_}"
    home.mkdir()
    grid, bad = home / "grid1008.toml", home / "bad.toml"
    grid.write_text(GRID.format(seeds=", ".join(map(str, range(1, 37)))))
    bad.write_text(BAD)
    return {
        "bad_spec_s": timed(tree, home, "launch", "--study", str(bad), expect=2),
        "launch_s": timed(tree, home, "launch", "--study", str(grid)),
        "relaunch_s": timed(tree, home, "launch", "--study", str(grid)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, help="another checkout to measure side by side")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()
    trees = {"this": HERE} | ({"against": args.against.resolve()} if args.against else {})
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="sweeper-cli-latency-") as tmp:
        for i in range(args.repeat):
            for name, tree in trees.items():
                runs[name].append(measure(tree, Path(tmp), i))
                print(f"{name} round {i + 1}: {runs[name][-1]}", file=sys.stderr)
    result = {
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "trees": {name: str(tree) for name, tree in trees.items()},
        "median": {
            name: {key: round(statistics.median(r[key] for r in rs), 2) for key in rs[0]} for name, rs in runs.items()
        },
        "min": {name: {key: round(min(r[key] for r in rs), 2) for key in rs[0]} for name, rs in runs.items()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in trees:
            print(f"{name}: median {result['median'][name]}  best {result['min'][name]}")
        print(f"load average {result['load_average'][0]} -> {result['load_average'][1]}")


if __name__ == "__main__":
    main()
