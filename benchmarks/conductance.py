"""Conductance and integrated gradients: attrib vs Captum, side by side in one run.

Random-init VGG16, 1x3x224x224, n_steps=50, threads fixed, one warm-up, median of >= 3 runs.
Peak memory: each case in a fresh subprocess, peak RSS (ru_maxrss) minus RSS after the model is built.
Writes benchmarks/results/conductance.json (updated after every section) and conductance.md.

    python benchmarks/conductance.py [--sections all|layers,one_layer,...] [--repeats 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision
from common import (
    cpu_model,
    device_label,
    peak_rss_mb,
    result_file,
    rss_mb,
    side_by_side,
    sync,
)

import attrib

warnings.filterwarnings("ignore", module="captum")
RESULTS = Path(__file__).resolve().parent / "results"
N_STEPS = 50
TARGET = 3
SECTIONS = ["layers", "one_layer", "neuron", "ig", "accuracy", "accuracy_seeds", "memory", "refine"]
SEEDS = 12


def vgg16(bias: str = "zero", device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    if bias == "random":
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for module in model.modules():
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.05 * torch.randn(module.bias.shape, generator=generator))
    return model.to(device)


SIZE = 224  # --size overrides it for a quick smoke run of the script
MAX_REFINE_STEPS = 512


def image(size: int | None = None, device: str = "cpu") -> torch.Tensor:
    size = size or SIZE
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2)).to(device)


def convs(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]


def captum_layer(model, name, x, method, n_steps=N_STEPS, **kw):
    from captum.attr import LayerConductance as CaptumLayerConductance

    # Captum's result keeps its autograd graph (requires_grad=True): detach it, or 13 of them pin ~80 GB
    return CaptumLayerConductance(model, dict(model.named_modules())[name]).attribute(
        x, target=TARGET, n_steps=n_steps, method=method, **kw
    ).detach()


def total(t):
    return float(t.double().sum())


# ----------------------------------------------------------------------------------------- sections

def section_layers(repeats, device):
    """All 13 conv layers: one attrib call vs Captum looped over the layers; numbers and completeness."""
    model, x = vgg16(device=device), image(device=device)
    layers = convs(model)
    with torch.no_grad():
        change = float(model(x)[0, TARGET] - model(torch.zeros_like(x))[0, TARGET])
    timings = side_by_side({
        "attrib": lambda: attrib.LayerConductance(model, layers).attribute(x, target=TARGET, n_steps=N_STEPS, method="riemann_trapezoid"),
        "attrib_stieltjes": lambda: attrib.LayerConductance(model, layers).attribute(x, target=TARGET, n_steps=N_STEPS),
        "captum": lambda: {n: captum_layer(model, n, x, "riemann_trapezoid") for n in layers},
    }, repeats, device)
    (ours_t, ours_all, ours), (default_t, default_all, default), (captum_t, captum_all, theirs) = (
        timings["attrib"], timings["attrib_stieltjes"], timings["captum"])
    per_layer = []
    for name in layers:
        diff = float((ours[name] - theirs[name].detach()).abs().max())
        per_layer.append({
            "layer": name,
            "captum_delta": total(theirs[name]) - change,
            "attrib_riemann_trapezoid_delta": float(ours.delta[name]),
            "attrib_stieltjes_trapezoid_delta": float(default.delta[name]),
            "max_abs_diff_vs_captum": diff,
            "max_rel_diff_vs_captum": diff / float(theirs[name].abs().max()),
        })
    return {
        "score_change": change,
        "attrib_seconds": ours_t, "attrib_runs": ours_all,
        "attrib_stieltjes_seconds": default_t, "attrib_stieltjes_runs": default_all,
        "captum_seconds": captum_t, "captum_runs": captum_all,
        "speedup": captum_t / ours_t, "target_speedup": 8.0,
        "per_layer": per_layer,
    }


def section_one_layer(repeats, device):
    model, x = vgg16(device=device), image(device=device)
    timings = side_by_side({
        "attrib": lambda: attrib.LayerConductance(model, "features.28").attribute(
            x, target=TARGET, n_steps=N_STEPS, method="riemann_trapezoid"),
        "captum": lambda: captum_layer(model, "features.28", x, "riemann_trapezoid"),
    }, repeats, device)
    (ours_t, ours_all, ours), (captum_t, captum_all, theirs) = timings["attrib"], timings["captum"]
    cases = ["attrib_one_layer", "captum_one_layer", "forward_one_layer", "attrib_one_layer_chunk17", "captum_one_layer_chunk17"]
    memory = {case: measure_memory(case, device) for case in cases}
    return {
        "attrib_seconds": ours_t, "attrib_runs": ours_all, "captum_seconds": captum_t, "captum_runs": captum_all,
        "time_ratio": ours_t / captum_t,
        "max_rel_diff_vs_captum": float((ours["features.28"] - theirs.detach()).abs().max() / theirs.detach().abs().max()),
        "peak_mb": memory, "memory_ratio": memory["attrib_one_layer"] / memory["captum_one_layer"],
    }


def neuron_limit(model, layer, x, filters, method):
    """The floor: one batched forward with a graph to the input, one backward to the layer,
    one backward from the layer to the input per filter."""
    alphas, weights = attrib.quadrature.weighted_rule(method, N_STEPS)
    module = dict(model.named_modules())[layer]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        batch = (alphas.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1) * x).requires_grad_(True)
        seen = {}
        handle = module.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out) or out.clone())
        out = model(batch)
        handle.remove()
        y = seen["y"]
        grad_y, = torch.autograd.grad(out[:, TARGET].sum(), y, retain_graph=True)
        maps = []
        for i, c in enumerate(filters):
            masked = torch.zeros_like(grad_y)
            masked[:, c] = grad_y[:, c]
            g, = torch.autograd.grad(y, batch, masked, retain_graph=i < len(filters) - 1)
            maps.append((g * weights.to(device=g.device, dtype=g.dtype).view(-1, 1, 1, 1)).sum(0) * x[0])
        return torch.stack(maps)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def section_neuron(repeats, device):
    from captum.attr import NeuronConductance as CaptumNeuronConductance

    model, x = vgg16(device=device), image(device=device)
    out = {}
    for layer in ["features.28", "features.10"]:
        scores = attrib.LayerConductance(model, layer).attribute(x, target=TARGET, n_steps=N_STEPS).filter_scores(layer, "max")
        filters = attrib.top_filters(scores[0], 10)[1].tolist()
        selectors = [(c, slice(None), slice(None)) for c in filters]
        method = "riemann_trapezoid"
        timings = side_by_side({
            "attrib": lambda: attrib.NeuronConductance(model, layer).attribute(
                x, selectors, target=TARGET, n_steps=N_STEPS, method=method),
            "limit": lambda: neuron_limit(model, layer, x, filters, method),
        }, repeats, device)
        (ours_t, ours_all, ours), (limit_t, limit_all, limit) = timings["attrib"], timings["limit"]
        # Captum: one call per filter; the ten calls are the repeated measurements of one call
        module = dict(model.named_modules())[layer]
        captum_calls = []
        for selector in [selectors[0]] + selectors:  # the first is a warm-up
            sync(device)
            start = time.perf_counter()
            CaptumNeuronConductance(model, module).attribute(x, selector, target=TARGET, n_steps=N_STEPS, method=method).detach()
            sync(device)
            captum_calls.append(time.perf_counter() - start)
        captum_calls = captum_calls[1:]
        out.setdefault("layers", {})[layer] = {
            "filters": filters,
            "attrib_seconds": ours_t, "attrib_runs": ours_all,
            "limit_seconds": limit_t, "limit_runs": limit_all, "ratio_to_limit": ours_t / limit_t, "target_ratio": 1.2,
            "captum_10_calls_seconds": sum(captum_calls), "captum_call_seconds": captum_calls,
            "speedup_vs_captum": sum(captum_calls) / ours_t,
            "max_rel_diff_vs_limit": float((ours.attributions[:, 0] - limit).abs().max() / limit.abs().max()),
        }
    return out


def section_ig(repeats, device):
    from captum.attr import IntegratedGradients as CaptumIG

    model, x = vgg16(device=device), image(device=device)
    method = "gausslegendre"
    alphas, _ = attrib.quadrature.weighted_rule(method, N_STEPS)

    def limit():
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            batch = (alphas.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1) * x).requires_grad_(True)
            return torch.autograd.grad(model(batch)[:, TARGET].sum(), batch)[0]
        finally:
            for p in model.parameters():
                p.requires_grad_(True)

    timings = side_by_side({
        "attrib": lambda: attrib.IntegratedGradients(model).attribute(x, target=TARGET, n_steps=N_STEPS, method=method),
        "limit": limit,
        "captum": lambda: CaptumIG(model).attribute(x, target=TARGET, n_steps=N_STEPS, method=method).detach(),
    }, max(repeats, 5), device)
    (ours_t, ours_all, ours), (limit_t, limit_all, _), (captum_t, captum_all, theirs) = (
        timings["attrib"], timings["limit"], timings["captum"])
    return {
        "attrib_seconds": ours_t, "attrib_runs": ours_all, "limit_seconds": limit_t, "limit_runs": limit_all,
        "captum_seconds": captum_t, "captum_runs": captum_all,
        "ratio_to_limit": ours_t / limit_t, "target_ratio_to_limit": 1.10, "ratio_to_captum": ours_t / captum_t,
        "attrib_delta": float(ours.delta[0]),
        "max_rel_diff_vs_captum": float((ours.attributions - theirs.detach()).abs().max() / theirs.detach().abs().max()),
    }


def section_accuracy(repeats, device):
    """(a) bias-free VGG16: stieltjes_trapezoid exact, Captum's left form misses a fixed share;
    (b) random biases: our completeness error vs Captum's riemann_trapezoid (attrib's riemann_trapezoid
    mode reproduces Captum's numbers; checked in the 'layers' section)."""
    out = {}
    for bias in ["zero", "random"]:
        model, x = vgg16(bias, device), image(device=device)
        layers = convs(model)
        ours = attrib.LayerConductance(model, layers).attribute(x, target=TARGET, n_steps=N_STEPS)
        left = attrib.LayerConductance(model, layers).attribute(x, target=TARGET, n_steps=N_STEPS, method="riemann_trapezoid")
        rows = [{"layer": n, "stieltjes_trapezoid_delta": float(ours.delta[n]), "captum_riemann_trapezoid_delta": float(left.delta[n])}
                for n in layers]
        ratios = [abs(r["stieltjes_trapezoid_delta"]) / abs(r["captum_riemann_trapezoid_delta"]) for r in rows]
        out[bias] = {
            "score_change": float(ours.outputs - ours.baseline_outputs), "per_layer": rows,
            "max_ratio": max(ratios), "median_ratio": statistics.median(ratios),
            "mean_abs_stieltjes": statistics.mean(abs(r["stieltjes_trapezoid_delta"]) for r in rows),
            "mean_abs_captum": statistics.mean(abs(r["captum_riemann_trapezoid_delta"]) for r in rows),
        }
    # the planning measurement: random-init alexnet (default init: biases non-zero), features.10, 2 images
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None).eval().to(device)
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)).to(device)
    ours = attrib.LayerConductance(model, "features.10").attribute(x, target=TARGET, n_steps=N_STEPS)
    left = attrib.LayerConductance(model, "features.10").attribute(x, target=TARGET, n_steps=N_STEPS, method="riemann_trapezoid")
    out["alexnet_features10"] = {
        "score_change": (ours.outputs - ours.baseline_outputs).tolist(),
        "stieltjes_trapezoid_delta": ours.delta["features.10"].tolist(),
        "captum_riemann_trapezoid_delta": left.delta["features.10"].tolist(),
    }
    return out


def section_accuracy_seeds(repeats, device):
    """The alexnet features.10 case over SEEDS random inits and image pairs: how often the
    stieltjes_trapezoid error is at most half of Captum's riemann_trapezoid error."""
    cases = []
    for seed in range(SEEDS):
        torch.manual_seed(100 + seed)
        model = torchvision.models.alexnet(weights=None).eval().to(device)
        x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(200 + seed)).to(device)
        run = attrib.LayerConductance(model, "features.10")
        ours = run.attribute(x, target=TARGET, n_steps=N_STEPS).delta["features.10"].abs().sum()
        left = run.attribute(x, target=TARGET, n_steps=N_STEPS, method="riemann_trapezoid").delta["features.10"].abs().sum()
        cases.append({"seed": seed, "stieltjes_trapezoid_abs_delta": float(ours), "captum_riemann_trapezoid_abs_delta": float(left)})
    ratios = sorted(c["stieltjes_trapezoid_abs_delta"] / c["captum_riemann_trapezoid_abs_delta"] for c in cases)
    return {"cases": cases, "median_ratio": ratios[len(ratios) // 2], "share_at_most_half": sum(r <= 0.5 for r in ratios) / len(ratios),
            "total_ratio": sum(c["stieltjes_trapezoid_abs_delta"] for c in cases) / sum(c["captum_riemann_trapezoid_abs_delta"] for c in cases)}


def section_memory(repeats, device):
    """Peak memory with internal_batch_size=32: n_steps=1000 vs 50 (VGG16 at 64 px to keep the
    1000-step run short; the chunk, not the resolution, is what bounds memory)."""
    return {case: measure_memory(case, device) for case in ["attrib_steps50", "attrib_steps1000", "captum_steps50", "captum_steps1000"]}


def section_refine(repeats, device):
    """Evaluations to reach a tolerance: bisect the worst steps vs uniform doubling (VGG16 with random
    biases at 64 px, all 13 conv layers). Refinement keeps every node's activations and gradients
    (about 9 MB per node here), so both stop at MAX_REFINE_STEPS."""
    model, x = vgg16("random", device), image(64, device)
    layers = convs(model)
    run = attrib.LayerConductance(model, layers)
    coarse = run.attribute(x, target=TARGET, n_steps=8)
    change = abs(float(coarse.outputs - coarse.baseline_outputs))
    out = {"max_steps": MAX_REFINE_STEPS, "score_change": change}
    for tolerance_share in [1e-2, 1e-3, 1e-4]:
        tolerance = tolerance_share * change
        entry = {"tolerance": tolerance, "tolerance_share_of_score_change": tolerance_share}
        for refine in ["bisect", "double"]:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = run.attribute(x, target=TARGET, n_steps=8, tolerance=tolerance, refine=refine, max_steps=MAX_REFINE_STEPS)
            entry[refine] = {
                "evaluations": res.evaluations, "converged": res.info["converged"], "seconds": time.perf_counter() - start,
                "worst_abs_delta": max(float(d.abs().max()) for d in res.delta.values()),
            }
        out[str(tolerance_share)] = entry
    return out


# ------------------------------------------------------------------------------------ memory cases

def memory_case(case: str, device: str) -> None:
    """Run one case in this (fresh) process and print its peak memory in MB above the post-setup level."""
    size = SIZE if "one_layer" in case else 64
    model, x = vgg16(device=device), image(size, device)
    steps = 1000 if case.endswith("steps1000") else N_STEPS
    chunk = (17 if case.endswith("chunk17") else None) if "one_layer" in case else 32
    layer = "features.28"

    def run(n_steps):
        if case.startswith("forward"):  # the floor: the same rows through the model, no graph, nothing kept
            with torch.no_grad():
                model(x.expand(n_steps + 1, -1, -1, -1).contiguous())
        elif case.startswith("attrib"):
            attrib.LayerConductance(model, layer).attribute(x, target=TARGET, n_steps=n_steps, method="riemann_trapezoid",
                                                            internal_batch_size=chunk)
        else:
            captum_layer(model, layer, x, "riemann_trapezoid", n_steps=n_steps, internal_batch_size=chunk)

    # warm-up with one chunk of the same shape: torch/oneDNN keep ~20 MB of caches after a first pass,
    # whatever n_steps is; the peak measured is the steady state
    run(chunk - 1 if chunk else 1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        before = rss_mb()
    run(steps)
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = peak_rss_mb() - before
    print(json.dumps({"peak_mb": peak}))


def measure_memory(case: str, device: str) -> float:
    # Every allocation above 64 KiB gets its own mapping, returned to the OS when freed, so RSS follows
    # live tensors instead of what glibc's heap keeps after fragmentation (same for attrib and Captum).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, __file__, "--memory-case", case, "--device", device, "--size", str(SIZE)],
                          capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


# ------------------------------------------------------------------------------------------- report

def seconds(value: float) -> str:
    """Seconds with enough digits for GPU timings (milliseconds under one second)."""
    return f"{value:.1f} s" if value >= 1 else f"{value * 1000:.1f} ms"


def write_markdown(results: dict, path: Path) -> None:
    m = results["machine"]
    lines = [
        f"# Conductance benchmark ({m['device']})",
        "",
        f"Random-init VGG16, 1×3×{m['size']}×{m['size']}, n_steps={N_STEPS}, target {TARGET}; {m['cpu']}, {m['threads']} threads, "
        f"torch {m['torch']}, captum {m['captum']}; median of {m['repeats']} runs after a warm-up. "
        "Generated by `benchmarks/conductance.py`.",
        "",
        "| measurement | attrib | Captum / limit | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]

    def row(name, ours, other, ratio, target, met):
        lines.append(f"| {name} | {ours} | {other} | {ratio} | {target} | {'yes' if met else '**no**'} |")

    r = results.get("layers")
    if r:
        row("13 conv layers: one attrib call vs Captum looped (riemann_trapezoid)", seconds(r['attrib_seconds']),
            seconds(r['captum_seconds']), f"{r['speedup']:.1f}× faster", "≥ 8×", r["speedup"] >= 8)
        worst = max(p["max_rel_diff_vs_captum"] for p in r["per_layer"])
        lines.append(f"| same numbers as Captum (largest relative difference over 13 layers) | | | {worst:.1e} | float32 | |")
        lines.append(f"| 13 layers, attrib's default stieltjes_trapezoid | {seconds(r['attrib_stieltjes_seconds'])} | | | | |")
    r = results.get("one_layer")
    if r:
        row("one layer (features.28): time", seconds(r['attrib_seconds']), seconds(r['captum_seconds']),
            f"{r['time_ratio']:.2f}", "≤ 1", r["time_ratio"] <= 1)
        mb = r["peak_mb"]
        row("one layer (features.28): peak memory", f"{mb['attrib_one_layer']:.0f} MB",
            f"{mb['captum_one_layer']:.0f} MB", f"{r['memory_ratio']:.2f}", "≤ 0.5", r["memory_ratio"] <= 0.5)
        if "forward_one_layer" in mb:
            lines.append(f"| the same 51 rows through the model under no_grad, nothing kept (the floor without chunking) "
                         f"| {mb['forward_one_layer']:.0f} MB | | {mb['forward_one_layer'] / mb['captum_one_layer']:.2f} of Captum | | |")
            ratio = mb["attrib_one_layer_chunk17"] / mb["captum_one_layer_chunk17"]
            row("one layer, both with internal_batch_size=17 (3 chunks): peak memory", f"{mb['attrib_one_layer_chunk17']:.0f} MB",
                f"{mb['captum_one_layer_chunk17']:.0f} MB", f"{ratio:.2f}", "≤ 0.5", ratio <= 0.5)
    r = results.get("neuron")
    if r:
        for layer, e in r["layers"].items():
            row(f"NeuronConductance, top-10 filters of {layer}: vs its limit", seconds(e['attrib_seconds']),
                seconds(e['limit_seconds']) + " (limit)", f"{e['ratio_to_limit']:.2f}", "≤ 1.2", e["ratio_to_limit"] <= 1.2)
            row(f"NeuronConductance, top-10 filters of {layer}: vs 10 Captum calls", seconds(e['attrib_seconds']),
                seconds(e['captum_10_calls_seconds']), f"{e['speedup_vs_captum']:.1f}× faster", "> 1×", e["speedup_vs_captum"] > 1)
    r = results.get("ig")
    if r:
        row("IntegratedGradients vs n_steps forward+backward (limit)", seconds(r['attrib_seconds']),
            seconds(r['limit_seconds']) + " (limit)", f"{r['ratio_to_limit']:.3f}", "≤ 1.10", r["ratio_to_limit"] <= 1.10)
        row("IntegratedGradients vs Captum", seconds(r['attrib_seconds']), seconds(r['captum_seconds']),
            f"{r['ratio_to_captum']:.3f}", "≤ 1", r["ratio_to_captum"] <= 1)
    r = results.get("memory")
    if r:
        row("peak memory, internal_batch_size=32: n_steps=1000 vs 50 (64 px)", f"{r['attrib_steps1000']:.0f} MB vs {r['attrib_steps50']:.0f} MB",
            f"Captum: {r['captum_steps1000']:.0f} MB vs {r['captum_steps50']:.0f} MB", f"{r['attrib_steps1000'] / r['attrib_steps50']:.2f}",
            "≤ 1 + margin", r["attrib_steps1000"] <= 1.1 * r["attrib_steps50"] + 20)
    r = results.get("accuracy")
    if r:
        z, b = r["zero"], r["random"]
        row("bias-free VGG16: worst abs(delta) / abs(F(x)−F(x')), stieltjes_trapezoid vs Captum's riemann_trapezoid",
            f"{max(abs(p['stieltjes_trapezoid_delta']) for p in z['per_layer']) / abs(z['score_change']):.1e}",
            f"{max(abs(p['captum_riemann_trapezoid_delta']) for p in z['per_layer']) / abs(z['score_change']):.1e}",
            "", "exact (float32)", max(abs(p['stieltjes_trapezoid_delta']) for p in z['per_layer']) <= 1e-5 * abs(z['score_change']))
        mean_ratio = b["mean_abs_stieltjes"] / b["mean_abs_captum"]
        row("VGG16 with random biases: mean abs(delta) over the 13 layers, ours vs Captum's riemann_trapezoid",
            f"{b['mean_abs_stieltjes']:.2e}", f"{b['mean_abs_captum']:.2e}", f"{mean_ratio:.2f}", "≤ 0.5", mean_ratio <= 0.5)
        a = r.get("alexnet_features10")
        if a:
            ours_abs = sum(abs(d) for d in a["stieltjes_trapezoid_delta"])
            theirs_abs = sum(abs(d) for d in a["captum_riemann_trapezoid_delta"])
            row("random-init alexnet features.10, 2 images: summed abs(delta), ours vs Captum's riemann_trapezoid",
                f"{ours_abs:.2e}", f"{theirs_abs:.2e}", f"{ours_abs / theirs_abs:.2f}", "≤ 0.5", ours_abs <= 0.5 * theirs_abs)
        seeds = results.get("accuracy_seeds")
        if seeds:
            row(f"the alexnet case over {len(seeds['cases'])} random inits and image pairs: summed abs(delta) ratio "
                f"(median per case {seeds['median_ratio']:.2f}; {seeds['share_at_most_half']:.0%} of cases ≤ 0.5)",
                f"{sum(c['stieltjes_trapezoid_abs_delta'] for c in seeds['cases']):.2e}",
                f"{sum(c['captum_riemann_trapezoid_abs_delta'] for c in seeds['cases']):.2e}",
                f"{seeds['total_ratio']:.2f}", "≤ 0.5", seeds["total_ratio"] <= 0.5)
        worst = max(b["per_layer"], key=lambda p: abs(p["stieltjes_trapezoid_delta"]) / abs(p["captum_riemann_trapezoid_delta"]))
        row(f"VGG16 with random biases: worst single layer ({worst['layer']}); median layer ratio {b['median_ratio']:.2f}",
            f"{abs(worst['stieltjes_trapezoid_delta']):.2e}", f"{abs(worst['captum_riemann_trapezoid_delta']):.2e}",
            f"{b['max_ratio']:.2f}", "≤ 0.5", b["max_ratio"] <= 0.5)
    r = results.get("refine")
    if r:
        for share, e in r.items():
            if not isinstance(e, dict):
                continue
            row(f"refinement to abs(delta) ≤ {share}·abs(F(x)−F(x')) (64 px, 13 layers, from 8 steps, at most "
                f"{r['max_steps']}): evaluations, bisect vs double",
                f"{e['bisect']['evaluations']}{'' if e['bisect']['converged'] else ' (not converged)'}",
                f"{e['double']['evaluations']}{'' if e['double']['converged'] else ' (not converged)'}",
                f"{e['bisect']['evaluations'] / e['double']['evaluations']:.2f}", "converged, fewer",
                e["bisect"]["converged"] and (e["bisect"]["evaluations"] < e["double"]["evaluations"] or not e["double"]["converged"]))
    for key in ["layers", "accuracy"]:
        r = results.get(key)
        if not r:
            continue
        if key == "layers":
            lines += ["", f"## Completeness per layer, bias-free VGG16 (F(x) − F(x') = {r['score_change']:.6f})", "",
                      "| layer | Captum delta | attrib delta (riemann_trapezoid) | attrib delta (stieltjes_trapezoid) | max rel. diff vs Captum |",
                      "|---|---|---|---|---|"]
            for p in r["per_layer"]:
                lines.append(f"| {p['layer']} | {p['captum_delta']:.3e} | {p['attrib_riemann_trapezoid_delta']:.3e} | "
                             f"{p['attrib_stieltjes_trapezoid_delta']:.3e} | {p['max_rel_diff_vs_captum']:.1e} |")
        else:
            b = r["random"]
            lines += ["", f"## Completeness per layer, VGG16 with random biases (F(x) − F(x') = {b['score_change']:.6f})", "",
                      "| layer | Captum's riemann_trapezoid delta | stieltjes_trapezoid delta | ratio |", "|---|---|---|---|"]
            for p in b["per_layer"]:
                lines.append(f"| {p['layer']} | {p['captum_riemann_trapezoid_delta']:.3e} | {p['stieltjes_trapezoid_delta']:.3e} | "
                             f"{abs(p['stieltjes_trapezoid_delta']) / abs(p['captum_riemann_trapezoid_delta']):.2f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sections", default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-case")
    parser.add_argument("--out", default=None)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON")
    args = parser.parse_args()
    global SIZE
    SIZE = args.size
    torch.set_num_threads(args.threads)
    if args.memory_case:
        memory_case(args.memory_case, args.device)
        return
    if args.report_only:
        out = Path(args.out) if args.out else RESULTS / "conductance.json"
        write_markdown(json.loads(out.read_text()), out.with_suffix(".md"))
        return
    import captum

    out = Path(args.out) if args.out else result_file(RESULTS, "conductance", args.device)
    results = json.loads(out.read_text()) if out.exists() else {}
    device_name = device_label(args.device)
    results["machine"] = {
        "device": device_name, "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "captum": captum.__version__, "python": platform.python_version(),
        "repeats": args.repeats, "size": SIZE,
    }
    sections = SECTIONS if args.sections == "all" else args.sections.split(",")
    for name in sections:
        start = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        results[name] = globals()[f"section_{name}"](args.repeats, args.device)
        results[name]["section_seconds"] = time.perf_counter() - start
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        write_markdown(results, out.with_suffix(".md"))
        print(f"[{name}] done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
