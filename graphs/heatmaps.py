"""K-path heatmaps and the curves that choose K (the neuron-selection paper's comparison of what the
K best paths explain with the full explanation).

A K-path heatmap is the input relevance when, at every chosen layer, the relevance of the channels
not on any of the K best paths is set to zero during the backward pass (the same kept forward pass
as the graph). The score curve keeps only the path channels in a plain forward pass (the others'
activations set to zero at the layer's output) and compares the target score with the full one.

A path through L layers carries a product of L shares, so K-path maps are orders of magnitude
smaller than the full map (1e-20 to 1e-17 of it on random-init VGG16): raw maps cannot be compared. The curves
therefore separate **shape** from **amount**:

    shape distance  d(a, b) = sum_i | a_i / sum_j |a_j|  -  b_i / sum_j |b_j| |        in [0, 2]
    share carried   s(a, b) = sum_i a_i / sum_i b_i

over every input element (a: the K-path map, b: the full map). d is 0 for maps equal up to a
positive factor, 2 for maps with disjoint supports or opposite signs; for maps of one sign d / 2 is
the fraction of the normalised relevance the K-path map puts elsewhere than the full map. A map of
zeros has no shape: d = 2 from any non-zero map (0 from another map of zeros). For comparison, two
unrelated maps of random signs give d ~ sqrt(2). :data:`SHAPE_THRESHOLD` (d <= 1: at most half of
the normalised relevance misplaced) is the default for choosing K. The raw pixelwise metrics stay
available (``heatmap_mse``, ``heatmap_smape``):

    SMAPE(a, b) = mean |a - b| / ((|a| + |b|) / 2)   (terms with a = b = 0 count 0)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from attrib.checks import expand_args
from attrib.errors import InputError
from attrib.hooks import capture, mask
from attrib.targets import normalize_target, target_scores

from .critical_paths import CriticalPath, k_best_paths
from .flow import FlowGraph

SHAPE_THRESHOLD = 1.0
PLATEAU_TOLERANCE = 0.05
_LOWER_IS_BETTER = ("heatmap_distance", "heatmap_smape", "heatmap_mse", "score_smape", "score_mse")


def smape(a: Tensor, b: Tensor) -> float:
    scale = (a.abs() + b.abs()) / 2
    terms = torch.where(scale > 0, (a - b).abs() / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    return float(terms.mean())


def mse(a: Tensor, b: Tensor) -> float:
    return float((a - b).square().mean())


def unit_l1(a: Tensor) -> Tensor:
    """``a / sum |a|`` in float64 (a map of zeros stays zeros)."""
    a = a.detach().double()
    norm = a.abs().sum()
    return a / norm if norm > 0 else a


def shape_distance(a: Tensor, b: Tensor) -> float:
    """``sum |a / |a|_1 - b / |b|_1|`` in [0, 2]; 2 when exactly one of the maps is all zeros."""
    a_norm, b_norm = float(a.detach().abs().sum()), float(b.detach().abs().sum())
    if a_norm == 0 or b_norm == 0:
        return 0.0 if a_norm == b_norm else 2.0
    return float((unit_l1(a) - unit_l1(b)).abs().sum())


def share(part: Tensor, whole: Tensor) -> float:
    """``sum(part) / sum(whole)``: the fraction of the relevance (or score) ``part`` carries (nan if
    ``whole`` sums to 0)."""
    total = float(whole.detach().double().sum())
    return float(part.detach().double().sum()) / total if total != 0 else math.nan


def _masks(flow: FlowGraph, path_sets: Sequence[Sequence[CriticalPath] | None]) -> dict[str, Tensor]:
    """Per layer ``(len(path_sets), C)``: 1 on channels that lie on a path of each set (everywhere
    for a set that is ``None``: nothing masked)."""
    masks = {}
    for layer in flow.layers:
        channels = flow.values[layer].shape[0]
        weights = torch.zeros(len(path_sets), channels, dtype=flow.inputs.dtype, device=flow.inputs.device)
        for row, paths in enumerate(path_sets):
            if paths is None:
                weights[row] = 1
                continue
            for path in paths:
                channel = path.channels.get(layer)
                if channel is not None:
                    weights[row, channel] = 1
        masks[layer] = weights
    return masks


def _trace(flow: FlowGraph):
    if flow.trace is None:
        raise InputError("flow: K-path heatmaps come from the LRP pass; build the graph with method='lrp'")
    return flow.trace


def path_heatmaps(flow: FlowGraph, path_sets: Sequence[Sequence[CriticalPath] | None]) -> Tensor:
    """``(len(path_sets), *input)``: the input relevance keeping only each set's path channels
    (``None``: the full map, in the same batched backward pass)."""
    trace = _trace(flow)
    copies = trace.copies
    masks = _masks(flow, path_sets)
    maps = []
    for start in range(0, len(path_sets), copies):
        rows = min(copies, len(path_sets) - start)
        keep = {}
        for layer, weights in masks.items():
            block = torch.zeros(copies, weights.shape[1], dtype=weights.dtype, device=weights.device)
            block[:rows] = weights[start:start + rows]
            keep[layer] = block
        maps.append(trace.to_input(trace.start, keep)[:rows])
    return torch.cat(maps)


def full_heatmap(flow: FlowGraph) -> Tensor:
    """The input relevance with nothing masked (the same pass)."""
    trace = _trace(flow)
    return trace.to_input(trace.start)[0]


def path_scores(flow: FlowGraph, path_sets: Sequence[Sequence[CriticalPath]]) -> Tensor:
    """Target score ``(len(path_sets),)`` with only each set's path channels kept in the forward pass
    (masked at the module that carries each layer's relevance: its BatchNorm when folded)."""
    rows = len(path_sets)
    if rows == 0:
        return flow.inputs.new_zeros(0)
    masks = _masks(flow, path_sets)
    x = flow.inputs.expand((rows,) + tuple(flow.inputs.shape[1:]))
    modules = {flow.seen_at.get(layer, layer): layer for layer in flow.layers}
    edit = {}
    for module, layer in modules.items():
        weights = masks[layer]
        edit[module] = mask(weights.reshape(weights.shape + (1,) * (len(flow.shapes[layer]) - 1)))
    target = normalize_target(flow.target, rows)
    with capture(flow.model, list(modules), edit=edit), torch.no_grad():
        output = flow.model(x, *expand_args(flow.args, torch.zeros(rows, dtype=torch.long, device=x.device), 1))
    return target_scores(output, target, torch.arange(rows, device=x.device))


@dataclass
class KCurves:
    """For K = 1..N: the masked score and heatmap against the full ones.

    ``heatmap_distance``: shape distance d of the K-path map to the full map (module docstring);
    ``heatmap_share``: sum of the K-path map / sum of the full map; ``score_share``: the score with
    only the path channels kept / the full score; ``heatmap_mse``, ``heatmap_smape``, ``score_mse``,
    ``score_smape``: the raw pixelwise / score metrics. ``full_relevance``: sum of the full map.

    >>> curves = k_curves(flow, max_k=50)
    >>> curves.choose()            # smallest K with heatmap_distance <= SHAPE_THRESHOLD, or None
    >>> curves.plateau()           # smallest K within PLATEAU_TOLERANCE of the best distance
    """

    ks: list[int]
    scores: list[float]
    score_mse: list[float]
    score_smape: list[float]
    heatmap_mse: list[float]
    heatmap_smape: list[float]
    full_score: float
    heatmap_distance: list[float] = field(default_factory=list)
    heatmap_share: list[float] = field(default_factory=list)
    score_share: list[float] = field(default_factory=list)
    full_relevance: float = math.nan
    maps: Tensor | None = field(default=None, repr=False)  # (N, *input): the K-path heatmaps, K = 1..N
    full_map: Tensor | None = field(default=None, repr=False)  # the full heatmap of the same pass

    def _values(self, metric: str) -> list[float]:
        if metric not in _LOWER_IS_BETTER:
            raise InputError(f"metric must be one of {', '.join(_LOWER_IS_BETTER)}; got {metric!r}")
        return getattr(self, metric)

    def choose(self, threshold: float = SHAPE_THRESHOLD, metric: str = "heatmap_distance") -> int | None:
        """The smallest K whose ``metric`` is at most ``threshold`` (None if none is)."""
        for k, value in zip(self.ks, self._values(metric)):
            if value <= threshold:
                return k
        return None

    def plateau(self, tolerance: float = PLATEAU_TOLERANCE, metric: str = "heatmap_distance") -> int | None:
        """The smallest K whose ``metric`` is within ``tolerance`` of the best value on the curve: where
        more paths stop changing the comparison (whether or not it is good: read the value there).
        None if the curve has no finite value."""
        values = [v for v in self._values(metric) if math.isfinite(v)]
        return self.choose(min(values) + tolerance, metric) if values else None


def k_curves(flow: FlowGraph, max_k: int = 10) -> KCurves:
    """Shape distance, share carried, MSE and SMAPE of the K-path score and heatmap against the full
    ones, K = 1..``max_k``."""
    paths = k_best_paths(flow, max_k)
    ks = list(range(1, len(paths) + 1))
    sets = [paths[:k] for k in ks]
    with torch.no_grad():
        full_score = float(target_scores(flow.model(flow.inputs, *flow.args), normalize_target(flow.target, 1), torch.zeros(1, dtype=torch.long)))
    reference = torch.tensor([full_score], dtype=flow.inputs.dtype)
    scores = path_scores(flow, sets).detach().cpu()
    nothing = [math.nan] * len(ks)
    heat_mse, heat_smape, distance, carried, full_relevance = nothing, nothing, nothing, nothing, math.nan
    maps = full = None
    if flow.trace is not None:
        *rows, full = path_heatmaps(flow, [*sets, None])  # the full map rides in a spare row of the last pass
        maps = torch.stack(rows) if rows else full.new_zeros((0,) + full.shape)
        heat_mse, heat_smape = [mse(m, full) for m in maps], [smape(m, full) for m in maps]
        distance, carried = [shape_distance(m, full) for m in maps], [share(m, full) for m in maps]
        full_relevance = float(full.double().sum())
    return KCurves(
        ks=ks, scores=scores.tolist(),
        score_mse=[mse(s.view(1), reference) for s in scores],
        score_smape=[smape(s.view(1), reference) for s in scores],
        heatmap_mse=heat_mse, heatmap_smape=heat_smape, full_score=full_score,
        heatmap_distance=distance, heatmap_share=carried,
        score_share=[share(s, reference) for s in scores], full_relevance=full_relevance, maps=maps, full_map=full,
    )
