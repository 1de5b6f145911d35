"""Issue 15's benchmarks: the memory budget, and NoiseTunnel against Captum's.

    python benchmarks/memory_and_noise.py [--steps 1000] [--skip-memory] [--skip-noise] [--rounds 3]

1. Memory: VGG16 (random init, float32) at 224 px, one picture, ``n_steps`` (default 1000), run by
   IntegratedGradients and LayerConductance("features.28") with default arguments
   (``internal_batch_size="auto"``) and with an explicit ``internal_batch_size`` (the old way to bound
   memory), each in a fresh child process: its peak RSS (``ru_maxrss``) and the attribution's time. The
   default before this change was one chunk of all 1000 rows (~60 GB for IG: the process dies), so it
   is not run; its footprint is estimated from the measured cost per row instead.
2. NoiseTunnel(IntegratedGradients): 10 samples x 50 steps, ResNet-18 (random init, float32) at 64 px,
   batch 4, against Captum's NoiseTunnel(IntegratedGradients) with the same seed (the same noise: the
   maps must agree), side by side, one warm-up and the median of ``--rounds`` rounds.

Threads are fixed (``torch.set_num_threads``, default: the machine's cores). Writes
``results/issue15/memory_and_noise.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, imagenet_pictures, side_by_side  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "issue15"


def child(method: str, internal_batch_size: str, steps: int, threads: int) -> None:
    """One run in this (fresh) process; prints one JSON line."""
    import attrib
    from attrib import memory

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    x = imagenet_pictures(1, 224)
    ibs: int | str | None = int(internal_batch_size) if internal_batch_size.isdigit() else internal_batch_size
    sizes: list[int] = []
    plan_init = memory.ChunkPlan.__init__

    def spy(self, *args, **kwargs):  # record the chunk sizes the plan hands out
        plan_init(self, *args, **kwargs)
        self.sizes = sizes

    memory.ChunkPlan.__init__ = spy  # type: ignore[method-assign]
    start = time.perf_counter()
    if method == "ig":
        res = attrib.IntegratedGradients(model).attribute(x, target=3, n_steps=steps, internal_batch_size=ibs)
        delta = float(res.delta.abs().max())
    else:
        res = attrib.LayerConductance(model, "features.28").attribute(x, target=3, n_steps=steps, internal_batch_size=ibs)
        delta = float(res.delta["features.28"].abs().max())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"method": method, "internal_batch_size": internal_batch_size, "n_steps": steps, "seconds": seconds,
                      "peak_rss_gb": peak / 2**30, "chunks": len(sizes), "largest_chunk": max(sizes) if sizes else None,
                      "first_chunk": sizes[0] if sizes else None, "abs_delta": delta,
                      "available_gb_at_start": memory.available_memory(torch.device("cpu")) / 2**30}))


def memory_runs(steps: int, threads: int, configs: list[tuple[str, str]], earlier: list[dict]) -> list[dict]:
    """Run ``configs`` ((method, internal_batch_size) pairs); rows of other configs are kept from ``earlier``."""
    rows = [row for row in earlier if (row["method"], row["internal_batch_size"]) not in configs]
    for method, ibs in configs:
        if True:
            out = subprocess.run([sys.executable, __file__, "--child", method, ibs, str(steps), str(threads)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                rows.append({"method": method, "internal_batch_size": ibs, "error": out.stderr[-2000:]})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    order = {(m, b): i for i, (m, b) in enumerate(CONFIGS)}
    return sorted(rows, key=lambda row: order.get((row["method"], row["internal_batch_size"]), 99))


CONFIGS = [("ig", "auto"), ("ig", "32"), ("conductance", "auto"), ("conductance", "32")]


def noise_runs(rounds: int) -> dict:
    import warnings

    from captum import attr as captum

    import attrib

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = imagenet_pictures(4, 64)
    options = dict(nt_type="smoothgrad", nt_samples=10, stdevs=0.2, target=3, n_steps=50)

    def ours():
        torch.manual_seed(7)
        return attrib.NoiseTunnel(attrib.IntegratedGradients(model)).attribute(x, **options).attributions

    def ours_one_chunk():
        torch.manual_seed(7)
        return attrib.NoiseTunnel(attrib.IntegratedGradients(model)).attribute(x, internal_batch_size=None, **options).attributions

    def theirs():
        torch.manual_seed(7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return captum.NoiseTunnel(captum.IntegratedGradients(model)).attribute(x, **options)

    timed = side_by_side({"attrib (auto)": ours, "attrib (one chunk)": ours_one_chunk, "captum": theirs}, rounds, "cpu")
    reference = timed["captum"][2]
    out = {name: {"median_s": t, "runs_s": runs, "max_rel_diff_vs_captum": float((res - reference).abs().max() / reference.abs().max())}
           for name, (t, runs, res) in timed.items()}
    print(out, flush=True)
    return out


def markdown(report: dict) -> str:
    lines = [f"# Issue 15 benchmarks\n\nMachine: {report['machine']}; torch {report['torch']}; threads {report['threads']}.\n"]
    if report.get("memory"):
        lines += ["## Memory budget: VGG16 224 px, 1 picture, n_steps = %d, float32\n" % report["n_steps"],
                  "Each row is a fresh process; peak RSS is the process's ru_maxrss (model, input and all).\n",
                  "| method | internal_batch_size | peak RSS (GB) | time (s) | chunks | first / largest chunk | max abs delta |",
                  "|---|---|---|---|---|---|---|"]
        for row in report["memory"]:
            if "error" in row:
                lines.append(f"| {row['method']} | {row['internal_batch_size']} | failed | | | | |")
                continue
            lines.append(f"| {row['method']} | {row['internal_batch_size']} | {row['peak_rss_gb']:.2f} | {row['seconds']:.1f} | "
                         f"{row['chunks']} | {row['first_chunk']} / {row['largest_chunk']} | {row['abs_delta']:.3g} |")
    if report.get("noise"):
        lines += ["\n## NoiseTunnel(IntegratedGradients), 10 samples x 50 steps, ResNet-18 64 px, batch 4, float32\n",
                  f"Same seed in both, so the same noise; median of {report['rounds']} rounds after one warm-up, side by side.\n",
                  "| implementation | median (s) | runs (s) | max relative difference to Captum |", "|---|---|---|---|"]
        for name, row in report["noise"].items():
            runs = ", ".join(f"{r:.2f}" for r in row["runs_s"])
            lines.append(f"| {name} | {row['median_s']:.2f} | {runs} | {row['max_rel_diff_vs_captum']:.2g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-noise", action="store_true")
    parser.add_argument("--configs", default=",".join(f"{m}:{b}" for m, b in CONFIGS),
                        help="memory runs to do, e.g. ig:auto,conductance:auto (the others keep their saved rows)")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))
        return
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "memory_and_noise.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report.update({"machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()}", "torch": torch.__version__,
                   "threads": args.threads, "n_steps": args.steps, "rounds": args.rounds})
    if not args.skip_memory:
        configs = [tuple(c.split(":")) for c in args.configs.split(",")]
        report["memory"] = memory_runs(args.steps, args.threads, configs, report.get("memory", []))  # type: ignore[arg-type]
    if not args.skip_noise:
        report["noise"] = noise_runs(args.rounds)
    path.write_text(json.dumps(report, indent=2))
    (RESULTS / "memory_and_noise.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
