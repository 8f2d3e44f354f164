"""fit(): the seed's training recipe, fast, reproducible and resumable.

It knows nothing of Optuna or MLflow. After every epoch it hands the metrics and a way to get
the full training state to ``on_epoch``, which may checkpoint, log, report or ask to stop.

>>> from sweeper.data import load
>>> from sweeper.models import build_model
>>> data = load("digits")
>>> seed_everything(1)
>>> model = build_model("short4", data.num_classes, data.in_channels)
>>> result = fit(model, data.limit(256, 64), Recipe(epochs=1), device="cpu", precision="fp32")
>>> len(result.history)
1
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sweeper.contract import PRECISIONS, Recipe
from sweeper.data import BatchLoader, Splits
from sweeper.data.loader import normalize
from sweeper.precision import Mode, choose, cpu_has_fast_bf16, cuda_has_native_bf16, rule, train_step  # noqa: F401


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float
    test_loss: float
    top1_error: float
    top5_error: float
    lr: float
    epoch_seconds: float
    images_per_s: float  # training images per second of training (evaluation excluded)
    # On the held-out validation slice (recipe.val_fraction > 0), else None.
    val_loss: float | None = None
    val_top1_error: float | None = None
    val_top5_error: float | None = None


@dataclass
class FitResult:
    history: list[EpochMetrics] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"
    channels_last: bool = False
    setup_seconds: float = 0.0  # before the first epoch: choosing the mode (a probe), moving data

    @property
    def final(self) -> EpochMetrics:
        return self.history[-1]

    @property
    def train_seconds(self) -> float:
        return sum(m.epoch_seconds for m in self.history)


class NonFiniteLoss(ArithmeticError):
    def __init__(self, epoch: int, step: int, value: float):
        super().__init__(
            f"training loss became {value} at epoch {epoch}, step {step}; "
            "lower the learning rate or use --precision fp32"
        )
        self.epoch, self.step = epoch, step


class Interrupted(Exception):
    """Raised when ``should_stop`` asks to stop mid-epoch; ``last_epoch`` is the last finished one."""

    def __init__(self, last_epoch: int):
        super().__init__(f"training stopped after epoch {last_epoch}")
        self.last_epoch = last_epoch


# --- device and precision -------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not cuda_has_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"precision bf16 on {device} ({torch.cuda.get_device_name(device)}, compute capability "
            f"{major}.{minor}) would be emulated, slower than fp32; bf16 needs compute capability 8.0 "
            "(Ampere) or newer. Use --precision auto or fp32."
        )
    return rule(device).precision if precision == "auto" else precision


def resolve_mode(
    precision: str,
    device: torch.device,
    model: nn.Module,
    shape: tuple[int, ...],
    batch_size: int,
    total_steps: int | None = None,
) -> Mode:
    """The precision and memory layout to train in: ``auto`` measures (sweeper.precision)."""
    if precision == "auto":
        return choose(model, shape, batch_size, device, total_steps=total_steps)
    prec = resolve_precision(precision, device)
    return Mode(prec, prec == "bf16" or device.type == "cuda")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # seeds CUDA too


# --- the recipe ------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer for ``model`` (already on its device). AdamW and SGD step in torch's
    fused kernel on a CPU or a CUDA GPU: one pass per tensor instead of the for-loop's ~10
    elementwise ones (on the CPU AdamW 3-7x faster, SGD up to 4x; the same results to an ulp or
    two; docs/BENCHMARKS.md). Adadelta has no fused kernel in torch."""
    params = list(model.parameters())
    fused = params[0].device.type in ("cpu", "cuda") if params else False
    if recipe.optimizer == "adadelta":
        return torch.optim.Adadelta(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=recipe.lr,
            momentum=recipe.momentum,
            nesterov=recipe.nesterov,
            weight_decay=recipe.weight_decay,
            fused=fused or None,
        )
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=fused or None)


def cpu_copy(tree: Any) -> Any:
    """A copy of ``tree`` (dicts, lists and tuples of tensors) in CPU memory, sharing nothing with it.

    GPU tensors land in pinned memory through asynchronous copies and one synchronize at the end:
    no second copy of the state on the GPU, and the GPU is held up only for the transfer. CPU
    tensors are cloned (``.cpu()`` would return the live tensors that training goes on mutating).
    """
    from_gpu = False

    def copy(x: Any) -> Any:
        nonlocal from_gpu
        if isinstance(x, torch.Tensor):
            if x.device.type == "cuda":
                from_gpu = True
                return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x.detach(), non_blocking=True)
            return x.detach().to("cpu", copy=True)
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x

    out = copy(tree)
    if from_gpu:
        torch.cuda.synchronize()
    return out


def compile_mode(compile: bool | str, device: torch.device) -> str | None:
    if compile is False or compile is None:
        return None
    if isinstance(compile, str):
        return compile
    # At small batches a GPU step is launch-bound: CUDA graphs remove most of that overhead.
    return "reduce-overhead" if device.type == "cuda" else "default"


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, autocast, memory_format):
    """Mean loss, top-1 and top-5 error over a split, in large batches and without augmentation."""
    model.eval()
    k = min(5, model.linear.out_features) if hasattr(model, "linear") else 5
    loss_sum = torch.zeros((), device=x.device)
    top1 = torch.zeros((), device=x.device, dtype=torch.long)
    topk = torch.zeros((), device=x.device, dtype=torch.long)
    for start in range(0, len(y), batch_size):
        xb = normalize(x[start : start + batch_size]).contiguous(memory_format=memory_format)
        yb = y[start : start + batch_size]
        with autocast():
            logits = model(xb).float()
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        pred = logits.topk(k, dim=1).indices
        top1 += (pred[:, 0] == yb).sum()
        topk += (pred == yb[:, None]).any(dim=1).sum()
    n = len(y)
    return loss_sum.item() / n, 1 - top1.item() / n, 1 - topk.item() / n


def fit(
    model: nn.Module,
    data: Splits,
    recipe: Recipe = Recipe(),
    *,
    device: str = "auto",
    precision: str = "auto",
    compile: bool | str = False,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochMetrics, Callable[[], dict[str, Any]]], bool | None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``data`` with ``recipe``; returns the per-epoch history.

    ``on_epoch(metrics, state)`` runs after each epoch; ``state()`` returns the full training
    state for a checkpoint, and a true return value stops training. ``resume`` is such a state:
    training continues from the epoch after it, with exactly the metrics of an unbroken run.
    """
    recipe.validate()
    fit_started = time.perf_counter()
    if recipe.val_fraction and data.val_x is None:
        data = data.split_validation(recipe.val_fraction)
    dev = resolve_device(device)
    mode_ = _choose_mode(precision, resume, dev, model, data, recipe)
    prec = mode_.precision
    bf16 = prec == "bf16"
    memory_format = torch.channels_last if mode_.channels_last else torch.contiguous_format
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"  # set each fit: a worker's trials differ

    model = model.to(dev, memory_format=memory_format)
    optimizer = make_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.lr_step, gamma=recipe.lr_gamma)
    loader_rng = torch.Generator().manual_seed(recipe.seed)
    seed_everything(recipe.seed)  # dropout draws from the global generator
    result = FitResult(device=str(dev), precision=prec, channels_last=mode_.channels_last)
    if resume is not None:
        _restore(resume, model, optimizer, scheduler, loader_rng, dev)
        result.history = [EpochMetrics(**m) for m in resume["history"]]

    batches, (test_x, test_y), val = _on_device(data, dev, recipe.batch_size, loader_rng, memory_format)

    autocast = functools.partial(torch.autocast, dev.type, dtype=torch.bfloat16, enabled=bf16)
    mode = compile_mode(compile, dev)
    step_model = torch.compile(model, mode=mode) if mode else model

    def state() -> dict[str, Any]:
        return _training_state(model, optimizer, scheduler, loader_rng, dev, recipe, mode_, result.history)

    result.setup_seconds = time.perf_counter() - fit_started
    for epoch in range(len(result.history) + 1, recipe.epochs + 1):
        started = time.perf_counter()
        train_loss, images = _train_epoch(
            model, step_model, batches, optimizer, autocast, epoch, should_stop=should_stop, on_step=on_step
        )
        train_seconds = time.perf_counter() - started
        test_loss, top1, top5 = evaluate(model, test_x, test_y, recipe.eval_batch_size, autocast, memory_format)
        val_loss = val_top1 = val_top5 = None
        if val is not None:
            val_loss, val_top1, val_top5 = evaluate(model, *val, recipe.eval_batch_size, autocast, memory_format)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=train_loss,
            test_loss=test_loss,
            top1_error=top1,
            top5_error=top5,
            lr=lr,
            epoch_seconds=time.perf_counter() - started,
            images_per_s=images / train_seconds,
            val_loss=val_loss,
            val_top1_error=val_top1,
            val_top5_error=val_top5,
        )
        result.history.append(metrics)
        if on_epoch is not None and on_epoch(metrics, state):
            break
    return result


def _on_device(data: Splits, dev: torch.device, batch_size: int, loader_rng, memory_format):
    """The splits on the training device: shuffled training batches, the test split, the
    validation split (None without one)."""
    train_x, train_y = data.train_x.to(dev), data.train_y.to(dev)
    test = data.test_x.to(dev), data.test_y.to(dev)
    val = (data.val_x.to(dev), data.val_y.to(dev)) if data.val_x is not None else None
    channels_last = memory_format == torch.channels_last
    loader = BatchLoader(
        train_x,
        train_y,
        batch_size,
        shuffle=True,
        hflip=data.info.hflip,
        generator=loader_rng,
        channels_last=channels_last,
    )
    return loader, test, val


def _choose_mode(precision: str, resume, dev: torch.device, model, data: Splits, recipe: Recipe) -> Mode:
    if precision == "auto" and resume is not None and "mode" in resume:
        return Mode(**resume["mode"])  # the attempt that wrote the checkpoint measured it: same numbers
    total_steps = recipe.epochs * math.ceil(len(data.train_y) / recipe.batch_size)
    return resolve_mode(precision, dev, model, data.info.shape, recipe.batch_size, total_steps)


def _training_state(
    model, optimizer, scheduler, loader_rng, dev, recipe: Recipe, mode: Mode, history
) -> dict[str, Any]:
    """Everything a resumed fit needs to continue exactly (a checkpoint's content)."""
    rng = {"loader": loader_rng.get_state(), "torch": torch.get_rng_state()}
    if dev.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(dev)
    return {
        "model": cpu_copy(model.state_dict()),
        "optimizer": cpu_copy(optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "epoch": len(history),
        "recipe": recipe.to_dict(),
        "mode": asdict(mode),
        "history": [asdict(m) for m in history],
    }


def _restore(resume: dict[str, Any], model, optimizer, scheduler, loader_rng, dev: torch.device) -> None:
    """Put a checkpoint's state back: weights, optimizer, schedule and every random generator."""
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    loader_rng.set_state(resume["rng"]["loader"])
    torch.set_rng_state(resume["rng"]["torch"])
    if dev.type == "cuda" and "cuda" in resume["rng"]:
        torch.cuda.set_rng_state(resume["rng"]["cuda"], dev)


def _train_epoch(
    model, step_model, batches, optimizer, autocast, epoch: int, should_stop, on_step
) -> tuple[float, int]:
    """One pass over the training batches; the mean training loss and the images seen."""
    model.train()
    losses: list[torch.Tensor] = []
    sizes: list[int] = []
    for step, (xb, yb) in enumerate(batches, start=1):
        if should_stop is not None and should_stop():
            raise Interrupted(epoch - 1)
        # A partial last batch (50,000 = 781 x 64 + 16) runs eagerly: through the compiled
        # model its new shape would recompile (and re-record CUDA graphs) every epoch.
        forward = step_model if len(yb) == batches.batch_size else model
        loss = train_step(forward, optimizer, xb, yb, autocast())
        losses.append(loss.detach())
        sizes.append(len(yb))
        # Checking every step would sync the GPU each step; every 50 is cheap and still early.
        if step % 50 == 0 or step == len(batches):
            _check_finite(losses, epoch)
        if on_step is not None:
            on_step(step, len(batches))
    weights = torch.tensor(sizes, device=losses[0].device)
    return (torch.stack(losses) * weights).sum().item() / sum(sizes), sum(sizes)


def _check_finite(losses: list[torch.Tensor], epoch: int) -> None:
    stacked = torch.stack(losses)
    if not bool(torch.isfinite(stacked).all()):
        step = int((~torch.isfinite(stacked)).nonzero()[0, 0]) + 1
        raise NonFiniteLoss(epoch, step, float(stacked[step - 1]))
