"""GPU check: the seed's training loop vs sweeper's fit() on one NVIDIA GPU, in under 8 minutes.

    bash benchmarks/gpu_check.sh /tmp/gpu-log              # the way to run it (sets PYTHONPATH, logs)
    python benchmarks/gpu_check.py --logdir /tmp/gpu-log    # the same, PYTHONPATH set by hand
    python benchmarks/gpu_check.py --dry-run-cpu            # every code path on the CPU, tiny sizes

Needs only Python with PyTorch and torchvision: it imports sweeper.models, sweeper.data (the
synthetic set) and sweeper.train, none of which imports Optuna or MLflow. Without a CUDA GPU it
exits with status 2 and says so (unless --dry-run-cpu).

Phases, most important first; each has a time bound, and a phase that no longer fits in the
overall budget is skipped and marked so in the table:

1. seed loop, `standard`, batch 64: fp32, NCHW, per-image PIL transforms (RandomHorizontalFlip,
   ToTensor, Normalize) in a DataLoader with 2 workers and pinned memory, Adadelta -- the seed
   post's script (its GoogLeNet is sweeper's `standard`). Measured by
   benchmarks/train_throughput.py's measure_seed when that file is there (this file keeps its
   own copy of the loop for the CPU dry run's small images, and as a fallback).
2. sweeper fit(), `standard`, batch 64: bf16 autocast, channels_last, the split resident on the
   GPU, torch.compile(mode="reduce-overhead") (CUDA graphs). Timed from fit()'s on_step callback
   after warm-up steps (compilation and graph capture excluded, reported apart).
3. a full 14-epoch fit() of `standard` at batch 64 on synthetic data of CIFAR-100's size
   (50,000 + 10,000 images, 100 classes), compile included; wall time.
4. K = 1, 2, 4, 8 packed trials: K processes on the one GPU, each fit() of `standard` at batch 64
   (compiled) for a fixed number of steps after a common start; aggregate images/s, peak memory.
5. fit() of `standard` at batch 64/256/512/1024 without compile (what a worker runs today), and
   compiled at the best of them if time remains.
6-8. the same for `naive`: seed loop at 64, compiled fit at 64, batch sweep.

The last lines printed are the table; LOGDIR gets gpu_check.json with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NO_GPU_EXIT = 2
MISSING_DEPS_EXIT = 3
SEED_CELLS = [
    (v, d)
    for d in ("cifar100", "cifar10")
    for v in ("naive", "standard", "long", "short", "short2", "short3", "short4")
]
TARGET_SPEEDUP = 20.0
TARGET_FULL_RUN_S = 90.0
TARGET_SWEEP_MIN = 15.0


class PhaseTimeout(Exception):
    pass


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


@contextlib.contextmanager
def time_bound(seconds: float):
    """Raise PhaseTimeout in the main thread after ``seconds`` (a hard bound: compilation or a
    stuck step cannot run the whole check past its budget)."""

    def handler(signum, frame):
        raise PhaseTimeout(f"hard time bound of {seconds:.0f}s reached")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- sizes -------------------------------------------------------------------------------------


@dataclass
class Sizes:
    device: str
    image: int = 32  # side of the synthetic images
    batch: int = 64
    best_batches: tuple[int, ...] = (256, 512, 1024)
    seed_warmup: int = 10
    seed_steps: int = 300
    seed_log_interval: int = 10
    seed_workers: int = 2
    fit_warmup: int = 25  # compile, CUDA-graph warm-up and capture happen in these
    fit_steps: int = 400
    sweep_warmup: int = 5
    sweep_steps: int = 60
    full_epochs: int = 14
    full_train: int = 50_000
    full_test: int = 10_000
    num_classes: int = 100
    packed: tuple[int, ...] = (1, 2, 4, 8)
    packed_warmup: int = 25
    packed_steps: int = 200
    compile: bool = True
    precision: str = "bf16"
    total_budget: float = 440.0  # seconds for every phase together (the .sh stops it at 475)
    budgets: dict[str, float] = field(
        default_factory=lambda: {"seed": 35, "fit": 110, "full": 160, "packed": 55, "sweep": 45, "fit_best": 80}
    )

    @classmethod
    def dry_run_cpu(cls) -> Sizes:
        # inductor on a CPU compiles for minutes: the dry run leaves compile off, all else equal
        return cls(
            device="cpu",
            image=8,
            batch=4,
            best_batches=(8, 16),
            seed_warmup=1,
            seed_steps=2,
            seed_log_interval=2,
            fit_warmup=1,
            fit_steps=2,
            sweep_warmup=1,
            sweep_steps=2,
            full_epochs=2,
            full_train=16,
            full_test=8,
            num_classes=10,
            packed=(2,),
            packed_warmup=1,
            packed_steps=2,
            compile=False,
            total_budget=240.0,
            budgets={"seed": 60, "fit": 60, "full": 60, "packed": 90, "sweep": 60, "fit_best": 60},
        )


# --- data ----------------------------------------------------------------------------------------


def splits(n_train: int, n_test: int, num_classes: int, image: int):
    """sweeper's synthetic set, resized when the dry run asks for smaller images."""
    from dataclasses import replace

    import torch.nn.functional as F

    from sweeper.data import synthetic

    data = synthetic.load(n_train, n_test, num_classes=num_classes)
    if image == 32:
        return data

    def shrink(x):
        return F.interpolate(x.float(), size=(image, image), mode="area").round().clamp(0, 255).byte()

    return replace(
        data, info=replace(data.info, shape=(3, image, image)), train_x=shrink(data.train_x), test_x=shrink(data.test_x)
    )


class PILImages:
    """A torchvision-style dataset: HWC uint8 arrays, one PIL image per item, like CIFAR100."""

    def __init__(self, x_uint8, y, transform):
        self.data = x_uint8.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device) -> float | None:
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def reset_gpu(device) -> None:
    import torch

    gc.collect()
    if "torch._dynamo" in sys.modules:  # compiled graphs and CUDA-graph pools of the last phase
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --- 1. the seed's loop ----------------------------------------------------------------------------


def seed_images_per_s(variant: str, sz: Sizes, budget: float) -> dict[str, Any]:
    """The seed loop's images/s: benchmarks/train_throughput.py's measure_seed where it applies
    (full-size images on the default device), else this file's own copy of the same loop."""
    import torch

    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    if sz.image == 32 and sz.device == default_device:
        try:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from train_throughput import measure_seed
        except ImportError:
            measure_seed = None
        if measure_seed is not None:
            try:
                r = measure_seed(variant, sz.batch, sz.seed_steps, sz.seed_warmup, sz.seed_workers)
            except TypeError as e:  # its signature changed: fall back to this file's loop
                log(f"    train_throughput.measure_seed not usable ({e}); using gpu_check's own seed loop")
            else:
                return {
                    **r,
                    "source": "train_throughput.measure_seed",
                    "timed_steps": sz.seed_steps,
                    "peak_gib": r["peak_gpu_mb"] / 1024 if r.get("peak_gpu_mb") is not None else None,
                }
    return {**seed_loop(variant, sz, budget), "source": "gpu_check.seed_loop"}


def seed_loop(variant: str, sz: Sizes, budget: float) -> dict[str, Any]:
    """images/s of the seed post's loop: fp32 NCHW, PIL transforms per image, DataLoader."""
    import torch
    import torch.nn.functional as F
    from torchvision import transforms

    from sweeper.models import build_model

    device = torch.device(sz.device)
    n = (sz.seed_warmup + sz.seed_steps + 2) * sz.batch
    data = splits(n, sz.batch, sz.num_classes, sz.image)
    transform = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    loader = torch.utils.data.DataLoader(
        PILImages(data.train_x, data.train_y, transform),
        batch_size=sz.batch,
        shuffle=True,
        num_workers=sz.seed_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    torch.manual_seed(1)
    model = build_model(variant, sz.num_classes).to(device)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    model.train()
    deadline = time.monotonic() + budget
    t0 = t1 = None
    timed = 0
    started = time.perf_counter()
    for step, (x, y) in enumerate(loader, start=1):
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if step % sz.seed_log_interval == 0:
            loss.item()  # the seed prints the loss every log_interval batches
        if step == sz.seed_warmup:
            sync(device)
            t0 = time.perf_counter()
        elif t0 is not None:
            timed += 1
            if timed >= sz.seed_steps or time.monotonic() > deadline:
                sync(device)
                t1 = time.perf_counter()
                break
    if t0 is None or t1 is None or timed == 0:
        raise PhaseTimeout("the seed loop did not get past its warm-up steps")
    return {
        "images_per_s": timed * sz.batch / (t1 - t0),
        "timed_steps": timed,
        "warmup_s": t0 - started,
        "peak_gib": peak_gib(device),
        "final_loss": loss.item(),
    }


# --- 2. sweeper's fit() ------------------------------------------------------------------------------


def fit_throughput(
    variant: str,
    batch: int,
    sz: Sizes,
    budget: float,
    *,
    compile: bool | str,
    warmup: int,
    steps: int,
    barrier: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """images/s of sweeper.train.fit over ``steps`` steps after ``warmup`` steps, from on_step."""
    import torch

    from sweeper.models import build_model
    from sweeper.train import Interrupted, Recipe, fit

    device = torch.device(sz.device)
    data = splits((warmup + steps + 2) * batch, batch, sz.num_classes, sz.image)
    torch.manual_seed(1)
    model = build_model(variant, sz.num_classes)
    marks: dict[str, float] = {}
    last = {"step": 0}
    deadline = time.monotonic() + budget
    started = time.perf_counter()

    def on_step(step: int, total: int) -> None:
        last["step"] = step
        if step == warmup:
            sync(device)
            marks["warm"] = time.perf_counter()
            marks["t0"] = barrier() if barrier else time.time()
        elif step == warmup + steps:
            sync(device)
            marks["t1"] = time.time()

    def should_stop() -> bool:
        return "t1" in marks or time.monotonic() > deadline

    recipe = Recipe(epochs=1, batch_size=batch, eval_batch_size=max(batch, 256), seed=1)
    try:
        fit(
            model,
            data,
            recipe,
            device=sz.device,
            precision=sz.precision,
            compile=compile,
            on_step=on_step,
            should_stop=should_stop,
        )
    except Interrupted:
        pass
    if "t0" not in marks:
        raise PhaseTimeout(f"still in the first {warmup} steps (compilation, graph capture) at the budget")
    timed = steps
    if "t1" not in marks:  # out of time: what was done since the warm-up still counts
        sync(device)
        marks["t1"] = time.time()
        timed = last["step"] - warmup
    return {
        "images_per_s": timed * batch / (marks["t1"] - marks["t0"]),
        "timed_steps": timed,
        "warmup_s": marks["warm"] - started,
        "t0": marks["t0"],
        "t1": marks["t1"],
        "images": timed * batch,
        "peak_gib": peak_gib(device),
    }


# --- 3. a full 14-epoch run ------------------------------------------------------------------------


def full_run(variant: str, sz: Sizes, budget: float) -> dict[str, Any]:
    import torch

    from sweeper.models import build_model
    from sweeper.train import Interrupted, Recipe, fit

    device = torch.device(sz.device)
    t_data = time.perf_counter()
    data = splits(sz.full_train, sz.full_test, sz.num_classes, sz.image)
    data_s = time.perf_counter() - t_data
    torch.manual_seed(1)
    model = build_model(variant, sz.num_classes)
    epochs: list[dict[str, float]] = []
    deadline = time.monotonic() + budget
    started = time.perf_counter()

    def on_epoch(m, state) -> bool:
        epochs.append(
            {
                "epoch": m.epoch,
                "epoch_seconds": m.epoch_seconds,
                "images_per_s": m.images_per_s,
                "top1_error": m.top1_error,
                "at_s": time.perf_counter() - started,
            }
        )
        log(
            f"    epoch {m.epoch}/{sz.full_epochs}: {m.epoch_seconds:.1f}s, {m.images_per_s:,.0f} images/s, "
            f"top1_error {m.top1_error:.3f}"
        )
        return False

    recipe = Recipe(epochs=sz.full_epochs, batch_size=sz.batch, seed=1)
    finished = True
    try:
        fit(
            model,
            data,
            recipe,
            device=sz.device,
            precision=sz.precision,
            compile=sz.compile,
            on_epoch=on_epoch,
            should_stop=lambda: time.monotonic() > deadline,
        )
    except Interrupted:
        finished = False
    wall = time.perf_counter() - started
    out = {
        "wall_s": wall,
        "epochs_done": len(epochs),
        "finished": finished,
        "data_gen_s": data_s,
        "peak_gib": peak_gib(device),
        "epochs": epochs,
        "final_top1_error": epochs[-1]["top1_error"] if epochs else None,
    }
    if not finished and len(epochs) >= 2:  # project from the steady epochs
        steady = [e["epoch_seconds"] for e in epochs[1:]]
        out["projected_wall_s"] = epochs[-1]["at_s"] + (sz.full_epochs - len(epochs)) * sum(steady) / len(steady)
    return out


# --- 4. packed trials ------------------------------------------------------------------------------


def packed_worker(cfg_path: str) -> int:
    """One of K processes sharing the GPU: fit() after a common start, for a fixed number of steps."""
    cfg = json.loads(Path(cfg_path).read_text())
    sz = Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["sizes"].items()})
    rundir, index = Path(cfg["rundir"]), cfg["index"]
    import torch

    if sz.device == "cpu":
        torch.set_num_threads(1)

    def barrier() -> float:
        (rundir / f"ready-{index}").write_text("")
        go = rundir / "go"
        while not go.exists():
            time.sleep(0.005)
        return time.time()

    try:
        r = fit_throughput(
            cfg["variant"],
            sz.batch,
            sz,
            cfg["budget"],
            compile=sz.compile,
            warmup=sz.packed_warmup,
            steps=sz.packed_steps,
            barrier=barrier,
        )
        (rundir / f"result-{index}.json").write_text(json.dumps(r))
        return 0
    except BaseException as e:
        (rundir / f"result-{index}.json").write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        traceback.print_exc()
        return 1


def packed(k: int, variant: str, sz: Sizes, budget: float, logdir: Path) -> dict[str, Any]:
    from dataclasses import asdict

    rundir = logdir / f"packed-{k}"
    if rundir.exists():
        for p in rundir.iterdir():
            p.unlink()
    rundir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget
    procs = []
    for i in range(k):
        cfg = {"sizes": asdict(sz), "rundir": str(rundir), "index": i, "budget": budget, "variant": variant}
        (rundir / f"cfg-{i}.json").write_text(json.dumps(cfg))
        out = open(rundir / f"worker-{i}.log", "wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--_packed-worker", str(rundir / f"cfg-{i}.json")],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        while sum((rundir / f"ready-{i}").exists() for i in range(k)) < k:
            if time.monotonic() > deadline:
                raise PhaseTimeout(
                    f"{sum((rundir / f'ready-{i}').exists() for i in range(k))}/{k} processes "
                    "finished their warm-up (start-up, compilation) within the budget"
                )
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                raise RuntimeError(
                    f"packed process {failed[0]} exited {procs[failed[0]].returncode}: "
                    + (rundir / f"worker-{failed[0]}.log").read_text()[-1500:]
                )
            time.sleep(0.02)
        go = time.time()
        (rundir / "go").write_text(repr(go))
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise PhaseTimeout(f"the {k} packed processes did not finish within the budget") from None
    finally:
        for p in procs:  # only the processes started here, each by its own handle
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [json.loads((rundir / f"result-{i}.json").read_text()) for i in range(k)]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"packed process failed: {errors[0]}")
    images = sum(r["images"] for r in results)
    span = max(r["t1"] for r in results) - go
    return {
        "k": k,
        "aggregate_images_per_s": images / span,
        "per_trial_images_per_s": [r["images_per_s"] for r in results],
        "peak_gib_per_trial": max((r["peak_gib"] or 0) for r in results) if sz.device != "cpu" else None,
        "warmup_s_max": max(r["warmup_s"] for r in results),
        "span_s": span,
    }


# --- the sweep projection ----------------------------------------------------------------------------


def project_sweep(packed_rows: list[dict[str, Any]], measured: str) -> dict[str, Any] | None:
    """The seed's 14 cells (7 variants x CIFAR-100/10, 14 epochs of 50,000 + 10,000 images) at the
    best packed aggregate rate measured (on `standard` by default), each variant's cost scaled by its MACs
    (evaluation counted as a third of a training image)."""
    from sweeper.models import build_model, count_macs

    ok = [r for r in packed_rows if r.get("aggregate_images_per_s")]
    if not ok:
        return None
    best = max(ok, key=lambda r: r["aggregate_images_per_s"])
    macs = {}
    for variant in sorted({v for v, _ in SEED_CELLS}):
        macs[variant] = count_macs(build_model(variant, 100), (3, 32, 32))
    per_cell_images = 14 * (50_000 + 10_000 / 3)
    if measured not in macs:
        macs[measured] = count_macs(build_model(measured, 100), (3, 32, 32))
    std_equiv = sum(per_cell_images * macs[v] / macs[measured] for v, _ in SEED_CELLS)
    aggregate = best["aggregate_images_per_s"]
    per_trial = aggregate / best["k"]
    longest = per_cell_images * max(macs.values()) / macs[measured] / per_trial  # one cell on one slot
    seconds = max(std_equiv / aggregate, longest)
    return {
        "best_k": best["k"],
        "aggregate_images_per_s": aggregate,
        "measured_variant": measured,
        "equivalent_images": std_equiv,
        "macs": macs,
        "longest_cell_s": longest,
        "projected_s": seconds,
        "projected_min": seconds / 60,
    }


# --- main -------------------------------------------------------------------------------------------


@dataclass
class Row:
    phase: str
    variant: str = ""
    batch: int | str = ""
    images_per_s: float | None = None
    wall_s: float | None = None
    peak_gib: float | None = None
    note: str = ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="seed loop vs sweeper fit() on one GPU, in under 8 minutes")
    parser.add_argument("--logdir", type=Path, default=None, help="where gpu_check.json (and the packed logs) go")
    parser.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="run every phase on the CPU with tiny sizes (no GPU needed; checks the code paths)",
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds for all phases together")
    parser.add_argument(
        "--variants",
        default="standard,naive",
        help="comma-separated; the first gets every phase, the others seed loop, fit and batch sweep",
    )
    parser.add_argument("--_packed-worker", dest="packed_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.packed_worker:
        return packed_worker(args.packed_worker)

    t_start = time.monotonic()
    try:
        import torch
        import torchvision
    except ImportError as e:
        print(
            f"gpu_check: {e}; this check needs Python with PyTorch (CUDA build) and torchvision",
            file=sys.stderr,
            flush=True,
        )
        return MISSING_DEPS_EXIT

    if not args.dry_run_cpu and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA GPU is visible (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}; torch.cuda.is_available() is False). This check needs an "
            "NVIDIA GPU; run it on the GPU machine, or pass --dry-run-cpu to exercise its code paths on the "
            "CPU.",
            file=sys.stderr,
            flush=True,
        )
        return NO_GPU_EXIT

    import sweeper.data
    import sweeper.models
    import sweeper.train  # noqa: F401
    from sweeper.models import VARIANTS

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"unknown variant(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(VARIANTS)}")
    heavy = sorted(m for m in ("optuna", "mlflow", "optuna_integration", "sqlalchemy") if m in sys.modules)
    sz = Sizes.dry_run_cpu() if args.dry_run_cpu else Sizes(device="cuda")
    if args.budget:
        sz.total_budget = args.budget
    logdir = args.logdir or Path(os.environ.get("TMPDIR", "/tmp")) / "gpu-check"
    logdir.mkdir(parents=True, exist_ok=True)
    env = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "device": sz.device,
        "dry_run_cpu": args.dry_run_cpu,
        "optuna_or_mlflow_imported": heavy,
        "cpus": os.cpu_count(),
    }
    if sz.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported()
        )
    else:
        torch.set_num_threads(1)  # tiny tensors: more threads only contend (and the CPU may be shared)
    log(f"gpu_check: {json.dumps(env)}")
    if heavy:
        log(f"gpu_check: WARNING: {', '.join(heavy)} got imported; the training layers should not need them")

    deadline = t_start + sz.total_budget
    results: dict[str, Any] = {
        "env": env,
        "variants": variants,
        "sizes": {k: v for k, v in sz.__dict__.items()},
        "phases": {},
    }
    rows: list[Row] = []

    def phase(
        key: str, title: str, budget_key: str, fn: Callable[[float], dict[str, Any]], min_needed: float = 10.0
    ) -> dict[str, Any] | None:
        remaining = deadline - time.monotonic()
        budget = min(sz.budgets[budget_key], remaining)
        if budget < min_needed:
            log(f"  {title}: skipped ({remaining:.0f}s left of the {sz.total_budget:.0f}s budget)")
            results["phases"][key] = {"skipped": f"{remaining:.0f}s left"}
            return None
        log(f"  {title} (up to {budget:.0f}s) ...")
        started = time.perf_counter()
        try:
            reset_gpu(sz.device)
            # the soft bound (the phase's own deadline) comes first; the hard one 15 s later
            with time_bound(budget + 15):
                r = fn(budget)
            r["phase_s"] = time.perf_counter() - started
            log(f"  {title}: {json.dumps({k: v for k, v in r.items() if k not in ('epochs', 'macs')}, default=str)}")
        except PhaseTimeout as e:
            r = {"error": f"timeout: {e}", "phase_s": time.perf_counter() - started}
            log(f"  {title}: TIMEOUT {e}")
        except torch.OutOfMemoryError as e:
            r = {"error": f"out of memory: {str(e).splitlines()[0]}", "phase_s": time.perf_counter() - started}
            log(f"  {title}: OUT OF MEMORY")
        except Exception as e:  # one phase failing must not lose the others
            r = {"error": f"{type(e).__name__}: {str(e)[:500]}", "phase_s": time.perf_counter() - started}
            log(f"  {title}: FAILED\n{traceback.format_exc()}")
        finally:
            reset_gpu(sz.device)
        results["phases"][key] = r
        return r

    def fit_phase(variant: str, batch: int, compile: bool, warmup: int, steps: int):
        return lambda budget: fit_throughput(variant, batch, sz, budget, compile=compile, warmup=warmup, steps=steps)

    def row_from(r, phase_name, variant, batch, note="") -> Row:
        if r is None:
            return Row(phase_name, variant, batch, note="skipped (time budget)")
        if "error" in r:
            return Row(phase_name, variant, batch, note=r["error"][:60])
        return Row(phase_name, variant, batch, r.get("images_per_s"), r.get("phase_s"), r.get("peak_gib"), note)

    fit_label = "fit bf16+CL+GPU data+compile" if sz.compile else "fit bf16+CL+GPU data (no compile)"
    main_variant, *other_variants = variants
    seed, fits = {}, {}

    def headline(variant: str, min_needed: float = 10.0) -> None:
        seed[variant] = phase(
            f"seed_{variant}_{sz.batch}",
            f"seed loop, {variant}, batch {sz.batch}",
            "seed",
            lambda b: seed_images_per_s(variant, sz, b),
        )
        rows.append(row_from(seed[variant], "seed loop fp32 PIL DataLoader", variant, sz.batch))
        r = fits[variant] = phase(
            f"fit_{variant}_{sz.batch}",
            f"{fit_label}, {variant}, batch {sz.batch}",
            "fit",
            fit_phase(variant, sz.batch, sz.compile, sz.fit_warmup, sz.fit_steps),
            min_needed=min_needed,
        )
        rows.append(
            row_from(r, fit_label, variant, sz.batch, f"warm-up {r['warmup_s']:.0f}s" if r and "warmup_s" in r else "")
        )

    sweeps: dict[str, list[dict[str, Any]]] = {}

    def batch_sweep(variant: str) -> None:
        """fit() without compile (what a worker runs today) at each batch, compiled at the best."""
        sweeps[variant] = []
        for batch in (sz.batch, *sz.best_batches):
            r = phase(
                f"eager_{variant}_{batch}",
                f"fit bf16+CL+GPU data, no compile, {variant}, batch {batch}",
                "sweep",
                fit_phase(variant, batch, False, sz.sweep_warmup, sz.sweep_steps),
            )
            sweeps[variant].append({"batch": batch, **(r or {"skipped": True})})
            rows.append(row_from(r, "fit, no compile", variant, batch))
        done = [s for s in sweeps[variant] if s.get("images_per_s") and s["batch"] != sz.batch]
        if done and sz.compile:
            best = max(done, key=lambda s: s["images_per_s"])
            r = phase(
                f"fit_{variant}_best",
                f"{fit_label}, {variant}, best batch {best['batch']}",
                "fit_best",
                fit_phase(variant, best["batch"], True, sz.fit_warmup, sz.fit_steps),
                min_needed=40,
            )
            rows.append(row_from(r, f"{fit_label} (best batch)", variant, best["batch"]))

    # 1-2: the headline comparison at batch 64
    headline(main_variant)
    # 3: a full run
    full = phase(
        f"full_{main_variant}",
        f"full {sz.full_epochs}-epoch run, {main_variant}, batch {sz.batch}",
        "full",
        lambda b: full_run(main_variant, sz, b),
        min_needed=20,
    )
    # 4: packed trials
    packed_rows = []
    for k in sz.packed:
        r = phase(
            f"packed_{k}",
            f"{k} packed trial(s), {main_variant}, batch {sz.batch}",
            "packed",
            lambda b, k=k: packed(k, main_variant, sz, b, logdir),
            min_needed=20,
        )
        packed_rows.append({"k": k, **(r or {"skipped": True})})
    # 5: batch sweep
    batch_sweep(main_variant)
    # 6-8: the other variants
    for variant in other_variants:
        headline(variant, min_needed=40)
        batch_sweep(variant)

    # speedups against the seed loop
    for row in rows:
        base = seed.get(row.variant)
        if row.images_per_s and base and base.get("images_per_s") and not row.phase.startswith("seed"):
            row.note = (row.note + " " if row.note else "") + f"{row.images_per_s / base['images_per_s']:.1f}x seed"
    for pr in packed_rows:
        if pr.get("aggregate_images_per_s"):
            rows.append(
                Row(
                    f"packed x{pr['k']} (aggregate)",
                    main_variant,
                    sz.batch,
                    pr["aggregate_images_per_s"],
                    pr.get("phase_s"),
                    pr.get("peak_gib_per_trial"),
                    f"per trial {min(pr['per_trial_images_per_s']):,.0f}-{max(pr['per_trial_images_per_s']):,.0f}/s",
                )
            )
        else:
            rows.append(
                Row(
                    f"packed x{pr['k']} (aggregate)",
                    main_variant,
                    sz.batch,
                    note=(pr.get("error") or "skipped (time budget)")[:60],
                )
            )
    sweep = None
    try:
        sweep = project_sweep(packed_rows, main_variant)
    except Exception as e:
        log(f"  sweep projection failed: {e}")
    results["sweep_projection"] = sweep

    speedup = None
    f0, s0 = fits.get(main_variant), seed.get(main_variant)
    if f0 and s0 and f0.get("images_per_s") and s0.get("images_per_s"):
        speedup = f0["images_per_s"] / s0["images_per_s"]
    full_s = None
    if full and "wall_s" in full:
        full_s = full["wall_s"] if full["finished"] else full.get("projected_wall_s")
    targets = {
        f"fit >= {TARGET_SPEEDUP:.0f}x seed loop at batch {sz.batch}": (
            speedup,
            speedup is not None and speedup >= TARGET_SPEEDUP,
        ),
        f"{sz.full_epochs}-epoch {main_variant} run < {TARGET_FULL_RUN_S:.0f}s": (
            full_s,
            full_s is not None and full_s < TARGET_FULL_RUN_S,
        ),
        f"seed's 14-cell sweep (projected) < {TARGET_SWEEP_MIN:.0f} min": (
            sweep and sweep["projected_min"],
            bool(sweep) and sweep["projected_min"] < TARGET_SWEEP_MIN,
        ),
    }
    results["targets"] = {k: {"value": v, "met": m} for k, (v, m) in targets.items()}
    results["rows"] = [r.__dict__ for r in rows]
    results["total_s"] = time.monotonic() - t_start
    (logdir / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))

    # the table, last
    out = sys.stdout
    print("", file=out)
    title = (
        "GPU check (DRY RUN on the CPU: tiny sizes, no compile; the figures mean nothing)"
        if args.dry_run_cpu
        else f"GPU check on {env.get('gpu')}"
    )
    print(f"{title}; torch {torch.__version__}; {results['total_s']:.0f}s; full log and JSON in {logdir}", file=out)
    print(f"{'phase':<40} {'variant':<9} {'batch':>5} {'images/s':>10} {'wall s':>7} {'peak GiB':>8}  note", file=out)
    for r in rows:
        ips = f"{r.images_per_s:,.0f}" if r.images_per_s else "-"
        wall = f"{r.wall_s:.0f}" if r.wall_s is not None else "-"
        peak = f"{r.peak_gib:.2f}" if r.peak_gib is not None else "-"
        print(f"{r.phase:<40} {r.variant:<9} {str(r.batch):>5} {ips:>10} {wall:>7} {peak:>8}  {r.note}", file=out)
    if full and "wall_s" in full:
        state = "finished" if full["finished"] else f"stopped after {full['epochs_done']} epochs, projected"
        print(
            f"{sz.full_epochs}-epoch {main_variant} run (batch {sz.batch}, {sz.full_train:,}+{sz.full_test:,} images, "
            f"{sz.num_classes} classes): {full_s if full_s is not None else float('nan'):.1f}s ({state}), "
            f"final top1_error {full['final_top1_error']}, peak {full['peak_gib'] or 0:.2f} GiB",
            file=out,
        )
    else:
        print(
            f"{sz.full_epochs}-epoch {main_variant} run: {(full or {}).get('error', 'skipped (time budget)')}", file=out
        )
    if sweep:
        print(
            f"seed's 14-cell sweep projected from {sweep['best_k']} packed trials at "
            f"{sweep['aggregate_images_per_s']:,.0f} images/s (variants scaled by MACs): "
            f"{sweep['projected_min']:.1f} min",
            file=out,
        )
    for k, (v, met) in targets.items():
        value = "-" if v is None else (f"{v:.1f}")
        print(f"target {k}: {value} -> {'MET' if met else 'NOT MET'}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
