"""The ``attrib`` command: ``explain``, ``audit``, ``layers``, ``run`` (:mod:`attrib.cli_run`), ``bench``.

Bad input (a missing or unreadable file, an unknown model, layer or method, a target out of range,
weights that do not fit, an ``--out`` attrib must not replace) ends the run with one line on stderr
and exit status 2, before any work starts; any other exception is a bug and keeps its traceback
(exit 1). ``explain`` writes into a hidden staging folder beside ``--out`` and renames it into place
only when everything is written (:mod:`attrib.report_folder`): an existing ``--out`` is replaced only
when attrib wrote it, and Ctrl-C or ``kill`` leaves nothing behind.

Each explain method is one function registered with :func:`register_method` (what it needs is
declared there); ``--methods``, the preflight and the run order read :data:`EXPLAIN_METHODS`, and
``--composite`` lists :data:`attrib.lrp.COMPOSITES`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

from .cli_common import LRP_COMPOSITE, _check, _check_numbers, _file_safe, _share, _target, running_layers
from .cli_common import load_for_cli as _load


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, status 2
        print(f"attrib: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _methods(text: str | None) -> list[str]:
    if text is None:
        return list(EXPLAIN_METHODS)
    chosen = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))  # in order, once each
    unknown = [m for m in chosen if m not in EXPLAIN_METHODS]
    if unknown or not chosen:
        from .errors import InputError

        raise InputError(f"--methods: unknown {unknown or text!r}; choose from {', '.join(EXPLAIN_METHODS)}")
    return chosen


def _progress(total: int, quiet: bool, what: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=quiet, desc=what, unit="step", leave=False, file=sys.stderr)


def _lrp_row(name: str, report) -> dict:
    """LRP: the share of F(x) (where the backward pass starts) that reaches the input, with where the
    rest went. Information, not a check: biases and the rules' epsilon absorb relevance by design
    (``attrib audit`` checks conservation layer by layer where a layer has no bias)."""
    start, arrived = float(report.start[0]), float(report.input[0])
    worst = report.worst(0)
    note = (f"{100 * arrived / start:.1f}% of F(x) reaches the input" if start else "F(x) = 0")
    if abs(arrived - start) > 1e-6 * max(abs(start), 1e-12):
        constants = any(row.kind in ("add constant", "cat constant") for row in report.rows)
        keepers = "biases, constants (a position embedding, a class token)" if constants else "biases"
        note += (f"; the rest is absorbed by {keepers} and the rules' epsilon (most at {worst.name}: "
                 f"{float(worst.difference[0]):+.3g}), which LRP does by design")
    return _share(f"LRP {name}", "input", arrived, start, "F(x)", short="reaches the input: share of F(x)", note=note)


def _baseline(loaded, x):
    """A black image in the model's normalised space (pixel value 0)."""
    import torch

    from .normalization import normalized_range

    if loaded.mean:
        black, _ = normalized_range(loaded.mean, loaded.std)
        return black.to(x.dtype).view(1, -1, 1, 1).expand_as(x).clone()
    return torch.zeros_like(x)


LARGE = 65  # inputs from this size up (ImageNet models) get the lighter defaults, so a 224 px image takes about a minute


def _size_defaults(size: int) -> dict[str, int]:
    """The explain settings for an input size: the same methods, fewer ascent iterations, ascent
    steps and K on large inputs (the report shows the values used)."""
    if size < LARGE:
        return {"n_steps": 32, "steps": 30, "ascent_n_steps": 8, "max_k": 100}
    return {"n_steps": 16, "steps": 6, "ascent_n_steps": 4, "max_k": 11}  # 11 K-path maps + the full one: 2 passes of k=6


def _settle(args, size: int) -> None:
    """Fill the settings left to their size-dependent default; check every count."""
    from .checks import check_count

    for name, value in _size_defaults(size).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("n_steps", "ascent_n_steps", "max_k", "k"):
        check_count(f"--{name.replace('_', '-')}", getattr(args, name))
    check_count("--steps", args.steps, minimum=0)


@contextmanager
def _timed(timings: dict, part: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[part] = timings.get(part, 0.0) + time.perf_counter() - started


@dataclass(frozen=True)
class ExplainMethod:
    """One method of ``attrib explain``, registered with :func:`register_method`.

    ``run(image)`` adds its numbers and figures to ``image.entry``; a ``panel`` method returns instead
    the map it puts in the shared "grid" figure, titled ``label`` (``signed=False``: drawn from 0).
    ``layer``: explains ``--layer``; ``spatial``: needs (B, C, H, W) there; ``conductance``: reads the
    layer conductance computed once before the methods run (``image.conductance``, ``image.scores``,
    ``entry["top_filters"]``); ``check(setup)``: why it cannot run on this model, or None. ``label``
    names the method in messages.

    >>> @register_method('saliency', 'saliency', panel=True)
    ... def _saliency(image):
    ...     return Saliency(image.model).attribute(image.x, target=image.target).tensor[0]
    """

    name: str
    run: Callable[[_Image], Any]
    label: str
    layer: bool = False
    spatial: bool = False
    conductance: bool = False
    panel: bool = False
    signed: bool = True
    check: Callable[[_Setup], str | None] | None = None


EXPLAIN_METHODS: dict[str, ExplainMethod] = {}  # filled below, in the order the methods run and are listed


def register_method(name: str, label: str, **needs: Any) -> Callable:
    """Decorator: register ``run`` as the explain method ``name`` (``needs``: the flags of :class:`ExplainMethod`)."""
    def register(run: Callable[[_Image], Any]) -> Callable[[_Image], Any]:
        EXPLAIN_METHODS[name] = ExplainMethod(name, run, label, **needs)
        return run
    return register


@dataclass
class _Setup:
    """What the preflight checks read: the model, the first picture, the layer and its output shape."""

    model: Any
    x: Any
    layer: str | None
    shape: tuple
    module: Any
    composite: str
    rules: Any  # the composite built for the model (its bounds)

    @cached_property
    def lrp_problem(self) -> str | None:  # one trial run, shared by the methods that use LRP
        from .errors import InputError
        from .lrp import LRP

        try:
            LRP(self.model, self.rules).attribute(self.x, target=0, conservation=False)
        except InputError as error:
            return f"LRP ({self.composite}): {error}"
        return None


@dataclass
class _Image:
    """One picture as the explain methods see it, and its report entry (numbers, figures, timings)."""

    args: Any
    loaded: Any
    x: Any
    target: int
    baselines: Any
    layer: str | None
    is_cut: bool | None
    folder: Path
    stem: str
    entry: dict
    grid: dict = field(default_factory=dict)
    conductance: Any = None  # the layer's conductance, when a chosen method reads it
    scores: Any = None  # and its aggregate per filter (max over H x W) for the example

    @property
    def model(self):
        return self.loaded.model

    @property
    def shown(self) -> dict:  # how figures undo the normalisation
        return {"mean": self.loaded.mean or None, "std": self.loaded.std or None}

    def timed(self, part: str):
        return _timed(self.entry["seconds"], part)

    def figure(self, name: str, title: str, fig) -> None:
        from attrib.viz import figures

        file = f"{self.stem}_{name}.png"
        with self.timed("figures"):
            figures.save(fig, self.folder / file)
        self.entry["figures"].append({"file": file, "title": title})


def _layer_shape(model, x, layer: str | None) -> tuple[tuple, Any]:
    """The layer's output shape per example and its module (``()``, None without a layer)."""
    import torch

    from .errors import InputError
    from .hooks import capture

    if layer is None:
        return (), None
    with capture(model, [layer]) as cap, torch.no_grad():
        model(x.clone())
        if layer not in cap.captured:
            raise InputError(f"--layer: {layer!r} does not run in the model's forward pass; `attrib layers` lists those "
                             "that do")
        shape = tuple(cap[layer].shape[1:])
    return shape, dict(model.named_modules())[layer]


def _refusal(method: ExplainMethod, setup: _Setup) -> str | None:
    """Why ``method`` cannot run on this model and layer, or None."""
    if method.layer and setup.layer is None:
        return ("no convolution runs in this model, so there is no default layer; name one with --layer "
                "(`attrib layers` lists them)")
    if method.spatial and setup.layer is not None and len(setup.shape) < 2:
        return (f"--layer {setup.layer} ({type(setup.module).__name__}) gives ({', '.join(map(str, setup.shape))},) per "
                f"example, without spatial dimensions; {method.label} needs a convolutional layer")
    return method.check(setup) if method.check is not None else None


def _plan(args, loaded, pictures, layer: str | None, methods: list[str], explicit: bool) -> tuple[list[str], dict[str, str]]:
    """Every method's preconditions, checked before any work starts: the methods to run and, for
    the others, why not. A method the user named that cannot run is an error; one of the default
    set is skipped with its reason (shown in the report)."""
    from .errors import InputError

    x = pictures[0].tensor
    setup = _Setup(loaded.model, x, layer, *_layer_shape(loaded.model, x, layer), args.composite,
                   getattr(args, "rules", None))
    reasons = {name: reason for name in methods if (reason := _refusal(EXPLAIN_METHODS[name], setup)) is not None}
    if explicit and reasons:
        raise InputError(f"--methods: {next(iter(reasons.values()))}")
    return [m for m in methods if m not in reasons], reasons


def _lrp_problem(setup: _Setup) -> str | None:
    return setup.lrp_problem


def _deconv_problem(setup: _Setup) -> str | None:
    """The layer cannot be reconstructed through (for a block: and why its last convolution cannot)."""
    from . import DeconvReconstruction
    from .errors import InputError
    from .module_types import CONVOLUTIONS

    deconv = DeconvReconstruction(setup.model)
    try:
        deconv.attribute(setup.x, layer=setup.layer, neuron_selector=(0,) + (slice(None),) * (len(setup.shape) - 1))
        return None
    except InputError as error:
        reason = f"deconvolution: {error}"
    inner = [n for n, m in setup.module.named_modules() if n and isinstance(m, CONVOLUTIONS)]
    if inner:  # a block: the reason it cannot be reconstructed through, rather than "a container"
        try:
            deconv.attribute(setup.x, layer=f"{setup.layer}.{inner[-1]}", neuron_selector=(0,))
        except InputError as deeper:
            reason += f"; and inside it: {deeper}"
    return reason


def _completeness(method: str, result, tolerance: float, note: str = "") -> dict:
    """The check row of an input method with a baseline: its attributions sum to F(x) - F(x')."""
    return _check(method, "input", float(result.attributions.sum()), float(result.outputs - result.baseline_outputs),
                  "F(x) - F(x')", tolerance, note)


def _layer_conductance(image: _Image) -> None:
    """The layer's conductance, once for every method that reads it: its check row and top filters."""
    import torch

    from . import LayerConductance
    from .result import filter_scores

    layer, n_steps = image.layer, image.args.n_steps
    assert layer is not None  # the methods that read it explain a layer: refused without one
    with image.timed("conductance"):
        result = LayerConductance(image.model, layer).attribute(image.x, target=image.target, baselines=image.baselines,
                                                                n_steps=n_steps)
        conductance = result[layer]
        scores = filter_scores(conductance, "max")[0] if conductance.dim() > 2 else conductance[0]
        order = torch.argsort(scores, descending=True)[:5].tolist()
    change = float(result.outputs - result.baseline_outputs)
    image.conductance, image.scores = conductance, scores
    image.entry["top_filters"] = [{"filter": c, "conductance": float(scores[c])} for c in order]
    total = float(conductance.sum())
    row = (_check("layer conductance", layer, total, change, "F(x) - F(x')", image.args.tolerance) if image.is_cut
           else _share("layer conductance", layer, total, change))
    image.entry["checks"].append({**row, "n_steps": n_steps})


@register_method("conductance", "layer conductance", layer=True, conductance=True)
def _conductance(image: _Image) -> None:
    from attrib.viz import figures

    layer = image.layer
    assert layer is not None  # a layer method: refused without one
    image.figure("conductance", f"aggregated conductance (max over H x W) of every filter of {layer}; red: the top "
                 "filter, which the conductance ascent and the deconvolution use",
                 figures.conductance_distribution(image.scores, layer=layer))


@register_method("ascent", "conductance ascent", layer=True, spatial=True, conductance=True)
def _ascent(image: _Image) -> None:
    from attrib.viz import figures

    from . import conductance_ascent

    args, layer = image.args, image.layer
    with image.timed("ascent"):
        ascent = conductance_ascent(image.model, image.x, layer=layer, target=image.target,
                                    filter=image.entry["top_filters"][0]["filter"], steps=args.steps, lr=0.1,
                                    n_steps=args.ascent_n_steps, baselines=image.baselines, bounds=image.loaded.bounds)
    image.entry["ascent"] = {"filter": int(ascent.filter[0]), "objective": ascent.objective[:, 0].tolist(),
                             "neuron": ascent.neuron[0].tolist(), "iterations": args.steps, "n_steps": args.ascent_n_steps,
                             "lr": 0.1}
    image.figure("ascent", f"conductance ascent on filter {int(ascent.filter[0])} of {layer} (the top filter of the "
                 f"conductance chart; {args.steps} Adam steps at lr 0.1, objective from {args.ascent_n_steps}-step "
                 "conductance): original | optimised image | gradient effect of its strongest neuron (|d neuron / d input|; "
                 "cyan outline: where it is not zero, the neuron's receptive field)",
                 figures.ascent_triptych(image.x[0], ascent.image[0], ascent.gradient_effect[0], **image.shown))


@register_method("gradcam", "Grad-CAM", layer=True, spatial=True, panel=True, signed=False)
def _gradcam(image: _Image):
    from . import GradCAM

    with image.timed("gradcam"):
        return GradCAM(image.model, image.layer).attribute(image.x, target=image.target).tensor[0]


@register_method("deeplift", "DeepLIFT", panel=True)
def _deeplift(image: _Image):
    from . import DeepLift

    with image.timed("deeplift"):
        result = DeepLift(image.model).attribute(image.x, target=image.target, baselines=image.baselines)
    image.entry["checks"].append(_completeness("DeepLIFT", result, image.args.tolerance, _deeplift_note(image.model)))
    return result.tensor[0]


def _deeplift_note(model) -> str:
    """Why DeepLIFT's sum may miss F(x) - F(x') on a transformer: what its rescale rule does not cover."""
    from torch import nn

    from .attention import has_attention

    norms = (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    parts = [what for what, found in [("the products of attention (queries x keys, weights x values)", has_attention(model)),
                                      ("normalisation layers' division by the spread",
                                       any(isinstance(m, norms) for m in model.modules()))] if found]
    if not parts:
        return ""
    return ("DeepLIFT's rescale rule covers elementwise nonlinearities and softmax; " + " and ".join(parts)
            + " are differentiated at x, not rescaled, so its sum need not equal F(x) - F(x') on this model (LRP's "
            "transformer composites and integrated gradients are the methods for it)")


@register_method("lrp", "LRP", panel=True, check=_lrp_problem)
def _lrp(image: _Image):
    from .lrp import LRP

    composite = image.args.composite
    with image.timed("lrp"):
        result = LRP(image.model, image.args.rules).attribute(image.x, target=image.target)
    report = result.info["conservation"]
    image.entry["checks"].append(_lrp_row(composite, report))
    image.entry["lrp_layers"] = [{"layer": r.name, "rule": r.rule, "entering": float(r.entering[0]),
                                  "leaving": float(r.leaving[0])} for r in report.rows]
    return result.tensor[0]


def _heads_problem(setup: _Setup) -> str | None:
    from .attention import has_attention

    return None if has_attention(setup.model) else "the model has no nn.MultiheadAttention, so no heads to split"


@register_method("heads", "conductance per head", check=_heads_problem)
def _heads(image: _Image) -> None:
    from . import HeadConductance

    with image.timed("heads"):
        result = HeadConductance(image.model).attribute(image.x, target=image.target, baselines=image.baselines,
                                                        n_steps=image.args.n_steps)
    maps = {name: value[0] for name, value in result.attributions.items()}
    patch = getattr(image.model, "patch_size", None)
    grid = image.x.shape[-1] // patch if patch and image.x.dim() == 4 else None
    tokens = next(iter(maps.values())).shape[-1]
    if grid is not None and tokens != grid * grid + 1:
        grid = None  # not a class token and a square of patches: drawn as heads x tokens
    image.entry["heads"] = {name: {"per_head": value.sum(-1).tolist(), "class_token": value[:, 0].tolist()}
                            for name, value in maps.items()}
    from attrib.viz import figures

    image.figure("heads", "conductance of every attention head per token (before the output projection; red adds to the "
                 "explained class); the heads of a block carry the part of F(x) - F(x') that goes through attention, the "
                 "residual connection the rest", figures.head_conductance(image.x[0], maps, grid, **image.shown))


def _rollout_grid(model, x) -> tuple[int, int] | None:
    """The patch grid of a ViT-like image model (``patch_size`` and square patches), or None."""
    patch = getattr(model, "patch_size", None)
    if not isinstance(patch, int) or x.dim() != 4 or x.shape[-1] % patch or x.shape[-2] % patch:
        return None
    return x.shape[-2] // patch, x.shape[-1] // patch


def _rollout_problem(setup: _Setup) -> str | None:
    from .errors import InputError
    from .rollout import attention_rollout

    problem = _heads_problem(setup)
    if problem is not None:
        return problem
    grid = _rollout_grid(setup.model, setup.x)
    if grid is None:
        return ("attention rollout maps tokens to pixels for a ViT-like model (a patch_size that divides the image); "
                "this one has none")
    try:
        tokens = attention_rollout(setup.model, setup.x[:1]).shape[-1]
    except InputError as error:
        return f"attention rollout: {error}"
    if tokens != grid[0] * grid[1]:
        return (f"attention rollout: {tokens} tokens besides the class token, but the image has {grid[0]} x {grid[1]} "
                "patches")
    return None


@register_method("rollout", "attention rollout", panel=True, signed=False, check=_rollout_problem)
def _rollout(image: _Image):
    from .rollout import attention_rollout, patches_to_image

    grid = _rollout_grid(image.model, image.x)
    assert grid is not None  # checked before the run
    with image.timed("rollout"):
        scores = attention_rollout(image.model, image.x)
    image.entry["rollout"] = {"grid": list(grid), "class_token_share": float(1.0 - scores[0].sum()),
                              "patches": scores[0].tolist()}
    return patches_to_image(scores, size=tuple(image.x.shape[-2:]), grid=grid)[0]


@register_method("ig", "integrated gradients", panel=True)
def _ig(image: _Image):
    from . import IntegratedGradients

    with image.timed("ig"):
        result = IntegratedGradients(image.model).attribute(image.x, target=image.target, baselines=image.baselines,
                                                            n_steps=image.args.n_steps)
    image.entry["checks"].append({**_completeness("integrated gradients", result, image.args.tolerance),
                                  "n_steps": image.args.n_steps})
    return result.tensor[0]


@register_method("guided", "guided backprop")
def _guided(image: _Image) -> None:
    from attrib.viz import figures

    from . import GuidedBackprop

    with image.timed("guided"):
        guided = GuidedBackprop(image.model).attribute(image.x, target=image.target).tensor[0]
    fig = figures.method_grid(image.x[0], {"guided backprop": guided}, signed={"guided backprop": False}, **image.shown)
    image.figure("guided", "guided backpropagation (absolute)", fig)


@register_method("deconv", "deconvolution", layer=True, spatial=True, conductance=True, check=_deconv_problem)
def _deconv(image: _Image) -> None:
    from attrib.viz import figures

    from . import DeconvReconstruction

    spatial = (slice(None),) * (image.conductance.dim() - 2)
    with image.timed("deconv"):
        maps = {f"filter {c['filter']}": DeconvReconstruction(image.model).attribute(
                    image.x, layer=image.layer, neuron_selector=(c["filter"],) + spatial).tensor[0]
                for c in image.entry["top_filters"][:3]}
    image.figure("deconv", f"deconvolution reconstructions of the top filters of {image.layer} by aggregated conductance "
                 "(each min-max rescaled)", figures.reconstructions(image.x[0], maps, **image.shown))


def _graph_problem(setup: _Setup) -> str | None:
    from .attention import has_attention

    if has_attention(setup.model):
        return ("path graphs follow channels of convolutional and linear layers; in a transformer every block mixes "
                "tokens and hidden units, which these graphs do not model (use the per-head conductance and LRP instead)")
    return _lrp_problem(setup)


@register_method("graph", "path graph", check=_graph_problem)
def _graph(image: _Image) -> None:
    from attrib import graphs
    from attrib.viz.graph import draw_graph

    args = image.args
    with image.timed("graph"):
        flow = graphs.build_graph(image.model, image.x, target=image.target, k=args.k, composite=args.rules,
                                  conductance_steps=None)
        paths = graphs.k_best_paths(flow, 5)
    image.entry["paths"] = [{"nodes": [graphs.node_id(n) for n in p.nodes], "score": p.score, "carried": p.carried}
                            for p in paths]
    image.figure("graph", f"relevance flow between the top {args.k} channels of each layer; red: the 5 critical paths",
                 draw_graph(flow, paths))
    _k_paths(image, flow)
    with image.timed("figures"):
        graphs.write_json(flow, image.folder / f"{image.stem}_graph.json")
        graphs.write_graphml(flow, image.folder / f"{image.stem}_graph.graphml")


def _k_paths(image: _Image, flow) -> None:
    """The K-path heatmaps and curves of the graph's flow."""
    from attrib import graphs
    from attrib.viz import figures
    from attrib.viz.graph import draw_k_curves

    args = image.args
    with image.timed("k-paths"):
        curves = graphs.k_curves(flow, max_k=args.max_k)  # every K-path map and the full one, batched
    chosen = curves.choose(args.distance)
    ks = sorted({k for k in (1, 5, 25, len(curves.ks), chosen) if k is not None and 1 <= k <= len(curves.ks)})
    maps, full = curves.maps, curves.full_map
    assert maps is not None and full is not None  # k_curves keeps both
    kmaps = {k: maps[k - 1] for k in ks}
    scale = figures.k_path_scale(full, kmaps)
    image.figure("kpaths", "full LRP heatmap and K-path heatmaps (channels off the K best paths masked in the backward pass). "
                 + scale.caption, figures.k_path_heatmaps(image.x[0], full, kmaps, scale=scale, **image.shown))
    image.entry["k_curve"] = {
        "ks": curves.ks, "heatmap_distance": curves.heatmap_distance, "heatmap_share": curves.heatmap_share,
        "score_share": curves.score_share, "full_relevance": curves.full_relevance, "full_score": curves.full_score,
        "score_mse": curves.score_mse, "score_smape": curves.score_smape, "heatmap_mse": curves.heatmap_mse,
        "heatmap_smape": curves.heatmap_smape, "chosen_k": chosen, "distance_threshold": args.distance,
        "plateau_k": curves.plateau()}
    image.entry["k_path_scale"] = {"limit": scale.limit, "shares": {str(k): v for k, v in scale.shares.items()},
                                   "distances": {str(k): v for k, v in scale.distances.items()}}
    image.figure("kcurves", "shape distance of the K-path heatmap to the full one (each map / its L1 norm; 0 same shape, 2 "
                 "nothing in common) and the share of relevance and score the K paths carry, against K",
                 draw_k_curves(curves, threshold=args.distance))


def _entry(picture, output, target: int) -> dict:
    """A picture's report entry before any method runs: its name, target and the model's top classes."""
    import torch

    probabilities = torch.softmax(output, 1)[0]
    top = torch.topk(probabilities, min(5, probabilities.numel()))
    return {"name": picture.name, "label": picture.label, "target": target, "input": picture.record,
            "prediction": {"class": int(top.indices[0]), "probability": float(top.values[0]),
                           "top": [[int(c), float(p)] for c, p in zip(top.indices, top.values)]},
            "checks": [], "figures": [], "notes": [], "seconds": {}}


def _grid_figure(image: _Image, panels: list[ExplainMethod]) -> None:
    from attrib.viz import figures

    signed = {method.label: False for method in panels if not method.signed}
    unsigned = " and ".join(signed)
    never = (f"; {unsigned}, which {'is' if len(signed) == 1 else 'are'} never negative, from 0" if signed else "")
    blind = "; attention rollout does not depend on the class" if "attention rollout" in signed else ""
    image.figure("grid", f"attributions (blue < 0 < red{never}{blind}; each panel on its own "
                 "scale, clipped at the 99th percentile of its |a|, as its colour bar says)",
                 figures.method_grid(image.x[0], image.grid, signed=signed, **image.shown))


def _explain_one(args, loaded, picture, output, layer, methods, is_cut: bool | None, folder: Path, index: int, bar) -> dict:
    """Run the chosen methods on one picture, in the registry's order; the grid figure follows the last panel."""
    target = _target(args, output)
    image = _Image(args, loaded, picture.tensor, target, _baseline(loaded, picture.tensor), layer, is_cut, folder,
                   f"{index:02d}_{_file_safe(picture.name)}", _entry(picture, output, target))
    chosen = [method for name, method in EXPLAIN_METHODS.items() if name in methods]
    panels = [method for method in chosen if method.panel]
    if any(method.conductance for method in chosen):
        _layer_conductance(image)
    for method in chosen:
        found = method.run(image)
        if method.panel:
            image.grid[method.label] = found
        bar.update(1)
        if panels and method is panels[-1]:
            _grid_figure(image, panels)
            _faithfulness(image)
    if args.scorecard:
        _scorecard(image)
    return image.entry


def _scorecard(image: _Image) -> None:
    """``--scorecard``: the audit's faithfulness scorecard (IG, saliency, input x gradient, DeepLIFT, LRP: deletion /
    insertion AUC, infidelity, max-sensitivity) and the randomisation check at the report's layer."""
    from .cli_audit import randomisation, scorecard

    with image.timed("scorecard"):
        rows = scorecard(image.model, image.x, image.baselines, image.target, image.args.rules, image.args.n_steps)
        randomised = randomisation(image.model, image.x, image.layer, image.target, min(image.args.n_steps, 32)) \
            if image.layer else {}
    image.entry["scorecard"] = {"rows": [{k: v for k, v in row.items() if not k.endswith("curve") and k != "fractions"}
                                         for row in rows],
                                "randomisation_layer": image.layer, "randomisation": randomised}


def _faithfulness(image: _Image) -> None:
    """Deletion / insertion AUC (pixels, most relevant first, filled with the baseline) and infidelity (per-pixel
    Gaussian perturbations shared by the channels, sd 0.1 of the input's, 16 draws, seeded) of every panel's map."""
    import torch

    from attrib.viz import figures

    from .faithfulness import infidelity, perturbation_curve

    rows = []
    with image.timed("faithfulness"):
        spread = float(image.x.std()) or 1.0
        for label, found in image.grid.items():
            if label == "attention rollout" or tuple(found.shape[-2:]) != tuple(image.x.shape[-2:]):
                continue  # rollout is per patch and blind to the class: no pixel order of its own to test
            found = found.unsqueeze(0)  # the panels' maps are one example's: (C, H, W) or (1, H, W)
            curves = {mode: perturbation_curve(image.model, image.x, found, image.target, mode=mode, fill=image.baselines,
                                               steps=16) for mode in ("deletion", "insertion")}
            generator = torch.Generator().manual_seed(0)
            rows.append({"method": label, "fractions": curves["deletion"].fractions.tolist(),
                         **{f"{mode}_auc": float(c.auc[0]) for mode, c in curves.items()},
                         **{f"{mode}_curve": c.scores[0].tolist() for mode, c in curves.items()},
                         "infidelity": float(infidelity(image.model, image.x, found, image.target, n_samples=16,
                                                        noise_scale=0.1 * spread, generator=generator)[0])})
    if rows:
        image.entry["faithfulness"] = rows
        image.figure("faithfulness", "deletion and insertion curves of each panel's map: the target's probability as "
                     "the most relevant pixels are replaced by the baseline (deletion) or put back onto it (insertion); ties "
                     "(a map that is zero in places, as Grad-CAM's) are taken in pixel order",
                     figures.perturbation_curves(rows))


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
    if args.model == "text":
        from .cli_text import explain_text

        return explain_text(args)
    if args.sentences is not None:
        from .errors import InputError

        raise InputError("--sentences: only the text model (--model text) reads sentences")
    import torch

    from attrib.viz.report import write_html

    from .cli_inputs import check_forward, load_pictures
    from .cuts import cut_layers
    from .report_folder import check_out, staged

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
                         "k": args.k, "max_k": args.max_k, "distance": args.distance, "lrp_composite": args.composite},
            "images": images, "seconds": time.perf_counter() - started, "setup_seconds": setup, "argv": sys.argv[1:],
        }
        (staging / "report.json").write_text(json.dumps(report, indent=1))
        write_html(report, staging)
    if not args.quiet:
        for method, reason in skipped.items():
            print(f"attrib: skipped {method}: {reason}", file=sys.stderr)
        print(f"wrote {out / 'index.html'} ({len(images)} images, {report['seconds']:.1f} s)")
    return 0


def audit(args) -> int:

    from . import DeepLift, IntegratedGradients, LayerConductance
    from .cli_audit import exact_audit, print_scorecard, randomisation, scorecard
    from .cli_inputs import check_forward, load_pictures
    from .cuts import cut_layers, default_layer
    from .module_types import LINEAR_LAYERS

    _check_numbers(args)
    loaded = _load(args)
    pictures = load_pictures(args.images, loaded)
    targets = [_target(args, check_forward(loaded, picture)) for picture in pictures]
    layers = running_layers(loaded.model, pictures[0].tensor,
                            [n for n, m in loaded.model.named_modules() if isinstance(m, LINEAR_LAYERS)])
    cuts = cut_layers(loaded.model, pictures[0].tensor, layers)
    tolerance = args.tolerance
    rows: list[tuple[str, dict]] = []
    notes: list[str] = []
    cards: list[tuple[str, list[dict], str | None, dict]] = []
    for picture, target in zip(pictures, targets):
        x, base = picture.tensor, _baseline(loaded, picture.tensor)
        result = IntegratedGradients(loaded.model).attribute(x, target=target, baselines=base, n_steps=args.n_steps)
        ig_map = result.attributions
        change = float(result.outputs - result.baseline_outputs)
        rows.append((picture.name, _check("integrated gradients", "input", float(result.attributions.sum()), change,
                                          "F(x) - F(x')", tolerance)))
        result = DeepLift(loaded.model).attribute(x, target=target, baselines=base)
        rows.append((picture.name, _check("DeepLIFT", "input", float(result.attributions.sum()), change, "F(x) - F(x')", tolerance,
                                          _deeplift_note(loaded.model))))
        result = LayerConductance(loaded.model, layers).attribute(x, target=target, baselines=base, n_steps=args.n_steps)
        for name in layers:
            value = float(result[name].sum())
            rows.append((picture.name, _check("layer conductance", name, value, change, "F(x) - F(x')", tolerance) if cuts[name]
                         else _share("layer conductance", name, value, change)))
        rows += [(picture.name, row) for row in _audit_lrp(loaded.model, args.composite, args.rules, x, target, tolerance)]
        if args.exact:
            if not getattr(args, "quiet", False):
                print(f"attrib: exact integrals for {picture.name} (the path's linear regions; can take minutes; --no-exact "
                      "skips them)", file=sys.stderr)
            exact_rows, lines = exact_audit(loaded.model, x, base, target, layers, ig_map, result.attributions, args.n_steps,
                                            tolerance, args.exact_max_regions)
            rows += [(picture.name, row) for row in exact_rows]
            notes += [f"{picture.name}: {line}" if not line.startswith(" ") else line for line in lines]
        if args.scorecard:
            sanity_layer = default_layer(loaded.model, x)
            cards.append((picture.name, scorecard(loaded.model, x, base, target, args.rules, args.n_steps), sanity_layer,
                          randomisation(loaded.model, x, sanity_layer, target, min(args.n_steps, 32)) if sanity_layer else {}))
    failed = _print_audit(rows, tolerance)
    for line in notes:
        print(line)
    for name, card, sanity_layer, randomised in cards:
        print_scorecard(name, card)
        if randomised:
            print(f"  randomisation check at {sanity_layer} (Spearman with the map after randomising every layer; near 0 "
                  "is what a method that reads the model gives): "
                  + ", ".join(f"{method} {value:+.2f}" for method, value in randomised.items()))
    return 1 if failed else 0


def _audit_lrp(model, composite: str, rules, x, target: int, tolerance: float) -> list[dict]:
    """LRP's rows: conservation checked at each layer without a bias, the share absorbed at the others."""
    from .lrp import LRP

    from .attention import explicit_attention

    report = LRP(model, rules).attribute(x, target=target).info["conservation"]
    start = float(report.start[0])
    with explicit_attention(model):  # LRP's rows name the attention's parts (q_proj, ...), which exist only then
        modules = dict(model.named_modules())
    rows = []
    for row in report.rows:
        difference = float(row.difference[0])
        module = modules.get(row.name.split("#")[0])
        if row.kind in ("add constant", "cat constant"):  # a position embedding, a class token: kept by design
            rows.append(_share(f"LRP {composite}", row.name, -difference, start, "F(x)",
                               "kept by a constant (not computed from the input): share of F(x)",
                               "a constant added or concatenated (a position embedding, a class token) keeps its share "
                               "of the relevance, as a bias does"))
        elif row.rule.startswith("SoftmaxRule"):  # AttnLRP's softmax: its Taylor rule's bias term keeps a share
            rows.append(_share(f"LRP {composite}", row.name, -difference, start, "F(x)",
                               "kept by the softmax rule's bias term: share of F(x)",
                               "AttnLRP's softmax rule (a Taylor expansion with bias) keeps the bias term's share by design"))
        elif "+" in row.name or getattr(module, "bias", None) is not None:  # a bias absorbs relevance by design
            rows.append(_share(f"LRP {composite}", row.name, -difference, start, "F(x)",
                               "absorbed by its bias and epsilon: share of F(x)",
                               "the layer has a bias, which LRP lets absorb relevance by design"))
        else:  # no bias: what enters must leave (up to epsilon)
            rows.append(_check(f"LRP {composite}", row.name, difference + start, start, "F(x)", tolerance))
    return rows + [_lrp_row(composite, report)]


def _print_audit(rows: list[tuple[str, dict]], tolerance: float) -> int:
    """The audit table and its summary line; returns the number of failed checks."""
    width = max(len(f"{c['method']} @ {c['where']}") for _, c in rows)
    checked = [check for _, check in rows if check["passed"] is not None]
    failed = sum(not check["passed"] for check in checked)
    print(f"{'image':<12} {'check':<{width}}  {'relative error':>14}  ok")
    noted: set[str] = set()
    for name, check in rows:
        label = f"{check['method']} @ {check['where']}"
        if check["passed"] is None:
            print(f"{name:<12} {label:<{width}}  {'share ' + format(check['share'], '.3f'):>14}  -  ({check['short']})")
        else:
            print(f"{name:<12} {label:<{width}}  {check['relative_error']:>14.3e}  {'yes' if check['passed'] else 'NO'}")
            if not check["passed"] and check.get("note") and check["note"] not in noted:  # why, once per reason
                noted.add(check["note"])
                print(f"{'':<12}   ({check['note']})")
    bypassed = sum(check["passed"] is None and check["method"] == "layer conductance" for _, check in rows)
    biased = len(rows) - len(checked) - bypassed
    constants = any("kept by a constant" in check.get("short", "") for _, check in rows)
    print(f"{failed} of {len(checked)} checks above the tolerance {tolerance:g}"
          + (f"; {bypassed} conductance rows are at layers that are not cuts (skip connections or branches bypass them), "
             "so they are shares of F(x) - F(x'), not checks" if bypassed else "")
          + (f"; {biased} LRP rows are shares of F(x), not checks: layers with a bias"
             + (", constants (a position embedding, a class token)" if constants else "")
             + " and rules that keep a share by design, which absorb relevance, and what reaches the input" if biased else ""))
    return failed


def layers(args) -> int:
    import torch

    from .cli_common import print_layer_shapes
    from .cli_inputs import SHAPE_ERRORS, first_line
    from .errors import InputError

    if args.model == "text":
        from .cli_text import print_layers

        return print_layers(args)
    loaded = _load(args)
    size = (1, loaded.channels, loaded.size, loaded.size)
    try:
        print_layer_shapes(loaded.model, torch.zeros(size), f"input {size[1:]}")
    except SHAPE_ERRORS as error:
        raise InputError(f"--model: {args.model} does not accept input of shape {size} ({first_line(error)}); give its input "
                         "with --channels and --input-size (or declare them in the factory's attrib_input)") from None
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


class _CompositeNames:
    """The names in :data:`attrib.lrp.COMPOSITES` as argparse choices, read when first asked (a
    composite registered before ``main`` runs is listed): importing the registry imports torch,
    which building the parser does not."""

    def _names(self) -> list[str]:
        from .lrp import COMPOSITES

        return sorted(COMPOSITES)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())


def _composite_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--composite", default=None, choices=_CompositeNames(), metavar="NAME",
                   help=f"LRP composite, one of %(choices)s (default {default}; attnlrp for a model with "
                        "nn.MultiheadAttention)")
    p.set_defaults(default_composite=default)


def _model_options(p: argparse.ArgumentParser, images: bool = True) -> None:
    if images:
        p.add_argument("images", nargs="*", help="image files, or chelsea/coffee/astronaut/rocket (scikit-image); with "
                                                 "--model text, sentences; default: the model's own samples")
        p.add_argument("--target", type=int, default=None,
                       help="class to explain (default: the predicted one; negative counts from the last)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--model", default="digits", help="digits (embedded CNN), digits-vit (embedded tiny ViT), text "
                                                         "(embedded sentiment CNN: the positional arguments are sentences), "
                                                         "a torchvision name, or package.module:factory")
    else:
        p.add_argument("model", help="digits, digits-vit, text, a torchvision name, or package.module:factory")
    _weights_options(p)


def _weights_options(p: argparse.ArgumentParser) -> None:
    """--weights and a custom model's input options."""
    p.add_argument("--weights", default=None, help="a state-dict file, or DEFAULT (embedded / local torch cache; never downloaded)")
    custom = p.add_argument_group("custom models (package.module:factory); these override what the factory declares")
    custom.add_argument("--channels", type=int, default=None, help="input channels (default 3)")
    custom.add_argument("--input-size", type=int, default=None, dest="input_size", help="input height = width (default 224)")
    custom.add_argument("--mean", type=_numbers, default=None, help="per-channel mean of the normalisation, e.g. 0.5,0.5,0.5")
    custom.add_argument("--std", type=_numbers, default=None, help="per-channel std of the normalisation")
    custom.add_argument("--output", type=_key, default=None, help="key (dict) or index (tuple) of the scores to explain")


def _sized(option: str, what: str) -> str:
    """Help for a setting whose default depends on the input size."""
    small, large = _size_defaults(0)[option], _size_defaults(LARGE)[option]
    return f"{what} (default {small}; {large} for inputs over {LARGE - 1} px)"


def _explain_options(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    p.add_argument("--methods", default=None, help=f"comma-separated from {', '.join(EXPLAIN_METHODS)} (default: all that apply)")
    p.add_argument("--layer", default=None, help="layer for conductance, Grad-CAM, ascent, deconvolution (default: the last "
                                                  "convolution, or the block around it that every path crosses)")
    p.add_argument("--out", default="attrib-report", help="output folder: created, or replaced only if attrib wrote it")
    p.add_argument("--n-steps", type=int, default=None, dest="n_steps", help=_sized("n_steps", "integration steps of IG and conductance")[:-1] + "; 50 for the text model)")
    p.add_argument("--steps", type=int, default=None, help=_sized("steps", "conductance-ascent iterations"))
    p.add_argument("--ascent-n-steps", type=int, default=None, dest="ascent_n_steps",
                   help=_sized("ascent_n_steps", "conductance steps inside each ascent iteration"))
    p.add_argument("--k", type=int, default=6, help="channels per layer in the path graph")
    p.add_argument("--max-k", type=int, default=None, dest="max_k", help=_sized("max_k", "largest K on the K-path curves"))
    p.add_argument("--distance", type=float, default=1.0,
                   help="shape distance (0..2) of the unit-L1 K-path and full heatmaps at which K is chosen")
    p.add_argument("--tolerance", type=float, default=0.05, help="largest relative completeness error marked as passed")
    p.add_argument("--scorecard", action="store_true",
                   help="add the audit's faithfulness scorecard to the report: max-sensitivity (each method re-run on 8 "
                        "perturbed copies) and the randomisation check (the layer methods on randomised copies of the "
                        "model) beside deletion/insertion AUC and infidelity; image models; about 6 s on the digits CNN")
    _composite_option(p, LRP_COMPOSITE)
    p.set_defaults(run=explain)


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="attrib", description="Attribution for PyTorch models: explain, audit, list layers, benchmark.")
    commands = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    explain_parser = commands.add_parser("explain", help="write figures, report.json and index.html")
    _explain_options(explain_parser)
    explain_parser.add_argument("--sentences", default=None, help="text model: a UTF-8 file of sentences, one per line")

    p = commands.add_parser("audit", help="completeness and conservation errors; exit 1 above the tolerance")
    _model_options(p)
    p.add_argument("--tolerance", type=float, default=0.05, help="largest relative error accepted")
    p.add_argument("--n-steps", type=int, default=64, dest="n_steps", help="integration steps")
    p.add_argument("--no-exact", action="store_false", dest="exact",
                   help="skip the exact integrals (piecewise-linear models: per-neuron error of each method against them)")
    p.add_argument("--exact-max-regions", type=int, default=50_000, dest="exact_max_regions",
                   help="skip the exact integrals when a path has more linear regions than this (default 50000)")
    p.add_argument("--no-scorecard", action="store_false", dest="scorecard",
                   help="skip the faithfulness scorecard (deletion/insertion AUC, infidelity, max-sensitivity, randomisation)")
    _composite_option(p, "epsilon")
    p.set_defaults(run=audit)

    p = commands.add_parser("layers", help="layer names and output shapes (what --layer takes)")
    _model_options(p, images=False)
    p.set_defaults(run=layers)

    from .cli_run import add_parser as add_run_parser

    add_run_parser(commands, _weights_options, _composite_option)

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
