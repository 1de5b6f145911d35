"""LRP: attrib vs zennit 0.5.1 (same composite) vs Captum 0.9.0 (VGG16, epsilon rules), side by side.

Random-init VGG16 and ResNet50 as shipped, 3x224x224, batch 1 and 16, target 3, threads fixed, one
warm-up, median of >= 3 interleaved rounds. The limit is one plain forward + backward to the input
(parameters frozen). Peak memory: each case in a fresh subprocess, peak RSS above the level after
a warm-up run. Writes benchmarks/results/lrp.json (after every case) and lrp.md.

    python benchmarks/lrp.py [--models vgg16,resnet50] [--batches 1,16] [--repeats 3] [--skip-memory] [--skip-timing]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torchvision
from common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    cpu_model,
    device_label,
    imagenet_pictures,
    limit_fn,
    peak_rss_mb,
    result_file,
    rss_mb,
    side_by_side,
    sync,
)
from torch import nn

import attrib
from attrib.lrp import LRP

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 3
SIZE = 224
COMPOSITES = ["epsilon", "epsilon_gamma_box", "epsilon_plus_flat"]
TARGETS = {"epsilon": 1.3, "epsilon_gamma_box": 2.0, "epsilon_plus_flat": 2.0}


def build(name: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval().to(device)


def pictures(batch: int, device: str) -> torch.Tensor:
    return imagenet_pictures(batch, SIZE, device)


def zennit_composite(name: str, model_name: str):
    from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat, LayerMapComposite
    from zennit.layer import Sum
    from zennit.rules import Epsilon, Norm, Pass
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    from zennit.types import Activation, AvgPool, Convolution

    canonizers = [ResNetCanonizer()] if model_name.startswith("resnet") else [VGGCanonizer()]
    if name == "epsilon":  # attrib's "epsilon": epsilon on every Linear/Conv, activations pass, average pools Norm
        return LayerMapComposite(
            [(Activation, Pass()), (Sum, Norm()), (AvgPool, Norm()), (Convolution, Epsilon()), (nn.Linear, Epsilon())],
            canonizers=canonizers
        )
    if name == "epsilon_gamma_box":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        return EpsilonGammaBox(low=(-mean / std).expand(1, 3, SIZE, SIZE), high=((1 - mean) / std).expand(1, 3, SIZE, SIZE),
                               canonizers=canonizers)
    return EpsilonPlusFlat(canonizers=canonizers)


def runner(tool: str, composite: str | None, model: nn.Module, x: torch.Tensor):
    """A zero-argument callable computing one input relevance map (or the limit)."""
    if tool == "limit":
        return limit_fn(model, x, TARGET)
    if tool == "attrib":
        lrp = LRP(model, composite)
        return lambda: lrp.attribute(x, target=TARGET).attributions
    if tool == "zennit":
        from zennit.attribution import Gradient

        selection = torch.zeros(x.shape[0], 1000, device=x.device)
        selection[:, TARGET] = 1.0
        model_name = "resnet" if hasattr(model, "layer1") else "vgg"

        def zennit_run():
            with Gradient(model=model, composite=zennit_composite(composite, model_name)) as attributor:
                return attributor(x, lambda output: output * selection)[1]
        return zennit_run
    if tool == "captum":
        from captum.attr import LRP as CaptumLRP

        # Captum's LRP needs out-of-place ReLUs; a copy, so the model the others use stays as shipped
        twin = copy.deepcopy(model)
        for module in twin.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
        return lambda: CaptumLRP(twin).attribute(x, target=TARGET).detach()
    raise ValueError(tool)


def tools_for(model_name: str) -> list[tuple[str, str | None]]:
    tools = [("limit", None)]
    for composite in COMPOSITES:
        tools += [("attrib", composite), ("zennit", composite)]
    if model_name == "vgg16":
        tools.append(("captum", "epsilon"))
    return tools


def key(tool: str, composite: str | None) -> str:
    return tool if composite is None else f"{tool}:{composite}"


def time_case(model_name: str, batch: int, repeats: int, device: str) -> dict:
    model, x = build(model_name, device), pictures(batch, device)
    fns = {key(t, c): runner(t, c, model, x) for t, c in tools_for(model_name)}
    timings = side_by_side(fns, repeats, device)
    out = {name: {"seconds": t, "runs": runs} for name, (t, runs, _) in timings.items()}
    results = {name: r.detach().double() for name, (_, _, r) in timings.items()}
    for composite in COMPOSITES:  # the numbers agree, in float32
        ours, theirs = results[f"attrib:{composite}"], results[f"zennit:{composite}"]
        out[f"attrib:{composite}"]["max_rel_diff_vs_zennit"] = float((ours - theirs).abs().max() / theirs.abs().max())
    if "captum:epsilon" in results:
        ours, theirs = results["attrib:epsilon"], results["captum:epsilon"]
        out["attrib:epsilon"]["max_rel_diff_vs_captum"] = float((ours - theirs).abs().max() / theirs.abs().max())
    return out


def captum_agreement(device: str) -> dict:
    """Captum's LRP gives Linear, Conv and every pooling the epsilon rule with eps = 1e-9; with that
    composite attrib gives the same numbers (VGG16, batch 1, float32 and float64)."""
    from captum.attr import LRP as CaptumLRP

    from attrib.lrp import Composite, Epsilon
    from attrib.module_types import AVERAGE_POOLS, LINEAR_LAYERS, MAX_POOLS

    out = {}
    for dtype in (torch.float32, torch.float64):
        model, x = build("vgg16", device).to(dtype), pictures(1, device).to(dtype)
        twin = copy.deepcopy(model)
        for module in twin.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
        composite = Composite(types=[(LINEAR_LAYERS, Epsilon(1e-9)), (AVERAGE_POOLS + MAX_POOLS, Epsilon(1e-9))])
        ours = LRP(model, composite).attribute(x, target=TARGET).attributions
        theirs = CaptumLRP(twin).attribute(x, target=TARGET).detach()
        out[str(dtype).replace("torch.", "")] = float((ours - theirs).abs().max() / theirs.abs().max())
    return out


def conservation_figures(device: str) -> dict:
    """The conservation report of VGG16 and ResNet50 under epsilon_gamma_box (batch 1, float32 and
    float64): relevance at the start and at the input, and the layers that absorb the most."""
    out = {}
    for model_name in ("vgg16", "resnet50"):
        for dtype in (torch.float32, torch.float64):
            model, x = build(model_name, device).to(dtype), pictures(1, device).to(dtype)
            report = LRP(model, "epsilon_gamma_box").attribute(x, target=TARGET).info["conservation"]
            worst = sorted(report.rows, key=lambda row: -abs(float(row.difference[0])))[:3]
            out[f"{model_name}:{str(dtype).replace('torch.', '')}"] = {
                "start": float(report.start[0]), "input": float(report.input[0]), "layers": len(report.rows),
                "worst": [{"name": r.name, "rule": r.rule, "entering": float(r.entering[0]), "difference": float(r.difference[0])}
                          for r in worst],
                "largest_relative_change": max(abs(float(r.difference[0])) / max(abs(float(r.entering[0])), 1e-30) for r in report.rows),
            }
    return out


def memory_case(model_name: str, batch: int, tool: str, composite: str | None, device: str) -> None:
    """Run one case in this fresh process; print its peak memory in MB above the post-warm-up level."""
    model, x = build(model_name, device), pictures(batch, device)
    run = runner(tool, composite, model, x)
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        before = rss_mb()
    result = run()
    sync(device)
    del result
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if device.startswith("cuda") else peak_rss_mb() - before
    print(json.dumps({"peak_mb": peak}))


def measure_memory(model_name: str, batch: int, tool: str, composite: str | None, device: str) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # RSS follows live tensors (as in conductance.py)
    command = [sys.executable, __file__, "--memory-case", model_name, str(batch), tool, composite or "-", "--device", device]
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def write_markdown(results: dict, path: Path) -> None:
    m = results["machine"]
    lines = [
        f"# LRP benchmark ({m['device']})", "",
        f"Random-init torchvision models as shipped, 3×{SIZE}×{SIZE}, target {TARGET}; {m['threads']} threads, torch "
        f"{m['torch']}, zennit {m['zennit']}, captum {m['captum']}; median of {m['repeats']} interleaved rounds after a "
        "warm-up. The limit is one plain forward + backward to the input (parameters frozen). zennit runs the same "
        "composite (its canonizers for ResNet / VGG); Captum runs its default LRP (epsilon rules) on an out-of-place-ReLU "
        "copy. Generated by `benchmarks/lrp.py`.", "",
        "| model | batch | composite | attrib | limit | attrib / limit | target | zennit | attrib / zennit | Captum | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, entry in results.get("timing", {}).items():
        model_name, batch = case.split("@")
        limit = entry["limit"]["seconds"]
        for composite in COMPOSITES:
            ours = entry[f"attrib:{composite}"]["seconds"]
            theirs = entry[f"zennit:{composite}"]["seconds"]
            captum = entry.get(f"captum:{composite}", {}).get("seconds")
            met = ours / limit <= TARGETS[composite] and ours <= theirs
            lines.append(
                f"| {model_name} | {batch} | {composite} | {ours:.3f} s | {limit:.3f} s | {ours / limit:.2f} | "
                f"≤ {TARGETS[composite]} | {theirs:.3f} s | {ours / theirs:.2f} | "
                f"{'' if captum is None else f'{captum:.3f} s'} | {'yes' if met else '**no**'} |"
            )
    lines += ["", "Agreement (float32, largest difference relative to the largest relevance; the zennit numbers for "
              "ResNet50 include zennit's BatchNorm merge, which leaves each BatchNorm computing x / sqrt(1 + eps) "
              "instead of x, about 5e-6 per layer; in float64 with eps = 0 the tests agree to 1e-10):", ""]
    for case, entry in results.get("timing", {}).items():
        parts = [f"{c} vs zennit {entry[f'attrib:{c}']['max_rel_diff_vs_zennit']:.1e}" for c in COMPOSITES]
        if "max_rel_diff_vs_captum" in entry["attrib:epsilon"]:
            parts.append(f"epsilon vs Captum {entry['attrib:epsilon']['max_rel_diff_vs_captum']:.1e}")
        lines.append(f"- {case.replace('@', ', batch ')}: " + "; ".join(parts))
    if "captum_agreement" in results:
        a = results["captum_agreement"]
        lines.append(f"- Captum's default LRP on VGG16 (epsilon 1e-9 on every layer with weights and on every pooling) "
                     f"against attrib with that composite: {a['float32']:.1e} in float32, {a['float64']:.1e} in float64. "
                     "The timing rows run attrib's `epsilon` composite (eps 1e-6, max pooling winner-take-all), so the "
                     "Captum column times the same work but not the same numbers.")
    figures = results.get("conservation", {})
    if figures:
        lines += ["", "## Conservation under epsilon_gamma_box (batch 1)", "",
                  "| model | dtype | start | input | input / start | layers listed | largest absorbers (difference) |", "|---|---|---|---|---|---|---|"]
        for key, f in figures.items():
            model_name, dtype = key.split(":")
            worst = "; ".join(f"{w['name']} {w['difference']:+.2e}" for w in f["worst"])
            lines.append(f"| {model_name} | {dtype} | {f['start']:+.4e} | {f['input']:+.4e} | {f['input'] / f['start']:.4f} | "
                         f"{f['layers']} | {worst} |")
    memory = results.get("memory", {})
    if memory:
        lines += ["", "## Peak memory above the model (MB)", "", "| model | batch | " + " | ".join(memory[next(iter(memory))]) + " |",
                  "|---|---|" + "---|" * len(memory[next(iter(memory))])]
        for case, entry in memory.items():
            model_name, batch = case.split("@")
            lines.append(f"| {model_name} | {batch} | " + " | ".join(f"{v:.0f}" for v in entry.values()) + " |")
    if results.get("notes"):
        lines += ["", *results["notes"]]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--memory-case", nargs=4)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--captum-only", action="store_true", help="only the Captum agreement check")
    parser.add_argument("--conservation-only", action="store_true", help="only the conservation figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_case:
        model_name, batch, tool, composite = args.memory_case
        memory_case(model_name, int(batch), tool, None if composite == "-" else composite, args.device)
        return
    out = result_file(RESULTS, "lrp", args.device)
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.report_only:
        write_markdown(results, out.with_suffix(".md"))
        return
    from importlib.metadata import version

    import captum

    results["machine"] = {
        "device": device_label(args.device),
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "zennit": version("zennit"), "captum": captum.__version__,
        "attrib": attrib.__version__, "python": platform.python_version(), "repeats": args.repeats,
    }

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        write_markdown(results, out.with_suffix(".md"))

    if "vgg16" in args.models.split(",") and not args.skip_timing:
        results["captum_agreement"] = captum_agreement(args.device)
        save()
    if args.captum_only:
        return
    results["conservation"] = conservation_figures(args.device)
    save()
    if args.conservation_only:
        return
    for model_name in [] if args.skip_timing else args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            case = f"{model_name}@{batch}"
            print(f"[timing {case}] ...", flush=True)
            results.setdefault("timing", {})[case] = time_case(model_name, batch, args.repeats, args.device)
            save()
    if not args.skip_memory:
        for model_name in args.models.split(","):
            batch = max(map(int, args.batches.split(",")))
            case = f"{model_name}@{batch}"
            print(f"[memory {case}] ...", flush=True)
            entry = results.setdefault("memory", {}).setdefault(case, {})
            for tool, composite in tools_for(model_name):
                entry[key(tool, composite)] = measure_memory(model_name, batch, tool, composite, args.device)
                save()


if __name__ == "__main__":
    main()
