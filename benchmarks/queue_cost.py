"""What a worker's claim and settle cost with a big grid waiting, side by side across checkouts.

    python benchmarks/queue_cost.py --checkout /path/to/baseline --checkout .
    python benchmarks/queue_cost.py --checkout . --waiting 1000 --rounds 20 --json

Each checkout runs in its own interpreter (its ``sweeper`` first on the path) against a fresh
PostgreSQL database: ``--waiting`` cells enqueued with ``storage.internals.enqueue_many``, then ``--rounds``
times what a worker does around one trial: ``claim`` (time), a suggested parameter and a
COMPLETE tell, and ``settle`` (time; told which cell completed where the checkout's ``settle``
takes it). Medians and maxima in milliseconds. The checkouts alternate round by round, so a
burst of load falls on both alike.

PostgreSQL: ``$SWEEPER_TEST_PG`` (default postgresql://postgres@127.0.0.1:5432/postgres) is used
to create and drop the throwaway databases.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import Databases

# One round in the checkout's interpreter: reads "round" lines on stdin, answers one JSON line each.
CHILD = r"""
import inspect, json, sys, time, warnings
warnings.simplefilter("ignore")
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
try:
    from sweeper.storage import connect, internals
    from sweeper.trials import claims, outcomes
except ImportError:  # a checkout from before sweeper.study was split into storage/ and trials/
    from sweeper import study as connect
    internals = claims = outcomes = connect

url, waiting = sys.argv[1], int(sys.argv[2])
owner = optuna.create_study(study_name="queue", storage=connect.open_storage(url))
internals.enqueue_many(owner, [{"sweeper.key": f"cell{i}"} for i in range(waiting)])
worker = optuna.load_study(study_name="queue", storage=connect.open_storage(url))
takes_completed = "completed" in inspect.signature(outcomes.settle).parameters
print(json.dumps({"ready": True, "settle_told_the_cell": takes_completed, "sweeper": connect.__file__, "trials": len(owner.get_trials(deepcopy=False))}), flush=True)
for line in sys.stdin:
    t0 = time.perf_counter()
    trial_id = claims.claim(worker)
    claim_s = time.perf_counter() - t0
    trial = optuna.Trial(worker, trial_id)
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    worker.tell(trial, 0.5)
    key = worker._storage.get_trial(trial_id).user_attrs["sweeper.key"]
    t0 = time.perf_counter()
    outcomes.settle(worker, completed=key) if takes_completed else outcomes.settle(worker)
    settle_s = time.perf_counter() - t0
    print(json.dumps({"claim_s": claim_s, "settle_s": settle_s}), flush=True)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", action="append", required=True, help="a sweeper checkout (repeat)")
    parser.add_argument("--waiting", type=int, default=1000, help="cells enqueued before the first claim")
    parser.add_argument("--rounds", type=int, default=20, help="claim + tell + settle rounds per checkout")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args(argv)

    children, databases = [], Databases(Path(tempfile.gettempdir()))
    try:
        for checkout in args.checkout:
            url = databases.new("postgresql", "queue")
            env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve())}
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, url, str(args.waiting)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                cwd=checkout,  # `python -c` puts the working directory first on the path
            )
            children.append((checkout, child, json.loads(child.stdout.readline())))
        samples: dict[str, list[dict]] = {checkout: [] for checkout, _, _ in children}
        for _ in range(args.rounds):
            for checkout, child, _ in children:
                child.stdin.write("round\n")
                child.stdin.flush()
                samples[checkout].append(json.loads(child.stdout.readline()))
    finally:
        for _, child, _ in children:
            child.stdin.close()
            child.wait(timeout=60)
        databases.close()

    result = {"waiting": args.waiting, "rounds": args.rounds, "load_average": os.getloadavg()[0], "checkouts": []}
    for checkout, _, ready in children:
        row = {"checkout": checkout, **{k: v for k, v in ready.items() if k != "ready"}}
        for what in ("claim_s", "settle_s"):
            values = [s[what] * 1000 for s in samples[checkout]]
            row[what.replace("_s", "_ms_median")] = round(statistics.median(values), 1)
            row[what.replace("_s", "_ms_max")] = round(max(values), 1)
        result["checkouts"].append(row)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{args.waiting} cells waiting, {args.rounds} rounds, load {result['load_average']:.1f}")
        for row in result["checkouts"]:
            print(
                f"  {row['checkout']:<30} claim {row['claim_ms_median']:7.1f} ms (max {row['claim_ms_max']:.1f})"
                f"   settle {row['settle_ms_median']:7.1f} ms (max {row['settle_ms_max']:.1f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
