"""Exact conductance and IG (``method="exact"``) against the Riemann rules: per-neuron error, regions, time.

For each example: the exact layer conductance of several layers and the exact integrated gradients (the
reference: no quadrature error), then every rule (ours: ``stieltjes_trapezoid``; Captum's five) at n_steps
8..1024. The per-neuron error of a map is ``max_j |C_j - C_j_exact| / max_j |C_j_exact|`` (the worst unit,
relative to the largest exact attribution of that layer), so "1%" means no neuron is off by more than 1% of the
layer's largest conductance. The table gives its median over the examples, the n_steps each rule needs for 1%
and 0.1%, the regions, and the time of the exact run against ``n_steps=50``.

    python benchmarks/exact.py --model digits --examples 4
    python benchmarks/exact.py --model vgg16 --size 32 --examples 1 --dtype float32
    python benchmarks/exact.py --model vgg16 --estimate    # lower bound on VGG16's regions, and the time exact would take

Writes benchmarks/results/issue19/exact_<model>.{json,md} and exact_<model>.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import attrib  # noqa: E402
from attrib.models.digits import load_digits_model, preprocess, sample_digits  # noqa: E402
from common import cpu_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "issue19"
RULES = ("stieltjes_trapezoid", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")
STEPS = (8, 16, 32, 64, 128, 256, 512, 1024)
TARGETS = (0.01, 0.001)


def with_random_biases(model: nn.Module, seed: int = 1) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model


def setup(name: str, size: int, examples: int, dtype: torch.dtype):
    """(model, inputs, baselines, targets, layers, description)."""
    if name == "digits":
        model = load_digits_model().to(dtype).eval()
        raw, labels = sample_digits()
        x = preprocess(raw[:examples]).to(dtype)
        blank = preprocess(torch.zeros_like(raw[:examples])).to(dtype)
        layers = ["features.2", "features.7", "classifier.0"]
        return model, x, blank, labels[:examples], layers, "trained digits CNN (shipped weights), 32 px, baseline: the blank digit"
    torch.manual_seed(0)
    model = with_random_biases(torchvision.models.vgg16(weights=None)).to(dtype).eval()
    x = torch.randn(examples, 3, size, size, dtype=dtype)
    layers = ["features.2", "features.14", "features.28"]
    return model, x, torch.zeros_like(x), 3, layers, f"VGG16, random init with random biases (N(0, 0.1²)), {size} px, baseline 0"


def neuron_error(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per example: max_j |approx_j - exact_j| / max_j |exact_j|."""
    diff = (approx - exact).flatten(1).abs().amax(1)
    return diff / exact.flatten(1).abs().amax(1).clamp_min(torch.finfo(exact.dtype).tiny)


def estimate_vgg16(sizes: tuple[int, ...] = (224, 64, 32), threads: int = 2) -> None:
    """Where exact mode cannot run here: a lower bound on VGG16's regions (units of its first ReLU whose input
    changes sign between the baseline 0 and the input: each is a breakpoint of the path, and later layers add more)
    and the time it would take at the measured cost of one region (a forward+backward at the midpoint and a forward
    at each end for layer conductance), float32 on this CPU."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = with_random_biases(torchvision.models.vgg16(weights=None)).eval()
    rows = []
    for size in sizes:
        x = torch.randn(1, 3, size, size)
        found = []
        handle = model.features[1].register_forward_hook(lambda module, args, out: found.append(args[0].clone()))
        with torch.no_grad():
            model(torch.cat([x, torch.zeros_like(x)]))
        handle.remove()
        z = found[0]
        crossings = int(((z[0] > 0) != (z[1] > 0)).sum())
        point = x.clone().requires_grad_(True)
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            model(point)[0, 3].backward()
            with torch.no_grad():
                model(torch.cat([x, x]))
            timings.append(time.perf_counter() - started)
        per_region = statistics.median(timings)
        rows.append({"size": size, "first_relu_units": z[0].numel(), "crossings_first_relu": crossings,
                     "seconds_per_region": per_region, "hours_lower_bound": crossings * per_region / 3600})
        print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "exact_vgg16_estimate.json").write_text(json.dumps({"machine": f"{cpu_model()}, {threads} threads",
                                                                    "torch": torch.__version__, "rows": rows}, indent=1))
    lines = ["# Exact mode on VGG16 with random biases: a lower bound on the regions, and the time it would take", "",
             f"Produced by `python benchmarks/exact.py --model vgg16 --estimate` ({cpu_model()}, {threads} threads, float32, "
             f"torch {torch.__version__}). Random init with biases N(0, 0.1²), one random input, baseline 0. Every unit of "
             "the first ReLU whose input changes sign along the path is a breakpoint, so their number bounds the regions "
             "from below (every later ReLU and max pool adds more). Time per region: one forward+backward at the midpoint "
             "and a forward at both ends (layer conductance), median of 3.", "",
             "| size | first ReLU units | of them crossing 0 (regions ≥) | s per region | exact run ≥ (hours) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} px | {r['first_relu_units']:,} | {r['crossings_first_relu']:,} | {r['seconds_per_region']:.3f} | "
                     f"{r['hours_lower_bound']:.1f} |")
    lines += ["", "At 224 px the path crosses more than a million linear regions from the first layer alone, so exact "
              "conductance on VGG16 at 224 px is beyond this CPU (and beyond the 15 minutes a lent GPU would give); the "
              "per-neuron error tables for Riemann rules use the digits CNN, where the exact sums run.", ""]
    (RESULTS / "exact_vgg16_estimate.md").write_text("\n".join(lines))


def main() -> None:
    if "--estimate" in sys.argv:
        estimate_vgg16()
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("digits", "vgg16"), default="digits")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, x, base, target, layers, description = setup(args.model, args.size, args.examples, dtype)
    keys = layers + ["input (IG)"]
    per_example = []
    for e in range(x.shape[0]):
        xe, be = x[e:e + 1], base[e:e + 1]
        te = target if isinstance(target, int) else target[e:e + 1]
        started = time.perf_counter()
        exact_lc = attrib.LayerConductance(model, layers).attribute(xe, target=te, baselines=be, method="exact")
        lc_seconds = time.perf_counter() - started
        started = time.perf_counter()
        exact_ig = attrib.IntegratedGradients(model).attribute(xe, target=te, baselines=be, method="exact")
        ig_seconds = time.perf_counter() - started
        exact = {**{name: exact_lc[name] for name in layers}, "input (IG)": exact_ig.attributions}
        change = float(exact_lc.outputs - exact_lc.baseline_outputs)
        started = time.perf_counter()
        attrib.LayerConductance(model, layers).attribute(xe, target=te, baselines=be, n_steps=50)
        default_seconds = time.perf_counter() - started
        errors: dict[str, dict[str, dict[str, float]]] = {rule: {k: {} for k in keys} for rule in RULES}
        completeness: dict[str, dict[str, float]] = {rule: {} for rule in RULES}
        for rule in RULES:
            for n in STEPS:
                lc = attrib.LayerConductance(model, layers).attribute(xe, target=te, baselines=be, n_steps=n, method=rule)
                ig = attrib.IntegratedGradients(model).attribute(xe, target=te, baselines=be, n_steps=n, method=rule)
                for name in layers:
                    errors[rule][name][str(n)] = float(neuron_error(lc[name], exact[name]))
                errors[rule]["input (IG)"][str(n)] = float(neuron_error(ig.attributions, exact["input (IG)"]))
                completeness[rule][str(n)] = max(abs(float(d)) for d in lc.delta.values()) / abs(change)
        row = {
            "example": e, "regions": int(exact_lc.info["regions"][0]), "search_evaluations": exact_lc.info["search_evaluations"],
            "search_passes": exact_lc.info["search_passes"], "exact_lc_seconds": lc_seconds, "exact_ig_seconds": ig_seconds,
            "n_steps_50_seconds": default_seconds, "change": change,
            "exact_completeness": {name: abs(float(exact_lc.delta[name])) / abs(change) for name in layers}
            | {"input (IG)": abs(float(exact_ig.delta)) / abs(change)},
            "errors": errors, "layer_completeness": completeness,
        }
        per_example.append(row)
        print(f"example {e}: {row['regions']} regions, exact LC {lc_seconds:.1f} s, IG {ig_seconds:.1f} s, "
              f"n_steps=50 {default_seconds:.2f} s; exact completeness {max(row['exact_completeness'].values()):.1e}", flush=True)
    report = {
        "model": args.model, "description": description, "dtype": args.dtype, "examples": args.examples,
        "layers": layers, "rules": RULES, "steps": STEPS, "machine": f"{cpu_model()}, {args.threads} threads",
        "torch": torch.__version__, "per_example": per_example,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"exact_{args.model}" + (f"_{args.size}" if args.model == "vgg16" else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, keys, RESULTS / f"{stem}.md", stem)
    plot(report, keys, RESULTS / f"{stem}.png")


def median_error(report: dict, rule: str, key: str, n: int) -> float:
    return statistics.median(row["errors"][rule][key][str(n)] for row in report["per_example"])


def needed(report: dict, rule: str, key: str, target: float) -> str:
    """The smallest n_steps of the grid whose per-neuron error is at most ``target`` for every example."""
    for n in report["steps"]:
        if all(row["errors"][rule][key][str(n)] <= target for row in report["per_example"]):
            return str(n)
    return f"> {report['steps'][-1]}"


def write_markdown(report: dict, keys: list[str], path: Path, stem: str) -> None:
    rows = report["per_example"]
    lines = [
        f"# Exact conductance and IG against the Riemann rules: {report['model']}", "",
        f"Produced by `python benchmarks/exact.py --model {report['model']}` ({report['description']}; {report['dtype']}; "
        f"{report['examples']} example(s); {report['machine']}; torch {report['torch']}).", "",
        "Per-neuron error of a map: max_j |C_j − C_j^exact| / max_j |C_j^exact| (the worst unit, relative to the layer's "
        "largest exact attribution). `input (IG)` is integrated gradients per input element.", "",
        "## Regions and time", "",
        "| example | regions | search forward rows | passes | exact LC (s) | exact IG (s) | LC n_steps=50 (s) | exact / n_steps=50 | exact completeness (worst, relative) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['example']} | {row['regions']} | {row['search_evaluations']} | {row['search_passes']} | "
                     f"{row['exact_lc_seconds']:.1f} | {row['exact_ig_seconds']:.1f} | {row['n_steps_50_seconds']:.2f} | "
                     f"{row['exact_lc_seconds'] / row['n_steps_50_seconds']:.0f}× | {max(row['exact_completeness'].values()):.1e} |")
    lines += ["", "## n_steps needed for a per-neuron error of 1% / 0.1% (every example; grid 8…1024)", "",
              "| rule | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for rule in report["rules"]:
        lines.append(f"| {rule} | " + " | ".join(f"{needed(report, rule, k, 0.01)} / {needed(report, rule, k, 0.001)}" for k in keys) + " |")
    for key in keys:
        lines += ["", f"## Per-neuron error at `{key}` (median over examples)", "",
                  "| rule | " + " | ".join(str(n) for n in report["steps"]) + " |", "|---|" + "---|" * len(report["steps"])]
        for rule in report["rules"]:
            lines.append(f"| {rule} | " + " | ".join(f"{median_error(report, rule, key, n):.1e}" for n in report["steps"]) + " |")
    lines += ["", f"![per-neuron error against n_steps]({stem}.png)", ""]
    path.write_text("\n".join(lines))


def plot(report: dict, keys: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), sharey=True)
    for ax, key in zip(axes, keys):
        for rule in report["rules"]:
            ax.loglog(report["steps"], [median_error(report, rule, key, n) for n in report["steps"]], marker="o", ms=3, label=rule)
        for target in TARGETS:
            ax.axhline(target, color="grey", lw=0.6, ls=":")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("n_steps")
    axes[0].set_ylabel("per-neuron error vs exact")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"{report['model']}: Riemann rules converge to the exact sums (median over {report['examples']} example(s))", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
