"""The ``attrib`` command: ``explain``, ``audit``, ``layers``, ``bench``.

Bad input (a missing or unreadable file, an unknown model, layer or method, a target out of range,
weights that do not fit) ends the run with one line on stderr and exit status 2. ``explain`` writes
into a temporary folder beside ``--out`` and moves it into place only when everything is written,
so an interrupted run never leaves a report that looks complete.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ("conductance", "ascent", "gradcam", "deeplift", "lrp", "ig", "guided", "deconv", "graph")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2
        print(f"attrib: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _methods(text: str) -> list[str]:
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        from .inputs import InputError

        raise InputError(f"--methods: unknown {unknown or text!r}; choose from {', '.join(METHODS)}")
    return chosen


def _progress(total: int, quiet: bool, what: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=quiet, desc=what, unit="step", leave=False, file=sys.stderr)


def _relative(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def _check(method: str, where: str, value: float, reference: float) -> dict:
    return {"method": method, "where": where, "value": float(value), "reference": float(reference),
            "relative_error": _relative(float(value), float(reference))}


def _baseline(loaded, x):
    """A black image in the model's normalised space (pixel value 0)."""
    import torch

    if loaded.mean:
        mean = torch.tensor(loaded.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(loaded.std, dtype=x.dtype).view(1, -1, 1, 1)
        return ((torch.zeros_like(x) - mean) / std).expand_as(x).clone()
    return torch.zeros_like(x)


def _layer(model, name: str | None) -> str:
    from .ascent import last_conv
    from .hooks import resolve_layers

    if name is None:
        return last_conv(model)
    ((resolved, _),) = resolve_layers(model, name)
    return resolved


def _target(args, output, loaded) -> int:
    classes = output.shape[1]
    if args.target is None:
        return int(output.argmax(1))
    if not 0 <= args.target < classes:
        from .inputs import InputError

        raise InputError(f"--target: {args.target} is out of range for {classes} classes")
    return args.target


def _explain_one(args, loaded, picture, layer, methods, folder: Path, index: int, bar) -> dict:
    import torch

    import graphs
    from viz import figures
    from viz.graph import draw_graph, draw_k_curves

    from . import (DeconvReconstruction, DeepLift, GradCAM, GuidedBackprop, IntegratedGradients, LayerConductance,
                   conductance_ascent)
    from .inputs import check_forward
    from .lrp import LRP
    from .result import filter_scores

    model, x = loaded.model, picture.tensor
    output = check_forward(loaded, picture)
    probabilities = torch.softmax(output, 1)[0]
    top = torch.topk(probabilities, min(5, probabilities.numel()))
    target = _target(args, output, loaded)
    base = _baseline(loaded, x)
    stem = f"{index:02d}_{picture.name}"
    shown = dict(mean=loaded.mean or None, std=loaded.std or None)
    entry: dict[str, Any] = {
        "name": picture.name, "label": picture.label, "target": target,
        "prediction": {"class": int(top.indices[0]), "probability": float(top.values[0]),
                       "top": [[int(c), float(p)] for c, p in zip(top.indices, top.values)]},
        "checks": [], "figures": [], "notes": [],
    }
    grid: dict[str, Any] = {}

    def figure(name: str, title: str, fig) -> None:
        file = f"{stem}_{name}.png"
        figures.save(fig, folder / file)
        entry["figures"].append({"file": file, "title": title})

    def step():
        bar.update(1)

    if "ascent" in methods:
        ascent = conductance_ascent(model, x, layer=layer, target=target, steps=args.steps, lr=0.1, n_steps=8,
                                    baselines=base, bounds=loaded.bounds)
        grid["conductance ascent"] = ascent.image[0]
        entry["ascent"] = {"filter": int(ascent.filter[0]), "objective": ascent.objective[:, 0].tolist(),
                           "neuron": ascent.neuron[0].tolist()}
        figure("ascent", f"conductance ascent on filter {int(ascent.filter[0])} of {layer}: original | optimised image | "
               "gradient effect of its strongest neuron",
               figures.ascent_triptych(x[0], ascent.image[0], ascent.gradient_effect[0], **shown))
        step()
    if "gradcam" in methods:
        grid["Grad-CAM"] = GradCAM(model, layer).attribute(x, target=target).attributions[0]
        step()
    if "deeplift" in methods:
        result = DeepLift(model).attribute(x, target=target, baselines=base)
        grid["DeepLIFT"] = result.attributions[0]
        entry["checks"].append(_check("DeepLIFT", "input", float(result.attributions.sum()),
                                      float(result.outputs - result.baseline_outputs)))
        step()
    if "lrp" in methods:
        result = LRP(model, "epsilon_plus").attribute(x, target=target)
        grid["LRP"] = result.attributions[0]
        report = result.info["conservation"]
        entry["checks"].append(_check("LRP epsilon_plus", "input", float(report.input[0]), float(report.start[0])))
        entry["lrp_layers"] = [{"layer": r.name, "rule": r.rule, "entering": float(r.entering[0]), "leaving": float(r.leaving[0])}
                               for r in report.rows]
        step()
    if "ig" in methods:
        result = IntegratedGradients(model).attribute(x, target=target, baselines=base, n_steps=64)
        grid["integrated gradients"] = result.attributions[0]
        entry["checks"].append(_check("integrated gradients", "input", float(result.attributions.sum()),
                                      float(result.outputs - result.baseline_outputs)))
        step()
    if grid:
        figure("grid", "method comparison (signed: blue < 0 < red, clipped at the 99th percentile of |a|)",
               figures.method_grid(x[0], grid, **shown))
    if "guided" in methods:
        guided = GuidedBackprop(model).attribute(x, target=target).attributions[0]
        fig = figures.method_grid(x[0], {"guided backprop": guided}, signed={"guided backprop": False}, **shown)
        figure("guided", "guided backpropagation (absolute)", fig)
        step()
    if "conductance" in methods or "deconv" in methods:
        result = LayerConductance(model, layer).attribute(x, target=target, baselines=base, n_steps=32)
        conductance_scores = filter_scores(result[layer], "max")[0]
        order = torch.argsort(conductance_scores, descending=True)[:5].tolist()
        entry["top_filters"] = [{"filter": c, "conductance": float(conductance_scores[c])} for c in order]
        entry["checks"].append(_check("layer conductance", layer, float(result[layer].sum()),
                                      float(result.outputs - result.baseline_outputs)))
        if "conductance" in methods:
            figure("conductance", f"aggregated conductance (max over H x W) of every filter of {layer}",
                   figures.conductance_distribution(conductance_scores, layer=layer))
        step()
    if "deconv" in methods:
        try:
            maps = {}
            for channel in entry["top_filters"][:3]:
                c = channel["filter"]
                maps[f"filter {c}"] = DeconvReconstruction(model).attribute(
                    x, layer=layer, neuron_selector=(c,) + (slice(None),) * (result[layer].dim() - 2)).attributions[0]
            figure("deconv", f"deconvolution reconstructions of the top filters of {layer}",
                   figures.reconstructions(x[0], maps, **shown))
        except ValueError as error:
            entry["notes"].append(f"deconvolution skipped: {error}")
        step()
    if "graph" in methods:
        flow = graphs.build_graph(model, x, target=target, k=args.k, conductance_steps=None)
        best = graphs.k_best_paths(flow, 100)  # best first: the best K are its first K
        paths = best[:5]
        entry["paths"] = [{"nodes": [graphs.node_id(n) for n in p.nodes], "score": p.score, "carried": p.carried} for p in paths]
        fig = draw_graph(flow, paths)
        figure("graph", f"relevance flow between the top {args.k} channels of each layer; red: the 5 critical paths", fig)
        ks = [k for k in (1, 5, 25, 100) if k <= max(1, len(best))]
        sets = [best[:k] for k in ks]
        maps = graphs.path_heatmaps(flow, sets)
        figure("kpaths", "full LRP heatmap and K-path heatmaps (channels off the K best paths masked in the backward pass)",
               figures.k_path_heatmaps(x[0], graphs.full_heatmap(flow), {k: m for k, m in zip(ks, maps)}, **shown))
        curves = graphs.k_curves(flow, max_k=args.max_k)
        entry["k_curve"] = {"ks": curves.ks, "score_mse": curves.score_mse, "score_smape": curves.score_smape,
                            "heatmap_mse": curves.heatmap_mse, "heatmap_smape": curves.heatmap_smape,
                            "chosen_k": curves.choose(args.smape, "heatmap_smape"), "smape_threshold": args.smape}
        figure("kcurves", "MSE and SMAPE of the K-path score and heatmap against the full ones",
               draw_k_curves(curves, threshold=args.smape))
        graphs.write_json(flow, folder / f"{stem}_graph.json")
        graphs.write_graphml(flow, folder / f"{stem}_graph.graphml")
        step()
    return entry


def explain(args) -> int:
    import torch

    from viz.report import write_html

    from .inputs import check_forward, load_model, load_pictures

    torch.manual_seed(0)
    loaded = load_model(args.model, args.weights)
    pictures = load_pictures(args.images, loaded)
    layer = _layer(loaded.model, args.layer)
    methods = _methods(args.methods)
    for picture in pictures:  # bad shapes and targets stop the run before anything is written
        _target(args, check_forward(loaded, picture), loaded)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    started = time.perf_counter()
    try:
        with _progress(len(pictures) * len(methods), args.quiet, "explain") as bar:
            images = [_explain_one(args, loaded, p, layer, methods, staging, i, bar) for i, p in enumerate(pictures)]
        report = {
            "model": {"name": loaded.name, "weights": loaded.weights, "notes": loaded.notes},
            "layer": layer, "methods": methods, "images": images, "seconds": time.perf_counter() - started,
            "argv": sys.argv[1:],
        }
        (staging / "report.json").write_text(json.dumps(report, indent=1))
        write_html(report, staging)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not args.quiet:
        print(f"wrote {out / 'index.html'} ({len(images)} images, {report['seconds']:.1f} s)")
    return 0


def audit(args) -> int:
    from . import DeepLift, IntegratedGradients, LayerConductance
    from .inputs import check_forward, load_model, load_pictures
    from .lrp import LRP

    loaded = load_model(args.model, args.weights)
    pictures = load_pictures(args.images, loaded)
    import torch.nn as nn

    layers = [n for n, m in loaded.model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    rows = []
    for picture in pictures:
        output = check_forward(loaded, picture)
        target = _target(args, output, loaded)
        x, base = picture.tensor, _baseline(loaded, picture.tensor)
        result = IntegratedGradients(loaded.model).attribute(x, target=target, baselines=base, n_steps=args.n_steps)
        change = float(result.outputs - result.baseline_outputs)
        rows.append((picture.name, _check("integrated gradients", "input", float(result.attributions.sum()), change)))
        result = DeepLift(loaded.model).attribute(x, target=target, baselines=base)
        rows.append((picture.name, _check("DeepLIFT", "input", float(result.attributions.sum()), change)))
        result = LayerConductance(loaded.model, layers).attribute(x, target=target, baselines=base, n_steps=args.n_steps)
        for name in layers:
            rows.append((picture.name, _check("layer conductance", name, float(result[name].sum()), change)))
        report = LRP(loaded.model, args.composite).attribute(x, target=target).info["conservation"]
        start = float(report.start[0])
        for row in report.rows:
            # a layer's own loss relative to the explained score (bias and epsilon absorb by design)
            rows.append((picture.name, _check(f"LRP {args.composite}", row.name, float(row.leaving[0]) - float(row.entering[0]) + start, start)))
        rows.append((picture.name, _check(f"LRP {args.composite}", "input", float(report.input[0]), start)))
    width = max(len(f"{c['method']} @ {c['where']}") for _, c in rows)
    failed = 0
    print(f"{'image':<12} {'check':<{width}}  {'relative error':>14}  ok")
    for name, check in rows:
        ok = check["relative_error"] <= args.tolerance
        failed += not ok
        print(f"{name:<12} {check['method'] + ' @ ' + check['where']:<{width}}  {check['relative_error']:>14.3e}  {'yes' if ok else 'NO'}")
    print(f"{failed} of {len(rows)} checks above the tolerance {args.tolerance:g}")
    return 1 if failed else 0


def layers(args) -> int:
    import torch

    from .inputs import load_model

    loaded = load_model(args.model, None)
    shapes: dict[str, tuple] = {}

    def record(name: str):
        def hook(module, args, output) -> None:
            if isinstance(output, torch.Tensor):
                shapes.setdefault(name, tuple(output.shape[1:]))
        return hook

    handles = [module.register_forward_hook(record(name))
               for name, module in loaded.model.named_modules() if name and not list(module.children())]
    try:
        with torch.no_grad():
            loaded.model(torch.zeros(1, loaded.channels, loaded.size, loaded.size))
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(loaded.model.named_modules())
    for name, shape in shapes.items():
        print(f"{name:<32} {type(modules[name]).__name__:<20} {shape}")
    return 0


def bench(args) -> int:
    from .inputs import InputError

    folder = Path(args.dir)
    scripts = {"conductance": "conductance.py", "lrp": "lrp.py", "gradients": "gradients.py", "graphs": "path_graphs.py",
               "evaluation": "evaluation.py"}
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


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="attrib", description="Attribution for PyTorch models: explain, audit, list layers, benchmark.")
    commands = top.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_options(p, images: bool = True):
        if images:
            p.add_argument("images", nargs="*", help="image files, or chelsea/coffee/astronaut/rocket (scikit-image); "
                                                     "default: the model's own samples")
        p.add_argument("--model", default="digits", help="digits (embedded), a torchvision name, or package.module:factory")
        p.add_argument("--weights", default=None, help="a state-dict file, or DEFAULT (embedded / local torch cache; never downloaded)")
        p.add_argument("--target", type=int, default=None, help="class to explain (default: the predicted one)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = commands.add_parser("explain", help="write figures, report.json and index.html")
    model_options(p)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {', '.join(METHODS)}")
    p.add_argument("--layer", default=None, help="layer for conductance, Grad-CAM, ascent, deconvolution (default: the last conv)")
    p.add_argument("--out", default="attrib-report", help="output folder (replaced when the run completes)")
    p.add_argument("--steps", type=int, default=30, help="conductance-ascent iterations")
    p.add_argument("--k", type=int, default=6, help="channels per layer in the path graph")
    p.add_argument("--max-k", type=int, default=50, dest="max_k", help="largest K on the K-path curves")
    p.add_argument("--smape", type=float, default=0.5, help="heatmap SMAPE threshold that chooses K")
    p.set_defaults(run=explain)

    p = commands.add_parser("audit", help="completeness and conservation errors; exit 1 above the tolerance")
    model_options(p)
    p.add_argument("--tolerance", type=float, default=0.05, help="largest relative error accepted")
    p.add_argument("--n-steps", type=int, default=64, dest="n_steps", help="integration steps")
    p.add_argument("--composite", default="epsilon", help="LRP composite")
    p.set_defaults(run=audit)

    p = commands.add_parser("layers", help="layer names and output shapes (what --layer takes)")
    p.add_argument("model", help="digits, a torchvision name, or package.module:factory")
    p.set_defaults(run=layers)

    p = commands.add_parser("bench", help="run the benchmark scripts (repository checkout)")
    p.add_argument("--dir", default="benchmarks", help="folder with the benchmark scripts")
    p.add_argument("--only", default=None, help="comma-separated: conductance, lrp, gradients, graphs, evaluation")
    p.set_defaults(run=bench)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .inputs import InputError

    try:
        return args.run(args)
    except (InputError, ValueError, TypeError, FileNotFoundError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"attrib: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attrib: interrupted; nothing was written to the output folder", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
