"""Dataset-scale runs: examples per second with 1 and 2 processes on this machine, and an estimate for the
ImageNet validation set.

1. The embedded digits set (1797 examples) with the digits CNN: conductance of its 4 convolutions in one
   call per batch, 32 steps, batch 32, shards of 256, per-channel sums only (``--no-maps``), no summary.
   Each configuration runs the whole ``attrib run`` command (start-up included) 3 times into a fresh
   folder; the table gives the median of the run's own time (``DatasetRun.seconds``: sharding, compute,
   writing) and of the command's wall time. Configurations: 1 process with 2 threads, 1 process with
   1 thread, 2 processes under torchrun with 1 thread each (gloo). The machine has 2 cores, so 2
   processes can at best match 1 process with 2 threads: the point is that sharding costs nothing and
   scales across machines, not that 2 cores become more.
2. VGG16 (random init) at 224 px: 13-layer conductance (every convolution), 50 steps, per example on this
   CPU (batch 1, 2 threads; 3 examples after a warm-up), and the estimate for 50,000 images: on this CPU,
   and on 8 GPUs from the H100 measurement committed in ``benchmarks/results/conductance_cuda.md``
   (13 layers in one call, batch 1: 63.7 ms), assuming perfect scaling over ranks (shards are independent;
   the only collective is the summary at the end). No GPU was lent for this issue, so nothing is measured
   on one here.

    python benchmarks/dataset_run.py [--repeats 3]

Writes benchmarks/results/issue18/dataset_run.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "issue18"
IMAGENET_VAL = 50_000
H100_13_LAYERS_MS = 63.7  # benchmarks/results/conductance_cuda.md, VGG16 224 px, batch 1, n_steps 50


def _command(processes: int, threads: int, out: Path) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    return launcher + ["-m", "attrib", "run", "--model", "digits", "--dataset", "digits", "--method", "conductance",
                       "--n-steps", "32", "--batch-size", "32", "--shard-size", "256", "--no-maps", "--no-summary",
                       "--threads", str(threads), "--quiet", "--out", str(out)]


def digits(repeats: int) -> list[dict]:
    rows = []
    for processes, threads in ((1, 2), (1, 1), (2, 1)):
        own, wall = [], []
        for _ in range(repeats):
            folder = Path(tempfile.mkdtemp(prefix="attrib-bench-"))
            try:
                env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
                started = time.perf_counter()
                done = subprocess.run(_command(processes, threads, folder / "run"), env=env, capture_output=True, text=True)
                wall.append(time.perf_counter() - started)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr)
                own.append(float(re.findall(r" in ([0-9.]+) s", done.stderr)[-1]))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        rows.append({"processes": processes, "threads_per_process": threads, "run_seconds": statistics.median(own),
                     "wall_seconds": statistics.median(wall), "runs": own, "walls": wall,
                     "examples_per_second": 1797 / statistics.median(own)})
        print(rows[-1], flush=True)
    return rows


def vgg16() -> dict:
    import torch
    import torchvision

    from attrib import LayerConductance

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    layers = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    method = LayerConductance(model, layers)
    x = torch.randn(4, 3, 224, 224)
    method.attribute(x[:1], target=3, n_steps=50)  # warm-up
    seconds = []
    for i in range(1, 4):
        started = time.perf_counter()
        method.attribute(x[i:i + 1], target=3, n_steps=50)
        seconds.append(time.perf_counter() - started)
    per_example = statistics.median(seconds)
    return {"layers": len(layers), "cpu_seconds_per_example": per_example, "cpu_runs": seconds,
            "cpu_hours_for_imagenet_val": IMAGENET_VAL * per_example / 3600,
            "h100_ms_per_example": H100_13_LAYERS_MS,
            "gpu_hours_one_gpu": IMAGENET_VAL * H100_13_LAYERS_MS / 1000 / 3600,
            "gpu_minutes_8_gpus": IMAGENET_VAL * H100_13_LAYERS_MS / 1000 / 60 / 8,
            "filters_bytes_per_example": 8 * sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)),
            "maps_bytes_per_example": 4 * sum(_sizes(model, x[:1]).values())}


def _sizes(model, x) -> dict:
    import torch

    sizes = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=n: sizes.__setitem__(name, out[0].numel()))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return sizes


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version()}
    rows = digits(args.repeats)
    vgg = vgg16()
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "digits": rows, "vgg16": vgg, "repeats": args.repeats}
    (RESULTS / "dataset_run.json").write_text(json.dumps(result, indent=1))
    lines = ["# Dataset-scale runs: examples per second", "",
             f"Produced by `python benchmarks/dataset_run.py` on {machine['cpu']}, {machine['cores']} cores, torch "
             f"{machine['torch']}. Median of {args.repeats} runs of the whole `attrib run` command per configuration.", "",
             "## Digits (1797 examples): conductance of the 4 convolutions, 32 steps, batch 32, shards of 256, "
             "per-channel sums only", "",
             "| processes | threads each | run time (s) | examples / s | command wall time (s) |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['processes']} | {row['threads_per_process']} | {row['run_seconds']:.1f} | "
                     f"{row['examples_per_second']:.0f} | {row['wall_seconds']:.1f} |")
    lines += ["", "The run time is `attrib run`'s own (sharding, compute, writing and verifying shards); the wall time "
              "adds Python and torch start-up (and torchrun's rendezvous). This machine has 2 cores: two processes of one "
              "thread use the same cores as one process of two threads.", "",
              "## ImageNet validation set (50,000 images), 13-layer conductance of VGG16 at 224 px, 50 steps", "",
              "| | per example | 50,000 images |", "|---|---|---|",
              f"| this CPU, 1 process, 2 threads (measured, batch 1) | {vgg['cpu_seconds_per_example']:.2f} s | "
              f"{vgg['cpu_hours_for_imagenet_val']:.0f} h |",
              f"| one H100 (earlier measurement, `conductance_cuda.md`, batch 1) | {vgg['h100_ms_per_example']:.1f} ms | "
              f"{vgg['gpu_hours_one_gpu']:.2f} h |",
              f"| 8 H100s, one rank each (estimate: perfect scaling) | | {vgg['gpu_minutes_8_gpus']:.1f} min |", "",
              f"Storage: the per-channel sums are {vgg['filters_bytes_per_example'] / 1024:.0f} KB per example "
              f"({vgg['filters_bytes_per_example'] * IMAGENET_VAL / 1e9:.1f} GB for the set); the full maps of the 13 "
              f"layers would be {vgg['maps_bytes_per_example'] / 1e6:.0f} MB per example "
              f"({vgg['maps_bytes_per_example'] * IMAGENET_VAL / 1e12:.1f} TB), so a run of that size stores sums "
              "(`--no-maps`) or maps at a few layers. No GPU was lent while this issue was worked on: the GPU rows are "
              "an estimate from the earlier single-GPU measurement, not a measured multi-GPU run."]
    (RESULTS / "dataset_run.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
