#!/usr/bin/env python
"""Training throughput: the seed post's input pipeline and precision vs sweeper's fit(), side by side.

    python benchmarks/train_throughput.py [--variant standard] [--batch-size 64] [--steps N] [--json]

(a) seed: what the seed post's script does per step (benchmarks/seed_loop.py, shared with
    gpu_check.py) -- the same GoogLeNet in fp32 NCHW, per-image PIL transforms through a
    DataLoader with the seed's ``num_workers=2``, Adadelta lr 1.0, cross-entropy.
(b) sweeper: ``sweeper.train.fit()`` with precision ``auto`` (bf16 autocast + channels_last where
    bf16 is fast: CUDA, CPUs with AMX/AVX512-BF16), whole-split uint8 tensors and batched flips.

Both train on the same number of CIFAR-shaped synthetic images (batch size x (warm-up + steps))
at the same batch size; the first ``--warmup`` steps of each are not timed. Each measurement runs
in its own subprocess, so peak memory (ru_maxrss on the CPU, torch.cuda.max_memory_allocated on a
GPU) is its own. With ``--compile``, fit(..., compile=True) is measured as a third row.

Besides images per second (wall clock), each row has images per CPU-second: the CPU time of the
process over the timed steps, the seed's DataLoader workers included. On a machine shared with
other jobs the wall clock swings with their load; CPU time much less. ``--threads N`` sets
OMP_NUM_THREADS for both. The seed's ``num_workers=2`` is kept even on a 2-core machine, where
the workers compete with the training threads (their PIL work is small next to a training step).
Results are recorded in docs/BENCHMARKS.md ("Training throughput (engine)").

``--precision-table [--datasets digits,synthetic] [--variants ...]``: for each variant and
dataset shape (digits 1x8x8; synthetic is CIFAR's 3x32x32), the warm images/s of every precision
and layout mode sweeper.precision can pick (the fastest of ``--steps`` steps after the first),
the cold cost of the first step of each (each row runs in a fresh process), and the mode
``precision="auto"`` chose with its own short probe, as a share of the fastest mode's rate.

``--matmul-share [--variants ...] [--steps N] [--warmup N]``: fit()'s FLOP rate as a share of the
machine's own: for each variant on CIFAR's 32x32 at batch 64 and on 8x8 digits at batch 32, in a
fresh process, the rate of 2048x2048 matmuls right before and after (fp32, or bf16 where the CPU
computes it natively), and fit()'s timed steps in between at 6 x forward MACs per training image
(forward, and a backward twice its cost). The share is fit's rate over the mean of the two.

Imports neither optuna nor mlflow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from seed_loop import cpu_seconds, measure_seed  # benchmarks/seed_loop.py: the baseline, shared

KINDS = ("seed", "sweeper", "sweeper-compile")


# --------------------------------------------------------------------------- measurements (subprocess)


def _images(n: int):
    from sweeper.data import synthetic

    return synthetic.load(num_train=n, num_test=64)


def _peak_memory(device) -> dict:
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def measure_sweeper(variant: str, batch_size: int, steps: int, warmup: int, compile: bool) -> dict:
    import torch

    from sweeper import precision
    from sweeper.models import build_model
    from sweeper.train import Recipe, fit, resolve_device

    device = resolve_device("auto")
    n = batch_size * (warmup + steps)
    splits = _images(n)
    torch.manual_seed(1)
    model = build_model(variant, splits.num_classes)
    marks: dict[int, tuple[float, float]] = {}

    def on_step(step: int, total: int) -> None:
        if step in (warmup, warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks[step] = time.perf_counter(), cpu_seconds()

    recipe = Recipe(epochs=1, batch_size=batch_size, eval_batch_size=64)
    # The mode a real trial of this shape trains in: this run is too short to pay for auto's probe
    # (sweeper.precision.PAYBACK), a trial of the seed's recipe is not. Probed first, untimed, into
    # a fresh cache, which fit() then reads, as a worker does on a machine that has seen the shape.
    os.environ["SWEEPER_CACHE_DIR"] = tempfile.mkdtemp(prefix="sweeper-throughput-")
    precision.choose(build_model(variant, splits.num_classes), splits.info.shape, batch_size, device)
    result = fit(model, splits, recipe, device=str(device), precision="auto", compile=compile, on_step=on_step)
    seconds = marks[warmup + steps][0] - marks[warmup][0]
    cpu = marks[warmup + steps][1] - marks[warmup][1]
    return {
        "images_per_s": steps * batch_size / seconds,
        "timed_seconds": seconds,
        "cpu_seconds": cpu,
        "images_per_cpu_s": steps * batch_size / cpu,
        "device": result.device,
        "precision": result.precision,
        "memory_format": "channels_last" if result.channels_last else "NCHW",
        "compile": compile,
        "loss": result.final.train_loss,
        **_peak_memory(device),
    }


# --------------------------------------------------------------------------- driver


def measure_modes(variant: str, dataset: str, batch_size: int, steps: int) -> dict:
    """One row of the precision table, in a fresh process: cold first step and warm rate per mode."""
    import functools

    import torch

    from sweeper import precision
    from sweeper.data import DATASETS
    from sweeper.models import build_model

    info = DATASETS[dataset]
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(1)
    model = build_model(variant, info.num_classes, info.shape[0])
    x = torch.randn(batch_size, *info.shape, device=device)
    y = torch.randint(info.num_classes, (batch_size,), device=device)
    adadelta = functools.partial(torch.optim.Adadelta, lr=1.0)
    modes = {}
    for mode in precision.candidates(device):
        net = build_model(variant, info.num_classes, info.shape[0])
        stepper = precision.Stepper(net, x, y, device, mode, adadelta)
        times = [stepper.step() for _ in range(1 + steps)]  # the first one cold
        warm = min(times[1:])
        modes[mode.label] = {"cold_first_step_s": times[0], "warm_step_s": warm, "images_per_s": batch_size / warm}
    # What auto picks with its own short probe (a fresh cache: it measures), in a new process state.
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        auto = precision.choose(model, info.shape, batch_size, device, cache=Path(cache) / "c.json")
        probe_s = time.perf_counter() - started
    best = max(modes.values(), key=lambda m: m["images_per_s"])["images_per_s"]
    return {
        "variant": variant,
        "dataset": dataset,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "modes": modes,
        "auto": auto.label,
        "auto_vs_fastest": modes[auto.label]["images_per_s"] / best,
        "rule": precision.rule(device).label,
        "rule_vs_fastest": modes[precision.rule(device).label]["images_per_s"] / best,
        "auto_probe_s": probe_s,
        "load_average": os.getloadavg(),
    }


SHARE_SHAPES = (("synthetic", 64), ("digits", 32))  # CIFAR's 32x32 at the seed's batch; 8x8 digits at 32


def matmul_rate(device, dtype, n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of an n x n matmul (2 n^3 per product), the best of ``repeats`` after a warm-up."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = 0.0
    for i in range(repeats + 1):
        started = time.perf_counter()
        (a @ b).sum().item()
        if i:
            best = max(best, 2 * n**3 / (time.perf_counter() - started))
    return best


def measure_share(variant: str, dataset: str, batch_size: int, steps: int, warmup: int, prec: str = "auto") -> dict:
    """One row of the share table, in a fresh process: matmul rate, fit's timed steps, matmul rate.
    ``prec`` is fit's precision; its matmul reference is bf16 where fit trains in bf16, else fp32.
    ``prec="fp32-only"``: auto as on a CPU without fast bf16 (the rule's fp32 channels_last), on this one."""
    import torch

    from sweeper import precision
    from sweeper.contract import count_macs
    from sweeper.data import load
    from sweeper.models import VARIANTS, build_model
    from sweeper.train import Recipe, fit, resolve_device

    device = resolve_device("auto")
    if prec == "fp32-only":  # what a CPU without fast bf16 trains in (sweeper.precision.rule)
        prec = "fp32"
    n = batch_size * (warmup + steps)
    splits = _images(n) if dataset == "synthetic" else load(dataset).limit(n, 64)
    macs = count_macs(VARIANTS[variant], splits.info.shape, splits.num_classes)
    torch.manual_seed(1)
    model = build_model(variant, splits.num_classes, splits.in_channels)
    marks: dict[int, float] = {}

    def on_step(step: int, total: int) -> None:
        if step in (warmup, warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks[step] = time.perf_counter()

    # A run this short trains in the rule's mode (too short to pay for a probe): bf16 where native.
    trains_in = precision.rule(device).precision if prec == "auto" else prec
    dtype = torch.bfloat16 if trains_in == "bf16" else torch.float32
    before = matmul_rate(device, dtype)
    recipe = Recipe(epochs=1, batch_size=batch_size, eval_batch_size=64)
    result = fit(model, splits, recipe, device=str(device), precision=prec, on_step=on_step)  # warm-up untimed
    seconds = marks[warmup + steps] - marks[warmup]
    after = matmul_rate(device, dtype)
    fit_rate = 6 * macs * steps * batch_size / seconds
    return {
        "variant": variant,
        "dataset": dataset,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "mode": f"{result.precision}/{'channels_last' if result.channels_last else 'contiguous'}",
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "macs_per_image": macs,
        "images_per_s": steps * batch_size / seconds,
        "fit_gflops": fit_rate / 1e9,
        "matmul_gflops_before": before / 1e9,
        "matmul_gflops_after": after / 1e9,
        "share": fit_rate / ((before + after) / 2),
        "load_average": os.getloadavg(),
    }


def share_table(args: argparse.Namespace) -> None:
    from sweeper.models import VARIANTS

    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    rows = []
    for dataset, batch_size in SHARE_SHAPES:
        if dataset not in args.datasets.split(","):
            continue
        for variant in variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--_share", variant, dataset, str(batch_size)]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision]
            print(f"measuring {variant} on {dataset}, batch {batch_size} ...", file=sys.stderr, flush=True)
            rows.append(_measure_row(cmd, variant, dataset, threads=args.threads))
            r = rows[-1]
            print(
                f"  share of the matmul rate: {r['share']:.2f} ({r['mode']}, fit {r['fit_gflops']:.1f} GFLOP/s, "
                f"{r['matmul_dtype']} matmul {r['matmul_gflops_before']:.0f} -> {r['matmul_gflops_after']:.0f}, "
                f"{r['threads']} threads, load {r['load_average'][0]:.1f})",
                file=sys.stderr,
                flush=True,
            )
    if args.json:
        print(json.dumps({"machine": _cpu_name(), "cpus": os.cpu_count(), "rows": rows}, indent=2))
        return
    print(f"{_cpu_name()} ({os.cpu_count()} CPUs, {rows[0]['threads']} threads)")
    print("| variant | shape, batch | mode | img/s | fit GFLOP/s | matmul GFLOP/s before, after | share | load |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['dataset']}, {r['batch_size']} | {r['mode']} | {r['images_per_s']:.1f} | "
            f"{r['fit_gflops']:.1f} | {r['matmul_gflops_before']:.0f}, {r['matmul_gflops_after']:.0f} | "
            f"{r['share']:.2f} | {r['load_average'][0]:.1f} |"
        )


def _measure_row(cmd: list[str], variant: str, dataset: str, threads: int | None = None) -> dict:
    """One table row, measured in a fresh process (``cmd``, on ``threads`` torch threads if given):
    the JSON of its last line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"the {variant}/{dataset} row failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def precision_table(args: argparse.Namespace) -> None:
    from sweeper.models import VARIANTS

    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    rows = []
    for dataset in args.datasets.split(","):
        for variant in variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--_row", variant, dataset]
            cmd += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
            print(f"measuring {variant} on {dataset} ...", file=sys.stderr, flush=True)
            rows.append(_measure_row(cmd, variant, dataset))
            r = rows[-1]
            print(f"  auto {r['auto']}: {r['auto_vs_fastest']:.2f} of the fastest", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"machine": _cpu_name(), "cpus": os.cpu_count(), "rows": rows}, indent=2))
        return
    labels = list(rows[0]["modes"])
    print(f"batch {args.batch_size}, {_cpu_name()} ({os.cpu_count()} CPUs, {rows[0]['threads']} threads)")
    print(
        "| variant | dataset | "
        + " | ".join(f"{m} img/s (cold s)" for m in labels)
        + " | auto | auto/fastest | rule/fastest | probe s | load |"
    )
    print("|---|---|" + "---|" * len(labels) + "---|---|---|---|---|")
    for r in rows:
        cells = [f"{r['modes'][m]['images_per_s']:.0f} ({r['modes'][m]['cold_first_step_s']:.1f})" for m in labels]
        print(
            f"| {r['variant']} | {r['dataset']} | "
            + " | ".join(cells)
            + f" | {r['auto']} | {r['auto_vs_fastest']:.2f} | {r['rule_vs_fastest']:.2f} | {r['auto_probe_s']:.1f}"
            + f" | {r['load_average'][0]:.1f} |"
        )


def run_one(kind: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_measure",
        kind,
        "--variant",
        args.variant,
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--num-workers",
        str(args.num_workers),
    ]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"measuring {kind} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"the {kind} measurement failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {kind}: {result['images_per_s']:.1f} images/s", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="standard")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--num-workers", type=int, default=2, help="the seed's DataLoader workers")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure each this many times, alternating; the headline ratio is the worst repeat's",
    )
    parser.add_argument("--compile", action="store_true", help="also measure fit(..., compile=True)")
    parser.add_argument(
        "--threads", type=int, help="torch threads (OMP_NUM_THREADS) of each measurement; default: torch's"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--precision-table", action="store_true", help="every precision/layout mode, per variant")
    parser.add_argument(
        "--datasets", default="digits,synthetic", help="--precision-table, --matmul-share: these shapes"
    )
    parser.add_argument("--variants", help="--precision-table, --matmul-share: comma-separated (default: all seven)")
    parser.add_argument("--matmul-share", action="store_true", help="fit's FLOP rate as a share of the matmul rate")
    parser.add_argument(
        "--precision",
        default="auto",
        help="--matmul-share: fit's precision (auto: the rule's mode; fp32-only: auto as on a CPU without fast bf16)",
    )
    parser.add_argument("--_measure", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--_share", nargs=3, metavar=("VARIANT", "DATASET", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--_row", nargs=2, metavar=("VARIANT", "DATASET"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._row:
        print(json.dumps(measure_modes(*args._row, args.batch_size, args.steps)))
        return
    if args._share:
        variant, dataset, batch_size = args._share
        print(json.dumps(measure_share(variant, dataset, int(batch_size), args.steps, args.warmup, args.precision)))
        return
    if args.matmul_share:
        share_table(args)
        return
    if args.precision_table:
        precision_table(args)
        return
    if args._measure:
        if args._measure == "seed":
            out = measure_seed(args.variant, args.batch_size, args.steps, args.warmup, args.num_workers)
        else:
            out = measure_sweeper(
                args.variant, args.batch_size, args.steps, args.warmup, args._measure == "sweeper-compile"
            )
        print(json.dumps(out))
        return

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported: the report's torch_threads
    import torch

    kinds = ["seed", "sweeper"] + (["sweeper-compile"] if args.compile else [])
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            runs[kind].append(run_one(kind, args))
    best = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in runs.items()}
    seed, ours = best["seed"], best["sweeper"]
    # Each repeat's ratio compares neighbours in time (the same load); the margin is the smallest.
    ratios = [o["images_per_s"] / s["images_per_s"] for s, o in zip(runs["seed"], runs["sweeper"])]
    cpu_ratios = [o["images_per_cpu_s"] / s["images_per_cpu_s"] for s, o in zip(runs["seed"], runs["sweeper"])]
    report = {
        "variant": args.variant,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads or torch.get_num_threads(),
        "images_per_run": args.batch_size * (args.steps + args.warmup),
        "seed_images_per_s": seed["images_per_s"],
        "sweeper_images_per_s": ours["images_per_s"],
        "ratio": min(ratios),  # the worst repeat, not the best
        "ratios": ratios,
        "best_ratio": ours["images_per_s"] / seed["images_per_s"],
        # CPU time instead of wall time: what the same work costs when the machine is shared.
        "cpu_ratio": min(cpu_ratios),
        "cpu_ratios": cpu_ratios,
        "seed": seed,
        "sweeper": ours,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_name(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "all_runs": {k: [r["images_per_s"] for r in v] for k, v in runs.items()},
    }
    if args.compile:
        report["sweeper_compile_images_per_s"] = best["sweeper-compile"]["images_per_s"]
        report["compile_speedup"] = best["sweeper-compile"]["images_per_s"] / ours["images_per_s"]
        report["sweeper-compile"] = best["sweeper-compile"]
    if args.json:
        print(json.dumps(report, indent=2))
        return
    mem = "peak_gpu_mb" if seed.get("peak_gpu_mb") is not None else "peak_rss_mb"
    print(
        f"{args.variant}, batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, "
        f"{report['machine']['cpu']} ({report['machine']['cpus']} CPUs, torch {torch.__version__})"
    )
    rows = [
        ("seed (fp32 NCHW, PIL + DataLoader)", seed),
        (f"sweeper fit ({ours['precision']}, {ours['memory_format']})", ours),
    ]
    if args.compile:
        rows.append(("sweeper fit, compile=True", best["sweeper-compile"]))
    for label, r in rows:
        print(
            f"  {label:<40} {r['images_per_s']:9.1f} images/s  {r['images_per_cpu_s']:9.1f} images/CPU-s"
            f"   {mem} {r[mem]:8.0f} MB"
        )
    print(
        f"  ratio sweeper / seed, worst of {args.repeats} repeat(s): {report['ratio']:.2f}x (wall), "
        f"{report['cpu_ratio']:.2f}x (CPU time); each: {', '.join(f'{r:.2f}' for r in ratios)}"
    )
    if args.compile:
        print(f"  compile=True vs eager: {report['compile_speedup']:.2f}x")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor()
            )
    except OSError:
        return platform.processor()


if __name__ == "__main__":
    main()
