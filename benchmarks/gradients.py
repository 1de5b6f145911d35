"""Gradient family on VGG16 (1x3x224x224): attrib vs Captum 0.9.0, side by side, plus the
conductance ascent's time per iteration.

Random-init torchvision VGG16 as shipped (in-place ReLUs) for attrib; Captum gets an out-of-place
copy (its ReLU hooks need it). Threads fixed, one warm-up, median of interleaved rounds. The limit
is one plain forward + backward to the input. Writes benchmarks/results/gradients.json and .md.

    python benchmarks/gradients.py [--repeats 5] [--ascent-iterations 3] [--ascent-steps 8,20]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
import warnings
from pathlib import Path

import torch
import torchvision
from common import (
    device_label,
    imagenet_pictures,
    limit_fn,
    result_file,
    side_by_side,
    sync,
)
from torch import nn

import attrib

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).resolve().parent / "results"
TARGET, LAYER, RELU, SAMPLES, STDEVS = 3, "features.28", "features.29", 10, 0.15


def build(device: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval().to(device)
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model, twin, imagenet_pictures(1, 224, device)


def cases(model: nn.Module, twin: nn.Module, x: torch.Tensor) -> dict:
    """{method: (attrib fn, Captum fn or None, numbers comparable?)}"""
    from captum.attr import (
        Deconvolution,
        DeepLift,
        GuidedBackprop,
        GuidedGradCam,
        InputXGradient,
        LayerAttribution,
        LayerGradCam,
        NeuronDeconvolution,
        NoiseTunnel,
        Saliency,
    )

    layer = dict(twin.named_modules())[LAYER]
    sigma = float(attrib.SmoothGrad.noise_sigma(x, STDEVS))
    # the reconstruction of filter 5's strongest unit after the last ReLU; Captum's NeuronDeconvolution
    # starts from 1 there, attrib from the activation (Zeiler-Fergus), so attrib's map is divided by it
    activation = attrib.LayerActivation(model, RELU).attribute(x).attributions[RELU][0, 5]
    selector = (5,) + tuple(int(i) for i in torch.unravel_index(activation.argmax(), activation.shape))

    def reconstruction():
        result = attrib.DeconvReconstruction(model).attribute(x, layer=RELU, neuron_selector=selector)
        return result.attributions / result.info["start"].sum()

    return {
        "Saliency": (lambda: attrib.Saliency(model).attribute(x, target=TARGET).attributions,
                     lambda: Saliency(twin).attribute(x, target=TARGET), True),
        "InputXGradient": (lambda: attrib.InputXGradient(model).attribute(x, target=TARGET).attributions,
                           lambda: InputXGradient(twin).attribute(x, target=TARGET).detach(), True),
        f"SmoothGrad ({SAMPLES} samples)": (
            lambda: attrib.SmoothGrad(model).attribute(x, target=TARGET, n_samples=SAMPLES, stdevs=STDEVS, abs=True).attributions,
            lambda: NoiseTunnel(Saliency(twin)).attribute(x, target=TARGET, nt_samples=SAMPLES, stdevs=sigma), False),
        "GuidedBackprop": (lambda: attrib.GuidedBackprop(model).attribute(x, target=TARGET).attributions,
                           lambda: GuidedBackprop(twin).attribute(x, target=TARGET), True),
        "DeconvNet": (lambda: attrib.DeconvNet(model).attribute(x, target=TARGET).attributions,
                      lambda: Deconvolution(twin).attribute(x, target=TARGET), True),
        "GradCAM (features.28, bilinear)": (
            lambda: attrib.GradCAM(model, LAYER).attribute(x, target=TARGET).attributions,
            lambda: LayerAttribution.interpolate(
                LayerGradCam(twin, layer).attribute(x, target=TARGET, relu_attributions=True), (224, 224), "bilinear").detach(),
            True),
        "GuidedGradCAM (features.28)": (lambda: attrib.GuidedGradCAM(model, LAYER).attribute(x, target=TARGET).attributions,
                                        lambda: GuidedGradCam(twin, layer).attribute(x, target=TARGET), True),
        "DeepLift (zero baseline)": (lambda: attrib.DeepLift(model).attribute(x, target=TARGET).attributions,
                                     lambda: DeepLift(twin).attribute(x, target=TARGET).detach(), True),
        "DeconvReconstruction (one neuron, features.29)": (
            reconstruction, lambda: NeuronDeconvolution(twin, dict(twin.named_modules())[RELU]).attribute(x, neuron_selector=selector),
            True),
    }


def time_methods(repeats: int, device: str) -> dict:
    model, twin, x = build(device)
    out = {}
    limit = limit_fn(model, x, TARGET)
    for name, (ours, theirs, comparable) in cases(model, twin, x).items():
        print(f"[{name}] ...", flush=True)
        timings = side_by_side({"limit": limit, "attrib": ours, "captum": theirs}, repeats, device)
        a, c = timings["attrib"][2].detach().double(), timings["captum"][2].detach().double()
        out[name] = {
            "attrib_s": timings["attrib"][0], "captum_s": timings["captum"][0], "limit_s": timings["limit"][0],
            "runs": {k: v[1] for k, v in timings.items()},
            "max_rel_diff_vs_captum": float((a - c).abs().max() / c.abs().max()) if comparable else None,
        }
    return out


def time_ascent(iterations: int, node_counts: list[int], device: str) -> dict:
    model, _, x = build(device)
    out = {}
    for n_steps in node_counts:
        print(f"[ascent, n_steps={n_steps}] ...", flush=True)
        attrib.conductance_ascent(model, x, target=TARGET, steps=1, n_steps=n_steps)  # warm-up
        seconds = {}
        for steps in (0, iterations):  # steps=0: the set-up alone (start conductance, gradient effect, final objective)
            sync(device)
            start = time.perf_counter()
            result = attrib.conductance_ascent(model, x, target=TARGET, steps=steps, n_steps=n_steps)
            sync(device)
            seconds[steps] = time.perf_counter() - start
        out[str(n_steps)] = {
            "iterations": iterations, "total_s": seconds[iterations], "setup_s": seconds[0],
            "per_iteration_s": (seconds[iterations] - seconds[0]) / iterations, "rows_per_pass": n_steps + 1,
            "objective": result.objective[:, 0].tolist(), "filter": int(result.filter[0]),
        }
    return out


def write_markdown(results: dict, path: Path) -> None:
    machine = results["machine"]
    lines = [
        f"# Gradient family benchmark ({machine['device']})", "",
        f"Random-init VGG16 as shipped, 1x3x224x224, target {TARGET}; {machine['threads']} threads, torch {machine['torch']}, "
        f"captum {machine['captum']}; median of {machine['repeats']} interleaved rounds after a warm-up. The limit is one plain "
        "forward + backward to the input. Captum runs an out-of-place-ReLU copy. Agreement: largest difference relative to "
        "Captum's largest value, float32. Generated by `benchmarks/gradients.py`.", "",
        "| method | attrib | Captum | attrib / Captum | limit | attrib / limit | agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results.get("methods", {}).items():
        agree = "random noise" if row["max_rel_diff_vs_captum"] is None else f"{row['max_rel_diff_vs_captum']:.1e}"
        lines.append(
            f"| {name} | {row['attrib_s']:.3f} s | {row['captum_s']:.3f} s | {row['attrib_s'] / row['captum_s']:.2f} | "
            f"{row['limit_s']:.3f} s | {row['attrib_s'] / row['limit_s']:.2f} | {agree} |"
        )
    if results.get("ascent"):
        lines += ["", "## Conductance gradient ascent (VGG16, last conv features.28, Adam lr 0.1)", "",
                  "| conductance steps | rows per pass | iterations timed | set-up | per iteration | objective first -> last |",
                  "|---|---|---|---|---|---|"]
        for n_steps, row in results["ascent"].items():
            lines.append(
                f"| {n_steps} | {row['rows_per_pass']} | {row['iterations']} | {row['setup_s']:.2f} s | "
                f"{row['per_iteration_s']:.2f} s | {row['objective'][0]:.4g} -> {row['objective'][-1]:.4g} |"
            )
        lines += ["", "Each iteration is one forward of all nodes, the conductance (a backward with create_graph) and its "
                  "gradient to the image (a double backward). Per iteration = (time of `steps=k` - time of `steps=0`) / k; "
                  "the set-up (start conductance, gradient effect, final objective) is paid once per call."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ascent-iterations", type=int, default=3)
    parser.add_argument("--ascent-steps", default="8,20")
    parser.add_argument("--skip-methods", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = result_file(RESULTS, "gradients", args.device)
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.report_only:
        write_markdown(results, out.with_suffix(".md"))
        return
    import captum

    results["machine"] = {
        "device": device_label(args.device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "captum": captum.__version__, "attrib": attrib.__version__, "python": platform.python_version(), "repeats": args.repeats,
    }
    if not args.skip_methods:
        results["methods"] = time_methods(args.repeats, args.device)
        out.write_text(json.dumps(results, indent=1))
    results["ascent"] = time_ascent(args.ascent_iterations, [int(s) for s in args.ascent_steps.split(",")], args.device)
    out.write_text(json.dumps(results, indent=1))
    write_markdown(results, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
