"""The seed post's training loop, the baseline every training benchmark compares against.

The same GoogLeNet (sweeper's ``standard`` is the seed's) in fp32 NCHW; a CIFAR-style Dataset
of uint8 HWC images turned into PIL images and through
``Compose([RandomHorizontalFlip(), ToTensor(), Normalize((0.5,)*3, (0.5,)*3)])`` one image at a
time; a torch DataLoader with the seed's ``num_workers=2`` (``pin_memory`` on CUDA); Adadelta
lr 1.0; cross-entropy; the loss read every ``log_interval`` steps, as the seed prints it.

Used by benchmarks/train_throughput.py and benchmarks/gpu_check.py (both import it as a sibling
module: ``python benchmarks/x.py`` puts benchmarks/ on sys.path).
"""

from __future__ import annotations

import os
import resource
import time


def cpu_seconds(pids: list[int] = ()) -> float:
    """CPU time of this process (all its threads) plus that of ``pids`` (DataLoader workers)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident memory of another process (a DataLoader worker), MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        return None


def measure_seed(
    variant: str,
    batch_size: int,
    steps: int,
    warmup: int,
    num_workers: int = 2,
    *,
    splits=None,
    device: str | None = None,
    log_interval: int = 10,
    deadline: float | None = None,
) -> dict:
    """Images/s of the seed loop over ``steps`` steps after ``warmup`` untimed ones.

    ``splits``: the images (default: sweeper's synthetic set, CIFAR-100-shaped, just enough of it).
    ``deadline`` (time.monotonic()): stop timing there; the steps done so far count.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision import transforms
    from torchvision.datasets import VisionDataset

    from sweeper.data import synthetic
    from sweeper.models import build_model

    class CifarLike(VisionDataset):
        """torchvision.datasets.CIFAR100's __getitem__: uint8 HWC array -> PIL image -> transform."""

        def __init__(self, data: np.ndarray, targets: list[int], transform):
            super().__init__(root="", transform=transform)
            self.data, self.targets = data, targets

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, index: int):
            img, target = Image.fromarray(self.data[index]), self.targets[index]
            return self.transform(img), target

    device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if splits is None:
        splits = synthetic.load(num_train=batch_size * (warmup + steps), num_test=64)
    data = splits.train_x.permute(0, 2, 3, 1).contiguous().numpy()  # HWC, as CIFAR's pickles become
    transform = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    dataset = CifarLike(data, splits.train_y.tolist(), transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    torch.manual_seed(1)
    model = build_model(variant, splits.num_classes, splits.in_channels).to(device)  # fp32, NCHW
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    model.train()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    begun = time.perf_counter()
    batches = iter(loader)
    workers = [w.pid for w in getattr(batches, "_workers", [])]
    timed = 0
    for step in range(1, warmup + steps + 1):
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if step % log_interval == 0:
            loss.item()
        if step == warmup:
            sync()
            started, cpu_started = time.perf_counter(), cpu_seconds(workers)
        elif step > warmup:
            timed += 1
            if deadline is not None and time.monotonic() > deadline:
                break
    sync()
    seconds, cpu = time.perf_counter() - started, cpu_seconds(workers) - cpu_started
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if workers:  # while they still run (forked, so partly shared with this process)
        peak["loader_workers_peak_rss_mb"] = [vm_hwm_mb(pid) for pid in workers]
    if device.type == "cuda":
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    del batches
    return {
        "images_per_s": timed * batch_size / seconds,
        "timed_steps": timed,
        "timed_seconds": seconds,
        "warmup_s": started - begun,
        "cpu_seconds": cpu,
        "images_per_cpu_s": timed * batch_size / cpu,
        "device": str(device),
        "precision": "fp32",
        "memory_format": "NCHW",
        "num_workers": num_workers,
        "loss": loss.item(),
        **peak,
    }
