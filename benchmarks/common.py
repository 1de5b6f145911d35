"""Helpers shared by the benchmark scripts: machine facts, interleaved timing, peak memory."""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def side_by_side(fns: dict, repeats: int, device: str, warmup: bool = True) -> dict:
    """{name: (median seconds, all times, last result)}: one warm-up call each, then ``repeats``
    rounds calling every function in turn, so drift in the machine's speed hits all of them alike."""
    if warmup:
        for fn in fns.values():
            fn()
    runs, results = {name: [] for name in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            results[name] = fn()
            sync(device)
            runs[name].append(time.perf_counter() - start)
    return {name: (statistics.median(runs[name]), runs[name], results[name]) for name in fns}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def imagenet_pictures(batch: int = 1, size: int = 224, device: str = "cpu") -> torch.Tensor:
    """Uniform random pixels (seed 2) in ImageNet-normalised space, the benchmarks' shared input."""
    pixels = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    return ((pixels - IMAGENET_MEAN) / IMAGENET_STD).to(device)


def device_label(device: str) -> str:
    """The GPU's name, or the CPU model, for the results' "device" field."""
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU: {cpu_model()}"


def result_file(results: Path, stem: str, device: str) -> Path:
    """``stem.json`` on CPU, ``stem_cuda.json`` (etc.) on an accelerator."""
    return results / (f"{stem}.json" if device == "cpu" else f"{stem}_{device.split(':')[0]}.json")


def limit_fn(model, x: torch.Tensor, target: int):
    """One plain forward + backward to the input with the parameters frozen: the floor every
    gradient-based method is measured against."""
    def limit():
        for param in model.parameters():
            param.requires_grad_(False)
        try:
            probe = x.clone().requires_grad_(True)
            return torch.autograd.grad(model(probe)[:, target].sum(), probe)[0]
        finally:
            for param in model.parameters():
                param.requires_grad_(True)
    return limit
