#!/usr/bin/env python
"""Where fit()'s training step spends its time, per operator (torch.profiler).

    python benchmarks/fit_profile.py [--variant standard] [--dataset digits] [--batch-size 32]
        [--steps 10] [--warmup 3] [--precision auto] [--threads N] [--top 15] [--json]

Runs ``sweeper.train.fit`` for one epoch of ``warmup + steps`` batches and profiles the timed
steps (the warm-up steps build the kernels and are left out), then prints the step's wall time
and its CPU time by group of operators (self time: convolutions forward and backward, BatchNorm,
pooling, ReLU, the linear layer, concatenation, dtype casts, the optimizer's step, the rest) and
the top operators by self time ("python between ops": the step's own time outside every
operator). Evaluation after the epoch is outside the profiled steps.
``--precision`` is fit's (auto: the rule's mode, this run being too short to pay for a probe).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

GROUPS = (  # (group, substrings of the aten op names in it); the first match wins
    ("conv backward", ("convolution_backward",)),
    ("conv forward", ("convolution", "mkldnn_conv")),
    ("batchnorm", ("batch_norm",)),
    ("pooling", ("pool",)),
    ("relu", ("relu", "threshold_backward")),
    ("linear", ("addmm", "aten::mm", "linear")),
    ("cat", ("aten::cat",)),
    ("casts and copies", ("_to_copy", "copy_", "aten::to", "clone", "contiguous")),
)


def group_of(name: str) -> str:
    for group, needles in GROUPS:
        if any(n in name for n in needles):
            return group
    return "other"


def profile(args: argparse.Namespace) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from sweeper.data import load, synthetic
    from sweeper.models import build_model
    from sweeper.train import Recipe, fit

    n = args.batch_size * (args.warmup + args.steps)
    splits = synthetic.load(num_train=n, num_test=64) if args.dataset == "synthetic" else load(args.dataset)
    splits = splits.limit(n, 64)
    torch.manual_seed(1)
    model = build_model(args.variant, splits.num_classes, splits.in_channels)
    marks: dict[int, float] = {}
    traces = []  # the key averages of the one profiled cycle (the timed steps)
    prof = profile(
        activities=[ProfilerActivity.CPU],
        schedule=schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1),
        on_trace_ready=lambda p: traces.append(p.key_averages()),
    )

    def on_step(step: int, total: int) -> None:
        if step in (args.warmup, args.warmup + args.steps):
            marks[step] = time.perf_counter()
        prof.step()

    recipe = Recipe(epochs=1, batch_size=args.batch_size, eval_batch_size=64, optimizer=args.optimizer, lr=args.lr)
    with prof:
        result = fit(model, splits, recipe, device="cpu", precision=args.precision, on_step=on_step)
    step_s = (marks[args.warmup + args.steps] - marks[args.warmup]) / args.steps
    (events,) = traces
    # Self times: each microsecond counted once. The optimizer's step is its inclusive time (its
    # elementwise ops would otherwise land in "other").
    optimizer_us = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer."))
    optimizer_ops = {e.key for e in events if e.key.startswith("Optimizer.")}
    groups: dict[str, float] = {}
    for e in events:
        if e.key in optimizer_ops:
            continue
        if e.key.startswith("ProfilerStep"):  # outside every operator: Python, the loader, autocast
            groups["python between ops"] = groups.get("python between ops", 0.0) + e.self_cpu_time_total
            continue
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total
    groups["other"] = max(0.0, groups.get("other", 0.0) - optimizer_us)  # the optimizer's ops, counted apart
    groups["optimizer step"] = optimizer_us
    total = sum(groups.values())
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
    return {
        "variant": args.variant,
        "dataset": args.dataset,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "optimizer": args.optimizer,
        "mode": f"{result.precision}/{'channels_last' if result.channels_last else 'contiguous'}",
        "step_s": step_s,
        "images_per_s": args.batch_size / step_s,
        "groups_share": {g: us / total for g, us in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_ops": [
            {"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / args.steps, "calls": e.count // args.steps}
            for e in top
        ],
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="standard")
    parser.add_argument("--dataset", default="digits", choices=("digits", "synthetic"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument(
        "--optimizer", default="adadelta", help="the recipe's (adadelta: the seed's; adamw: the quickstart's)"
    )
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    r = profile(args)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(
        f"{r['variant']} on {r['dataset']}, batch {r['batch_size']}, {r['mode']}, {r['optimizer']}, {r['threads']} threads: "
        f"{r['step_s'] * 1e3:.1f} ms a step ({r['images_per_s']:.0f} img/s), load {r['load_average'][0]:.1f}"
    )
    for group, share in r["groups_share"].items():
        print(f"  {group:<18} {share:6.1%}")
    print("  top operators, self ms per step (calls per step):")
    for op in r["top_ops"]:
        print(f"    {op['op']:<48} {op['self_ms_per_step']:8.2f} ({op['calls']})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
