"""The ``attrib`` command: ``explain``, ``audit``, ``layers``, ``bench``.

Bad input (a missing or unreadable file, an unknown model, layer or method, a target out of range,
weights that do not fit, an ``--out`` attrib must not replace) ends the run with one line on stderr
and exit status 2, before any work starts; any other exception is a bug and keeps its traceback
(exit 1). ``explain`` writes into a hidden staging folder beside ``--out`` and renames it into place
only when everything is written (:mod:`attrib.report_folder`): an existing ``--out`` is replaced only
when attrib wrote it, and Ctrl-C or ``kill`` leaves nothing behind.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

METHODS = ("conductance", "ascent", "gradcam", "deeplift", "lrp", "ig", "guided", "deconv", "graph")
SPATIAL = {"ascent": "conductance ascent", "gradcam": "Grad-CAM", "deconv": "deconvolution"}  # need (B, C, H, W) at the layer
LRP_COMPOSITE = "epsilon_plus"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2
        print(f"attrib: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _methods(text: str | None) -> list[str]:
    if text is None:
        return list(METHODS)
    chosen = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))  # in order, once each
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        from .errors import InputError

        raise InputError(f"--methods: unknown {unknown or text!r}; choose from {', '.join(METHODS)}")
    return chosen


def _progress(total: int, quiet: bool, what: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=quiet, desc=what, unit="step", leave=False, file=sys.stderr)


def _relative(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def _check(method: str, where: str, value: float, reference: float, reference_name: str, tolerance: float,
           note: str = "") -> dict:
    """A completeness/conservation row: ``value`` should equal ``reference`` (named, e.g. F(x) - F(x'))."""
    error = _relative(float(value), float(reference))
    return {"method": method, "where": where, "value": float(value), "reference": float(reference),
            "reference_name": reference_name, "relative_error": error, "tolerance": tolerance,
            "passed": error <= tolerance, "note": note}


def _share(method: str, where: str, value: float, reference: float, reference_name: str = "F(x) - F(x')",
           short: str = "not a cut: share of F(x) - F(x')",
           note: str = "not a cut (a skip connection or another branch bypasses it): its conductance is the share of "
                       "the score change that flows through it, not a completeness check") -> dict:
    """A row that is information, not a check (no pass/fail): ``value`` as a share of ``reference``."""
    return {"method": method, "where": where, "value": float(value), "reference": float(reference),
            "reference_name": reference_name, "relative_error": None, "tolerance": None, "passed": None,
            "share": float(value) / float(reference) if float(reference) else float("nan"), "short": short, "note": note}


def _lrp_row(name: str, report) -> dict:
    """LRP: the share of F(x) (where the backward pass starts) that reaches the input, with where the
    rest went. Information, not a check: biases and the rules' epsilon absorb relevance by design
    (``attrib audit`` checks conservation layer by layer where a layer has no bias)."""
    start, arrived = float(report.start[0]), float(report.input[0])
    worst = report.worst(0)
    note = (f"{100 * arrived / start:.1f}% of F(x) reaches the input" if start else "F(x) = 0")
    if abs(arrived - start) > 1e-6 * max(abs(start), 1e-12):
        note += (f"; the rest is absorbed by biases and the rules' epsilon (most at {worst.name}: "
                 f"{float(worst.difference[0]):+.3g}), which LRP does by design")
    return _share(f"LRP {name}", "input", arrived, start, "F(x)", short="reaches the input: share of F(x)", note=note)


def _baseline(loaded, x):
    """A black image in the model's normalised space (pixel value 0)."""
    import torch

    if loaded.mean:
        mean = torch.tensor(loaded.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(loaded.std, dtype=x.dtype).view(1, -1, 1, 1)
        return ((torch.zeros_like(x) - mean) / std).expand_as(x).clone()
    return torch.zeros_like(x)


def _target(args, output) -> int:
    classes = output.shape[1]
    if args.target is None:
        return int(output.argmax(1))
    if not -classes <= args.target < classes:
        from .errors import InputError

        raise InputError(f"--target: {args.target} is out of range for {classes} classes (use 0..{classes - 1}, or "
                         "-1 for the last)")
    return args.target % classes


LARGE = 65  # inputs from this size up (ImageNet models) get the lighter defaults, so a 224 px image takes about a minute


def _size_defaults(size: int) -> dict[str, int]:
    """The explain settings for an input size: the same methods, fewer ascent iterations, ascent
    steps and K on large inputs (the report shows the values used)."""
    if size < LARGE:
        return {"n_steps": 32, "steps": 30, "ascent_n_steps": 8, "max_k": 100}
    return {"n_steps": 16, "steps": 6, "ascent_n_steps": 4, "max_k": 11}  # 11 K-path maps + the full one: 2 passes of k=6


def _settle(args, size: int) -> None:
    """Fill the settings left to their size-dependent default; check every count."""
    from .engine import check_count

    for name, value in _size_defaults(size).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("n_steps", "ascent_n_steps", "max_k", "k"):
        check_count(f"--{name.replace('_', '-')}", getattr(args, name))
    check_count("--steps", args.steps, minimum=0)


def _load(args):
    from .inputs import load_model

    return load_model(args.model, args.weights, channels=args.channels, size=args.input_size, mean=args.mean,
                      std=args.std, output=args.output)


def _file_safe(name: str, most: int = 60) -> str:
    """A picture's name as part of a file name: letters, digits, '.', '-', '_' (others become '_'),
    at most ``most`` characters (the HTML shows the real name)."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:most] or "image"


@contextmanager
def _timed(timings: dict, part: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[part] = timings.get(part, 0.0) + time.perf_counter() - started


LAYERED = ("conductance", "ascent", "gradcam", "deconv")  # the methods that explain a layer


def _plan(args, loaded, pictures, layer: str | None, methods: list[str], explicit: bool) -> tuple[list[str], dict[str, str]]:
    """Every method's preconditions, checked before any work starts: the methods to run and, for
    the others, why not. A method the user named that cannot run is an error; one of the default
    set is skipped with its reason (shown in the report)."""
    import torch

    from . import DeconvReconstruction
    from .cuts import CONVOLUTIONS
    from .errors import InputError
    from .hooks import capture
    from .lrp import LRP

    model, x = loaded.model, pictures[0].tensor
    reasons: dict[str, str] = {}
    if layer is None:
        reasons.update({m: "no convolution runs in this model, so there is no default layer; name one with --layer "
                           "(`attrib layers` lists them)" for m in LAYERED})
        shape: tuple = ()
    else:
        with capture(model, [layer]) as cap, torch.no_grad():
            model(x.clone())
            if layer not in cap.captured:
                raise InputError(f"--layer: {layer!r} does not run in the model's forward pass; `attrib layers` lists those "
                                 "that do")
            shape = tuple(cap[layer].shape[1:])
        module = dict(model.named_modules())[layer]
    if layer is not None and len(shape) < 2:
        for method in SPATIAL:
            reasons[method] = (f"--layer {layer} ({type(module).__name__}) gives ({', '.join(map(str, shape))},) per example, "
                               f"without spatial dimensions; {SPATIAL[method]} needs a convolutional layer")
    if "deconv" in methods and "deconv" not in reasons and layer is not None:
        try:
            DeconvReconstruction(model).attribute(x, layer=layer, neuron_selector=(0,) + (slice(None),) * (len(shape) - 1))
        except InputError as error:
            reasons["deconv"] = f"deconvolution: {error}"
            inner = [n for n, m in module.named_modules() if n and isinstance(m, CONVOLUTIONS)]
            if inner:  # a block: the reason it cannot be reconstructed through, rather than "a container"
                try:
                    DeconvReconstruction(model).attribute(x, layer=f"{layer}.{inner[-1]}", neuron_selector=(0,))
                except InputError as deeper:
                    reasons["deconv"] += f"; and inside it: {deeper}"
    if "lrp" in methods or "graph" in methods:
        try:
            LRP(model, LRP_COMPOSITE).attribute(x, target=0, conservation=False)
        except InputError as error:
            for method in ("lrp", "graph"):
                reasons[method] = f"LRP ({LRP_COMPOSITE}): {error}"
    refused = [m for m in methods if m in reasons]
    if explicit and refused:
        raise InputError(f"--methods: {reasons[refused[0]]}")
    return [m for m in methods if m not in reasons], {m: reasons[m] for m in refused}


def _explain_one(args, loaded, picture, output, layer, methods, is_cut: bool, folder: Path, index: int, bar) -> dict:
    import torch

    from . import (DeconvReconstruction, DeepLift, GradCAM, GuidedBackprop, IntegratedGradients, LayerConductance,
                   conductance_ascent)
    from attrib.viz import figures

    from .lrp import LRP
    from .result import filter_scores

    model, x = loaded.model, picture.tensor
    probabilities = torch.softmax(output, 1)[0]
    top = torch.topk(probabilities, min(5, probabilities.numel()))
    target = _target(args, output)
    base = _baseline(loaded, x)
    stem = f"{index:02d}_{_file_safe(picture.name)}"
    shown = dict(mean=loaded.mean or None, std=loaded.std or None)
    timings: dict[str, float] = {}
    entry: dict[str, Any] = {
        "name": picture.name, "label": picture.label, "target": target, "input": picture.record,
        "prediction": {"class": int(top.indices[0]), "probability": float(top.values[0]),
                       "top": [[int(c), float(p)] for c, p in zip(top.indices, top.values)]},
        "checks": [], "figures": [], "notes": [], "seconds": timings,
    }
    grid: dict[str, Any] = {}
    tolerance = args.tolerance

    def figure(name: str, title: str, fig) -> None:
        file = f"{stem}_{name}.png"
        with _timed(timings, "figures"):
            figures.save(fig, folder / file)
        entry["figures"].append({"file": file, "title": title})

    if "conductance" in methods or "ascent" in methods or "deconv" in methods:
        with _timed(timings, "conductance"):
            result = LayerConductance(model, layer).attribute(x, target=target, baselines=base, n_steps=args.n_steps)
            conductance = result[layer]
            scores = filter_scores(conductance, "max")[0] if conductance.dim() > 2 else conductance[0]
            order = torch.argsort(scores, descending=True)[:5].tolist()
        change = float(result.outputs - result.baseline_outputs)
        entry["top_filters"] = [{"filter": c, "conductance": float(scores[c])} for c in order]
        entry["checks"].append(_check("layer conductance", layer, float(conductance.sum()), change, "F(x) - F(x')", tolerance)
                               if is_cut else _share("layer conductance", layer, float(conductance.sum()), change))
        entry["checks"][-1]["n_steps"] = args.n_steps
        if "conductance" in methods:
            figure("conductance", f"aggregated conductance (max over H x W) of every filter of {layer}; red: the top filter, "
                   "which the conductance ascent and the deconvolution use",
                   figures.conductance_distribution(scores, layer=layer))
            bar.update(1)
    if "ascent" in methods:
        with _timed(timings, "ascent"):
            ascent = conductance_ascent(model, x, layer=layer, target=target, filter=order[0], steps=args.steps, lr=0.1,
                                        n_steps=args.ascent_n_steps, baselines=base, bounds=loaded.bounds)
        entry["ascent"] = {"filter": int(ascent.filter[0]), "objective": ascent.objective[:, 0].tolist(),
                           "neuron": ascent.neuron[0].tolist(), "iterations": args.steps, "n_steps": args.ascent_n_steps,
                           "lr": 0.1}
        figure("ascent", f"conductance ascent on filter {int(ascent.filter[0])} of {layer} (the top filter of the conductance "
               f"chart; {args.steps} Adam steps at lr 0.1, objective from {args.ascent_n_steps}-step conductance): original | "
               "optimised image | gradient effect of its strongest neuron (|d neuron / d input|; cyan outline: where it is "
               "not zero, the neuron's receptive field)",
               figures.ascent_triptych(x[0], ascent.image[0], ascent.gradient_effect[0], **shown))
        bar.update(1)
    if "gradcam" in methods:
        with _timed(timings, "gradcam"):
            grid["Grad-CAM"] = GradCAM(model, layer).attribute(x, target=target).attributions[0]
        bar.update(1)
    if "deeplift" in methods:
        with _timed(timings, "deeplift"):
            result = DeepLift(model).attribute(x, target=target, baselines=base)
        grid["DeepLIFT"] = result.attributions[0]
        entry["checks"].append(_check("DeepLIFT", "input", float(result.attributions.sum()),
                                      float(result.outputs - result.baseline_outputs), "F(x) - F(x')", tolerance))
        bar.update(1)
    if "lrp" in methods:
        with _timed(timings, "lrp"):
            result = LRP(model, LRP_COMPOSITE).attribute(x, target=target)
        grid["LRP"] = result.attributions[0]
        report = result.info["conservation"]
        entry["checks"].append(_lrp_row(LRP_COMPOSITE, report))
        entry["lrp_layers"] = [{"layer": r.name, "rule": r.rule, "entering": float(r.entering[0]), "leaving": float(r.leaving[0])}
                               for r in report.rows]
        bar.update(1)
    if "ig" in methods:
        with _timed(timings, "ig"):
            result = IntegratedGradients(model).attribute(x, target=target, baselines=base, n_steps=args.n_steps)
        grid["integrated gradients"] = result.attributions[0]
        entry["checks"].append(_check("integrated gradients", "input", float(result.attributions.sum()),
                                      float(result.outputs - result.baseline_outputs), "F(x) - F(x')", tolerance))
        entry["checks"][-1]["n_steps"] = args.n_steps
        bar.update(1)
    if grid:
        figure("grid", "attributions (blue < 0 < red; Grad-CAM, which is never negative, from 0; each panel on its own "
               "scale, clipped at the 99th percentile of its |a|, as its colour bar says)",
               figures.method_grid(x[0], grid, signed={"Grad-CAM": False}, **shown))
    if "guided" in methods:
        with _timed(timings, "guided"):
            guided = GuidedBackprop(model).attribute(x, target=target).attributions[0]
        fig = figures.method_grid(x[0], {"guided backprop": guided}, signed={"guided backprop": False}, **shown)
        figure("guided", "guided backpropagation (absolute)", fig)
        bar.update(1)
    if "deconv" in methods:
        with _timed(timings, "deconv"):
            maps = {}
            for channel in entry["top_filters"][:3]:
                c = channel["filter"]
                maps[f"filter {c}"] = DeconvReconstruction(model).attribute(
                    x, layer=layer, neuron_selector=(c,) + (slice(None),) * (conductance.dim() - 2)).attributions[0]
        figure("deconv", f"deconvolution reconstructions of the top filters of {layer} by aggregated conductance "
               "(each min-max rescaled)", figures.reconstructions(x[0], maps, **shown))
        bar.update(1)
    if "graph" in methods:
        _graph(args, model, x, target, entry, figure, folder, stem, shown, timings)
        bar.update(1)
    return entry


def _graph(args, model, x, target, entry, figure, folder, stem, shown, timings) -> None:
    from attrib import graphs
    from attrib.viz import figures
    from attrib.viz.graph import draw_graph, draw_k_curves

    with _timed(timings, "graph"):
        flow = graphs.build_graph(model, x, target=target, k=args.k, conductance_steps=None)
        paths = graphs.k_best_paths(flow, 5)
    entry["paths"] = [{"nodes": [graphs.node_id(n) for n in p.nodes], "score": p.score, "carried": p.carried} for p in paths]
    figure("graph", f"relevance flow between the top {args.k} channels of each layer; red: the 5 critical paths",
           draw_graph(flow, paths))
    with _timed(timings, "k-paths"):
        curves = graphs.k_curves(flow, max_k=args.max_k)  # every K-path map and the full one, batched
    chosen = curves.choose(args.distance)
    ks = sorted({k for k in (1, 5, 25, len(curves.ks), chosen) if k is not None and 1 <= k <= len(curves.ks)})
    full, kmaps = curves.full_map, {k: curves.maps[k - 1] for k in ks}
    scale = figures.k_path_scale(full, kmaps)
    figure("kpaths", "full LRP heatmap and K-path heatmaps (channels off the K best paths masked in the backward pass). "
           + scale.caption, figures.k_path_heatmaps(x[0], full, kmaps, scale=scale, **shown))
    entry["k_curve"] = {"ks": curves.ks, "heatmap_distance": curves.heatmap_distance, "heatmap_share": curves.heatmap_share,
                        "score_share": curves.score_share, "full_relevance": curves.full_relevance,
                        "full_score": curves.full_score, "score_mse": curves.score_mse, "score_smape": curves.score_smape,
                        "heatmap_mse": curves.heatmap_mse, "heatmap_smape": curves.heatmap_smape,
                        "chosen_k": chosen, "distance_threshold": args.distance, "plateau_k": curves.plateau()}
    entry["k_path_scale"] = {"limit": scale.limit, "shares": {str(k): v for k, v in scale.shares.items()},
                             "distances": {str(k): v for k, v in scale.distances.items()}}
    figure("kcurves", "shape distance of the K-path heatmap to the full one (each map / its L1 norm; 0 same shape, 2 nothing "
           "in common) and the share of relevance and score the K paths carry, against K",
           draw_k_curves(curves, threshold=args.distance))
    with _timed(timings, "figures"):
        graphs.write_json(flow, folder / f"{stem}_graph.json")
        graphs.write_graphml(flow, folder / f"{stem}_graph.graphml")


def _layer_name(model, given: str | None, x) -> str | None:
    """``--layer`` resolved in the model (errors named as the option), or the default layer."""
    from .cuts import default_layer
    from .errors import InputError
    from .hooks import resolve_layers

    if given is None:
        return default_layer(model, x)
    try:
        return resolve_layers(model, given)[0][0]
    except InputError as error:
        raise InputError(f"--layer: {str(error).split(': ', 1)[-1]}") from None


def explain(args) -> int:
    import torch

    from .cuts import cut_layers
    from .inputs import check_forward, load_pictures
    from .report_folder import check_out, staged
    from attrib.viz.report import write_html

    started = time.perf_counter()
    _check_numbers(args)
    out = check_out(args.out)  # before anything else: never work towards an output that would be refused
    methods = _methods(args.methods)
    with staged(out) as staging:  # made now: a place that cannot be written is refused before any work
        torch.manual_seed(0)
        loaded = _load(args)
        _settle(args, loaded.size)
        pictures = load_pictures(args.images, loaded)
        outputs = [check_forward(loaded, picture) for picture in pictures]
        for output in outputs:  # bad shapes and targets stop the run before any work
            _target(args, output)
        x = pictures[0].tensor
        layer = _layer_name(loaded.model, args.layer, x)
        is_cut = cut_layers(loaded.model, x, [layer])[layer] if layer is not None else None
        methods, skipped = _plan(args, loaded, pictures, layer, methods, explicit=args.methods is not None)
        setup = time.perf_counter() - started
        with _progress(len(pictures) * len(methods), args.quiet, "explain") as bar:
            images = [_explain_one(args, loaded, p, output, layer, methods, is_cut, staging, i, bar)
                      for i, (p, output) in enumerate(zip(pictures, outputs))]
        report = {
            "model": {"name": loaded.name, "weights": loaded.weights, "notes": loaded.notes, "output": loaded.output,
                      "input": {"channels": loaded.channels, "size": loaded.size, "mean": list(loaded.mean),
                                "std": list(loaded.std)}},
            "layer": layer, "layer_is_cut": is_cut, "methods": methods, "skipped": skipped, "tolerance": args.tolerance,
            "settings": {"n_steps": args.n_steps, "ascent_iterations": args.steps, "ascent_n_steps": args.ascent_n_steps,
                         "k": args.k, "max_k": args.max_k, "distance": args.distance, "lrp_composite": LRP_COMPOSITE},
            "images": images, "seconds": time.perf_counter() - started, "setup_seconds": setup, "argv": sys.argv[1:],
        }
        (staging / "report.json").write_text(json.dumps(report, indent=1))
        write_html(report, staging)
    if not args.quiet:
        for method, reason in skipped.items():
            print(f"attrib: skipped {method}: {reason}", file=sys.stderr)
        print(f"wrote {out / 'index.html'} ({len(images)} images, {report['seconds']:.1f} s)")
    return 0


def _check_numbers(args) -> None:
    """Tolerances and thresholds are finite numbers in their range (NaN would mark every check failed);
    the normalisation's numbers are checked where the model is loaded."""
    import math

    from .errors import InputError

    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise InputError(f"--tolerance: must be a finite number >= 0, got {args.tolerance}")
    if getattr(args, "distance", None) is not None and not (math.isfinite(args.distance) and 0 <= args.distance <= 2):
        raise InputError(f"--distance: must be a number from 0 to 2 (the shape distance's range), got {args.distance}")


def audit(args) -> int:
    import torch.nn as nn

    from . import DeepLift, IntegratedGradients, LayerConductance
    from .cuts import CONVOLUTIONS, cut_layers
    from .inputs import check_forward, load_pictures
    from .lrp import LRP

    _check_numbers(args)
    loaded = _load(args)
    pictures = load_pictures(args.images, loaded)
    targets = [_target(args, check_forward(loaded, picture)) for picture in pictures]
    layers = [n for n, m in loaded.model.named_modules() if isinstance(m, CONVOLUTIONS + (nn.Linear,))]
    cuts = cut_layers(loaded.model, pictures[0].tensor, layers)
    tolerance = args.tolerance
    rows = []
    for picture, target in zip(pictures, targets):
        x, base = picture.tensor, _baseline(loaded, picture.tensor)
        result = IntegratedGradients(loaded.model).attribute(x, target=target, baselines=base, n_steps=args.n_steps)
        change = float(result.outputs - result.baseline_outputs)
        rows.append((picture.name, _check("integrated gradients", "input", float(result.attributions.sum()), change,
                                          "F(x) - F(x')", tolerance)))
        result = DeepLift(loaded.model).attribute(x, target=target, baselines=base)
        rows.append((picture.name, _check("DeepLIFT", "input", float(result.attributions.sum()), change, "F(x) - F(x')", tolerance)))
        result = LayerConductance(loaded.model, layers).attribute(x, target=target, baselines=base, n_steps=args.n_steps)
        for name in layers:
            value = float(result[name].sum())
            rows.append((picture.name, _check("layer conductance", name, value, change, "F(x) - F(x')", tolerance) if cuts[name]
                         else _share("layer conductance", name, value, change)))
        report = LRP(loaded.model, args.composite).attribute(x, target=target).info["conservation"]
        start = float(report.start[0])
        modules = dict(loaded.model.named_modules())
        for row in report.rows:
            difference = float(row.difference[0])
            module = modules.get(row.name.split("#")[0])
            if "+" in row.name or getattr(module, "bias", None) is not None:  # a bias absorbs relevance by design
                rows.append((picture.name, _share(f"LRP {args.composite}", row.name, -difference, start, "F(x)",
                                                  "absorbed by its bias and epsilon: share of F(x)",
                                                  "the layer has a bias, which LRP lets absorb relevance by design")))
            else:  # no bias: what enters must leave (up to epsilon)
                rows.append((picture.name, _check(f"LRP {args.composite}", row.name, difference + start, start, "F(x)", tolerance)))
        rows.append((picture.name, _lrp_row(args.composite, report)))
    width = max(len(f"{c['method']} @ {c['where']}") for _, c in rows)
    checked = [check for _, check in rows if check["passed"] is not None]
    failed = sum(not check["passed"] for check in checked)
    print(f"{'image':<12} {'check':<{width}}  {'relative error':>14}  ok")
    for name, check in rows:
        label = f"{check['method']} @ {check['where']}"
        if check["passed"] is None:
            print(f"{name:<12} {label:<{width}}  {'share ' + format(check['share'], '.3f'):>14}  -  ({check['short']})")
        else:
            print(f"{name:<12} {label:<{width}}  {check['relative_error']:>14.3e}  {'yes' if check['passed'] else 'NO'}")
    bypassed = sum(check["passed"] is None and check["method"] == "layer conductance" for _, check in rows)
    biased = len(rows) - len(checked) - bypassed
    print(f"{failed} of {len(checked)} checks above the tolerance {tolerance:g}"
          + (f"; {bypassed} conductance rows are at layers that are not cuts (skip connections or branches bypass them), "
             "so they are shares of F(x) - F(x'), not checks" if bypassed else "")
          + (f"; {biased} LRP rows are layers with a bias, which absorbs relevance by design (shares of F(x))" if biased else ""))
    return 1 if failed else 0


def layers(args) -> int:
    import torch

    from .errors import InputError
    from .inputs import SHAPE_ERRORS, first_line

    loaded = _load(args)
    shapes: dict[str, tuple] = {}

    def record(name: str):
        def hook(module, args, output) -> None:
            if isinstance(output, torch.Tensor):
                shapes.setdefault(name, tuple(output.shape[1:]))
        return hook

    handles = [module.register_forward_hook(record(name))
               for name, module in loaded.model.named_modules() if name and not list(module.children())]
    size = (1, loaded.channels, loaded.size, loaded.size)
    try:
        with torch.no_grad():
            loaded.model(torch.zeros(size))
    except SHAPE_ERRORS as error:
        raise InputError(f"--model: {args.model} does not accept input of shape {size} ({first_line(error)}); give its input "
                         "with --channels and --input-size (or declare them in the factory's attrib_input)") from None
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(loaded.model.named_modules())
    print(f"input {size[1:]}")
    for name, shape in shapes.items():
        print(f"{name:<32} {type(modules[name]).__name__:<20} {shape}")
    return 0


def bench(args) -> int:
    from .errors import InputError

    folder = Path(args.dir)
    scripts = {"conductance": "conductance.py", "lrp": "lrp.py", "gradients": "gradients.py", "graphs": "path_graphs.py",
               "evaluation": "evaluation.py", "explain": "explain_speed.py"}
    chosen = list(scripts) if args.only is None else [s.strip() for s in args.only.split(",")]
    unknown = [s for s in chosen if s not in scripts]
    if unknown:
        raise InputError(f"--only: unknown {unknown}; choose from {', '.join(scripts)}")
    missing = [scripts[s] for s in chosen if not (folder / scripts[s]).is_file()]
    if missing:
        raise InputError(f"--dir: {folder} does not hold {missing} (run from the repository root or pass --dir)")
    for name in chosen:
        print(f"[bench] {name}", flush=True)
        code = subprocess.call([sys.executable, scripts[name]], cwd=folder)
        if code:
            return code
    return 0


def _numbers(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _key(text: str) -> str | int:
    return int(text) if text.lstrip("-").isdigit() else text


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="attrib", description="Attribution for PyTorch models: explain, audit, list layers, benchmark.")
    commands = top.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_options(p, images: bool = True):
        if images:
            p.add_argument("images", nargs="*", help="image files, or chelsea/coffee/astronaut/rocket (scikit-image); "
                                                     "default: the model's own samples")
            p.add_argument("--target", type=int, default=None,
                           help="class to explain (default: the predicted one; negative counts from the last)")
            p.add_argument("--quiet", action="store_true", help="no progress bars")
        else:
            p.add_argument("model", help="digits, a torchvision name, or package.module:factory")
        if images:
            p.add_argument("--model", default="digits", help="digits (embedded), a torchvision name, or package.module:factory")
        p.add_argument("--weights", default=None, help="a state-dict file, or DEFAULT (embedded / local torch cache; never downloaded)")
        custom = p.add_argument_group("custom models (package.module:factory); these override what the factory declares")
        custom.add_argument("--channels", type=int, default=None, help="input channels (default 3)")
        custom.add_argument("--input-size", type=int, default=None, dest="input_size", help="input height = width (default 224)")
        custom.add_argument("--mean", type=_numbers, default=None, help="per-channel mean of the normalisation, e.g. 0.5,0.5,0.5")
        custom.add_argument("--std", type=_numbers, default=None, help="per-channel std of the normalisation")
        custom.add_argument("--output", type=_key, default=None, help="key (dict) or index (tuple) of the scores to explain")

    p = commands.add_parser("explain", help="write figures, report.json and index.html")
    model_options(p)
    p.add_argument("--methods", default=None, help=f"comma-separated from {', '.join(METHODS)} (default: all that apply)")
    p.add_argument("--layer", default=None, help="layer for conductance, Grad-CAM, ascent, deconvolution (default: the last "
                                                  "convolution, or the block around it that every path crosses)")
    p.add_argument("--out", default="attrib-report", help="output folder: created, or replaced only if attrib wrote it")
    p.add_argument("--n-steps", type=int, default=None, dest="n_steps",
                   help=f"integration steps of IG and conductance (default {_size_defaults(0)['n_steps']}; "
                        f"{_size_defaults(LARGE)['n_steps']} for inputs over {LARGE - 1} px)")
    p.add_argument("--steps", type=int, default=None, help=f"conductance-ascent iterations (default {_size_defaults(0)['steps']}; "
                                                            f"{_size_defaults(LARGE)['steps']} for inputs over {LARGE - 1} px)")
    p.add_argument("--ascent-n-steps", type=int, default=None, dest="ascent_n_steps",
                   help=f"conductance steps inside each ascent iteration (default {_size_defaults(0)['ascent_n_steps']}; "
                        f"{_size_defaults(LARGE)['ascent_n_steps']} for inputs over {LARGE - 1} px)")
    p.add_argument("--k", type=int, default=6, help="channels per layer in the path graph")
    p.add_argument("--max-k", type=int, default=None, dest="max_k",
                   help=f"largest K on the K-path curves (default {_size_defaults(0)['max_k']}; "
                        f"{_size_defaults(LARGE)['max_k']} for inputs over {LARGE - 1} px)")
    p.add_argument("--distance", type=float, default=1.0,
                   help="shape distance (0..2) of the unit-L1 K-path and full heatmaps at which K is chosen")
    p.add_argument("--tolerance", type=float, default=0.05, help="largest relative completeness error marked as passed")
    p.set_defaults(run=explain)

    p = commands.add_parser("audit", help="completeness and conservation errors; exit 1 above the tolerance")
    model_options(p)
    p.add_argument("--tolerance", type=float, default=0.05, help="largest relative error accepted")
    p.add_argument("--n-steps", type=int, default=64, dest="n_steps", help="integration steps")
    p.add_argument("--composite", default="epsilon", help="LRP composite")
    p.set_defaults(run=audit)

    p = commands.add_parser("layers", help="layer names and output shapes (what --layer takes)")
    model_options(p, images=False)
    p.set_defaults(run=layers)

    p = commands.add_parser("bench", help="run the benchmark scripts (repository checkout)")
    p.add_argument("--dir", default="benchmarks", help="folder with the benchmark scripts")
    p.add_argument("--only", default=None, help="comma-separated: conductance, lrp, gradients, graphs, evaluation, explain")
    p.set_defaults(run=bench)
    return top


def main(argv: list[str] | None = None) -> int:
    """Run the command; bad input (:class:`attrib.errors.InputError`) is one line and status 2, an
    interrupt (Ctrl-C, SIGTERM, SIGHUP) 128 + the signal, anything else a bug with its traceback."""
    import signal

    from .errors import InputError
    from .report_folder import Terminated, termination_as_interrupt

    try:
        with termination_as_interrupt():  # first: an interrupt during the heavy imports is handled too
            args = parser().parse_args(argv)
            return args.run(args)
    except InputError as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"attrib: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        number = interrupt.signum if isinstance(interrupt, Terminated) else signal.SIGINT
        written = getattr(interrupt, "written", None)
        outcome = (f"it came as the report was moved into place, so {written} holds the complete new report" if written
                   else "no partial report was left behind")
        print(f"attrib: interrupted ({signal.Signals(number).name}); {outcome}", file=sys.stderr)
        return 128 + int(number)


if __name__ == "__main__":
    raise SystemExit(main())
