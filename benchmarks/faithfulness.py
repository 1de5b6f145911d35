"""Faithfulness of attributions on the embedded tiny ViT: deletion and insertion curves and their areas.

For each held-out digit (the CNN's 450-digit split) and each method, the attribution map for the
predicted class orders the input's units, most relevant first (signed: the most positive first; ties in
index order). Units are 4x4 patches (the ViT's own patches, 64) or single pixels of the 32x32 input (1024).

- Deletion: the units are replaced, most relevant first, by the blank digit (``preprocess(zeros)``, the
  same value everywhere) in equal steps; the predicted class's softmax probability is recorded after each
  step. A faithful map makes it fall fast: lower area is better.
- Insertion: from the blank digit, the units of the digit are put back, most relevant first; higher is better.

Area under each curve by the trapezoid rule over the fraction of units changed (0..1); mean +- standard error
over the digits. A random order per digit (seed 0) is the floor every method should beat.

Methods: AttnLRP and CP-LRP (``LRP(model, "attnlrp" / "cp_lrp")``), integrated gradients (Gauss-Legendre,
baseline the blank digit), conductance at the input (``LayerConductance`` of ``conv_proj`` with
``attribute_to_layer_input``: the input layer's conductance, which on a straight path is integrated
gradients in its Riemann-Stieltjes form, trapezoid rule; checked against ``IntegratedGradients(...,
method="stieltjes_trapezoid")`` on a few digits), gradient x input, and attention rollout (per patch; on
pixels each patch's score on its 16 pixels). An extra row, gradient x (input - blank), separates the
ordering power of the gradient from the choice of reference (plain gradient x input multiplies by the
normalised input, whose 0 is the dataset's mean grey level, not the blank digit). AttnLRP and CP-LRP
run as ``attrib explain --model digits-vit`` runs them: the composites built with the digits' bounds
(``low``/``high`` from the grey levels 0 and 16), which puts the z^B rule on the patch embedding. Two
more extra rows keep the composites' epsilon rule there (no bounds given), whose ratio x w / z is
unstable where a patch's pre-activation z is near 0 (see the conservation diagnostics).

    python benchmarks/faithfulness.py [--images 450] [--steps 50] [--patch-steps 64] [--pixel-steps 32] [--threads 1]

Writes benchmarks/results/issue17/faithfulness.json, .md and faithfulness_curves.png.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import attrib  # noqa: E402
from attrib import (  # noqa: E402
    LRP,
    InputXGradient,
    IntegratedGradients,
    LayerConductance,
    Saliency,
    attention_rollout,
    patches_to_image,
)
from attrib.lrp import COMPOSITES, Composite  # noqa: E402
from attrib.models import load_digits_vit, pixel_bounds, preprocess  # noqa: E402
from attrib.models.digits_vit import PATCH  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "issue17"
METHODS = {  # key: label
    "attnlrp": "AttnLRP",
    "cp_lrp": "CP-LRP",
    "integrated_gradients": "integrated gradients",
    "conductance_at_input": "conductance at the input",
    "input_x_gradient": "gradient × input",
    "attention_rollout": "attention rollout",
    "random": "random order",
    "gradient_x_input_minus_blank": "gradient × (input − blank) (extra)",
    "attnlrp_epsilon": "AttnLRP, ε on conv_proj (extra)",
    "cp_lrp_epsilon": "CP-LRP, ε on conv_proj (extra)",
}
COMPARED = ("attnlrp", "cp_lrp")  # against input_x_gradient
LRPS = ("attnlrp", "cp_lrp", "attnlrp_epsilon", "cp_lrp_epsilon")
EXTRAS = ("random", "gradient_x_input_minus_blank", "attnlrp_epsilon", "cp_lrp_epsilon")


def composite(name: str) -> Composite:
    """The composite as the CLI builds it for the digits (z^B on ``conv_proj``, bounded by the grey
    levels 0 and 16, ``pixel_bounds``), or (``..._epsilon``) without bounds: epsilon on the first layer."""
    if name.endswith("_epsilon"):
        return COMPOSITES[name[:-len("_epsilon")]]()
    low, high = pixel_bounds()
    return COMPOSITES[name](low=low, high=high)
UNITS = ("patches", "pixels")


def attributions(model, x: Tensor, targets: list[int], blank: Tensor, steps: int, chunk: int) -> tuple[dict, dict, dict]:
    """{method: (B, 1, 32, 32) pixel map or (B, 64) patch scores}, {method: seconds}, diagnostics."""
    maps: dict[str, list[Tensor]] = {m: [] for m in METHODS if m != "random"}
    seconds = dict.fromkeys(maps, 0.0)
    notes: dict[str, dict] = {"lrp_input_over_logit": {c: [] for c in LRPS}, "lrp_nan_maps": {c: 0 for c in LRPS},
                              "completeness_relative": {"integrated_gradients": [], "conductance_at_input": []},
                              "on_blank_pixels": {m: [0.0, 0.0] for m in maps}}
    already_blank = x == blank  # pixels that deletion cannot change (the digit's background)

    def run(name: str, rows: slice, warm: bool = False) -> None:
        given, target = x[rows], targets[rows]
        start = time.perf_counter()
        if name in LRPS:
            res = LRP(model, composite(name)).attribute(given, target=target)
            value = res.attributions
        elif name == "integrated_gradients":
            res = IntegratedGradients(model).attribute(given, target=target, baselines=blank, n_steps=steps)
            value = res.attributions
        elif name == "conductance_at_input":
            res = LayerConductance(model, "conv_proj").attribute(given, target=target, baselines=blank, n_steps=steps,
                                                                 attribute_to_layer_input=True)
            value = res["conv_proj"]
        elif name == "input_x_gradient":
            value = InputXGradient(model).attribute(given, target=target).attributions
        elif name == "gradient_x_input_minus_blank":
            value = Saliency(model).attribute(given, target=target, abs=False).attributions * (given - blank)
        else:  # attention_rollout: (B, 64) patch scores, no target
            value = attention_rollout(model, given)
        if warm:
            return
        seconds[name] += time.perf_counter() - start
        maps[name].append(value.detach())
        pixels = patches_to_image(value, size=32) if value.dim() == 2 else value
        notes["on_blank_pixels"][name][0] += float((pixels.abs() * already_blank[rows]).sum())
        notes["on_blank_pixels"][name][1] += float(pixels.abs().sum())
        if name in LRPS:
            notes["lrp_input_over_logit"][name] += (value.sum((1, 2, 3)) / res.outputs).tolist()
            notes["lrp_nan_maps"][name] += int(torch.isnan(value).flatten(1).any(1).sum())
        elif name in notes["completeness_relative"]:
            delta = res.delta["conv_proj"] if isinstance(res.delta, dict) else res.delta
            notes["completeness_relative"][name] += (delta.abs() / (res.outputs - res.baseline_outputs).abs()).tolist()

    for name in maps:
        run(name, slice(0, 4), warm=True)
        for start in range(0, len(targets), chunk):
            run(name, slice(start, start + chunk))
    return {m: torch.cat(v) for m, v in maps.items()}, seconds, notes


def unit_scores(value: Tensor, units: str) -> Tensor:
    """(B, U): a pixel map or patch scores as scores per patch (64) or per pixel (1024)."""
    if value.dim() == 2:  # patch scores (rollout)
        return value if units == "patches" else patches_to_image(value, size=32).flatten(1)
    if units == "pixels":
        return value.flatten(1)
    return torch.nn.functional.avg_pool2d(value, PATCH).flatten(1) * PATCH * PATCH  # summed over each patch


def ranks(scores: Tensor) -> Tensor:
    """(B, U): each unit's place in the order, 0 = most relevant (ties: lower index first)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order).contiguous())


def curves(model, x: Tensor, targets: Tensor, blank: Tensor, place: Tensor, units: str, steps: int,
           ends: dict, chunk: int) -> dict[str, Tensor]:
    """{"deletion"|"insertion": (B, steps + 1)} probabilities of the target; ``place`` from :func:`ranks`."""
    count = place.shape[1]
    counts = [round(k * count / steps) for k in range(steps + 1)]
    out = {"deletion": torch.empty(len(targets), steps + 1), "insertion": torch.empty(len(targets), steps + 1)}
    out["deletion"][:, 0], out["deletion"][:, -1] = ends["full"], ends["blank"]
    out["insertion"][:, 0], out["insertion"][:, -1] = ends["blank"], ends["full"]
    grid = 32 // PATCH if units == "patches" else 32
    with torch.no_grad():
        for start in range(0, len(targets), chunk):
            rows = slice(start, start + chunk)
            given, target, where = x[rows], targets[rows], place[rows]
            picked = torch.arange(len(target))
            for k in range(1, steps):
                changed = (where < counts[k]).reshape(-1, 1, grid, grid)
                if units == "patches":
                    changed = changed.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
                for mode, image in (("deletion", torch.where(changed, blank, given)),
                                    ("insertion", torch.where(changed, given, blank))):
                    out[mode][rows, k] = model(image).softmax(1)[picked, target]
    return out


def fractions(count: int, steps: int) -> Tensor:
    return torch.tensor([round(k * count / steps) / count for k in range(steps + 1)])


def summary(values: Tensor) -> dict:
    values = values.double()
    return {"mean": float(values.mean()), "se": float(values.std() / math.sqrt(len(values)))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=450)
    parser.add_argument("--steps", type=int, default=50, help="integration steps of IG and conductance")
    parser.add_argument("--patch-steps", type=int, default=64)
    parser.add_argument("--pixel-steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from common import device_label
    from evaluation import digits_split

    started = time.perf_counter()
    _, _, test_x, test_y = digits_split()
    x, labels = test_x[:args.images], test_y[:args.images]
    model = load_digits_vit()
    blank = preprocess(torch.zeros(1, 8, 8))
    with torch.no_grad():
        probabilities = model(x).softmax(1)
        predicted = probabilities.argmax(1)
        blank_probabilities = model(blank).softmax(1)[0]
    picked = torch.arange(len(predicted))
    ends = {"full": probabilities[picked, predicted], "blank": blank_probabilities[predicted]}
    targets = predicted.tolist()

    maps, seconds, notes = attributions(model, x, targets, blank, args.steps, args.chunk)
    check = IntegratedGradients(model).attribute(x[:10], target=targets[:10], baselines=blank, n_steps=args.steps,
                                                 method="stieltjes_trapezoid").attributions
    conductance_vs_ig = float((check - maps["conductance_at_input"][:10]).abs().max() / check.abs().max())
    generator = torch.Generator().manual_seed(0)
    random_scores = torch.rand(len(targets), 64, generator=generator), torch.rand(len(targets), 1024, generator=generator)

    results: dict = {"methods": {}, "curves": {}}
    curve_seconds = 0.0
    for method in METHODS:
        results["methods"][method] = {"label": METHODS[method], "seconds": seconds.get(method)}
        results["curves"][method] = {}
        for units, unit_count, steps in (("patches", 64, args.patch_steps), ("pixels", 1024, args.pixel_steps)):
            scores = (random_scores[0] if units == "patches" else random_scores[1]) if method == "random" \
                else unit_scores(maps[method], units)
            begun = time.perf_counter()
            found = curves(model, x, predicted, blank, ranks(scores), units, steps, ends, args.chunk)
            curve_seconds += time.perf_counter() - begun
            xs = fractions(unit_count, steps)
            for mode, probs in found.items():
                auc = torch.trapezoid(probs, xs, dim=1)
                results["methods"][method][f"{mode}_{units}"] = {**summary(auc), "per_digit": auc.tolist()}
                results["curves"][method][f"{mode}_{units}"] = probs.mean(0).tolist()
        print(method, {k: round(v["mean"], 4) for k, v in results["methods"][method].items() if isinstance(v, dict)}, flush=True)
    results["fractions"] = {"patches": fractions(64, args.patch_steps).tolist(), "pixels": fractions(1024, args.pixel_steps).tolist()}

    comparison = {}
    for method in COMPARED:
        comparison[method] = {}
        for key in ("deletion_patches", "deletion_pixels", "insertion_patches", "insertion_pixels"):
            mine = torch.tensor(results["methods"][method][key]["per_digit"])
            theirs = torch.tensor(results["methods"]["input_x_gradient"][key]["per_digit"])
            better = mine < theirs if key.startswith("deletion") else mine > theirs
            worse = mine > theirs if key.startswith("deletion") else mine < theirs
            comparison[method][key] = {**summary(mine - theirs), "digits_better": int(better.sum()),
                                       "digits_worse": int(worse.sum())}
    results["versus_input_x_gradient"] = comparison
    results["diagnostics"] = {
        "lrp_input_relevance_over_logit": {c: {**summary(torch.tensor(v)), "min": min(v), "max": max(v)}
                                           for c, v in notes["lrp_input_over_logit"].items()},
        "lrp_maps_with_nan": notes["lrp_nan_maps"],
        "completeness_error_relative": {m: {"median": float(torch.tensor(v).median()), "max": max(v)}
                                        for m, v in notes["completeness_relative"].items()},
        "conductance_at_input_vs_ig_stieltjes_max_relative": conductance_vs_ig,
        "share_of_abs_attribution_on_already_blank_pixels": {m: a / b for m, (a, b) in notes["on_blank_pixels"].items()},
        "share_of_pixels_already_blank": float((x == blank).double().mean()),
        "blank_probability_of_predicted_class": summary(ends["blank"]),
        "full_probability_of_predicted_class": summary(ends["full"]),
        "accuracy": float((predicted == labels).double().mean()),
    }
    results["machine"] = {"device": device_label("cpu"), "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "attrib": attrib.__version__, "python": platform.python_version(), "platform": platform.platform(),
                          "images": len(targets), "steps": args.steps, "patch_steps": args.patch_steps,
                          "pixel_steps": args.pixel_steps, "curve_seconds": curve_seconds,
                          "seconds": time.perf_counter() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "faithfulness.json").write_text(json.dumps(results, indent=1))
    figure(results, out / "faithfulness_curves.png")
    text = markdown(results)
    (out / "faithfulness.md").write_text(text)
    print(text)


def figure(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey=True)
    for column, units in enumerate(UNITS):
        xs = results["fractions"][units]
        for row, mode in enumerate(("deletion", "insertion")):
            ax = axes[row, column]
            for method, label in METHODS.items():
                r = results["methods"][method][f"{mode}_{units}"]
                style = ":" if method in ("random", "gradient_x_input_minus_blank") else "-"
                ax.plot(xs, results["curves"][method][f"{mode}_{units}"], style, label=f"{label} ({r['mean']:.3f})")
            ax.set_title(f"{mode}, {units} ({'lower' if mode == 'deletion' else 'higher'} area is better)")
            ax.set_xlabel(f"fraction of {units} {'removed' if mode == 'deletion' else 'inserted'}")
            ax.set_ylabel("probability of the predicted class")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    fig.suptitle(f"Tiny ViT on {results['machine']['images']} held-out digits: mean curves (area in brackets)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cell(r: dict) -> str:
    return f"{r['mean']:.3f} ± {r['se']:.3f}"


def markdown(r: dict) -> str:
    m, d = r["machine"], r["diagnostics"]
    lines = [
        "# Faithfulness on the tiny ViT: deletion and insertion curves",
        "",
        f"Produced by `python benchmarks/faithfulness.py` on {m['device']}, {m['threads']} thread(s), torch {m['torch']}: "
        f"{m['seconds']:.0f} s in all ({m['curve_seconds']:.0f} s of it for the curves).",
        "",
        f"Model: the embedded `load_digits_vit()` (4 blocks, 4 heads, 64 patches of 4×4 + the class token). Data: the first "
        f"{m['images']} held-out digits of the CNN's split (stratified 75/25, random_state 0; accuracy "
        f"{d['accuracy']:.4f}). Target: the predicted class; its softmax probability is "
        f"{cell(d['full_probability_of_predicted_class'])} on the digits and {cell(d['blank_probability_of_predicted_class'])} "
        "on the blank digit.",
        "",
        f"Each method's map orders the units (most positive first). Deletion replaces them by the blank digit "
        f"(`preprocess(zeros)`), insertion puts them back into the blank digit; patches one at a time ({m['patch_steps']} "
        f"steps), pixels in {m['pixel_steps']} equal steps of the 1024. Area under the mean-probability curve by the "
        "trapezoid rule over the fraction 0..1, mean ± standard error over the digits. Deletion: lower is better; "
        "insertion: higher is better. A patch's score is the sum of its pixels' scores; attention rollout has one score "
        "per patch, given to each of its pixels (so on pixels it removes whole patches, in index order within one).",
        "",
        f"Settings: integrated gradients: Gauss-Legendre, {m['steps']} steps, baseline the blank digit; conductance at the "
        f"input: `LayerConductance(model, 'conv_proj')` with `attribute_to_layer_input=True`, the stieltjes_trapezoid rule, "
        f"{m['steps']} steps, the same baseline (the input layer's conductance is integrated gradients in Riemann-Stieltjes "
        f"form: it equals `IntegratedGradients(..., method='stieltjes_trapezoid')` to "
        f"{d['conductance_at_input_vs_ig_stieltjes_max_relative']:.1e} of the largest value on 10 digits); LRP: the "
        "composites as `attrib explain --model digits-vit` builds them (ε = 1e-6; z^B on conv_proj, bounded by the grey "
        "levels 0 and 16; the class token and the position embedding keep their shares, as constants), starting from "
        "the logit; gradient × input: "
        "the gradient times the normalised input (whose 0 is the mean grey level, not the blank digit); attention "
        "rollout: the paper's (mean over heads, 0.5 A + 0.5 I, no discarding). Random: one random order per digit "
        "(seed 0).",
        "",
        "| method | deletion, patches ↓ | insertion, patches ↑ | deletion, pixels ↓ | insertion, pixels ↑ | "
        f"time for {m['images']} digits |",
        "|---|---|---|---|---|---|",
    ]
    for method, label in METHODS.items():
        row = r["methods"][method]
        time_cell = "–" if row["seconds"] is None else f"{row['seconds']:.2f} s"
        lines.append(f"| {label} | {cell(row['deletion_patches'])} | {cell(row['insertion_patches'])} | "
                     f"{cell(row['deletion_pixels'])} | {cell(row['insertion_pixels'])} | {time_cell} |")
    lines += ["", "![mean curves](faithfulness_curves.png)", "",
              "## Do the LRP variants beat gradient × input on deletion?", "",
              "Paired over the digits: the method's area minus gradient × input's (mean ± standard error; negative is better "
              "for deletion, positive for insertion) and on how many digits the method is better or worse (the rest "
              "tie).", "",
              "| method | deletion, patches | deletion, pixels | insertion, patches | insertion, pixels |", "|---|---|---|---|---|"]
    verdicts = []
    for method in COMPARED:
        c = r["versus_input_x_gradient"][method]
        lines.append(f"| {METHODS[method]} | " + " | ".join(
            f"{c[k]['mean']:+.3f} ± {c[k]['se']:.3f} (better on {c[k]['digits_better']}, worse on {c[k]['digits_worse']})"
            for k in ("deletion_patches", "deletion_pixels", "insertion_patches", "insertion_pixels")) + " |")
        for units in UNITS:
            k = f"deletion_{units}"
            mine, theirs = r["methods"][method][k], r["methods"]["input_x_gradient"][k]
            diff = c[k]
            significant = abs(diff["mean"]) > 2 * diff["se"]
            if not significant:
                verdict = "no clear difference from gradient × input"
            else:
                verdict = ("beats" if diff["mean"] < 0 else "is worse than") + " gradient × input"
            verdicts.append(f"- {METHODS[method]}, {units}: {cell(mine)} against {cell(theirs)}: {verdict} "
                            f"(paired difference {diff['mean']:+.3f} ± {diff['se']:.3f}, "
                            f"{'more' if significant else 'less'} than two standard errors; better on "
                            f"{diff['digits_better']}, worse on {diff['digits_worse']} of {m['images']} digits).")
    lines += ["", *verdicts, ""]
    lrp = d["lrp_input_relevance_over_logit"]
    lines += ["## Diagnostics", "",
              "- LRP conservation: input relevance / logit, mean ± s.e. (min, max) over the digits: " + "; ".join(
                  f"{METHODS[c]} {v['mean']:.3f} ± {v['se']:.3f} ({v['min']:.3f}, {v['max']:.3f})" for c, v in lrp.items())
              + ". Maps with a NaN: " + ", ".join(f"{METHODS[c]} {n}" for c, n in d["lrp_maps_with_nan"].items()) + ".",
              "- Completeness error |Σ attributions − (F(x) − F(x′))| / |F(x) − F(x′)|, median (max): " + "; ".join(
                  f"{METHODS[k]} {v['median']:.2g} ({v['max']:.2g})" for k, v in d["completeness_error_relative"].items())
              + ".",
              f"- {d['share_of_pixels_already_blank']:.1%} of the input pixels already equal the blank digit (the "
              "background), so deleting them changes nothing. Share of each method's |attribution| that lies on them: "
              + "; ".join(f"{METHODS[k]} {v:.1%}" for k, v in d["share_of_abs_attribution_on_already_blank_pixels"].items())
              + ". Integrated gradients and conductance from the blank digit give them exactly 0 (x − x′ = 0 there); "
              "gradient × input, LRP's first-layer rules and rollout do not, so on pixels part of their deletion steps "
              "change nothing (compare gradient × input with gradient × (input − blank)).", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
