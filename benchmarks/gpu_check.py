"""GPU check: the seed's loop vs the path `sweeper worker` trains on, on one NVIDIA GPU, in 8 minutes.

    bash benchmarks/gpu_check.sh LOGDIR                  # the way to run it (PYTHONPATH, log, time limit)
    python benchmarks/gpu_check.py --logdir DIR          # the same, PYTHONPATH set by hand
    python benchmarks/gpu_check.py --dry-run-cpu         # every code path on the CPU, tiny sizes

Needs only Python with PyTorch and torchvision (no install, no network): the images are
sweeper's synthetic set, CIFAR-100-shaped; it imports sweeper.device, sweeper.train,
sweeper.models, sweeper.data and sweeper.checkpoint, none of which imports Optuna or MLflow.
Without a CUDA GPU it exits with status 2 (unless --dry-run-cpu).

"The worker's path" is what `sweeper worker` runs: ``sweeper.device.prepare()`` with the worker's
defaults (device, precision and compile ``auto``: on CUDA that is bf16, channels_last, the split
resident on the GPU and torch.compile with CUDA graphs) and ``fit(**engine.fit_options())``.
The other compile setting is measured beside it, so the default can be judged.

Phases, most important first, each with a time bound inside a 430 s budget; one that no longer
fits is skipped and says so. LOGDIR/gpu_check.json is rewritten after every phase.

 1. seed loop, `standard`, batch 64 (benchmarks/seed_loop.py)
 2. worker path, batch 64 -- the headline: images/s and the fraction of the chip's bf16 peak
 3. worker path, batch 64, the other compile setting
 4. a 14-epoch worker-path run of `standard` on 50,000 + 10,000 CIFAR-shaped images (wall
    seconds, compile included), with the worker's per-epoch checkpoint: the state copied off the
    GPU and written, each timed
 5. K = 2 and 4 packed trials: K processes on the GPU, each the worker path at batch 64
 6. seed loop and worker path (both compile settings) at batch 512
and from them the seed's 14-cell sweep, projected. The table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from seed_loop import measure_seed  # benchmarks/seed_loop.py: the baseline, shared

NO_GPU_EXIT = 2
MISSING_DEPS_EXIT = 3
SEED_CELLS = 14  # 7 variants x CIFAR-100/CIFAR-10
# Dense bf16 tensor-core peak, FLOP/s, by a word of the GPU's name; --peak-tflops for others.
# H200: the figure issue #14 sets (NVIDIA's datasheet gives 989 TFLOP/s dense for the SXM part).
PEAK_BF16 = {"H200": 790e12}
TARGET_PEAK_FRACTION = 0.25  # the worker path at batch 64
TARGET_FULL_RUN_S = 45.0
TARGET_SWEEP_MIN = 15.0


@dataclass
class Sizes:
    device: str = "cuda"
    variant: str = "standard"  # the seed post's GoogLeNet
    image: int = 32  # side of the images
    num_classes: int = 100
    batch: int = 64
    big_batch: int = 512
    seed_warmup: int = 10
    seed_steps: int = 200
    warmup: int = 30  # worker path: compilation and CUDA-graph capture happen in these
    steps: int = 400
    full_epochs: int = 14
    full_train: int = 50_000
    full_test: int = 10_000
    packed: tuple[int, ...] = (2, 4)
    packed_steps: int = 200
    total_budget: float = 430.0  # every phase together (gpu_check.sh stops the process at 475 s)
    budgets: dict[str, float] = field(
        default_factory=lambda: {
            "seed": 25,
            "worker": 100,  # a cold compile of `standard`, then 400 steps
            "worker_other": 25,
            "full": 95,
            "packed": 45,
            "seed_big": 20,
            "worker_big": 45,
            "worker_big_other": 20,
        }
    )

    @classmethod
    def dry_run_cpu(cls) -> Sizes:
        return cls(
            device="cpu",
            variant="short4",  # the smallest: the dry run checks code paths, not speed
            image=8,
            num_classes=10,
            batch=4,
            big_batch=8,
            seed_warmup=1,
            seed_steps=2,
            warmup=1,
            steps=2,
            full_epochs=2,
            full_train=10,  # 4 + 4 + a partial batch of 2
            full_test=8,
            packed=(2,),
            packed_steps=2,
            # generous: on a loaded machine a phase must not be cut (the test checks every one ran)
            total_budget=2000.0,
            budgets=dict.fromkeys(cls().budgets, 300.0),
        )


class PhaseTimeout(Exception):
    pass


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


@contextlib.contextmanager
def time_bound(seconds: float):
    """Raise PhaseTimeout in the main thread after ``seconds``: compilation or a stuck step cannot
    run the check past its budget."""

    def handler(signum, frame):
        raise PhaseTimeout(f"hard time bound of {seconds:.0f}s reached")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def splits(n_train: int, n_test: int, sz: Sizes):
    """sweeper's synthetic set, shrunk when the dry run asks for smaller images."""
    from dataclasses import replace

    import torch.nn.functional as F

    from sweeper.data import synthetic

    data = synthetic.load(n_train, n_test, num_classes=sz.num_classes)
    if sz.image == 32:
        return data

    def shrink(x):
        return F.interpolate(x.float(), size=(sz.image, sz.image), mode="area").round().clamp(0, 255).byte()

    info = replace(data.info, shape=(3, sz.image, sz.image))
    return replace(data, info=info, train_x=shrink(data.train_x), test_x=shrink(data.test_x))


def engine(sz: Sizes, compile: str = "auto", processes: int = 1):
    """The worker's engine: the same function and defaults `sweeper worker` uses."""
    from sweeper import device

    return device.prepare("auto" if sz.device == "cuda" else sz.device, "auto", compile, processes_per_host=processes)


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_gib(dev) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


# --- the worker's path: steps/s through fit()'s on_step ---------------------------------------------


def worker_throughput(eng, batch: int, sz: Sizes, budget: float, steps: int, barrier=None) -> dict[str, Any]:
    """Images/s of fit(**eng.fit_options()) over ``steps`` steps after ``sz.warmup`` untimed ones."""
    from sweeper.models import build_model
    from sweeper.train import Interrupted, Recipe, fit

    warmup = sz.warmup
    data = splits((warmup + steps) * batch, batch, sz)
    model = build_model(sz.variant, sz.num_classes)
    marks: dict[str, float] = {}
    last = {"step": 0}
    deadline = time.monotonic() + budget
    begun = time.perf_counter()

    def on_step(step: int, total: int) -> None:
        last["step"] = step
        if step == warmup:
            sync(eng.device)
            marks["warm"] = time.perf_counter()
            marks["t0"] = barrier() if barrier else time.time()
        elif step == warmup + steps:
            sync(eng.device)
            marks["t1"] = time.time()

    recipe = Recipe(epochs=1, batch_size=batch, eval_batch_size=max(batch, 256), seed=1)
    with contextlib.suppress(Interrupted):
        fit(
            model,
            data,
            recipe,
            **eng.fit_options(),
            on_step=on_step,
            should_stop=lambda: "t1" in marks or time.monotonic() > deadline,
        )
    if "t0" not in marks:
        raise PhaseTimeout(f"still in the first {warmup} steps (compilation, CUDA-graph capture) at the budget")
    timed = steps
    if "t1" not in marks:  # out of time: the steps since the warm-up still count
        sync(eng.device)
        marks["t1"], timed = time.time(), last["step"] - warmup
    return {
        "images_per_s": timed * batch / (marks["t1"] - marks["t0"]),
        "timed_steps": timed,
        "warmup_s": marks["warm"] - begun,
        "t0": marks["t0"],
        "t1": marks["t1"],
        "images": timed * batch,
        "peak_gib": peak_gib(eng.device),
        "engine": {**eng.fit_options(), "device": str(eng.device)},
    }


# --- a full run, with the worker's per-epoch checkpoint ----------------------------------------------


def full_run(eng, sz: Sizes, budget: float, logdir: Path) -> dict[str, Any]:
    from sweeper import checkpoint
    from sweeper.models import build_model
    from sweeper.train import Interrupted, Recipe, fit

    data = splits(sz.full_train, sz.full_test, sz)
    model = build_model(sz.variant, sz.num_classes)
    epochs: list[dict[str, float]] = []
    deadline = time.monotonic() + budget
    begun = time.perf_counter()

    def on_epoch(m, state) -> bool:
        t0 = time.perf_counter()
        copied = state()  # what the worker checkpoints: the state copied off the GPU
        t1 = time.perf_counter()
        path = checkpoint.save(logdir / "full-run-checkpoint.pt", copied)
        t2 = time.perf_counter()
        epochs.append(
            {
                "epoch": m.epoch,
                "epoch_seconds": m.epoch_seconds,
                "images_per_s": m.images_per_s,
                "top1_error": m.top1_error,
                "state_copy_s": t1 - t0,
                "checkpoint_write_s": t2 - t1,
                "checkpoint_mb": path.stat().st_size / 1e6,
                "at_s": time.perf_counter() - begun,
            }
        )
        log(f"    epoch {m.epoch}: {m.epoch_seconds:.1f}s, {m.images_per_s:,.0f} img/s, checkpoint {t2 - t0:.2f}s")
        return False

    finished = True
    try:
        fit(
            model,
            data,
            Recipe(epochs=sz.full_epochs, batch_size=sz.batch, seed=1),
            **eng.fit_options(),
            on_epoch=on_epoch,
            should_stop=lambda: time.monotonic() > deadline,
        )
    except (Interrupted, PhaseTimeout):  # the epochs done so far still count
        finished = False
    out = {
        "wall_s": time.perf_counter() - begun,
        "finished": finished,
        "epochs_done": len(epochs),
        "epochs": epochs,
        "peak_gib": peak_gib(eng.device),
        "final_top1_error": epochs[-1]["top1_error"] if epochs else None,
    }
    if epochs:
        steady = epochs[1:] or epochs  # epoch 1 pays the compile
        out["checkpoint_s_per_epoch"] = sum(e["state_copy_s"] + e["checkpoint_write_s"] for e in steady) / len(steady)
        out["checkpoint_mb"] = epochs[-1]["checkpoint_mb"]
    if not finished and len(epochs) >= 2:
        per_epoch = (epochs[-1]["at_s"] - epochs[0]["at_s"]) / (len(epochs) - 1)
        out["projected_wall_s"] = epochs[-1]["at_s"] + (sz.full_epochs - len(epochs)) * per_epoch
    return out


# --- packed trials: K processes on one GPU -------------------------------------------------------------


def packed_process(cfg_path: str) -> int:
    """One of K processes: the worker path for a fixed number of steps after a common start."""
    cfg = json.loads(Path(cfg_path).read_text())
    sz = Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["sizes"].items()})
    rundir, index = Path(cfg["rundir"]), cfg["index"]

    def barrier() -> float:
        (rundir / f"ready-{index}").write_text("")
        while not (rundir / "go").exists():
            time.sleep(0.005)
        return time.time()

    try:
        if sz.device == "cpu":
            import torch

            torch.set_num_threads(1)
        eng = engine(sz, processes=cfg["k"])
        r = worker_throughput(eng, sz.batch, sz, cfg["budget"], sz.packed_steps, barrier=barrier)
        (rundir / f"result-{index}.json").write_text(json.dumps(r))
        return 0
    except BaseException as e:
        (rundir / f"result-{index}.json").write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        traceback.print_exc()
        return 1


def packed(k: int, sz: Sizes, budget: float, logdir: Path) -> dict[str, Any]:
    rundir = logdir / f"packed-{k}"
    rundir.mkdir(parents=True, exist_ok=True)
    for p in rundir.iterdir():
        p.unlink()
    deadline = time.monotonic() + budget
    procs = []
    for i in range(k):
        cfg = {"sizes": asdict(sz), "rundir": str(rundir), "index": i, "budget": budget, "k": k}
        (rundir / f"cfg-{i}.json").write_text(json.dumps(cfg))
        with open(rundir / f"process-{i}.log", "wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--_packed-process", str(rundir / f"cfg-{i}.json")],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        while sum((rundir / f"ready-{i}").exists() for i in range(k)) < k:
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                raise RuntimeError(
                    f"packed process {failed[0]}: " + (rundir / f"process-{failed[0]}.log").read_text()[-1500:]
                )
            if time.monotonic() > deadline:
                raise PhaseTimeout(f"not all {k} processes finished their warm-up (start-up, compilation) in time")
            time.sleep(0.02)
        go = time.time()
        (rundir / "go").write_text(repr(go))
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise PhaseTimeout(f"the {k} packed processes did not finish in time") from None
    finally:
        for p in procs:  # only the processes started here, each by its own handle
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [json.loads((rundir / f"result-{i}.json").read_text()) for i in range(k)]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"packed process failed: {errors[0]}")
    span = max(r["t1"] for r in results) - go
    return {
        "k": k,
        "images_per_s": sum(r["images"] for r in results) / span,
        "per_trial_images_per_s": [r["images_per_s"] for r in results],
        "peak_gib": max((r["peak_gib"] or 0) for r in results) if sz.device == "cuda" else None,
        "warmup_s_max": max(r["warmup_s"] for r in results),
    }


# --- the sweep projection ------------------------------------------------------------------------------


def project_sweep(variant: str, rate: float, per_trial: float) -> dict[str, Any]:
    """The seed's 14 cells (7 variants x CIFAR-100/10, 14 epochs of 50,000 + 10,000 images) at the
    aggregate rate measured on ``variant``, each variant's cost scaled by its MACs (an evaluation
    image counted as a third of a training one); never shorter than its longest cell on one slot."""
    from sweeper.models import VARIANTS, count_macs

    macs = {v: count_macs(VARIANTS[v], (3, 32, 32), 100) for v in VARIANTS}
    per_cell = 14 * (50_000 + 10_000 / 3)
    equivalent = 2 * sum(per_cell * macs[v] / macs[variant] for v in VARIANTS)
    longest = per_cell * max(macs.values()) / macs[variant] / per_trial
    seconds = max(equivalent / rate, longest)
    return {"aggregate_images_per_s": rate, "longest_cell_s": longest, "projected_min": seconds / 60}


# --- main -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the seed loop vs the worker's path on one GPU, in 8 minutes")
    parser.add_argument("--logdir", type=Path, default=None, help="where gpu_check.json and the packed logs go")
    parser.add_argument("--dry-run-cpu", action="store_true", help="every phase on the CPU, tiny sizes")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all phases together")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, TFLOP/s")
    parser.add_argument("--_packed-process", dest="packed_process", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.packed_process:
        return packed_process(args.packed_process)

    t_start = time.monotonic()
    try:
        import torch
        import torchvision
    except ImportError as e:
        log(f"gpu_check: {e}; this check needs Python with PyTorch (CUDA build) and torchvision")
        return MISSING_DEPS_EXIT
    if not args.dry_run_cpu and not torch.cuda.is_available():
        log(
            f"gpu_check: no CUDA GPU is visible (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}; torch.cuda.is_available() is False). This check needs an NVIDIA "
            "GPU; run it on the GPU machine, or pass --dry-run-cpu to exercise its code paths on the CPU."
        )
        return NO_GPU_EXIT

    from sweeper.models import VARIANTS, count_macs

    sz = Sizes.dry_run_cpu() if args.dry_run_cpu else Sizes()
    if args.budget:
        sz.total_budget = args.budget
    logdir = args.logdir or Path(os.environ.get("TMPDIR", "/tmp")) / "gpu-check"
    logdir.mkdir(parents=True, exist_ok=True)
    if sz.device == "cpu":
        torch.set_num_threads(1)  # tiny tensors: more threads only contend
    default = engine(sz)
    other = "off" if default.compile else "on"
    env = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "dry_run_cpu": args.dry_run_cpu,
        "engine": {**default.fit_options(), "device": str(default.device)},
        "optuna_or_mlflow_imported": sorted(m for m in ("optuna", "mlflow") if m in sys.modules),
        "cpus": os.cpu_count(),
    }
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    if default.device.type == "cuda":
        name = torch.cuda.get_device_name(default.device)
        env.update(gpu=name, capability=".".join(map(str, torch.cuda.get_device_capability(default.device))))
        peak = peak or next((v for k, v in PEAK_BF16.items() if k in name), None)
    env["peak_bf16_tflops"] = peak / 1e12 if peak else None
    # FLOPs per training image: a forward pass is 2 x MACs, the backward twice the forward
    flops_per_image = 6 * count_macs(VARIANTS[sz.variant], (3, 32, 32), 100)
    log(f"gpu_check: {json.dumps(env)}")

    results: dict[str, Any] = {"env": env, "sizes": asdict(sz), "phases": {}, "complete": False}
    out_path = logdir / "gpu_check.json"

    def save() -> None:  # after every phase, whole: a run cut short keeps what it measured
        results["total_s"] = time.monotonic() - t_start
        tmp = out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        os.replace(tmp, out_path)

    def phase(key: str, title: str, fn, min_needed: float = 10.0) -> dict[str, Any] | None:
        remaining = t_start + sz.total_budget - time.monotonic()
        budget = min(sz.budgets[key.split("@")[0]], remaining)
        if budget < min_needed:
            log(f"  {title}: skipped ({remaining:.0f}s left)")
            results["phases"][key] = {"skipped": f"{remaining:.0f}s left of the {sz.total_budget:.0f}s budget"}
            save()
            return None
        log(f"  {title} (up to {budget:.0f}s) ...")
        begun = time.perf_counter()
        try:
            with time_bound(budget + 15):  # the phase's own deadline first, this hard bound 15 s later
                r = fn(budget)
        except Exception as e:  # one phase failing must not lose the others
            r = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]}
            log(f"  {title}: FAILED\n{traceback.format_exc()}")
        finally:
            import gc

            gc.collect()
            torch._dynamo.reset()  # compiled graphs and CUDA-graph pools of this phase
            if sz.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        r["phase_s"] = time.perf_counter() - begun
        if r.get("images_per_s") and peak:
            r["peak_fraction"] = r["images_per_s"] * flops_per_image / peak
        log(f"  {title}: {json.dumps({k: v for k, v in r.items() if k != 'epochs'}, default=str)}")
        results["phases"][key] = r
        save()
        return r

    def seed(batch: int):
        def run(budget: float) -> dict[str, Any]:
            data = splits((sz.seed_warmup + sz.seed_steps) * batch, batch, sz)
            deadline = time.monotonic() + budget
            return measure_seed(
                sz.variant, batch, sz.seed_steps, sz.seed_warmup, splits=data, device=sz.device, deadline=deadline
            )

        return run

    def worker(batch: int, compile: str):
        if args.dry_run_cpu and compile == "on":
            return lambda budget: {"skipped": "dry run: inductor on a CPU compiles for minutes"}
        return lambda budget: worker_throughput(engine(sz, compile), batch, sz, budget, sz.steps)

    b, B = sz.batch, sz.big_batch
    phase("seed", f"seed loop, batch {b}", seed(b))
    head = phase("worker", f"worker path (compile {'on' if default.compile else 'off'}), batch {b}", worker(b, "auto"))
    phase("worker_other", f"worker path, compile {other}, batch {b}", worker(b, other))
    full = phase(
        "full", f"{sz.full_epochs}-epoch run, batch {b}", lambda budget: full_run(default, sz, budget, logdir), 20
    )
    for k in sz.packed:
        phase(f"packed@{k}", f"{k} packed trials, batch {b}", lambda budget, k=k: packed(k, sz, budget, logdir), 20)
    phase("seed_big", f"seed loop, batch {B}", seed(B))
    phase("worker_big", f"worker path, batch {B}", worker(B, "auto"))
    phase("worker_big_other", f"worker path, compile {other}, batch {B}", worker(B, other))

    # the projection and the targets
    ph = results["phases"]
    rates = [
        (r["images_per_s"], r["images_per_s"] / r["k"]) for r in ph.values() if r.get("k") and r.get("images_per_s")
    ]
    if head and head.get("images_per_s"):
        rates.append((head["images_per_s"], head["images_per_s"]))
    sweep = project_sweep(sz.variant, *max(rates)) if rates else None
    full_s = None
    if full and full.get("epochs_done"):
        full_s = full["wall_s"] if full["finished"] else full.get("projected_wall_s")
    fraction = head.get("peak_fraction") if head else None
    results["sweep_projection"] = sweep
    results["targets"] = {
        f"worker path at batch {b} >= {TARGET_PEAK_FRACTION:.0%} of the bf16 peak": fraction,
        f"{sz.full_epochs}-epoch run <= {TARGET_FULL_RUN_S:.0f} s": full_s,
        f"seed's {SEED_CELLS}-cell sweep <= {TARGET_SWEEP_MIN:.0f} min": sweep and sweep["projected_min"],
    }
    met = [
        fraction is not None and fraction >= TARGET_PEAK_FRACTION,
        full_s is not None and full_s <= TARGET_FULL_RUN_S,
        sweep is not None and sweep["projected_min"] <= TARGET_SWEEP_MIN,
    ]
    results["complete"] = True
    save()

    # the table, last
    print()
    kind = "DRY RUN on the CPU: tiny sizes, the figures mean nothing" if args.dry_run_cpu else env.get("gpu")
    print(f"GPU check ({kind}); torch {torch.__version__}; {results['total_s']:.0f}s; JSON: {out_path}")
    print(f"{'phase':<32} {'images/s':>10} {'x seed':>7} {'of peak':>8} {'peak GiB':>8} {'wall s':>7}  note")
    for key, r in ph.items():
        base = ph.get("seed_big" if "big" in key else "seed", {}).get("images_per_s")
        ips = r.get("images_per_s")
        cells = [
            f"{ips:,.0f}" if ips else "-",
            f"{ips / base:.1f}" if ips and base and not key.startswith("seed") else "-",
            f"{r['peak_fraction']:.1%}" if r.get("peak_fraction") else "-",
            f"{r['peak_gib']:.2f}" if r.get("peak_gib") else "-",
            f"{r['phase_s']:.0f}" if "phase_s" in r else "-",
        ]
        note = r.get("error") or r.get("skipped") or ""
        if key == "full" and r.get("epochs_done"):
            note = (
                f"{r['epochs_done']} epochs, {r['wall_s']:.1f}s{'' if r['finished'] else ' (stopped)'}, "
                f"checkpoint {r['checkpoint_s_per_epoch']:.2f}s/epoch ({r['checkpoint_mb']:.0f} MB)"
            )
        print(f"{key:<32} {cells[0]:>10} {cells[1]:>7} {cells[2]:>8} {cells[3]:>8} {cells[4]:>7}  {note}")
    for (name, value), ok in zip(results["targets"].items(), met, strict=True):
        shown = "-" if value is None else (f"{value:.1%}" if "peak" in name else f"{value:.1f}")
        print(f"target {name}: {shown} -> {'MET' if ok else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
